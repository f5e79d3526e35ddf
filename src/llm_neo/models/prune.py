"""Depth pruning: drop the decoder blocks that change their input least, keep the rest as they are.

The paper also distils into a depth-pruned student (Minitron-4B-Depth, a pruned Llama-3.1-8B). This
module makes such a student from any decoder-only model whose blocks ``decoder_blocks`` finds
(``model.layers``: Llama, Qwen, Mistral, Gemma, Phi-3, OLMo; ``transformer.h``: GPT-2;
``gpt_neox.layers``: Pythia):

    score   run calibration text through the model; for block i, with h_in its input hidden state
            and h_out its output, both taken from forward hooks on the block itself:
              cosine   Block Influence (ShortGPT): BI_i = 1 − mean_tokens cos(h_in, h_out), in [0, 2]
              angular  mean_tokens arccos(cos(h_in, h_out)) / π, in [0, 1]
            means over real (non-padding) tokens, accumulated in fp32 over the whole calibration set
    choose  keep the ``keep_layers`` highest-scoring blocks, in their original order
    prune   drop the others, renumber what the KV cache indexes by, fix the config
    save    a standard Hugging Face model dir (safetensors) + tokenizer + pruning.json, atomically

A block with a score near 0 is close to the identity on this data, so removing it changes the
model's output least. The kept blocks are untouched: the pruned model is the start of a distillation
run (``llm-neo distill --student <output> ...``), not a finished model.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PretrainedConfig, PreTrainedModel

from llm_neo.errors import ModelError
from llm_neo.models.anatomy import decoder_blocks
from llm_neo.models.loading import autocast

log = logging.getLogger("llm_neo")

METRICS = ("cosine", "angular")

# Config fields that hold one entry per decoder block and must be cut down with the blocks.
PER_LAYER_FIELDS = ("layer_types", "no_rope_layers")
# Config fields that make a block's structure depend on its index in ways the surgery does not
# remap; a model that sets them is refused rather than saved mis-configured (it would not reload,
# or would compute something else). Qwen-MoE's mlp_only_layers / decoder_sparse_step are remapped
# (see _sparse_blocks); GPT-2's scale_attn_by_inverse_layer_idx scales attention by 1/(index + 1).
INDEX_FIELDS = {
    "first_k_dense_replace": "the first k blocks are dense, the rest mixtures of experts (DeepSeek, "
    "GLM-4-MoE)",
    "scale_attn_by_inverse_layer_idx": "attention is scaled by 1/(block index + 1), so a renumbered block "
    "would compute something else",
}


# ------------------------------------------------------------------------------------------------
# Finding, scoring and dropping blocks


@torch.inference_mode()
def block_importance(
    model: torch.nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    device: torch.device,
    dtype: torch.dtype,
    metric: str = "cosine",
    progress: bool = False,
) -> list[float]:
    """One importance score per decoder block, in block order (see the module docstring).

    ``batches`` are ``collate`` outputs (``input_ids`` and ``attention_mask``, [B, T]); padding
    positions (mask 0) are left out of the means. Each block's input and output are taken with
    forward hooks on the block, not from ``output_hidden_states``: in transformers the last entry
    of that tuple is the final-norm output, not the last block's, which would mis-score the last
    block. Raises ValueError when no token was scored or a score is not finite.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    # The decoder is run directly: it yields the last hidden state without the lm_head, whose
    # [tokens × vocab] logits would be most of the memory of the pass.
    decoder, _, layers = decoder_blocks(model)
    sums = torch.zeros(len(layers), dtype=torch.float64)  # per block: Σ over real tokens of the metric
    tokens = 0
    mask: torch.Tensor | None = None  # [B, T] bool of the batch in flight, read by the hooks

    def hook(index: int) -> Any:
        def record(
            module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
        ) -> None:
            h_in = args[0] if args else kwargs["hidden_states"]  # [B, T, H]
            h_out = output[0] if isinstance(output, tuple) else output  # [B, T, H]
            assert mask is not None
            # fp32: in bf16 a cosine near 1 rounds to exactly 1 and near-identity blocks all tie at 0.
            cos = F.cosine_similarity(h_in[mask].float(), h_out[mask].float(), dim=-1).clamp(-1.0, 1.0)
            per_token = 1.0 - cos if metric == "cosine" else torch.arccos(cos) / math.pi  # [N]
            sums[index] += per_token.sum(dtype=torch.float64).cpu()

        return record

    was_training = model.training
    model.eval()
    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        for batch in tqdm(
            batches, desc="scoring blocks", unit="batch", disable=None if progress else True, leave=False
        ):
            attention_mask = batch["attention_mask"].to(device)  # [B, T]
            mask = attention_mask.bool()
            with autocast(device, dtype):
                decoder(
                    input_ids=batch["input_ids"].to(device), attention_mask=attention_mask, use_cache=False
                )
            tokens += int(mask.sum())
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if tokens == 0:
        raise ValueError("no calibration tokens: every batch was padding")
    scores = (sums / tokens).tolist()
    bad = [i for i, s in enumerate(scores) if not math.isfinite(s)]
    if bad:
        raise ValueError(
            f"non-finite importance scores for blocks {bad} (overflow in the compute dtype); "
            "score with --dtype float32"
        )
    return scores


def choose_layers(scores: list[float], keep: int) -> list[int]:
    """Indices of the ``keep`` highest-scoring blocks, ascending (ties keep the earlier block)."""
    if not 1 <= keep <= len(scores):
        raise ValueError(f"keep must be in [1, {len(scores)}], got {keep}")
    ranked = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(ranked[:keep])


def prune_layers(model: PreTrainedModel, keep: list[int]) -> PreTrainedModel:
    """Keep only blocks ``keep`` (original indices, kept in ascending order), in place; return ``model``.

    Besides the block list this renumbers every ``layer_idx`` (attention modules address the KV
    cache by it, so a gap would index past the cache or share another block's slot), sets
    ``num_hidden_layers`` (the cache is sized from it), cuts per-block config lists such as
    ``layer_types`` (sliding vs full attention) to the kept blocks, and rewrites Qwen-MoE's
    ``mlp_only_layers`` / ``decoder_sparse_step`` so each kept block is rebuilt dense or sparse as it is.
    """
    base, attribute, layers = decoder_blocks(model)
    n = len(layers)
    indices = sorted(set(keep))
    if not indices or len(indices) != len(keep) or indices[0] < 0 or indices[-1] >= n:
        raise ValueError(f"keep must be distinct block indices in [0, {n - 1}], got {keep}")
    text_config = model.config.get_text_config()
    per_layer = _per_layer_fields(text_config, n, type(model).__name__)
    sparse = _sparse_blocks(text_config, n)

    setattr(base, attribute, torch.nn.ModuleList([layers[i] for i in indices]))
    for new_index, layer in enumerate(getattr(base, attribute)):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                setattr(module, "layer_idx", new_index)  # noqa: B010 (mypy: Module attrs are Tensor/Module)
    text_config.num_hidden_layers = len(indices)
    for name in per_layer:
        values = getattr(text_config, name)
        setattr(text_config, name, [values[i] for i in indices])
    if sparse is not None:
        text_config.decoder_sparse_step = 1
        text_config.mlp_only_layers = [j for j, i in enumerate(indices) if not sparse[i]]
    return model


def _sparse_blocks(text_config: PretrainedConfig, n: int) -> list[bool] | None:
    """Which blocks are mixtures of experts, for configs that place them by index (Qwen2-MoE, Qwen3-MoE:
    block i is sparse iff i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0); else None."""
    step = getattr(text_config, "decoder_sparse_step", None)
    if not isinstance(step, int):
        return None
    dense = set(getattr(text_config, "mlp_only_layers", None) or [])
    experts = getattr(text_config, "num_experts", 0) or 0
    return [i not in dense and experts > 0 and (i + 1) % step == 0 for i in range(n)]


def check_prunable(hf_config: PretrainedConfig, model_name: str) -> None:
    """Raise ModelError when the config makes blocks depend on their index in a way pruning cannot remap
    (read from the config alone, so ``llm-neo prune`` refuses before loading any weight)."""
    text_config = hf_config.get_text_config()
    for name, why in INDEX_FIELDS.items():
        if getattr(text_config, name, None):
            raise ModelError(
                f"{model_name}: its config sets {name} ({why}); depth pruning does not remap it, so it "
                "cannot prune this model"
            )


def _per_layer_fields(text_config: PretrainedConfig, n: int, model_name: str) -> list[str]:
    check_prunable(text_config, model_name)
    fields = []
    for name in PER_LAYER_FIELDS:
        values = getattr(text_config, name, None)
        if values is None:
            continue
        if not isinstance(values, list) or len(values) != n:
            raise ModelError(
                f"{model_name}: config field {name} should hold one entry per block ({n}), got {values!r}"
            )
        fields.append(name)
    return fields


def count_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (a tied embedding / lm_head counts once)."""
    return sum(p.numel() for p in model.parameters())
