"""`llm-neo bench`: peak memory and throughput of each arm and loss implementation, on named shapes.

For a shape (``llm_neo.commands.shapes``: real Llama shapes or small CPU ones), random-initialised teacher and
student are built directly on the device (nothing is downloaded), and each run (an arm × a loss
implementation) trains a few warm-up and timed steps through ``llm_neo.distill.train_step``, the function
``llm-neo distill`` runs, on random tokens. Every token of the B×T batch except each sequence's first is a
target (labels = inputs; ``next_token_targets`` shifts them), so N = B·(T−1) positions are trained.

Each run goes in a fresh subprocess (``--isolate``, the default), so that one run's memory cannot leak
into the next's and an out-of-memory error ends only that run. Peak memory is
``torch.cuda.max_memory_allocated`` on a GPU (reset after the models are built, so it includes the
weights) and the process's peak resident set on a CPU (so it includes the ~0.4 GiB of Python, torch and
transformers); without isolation on a CPU it is the peak of live tensor bytes, counted op by op.

The report (Markdown and JSON, printed and written to ``--output``) gives each run's peak, tokens/s and the
ratios to plain full-parameter KD, the planner's estimate (``llm_neo.commands.plan``) next to each
measurement, and the issue's targets with PASS/FAIL.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import gc
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llm_neo.choices import METHODS
from llm_neo.config import MLP_CHUNKS_HELP, DeviceOptions, _help
from llm_neo.runtime.memory import LiveTensorBytes, peak_rss_bytes, rss_bytes
from llm_neo.runtime.workers import load_average

__all__ = [
    "BenchConfig",
    "RunSpec",
    "check_targets",
    "format_report",
    "run_bench",
    "run_one",
]

GiB = 2**30
RESULT_TAG = "LLM_NEO_BENCH_RESULT "


@dataclass
class BenchConfig(DeviceOptions):
    """`llm-neo bench`: memory and speed of each arm × loss implementation on a named shape."""

    shape: str = field(
        default="cpu-wide",
        metadata=_help(
            "Named shape: llama3-8b-to-1b, llama2-7b-to-1.1b, cpu-wide (CPU-sized), tiny (tests)."
        ),
    )
    batch_size: int | None = field(default=None, metadata=_help("Sequences per step. Default: the shape's."))
    seq_len: int | None = field(default=None, metadata=_help("Tokens per sequence. Default: the shape's."))
    runs: list[str] = field(
        default_factory=lambda: ["kd:plain", "kd:chunked", "neo:plain", "neo:chunked"],
        metadata=_help(
            "Runs as METHOD:IMPL[:CHUNK] (methods kd, neo, sft, lora; impls plain, chunked). kd:plain, "
            "the baseline of every ratio, is always run."
        ),
    )
    warmup_steps: int = field(default=1, metadata=_help("Untimed steps first (AdamW states, kernels)."))
    steps: int = field(default=3, metadata=_help("Timed optimizer steps per run."))
    gradient_checkpointing: bool = field(
        default=False, metadata=_help("Recompute the student's activations in the backward.")
    )
    mlp_chunks: int = field(default=1, metadata=_help(MLP_CHUNKS_HELP))
    loss_chunk_size: int = field(
        default=1024, metadata=_help("Tokens per chunk of the chunked loss (llm-neo distill's default).")
    )
    lora_r: int | None = field(default=None, metadata=_help("LoRA rank of neo/lora. Default: the shape's."))
    kd_ratio: float = field(default=0.5, metadata=_help("Weight of the KD term (forward KL) for kd/neo."))
    isolate: bool = field(
        default=True,
        metadata=_help(
            "Each run in a fresh subprocess (peak RSS on CPU; an OOM ends only that run). Without it, "
            "runs share this process and CPU peaks are live tensor bytes."
        ),
    )
    run_timeout_s: float = field(default=1800.0, metadata=_help("Seconds before an isolated run is killed."))
    seed: int = field(default=0, metadata=_help("Seed of the random weights and tokens."))
    num_threads: int = field(
        default=0, metadata=_help("CPU threads of each run (torch.set_num_threads); 0: torch's default.")
    )
    malloc_mmap_threshold: int = field(
        default=0,
        metadata=_help(
            "CPU, isolated runs: glibc's MALLOC_MMAP_THRESHOLD_ (bytes) for each run's process, so freed "
            "blocks above it go back to the OS and the peak RSS tracks live tensors; 0: glibc's default "
            "(a threshold that adapts up to 32 MiB and keeps freed blocks below it mapped)."
        ),
    )
    output: str | None = field(
        default=None, metadata=_help("Directory for LABEL.md and LABEL.json (also printed to stdout).")
    )
    label: str | None = field(default=None, metadata=_help("File name stem. Default: SHAPE-YYYY-MM-DD."))


@dataclass(frozen=True)
class RunSpec:
    """One run: what a (child) process builds and measures."""

    shape: str
    method: str
    impl: str
    chunk_size: int
    batch_size: int
    seq_len: int
    lora_r: int
    kd_ratio: float
    warmup_steps: int
    steps: int
    gradient_checkpointing: bool
    device: str
    dtype: str
    seed: int
    memory: str  # "cuda" | "rss" | "tracked"
    num_threads: int = 0
    mlp_chunks: int = 1

    @property
    def name(self) -> str:
        return f"{self.method}:{self.impl}"


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


def _build(config: Any, dtype: torch.dtype, device: torch.device) -> Any:
    from transformers import AutoModelForCausalLM

    # Directly on the device in the target dtype (an 8B model never passes through the CPU); a copy of
    # the config because from_config records the dtype on it.
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=dtype)
    model.config.use_cache = False
    return model


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

    baseline_rss = rss_bytes()
    device = resolve_device(spec.device)
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
        teacher = freeze(_build(shape.teacher, dtype, device)) if kd else None
        # Full-parameter arms keep fp32 master weights (autocast computes in `dtype`), LoRA arms keep the
        # frozen base in `dtype` and fp32 adapters: exactly as llm-neo distill builds them.
        student = _build(shape.student, dtype if lora else torch.float32, device)
        if lora:
            student = attach_lora(student, r=spec.lora_r, seed=spec.seed)
        if spec.gradient_checkpointing:
            enable_checkpointing(student, mlp_chunks=spec.mlp_chunks)
        student.train()
        trainable = trainable_parameters(student)
        lr = METHODS[spec.method].default_lr
        optimizer = torch.optim.AdamW(list(trainable.values()), lr=lr, weight_decay=0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        generator = torch.Generator().manual_seed(spec.seed)
        ids = torch.randint(0, shape.student.vocab_size, (spec.batch_size, spec.seq_len), generator=generator)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        batch = {k: v.to(device) for k, v in batch.items()}
        options = LossOptions(kd_ratio=spec.kd_ratio if kd else 0.0, chunk_size=spec.chunk_size)
        settings = StepSettings(device, dtype, options, impl=spec.impl)
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
            models = [m for m in (student, teacher) if m is not None]
            tracker = LiveTensorBytes(*(t for m in models for t in [*m.parameters(), *m.buffers()]))
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


def _run_isolated(spec: RunSpec, timeout: float, malloc_mmap_threshold: int = 0) -> dict[str, Any]:
    """``run_one`` in a fresh Python process; any failure becomes a result with a status, never a raise."""
    import llm_neo

    env = dict(os.environ)
    src = str(Path(llm_neo.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.setdefault("HF_HUB_OFFLINE", "1")
    if malloc_mmap_threshold > 0:
        env["MALLOC_MMAP_THRESHOLD_"] = str(malloc_mmap_threshold)
    child = json.dumps(dataclasses.asdict(spec))
    command = [sys.executable, "-m", "llm_neo.commands.bench", "--_child", child]
    base: dict[str, Any] = {"run": spec.name, "spec": dataclasses.asdict(spec)}
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired:
        return base | {"status": "timeout", "error": f"killed after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return dict(json.loads(line[len(RESULT_TAG) :]))
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    oom = "out of memory" in (proc.stderr or "").lower() or proc.returncode == -9
    return base | {
        "status": "oom" if oom else "error",
        "error": f"exit {proc.returncode}: " + " | ".join(tail)[-500:],
    }


def _run_here(spec: RunSpec) -> dict[str, Any]:
    try:
        return run_one(spec)
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------
# The comparison


def _parse_run(text: str, default_chunk: int) -> tuple[str, str, int]:
    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise ValueError(f"--runs: {text!r} is not METHOD:IMPL or METHOD:IMPL:CHUNK (e.g. neo:chunked)")
    method, impl = parts[0], parts[1]
    chunk = int(parts[2]) if len(parts) == 3 else default_chunk
    return method, impl, chunk


def _validate(config: BenchConfig) -> list[tuple[str, str, int]]:
    from llm_neo.commands.plan import ARMS, IMPLS
    from llm_neo.commands.shapes import SHAPES
    from llm_neo.errors import ConfigError

    p: list[str] = []
    if config.shape not in SHAPES:
        p.append(f"--shape: {config.shape!r} is not one of {', '.join(SHAPES)}")
    runs: list[tuple[str, str, int]] = []
    for text in config.runs:
        try:
            method, impl, chunk = _parse_run(text, config.loss_chunk_size)
        except ValueError as err:
            p.append(str(err))
            continue
        if method not in ARMS or impl not in IMPLS or chunk < 1:
            p.append(f"--runs: {text!r}: methods are {', '.join(ARMS)}, impls {', '.join(IMPLS)}, chunk >= 1")
            continue
        if (method, impl, chunk) not in runs:
            runs.append((method, impl, chunk))
    baseline = ("kd", "plain", config.loss_chunk_size)
    if not any(r[:2] == ("kd", "plain") for r in runs):
        runs.insert(0, baseline)
    for name, value, ok in (
        ("steps", config.steps, config.steps >= 1),
        ("warmup-steps", config.warmup_steps, config.warmup_steps >= 0),
        ("batch-size", config.batch_size, config.batch_size is None or config.batch_size >= 1),
        ("seq-len", config.seq_len, config.seq_len is None or config.seq_len >= 2),
        ("lora-r", config.lora_r, config.lora_r is None or config.lora_r >= 1),
        ("loss-chunk-size", config.loss_chunk_size, config.loss_chunk_size >= 1),
        ("kd-ratio", config.kd_ratio, 0 <= config.kd_ratio <= 1),
        ("run-timeout-s", config.run_timeout_s, config.run_timeout_s > 0),
        ("mlp-chunks", config.mlp_chunks, config.mlp_chunks >= 1),
    ):
        if not ok:
            p.append(f"--{name}: {value} is out of range")
    if config.mlp_chunks > 1 and not config.gradient_checkpointing:
        p.append(f"--mlp-chunks {config.mlp_chunks} needs --gradient-checkpointing")
    if p:
        raise ConfigError(p)
    return runs


def _row_name(method: str, impl: str, chunk: int, default_chunk: int) -> str:
    name = f"{method} {impl}"
    return name if impl == "plain" or chunk == default_chunk else f"{name} (chunk {chunk})"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _add_plan(results: list[dict[str, Any]], config: BenchConfig, settings: dict[str, Any]) -> None:
    """The planner's estimate next to each measurement (on CPU with this run's measured process baseline)."""
    from llm_neo.commands.plan import estimate_arm, model_dims
    from llm_neo.commands.shapes import get_shape

    shape = get_shape(config.shape)
    student = model_dims(shape.student, lora_r=settings["lora_r"])
    teacher = model_dims(shape.teacher)
    for res in results:
        spec = res["spec"]
        device_type = settings["device_type"]
        if res.get("peak_kind") == "live_tensor_bytes":
            device_type, baseline = "cuda", 0  # tensor bytes only, like CUDA's allocated memory
        else:
            baseline = int(res.get("baseline_rss_bytes") or 0)
        est = estimate_arm(
            spec["method"],
            spec["impl"],
            student=student,
            teacher=teacher,
            batch_size=spec["batch_size"],
            seq_len=spec["seq_len"],
            compute_bytes=settings["compute_dtype_bytes"],
            lora_r=spec["lora_r"],
            gradient_checkpointing=spec["gradient_checkpointing"],
            mlp_chunks=spec.get("mlp_chunks", 1),
            chunk_size=spec["chunk_size"],
            device_type=device_type,
            baseline=baseline,
        )
        res["plan_bytes"] = est.total
        res["plan_phase"] = est.phase
        res["plan_components_gib"] = {k: round(v / GiB, 4) for k, v in est.components.items()}
        res["weights_floor_bytes"] = est.floor
        peak = res.get("peak_bytes") if res.get("status") == "ok" else None
        res["plan_error_pct"] = 100 * (est.total / peak - 1) if peak else None


@dataclass(frozen=True)
class Target:
    """``run``'s ``metric`` divided by ``versus``'s (another run, or the weights floor) vs a threshold."""

    name: str
    run: str  # METHOD:IMPL, at the bench's chunk size
    metric: str  # "peak_bytes" or "tokens_per_s"
    versus: str  # METHOD:IMPL, or "floor" (the planner's weights floor)
    threshold: float
    at_most: bool  # the ratio must be <= threshold (else >=)


# The targets, and the shape and batch each was set for (elsewhere: shown for reference).
TARGETS: dict[str, tuple[dict[str, Any], list[Target]]] = {
    "cuda": (
        {"shape": "llama3-8b-to-1b", "batch_size": 8, "seq_len": 2048, "gradient_checkpointing": True},
        [
            Target("Neo peak ≤ 0.27 × plain full KD", "neo:chunked", "peak_bytes", "kd:plain", 0.27, True),
            Target("Neo peak ≤ 1.15 × weights floor", "neo:chunked", "peak_bytes", "floor", 1.15, True),
            Target(
                "Neo tokens/s ≥ 1.05 × plain full KD", "neo:chunked", "tokens_per_s", "kd:plain", 1.05, False
            ),
        ],
    ),
    "cpu": (
        {"shape": "cpu-wide", "batch_size": 8, "seq_len": 256, "gradient_checkpointing": False},
        [
            Target(
                "Neo peak RSS ≤ 0.35 × plain full KD", "neo:chunked", "peak_bytes", "kd:plain", 0.35, True
            ),
            Target("Neo tokens/s ≥ 1.0 × plain Neo", "neo:chunked", "tokens_per_s", "neo:plain", 1.0, False),
        ],
    ),
}


def check_targets(results: list[dict[str, Any]], settings: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of the device type: measured ratio, threshold, PASS/FAIL (or n/a), and whether this
    run is the shape and batch the target was set for."""
    where, targets = TARGETS["cuda" if settings["device_type"] == "cuda" else "cpu"]
    applies = all(settings.get(k) == v for k, v in where.items())
    chunk = settings["loss_chunk_size"]

    def find(run: str) -> dict[str, Any] | None:
        method, impl = run.split(":")
        for res in results:
            spec = res["spec"]
            same_chunk = impl == "plain" or spec["chunk_size"] == chunk
            if (spec["method"], spec["impl"]) == (method, impl) and same_chunk and res.get("status") == "ok":
                return res
        return None

    out = []
    for target in targets:
        row, value = find(target.run), None
        if row is not None:
            if target.versus == "floor":
                value = _ratio(row.get(target.metric), row.get("weights_floor_bytes"))
            elif (ref := find(target.versus)) is not None:
                value = _ratio(row.get(target.metric), ref.get(target.metric))
        holds = (
            None
            if value is None
            else (value <= target.threshold if target.at_most else value >= target.threshold)
        )
        out.append(
            {
                "target": target.name,
                "value": value,
                "threshold": target.threshold,
                "result": "n/a" if holds is None else ("PASS" if holds else "FAIL"),
                "set_for": where,
                "applies": applies,
            }
        )
    return out


def _gib(nbytes: int | None) -> str:
    if not nbytes:
        return ""
    value = nbytes / GiB
    return f"{value:.2f}" if value >= 0.995 else f"{value:.3g}"


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_report(report: dict[str, Any]) -> str:
    """The Markdown report: settings, one table row per run, the targets."""
    s = report["settings"]
    kind = {
        "cuda_max_allocated": "torch.cuda.max_memory_allocated (GiB)",
        "process_max_rss": "peak RSS of the run's own process (GiB), incl. Python/torch/transformers",
        "live_tensor_bytes": "peak live tensor bytes (GiB), counted op by op in this process",
    }.get(report.get("peak_kind", ""), "peak (GiB)")
    lines = [
        f"# llm-neo bench: {s['shape']}",
        "",
        f"- device: {report['device']}",
        f"- torch {report['versions']['torch']}, transformers {report['versions']['transformers']}, "
        f"peft {report['versions']['peft']}, llm-neo {report['versions']['llm_neo']}"
        + (f" (commit {_short(report['git_commit'])})" if report.get("git_commit") else ""),
        f"- date: {report['date']}",
        f"- shape: {s['shape']}: {s['description']}",
        f"- batch {s['batch_size']} × {s['seq_len']} tokens (every token but each sequence's first is a "
        f"target), compute dtype {s['dtype']}, gradient checkpointing "
        f"{'on' if s['gradient_checkpointing'] else 'off'}"
        + (f" (MLP in {s['mlp_chunks']} chunks)" if s.get("mlp_chunks", 1) > 1 else "")
        + f", LoRA r={s['lora_r']} on every linear of every block, loss {1 - s['kd_ratio']:g}·CE + "
        f"{s['kd_ratio']:g}·forward KL, chunk {s['loss_chunk_size']} tokens",
        f"- steps per run: {s['warmup_steps']} warm-up + {s['steps']} timed (AdamW); "
        f"{s['num_threads']} CPU thread(s); "
        f"{'each run in a fresh process' if s['isolate'] else 'all runs in one process'}"
        + (
            f" with MALLOC_MMAP_THRESHOLD_={s['malloc_mmap_threshold']}"
            if s.get("malloc_mmap_threshold") and s["device_type"] == "cpu"
            else ""
        ),
        f"- peak memory: {kind}; plan: `llm-neo plan`'s estimate for the same settings",
    ]
    load = report.get("load_average") or {}
    if s["device_type"] == "cpu" and load.get("start") is not None:
        lines.append(
            f"- machine load (1-minute average) at start / end: {load['start']} / {load['end']} on "
            f"{load['cpus']} CPUs (other processes slow CPU timings down; memory is unaffected)"
        )
    lines += [
        "",
        "| run | peak GiB | plan GiB | plan error | tokens/s | step s | memory vs KD | speed vs KD "
        "| status |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        peak = r.get("peak_bytes") if r.get("status") == "ok" else None
        err = r.get("plan_error_pct")
        lines.append(
            "| "
            + " | ".join(
                [
                    r["name"],
                    _gib(peak),
                    _gib(r.get("plan_bytes")),
                    f"{err:+.0f}%" if err is not None else "",
                    _fmt(r.get("tokens_per_s"), 0),
                    _fmt(r.get("step_s"), 3),
                    _fmt(r.get("memory_vs_kd")),
                    _fmt(r.get("speed_vs_kd")),
                    r.get("status", "") + (f": {r['error']}" if r.get("error") else ""),
                ]
            )
            + " |"
        )
    rss = s["device_type"] == "cpu" and report.get("peak_kind") == "process_max_rss"
    if rss and not s.get("malloc_mmap_threshold"):
        lines += [
            "",
            "On a CPU, glibc keeps freed blocks below its adaptive mmap threshold (up to 32 MiB) mapped, so "
            "a run whose large tensors are under 32 MiB (e.g. chunks of 256 tokens × 32,000 fp32 = 31 MiB) "
            "shows more RSS than the tensors it holds; `--malloc-mmap-threshold 1048576` measures without "
            "that effect (docs/memory.md).",
        ]
    lines += ["", "## Targets", ""]
    for t in report["targets"]:
        where = t["set_for"]
        note = (
            ""
            if t["applies"]
            else f" (set for {where['shape']} at {where['batch_size']} × {where['seq_len']}"
            f"{', gradient checkpointing' if where['gradient_checkpointing'] else ''}; shown for reference)"
        )
        value = "" if t["value"] is None else f"{t['value']:.3f}"
        lines.append(f"- {t['result']}: {t['target']}: measured {value}{note}")
    return "\n".join(lines) + "\n"


def _short(commit: str) -> str:
    head, _, rest = commit.partition("+")
    return head[:10] + (f"+{rest}" if rest else "")


def _versions() -> dict[str, str]:
    import peft
    import transformers

    from llm_neo import __version__

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "llm_neo": __version__,
        "python": platform.python_version(),
    }


def _git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parents[2]

        def git(*args: str) -> str:
            run = subprocess.run(
                ["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=False
            )
            return run.stdout.strip()

        commit = git("rev-parse", "HEAD")
        # "+modified": a module the runs execute differs from that commit, which then does not describe them
        import llm_neo.distill  # noqa: F401  (the runs' code: train_step and everything it imports)

        files = sorted(
            str(Path(file).resolve())
            for name, m in list(sys.modules.items())
            if name.startswith("llm_neo") and (file := getattr(m, "__file__", None))
        )
        dirty = git("status", "--porcelain", "--", *files)
        return (commit + ("+modified" if dirty else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


def bench(config: BenchConfig, *, progress: bool = True) -> dict[str, Any]:
    """Run every run of ``config`` and return the report (a JSON-able dict)."""
    from tqdm.auto import tqdm

    from llm_neo.commands.shapes import get_shape
    from llm_neo.models.loading import resolve_device, resolve_dtype

    runs = _validate(config)
    shape = get_shape(config.shape)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    batch = config.batch_size or shape.batch_size
    seq = config.seq_len or shape.seq_len
    r = config.lora_r or shape.lora_r
    memory = "cuda" if device.type == "cuda" else ("rss" if config.isolate else "tracked")
    specs = [
        RunSpec(
            shape=config.shape,
            method=method,
            impl=impl,
            chunk_size=chunk,
            batch_size=batch,
            seq_len=seq,
            lora_r=r,
            kd_ratio=config.kd_ratio,
            warmup_steps=config.warmup_steps,
            steps=config.steps,
            gradient_checkpointing=config.gradient_checkpointing,
            mlp_chunks=config.mlp_chunks,
            device=config.device,
            dtype=config.dtype,
            seed=config.seed,
            memory=memory,
            num_threads=config.num_threads,
        )
        for method, impl, chunk in runs
    ]
    load_start = load_average()
    date = dt.date.today().isoformat()
    label = config.label or f"{config.shape}-{date}"
    partial = Path(config.output) / f"{label}.runs.jsonl" if config.output else None
    if partial is not None:
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text("")
    results = []
    bar = tqdm(specs, desc=f"bench {config.shape}", unit="run", disable=not progress, dynamic_ncols=True)
    for spec in bar:
        bar.set_postfix_str(spec.name + ("" if spec.impl == "plain" else f":{spec.chunk_size}"))
        if config.isolate:
            res = _run_isolated(spec, config.run_timeout_s, config.malloc_mmap_threshold)
        else:
            res = _run_here(spec)
        res["name"] = _row_name(spec.method, spec.impl, spec.chunk_size, config.loss_chunk_size)
        results.append(res)
        if partial is not None:  # each run's result as soon as it exists: a killed bench keeps them
            with partial.open("a") as handle:
                handle.write(json.dumps(res) + "\n")
    bar.close()

    settings = {
        "shape": config.shape,
        "description": shape.description,
        "batch_size": batch,
        "seq_len": seq,
        "lora_r": r,
        "kd_ratio": config.kd_ratio,
        "dtype": str(dtype).removeprefix("torch."),
        "compute_dtype_bytes": 4 if dtype == torch.float32 else 2,
        "device_type": device.type,
        "gradient_checkpointing": config.gradient_checkpointing,
        "mlp_chunks": config.mlp_chunks,
        "loss_chunk_size": config.loss_chunk_size,
        "warmup_steps": config.warmup_steps,
        "steps": config.steps,
        "isolate": config.isolate,
        "seed": config.seed,
        "num_threads": config.num_threads or torch.get_num_threads(),
        "malloc_mmap_threshold": config.malloc_mmap_threshold or None,
    }
    _add_plan(results, config, settings)
    base = next(x for x in results if (x["spec"]["method"], x["spec"]["impl"]) == ("kd", "plain"))
    base_ok = base.get("status") == "ok"
    for res in results:
        ok = res.get("status") == "ok" and base_ok
        res["memory_vs_kd"] = _ratio(res.get("peak_bytes"), base.get("peak_bytes")) if ok else None
        res["speed_vs_kd"] = _ratio(res.get("tokens_per_s"), base.get("tokens_per_s")) if ok else None
    device_names = [x["device"] for x in results if x.get("device")]
    return {
        "label": label,
        "date": date,
        "device": device_names[0] if device_names else device_name(device),
        "versions": _versions(),
        "git_commit": _git_commit(),
        "settings": settings,
        "load_average": {"start": load_start, "end": load_average(), "cpus": os.cpu_count()},
        "peak_kind": next((x["peak_kind"] for x in results if x.get("peak_kind")), None),
        "results": results,
        "targets": check_targets(results, settings),
    }


def run_bench(config: BenchConfig) -> int:
    """Run the benchmark, print the Markdown report and write LABEL.md/LABEL.json to --output.

    Returns 0 when every run finished (an OOM or crash of a run is reported in its row and gives 1);
    targets that fail do not change the exit code: they are figures, not tests.
    """
    report = bench(config)
    text = format_report(report)
    print(text)
    if config.output:
        from llm_neo.runtime.atomic import atomic_write_json, atomic_write_text

        out = Path(config.output)
        out.mkdir(parents=True, exist_ok=True)
        label = report["label"]
        atomic_write_text(out / f"{label}.md", text)
        atomic_write_json(out / f"{label}.json", report)
        # The per-run progress file only matters when a bench is killed; the JSON now holds every run.
        (out / f"{label}.runs.jsonl").unlink(missing_ok=True)
        print(f"written: {out / label}.md, {out / label}.json")
    return 0 if all(r.get("status") == "ok" for r in report["results"]) else 1


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m llm_neo.commands.bench --_child SPEC``: one isolated run of ``llm-neo bench``, printed
    as a tagged JSON line (the parent process reads it). The command itself is ``llm-neo bench`` (or
    ``python -m llm_neo bench`` from a checkout)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] != ["--_child"] or len(argv) != 2:
        print(
            "usage: python -m llm_neo.commands.bench --_child SPEC (run llm-neo bench instead)",
            file=sys.stderr,
        )
        return 2
    result = run_one(RunSpec(**json.loads(argv[1])))
    print(RESULT_TAG + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    sys.exit(main())
