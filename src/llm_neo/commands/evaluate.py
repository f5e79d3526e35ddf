"""`llm-neo eval`: held-out CE, perplexity, KL to the teacher and top-1 agreement of a model (across
tokenizers, --cross-tokenizer: the divergence on aligned positions instead)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from llm_neo.config import EvalConfig, validate_eval
from llm_neo.cross_tokenizer import aligned_heldout, read_aligned, refuse_same_tokenizer
from llm_neo.data import read_examples
from llm_neo.eval.metrics import heldout_metrics
from llm_neo.models.loading import (
    check_supported,
    kd_vocab_size,
    load_config,
    load_frozen,
    load_tokenizer,
    load_tokenizers,
    resolve_device,
    resolve_dtype,
)
from llm_neo.provenance import provenance
from llm_neo.report.tables import format_table
from llm_neo.runtime.atomic import atomic_write_json


def run_evaluation(config: EvalConfig) -> int:
    started = time.time()
    metrics = run_eval(config)
    print(format_table({config.model: metrics}, list(metrics)))
    if config.json:
        record = {
            **metrics,
            "provenance": provenance(
                models={"model": config.model, "teacher": config.teacher},
                data={"heldout": config.data},
                started=started,
            ),
        }
        atomic_write_json(Path(config.json), record)
        print(f"\nmetrics written to {config.json}")
    return 0


def run_eval(config: EvalConfig) -> dict[str, float]:
    """`llm-neo eval`: load model (and teacher), read the data as `distill` does, compute the metrics;
    with --cross-tokenizer, the model's own CE and the divergence on aligned positions."""
    validate_eval(config)
    trust = config.trust_remote_code
    for role, path in (("model", config.model), ("teacher", config.teacher)):
        if path:  # refuse what cannot work before any weight loads
            check_supported(load_config(path, trust_remote_code=trust), role=role, trust_remote_code=trust)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    if config.cross_tokenizer:
        return _cross_eval(config, device, dtype)
    tokenizer, teacher_tokenizer = load_tokenizers(
        config.model, config.teacher, role="model", trust_remote_code=trust
    )
    _, examples, _ = read_examples(config.data, tokenizer, config, teacher_tokenizer=teacher_tokenizer)
    model = load_frozen(config, config.model, role="model", dtype=dtype, device=device)
    teacher = None
    if config.teacher:
        teacher = load_frozen(config, config.teacher, role="teacher", dtype=dtype, device=device)
    return heldout_metrics(
        model,
        examples,
        pad_token_id=tokenizer.pad_token_id,
        batch_size=config.batch_size,
        device=device,
        dtype=dtype,
        teacher=teacher,
        kd_vocab_size=kd_vocab_size(tokenizer, model, teacher) if teacher else None,
    )


def _cross_eval(config: EvalConfig, device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """A teacher of another tokenizer: the model's CE and perplexity on its own tokens, and
    ``aligned_kl_to_teacher`` / ``aligned_coverage`` / ``aligned_positions`` computed as a cross-tokenizer
    run's summary.json computes them (cross_tokenizer.aligned_heldout), so the two compare."""
    assert config.teacher and config.cross_tokenizer
    trust = config.trust_remote_code
    tokenizer = load_tokenizer(config.model, role="model", trust_remote_code=trust)
    teacher_tokenizer = load_tokenizer(config.teacher, role="teacher", trust_remote_code=trust)
    refuse_same_tokenizer(tokenizer, teacher_tokenizer, config.cross_tokenizer)
    _, examples, _, cross = read_aligned(
        config.data,
        tokenizer,
        teacher_tokenizer,
        config,
        method=config.cross_tokenizer,
        top_k=config.cross_tokenizer_top_k,
        names=(config.model, config.teacher),
    )
    model = load_frozen(config, config.model, role="model", dtype=dtype, device=device)
    teacher = load_frozen(config, config.teacher, role="teacher", dtype=dtype, device=device)
    common: dict[str, Any] = {
        "pad_token_id": tokenizer.pad_token_id,
        "batch_size": config.batch_size,
        "device": device,
        "dtype": dtype,
    }
    metrics = heldout_metrics(model, examples, None, **common)
    # distill's default --loss-chunk-size: the chunking changes memory, not the value.
    return metrics | aligned_heldout(model, teacher, examples, cross, chunk_size=1024, **common)
