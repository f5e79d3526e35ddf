"""`llm-neo bench --peers trl`: the peers side by side with llm-neo's whole runs.

On the whole runs' saved inputs (the same random models, data, batches and order), each peer setting runs
in a process of its own, started from the same minimal launcher as the whole runs (``whole.launch``), so
its peak RSS and CPU seconds are measured exactly as theirs are. TRL's rows come from ``peer_trl``
(``GKDTrainer``, ``lmbda=0``, ``beta=0``: forward KL, no CE term, full logits) with a PEFT LoRA branch like
the neo arm's and without one (the full student), set against llm-neo's ``neo`` and ``kd`` whole runs at
distill's default loss (chunked).

The loss check: step 1's loss depends only on the weights and the first batch, so TRL's must equal the
step-1 loss of ``llm-neo distill --method kd --kd-ratio 1`` (forward KL alone) on the same inputs, to
``LOSS_CHECK_RTOL``: what shows both sides trained on the same tokens with the same objective.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

from llm_neo.choices import FULL_PARAMETER_LR, LORA_LR
from llm_neo.commands.bench.isolate import child_env
from llm_neo.commands.bench.runs import BenchConfig, RunKey, RunSpec, find_row, ratio, row_name
from llm_neo.commands.bench.whole import WholeInputs, launch, run_whole

# Relative. Both sides compute forward KL in fp32 over the full vocabulary; measured 1e-7 on the tiny
# shape (against an fp64 reference, llm-neo 1e-7 and TRL 2e-7). TRL's default bf16 autocast would be
# 1e-4 off: peer_trl turns it off, as llm-neo's CPU runs are fp32.
LOSS_CHECK_RTOL = 1e-5
PEER_PACKAGES = {"trl": "trl"}  # a --peers name -> the module it needs
SETTINGS_NOTE = (
    "TRL's closest settings to llm-neo's KD: `GKDTrainer` with `lmbda=0` (supervised KD, no on-policy "
    "generation) and `beta=0` (its generalized JSD special-cased to forward KL(teacher ‖ student)); it has "
    "no CE term and always builds both models' full logits. The TRL process only loads and trains (no "
    "merge, save or held-out evaluation, which the llm-neo whole runs include)."
)


def require_peers(peers: list[str]) -> None:
    """ConfigError naming the extra to install when a peer's package is not importable."""
    from llm_neo.errors import ConfigError

    missing = [p for p in peers if importlib.util.find_spec(PEER_PACKAGES[p]) is None]
    if missing:
        raise ConfigError(
            [
                f"--peers {p}: the {PEER_PACKAGES[p]} package is not importable; "
                "install it with: pip install 'llm-neo[peers]'"
                for p in missing
            ]
        )


def peer_keys(config: BenchConfig) -> list[RunKey]:
    """The llm-neo whole runs the peers are set against: full KD and Neo as `llm-neo distill` runs them
    by default (the chunked loss)."""
    return [
        RunKey("kd", "none", "none", "chunked", config.loss_chunk_size),
        RunKey("neo", "none", "none", "chunked", config.loss_chunk_size),
    ]


def trl_command(spec: RunSpec, inputs: WholeInputs, result: Path, lora_r: int) -> list[str]:
    """``peer_trl``'s command for ``spec``'s shape and steps, at llm-neo's default learning rate for the
    arm (the paper's rule: 10× for a LoRA branch)."""
    assert inputs.teacher is not None
    return [
        sys.executable, "-m", "llm_neo.commands.bench.peer_trl", str(result),
        "--student", str(inputs.student),
        "--teacher", str(inputs.teacher),
        "--data", str(inputs.data),
        "--lora-r", str(lora_r),
        "--max-steps", str(spec.warmup_steps + spec.steps),
        "--warmup-steps", str(spec.warmup_steps),
        "--batch-size", str(spec.batch_size),
        "--max-length", str(spec.seq_len),
        "--seed", str(spec.seed),
        "--eval-fraction", repr(inputs.eval_fraction),
        "--lr", repr(LORA_LR if lora_r else FULL_PARAMETER_LR),
    ]  # fmt: skip


def _cpu_s(row: dict[str, Any] | None) -> float | None:
    if row is None or row.get("cpu_user_s") is None or row.get("cpu_system_s") is None:
        return None
    return float(row["cpu_user_s"]) + float(row["cpu_system_s"])


def run_trl(
    config: BenchConfig, spec: RunSpec, inputs: WholeInputs, directory: Path, *, lora_r: int, versus: str
) -> dict[str, Any]:
    """One TRL GKD process (``lora_r`` 0: the full student), measured as a whole run; never raises."""
    run_dir = directory / ("trl-gkd-lora" if lora_r else "trl-gkd-full")
    result = run_dir / "result.json"
    command = trl_command(spec, inputs, result, lora_r)
    row: dict[str, Any] = {
        "peer": "trl",
        "name": "TRL GKD+LoRA" if lora_r else "TRL GKD full",
        "lora_r": lora_r,
        "versus": versus,
        "command": " ".join(command[1:]).replace(f"{directory}{os.sep}", ""),
        "status": "ok",
        "error": None,
        "losses": [],
        "versions": {},
    }
    env = child_env(config.malloc_mmap_threshold, spec.num_threads)
    seen = launch(command, run_dir, env, timeout=config.run_timeout_s)
    if "status" in seen or not result.exists():
        return row | {"status": seen.get("status", "error"), "error": seen.get("error", "no result")}
    out = json.loads(result.read_text())
    return row | {
        "process_peak_bytes": 1024 * int(seen["ru_maxrss_kib"]),
        "cpu_user_s": seen.get("ru_utime_s"),
        "cpu_system_s": seen.get("ru_stime_s"),
        "wall_s": seen["end"] - seen["start"],
        "train_time_s": out["train_time_s"],
        "step_s": out["step_s"],
        "losses": out["losses"],
        "trainable_parameters": out["trainable_parameters"],
        "versions": out["versions"],
    }


def unsupported_rows(config: BenchConfig, neo_name: str) -> list[dict[str, Any]]:
    """The settings of llm-neo's neo row that TRL cannot run, each with why."""
    rows = []
    if config.kd_ratio < 1:
        rows.append(
            (
                f"TRL GKD+LoRA, {1 - config.kd_ratio:g}·CE + {config.kd_ratio:g}·KL",
                "GKDTrainer's loss is the generalized JSD alone: it has no CE term, so the paper's "
                "objective cannot be set",
            )
        )
    rows.append(
        (
            "TRL GKD+LoRA, chunked loss",
            "GKDTrainer always builds both models' full [B, T, V] logits: it has no chunked loss",
        )
    )
    return [
        {"peer": "trl", "name": name, "lora_r": 0, "versus": neo_name, "command": "",
         "status": "unsupported", "error": why, "losses": [], "versions": {}}
        for name, why in rows
    ]  # fmt: skip


def loss_check(
    config: BenchConfig, kd: RunSpec, inputs: WholeInputs, directory: Path, peers: list[dict[str, Any]]
) -> dict[str, Any]:
    """Step 1's loss of each TRL row against ``distill --method kd --kd-ratio 1`` run for one step."""
    spec = dataclasses.replace(kd, kd_ratio=1.0, warmup_steps=0, steps=1)
    run = run_whole(
        spec,
        inputs,
        directory / "loss-check",
        timeout=config.run_timeout_s,
        malloc_mmap_threshold=config.malloc_mmap_threshold,
    )
    metrics = directory / "loss-check" / "out" / "metrics.jsonl"
    ours = json.loads(metrics.read_text().splitlines()[0])["loss"] if metrics.exists() else None
    theirs = {p["name"]: p["losses"][0] for p in peers if p["status"] == "ok" and p["losses"]}
    diffs = [abs(v - ours) / max(abs(ours), 1e-12) for v in theirs.values()] if ours is not None else []
    worst = max(diffs) if diffs else None
    return {
        "llm_neo_loss": ours,
        "peer_losses": theirs,
        "max_rel_diff": worst,
        "rtol": LOSS_CHECK_RTOL,
        "passed": worst <= LOSS_CHECK_RTOL if worst is not None else None,
        "command": run["command"],
        "error": run.get("error"),
    }


def run_peers(
    config: BenchConfig,
    specs: list[RunSpec],
    inputs: WholeInputs,
    directory: Path,
    whole: list[dict[str, Any]],
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every peer row and the loss check, the ratios of llm-neo's whole runs to each row filled in."""
    by_key = {(s.method, s.impl): s for s in specs}
    kd_spec, neo_spec = by_key[("kd", "chunked")], by_key[("neo", "chunked")]
    kd_key, neo_key = peer_keys(config)
    kd_name = row_name(kd_spec, config.loss_chunk_size)
    neo_name = row_name(neo_spec, config.loss_chunk_size)
    rows = [
        run_trl(config, neo_spec, inputs, directory, lora_r=neo_spec.lora_r, versus=neo_name),
        run_trl(config, kd_spec, inputs, directory, lora_r=0, versus=kd_name),
        *unsupported_rows(config, neo_name),
    ]
    mine = {neo_name: find_row(whole, neo_key), kd_name: find_row(whole, kd_key)}
    for row in rows:
        ours = mine[row["versus"]] if row["status"] == "ok" else None
        ok = ours is not None and ours.get("status") == "ok"
        row["memory_ratio"] = (
            ratio(ours.get("process_peak_bytes"), row.get("process_peak_bytes")) if ok and ours else None
        )
        row["cpu_ratio"] = ratio(_cpu_s(ours), _cpu_s(row)) if ok else None
        row["step_ratio"] = ratio(ours.get("step_s"), row.get("step_s")) if ok and ours else None
    return rows, loss_check(config, kd_spec, inputs, directory, rows)
