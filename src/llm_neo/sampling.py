"""The student's own responses to the data's prompts: what on-policy distillation trains on.

A training example's prompt is everything before its last trained run of tokens (the final response, as
``data`` labels it), so a sample answers the prompt exactly as training renders it. Responses are drawn
with the model's KV cache under ``torch.inference_mode()``, seeded, and stop at an end-of-turn token
(the tokenizer's eos, or the special token that ends the data's responses: the chat template's) or at
a cap. ``distill`` calls it per on-policy micro-batch; anything that needs student samples (a cache of
them) can call ``sample_responses`` the same way.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from llm_neo.data import Example
from llm_neo.losses import IGNORE_INDEX


def response_start(example: Example) -> int:
    """Where ``example``'s final response starts: the first position of its last run of trained labels
    (earlier assistant turns of a conversation stay in the prompt, as the reference context)."""
    labels = example.labels
    end = max(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return start


def longest_response(examples: Sequence[Example]) -> int:
    """The longest final response of ``examples`` in tokens: the default cap of a sampled response."""
    return max((len(ex.labels) - response_start(ex) for ex in examples), default=1)


def stop_token_ids(tokenizer: Any, examples: Sequence[Example]) -> list[int]:
    """The tokens that end a response: the tokenizer's eos, and the last special token of each final
    response in the data (the chat template's end of turn, ``<|im_end|>``, which is not always eos).

    Special means either of the tokenizer's two registers: its named special tokens (eos, pad, ...) and
    the added tokens flagged special, where a template's end of turn can sit without being named (the
    demo's ``<|end|>``); missing it, every sample ran to its cap."""
    added = getattr(tokenizer, "added_tokens_decoder", {})
    special = set(tokenizer.all_special_ids) | {int(i) for i, token in added.items() if token.special}
    stops = {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set()
    for ex in examples:
        response = ex.input_ids[response_start(ex) :]
        last = next((t for t in reversed(response) if t in special), None)
        if last is not None:
            stops.add(int(last))
    return sorted(stops)


def seed_of(*parts: int) -> int:
    """A 63-bit seed from integers (the run's seed, the step, the micro-batch, the rank): the same parts
    give the same seed in every process and on every resume, different parts unrelated ones."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass(frozen=True)
class Sampling:
    """How responses are drawn: temperature (0: greedy), top-p, the stop tokens, the padding id."""

    temperature: float
    top_p: float
    stop_ids: tuple[int, ...]
    pad_id: int
    synced: bool = False  # FSDP2: every rank runs the same number of decoding steps (else a hang)


@dataclass(frozen=True)
class Response:
    """One sampled response: its tokens (the end-of-turn token included when it stopped) and whether it
    ended at an end-of-turn token (False: it hit its cap)."""

    tokens: list[int]
    ended: bool


def sample_responses(
    model: Any,
    prompts: Sequence[Sequence[int]],
    caps: Sequence[int],
    sampling: Sampling,
    *,
    seed: int,
    device: torch.device,
) -> list[Response]:
    """One response of ``model`` per prompt, at most ``caps[i]`` (>= 1) tokens long, drawn with torch's
    RNG seeded with ``seed`` (forked: the caller's RNG state is left as it was).

    The prompts are left-padded into one batch and decoded by ``model.generate`` with the KV cache,
    under ``torch.inference_mode()`` (``no_grad`` when ``sampling.synced``: FSDP2), in eval mode (no
    dropout: the policy sampled is the one that will be deployed; the mode is restored after). Each row
    is cut after its first stop token or at its own cap.
    """
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), sampling.pad_id, dtype=torch.long)  # [B, T], left-padded
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)  # [B, T]
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
        attention_mask[row, width - len(prompt) :] = 1
    greedy = sampling.temperature == 0
    options: dict[str, Any] = (
        {"do_sample": False}
        if greedy
        else {
            "do_sample": True,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "top_k": 0,  # no top-k cut besides top-p (generation_config may carry one)
        }
    )
    was_training = model.training
    model.eval()
    devices = [device] if device.type == "cuda" else []
    try:
        # Under FSDP2 no_grad, not inference mode: the all-gathered weight buffers FSDP2 reuses in the
        # training forward must not become inference tensors (an in-place update of one is refused).
        grad_off = torch.no_grad() if sampling.synced else torch.inference_mode()
        with torch.random.fork_rng(devices=devices), grad_off:
            torch.manual_seed(seed)
            out = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=max(caps),
                min_new_tokens=0,
                eos_token_id=list(sampling.stop_ids),
                pad_token_id=sampling.pad_id,
                use_cache=True,
                synced_gpus=sampling.synced,
                **options,
            )  # [B, T + new]
    finally:
        model.train(was_training)
    responses = []
    for row, cap in enumerate(caps):
        new = out[row, width : width + cap].tolist()
        stop = next((k for k, t in enumerate(new) if t in sampling.stop_ids), None)
        responses.append(Response(new if stop is None else new[: stop + 1], stop is not None))
    return responses


def response_example(prompt: Sequence[int], response: Response, index: int = -1) -> Example:
    """The training example of a sampled response: the prompt (not trained) and the response (trained:
    the divergence is computed on exactly the generated tokens)."""
    return Example(
        input_ids=[*prompt, *response.tokens],
        labels=[IGNORE_INDEX] * len(prompt) + list(response.tokens),
        index=index,
    )
