"""The divergences D(teacher || student), each written once as a formula on two log-probability tensors.

Dense logits (``divergence`` and the per-name functions) and a cached teacher's top-k + tail buckets
(``llm_neo.losses.topk``) are two ways of producing those log-probabilities; both then apply the same
formula from ``FORMULAS``, so the two cannot drift apart.

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

The divergences (``DIVERGENCES``, from llm_neo.choices):

- ``forward_kl``      KL(p || q) = sum p (log p - log q)      (the LLM-Neo default; mode covering)
- ``reverse_kl``      KL(q || p) = sum q (log q - log p)      (MiniLLM; mode seeking)
- ``jsd``             generalized JSD, TRL GKD convention: m = beta p + (1 - beta) q,
                      JSD_beta = beta KL(p || m) + (1 - beta) KL(q || m), beta in (0, 1);
                      beta = 0.5 is the symmetric JSD, bounded by log 2
- ``skew_forward_kl`` DistiLLM alpha-skew KL:         KL(p || alpha p + (1 - alpha) q), alpha in [0, 1)
- ``skew_reverse_kl`` DistiLLM alpha-skew reverse KL: KL(q || (1 - alpha) p + alpha q), alpha in [0, 1)
                      (alpha = 0 reduces both to the plain forward / reverse KL)
- ``tvd``             total variation distance: 1/2 sum |p - q|
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from llm_neo.choices import DIVERGENCES

NEG_INF = float("-inf")


# --------------------------------------------------------------------------------------------------
# Validation (shared by the fast paths and the fp64 reference, so both reject the same inputs)


def check_divergence(name: str, *, temperature: float, beta: float, skew_alpha: float) -> None:
    """ValueError for an unknown name, or for an option of this divergence out of its range (an option
    another divergence uses is not checked)."""
    if name not in DIVERGENCES:
        raise ValueError(f"unknown divergence {name!r}; choose one of {', '.join(DIVERGENCES)}")
    check_temperature(temperature)
    # beta = 0 or 1 makes the mixture equal one of the two distributions and JSD_beta identically 0.
    if name == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"beta (jsd mixture weight of the teacher) must be in (0, 1), got {beta}")
    # alpha = 1 makes the skewed mixture equal the first distribution: the divergence is identically 0.
    if name.startswith("skew_") and not 0.0 <= skew_alpha < 1.0:
        raise ValueError(f"skew alpha (skew_alpha) must be in [0, 1), got {skew_alpha}")


def check_temperature(temperature: float) -> None:
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")


def check_logits(student_logits: Tensor, teacher_logits: Tensor) -> None:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits "
            f"{tuple(teacher_logits.shape)} must have the same shape [N, V]; for padded vocabularies "
            "slice both to the shared tokenizer length (LossOptions(kd_vocab_size=...))"
        )
    if student_logits.dim() < 1:
        raise ValueError("logits must have a vocabulary dim: expected [N, V]")
    for name, t in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    # float32 at least (bf16/fp16 logits lose the small differences a divergence is made of);
    # float64 is kept so the fast paths can be gradchecked and compared exactly in tests.
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


# --------------------------------------------------------------------------------------------------
# The formulas, on log-probabilities [N, K] (K = V columns, or k + 1 buckets)


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a || b) = sum_v a (log a - log b) per row: [N, K], [N, K] -> [N].

    Columns with a = 0 contribute exactly 0. The difference is selected with ``torch.where`` rather
    than multiplied by a = 0: there ``log a - log b`` is -inf or NaN (-inf - -inf), and ``0 * NaN``
    would poison the value and the gradient. The backward of ``where`` sends an exact zero into the
    unselected branch and the backward of a subtraction never multiplies by its operands, so no NaN
    can come back from the masked columns.
    """
    support = log_a > NEG_INF  # [N, K]: a > 0
    diff = torch.where(support, log_a - log_b, 0.0)
    return (log_a.exp() * diff).sum(dim=-1)


def _log_mixture(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """log(w a + (1 - w) b), [N, K], computed as a two-term logsumexp of log-probs plus log-weights.

    Never ``log`` of summed probabilities: that underflows to log 0 for tiny probabilities.
    Where both a and b are 0 the result is -inf, but ``logaddexp``'s backward evaluates
    exp(-inf - -inf) = NaN there even under a zero upstream gradient, so those entries are replaced
    by constants before the call and restored to -inf after it.
    """
    # Exact endpoints (a weight of 0 has log -inf; skipping it also saves two [N, K] temporaries).
    if weight_a == 0.0:
        return log_b
    if weight_a == 1.0:
        return log_a
    both_zero = (log_a == NEG_INF) & (log_b == NEG_INF)  # [N, K]
    safe_a = torch.where(both_zero, 0.0, log_a + math.log(weight_a))
    safe_b = torch.where(both_zero, 0.0, log_b + math.log1p(-weight_a))
    return torch.where(both_zero, NEG_INF, torch.logaddexp(safe_a, safe_b))


def _jsd(log_q: Tensor, log_p: Tensor, beta: float, _alpha: float) -> Tensor:
    log_m = _log_mixture(log_p, log_q, beta)
    return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)


# name -> formula(log_q, log_p, beta, skew_alpha) -> [N], without the T² factor.
Formula = Callable[[Tensor, Tensor, float, float], Tensor]
FORMULAS: dict[str, Formula] = {
    "forward_kl": lambda log_q, log_p, beta, alpha: _kl(log_p, log_q),
    "reverse_kl": lambda log_q, log_p, beta, alpha: _kl(log_q, log_p),
    "jsd": _jsd,
    "skew_forward_kl": lambda log_q, log_p, beta, alpha: _kl(log_p, _log_mixture(log_p, log_q, alpha)),
    # alpha on q, (1 - alpha) on p
    "skew_reverse_kl": lambda log_q, log_p, beta, alpha: _kl(log_q, _log_mixture(log_q, log_p, alpha)),
    # differences of probabilities: no logs of small numbers at all
    "tvd": lambda log_q, log_p, beta, alpha: 0.5 * (log_p.exp() - log_q.exp()).abs().sum(dim=-1),
}
assert tuple(FORMULAS) == DIVERGENCES


# --------------------------------------------------------------------------------------------------
# Dense logits


def divergence(
    name: str,
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    beta: float = 0.5,
    skew_alpha: float = 0.1,
) -> Tensor:
    """The divergence called ``name`` (one of ``DIVERGENCES``): [N, V], [N, V] -> [N] (nats, times T²).

    ``beta`` is used by ``jsd`` only, ``skew_alpha`` by the two skew KLs only; options a divergence
    does not use are ignored. Unknown names raise ``ValueError`` listing the choices.
    """
    check_divergence(name, temperature=temperature, beta=beta, skew_alpha=skew_alpha)
    check_logits(student_logits, teacher_logits)
    dtype = compute_dtype(student_logits, teacher_logits)
    log_q = torch.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    log_p = torch.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    return FORMULAS[name](log_q, log_p, beta, skew_alpha) * temperature**2


def forward_kl(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """Forward KL(p_teacher || p_student) per token: [N, V], [N, V] -> [N] (nats, times T**2).

    Mode covering: the student pays for every token the teacher gives mass to. LLM-Neo's default.
    """
    return divergence("forward_kl", student_logits, teacher_logits, temperature=temperature)


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """Reverse KL(p_student || p_teacher) per token: [N, V], [N, V] -> [N] (nats, times T**2).

    Mode seeking (MiniLLM). +inf where the student puts mass on a column the teacher gives zero.
    """
    return divergence("reverse_kl", student_logits, teacher_logits, temperature=temperature)


def jsd(
    student_logits: Tensor, teacher_logits: Tensor, *, beta: float = 0.5, temperature: float = 1.0
) -> Tensor:
    """Generalized Jensen-Shannon divergence per token: [N, V], [N, V] -> [N] (nats, times T**2).

    TRL GKD convention: ``m = beta p + (1 - beta) q`` and
    ``JSD_beta = beta KL(p || m) + (1 - beta) KL(q || m)``; beta in (0, 1), beta = 0.5 is the
    symmetric JSD (bounded by log 2 at T = 1). Always finite.
    """
    return divergence("jsd", student_logits, teacher_logits, temperature=temperature, beta=beta)


def skew_forward_kl(
    student_logits: Tensor, teacher_logits: Tensor, *, alpha: float = 0.1, temperature: float = 1.0
) -> Tensor:
    """DistiLLM alpha-skew KL: KL(p || alpha p + (1 - alpha) q) per token: [N, V], [N, V] -> [N].

    alpha in [0, 1); alpha = 0 is the forward KL. Mixing some teacher into the student keeps the
    divergence finite (<= -log alpha) and its gradient bounded where the student is near zero.
    """
    return divergence(
        "skew_forward_kl", student_logits, teacher_logits, temperature=temperature, skew_alpha=alpha
    )


def skew_reverse_kl(
    student_logits: Tensor, teacher_logits: Tensor, *, alpha: float = 0.1, temperature: float = 1.0
) -> Tensor:
    """DistiLLM alpha-skew reverse KL: KL(q || (1 - alpha) p + alpha q) per token: [N, V] x2 -> [N].

    alpha in [0, 1); alpha = 0 is the reverse KL.
    """
    return divergence(
        "skew_reverse_kl", student_logits, teacher_logits, temperature=temperature, skew_alpha=alpha
    )


def tvd(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """Total variation distance 1/2 sum |p - q| per token: [N, V], [N, V] -> [N] (times T**2).

    Bounded by 1 (at T = 1); differences of probabilities, so no logs of small numbers at all.
    """
    return divergence("tvd", student_logits, teacher_logits, temperature=temperature)
