"""The acceptance targets: each a ratio of two measurements against a bound, PASS/FAIL/n/a.

The targets are data: benchmarks/targets.yaml, shipped byte-identical as this package's targets.yaml
(a wheel has no benchmarks/ directory; tests/commands/test_bench_records.py keeps the two equal).
``load_targets`` reads it into ``Target``s and refuses a malformed file with a RecordError that names
the file and the key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from llm_neo.commands.bench.runs import find_row, parse_run, ratio, result_key
from llm_neo.errors import ConfigError
from llm_neo.records import RecordError, from_json
from llm_neo.records.bench import Outcome, Rows, Settings, StepRun, TargetResult, WholeRun

DEVICE_TYPES = ("cuda", "cpu")  # the file's sections: cuda, and cpu for every other device


@dataclass(frozen=True)
class Target:
    """``run``'s ``metric`` divided by ``versus``'s (another run's same metric, or with ``versus="self"``
    the same row's ``versus_metric``) against a threshold."""

    name: str
    run: str  # ARM:IMPL, at the bench's chunk size
    metric: str  # a field of the row (records.bench: StepRun for "step", WholeRun for "whole")
    versus: str  # ARM:IMPL, or "self"
    threshold: float
    at_most: bool  # the ratio must be <= threshold (else >=)
    rows: Rows = "step"  # "step": the step benchmark's rows; "whole": the whole runs'
    versus_metric: str | None = None  # versus="self": the field divided by ("weights_floor_bytes", ...)


@dataclass(frozen=True)
class DeviceTargets:
    """A device type's targets, and the settings (shape, batch, ...) they were set for."""

    set_for: dict[str, Any]
    targets: list[Target]


def targets_file() -> Path:
    """The targets this package ships (its copy of benchmarks/targets.yaml)."""
    return Path(str(resources.files("llm_neo.commands.bench") / "targets.yaml"))


def load_targets(path: Path | None = None) -> dict[str, DeviceTargets]:
    """Each device type's targets from ``path`` (default: ``targets_file()``), in the file's order;
    RecordError naming the file and the key when it is malformed."""
    file = path or targets_file()
    try:
        data = yaml.safe_load(file.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise RecordError(f"{file}: cannot read it as YAML ({err})") from err
    try:
        if not isinstance(data, dict):
            raise RecordError(f"expected a mapping of {', '.join(DEVICE_TYPES)}, found {type(data).__name__}")
        return {device: _device_targets(data, device) for device in DEVICE_TYPES}
    except RecordError as err:
        raise RecordError(f"{file}: {err}") from err


def _device_targets(data: dict[str, Any], device: str) -> DeviceTargets:
    if device not in data:
        raise RecordError(f"missing key {device!r}")
    parsed = from_json(DeviceTargets, data[device], device)  # the shapes: a mapping, a list, ...
    _known_keys(data[device], device, [f.name for f in dataclasses.fields(DeviceTargets)])
    for i, item in enumerate(data[device]["targets"]):
        _known_keys(item, f"{device}.targets[{i}]", [f.name for f in dataclasses.fields(Target)])
    _known_keys(parsed.set_for, f"{device}.set_for", [f.name for f in dataclasses.fields(Settings)])
    for i, target in enumerate(parsed.targets):
        _check_target(target, f"{device}.targets[{i}]")
    return parsed


def _known_keys(data: dict[str, Any], where: str, keys: list[str]) -> None:
    """A misspelled key is an error, not a default silently used (from_json passes over unknown keys)."""
    if unknown := [k for k in data if k not in keys]:
        raise RecordError(f"{where}: unknown key {unknown[0]!r} (keys: {', '.join(keys)})")


def _check_target(target: Target, where: str) -> None:
    row = StepRun if target.rows == "step" else WholeRun
    fields = {f.name for f in dataclasses.fields(row)} - {"extra"}
    for key, metric in (("metric", target.metric), ("versus_metric", target.versus_metric)):
        if metric is not None and metric not in fields:
            problem = f"{metric!r} is not a field of a {target.rows} row ({row.__name__})"
            raise RecordError(f"{where}.{key}: {problem}")
    if (target.versus == "self") != (target.versus_metric is not None):
        raise RecordError(f"{where}: versus_metric is for versus: self, and versus: self needs it")
    for key, run in (("run", target.run), ("versus", target.versus)):
        if run != "self":
            try:
                parse_run(run, 1, option=key)
            except ConfigError as err:
                raise RecordError(f"{where}.{key}: {'; '.join(err.problems)}") from None


def check_targets(
    results: list[dict[str, Any]], settings: dict[str, Any], whole: Sequence[dict[str, Any]] = ()
) -> list[TargetResult]:
    """Each target of the device type: measured ratio, threshold, PASS/FAIL (or n/a: a row not run or
    failed), and whether this run is the shape and batch the target was set for."""
    section = load_targets()["cuda" if settings["device_type"] == "cuda" else "cpu"]
    where = section.set_for
    applies = all(settings.get(k) == v for k, v in where.items())
    chunk = settings["loss_chunk_size"]

    out = []
    for target in section.targets:
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
            TargetResult(
                target=target.name,
                rows=target.rows,
                value=value,
                threshold=target.threshold,
                result=Outcome.NA if holds is None else (Outcome.PASS if holds else Outcome.FAIL),
                set_for=where,
                applies=applies,
            )
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
