"""The benchmark end to end on the tiny shape (CPU, seconds). Never asserts speed: these are not timings."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from llm_neo.commands.bench import (
    BenchConfig,
    RunSpec,
    bench,
    check_targets,
    format_report,
    run_bench,
    run_one,
)
from llm_neo.config import DistillConfig, add_dataclass_arguments, build_config
from llm_neo.errors import ConfigError
from llm_neo.runtime.memory import LiveTensorBytes

RUNS = ["kd:plain", "kd:chunked", "neo:plain", "neo:chunked", "neo:chunked:16", "sft:plain", "lora:chunked"]


@pytest.fixture(scope="module")
def tiny_report():
    config = BenchConfig(
        shape="tiny", runs=RUNS, warmup_steps=1, steps=2, isolate=False, device="cpu", num_threads=1
    )
    return bench(config, progress=False)


def test_every_run_has_memory_speed_and_a_plan(tiny_report):
    rows = tiny_report["results"]
    assert [(r["spec"]["method"], r["spec"]["impl"], r["spec"]["chunk_size"]) for r in rows] == [
        ("kd", "plain", 1024),
        ("kd", "chunked", 1024),
        ("neo", "plain", 1024),
        ("neo", "chunked", 1024),
        ("neo", "chunked", 16),
        ("sft", "plain", 1024),
        ("lora", "chunked", 1024),
    ]
    for row in rows:
        assert row["status"] == "ok", row
        assert row["peak_kind"] == "live_tensor_bytes"  # in-process on a CPU
        assert row["peak_bytes"] > 0 and row["tokens_per_s"] > 0
        assert row["plan_bytes"] > 0 and row["plan_error_pct"] is not None
        assert row["loss"] == pytest.approx(row["loss"])  # finite
    base = rows[0]
    assert base["memory_vs_kd"] == 1.0 and base["speed_vs_kd"] == 1.0
    assert rows[3]["name"] == "neo chunked" and rows[4]["name"] == "neo chunked (chunk 16)"
    # LoRA arms train only the adapters; full arms the whole student.
    assert rows[2]["trainable_parameters"] < rows[0]["trainable_parameters"]


def test_report_says_what_was_measured(tiny_report):
    text = format_report(tiny_report)
    assert "# llm-neo bench: tiny" in text
    assert tiny_report["device"] in text and torch.__version__ in text
    assert "| neo chunked (chunk 16) |" in text
    assert "## Targets" in text
    assert "shown for reference" in text  # the CPU targets are set for cpu-wide at 8 × 256
    for target in tiny_report["targets"]:
        assert target["result"] in ("PASS", "FAIL")
    json.dumps(tiny_report)  # JSON-able as is


def test_run_bench_writes_markdown_and_json(tmp_path, capsys):
    config = BenchConfig(
        shape="tiny",
        runs=["neo:chunked"],
        warmup_steps=0,
        steps=1,
        isolate=False,
        device="cpu",
        num_threads=1,
        output=str(tmp_path),
        label="t",
    )
    bench(config, progress=False)  # what a killed bench leaves: each finished run, a line each
    assert len((tmp_path / "t.runs.jsonl").read_text().splitlines()) == 2
    assert run_bench(config) == 0
    assert "| kd plain |" in capsys.readouterr().out  # the baseline is always run
    report = json.loads((tmp_path / "t.json").read_text())
    assert [r["name"] for r in report["results"]] == ["kd plain", "neo chunked"]
    assert (tmp_path / "t.md").read_text().startswith("# llm-neo bench: tiny")
    assert not (tmp_path / "t.runs.jsonl").exists()  # a finished bench: the JSON holds every run


def test_isolated_runs_measure_their_own_process():
    config = BenchConfig(
        shape="tiny", runs=["kd:plain"], warmup_steps=0, steps=1, device="cpu", num_threads=1
    )
    (row,) = bench(config, progress=False)["results"]
    assert row["status"] == "ok", row
    assert row["peak_kind"] == "process_max_rss"
    assert row["peak_bytes"] > row["baseline_rss_bytes"] > 100 * 2**20  # Python + torch + transformers


def test_a_failed_run_is_reported_not_raised():
    config = BenchConfig(shape="tiny", runs=["kd:plain"], steps=1, device="cpu", run_timeout_s=0.01)
    (row,) = bench(config, progress=False)["results"]
    assert row["status"] == "timeout"
    assert row["memory_vs_kd"] is None and row["plan_bytes"] > 0


def test_live_tensor_bytes_counts_allocations_and_frees():
    with LiveTensorBytes() as tracker:
        a = torch.zeros(1024, 256)  # 1 MiB
        b = a + 1  # another MiB
        view = b[:10]  # a view: no new storage
        del a
        assert tracker.current == 2**20
        del b, view
        assert tracker.current == 0
    assert tracker.peak == 2 * 2**20


def test_cli_flags_derive_from_the_config():
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, BenchConfig)
    args = parser.parse_args(
        [
            "--shape",
            "tiny",
            "--runs",
            "neo:chunked:256",
            "sft:plain",
            "--no-isolate",
            "--gradient-checkpointing",
        ]
    )
    config = build_config(BenchConfig, args)
    assert config.runs == ["neo:chunked:256", "sft:plain"]
    assert config.isolate is False and config.gradient_checkpointing is True
    assert BenchConfig().loss_chunk_size == DistillConfig().loss_chunk_size  # what users run


def test_validation_lists_every_problem():
    config = BenchConfig(shape="nope", runs=["neo", "dpo:plain", "neo:fused"], steps=0)
    with pytest.raises(ConfigError) as err:
        bench(config, progress=False)
    text = str(err.value)
    for fragment in ("--shape", "'neo'", "dpo:plain", "neo:fused", "--steps"):
        assert fragment in text


def test_targets_pass_and_fail_plainly():
    def row(method, impl, peak, speed, floor=None):
        spec = {"method": method, "impl": impl, "chunk_size": 1024}
        return {
            "spec": spec,
            "status": "ok",
            "peak_bytes": peak,
            "tokens_per_s": speed,
            "weights_floor_bytes": floor,
        }

    settings = {
        "device_type": "cuda",
        "loss_chunk_size": 1024,
        "shape": "llama3-8b-to-1b",
        "batch_size": 8,
        "seq_len": 2048,
        "gradient_checkpointing": True,
    }
    results = [
        row("kd", "plain", 100, 10.0),
        row("neo", "plain", 80, 9.0),
        row("neo", "chunked", 20, 10.0, 16),
    ]
    targets = {t["target"]: t for t in check_targets(results, settings)}
    assert targets["Neo peak ≤ 0.27 × plain full KD"]["result"] == "PASS"
    assert targets["Neo peak ≤ 1.15 × weights floor"]["result"] == "FAIL"  # 20 / 16 = 1.25
    assert targets["Neo tokens/s ≥ 1.05 × plain full KD"]["result"] == "FAIL"
    assert all(t["applies"] for t in targets.values())


def test_run_one_catches_nothing_but_oom():
    spec = RunSpec(
        shape="tiny",
        method="neo",
        impl="chunked",
        chunk_size=8,
        batch_size=1,
        seq_len=8,
        lora_r=2,
        kd_ratio=0.5,
        warmup_steps=0,
        steps=1,
        gradient_checkpointing=True,
        device="cpu",
        dtype="float32",
        seed=0,
        memory="tracked",
    )
    result = run_one(spec)
    assert result["status"] == "ok" and result["step_times_s"] and result["peak_bytes"] > 0
