"""Depth pruning: drop the decoder blocks that change their input least, keep the rest as they are.

The paper also distils into a depth-pruned student (Minitron-4B-Depth, a pruned Llama-3.1-8B). This
module makes such a student from any decoder-only model whose blocks live in ``model.model.layers``
(Llama, Qwen, Mistral, Gemma style):

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

import dataclasses
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from llm_neo import __version__
from llm_neo.config import ConfigError, _check_data_path, _check_model_path, _help
from llm_neo.data import collate, load_records, tokenize_records
from llm_neo.eval.metrics import format_table
from llm_neo.models.loading import (
    ModelError,
    autocast,
    load_model,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
)
from llm_neo.runtime.atomic import atomic_directory, atomic_write_json

log = logging.getLogger("llm_neo")

METRICS = ("cosine", "angular")

# Config fields that hold one entry per decoder block and must be cut down with the blocks. Fields
# that hold block *indices* (e.g. Qwen-MoE's mlp_only_layers) would need remapping instead; models
# that have them are refused by _per_layer_fields rather than silently mis-configured.
PER_LAYER_FIELDS = ("layer_types", "no_rope_layers")
INDEX_FIELDS = ("mlp_only_layers",)


@dataclass
class PruneConfig:
    """`llm-neo prune`: depth-prune a causal LM by measured block importance."""

    model: str = field(default="", metadata=_help("Model to prune: a local HF model dir or a hub id."))
    data: str = field(
        default="",
        metadata=_help(
            "Calibration data, in any format `distill` reads (.jsonl/.json/.parquet or a datasets "
            "dir). Every token of the rendered text is scored, prompt included."
        ),
    )
    output: str = field(default="", metadata=_help("Where the pruned model dir (+ tokenizer) is written."))
    keep_layers: int = field(
        default=0,
        metadata=_help("Decoder blocks to keep (required): 1 <= keep-layers < the model's block count."),
    )
    metric: Literal["cosine", "angular"] = field(
        default="cosine",
        metadata=_help(
            "Block importance. cosine: ShortGPT's Block Influence 1 − mean cos(h_in, h_out); angular: "
            "mean arccos(cos(h_in, h_out))/π. The lowest-scoring blocks are dropped."
        ),
    )
    num_samples: int = field(default=64, metadata=_help("Calibration samples (the first N records)."))
    max_length: int = field(
        default=256, metadata=_help("Truncate each calibration sample to this many tokens.")
    )
    batch_size: int = field(default=8, metadata=_help("Calibration batch size."))
    device: str = field(default="auto", metadata=_help("auto, cpu, cuda or cuda:N."))
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto",
        metadata=_help(
            "Compute dtype of the scoring pass. auto: bfloat16 on capable GPUs, else float32. The "
            "saved weights keep the model's published dtype either way."
        ),
    )
    trust_remote_code: bool = field(
        default=False, metadata=_help("Allow model/tokenizer code from the model dir (off: never run it).")
    )
    allow_pickle_weights: bool = field(
        default=False,
        metadata=_help("Allow loading .bin/.pt (pickle) weights; by default only safetensors are loaded."),
    )
    overwrite: bool = field(default=False, metadata=_help("Replace an existing, non-empty --output dir."))


# ------------------------------------------------------------------------------------------------
# Validation


def validate_prune(config: PruneConfig) -> PretrainedConfig | None:
    """Raise ConfigError listing every problem; return the model's HF config when it could be read.

    The upper bound of ``keep_layers`` depends on the model, so the model's config is read here
    (a small JSON file, no weights) and the bound is reported together with the other problems.
    """
    c = config
    p: list[str] = []
    if not c.model:
        p.append("--model is required (a model directory or hub id)")
    _check_model_path(p, "model", c.model)
    _check_data_path(p, c.data)
    if not c.output:
        p.append("--output is required (the directory the pruned model is written to)")
    else:
        out = Path(c.output).expanduser()
        if c.model and out.resolve() == Path(c.model).expanduser().resolve():
            p.append("--output must differ from --model: pruning never replaces the original")
        elif out.exists() and not out.is_dir():
            p.append(f"--output: {c.output!r} is a file; give a directory")
        elif out.is_dir() and any(out.iterdir()) and not c.overwrite:
            p.append(f"--output: {c.output!r} already holds files; pass --overwrite to replace it")
    if c.metric not in METRICS:
        p.append(f"--metric: {c.metric!r} is not one of {', '.join(METRICS)}")
    for name, value, ok, rule in [
        ("num-samples", c.num_samples, c.num_samples >= 1, ">= 1"),
        ("max-length", c.max_length, c.max_length >= 2, ">= 2"),
        ("batch-size", c.batch_size, c.batch_size >= 1, ">= 1"),
    ]:
        if not ok:
            p.append(f"--{name}: {value} is out of range; it must be {rule}")
    if c.keep_layers < 1:
        p.append(f"--keep-layers: {c.keep_layers} is out of range; give the number of blocks to keep (>= 1)")

    hf_config = None
    if c.model and not any(problem.startswith("--model") for problem in p):
        try:
            hf_config = AutoConfig.from_pretrained(c.model, trust_remote_code=c.trust_remote_code)
        except Exception as err:  # OSError, ValueError, JSON errors: all mean "not a readable model"
            p.append(f"--model: could not read the model config from {c.model!r}: {err}")
    if hf_config is not None:
        n = _num_layers(hf_config)
        if n is None:
            p.append(f"--model: {type(hf_config).__name__} has no num_hidden_layers; cannot depth-prune it")
        elif c.keep_layers >= n:
            p.append(
                f"--keep-layers: {c.keep_layers} is out of range; the model has {n} layers, so keep "
                f"between 1 and {n - 1}"
            )
    if p:
        raise ConfigError(p)
    return hf_config


def _num_layers(hf_config: PretrainedConfig) -> int | None:
    n = getattr(hf_config.get_text_config(), "num_hidden_layers", None)
    return n if isinstance(n, int) else None


# ------------------------------------------------------------------------------------------------
# Finding, scoring and dropping blocks


def decoder_layers(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.ModuleList]:
    """``(decoder, layers)``: the base decoder (``model.model``) and its list of blocks.

    The decoder is returned too because scoring runs it directly: it yields the last hidden state
    without the lm_head, whose [tokens × vocab] logits would be most of the memory of the pass.
    """
    decoder = getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    if decoder is None or not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        raise ModelError(
            f"{type(model).__name__}: cannot find its decoder blocks; depth pruning supports causal LMs "
            "that keep them in model.model.layers (Llama, Qwen, Mistral, Gemma style)"
        )
    return decoder, layers


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
    decoder, layers = decoder_layers(model)
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
        for batch in tqdm(batches, desc="scoring blocks", unit="batch", disable=not progress, leave=False):
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
    ``num_hidden_layers`` (the cache is sized from it) and cuts per-block config lists such as
    ``layer_types`` (sliding vs full attention) to the kept blocks.
    """
    decoder, layers = decoder_layers(model)
    n = len(layers)
    indices = sorted(set(keep))
    if not indices or len(indices) != len(keep) or indices[0] < 0 or indices[-1] >= n:
        raise ValueError(f"keep must be distinct block indices in [0, {n - 1}], got {keep}")
    text_config = model.config.get_text_config()
    per_layer = _per_layer_fields(text_config, n, type(model).__name__)

    decoder.layers = torch.nn.ModuleList([layers[i] for i in indices])
    for new_index, layer in enumerate(decoder.layers):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                setattr(module, "layer_idx", new_index)  # noqa: B010 (mypy: Module attrs are Tensor/Module)
    text_config.num_hidden_layers = len(indices)
    for name in per_layer:
        values = getattr(text_config, name)
        setattr(text_config, name, [values[i] for i in indices])
    return model


def _per_layer_fields(text_config: PretrainedConfig, n: int, model_name: str) -> list[str]:
    for name in INDEX_FIELDS:
        if getattr(text_config, name, None):
            raise ModelError(
                f"{model_name}: its config field {name} lists block indices, which depth pruning does not "
                "remap yet; prune a model without it"
            )
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


# ------------------------------------------------------------------------------------------------
# The command


def run_prune(config: PruneConfig) -> dict[str, Any]:
    """`llm-neo prune`: validate, load, score, choose, prune, save atomically; print and return a report.

    The report (also ``<output>/pruning.json``) holds the scores of every block, the kept and dropped
    indices, parameter counts before and after, and the calibration sample and token counts.
    Nothing is written unless every step before the save succeeded.
    """
    hf_config = validate_prune(config)
    assert hf_config is not None
    out = Path(config.output).expanduser()
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)

    # --- Calibration data: the first num_samples records, every token scored (prompt included).
    tokenizer = load_tokenizer(config.model, role="model", trust_remote_code=config.trust_remote_code)
    records = load_records(config.data)[: config.num_samples]
    examples, _ = tokenize_records(
        records, tokenizer, max_length=config.max_length, train_on_prompt=True, source=config.data
    )
    # Longest first: similar lengths share a batch (less padding), and an out-of-memory shows at once.
    examples = sorted(examples, key=lambda ex: -len(ex.input_ids))
    batches = [
        collate(examples[i : i + config.batch_size], tokenizer.pad_token_id)
        for i in range(0, len(examples), config.batch_size)
    ]
    calibration_tokens = sum(int(b["attention_mask"].sum()) for b in batches)

    # --- Model. The saved weights must be the original ones, bit for bit, in the published dtype. So
    # the model loads in that dtype when it is the compute dtype; otherwise in fp32, which any
    # half-precision weight round-trips through exactly, and scores under autocast.
    published = _published_dtype(hf_config)
    load_dtype = dtype if dtype == published else torch.float32
    model = load_model(
        config.model,
        role="model",
        dtype=load_dtype,
        device=device,
        trust_remote_code=config.trust_remote_code,
        allow_pickle_weights=config.allow_pickle_weights,
    )
    num_layers = len(decoder_layers(model)[1])
    parameters_before = count_parameters(model)
    log.info(
        "scoring %d blocks of %s on %d samples (%d tokens), metric %s",
        num_layers,
        config.model,
        len(examples),
        calibration_tokens,
        config.metric,
    )
    scores = block_importance(model, batches, device=device, dtype=dtype, metric=config.metric, progress=True)
    kept = choose_layers(scores, config.keep_layers)
    dropped = [i for i in range(num_layers) if i not in kept]
    prune_layers(model, kept)
    parameters_after = count_parameters(model)

    report: dict[str, Any] = {
        "llm_neo_version": __version__,
        "model": config.model,
        "metric": config.metric,
        "num_layers_before": num_layers,
        "num_layers_after": len(kept),
        "scores": scores,
        "kept_layers": kept,
        "dropped_layers": dropped,
        "parameters_before": parameters_before,
        "parameters_after": parameters_after,
        "calibration_samples": len(examples),
        "calibration_tokens": calibration_tokens,
        "output": str(out),
        "config": dataclasses.asdict(config),
    }
    with atomic_directory(out) as tmp:
        torch.nn.Module.to(model, published)  # the plain cast; HF's typed wrapper of .to confuses mypy
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / "pruning.json", report)

    print(_blocks_table(scores, kept))
    print(
        f"\nkept {len(kept)} of {num_layers} blocks (dropped {dropped}); parameters "
        f"{parameters_before:,} -> {parameters_after:,} "
        f"({100 * (1 - parameters_after / parameters_before):.1f}% fewer); saved to {out}"
    )
    return report


def _published_dtype(hf_config: PretrainedConfig) -> torch.dtype:
    """The dtype the weights were published in (fp32 when the config does not say)."""
    dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def _blocks_table(scores: list[float], kept: list[int]) -> str:
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    rank = {block: r for r, block in enumerate(order, start=1)}
    rows = {
        f"block {i}": {"score": s, "rank": rank[i], "status": "kept" if i in kept else "dropped"}
        for i, s in enumerate(scores)
    }
    return format_table(rows, ["score", "rank", "status"])
