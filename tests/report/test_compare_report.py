"""The comparison's records and report: a results.json written before the records were typed loads, writes
back the same and renders the same report.md; the memory kind, not the device's name, says what the
memory numbers are; a damaged file names its key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llm_neo.records import RecordError, from_json, load, to_json
from llm_neo.records.compare import CompareResults, Verdict
from llm_neo.report.compare import claims, report_blocks, verdict, write_report
from llm_neo.report.document import to_markdown
from llm_neo.report.style import label
from llm_neo.summary import MemoryKind

DATA = Path(__file__).parent / "data"
# Written by `llm-neo compare`'s code before its results were typed records (sft, neo and two quantized
# neo arms x 2 seeds at 8 and 24 records, --probes, --project-tokens 50M --gpu h100, a demo's context),
# and the report.md that code rendered from it.
RESULTS = DATA / "compare-results.json"
REPORT = DATA / "compare-report.md"


@pytest.fixture
def data() -> dict:
    return json.loads(RESULTS.read_text())


def _markdown(results: CompareResults) -> str:
    names = ["scores", "memory", "time", "loss", "sizes", "movement", "inheritance", "bias"]
    return to_markdown(report_blocks(results), {name: f"plots/{name}.png" for name in names})


def test_an_earlier_results_json_loads_and_writes_back_the_same(data):
    results = load(CompareResults, RESULTS)
    assert to_json(results) == data
    # Keys in the same order, ints still ints: the file itself is unchanged by a load and a save.
    assert json.dumps(to_json(results), indent=2) == json.dumps(data, indent=2)
    assert results.paired[0].accuracy is not None and results.paired[0].accuracy.verdict is Verdict.NEITHER
    assert results.memory_kind is MemoryKind.PROCESS_MAX_RSS


def test_an_earlier_results_json_renders_the_same_report(tmp_path):
    written = write_report(load(CompareResults, RESULTS), tmp_path)
    assert written["markdown"].read_text() == REPORT.read_text()
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(
        f"{name}.png"
        for name in ("scores", "memory", "time", "loss", "sizes", "movement", "inheritance", "bias")
    )


def test_keys_a_file_holds_only_sometimes_stay_absent(data):
    for key in ("probe", "context", "demo"):
        del data[key]
    del data["timing"]["probe_s"]
    del data["paired"][0]["accuracy"]
    del data["models"]["teacher"]
    results = from_json(CompareResults, data)
    assert results.probe is None and results.models.teacher is None and results.paired[0].accuracy is None
    assert to_json(results) == data
    assert "## Verdict" in _markdown(results)  # and the report still renders without them


@pytest.mark.parametrize(
    ("kind", "device", "says"),
    [
        # A GPU's name need not start with "H" or say "cuda": the old guess called this one a CPU.
        ("cuda_max_allocated", "NVIDIA H100 80GB HBM3", "Memory: CUDA's max allocated."),
        ("cuda_max_allocated", "NVIDIA A100-SXM4-80GB", "Memory: CUDA's max allocated."),
        ("process_max_rss", "CPU (x86_64, 2 cores)", "Memory: the process's peak resident set"),
        ("process_max_rss", "Hygon CPU", "Memory: the process's peak resident set"),
    ],
)
def test_the_memory_kind_measured_says_what_the_memory_numbers_are(data, kind, device, says):
    data["device"] = device
    for group in data["groups"]:
        for run in group["runs"]:
            run["peak_memory_kind"] = kind
    assert says in _markdown(from_json(CompareResults, data))


def test_a_claims_status_follows_the_paired_verdict(data):
    data["config"]["kd_ratio"] = 0.9  # the claim's recipe: measured under its conditions
    largest = data["data"]["sizes"][-1]
    row = next(p for p in data["paired"] if p["records"] == largest)
    statuses = {}
    for value in ("a", "b", "neither"):
        row["accuracy"]["verdict"] = value
        results = from_json(CompareResults, data)
        claim = next(c for c in claims(results) if c["claim"].endswith(label(row["against"])))
        statuses[value] = claim["status"]
    assert statuses == {"a": "held", "b": "not held", "neither": "not distinguishable"}
    assert any("Neo's paired difference" in line for line in verdict(results))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda d: d["paired"][1]["accuracy"].update(verdict="maybe"),
            "CompareResults.paired[1].accuracy.verdict: 'maybe' is not one of ['a', 'b', 'neither']",
        ),
        (
            lambda d: d["groups"][2]["runs"][1].update(peak_memory_kind="gpu"),
            "CompareResults.groups[2].runs[1].peak_memory_kind: 'gpu' is not one of",
        ),
        (
            lambda d: d["groups"][0]["stats"]["accuracy"].pop("mean"),
            "CompareResults.groups[0].stats.accuracy: missing key 'mean'",
        ),
        (
            lambda d: d["cost"]["projection"]["arms"]["neo"].update(hours="soon"),
            "CompareResults.cost.projection.arms.neo.hours: expected a number, found str",
        ),
    ],
)
def test_a_damaged_results_json_names_the_key(tmp_path, data, mutate, message):
    mutate(data)
    damaged = tmp_path / "results.json"
    damaged.write_text(json.dumps(data))
    with pytest.raises(RecordError, match=f"{damaged}: " + message.replace("[", r"\[").replace("]", r"\]")):
        load(CompareResults, damaged)
