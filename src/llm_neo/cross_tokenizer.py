"""What a cross-tokenizer run (``--cross-tokenizer``) adds to the recipe: the pair checked and reported, the
data aligned, the teacher's side of each batch, its aligned targets, and the held-out divergence on aligned
positions (``aligned_kl_to_teacher``). The alignment itself is ``llm_neo.alignment``; the losses are the
same chunked loss as a cached teacher's, with a KD row mask (``llm_neo.losses``).

Normalisation: CE stays on every trained student position and the loss is divided by the same
``num_tokens`` (the step's trained student positions) as without --cross-tokenizer; the KD term is summed
over the aligned positions only, so an unaligned position adds CE alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from llm_neo.alignment import (
    Aligned,
    CrossPair,
    align_examples,
    aligned_targets,
    collate_aligned,
    coverage,
    cross_pair,
    pair_report,
    same_tokenizer,
    spread_targets,
)
from llm_neo.config import TokenizeOptions
from llm_neo.data import Example, collate, read_examples
from llm_neo.errors import ConfigError, ModelError
from llm_neo.losses import IGNORE_INDEX, TopKTargets, divergence, next_token_targets
from llm_neo.models.anatomy import final_hidden_states, logit_width, model_logits
from llm_neo.models.loading import autocast, load_tokenizer
from llm_neo.records.pair import PairReport, pair_lines

log = logging.getLogger("llm_neo")

PAIR_FILE = "pair.json"

# The keys collate adds to a micro-batch for the teacher's side (alignment.collate_aligned).
CROSS_KEYS = ("teacher_input_ids", "teacher_attention_mask", "xt_rows", "xt_teacher", "xt_t_eot", "xt_s_eot")


@dataclass(frozen=True)
class CrossRun:
    """A cross-tokenizer run's pair and its data's alignment."""

    pair: CrossPair
    aligned: dict[int, Aligned]  # example index -> its alignment
    report: PairReport


def refuse_same_tokenizer(student: Any, teacher: Any, method: str) -> None:
    """ConfigError when the exact path applies: --cross-tokenizer is for tokenizers that differ."""
    if same_tokenizer(student, teacher):
        raise ConfigError(
            [
                f"--cross-tokenizer {method}: the teacher and student tokenizers map every id to the same "
                "token (they differ at most by logit padding), so the exact same-tokenizer path applies: "
                "drop --cross-tokenizer"
            ]
        )


def read_cross_data(
    config: Any, *, student: str, teacher: str, method: str, top_k: int, progress: bool
) -> tuple[Any, list[Example], int, int, CrossRun]:
    """(student tokenizer, examples, records, dropped, CrossRun): the data tokenized for the student as
    distill tokenizes it, aligned with the teacher's tokenization; the pair report logged. ``config``:
    distill's or cache-teacher's (data, max_length, train_on_prompt, trust_remote_code)."""
    trust = config.trust_remote_code
    tokenizer = load_tokenizer(student, role="student", trust_remote_code=trust)
    teacher_tokenizer = load_tokenizer(teacher, role="teacher", trust_remote_code=trust)
    refuse_same_tokenizer(tokenizer, teacher_tokenizer, method)
    records, examples, dropped, cross = read_aligned(
        config.data,
        tokenizer,
        teacher_tokenizer,
        config,
        method=method,
        top_k=top_k,
        names=(student, teacher),
        progress=progress,
    )
    return tokenizer, examples, len(records), dropped, cross


def align_data(
    records: Sequence[dict[str, Any]],
    examples: Sequence[Example],
    tokenizer: Any,
    teacher_tokenizer: Any,
    *,
    method: str,
    top_k: int,
    max_length: int,
    names: tuple[str, str],
    source: str,
    train_on_prompt: bool = False,
) -> CrossRun:
    """The CrossRun of ``examples`` (the student's tokenization of ``records``): their alignment with the
    teacher's, the pair's vocabulary map and its report, logged."""
    aligned = align_examples(
        records,
        examples,
        tokenizer,
        teacher_tokenizer,
        max_length=max_length,
        source=source,
        train_on_prompt=train_on_prompt,
    )
    pair = cross_pair(method, tokenizer, teacher_tokenizer, top_k=top_k)
    report = pair_report(
        tokenizer, teacher_tokenizer, names=names, records=records, data=source, max_length=max_length
    )
    for line in pair_lines(report):
        log.info("pair: %s", line)
    log.info(
        "cross-tokenizer %s: %d teacher ids map to student tokens of the same text; %.1f%% of the response "
        "characters are trained by KD (top-%d teacher tokens per aligned position)",
        method,
        pair.mapped,
        100 * coverage(aligned).share(method),
        pair.top_k,
    )
    return CrossRun(pair, {ex.index: al for ex, al in zip(examples, aligned, strict=True)}, report)


def read_aligned(
    path: str,
    tokenizer: Any,
    teacher_tokenizer: Any,
    options: TokenizeOptions,
    *,
    method: str,
    top_k: int,
    names: tuple[str, str],
    progress: bool = False,
) -> tuple[list[dict[str, Any]], list[Example], int, CrossRun]:
    """A data file read across tokenizers (distill's and cache-teacher's data, eval's, compare's held-out
    split): its records, the student's examples of them as ``data.read_examples`` tokenizes them, how many
    records were dropped, and their alignment with the teacher's tokenization (``align_data``)."""
    records, examples, dropped = read_examples(path, tokenizer, options, progress=progress)
    run = align_data(
        records,
        examples,
        tokenizer,
        teacher_tokenizer,
        method=method,
        top_k=top_k,
        max_length=options.max_length,
        names=names,
        source=path,
        train_on_prompt=options.train_on_prompt,
    )
    return records, examples, dropped, run


def student_kd_vocab(tokenizer: Any, student: torch.nn.Module) -> int:
    """Student logit columns the KD term compares: its tokenizer's (the rest is padding)."""
    if logit_width(student) < len(tokenizer):
        raise ModelError(
            f"the student has {logit_width(student)} logit columns but its tokenizer has {len(tokenizer)} "
            "tokens: its embedding table is too small for this tokenizer"
        )
    return len(tokenizer)


def cross_batch(examples: Sequence[Example], cross: CrossRun) -> dict[str, torch.Tensor]:
    """The teacher's side of a micro-batch of ``examples`` (``alignment.collate_aligned``)."""
    return collate_aligned(examples, [cross.aligned[ex.index] for ex in examples], cross.pair)


def cross_targets(
    teacher: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    pair: CrossPair,
    n_trained: int,
    *,
    device: torch.device,
    dtype: torch.dtype,
    temperature: float,
    chunk_size: int,
) -> tuple[TopKTargets, torch.Tensor]:
    """([N, k] targets over the micro-batch's N trained student rows, kd_rows [N]): one teacher forward on
    its own tokens (inference mode), its top-k at the aligned positions, spread to the student's rows."""
    with torch.inference_mode(), autocast(device, dtype):
        hidden = final_hidden_states(
            teacher, batch["teacher_input_ids"].to(device), batch["teacher_attention_mask"].to(device)
        )  # [B, T_t, H_t]
        at = hidden.reshape(-1, hidden.shape[-1])[batch["xt_teacher"].to(device)]  # [M, H_t]
        found = aligned_targets(
            lambda h: model_logits(teacher, h),
            at,
            pair,
            batch["xt_t_eot"],
            batch["xt_s_eot"],
            temperature=temperature,
            chunk_size=chunk_size,
        )
    # Out of inference mode: the loss indexes and scatters these (clone makes them normal tensors).
    found = TopKTargets(found.ids.clone(), found.log_probs.clone().float(), found.tail.clone().float())
    return spread_targets(found, batch["xt_rows"].to(device), n_trained)


@torch.no_grad()
def aligned_heldout(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    examples: Sequence[Example],
    cross: CrossRun,
    *,
    pad_token_id: int,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    chunk_size: int,
) -> dict[str, float]:
    """``aligned_kl_to_teacher``: the forward KL (T = 1, top-k + tail buckets in the student's ids) per
    exactly aligned held-out position, whatever the run's method, so that runs of either method compare;
    ``aligned_coverage``: the share of held-out response characters those positions cover;
    ``aligned_positions``: how many there were. Never mixed with ``kl_to_teacher`` (same tokenizer only)."""
    pair = CrossPair(
        "shared-vocab",
        cross.pair.to_student,
        cross.pair.teacher_vocab,
        cross.pair.student_vocab,
        cross.pair.teacher_pad_id,
        cross.pair.top_k,
    )
    exact = CrossRun(pair, cross.aligned, cross.report)
    was_training = student.training
    student.eval()
    kl_sum, positions = 0.0, 0
    for start in range(0, len(examples), batch_size):
        part = list(examples[start : start + batch_size])
        batch = collate(part, pad_token_id) | cross_batch(part, exact)
        hidden = _trained_hidden(student, batch, device, dtype)  # [N, H_s]
        targets, rows = cross_targets(
            teacher,
            batch,
            pair,
            hidden.shape[0],
            device=device,
            dtype=dtype,
            temperature=1.0,
            chunk_size=chunk_size,
        )
        kl, n = _kl_on_rows(student, hidden, targets, rows, pair.student_vocab, device, dtype, chunk_size)
        kl_sum, positions = kl_sum + kl, positions + n
    student.train(was_training)
    share = coverage([cross.aligned[ex.index] for ex in examples]).share("shared-vocab")
    return {
        "aligned_kl_to_teacher": kl_sum / positions if positions else float("nan"),
        "aligned_coverage": share,
        "aligned_positions": float(positions),
    }


def _trained_hidden(
    student: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """[N, H_s]: the student's final hidden states at the batch's trained rows (row-major)."""
    trained = next_token_targets(batch["labels"]) != IGNORE_INDEX  # [B, T]
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    with autocast(device, dtype):
        return final_hidden_states(student, ids, mask)[trained.to(device)]


def _kl_on_rows(
    student: torch.nn.Module,
    hidden: torch.Tensor,
    targets: TopKTargets,
    rows: torch.Tensor,
    student_vocab: int,
    device: torch.device,
    dtype: torch.dtype,
    chunk_size: int,
) -> tuple[float, int]:
    """(summed forward KL, rows) over the ``rows [N] bool`` of ``hidden [N, H_s]`` against ``targets``
    ([N, k] buckets in the student's ids), chunk by chunk of rows."""
    picked = rows.nonzero().squeeze(-1)
    kl_sum = 0.0
    for c in range(0, picked.shape[0], chunk_size):
        idx = picked[c : c + chunk_size]
        with autocast(device, dtype):
            logits = model_logits(student, hidden[idx]).float()[:, :student_vocab]  # [n, V_s]
        top = TopKTargets(targets.ids[idx], targets.log_probs[idx].float(), targets.tail[idx].float())
        kl_sum += float(divergence("forward_kl", logits, top).sum())
    return kl_sum, int(picked.shape[0])


CachedRows = Callable[[Sequence[Example]], tuple[TopKTargets, torch.Tensor]]


@torch.no_grad()
def cached_aligned_heldout(
    student: torch.nn.Module,
    examples: Sequence[Example],
    cached: CachedRows,
    *,
    student_vocab: int,
    pad_token_id: int,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    chunk_size: int,
) -> dict[str, float]:
    """``aligned_kl_to_teacher`` and ``aligned_positions`` (as ``aligned_heldout``) from a teacher cache
    alone: ``cached(examples)`` gives their cached [N, k] targets and kd rows [N]. Meaningful only for a
    shared-vocab cache at T = 1, which holds exactly what ``aligned_heldout`` computes from the teacher;
    ``aligned_coverage`` needs the alignment (the tokenizers), so it is not reported here."""
    was_training = student.training
    student.eval()
    kl_sum, positions = 0.0, 0
    for start in range(0, len(examples), batch_size):
        part = list(examples[start : start + batch_size])
        hidden = _trained_hidden(student, collate(part, pad_token_id), device, dtype)  # [N, H_s]
        targets, rows = cached(part)
        kl, n = _kl_on_rows(
            student, hidden, targets.to(device), rows.to(device), student_vocab, device, dtype, chunk_size
        )
        kl_sum, positions = kl_sum + kl, positions + n
    student.train(was_training)
    return {
        "aligned_kl_to_teacher": kl_sum / positions if positions else float("nan"),
        "aligned_positions": float(positions),
    }
