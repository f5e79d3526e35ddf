"""Held-out metrics that say how much of the teacher a student inherited.

ce              mean next-token cross-entropy on trained (response) tokens, nats
perplexity      exp(ce)
kl_to_teacher   mean forward KL(p_teacher ‖ p_student) per trained token, nats (over the vocabulary,
                against a live teacher)
kl_to_teacher_topk
                the same against a teacher cache: on its top-k + tail buckets, a lower bound of
                kl_to_teacher (equal only for k = V at T = 1): a different number, hence its own name
top1_agreement  fraction of trained positions where student and teacher argmax agree (exact from a
                cache too: its first id is the teacher's argmax)
tokens          the trained (response) tokens the means are over
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from llm_neo.data import Example, collate
from llm_neo.errors import CacheError, DataError
from llm_neo.losses import IGNORE_INDEX, TopKTargets, divergence, forward_kl_inplace, next_token_targets
from llm_neo.models.anatomy import final_hidden_states, model_logits
from llm_neo.models.loading import autocast
from llm_neo.teacher_cache.store import TeacherCache

# A held-out metric over fewer records or tokens than these is flagged with its counts wherever it is
# shown (distill's summary, compare's plan and report): its third digit is noise, not a measurement.
SMALL_HELDOUT_RECORDS = 50
SMALL_HELDOUT_TOKENS = 1000


def small_heldout(records: int, tokens: int) -> str | None:
    """A warning naming the counts when held-out metrics over ``records`` records and ``tokens`` scored
    tokens are too few to read closely (under SMALL_HELDOUT_RECORDS or SMALL_HELDOUT_TOKENS), else None."""
    if records >= SMALL_HELDOUT_RECORDS and tokens >= SMALL_HELDOUT_TOKENS:
        return None
    return (
        f"the held-out metrics are over {records:,} records and {tokens:,} tokens (under "
        f"{SMALL_HELDOUT_RECORDS} records or {SMALL_HELDOUT_TOKENS:,} tokens): read them as indicative, "
        "not to their digits; hold out more records (--eval-fraction, or --heldout for compare)"
    )


@torch.no_grad()
def heldout_metrics(
    model: torch.nn.Module,
    examples: Sequence[Example],
    teacher: torch.nn.Module | TeacherCache | None = None,
    *,
    pad_token_id: int,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    kd_vocab_size: int | None = None,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Token-weighted metrics of ``model`` over ``examples`` (sums over all tokens, divided once at the
    end), against a live teacher model or a teacher cache (each example's cache row is its index).

    Against a cache, ``kl_to_teacher_topk`` (not ``kl_to_teacher``) is the forward KL on the cache's
    k + 1 buckets at the cache's temperature (without the T² factor): equal to the dense KL for k == V
    and T = 1, and a lower bound of it otherwise (coarse-graining); ``top1_agreement`` compares with the
    teacher's argmax, exact (the cache's first id). The logits are computed chunk by chunk of tokens: a
    [N, vocab] tensor for a whole batch is what training avoids too (8 × 2048 tokens × 128k vocab in
    fp32 is 8 GiB).
    """
    was_training = model.training
    model.eval()
    ce_sum = kl_sum = agree = 0.0
    tokens = 0
    for start in tqdm(
        range(0, len(examples), batch_size), desc="eval", unit="batch", disable=None, leave=False
    ):
        part = list(examples[start : start + batch_size])
        batch = collate(part, pad_token_id)
        input_ids = batch["input_ids"].to(device)
        attention_mask = batch["attention_mask"].to(device)
        targets = next_token_targets(batch["labels"]).to(device)
        trained = targets != IGNORE_INDEX  # [B, T]
        with autocast(device, dtype):
            hidden = final_hidden_states(model, input_ids, attention_mask)[trained]  # [N, H]
        reference = _reference(teacher, part, input_ids, attention_mask, trained, device, dtype)
        for c in range(0, hidden.shape[0], chunk_size):
            rows = slice(c, c + chunk_size)
            with autocast(device, dtype):
                logits = model_logits(model, hidden[rows]).float()  # [n, V]
            ce_sum += float(F.cross_entropy(logits, targets[trained][rows], reduction="sum"))
            if isinstance(reference, TopKTargets):
                assert isinstance(teacher, TeacherCache)
                width, temperature, top = (
                    teacher.vocab_size,
                    teacher.temperature,
                    reference.slice(c, c + chunk_size),
                )
                kl = divergence("forward_kl", logits[:, :width], top, temperature=temperature)
                kl_sum += float(kl.sum()) / temperature**2
                agree += float((logits[:, :width].argmax(-1) == top.ids[:, 0].long()).sum())
            elif reference is not None:
                assert isinstance(teacher, torch.nn.Module)
                with autocast(device, dtype):
                    teacher_logits = model_logits(teacher, reference[rows]).float()
                width = kd_vocab_size or logits.shape[-1]
                s, t = logits[:, :width], teacher_logits[:, :width]
                agree += float((s.argmax(-1) == t.argmax(-1)).sum())
                # In place: a held-out chunk then holds the two logits tensors, as a training chunk does.
                kl_sum += float(forward_kl_inplace(s, t).sum())
        tokens += int(trained.sum())
    model.train(was_training)
    if tokens == 0:
        raise DataError("no trained tokens to evaluate: every held-out example was dropped or empty")
    metrics = {"ce": ce_sum / tokens, "perplexity": math.exp(min(ce_sum / tokens, 700.0))}
    if teacher is not None:
        kl_name = "kl_to_teacher_topk" if isinstance(teacher, TeacherCache) else "kl_to_teacher"
        metrics |= {kl_name: kl_sum / tokens, "top1_agreement": agree / tokens}
    metrics["tokens"] = tokens
    return metrics


def _reference(
    teacher: torch.nn.Module | TeacherCache | None,
    examples: list[Example],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    trained: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor | TopKTargets | None:
    """What the student is compared with at the trained positions of a batch: the teacher's final hidden
    states [N, H_t], or the cache's targets of the batch's examples [N, k]."""
    if teacher is None:
        return None
    if isinstance(teacher, TeacherCache):
        targets = teacher.targets([ex.index for ex in examples]).to(device)
        if targets.ids.shape[0] != int(trained.sum()):
            raise CacheError(f"{teacher.path}: cached positions do not match the held-out examples")
        return targets
    with autocast(device, dtype):
        return final_hidden_states(teacher, input_ids, attention_mask)[trained]  # [N, H_t]
