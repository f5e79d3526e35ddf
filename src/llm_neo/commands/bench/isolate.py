"""A step run in a fresh Python process (`python -m llm_neo.commands.bench --_child SPEC`), so that one
run's memory cannot leak into the next's and an out-of-memory error ends only that run."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llm_neo.commands.bench.runs import RunSpec
from llm_neo.commands.bench.step import run_one

RESULT_TAG = "LLM_NEO_BENCH_RESULT "


def child_env(malloc_mmap_threshold: int = 0, num_threads: int = 0) -> dict[str, str]:
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


def run_isolated(spec: RunSpec, timeout: float, malloc_mmap_threshold: int = 0) -> dict[str, Any]:
    """``run_one`` in a fresh Python process; any failure becomes a result with a status, never a raise."""
    env = child_env(malloc_mmap_threshold)
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
