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

Runs may be quantized variants, spelled as ``llm-neo compare`` spells its arms
(``llm_neo.config.parse_arm``): ``neo+int8-teacher:chunked`` quantizes the random teacher's block linears
in place right after it is built (``llm_neo.models.quant.quantize_teacher``), ``neo+nf4-student:chunked``
quantizes the random dense student's (the layout ``load_quantized_base`` gives a QLoRA base) before the
adapters are attached; each row records the weight bytes before and after, and its plan the same
quantization.

Whole runs (``--whole-runs``) are what users see: the same random teacher and student are saved once
(safetensors, with a word-level tokenizer of exactly the shape's vocabulary) beside a data file of
records of exactly ``seq_len`` tokens, and each entry runs a whole ``python -m llm_neo distill`` process
(load, steps, merge check, save, held-out evaluation) for ``warmup_steps + steps`` optimizer steps. Its
peak is the process's own peak resident set, from ``os.wait4`` (``ru_maxrss``) in a minimal launcher
process so that nothing of this process's size is inherited; it is set against the run's own
training-step peak (summary.json's ``peak_memory_gb``), and the launcher's sampling of the process's
VmRSS/VmHWM says which phase set it.

The report (Markdown and JSON, printed and written to ``--output``) gives each run's peak, tokens/s and the
ratios to plain full-parameter KD, the planner's estimate (``llm_neo.commands.plan``) next to each
measurement, the whole runs, and the issues' targets with PASS/FAIL.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import gc
import json
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from llm_neo.choices import ARM_VARIANTS, METHODS
from llm_neo.config import MLP_CHUNKS_HELP, DeviceOptions, arm_name, parse_arm
from llm_neo.options import option_help as _help  # its uses untouched while bench is split (issue 19)
from llm_neo.runtime.memory import LiveTensorBytes, peak_rss_bytes, rss_bytes
from llm_neo.runtime.workers import load_average

__all__ = [
    "BenchConfig",
    "RunSpec",
    "check_targets",
    "format_report",
    "run_bench",
    "run_one",
    "run_whole",
    "write_token_records",
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
            "Step runs as ARM:IMPL[:CHUNK]: ARM a method (kd, neo, sft, lora) or a quantized variant as "
            "llm-neo compare spells it (neo+int8-teacher, neo+nf4-student, neo+int8-teacher+nf4-student; "
            f"variants {', '.join(ARM_VARIANTS)}), IMPL plain or chunked. kd:plain, the baseline of every "
            "ratio, is always run."
        ),
    )
    whole_runs: list[str] = field(
        default_factory=list,
        metadata=_help(
            "Whole `llm-neo distill` processes (load, steps, merge check, save, held-out eval) on the same "
            "shape, spelled as --runs; their peak RSS against their own training-step peak. Recommended: "
            "kd:plain neo:chunked neo+int8-teacher:chunked (kd:plain is always run when any is given)."
        ),
    )
    whole_run_dir: str | None = field(
        default=None,
        metadata=_help(
            "Directory for the whole runs' models, data and outputs, kept afterwards. Default: a "
            "temporary directory, removed at the end."
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
    run_timeout_s: float = field(
        default=1800.0, metadata=_help("Seconds before an isolated or whole run is killed.")
    )
    seed: int = field(default=0, metadata=_help("Seed of the random weights and tokens."))
    num_threads: int = field(
        default=0, metadata=_help("CPU threads of each run (torch.set_num_threads); 0: torch's default.")
    )
    malloc_mmap_threshold: int = field(
        default=0,
        metadata=_help(
            "CPU, isolated and whole runs: glibc's MALLOC_MMAP_THRESHOLD_ (bytes) for each run's process, "
            "so freed "
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
    teacher_quant: str = "none"  # none, int8, nf4: the teacher's block linears (kd, neo)
    student_quant: str = "none"  # none, nf4, int8: the frozen student base's block linears (neo, lora)

    @property
    def arm(self) -> str:
        return arm_name(self.method, self.teacher_quant, self.student_quant)

    @property
    def name(self) -> str:
        return f"{self.arm}:{self.impl}"


class RunKey(NamedTuple):
    """What tells two runs apart: the arm (a method and its quantization) and the loss implementation."""

    method: str
    teacher_quant: str
    student_quant: str
    impl: str
    chunk: int


def _key(spec: dict[str, Any]) -> RunKey:
    """The RunKey of a result's spec (results written before quantized rows existed have none)."""
    return RunKey(
        spec["method"],
        spec.get("teacher_quant", "none"),
        spec.get("student_quant", "none"),
        spec["impl"],
        spec["chunk_size"],
    )


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
    from llm_neo.models.quant import quantize_teacher, storage_tensors

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
        if teacher is not None and spec.teacher_quant != "none":
            # In place, right after it is built: as llm-neo distill quantizes the dense teacher it loads.
            teacher, result["teacher_quant"] = quantize_teacher(teacher, spec.teacher_quant)
        # Full-parameter arms keep fp32 master weights (autocast computes in `dtype`), LoRA arms keep the
        # frozen base in `dtype` and fp32 adapters: exactly as llm-neo distill builds them.
        student = _build(shape.student, dtype if lora else torch.float32, device)
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
            tensors = (t for m in models for t in [*m.parameters(), *m.buffers()])
            tracker = LiveTensorBytes(*(part for t in tensors for part in storage_tensors(t)))
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


def _child_env(malloc_mmap_threshold: int = 0, num_threads: int = 0) -> dict[str, str]:
    """The environment of a run's process: this checkout's package first, offline, quiet; glibc's mmap
    threshold and the thread count when set."""
    import llm_neo

    env = dict(os.environ)
    src = str(Path(llm_neo.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.setdefault("HF_HUB_OFFLINE", "1")
    if malloc_mmap_threshold > 0:
        env["MALLOC_MMAP_THRESHOLD_"] = str(malloc_mmap_threshold)
    if num_threads > 0:  # llm-neo distill has no thread option: torch takes its intra-op threads from here
        env["OMP_NUM_THREADS"] = str(num_threads)
    return env


def _run_isolated(spec: RunSpec, timeout: float, malloc_mmap_threshold: int = 0) -> dict[str, Any]:
    """``run_one`` in a fresh Python process; any failure becomes a result with a status, never a raise."""
    env = _child_env(malloc_mmap_threshold)
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
# Whole runs: `llm-neo distill` processes on the same shape


@dataclass(frozen=True)
class WholeInputs:
    """What every whole run of a bench reads: the saved random models and the data file."""

    teacher: Path | None  # None when no whole run has a teacher
    student: Path
    data: Path
    records: int  # records in the data file
    heldout: int  # of which held out (--eval-fraction), at least one evaluation batch
    eval_fraction: float


def write_token_records(path: Path, *, records: int, seq_len: int, vocab_size: int, seed: int) -> None:
    """``records`` ``{"text": ...}`` lines that ``llm_neo.models.tiny.build_word_tokenizer(vocab_size)``
    encodes, as llm-neo renders text records (``<s>`` + text + ``</s>``), to exactly ``seq_len`` tokens:
    ``seq_len - 2`` words drawn uniformly (seeded) from the non-special tokens."""
    from llm_neo.models.tiny import WORD_SPECIAL_TOKENS, word_token
    from llm_neo.runtime.atomic import atomic_write_text

    if seq_len < 3:
        raise ValueError(f"seq_len must be >= 3 (<s>, a word, </s>), got {seq_len}")
    rng = random.Random(seed)
    first = len(WORD_SPECIAL_TOKENS)
    lines = (
        json.dumps(
            {"text": " ".join(word_token(rng.randrange(first, vocab_size)) for _ in range(seq_len - 2))}
        )
        for _ in range(records)
    )
    atomic_write_text(path, "\n".join(lines) + "\n")


def prepare_whole_runs(spec: RunSpec, directory: Path, *, with_teacher: bool) -> WholeInputs:
    """Save ``spec``'s random teacher (if ``with_teacher``) and student, seeded as ``run_one`` builds them,
    in the compute dtype (safetensors, ``save_pretrained``) with a word-level tokenizer of exactly the
    shape's vocabulary, so that KD is over every column; and the data: enough records of exactly
    ``seq_len`` tokens for ``warmup_steps + steps`` optimizer steps of ``batch_size`` plus one held-out
    evaluation batch."""
    from llm_neo.commands.shapes import get_shape
    from llm_neo.models.loading import resolve_device, resolve_dtype
    from llm_neo.models.tiny import build_word_tokenizer, save_model

    shape = get_shape(spec.shape)
    if shape.teacher.vocab_size != shape.student.vocab_size:
        raise ValueError(f"shape {shape.name}: the whole runs need one vocabulary for teacher and student")
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    tokenizer = build_word_tokenizer(shape.student.vocab_size)
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(spec.seed)
    paths: dict[str, Path] = {}
    for role, model_config in (("teacher", shape.teacher), ("student", shape.student)):
        if role == "teacher" and not with_teacher:
            continue
        model = _build(model_config, dtype, device)
        paths[role] = save_model(model, tokenizer, directory / role)
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the runs' processes need the memory, not this one
    train = (spec.warmup_steps + spec.steps) * spec.batch_size
    heldout = spec.batch_size
    records = train + heldout
    data = directory / "data.jsonl"
    write_token_records(
        data, records=records, seq_len=spec.seq_len, vocab_size=shape.student.vocab_size, seed=spec.seed
    )
    return WholeInputs(
        teacher=paths.get("teacher"),
        student=paths["student"],
        data=data,
        records=records,
        heldout=heldout,
        eval_fraction=heldout / records,  # llm_neo.data.split_heldout holds out round(f·n) = heldout
    )


def distill_command(spec: RunSpec, inputs: WholeInputs, output_dir: Path) -> list[str]:
    """The `llm-neo distill` command of one whole run: ``warmup_steps + steps`` optimizer steps of one
    micro-batch of ``batch_size`` × ``seq_len`` tokens each, the held-out split one evaluation batch."""
    kd = METHODS[spec.method].kd
    command = [sys.executable, "-m", "llm_neo", "distill", "--student", str(inputs.student)]
    if kd:
        assert inputs.teacher is not None
        command += ["--teacher", str(inputs.teacher), "--kd-ratio", f"{spec.kd_ratio:g}"]
    command += ["--data", str(inputs.data), "--method", spec.method]
    if spec.teacher_quant != "none":
        command += ["--teacher-quant", spec.teacher_quant]
    if spec.student_quant != "none":
        command += ["--student-quant", spec.student_quant]
    command += [
        "--loss-impl", spec.impl,
        "--loss-chunk-size", str(spec.chunk_size),
        "--max-steps", str(spec.warmup_steps + spec.steps),
        "--batch-size", str(spec.batch_size),
        "--grad-accum", "1",
        "--max-length", str(spec.seq_len),
        "--eval-batch-size", str(spec.batch_size),
        "--eval-fraction", repr(inputs.eval_fraction),
        "--lora.r", str(spec.lora_r),
        "--device", spec.device,
        "--dtype", spec.dtype,
        "--seed", str(spec.seed),
        "--output-dir", str(output_dir),
    ]  # fmt: skip
    if spec.gradient_checkpointing:
        command += ["--gradient-checkpointing", "--mlp-chunks", str(spec.mlp_chunks)]
    return command


# Started with `python -S -c` (no site-packages: a few MiB) between the bench and each whole run. Any
# process started from the bench itself (fork, or vfork + exec) would report at least the bench's peak
# RSS as its ru_maxrss: the kernel keeps the larger of the old and new address spaces' peaks across exec.
# Started from this launcher, the run inherits the launcher's few MiB. The launcher samples the run's
# VmRSS and VmHWM (KiB) every INTERVAL seconds, timestamps its log lines, reaps it with os.wait4 and
# writes what it saw to RESULT as JSON. Usage: RESULT LOG INTERVAL -- COMMAND...
_LAUNCHER = r"""
import json, os, sys, time

result, log_path, interval, command = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[5:]


def vm(pid):
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f if line.startswith(("VmRSS", "VmHWM")))
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


launcher_hwm = vm("self")[1]
fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
start = time.time()
pid = os.fork()
if pid == 0:
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    try:
        os.execv(command[0], command)
    finally:
        os._exit(127)
os.close(fd)
log = open(log_path, "rb")
pending, lines, samples = b"", [], []
while True:
    done, status, usage = os.wait4(pid, os.WNOHANG)
    now = time.time()
    data = log.read()
    if data:
        *complete, pending = (pending + data).replace(b"\r", b"\n").split(b"\n")
        lines += [[round(now - start, 3), s.decode("utf-8", "replace")] for s in complete if s.strip()]
    if done:
        break
    try:
        samples.append([round(now - start, 3), *vm(pid)])
    except (OSError, KeyError, ValueError):
        pass
    time.sleep(interval)
out = {
    "start": start,
    "end": now,
    "returncode": os.waitstatus_to_exitcode(status),
    "ru_maxrss_kib": usage.ru_maxrss,
    "launcher_hwm_kib": launcher_hwm,
    "samples": samples,
    "lines": lines,
}
with open(result + ".tmp", "w") as f:
    json.dump(out, f)
os.replace(result + ".tmp", result)
"""
SAMPLE_INTERVAL_S = 0.02
# The log line `llm-neo distill` writes when its models are built, just before the first step.
_MODELS_BUILT = re.compile(r"\bstudent: [\d,]+ parameters")
WHOLE_PHASES = ("load", "steps", "merge check, save", "held-out eval", "exit")


def whole_run_phases(
    samples: Sequence[Sequence[float]], ends: dict[str, float | None], end: float
) -> tuple[list[dict[str, Any]], str | None]:
    """Split a whole run's samples ``[t, VmRSS KiB, VmHWM KiB]`` into ``WHOLE_PHASES`` at the times
    ``ends`` gives (seconds from the start; a phase without one is merged into the next) and say which
    set the peak: the phase in which the sampled VmHWM first reached its maximum.

    Returns ``[{"phase", "start_s", "end_s", "max_rss_bytes", "hwm_end_bytes"}]`` and that phase's name.
    A phase's max_rss is what the samples saw (a lower bound of its own peak); hwm_end is exact.
    """
    bounds: list[tuple[str, float, float]] = []
    start, names = 0.0, []
    for name in WHOLE_PHASES:
        names.append(name)
        stop = end if name == WHOLE_PHASES[-1] else ends.get(name)
        if stop is None or stop < start:
            continue
        bounds.append((", ".join(names) if len(names) > 1 else name, start, stop))
        start, names = stop, []
    peak_hwm = max((s[2] for s in samples), default=0)
    first_peak = next((s[0] for s in samples if s[2] >= peak_hwm), None)
    phases, peak_phase = [], None
    for name, t0, t1 in bounds:
        inside = [s for s in samples if t0 <= s[0] <= t1]
        before = [s for s in samples if s[0] <= t1]
        phases.append(
            {
                "phase": name,
                "start_s": round(t0, 3),
                "end_s": round(t1, 3),
                "max_rss_bytes": 1024 * max((s[1] for s in inside), default=0) or None,
                "hwm_end_bytes": 1024 * max((s[2] for s in before), default=0) or None,
            }
        )
        if peak_phase is None and first_peak is not None and first_peak <= t1:
            peak_phase = name
    return phases, peak_phase


def run_whole(
    spec: RunSpec,
    inputs: WholeInputs,
    directory: Path,
    *,
    timeout: float,
    malloc_mmap_threshold: int = 0,
    sample_interval: float = SAMPLE_INTERVAL_S,
) -> dict[str, Any]:
    """One whole `llm-neo distill` run of ``spec`` in ``directory`` (its output and log): its process's
    peak RSS (``os.wait4``'s ru_maxrss), its summary.json and the phases; any failure becomes a result
    with a status, never a raise."""
    directory.mkdir(parents=True, exist_ok=True)
    output_dir, log_path, seen_path = (
        directory / "out",
        directory / "distill.log",
        directory / "launcher.json",
    )
    command = distill_command(spec, inputs, output_dir)
    base: dict[str, Any] = {
        "run": spec.name,
        "spec": dataclasses.asdict(spec),
        "kind": "whole",
        "command": " ".join(command[1:]).replace(f"{directory.parent}{os.sep}", ""),
    }
    launch = [sys.executable, "-S", "-c", _LAUNCHER, str(seen_path), str(log_path), str(sample_interval)]
    env = _child_env(malloc_mmap_threshold, spec.num_threads)
    # A session of its own: on a timeout the launcher and the run are killed together, by group id.
    proc = subprocess.Popen(
        [*launch, "--", *command],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        _, launcher_err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return base | {"status": "timeout", "error": f"killed after {timeout:.0f} s"}
    tail = (
        " | ".join(log_path.read_text(errors="replace").strip().splitlines()[-3:])
        if log_path.exists()
        else ""
    )
    if not seen_path.exists():
        return base | {
            "status": "error",
            "error": f"launcher exit {proc.returncode}: {launcher_err[-300:]!r}",
        }
    seen = json.loads(seen_path.read_text())
    if seen["returncode"] != 0:
        oom = seen["returncode"] == -9 or "out of memory" in tail.lower()
        return base | {
            "status": "oom" if oom else "error",
            "error": f"exit {seen['returncode']}: {tail[-500:]}",
        }
    summary = json.loads((output_dir / "summary.json").read_text())

    def mtime(path: Path) -> float | None:
        return path.stat().st_mtime - seen["start"] if path.exists() else None

    ends = {
        "load": next((t for t, line in seen["lines"] if _MODELS_BUILT.search(line)), None),
        "steps": mtime(output_dir / "metrics.jsonl"),  # written after every step: last write, last step
        "merge check, save": mtime(output_dir / "merged"),
        "held-out eval": mtime(output_dir / "summary.json"),
    }
    wall = seen["end"] - seen["start"]
    phases, peak_phase = whole_run_phases(seen["samples"], ends, wall)
    process_peak = 1024 * int(seen["ru_maxrss_kib"])
    training_peak = round(summary["peak_memory_gb"] * GiB)
    same_kind = summary.get("peak_memory_kind") == "process_max_rss"
    tensor_gb = summary.get("peak_tensor_memory_gb")
    return base | {
        "status": "ok",
        "process_peak_bytes": process_peak,
        "training_peak_bytes": training_peak,
        "training_peak_kind": summary.get("peak_memory_kind"),
        "process_to_training": _ratio(process_peak, training_peak) if same_kind else None,
        "tensor_peak_bytes": round(tensor_gb * GiB) if tensor_gb is not None else None,
        "sampled_peak_bytes": 1024 * max((s[2] for s in seen["samples"]), default=0),
        "launcher_peak_bytes": 1024 * int(seen["launcher_hwm_kib"]),
        "peak_phase": peak_phase,
        "phases": phases,
        "wall_s": wall,
        "train_time_s": summary.get("train_time_s"),
        "summary_wall_time_s": summary.get("wall_time_s"),
        "steps": summary.get("steps"),
        "tokens_trained": summary.get("tokens_trained"),
        "teacher_quant": summary.get("teacher_quant"),
        "student_quant": summary.get("student_quant"),
        "heldout": summary.get("heldout"),
        "merge_check": summary.get("merge_check"),
        "device": summary.get("device"),
    }


def _whole_runs(
    config: BenchConfig, specs: list[RunSpec], *, progress: bool, partial: Path | None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every whole run of ``specs`` on one set of saved inputs; their results and the inputs' description."""
    from tqdm.auto import tqdm

    kept = config.whole_run_dir is not None
    directory = Path(config.whole_run_dir or tempfile.mkdtemp(prefix="llm-neo-bench-"))
    try:
        with_teacher = any(METHODS[s.method].kd for s in specs)
        inputs = prepare_whole_runs(specs[0], directory / "inputs", with_teacher=with_teacher)
        results = []
        bar = tqdm(
            specs, desc="whole runs", unit="run", disable=None if progress else True, dynamic_ncols=True
        )
        for spec in bar:
            bar.set_postfix_str(spec.name)
            run_dir = directory / re.sub(r"[^\w+.-]", "_", spec.name + f"-{spec.chunk_size}")
            if run_dir.exists():
                shutil.rmtree(run_dir)  # an earlier bench's run: distill refuses a used output directory
            res = run_whole(
                spec,
                inputs,
                run_dir,
                timeout=config.run_timeout_s,
                malloc_mmap_threshold=config.malloc_mmap_threshold,
            )
            res["name"] = _row_name(spec, config.loss_chunk_size)
            results.append(res)
            if partial is not None:
                with partial.open("a") as handle:
                    handle.write(json.dumps(res) + "\n")
        bar.close()
    finally:
        if not kept:
            shutil.rmtree(directory, ignore_errors=True)
    described = {
        "records": inputs.records,
        "heldout_records": inputs.heldout,
        "eval_fraction": inputs.eval_fraction,
        "max_steps": specs[0].warmup_steps + specs[0].steps,
        "directory": str(directory) if kept else None,
    }
    return results, described


# ----------------------------------------------------------------------------------------------------
# The comparison


def _parse_run(text: str, default_chunk: int, option: str = "--runs") -> RunKey:
    """``"neo+int8-teacher:chunked:256"`` -> its RunKey; ConfigError naming ``option`` otherwise."""
    from llm_neo.commands.plan import ARMS, IMPLS
    from llm_neo.errors import ConfigError

    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise ConfigError(
            [f"{option}: {text!r} is not ARM:IMPL or ARM:IMPL:CHUNK (e.g. neo+int8-teacher:chunked)"]
        )
    try:
        method, quant = parse_arm(parts[0], option=option)
    except ConfigError as err:
        raise ConfigError([f"{problem} (in {text!r})" for problem in err.problems]) from None
    impl = parts[1]
    try:
        chunk = int(parts[2]) if len(parts) == 3 else default_chunk
    except ValueError:
        chunk = 0
    if method not in ARMS or impl not in IMPLS or chunk < 1:
        raise ConfigError(
            [f"{option}: {text!r}: methods are {', '.join(ARMS)}, impls {', '.join(IMPLS)}, chunk >= 1"]
        )
    key = RunKey(method, quant.get("teacher_quant", "none"), quant.get("student_quant", "none"), impl, chunk)
    if key.teacher_quant != "none" and not METHODS[method].kd:
        raise ConfigError(
            [f"{option}: {text!r}: {method} has no teacher to quantize; teacher variants are for kd and neo"]
        )
    if key.student_quant != "none" and not METHODS[method].lora:
        raise ConfigError(
            [
                f"{option}: {text!r}: a quantized (QLoRA) student base is for the LoRA arms (neo, lora); "
                f"{method} trains every weight of the student"
            ]
        )
    return key


def _parse_runs(texts: list[str], default_chunk: int, option: str, problems: list[str]) -> list[RunKey]:
    """Every entry of ``texts`` parsed (duplicates once, kd:plain first if absent); problems collected."""
    from llm_neo.errors import ConfigError

    keys: list[RunKey] = []
    for text in texts:
        try:
            key = _parse_run(text, default_chunk, option)
        except ConfigError as err:
            problems.extend(err.problems)
            continue
        if key not in keys:
            keys.append(key)
    if not any(k[:4] == ("kd", "none", "none", "plain") for k in keys):
        keys.insert(0, RunKey("kd", "none", "none", "plain", default_chunk))
    return keys


def _validate(config: BenchConfig) -> tuple[list[RunKey], list[RunKey]]:
    """The step runs and the whole runs (kd:plain added to each list: the baseline of the ratios; no
    whole runs when none are asked for); ConfigError listing every problem."""
    from llm_neo.commands.shapes import SHAPES
    from llm_neo.errors import ConfigError

    p: list[str] = []
    if config.shape not in SHAPES:
        p.append(f"--shape: {config.shape!r} is not one of {', '.join(SHAPES)}")
    runs = _parse_runs(config.runs, config.loss_chunk_size, "--runs", p)
    whole = (
        _parse_runs(config.whole_runs, config.loss_chunk_size, "--whole-runs", p) if config.whole_runs else []
    )
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
    if whole and config.seq_len is not None and config.seq_len < 3:
        p.append(
            f"--seq-len {config.seq_len}: a whole run's records are <s>, a token or more, </s>: use >= 3"
        )
    if p:
        raise ConfigError(p)
    return runs, whole


def _row_name(spec: RunSpec, default_chunk: int) -> str:
    name = f"{spec.arm} {spec.impl}"
    return (
        name
        if spec.impl == "plain" or spec.chunk_size == default_chunk
        else f"{name} (chunk {spec.chunk_size})"
    )


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
            teacher_quant=spec.get("teacher_quant", "none"),
            student_quant=spec.get("student_quant", "none"),
        )
        res["plan_bytes"] = est.total
        res["plan_phase"] = est.phase
        res["plan_components_gib"] = {k: round(v / GiB, 4) for k, v in est.components.items()}
        res["plan_teacher_weight_bytes"] = est.components["teacher weights"]
        res["plan_student_weight_bytes"] = est.components["student weights"]
        res["weights_floor_bytes"] = est.floor
        peak = res.get("peak_bytes") if res.get("status") == "ok" else None
        res["plan_error_pct"] = 100 * (est.total / peak - 1) if peak else None


@dataclass(frozen=True)
class Target:
    """``run``'s ``metric`` divided by ``versus``'s (another run's same metric, or with ``versus="self"``
    the same row's ``versus_metric``) against a threshold."""

    name: str
    run: str  # ARM:IMPL, at the bench's chunk size
    metric: str  # a result's field: "peak_bytes", "tokens_per_s", "process_peak_bytes", "peak_cut_bytes"
    versus: str  # ARM:IMPL, or "self"
    threshold: float
    at_most: bool  # the ratio must be <= threshold (else >=)
    rows: str = "step"  # "step": the step benchmark's rows; "whole": the whole runs'
    versus_metric: str | None = None  # versus="self": the field divided by ("weights_floor_bytes", ...)


# Issue 13: an int8 teacher must cut the peak by at least the weight bytes it saves (measured per row:
# peak_cut_bytes is the unquantized row's peak minus this row's, teacher_saved_bytes what quantize_teacher
# counted).
INT8_STEP_CUT = Target(
    "int8 teacher cuts Neo's step peak by ≥ the teacher's saved weight bytes",
    "neo+int8-teacher:chunked",
    "peak_cut_bytes",
    "self",
    1.0,
    False,
    versus_metric="teacher_saved_bytes",
)

# The issues' targets, and the shape and batch each was set for (elsewhere: shown for reference).
TARGETS: dict[str, tuple[dict[str, Any], list[Target]]] = {
    "cuda": (
        {"shape": "llama3-8b-to-1b", "batch_size": 8, "seq_len": 2048, "gradient_checkpointing": True},
        [
            Target("Neo peak ≤ 0.27 × plain full KD", "neo:chunked", "peak_bytes", "kd:plain", 0.27, True),
            Target(
                "Neo peak ≤ 1.15 × weights floor",
                "neo:chunked",
                "peak_bytes",
                "self",
                1.15,
                True,
                versus_metric="weights_floor_bytes",
            ),
            Target(
                "Neo tokens/s ≥ 1.05 × plain full KD", "neo:chunked", "tokens_per_s", "kd:plain", 1.05, False
            ),
            INT8_STEP_CUT,
        ],
    ),
    "cpu": (
        {"shape": "cpu-wide", "batch_size": 8, "seq_len": 256, "gradient_checkpointing": False},
        [
            Target(
                "Neo peak RSS ≤ 0.35 × plain full KD", "neo:chunked", "peak_bytes", "kd:plain", 0.35, True
            ),
            Target("Neo tokens/s ≥ 1.0 × plain Neo", "neo:chunked", "tokens_per_s", "neo:plain", 1.0, False),
            INT8_STEP_CUT,
            # Issue 12: what a user's whole `llm-neo distill` process holds, not only its training step.
            Target(
                "Whole Neo run: process peak ≤ 1.05 × its training-step peak",
                "neo:chunked",
                "process_peak_bytes",
                "self",
                1.05,
                True,
                rows="whole",
                versus_metric="training_peak_bytes",
            ),
            Target(
                "Whole Neo run peak ≤ 0.30 × whole plain full KD run",
                "neo:chunked",
                "process_peak_bytes",
                "kd:plain",
                0.30,
                True,
                rows="whole",
            ),
            Target(
                "int8 teacher cuts the whole Neo run's peak by ≥ the teacher's saved weight bytes",
                "neo+int8-teacher:chunked",
                "peak_cut_bytes",
                "self",
                1.0,
                False,
                rows="whole",
                versus_metric="teacher_saved_bytes",
            ),
        ],
    ),
}


def _find(rows: Sequence[dict[str, Any]], key: RunKey) -> dict[str, Any] | None:
    """The finished row of ``key`` (a plain run at any chunk size: the chunk does not apply to it)."""
    for res in rows:
        found = _key(res["spec"])
        same = found == key or (key.impl == "plain" and found[:4] == key[:4])
        if same and res.get("status") == "ok":
            return res
    return None


def check_targets(
    results: list[dict[str, Any]], settings: dict[str, Any], whole: Sequence[dict[str, Any]] = ()
) -> list[dict[str, Any]]:
    """Each target of the device type: measured ratio, threshold, PASS/FAIL (or n/a: a row not run or
    failed), and whether this run is the shape and batch the target was set for."""
    where, targets = TARGETS["cuda" if settings["device_type"] == "cuda" else "cpu"]
    applies = all(settings.get(k) == v for k, v in where.items())
    chunk = settings["loss_chunk_size"]

    out = []
    for target in targets:
        rows = whole if target.rows == "whole" else results
        row, value = _find(rows, _parse_run(target.run, chunk)), None
        if row is not None:
            if target.versus == "self":
                value = _ratio(row.get(target.metric), row.get(target.versus_metric or target.metric))
            elif (ref := _find(rows, _parse_run(target.versus, chunk))) is not None:
                value = _ratio(row.get(target.metric), ref.get(target.metric))
        holds = (
            None
            if value is None
            else (value <= target.threshold if target.at_most else value >= target.threshold)
        )
        out.append(
            {
                "target": target.name,
                "rows": target.rows,
                "value": value,
                "threshold": target.threshold,
                "result": "n/a" if holds is None else ("PASS" if holds else "FAIL"),
                "set_for": where,
                "applies": applies,
            }
        )
    return out


def _quantization_cuts(rows: list[dict[str, Any]], metric: str) -> None:
    """On each row with a quantized teacher: ``teacher_saved_bytes`` (its weight bytes before minus after,
    as quantize_teacher counted them) and ``peak_cut_bytes`` (``metric`` of the same run with the teacher
    unquantized minus this row's; None without that row). Likewise ``student_saved_bytes``."""
    for res in rows:
        for who in ("teacher", "student"):
            info = res.get(f"{who}_quant") or {}
            if info.get("weight_bytes_before") is not None and info.get("weight_bytes_after") is not None:
                res[f"{who}_saved_bytes"] = info["weight_bytes_before"] - info["weight_bytes_after"]
        key = _key(res["spec"])
        if key.teacher_quant == "none" or res.get("status") != "ok":
            continue
        ref = _find(rows, key._replace(teacher_quant="none"))
        if ref is not None and ref.get(metric) and res.get(metric):
            res["peak_cut_bytes"] = ref[metric] - res[metric]


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
    lines += _quantization_lines(report["results"], "peak_bytes", "step peak")
    lines += _whole_run_lines(report)
    lines += ["", "## Targets", ""]
    for t in report["targets"]:
        where = t["set_for"]
        note = (
            ""
            if t["applies"]
            else f" (set for {where['shape']} at {where['batch_size']} × {where['seq_len']}"
            f"{', gradient checkpointing' if where['gradient_checkpointing'] else ''}; shown for reference)"
        )
        value = "not run (or failed)" if t["value"] is None else f"measured {t['value']:.3f}"
        lines.append(f"- {t['result']}: {t['target']}: {value}{note}")
    return "\n".join(lines) + "\n"


def _mib(nbytes: int | None) -> str:
    return "" if nbytes is None else f"{nbytes / 2**20:.4g}"


def _quantization_lines(rows: list[dict[str, Any]], metric: str, what: str) -> list[str]:
    """The quantized rows: weight bytes before/after as quantize_teacher counted them, the plan's, and
    how much the peak fell against the same run with the teacher unquantized."""
    quantized = [r for r in rows if r.get("teacher_quant") or r.get("student_quant")]
    if not quantized:
        return []

    def weights(info: dict[str, Any] | None) -> str:
        if not info:
            return ""
        if info.get("weight_bytes_before") is None:  # a whole run's QLoRA base: its bytes with the adapters
            return f"{info['kind']}: {_mib(info.get('weight_bytes'))}"
        return f"{info['kind']}: {_mib(info['weight_bytes_before'])} → {_mib(info['weight_bytes_after'])}"

    lines = [
        "",
        f"Quantized rows ({what}s; weights as quantize_teacher counts their storage; MiB):",
        "",
        f"| run | teacher weights | saved | plan teacher | student base | saved | plan student | {what} "
        "| cut vs unquantized teacher | cut ÷ saved |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in quantized:
        cut, saved = r.get("peak_cut_bytes"), r.get("teacher_saved_bytes")
        lines.append(
            "| "
            + " | ".join(
                [
                    r["name"],
                    weights(r.get("teacher_quant")),
                    _mib(saved),
                    _mib(r.get("plan_teacher_weight_bytes")),
                    weights(r.get("student_quant")),
                    _mib(r.get("student_saved_bytes")),
                    _mib(r.get("plan_student_weight_bytes")),
                    _mib(r.get(metric) if r.get("status") == "ok" else None),
                    "" if cut is None else f"{cut / 2**20:+.4g}",
                    _fmt(_ratio(cut, saved)),
                ]
            )
            + " |"
        )
    return lines


def _whole_run_lines(report: dict[str, Any]) -> list[str]:
    """The whole `llm-neo distill` runs: their process peaks against their training-step peaks, and the
    phase that set each peak."""
    whole, inputs = report.get("whole_runs") or [], report.get("whole_inputs") or {}
    if not whole:
        return []
    s = report["settings"]
    mmap = s.get("malloc_mmap_threshold")
    lines = [
        "",
        "## Whole runs",
        "",
        f"Each row is one `python -m llm_neo distill` process (the command is in the JSON) on the same "
        "random "
        f"models, saved once as safetensors with a word-level tokenizer of exactly the vocabulary, and "
        f"{inputs.get('records')} text records of exactly {s['seq_len']} tokens: {inputs.get('max_steps')} "
        f"optimizer steps of {s['batch_size']} × {s['seq_len']} (--grad-accum 1), then the merge check, the "
        f"save and the held-out evaluation of {inputs.get('heldout_records')} records (one batch). "
        "**process peak**: the process's peak RSS, `os.wait4`'s ru_maxrss (it was started from a launcher "
        "of a "
        "few MiB, so nothing larger is inherited). **training peak**: its summary.json's `peak_memory_gb`, "
        "which on a CPU is the process's VmHWM read right after the last optimizer step (loading and every "
        "step included; the merge check, save and held-out eval not yet). **peak set in**: the phase in "
        "which the sampled VmHWM reached its maximum. glibc "
        + (f"MALLOC_MMAP_THRESHOLD_={mmap}" if mmap else "default malloc (adaptive mmap threshold)")
        + (f", {s['num_threads']} thread(s)" if s.get("num_threads") else "")
        + ".",
        "",
        "| run | process peak GiB | training peak GiB | process ÷ training | peak set in "
        "| step-bench peak GiB "
        "| wall s | train s | memory vs whole KD | status |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in whole:
        ok = r.get("status") == "ok"
        lines.append(
            "| "
            + " | ".join(
                [
                    r["name"],
                    _gib(r.get("process_peak_bytes") if ok else None),
                    _gib(r.get("training_peak_bytes") if ok else None),
                    _fmt(r.get("process_to_training"), 3),
                    r.get("peak_phase") or "",
                    _gib(r.get("step_peak_bytes")),
                    _fmt(r.get("wall_s"), 1),
                    _fmt(r.get("train_time_s"), 1),
                    _fmt(r.get("memory_vs_kd")),
                    r.get("status", "") + (f": {r['error']}" if r.get("error") else ""),
                ]
            )
            + " |"
        )
    lines += [
        "",
        "Largest sampled RSS in each phase (GiB; sampled every "
        f"{SAMPLE_INTERVAL_S * 1000:.0f} ms, so a lower bound of the phase's own peak; **bold**: the phase "
        "that set the process peak):",
        "",
        "| run | " + " | ".join(WHOLE_PHASES) + " |",
        "|---|" + "---|" * len(WHOLE_PHASES),
    ]
    for r in whole:
        if r.get("status") != "ok":
            continue
        by_name = {ph["phase"]: ph for ph in r.get("phases", [])}
        cells = []
        for name in WHOLE_PHASES:
            ph = by_name.get(name)
            value = _gib(ph.get("max_rss_bytes")) if ph else "–"
            cells.append(f"**{value}**" if ph and name == r.get("peak_phase") else value)
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    lines += _quantization_lines(whole, "process_peak_bytes", "process peak")
    return lines


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

    runs, whole_runs = _validate(config)
    shape = get_shape(config.shape)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    batch = config.batch_size or shape.batch_size
    seq = config.seq_len or shape.seq_len
    r = config.lora_r or shape.lora_r
    memory = "cuda" if device.type == "cuda" else ("rss" if config.isolate else "tracked")

    def spec(key: RunKey, memory: str) -> RunSpec:
        return RunSpec(
            shape=config.shape,
            method=key.method,
            teacher_quant=key.teacher_quant,
            student_quant=key.student_quant,
            impl=key.impl,
            chunk_size=key.chunk,
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

    specs = [spec(key, memory) for key in runs]
    whole_specs = [spec(key, "rss") for key in whole_runs]
    load_start = load_average()
    date = dt.date.today().isoformat()
    label = config.label or f"{config.shape}-{date}"
    partial = Path(config.output) / f"{label}.runs.jsonl" if config.output else None
    if partial is not None:
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text("")
    results = []
    bar = tqdm(
        specs,
        desc=f"bench {config.shape}",
        unit="run",
        disable=None if progress else True,
        dynamic_ncols=True,
    )
    for one in bar:
        bar.set_postfix_str(one.name + ("" if one.impl == "plain" else f":{one.chunk_size}"))
        if config.isolate:
            res = _run_isolated(one, config.run_timeout_s, config.malloc_mmap_threshold)
        else:
            res = _run_here(one)
        res["name"] = _row_name(one, config.loss_chunk_size)
        results.append(res)
        if partial is not None:  # each run's result as soon as it exists: a killed bench keeps them
            with partial.open("a") as handle:
                handle.write(json.dumps(res) + "\n")
    bar.close()
    whole: list[dict[str, Any]] = []
    whole_inputs: dict[str, Any] | None = None
    if whole_specs:
        whole, whole_inputs = _whole_runs(config, whole_specs, progress=progress, partial=partial)

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
    _quantization_cuts(results, "peak_bytes")
    if whole:
        whole_base = _find(whole, RunKey("kd", "none", "none", "plain", config.loss_chunk_size))
        for res in whole:
            ok = res.get("status") == "ok" and whole_base is not None
            res["memory_vs_kd"] = (
                _ratio(res.get("process_peak_bytes"), whole_base.get("process_peak_bytes"))
                if ok and whole_base is not None
                else None
            )
            # The same run's step benchmark, if it was one of --runs: its training step alone, measured
            # the same way.
            step = _find(results, _key(res["spec"]))
            res["step_peak_bytes"] = step.get("peak_bytes") if step is not None else None
        _quantization_cuts(whole, "process_peak_bytes")
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
        "whole_runs": whole,
        "whole_inputs": whole_inputs,
        "targets": check_targets(results, settings, whole),
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
    return 0 if all(r.get("status") == "ok" for r in [*report["results"], *report["whole_runs"]]) else 1


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
