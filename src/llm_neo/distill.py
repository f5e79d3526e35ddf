"""The distillation recipe, top to bottom: setup → train → finish.

One function, ``distill(config)``, runs every arm of the comparison:

    method  trainable weights         loss
    neo     LoRA branches             (1 − kd_ratio)·CE + kd_ratio·D(teacher ‖ student)
    kd      the whole student         (1 − kd_ratio)·CE + kd_ratio·D(teacher ‖ student)
    lora    LoRA branches             CE
    sft     the whole student         CE

so SFT, LoRA, KD and Neo differ only where the table says and are comparable on data, seed and budget.

    setup   every check that needs no weights (before anything heavy loads or is written), the data,
            the models (teacher frozen, LoRA attached), the optimizer and schedule, the checkpoint to
            resume from
    train   the loop: micro-batches → CE + KD → one AdamW step; metrics, progress, checkpoints
    finish  merge the LoRA branches and verify the merged logits, export the student, score it on the
            held-out split, write summary.json
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import json
import logging
import math
import os
import shlex
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from tqdm.auto import tqdm
from transformers import PreTrainedModel, get_scheduler
from transformers import set_seed as hf_set_seed

from llm_neo import __version__
from llm_neo.alignment import CrossPair
from llm_neo.config import DistillConfig, default_chunk_size, validate_distill
from llm_neo.cross_tokenizer import (
    PAIR_FILE,
    CrossRun,
    aligned_heldout,
    cached_aligned_heldout,
    cross_batch,
    cross_targets,
    read_cross_data,
    student_kd_vocab,
)
from llm_neo.data import Example, collate, micro_batch, read_examples, split_heldout
from llm_neo.distill_dir import (
    check_fingerprint,
    check_output_dir,
    check_space,
    last_good,
    last_metrics,
    start_output_dir,
    step_number,
    truncate_metrics,
)
from llm_neo.errors import (
    ConfigError,
    ModelError,
    NonFiniteError,
    NonFiniteTargets,
    OutOfMemory,
    OutputError,
    RunStopped,
    TrainingError,
)
from llm_neo.eval.metrics import heldout_metrics, small_heldout
from llm_neo.export import EXPORT_FILE, export_model, parse_export_spec
from llm_neo.export.gguf import check_gguf_layout
from llm_neo.losses import (
    IGNORE_INDEX,
    HeadInput,
    LossOptions,
    LossParts,
    TopKTargets,
    chunked_distill_loss,
    distill_loss,
    liger_distill_loss,
    next_token_targets,
)
from llm_neo.models.anatomy import (
    final_hidden_states,
    final_logit_softcap,
    fsdp_parts,
    lm_head,
    logit_softcap,
    logit_width,
)
from llm_neo.models.checkpointing import enable_checkpointing
from llm_neo.models.loading import (
    autocast,
    check_finite_weights,
    check_supported,
    kd_vocab_size,
    load_config,
    load_model,
    load_tokenizer,
    load_tokenizers,
    published_dtype,
    resolve_device,
    resolve_dtype,
    save_model_dir,
    warn_same_weights,
)
from llm_neo.models.lora import attach_lora, merge_verified, save_adapter, trainable_parameters
from llm_neo.models.quant import (
    float32_compute,
    load_quantized_base,
    load_teacher,
    merge_quantized,
    parameter_count,
    train_mode_without_dropout,
    weight_bytes,
    weight_storages,
)
from llm_neo.options import flag_name, to_dict
from llm_neo.provenance import data_record, model_digests, provenance
from llm_neo.records import to_json
from llm_neo.runtime.atomic import (
    atomic_directory,
    atomic_write_json,
    clean_temporaries,
    output_error,
    writing,
)
from llm_neo.runtime.checkpoint import (
    Fingerprint,
    Progress,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from llm_neo.runtime.distributed import (
    World,
    all_gather,
    all_reduce_sum,
    barrier,
    clip_grad_norm,
    close,
    gather_state,
    init_world,
    load_whole_into,
    local_numel,
    rank_device,
    shard,
    sync_whole_grads,
)
from llm_neo.runtime.lock import releases_locks
from llm_neo.runtime.memory import (
    GiB,
    LiveTensorBytes,
    cpu_allocator_policy,
    peak_memory_gb,
    return_free_heap,
)
from llm_neo.runtime.progress import ProgressLines
from llm_neo.runtime.stop import StopRequest, agreed, graceful_stop
from llm_neo.runtime.tracking import Trackers, open_trackers
from llm_neo.sampling import (
    Sampling,
    longest_response,
    response_example,
    response_start,
    sample_responses,
    seed_of,
    stop_token_ids,
)
from llm_neo.summary import SUMMARY_FILE, OnPolicySummary, RunSummary
from llm_neo.teacher_cache.key import check_key, cross_key, hash_teacher_weights, key_differences, run_key
from llm_neo.teacher_cache.store import TeacherCache, batch_targets, open_cache, unpack_targets

log = logging.getLogger("llm_neo")

# Optimizer steps over which a CPU run counts its live tensor bytes (``peak_tensor_memory_gb``).
TRACKED_STEPS = 10

StepCallback = Callable[[int, dict[str, float]], None]


@dataclass(frozen=True)
class StepSettings:
    """How an optimizer step computes its loss and its update (resolved from the config)."""

    device: torch.device
    dtype: torch.dtype  # the compute dtype (autocast below fp32)
    loss: LossOptions  # kd_ratio is 0 for the CE-only arms
    impl: str = "chunked"  # chunked | plain | liger
    max_grad_norm: float = 1.0
    world: World = field(default_factory=World)
    # The loss of an on-policy micro-batch: the on-policy divergence alone (kd_ratio 1: a sample has no
    # label to take CE against); None off-policy.
    on_policy: LossOptions | None = None
    # --cross-tokenizer: the teacher reads its own tokens and KD is taken at the aligned positions.
    cross: CrossPair | None = None


@dataclass
class Run:
    """What setup builds, and train and finish use."""

    config: DistillConfig  # resolved
    out: Path
    world: World
    tokenizer: Any
    train: list[Example]
    heldout: list[Example]
    samples: dict[str, int]  # records, train, heldout, dropped
    cache: TeacherCache | None
    student: Any  # a PreTrainedModel, or a PeftModel around one
    teacher: PreTrainedModel | None  # loaded for the KD arms that train against it
    teacher_quant: dict[str, Any] | None  # how the teacher (or the cache's) was quantized, its drift
    student_quant: dict[str, Any] | None  # the QLoRA base's kind and bytes
    base_parameters: int  # the student's parameter count before LoRA
    n_trainable: int  # trainable parameters (whole sizes, also when sharded)
    trainable: dict[str, torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    progress: Progress
    total_steps: int
    step: StepSettings
    export_dtype: torch.dtype
    started: float
    fingerprint: Fingerprint  # what the run depends on, written into every checkpoint
    trackers: Trackers = field(default_factory=Trackers)  # --report-to (rank 0); none by default
    sampling: OnPolicySampling | None = None  # --on-policy: how the student's responses are drawn
    cross: CrossRun | None = None  # --cross-tokenizer: the pair and the data's alignment


@dataclass(frozen=True)
class OnPolicySampling:
    """--on-policy's resolved sampling: the share λ, how responses are drawn, their cap."""

    share: float
    sampling: Sampling
    max_new_tokens: int  # --sample-max-new-tokens, or the longest training response
    # The student whose samples a teacher cache holds (cache-teacher --student-samples): the run trains
    # on those and draws none itself. None: sampled online, by the student as it trains.
    cached_student: str | None = None


@dataclass
class Trained:
    """What the loop measured."""

    last: dict[str, float]  # the last step's metrics record
    train_seconds: float
    tensor_peak_gb: float | None  # live tensor bytes over the tracked steps (CPU, one process)
    tracked_steps: int | None
    peaks: list[float]  # peak_memory_gb of every rank
    teacher_shards: list[int]  # teacher parameters each rank held


@releases_locks  # the output directory's run lock, taken by setup
def distill(config: DistillConfig, *, on_step: StepCallback | None = None) -> RunSummary | None:
    """Run one arm end to end and return its summary (also written to ``output_dir/summary.json``).

    ``on_step(step, metrics)`` is called after every optimizer step (used by tests and the demo). Under
    torchrun every rank trains; rank 0 alone merges, evaluates and returns the summary (the others
    return None).

    SIGTERM, SIGINT or SIGUSR1 during training end the run after the current optimizer step with a
    checkpoint and RunStopped (exit code 75), whose message is the command that resumes; a second
    signal exits at once. During the final merge, export and evaluation the first signal is noted and
    the run finishes (a second one exits at once). Before training starts signals act as usual:
    nothing is lost yet.
    """
    run = setup(config)
    if run.world.is_main and run.config.report_to:
        run.trackers = open_trackers(
            run.config.report_to,
            run.out,
            run_name=run.out.name,
            config=to_dict(run.config),
            start_step=run.progress.step,
        )
    try:
        with graceful_stop() as stop:
            trained = train(run, on_step=on_step)
            if not _gather_to_rank0(run):
                return None
            stop.plan = "the run is trained; finishing its merge, export and held-out evaluation first"
            summary = finish(run, trained)
            run.trackers.log(summary.steps, summary.heldout, prefix="heldout")
            return summary
    finally:
        run.trackers.close()


# ----------------------------------------------------------------------------------------------------
# setup


def setup(config: DistillConfig) -> Run:
    """Check everything, read the data, build the models and the optimizer; restore a checkpoint on
    --resume. Every refusal that the options and the models' configs decide comes before any weight
    loads, and nothing is written before the models are built."""
    validate_distill(config)
    config = config.resolved()
    started = time.perf_counter()
    world = init_world(config.device)  # one process, or one of many launched by torchrun/accelerate
    _check_quantized_world(config, world)
    if not world.is_main:
        log.setLevel(logging.WARNING)  # logs and progress bars come from rank 0 only
    device = rank_device(world, resolve_device(config.device))
    dtype = resolve_dtype(config.dtype, device)
    out = Path(str(config.output_dir))
    # Before anything loads, the run lock refuses a path that cannot be written (a read-only disk is not
    # found at step 1000), then the directory is checked (against the options as the run will use them).
    config = _with_memory_defaults(config, device)
    resume_from = check_output_dir(config, out, world)
    export_dtype = preflight(config)

    tokenizer, examples, samples, cross = _read_data(config, world)
    train_split, heldout = split_heldout(examples, config.eval_fraction, config.seed)
    samples |= {"train": len(train_split), "heldout": len(heldout)}
    log.info(
        "data: %d records -> %d train / %d held-out samples (%d dropped: no trainable token "
        "within --max-length %d)",
        samples["records"],
        len(train_split),
        len(heldout),
        samples["dropped"],
        config.max_length,
    )
    cache = _open_teacher_cache(config, tokenizer, examples)
    if cache is not None and cache.sampling is not None:
        train_split = cached_samples(cache, train_split)
        samples["train"] = len(train_split)
    sampling = on_policy_sampling(config, tokenizer, train_split, world, cache)
    fingerprint = run_fingerprint(config, cache)
    if resume_from is not None:  # before any weight loads: a changed input is refused at once
        check_fingerprint(resume_from, fingerprint, world)

    hf_set_seed(config.seed)
    # The teacher first: a quantized one is quantized before the student loads, so the dense teacher
    # never shares memory with the rest of the run. Its drift is measured on the merge check's batch.
    teacher, teacher_quant = None, _cache_quantization(cache)
    if config.uses_kd and cache is None:
        # A quantized teacher's drift is measured on student tokens, which a cross-tokenizer teacher
        # cannot read: it is skipped there.
        drift_batch = None if cross else _check_batch(config, train_split, heldout, tokenizer)
        teacher, teacher_quant = _load_teacher(config, dtype, device, drift_batch)
    student, base_parameters = _build_student(config, dtype, device)
    student_quant = None
    if config.student_quant != "none":
        student_quant = {"kind": config.student_quant, "weight_bytes": weight_bytes(student)}
    kd_vocab = _kd_vocab(config, tokenizer, student, teacher, cache, cross)
    if config.gradient_checkpointing:
        enable_checkpointing(student, mlp_chunks=config.mlp_chunks)
    if world.enabled:  # FSDP2: each rank keeps 1/world of both models (see runtime/distributed.py)
        shard(*fsdp_parts(student), param_dtype=dtype if dtype != torch.float32 else None)
        if teacher is not None:
            shard(*fsdp_parts(teacher))
    trainable = trainable_parameters(student)
    n_trainable = sum(p.numel() for p in trainable.values())  # a sharded DTensor reports its whole size
    log.info(
        "student: %s parameters, %s trainable (%.2f%%), method %s",
        f"{base_parameters:,}",
        f"{n_trainable:,}",
        100 * n_trainable / base_parameters,
        config.method,
    )
    if world.is_main:
        for directory in (out, out / "checkpoints"):  # what writes killed half-way left
            clean_temporaries(directory)
        if resume_from is None:
            start_output_dir(config, out)  # only now: a run that fails to start leaves nothing behind
        if (pair := _pair_record(cross, cache)) is not None:
            atomic_write_json(out / PAIR_FILE, pair)
        check_space(config, out, n_trainable, base_parameters, export_dtype)
    barrier(world)

    total_steps = planned_steps(config, len(train_split), world.size)
    optimizer, scheduler = _optimizer(config, trainable, total_steps, world)
    progress = Progress()
    if resume_from is not None:
        progress = load_checkpoint(
            resume_from, trainable=trainable, optimizer=optimizer, scheduler=scheduler, world=world
        )
        log.info("resumed from %s (step %d of %d)", resume_from, progress.step, total_steps)
    if world.is_main:
        truncate_metrics(out / "metrics.jsonl", progress.step)
    step = step_settings(config, kd_vocab, device=device, dtype=dtype, world=world)
    if cross is not None:
        step = dataclasses.replace(step, cross=cross.pair)
    return Run(
        config=config,
        out=out,
        world=world,
        tokenizer=tokenizer,
        train=train_split,
        heldout=heldout,
        samples=samples,
        cache=cache,
        student=student,
        teacher=teacher,
        teacher_quant=teacher_quant,
        student_quant=student_quant,
        base_parameters=base_parameters,
        n_trainable=n_trainable,
        trainable=trainable,
        optimizer=optimizer,
        scheduler=scheduler,
        progress=progress,
        total_steps=total_steps,
        step=step,
        export_dtype=export_dtype,
        started=started,
        fingerprint=fingerprint,
        sampling=sampling,
        cross=cross,
    )


def cached_samples(cache: TeacherCache, train: list[Example]) -> list[Example]:
    """The training split of a run on a cache of student samples: each training example's samples
    (their cache rows), in its order; the held-out split keeps the data's responses."""
    n = cache.samples_per_prompt
    return [cache.sample(ex.index * n + j) for ex in train for j in range(n)]


def on_policy_sampling(
    config: DistillConfig,
    tokenizer: Any,
    train: list[Example],
    world: World,
    cache: TeacherCache | None = None,
) -> OnPolicySampling | None:
    """--on-policy's sampling, resolved from the options and the training split (the stop tokens, the
    default cap); ConfigError when a training example has no prompt to answer (text records). From a
    cache of student samples: how the cache drew them (validate_distill checked the options match)."""
    if config.on_policy == 0:
        return None
    if cache is not None and cache.sampling is not None:
        drawn = cache.manifest["student_samples"]
        sampling = Sampling(
            temperature=config.sample_temperature,
            top_p=config.sample_top_p,
            stop_ids=tuple(drawn["stop_ids"]),
            pad_id=int(tokenizer.pad_token_id),
        )
        log.info(
            "on-policy to the initial student: training on the %d samples (%d per prompt) that %s drew "
            "before training, cached with the teacher's targets in %s; they do not follow the student as "
            "it trains. Trained on %s alone (no CE)",
            len(train),
            cache.samples_per_prompt,
            drawn["student"],
            cache.path,
            config.on_policy_divergence,
        )
        return OnPolicySampling(1.0, sampling, int(drawn["max_new_tokens"]), cached_student=drawn["student"])
    promptless = sum(1 for ex in train if response_start(ex) == 0)
    if promptless:
        raise ConfigError(
            [
                f"--on-policy {config.on_policy:g}: {promptless} of {len(train)} training examples have no "
                "prompt (text records train on every token), so the student has nothing to answer; use "
                "records with a response (alpaca, chat, prompt/completion) or drop --on-policy"
            ]
        )
    sampling = Sampling(
        temperature=config.sample_temperature,
        top_p=config.sample_top_p,
        stop_ids=tuple(stop_token_ids(tokenizer, train)),
        pad_id=int(tokenizer.pad_token_id),
        synced=world.enabled,  # FSDP2 all-gathers in every forward: the ranks decode in lockstep
    )
    cap = config.sample_max_new_tokens or longest_response(train)
    log.info(
        "on-policy: a %g share of micro-batches sampled from the student (T %g, top-p %g, up to %d new "
        "tokens, stop at %s), trained on %s",
        config.on_policy,
        sampling.temperature,
        sampling.top_p,
        cap,
        ", ".join(tokenizer.convert_ids_to_tokens(list(sampling.stop_ids))),
        config.on_policy_divergence,
    )
    return OnPolicySampling(config.on_policy, sampling, cap)


def run_fingerprint(config: DistillConfig, cache: TeacherCache | None) -> Fingerprint:
    """What the run depends on (its resolved options, the data's and the models' digests, the cache's
    key), computed once here and written into every checkpoint. The weights are hashed in full, once
    per process (memoised by path, size and mtime: a cache key that hashed the teacher pays nothing).
    Warns when the teacher's weights are the student's under another path (``warn_same_weights``)."""
    trust = config.allow_pickle_weights
    models = {"student": model_digests(config.student, role="student", allow_pickle_weights=trust)}
    if config.teacher and config.uses_kd:
        models["teacher"] = model_digests(config.teacher, role="teacher", allow_pickle_weights=trust)
        # Both hashed now: a copy of the student given as the teacher is told by its bytes.
        weights = models["teacher"]["weights_sha256"], models["student"]["weights_sha256"]
        warn_same_weights(config.teacher, config.student, digests=weights)
    data = data_record(config.data)
    return Fingerprint(
        options=to_dict(config),
        data={"train": None if data is None else data["sha256"]},
        models=models,
        teacher_cache=None if cache is None else cache.manifest.get("key_digest"),
    )


def preflight(config: DistillConfig) -> torch.dtype:
    """Refusals the models' configs decide (config.json or a GGUF's metadata, no weights: the module tree
    is built on the meta device), before anything heavy loads; returns the student's published dtype,
    the export's."""
    trust = config.trust_remote_code
    student_config = load_config(config.student, role="student", trust_remote_code=trust)
    check_supported(
        student_config,
        role="student",
        method=config.method,
        target_modules=config.lora.target_modules,
        trust_remote_code=trust,
    )
    teacher_config = None
    if config.teacher:
        teacher_config = load_config(config.teacher, role="teacher", trust_remote_code=trust)
        check_supported(teacher_config, role="teacher", trust_remote_code=trust)
        warn_same_weights(config.teacher, config.student)
    if config.loss_impl == "liger" and config.uses_kd and teacher_config is not None:
        capped = [
            role
            for role, hf_config in (("student", student_config), ("teacher", teacher_config))
            if final_logit_softcap(hf_config)
        ]
        if capped:
            raise ConfigError(
                [
                    f"--loss-impl liger: the {' and the '.join(capped)} soft-cap their final logits, "
                    "which Liger's fused loss does not; use --loss-impl chunked"
                ]
            )
    if config.export and config.export.startswith("gguf:"):
        try:
            check_gguf_layout(student_config.to_dict(), config.student)
        except ModelError as err:
            raise ConfigError([f"--export {config.export}: {err}"]) from err
    return published_dtype(student_config)


def _with_memory_defaults(config: DistillConfig, device: torch.device) -> DistillConfig:
    """The device's memory defaults: on a CPU the allocator policy (once per process), and the loss chunk
    (``with_default_chunk``)."""
    if device.type == "cpu":
        log.info("allocator: %s", cpu_allocator_policy())
    return with_default_chunk(config, device)


def with_default_chunk(config: DistillConfig, device: torch.device) -> DistillConfig:
    """``config`` with the loss chunk it runs with: the one given, else ``config.default_chunk_size``
    for the device and the student's logit width. The returned config carries the chunk, so summary.json,
    a resume and compare's finished-arm check all see the one the run used."""
    if config.loss_chunk_size is not None:
        return config
    student = load_config(config.student, role="student", trust_remote_code=config.trust_remote_code)
    text = student.get_text_config() if hasattr(student, "get_text_config") else student
    chunk = default_chunk_size(device.type, int(text.vocab_size))
    return dataclasses.replace(config, loss_chunk_size=chunk)


def _read_data(
    config: DistillConfig, world: World
) -> tuple[Any, list[Example], dict[str, int], CrossRun | None]:
    """The student's tokenizer (checked against the teacher's), the data as token examples, and with
    --cross-tokenizer the pair and the data's alignment (the teacher's tokenizer may then differ)."""
    # From a cross-tokenizer cache alone the student's tokenization is all a run needs (the cache holds
    # the aligned targets at its positions); with --teacher too, the alignment scores the held-out split.
    if config.cross_tokenizer and config.uses_kd and config.teacher:
        tokenizer, examples, n_records, dropped, cross = read_cross_data(
            config,
            student=config.student,
            teacher=config.teacher,
            method=config.cross_tokenizer,
            top_k=config.cross_tokenizer_top_k,
            progress=world.is_main,
        )
        return tokenizer, examples, {"records": n_records, "dropped": dropped}, cross
    trust = config.trust_remote_code
    tokenizer, teacher_tokenizer = load_tokenizers(
        config.student, config.teacher, role="student", trust_remote_code=trust
    )
    records, examples, dropped = read_examples(
        config.data, tokenizer, config, teacher_tokenizer=teacher_tokenizer, progress=world.is_main
    )
    return tokenizer, examples, {"records": len(records), "dropped": dropped}, None


def _check_quantized_world(config: DistillConfig, world: World) -> None:
    """Quantized weights are not sharded by FSDP2 here (its DTensors do not wrap torchao's or
    bitsandbytes' tensors); refuse before any weight loads."""
    flags = [
        f"{flag_name(name)} {getattr(config, name)}"
        for name in ("teacher_quant", "student_quant")
        if getattr(config, name) != "none"
    ]
    if world.enabled and flags:
        raise ConfigError(
            [
                f"{' and '.join(flags)}: quantized models are not sharded across the {world.size} processes "
                "of torchrun; run on one GPU (the memory quantization saves is what makes that possible), "
                "or drop the quantization to shard with FSDP2"
            ]
        )


def _check_batch(
    config: DistillConfig, train: list[Example], heldout: list[Example], tokenizer: Any
) -> dict[str, torch.Tensor]:
    """The held-out batch (the training one when nothing is held out) on which the merge is verified
    and a quantized teacher's drift is measured."""
    return collate((heldout or train)[: config.eval_batch_size], tokenizer.pad_token_id)


def _load_teacher(
    config: DistillConfig,
    dtype: torch.dtype,
    device: torch.device,
    drift_batch: dict[str, torch.Tensor] | None = None,
) -> tuple[PreTrainedModel, dict[str, Any] | None]:
    """The frozen teacher in the compute dtype (eval mode, no gradients, hence no optimizer state),
    quantized as --teacher-quant says, and what the quantization did (None: not quantized)."""
    assert config.teacher
    return load_teacher(config, config.teacher, dtype=dtype, device=device, drift_batch=drift_batch)


def _pair_record(cross: CrossRun | None, cache: TeacherCache | None) -> Any:
    """The pair report of a cross-tokenizer run as JSON: its own, or the one its cache was written with
    (a run from the cache alone has no teacher tokenizer to make one)."""
    if cross is not None:
        return to_json(cross.report)
    return None if cache is None else cache.manifest.get("pair")


def _cache_quantization(cache: TeacherCache | None) -> dict[str, Any] | None:
    """A cache's record of how its teacher was quantized (what this run's targets came from)."""
    return None if cache is None else cache.manifest.get("teacher_quant")


def _build_student(
    config: DistillConfig, dtype: torch.dtype, device: torch.device
) -> tuple[PreTrainedModel | PeftModel, int]:
    """The student to train, and its parameter count before LoRA.

    Full-parameter arms keep fp32 master weights (autocast computes in ``dtype``); LoRA arms keep the
    frozen base in the compute dtype, the memory saving the method is about, and fp32 adapters.
    """
    if config.student_quant != "none":  # QLoRA: the frozen base's block linears quantized
        base = _load_quantized_student(config, dtype, device)
    else:
        base = load_model(
            config.student,
            role="student",
            dtype=dtype if config.uses_lora else torch.float32,
            device=device,
            trust_remote_code=config.trust_remote_code,
            allow_pickle_weights=config.allow_pickle_weights,
        )
    check_finite_weights(base, role="student", source=config.student)
    base.config.use_cache = False
    parameters = parameter_count(base)  # as the dense model counts them (a 4-bit weight packs 2 per byte)
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


def _load_quantized_student(
    config: DistillConfig, dtype: torch.dtype, device: torch.device
) -> PreTrainedModel:
    """The QLoRA base; loading is deterministic, so the merge loads the same quantized weights again."""
    return load_quantized_base(
        config.student,
        config.student_quant,
        dtype=dtype,
        device=device,
        trust_remote_code=config.trust_remote_code,
    )


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
    if config.cross_tokenizer and config.teacher:  # the teacher's tokenizer, when a teacher is given
        trust = config.trust_remote_code
        teacher_tokenizer = load_tokenizer(config.teacher, role="teacher", trust_remote_code=trust)
        key |= cross_key(config.cross_tokenizer, teacher_tokenizer)
    check_cross_cache(config, cache, key)
    check_key(cache, key)
    if cache.sampling is not None:
        _check_cached_student(config, cache)
    log.info(
        "teacher cache %s: %d examples, top-%d, T = %g (the teacher is not loaded for training)",
        cache.path,
        cache.num_examples,
        cache.top_k,
        cache.temperature,
    )
    return cache


def check_cross_cache(config: DistillConfig, cache: TeacherCache, key: dict[str, Any]) -> None:
    """ConfigError unless the cache was aligned as this run aligns: the same --cross-tokenizer method (or
    none on either side), its --top-k this run's --cross-tokenizer-top-k, the same tokenizers (the
    teacher's checked only when --teacher is given)."""
    method, cached = config.cross_tokenizer, cache.cross_tokenizer
    where = f"--teacher-cache {cache.path}"
    if cached != method:
        if cached is None:
            problem = (
                f"--cross-tokenizer {method}: {where} holds a same-tokenizer cache (made without "
                f"--cross-tokenizer). Drop --cross-tokenizer if the student reads the teacher's tokens, or "
                f"cache across tokenizers: llm-neo cache-teacher --cross-tokenizer {method} --tokenizer "
                f"{config.student} --teacher T --data {config.data} --output NEW_CACHE"
            )
        elif method is None:
            problem = (
                f"{where} holds targets aligned across tokenizers (--cross-tokenizer {cached}), this run "
                f"has no --cross-tokenizer: add --cross-tokenizer {cached}, or use a cache made without it"
            )
        else:
            problem = (
                f"--cross-tokenizer {method}: {where} was aligned for --cross-tokenizer {cached}. Run with "
                f"--cross-tokenizer {cached}, or cache again with llm-neo cache-teacher --cross-tokenizer "
                f"{method}"
            )
        raise ConfigError([problem])
    if method is None:
        return
    problems = []
    top_k = int(cache.manifest["key"]["top_k"])
    if top_k != config.cross_tokenizer_top_k:
        problems.append(
            f"--cross-tokenizer-top-k {config.cross_tokenizer_top_k}: {where} holds the teacher's "
            f"top-{top_k} at each aligned position. Run with --cross-tokenizer-top-k {top_k}, or cache "
            f"again with llm-neo cache-teacher --top-k {config.cross_tokenizer_top_k}"
        )
    parts = ("tokenizer", "chat_template", "teacher_tokenizer", "teacher_chat_template")
    problems += key_differences(cache.manifest["key"], {p: key[p] for p in parts if p in key})
    if problems:
        raise ConfigError(problems)


def _check_cached_student(config: DistillConfig, cache: TeacherCache) -> None:
    """ConfigError unless --student is the student whose samples the cache holds (its weights' sha256):
    the samples are on-policy to that student only."""
    cached = cache.manifest["key"]["student_weights"]
    weights = hash_teacher_weights(
        config.student, allow_pickle_weights=config.allow_pickle_weights, role="student"
    )
    if weights == cached:
        return
    drew = cache.manifest.get("student_samples", {}).get("student", "another student")
    raise ConfigError(
        [
            f"--student {config.student} is not the student whose samples the teacher cache {cache.path} "
            f"holds ({drew}): its weights are {weights[:19]}…, the cache's student's {cached[:19]}…. Train "
            f"that student (--student {drew}), or cache this one's samples: llm-neo cache-teacher "
            f"--student-samples {config.student} --teacher T --data D --output NEW_CACHE"
        ]
    )


def _kd_vocab(
    config: DistillConfig,
    tokenizer: Any,
    student: torch.nn.Module,
    teacher: torch.nn.Module | None,
    cache: TeacherCache | None,
    cross: CrossRun | None,
) -> int | None:
    """The logit columns the KD term compares: the cache's, the student tokenizer's across tokenizers,
    or the pair's shared vocabulary; None without KD."""
    if cache is not None and config.uses_kd:
        return _cache_vocab_size(cache, student)
    if cross is not None:
        return student_kd_vocab(tokenizer, student)
    return kd_vocab_size(tokenizer, student, teacher) if teacher is not None else None


def _cache_vocab_size(cache: TeacherCache, student: torch.nn.Module) -> int:
    """Columns the cached divergence compares: the cache's vocabulary (the tokenizer length)."""
    if logit_width(student) < cache.vocab_size:
        raise ModelError(
            f"the student has {logit_width(student)} logit columns but the teacher cache {cache.path} "
            f"covers {cache.vocab_size} tokens: its embedding table is too small for the tokenizer"
        )
    return cache.vocab_size


def planned_steps(config: DistillConfig, train_size: int, ranks: int = 1) -> int:
    """The optimizer steps of a run on ``train_size`` training examples over ``ranks`` processes:
    --max-steps, else --epochs of micro-batches (compare's plan states it before training)."""
    per_epoch = math.ceil(train_size / config.batch_size)
    per_step = config.grad_accum * ranks  # micro-batches of one optimizer step, all ranks together
    return config.max_steps or max(1, math.ceil(config.epochs * per_epoch / per_step))


def _optimizer(
    config: DistillConfig, trainable: dict[str, torch.nn.Parameter], total_steps: int, world: World
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
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
    return optimizer, scheduler


def step_settings(
    config: DistillConfig, kd_vocab: int | None, *, device: torch.device, dtype: torch.dtype, world: World
) -> StepSettings:
    """The loss and update of this arm's optimizer steps (kd_ratio is 0 for the CE-only arms); the config's
    loss chunk is set (``setup`` fills in the device's default)."""
    if config.loss_chunk_size is None:
        raise ValueError("step_settings needs a config whose loss_chunk_size is set")
    options = LossOptions(
        kd_ratio=config.kd_ratio if config.uses_kd else 0.0,
        divergence=config.divergence,
        temperature=config.kd_temperature,
        beta=config.jsd_beta,
        skew_alpha=config.skew_alpha,
        kd_vocab_size=kd_vocab,
        chunk_size=config.loss_chunk_size,
        uld=config.cross_tokenizer == "uld" and config.uses_kd,
    )
    on_policy = None
    if config.on_policy > 0:
        on_policy = dataclasses.replace(options, kd_ratio=1.0, divergence=config.on_policy_divergence)
    return StepSettings(device, dtype, options, config.loss_impl, config.max_grad_norm, world, on_policy)


# ----------------------------------------------------------------------------------------------------
# train


def train(run: Run, *, on_step: StepCallback | None = None) -> Trained:
    """Optimizer steps until ``total_steps``, with metrics, progress and checkpoints; a NaN or infinite
    loss stops the run (TrainingError), so does running out of memory (OutOfMemory) or disk space
    (OutputError), each leaving the last good checkpoint. SIGTERM, SIGINT or SIGUSR1 stop it after the
    current step with a checkpoint (RunStopped, see ``distill``)."""
    device = run.step.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    config = run.config
    bar = tqdm(
        total=run.total_steps,
        initial=run.progress.step,
        desc=run.config.method,
        unit="step",
        dynamic_ncols=True,
        disable=None if run.world.is_main else True,
    )
    # Without a terminal the bar is off: plain lines instead (runtime/progress.py).
    lines = ProgressLines(
        config.method,
        run.total_steps,
        initial=run.progress.step,
        initial_tokens=run.progress.tokens,
        enabled=None if run.world.is_main else False,
    )
    tracker = _tensor_tracker(run)
    tracked_from = run.progress.step
    last: dict[str, float] = {}
    run.student.train()
    plan = "finishing the current optimizer step, then writing a checkpoint and stopping"
    with graceful_stop(plan) as stop:
        if run.sampling is None:
            batches = data_batches(run)
        elif run.sampling.cached_student is not None:
            batches = cached_sample_batches(run, run.sampling)
        else:
            batches = on_policy_batches(run, run.sampling)
        loop = _Loop(batches, bar, lines, _Clock(time.perf_counter()), stop, on_step)
        try:
            # The first steps under the live-tensor counter (CPU, one process), the rest without its overhead.
            with tracker or nullcontext():
                last = _steps(run, loop, until=tracked_from + TRACKED_STEPS) or last
            last = _steps(run, loop, until=run.total_steps) or last
        finally:
            bar.close()
    if not last:  # resumed at the last step (killed in merge or export): how training ended, on record
        last = run.progress.last or last_metrics(run.out / "metrics.jsonl", run.progress.step) or {}
    return Trained(
        last=last,
        train_seconds=run.progress.elapsed_s + time.perf_counter() - loop.clock.start,
        tensor_peak_gb=None if tracker is None else tracker.peak / GiB,
        tracked_steps=None if tracker is None else min(TRACKED_STEPS, run.progress.step - tracked_from),
        peaks=all_gather(peak_memory_gb(device), run.world),
        teacher_shards=all_gather(local_numel(run.teacher), run.world),
    )


@dataclass
class _Clock:
    start: float  # when the time not yet in progress.elapsed_s began


# The micro-batches of one optimizer step, this rank's share, given the global index of the step's first
# micro-batch. A pure function of that position (with the run's data and seed, and for on-policy
# micro-batches the student's weights at that step), so a resumed run trains on what the uninterrupted
# one would have by construction: the data's examples, collated (``data_batches``), or on a λ share of
# micro-batches the student's own responses to their prompts (``on_policy_batches``).
StepBatches = Callable[[int], list[dict[str, torch.Tensor]]]


def _step_examples(run: Run, first: int) -> list[list[Example]]:
    """This rank's micro-batches of the step whose first micro-batch is ``first``, as examples in the
    seeded epoch order (``data.micro_batch``)."""
    config, world = run.config, run.world
    per_step = config.grad_accum * world.size  # micro-batches of one optimizer step, all ranks together
    # Every rank walks the same global sequence of micro-batches and trains on its own share of it.
    return [
        micro_batch(run.train, config.batch_size, config.seed, k)
        for k in range(first + world.rank, first + per_step, world.size)
    ]


def data_batches(run: Run) -> StepBatches:
    """The run's training examples in the seeded epoch order, collated with their cached teacher targets
    when the run reads a cache."""
    cache = run.cache if run.step.loss.kd_ratio > 0 else None
    cross = run.cross if run.step.loss.kd_ratio > 0 else None
    pad = run.tokenizer.pad_token_id
    return lambda first: [_collate(examples, pad, cache, cross) for examples in _step_examples(run, first)]


def cached_sample_batches(run: Run, on_policy: OnPolicySampling) -> StepBatches:
    """The micro-batches of a run on a cache of student samples: its training examples are the cached
    samples (``cached_samples``), every micro-batch on-policy (λ = 1), trained as an online sampled one
    is (the on-policy divergence alone); they cost no generation, and their lengths and capped share are
    recorded as an online run's are."""
    pad, stops = run.tokenizer.pad_token_id, set(on_policy.sampling.stop_ids)

    def batches(first: int) -> list[dict[str, torch.Tensor]]:
        out = []
        for examples in _step_examples(run, first):
            responses = [ex.input_ids[response_start(ex) :] for ex in examples]
            out.append(
                _collate(examples, pad, run.cache)
                | {
                    "on_policy": torch.tensor(True),
                    "on_policy_tokens": torch.tensor(sum(len(r) for r in responses)),
                    "on_policy_capped": torch.tensor(sum(r[-1] not in stops for r in responses)),
                    "on_policy_seconds": torch.tensor(0.0, dtype=torch.float64),
                }
            )
        return out

    return batches


def on_policy_batches(run: Run, on_policy: OnPolicySampling) -> StepBatches:
    """The data's micro-batches, of which a λ share is replaced by the student's responses to the same
    prompts (GKD draws per batch too: a micro-batch is all samples or all data, so its loss is one
    objective).

    The draw of this rank's micro-batch ``j`` of step ``s`` is Bernoulli(λ) seeded by (seed, s, j): the
    same on every rank, since under FSDP2 every rank must join every generation; its sampling is seeded
    by (seed, s, k), k its global micro-batch index (which encodes j and the rank), so ranks answer their
    own prompts with their own draws, and at λ = 1 two processes sample what one process does. Both are
    pure functions of the position: a resumed run draws and samples what the uninterrupted run did.
    """
    config, world = run.config, run.world
    per_step = config.grad_accum * world.size
    pad = run.tokenizer.pad_token_id

    def batches(first: int) -> list[dict[str, torch.Tensor]]:
        step = first // per_step
        out = []
        for j, examples in enumerate(_step_examples(run, first)):
            draw = torch.rand((), generator=torch.Generator().manual_seed(seed_of(config.seed, step, j)))
            if float(draw) >= on_policy.share:  # share 1: every draw in [0, 1) is below it
                out.append(_collate(examples, pad, None))
            else:
                k = first + world.rank + j * world.size  # as _step_examples numbers them
                out.append(_sampled_batch(run, on_policy, examples, seed_of(config.seed, step, k)))
        return out

    return batches


def _sampled_batch(
    run: Run, on_policy: OnPolicySampling, examples: Sequence[Example], seed: int
) -> dict[str, torch.Tensor]:
    """The micro-batch of the student's responses to ``examples``' prompts: prompt + response (right-
    padded), labels on the response alone, and what the generation cost (``on_policy_*`` entries)."""
    started = time.perf_counter()
    prompts = [ex.input_ids[: response_start(ex)] for ex in examples]
    # A response fits into --max-length with its prompt, as a training example is truncated to it.
    caps = [min(on_policy.max_new_tokens, run.config.max_length - len(p)) for p in prompts]
    with autocast(run.step.device, run.step.dtype):  # the compute dtype, as the training forward
        responses = sample_responses(
            run.student, prompts, caps, on_policy.sampling, seed=seed, device=run.step.device
        )
    batch = collate(
        [response_example(p, r, ex.index) for p, r, ex in zip(prompts, responses, examples, strict=True)],
        pad_token_id=on_policy.sampling.pad_id,
    )
    return batch | {
        "on_policy": torch.tensor(True),
        "on_policy_tokens": torch.tensor(sum(len(r.tokens) for r in responses)),
        "on_policy_capped": torch.tensor(sum(not r.ended for r in responses)),
        "on_policy_seconds": torch.tensor(time.perf_counter() - started, dtype=torch.float64),
    }


@dataclass
class _Loop:
    """What the training loop carries between its steps besides the run."""

    batches: StepBatches
    bar: Any  # the tqdm bar
    lines: ProgressLines  # the plain progress lines where there is no terminal
    clock: _Clock
    stop: StopRequest
    on_step: StepCallback | None


def _tensor_tracker(run: Run) -> LiveTensorBytes | None:
    """CPU, one process: count live tensor bytes over the first steps, the CPU's counterpart of CUDA's
    max_memory_allocated. The process's peak RSS also holds the ~0.4 GB runtime and whatever the C
    allocator keeps mapped, which differs between arms by more than the tensors they hold. Only the
    first steps, as the count costs a Python call per op; under FSDP (DTensors) not at all."""
    if run.step.device.type != "cpu" or run.world.enabled:
        return None
    models = [m for m in (run.student, run.teacher) if m is not None]
    states = [t for s in run.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    return LiveTensorBytes(*weight_storages(*models), *states)


def _steps(run: Run, loop: _Loop, *, until: int) -> dict[str, float]:
    """Optimizer steps up to step ``until`` (at most ``total_steps``); returns the last one's metrics.
    After each step, if any rank was asked to stop: a checkpoint (unless this step just wrote one) and
    RunStopped."""
    config, progress, world = run.config, run.progress, run.world
    per_step = config.grad_accum * world.size
    last: dict[str, float] = {}
    while progress.step < min(until, run.total_steps):
        step_start = time.perf_counter()
        micro: list[dict[str, torch.Tensor]] = []
        try:
            micro = loop.batches(progress.micro_batches)  # on-policy: the student generates here
            result = train_step(
                run.student,
                run.teacher,
                micro,
                trainable=run.trainable,
                optimizer=run.optimizer,
                scheduler=run.scheduler,
                settings=run.step,
            )
        except NonFiniteTargets as err:
            raise TrainingError(
                f"step {progress.step + 1}: {err}: {_teacher_blamed(config)}; "
                f"{last_good(run.out / 'checkpoints')}."
            ) from err
        except NonFiniteError as err:
            raise TrainingError(
                f"step {progress.step + 1}: {err}; {last_good(run.out / 'checkpoints')}. Lower --lr, "
                "check the data, or use --dtype float32."
            ) from err
        except Exception as err:
            if not is_out_of_memory(err):
                raise
            lengths = [int(b["input_ids"].shape[1]) for b in micro]
            del micro
            _release_memory(run)
            # No batch yet: the student ran out while generating, up to --max-length tokens.
            length = max(lengths, default=config.max_length)
            raise out_of_memory(run, progress.step + 1, length, err) from err
        progress.step += 1
        progress.micro_batches += per_step
        progress.tokens += int(result["num_tokens"])
        if progress.tokens_processed is not None:
            progress.tokens_processed += int(result["tokens_processed"])
        last = _step_metrics(run, result, time.perf_counter() - step_start)
        if run.sampling is not None:
            last |= generation_cost(run, micro, time.perf_counter() - step_start)
        progress.last = last  # in the checkpoint: a resume at the last step still reports it
        _record(run, last, (loop.bar, loop.lines))
        saved = None
        if config.save_every and (progress.step % config.save_every == 0 or progress.step == run.total_steps):
            saved = _save(run, loop.clock)
        if loop.on_step is not None:
            loop.on_step(progress.step, last)
        if agreed(loop.stop, world, run.step.device):  # every rank, every step: all stop after the same one
            raise _stopped(run, loop.stop, saved or _save(run, loop.clock))
    return last


def _step_metrics(run: Run, result: dict[str, float], seconds: float) -> dict[str, float]:
    """The record of the step just made (a metrics.jsonl line)."""
    return {
        "step": run.progress.step,
        "loss": result["loss"],
        "ce_loss": result["ce_loss"],
        "kd_loss": result["kd_loss"],
        "lr": result["lr"],
        "grad_norm": result["grad_norm"],
        "tokens": run.progress.tokens,
        "tokens_per_s": result["num_tokens"] / seconds,
        "peak_memory_gb": peak_memory_gb(run.step.device),
    } | {k: result[k] for k in ("on_policy_kd_loss", "on_policy_tokens", "kd_positions") if k in result}


# The last step's losses summary.json keeps (on_policy_kd_loss: on-policy runs).
FINAL_LOSSES = ("loss", "ce_loss", "kd_loss", "on_policy_kd_loss")
# What the on-policy micro-batches of a run cost, summed over its steps (Progress.on_policy's keys).
GENERATION_TOTALS = ("seconds", "step_seconds", "samples", "tokens", "capped", "micro_batches", "sampled")


def generation_cost(run: Run, micro: list[dict[str, torch.Tensor]], seconds: float) -> dict[str, float]:
    """The step's generation cost (metrics.jsonl keys), all ranks together; adds it to the run's totals.

    ``generation_share``: the share of the step's wall time spent generating (the ranks' mean);
    ``generated_tokens_per_s``; ``mean_generated_length``; ``capped_share``: the share of samples that
    hit their cap without an end-of-turn token; ``on_policy_micro_batches``: sampled micro-batches.
    """
    world, device = run.world, run.step.device
    sampled = [b for b in micro if "on_policy" in b]
    step = {
        "seconds": all_reduce_sum(sum(float(b["on_policy_seconds"]) for b in sampled), world, device)
        / world.size,
        "step_seconds": seconds,
        "samples": all_reduce_sum(sum(int(b["input_ids"].shape[0]) for b in sampled), world, device),
        "tokens": all_reduce_sum(sum(int(b["on_policy_tokens"]) for b in sampled), world, device),
        "capped": all_reduce_sum(sum(int(b["on_policy_capped"]) for b in sampled), world, device),
        "micro_batches": float(len(micro) * world.size),
        "sampled": all_reduce_sum(float(len(sampled)), world, device),
    }
    totals = run.progress.on_policy or dict.fromkeys(GENERATION_TOTALS, 0.0)
    run.progress.on_policy = {k: totals.get(k, 0.0) + step[k] for k in GENERATION_TOTALS}
    return cost_record(step)


def cost_record(totals: dict[str, float]) -> dict[str, float]:
    """The generation cost of ``totals`` (a step's, or a run's) as metrics.jsonl and summary.json show
    it; the per-sample figures only where there were samples."""
    record = {
        "on_policy_micro_batches": totals["sampled"],
        "generation_share": totals["seconds"] / totals["step_seconds"] if totals["step_seconds"] else 0.0,
        "generated_tokens_per_s": totals["tokens"] / totals["seconds"] if totals["seconds"] else 0.0,
    }
    if totals["samples"]:
        record["mean_generated_length"] = totals["tokens"] / totals["samples"]
        record["capped_share"] = totals["capped"] / totals["samples"]
    return record


def _save(run: Run, clock: _Clock) -> Path:
    """A checkpoint of the current step (every rank calls it); a failed write names what was kept and
    how to resume once it is fixed."""
    progress = run.progress
    progress.elapsed_s += time.perf_counter() - clock.start
    clock.start = time.perf_counter()
    what = f"checkpoint step-{progress.step:06d}"
    if run.world.is_main and not run.out.is_dir():  # atomic writes would quietly create it again
        gone = OSError(errno.ENOENT, os.strerror(errno.ENOENT), str(run.out))
        raise output_error(run.out / "checkpoints", what, gone, "nothing: the output directory is gone")
    try:
        return save_checkpoint(
            run.out / "checkpoints",
            trainable=run.trainable,
            optimizer=run.optimizer,
            scheduler=run.scheduler,
            progress=progress,
            world=run.world,
            fingerprint=run.fingerprint,
        )
    except OutputError as err:
        raise OutputError(
            f"{err} Then resume with: {resume_command(run)}", path=err.path, errno=err.errno
        ) from err


def resume_command(run: Run) -> str:
    """The command that continues this run from its newest checkpoint (its config.yaml reproduces the
    options; under torchrun, with the same number of processes per node)."""
    args = ["distill", "--config", str(run.out / "config.yaml"), "--resume"]
    if not run.world.enabled:
        return shlex.join(["llm-neo", *args])
    local = int(os.environ.get("LOCAL_WORLD_SIZE", run.world.size))
    nodes = [f"--nnodes={run.world.size // local}"] if run.world.size > local else []
    launcher = ["torchrun", *nodes, f"--nproc-per-node={local}", "-m", "llm_neo"]
    note = " (with the rendezvous options you launched it with)" if nodes else ""
    return shlex.join([*launcher, *args]) + note


def _stopped(run: Run, stop: StopRequest, checkpoint: Path | None) -> RunStopped:
    """What a stop on request reports: the signal, the step, the checkpoint, the resume command."""
    how = f"by {stop.name}" if stop.requested else "by a signal to another rank"
    step = f"after step {run.progress.step} of {run.total_steps}"
    kept = f"checkpoint {checkpoint} written" if checkpoint is not None else "nothing new to keep"
    return RunStopped(f"stopped {how} {step}: {kept}", resume=resume_command(run), signal_name=stop.name)


def is_out_of_memory(err: BaseException) -> bool:
    """A CUDA out-of-memory error, Python's MemoryError, or torch's failed CPU allocation (a
    RuntimeError from its allocator)."""
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(err, RuntimeError) and "can't allocate memory" in str(err)


def _release_memory(run: Run) -> None:
    run.optimizer.zero_grad(set_to_none=True)
    if run.step.device.type == "cuda":
        torch.cuda.empty_cache()


def out_of_memory(run: Run, step: int, length: int, err: BaseException) -> OutOfMemory:
    """The OutOfMemory of step ``step`` (longest sequence ``length`` tokens): the settings that set a
    step's memory, the last checkpoint, and which options lower the peak, those not in use first."""
    c = run.config
    device = run.step.device
    where = "GPU" if device.type == "cuda" else "host"
    settings: dict[str, Any] = {
        "device": str(device),
        "method": c.method,
        "batch_size": c.batch_size,
        "grad_accum": c.grad_accum,
        "seq_len": length,
        "max_length": c.max_length,
        "loss_impl": c.loss_impl,
        "loss_chunk_size": c.loss_chunk_size,
        "gradient_checkpointing": c.gradient_checkpointing,
        "mlp_chunks": c.mlp_chunks,
        "lora_r": c.lora.r if c.uses_lora else None,
        "teacher_cache": bool(c.teacher_cache),
        "world_size": run.world.size,
    }
    advice = []
    if c.batch_size > 1:
        advice.append(
            f"--batch-size {c.batch_size // 2} --grad-accum {c.grad_accum * 2} (the same samples per step)"
        )
    if not c.gradient_checkpointing:
        advice.append("--gradient-checkpointing")
    elif c.mlp_chunks == 1:
        advice.append("--mlp-chunks 4 (with --gradient-checkpointing)")
    if c.loss_impl == "plain":
        advice.append("--loss-impl chunked (no [tokens x vocab] logits)")
    elif run.step.loss.chunk_size > 128:
        advice.append(f"--loss-chunk-size {run.step.loss.chunk_size // 2}")
    if run.teacher is not None and not c.teacher_cache:
        advice.append("a teacher cache (llm-neo cache-teacher, then --teacher-cache: no teacher in memory)")
    if length > 256:
        advice.append(f"a smaller --max-length (the longest sequence here: {length} tokens)")
    plan = shlex.join(
        ["llm-neo", "plan", "--student", str(c.student)]
        + (["--teacher", str(c.teacher)] if c.teacher else [])
        + ["--batch-size", str(c.batch_size), "--seq-len", str(max(length, 2)), "--methods", c.method]
        + ["--loss-chunk-size", str(c.loss_chunk_size)]
        + (["--lora-r", str(c.lora.r)] if c.uses_lora else [])
        + (
            ["--gradient-checkpointing", "--mlp-chunks", str(c.mlp_chunks)]
            if c.gradient_checkpointing
            else []
        )
        + (["--world-size", str(run.world.size)] if run.world.enabled else [])
    )
    message = (
        f"step {step} ran out of {where} memory on {device} ({type(err).__name__}) with --batch-size "
        f"{c.batch_size} x --grad-accum {c.grad_accum}, sequences up to {length} tokens (--max-length "
        f"{c.max_length}), --loss-impl {c.loss_impl} (--loss-chunk-size {c.loss_chunk_size}), gradient "
        f"checkpointing {'on' if c.gradient_checkpointing else 'off'}; "
        f"{last_good(run.out / 'checkpoints')}. "
        f"To lower the peak: {'; '.join(advice) if advice else 'a device with more memory'}. "
        f"`{plan}` estimates the memory of these settings (add the options above to compare)."
    )
    return OutOfMemory(message, step=step, settings=settings)


def _record(run: Run, last: dict[str, float], progress: tuple[Any, ProgressLines]) -> None:
    """One step's metrics: a metrics.jsonl record every --log-every steps, and the progress bar (on a
    terminal) or a plain progress line now and then (without one)."""
    bar, lines = progress
    step = int(last["step"])
    if run.world.is_main and (step % run.config.log_every == 0 or step == run.total_steps):
        path = run.out / "metrics.jsonl"
        what = f"the metrics of step {step}"
        # Appended: on resume a torn last line (a write cut short) is dropped.
        with writing(path, what, kept=lambda: last_good(run.out / "checkpoints")), path.open("a") as handle:
            handle.write(json.dumps(last) + "\n")
        run.trackers.log(step, last)
    bar.set_postfix(
        loss=f"{last['loss']:.4f}",
        ce=f"{last['ce_loss']:.4f}",
        kd=f"{last['kd_loss']:.4f}",
        tok_s=f"{last['tokens_per_s']:.0f}",
        refresh=False,
    )
    bar.update(1)
    loss = f"loss {last['loss']:.4f}"
    if run.step.loss.kd_ratio > 0:
        loss += f" (ce {last['ce_loss']:.4f}, kd {last['kd_loss']:.4f}"
        if "on_policy_kd_loss" in last:  # per sampled token; ce and kd are per data token
            loss += (
                f", on-policy kd {last['on_policy_kd_loss']:.4f}, generating {last['generation_share']:.0%}"
            )
        loss += ")"
    lines.update(step, tokens=int(last["tokens"]), details=loss)


def _teacher_blamed(config: DistillConfig) -> str:
    """Where a non-finite KD term beside a finite CE comes from, and the fix: the teacher's log-probs
    (the student's finite CE rules out its own weights, the data and the learning rate)."""
    if config.teacher_cache:
        return (
            f"the teacher cache {config.teacher_cache} holds non-finite log-probs (its teacher gave NaN): "
            "check that teacher's weights, then make the cache again with llm-neo cache-teacher "
            "--overwrite (it now refuses a NaN teacher)"
        )
    return (
        f"the teacher {config.teacher} gives non-finite log-probs on this batch although its weights are "
        "finite: its logits overflow in this precision (use --dtype float32 or --teacher-quant none) or the "
        "teacher is broken; lowering --lr will not help"
    )


def _collate(
    batch: list[Example], pad_token_id: int, cache: TeacherCache | None, cross: CrossRun | None = None
) -> dict[str, torch.Tensor]:
    """``collate``, plus the batch's cached teacher targets (rows in ``targets[trained]`` order): each
    example's cache row is its index among the data's tokenized examples; or, across tokenizers, the
    teacher's own tokens and where they align."""
    out = collate(batch, pad_token_id)
    if cache is not None:
        out |= batch_targets(cache, [ex.index for ex in batch])
    if cross is not None:
        out |= cross_batch(batch, cross)
    return out


def train_step(
    student: torch.nn.Module,
    teacher: torch.nn.Module | None,
    micro: list[dict[str, torch.Tensor]],
    *,
    trainable: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    settings: StepSettings,
) -> dict[str, float]:
    """One optimizer step over the micro-batches ``micro`` (gradient accumulation); returns its metrics.

    The loss is a mean over the step's trained tokens (over all ranks), not a mean of micro-batch means,
    so splitting a batch into micro-batches or over processes does not change the update. An on-policy
    micro-batch (the student's samples) adds its divergence alone to that sum (``StepSettings.on_policy``).
    """
    world, device = settings.world, settings.device
    local_tokens = sum(int((next_token_targets(b["labels"]) != IGNORE_INDEX).sum()) for b in micro)
    num_tokens = int(all_reduce_sum(local_tokens, world, device))
    # Every real token the student ran through (prompt + response), what a throughput of the step is.
    processed = int(all_reduce_sum(sum(int(b["attention_mask"].sum()) for b in micro), world, device))
    ce_sum = kd_sum = on_sum = 0.0
    on_tokens = 0
    finite = True
    for batch in micro:
        sampled = "on_policy" in batch
        batch_settings = settings
        if sampled:
            assert settings.on_policy is not None
            batch_settings = dataclasses.replace(settings, loss=settings.on_policy)
        parts = micro_batch_loss(student, teacher, batch, settings=batch_settings, num_tokens=num_tokens)
        finite &= bool(torch.isfinite(parts.loss))
        # Backward even when not finite: under FSDP every rank must take part in every reduce-scatter.
        parts.loss.backward()
        if sampled:  # its CE is the student's log-likelihood of its own samples: no loss term, not shown
            on_sum += float(parts.kd_sum)
            on_tokens += parts.num_tokens
        else:
            ce_sum += float(parts.ce_sum)
            kd_sum += float(parts.kd_sum)
    ce_sum, kd_sum = all_reduce_sum(ce_sum, world, device), all_reduce_sum(kd_sum, world, device)
    if settings.on_policy is not None:
        on_sum = all_reduce_sum(on_sum, world, device)
        on_tokens = int(all_reduce_sum(on_tokens, world, device))
        kd_sum += on_sum  # for the finiteness check below; the record splits them again
    params = list(trainable.values())
    sync_whole_grads(params, world)
    grad_norm = clip_grad_norm(params, settings.max_grad_norm, world)
    if all_reduce_sum(float(not finite), world, device) > 0:
        optimizer.zero_grad(set_to_none=True)
        if math.isfinite(ce_sum) and not math.isfinite(kd_sum):  # the student is fine, its targets not
            raise NonFiniteTargets(f"non-finite KD term (kd sum {kd_sum:.4g}), finite CE ({ce_sum:.4g})")
        raise NonFiniteError(f"non-finite loss (ce sum {ce_sum:.4g}, kd sum {kd_sum:.4g})")
    if not torch.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteError("non-finite gradient norm")
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    kd_ratio = settings.loss.kd_ratio
    # CE and KD per token of the data; the on-policy divergence per sampled token
    kd_sum -= on_sum
    ce, kd = ce_sum / max(num_tokens - on_tokens, 1), kd_sum / max(num_tokens - on_tokens, 1)
    losses = {"loss": (1 - kd_ratio) * ce + kd_ratio * kd, "ce_loss": ce, "kd_loss": kd}
    if on_tokens:
        losses["loss"] = ((1 - kd_ratio) * ce_sum + kd_ratio * kd_sum + on_sum) / num_tokens
    if settings.on_policy is not None:
        losses |= {"on_policy_kd_loss": on_sum / max(on_tokens, 1), "on_policy_tokens": on_tokens}
    if any("xt_rows" in b or "teacher_kd_rows" in b for b in micro) and settings.loss.kd_ratio > 0:
        # the aligned positions KD was taken on (online, or the cross-tokenizer cache's rows)
        aligned = sum(aligned_rows(b) for b in micro)
        losses["kd_positions"] = int(all_reduce_sum(aligned, world, device))
    return losses | {
        "num_tokens": num_tokens,
        "tokens_processed": processed,
        "grad_norm": float(grad_norm),
        "lr": float(lr),
    }


def aligned_rows(batch: dict[str, torch.Tensor]) -> int:
    """The trained rows of a micro-batch that have a cross-tokenizer KD target (0 for any other batch)."""
    if "teacher_kd_rows" in batch:
        return int(batch["teacher_kd_rows"].sum())
    return int(batch["xt_rows"].numel()) if "xt_rows" in batch else 0


def micro_batch_loss(
    student: torch.nn.Module,
    teacher: torch.nn.Module | None,
    batch: dict[str, torch.Tensor],
    *,
    settings: StepSettings,
    num_tokens: int,
) -> LossParts:
    """CE and KD of one micro-batch, both on exactly the trained next-token positions.

    ``chunked`` (default) runs the decoders to their final hidden states and applies the lm_heads chunk
    by chunk inside the loss, so no [tokens × vocab] logits exist for the batch; ``plain`` is the
    straightforward reference: full logits from both models; ``liger`` hands the same hidden states to
    Liger-Kernel's fused loss (only where a teacher runs: CE alone and cached teachers stay chunked).
    """
    device, dtype, options = settings.device, settings.dtype, settings.loss
    input_ids = batch["input_ids"].to(device)
    attention_mask = batch["attention_mask"].to(device)
    targets = next_token_targets(batch["labels"]).to(device)  # [B, T]: the token each position predicts
    trained = targets != IGNORE_INDEX  # [B, T]
    cached = unpack_targets(batch, device) if options.kd_ratio > 0 else None  # [N, k] ids/log-probs, [N]
    use_teacher = cached is None and teacher is not None and options.kd_ratio > 0
    if use_teacher and settings.cross is not None:
        assert teacher is not None
        return _cross_loss(student, teacher, batch, settings=settings, num_tokens=num_tokens)
    if settings.impl == "plain":
        with autocast(device, dtype):
            student_logits = student(input_ids=input_ids, attention_mask=attention_mask).logits  # [B, T, V_s]
        teacher_logits: torch.Tensor | None = None
        if use_teacher:
            assert teacher is not None
            with torch.inference_mode(), autocast(device, dtype):
                teacher_full = teacher(
                    input_ids=input_ids, attention_mask=attention_mask
                ).logits  # [B, T, V_t]
            teacher_logits = teacher_full[
                trained
            ]  # [N, V_t]; indexed outside inference mode: a normal tensor
        reference = cached if cached is not None else teacher_logits
        return distill_loss(
            student_logits[trained], targets[trained], reference, options=options, num_tokens=num_tokens
        )

    with autocast(device, dtype):
        hidden = final_hidden_states(student, input_ids, attention_mask)[trained]  # [N, H_s]
    student_head = HeadInput(hidden, *lm_head(student), logit_softcap(student))
    teacher_head: HeadInput | None = None
    if use_teacher:
        assert teacher is not None
        with torch.inference_mode(), autocast(device, dtype):
            teacher_hidden = final_hidden_states(teacher, input_ids, attention_mask)[trained]  # [N, H_t]
        teacher_head = HeadInput(teacher_hidden, *lm_head(teacher), logit_softcap(teacher))
    # A cross-tokenizer cache: KD on the rows that have a target, as _cross_loss takes it.
    kd_rows = batch.get("teacher_kd_rows") if cached is not None else None
    kd_rows = None if kd_rows is None else kd_rows.to(device)
    # The lm_head matmuls run in the compute dtype, as the plain path's do.
    with autocast(device, dtype):
        if settings.impl == "liger" and teacher_head is not None:
            return liger_distill_loss(
                student_head, targets[trained], teacher_head, options=options, num_tokens=num_tokens
            )
        return chunked_distill_loss(
            student_head,
            targets[trained],
            cached if cached is not None else teacher_head,
            options=options,
            num_tokens=num_tokens,
            kd_rows=kd_rows,
        )


def _cross_loss(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    *,
    settings: StepSettings,
    num_tokens: int,
) -> LossParts:
    """``micro_batch_loss`` across tokenizers: CE on every trained student position, KD (the divergence
    on the mapped top-k, or ULD) on the aligned ones, against one teacher forward on its own tokens."""
    device, dtype, options = settings.device, settings.dtype, settings.loss
    assert settings.cross is not None
    targets = next_token_targets(batch["labels"]).to(device)  # [B, T]
    trained = targets != IGNORE_INDEX  # [B, T]
    with autocast(device, dtype):
        hidden = final_hidden_states(
            student, batch["input_ids"].to(device), batch["attention_mask"].to(device)
        )[trained]  # [N, H_s]
    teacher_targets, kd_rows = cross_targets(
        teacher,
        batch,
        settings.cross,
        hidden.shape[0],
        device=device,
        dtype=dtype,
        temperature=options.temperature,
        chunk_size=options.chunk_size,
    )
    student_head = HeadInput(hidden, *lm_head(student), logit_softcap(student))
    with autocast(device, dtype):
        return chunked_distill_loss(
            student_head,
            targets[trained],
            teacher_targets,
            options=options,
            num_tokens=num_tokens,
            kd_rows=kd_rows,
        )


# ----------------------------------------------------------------------------------------------------
# finish


def _cross_cache_heldout(
    run: Run, merged: PreTrainedModel, common: dict[str, Any]
) -> tuple[dict[str, float], str | None]:
    """Held-out metrics of a run from a cross-tokenizer cache alone: CE, and ``aligned_kl_to_teacher``
    from the cache's held-out rows where they hold what the online metric computes (shared-vocab at
    T = 1: the teacher's top-k + tail in the student's ids at the exactly aligned positions); else no
    divergence, said in the log."""
    cache = run.cache
    assert cache is not None
    metrics = heldout_metrics(merged, run.heldout, None, **common)
    if cache.cross_tokenizer != "shared-vocab" or cache.temperature != 1.0:
        log.info(
            "held-out: no aligned_kl_to_teacher: the cache holds %s targets at T = %g, not the shared-vocab "
            "ones at T = 1 the metric compares; give --teacher too to score it",
            cache.cross_tokenizer,
            cache.temperature,
        )
        return metrics, None

    def cached(examples: Sequence[Example]) -> tuple[TopKTargets, torch.Tensor]:
        rows = [ex.index for ex in examples]
        return cache.targets(rows), cache.kd_rows(rows)

    metrics |= cached_aligned_heldout(merged, run.heldout, cached, student_vocab=cache.vocab_size, **common)
    return metrics, "teacher_cache_aligned"


def _gather_to_rank0(run: Run) -> bool:
    """Under torchrun, gather the trained weights into rank 0, which rebuilds a plain student and goes
    on alone (merge, verify and export need whole weights); True on the rank that finishes the run."""
    if not run.world.enabled:
        return True
    whole = gather_state(dict(run.trainable))
    run.trainable.clear()
    run.student = run.teacher = None
    barrier(run.world)
    close(run.world)
    if not run.world.is_main:
        return False
    run.student, _ = _build_student(run.config, run.step.dtype, run.step.device)
    for name, param in trainable_parameters(run.student).items():
        load_whole_into(param, whole[name])
    return True


def finish(run: Run, trained: Trained) -> RunSummary:
    """Merge and verify (LoRA arms), export, score on the held-out split, write summary.json."""
    return_free_heap()  # the steps' freed activations: so that the finish phase stays below their peak
    merged, merge_diff, exported = _merge_and_export(run)
    return_free_heap()  # and the merge check's and the save's
    metrics, reference = _heldout(run, merged)
    config, device = run.config, run.step.device
    summary = RunSummary(
        llm_neo_version=__version__,
        method=config.method,
        config=to_dict(config),
        steps=run.progress.step,
        tokens_trained=run.progress.tokens,
        tokens_processed=run.progress.tokens_processed,
        samples={k: run.samples[k] for k in ("train", "heldout", "dropped")},
        final={k: trained.last[k] for k in FINAL_LOSSES if k in trained.last} if trained.last else {},
        heldout=metrics,
        heldout_reference=reference,
        teacher_cache=None
        if run.cache is None
        else {
            "path": str(run.cache.path),
            "key_digest": run.cache.manifest["key_digest"],
            "top_k": run.cache.top_k,
            "temperature": run.cache.temperature,
        },
        train_time_s=trained.train_seconds,
        wall_time_s=time.perf_counter() - run.started,
        peak_memory_gb=max(trained.peaks),
        peak_memory_gb_per_rank=trained.peaks,
        world_size=run.world.size,
        teacher_parameters_per_rank=trained.teacher_shards if config.uses_kd else [],
        peak_memory_kind="cuda_max_allocated" if device.type == "cuda" else "process_max_rss",
        peak_tensor_memory_gb=max(trained.peaks) if device.type == "cuda" else trained.tensor_peak_gb,
        peak_tensor_memory_steps=trained.tracked_steps,
        trainable_parameters=run.n_trainable,
        student_parameters=run.base_parameters,
        merged_parameters=sum(p.numel() for p in merged.parameters()),
        merge_check=_merge_record(config, merge_diff),
        device=str(device),
        dtype=str(run.step.dtype).removeprefix("torch."),
        export_dtype=str(run.export_dtype).removeprefix("torch."),
        teacher_quant=run.teacher_quant,
        student_quant=run.student_quant,
        export=exported,
        on_policy=_on_policy_summary(run),
        pair=_pair_record(run.cross, run.cache),
        provenance=provenance(
            models={"student": config.student, "teacher": config.teacher},
            data={"train": config.data},
            started=time.time() - (time.perf_counter() - run.started),  # this process's start
        ),
    )
    with writing(run.out / SUMMARY_FILE, "the run's summary", kept=lambda: _kept_outputs(run)):
        atomic_write_json(run.out / SUMMARY_FILE, summary.to_json())
    return summary


def _on_policy_summary(run: Run) -> OnPolicySummary | None:
    """summary.json's ``on_policy``: the sampling used, and the generation cost over every step (the
    totals travel in the checkpoints, so a resumed run counts the steps before it too)."""
    if run.sampling is None:
        return None
    totals = run.progress.on_policy or dict.fromkeys(GENERATION_TOTALS, 0.0)
    cost = cost_record(totals)
    return OnPolicySummary(
        share=run.sampling.share,
        divergence=run.config.on_policy_divergence,
        sample_temperature=run.sampling.sampling.temperature,
        sample_top_p=run.sampling.sampling.top_p,
        max_new_tokens=run.sampling.max_new_tokens,
        micro_batches=int(totals["micro_batches"]),
        on_policy_micro_batches=int(totals["sampled"]),
        generation_share=cost["generation_share"],
        generated_tokens_per_s=cost["generated_tokens_per_s"],
        mean_generated_length=cost.get("mean_generated_length"),
        capped_share=cost.get("capped_share"),
        cached_student=run.sampling.cached_student,
    )


def _merge_record(config: DistillConfig, merge_diff: float) -> dict[str, Any]:
    """summary.json's ``merge_check``: the verified merge of a LoRA arm, or that there was none to
    check (sft and kd train the student itself: nothing is merged)."""
    if not config.uses_lora:
        return {
            "applicable": False,
            "reason": f"--method {config.method} trains every weight; nothing is merged",
        }
    return {
        "applicable": True,
        "max_abs_logit_diff": merge_diff,
        "tolerance": config.merge_tolerance,
        "passed": merge_diff <= config.merge_tolerance,
    }


def _kept_outputs(run: Run) -> str:
    """What a failed write at the end of a run leaves to use: the exported models, the adapter, the
    newest checkpoint (from which --resume redoes only the merge and export)."""
    kept = [f"{name}/ in {run.out}" for name in ("merged", "adapter") if (run.out / name).is_dir()]
    found = list_checkpoints(run.out / "checkpoints")
    if found and run.progress.step == step_number(found[-1]):
        kept.append(
            f"checkpoint {found[-1]} (after fixing it: {resume_command(run)}, which only merges and exports)"
        )
    elif found:
        kept.append(f"checkpoint {found[-1]} (an earlier step; resume: {resume_command(run)})")
    else:
        kept.append("no checkpoint of the trained weights (--save-every 0)")
    return "; ".join(kept)


def _merge_and_export(run: Run) -> tuple[PreTrainedModel, float, dict[str, Any] | None]:
    """LoRA arms: save the adapter, merge the branches in fp32 and prove on held-out data that the
    merged model computes the adapter model's logits. Then save the student in its published dtype,
    prove the files reload bit-exact, and export it as --export asks. Returns the merged model (fp32),
    the merge check's diff and the export's record."""
    config, student = run.config, run.student
    verify_batch = _check_batch(config, run.train, run.heldout, run.tokenizer)
    merge_diff = 0.0
    if isinstance(student, PeftModel):
        with (
            writing(run.out / "adapter", "the LoRA adapter", kept=lambda: _kept_outputs(run)),
            atomic_directory(run.out / "adapter") as tmp,
        ):
            save_adapter(student, tmp)
        if config.student_quant != "none":
            merged, merge_diff = _merge_quantized(run, verify_batch)
        else:
            student.eval()
            student.float()  # merge and verify in fp32: the check must measure the merge, not rounding
            merged, merge_diff = merge_verified(
                student, verify_batch, run.step.device, chunk_size=run.step.loss.chunk_size
            )
        if merge_diff > config.merge_tolerance:
            raise TrainingError(
                f"merge check failed: merged and adapter logits differ by up to {merge_diff:.3g} "
                f"(--merge-tolerance {config.merge_tolerance:g}); adapter kept in {run.out / 'adapter'}"
            )
    else:
        merged = student.eval().float()
    merged_parameters = sum(p.numel() for p in merged.parameters())
    if merged_parameters != run.base_parameters:
        raise TrainingError(
            f"merged model has {merged_parameters:,} parameters, the student {run.base_parameters:,}"
        )
    with writing(run.out / "merged", "the exported student", kept=lambda: _kept_outputs(run)):
        save_model_dir(merged, run.tokenizer, run.out / "merged", run.export_dtype)
    exported = None
    if config.export:
        fmt, kind = parse_export_spec(config.export)
        with writing(run.out / "export", f"the {config.export} export", kept=lambda: _kept_outputs(run)):
            # The file is named after the run (its output directory), not after "merged", its source
            record = export_model(
                run.out / "merged", fmt, kind, run.out / "export", overwrite=True, name=run.out.resolve().name
            )
        exported = {
            "format": fmt,
            "gguf_type": kind,
            "path": str(run.out / "export"),
            "file": record.get("file"),
            "bytes": record["bytes"],
            "verification": record["verification"],
            "record": EXPORT_FILE,
        }
    return merged, merge_diff, exported


def _merge_quantized(run: Run, batch: dict[str, torch.Tensor]) -> tuple[PreTrainedModel, float]:
    """QLoRA: merge onto a freshly loaded copy of the quantized base, dequantized exactly
    (``models.quant.merge_quantized``), and compare with the adapter on the trained base in train-mode
    forwards without dropout: on a CPU bitsandbytes repacks a 4-bit weight at its first eval-mode
    forward, so the trained base never runs one."""
    config, device = run.config, run.step.device
    student = run.student
    float32_compute(student)  # compute in fp32 (its quantized weights keep their values)
    load_base = functools.partial(_load_quantized_student, config, run.step.dtype, device)
    return merge_verified(
        student,
        batch,
        device,
        chunk_size=run.step.loss.chunk_size,
        merge=functools.partial(merge_quantized, load_base=load_base, dtype=torch.float32),
        forward_mode=train_mode_without_dropout,
    )


def _heldout(run: Run, merged: PreTrainedModel) -> tuple[dict[str, float], str | None]:
    """Held-out metrics of the deployed (merged) student against the teacher where there is one (the
    cache's top-k buckets when only a cache is given), and what they were measured against."""
    if not run.heldout:
        cached = "teacher_cache" if run.cache and run.cache.sampling is None else None
        return {}, "teacher" if run.teacher is not None else cached
    config, device, dtype = run.config, run.step.device, run.step.dtype
    teacher = run.teacher
    if teacher is None and config.teacher:
        teacher, _ = _load_teacher(config, dtype, device)  # quantized as in training; drift: the cache's
    common: dict[str, Any] = {
        "pad_token_id": run.tokenizer.pad_token_id,
        "batch_size": config.eval_batch_size,
        "device": device,
        "dtype": dtype,
        "chunk_size": config.loss_chunk_size,  # the training chunk: evaluation needs no more memory
    }
    if teacher is None and run.cache is not None and run.cache.sampling is not None:
        # The cache holds the teacher on student samples, not on the held-out responses: no reference.
        metrics = heldout_metrics(merged, run.heldout, None, **common)
        reference: str | None = None
    elif run.cross is not None and teacher is not None:
        # Across vocabularies kl_to_teacher has no meaning: CE here, the divergence on aligned positions.
        metrics = heldout_metrics(merged, run.heldout, None, **common)
        metrics |= aligned_heldout(merged, teacher, run.heldout, run.cross, **common)
        reference = "teacher_aligned"
    elif teacher is None and run.cache is not None and run.cache.cross_tokenizer is not None:
        metrics, reference = _cross_cache_heldout(run, merged, common)
    elif teacher is None and run.cache is not None:  # no --teacher: score against the cached teacher
        metrics = heldout_metrics(merged, run.heldout, run.cache, **common)
        reference = "teacher_cache"
    else:
        kd_vocab = kd_vocab_size(run.tokenizer, merged, teacher) if teacher is not None else None
        metrics = heldout_metrics(merged, run.heldout, teacher, kd_vocab_size=kd_vocab, **common)
        reference = "teacher" if teacher is not None else None
    log.info("held-out: %s", ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    if warning := small_heldout(len(run.heldout), int(metrics["tokens"])):
        log.warning("held-out: %s", warning)
    return metrics, reference
