"""`llm-neo prune`: depth-prune a model by measured block importance (see llm_neo.models.prune) and save
it as a standard model directory with its tokenizer and pruning.json."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import PretrainedConfig

from llm_neo import __version__
from llm_neo.config import LoadOptions, check_data_path, check_model_path
from llm_neo.data import collate, load_records, tokenize_records
from llm_neo.errors import ConfigError, ModelError
from llm_neo.models.anatomy import decoder_blocks, num_layers
from llm_neo.models.loading import (
    check_supported,
    load_config,
    load_frozen,
    load_tokenizer,
    published_dtype,
    resolve_device,
    resolve_dtype,
)
from llm_neo.models.prune import (
    METRICS,
    block_importance,
    check_prunable,
    choose_layers,
    count_parameters,
    prune_layers,
)
from llm_neo.options import option_help
from llm_neo.report.tables import format_table
from llm_neo.runtime.atomic import atomic_write_json
from llm_neo.runtime.lock import releases_locks
from llm_neo.runtime.rundir import check_replaced_dir, hold, marked_directory, output_path_problems

log = logging.getLogger("llm_neo")


@dataclass
class PruneConfig(LoadOptions):
    """`llm-neo prune`: depth-prune a causal LM by measured block importance."""

    model: str = field(
        default="", metadata=option_help("Model to prune: a local HF model dir, a hub id or a .gguf file.")
    )
    data: str = field(
        default="",
        metadata=option_help(
            "Calibration data, in any format `distill` reads (.jsonl/.json/.parquet or a datasets "
            "dir). Every token of the rendered text is scored, prompt included."
        ),
    )
    output: str = field(
        default="", metadata=option_help("Where the pruned model dir (+ tokenizer) is written.")
    )
    keep_layers: int = field(
        default=0,
        metadata=option_help(
            "Decoder blocks to keep (required): 1 <= keep-layers < the model's block count."
        ),
    )
    metric: Literal["cosine", "angular"] = field(
        default="cosine",
        metadata=option_help(
            "Block importance. cosine: ShortGPT's Block Influence 1 − mean cos(h_in, h_out); angular: "
            "mean arccos(cos(h_in, h_out))/π. The lowest-scoring blocks are dropped."
        ),
    )
    num_samples: int = field(default=64, metadata=option_help("Calibration samples (the first N records)."))
    max_length: int = field(
        default=256, metadata=option_help("Truncate each calibration sample to this many tokens.")
    )
    batch_size: int = field(default=8, metadata=option_help("Calibration batch size."))
    overwrite: bool = field(
        default=False, metadata=option_help("Replace an existing, non-empty --output dir.")
    )


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
    check_model_path(p, "model", c.model)
    check_data_path(p, c.data)
    if not c.output:
        p.append("--output is required (the directory the pruned model is written to)")
    elif c.model and Path(c.output).expanduser().resolve() == Path(c.model).expanduser().resolve():
        p.append("--output must differ from --model: pruning never replaces the original")
    else:
        out = Path(c.output).expanduser()
        p += output_path_problems(out, "--output")  # a dangling link: before any model loads
        if refused := check_replaced_dir(
            out, "prune", flag="--output", overwrite=c.overwrite, shown=c.output, record="pruning.json"
        ):
            p.append(refused)
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
            hf_config = load_config(c.model, trust_remote_code=c.trust_remote_code)
            check_supported(hf_config, role="model", trust_remote_code=c.trust_remote_code)
            check_prunable(hf_config, type(hf_config).__name__)
        except ModelError as err:
            p.append(f"--model: {err}")
    if hf_config is not None:
        n = num_layers(hf_config)
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


@releases_locks
def run_prune(config: PruneConfig) -> dict[str, Any]:
    """`llm-neo prune`: validate, load, score, choose, prune, save atomically; print and return a report.

    The report (also ``<output>/pruning.json``) holds the scores of every block, the kept and dropped
    indices, parameter counts before and after, and the calibration sample and token counts.
    Nothing is written unless every step before the save succeeded.
    """
    if config.output:  # before the check: no other process writes there from now on
        hold(Path(config.output), "prune", "--output")
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
    published = published_dtype(hf_config)
    load_dtype = dtype if dtype == published else torch.float32
    model = load_frozen(config, config.model, role="model", dtype=load_dtype, device=device)
    num_layers = len(decoder_blocks(model)[2])
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
    with marked_directory(out, "prune") as tmp:
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


def _blocks_table(scores: list[float], kept: list[int]) -> str:
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    rank = {block: r for r, block in enumerate(order, start=1)}
    rows = {
        f"block {i}": {"score": s, "rank": rank[i], "status": "kept" if i in kept else "dropped"}
        for i, s in enumerate(scores)
    }
    return format_table(rows, ["score", "rank", "status"])
