"""One step run in this process: the random models built on the device, a few `train_step`s, measured."""

from __future__ import annotations

import copy
import dataclasses
import gc
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from llm_neo.choices import METHODS
from llm_neo.commands.bench.runs import RunSpec
from llm_neo.runtime.memory import LiveTensorBytes, cpu_allocator_policy, peak_rss_bytes, rss_bytes

# ----------------------------------------------------------------------------------------------------
# Measuring one run


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model (from /proc/cpuinfo) and its core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores)"


def build_model(config: Any, dtype: torch.dtype, device: torch.device) -> Any:
    from transformers import AutoModelForCausalLM

    # Directly on the device in the target dtype (an 8B model never passes through the CPU); a copy of
    # the config because from_config records the dtype on it.
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=dtype)
    model.config.use_cache = False
    return model


def teacher_config(shape: Any, cross_tokenizer: str | None) -> Any:
    """The teacher's config: the shape's, or, for a same-tokenizer run on a shape of two tokenizers, the
    same model at the student's vocabulary (the run the cross-tokenizer ones are set against)."""
    if not shape.cross or cross_tokenizer:
        return shape.teacher
    config = copy.deepcopy(shape.teacher)
    config.vocab_size = shape.student.vocab_size
    return config


def step_batch(
    spec: RunSpec, shape: Any, device: torch.device
) -> tuple[dict[str, torch.Tensor], Any, dict[str, Any]]:
    """The step's micro-batch on ``device``, its CrossPair (None: one tokenizer) and what the result
    records of it: random student tokens, or (``spec.cross_tokenizer``) text both tokenizers read
    (``bench.cross``) with the teacher's length and the aligned positions."""
    if spec.cross_tokenizer:
        from llm_neo.commands.bench.cross import cross_batch_of

        found = cross_batch_of(spec, shape.student.vocab_size, shape.teacher.vocab_size)
        info = {"teacher_seq_len": found.teacher_seq_len, "kd_positions": found.kd_positions}
        # the teacher's side stays where the loss moves it (cross_tokenizer.cross_targets)
        return {k: v.to(device) for k, v in found.batch.items()}, found.pair, info
    generator = torch.Generator().manual_seed(spec.seed)
    ids = torch.randint(0, shape.student.vocab_size, (spec.batch_size, spec.seq_len), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    return {k: v.to(device) for k, v in batch.items()}, None, {}


def run_one(spec: RunSpec) -> dict[str, Any]:
    """Build the models of ``spec``, run its steps through ``train_step``, measure; returns a result dict.

    An out-of-memory error is caught and reported (``status: "oom"``), not raised.
    """
    from llm_neo.commands.shapes import get_shape
    from llm_neo.distill import StepSettings, train_step
    from llm_neo.losses import LossOptions
    from llm_neo.models.checkpointing import enable_checkpointing
    from llm_neo.models.loading import freeze, resolve_device, resolve_dtype
    from llm_neo.models.lora import attach_lora, trainable_parameters
    from llm_neo.models.quant import quantize_teacher, weight_storages

    baseline_rss = rss_bytes()
    device = resolve_device(spec.device)
    if device.type == "cpu" and spec.memory == "rss":  # a run's own process: as llm-neo distill runs
        cpu_allocator_policy()
    dtype = resolve_dtype(spec.dtype, device)
    shape = get_shape(spec.shape)
    lora = METHODS[spec.method].lora
    kd = METHODS[spec.method].kd and spec.kd_ratio > 0
    result: dict[str, Any] = {"run": spec.name, "spec": dataclasses.asdict(spec), "status": "ok"}
    result["baseline_rss_bytes"] = baseline_rss
    tracker: LiveTensorBytes | None = None
    threads = torch.get_num_threads()
    if spec.num_threads > 0:
        torch.set_num_threads(spec.num_threads)
    try:
        torch.manual_seed(spec.seed)
        teacher = (
            freeze(build_model(teacher_config(shape, spec.cross_tokenizer), dtype, device)) if kd else None
        )
        if teacher is not None and spec.teacher_quant != "none":
            # In place, right after it is built: as llm-neo distill quantizes the dense teacher it loads.
            teacher, result["teacher_quant"] = quantize_teacher(teacher, spec.teacher_quant)
        # Full-parameter arms keep fp32 master weights (autocast computes in `dtype`), LoRA arms keep the
        # frozen base in `dtype` and fp32 adapters: exactly as llm-neo distill builds them.
        student = build_model(shape.student, dtype if lora else torch.float32, device)
        if lora:
            if spec.student_quant != "none":
                # QLoRA: the block linears quantized, the layout models.quant.load_quantized_base gives.
                student, result["student_quant"] = quantize_teacher(
                    student, spec.student_quant, role="student"
                )
            student = attach_lora(student, r=spec.lora_r, seed=spec.seed)
        if spec.gradient_checkpointing:
            enable_checkpointing(student, mlp_chunks=spec.mlp_chunks)
        student.train()
        trainable = trainable_parameters(student)
        lr = METHODS[spec.method].default_lr
        optimizer = torch.optim.AdamW(list(trainable.values()), lr=lr, weight_decay=0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        batch, pair, across = step_batch(spec, shape, device)
        result.update(across)
        options = LossOptions(
            kd_ratio=spec.kd_ratio if kd else 0.0,
            chunk_size=spec.chunk_size,
            uld=spec.cross_tokenizer == "uld",
        )
        settings = StepSettings(device, dtype, options, impl=spec.impl, cross=pair)
        result["trainable_parameters"] = sum(p.numel() for p in trainable.values())

        def step() -> dict[str, float]:
            return train_step(
                student,
                teacher,
                [batch],
                trainable=trainable,
                optimizer=optimizer,
                scheduler=scheduler,
                settings=settings,
            )

        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        if spec.memory == "tracked":
            tracker = LiveTensorBytes(*weight_storages(*(m for m in (student, teacher) if m is not None)))
            tracker.__enter__()
        for _ in range(spec.warmup_steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times, last = [], {}
        for _ in range(spec.steps):
            start = time.perf_counter()
            last = step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        tokens = spec.batch_size * spec.seq_len
        result.update(
            step_s=sum(times) / len(times) if times else None,
            step_times_s=times,
            tokens_per_s=tokens * len(times) / sum(times) if times else None,
            loss=last.get("loss"),
        )
    except torch.OutOfMemoryError as err:
        result.update(status="oom", error=str(err).splitlines()[0][:300])
    finally:
        if tracker is not None:
            tracker.__exit__(None, None, None)
        torch.set_num_threads(threads)
    if device.type == "cuda":
        result.update(
            peak_bytes=torch.cuda.max_memory_allocated(device),
            reserved_bytes=torch.cuda.max_memory_reserved(device),
            peak_kind="cuda_max_allocated",
        )
    elif spec.memory == "tracked":
        assert tracker is not None
        result.update(peak_bytes=tracker.peak, peak_kind="live_tensor_bytes")
    else:
        result.update(peak_bytes=peak_rss_bytes(), peak_kind="process_max_rss")
    result["device"] = device_name(device)
    return result


def run_here(spec: RunSpec) -> dict[str, Any]:
    try:
        return run_one(spec)
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
