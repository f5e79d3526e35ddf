"""The distillation recipe, top to bottom: build → attach LoRA → loop → checkpoint → merge → verify → export.

One function, ``distill(config)``, runs every arm of the comparison:

    method  trainable weights         loss
    neo     LoRA branches             (1 − kd_ratio)·CE + kd_ratio·D(teacher ‖ student)
    kd      the whole student         (1 − kd_ratio)·CE + kd_ratio·D(teacher ‖ student)
    lora    LoRA branches             CE
    sft     the whole student         CE

so SFT, LoRA, KD and Neo differ only where the table says and are comparable on data, seed and budget.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, get_scheduler
from transformers import set_seed as hf_set_seed

from llm_neo import __version__
from llm_neo.config import DistillConfig, dump_yaml, load_yaml, to_dict, validate_distill
from llm_neo.data import Example, check_chat_templates, collate, load_records, split_heldout, tokenize_records
from llm_neo.errors import ModelError, NonFiniteError, TrainingError
from llm_neo.eval.metrics import cached_heldout_metrics, heldout_metrics
from llm_neo.losses import (
    LossParts,
    cached_distill_loss,
    chunked_cached_distill_loss,
    chunked_distill_loss,
    distill_loss,
    liger_distill_loss,
    next_token_targets,
)
from llm_neo.models.loading import (
    autocast,
    check_same_vocabulary,
    enable_checkpointing,
    final_hidden_states,
    freeze,
    kd_vocab_size,
    lm_head,
    load_model,
    load_tokenizer,
    logit_softcap,
    logit_width,
    published_dtype,
    resolve_device,
    resolve_dtype,
)
from llm_neo.models.lora import attach_lora, merge_lora, save_adapter, trainable_parameters
from llm_neo.runtime.atomic import atomic_directory, atomic_write_json, atomic_write_text, remove_outputs
from llm_neo.runtime.checkpoint import Progress, list_checkpoints, load_checkpoint, save_checkpoint
from llm_neo.runtime.distributed import (
    World,
    all_reduce_sum,
    barrier,
    clip_grad_norm,
    close,
    gather_state,
    init_world,
    is_sharded,
    load_whole_into,
    rank_device,
    shard,
    sync_whole_grads,
)
from llm_neo.runtime.memory import LiveTensorBytes, peak_memory_gb
from llm_neo.teacher_cache.key import check_key, run_key
from llm_neo.teacher_cache.store import TeacherCache, batch_targets, open_cache, unpack_targets

log = logging.getLogger("llm_neo")

# Optimizer steps over which a CPU run counts its live tensor bytes (``peak_tensor_memory_gb``).
TRACKED_STEPS = 10
# Options that may differ between a run and its resumption without changing its result.
RESUMABLE_CHANGES = {
    "resume", "overwrite", "save_every", "log_every", "eval_batch_size", "device", "mlp_chunks",
}  # fmt: skip


StepCallback = Callable[[int, dict[str, float]], None]


def distill(config: DistillConfig, *, on_step: StepCallback | None = None) -> dict[str, Any]:
    """Run one arm end to end and return the summary (also written to ``output_dir/summary.json``).

    ``on_step(step, metrics)`` is called after every optimizer step (used by tests and the demo).
    """
    validate_distill(config)
    config = config.resolved()
    out = Path(str(config.output_dir))
    started = time.perf_counter()

    # --- 1. Devices, tokenizers, data: every cheap check before anything heavy loads or is written.
    world = init_world(config.device)  # one process, or one of many launched by torchrun/accelerate
    if not world.is_main:
        log.setLevel(logging.WARNING)  # logs and progress bars come from rank 0 only
    device = rank_device(world, resolve_device(config.device))
    dtype = resolve_dtype(config.dtype, device)
    tokenizer = load_tokenizer(config.student, role="student", trust_remote_code=config.trust_remote_code)
    teacher_tokenizer = None
    if config.teacher:
        teacher_tokenizer = load_tokenizer(
            config.teacher, role="teacher", trust_remote_code=config.trust_remote_code
        )
        check_same_vocabulary(tokenizer, teacher_tokenizer)

    records = load_records(config.data)
    if teacher_tokenizer is not None:
        check_chat_templates(records, tokenizer, teacher_tokenizer, source=config.data)
    examples, dropped = tokenize_records(
        records,
        tokenizer,
        max_length=config.max_length,
        train_on_prompt=config.train_on_prompt,
        source=config.data,
        progress=world.is_main,
    )
    train, heldout = split_heldout(examples, config.eval_fraction, config.seed)
    log.info(
        "data: %d records -> %d train / %d held-out samples (%d dropped: no trainable token "
        "within --max-length %d)",
        len(records),
        len(train),
        len(heldout),
        dropped,
        config.max_length,
    )
    # A teacher cache stands in for the teacher while training. Its rows follow the tokenized order,
    # and split_heldout keeps the example objects, so each example finds its row by identity.
    cache = _open_teacher_cache(config, tokenizer, examples)
    row_of = {id(ex): i for i, ex in enumerate(examples)} if cache is not None else {}

    progress = Progress()
    checkpoints = out / "checkpoints"
    resume_from = _check_output_dir(config, out, checkpoints)

    # --- 2. Models. The teacher is frozen in the compute dtype; only the KD arms need it while training.
    hf_set_seed(config.seed)
    teacher = None
    if config.uses_kd and cache is None:
        assert config.teacher
        teacher = freeze(
            load_model(
                config.teacher,
                role="teacher",
                dtype=dtype,
                device=device,
                trust_remote_code=config.trust_remote_code,
                allow_pickle_weights=config.allow_pickle_weights,
            )
        )
    export_dtype = published_dtype(
        AutoConfig.from_pretrained(config.student, trust_remote_code=config.trust_remote_code)
    )
    student, base_parameters = _build_student(config, dtype, device)
    vocab = kd_vocab_size(tokenizer, student, teacher) if teacher is not None else None
    if cache is not None and config.uses_kd:
        vocab = _cache_vocab_size(cache, student)

    if config.gradient_checkpointing:
        enable_checkpointing(student, mlp_chunks=config.mlp_chunks)
    if world.enabled:  # FSDP2: each rank keeps 1/world of both models (see distributed.py)
        shard(student, param_dtype=dtype if dtype != torch.float32 else None)
        if teacher is not None:
            shard(teacher)
    teacher_local = _local_numel(teacher)
    trainable = trainable_parameters(student)
    n_trainable = sum(p.numel() for p in trainable.values())  # a sharded DTensor reports its whole size
    log.info(
        "student: %s parameters, %s trainable (%.2f%%), method %s",
        f"{base_parameters:,}",
        f"{n_trainable:,}",
        100 * n_trainable / base_parameters,
        config.method,
    )

    if resume_from is None and world.is_main:
        _start_output_dir(config, out)  # only now: a run that fails to start leaves nothing behind
    barrier(world)

    # --- 4. Optimiser and schedule.
    per_epoch = math.ceil(len(train) / config.batch_size)
    per_step = config.grad_accum * world.size  # micro-batches of one optimizer step, all ranks together
    total_steps = config.max_steps or max(1, math.ceil(config.epochs * per_epoch / per_step))
    optimizer = torch.optim.AdamW(
        list(trainable.values()),
        lr=config.lr or 0.0,
        weight_decay=config.weight_decay,
        foreach=False if world.enabled else None,  # foreach kernels refuse a mix of sharded and whole params
    )
    scheduler = get_scheduler(
        "constant_with_warmup" if config.scheduler == "constant" else config.scheduler,
        optimizer,
        num_warmup_steps=round(config.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    if resume_from is not None:
        progress = load_checkpoint(
            resume_from, trainable=trainable, optimizer=optimizer, scheduler=scheduler, world=world
        )
        log.info("resumed from %s (step %d of %d)", resume_from, progress.step, total_steps)
    if world.is_main:
        _truncate_metrics(out / "metrics.jsonl", progress.step)

    # --- 5. The loop.
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    batches = _micro_batches(train, config.batch_size, config.seed, start=progress.micro_batches)
    settings = loss_settings(config, vocab)
    last: dict[str, float] = {}
    loop_start = time.perf_counter()
    student.train()
    bar = tqdm(
        total=total_steps,
        initial=progress.step,
        desc=f"{config.method}",
        unit="step",
        dynamic_ncols=True,
        disable=None if world.is_main else True,
    )
    # CPU, one process: count live tensor bytes over the first steps, the CPU's counterpart of CUDA's
    # max_memory_allocated. The process's peak RSS also holds the ~0.4 GB runtime and whatever the C
    # allocator keeps mapped, which differs between arms by more than the tensors they hold. Only the
    # first steps, as the count costs a Python call per op; under FSDP (DTensors) not at all.
    tracker = None
    if device.type == "cpu" and not world.enabled:
        models = [m for m in (student, teacher) if m is not None]
        states = [
            t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)
        ]
        tracker = LiveTensorBytes(*(t for m in models for t in [*m.parameters(), *m.buffers()]), *states)
        tracker.__enter__()
    tracked_from = progress.step
    tracked_until = tracked_from + TRACKED_STEPS
    try:
        while progress.step < total_steps:
            step_start = time.perf_counter()
            # Every rank walks the same global sequence of micro-batches and trains on its own share of it.
            micro = [
                _collate(batch, tokenizer.pad_token_id, cache if settings.kd_ratio > 0 else None, row_of)
                for i, batch in enumerate(itertools.islice(batches, per_step))
                if i % world.size == world.rank
            ]
            try:
                result = train_step(
                    student,
                    teacher,
                    micro,
                    trainable=trainable,
                    optimizer=optimizer,
                    scheduler=scheduler,
                    device=device,
                    dtype=dtype,
                    loss=settings,
                    max_grad_norm=config.max_grad_norm,
                    world=world,
                )
            except NonFiniteError as err:
                raise TrainingError(
                    f"step {progress.step + 1}: {err}; {_last_good(checkpoints)}. Lower --lr, "
                    "check the data, or use --dtype float32."
                ) from err
            num_tokens = result["num_tokens"]
            progress.step += 1
            progress.micro_batches += per_step
            progress.tokens += int(num_tokens)

            ce, kd = result["ce_loss"], result["kd_loss"]
            last = {
                "step": progress.step,
                "loss": result["loss"],
                "ce_loss": ce,
                "kd_loss": kd,
                "lr": result["lr"],
                "grad_norm": result["grad_norm"],
                "tokens": progress.tokens,
                "tokens_per_s": num_tokens / (time.perf_counter() - step_start),
                "peak_memory_gb": peak_memory_gb(device),
            }
            if world.is_main and (progress.step % config.log_every == 0 or progress.step == total_steps):
                with (out / "metrics.jsonl").open("a") as handle:
                    handle.write(json.dumps(last) + "\n")
            bar.set_postfix(
                loss=f"{last['loss']:.4f}",
                ce=f"{ce:.4f}",
                kd=f"{kd:.4f}",
                tok_s=f"{last['tokens_per_s']:.0f}",
                refresh=False,
            )
            bar.update(1)
            if tracker is not None and progress.step == tracked_until:
                tracker.__exit__(None, None, None)
            if config.save_every and (progress.step % config.save_every == 0 or progress.step == total_steps):
                progress.elapsed_s += time.perf_counter() - loop_start
                loop_start = time.perf_counter()
                save_checkpoint(
                    checkpoints,
                    trainable=trainable,
                    optimizer=optimizer,
                    scheduler=scheduler,
                    progress=progress,
                    world=world,
                )
            if on_step is not None:
                on_step(progress.step, last)
    finally:
        if tracker is not None and progress.step < tracked_until:
            tracker.__exit__(None, None, None)
    bar.close()
    train_seconds = progress.elapsed_s + time.perf_counter() - loop_start
    peaks = all_gather(peak_memory_gb(device), world)
    teacher_shards = all_gather(teacher_local, world)
    if world.enabled:
        # Merge, verify and export need whole weights: gather the trained ones into rank 0, which
        # rebuilds a plain student and goes on alone.
        whole = gather_state(dict(trainable))
        del optimizer, trainable, student, teacher
        barrier(world)
        close(world)
        if not world.is_main:
            return {}
        student, _ = _build_student(config, dtype, device)
        for name, param in trainable_parameters(student).items():
            load_whole_into(param, whole[name])
        teacher = None

    # --- 6. Merge (LoRA arms) and verify on held-out data that the merged weights compute the same logits.
    verify_batch = collate((heldout or train)[: config.eval_batch_size], tokenizer.pad_token_id)
    student.eval()
    student.float()  # merge and verify in fp32: the check must measure the merge, not rounding
    if isinstance(student, PeftModel):
        with atomic_directory(out / "adapter") as tmp:
            save_adapter(student, tmp)
    reference = _logits(student, verify_batch, device)
    merged = merge_lora(student) if isinstance(student, PeftModel) else student
    merge_diff = float(
        (_logits(merged, verify_batch, device) - reference)[verify_batch["attention_mask"].bool()].abs().max()
    )
    if merge_diff > config.merge_tolerance:
        raise TrainingError(
            f"merge check failed: merged and adapter logits differ by up to {merge_diff:.3g} "
            f"(--merge-tolerance {config.merge_tolerance:g}); adapter kept in {out / 'adapter'}"
        )
    merged_parameters = sum(p.numel() for p in merged.parameters())
    if merged_parameters != base_parameters:
        raise TrainingError(
            f"merged model has {merged_parameters:,} parameters, the student {base_parameters:,}"
        )
    _export(merged, tokenizer, out / "merged", export_dtype)

    # --- 7. Held-out metrics of the deployed (merged) student, against the teacher where there is one.
    metrics: dict[str, float] = {}
    if heldout:
        if teacher is None and config.teacher:
            teacher = freeze(
                load_model(
                    config.teacher,
                    role="teacher",
                    dtype=dtype,
                    device=device,
                    trust_remote_code=config.trust_remote_code,
                    allow_pickle_weights=config.allow_pickle_weights,
                )
            )
        if teacher is None and cache is not None:  # no --teacher: score against the cached teacher
            metrics = cached_heldout_metrics(
                merged,
                heldout,
                [row_of[id(ex)] for ex in heldout],
                cache,
                pad_token_id=tokenizer.pad_token_id,
                batch_size=config.eval_batch_size,
                device=device,
                dtype=dtype,
            )
        else:
            metrics = heldout_metrics(
                merged,
                heldout,
                teacher=teacher,
                pad_token_id=tokenizer.pad_token_id,
                batch_size=config.eval_batch_size,
                device=device,
                dtype=dtype,
                kd_vocab_size=kd_vocab_size(tokenizer, merged, teacher) if teacher else None,
            )
        log.info("held-out: %s", ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))

    summary = {
        "llm_neo_version": __version__,
        "method": config.method,
        "config": to_dict(config),
        "steps": progress.step,
        "tokens_trained": progress.tokens,
        "samples": {"train": len(train), "heldout": len(heldout), "dropped": dropped},
        "final": {k: last[k] for k in ("loss", "ce_loss", "kd_loss")} if last else {},
        "heldout": metrics,
        # What kl_to_teacher / top1_agreement were measured against: the teacher model, or the cache's
        # top-k + tail buckets (a lower bound of the dense KL; see llm_neo.teacher_cache).
        "heldout_reference": "teacher" if teacher is not None else "teacher_cache" if cache else None,
        "teacher_cache": None
        if cache is None
        else {
            "path": str(cache.path),
            "key_digest": cache.manifest["key_digest"],
            "top_k": cache.top_k,
            "temperature": cache.temperature,
        },
        "train_time_s": train_seconds,
        "wall_time_s": time.perf_counter() - started,
        "peak_memory_gb": max(peaks),
        "peak_memory_gb_per_rank": peaks,
        "world_size": world.size,
        "teacher_parameters_per_rank": teacher_shards if config.uses_kd else [],
        "peak_memory_kind": "cuda_max_allocated" if device.type == "cuda" else "process_max_rss",
        # Peak bytes of live tensors: CUDA's max allocated; on a CPU counted over the first steps.
        "peak_tensor_memory_gb": max(peaks)
        if device.type == "cuda"
        else (None if tracker is None else tracker.peak / 2**30),
        "peak_tensor_memory_steps": None
        if tracker is None
        else min(TRACKED_STEPS, progress.step - tracked_from),
        "trainable_parameters": n_trainable,
        "student_parameters": base_parameters,
        "merged_parameters": merged_parameters,
        "merge_check": {
            "max_abs_logit_diff": merge_diff,
            "tolerance": config.merge_tolerance,
            "passed": True,
        },
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "export_dtype": str(export_dtype).removeprefix("torch."),
    }
    atomic_write_json(out / "summary.json", summary)
    return summary


# ----------------------------------------------------------------------------------------------------
# The pieces the recipe calls, in the order it calls them.


def _build_student(
    config: DistillConfig, dtype: torch.dtype, device: torch.device
) -> tuple[PreTrainedModel | PeftModel, int]:
    """The student to train, and its parameter count before LoRA.

    Full-parameter arms keep fp32 master weights (autocast computes in ``dtype``); LoRA arms keep the
    frozen base in the compute dtype, the memory saving the method is about, and fp32 adapters.
    """
    base = load_model(
        config.student,
        role="student",
        dtype=dtype if config.uses_lora else torch.float32,
        device=device,
        trust_remote_code=config.trust_remote_code,
        allow_pickle_weights=config.allow_pickle_weights,
    )
    base.config.use_cache = False
    parameters = sum(p.numel() for p in base.parameters())
    if not config.uses_lora:
        return base, parameters
    student = attach_lora(
        base,
        r=config.lora.r,
        lora_alpha=config.lora.lora_alpha,
        lora_dropout=config.lora.lora_dropout,
        target_modules=config.lora.target_modules,
        variant=config.lora.variant,
        seed=config.seed,
    )
    return student, parameters


def _open_teacher_cache(
    config: DistillConfig, tokenizer: Any, examples: list[Example]
) -> TeacherCache | None:
    """Open ``--teacher-cache`` and refuse it unless its key matches this run (every part it can check:
    the teacher's weights and config only when ``--teacher`` is given too)."""
    if not config.teacher_cache:
        return None
    cache = open_cache(config.teacher_cache)
    key = run_key(config, tokenizer=tokenizer, examples=examples)
    if not config.uses_kd:
        del key["temperature"]  # no KD term: the cache only scores the held-out split, at its own T
    check_key(cache, key)
    log.info(
        "teacher cache %s: %d examples, top-%d, T = %g (the teacher is not loaded for training)",
        cache.path,
        cache.num_examples,
        cache.top_k,
        cache.temperature,
    )
    return cache


def _cache_vocab_size(cache: TeacherCache, student: torch.nn.Module) -> int:
    """Columns the cached divergence compares: the cache's vocabulary (the tokenizer length)."""
    if logit_width(student) < cache.vocab_size:
        raise ModelError(
            f"the student has {logit_width(student)} logit columns but the teacher cache {cache.path} "
            f"covers {cache.vocab_size} tokens: its embedding table is too small for the tokenizer"
        )
    return cache.vocab_size


def _collate(
    batch: list[Example], pad_token_id: int, cache: TeacherCache | None, row_of: dict[int, int]
) -> dict[str, torch.Tensor]:
    """``collate``, plus the batch's cached teacher targets (rows in ``targets[trained]`` order)."""
    out = collate(batch, pad_token_id)
    if cache is not None:
        out |= batch_targets(cache, [row_of[id(ex)] for ex in batch])
    return out


def _local_numel(model: torch.nn.Module | None) -> int:
    """Parameters this process holds (its shards, plus whatever is kept whole)."""
    if model is None:
        return 0
    local = [p.to_local() if is_sharded(p) else p for p in model.parameters()]  # type: ignore[attr-defined]
    return sum(int(p.numel()) for p in local)


def all_gather(value: float, world: World) -> list[float]:
    if not world.enabled:
        return [value]
    values: list[Any] = [None] * world.size
    torch.distributed.all_gather_object(values, value)
    return values


def _check_output_dir(config: DistillConfig, out: Path, checkpoints: Path) -> Path | None:
    """Refuse to clobber an earlier run; on --resume, check the run is the same and find its checkpoint.

    Read-only, and run by every rank, so every rank raises the same error.
    """
    saved = out / "config.yaml"
    if config.resume:
        found = list_checkpoints(checkpoints)
        if not found:
            raise TrainingError(
                f"--resume: no checkpoint in {checkpoints}; start the run without --resume "
                "(and with --save-every N to make checkpoints)"
            )
        if saved.is_file():
            before, now = load_yaml(saved), to_dict(config)
            changed = sorted(_diff_keys(before, now) - RESUMABLE_CHANGES)
            if changed:
                raise TrainingError(
                    f"--resume: options differ from the run in {out}: {', '.join(changed)}. "
                    "Resume with the same options, or start a new --output-dir."
                )
        return found[-1]
    if out.exists() and any(out.iterdir()) and not config.overwrite:
        raise TrainingError(
            f"--output-dir {out} already holds files; pass --resume to continue that run, "
            "--overwrite to replace it, or choose another --output-dir"
        )
    return None


def _start_output_dir(config: DistillConfig, out: Path) -> None:
    remove_outputs(out, ("merged", "adapter", "checkpoints", "metrics.jsonl", "summary.json", "config.yaml"))
    dump_yaml(dataclasses.replace(config, resume=False, overwrite=False), out / "config.yaml")


def _diff_keys(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for key in set(a) | set(b):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            keys |= _diff_keys(x, y, f"{prefix}{key}.")
        elif x != y:
            keys.add(f"{prefix}{key}")
    return keys


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, forget records past the checkpoint so the file ends as an uninterrupted run's would."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    atomic_write_text(path, "".join(f"{line}\n" for line in kept))


def _micro_batches(
    examples: list[Example], batch_size: int, seed: int, start: int
) -> Iterator[list[Example]]:
    """Micro-batches forever, reshuffled each epoch with ``seed + epoch``; starts at micro-batch ``start``.

    The order is a pure function of (seed, position), which is what lets a resumed run see exactly
    the batches the uninterrupted run would have seen.
    """
    per_epoch = math.ceil(len(examples) / batch_size)

    @functools.lru_cache(maxsize=2)
    def order(epoch: int) -> list[int]:
        return torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed + epoch)).tolist()

    k = start
    while True:
        epoch, j = divmod(k, per_epoch)
        yield [examples[i] for i in order(epoch)[j * batch_size : (j + 1) * batch_size]]
        k += 1


@dataclass(frozen=True)
class LossSettings:
    """What the loss of one arm needs, resolved from the config (kd_ratio is 0 for sft and lora)."""

    kd_ratio: float
    divergence: str = "forward_kl"
    temperature: float = 1.0
    beta: float = 0.5
    skew_alpha: float = 0.1
    kd_vocab_size: int | None = None
    impl: str = "chunked"
    chunk_size: int = 1024


def loss_settings(config: DistillConfig, kd_vocab: int | None) -> LossSettings:
    return LossSettings(
        kd_ratio=config.kd_ratio if config.uses_kd else 0.0,
        divergence=config.divergence,
        temperature=config.temperature,
        beta=config.jsd_beta,
        skew_alpha=config.skew_alpha,
        kd_vocab_size=kd_vocab,
        impl=config.loss_impl,
        chunk_size=config.loss_chunk_size,
    )


def train_step(
    student: torch.nn.Module,
    teacher: torch.nn.Module | None,
    micro: list[dict[str, torch.Tensor]],
    *,
    trainable: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device,
    dtype: torch.dtype,
    loss: LossSettings,
    max_grad_norm: float,
    world: World | None = None,
) -> dict[str, float]:
    """One optimizer step over the micro-batches ``micro`` (gradient accumulation); returns its metrics.

    The loss is a mean over the step's trained tokens (over all ranks), not a mean of micro-batch means,
    so splitting a batch into micro-batches or over processes does not change the update.
    """
    world = world or World()
    local_tokens = sum(int((next_token_targets(b["labels"]) != -100).sum()) for b in micro)
    num_tokens = int(all_reduce_sum(local_tokens, world, device))
    ce_sum = kd_sum = 0.0
    finite = True
    for batch in micro:
        parts = micro_batch_loss(
            student, teacher, batch, device=device, dtype=dtype, num_tokens=num_tokens, loss=loss
        )
        finite &= bool(torch.isfinite(parts.loss))
        # Backward even when not finite: under FSDP every rank must take part in every reduce-scatter.
        parts.loss.backward()
        ce_sum += float(parts.ce_sum)
        kd_sum += float(parts.kd_sum)
    ce_sum, kd_sum = all_reduce_sum(ce_sum, world, device), all_reduce_sum(kd_sum, world, device)
    params = list(trainable.values())
    sync_whole_grads(params, world)
    grad_norm = clip_grad_norm(params, max_grad_norm, world)
    if all_reduce_sum(float(not finite), world, device) > 0:
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteError(f"non-finite loss (ce sum {ce_sum:.4g}, kd sum {kd_sum:.4g})")
    if not torch.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteError("non-finite gradient norm")
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    ce, kd = ce_sum / max(num_tokens, 1), kd_sum / max(num_tokens, 1)
    return {
        "loss": (1 - loss.kd_ratio) * ce + loss.kd_ratio * kd,
        "ce_loss": ce,
        "kd_loss": kd,
        "num_tokens": num_tokens,
        "grad_norm": float(grad_norm),
        "lr": float(lr),
    }


def micro_batch_loss(
    student: torch.nn.Module,
    teacher: torch.nn.Module | None,
    batch: dict[str, torch.Tensor],
    *,
    device: torch.device,
    dtype: torch.dtype,
    num_tokens: int,
    loss: LossSettings,
) -> LossParts:
    """CE and KD of one micro-batch, both on exactly the trained next-token positions.

    ``chunked`` (default) runs the decoders to their final hidden states and applies the lm_heads chunk
    by chunk inside the loss, so no [tokens × vocab] logits exist for the batch; ``plain`` is the
    straightforward reference: full logits from both models; ``liger`` hands the same hidden states to
    Liger-Kernel's fused loss (only where a teacher runs: CE alone and cached teachers stay chunked).
    """
    input_ids = batch["input_ids"].to(device)
    attention_mask = batch["attention_mask"].to(device)
    targets = next_token_targets(batch["labels"]).to(device)  # [B, T]: the token each position predicts
    trained = targets != -100  # [B, T]
    use_teacher = teacher is not None and loss.kd_ratio > 0
    cached = unpack_targets(batch, device) if loss.kd_ratio > 0 else None  # [N, k] ids/log-probs, [N] tails
    common = dict(
        kd_ratio=loss.kd_ratio,
        num_tokens=num_tokens,
        divergence=loss.divergence,
        temperature=loss.temperature,
        beta=loss.beta,
        skew_alpha=loss.skew_alpha,
        kd_vocab_size=loss.kd_vocab_size,
    )
    if cached is not None:  # a teacher cache stands in for the teacher: no teacher forward at all
        if loss.impl == "plain":
            with autocast(device, dtype):
                logits = student(input_ids=input_ids, attention_mask=attention_mask).logits  # [B, T, V_s]
            return cached_distill_loss(logits[trained], targets[trained], cached, **common)  # type: ignore[arg-type]
        with autocast(device, dtype):
            hidden = final_hidden_states(student, input_ids, attention_mask)[trained]  # [N, H_s]
            head, bias = lm_head(student)
            return chunked_cached_distill_loss(
                hidden,
                head,
                targets[trained],
                cached,
                **common,  # type: ignore[arg-type]
                chunk_size=loss.chunk_size,
                student_bias=bias,
                student_softcap=logit_softcap(student),
            )
    if loss.impl == "plain":
        with autocast(device, dtype):
            student_logits = student(input_ids=input_ids, attention_mask=attention_mask).logits  # [B, T, V_s]
        teacher_logits = None
        if use_teacher:
            assert teacher is not None
            with torch.inference_mode(), autocast(device, dtype):
                teacher_full = teacher(
                    input_ids=input_ids, attention_mask=attention_mask
                ).logits  # [B, T, V_t]
            teacher_logits = teacher_full[
                trained
            ]  # [N, V_t]; indexing outside inference mode: a normal tensor
        return distill_loss(student_logits[trained], targets[trained], teacher_logits, **common)  # type: ignore[arg-type]

    with autocast(device, dtype):
        hidden = final_hidden_states(student, input_ids, attention_mask)[trained]  # [N, H_s]
    teacher_hidden = teacher_head = teacher_bias = None
    if use_teacher:
        assert teacher is not None
        with torch.inference_mode(), autocast(device, dtype):
            teacher_hidden = final_hidden_states(teacher, input_ids, attention_mask)[trained]  # [N, H_t]
        teacher_head, teacher_bias = lm_head(teacher)
    student_head, student_bias = lm_head(student)
    if loss.impl == "liger" and use_teacher and (logit_softcap(student) or logit_softcap(teacher)):
        raise ValueError(
            "--loss-impl liger: these models soft-cap their final logits, which Liger's fused loss does "
            "not; use --loss-impl chunked"
        )
    # The same inputs and options for either fused loss (teacher_* are None without a teacher).
    inputs: tuple[Any, ...] = (hidden, student_head, targets[trained], teacher_hidden, teacher_head)
    options: dict[str, Any] = common | {
        "chunk_size": loss.chunk_size, "student_bias": student_bias, "teacher_bias": teacher_bias,
    }  # fmt: skip
    if loss.impl == "liger" and use_teacher:
        with autocast(device, dtype):
            return liger_distill_loss(*inputs, **options)
    with autocast(device, dtype):  # the lm_head matmuls run in the compute dtype, as the plain path's do
        return chunked_distill_loss(
            *inputs,
            **options,
            student_softcap=logit_softcap(student),
            teacher_softcap=logit_softcap(teacher) if use_teacher else None,
        )


def _last_good(checkpoints: Path) -> str:
    found = list_checkpoints(checkpoints)
    return f"the last good checkpoint is {found[-1]}" if found else "no checkpoint was written yet"


@torch.no_grad()
def _logits(model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    return (
        model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
        .logits.float()
        .cpu()
    )


def _export(model: PreTrainedModel, tokenizer: Any, path: Path, dtype: torch.dtype) -> None:
    """Write a standard HF model dir (safetensors + tokenizer) atomically, and prove it reloads bit-exact."""
    model.config.use_cache = True
    with atomic_directory(path) as tmp:
        torch.nn.Module.to(model, dtype)  # the plain cast; HF's typed wrapper of .to confuses mypy
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype, use_safetensors=True)
        saved = reloaded.state_dict()
        for name, tensor in model.state_dict().items():
            if name in saved and not torch.equal(saved[name].cpu(), tensor.cpu()):
                raise TrainingError(f"exported weights differ from the merged model at {name}")
        del reloaded
    model.float()
