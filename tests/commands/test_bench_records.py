"""The bench's targets file, its LABEL.json record and its Markdown report, against files written before
they were data, records and blocks (tests/commands/data/bench-tiny.*: a tiny isolated bench with step,
quantized and whole runs)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from llm_neo.commands.bench import format_report
from llm_neo.commands.bench.targets import Target, load_targets, targets_file
from llm_neo.records import RecordError, dumps, load
from llm_neo.records.bench import BenchReport, FailedWholeRun, Outcome, StepRun, WholeRun

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(__file__).parent / "data"
FIXTURE = DATA / "bench-tiny.json"


def test_the_package_ships_benchmarks_targets_yaml():
    assert targets_file().read_bytes() == (ROOT / "benchmarks" / "targets.yaml").read_bytes(), (
        f"benchmarks/targets.yaml changed: copy it to {targets_file().relative_to(ROOT)}"
    )


def test_the_shipped_targets_are_the_ones_the_bench_reported():
    targets = load_targets()
    assert list(targets) == ["cuda", "cpu"]
    assert targets["cuda"].set_for == {
        "shape": "llama3-8b-to-1b", "batch_size": 8, "seq_len": 2048, "gradient_checkpointing": True
    }  # fmt: skip
    # The fixture's targets were computed from the Python TARGETS the file replaced: same names, same
    # thresholds, same order.
    reported = load(BenchReport, FIXTURE).targets
    assert [(t.name, t.threshold, t.rows) for t in targets["cpu"].targets] == [
        (t.target, t.threshold, t.rows) for t in reported
    ]
    assert [t.name for t in targets["cuda"].targets] == [
        "Neo peak ≤ 0.27 × plain full KD",
        "Neo peak ≤ 1.15 × weights floor",
        "Neo tokens/s ≥ 1.05 × plain full KD",
        "int8 teacher cuts Neo's step peak by ≥ the teacher's saved weight bytes",
    ]
    assert targets["cuda"].targets[3] == targets["cpu"].targets[2]  # one target, both devices


def test_every_target_names_a_row_field_and_runs_as_runs_spells_them():
    # load_targets checks them (a bad one raises, below); here: the checks see every target.
    step = {f.name for f in dataclasses.fields(StepRun)}
    whole = {f.name for f in dataclasses.fields(WholeRun)}
    for section in load_targets().values():
        for t in section.targets:
            fields = whole if t.rows == "whole" else step
            assert t.metric in fields and (t.versus_metric is None or t.versus_metric in fields)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("cpu", 1, "metric", "tokens_per_sec"), "cpu.targets[1].metric: 'tokens_per_sec' is not a field"),
        (("cpu", 3, "metric", "peak_bytes"), "cpu.targets[3].metric: 'peak_bytes' is not a field of a whole"),
        (("cuda", 0, "run", "neo:fused"), "cuda.targets[0].run: run: 'neo:fused'"),
        (("cuda", 0, "threshold", "high"), "cuda.targets[0].threshold: expected a number"),
        (("cuda", 0, "rows", "all"), "cuda.targets[0].rows: 'all' is not one of"),
        (("cuda", 0, "versus_metric", "peak_bytes"), "cuda.targets[0]: versus_metric is for versus: self"),
        (("cpu", 0, "thresold", 0.3), "cpu.targets[0]: unknown key 'thresold'"),
    ],
)
def test_a_malformed_targets_file_names_the_file_and_the_key(tmp_path, change, message):
    import yaml

    device, i, key, value = change
    data = yaml.safe_load(targets_file().read_text())
    data[device]["targets"][i] = {**data[device]["targets"][i], key: value}
    bad = tmp_path / "targets.yaml"
    bad.write_text(yaml.safe_dump(data, allow_unicode=True))
    with pytest.raises(RecordError) as err:
        load_targets(bad)
    assert str(err.value).startswith(f"{bad}: ") and message in str(err.value)


def test_a_targets_file_without_a_device_type_or_not_yaml_is_refused(tmp_path):
    bad = tmp_path / "targets.yaml"
    bad.write_text("cuda: {set_for: {}, targets: []}\n")
    with pytest.raises(RecordError, match="missing key 'cpu'"):
        load_targets(bad)
    bad.write_text("cuda: [\n")
    with pytest.raises(RecordError, match="cannot read it as YAML"):
        load_targets(bad)


def test_a_target_is_typed_as_the_file_says():
    t = load_targets()["cpu"].targets[3]
    assert t == Target(
        "Whole Neo run: process peak ≤ 1.05 × its training-step peak",
        "neo:chunked",
        "process_peak_bytes",
        "self",
        1.05,
        True,
        rows="whole",
        versus_metric="training_peak_bytes",
    )


def _committed_reports() -> list[Path]:
    files = [FIXTURE, *sorted((ROOT / "benchmarks" / "results").glob("cpu-wide*.json"))]
    return [f for f in files if "results" in json.loads(f.read_text())]


@pytest.mark.parametrize("path", _committed_reports(), ids=lambda p: p.name)
def test_a_label_json_loads_and_writes_back_unchanged(path):
    report = load(BenchReport, path)
    text = path.read_text()
    if "whole_runs" in json.loads(text):
        assert dumps(report) == text  # byte for byte: every key, in its order
    else:  # the step-only files of 2026-11-28, before whole runs: those keys are added, nothing else
        assert json.loads(dumps(report)) == json.loads(text) | {"whole_runs": [], "whole_inputs": None}


def test_the_fixture_types_every_row():
    report = load(BenchReport, FIXTURE)
    assert report.results[2].teacher_quant and report.results[2].peak_cut_bytes is not None
    assert all(isinstance(r, WholeRun) for r in report.whole_runs) and report.whole_inputs
    assert [t.result for t in report.targets].count(Outcome.NA) == 1
    assert not report.extra and not any(r.extra for r in report.results)  # nothing left untyped


def test_a_failed_whole_run_is_its_own_record():
    data = json.loads(FIXTURE.read_text())
    failed = {k: data["whole_runs"][1][k] for k in ("run", "spec", "kind", "command", "name")}
    failed |= {"status": "oom", "error": "exit -9: ", "memory_vs_kd": None, "step_peak_bytes": 5}
    data["whole_runs"][1] = failed
    report = json.loads(dumps(load_json(data)))
    assert report == data
    assert isinstance(load_json(data).whole_runs[1], FailedWholeRun)
    text = format_report(load_json(data))
    # As the bench wrote it before its records: no measurements, its step peak (5 bytes), the error.
    assert "\n| neo chunked |  |  |  |  | 4.66e-09 |  |  |  | oom: exit -9:  |\n" in text


def load_json(data: dict) -> BenchReport:
    from llm_neo.records import from_json

    return from_json(BenchReport, data)


def _markdown_before_blocks(path: Path) -> str:
    """The .md today's code wrote, with the two differences of rendering it from report.document blocks:
    a table's corner cell is empty (it read "run"), and the quantized table's second "saved" column (the
    student base's) is "base saved" (a Table's columns are keys)."""
    lines = path.read_text().split("\n")
    lines = ["| |" + line.removeprefix("| run |") if line.startswith("| run |") else line for line in lines]
    return "\n".join(lines).replace("| student base | saved |", "| student base | base saved |")


@pytest.mark.parametrize("path", _committed_reports(), ids=lambda p: p.name)
def test_the_report_renders_as_before(path):
    assert format_report(load(BenchReport, path)) == _markdown_before_blocks(path.with_suffix(".md"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("cuda: []\ncpu: {set_for: {}, targets: []}\n", "cuda: expected an object, found list"),
        (
            "cuda: {set_for: {}, targets: {}}\ncpu: {set_for: {}, targets: []}\n",
            "cuda.targets: expected a list",
        ),
        (
            "cuda: {set_for: {shap: x}, targets: []}\ncpu: {set_for: {}, targets: []}\n",
            "cuda.set_for: unknown key",
        ),
        (
            "cuda: {set_for: {}, targets: [], note: x}\ncpu: {set_for: {}, targets: []}\n",
            "cuda: unknown key 'note'",
        ),
    ],
)
def test_a_targets_file_of_the_wrong_shape_is_refused(tmp_path, text, message):
    bad = tmp_path / "targets.yaml"
    bad.write_text(text)
    with pytest.raises(RecordError, match=message):
        load_targets(bad)


def test_two_runs_of_one_name_keep_their_rows():
    # neo:plain and neo:plain:16 are both "neo plain" (a plain loss has no chunk): a table keyed by name
    # must not drop one.
    data = json.loads(FIXTURE.read_text())
    data["results"].append(data["results"][1])
    text = format_report(load_json(data))
    assert "\n| neo chunked | 0.519 |" in text and "\n| neo chunked (5) | 0.519 |" in text
