"""The divergences D(teacher || student), each written once as a formula on two log-probability tensors.

A teacher comes as dense logits, or as a teacher cache's top-k + tail buckets (``TopKTargets``); each
is turned into a pair of log-probabilities, and the same formula from ``FORMULAS`` applies to both,
so the two cannot drift apart. ``divergence(name, student_logits, teacher)`` takes either.

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

A cached teacher (top-k + tail):

A teacher cache (llm_neo.teacher_cache) keeps, per trained position, the teacher's k most probable
tokens with their log-probabilities at the cache's temperature T, and the log of the probability mass
outside them. Both distributions are then compared on k + 1 buckets:

    p~ = (p_1, ..., p_k, p_tail)        the teacher's top-k ids i_1..i_k, p_tail = 1 - sum_j p_j
    q~ = (q_i1, ..., q_ik, q_tail)      the student at the same ids, q_tail = 1 - sum_j q_ij

and every divergence is its usual formula (``llm_neo.losses.divergences.FORMULAS``) applied to p~ and
q~. Merging the columns outside the top-k into one bucket is a coarse-graining, so by the
data-processing inequality each f-divergence (forward/reverse/skew KL, JSD, TVD) of the buckets is <=
the dense one, and it is exactly the dense one when k == V (the tail buckets are empty, -inf in log
space, and contribute 0 log 0 = 0). Where the teacher concentrates its mass (the usual case: at k = 64
the tail of an LLM is typically under 1e-2), the bucket divergence is close to the dense one; its
gradient moves the student's top-k tokens exactly as the dense forward KL would and the rest only
through their sum.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

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
# A cached teacher: top-k + tail buckets


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


def check_topk(student_logits: Tensor, teacher: TopKTargets) -> None:
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
    check_topk(student_logits, teacher)
    check_temperature(temperature)
    dtype = compute_dtype(student_logits)
    ids = teacher.ids.long()  # [N, k]
    log_q = torch.log_softmax(student_logits.to(dtype) / temperature, dim=-1)  # [N, V]
    q_top = log_q.gather(-1, ids)  # [N, k]
    log_q_buckets = torch.cat([q_top, _tail_log_mass(log_q, ids)], dim=-1)  # [N, k + 1]
    return log_q_buckets, _teacher_buckets(teacher, dtype)


def _tail_log_mass(log_q: Tensor, ids: Tensor) -> Tensor:
    """log of the mass of ``log_q [N, V]`` outside the columns ``ids [N, k]``: [N, 1]; -inf (zero
    gradient) when nothing is left."""
    rest = log_q.scatter(-1, ids, NEG_INF)  # [N, V]: the columns outside the top-k
    empty = (rest == NEG_INF).all(dim=-1, keepdim=True)  # [N, 1]
    # logsumexp of an all -inf row is -inf in value but NaN in gradient: feed it zeros there instead.
    return torch.where(empty, NEG_INF, torch.logsumexp(torch.where(empty, 0.0, rest), -1, keepdim=True))


def _teacher_buckets(teacher: TopKTargets, dtype: torch.dtype) -> Tensor:
    """The teacher's k + 1 bucket log-probs [N, k + 1], renormalised (see ``topk_bucket_log_probs``)."""
    p = torch.cat([teacher.log_probs.to(dtype), teacher.tail.to(dtype).unsqueeze(-1)], dim=-1)  # [N, k+1]
    return (p - torch.logsumexp(p, dim=-1, keepdim=True)).detach()


def uld(student_logits: Tensor, teacher: TopKTargets, *, temperature: float = 1.0) -> Tensor:
    """Universal Logit Distillation (Boizard et al. 2024) per position: [N, V_s], top-k [N, k] -> [N]
    (times T², as the divergences).

    ULD is the Wasserstein-1 distance between the two next-token distributions under a cost that ignores
    token identity, which is the L1 distance between the probability vectors each sorted in descending
    order (zero-padded to a common length). The teacher is known by its top-k + tail (a teacher cache's
    format; its ids are not used, so they may be the teacher's own), so the sorted vectors are compared
    on k + 1 entries:

        ULD = sum_{j <= k} |q_(j) - p_(j)| + |q_tail - p_tail|

    with q_(j) the student's j-th largest probability, q_tail the student mass outside its own top-k,
    p_(j) the teacher's sorted top-k and p_tail its tail (buckets renormalised as in
    ``topk_bucket_log_probs``). Merging the entries past k into one is a coarse-graining, so this is <=
    the full sorted L1 and equal to it when the teacher's top-k holds its whole support (k = V_t: the
    zero padding of the shorter vector is then the student's tail). Needs k <= V_s.
    """
    check_topk(student_logits, teacher)
    check_temperature(temperature)
    dtype = compute_dtype(student_logits)
    log_q = torch.log_softmax(student_logits.to(dtype) / temperature, dim=-1)  # [N, V_s]
    q_top, ids = log_q.topk(teacher.k, dim=-1)  # [N, k], descending
    log_q_sorted = torch.cat([q_top, _tail_log_mass(log_q, ids)], dim=-1)  # [N, k + 1]
    log_p = _teacher_buckets(teacher, dtype)
    p_sorted = torch.cat([log_p[:, :-1].sort(dim=-1, descending=True).values, log_p[:, -1:]], dim=-1)
    return (log_q_sorted.exp() - p_sorted.exp()).abs().sum(dim=-1) * temperature**2


# --------------------------------------------------------------------------------------------------
# Both kinds of teacher


def divergence(
    name: str,
    student_logits: Tensor,
    teacher: Tensor | TopKTargets,
    *,
    temperature: float = 1.0,
    beta: float = 0.5,
    skew_alpha: float = 0.1,
) -> Tensor:
    """The divergence called ``name`` (one of ``DIVERGENCES``) per position: [N, V] -> [N] (nats, times T²).

    ``teacher`` is its logits [N, V], or a cache's top-k targets (then the divergence of the k + 1
    buckets: equal to the dense one when k == V, up to float rounding; never negative and <= the dense
    one for k < V; the cache's log-probs are already at its temperature). Gradients flow into
    ``student_logits`` only when the teacher is cached. ``beta`` is used by ``jsd`` only,
    ``skew_alpha`` by the two skew KLs only; options a divergence does not use are ignored. Unknown
    names raise ``ValueError`` listing the choices.
    """
    check_divergence(name, temperature=temperature, beta=beta, skew_alpha=skew_alpha)
    if isinstance(teacher, TopKTargets):
        log_q, log_p = topk_bucket_log_probs(student_logits, teacher, temperature=temperature)
    else:
        check_logits(student_logits, teacher)
        dtype = compute_dtype(student_logits, teacher)
        log_q = torch.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
        log_p = torch.log_softmax(teacher.to(dtype) / temperature, dim=-1)
    return FORMULAS[name](log_q, log_p, beta, skew_alpha) * temperature**2


def forward_kl(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """Forward KL(p_teacher || p_student) per token: [N, V], [N, V] -> [N] (nats, times T**2).

    Mode covering: the student pays for every token the teacher gives mass to. LLM-Neo's default.
    """
    return divergence("forward_kl", student_logits, teacher_logits, temperature=temperature)


@torch.no_grad()
def forward_kl_inplace(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Forward KL(p_teacher || p_student) per token at T = 1, **overwriting both inputs**: [N, V] fp32,
    [N, V] fp32 -> [N] (nats). No gradient.

    For evaluation, where nothing needs the logits afterwards: ``forward_kl`` holds about five [N, V]
    temporaries (two log-softmaxes, the probabilities, the difference, the product) besides its inputs;
    this holds none, so a chunk of held-out logits costs what a training chunk costs. Equal to
    ``forward_kl`` (tested, also against the fp64 reference).
    """
    log_q = student_logits.sub_(torch.logsumexp(student_logits, -1, keepdim=True))  # log q, in place
    log_p = teacher_logits.sub_(torch.logsumexp(teacher_logits, -1, keepdim=True))  # log p, in place
    log_q.neg_().add_(log_p)  # log p - log q
    p = log_p.exp_()
    log_q.masked_fill_(p == 0, 0.0)  # 0 · log 0 = 0 where the teacher gives a column no mass
    return p.mul_(log_q).sum(-1)  # sum p (log p - log q)


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
