"""Distillation losses: the LLM-Neo objective and the divergences it can use.

The LLM-Neo loss for one optimizer step is

    loss = ((1 - kd_ratio) * CE + kd_ratio * D(teacher || student)) / num_tokens

where CE and D are *sums* over the trained token positions and ``num_tokens`` counts the trained
positions of the whole step (every micro-batch, every rank). Everything here is a pure function.

Conventions (every divergence):

- Inputs are raw logits ``student_logits [N, V]`` and ``teacher_logits [N, V]``: N = trained token
  positions, V = vocabulary. Any float dtype (e.g. a bf16 teacher). Leading dims other than N also work,
  the vocabulary is always the last dim.
- Argument order is always ``(student, teacher)``. This is deliberate: ``F.kl_div(input, target)``
  computes KL(target || input) and swapping its arguments is a common bug, so it is not used here.
- ``p`` is the teacher distribution, ``q`` the student distribution, both ``softmax(logits / T)``.
- The result is the per-token divergence ``[N]`` in nats, *summed* over the vocabulary (not averaged),
  multiplied by ``T**2`` (Hinton et al.: the gradient of a softened divergence shrinks like 1/T**2, so
  the scaling keeps its magnitude comparable across temperatures).
- Computation is in float32 (float64 if an input is float64, which lets ``gradcheck`` run on the fast
  paths), with ``log_softmax``/``logaddexp``: never ``log`` of a probability or of a mixture of
  probabilities, which underflows to ``log 0`` (NaN gradients) and, in bf16, makes JSD negative.
- Zero-probability columns: logits may hold ``-inf`` (masked or padding vocabulary columns) as long as
  every row keeps one finite entry. Terms with zero weight count as ``0 * log 0 = 0``; values and
  gradients stay finite wherever the divergence is mathematically finite. (A divergence that is
  genuinely infinite, e.g. reverse KL where ``p = 0 < q``, returns ``+inf``.)

Divergences (``DIVERGENCES``):

- ``forward_kl``      KL(p || q) = sum p (log p - log q)      (the LLM-Neo default; mode covering)
- ``reverse_kl``      KL(q || p) = sum q (log q - log p)      (MiniLLM; mode seeking)
- ``jsd``             generalized JSD, TRL GKD convention: m = beta p + (1 - beta) q,
                      JSD_beta = beta KL(p || m) + (1 - beta) KL(q || m), beta in (0, 1);
                      beta = 0.5 is the symmetric JSD, bounded by log 2
- ``skew_forward_kl`` DistiLLM alpha-skew KL:         KL(p || alpha p + (1 - alpha) q), alpha in [0, 1)
- ``skew_reverse_kl`` DistiLLM alpha-skew reverse KL: KL(q || (1 - alpha) p + alpha q), alpha in [0, 1)
                      (alpha = 0 reduces both to the plain forward / reverse KL)
- ``tvd``             total variation distance: 1/2 sum |p - q|

Targets: Hugging Face ``labels`` are aligned with ``input_ids``, but the logits at position t predict
token t + 1. ``next_token_targets`` shifts the labels once, and both CE and KD are computed on exactly
the positions whose shifted target is not -100. (The official LLM-Neo code masked the *unshifted*
logits, dropping the position that predicts the first response token and keeping one that predicts
nothing.)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = [
    "DIVERGENCES",
    "IGNORE_INDEX",
    "LossParts",
    "TopKTargets",
    "cached_distill_loss",
    "chunked_cached_distill_loss",
    "chunked_distill_loss",
    "distill_loss",
    "divergence",
    "forward_kl",
    "jsd",
    "liger_distill_loss",
    "next_token_targets",
    "reference_divergence",
    "reference_topk_divergence",
    "reverse_kl",
    "skew_forward_kl",
    "skew_reverse_kl",
    "topk_bucket_log_probs",
    "topk_divergence",
    "tvd",
]

DIVERGENCES: tuple[str, ...] = (
    "forward_kl",
    "reverse_kl",
    "jsd",
    "skew_forward_kl",
    "skew_reverse_kl",
    "tvd",
)

# Hugging Face's label value for "not trained" (also F.cross_entropy's default ignore_index).
IGNORE_INDEX = -100

_NEG_INF = float("-inf")


# --------------------------------------------------------------------------------------------------
# Validation (shared by the fast paths and the reference, so both reject the same inputs)
# --------------------------------------------------------------------------------------------------


def _check_logits(student_logits: Tensor, teacher_logits: Tensor) -> None:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits "
            f"{tuple(teacher_logits.shape)} must have the same shape [N, V]; for padded vocabularies "
            "slice both to the shared tokenizer length (distill_loss(kd_vocab_size=...))"
        )
    if student_logits.dim() < 1:
        raise ValueError("logits must have a vocabulary dim: expected [N, V]")
    for name, t in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _check_temperature(temperature: float) -> None:
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")


def _check_beta(beta: float) -> None:
    # beta = 0 or 1 makes the mixture equal one of the two distributions and JSD_beta identically 0.
    if not 0.0 < beta < 1.0:
        raise ValueError(f"beta (jsd mixture weight of the teacher) must be in (0, 1), got {beta}")


def _check_skew_alpha(alpha: float) -> None:
    # alpha = 1 makes the skewed mixture equal the first distribution: the divergence is identically 0.
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"skew alpha (skew_alpha) must be in [0, 1), got {alpha}")


def _check_name(name: str) -> None:
    if name not in DIVERGENCES:
        raise ValueError(f"unknown divergence {name!r}; choose one of {', '.join(DIVERGENCES)}")


# --------------------------------------------------------------------------------------------------
# Fast paths
# --------------------------------------------------------------------------------------------------


def _check_loss_options(kd_ratio: float, divergence: str, num_tokens: int | Tensor) -> None:
    """What every loss entry point checks first: the mixing ratio, the divergence name (a misspelt name
    is a config error even when KD is off) and the global token count."""
    if not 0.0 <= kd_ratio <= 1.0:
        raise ValueError(f"kd_ratio must be in [0, 1] (0 = pure CE, 1 = pure KD), got {kd_ratio}")
    _check_name(divergence)
    if isinstance(num_tokens, int) and num_tokens <= 0:
        raise ValueError(f"num_tokens (global count of trained tokens) must be > 0, got {num_tokens}")


def _check_divergence_options(divergence: str, temperature: float, beta: float, skew_alpha: float) -> None:
    """The divergence's own options, checked up front by the chunked paths (an N == 0 batch never calls
    the divergence, which checks them itself)."""
    _check_temperature(temperature)
    if divergence == "jsd":
        _check_beta(beta)
    if divergence.startswith("skew_"):
        _check_skew_alpha(skew_alpha)


def _check_student_logits(student_logits: Tensor, targets: Tensor) -> None:
    if student_logits.dim() != 2 or targets.shape != student_logits.shape[:1]:
        raise ValueError(
            f"expected student_logits [N, V] and targets [N], got {tuple(student_logits.shape)} "
            f"and {tuple(targets.shape)}"
        )


def _objective(ce: Tensor, kd: Tensor, kd_ratio: float, num_tokens: int | Tensor) -> Tensor:
    """The LLM-Neo loss from CE and KD sums: ``((1 - kd_ratio) CE + kd_ratio KD) / num_tokens``
    (``kd`` is 0 when the KD term is off: adding 0 changes neither the value nor the gradient)."""
    return ((1.0 - kd_ratio) * ce + kd_ratio * kd) / num_tokens


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    # float32 at least (bf16/fp16 logits lose the small differences a divergence is made of);
    # float64 is kept so the fast paths can be gradchecked and compared exactly in tests.
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _log_probs_pair(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    """(log q, log p), each [N, V], in the compute dtype."""
    _check_logits(student_logits, teacher_logits)
    _check_temperature(temperature)
    dtype = _compute_dtype(student_logits, teacher_logits)
    log_q = torch.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    log_p = torch.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    return log_q, log_p


def _kl_from_log_probs(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a || b) = sum_v a (log a - log b) per row: [N, V], [N, V] -> [N].

    Columns with a = 0 contribute exactly 0. The difference is selected with ``torch.where`` rather
    than multiplied by a = 0: there ``log a - log b`` is -inf or NaN (-inf - -inf), and ``0 * NaN``
    would poison the value and the gradient. The backward of ``where`` sends an exact zero into the
    unselected branch and the backward of a subtraction never multiplies by its operands, so no NaN
    can come back from the masked columns.
    """
    support = log_a > _NEG_INF  # [N, V]: a > 0
    diff = torch.where(support, log_a - log_b, 0.0)
    return (log_a.exp() * diff).sum(dim=-1)


def _log_mixture(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """log(w a + (1 - w) b), [N, V], computed as a two-term logsumexp of log-probs plus log-weights.

    Never ``log`` of summed probabilities: that underflows to log 0 for tiny probabilities.
    Where both a and b are 0 the result is -inf, but ``logaddexp``'s backward evaluates
    exp(-inf - -inf) = NaN there even under a zero upstream gradient, so those entries are replaced
    by constants before the call and restored to -inf after it.
    """
    # Exact endpoints (a weight of 0 has log -inf; skipping it also saves two [N, V] temporaries).
    if weight_a == 0.0:
        return log_b
    if weight_a == 1.0:
        return log_a
    both_zero = (log_a == _NEG_INF) & (log_b == _NEG_INF)  # [N, V]
    safe_a = torch.where(both_zero, 0.0, log_a + math.log(weight_a))
    safe_b = torch.where(both_zero, 0.0, log_b + math.log1p(-weight_a))
    return torch.where(both_zero, _NEG_INF, torch.logaddexp(safe_a, safe_b))


def forward_kl(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """Forward KL(p_teacher || p_student) per token: [N, V], [N, V] -> [N] (nats, times T**2).

    Mode covering: the student pays for every token the teacher gives mass to. LLM-Neo's default.
    """
    log_q, log_p = _log_probs_pair(student_logits, teacher_logits, temperature)
    return _kl_from_log_probs(log_p, log_q) * temperature**2


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """Reverse KL(p_student || p_teacher) per token: [N, V], [N, V] -> [N] (nats, times T**2).

    Mode seeking (MiniLLM). +inf where the student puts mass on a column the teacher gives zero.
    """
    log_q, log_p = _log_probs_pair(student_logits, teacher_logits, temperature)
    return _kl_from_log_probs(log_q, log_p) * temperature**2


def jsd(
    student_logits: Tensor, teacher_logits: Tensor, *, beta: float = 0.5, temperature: float = 1.0
) -> Tensor:
    """Generalized Jensen-Shannon divergence per token: [N, V], [N, V] -> [N] (nats, times T**2).

    TRL GKD convention: ``m = beta p + (1 - beta) q`` and
    ``JSD_beta = beta KL(p || m) + (1 - beta) KL(q || m)``; beta in (0, 1), beta = 0.5 is the
    symmetric JSD (bounded by log 2 at T = 1). Always finite.
    """
    _check_beta(beta)
    log_q, log_p = _log_probs_pair(student_logits, teacher_logits, temperature)
    log_m = _log_mixture(log_p, log_q, beta)
    value = beta * _kl_from_log_probs(log_p, log_m) + (1.0 - beta) * _kl_from_log_probs(log_q, log_m)
    return value * temperature**2


def skew_forward_kl(
    student_logits: Tensor, teacher_logits: Tensor, *, alpha: float = 0.1, temperature: float = 1.0
) -> Tensor:
    """DistiLLM alpha-skew KL: KL(p || alpha p + (1 - alpha) q) per token: [N, V], [N, V] -> [N].

    alpha in [0, 1); alpha = 0 is the forward KL. Mixing some teacher into the student keeps the
    divergence finite (<= -log alpha) and its gradient bounded where the student is near zero.
    """
    _check_skew_alpha(alpha)
    log_q, log_p = _log_probs_pair(student_logits, teacher_logits, temperature)
    log_mix = _log_mixture(log_p, log_q, alpha)
    return _kl_from_log_probs(log_p, log_mix) * temperature**2


def skew_reverse_kl(
    student_logits: Tensor, teacher_logits: Tensor, *, alpha: float = 0.1, temperature: float = 1.0
) -> Tensor:
    """DistiLLM alpha-skew reverse KL: KL(q || (1 - alpha) p + alpha q) per token: [N, V] x2 -> [N].

    alpha in [0, 1); alpha = 0 is the reverse KL.
    """
    _check_skew_alpha(alpha)
    log_q, log_p = _log_probs_pair(student_logits, teacher_logits, temperature)
    log_mix = _log_mixture(log_q, log_p, alpha)  # alpha on q, (1 - alpha) on p
    return _kl_from_log_probs(log_q, log_mix) * temperature**2


def tvd(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """Total variation distance 1/2 sum |p - q| per token: [N, V], [N, V] -> [N] (times T**2).

    Bounded by 1 (at T = 1); differences of probabilities, so no logs of small numbers at all.
    """
    log_q, log_p = _log_probs_pair(student_logits, teacher_logits, temperature)
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(dim=-1) * temperature**2


def divergence(
    name: str,
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    beta: float = 0.5,
    skew_alpha: float = 0.1,
) -> Tensor:
    """The divergence called ``name`` (one of ``DIVERGENCES``): [N, V], [N, V] -> [N].

    ``beta`` is used by ``jsd`` only, ``skew_alpha`` by the two skew KLs only; options a divergence
    does not use are ignored. Unknown names raise ``ValueError`` listing the choices.
    """
    _check_name(name)
    return _DISPATCH[name](student_logits, teacher_logits, temperature, beta, skew_alpha)


_Fast = Callable[[Tensor, Tensor, float, float, float], Tensor]
_DISPATCH: dict[str, _Fast] = {
    "forward_kl": lambda s, t, temp, beta, a: forward_kl(s, t, temperature=temp),
    "reverse_kl": lambda s, t, temp, beta, a: reverse_kl(s, t, temperature=temp),
    "jsd": lambda s, t, temp, beta, a: jsd(s, t, beta=beta, temperature=temp),
    "skew_forward_kl": lambda s, t, temp, beta, a: skew_forward_kl(s, t, alpha=a, temperature=temp),
    "skew_reverse_kl": lambda s, t, temp, beta, a: skew_reverse_kl(s, t, alpha=a, temperature=temp),
    "tvd": lambda s, t, temp, beta, a: tvd(s, t, temperature=temp),
}
assert tuple(_DISPATCH) == DIVERGENCES


# --------------------------------------------------------------------------------------------------
# fp64 reference: textbook formulas on probabilities, written independently of the fast paths
# --------------------------------------------------------------------------------------------------


def _ref_kl(a: Tensor, b: Tensor) -> Tensor:
    # xlogy(0, y) = 0 gives 0 log 0 = 0; xlogy(a > 0, 0) = -inf gives +inf for an unsupported b.
    return (torch.xlogy(a, a) - torch.xlogy(a, b)).sum(dim=-1)


def reference_divergence(
    name: str,
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    beta: float = 0.5,
    skew_alpha: float = 0.1,
) -> Tensor:
    """Ground truth for ``divergence``: same contract ([N, V], [N, V] -> [N], times T**2), in float64.

    Naive on purpose: softmax to probabilities, then the definitions with ``log`` of probabilities and
    of mixtures, which is accurate enough in float64. Used by the tests and to validate future fast
    (chunked, fused, top-k) paths. Not meant for training.
    """
    _check_name(name)
    _check_logits(student_logits, teacher_logits)
    _check_temperature(temperature)
    q = torch.softmax(student_logits.double() / temperature, dim=-1)
    p = torch.softmax(teacher_logits.double() / temperature, dim=-1)
    if name == "forward_kl":
        value = _ref_kl(p, q)
    elif name == "reverse_kl":
        value = _ref_kl(q, p)
    elif name == "jsd":
        _check_beta(beta)
        m = beta * p + (1.0 - beta) * q
        value = beta * _ref_kl(p, m) + (1.0 - beta) * _ref_kl(q, m)
    elif name == "skew_forward_kl":
        _check_skew_alpha(skew_alpha)
        value = _ref_kl(p, skew_alpha * p + (1.0 - skew_alpha) * q)
    elif name == "skew_reverse_kl":
        _check_skew_alpha(skew_alpha)
        value = _ref_kl(q, (1.0 - skew_alpha) * p + skew_alpha * q)
    else:  # tvd
        value = 0.5 * (p - q).abs().sum(dim=-1)
    return value * temperature**2


# --------------------------------------------------------------------------------------------------
# Targets and the LLM-Neo objective
# --------------------------------------------------------------------------------------------------


def next_token_targets(labels: Tensor) -> Tensor:
    """Shift Hugging Face labels so position t's target is the token at t + 1: [B, T] -> [B, T].

    HF ``labels`` are aligned with ``input_ids`` but the logits at position t predict token t + 1, so
    the labels move left by one and the last position (which predicts nothing in the sequence) gets
    -100. Trained positions are ``targets != -100``; CE and KD are both computed on exactly those
    positions (``logits[targets != -100]``). Returns a new tensor; ``labels`` is not modified.
    """
    pad = labels.new_full((*labels.shape[:-1], 1), IGNORE_INDEX)
    return torch.cat([labels[..., 1:], pad], dim=-1)


class LossParts(NamedTuple):
    """One micro-batch's contribution to the step's objective.

    loss:       scalar with grad, ``((1 - kd_ratio) ce_sum + kd_ratio kd_sum) / num_tokens(global)``;
                summing it over the step's micro-batches gives the step's per-token mean.
    ce_sum:     detached float32 scalar, CE summed over this micro-batch's positions (for logging).
    kd_sum:     detached float32 scalar, the divergence summed likewise; 0 when KD is skipped.
    num_tokens: this micro-batch's (local) number of positions N.
    """

    loss: Tensor
    ce_sum: Tensor
    kd_sum: Tensor
    num_tokens: int


def distill_loss(
    student_logits: Tensor,
    targets: Tensor,
    teacher_logits: Tensor | None = None,
    *,
    kd_ratio: float,
    num_tokens: int | Tensor,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    skew_alpha: float = 0.1,
    kd_vocab_size: int | None = None,
) -> LossParts:
    """The LLM-Neo loss ``((1 - kd_ratio) CE + kd_ratio D(teacher || student)) / num_tokens``.

    Shapes: ``student_logits [N, V_s]``, ``targets [N]`` (int64 token ids; every position is trained,
    the caller has already selected ``targets != -100`` from ``next_token_targets``), optional
    ``teacher_logits [N, V_t]``.

    ``num_tokens`` is the GLOBAL normaliser: the number of trained tokens over every micro-batch of the
    optimizer step (and every rank), not this micro-batch's N. Summing ``.loss`` over the
    gradient-accumulation micro-batches then gives the per-token mean of the whole step, instead of a
    mean of micro-batch means that over-weights tokens of short micro-batches. It may be an all-reduced
    tensor (no host sync is needed).

    CE is computed on the student's full width, without temperature, in float32. KD uses
    ``divergence`` (one of ``DIVERGENCES``) with ``temperature``/``beta``/``skew_alpha``. Logit widths:
    if ``kd_vocab_size`` is given, both logits are sliced to ``[:, :kd_vocab_size]`` first, the shared
    tokenizer length when an embedding table is padded (Qwen2.5: 151,936 vs 152,064). Dropping the
    padding columns is exactly the same as giving them -inf logits (zero probability) in both models:
    zero-probability columns contribute nothing to any divergence, and a softmax over the remaining
    columns is unchanged. Without ``kd_vocab_size`` the widths must be equal.

    With ``kd_ratio == 0`` or no teacher the KD term is skipped (``kd_sum = 0``); a missing teacher
    with ``kd_ratio > 0`` is an error. ``kd_ratio`` must be in [0, 1].
    """
    _check_loss_options(kd_ratio, divergence, num_tokens)
    if teacher_logits is None and kd_ratio > 0:
        raise ValueError(
            f"kd_ratio={kd_ratio} > 0 needs teacher_logits; pass them, or set kd_ratio=0 for plain SFT"
        )
    _check_student_logits(student_logits, targets)
    if teacher_logits is not None:
        _check_kd_widths(student_logits, teacher_logits, kd_vocab_size)

    n_local = student_logits.shape[0]
    # float32 CE regardless of the logits' dtype: bf16 log-softmax over a 128k vocabulary is too coarse.
    ce_sum = F.cross_entropy(student_logits.float(), targets, reduction="sum")

    if teacher_logits is not None and kd_ratio > 0:
        if kd_vocab_size is not None:
            student_logits = student_logits[:, :kd_vocab_size]  # views, no copy
            teacher_logits = teacher_logits[:, :kd_vocab_size]
        per_token = _divergence_by_name(
            divergence,
            student_logits,
            teacher_logits.detach(),  # the teacher is frozen; never backprop into its graph
            temperature=temperature,
            beta=beta,
            skew_alpha=skew_alpha,
        )  # [N]
        kd_sum = per_token.sum()
    else:
        kd_sum = ce_sum.new_zeros(())
    loss = _objective(ce_sum, kd_sum, kd_ratio, num_tokens)
    return LossParts(loss=loss, ce_sum=ce_sum.detach(), kd_sum=kd_sum.detach(), num_tokens=n_local)


# ``distill_loss`` has a parameter called ``divergence``, which shadows the function inside it.
_divergence_by_name = divergence


def _check_kd_widths(student_logits: Tensor, teacher_logits: Tensor, kd_vocab_size: int | None) -> None:
    if teacher_logits.dim() != 2 or teacher_logits.shape[0] != student_logits.shape[0]:
        raise ValueError(
            f"teacher_logits {tuple(teacher_logits.shape)} must be [N, V_t] with the student's N = "
            f"{student_logits.shape[0]}"
        )
    _check_vocab_widths(student_logits.shape[1], teacher_logits.shape[1], kd_vocab_size)


def _check_vocab_widths(v_s: int, v_t: int, kd_vocab_size: int | None) -> None:
    """Logit widths must agree, or ``kd_vocab_size`` must say which leading columns to compare."""
    if kd_vocab_size is None:
        if v_s != v_t:
            raise ValueError(
                f"student logit width {v_s} != teacher logit width {v_t}; if the models share a "
                "tokenizer and one embedding table is padded, pass kd_vocab_size=len(tokenizer)"
            )
    elif not 0 < kd_vocab_size <= min(v_s, v_t):
        raise ValueError(
            f"kd_vocab_size={kd_vocab_size} must be in [1, min(student width {v_s}, teacher width {v_t})]"
        )


# --------------------------------------------------------------------------------------------------
# Chunked (fused linear + loss) path: never holds [N, V] logits
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class _ChunkPlan:
    """Everything the chunk loop needs besides the three differentiable student inputs.

    The teacher tensors and the targets travel inside this object rather than as arguments of
    ``_ChunkedDistill.apply`` so that autograd never records them as inputs: the teacher hidden states
    may be inference-mode tensors, which autograd refuses to track.
    """

    targets: Tensor  # [N] int64
    teacher_hidden: Tensor | None  # [N, H_t]; None when the KD term is skipped
    teacher_head: Tensor | None  # [V_kd, H_t], already sliced to kd_vocab_size and cast to teacher_dtype
    teacher_bias: Tensor | None  # [V_kd]
    teacher_dtype: torch.dtype  # matmul dtype of the teacher head
    student_dtype: torch.dtype  # matmul dtype of the student head
    kd_ratio: float
    num_tokens: int | Tensor
    divergence: str
    temperature: float
    beta: float
    skew_alpha: float
    kd_vocab_size: int | None
    chunk_size: int
    student_softcap: float | None
    teacher_softcap: float | None
    # Cached teacher targets (top-k + tail) in place of teacher_hidden/teacher_head: the KD term is then
    # the (k+1)-bucket divergence (``topk_divergence``) and no teacher matmul runs.
    cached_teacher: TopKTargets | None = None

    @property
    def kd_active(self) -> bool:
        return (self.teacher_hidden is not None or self.cached_teacher is not None) and self.kd_ratio > 0


def _softcap(logits: Tensor, cap: float | None) -> Tensor:
    # Gemma-style final logit soft-capping, applied in the loss dtype before CE and the divergence.
    return logits if cap is None else torch.tanh(logits / cap) * cap


def _matmul_dtype(hidden: Tensor) -> torch.dtype:
    """The dtype a plain ``lm_head(hidden)`` would compute in: the autocast dtype inside an autocast
    region (autocast leaves float64 alone), else the hidden states' own dtype."""
    device = hidden.device.type
    if (
        hidden.dtype != torch.float64
        and torch.amp.is_autocast_available(device)
        and torch.is_autocast_enabled(device)
    ):
        return torch.get_autocast_dtype(device)
    return hidden.dtype


def _autocast_off(device: torch.device) -> AbstractContextManager[object]:
    # Inside the loop every cast is explicit, so an ambient autocast region must not re-cast anything.
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return nullcontext()


def _chunk_loop(
    plan: _ChunkPlan,
    student_hidden: Tensor,
    student_head: Tensor,
    student_bias: Tensor | None,
    needs: tuple[bool, bool, bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """(loss, ce_sum, kd_sum, grad_hidden, grad_head, grad_bias): values, and the gradients of ``loss``
    w.r.t. the inputs flagged in ``needs`` (None for the others), one chunk of tokens at a time."""
    need_hidden, need_head, need_bias = needs
    n = student_hidden.shape[0]
    device = student_hidden.device
    loss_dtype = torch.float64 if plan.student_dtype == torch.float64 else torch.float32
    # Cast the head once (not per chunk: that would copy [V, H] every chunk); an alias if no cast is due.
    head = student_head.detach().to(plan.student_dtype).requires_grad_(need_head)  # [V_s, H_s]
    bias = None if student_bias is None else student_bias.detach().requires_grad_(need_bias)  # [V_s]
    leaves: list[Tensor] = [t for t, need in ((head, need_head), (bias, need_bias)) if need and t is not None]

    grad_hidden = torch.zeros_like(student_hidden) if need_hidden else None  # [N, H_s]
    # Weight/bias gradients are sums over every token: accumulate them in fp32 (fp64 stays fp64).
    acc_dtype = torch.float64 if student_head.dtype == torch.float64 else torch.float32
    grad_head = torch.zeros(student_head.shape, dtype=acc_dtype, device=device) if need_head else None
    grad_bias = None
    if need_bias and student_bias is not None:
        grad_bias = torch.zeros(student_bias.shape, dtype=acc_dtype, device=device)

    num_tokens = plan.num_tokens.detach() if isinstance(plan.num_tokens, Tensor) else plan.num_tokens
    ce_total = torch.zeros((), dtype=loss_dtype, device=device)
    kd_total = torch.zeros((), dtype=loss_dtype, device=device)
    kd_ratio, kvs = plan.kd_ratio, plan.kd_vocab_size
    any_need = need_hidden or bool(leaves)

    # CE + forward KL (LLM-Neo's default) and plain CE take the analytic-gradient path; the other
    # divergences, soft-capped students and cached teachers go through autograd per chunk.
    analytic = (
        plan.cached_teacher is None
        and plan.student_softcap is None
        and (not plan.kd_active or plan.divergence == "forward_kl")
    )

    with _autocast_off(device):
        for start in range(0, n, plan.chunk_size):
            stop = min(start + plan.chunk_size, n)
            if analytic:
                with torch.no_grad():
                    h = student_hidden[start:stop].detach()  # [C, H_s]
                    ce, kd, g = _analytic_chunk(plan, h, head, bias, start, stop, loss_dtype, any_need)
                    if g is not None:  # [C, V_s], d loss / d logits of the chunk, loss dtype
                        if grad_bias is not None:
                            grad_bias += g.sum(dim=0)
                        # The same casts as autograd through ``F.linear(h.to(dtype), head)`` would make.
                        g_mm = g.to(plan.student_dtype)
                        del g
                        if grad_hidden is not None:
                            grad_hidden[start:stop] = g_mm @ head
                        if grad_head is not None and grad_head.dtype == g_mm.dtype:
                            grad_head.addmm_(g_mm.T, h.to(plan.student_dtype))  # no [V, H] temporary
                        elif grad_head is not None:
                            grad_head += g_mm.T @ h.to(plan.student_dtype)
                        del g_mm
                ce_total += ce
                kd_total += kd
                continue
            h = student_hidden[start:stop].detach().requires_grad_(need_hidden)  # [C, H_s]
            with torch.set_grad_enabled(any_need):
                logits = F.linear(h.to(plan.student_dtype), head).to(loss_dtype)  # [C, V_s]
                if bias is not None:
                    logits = logits + bias.to(loss_dtype)
                logits = _softcap(logits, plan.student_softcap)
                # CE exactly as distill_loss: full student width, no temperature, fp32 (fp64 for fp64).
                # With kd_ratio == 1 it is only logged, so keep it out of the graph.
                ce_logits = logits.detach() if kd_ratio == 1.0 else logits
                ce = F.cross_entropy(ce_logits, plan.targets[start:stop], reduction="sum")
                if plan.kd_active and plan.cached_teacher is not None:
                    student_kd = logits if kvs is None else logits[:, :kvs]  # a view, as in distill_loss
                    kd = topk_divergence(
                        plan.divergence,
                        student_kd,
                        plan.cached_teacher.slice(start, stop),
                        temperature=plan.temperature,
                        beta=plan.beta,
                        skew_alpha=plan.skew_alpha,
                    ).sum()
                    objective = _objective(ce, kd, kd_ratio, num_tokens)
                    del student_kd
                elif plan.kd_active:
                    teacher_logits = _teacher_chunk_logits(plan, start, stop, loss_dtype)  # [C, V_kd]
                    student_kd = logits if kvs is None else logits[:, :kvs]  # a view, as in distill_loss
                    kd = _divergence_by_name(
                        plan.divergence,
                        student_kd,
                        teacher_logits,
                        temperature=plan.temperature,
                        beta=plan.beta,
                        skew_alpha=plan.skew_alpha,
                    ).sum()
                    objective = _objective(ce, kd, kd_ratio, num_tokens)
                    del teacher_logits, student_kd
                else:
                    kd = ce.new_zeros(())
                    objective = _objective(ce, kd, kd_ratio, num_tokens)
            del logits, ce_logits  # the chunk's [C, V] tensors die here (the graph holds them until grad)
            if any_need and objective.requires_grad:
                inputs = ([h] if need_hidden else []) + leaves
                grads = list(torch.autograd.grad(objective, inputs))
                if need_hidden:
                    assert grad_hidden is not None
                    grad_hidden[start:stop] = grads.pop(0)
                if grad_head is not None:
                    grad_head += grads.pop(0)
                if grad_bias is not None:
                    grad_bias += grads.pop(0)
            ce_total += ce.detach()
            kd_total += kd.detach()
            del objective, ce, kd, h

    loss = _objective(ce_total, kd_total, kd_ratio, num_tokens)
    grad_head_out = None if grad_head is None else grad_head.to(student_head.dtype)
    grad_bias_out = None if grad_bias is None or student_bias is None else grad_bias.to(student_bias.dtype)
    return loss, ce_total, kd_total, grad_hidden, grad_head_out, grad_bias_out


def _analytic_chunk(
    plan: _ChunkPlan,
    h: Tensor,
    head: Tensor,
    bias: Tensor | None,
    start: int,
    stop: int,
    loss_dtype: torch.dtype,
    want_grad: bool,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(ce_sum, kd_sum, grad_logits) of one chunk for CE + forward KL (or CE alone), with the gradient
    w.r.t. the chunk's student logits written out instead of taken by autograd. Call under no_grad.

    Why: autograd through log_softmax / exp / where keeps about eight fp32 [C, V] tensors alive at
    once (33 bytes per logit measured); this keeps at most three (the student logits, which become the
    gradient in place, the teacher log-ratio and the teacher probabilities), so the chunk's memory is
    about 12 bytes per logit and a step's peak is set by the models rather than by the loss.

    With s the student logits [C, V_s], p = softmax(t / T) the teacher over the first V_kd columns,
    q = softmax(s[:, :V_kd] / T), r = kd_ratio and N = num_tokens:

        loss       = ((1 - r) sum CE + r T^2 sum KL(p || q)) / N
        d loss/ds  = ((1 - r)(softmax(s) - onehot(target)) + r T (q - p) on the first V_kd columns) / N

    ``h`` [C, H_s] is the chunk's hidden states, ``head`` [V_s, H_s] already in the matmul dtype.
    Returns the sums detached, and ``grad_logits`` [C, V_s] in the loss dtype (None unless want_grad).
    """
    r, temp, kvs = plan.kd_ratio, plan.temperature, plan.kd_vocab_size
    targets = plan.targets[start:stop]  # [C]
    s = F.linear(h.to(plan.student_dtype), head).to(loss_dtype)  # [C, V_s], a fresh tensor: edited in place
    if bias is not None:
        s += bias.to(loss_dtype)
    lse_s = torch.logsumexp(s, dim=-1)  # [C]
    ce = (lse_s - s.gather(1, targets[:, None]).squeeze(1)).sum()
    kd = ce.new_zeros(())
    p = None
    s_kd = s if kvs is None else s[:, :kvs]  # [C, V_kd] view
    lse_q = lse_s
    if plan.kd_active:
        if temp != 1.0 or kvs is not None:
            lse_q = torch.logsumexp(s_kd / temp, dim=-1)  # [C]
        log_ratio = _teacher_chunk_logits(plan, start, stop, loss_dtype)  # [C, V_kd], fresh
        if temp != 1.0:
            log_ratio /= temp
        log_ratio -= torch.logsumexp(log_ratio, dim=-1, keepdim=True)  # log p
        p = log_ratio.exp()
        # log p - log q in place. A -inf log p (p = 0) is clamped first so that its term is 0 * finite.
        log_ratio.clamp_(min=torch.finfo(loss_dtype).min)
        log_ratio.sub_(s_kd, alpha=1.0 / temp).add_(lse_q[:, None])
        # Row-wise dot products through bmm: (p * log_ratio).sum(-1) would allocate another [C, V_kd].
        kd = torch.bmm(p[:, None, :], log_ratio[:, :, None]).sum() * temp**2
        del log_ratio
    if not want_grad:
        return ce, kd, None

    q = None
    if p is not None and (temp != 1.0 or kvs is not None):
        q = (s_kd / temp).sub_(lse_q[:, None]).exp_()  # [C, V_kd], before s is overwritten
    g = s.sub_(lse_s[:, None]).exp_()  # softmax(s), in place of the logits
    if p is not None and q is None:
        g.add_(p, alpha=-r)  # T = 1 over the full width: (1 - r) softmax + r (softmax - p) = softmax - r p
    else:
        if r != 0.0:
            g.mul_(1.0 - r)
        if p is not None and q is not None:
            g_kd = g if kvs is None else g[:, :kvs]
            g_kd.add_(q, alpha=r * temp).add_(p, alpha=-r * temp)
    del p, q
    rows = torch.arange(g.shape[0], device=g.device)
    g[rows, targets] -= 1.0 - r
    num_tokens = plan.num_tokens.detach() if isinstance(plan.num_tokens, Tensor) else plan.num_tokens
    g /= num_tokens
    return ce, kd, g


def _teacher_chunk_logits(plan: _ChunkPlan, start: int, stop: int, loss_dtype: torch.dtype) -> Tensor:
    """The teacher's logits for tokens [start, stop), [C, V_kd] in the loss dtype; never in a graph."""
    assert plan.teacher_hidden is not None and plan.teacher_head is not None
    with torch.no_grad():
        # Slicing/reading an inference-mode tensor is allowed here; the result is a normal tensor.
        th = plan.teacher_hidden[start:stop].to(plan.teacher_dtype)  # [C, H_t]
        logits = F.linear(th, plan.teacher_head).to(loss_dtype)  # [C, V_kd]
        if plan.teacher_bias is not None:
            logits = logits + plan.teacher_bias.to(loss_dtype)
        return _softcap(logits, plan.teacher_softcap)


class _ChunkedDistill(torch.autograd.Function):
    """Liger-style fused linear + loss: the gradients are computed chunk by chunk during the forward
    (while each chunk's logits exist anyway) and stored; backward only scales them by grad_output."""

    @staticmethod
    def forward(
        ctx: Any,
        student_hidden: Tensor,
        student_head: Tensor,
        student_bias: Tensor | None,
        plan: _ChunkPlan,
        needs: tuple[bool, bool, bool],
    ) -> tuple[Tensor, Tensor, Tensor]:
        loss, ce_sum, kd_sum, g_hidden, g_head, g_bias = _chunk_loop(
            plan, student_hidden, student_head, student_bias, needs
        )
        ctx.save_for_backward(g_hidden, g_head, g_bias)
        ctx.mark_non_differentiable(ce_sum, kd_sum)
        return loss, ce_sum, kd_sum

    @staticmethod
    @once_differentiable
    def backward(
        ctx: Any, grad_loss: Tensor, _grad_ce: Tensor | None, _grad_kd: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        # Out of place (not ``mul_``) so that a second backward through a retained graph stays right.
        scaled = tuple(None if g is None else g * grad_loss.to(g.dtype) for g in ctx.saved_tensors)
        return (*scaled, None, None)


def chunked_distill_loss(
    student_hidden: Tensor,
    student_head: Tensor,
    targets: Tensor,
    teacher_hidden: Tensor | None = None,
    teacher_head: Tensor | None = None,
    *,
    kd_ratio: float,
    num_tokens: int | Tensor,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    skew_alpha: float = 0.1,
    kd_vocab_size: int | None = None,
    chunk_size: int = 1024,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
) -> LossParts:
    """``distill_loss`` fused with both lm_heads, computed in token chunks: no [N, V] logits ever exist.

    Why: at a Llama-3 vocabulary (V = 128,256) the ``[tokens, V]`` logits of the student and the teacher,
    in fp32 plus their softmax/gradient temporaries, are most of a distillation step's memory, more
    than the LoRA student itself. Here the peak logits memory is ``chunk_size x V`` per model (times
    the few fp32 temporaries of one chunk's loss) instead of ``N x V``, whatever N is.

    Shapes:
        student_hidden  [N, H_s]  final hidden states (after the final norm) at the trained positions
        student_head    [V_s, H_s] the student's lm_head weight (trainable or frozen)
        targets         [N]       int64 next-token ids; every position is trained (no selection here)
        teacher_hidden  [N, H_t]  teacher final hidden states (no grad; an inference tensor is fine)
        teacher_head    [V_t, H_t] the teacher's lm_head weight (never receives a gradient)
        student_bias    [V_s], teacher_bias [V_t]: optional lm_head biases

    Contract: returns the same ``LossParts`` as
    ``distill_loss(softcap(student_hidden @ student_head.T + student_bias), targets,
    softcap(teacher_hidden @ teacher_head.T + teacher_bias), ...)`` with the same keyword options
    (``kd_ratio``, the GLOBAL ``num_tokens``, ``divergence``, ``temperature``, ``beta``, ``skew_alpha``,
    ``kd_vocab_size``), and the same gradients w.r.t. ``student_hidden``, ``student_head`` and
    ``student_bias`` (each only if it requires grad). ``softcap(x) = cap * tanh(x / cap)`` is Gemma's
    final-logit soft-capping (``student_softcap`` / ``teacher_softcap``; None = off), applied before CE
    and the divergence. Each chunk of ``chunk_size`` tokens is projected, its CE and divergence are
    computed with the same per-token functions as ``distill_loss`` (sliced to ``kd_vocab_size`` the
    same way; the teacher head is sliced before its matmul, which skips the padding columns' work),
    and its logits are freed before the next chunk. Sums over chunks equal sums over the batch up to
    float rounding.

    Dtypes: the matmul runs in the hidden states' dtype (the head is cast once if it differs), or in the
    autocast dtype when called inside an autocast region (as a plain ``lm_head`` would); the losses in
    float32 (float64 when the matmul is float64, CE included, where ``distill_loss`` computes CE in
    float32). Gradients come back in each input's own dtype; the head/bias gradients are accumulated in
    float32 across chunks. ``ce_sum``/``kd_sum`` are detached (loss dtype).

    Gradients are computed during the forward (while each chunk's logits exist), which is why no
    logits are kept for the backward; the backward only scales them by the incoming gradient. So call
    it under ``torch.no_grad()`` when no backward will follow (evaluation): then nothing extra is
    computed. The backward is not differentiable again (no double backward). With ``kd_ratio == 0`` or
    no teacher the teacher is never run (``kd_sum = 0``); errors are those of ``distill_loss`` (plus
    ``chunk_size >= 1``, matching shapes, and positive soft-caps).
    """
    teacher_given = teacher_hidden is not None or teacher_head is not None
    _check_chunked_args(
        student_hidden,
        student_head,
        targets,
        teacher_hidden,
        teacher_head,
        kd_ratio=kd_ratio,
        num_tokens=num_tokens,
        divergence=divergence,
        kd_vocab_size=kd_vocab_size,
        chunk_size=chunk_size,
        student_bias=student_bias,
        teacher_bias=teacher_bias,
        softcaps=(student_softcap, teacher_softcap),
    )
    kd_active = teacher_given and kd_ratio > 0
    if kd_active:
        _check_divergence_options(divergence, temperature, beta, skew_alpha)

    t_dtype = student_hidden.dtype
    t_head = t_bias = None
    if kd_active:
        assert teacher_hidden is not None and teacher_head is not None
        t_dtype = _matmul_dtype(teacher_hidden)
        kd_rows = slice(None) if kd_vocab_size is None else slice(0, kd_vocab_size)
        with torch.no_grad():
            t_head = teacher_head.detach()[kd_rows].to(t_dtype)  # [V_kd, H_t], cast once
            t_bias = None if teacher_bias is None else teacher_bias.detach()[kd_rows]
    plan = _ChunkPlan(
        targets=targets,
        teacher_hidden=teacher_hidden if kd_active else None,
        teacher_head=t_head,
        teacher_bias=t_bias,
        teacher_dtype=t_dtype,
        student_dtype=_matmul_dtype(student_hidden),
        kd_ratio=float(kd_ratio),
        num_tokens=num_tokens,
        divergence=divergence,
        temperature=temperature,
        beta=beta,
        skew_alpha=skew_alpha,
        kd_vocab_size=kd_vocab_size,
        chunk_size=chunk_size,
        student_softcap=student_softcap,
        teacher_softcap=teacher_softcap,
    )

    return _run_chunks(plan, student_hidden, student_head, student_bias)


# Our divergence names as Liger-Kernel's generalized-JSD beta (beta = 0: forward KL, 1: reverse KL).
_LIGER_BETA = {"forward_kl": 0.0, "reverse_kl": 1.0}


def liger_distill_loss(
    student_hidden: Tensor,
    student_head: Tensor,
    targets: Tensor,
    teacher_hidden: Tensor,
    teacher_head: Tensor,
    *,
    kd_ratio: float,
    num_tokens: int | Tensor,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    skew_alpha: float = 0.1,  # unused: the skew divergences are refused; here so one set of options fits both
    kd_vocab_size: int | None = None,
    chunk_size: int = 1024,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    compiled: bool | None = None,
) -> LossParts:
    """``chunked_distill_loss`` through Liger-Kernel's fused linear JSD loss (``--loss-impl liger``).

    Same shapes and contract as ``chunked_distill_loss`` (the same LossParts, the same gradients up to
    float rounding) for ``forward_kl``, ``reverse_kl`` and ``jsd``, which Liger computes as its
    generalized JSD with beta 0, 1 and ``beta``. Translated here: Liger averages over this call's
    tokens and does not scale by T², so the KD weight is ``kd_ratio * T**2`` and the loss is rescaled
    from the local token count to the global ``num_tokens``. Liger pads a narrower student with zero
    logits where llm-neo slices both to ``kd_vocab_size``, so a student whose lm_head is wider than
    the KD vocabulary is refused, as are soft-capped models (the caller checks those). ``compiled``:
    torch.compile Liger's chunk step (default: on CUDA only). Checked against ``chunked_distill_loss``
    in fp32 on a CPU (tests); under bf16 autocast the two round differently.
    """
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss  # the optional extra

    if divergence not in (*_LIGER_BETA, "jsd"):
        raise ValueError(
            f"Liger's fused loss computes forward_kl, reverse_kl or jsd, not {divergence!r}; use the chunked "
            "loss (--loss-impl chunked)"
        )
    _check_chunked_args(
        student_hidden,
        student_head,
        targets,
        teacher_hidden,
        teacher_head,
        kd_ratio=kd_ratio,
        num_tokens=num_tokens,
        divergence=divergence,
        kd_vocab_size=kd_vocab_size,
        chunk_size=chunk_size,
        student_bias=student_bias,
        teacher_bias=teacher_bias,
        softcaps=(None, None),
    )
    _check_divergence_options(divergence, temperature, beta, skew_alpha)
    kd_width = kd_vocab_size or teacher_head.shape[0]
    if student_head.shape[0] != kd_width:
        raise ValueError(
            f"Liger's fused loss needs the student's lm_head ({student_head.shape[0]} rows) as wide as the "
            f"KD vocabulary ({kd_width}); use --loss-impl chunked for a padded student vocabulary"
        )
    n_local = student_hidden.shape[0]
    if n_local == 0 or kd_ratio == 0:  # Liger cannot chunk an empty batch, and would compute an unused KD
        return chunked_distill_loss(
            student_hidden, student_head, targets, teacher_hidden, teacher_head,
            kd_ratio=kd_ratio, num_tokens=num_tokens, divergence=divergence, temperature=temperature,
            beta=beta, kd_vocab_size=kd_vocab_size, chunk_size=chunk_size, student_bias=student_bias,
            teacher_bias=teacher_bias,
        )  # fmt: skip
    rows = slice(0, kd_width)
    with torch.no_grad():
        t_hidden = teacher_hidden.detach()
        t_head = teacher_head.detach()[rows]
        t_bias = None if teacher_bias is None else teacher_bias.detach()[rows]
    loss_fn = LigerFusedLinearJSDLoss(
        weight_hard_loss=1.0 - kd_ratio,
        weight_soft_loss=kd_ratio * temperature**2,
        beta=_LIGER_BETA.get(divergence, beta),
        ignore_index=IGNORE_INDEX,
        temperature=temperature,
        compiled=student_hidden.is_cuda if compiled is None else compiled,
        chunk_size=chunk_size,
        return_soft_hard_loss=True,
    )
    loss, soft, hard = loss_fn(
        student_hidden, student_head, t_hidden, t_head, targets, student_bias, t_bias
    )  # means over the n_local tokens
    scale = n_local / num_tokens  # Liger's mean over this call -> llm-neo's sum / global token count
    return LossParts(
        loss=loss * scale,
        ce_sum=(hard * n_local).detach(),
        kd_sum=(soft * n_local * temperature**2).detach(),
        num_tokens=n_local,
    )


def _check_chunked_args(
    student_hidden: Tensor,
    student_head: Tensor,
    targets: Tensor,
    teacher_hidden: Tensor | None,
    teacher_head: Tensor | None,
    *,
    kd_ratio: float,
    num_tokens: int | Tensor,
    divergence: str,
    kd_vocab_size: int | None,
    chunk_size: int,
    student_bias: Tensor | None,
    teacher_bias: Tensor | None,
    softcaps: tuple[float | None, float | None],
) -> None:
    """The checks of ``distill_loss`` (same messages), translated from logits to hidden states + heads."""
    _check_loss_options(kd_ratio, divergence, num_tokens)
    if (teacher_hidden is None) != (teacher_head is None):
        raise ValueError("pass both teacher_hidden and teacher_head (the teacher), or neither")
    if teacher_hidden is None and kd_ratio > 0:
        raise ValueError(
            f"kd_ratio={kd_ratio} > 0 needs the teacher (teacher_hidden and teacher_head); pass them, or "
            "set kd_ratio=0 for plain SFT"
        )
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size (tokens per chunk) must be an int >= 1, got {chunk_size!r}")
    for name, cap in zip(("student_softcap", "teacher_softcap"), softcaps, strict=True):
        if cap is not None and not (math.isfinite(cap) and cap > 0):
            raise ValueError(f"{name} must be None (off) or a finite number > 0, got {cap}")

    _check_head_pair("student", student_hidden, student_head, student_bias)
    if student_hidden.dim() != 2 or targets.shape != student_hidden.shape[:1]:
        raise ValueError(
            f"expected student_hidden [N, H] and targets [N], got {tuple(student_hidden.shape)} "
            f"and {tuple(targets.shape)}"
        )
    if teacher_hidden is None or teacher_head is None:
        return
    _check_head_pair("teacher", teacher_hidden, teacher_head, teacher_bias)
    if teacher_hidden.shape[0] != student_hidden.shape[0]:
        raise ValueError(
            f"teacher_hidden {tuple(teacher_hidden.shape)} must be [N, H_t] with the student's N = "
            f"{student_hidden.shape[0]}"
        )
    _check_vocab_widths(student_head.shape[0], teacher_head.shape[0], kd_vocab_size)


def _check_head_pair(who: str, hidden: Tensor, head: Tensor, bias: Tensor | None) -> None:
    if hidden.dim() != 2 or head.dim() != 2 or hidden.shape[1] != head.shape[1]:
        raise ValueError(
            f"{who}_hidden {tuple(hidden.shape)} and {who}_head {tuple(head.shape)} must be [N, H] and "
            "[V, H] with the same hidden size H (the head is the lm_head weight, [out, in])"
        )
    if bias is not None and bias.shape != head.shape[:1]:
        raise ValueError(f"{who}_bias {tuple(bias.shape)} must be [V] = {tuple(head.shape[:1])}")
    for name, t in ((f"{who}_hidden", hidden), (f"{who}_head", head), (f"{who}_bias", bias)):
        if t is not None and not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


# --------------------------------------------------------------------------------------------------
# Cached teacher: divergences on the teacher's top-k support plus one tail bucket
# --------------------------------------------------------------------------------------------------
#
# A teacher cache (llm_neo.teacher_cache) keeps, per trained position, the teacher's k most probable
# tokens with their log-probabilities at the cache's temperature T, and the log of the probability mass
# outside them. Both distributions are then compared on k + 1 buckets:
#
#     p~ = (p_1, ..., p_k, p_tail)        the teacher's top-k ids i_1..i_k, p_tail = 1 - sum_j p_j
#     q~ = (q_i1, ..., q_ik, q_tail)      the student at the same ids, q_tail = 1 - sum_j q_ij
#
# and every divergence of ``DIVERGENCES`` is its usual formula applied to p~ and q~. Merging the
# columns outside the top-k into one bucket is a coarse-graining, so by the data-processing inequality
# each f-divergence (forward/reverse/skew KL, JSD, TVD) of the buckets is <= the dense one, and it is
# exactly the dense one when k == V (the tail buckets are empty, -inf in log space, and contribute
# 0 log 0 = 0). Where the teacher concentrates its mass (the usual case: at k = 64 the tail of an LLM is
# typically under 1e-2), the bucket divergence is close to the dense one; its gradient moves the
# student's top-k tokens exactly as the dense forward KL would and the rest only through their sum.


class TopKTargets(NamedTuple):
    """A cached teacher's targets at N trained positions (the rows of ``targets[trained]``).

    ids        [N, k] integer token ids of the teacher's k most probable tokens (any integer dtype;
               distinct within a row, each < the compared vocabulary width V)
    log_probs  [N, k] float: log p_teacher(id) at the cache's temperature (fp16/bf16/fp32 storage)
    tail       [N] float: log of the teacher mass outside the top-k; -inf when k == V
    """

    ids: Tensor
    log_probs: Tensor
    tail: Tensor

    @property
    def k(self) -> int:
        return int(self.ids.shape[-1])

    def slice(self, start: int, stop: int) -> TopKTargets:
        """Rows [start, stop): views, no copy."""
        return TopKTargets(self.ids[start:stop], self.log_probs[start:stop], self.tail[start:stop])

    def to(self, device: torch.device | str) -> TopKTargets:
        return TopKTargets(self.ids.to(device), self.log_probs.to(device), self.tail.to(device))


def _check_topk(student_logits: Tensor, teacher: TopKTargets) -> None:
    ids, log_probs, tail = teacher
    n_lead = student_logits.shape[:-1]
    if student_logits.dim() < 1 or not student_logits.is_floating_point():
        raise ValueError("student_logits must be a floating-point tensor [N, V]")
    if ids.shape[:-1] != n_lead or log_probs.shape != ids.shape or tail.shape != n_lead:
        raise ValueError(
            f"cached teacher targets ids {tuple(ids.shape)}, log_probs {tuple(log_probs.shape)} and tail "
            f"{tuple(tail.shape)} must be [N, k], [N, k] and [N] with the student's N = {tuple(n_lead)}"
        )
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise TypeError(f"teacher ids must be an integer tensor, got {ids.dtype}")
    if not (log_probs.is_floating_point() and tail.is_floating_point()):
        raise TypeError("teacher log_probs and tail must be floating-point tensors")
    if ids.shape[-1] > student_logits.shape[-1]:
        raise ValueError(
            f"k = {ids.shape[-1]} cached teacher tokens but only V = {student_logits.shape[-1]} student "
            "logit columns: the cache was made for a wider vocabulary"
        )


def topk_bucket_log_probs(
    student_logits: Tensor, teacher: TopKTargets, *, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """(log q~, log p~), each [N, k + 1]: the (k+1)-bucket distributions of student and teacher.

    ``student_logits [N, V]`` are raw logits (divided by ``temperature`` here, as the dense divergences
    do); the teacher's log-probs are already at the cache's temperature. Column j < k is the teacher's
    j-th token, column k the tail. Computed in float32 (float64 if the logits are float64).

    Student: ``log_softmax`` over all V columns, gathered at the teacher's ids; its tail is the
    ``logsumexp`` of the columns *not* in the top-k (a scatter of -inf, then a logsumexp), never
    ``log(1 - sum q)``, which cancels catastrophically when the top-k holds almost all the mass. An
    empty tail (k == V, or only zero-probability columns left) is exactly -inf with a zero gradient.

    Teacher: the stored values, renormalised over the k + 1 buckets (a log-space shift by their
    logsumexp), so that rounding in an fp16 cache can neither make a divergence negative nor leave
    the buckets summing to 1 +- 1e-3. For exact (fp32/fp64) values the shift is at rounding level.
    """
    _check_topk(student_logits, teacher)
    _check_temperature(temperature)
    dtype = _compute_dtype(student_logits)
    ids = teacher.ids.long()  # [N, k]
    log_q = torch.log_softmax(student_logits.to(dtype) / temperature, dim=-1)  # [N, V]
    q_top = log_q.gather(-1, ids)  # [N, k]
    rest = log_q.scatter(-1, ids, _NEG_INF)  # [N, V]: the columns outside the teacher's top-k
    empty = (rest == _NEG_INF).all(dim=-1, keepdim=True)  # [N, 1]
    # logsumexp of an all -inf row is -inf in value but NaN in gradient: feed it zeros there instead.
    q_tail = torch.where(empty, _NEG_INF, torch.logsumexp(torch.where(empty, 0.0, rest), -1, keepdim=True))
    log_q_buckets = torch.cat([q_top, q_tail], dim=-1)  # [N, k + 1]

    p = torch.cat([teacher.log_probs.to(dtype), teacher.tail.to(dtype).unsqueeze(-1)], dim=-1)  # [N, k+1]
    log_p_buckets = p - torch.logsumexp(p, dim=-1, keepdim=True)
    return log_q_buckets, log_p_buckets.detach()


def _divergence_of_log_probs(
    name: str, log_q: Tensor, log_p: Tensor, beta: float, skew_alpha: float
) -> Tensor:
    """The divergence ``name`` of two distributions given as log-probs: [N, K], [N, K] -> [N] (no T²)."""
    if name == "forward_kl":
        return _kl_from_log_probs(log_p, log_q)
    if name == "reverse_kl":
        return _kl_from_log_probs(log_q, log_p)
    if name == "jsd":
        _check_beta(beta)
        log_m = _log_mixture(log_p, log_q, beta)
        return beta * _kl_from_log_probs(log_p, log_m) + (1.0 - beta) * _kl_from_log_probs(log_q, log_m)
    if name == "skew_forward_kl":
        _check_skew_alpha(skew_alpha)
        return _kl_from_log_probs(log_p, _log_mixture(log_p, log_q, skew_alpha))
    if name == "skew_reverse_kl":
        _check_skew_alpha(skew_alpha)
        return _kl_from_log_probs(log_q, _log_mixture(log_q, log_p, skew_alpha))
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(dim=-1)  # tvd


def topk_divergence(
    name: str,
    student_logits: Tensor,
    teacher: TopKTargets,
    *,
    temperature: float = 1.0,
    beta: float = 0.5,
    skew_alpha: float = 0.1,
) -> Tensor:
    """The divergence ``name`` (one of ``DIVERGENCES``) on the (k+1)-bucket distributions: [N, V] -> [N].

    Same contract as ``divergence`` (nats, times T², student logits divided by T, argument order
    student then teacher), with the teacher given as cached top-k targets (see ``TopKTargets`` and
    ``topk_bucket_log_probs``). Equal to the dense divergence when k == V (up to float rounding: the
    sums run in another order); never negative and <= the dense divergence for k < V. Gradients flow
    into ``student_logits`` only.
    """
    _check_name(name)
    log_q, log_p = topk_bucket_log_probs(student_logits, teacher, temperature=temperature)
    return _divergence_of_log_probs(name, log_q, log_p, beta, skew_alpha) * temperature**2


def reference_topk_divergence(
    name: str,
    student_logits: Tensor,
    teacher: TopKTargets,
    *,
    temperature: float = 1.0,
    beta: float = 0.5,
    skew_alpha: float = 0.1,
) -> Tensor:
    """Ground truth for ``topk_divergence`` in float64: probabilities, summed tails, textbook formulas.

    The student's tail is the sum of its probabilities outside the top-k (zero when k == V; ``1 - sum``
    would leave rounding noise there, which reverse KL turns into +inf). The teacher buckets are
    normalised by their sum (``topk_divergence`` does it in log space).
    """
    _check_name(name)
    _check_topk(student_logits, teacher)
    q = torch.softmax(student_logits.double() / temperature, dim=-1)
    ids = teacher.ids.long()
    q_b = torch.cat([q.gather(-1, ids), q.scatter(-1, ids, 0.0).sum(-1, keepdim=True)], dim=-1)
    p_b = torch.cat([teacher.log_probs.double().exp(), teacher.tail.double().exp().unsqueeze(-1)], dim=-1)
    p_b = p_b / p_b.sum(-1, keepdim=True)
    if name == "forward_kl":
        value = _ref_kl(p_b, q_b)
    elif name == "reverse_kl":
        value = _ref_kl(q_b, p_b)
    elif name == "jsd":
        m = beta * p_b + (1.0 - beta) * q_b
        value = beta * _ref_kl(p_b, m) + (1.0 - beta) * _ref_kl(q_b, m)
    elif name == "skew_forward_kl":
        value = _ref_kl(p_b, skew_alpha * p_b + (1.0 - skew_alpha) * q_b)
    elif name == "skew_reverse_kl":
        value = _ref_kl(q_b, (1.0 - skew_alpha) * p_b + skew_alpha * q_b)
    else:
        value = 0.5 * (p_b - q_b).abs().sum(dim=-1)
    return value * temperature**2


def cached_distill_loss(
    student_logits: Tensor,
    targets: Tensor,
    teacher: TopKTargets | None = None,
    *,
    kd_ratio: float,
    num_tokens: int | Tensor,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    skew_alpha: float = 0.1,
    kd_vocab_size: int | None = None,
) -> LossParts:
    """``distill_loss`` with a cached teacher: ``((1 - kd_ratio) CE + kd_ratio D~) / num_tokens``.

    Shapes: ``student_logits [N, V_s]``, ``targets [N]``, ``teacher`` rows aligned with them. CE as in
    ``distill_loss`` (full student width, fp32, no temperature); D~ is ``topk_divergence`` on the
    student logits sliced to ``kd_vocab_size`` (the cache's vocabulary, the tokenizer length).
    """
    _check_loss_options(kd_ratio, divergence, num_tokens)
    if teacher is None and kd_ratio > 0:
        raise ValueError(
            f"kd_ratio={kd_ratio} > 0 needs the cached teacher targets (teacher=TopKTargets(...)); pass "
            "them, or set kd_ratio=0 for plain SFT"
        )
    _check_student_logits(student_logits, targets)
    if kd_vocab_size is not None and not 0 < kd_vocab_size <= student_logits.shape[1]:
        raise ValueError(f"kd_vocab_size={kd_vocab_size} must be in [1, {student_logits.shape[1]}]")
    ce_sum = F.cross_entropy(student_logits.float(), targets, reduction="sum")
    if teacher is not None and kd_ratio > 0:
        student_kd = student_logits if kd_vocab_size is None else student_logits[:, :kd_vocab_size]
        kd_sum = topk_divergence(
            divergence, student_kd, teacher, temperature=temperature, beta=beta, skew_alpha=skew_alpha
        ).sum()
    else:
        kd_sum = ce_sum.new_zeros(())
    loss = _objective(ce_sum, kd_sum, kd_ratio, num_tokens)
    n = student_logits.shape[0]
    return LossParts(loss=loss, ce_sum=ce_sum.detach(), kd_sum=kd_sum.detach(), num_tokens=n)


def chunked_cached_distill_loss(
    student_hidden: Tensor,
    student_head: Tensor,
    targets: Tensor,
    teacher: TopKTargets | None = None,
    *,
    kd_ratio: float,
    num_tokens: int | Tensor,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    skew_alpha: float = 0.1,
    kd_vocab_size: int | None = None,
    chunk_size: int = 1024,
    student_bias: Tensor | None = None,
    student_softcap: float | None = None,
) -> LossParts:
    """``cached_distill_loss`` fused with the student's lm_head, chunk by chunk: no [N, V] logits exist.

    Shapes: ``student_hidden [N, H]``, ``student_head [V_s, H]``, ``targets [N]``, ``teacher`` rows
    [N, k] / [N]. The same chunk loop as ``chunked_distill_loss`` (gradients computed during the
    forward, per chunk), with the teacher's matmul replaced by a slice of the cached targets, so the
    contract, dtypes and memory bound are those of ``chunked_distill_loss``.
    """
    _check_loss_options(kd_ratio, divergence, num_tokens)
    if teacher is None and kd_ratio > 0:
        raise ValueError(
            f"kd_ratio={kd_ratio} > 0 needs the cached teacher targets (teacher=TopKTargets(...)); pass "
            "them, or set kd_ratio=0 for plain SFT"
        )
    # The generic checks (head/hidden shapes, chunk size, soft-cap, num_tokens); the teacher's own below.
    _check_chunked_args(
        student_hidden,
        student_head,
        targets,
        None,
        None,
        kd_ratio=0.0,
        num_tokens=num_tokens,
        divergence=divergence,
        kd_vocab_size=None,
        chunk_size=chunk_size,
        student_bias=student_bias,
        teacher_bias=None,
        softcaps=(student_softcap, None),
    )
    kd_active = teacher is not None and kd_ratio > 0
    if kd_active:
        assert teacher is not None
        width = student_head.shape[0] if kd_vocab_size is None else kd_vocab_size
        if not 0 < width <= student_head.shape[0]:
            raise ValueError(f"kd_vocab_size={kd_vocab_size} must be in [1, {student_head.shape[0]}]")
        _check_topk(student_hidden.new_empty((student_hidden.shape[0], width)), teacher)
        _check_divergence_options(divergence, temperature, beta, skew_alpha)
    student_dtype = _matmul_dtype(student_hidden)
    plan = _ChunkPlan(
        targets=targets,
        teacher_hidden=None,
        teacher_head=None,
        teacher_bias=None,
        teacher_dtype=student_dtype,
        student_dtype=student_dtype,
        kd_ratio=float(kd_ratio),
        num_tokens=num_tokens,
        divergence=divergence,
        temperature=temperature,
        beta=beta,
        skew_alpha=skew_alpha,
        kd_vocab_size=kd_vocab_size,
        chunk_size=chunk_size,
        student_softcap=student_softcap,
        teacher_softcap=None,
        cached_teacher=teacher if kd_active else None,
    )
    return _run_chunks(plan, student_hidden, student_head, student_bias)


def _run_chunks(
    plan: Any, student_hidden: Tensor, student_head: Tensor, student_bias: Tensor | None
) -> LossParts:
    """Run the chunk loop, through the autograd Function only when some student input needs a gradient."""
    grad_on = torch.is_grad_enabled()
    needs = (
        grad_on and student_hidden.requires_grad,
        grad_on and student_head.requires_grad,
        grad_on and student_bias is not None and student_bias.requires_grad,
    )
    n_local = student_hidden.shape[0]
    if not any(needs):
        # Nothing to differentiate (evaluation, or all inputs frozen): values only, no gradient work.
        loss, ce_sum, kd_sum, *_ = _chunk_loop(plan, student_hidden, student_head, student_bias, needs)
        return LossParts(loss=loss, ce_sum=ce_sum, kd_sum=kd_sum, num_tokens=n_local)
    loss, ce_sum, kd_sum = _ChunkedDistill.apply(student_hidden, student_head, student_bias, plan, needs)
    return LossParts(loss=loss, ce_sum=ce_sum, kd_sum=kd_sum, num_tokens=n_local)
