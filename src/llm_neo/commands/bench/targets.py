"""The acceptance targets: each a ratio of two measurements against a bound, PASS/FAIL/n/a."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from llm_neo.commands.bench.runs import find_row, parse_run, ratio, result_key


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
        row, value = find_row(rows, parse_run(target.run, chunk)), None
        if row is not None:
            if target.versus == "self":
                value = ratio(row.get(target.metric), row.get(target.versus_metric or target.metric))
            elif (ref := find_row(rows, parse_run(target.versus, chunk))) is not None:
                value = ratio(row.get(target.metric), ref.get(target.metric))
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


def quantization_cuts(rows: list[dict[str, Any]], metric: str) -> None:
    """On each row with a quantized teacher: ``teacher_saved_bytes`` (its weight bytes before minus after,
    as quantize_teacher counted them) and ``peak_cut_bytes`` (``metric`` of the same run with the teacher
    unquantized minus this row's; None without that row). Likewise ``student_saved_bytes``."""
    for res in rows:
        for who in ("teacher", "student"):
            info = res.get(f"{who}_quant") or {}
            if info.get("weight_bytes_before") is not None and info.get("weight_bytes_after") is not None:
                res[f"{who}_saved_bytes"] = info["weight_bytes_before"] - info["weight_bytes_after"]
        key = result_key(res["spec"])
        if key.teacher_quant == "none" or res.get("status") != "ok":
            continue
        ref = find_row(rows, key._replace(teacher_quant="none"))
        if ref is not None and ref.get(metric) and res.get(metric):
            res["peak_cut_bytes"] = ref[metric] - res[metric]
