"""Whole runs: `llm-neo distill` processes on the bench's shape, each measured from a minimal launcher."""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llm_neo.choices import METHODS
from llm_neo.commands.bench import launcher
from llm_neo.commands.bench.isolate import child_env
from llm_neo.commands.bench.runs import BenchConfig, RunSpec, ratio, row_name
from llm_neo.commands.bench.step import build_model
from llm_neo.runtime.memory import GiB

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
        model = build_model(model_config, dtype, device)
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


def distill_command(
    spec: RunSpec, inputs: WholeInputs, output_dir: Path, *, on_policy: Path | bool = False
) -> list[str]:
    """The `llm-neo distill` command of one whole run: ``warmup_steps + steps`` optimizer steps of one
    micro-batch of ``batch_size`` × ``seq_len`` tokens each, the held-out split one evaluation batch.
    ``on_policy``: True for ``--on-policy 1`` (online), a cache of student samples to train from it."""
    kd = METHODS[spec.method].kd
    command = [sys.executable, "-m", "llm_neo", "distill", "--student", str(inputs.student)]
    if isinstance(on_policy, Path):
        command += ["--teacher-cache", str(on_policy), "--kd-ratio", f"{spec.kd_ratio:g}"]
    elif kd:
        assert inputs.teacher is not None
        command += ["--teacher", str(inputs.teacher), "--kd-ratio", f"{spec.kd_ratio:g}"]
    if on_policy is not False:
        command += ["--on-policy", "1"]
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


def launch(
    command: list[str],
    directory: Path,
    env: dict[str, str],
    *,
    timeout: float,
    sample_interval: float = SAMPLE_INTERVAL_S,
) -> dict[str, Any]:
    """Run ``command`` from the minimal launcher, its log in ``directory/distill.log``: what the launcher
    saw (``launcher.py``'s RESULT, plus ``tail``: the log's last lines), or ``{"status", "error"}`` when it
    timed out, could not start or exited with an error (``oom`` when killed or out of memory)."""
    directory.mkdir(parents=True, exist_ok=True)
    log_path, seen_path = directory / "distill.log", directory / "launcher.json"
    # By path, -S -I: no site-packages and not this package (see launcher.py: its few MiB is the point).
    launch = [
        sys.executable,
        "-S",
        "-I",
        launcher.PATH,
        str(seen_path),
        str(log_path),
        str(sample_interval),
    ]
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
        return {"status": "timeout", "error": f"killed after {timeout:.0f} s"}
    tail = (
        " | ".join(log_path.read_text(errors="replace").strip().splitlines()[-3:])
        if log_path.exists()
        else ""
    )
    if not seen_path.exists():
        return {"status": "error", "error": f"launcher exit {proc.returncode}: {launcher_err[-300:]!r}"}
    seen: dict[str, Any] = json.loads(seen_path.read_text())
    if seen["returncode"] != 0:
        oom = seen["returncode"] == -9 or "out of memory" in tail.lower()
        return {"status": "oom" if oom else "error", "error": f"exit {seen['returncode']}: {tail[-500:]}"}
    return seen | {"tail": tail}


def timed_step_s(metrics: Path, warmup_steps: int) -> float | None:
    """The median seconds of a distill run's timed steps from its metrics.jsonl (a step's trained tokens,
    the growth of ``tokens``, over its ``tokens_per_s``; the first ``warmup_steps`` left out); None
    without the file."""
    if not metrics.exists():
        return None
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    seconds, before = [], 0
    for row in rows:
        if row["tokens_per_s"] > 0:
            seconds.append((row["tokens"] - before) / row["tokens_per_s"])
        before = row["tokens"]
    timed = seconds[warmup_steps:] or seconds
    return statistics.median(timed) if timed else None


def run_whole(
    spec: RunSpec,
    inputs: WholeInputs,
    directory: Path,
    *,
    timeout: float,
    malloc_mmap_threshold: int = 0,
    sample_interval: float = SAMPLE_INTERVAL_S,
    on_policy: Path | bool = False,
) -> dict[str, Any]:
    """One whole `llm-neo distill` run of ``spec`` in ``directory`` (its output and log): its process's
    peak RSS (``os.wait4``'s ru_maxrss), its summary.json and the phases; any failure becomes a result
    with a status, never a raise. ``on_policy`` as ``distill_command``'s (then the result also holds
    summary.json's ``on_policy``)."""
    output_dir = directory / "out"
    command = distill_command(spec, inputs, output_dir, on_policy=on_policy)
    base: dict[str, Any] = {
        "run": spec.name,
        "spec": dataclasses.asdict(spec),
        "kind": "whole",
        "command": " ".join(command[1:]).replace(f"{directory.parent}{os.sep}", ""),
    }
    env = child_env(malloc_mmap_threshold, spec.num_threads)
    seen = launch(command, directory, env, timeout=timeout, sample_interval=sample_interval)
    if "status" in seen:
        return base | seen
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
    return (
        base
        | {
            "status": "ok",
            "process_peak_bytes": process_peak,
            "training_peak_bytes": training_peak,
            "training_peak_kind": summary.get("peak_memory_kind"),
            "process_to_training": ratio(process_peak, training_peak) if same_kind else None,
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
            "cpu_user_s": seen.get("ru_utime_s"),
            "cpu_system_s": seen.get("ru_stime_s"),
            "step_s": timed_step_s(output_dir / "metrics.jsonl", spec.warmup_steps),
        }
        | ({"on_policy": summary.get("on_policy")} if on_policy is not False else {})
    )


def run_whole_runs(
    config: BenchConfig,
    specs: list[RunSpec],
    *,
    progress: bool,
    partial: Path | None,
    also: Callable[[WholeInputs, Path, list[dict[str, Any]]], None] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every whole run of ``specs`` on one set of saved inputs; their results and the inputs' description.
    ``also(inputs, directory, results)`` runs next, while the inputs exist (the peers' runs)."""
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
            res["name"] = row_name(spec, config.loss_chunk_size)
            results.append(res)
            if partial is not None:
                with partial.open("a") as handle:
                    handle.write(json.dumps(res) + "\n")
        bar.close()
        if also is not None:
            also(inputs, directory, results)
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
