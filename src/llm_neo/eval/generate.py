"""Greedy generation on the prompt exactly as training renders it: what task scores are computed from."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from llm_neo.data import render_segments
from llm_neo.errors import DataError
from llm_neo.eval.scoring import reference_response
from llm_neo.runtime.progress import tracked


def prompt_and_stop(record: dict[str, Any], tokenizer: Any) -> tuple[str, str]:
    """The prompt text the model sees before the response, and the text that ends the response.

    Both come from ``llm_neo.data.render_segments``, the function training uses, so a model is asked
    in exactly the format it was trained in (the chat template, for a tokenizer that has one). The
    response is the record's reference (``eval.scoring.reference_response``): an Alpaca ``output``, a
    ``completion``, or a chat record's final assistant message, whose earlier turns are the prompt.

    A prompt-only record ``{"prompt": ...}`` (no ``completion``) is asked as the user's instruction,
    rendered as an Alpaca record with that instruction would be.
    """
    record = _as_question(record)
    reference = reference_response(record, where="generation record")
    if reference is None:
        raise DataError(
            "a record to answer needs a response: an output, a completion or a final assistant turn"
        )
    segments = render_segments(record, tokenizer, where="generation record")
    trained = [i for i, (_, is_trained) in enumerate(segments) if is_trained]
    if not trained:
        raise DataError("the record renders no response to generate")
    last = trained[-1]
    response = segments[last][0]
    if not response.startswith(reference):
        raise DataError("the rendered response does not start with the record's reference response")
    prompt = "".join(text for text, _ in segments[:last])
    return prompt, response[len(reference) :]


def _as_question(record: dict[str, Any]) -> dict[str, Any]:
    """A prompt-only record as the Alpaca record with that instruction and no response; others as they are."""
    if "output" not in record and "completion" not in record and isinstance(record.get("prompt"), str):
        return {"instruction": record["prompt"], "output": ""}
    return record


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
    """Greedy responses of ``model`` to ``records`` (``greedy_generations``' answers)."""
    answers, _ = greedy_generations(
        model,
        tokenizer,
        records,
        device=device,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        desc=desc,
        progress=progress,
    )
    return answers


@torch.no_grad()
def greedy_generations(
    model: torch.nn.Module,
    tokenizer: Any,
    records: Sequence[dict[str, Any]],
    *,
    device: torch.device,
    batch_size: int = 64,
    max_new_tokens: int | None = None,
    desc: str = "generate",
    progress: bool = True,
    end_at: str | None = None,
) -> tuple[list[str], list[bool]]:
    """Greedy responses of ``model`` to ``records``, cut at the end-of-turn token and stripped, and for
    each whether it stopped (False: it reached ``max_new_tokens`` without an end-of-turn or eos token).

    A base model writes no end of turn: with ``end_at`` (e.g. ``"\\n"``) a response also ends where its
    text first contains ``end_at`` (it stopped there), and it is not stripped, so the prompt followed by
    the response is exactly the text the model wrote (a prompt_completion record's completion).

    Prompts are batched with left padding (sorted by length, so batches pad little) and generation stops
    at the token that starts the template's end of turn (``<|end|>`` for the demo's template) or at eos.
    ``max_new_tokens`` defaults to the longest reference response plus its end-of-turn tokens;
    prompt-only records have none, so it must be given for them.
    """
    if not records:
        return [], []
    rendered = [prompt_and_stop(r, tokenizer) for r in records]
    if max_new_tokens is None:
        refs = [reference_response(_as_question(r), where="generation record") or "" for r in records]
        if not all(refs):
            raise ValueError("greedy_answers: records without a reference response need max_new_tokens")
        # The longest expected response and its end-of-turn tokens.
        max_new_tokens = 2 + max(len(tokenizer(ref, add_special_tokens=False)["input_ids"]) for ref in refs)
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p, _ in rendered]
    stop_ids = {int(tokenizer.eos_token_id)}
    for _, stop in rendered:
        ids = tokenizer(stop, add_special_tokens=False)["input_ids"]
        if ids:
            stop_ids.add(int(ids[0]))
    pad = int(tokenizer.pad_token_id)

    was_training = model.training
    model.eval()
    order = sorted(range(len(records)), key=lambda i: len(prompts[i]))
    answers: list[str] = [""] * len(records)
    stopped: list[bool] = [False] * len(records)
    starts = range(0, len(order), batch_size)
    for start in tracked(starts, desc, unit="batch", enabled=progress):
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
            text = tokenizer.decode(new[:cut], skip_special_tokens=True)
            if end_at is None:
                answers[i], stopped[i] = text.strip(), cut < len(new)
            else:
                answers[i], found, _ = text.partition(end_at)
                stopped[i] = bool(found) or cut < len(new)
    model.train(was_training)
    return answers, stopped
