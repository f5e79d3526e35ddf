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
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DIVERGENCES",
    "IGNORE_INDEX",
    "LossParts",
    "distill_loss",
    "divergence",
    "forward_kl",
    "jsd",
    "next_token_targets",
    "reference_divergence",
    "reverse_kl",
    "skew_forward_kl",
    "skew_reverse_kl",
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
    if not 0.0 <= kd_ratio <= 1.0:
        raise ValueError(f"kd_ratio must be in [0, 1] (0 = pure CE, 1 = pure KD), got {kd_ratio}")
    if teacher_logits is None and kd_ratio > 0:
        raise ValueError(
            f"kd_ratio={kd_ratio} > 0 needs teacher_logits; pass them, or set kd_ratio=0 for plain SFT"
        )
    _check_name(divergence)  # a misspelt name is a config error even when KD is off
    if isinstance(num_tokens, int) and num_tokens <= 0:
        raise ValueError(f"num_tokens (global count of trained tokens) must be > 0, got {num_tokens}")
    if student_logits.dim() != 2 or targets.shape != student_logits.shape[:1]:
        raise ValueError(
            f"expected student_logits [N, V] and targets [N], got {tuple(student_logits.shape)} "
            f"and {tuple(targets.shape)}"
        )
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
        loss = ((1.0 - kd_ratio) * ce_sum + kd_ratio * kd_sum) / num_tokens
    else:
        kd_sum = ce_sum.new_zeros(())
        loss = (1.0 - kd_ratio) * ce_sum / num_tokens
    return LossParts(loss=loss, ce_sum=ce_sum.detach(), kd_sum=kd_sum.detach(), num_tokens=n_local)


# ``distill_loss`` has a parameter called ``divergence``, which shadows the function inside it.
_divergence_by_name = divergence


def _check_kd_widths(student_logits: Tensor, teacher_logits: Tensor, kd_vocab_size: int | None) -> None:
    if teacher_logits.dim() != 2 or teacher_logits.shape[0] != student_logits.shape[0]:
        raise ValueError(
            f"teacher_logits {tuple(teacher_logits.shape)} must be [N, V_t] with the student's N = "
            f"{student_logits.shape[0]}"
        )
    v_s, v_t = student_logits.shape[1], teacher_logits.shape[1]
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
