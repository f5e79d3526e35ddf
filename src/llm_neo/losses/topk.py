"""Divergences against a cached teacher: its top-k support plus one tail bucket.

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

from typing import NamedTuple

import torch
from torch import Tensor

from llm_neo.losses.divergences import FORMULAS, NEG_INF, check_divergence, check_temperature, compute_dtype


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
    rest = log_q.scatter(-1, ids, NEG_INF)  # [N, V]: the columns outside the teacher's top-k
    empty = (rest == NEG_INF).all(dim=-1, keepdim=True)  # [N, 1]
    # logsumexp of an all -inf row is -inf in value but NaN in gradient: feed it zeros there instead.
    q_tail = torch.where(empty, NEG_INF, torch.logsumexp(torch.where(empty, 0.0, rest), -1, keepdim=True))
    log_q_buckets = torch.cat([q_top, q_tail], dim=-1)  # [N, k + 1]

    p = torch.cat([teacher.log_probs.to(dtype), teacher.tail.to(dtype).unsqueeze(-1)], dim=-1)  # [N, k+1]
    log_p_buckets = p - torch.logsumexp(p, dim=-1, keepdim=True)
    return log_q_buckets, log_p_buckets.detach()


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
    check_divergence(name, temperature=temperature, beta=beta, skew_alpha=skew_alpha)
    log_q, log_p = topk_bucket_log_probs(student_logits, teacher, temperature=temperature)
    return FORMULAS[name](log_q, log_p, beta, skew_alpha) * temperature**2
