"""Held-out metrics that say how much of the teacher a student inherited.

ce              mean next-token cross-entropy on trained (response) tokens, nats
perplexity      exp(ce)
kl_to_teacher   mean forward KL(p_teacher ‖ p_student) per trained token, nats
top1_agreement  fraction of trained positions where student and teacher argmax agree
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from llm_neo.data import Example, collate
from llm_neo.errors import CacheError, DataError
from llm_neo.losses import IGNORE_INDEX, forward_kl, next_token_targets, topk_divergence
from llm_neo.models.loading import autocast, final_hidden_states, model_logits
from llm_neo.teacher_cache.store import TeacherCache


@torch.no_grad()
def heldout_metrics(
    model: torch.nn.Module,
    examples: list[Example],
    *,
    pad_token_id: int,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    teacher: torch.nn.Module | None = None,
    kd_vocab_size: int | None = None,
    progress: bool = False,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Token-weighted metrics over ``examples`` (sums over all tokens, divided once at the end)."""
    was_training = model.training
    model.eval()
    ce_sum = kl_sum = agree = 0.0
    tokens = 0
    starts = range(0, len(examples), batch_size)
    for start in tqdm(starts, desc="eval", unit="batch", disable=not progress, leave=False):
        batch = collate(examples[start : start + batch_size], pad_token_id)
        input_ids = batch["input_ids"].to(device)
        attention_mask = batch["attention_mask"].to(device)
        targets = next_token_targets(batch["labels"]).to(device)
        trained = targets != IGNORE_INDEX
        with autocast(device, dtype):
            hidden = final_hidden_states(model, input_ids, attention_mask)[trained]  # [N, H]
            teacher_hidden = (
                final_hidden_states(teacher, input_ids, attention_mask)[trained]
                if teacher is not None
                else None
            )
        # Logits chunk by chunk of tokens: a [N, vocab] tensor for a whole batch is what we avoid in
        # training too (8 × 2048 tokens × 128k vocab in fp32 is 8 GiB).
        for c in range(0, hidden.shape[0], chunk_size):
            with autocast(device, dtype):
                logits = model_logits(model, hidden[c : c + chunk_size]).float()  # [n, V]
            ce_sum += float(F.cross_entropy(logits, targets[trained][c : c + chunk_size], reduction="sum"))
            if teacher is not None and teacher_hidden is not None:
                with autocast(device, dtype):
                    teacher_logits = model_logits(teacher, teacher_hidden[c : c + chunk_size]).float()
                width = kd_vocab_size or logits.shape[-1]
                s, t = logits[:, :width], teacher_logits[:, :width]
                kl_sum += float(forward_kl(s, t).sum())
                agree += float((s.argmax(-1) == t.argmax(-1)).sum())
        tokens += int(trained.sum())
    model.train(was_training)
    if tokens == 0:
        raise DataError("no trained tokens to evaluate: every held-out example was dropped or empty")
    metrics = {"ce": ce_sum / tokens, "perplexity": math.exp(min(ce_sum / tokens, 700.0))}
    if teacher is not None:
        metrics |= {"kl_to_teacher": kl_sum / tokens, "top1_agreement": agree / tokens}
    metrics["tokens"] = tokens
    return metrics


@torch.no_grad()
def cached_heldout_metrics(
    model: torch.nn.Module,
    examples: Sequence[Example],
    rows: Sequence[int],
    cache: TeacherCache,
    *,
    pad_token_id: int,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """``heldout_metrics`` with the cached teacher: ce, perplexity, kl_to_teacher, top1_agreement.

    ``kl_to_teacher`` is the forward KL on the cache's k + 1 buckets at the cache's temperature
    (without the T² factor): equal to the dense KL for k == V and T = 1, and a lower bound of it
    otherwise (coarse-graining). ``top1_agreement`` compares with the teacher's argmax, exact (the
    cache's first id). ``rows[i]`` is the cache row of ``examples[i]``.
    """
    was_training = model.training
    model.eval()
    ce_sum = kl_sum = agree = 0.0
    tokens = 0
    width = cache.vocab_size
    temperature = cache.temperature
    for start in range(0, len(examples), batch_size):
        batch = collate(list(examples[start : start + batch_size]), pad_token_id)
        teacher = cache.targets(rows[start : start + batch_size]).to(device)
        targets = next_token_targets(batch["labels"]).to(device)
        trained = targets != IGNORE_INDEX
        with autocast(device, dtype):
            hidden = final_hidden_states(
                model, batch["input_ids"].to(device), batch["attention_mask"].to(device)
            )[trained]  # [N, H]
        if teacher.ids.shape[0] != hidden.shape[0]:
            raise CacheError(f"{cache.path}: cached positions do not match the held-out examples")
        for c in range(0, hidden.shape[0], chunk_size):
            with autocast(device, dtype):
                logits = model_logits(model, hidden[c : c + chunk_size]).float()  # [n, V_s]
            ce_sum += float(
                torch.nn.functional.cross_entropy(
                    logits, targets[trained][c : c + chunk_size], reduction="sum"
                )
            )
            part = teacher.slice(c, c + chunk_size)
            kl = topk_divergence("forward_kl", logits[:, :width], part, temperature=temperature)
            kl_sum += float(kl.sum()) / temperature**2
            agree += float((logits[:, :width].argmax(-1) == part.ids[:, 0].long()).sum())
        tokens += int(trained.sum())
    model.train(was_training)
    if tokens == 0:
        raise DataError("no trained tokens to evaluate: every held-out example was dropped or empty")
    return {
        "ce": ce_sum / tokens,
        "perplexity": math.exp(min(ce_sum / tokens, 700.0)),
        "kl_to_teacher": kl_sum / tokens,
        "top1_agreement": agree / tokens,
        "tokens": tokens,
    }
