"""The chunked loss through Liger-Kernel's fused linear JSD loss (``--loss-impl liger``, the extra
``llm-neo[liger]``)."""

from __future__ import annotations

from torch import Tensor

from llm_neo.choices import LIGER_DIVERGENCES
from llm_neo.losses.chunked import HeadInput, check_head, check_teacher_head, chunked_distill_loss
from llm_neo.losses.objective import IGNORE_INDEX, LossOptions, LossParts, check_num_tokens

# Our divergence names as Liger-Kernel's generalized-JSD beta (beta = 0: forward KL, 1: reverse KL).
_LIGER_BETA = {"forward_kl": 0.0, "reverse_kl": 1.0}


def liger_distill_loss(
    student: HeadInput,
    targets: Tensor,
    teacher: HeadInput,
    *,
    options: LossOptions,
    num_tokens: int | Tensor,
    compiled: bool | None = None,
) -> LossParts:
    """``chunked_distill_loss`` through Liger-Kernel's fused linear JSD loss.

    Same shapes and contract as ``chunked_distill_loss`` (the same LossParts, the same gradients up to
    float rounding) for ``forward_kl``, ``reverse_kl`` and ``jsd``, which Liger computes as its
    generalized JSD with beta 0, 1 and ``options.beta``. Translated here: Liger averages over this
    call's tokens and does not scale by T², so the KD weight is ``kd_ratio * T**2`` and the loss is
    rescaled from the local token count to the global ``num_tokens``. Liger pads a narrower student with
    zero logits where llm-neo slices both to ``kd_vocab_size``, so a student whose lm_head is wider than
    the KD vocabulary is refused, as are soft-capped models. ``compiled``: torch.compile Liger's chunk
    step (default: on CUDA only). Checked against ``chunked_distill_loss`` in fp32 on a CPU (tests);
    under bf16 autocast the two round differently.
    """
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss  # the optional extra

    o = options
    if o.divergence not in LIGER_DIVERGENCES:
        raise ValueError(
            f"Liger's fused loss computes {', '.join(LIGER_DIVERGENCES)}, not {o.divergence!r}; use the "
            "chunked loss (--loss-impl chunked)"
        )
    check_num_tokens(num_tokens)
    check_head("student", student)
    check_teacher_head(student, teacher, o.kd_vocab_size)
    if student.softcap is not None or teacher.softcap is not None:
        raise ValueError(
            "Liger's fused loss does not soft-cap the final logits these models cap; use --loss-impl chunked"
        )
    kd_width = o.kd_vocab_size or teacher.weight.shape[0]
    if student.weight.shape[0] != kd_width:
        raise ValueError(
            f"Liger's fused loss needs the student's lm_head ({student.weight.shape[0]} rows) as wide as "
            f"the KD vocabulary ({kd_width}); use --loss-impl chunked for a padded student vocabulary"
        )
    n_local = student.hidden.shape[0]
    if n_local == 0 or o.kd_ratio == 0:  # Liger cannot chunk an empty batch, and would compute an unused KD
        return chunked_distill_loss(student, targets, teacher, options=o, num_tokens=num_tokens)
    rows = slice(0, kd_width)
    t_hidden = teacher.hidden.detach()
    t_head = teacher.weight.detach()[rows]
    t_bias = None if teacher.bias is None else teacher.bias.detach()[rows]
    loss_fn = LigerFusedLinearJSDLoss(
        weight_hard_loss=1.0 - o.kd_ratio,
        weight_soft_loss=o.kd_ratio * o.temperature**2,
        beta=_LIGER_BETA.get(o.divergence, o.beta),
        ignore_index=IGNORE_INDEX,
        temperature=o.temperature,
        compiled=student.hidden.is_cuda if compiled is None else compiled,
        chunk_size=o.chunk_size,
        return_soft_hard_loss=True,
    )
    loss, soft, hard = loss_fn(
        student.hidden, student.weight, t_hidden, t_head, targets, student.bias, t_bias
    )  # means over the n_local tokens
    scale = n_local / num_tokens  # Liger's mean over this call -> llm-neo's sum / global token count
    return LossParts(
        loss=loss * scale,
        ce_sum=(hard * n_local).detach(),
        kd_sum=(soft * n_local * o.temperature**2).detach(),
        num_tokens=n_local,
    )
