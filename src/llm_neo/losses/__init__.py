"""Distillation losses: the LLM-Neo objective and the divergences it can use.

The LLM-Neo loss for one optimizer step is

    loss = ((1 - kd_ratio) * CE + kd_ratio * D(teacher || student)) / num_tokens

where CE and D are *sums* over the trained token positions and ``num_tokens`` counts the trained
positions of the whole step (every micro-batch, every rank). Every function here is pure; the options
travel as one ``LossOptions``.

    divergences  the six divergences, each one formula on log-probabilities, of dense teacher logits or
                 of a cached teacher's top-k + tail buckets
    objective    LossOptions, the targets, CE + KD on full logits (``distill_loss``): the reference path
    chunked      CE + KD fused with the lm_heads chunk by chunk: no [tokens x vocab] logits
    liger        the same through Liger-Kernel's fused loss (an optional extra)
    reference    the fp64 textbook formulas every fast path is tested against

Argument order is always (student, teacher).
"""

from llm_neo.choices import DIVERGENCES
from llm_neo.losses.chunked import HeadInput, chunked_distill_loss
from llm_neo.losses.divergences import (
    TopKTargets,
    divergence,
    forward_kl,
    forward_kl_inplace,
    jsd,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    tvd,
    uld,
)
from llm_neo.losses.liger import liger_distill_loss
from llm_neo.losses.objective import (
    IGNORE_INDEX,
    LossOptions,
    LossParts,
    distill_loss,
    next_token_targets,
    softcap,
)
from llm_neo.losses.reference import reference_divergence, reference_uld

__all__ = [
    "DIVERGENCES",
    "IGNORE_INDEX",
    "HeadInput",
    "LossOptions",
    "LossParts",
    "TopKTargets",
    "chunked_distill_loss",
    "distill_loss",
    "divergence",
    "forward_kl",
    "forward_kl_inplace",
    "jsd",
    "liger_distill_loss",
    "next_token_targets",
    "reference_divergence",
    "reference_uld",
    "reverse_kl",
    "skew_forward_kl",
    "skew_reverse_kl",
    "softcap",
    "tvd",
    "uld",
]
