"""The LLM-Neo objective on full logits, the options every loss path shares, and the training targets.

The loss of one optimizer step is

    loss = ((1 - kd_ratio) * CE + kd_ratio * D(teacher || student)) / num_tokens

where CE and D are *sums* over the trained token positions and ``num_tokens`` counts the trained
positions of the whole step (every micro-batch, every rank). Everything here is a pure function.

Targets: Hugging Face ``labels`` are aligned with ``input_ids``, but the logits at position t predict
token t + 1. ``next_token_targets`` shifts the labels once, and both CE and KD are computed on exactly
the positions whose shifted target is not -100. (The official LLM-Neo code masked the *unshifted*
logits, dropping the position that predicts the first response token and keeping one that predicts
nothing.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from llm_neo.losses.divergences import TopKTargets, check_divergence, divergence, uld

# Hugging Face's label value for "not trained" (also F.cross_entropy's default ignore_index).
IGNORE_INDEX = -100


@dataclass(frozen=True)
class LossOptions:
    """How a loss is computed: the objective's weight and the divergence's options, checked once here.

    kd_ratio       weight of the KD term, in [0, 1] (0: CE only, the teacher is never run)
    divergence     one of DIVERGENCES; checked even when KD is off (a misspelt name is a config error)
    temperature    softmax temperature T of the KD term (the divergence is scaled by T²), > 0
    beta           the JSD mixture weight of the teacher, in (0, 1) (jsd only)
    skew_alpha     the skew KLs' mixture weight, in [0, 1) (skew_* only)
    kd_vocab_size  compare only the first kd_vocab_size logit columns: the shared tokenizer length when
                   an embedding table is padded (Qwen2.5: 151,936 vs 152,064). Dropping the padding
                   columns is the same as giving them -inf logits (zero probability) in both models.
                   None: the widths must be equal.
    chunk_size     tokens per chunk of the chunked paths (the plain path ignores it), >= 1
    uld            the KD term is ULD (``divergences.uld``: sorted probabilities, token identity ignored)
                   against a top-k teacher, instead of ``divergence`` (cross-tokenizer ``uld``)
    """

    kd_ratio: float
    divergence: str = "forward_kl"
    temperature: float = 1.0
    beta: float = 0.5
    skew_alpha: float = 0.1
    kd_vocab_size: int | None = None
    chunk_size: int = 1024
    uld: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.kd_ratio <= 1.0:
            raise ValueError(f"kd_ratio must be in [0, 1] (0 = pure CE, 1 = pure KD), got {self.kd_ratio}")
        check_divergence(
            self.divergence, temperature=self.temperature, beta=self.beta, skew_alpha=self.skew_alpha
        )
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ValueError(f"chunk_size (tokens per chunk) must be an int >= 1, got {self.chunk_size!r}")
        if self.kd_vocab_size is not None and self.kd_vocab_size < 1:
            raise ValueError(f"kd_vocab_size={self.kd_vocab_size} must be >= 1 (or None: equal widths)")


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


def next_token_targets(labels: Tensor) -> Tensor:
    """Shift Hugging Face labels so position t's target is the token at t + 1: [B, T] -> [B, T].

    HF ``labels`` are aligned with ``input_ids`` but the logits at position t predict token t + 1, so
    the labels move left by one and the last position (which predicts nothing in the sequence) gets
    -100. Trained positions are ``targets != -100``; CE and KD are both computed on exactly those
    positions (``logits[targets != -100]``). Returns a new tensor; ``labels`` is not modified.
    """
    pad = labels.new_full((*labels.shape[:-1], 1), IGNORE_INDEX)
    return torch.cat([labels[..., 1:], pad], dim=-1)


def objective(ce: Tensor, kd: Tensor, kd_ratio: float, num_tokens: int | Tensor) -> Tensor:
    """The LLM-Neo loss from CE and KD sums: ``((1 - kd_ratio) CE + kd_ratio KD) / num_tokens``
    (``kd`` is 0 when the KD term is off: adding 0 changes neither the value nor the gradient)."""
    return ((1.0 - kd_ratio) * ce + kd_ratio * kd) / num_tokens


def softcap(logits: Tensor, cap: float | None) -> Tensor:
    """Gemma-style final logit soft-capping ``cap * tanh(logits / cap)``; the logits as they are for None."""
    return logits if cap is None else torch.tanh(logits / cap) * cap


def check_num_tokens(num_tokens: int | Tensor) -> None:
    if isinstance(num_tokens, int) and num_tokens <= 0:
        raise ValueError(f"num_tokens (global count of trained tokens) must be > 0, got {num_tokens}")


def check_teacher_given(teacher: object, kd_ratio: float) -> None:
    if teacher is None and kd_ratio > 0:
        raise ValueError(
            f"kd_ratio={kd_ratio} > 0 needs the teacher: teacher_logits [N, V_t], the teacher_hidden and "
            "teacher_head of the chunked path, or the cached teacher targets (TopKTargets); pass them, "
            "or set kd_ratio=0 for plain SFT"
        )


def check_vocab_widths(v_s: int, v_t: int, kd_vocab_size: int | None) -> None:
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


def distill_loss(
    student_logits: Tensor,
    targets: Tensor,
    teacher: Tensor | TopKTargets | None = None,
    *,
    options: LossOptions,
    num_tokens: int | Tensor,
    kd_rows: Tensor | None = None,
) -> LossParts:
    """The LLM-Neo loss ``((1 - kd_ratio) CE + kd_ratio D(teacher || student)) / num_tokens``.

    Shapes: ``student_logits [N, V_s]``, ``targets [N]`` (int64 token ids; every position is trained,
    the caller has already selected ``targets != -100`` from ``next_token_targets``), and the teacher
    as its logits ``[N, V_t]`` or as a cache's ``TopKTargets`` (rows aligned with the student's; the
    divergence is then that of the top-k buckets, on the student logits sliced to ``kd_vocab_size``, the
    cache's vocabulary).

    ``num_tokens`` is the GLOBAL normaliser: the number of trained tokens over every micro-batch of the
    optimizer step (and every rank), not this micro-batch's N. Summing ``.loss`` over the
    gradient-accumulation micro-batches then gives the per-token mean of the whole step, instead of a
    mean of micro-batch means that over-weights tokens of short micro-batches. It may be an all-reduced
    tensor (no host sync is needed).

    ``kd_rows`` (bool [N], optional) keeps the KD term to those rows (cross-tokenizer: the aligned
    positions); CE stays on every row and ``num_tokens`` is unchanged, so a row outside it adds CE only.

    CE is computed on the student's full width, without temperature, in float32. With
    ``kd_ratio == 0`` or no teacher the KD term is skipped (``kd_sum = 0``); a missing teacher with
    ``kd_ratio > 0`` is an error.
    """
    check_num_tokens(num_tokens)
    check_teacher_given(teacher, options.kd_ratio)
    if student_logits.dim() != 2 or targets.shape != student_logits.shape[:1]:
        raise ValueError(
            f"expected student_logits [N, V] and targets [N], got {tuple(student_logits.shape)} "
            f"and {tuple(targets.shape)}"
        )
    kvs = options.kd_vocab_size
    if isinstance(teacher, Tensor):
        if teacher.dim() != 2 or teacher.shape[0] != student_logits.shape[0]:
            raise ValueError(
                f"teacher_logits {tuple(teacher.shape)} must be [N, V_t] with the student's N = "
                f"{student_logits.shape[0]}"
            )
        check_vocab_widths(student_logits.shape[1], teacher.shape[1], kvs)
    elif kvs is not None and kvs > student_logits.shape[1]:
        raise ValueError(f"kd_vocab_size={kvs} must be in [1, {student_logits.shape[1]}]")

    # float32 CE regardless of the logits' dtype: bf16 log-softmax over a 128k vocabulary is too coarse.
    ce_sum = F.cross_entropy(student_logits.float(), targets, reduction="sum")
    kd_sum = ce_sum.new_zeros(())
    if teacher is not None and options.kd_ratio > 0:
        student_kd = student_logits if kvs is None else student_logits[:, :kvs]  # a view, no copy
        if kd_rows is not None:
            check_kd_rows(kd_rows, student_logits.shape[0])
            student_kd, teacher = student_kd[kd_rows], select_rows(teacher, kd_rows)
        kd_sum = kd_per_token(student_kd, teacher, options).sum()
    loss = objective(ce_sum, kd_sum, options.kd_ratio, num_tokens)
    n = student_logits.shape[0]
    return LossParts(loss=loss, ce_sum=ce_sum.detach(), kd_sum=kd_sum.detach(), num_tokens=n)


def kd_per_token(student_kd: Tensor, teacher: Tensor | TopKTargets, options: LossOptions) -> Tensor:
    """The divergence per position [N] of student logits already sliced to the KD vocabulary, against
    teacher logits (sliced here the same way; never back-propagated into) or cached top-k targets; ULD
    (``options.uld``) against top-k targets."""
    o = options
    if o.uld:
        if not isinstance(teacher, TopKTargets):
            raise ValueError("uld compares a teacher's top-k + tail (TopKTargets), not dense teacher logits")
        return uld(student_kd, teacher, temperature=o.temperature)
    if isinstance(teacher, Tensor):
        # The teacher is frozen: never backprop into its graph.
        teacher = (teacher if o.kd_vocab_size is None else teacher[:, : o.kd_vocab_size]).detach()
    return divergence(
        o.divergence, student_kd, teacher, temperature=o.temperature, beta=o.beta, skew_alpha=o.skew_alpha
    )


def check_kd_rows(kd_rows: Tensor, n: int) -> None:
    if kd_rows.dtype != torch.bool or kd_rows.shape != (n,):
        raise ValueError(
            f"kd_rows must be a bool [N] mask with N = {n}, got {kd_rows.dtype} {tuple(kd_rows.shape)}"
        )


def select_rows(teacher: Tensor | TopKTargets, rows: Tensor) -> Tensor | TopKTargets:
    """The teacher's rows ``rows`` (a bool mask or indices): dense logits or top-k targets alike."""
    if isinstance(teacher, TopKTargets):
        return TopKTargets(teacher.ids[rows], teacher.log_probs[rows], teacher.tail[rows])
    return teacher[rows]
