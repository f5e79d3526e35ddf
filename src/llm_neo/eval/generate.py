"""Greedy generation on the prompt exactly as training renders it: what task scores are computed from."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from llm_neo.data import render_segments


def prompt_and_stop(record: dict[str, Any], tokenizer: Any) -> tuple[str, str]:
    """The prompt text the model sees before the response, and the text that ends the response.

    Both come from ``llm_neo.data.render_segments``, the function training uses, so a model is asked
    in exactly the format it was trained in (the chat template, for a tokenizer that has one).

    ``record`` is an Alpaca record, or a prompt-only record ``{"prompt": ...}`` (no ``completion``):
    that is asked as the user's instruction, rendered as an Alpaca record with that instruction would be.
    """
    if "output" not in record and "completion" not in record and isinstance(record.get("prompt"), str):
        record = {"instruction": record["prompt"], "output": ""}
    segments = render_segments(record, tokenizer, where="task record")
    # Alpaca/chat renderings are [prompt (untrained), response (trained), rest (untrained)?].
    if len(segments) < 2 or segments[0][1] or not segments[1][1]:
        raise ValueError("expected a rendering of the form prompt, response; is this an alpaca record?")
    response = segments[1][0]
    if not response.startswith(record["output"]):
        raise ValueError("the rendered response does not start with the record's output")
    return segments[0][0], response[len(record["output"]) :]


@torch.no_grad()
def greedy_answers(
    model: torch.nn.Module,
    tokenizer: Any,
    records: Sequence[dict[str, Any]],
    *,
    device: torch.device,
    batch_size: int = 64,
    max_new_tokens: int | None = None,
    desc: str = "generate",
    progress: bool = True,
) -> list[str]:
    """Greedy responses of ``model`` to ``records``, cut at the end-of-turn token and stripped.

    Prompts are batched with left padding (sorted by length, so batches pad little) and generation stops
    at the token that starts the template's end of turn (``<|end|>`` for the demo's template) or at eos.
    ``max_new_tokens`` defaults to the longest expected response (``output``) plus its end-of-turn
    tokens; prompt-only records have none, so it must be given for them.
    """
    if not records:
        return []
    if max_new_tokens is None and any("output" not in r for r in records):
        raise ValueError("greedy_answers: records without an 'output' need an explicit max_new_tokens")
    rendered = [prompt_and_stop(r, tokenizer) for r in records]
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p, _ in rendered]
    stop_ids = {int(tokenizer.eos_token_id)}
    for _, stop in rendered:
        ids = tokenizer(stop, add_special_tokens=False)["input_ids"]
        if ids:
            stop_ids.add(int(ids[0]))
    if max_new_tokens is None:
        max_new_tokens = 2 + max(
            len(tokenizer(r["output"], add_special_tokens=False)["input_ids"]) for r in records
        )
    pad = int(tokenizer.pad_token_id)

    was_training = model.training
    model.eval()
    order = sorted(range(len(records)), key=lambda i: len(prompts[i]))
    answers: list[str] = [""] * len(records)
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", disable=not progress, leave=False):
        rows = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in rows)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)  # [B, T], left-padded
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # [B, T]
        for j, i in enumerate(rows):
            input_ids[j, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            attention_mask[j, width - len(prompts[i]) :] = 1
        out = model.generate(  # type: ignore[operator]
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=sorted(stop_ids),
            pad_token_id=pad,
        )
        for j, i in enumerate(rows):
            new = out[j, width:].tolist()
            cut = next((k for k, t in enumerate(new) if t in stop_ids), len(new))
            answers[i] = tokenizer.decode(new[:cut], skip_special_tokens=True).strip()
    model.train(was_training)
    return answers
