"""The fp64 reference every fast path is held against: textbook formulas on probabilities.

Naive on purpose: softmax to probabilities in float64, then the definitions with ``log`` of
probabilities and of mixtures, which is accurate enough in float64. Written independently of the fast
paths (``llm_neo.losses.divergences``, ``topk``, ``chunked``, ``liger``); only the input validation is
shared, so both reject the same inputs. Used by the tests; not meant for training.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from llm_neo.choices import DIVERGENCES
from llm_neo.losses.divergences import TopKTargets, check_divergence, check_logits, check_topk


def _kl(a: Tensor, b: Tensor) -> Tensor:
    # xlogy(0, y) = 0 gives 0 log 0 = 0; xlogy(a > 0, 0) = -inf gives +inf for an unsupported b.
    return (torch.xlogy(a, a) - torch.xlogy(a, b)).sum(dim=-1)


# name -> formula(q, p, beta, skew_alpha) -> [N], on probabilities [N, K], without the T² factor.
_FORMULAS: dict[str, Callable[[Tensor, Tensor, float, float], Tensor]] = {
    "forward_kl": lambda q, p, beta, alpha: _kl(p, q),
    "reverse_kl": lambda q, p, beta, alpha: _kl(q, p),
    "jsd": lambda q, p, beta, alpha: (
        beta * _kl(p, beta * p + (1.0 - beta) * q) + (1.0 - beta) * _kl(q, beta * p + (1.0 - beta) * q)
    ),
    "skew_forward_kl": lambda q, p, beta, alpha: _kl(p, alpha * p + (1.0 - alpha) * q),
    "skew_reverse_kl": lambda q, p, beta, alpha: _kl(q, (1.0 - alpha) * p + alpha * q),
    "tvd": lambda q, p, beta, alpha: 0.5 * (p - q).abs().sum(dim=-1),
}
assert tuple(_FORMULAS) == DIVERGENCES


def reference_divergence(
    name: str,
    student_logits: Tensor,
    teacher: Tensor | TopKTargets,
    *,
    temperature: float = 1.0,
    beta: float = 0.5,
    skew_alpha: float = 0.1,
) -> Tensor:
    """Ground truth for ``divergence``: same contract ([N, V] -> [N], times T**2), in float64.

    For a cached teacher: the student's tail is the sum of its probabilities outside the top-k (zero
    when k == V; ``1 - sum`` would leave rounding noise there, which reverse KL turns into +inf), and
    the teacher buckets are normalised by their sum (``divergence`` does both in log space).
    """
    check_divergence(name, temperature=temperature, beta=beta, skew_alpha=skew_alpha)
    q = torch.softmax(student_logits.double() / temperature, dim=-1)
    if isinstance(teacher, TopKTargets):
        check_topk(student_logits, teacher)
        ids = teacher.ids.long()
        q = torch.cat([q.gather(-1, ids), q.scatter(-1, ids, 0.0).sum(-1, keepdim=True)], dim=-1)
        p = torch.cat([teacher.log_probs.double().exp(), teacher.tail.double().exp().unsqueeze(-1)], dim=-1)
        p = p / p.sum(-1, keepdim=True)
    else:
        check_logits(student_logits, teacher)
        p = torch.softmax(teacher.double() / temperature, dim=-1)
    return _FORMULAS[name](q, p, beta, skew_alpha) * temperature**2


def reference_uld(student_logits: Tensor, teacher: TopKTargets, *, temperature: float = 1.0) -> Tensor:
    """Ground truth for ``divergences.uld``, in float64: the student's probabilities sorted (all of them),
    its first k against the teacher's sorted top-k, the sum of the rest against the teacher's tail."""
    check_topk(student_logits, teacher)
    q = torch.softmax(student_logits.double() / temperature, dim=-1).sort(dim=-1, descending=True).values
    p = torch.cat([teacher.log_probs.double().exp(), teacher.tail.double().exp().unsqueeze(-1)], dim=-1)
    p = p / p.sum(-1, keepdim=True)
    p_top = p[..., :-1].sort(dim=-1, descending=True).values
    k = teacher.k
    return ((q[..., :k] - p_top).abs().sum(-1) + (q[..., k:].sum(-1) - p[..., -1]).abs()) * temperature**2
