"""The cross-tokenizer losses: ULD against its fp64 reference and the dense sorted L1 of Boizard et al.,
and the KD row mask (CE on every row, KD on the aligned ones) on the plain and chunked paths."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llm_neo.losses import (
    HeadInput,
    LossOptions,
    TopKTargets,
    chunked_distill_loss,
    distill_loss,
    reference_divergence,
    reference_uld,
    uld,
)


def topk_of(teacher_logits: torch.Tensor, k: int, temperature: float = 1.0) -> TopKTargets:
    """A teacher's top-k + tail at temperature T, as the cache and the cross-tokenizer path store it."""
    log_p = torch.log_softmax(teacher_logits / temperature, dim=-1)
    values, ids = log_p.topk(k, dim=-1)
    return TopKTargets(ids, values, torch.logsumexp(log_p.scatter(-1, ids, float("-inf")), dim=-1))


@pytest.mark.parametrize("k", [1, 5, 30])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_uld_matches_the_fp64_reference_values_and_gradients(k, temperature):
    g = torch.Generator().manual_seed(k)
    s = (torch.randn(7, 40, generator=g, dtype=torch.float64) * 3).requires_grad_()
    teacher = topk_of(torch.randn(7, 30, generator=g, dtype=torch.float64) * 3, k)  # another vocabulary
    fast, ref = uld(s, teacher, temperature=temperature), reference_uld(s, teacher, temperature=temperature)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-12)
    (g_fast,) = torch.autograd.grad(fast.sum(), s)
    (g_ref,) = torch.autograd.grad(ref.sum(), s)
    torch.testing.assert_close(g_fast, g_ref, rtol=1e-9, atol=1e-12)
    if k == 5:  # and the analytic check, on two rows (gradcheck is slow)
        two = TopKTargets(*(x[:2] for x in teacher))
        leaf = s[:2].detach().requires_grad_()
        assert torch.autograd.gradcheck(lambda x: uld(x, two, temperature=temperature), (leaf,))


def test_uld_with_the_whole_teacher_is_the_dense_sorted_l1():
    # Boizard et al.: sort both distributions, zero-pad the shorter one, L1. A teacher of 12 tokens kept
    # whole (k = V_t, empty tail) against a student of 20 must give exactly that.
    g = torch.Generator().manual_seed(0)
    s, t = (
        torch.randn(5, 20, generator=g, dtype=torch.float64),
        torch.randn(5, 12, generator=g, dtype=torch.float64),
    )
    q = s.softmax(-1).sort(-1, descending=True).values
    p = F.pad(t.softmax(-1).sort(-1, descending=True).values, (0, 8))
    torch.testing.assert_close(uld(s, topk_of(t, 12)), (q - p).abs().sum(-1), rtol=1e-12, atol=1e-12)
    # and a top-k teacher never exceeds it (the entries past k are merged into one bucket)
    assert (uld(s, topk_of(t, 4)) <= (q - p).abs().sum(-1) + 1e-12).all()


def test_uld_ignores_token_identity():
    # The same distribution over a permuted vocabulary is at distance 0; a different one is not.
    g = torch.Generator().manual_seed(1)
    t = torch.randn(4, 16, generator=g, dtype=torch.float64)
    perm = torch.randperm(16, generator=g)
    assert uld(t[:, perm], topk_of(t, 16)).abs().max() < 1e-12
    assert (uld(t.flip(0), topk_of(t, 16)) > 1e-3).all()


def _head_problem(
    seed: int, n: int = 9, h: int = 6, v: int = 24
) -> tuple[HeadInput, torch.Tensor, TopKTargets]:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64, requires_grad=True)
    head = torch.randn(v, h, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, v, (n,), generator=g)
    teacher = topk_of(torch.randn(n, v, generator=g, dtype=torch.float64) * 2, 6)
    return HeadInput(hidden, head), targets, teacher


@pytest.mark.parametrize(
    ("use_uld", "divergence"),
    [(False, "forward_kl"), (False, "reverse_kl"), (False, "jsd"), (True, "forward_kl")],
)
def test_kd_rows_train_ce_everywhere_and_kd_on_the_rows_only(use_uld, divergence):
    student, targets, teacher = _head_problem(3)
    rows = torch.tensor([True, False, True, True, False, False, True, False, True])
    options = LossOptions(kd_ratio=0.4, divergence=divergence, uld=use_uld, chunk_size=4)
    logits = student.hidden @ student.weight.T
    plain = distill_loss(logits, targets, teacher, options=options, num_tokens=11, kd_rows=rows)
    chunked = chunked_distill_loss(student, targets, teacher, options=options, num_tokens=11, kd_rows=rows)
    # the definition, in fp64: CE over all 9 rows, KD over the 5 selected, both over the same 11 tokens
    ce = F.cross_entropy(logits, targets, reduction="sum")
    sel = TopKTargets(*(x[rows] for x in teacher))
    kd_each = (
        reference_uld(logits[rows], sel) if use_uld else reference_divergence(divergence, logits[rows], sel)
    )
    expected = (0.6 * ce + 0.4 * kd_each.sum()) / 11
    want = torch.autograd.grad(expected, [student.hidden, student.weight], retain_graph=True)
    # distill_loss takes CE in float32 whatever the logits' dtype; the chunked path keeps float64.
    for parts, rtol, atol in ((plain, 1e-6, 1e-7), (chunked, 1e-10, 1e-12)):
        torch.testing.assert_close(parts.loss, expected, rtol=rtol, atol=atol)
        torch.testing.assert_close(parts.kd_sum, kd_each.sum().detach(), rtol=1e-10, atol=1e-12)
        got = torch.autograd.grad(parts.loss, [student.hidden, student.weight])
        for x, y in zip(got, want, strict=True):
            torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


def test_all_rows_equal_no_mask_and_no_rows_is_ce_alone():
    student, targets, teacher = _head_problem(4)
    options = LossOptions(kd_ratio=0.5, chunk_size=4)
    everywhere = torch.ones(9, dtype=torch.bool)
    a = chunked_distill_loss(student, targets, teacher, options=options, num_tokens=9)
    b = chunked_distill_loss(student, targets, teacher, options=options, num_tokens=9, kd_rows=everywhere)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-12, atol=1e-12)
    none = chunked_distill_loss(student, targets, teacher, options=options, num_tokens=9, kd_rows=~everywhere)
    ce = F.cross_entropy(student.hidden @ student.weight.T, targets, reduction="sum")
    torch.testing.assert_close(none.loss, 0.5 * ce / 9, rtol=1e-12, atol=1e-12)
    assert float(none.kd_sum) == 0.0


def test_bad_kd_rows_and_uld_with_dense_logits_are_refused():
    student, targets, teacher = _head_problem(5)
    with pytest.raises(ValueError, match="kd_rows"):
        chunked_distill_loss(
            student, targets, teacher, options=LossOptions(kd_ratio=0.5), num_tokens=9, kd_rows=torch.ones(8)
        )
    logits = student.hidden @ student.weight.T
    with pytest.raises(ValueError, match="uld"):
        distill_loss(
            logits, targets, logits.detach(), options=LossOptions(kd_ratio=0.5, uld=True), num_tokens=9
        )
