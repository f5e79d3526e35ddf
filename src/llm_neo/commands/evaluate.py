"""`llm-neo eval`: held-out CE, perplexity, KL to the teacher and top-1 agreement of a model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llm_neo.config import EvalConfig, validate_eval
from llm_neo.data import check_chat_templates, load_records, tokenize_records
from llm_neo.eval.metrics import heldout_metrics
from llm_neo.models.loading import (
    check_same_vocabulary,
    check_supported,
    freeze,
    kd_vocab_size,
    load_config,
    load_model,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
)
from llm_neo.report.tables import format_table
from llm_neo.runtime.atomic import atomic_write_json


def run_evaluation(config: EvalConfig) -> int:
    metrics = run_eval(config)
    print(format_table({config.model: metrics}, list(metrics)))
    if config.json:
        atomic_write_json(Path(config.json), metrics)
        print(f"\nmetrics written to {config.json}")
    return 0


def run_eval(config: EvalConfig) -> dict[str, float]:
    """`llm-neo eval`: load model (and teacher), read the data as `distill` does, compute the metrics."""
    validate_eval(config)
    trust = config.trust_remote_code
    for role, path in (("model", config.model), ("teacher", config.teacher)):
        if path:  # refuse what cannot work before any weight loads
            check_supported(load_config(path, trust_remote_code=trust), role=role, trust_remote_code=trust)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    tokenizer = load_tokenizer(config.model, role="model", trust_remote_code=config.trust_remote_code)
    records = load_records(config.data)
    teacher = None
    if config.teacher:
        teacher_tokenizer = load_tokenizer(
            config.teacher, role="teacher", trust_remote_code=config.trust_remote_code
        )
        check_same_vocabulary(tokenizer, teacher_tokenizer)
        check_chat_templates(records, tokenizer, teacher_tokenizer, source=config.data)
    examples, _ = tokenize_records(
        records,
        tokenizer,
        max_length=config.max_length,
        train_on_prompt=config.train_on_prompt,
        source=config.data,
    )
    load: dict[str, Any] = {
        "dtype": dtype,
        "device": device,
        "trust_remote_code": config.trust_remote_code,
        "allow_pickle_weights": config.allow_pickle_weights,
    }
    model = freeze(load_model(config.model, role="model", **load))
    if config.teacher:
        teacher = freeze(load_model(config.teacher, role="teacher", **load))
    return heldout_metrics(
        model,
        examples,
        pad_token_id=tokenizer.pad_token_id,
        batch_size=config.batch_size,
        device=device,
        dtype=dtype,
        teacher=teacher,
        progress=True,
        kd_vocab_size=kd_vocab_size(tokenizer, model, teacher) if teacher else None,
    )
