"""`llm-neo demo`: the paper's comparison end to end on a laptop CPU, with a report.

Top to bottom, every stage through the same code a user's run takes:

    1. task      the built-in task's train.jsonl / heldout.jsonl (llm_neo.demo.task), ordinary Alpaca JSONL
    2. teacher   a small Llama with its own character-level tokenizer, trained from a random init on the
                 task (``distill(method="sft")``), cached under a key of everything that shapes it
    3. student   the teacher depth-pruned by measured block importance (``llm_neo.commands.prune.run_prune``):
                 the paper's pruned-student setting
    4. arms      sft, lora, kd and neo on the same data, seed and step budget (``distill(method=m)``),
                 each in its own process so that its peak memory is its own
    5. eval      on the held-out split: exact match of greedy generations (overall and per skill), CE,
                 KL to the teacher and top-1 agreement with it
    6. report    report.md with a results table and PNG plots, results.json (llm_neo.demo.report)

The settings are the paper's where they apply (kd_ratio 0.5, forward KL, LoRA on every linear layer of
every block with alpha = 2r, cosine schedule with 10% warm-up, LoRA lr = 10x the full-parameter lr) and
sized so that the whole demo fits in 10 minutes on 2 CPU cores; ``DEFAULT`` and ``QUICK`` below say why
each number is what it is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llm_neo import __version__
from llm_neo.config import DistillConfig, LoraOptions, _help
from llm_neo.errors import ConfigError
from llm_neo.runtime.atomic import atomic_directory, atomic_write_json, remove_outputs
from llm_neo.runtime.workers import Job, Report, available_cores, load_average, run_jobs
from llm_neo.summary import RunSummary

log = logging.getLogger("llm_neo")

ARMS = ("sft", "lora", "kd", "neo")
# --exact-memory: glibc serves blocks from 64 KB up with mmap (see llm_neo.runtime.memory.set_mmap_threshold).
EXACT_MEMORY_MMAP_THRESHOLD = 64 * 1024
# What the worker processes import once, before the first job.
PRELOAD = ("llm_neo.distill", "llm_neo.demo.run", "llm_neo.demo.task")
# After a stop (SIGTERM, Ctrl-C): the arms start over, the trained teacher is reused from its cache.
AGAIN = "the same llm-neo demo command (it starts over; a trained teacher is reused from its cache)"
# What a demo writes in its output directory (and replaces on the next run).
OUTPUTS = ("data", "student", "arms", "plots", "report.md", "results.json")
# Per-run results that the report aggregates over seeds (mean, std, min, max).
NUMERIC = (
    "accuracy",
    "ce",
    "kl_to_teacher",
    "top1_agreement",
    "peak_memory_gb",
    "peak_tensor_memory_gb",
    "train_time_s",
    "wall_time_s",
    "training_state_mb",
    "planned_peak_mb",
)


@dataclass
class DemoConfig:
    """`llm-neo demo`: teacher, pruned student and the four arms on a built-in task, with a report."""

    output_dir: str = field(
        default="runs/demo", metadata=_help("Where the data, the arms' runs and the report are written.")
    )
    seeds: int | None = field(
        default=None,
        metadata=_help(
            "Repeat the four arms over this many seeds and report mean ± std. Default 3 (quick: 1)."
        ),
    )
    quick: bool = field(
        default=False,
        metadata=_help("A reduced demo in about a minute: tiny models, a few steps, one seed (for tests)."),
    )
    steps: int | None = field(
        default=None, metadata=_help("Optimizer steps of each arm (the same for all four). Default 200.")
    )
    teacher_steps: int | None = field(
        default=None, metadata=_help("Optimizer steps of the teacher's training. Default 3000.")
    )
    seed: int = field(
        default=0,
        metadata=_help(
            "Seed of the task data and the teacher; the arms run with seeds seed, seed+1, ... "
            "(a new seed trains a new teacher)."
        ),
    )
    cache_dir: str | None = field(
        default=None,
        metadata=_help(
            "Where trained teachers are cached (keyed by task version, seed, shape and training "
            "settings). Default $XDG_CACHE_HOME/llm-neo/demo, i.e. ~/.cache/llm-neo/demo."
        ),
    )
    overwrite: bool = field(
        default=False,
        metadata=_help(
            "Write into an --output-dir that holds other files too (an earlier demo's outputs are "
            "always replaced; other files are left alone)."
        ),
    )
    exact_memory: bool = field(
        default=False,
        metadata=_help(
            "Measure the arms' peak memory without allocator slack: glibc returns every freed block of 64 KB "
            "or more to the system at once, so the peak RSS tracks live memory. About 2x slower arms."
        ),
    )
    jobs: int | None = field(
        default=None,
        metadata=_help(
            "Arms trained (and models evaluated) at once, each in its own process with cores/jobs "
            "threads. Default 2 (1 on a single core)."
        ),
    )
    device: str = field(default="cpu", metadata=_help("cpu (the demo's target), auto, cuda or cuda:N."))


@dataclass(frozen=True)
class DemoSettings:
    """Everything that sizes the demo. Not options: the presets below, with ``steps``/seeds overrides."""

    # task
    train_per_skill: int  # the teacher's training split
    distill_per_skill: int  # the arms' data: fresh records, disjoint from the teacher's (see run_demo)
    heldout_per_skill: int
    # teacher: a Llama trained from scratch
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    teacher_steps: int
    teacher_lr: float
    # student and arms
    keep_layers: int
    arm_steps: int
    full_lr: float  # sft, kd; LoRA arms use 10x (the paper's rule)
    lora_r: int
    batch_size: int
    max_length: int
    seeds: int
    prune_samples: int

    @property
    def lora_lr(self) -> float:
        return 10 * self.full_lr


# Sized for 2 CPU cores: about 3 minutes of teacher training, then 12 arms of 200 steps, two at a time.
# - The teacher (4 blocks, hidden 128, 0.7 M parameters) is the smallest Llama found to learn all five
#   skills to >= 90% held-out exact match from scratch in 3000 steps of 32 (about 3 epochs of the 30 k
#   training records: fewer, larger epochs memorise instead of generalising). From-scratch training needs
#   a far higher lr than fine-tuning: 3e-3 here, against the paper's 2e-5 for fine-tuning.
# - The student keeps half the blocks: the paper's depth-pruned setting, and enough lost skill to recover.
# - full_lr is the teacher's lr / 10 (fine-tuning a trained network takes a smaller step than training it
#   from scratch); the LoRA arms use 10x that, the paper's rule, i.e. the teacher's own lr.
# - r = 16 on hidden 128 is above the paper's r/hidden ratio (64 on 2048), as one of its authors advises
#   when KD has to pass through a LoRA branch; alpha = 2r as in the paper.
# - The arms' data is one epoch of their budget (200 steps x 32) of task records the teacher never saw.
DEFAULT = DemoSettings(
    train_per_skill=6000,
    distill_per_skill=1280,  # x 5 skills = 6400 = 200 steps x 32: one epoch of the arms
    heldout_per_skill=40,
    hidden_size=128,
    num_layers=4,
    num_heads=4,
    intermediate_size=256,
    teacher_steps=3000,
    teacher_lr=3e-3,
    keep_layers=2,
    arm_steps=200,
    full_lr=3e-4,
    lora_r=16,
    batch_size=32,
    max_length=64,
    seeds=3,
    prune_samples=256,
)

# A smoke test of every stage (the test suite runs it): tiny models, a few steps. Its teacher is not
# competent and its numbers mean nothing; the report says so.
QUICK = DemoSettings(
    train_per_skill=40,
    distill_per_skill=20,
    heldout_per_skill=4,
    hidden_size=32,
    num_layers=2,
    num_heads=2,
    intermediate_size=64,
    teacher_steps=10,
    teacher_lr=3e-3,
    keep_layers=1,
    arm_steps=3,
    full_lr=3e-4,
    lora_r=4,
    batch_size=8,
    max_length=64,
    seeds=1,
    prune_samples=16,
)


def resolve_settings(config: DemoConfig) -> DemoSettings:
    base = QUICK if config.quick else DEFAULT
    return dataclasses.replace(
        base,
        arm_steps=config.steps if config.steps is not None else base.arm_steps,
        teacher_steps=config.teacher_steps if config.teacher_steps is not None else base.teacher_steps,
        seeds=config.seeds if config.seeds is not None else base.seeds,
    )


def validate_demo(config: DemoConfig) -> None:
    p: list[str] = []
    if not config.output_dir:
        p.append("--output-dir is required")
    out = Path(config.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        p.append(f"--output-dir: {config.output_dir!r} is a file; give a directory")
    elif out.is_dir() and not config.overwrite:
        # An earlier demo's outputs are replaced (running `llm-neo demo` again is the point of the cached
        # teacher); anything else in the directory is someone else's, and the demo will not mix with it.
        foreign = sorted(entry.name for entry in out.iterdir() if entry.name not in OUTPUTS)
        if foreign:
            p.append(
                f"--output-dir: {config.output_dir!r} holds files that are not an earlier demo's "
                f"({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}); choose another "
                "--output-dir, or pass --overwrite to write the demo's outputs beside them"
            )
    for name, value in (
        ("seeds", config.seeds),
        ("steps", config.steps),
        ("teacher-steps", config.teacher_steps),
    ):
        if value is not None and value < 1:
            p.append(f"--{name}: {value} is out of range; it must be >= 1")
    if p:
        raise ConfigError(p)


def default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "llm-neo" / "demo"


# ------------------------------------------------------------------------------------------------
# The demo, top to bottom.


def run_demo(config: DemoConfig) -> int:
    """Run every stage, write the report, print the table and a summary line; return the exit code."""
    from transformers.utils import logging as hf_logging

    from llm_neo.demo.report import format_results_table, write_report
    from llm_neo.demo.task import TASK_VERSION

    validate_demo(config)
    settings = resolve_settings(config)
    hf_logging.disable_progress_bar()  # "Writing model shards" bars for kilobyte-sized models are noise
    started = time.perf_counter()
    out = Path(config.output_dir).expanduser()
    _clear_output_dir(out)
    cache = Path(config.cache_dir).expanduser() if config.cache_dir else default_cache_dir()
    device = config.device
    parallel, threads = _resources(config)
    loads = [load_average()]  # sampled at each stage
    timing: dict[str, float] = {}
    cpu_s: dict[str, float] = {}  # CPU seconds of the worker processes, per stage
    seeds = [config.seed + k for k in range(settings.seeds)]
    _say(
        f"llm-neo demo{' --quick' if config.quick else ''}: teacher -> pruned student -> "
        f"{', '.join(ARMS)} x {len(seeds)} seed(s), {settings.arm_steps} steps each; output {out}"
    )

    # --- 1. The task, as ordinary JSONL files: the teacher's training split, the arms' data and the
    # held-out split everything is evaluated on. The arms' data is fresh, not a part of the teacher's
    # training split: a teacher trained to near-zero loss on its own training records gives them almost
    # one-hot distributions, so KD on them would be CE under another name. On records it has not seen,
    # its distribution is its own prediction, the thing KD is meant to transfer (and the paper's teacher
    # was not trained on its distillation data either).
    train_path, distill_path, heldout_path = write_task_data(out / "data", settings, config.seed)

    # --- 2. The teacher: trained once per key, then reused from the cache.
    t0 = time.perf_counter()
    teacher = ensure_teacher(
        settings, seed=config.seed, data=train_path, cache=cache, device=device, threads=parallel * threads
    )
    timing["teacher_s"] = time.perf_counter() - t0
    loads.append(load_average())

    # --- 3. The student: the teacher, depth-pruned by measured block importance.
    t0 = time.perf_counter()
    student = prune_teacher(
        settings, teacher["path"], data=distill_path, output=out / "student", device=device
    )
    timing["prune_s"] = time.perf_counter() - t0

    # --- 4. The four arms over the seeds, each in its own process, `parallel` at a time.
    t0 = time.perf_counter()
    _say(f"arms: {len(seeds) * len(ARMS)} runs, {parallel} at a time, logs in {out / 'arms'}")
    jobs = []
    for seed in seeds:
        for method in ARMS:
            arm = arm_config(
                settings,
                method,
                seed=seed,
                teacher=teacher["path"],
                student=student["path"],
                data=distill_path,
                output_dir=out / "arms" / f"{method}-seed{seed}",
                device=device,
            )
            log_file = out / "arms" / f"{method}-seed{seed}.log"
            jobs.append(
                Job(f"{method}/{seed}", distill_job, arm, settings.arm_steps, log_file, rerun_command(arm))
            )
    summaries, cpu_s["arms"] = run_jobs(
        jobs,
        parallel=parallel,
        preload=PRELOAD,
        again=AGAIN,
        threads=threads,
        desc="arms",
        mmap_threshold=EXACT_MEMORY_MMAP_THRESHOLD if config.exact_memory else 0,
    )
    runs = [
        {"method": job.payload.method, "seed": job.payload.seed, "summary": summary}
        for job, summary in zip(jobs, summaries, strict=True)
    ]
    timing["arms_s"] = time.perf_counter() - t0
    loads.append(load_average())

    # --- 5. Held-out evaluation of every model on the same split, shared among `parallel` processes.
    t0 = time.perf_counter()
    models = {"teacher": teacher["path"], "pruned student": student["path"]}
    models |= {f"{r['method']}-seed{r['seed']}": str(r["summary"].output_dir / "merged") for r in runs}
    names = list(models)
    shares = [names[k::parallel] for k in range(parallel) if names[k::parallel]]
    evaluations: dict[str, dict[str, Any]] = {}
    parts, cpu_s["eval"] = run_jobs(
        [
            Job(
                f"eval{k}",
                eval_job,
                {
                    "models": {n: models[n] for n in share},
                    "teacher": teacher["path"],
                    "heldout": str(heldout_path),
                    "max_length": settings.max_length,
                    "device": device,
                },
                len(share),
                out / "arms" / f"eval{k}.log",
            )
            for k, share in enumerate(shares)
        ],
        parallel=parallel,
        preload=PRELOAD,
        again=AGAIN,
        threads=threads,
        desc="evaluating",
    )
    for part in parts:
        evaluations |= part
    timing["eval_s"] = time.perf_counter() - t0

    # --- 6. The report.
    data = {
        "task_version": TASK_VERSION,
        "train": str(train_path),
        "distill": str(distill_path),
        "heldout": str(heldout_path),
    }
    results = collect_results(
        config,
        settings,
        teacher=teacher,
        student=student,
        runs=runs,
        evaluations=evaluations,
        seeds=seeds,
        data=data,
    )
    timing["total_s"] = time.perf_counter() - started
    if not teacher["cached"]:
        cpu_s["teacher"] = teacher["train_cpu_s"]
    results["timing"] = timing
    results["cpu_s"] = cpu_s
    results["resources"] = {
        "cores": available_cores(),
        "parallel": parallel,
        "threads_per_job": threads,
        # Other processes' load stretches every time above; the report says so when it was high.
        "load_average_1min": [x for x in [*loads, load_average()] if x is not None],
    }
    report_path = write_report(results, out)
    print()
    print(format_results_table(results))
    print(
        f"\nllm-neo demo: teacher ({'reused from cache' if teacher['cached'] else 'trained'}) -> pruned "
        f"student -> {', '.join(ARMS)} x {len(seeds)} seed(s) in {timing['total_s'] / 60:.1f} min; "
        f"report: {report_path}"
    )
    return 0


def _say(message: str) -> None:
    print(message, flush=True)


def write_task_data(data_dir: Path, settings: DemoSettings, seed: int) -> tuple[Path, Path, Path]:
    """The task's three splits for ``settings`` as JSONL files in ``data_dir``: (train, distill, heldout)."""
    from llm_neo.demo.task import generate_splits, write_jsonl

    splits = generate_splits(
        seed,
        train_per_skill=settings.train_per_skill,
        heldout_per_skill=settings.heldout_per_skill,
        distill_per_skill=settings.distill_per_skill,
    )
    names = ("train", "distill", "heldout")
    train, distill, heldout = (write_jsonl(data_dir / f"{name}.jsonl", splits[name]) for name in names)
    return train, distill, heldout


def _clear_output_dir(out: Path) -> None:
    """Remove what an earlier demo wrote (only that); then make the directory."""
    remove_outputs(out, OUTPUTS)


# ------------------------------------------------------------------------------------------------
# 2. The teacher


def teacher_key(settings: DemoSettings, seed: int) -> str:
    """Hash of everything that determines the teacher's weights; part of its cache directory name."""
    from llm_neo.demo.task import TASK_VERSION

    shaping = {
        "task_version": TASK_VERSION,
        "seed": seed,
        "train_per_skill": settings.train_per_skill,
        "heldout_per_skill": settings.heldout_per_skill,
        "hidden_size": settings.hidden_size,
        "num_layers": settings.num_layers,
        "num_heads": settings.num_heads,
        "intermediate_size": settings.intermediate_size,
        "teacher_steps": settings.teacher_steps,
        "teacher_lr": settings.teacher_lr,
        "batch_size": settings.batch_size,
        "max_length": settings.max_length,
        "tokenizer": "char-v1",
    }
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]


def ensure_teacher(
    settings: DemoSettings, *, seed: int, data: Path, cache: Path, device: str, threads: int
) -> dict[str, Any]:
    """The cached teacher for these settings, training (and caching) it first if there is none.

    Returns ``{"path", "key", "cached", "parameters", "train_time_s", "steps", "curve"}``. The cache
    entry is a standard HF model dir plus ``teacher.json``; it is written atomically, so a killed
    first run leaves no half-written teacher for the next one to trust.
    """
    from llm_neo.demo.task import task_corpus
    from llm_neo.models.tiny import SPECIAL_TOKENS, build_llama, build_tokenizer, save_model

    key = teacher_key(settings, seed)
    path = cache / f"teacher-{key}"
    meta_path = path / "teacher.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        trained = f"{meta['steps']} steps, trained in {meta['train_time_s']:.0f} s"
        _say(f"teacher: reused from cache {path} ({trained})")
        return {**meta, "path": str(path), "cached": True}

    _say(
        f"teacher: training a {settings.num_layers}-block Llama (hidden {settings.hidden_size}) from scratch "
        f"for {settings.teacher_steps} steps; cached as {path}"
    )
    work = cache / f".teacher-{key}.work"
    shutil.rmtree(work, ignore_errors=True)
    # Character-level: a byte-level BPE with no merges (its size is the 256 byte symbols plus the special
    # tokens), so digits and letters are single tokens and reversing, sorting and adding are learnable.
    tokenizer = build_tokenizer(task_corpus(), vocab_size=256 + len(SPECIAL_TOKENS))
    init = save_model(
        build_llama(
            len(tokenizer),
            hidden_size=settings.hidden_size,
            num_layers=settings.num_layers,
            num_heads=settings.num_heads,
            intermediate_size=settings.intermediate_size,
            max_position_embeddings=max(128, settings.max_length),
            seed=seed,
        ),
        tokenizer,
        work / "init",
    )
    train = DistillConfig(
        student=str(init),
        data=str(data),
        method="sft",
        output_dir=str(work / "run"),
        max_steps=settings.teacher_steps,
        batch_size=settings.batch_size,
        grad_accum=1,
        lr=settings.teacher_lr,
        eval_fraction=0.0,  # the demo evaluates on its own held-out file
        max_length=settings.max_length,
        seed=seed,
        log_every=max(1, settings.teacher_steps // 200),
        device=device,
    )
    job = Job(
        "teacher", distill_job, train, settings.teacher_steps, work / "teacher.log", rerun_command(train)
    )
    (summary,), cpu = run_jobs(
        [job],
        parallel=1,
        preload=PRELOAD,
        again=AGAIN,
        threads=threads,
        desc="teacher",
    )
    curve = _loss_curve(work / "run" / "metrics.jsonl")
    meta = {
        "key": key,
        "settings": dataclasses.asdict(settings),
        "seed": seed,
        "parameters": summary.student_parameters,
        "num_layers": settings.num_layers,
        "train_time_s": summary.train_time_s,
        "train_cpu_s": cpu,
        "threads": threads,
        "steps": summary.steps,
        "final": summary.final,
        "curve": curve,
        "llm_neo_version": __version__,
    }
    with atomic_directory(path) as tmp:
        for item in (work / "run" / "merged").iterdir():
            shutil.copy2(item, tmp / item.name)
        atomic_write_json(tmp / "teacher.json", meta)
    shutil.rmtree(work, ignore_errors=True)
    return {**meta, "path": str(path), "cached": False}


def _loss_curve(metrics: Path) -> list[dict[str, float]]:
    keys = ("step", "loss", "ce_loss", "kd_loss")
    return [
        {k: json.loads(line)[k] for k in keys} for line in metrics.read_text().splitlines() if line.strip()
    ]


# ------------------------------------------------------------------------------------------------
# 3. The student


def prune_teacher(
    settings: DemoSettings, teacher: str, *, data: Path, output: Path, device: str
) -> dict[str, Any]:
    """Depth-prune the teacher to ``keep_layers`` blocks with ``llm-neo prune``'s code."""
    from llm_neo.commands.prune import PruneConfig, run_prune

    _say(f"student: pruning the teacher to {settings.keep_layers} of {settings.num_layers} blocks")
    report = run_prune(
        PruneConfig(
            model=teacher,
            data=str(data),
            output=str(output),
            keep_layers=settings.keep_layers,
            num_samples=settings.prune_samples,
            max_length=settings.max_length,
            batch_size=32,
            device=device,
            overwrite=True,
        )
    )
    return {
        "path": str(output),
        "kept_layers": report["kept_layers"],
        "dropped_layers": report["dropped_layers"],
        "scores": report["scores"],
        "parameters": report["parameters_after"],
        "metric": report["metric"],
    }


# ------------------------------------------------------------------------------------------------
# 4. The arms


def arm_config(
    settings: DemoSettings,
    method: str,
    *,
    seed: int,
    teacher: str,
    student: str,
    data: Path,
    output_dir: Path,
    device: str,
) -> DistillConfig:
    """One arm: the same data, seed, steps and batch for all four; only what the method changes differs."""
    lora = method in ("neo", "lora")
    return DistillConfig(
        student=student,
        teacher=teacher,
        data=str(data),
        method=method,
        output_dir=str(output_dir),
        max_steps=settings.arm_steps,
        batch_size=settings.batch_size,
        grad_accum=1,
        lr=settings.lora_lr if lora else settings.full_lr,
        eval_fraction=0.0,  # all arms are evaluated on the task's held-out file
        max_length=settings.max_length,
        seed=seed,
        kd_ratio=0.5,
        divergence="forward_kl",
        warmup_ratio=0.1,
        scheduler="cosine",
        lora=LoraOptions(r=settings.lora_r, lora_alpha=2 * settings.lora_r),
        device=device,
        overwrite=True,
    )


def distill_job(config: DistillConfig, report: Report) -> RunSummary:
    """A worker's distill run, reporting each optimizer step and its loss."""
    from llm_neo.distill import distill

    summary = distill(config, on_step=lambda step, metrics: report(step, metrics["loss"]))
    assert summary is not None  # a worker runs one process, not a torchrun rank
    return summary


def eval_job(payload: dict[str, Any], report: Report) -> Any:
    """A worker's evaluation of some models, reporting each model done."""
    return evaluate_models(payload, on_model=lambda n: report(n, None))


def rerun_command(config: DistillConfig) -> str:
    """How to rerun a failed arm alone, from its own config.yaml."""
    return f"llm-neo distill --config {Path(str(config.output_dir)) / 'config.yaml'} --overwrite"


def _resources(config: DemoConfig) -> tuple[int, int]:
    """``(parallel, threads)`` for the arms and the evaluation: see run_jobs."""
    cores = available_cores()
    parallel = max(1, min(config.jobs or 2, cores))
    return parallel, max(1, cores // parallel)


# ------------------------------------------------------------------------------------------------
# 5. Evaluation


def evaluate_models(
    payload: dict[str, Any], *, on_model: Callable[[int], None] | None = None
) -> dict[str, dict[str, Any]]:
    """Exact match per skill and CE / KL to the teacher / top-1 agreement, for every model, same split.

    ``payload``: ``{"models": {name: path}, "teacher": path, "heldout": path, "max_length": int,
    "device": str}``. Greedy generation renders each prompt exactly as training does (llm_neo.demo.task).
    """
    from llm_neo.data import load_records, tokenize_records
    from llm_neo.demo.task import exact_match
    from llm_neo.eval.generate import greedy_answers
    from llm_neo.eval.metrics import heldout_metrics
    from llm_neo.models.loading import (
        freeze,
        kd_vocab_size,
        load_model,
        load_tokenizer,
        resolve_device,
        resolve_dtype,
    )

    device = resolve_device(payload["device"])
    dtype = resolve_dtype("auto", device)
    teacher = payload["teacher"]
    tokenizer = load_tokenizer(teacher, role="teacher")
    records = load_records(payload["heldout"])
    examples, _ = tokenize_records(
        records, tokenizer, max_length=payload["max_length"], source=payload["heldout"]
    )
    teacher_model = freeze(load_model(teacher, role="teacher", dtype=dtype, device=device))
    results: dict[str, dict[str, Any]] = {}
    for n, (name, path) in enumerate(payload["models"].items(), start=1):
        model = (
            teacher_model
            if path == teacher
            else freeze(load_model(path, role=name, dtype=dtype, device=device))
        )
        answers = greedy_answers(model, tokenizer, records, device=device, progress=False)
        metrics = heldout_metrics(
            model,
            examples,
            pad_token_id=tokenizer.pad_token_id,
            batch_size=64,
            device=device,
            dtype=dtype,
            teacher=teacher_model,
            kd_vocab_size=kd_vocab_size(tokenizer, model, teacher_model),
        )
        results[name] = {
            **exact_match(records, answers),
            "ce": metrics["ce"],
            "kl_to_teacher": metrics["kl_to_teacher"],
            "top1_agreement": metrics["top1_agreement"],
            "parameters": sum(p.numel() for p in model.parameters()),
            "examples": [
                {"instruction": r["instruction"], "expected": r["output"], "answer": a}
                for r, a in list(zip(records, answers, strict=True))[:5]
            ],
        }
        if on_model is not None:
            on_model(n)
    return results


# ------------------------------------------------------------------------------------------------
# 6. Results


def training_state_mb(
    method: str,
    *,
    student_parameters: int,
    trainable_parameters: int,
    teacher_parameters: int,
    compute_bytes: int,
) -> float:
    """Memory of the training state, accounted analytically (activations excluded), in MiB.

    Full-parameter arms keep fp32 weights, fp32 gradients and AdamW's two fp32 moments of every student
    weight (16 bytes each); LoRA arms keep the frozen base in the compute dtype and 16 bytes per adapter
    weight; KD arms also hold the frozen teacher in the compute dtype (no gradients, no optimizer state).
    This is what distill allocates for weights and optimizer; on CPU the process's peak RSS adds the
    torch runtime (~0.4 GB) and activations on top.
    """
    lora = method in ("neo", "lora")
    total = (
        student_parameters * compute_bytes + 16 * trainable_parameters if lora else 16 * student_parameters
    )
    if method in ("neo", "kd"):
        total += teacher_parameters * compute_bytes
    return total / 2**20


def planned_peak_mb(
    method: str,
    *,
    student: str,
    teacher: str,
    lora_r: int,
    batch_size: int,
    seq_len: int,
    compute_bytes: int,
    impl: str,
) -> float | None:
    """The arm's step peak as ``llm-neo plan`` estimates it, in MiB: tensor bytes of weights, trainable
    states, activations and logits (the CPU counterpart of CUDA's max allocated; no runtime baseline).

    ``seq_len`` is the longest sample, so the estimate is for the step with the largest batch. None
    when the planner cannot estimate this model (the report then leaves the cell empty).
    """
    from transformers import AutoConfig

    from llm_neo.commands.plan import estimate_arm, model_dims

    lora = method in ("neo", "lora")
    try:
        estimate = estimate_arm(
            method,
            impl,
            student=model_dims(AutoConfig.from_pretrained(student), lora_r=lora_r if lora else None),
            teacher=model_dims(AutoConfig.from_pretrained(teacher)),
            batch_size=batch_size,
            seq_len=seq_len,
            compute_bytes=compute_bytes,
            lora_r=lora_r,
            device_type="cpu",
        )
    except (ValueError, OSError) as err:
        log.warning("no memory estimate for %s: %s", method, err)
        return None
    return estimate.total / 2**20


def _stats(values: list[float]) -> dict[str, float]:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "n": len(values)}


def collect_results(
    config: DemoConfig,
    settings: DemoSettings,
    *,
    teacher: dict[str, Any],
    student: dict[str, Any],
    runs: list[dict[str, Any]],
    evaluations: dict[str, dict[str, Any]],
    seeds: list[int],
    data: dict[str, Any],
) -> dict[str, Any]:
    """Everything the report shows, as one JSON-able dict (results.json)."""
    from llm_neo.data import load_records, tokenize_records
    from llm_neo.models.loading import load_tokenizer, resolve_device, resolve_dtype

    dev = resolve_device(config.device)
    compute_bytes = torch.finfo(resolve_dtype("auto", dev)).bits // 8
    examples, _ = tokenize_records(
        load_records(data["distill"]),
        load_tokenizer(student["path"], role="student"),
        max_length=settings.max_length,
    )
    longest = max(len(ex.input_ids) for ex in examples)
    arms: dict[str, Any] = {}
    for method in ARMS:
        per_seed = []
        for run in (r for r in runs if r["method"] == method):
            s = run["summary"]
            ev = evaluations[f"{method}-seed{run['seed']}"]
            per_seed.append(
                {
                    "seed": run["seed"],
                    "accuracy": ev["accuracy"],
                    "per_skill": ev["per_skill"],
                    "ce": ev["ce"],
                    "kl_to_teacher": ev["kl_to_teacher"],
                    "top1_agreement": ev["top1_agreement"],
                    "peak_memory_gb": s.peak_memory_gb,
                    "peak_memory_kind": s.peak_memory_kind,
                    "peak_tensor_memory_gb": s.peak_tensor_memory_gb,
                    "train_time_s": s.train_time_s,
                    "wall_time_s": s.wall_time_s,
                    "trainable_parameters": s.trainable_parameters,
                    "student_parameters": s.student_parameters,
                    "training_state_mb": training_state_mb(
                        method,
                        student_parameters=s.student_parameters,
                        trainable_parameters=s.trainable_parameters,
                        teacher_parameters=teacher["parameters"],
                        compute_bytes=compute_bytes,
                    ),
                    "planned_peak_mb": planned_peak_mb(
                        method,
                        student=student["path"],
                        teacher=teacher["path"],
                        lora_r=settings.lora_r,
                        batch_size=settings.batch_size,
                        seq_len=longest,
                        compute_bytes=compute_bytes,
                        impl=s.config["loss_impl"],
                    ),
                    "final_train": s.final,
                    "curve": _loss_curve(s.output_dir / "metrics.jsonl"),
                    "output_dir": str(s.output_dir),
                    "examples": ev["examples"],
                }
            )
        summary: dict[str, Any] = {
            k: _stats([r[k] for r in per_seed]) for k in NUMERIC if all(r[k] is not None for r in per_seed)
        }
        skills = per_seed[0]["per_skill"]
        summary["per_skill"] = {sk: _stats([r["per_skill"][sk] for r in per_seed]) for sk in skills}
        arms[method] = {
            "runs": per_seed,
            "summary": summary,
            "trainable_parameters": per_seed[0]["trainable_parameters"],
            "lr": settings.lora_lr if method in ("neo", "lora") else settings.full_lr,
        }

    def model_row(name: str) -> dict[str, Any]:
        ev = evaluations[name]
        return {
            k: ev[k]
            for k in (
                "accuracy",
                "correct",
                "total",
                "per_skill",
                "ce",
                "kl_to_teacher",
                "top1_agreement",
                "parameters",
                "examples",
            )
        }

    return {
        "llm_neo_version": __version__,
        "quick": config.quick,
        "config": dataclasses.asdict(config),
        "settings": {**dataclasses.asdict(settings), "lora_lr": settings.lora_lr},
        "seeds": seeds,
        "data": {**data, "longest_sample_tokens": longest},
        "device": str(dev),
        "compute_dtype_bytes": compute_bytes,
        "teacher": {
            **model_row("teacher"),
            "path": teacher["path"],
            "key": teacher["key"],
            "cached": teacher["cached"],
            "num_layers": settings.num_layers,
            "train_time_s": teacher["train_time_s"],
            "steps": teacher["steps"],
            "curve": teacher["curve"],
        },
        "student": {
            **model_row("pruned student"),
            **{k: student[k] for k in ("path", "kept_layers", "dropped_layers", "scores", "metric")},
        },
        "arms": arms,
    }
