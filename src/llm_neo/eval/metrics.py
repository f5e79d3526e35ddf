"""Held-out metrics that say how much of the teacher a student inherited.

ce              mean next-token cross-entropy on trained (response) tokens, nats
perplexity      exp(ce)
kl_to_teacher   mean forward KL(p_teacher ‖ p_student) per trained token, nats
top1_agreement  fraction of trained positions where student and teacher argmax agree
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from llm_neo.data import Example, collate
from llm_neo.losses import forward_kl, next_token_targets
from llm_neo.models.loading import autocast


def final_hidden_states(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """[B, T, H] hidden states after the final norm: the lm_head's input (works through PEFT wrappers)."""
    decoder = model.get_decoder()  # type: ignore[operator]
    return decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


def model_logits(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The model's lm_head on ``hidden`` [n, H] -> [n, V], with Gemma-style soft-capping where configured."""
    logits = model.get_output_embeddings()(hidden)  # type: ignore[operator]
    cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    return cap * torch.tanh(logits / cap) if cap else logits


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
        trained = targets != -100
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
        raise ValueError("no trained tokens to evaluate")
    metrics = {"ce": ce_sum / tokens, "perplexity": math.exp(min(ce_sum / tokens, 700.0))}
    if teacher is not None:
        metrics |= {"kl_to_teacher": kl_sum / tokens, "top1_agreement": agree / tokens}
    metrics["tokens"] = tokens
    return metrics


def format_table(rows: dict[str, dict[str, Any]], columns: list[str]) -> str:
    """A Markdown table: one row per named result, one column per metric (missing cells blank)."""
    header = "| | " + " | ".join(columns) + " |"
    rule = "|---|" + "---|" * len(columns)
    lines = [header, rule]
    for name, values in rows.items():
        cells = [_cell(values.get(c)) for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def run_eval(config: Any) -> dict[str, float]:
    """`llm-neo eval`: load model (and teacher), read the data as `distill` does, compute the metrics."""
    from llm_neo.config import validate_eval
    from llm_neo.data import check_chat_templates, load_records, tokenize_records
    from llm_neo.models.loading import (
        check_same_vocabulary,
        freeze,
        kd_vocab_size,
        load_model,
        load_tokenizer,
        resolve_device,
        resolve_dtype,
    )

    validate_eval(config)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    tokenizer = load_tokenizer(config.model, role="model", trust_remote_code=config.trust_remote_code)
    records = load_records(config.data)
    teacher = None
    if config.teacher:
        teacher_tokenizer = load_tokenizer(
            config.teacher, role="teacher", trust_remote_code=config.trust_remote_code
        )
        check_same_vocabulary(tokenizer, teacher_tokenizer)
        check_chat_templates(records, tokenizer, teacher_tokenizer, source=config.data)
    examples, _ = tokenize_records(
        records,
        tokenizer,
        max_length=config.max_length,
        train_on_prompt=config.train_on_prompt,
        source=config.data,
    )
    load = {
        "dtype": dtype,
        "device": device,
        "trust_remote_code": config.trust_remote_code,
        "allow_pickle_weights": config.allow_pickle_weights,
    }
    model = freeze(load_model(config.model, role="model", **load))
    if config.teacher:
        teacher = freeze(load_model(config.teacher, role="teacher", **load))
    return heldout_metrics(
        model,
        examples,
        pad_token_id=tokenizer.pad_token_id,
        batch_size=config.batch_size,
        device=device,
        dtype=dtype,
        teacher=teacher,
        progress=True,
        kd_vocab_size=kd_vocab_size(tokenizer, model, teacher) if teacher else None,
    )
