"""A causal LM's anatomy, the one place that knows where the families keep their parts.

Where the families differ (blocks in ``model.layers``, ``transformer.h`` or ``gpt_neox.layers``; Conv1D
or Linear projections; tied or untied heads; soft-capped logits), the functions here find: the base
decoder and its blocks, the final hidden states, the output head (lm_head) with its weight, width and
soft-cap, and the linear layers LoRA adapts by default. They work through PEFT wrappers, on quantized
models (the head is never quantized) and on FSDP2-sharded ones (``fully_shard`` keeps the classes'
methods). Loading, LoRA, quantization, pruning, export, evaluation and the distillation step ask here.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, cast

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.pytorch_utils import Conv1D

from llm_neo.errors import ModelError
from llm_neo.losses.objective import softcap

# ------------------------------------------------------------------------------------------------
# The families

# model_type of every family the test matrix (tests/models/test_families.py) runs through every arm,
# prune, cache-teacher and eval; others that transformers loads as a causal LM are tried, with a warning.
TESTED_MODEL_TYPES = (
    "llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text", "phi3", "olmo2", "gpt2", "gpt_neox",
    "qwen3_moe",
)  # fmt: skip

# Families whose blocks PEFT refuses to put LoRA on in part (out_proj, conv1d of a Mamba mixer).
STATE_SPACE_MODEL_TYPES = ("mamba", "mamba2", "falcon_mamba", "falcon_h1", "nemotron_h")


# ------------------------------------------------------------------------------------------------
# The decoder and its blocks

# Attribute names under which the families keep their list of decoder blocks: model.layers (Llama,
# Qwen, Mistral, Gemma, Phi-3, OLMo), transformer.h (GPT-2, GPT-J, Falcon, BLOOM), gpt_neox.layers
# (GPT-NeoX / Pythia), blocks (some remote-code models).
BLOCK_LISTS = ("layers", "h", "blocks")


def decoder(model: torch.nn.Module) -> torch.nn.Module:
    """The base decoder (embeddings, blocks, final norm; no lm_head), through PEFT wrappers too."""
    get = getattr(model, "get_decoder", None)
    found = get() if callable(get) else None
    # PreTrainedModel.get_decoder returns the model itself when it finds no base model.
    if not isinstance(found, torch.nn.Module) or found is model:
        raise ModelError(
            f"{type(model).__name__}: cannot find its base decoder (get_decoder() gives "
            f"{type(found).__name__}); llm-neo needs a causal LM made of a base model and an lm_head"
        )
    return found


def decoder_blocks(model: torch.nn.Module) -> tuple[torch.nn.Module, str, torch.nn.ModuleList]:
    """``(decoder, attribute, blocks)``: the base decoder, the name of its block list and the list.

    Looks for the ``BLOCK_LISTS`` names first, then for the decoder's only non-empty ModuleList child.
    Raises ModelError naming the decoder's children when there is no such list.
    """
    base = decoder(model)
    for name in BLOCK_LISTS:
        blocks = getattr(base, name, None)
        if isinstance(blocks, torch.nn.ModuleList) and len(blocks) > 0:
            return base, name, blocks
    lists = [(n, m) for n, m in base.named_children() if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
    if len(lists) == 1:
        return base, lists[0][0], lists[0][1]
    children = ", ".join(n for n, _ in base.named_children())
    raise ModelError(
        f"{type(model).__name__}: cannot find its decoder blocks (a ModuleList named "
        f"{' or '.join(BLOCK_LISTS)} in {type(base).__name__}, whose children are: {children})"
    )


def num_layers(hf_config: PretrainedConfig) -> int | None:
    """The number of decoder blocks a config declares (None when it declares none)."""
    n = getattr(hf_config.get_text_config(), "num_hidden_layers", None)
    return n if isinstance(n, int) else None


def final_hidden_states(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """[B, T, H] hidden states after the final norm: the lm_head's input (works through PEFT wrappers)."""
    return decoder(model)(
        input_ids=input_ids, attention_mask=attention_mask, use_cache=False
    ).last_hidden_state


# ------------------------------------------------------------------------------------------------
# The output head


def _declared_head(model: nn.Module) -> object:
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def find_output_head(model: nn.Module) -> nn.Module | None:
    """The module whose output is the logits (the lm_head), or None when the model has none with a weight.

    The one lookup of the head: ``get_output_embeddings()``, which PEFT forwards to the wrapped model (a
    LoRA-wrapped head is the LoRA layer, whose ``weight`` is the base weight), which quantization leaves
    alone (the head is never quantized), which FSDP2 leaves whole (``runtime.distributed.shard`` is handed
    it), and which for tied models gives the head whose weight *is* the input embedding matrix.
    """
    head = _declared_head(model)
    if isinstance(head, nn.Module) and isinstance(getattr(head, "weight", None), torch.Tensor):
        return head
    return None


def output_head(model: nn.Module) -> nn.Module:
    """``find_output_head``, or ModelError when the model has no lm_head with a weight."""
    head = find_output_head(model)
    if head is None:
        raise ModelError(
            f"{type(model).__name__}: get_output_embeddings() gives no lm_head with a weight "
            f"({type(_declared_head(model)).__name__}); llm-neo computes the logits from it chunk by chunk"
        )
    return head


def fsdp_parts(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.ModuleList, torch.nn.Module]:
    """The base decoder and its list of blocks, which FSDP2 shards, and the lm_head it keeps whole
    (``runtime.distributed.shard``'s arguments; distill and cache-teacher shard their models so)."""
    decoder, _, layers = decoder_blocks(model)
    return decoder, layers, output_head(model)


def model_logits(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The model's lm_head on ``hidden`` [n, H] -> [n, V], with Gemma-style soft-capping where configured."""
    return softcap(output_head(model)(hidden), logit_softcap(model))


def lm_head(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The lm_head's weight [V, H] and bias [V] (None without one): what the chunked loss multiplies."""
    head = output_head(model)
    return cast(torch.Tensor, head.weight), getattr(head, "bias", None)


def logit_width(model: torch.nn.Module) -> int:
    """Logit columns: the lm_head's rows (the vocabulary with any padding), else the config's vocab_size."""
    head = find_output_head(model)
    if head is not None:
        return int(cast(torch.Tensor, head.weight).shape[0])
    config: Any = model.config
    return int(config.vocab_size)


def logit_softcap(model: torch.nn.Module | None) -> float | None:
    """Gemma-style final logit soft-capping, which the chunked path must apply as the model's forward does."""
    config = getattr(model, "config", None)
    return final_logit_softcap(config) if config is not None else None


def final_logit_softcap(hf_config: PretrainedConfig) -> float | None:
    """The soft-cap a config sets on the final logits (Gemma 2/3's ``final_logit_softcapping``), or None."""
    get_text = getattr(hf_config, "get_text_config", None)
    text = get_text() if callable(get_text) else hf_config
    return getattr(text, "final_logit_softcapping", None)


# ------------------------------------------------------------------------------------------------
# The linear layers LoRA adapts

# The layers LoRA adapts: nn.Linear, and transformers' Conv1D (GPT-2 and its descendants), a linear
# layer whose weight is stored transposed ([in, out]); PEFT handles it with fan_in_fan_out=True.
LINEAR_TYPES = (nn.Linear, Conv1D)


def linear_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if isinstance(module, LINEAR_TYPES) and name:
            yield name, module


def default_target_modules(model: nn.Module) -> list[str]:
    """Leaf names of every linear layer (``nn.Linear`` or ``Conv1D``) inside the transformer blocks (sorted,
    unique).

    "Inside a block" means the module path has a numeric component (``model.layers.3.mlp.up_proj``): blocks
    live in a ``ModuleList``. The output embeddings (``model.get_output_embeddings()``, i.e. lm_head) are
    excluded by identity and by name, as are embeddings (not linear anyway). This is LLM-Neo's default:
    LoRA on q, k, v, o, gate, up, down for a Llama; c_attn, c_proj, c_fc for GPT-2; query_key_value,
    dense, dense_h_to_4h, dense_4h_to_h for GPT-NeoX. Mixture-of-experts blocks of transformers 5 keep
    their routed experts as fused 3-D parameters, not linear layers, so the default adapts their
    attention (and a shared expert's MLP where the family has one); the routed experts and the router
    stay frozen. Raises ModelError if the model has no such layer.
    """
    head = find_output_head(model)
    output_names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if m is head}
    leaves: set[str] = set()
    for name, module in linear_modules(model):
        if module is head:
            continue
        parts = name.split(".")
        if any(part.isdigit() for part in parts[:-1]):
            leaves.add(parts[-1])
    # A leaf name shared with the output layer would make PEFT (suffix matching) wrap lm_head too.
    leaves -= output_names
    if not leaves:
        raise ModelError(
            f"{type(model).__name__} has no nn.Linear or Conv1D inside numbered blocks; pass target_modules "
            "explicitly "
            f"(linear layers found: {available_linear_leaves(model)})"
        )
    return sorted(leaves)


def available_linear_leaves(model: nn.Module) -> list[str]:
    return sorted({name.rsplit(".", 1)[-1] for name, _ in linear_modules(model)})
