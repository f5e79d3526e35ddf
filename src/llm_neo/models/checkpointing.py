"""Activation checkpointing of the student: every decoder block, and optionally each block's MLP again in
chunks of the sequence (``--mlp-chunks``)."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from llm_neo.errors import ModelError


def enable_checkpointing(model: torch.nn.Module, *, mlp_chunks: int = 1) -> int:
    """Gradient checkpointing of every decoder block (non-reentrant), and with ``mlp_chunks`` > 1 of each
    block's MLP in that many chunks of tokens inside it. Returns how many MLPs were split.

    Why the MLP: with block checkpointing the backward's peak is one recomputed block, and most of that
    is the MLP's four [tokens, intermediate] tensors (gate, act(gate), up, their product; at Llama-3.2-1B
    and 8 x 2048 tokens about 1 GiB in bf16). Checkpointing the MLP again, chunk by chunk of the sequence,
    keeps one chunk's worth of them alive, at the cost of a third forward of the MLP. Gradients are
    unchanged: every chunk sees the same weights, and an MLP mixes no positions.
    """
    with warnings.catch_warnings():  # transformers 5 renames it (activation_checkpointing_enable)
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable(  # type: ignore[operator]
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    if mlp_chunks <= 1:
        return 0
    split = 0
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] == "mlp" and ".layers." in f".{name}":
            module.forward = _chunked_mlp_forward(module.forward, mlp_chunks)
            split += 1
    if split == 0:
        raise ModelError(
            "--mlp-chunks: found no decoder-block MLP (a module named 'mlp' inside 'layers') in "
            f"{type(model).__name__}; use --mlp-chunks 1 for this architecture"
        )
    return split


def _chunked_mlp_forward(forward: Any, chunks: int) -> Any:
    from torch.utils.checkpoint import checkpoint

    def chunked(hidden: torch.Tensor) -> torch.Tensor:  # [B, T, H] -> [B, T, H]
        if not torch.is_grad_enabled() or hidden.dim() != 3 or hidden.shape[1] < 2:
            return forward(hidden)  # evaluation, or nothing to split
        pieces = hidden.chunk(chunks, dim=1)
        return torch.cat([checkpoint(forward, piece, use_reentrant=False) for piece in pieces], dim=1)

    return chunked
