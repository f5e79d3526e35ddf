"""chunked_distill_loss == distill_loss on full logits (values and gradients), without ever holding them."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import NewTensors, loss_kwargs
from torch.utils._python_dispatch import TorchDispatchMode

from llm_neo.losses import (
    DIVERGENCES,
    HeadInput,
    LossParts,
    chunked_distill_loss,
    distill_loss,
    reference_divergence,
)
from llm_neo.runtime.memory import LiveTensorBytes

Tensor = torch.Tensor

# Shapes and options; every case is run for every divergence, kd_ratio, temperature and chunk size.
# v_t > v_s with kd_vocab_size: a teacher whose embedding table is padded wider than the student's.
CASES: list[dict[str, Any]] = [
    {"n": 1, "h": 8, "h_t": 8, "v_s": 50, "v_t": 50, "kvs": None, "bias": False, "caps": (None, None)},
    {"n": 7, "h": 12, "h_t": 16, "v_s": 97, "v_t": 128, "kvs": 90, "bias": True, "caps": (None, None)},
    {"n": 33, "h": 16, "h_t": 10, "v_s": 97, "v_t": 97, "kvs": None, "bias": True, "caps": (4.0, 6.0)},
    {"n": 33, "h": 9, "h_t": 12, "v_s": 50, "v_t": 64, "kvs": 50, "bias": False, "caps": (None, 3.0)},
]
CHUNKS = [1, 4, 1000]


pytestmark = pytest.mark.usefixtures("one_thread")


def _softcap(x: Tensor, cap: float | None) -> Tensor:
    return x if cap is None else cap * torch.tanh(x / cap)


def _problem(case: dict[str, Any], seed: int, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Random hidden states, heads, biases, targets; scale ~1 logits per unit so distributions are peaked."""
    g = torch.Generator().manual_seed(seed)
    n, h, h_t, v_s, v_t = case["n"], case["h"], case["h_t"], case["v_s"], case["v_t"]
    v_y = case["kvs"] or v_s  # real token ids are below the tokenizer length

    def rnd(*shape: int, scale: float = 1.0) -> Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    return {
        "hidden": rnd(n, h),
        "head": rnd(v_s, h, scale=h**-0.5 * 2),
        "bias": rnd(v_s) if case["bias"] else None,
        "t_hidden": rnd(n, h_t),
        "t_head": rnd(v_t, h_t, scale=h_t**-0.5 * 2),
        "t_bias": rnd(v_t) if case["bias"] else None,
        "targets": torch.randint(0, v_y, (n,), generator=g),
    }


def _leaves(p: dict[str, Any], with_head: bool = True) -> tuple[Tensor, Tensor, Tensor | None]:
    hidden = p["hidden"].clone().requires_grad_()
    head = p["head"].clone().requires_grad_(with_head)
    bias = None if p["bias"] is None else p["bias"].clone().requires_grad_()
    return hidden, head, bias


def _plain(
    p: dict[str, Any], leaves: tuple[Tensor, Tensor, Tensor | None], caps: Any, **kw: Any
) -> LossParts:
    """The full-logits path: lm_heads applied to every token at once, then distill_loss."""
    hidden, head, bias = leaves
    logits = F.linear(hidden, head, bias)
    t_logits = F.linear(p["t_hidden"], p["t_head"], p["t_bias"])
    return distill_loss(
        _softcap(logits, caps[0]), p["targets"], _softcap(t_logits, caps[1]), **loss_kwargs(kw)
    )


def _chunked(
    p: dict[str, Any], leaves: tuple[Tensor, Tensor, Tensor | None], caps: Any, **kw: Any
) -> LossParts:
    hidden, head, bias = leaves
    return _call_chunked(
        hidden,
        head,
        p["targets"],
        p["t_hidden"],
        p["t_head"],
        student_bias=bias,
        teacher_bias=p["t_bias"],
        student_softcap=caps[0],
        teacher_softcap=caps[1],
        **kw,
    )


def _call_chunked(
    student_hidden: Tensor,
    student_head: Tensor,
    targets: Tensor,
    teacher_hidden: Tensor | None = None,
    teacher_head: Tensor | None = None,
    *,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    **kw: Any,
) -> LossParts:
    """``chunked_distill_loss`` with the heads' parts and the loss options as keywords."""
    teacher = None
    if teacher_hidden is not None or teacher_head is not None:
        teacher = HeadInput(teacher_hidden, teacher_head, teacher_bias, teacher_softcap)  # type: ignore[arg-type]
    student = HeadInput(student_hidden, student_head, student_bias, student_softcap)
    return chunked_distill_loss(student, targets, teacher, **loss_kwargs(kw))


def _grads(loss: Tensor, leaves: tuple[Tensor, Tensor, Tensor | None]) -> list[Tensor | None]:
    wanted = [t for t in leaves if t is not None and t.requires_grad]
    got = iter(torch.autograd.grad(loss, wanted))
    return [next(got) if t is not None and t.requires_grad else None for t in leaves]


def _assert_parts_close(a: LossParts, b: LossParts, rtol: float, atol: float) -> None:
    torch.testing.assert_close(a.loss, b.loss, rtol=rtol, atol=atol)
    torch.testing.assert_close(a.ce_sum, b.ce_sum, rtol=rtol, atol=atol)
    torch.testing.assert_close(a.kd_sum, b.kd_sum, rtol=rtol, atol=atol)
    assert a.num_tokens == b.num_tokens


# --------------------------------------------------------------------------------------------------
# Agreement with the full-logits path
# --------------------------------------------------------------------------------------------------


# kd_ratio 0 ignores the temperature, so it is run at one temperature only.
KD_T = [(0.0, 1.0), *itertools.product([0.5, 1.0], [0.5, 1.0, 2.0])]


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("case_id", range(len(CASES)))
@pytest.mark.parametrize(("kd_ratio", "temperature"), KD_T)
def test_matches_plain_distill_loss(name, case_id, kd_ratio, temperature):
    case = CASES[case_id]
    p = _problem(case, seed=case_id)
    kw = {
        "kd_ratio": kd_ratio,
        "num_tokens": case["n"] + 5,  # a global count larger than this micro-batch's N
        "divergence": name,
        "temperature": temperature,
        "beta": 0.3,
        "skew_alpha": 0.2,
        "kd_vocab_size": case["kvs"],
    }
    plain_leaves = _leaves(p)
    plain = _plain(p, plain_leaves, case["caps"], **kw)
    plain_grads = _grads(plain.loss, plain_leaves)
    assert plain.loss.requires_grad

    for chunk_size in CHUNKS:
        leaves = _leaves(p)
        chunked = _chunked(p, leaves, case["caps"], chunk_size=chunk_size, **kw)
        assert chunked.loss.requires_grad
        assert not chunked.ce_sum.requires_grad and not chunked.kd_sum.requires_grad
        assert chunked.loss.dtype == chunked.ce_sum.dtype == chunked.kd_sum.dtype == torch.float32
        _assert_parts_close(chunked, plain, rtol=1e-5, atol=1e-6)
        for got, want in zip(_grads(chunked.loss, leaves), plain_grads, strict=True):
            assert (got is None) == (want is None)
            if got is not None:
                assert want is not None and got.dtype == want.dtype
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    if kd_ratio == 0.0:
        assert chunked.kd_sum.item() == 0.0
    else:
        assert chunked.kd_sum.item() > 1e-3  # a nonzero term is compared, so a wrong one could fail


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("case_id", [1, 2])  # 1: forward_kl takes the closed-form gradient; 2: soft-capped
def test_float64_matches_float64_reference_tightly(name, case_id):
    # Everything in float64, CE included; the KD part against the independent naive reference.
    case = CASES[case_id]
    kvs = case["kvs"]
    p = _problem(case, seed=11, dtype=torch.float64)
    caps = case["caps"]
    kw = {"temperature": 1.5, "beta": 0.3, "skew_alpha": 0.2}

    ref_leaves = _leaves(p)
    hidden, head, bias = ref_leaves
    logits = _softcap(F.linear(hidden, head, bias), caps[0])
    t_logits = _softcap(F.linear(p["t_hidden"], p["t_head"], p["t_bias"]), caps[1])
    ce = F.cross_entropy(logits, p["targets"], reduction="sum")
    kd = reference_divergence(name, logits[:, :kvs], t_logits[:, :kvs], **kw).sum()
    ref_loss = (0.4 * ce + 0.6 * kd) / 40
    ref_grads = _grads(ref_loss, ref_leaves)

    leaves = _leaves(p)
    out = _chunked(
        p, leaves, caps, kd_ratio=0.6, num_tokens=40, divergence=name, chunk_size=5, kd_vocab_size=kvs, **kw
    )
    assert out.loss.dtype == torch.float64
    torch.testing.assert_close(out.loss, ref_loss.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.ce_sum, ce.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.kd_sum, kd.detach(), rtol=1e-10, atol=1e-12)
    for got, want in zip(_grads(out.loss, leaves), ref_grads, strict=True):
        assert got is not None and want is not None and got.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_frozen_head_gets_no_grad_and_hidden_grad_is_right():
    # The LoRA arms: lm_head and bias frozen, only the hidden states (hence the adapters) get a gradient.
    case = CASES[1]
    p = _problem(case, seed=3)
    kw = {"kd_ratio": 0.5, "num_tokens": 7, "kd_vocab_size": 90}
    plain_hidden = p["hidden"].clone().requires_grad_()
    plain = _plain(p, (plain_hidden, p["head"], p["bias"]), case["caps"], **kw)
    (want,) = torch.autograd.grad(plain.loss, plain_hidden)

    hidden, head, bias = p["hidden"].clone().requires_grad_(), p["head"].clone(), p["bias"].clone()
    out = _chunked(p, (hidden, head, bias), case["caps"], chunk_size=3, **kw)
    out.loss.backward()
    assert head.grad is None and bias.grad is None and not head.requires_grad
    assert hidden.grad is not None
    torch.testing.assert_close(hidden.grad, want, rtol=1e-5, atol=1e-6)


def test_grad_output_scales_the_stored_gradients():
    # backward must multiply by the incoming gradient (loss scaling, loss * weight, ...).
    case = CASES[2]
    p = _problem(case, seed=4)
    kw = {"kd_ratio": 0.5, "num_tokens": 33, "chunk_size": 8}
    leaves = _leaves(p)
    once = _grads(_chunked(p, leaves, case["caps"], **kw).loss, leaves)
    leaves = _leaves(p)
    scaled = _grads(-2.5 * _chunked(p, leaves, case["caps"], **kw).loss, leaves)
    for a, b in zip(once, scaled, strict=True):
        assert a is not None and b is not None
        torch.testing.assert_close(b, -2.5 * a)


def test_gradient_accumulation_invariance():
    # Two unequal micro-batches normalised by the global count add up to the one-batch loss and grads.
    case = CASES[2]
    p = _problem(case, seed=5)
    kw = {"kd_ratio": 0.6, "num_tokens": 33, "divergence": "jsd", "temperature": 1.5, "chunk_size": 4}
    leaves = _leaves(p)
    full = _chunked(p, leaves, case["caps"], **kw)
    full_grads = _grads(full.loss, leaves)

    hidden, head, bias = _leaves(p)
    parts = []
    for a, b in ((0, 10), (10, 33)):
        sub = {**p, "targets": p["targets"][a:b], "t_hidden": p["t_hidden"][a:b]}
        parts.append(_chunked(sub, (hidden[a:b], head, bias), case["caps"], **kw))
    total = parts[0].loss + parts[1].loss
    acc_grads = _grads(total, (hidden, head, bias))
    torch.testing.assert_close(total, full.loss)
    torch.testing.assert_close(parts[0].ce_sum + parts[1].ce_sum, full.ce_sum)
    torch.testing.assert_close(parts[0].kd_sum + parts[1].kd_sum, full.kd_sum)
    assert [x.num_tokens for x in parts] == [10, 23]
    for got, want in zip(acc_grads, full_grads, strict=True):
        assert got is not None and want is not None
        torch.testing.assert_close(got, want)


# --------------------------------------------------------------------------------------------------
# Dtypes, modes, edge cases
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head_dtype", [torch.float32, torch.bfloat16])
def test_bf16_hidden_is_close_to_fp32(head_dtype):
    case = CASES[2]
    p = _problem(case, seed=6)
    kw = {"kd_ratio": 0.5, "num_tokens": 33, "chunk_size": 8}
    leaves = _leaves(p)
    want = _chunked(p, leaves, case["caps"], **kw)
    want_grads = _grads(want.loss, leaves)

    hidden = p["hidden"].bfloat16().requires_grad_()
    head = p["head"].to(head_dtype).requires_grad_()
    bias = p["bias"].clone().requires_grad_()
    t = {**p, "t_hidden": p["t_hidden"].bfloat16(), "t_head": p["t_head"].bfloat16()}
    got = _chunked(t, (hidden, head, bias), case["caps"], **kw)
    assert got.loss.dtype == torch.float32
    torch.testing.assert_close(got.loss, want.loss, rtol=2e-2, atol=1e-3)
    got_grads = _grads(got.loss, (hidden, head, bias))
    for g, leaf, w in zip(got_grads, (hidden, head, bias), want_grads, strict=True):
        assert g is not None and w is not None
        assert g.dtype == leaf.dtype  # each gradient in its input's own dtype
        assert torch.isfinite(g).all()
        rel = (g.float() - w).norm() / w.norm()
        assert rel < 2e-2


def test_autocast_computes_the_head_in_the_autocast_dtype():
    # Inside autocast, fp32 hidden states are projected in bf16, as a plain lm_head would be.
    case = CASES[2]
    p = _problem(case, seed=7)
    kw = {"kd_ratio": 0.5, "num_tokens": 33}
    leaves = _leaves(p)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = F.linear(leaves[0], leaves[1], leaves[2])
        t_logits = F.linear(p["t_hidden"], p["t_head"], p["t_bias"])
    assert logits.dtype == torch.bfloat16
    caps = case["caps"]
    want = distill_loss(
        _softcap(logits.float(), caps[0]),
        p["targets"],
        _softcap(t_logits.float(), caps[1]),
        **loss_kwargs(kw),
    )

    leaves2 = _leaves(p)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _chunked(p, leaves2, caps, chunk_size=8, **kw)
    exact = _chunked(p, _leaves(p), caps, chunk_size=8, **kw)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-3, atol=1e-4)
    assert not torch.allclose(got.loss, exact.loss, rtol=1e-6, atol=0)  # really not computed in fp32
    grads = _grads(got.loss, leaves2)
    assert all(g is not None and g.dtype == torch.float32 for g in grads)


def test_inference_mode_teacher_and_no_grad_evaluation():
    case = CASES[1]
    p = _problem(case, seed=8)
    kw = {"kd_ratio": 0.5, "num_tokens": 7, "kd_vocab_size": 90, "chunk_size": 2}
    with torch.inference_mode():
        t_hidden = p["t_hidden"].clone()
    assert t_hidden.is_inference()
    leaves = _leaves(p)
    got = _chunked({**p, "t_hidden": t_hidden}, leaves, case["caps"], **kw)
    want = _chunked(p, _leaves(p), case["caps"], **kw)
    _assert_parts_close(got, want, rtol=0, atol=0)
    got.loss.backward()
    assert leaves[0].grad is not None and leaves[1].grad is not None

    with torch.no_grad():
        evaluated = _chunked(p, _leaves(p), case["caps"], **kw)
    assert not evaluated.loss.requires_grad
    _assert_parts_close(evaluated, want, rtol=0, atol=0)


def test_ce_only_without_teacher():
    case = CASES[2]
    p = _problem(case, seed=9)
    leaves = _leaves(p)
    hidden, head, bias = leaves
    out = _call_chunked(
        hidden, head, p["targets"], kd_ratio=0.0, num_tokens=33, chunk_size=5, student_bias=bias
    )
    logits = F.linear(p["hidden"], p["head"], p["bias"])
    torch.testing.assert_close(out.loss, F.cross_entropy(logits, p["targets"]))
    assert out.kd_sum.item() == 0.0
    assert all(g is not None for g in _grads(out.loss, leaves))


def test_empty_batch_returns_zeros_with_a_grad_path():
    case = CASES[1]
    p = _problem({**case, "n": 0}, seed=10)
    leaves = _leaves(p)
    out = _chunked(p, leaves, case["caps"], kd_ratio=0.5, num_tokens=4, kd_vocab_size=90)
    assert out.num_tokens == 0 and out.loss.requires_grad
    assert out.loss.item() == out.ce_sum.item() == out.kd_sum.item() == 0.0
    g_hidden, g_head, g_bias = _grads(out.loss, leaves)
    assert g_hidden is not None and g_hidden.shape == (0, case["h"])
    assert g_head is not None and g_bias is not None
    assert not g_head.any() and not g_bias.any()


def test_inputs_are_not_mutated():
    case = CASES[1]
    p = _problem(case, seed=12)
    before = {k: v.clone() for k, v in p.items() if v is not None}
    leaves = _leaves(p)
    saved = [t.detach().clone() for t in leaves if t is not None]
    _chunked(p, leaves, case["caps"], kd_ratio=0.5, num_tokens=7, kd_vocab_size=90).loss.backward()
    for k, v in before.items():
        assert torch.equal(p[k], v)
    for t, s in zip([t for t in leaves if t is not None], saved, strict=True):
        assert torch.equal(t.detach(), s)


# --------------------------------------------------------------------------------------------------
# Memory contract: no op ever produces an [N, V] tensor
# --------------------------------------------------------------------------------------------------


class _LargestOutput(TorchDispatchMode):
    """Records the largest number of elements of any tensor an aten op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("name", ["forward_kl", "jsd", "tvd"])
def test_never_materialises_full_logits(name):
    # N x V = 6,208 for the whole batch; one chunk is 16 x 97 = 1,552; the head is 97 x 8 = 776.
    case = {"n": 64, "h": 8, "h_t": 8, "v_s": 97, "v_t": 97, "kvs": None, "bias": True, "caps": (5.0, 5.0)}
    p = _problem(case, seed=13)
    kw = {"kd_ratio": 0.5, "num_tokens": 64, "divergence": name}
    chunk, v = 16, 97

    with _LargestOutput() as plain_mode:
        leaves = _leaves(p)
        _plain(p, leaves, case["caps"], **kw).loss.backward()
    assert plain_mode.largest >= 64 * v  # the recorder sees the full logits when they exist

    with _LargestOutput() as mode:
        leaves = _leaves(p)
        _chunked(p, leaves, case["caps"], chunk_size=chunk, **kw).loss.backward()
    assert 0 < mode.largest <= chunk * v
    assert all(t is not None and t.grad is not None for t in leaves)


@pytest.mark.parametrize(
    ("name", "temperature", "kvs", "kd_ratio", "most"),
    [
        # CE + forward KL (the default) and CE alone take the analytic gradient: at most three fp32
        # [C, V] buffers at once (student logits -> gradient, teacher log-ratio, teacher probs).
        ("forward_kl", 1.0, None, 0.5, 3.0),
        ("forward_kl", 2.0, None, 0.5, 3.0),
        ("forward_kl", 0.5, 2000, 1.0, 3.0),
        ("forward_kl", 1.0, None, 0.0, 1.0),
        # Through autograd the same chunk holds many more; the bound only says the recorder sees them.
        ("jsd", 1.0, None, 0.5, 14.0),
    ],
)
def test_live_chunk_buffers(name, temperature, kvs, kd_ratio, most):
    # H = 2 keeps everything but the chunk tensors small: hidden states, heads and their gradients are
    # together about a quarter of one [C, V] buffer.
    n, c, v = 96, 32, 2048
    case = {"n": n, "h": 2, "h_t": 2, "v_s": v, "v_t": v, "kvs": kvs, "bias": False, "caps": (None, None)}
    p = _problem(case, seed=21)
    leaves = _leaves(p)
    kw = {"kd_ratio": kd_ratio, "num_tokens": n, "divergence": name, "temperature": temperature}
    with LiveTensorBytes() as mode:
        _chunked(p, leaves, case["caps"], chunk_size=c, kd_vocab_size=kvs, **kw).loss.backward()
    buffers = mode.peak / (c * v * 4)  # in fp32 [C, V] tensors
    assert 0.9 < buffers <= most + 0.3
    if name == "jsd":
        assert buffers > 4.0  # the autograd path really holds more: the recorder is not blind


@pytest.mark.parametrize(
    ("temperature", "kvs", "kd_ratio", "allocated"),
    [(1.0, None, 0.5, 3), (2.0, None, 0.5, 3), (0.5, 2000, 1.0, 3), (1.0, None, 0.0, 1)],
)
def test_analytic_chunks_reuse_their_buffers(temperature, kvs, kd_ratio, allocated):
    # 12 chunks of [32, 2048]: the analytic path makes its [C, V] buffers once per loop (a fresh mapped
    # tensor per chunk was a third of the loss's CPU time under the mmap policy), never once per chunk.
    n, c, v = 384, 32, 2048
    case = {"n": n, "h": 2, "h_t": 2, "v_s": v, "v_t": v, "kvs": kvs, "bias": True, "caps": (None, None)}
    p = _problem(case, seed=22)
    leaves = _leaves(p)
    kw = {"kd_ratio": kd_ratio, "num_tokens": n, "temperature": temperature}
    with NewTensors(at_least=c * min(v, kvs or v)) as mode:
        _chunked(p, leaves, case["caps"], chunk_size=c, kd_vocab_size=kvs, **kw).loss.backward()
    assert mode.count == allocated


# --------------------------------------------------------------------------------------------------
# The optional Liger-Kernel backend (--loss-impl liger), checked against ours
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize(("kd_ratio", "temperature"), [(0.5, 1.0), (0.5, 2.0), (1.0, 0.5)])
def test_liger_matches_chunked(name, kd_ratio, temperature):
    pytest.importorskip("liger_kernel.chunked_loss")
    from llm_neo.losses import liger_distill_loss

    case = CASES[1]  # biases, and a teacher head padded wider than the student's (kd_vocab_size 90 ...)
    case = {**case, "v_s": 90}  # ... which Liger needs the student's to equal
    p = _problem(case, seed=31)
    kw = {"kd_ratio": kd_ratio, "num_tokens": 11, "divergence": name, "temperature": temperature, "beta": 0.3}
    leaves = _leaves(p)
    ours = _chunked(p, leaves, (None, None), kd_vocab_size=90, chunk_size=3, **kw)
    want = _grads(ours.loss, leaves)
    leaves = _leaves(p)
    with torch.inference_mode():  # the teacher's hidden states come from inference mode in training
        t_hidden = p["t_hidden"].clone()
    hidden, head, bias = leaves
    got = liger_distill_loss(
        HeadInput(hidden, head, bias), p["targets"], HeadInput(t_hidden, p["t_head"], p["t_bias"]),
        **loss_kwargs({**kw, "kd_vocab_size": 90, "chunk_size": 3}), compiled=False,
    )  # fmt: skip
    _assert_parts_close(got, ours, rtol=1e-5, atol=1e-5)
    for g, w in zip(_grads(got.loss, leaves), want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_liger_refuses_what_it_cannot_compute():
    pytest.importorskip("liger_kernel.chunked_loss")
    from llm_neo.losses import liger_distill_loss

    p = _problem(CASES[1], seed=32)  # student head 97 rows, KD vocabulary 90: a padded student
    args = (HeadInput(p["hidden"], p["head"]), p["targets"], HeadInput(p["t_hidden"], p["t_head"]))
    with pytest.raises(ValueError, match="tvd"):
        liger_distill_loss(
            *args, **loss_kwargs({"kd_ratio": 0.5, "num_tokens": 7, "divergence": "tvd", "kd_vocab_size": 90})
        )
    with pytest.raises(ValueError, match=r"97 rows.*\(90\)"):
        liger_distill_loss(*args, **loss_kwargs({"kd_ratio": 0.5, "num_tokens": 7, "kd_vocab_size": 90}))


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


def _call(**overrides: Any) -> LossParts:
    p = _problem(CASES[1], seed=14)
    args: dict[str, Any] = {
        "student_hidden": p["hidden"],
        "student_head": p["head"],
        "targets": p["targets"],
        "teacher_hidden": p["t_hidden"],
        "teacher_head": p["t_head"],
        "kd_ratio": 0.5,
        "num_tokens": 7,
        "kd_vocab_size": 90,
    }
    args.update(overrides)
    return _call_chunked(**args)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"kd_ratio": -0.1}, "kd_ratio"),
        ({"kd_ratio": 1.1}, "kd_ratio"),
        ({"kd_ratio": float("nan")}, "kd_ratio"),
        ({"teacher_hidden": None, "teacher_head": None}, r"kd_ratio.*teacher"),
        ({"teacher_head": None}, "teacher_hidden and teacher_head"),
        ({"kd_vocab_size": None}, r"97.*128.*kd_vocab_size"),
        ({"kd_vocab_size": 98}, "kd_vocab_size"),
        ({"kd_vocab_size": 0}, "kd_vocab_size"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"chunk_size": 2.5}, "chunk_size"),
        ({"divergence": "kl"}, "unknown divergence"),
        ({"divergence": "kl", "kd_ratio": 0.0}, "unknown divergence"),
        ({"num_tokens": 0}, "num_tokens"),
        ({"temperature": 0.0}, "temperature"),
        ({"divergence": "jsd", "beta": 1.0}, "beta"),
        ({"divergence": "skew_reverse_kl", "skew_alpha": 1.0}, "skew_alpha"),
        ({"student_softcap": 0.0}, "student_softcap"),
        ({"teacher_softcap": float("inf")}, "teacher_softcap"),
        ({"targets": torch.zeros(6, dtype=torch.long)}, "targets"),
        ({"student_head": torch.zeros(97, 5)}, "same hidden size"),
        ({"teacher_hidden": torch.zeros(6, 16)}, "student's N"),
        ({"student_bias": torch.zeros(96)}, "student_bias"),
    ],
)
def test_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        _call(**overrides)


def test_teacher_may_be_omitted_when_kd_is_off():
    out = _call(teacher_hidden=None, teacher_head=None, kd_ratio=0.0, kd_vocab_size=None)
    assert out.kd_sum.item() == 0.0 and out.ce_sum.item() > 0
