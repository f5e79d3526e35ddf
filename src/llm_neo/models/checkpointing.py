"""Activation checkpointing of the student: every decoder block, and optionally each block's MLP again in
chunks of the sequence (``--mlp-chunks``)."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from llm_neo.errors import ModelError
from llm_neo.models.anatomy import decoder_blocks


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
    _, _, blocks = decoder_blocks(model)
    mlps = [getattr(block, "mlp", None) for block in blocks]
    if not mlps or any(not isinstance(mlp, torch.nn.Module) for mlp in mlps):
        raise ModelError(
            f"--mlp-chunks: the decoder blocks of {type(model).__name__} have no module named 'mlp'; "
            "use --mlp-chunks 1 for this architecture"
        )
    for mlp in mlps:
        assert mlp is not None
        mlp.forward = _chunked_mlp_forward(mlp.forward, mlp_chunks)
    return len(mlps)


def _chunked_mlp_forward(forward: Any, chunks: int) -> Any:
    from torch.utils.checkpoint import checkpoint

    def chunked(hidden: torch.Tensor) -> torch.Tensor:  # [B, T, H] -> [B, T, H]
        if not torch.is_grad_enabled() or hidden.dim() != 3 or hidden.shape[1] < 2:
            return forward(hidden)  # evaluation, or nothing to split
        # Contiguous pieces: a chunk of the sequence of a batch is a strided view, and MLPs that
        # flatten tokens with .view (the mixture-of-experts blocks) refuse one.
        pieces = [piece.contiguous() for piece in hidden.chunk(chunks, dim=1)]
        return torch.cat([checkpoint(forward, piece, use_reentrant=False) for piece in pieces], dim=1)

    return chunked
