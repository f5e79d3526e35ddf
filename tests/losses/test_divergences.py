"""Invariants of the distillation losses: fp64 agreement, direction, bounds, -inf columns, normalisation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import loss_kwargs

from llm_neo.losses import (
    DIVERGENCES,
    distill_loss,
    divergence,
    forward_kl,
    forward_kl_inplace,
    jsd,
    next_token_targets,
    reference_divergence,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    tvd,
)

NEG_INF = float("-inf")
SHAPES = [(1, 2), (7, 33), (16, 257)]
# (temperature, beta, skew_alpha) combinations; beta only matters for jsd, alpha for the skews.
OPTIONS = [(0.5, 0.1, 0.0), (1.0, 0.5, 0.1), (2.0, 0.9, 0.5)]


def _loss(student_logits, targets, teacher, **kw):
    """``distill_loss`` with the loss options as keywords."""
    return distill_loss(student_logits, targets, teacher, **loss_kwargs(kw))


def _logits(shape: tuple[int, ...], seed: int, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(student, teacher) fp32 logits; scale 3 gives peaked distributions, far from uniform."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale, torch.randn(shape, generator=g) * scale)


# --------------------------------------------------------------------------------------------------
# fp64 reference agreement: values and gradients
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("temperature", "beta", "alpha"), OPTIONS)
@pytest.mark.parametrize("seed", [0, 1])
def test_fast_matches_fp64_reference(name, shape, temperature, beta, alpha, seed):
    s, t = _logits(shape, seed)
    kw = {"temperature": temperature, "beta": beta, "skew_alpha": alpha}

    s32 = s.clone().requires_grad_()
    fast = divergence(name, s32, t, **kw)
    assert fast.shape == shape[:1] and fast.dtype == torch.float32
    (g_fast,) = torch.autograd.grad(fast.sum(), s32)

    s64 = s.double().requires_grad_()
    ref = reference_divergence(name, s64, t.double(), **kw)
    assert ref.dtype == torch.float64
    (g_ref,) = torch.autograd.grad(ref.sum(), s64)

    torch.testing.assert_close(fast.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_fast.double(), g_ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_fast_in_fp64_matches_reference_tightly(name):
    # Fed float64, the fast path computes in float64: any formula difference shows at 1e-12.
    s, t = _logits((9, 40), 3)
    fast = divergence(name, s.double(), t.double(), temperature=1.5, beta=0.3, skew_alpha=0.2)
    ref = reference_divergence(name, s, t, temperature=1.5, beta=0.3, skew_alpha=0.2)
    assert fast.dtype == torch.float64
    torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl"])
def test_gradcheck_fast_fp64(name):
    s, t = _logits((3, 6), 4, scale=1.0)
    s = s.double().requires_grad_()
    t = t.double().requires_grad_()

    def fn(s_: torch.Tensor, t_: torch.Tensor) -> torch.Tensor:
        return divergence(name, s_, t_, temperature=1.3, beta=0.3, skew_alpha=0.2)

    assert torch.autograd.gradcheck(fn, (s, t))


def test_reference_detects_a_wrong_formula():
    # Guard against a vacuous comparison: forward and reverse KL must differ on random logits.
    s, t = _logits((5, 11), 5)
    assert not torch.allclose(forward_kl(s, t), reverse_kl(s, t), rtol=1e-3)
    assert not torch.allclose(
        reference_divergence("jsd", s, t, beta=0.2), reference_divergence("jsd", s, t, beta=0.8), rtol=1e-3
    )


# --------------------------------------------------------------------------------------------------
# Independent formulas
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_forward_kl_equals_torch_kl_div(temperature):
    s, t = _logits((8, 50), 6)
    log_q = F.log_softmax(s / temperature, dim=-1)
    log_p = F.log_softmax(t / temperature, dim=-1)
    # F.kl_div(input, target) = KL(target || input): input = student, target = teacher.
    expected = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1) * temperature**2
    torch.testing.assert_close(forward_kl(s, t, temperature=temperature), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale", [0.1, 3.0, 30.0])
def test_inplace_forward_kl_equals_the_reference(shape, scale):
    student, teacher = _logits(shape, seed=3, scale=scale)
    expected = reference_divergence("forward_kl", student.double(), teacher.double(), temperature=1.0)
    fast = forward_kl(student, teacher)
    got = forward_kl_inplace(student.clone(), teacher.clone())  # it overwrites its inputs
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got, fast, atol=1e-5, rtol=1e-5)
    assert (got >= -1e-6).all()


def test_inplace_forward_kl_with_columns_the_teacher_gives_no_mass():
    student, teacher = _logits((4, 9), seed=5)
    teacher[:, -3:] = NEG_INF  # padding columns: 0 · log 0 = 0, not NaN
    got = forward_kl_inplace(student.clone(), teacher.clone())
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, forward_kl(student, teacher), atol=1e-5, rtol=1e-5)
    assert float(forward_kl_inplace(teacher.clone(), teacher.clone()).abs().max()) < 1e-6  # equal: 0


def test_tvd_is_half_l1_of_softmax():
    s, t = _logits((8, 50), 7)
    expected = 0.5 * torch.linalg.vector_norm(s.softmax(-1) - t.softmax(-1), ord=1, dim=-1)
    torch.testing.assert_close(tvd(s, t), expected, rtol=1e-5, atol=1e-6)
    assert (tvd(s, t) <= 1.0 + 1e-6).all()


def test_symmetric_jsd_is_bounded_by_log2_and_symmetric():
    s, t = _logits((32, 20), 8, scale=20.0)  # nearly one-hot, nearly disjoint: close to the bound
    value = jsd(s, t, beta=0.5)
    assert (value <= math.log(2) + 1e-6).all()
    assert value.max() > 0.5  # the bound is approached, so the test could fail
    torch.testing.assert_close(value, jsd(t, s, beta=0.5), rtol=1e-5, atol=1e-6)


def test_jsd_beta_swaps_with_arguments():
    # JSD_beta(q; p) with m = beta p + (1 - beta) q equals JSD_{1-beta} with the roles swapped.
    s, t = _logits((6, 30), 9)
    torch.testing.assert_close(jsd(s, t, beta=0.2), jsd(t, s, beta=0.8), rtol=1e-5, atol=1e-6)


def test_skew_with_alpha_zero_is_plain_kl():
    s, t = _logits((6, 30), 10)
    torch.testing.assert_close(skew_forward_kl(s, t, alpha=0.0), forward_kl(s, t), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(skew_reverse_kl(s, t, alpha=0.0), reverse_kl(s, t), rtol=1e-6, atol=1e-7)


def test_skew_kl_is_bounded_by_minus_log_alpha():
    # KL(p || a p + (1 - a) q) <= -log a, however far apart p and q are.
    s, t = _logits((16, 20), 11, scale=30.0)
    for alpha in (0.1, 0.5):
        assert (skew_forward_kl(s, t, alpha=alpha) <= -math.log(alpha) + 1e-5).all()
        assert (skew_reverse_kl(s, t, alpha=alpha) <= -math.log(alpha) + 1e-5).all()


def test_direction_forward_is_reverse_with_swapped_arguments():
    s, t = _logits((10, 64), 12)
    torch.testing.assert_close(forward_kl(s, t), reverse_kl(t, s), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(
        skew_forward_kl(s, t, alpha=0.3), skew_reverse_kl(t, s, alpha=0.3), rtol=1e-6, atol=1e-7
    )


def test_forward_kl_direction_on_a_hand_example():
    # p = teacher = (1/2, 1/2), q = student = (1/4, 3/4); KL values written out from the definition.
    p = torch.tensor([[0.5, 0.5]])
    q = torch.tensor([[0.25, 0.75]])
    expected_fwd = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    expected_rev = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert forward_kl(q.log(), p.log()).item() == pytest.approx(expected_fwd, rel=1e-6)
    assert reverse_kl(q.log(), p.log()).item() == pytest.approx(expected_rev, rel=1e-6)
    assert tvd(q.log(), p.log()).item() == pytest.approx(0.25, rel=1e-6)


# --------------------------------------------------------------------------------------------------
# Non-negativity, zero at equality, temperature scaling
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nonnegative(name, seed):
    s, t = _logits((32, 100), seed, scale=5.0)
    for beta, alpha in ((0.1, 0.0), (0.5, 0.1), (0.9, 0.9)):
        value = divergence(name, s, t, beta=beta, skew_alpha=alpha)
        assert (value >= -1e-6).all()
        assert value.max() > 1e-3


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("teacher_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_zero_when_student_equals_teacher(name, teacher_dtype):
    _, t = _logits((16, 300), 13, scale=4.0)
    t = t.to(teacher_dtype)
    s = t.float().requires_grad_()  # same values as the (low-precision) teacher
    value = divergence(name, s, t, temperature=0.7, beta=0.3, skew_alpha=0.2)
    torch.testing.assert_close(value, torch.zeros(16), rtol=0, atol=1e-6)
    (grad,) = torch.autograd.grad(value.sum(), s)
    torch.testing.assert_close(grad, torch.zeros_like(grad), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_bf16_teacher_is_upcast(name):
    s, t = _logits((8, 64), 14)
    t16 = t.bfloat16()
    value = divergence(name, s, t16)
    assert value.dtype == torch.float32
    torch.testing.assert_close(
        value.double(), reference_divergence(name, s, t16.float()), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("temperature", [0.5, 2.0, 4.0])
def test_temperature_squared_scaling(name, temperature):
    s, t = _logits((6, 40), 15)
    scaled = divergence(name, s, t, temperature=temperature, beta=0.3, skew_alpha=0.2)
    unscaled = divergence(name, s / temperature, t / temperature, beta=0.3, skew_alpha=0.2)
    torch.testing.assert_close(scaled, temperature**2 * unscaled, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# -inf (zero-probability) columns
# --------------------------------------------------------------------------------------------------

FINITE_WITH_SHARED_ZEROS = ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"]


def _with_inf_columns(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    s, t = _logits((5, 24), seed)
    keep = torch.ones(24, dtype=torch.bool)
    keep[[0, 7, 8, 23]] = False
    return s, t, keep


@pytest.mark.parametrize("name", FINITE_WITH_SHARED_ZEROS)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_shared_inf_columns_equal_removed_columns(name, temperature):
    s, t, keep = _with_inf_columns(16)
    s_inf = s.masked_fill(~keep, NEG_INF).requires_grad_()
    t_inf = t.masked_fill(~keep, NEG_INF)
    kw = {"temperature": temperature, "beta": 0.3, "skew_alpha": 0.2}
    value = divergence(name, s_inf, t_inf, **kw)
    (grad,) = torch.autograd.grad(value.sum(), s_inf)
    assert torch.isfinite(value).all() and not torch.isnan(grad).any()
    assert torch.isfinite(grad).all()

    s_kept = s[:, keep].clone().requires_grad_()
    expected = divergence(name, s_kept, t[:, keep], **kw)
    (grad_kept,) = torch.autograd.grad(expected.sum(), s_kept)
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad[:, keep], grad_kept, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad[:, ~keep], torch.zeros_like(grad[:, ~keep]))
    # The fp64 reference agrees on the value too.
    torch.testing.assert_close(
        value.double(), reference_divergence(name, s_inf.detach(), t_inf, **kw), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("name", ["forward_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"])
def test_teacher_only_inf_columns_stay_finite(name):
    # The teacher gives zero probability to columns the student still covers. Finite for all of these
    # (reverse KL is genuinely +inf there and is excluded).
    s, t, keep = _with_inf_columns(17)
    s = s.clone().requires_grad_()
    t_inf = t.masked_fill(~keep, NEG_INF)
    kw = {"beta": 0.3, "skew_alpha": 0.2}
    value = divergence(name, s, t_inf, **kw)
    (grad,) = torch.autograd.grad(value.sum(), s)
    assert torch.isfinite(value).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(
        value.double(), reference_divergence(name, s.detach(), t_inf, **kw), rtol=1e-5, atol=1e-6
    )
    if name == "forward_kl":
        # Forward KL ignores columns where p = 0 except through the student's normaliser.
        log_q = F.log_softmax(s.detach(), dim=-1)[:, keep]
        p = t[:, keep].softmax(-1)
        torch.testing.assert_close(value, (p * (p.log() - log_q)).sum(-1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"])
def test_student_only_inf_columns_stay_finite(name):
    s, t, keep = _with_inf_columns(18)
    s_inf = s.masked_fill(~keep, NEG_INF).requires_grad_()
    value = divergence(name, s_inf, t, beta=0.3, skew_alpha=0.2)
    (grad,) = torch.autograd.grad(value.sum(), s_inf)
    assert torch.isfinite(value).all() and torch.isfinite(grad).all()


def test_reverse_kl_is_infinite_where_teacher_is_zero_but_student_is_not():
    s, t, keep = _with_inf_columns(19)
    assert torch.isposinf(reverse_kl(s, t.masked_fill(~keep, NEG_INF))).all()
    assert torch.isposinf(forward_kl(s.masked_fill(~keep, NEG_INF), t)).all()


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


def test_unknown_divergence_name_lists_the_choices():
    s, t = _logits((2, 3), 0)
    for fn in (divergence, reference_divergence):
        with pytest.raises(ValueError, match=r"unknown divergence 'kl'.*forward_kl.*tvd"):
            fn("kl", s, t)


@pytest.mark.parametrize("beta", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_bad_beta(beta):
    s, t = _logits((2, 3), 0)
    with pytest.raises(ValueError, match="beta"):
        jsd(s, t, beta=beta)
    with pytest.raises(ValueError, match="beta"):
        reference_divergence("jsd", s, t, beta=beta)


@pytest.mark.parametrize("alpha", [1.0, -0.1, 2.0])
@pytest.mark.parametrize("name", ["skew_forward_kl", "skew_reverse_kl"])
def test_bad_skew_alpha(alpha, name):
    s, t = _logits((2, 3), 0)
    with pytest.raises(ValueError, match="skew_alpha"):
        divergence(name, s, t, skew_alpha=alpha)
    with pytest.raises(ValueError, match="skew_alpha"):
        reference_divergence(name, s, t, skew_alpha=alpha)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("inf")])
def test_bad_temperature(temperature):
    s, t = _logits((2, 3), 0)
    with pytest.raises(ValueError, match="temperature"):
        forward_kl(s, t, temperature=temperature)


def test_shape_mismatch():
    with pytest.raises(ValueError, match="same shape"):
        forward_kl(torch.zeros(2, 3), torch.zeros(2, 4))


def test_inputs_are_not_mutated():
    s, t = _logits((4, 10), 20)
    s0, t0 = s.clone(), t.clone()
    for name in DIVERGENCES:
        divergence(name, s, t, temperature=2.0)
    _loss(s, torch.tensor([1, 2, 3, 4]), t, kd_ratio=0.5, num_tokens=4)
    assert torch.equal(s, s0) and torch.equal(t, t0)


# --------------------------------------------------------------------------------------------------
# next_token_targets
# --------------------------------------------------------------------------------------------------


def test_next_token_targets_shifts_left_and_pads():
    labels = torch.tensor([[-100, -100, 5, 6, 7], [-100, 8, 9, -100, -100]])
    original = labels.clone()
    expected = torch.tensor([[-100, 5, 6, 7, -100], [8, 9, -100, -100, -100]])
    assert torch.equal(next_token_targets(labels), expected)
    assert torch.equal(labels, original)
    # The position predicting the first response token (5) is trained; the last position is not.
    assert (next_token_targets(labels) != -100).sum() == (labels != -100).sum()


# --------------------------------------------------------------------------------------------------
# distill_loss
# --------------------------------------------------------------------------------------------------


def _batch(n: int, v: int, seed: int, v_teacher: int | None = None):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, v, generator=g) * 2
    t = torch.randn(n, v_teacher or v, generator=g) * 2
    y = torch.randint(0, v, (n,), generator=g)
    return s, t, y


def test_kd_ratio_zero_is_ce_mean():
    s, t, y = _batch(12, 30, 0)
    for teacher in (None, t):
        parts = _loss(s, y, teacher, kd_ratio=0.0, num_tokens=12)
        torch.testing.assert_close(parts.loss, F.cross_entropy(s, y))
        assert parts.kd_sum.item() == 0.0 and parts.num_tokens == 12
        torch.testing.assert_close(parts.ce_sum, F.cross_entropy(s, y, reduction="sum"))


@pytest.mark.parametrize("name", DIVERGENCES)
def test_loss_combines_ce_and_kd_sums(name):
    s, t, y = _batch(10, 25, 1)
    s = s.requires_grad_()
    parts = _loss(s, y, t, kd_ratio=0.3, num_tokens=40, divergence=name, temperature=2.0)
    kd = divergence(name, s, t, temperature=2.0).sum()
    ce = F.cross_entropy(s, y, reduction="sum")
    torch.testing.assert_close(parts.loss, (0.7 * ce + 0.3 * kd) / 40)
    torch.testing.assert_close(parts.kd_sum, kd.detach())
    assert parts.loss.requires_grad and not parts.ce_sum.requires_grad and not parts.kd_sum.requires_grad
    assert parts.ce_sum.dtype == parts.kd_sum.dtype == torch.float32


def test_kd_ratio_one_is_pure_kd_and_teacher_gets_no_grad():
    s, t, y = _batch(6, 20, 2)
    s, t = s.requires_grad_(), t.requires_grad_()
    parts = _loss(s, y, t, kd_ratio=1.0, num_tokens=6)
    torch.testing.assert_close(parts.loss, forward_kl(s, t.detach()).mean())
    assert parts.ce_sum > 0  # still reported for logging
    parts.loss.backward()
    assert t.grad is None and s.grad is not None


@pytest.mark.parametrize("name", ["forward_kl", "jsd", "tvd"])
def test_gradient_accumulation_invariance(name):
    # Unequal micro-batches (3 + 9 tokens): the sum of micro-batch losses normalised by the global count
    # equals the one-batch per-token mean, which a mean of micro-batch means would not.
    s, t, y = _batch(12, 40, 3)
    kw = {"kd_ratio": 0.6, "divergence": name, "temperature": 1.5}

    s_full = s.clone().requires_grad_()
    full = _loss(s_full, y, t, num_tokens=12, **kw)
    full.loss.backward()

    s_acc = s.clone().requires_grad_()
    parts = [_loss(s_acc[a:b], y[a:b], t[a:b], num_tokens=12, **kw) for a, b in ((0, 3), (3, 12))]
    total = sum(p.loss for p in parts)
    assert isinstance(total, torch.Tensor)
    total.backward()

    torch.testing.assert_close(total, full.loss)
    torch.testing.assert_close(s_acc.grad, s_full.grad)
    torch.testing.assert_close(sum(p.ce_sum for p in parts), full.ce_sum)
    torch.testing.assert_close(sum(p.kd_sum for p in parts), full.kd_sum)
    assert [p.num_tokens for p in parts] == [3, 9]
    mean_of_means = (
        sum(_loss(s[a:b], y[a:b], t[a:b], num_tokens=b - a, **kw).loss for a, b in ((0, 3), (3, 12))) / 2
    )
    assert not torch.allclose(mean_of_means, full.loss)


def test_num_tokens_may_be_a_tensor():
    s, t, y = _batch(5, 10, 4)
    a = _loss(s, y, t, kd_ratio=0.5, num_tokens=20)
    b = _loss(s, y, t, kd_ratio=0.5, num_tokens=torch.tensor(20))
    torch.testing.assert_close(a.loss, b.loss)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_kd_vocab_size_equals_presliced_and_inf_padding(name):
    # Student padded to 48 columns, teacher to 40, tokenizer has 32 ids.
    s, t, y = _batch(8, 48, 5, v_teacher=40)
    y = y % 32
    parts = _loss(s, y, t, kd_ratio=0.5, num_tokens=8, divergence=name, kd_vocab_size=32)
    kd = divergence(name, s[:, :32], t[:, :32]).sum()
    torch.testing.assert_close(parts.kd_sum, kd)
    # CE is on the full student width.
    torch.testing.assert_close(parts.ce_sum, F.cross_entropy(s, y, reduction="sum"))
    # Slicing is the same as giving the padding columns -inf in both models.
    s_pad = s[:, :40].clone()
    s_pad[:, 32:] = NEG_INF
    t_pad = t.clone()
    t_pad[:, 32:] = NEG_INF
    torch.testing.assert_close(divergence(name, s_pad, t_pad).sum(), kd)


def test_mismatched_widths_need_kd_vocab_size():
    s, t, y = _batch(4, 48, 6, v_teacher=40)
    with pytest.raises(ValueError, match=r"48.*40.*kd_vocab_size"):
        _loss(s, y % 40, t, kd_ratio=0.5, num_tokens=4)
    with pytest.raises(ValueError, match="kd_vocab_size"):
        _loss(s, y % 40, t, kd_ratio=0.5, num_tokens=4, kd_vocab_size=41)


@pytest.mark.parametrize("kd_ratio", [-0.1, 1.1, float("nan")])
def test_bad_kd_ratio(kd_ratio):
    s, t, y = _batch(4, 10, 7)
    with pytest.raises(ValueError, match="kd_ratio"):
        _loss(s, y, t, kd_ratio=kd_ratio, num_tokens=4)


def test_missing_teacher_with_kd():
    s, _, y = _batch(4, 10, 8)
    with pytest.raises(ValueError, match=r"kd_ratio.*teacher_logits"):
        _loss(s, y, None, kd_ratio=0.5, num_tokens=4)


def test_distill_loss_validates_options():
    s, t, y = _batch(4, 10, 9)
    with pytest.raises(ValueError, match="unknown divergence"):
        _loss(s, y, t, kd_ratio=0.0, num_tokens=4, divergence="kl")
    with pytest.raises(ValueError, match="beta"):
        _loss(s, y, t, kd_ratio=0.5, num_tokens=4, divergence="jsd", beta=1.0)
    with pytest.raises(ValueError, match="skew_alpha"):
        _loss(s, y, t, kd_ratio=0.5, num_tokens=4, divergence="skew_forward_kl", skew_alpha=1.0)
    with pytest.raises(ValueError, match="num_tokens"):
        _loss(s, y, t, kd_ratio=0.5, num_tokens=0)
    with pytest.raises(ValueError, match="targets"):
        _loss(s, y[:3], t, kd_ratio=0.5, num_tokens=4)
