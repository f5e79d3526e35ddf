"""The benchmark end to end on the tiny shape (CPU, seconds). Never asserts speed: these are not timings."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from llm_neo.commands.bench import (
    WHOLE_PHASES,
    BenchConfig,
    RunSpec,
    bench,
    check_targets,
    format_report,
    prepare_whole_runs,
    quantization_cuts,
    run_bench,
    run_one,
    run_whole,
    whole_run_phases,
    write_token_records,
)
from llm_neo.commands.bench.runs import with_default_chunk
from llm_neo.commands.plan import model_dims, weight_bytes_at
from llm_neo.commands.shapes import get_shape
from llm_neo.config import DistillConfig
from llm_neo.data import load_records, tokenize_records
from llm_neo.errors import ConfigError
from llm_neo.models.tiny import build_word_tokenizer
from llm_neo.options import add_dataclass_arguments, build_config
from llm_neo.records import dumps, from_json, to_json
from llm_neo.records.bench import BenchReport, Outcome, PeakKind
from llm_neo.runtime.memory import GiB, LiveTensorBytes, peak_rss_bytes

RUNS = ["kd:plain", "kd:chunked", "neo:plain", "neo:chunked", "neo:chunked:16", "sft:plain", "lora:chunked"]


@pytest.fixture(scope="module")
def tiny_report():
    config = BenchConfig(
        shape="tiny", runs=RUNS, warmup_steps=1, steps=2, isolate=False, device="cpu", num_threads=1
    )
    return bench(config, progress=False)


def test_every_run_has_memory_speed_and_a_plan(tiny_report):
    rows = tiny_report.results
    assert [(r.spec["method"], r.spec["impl"], r.spec["chunk_size"]) for r in rows] == [
        ("kd", "plain", 1024),
        ("kd", "chunked", 1024),
        ("neo", "plain", 1024),
        ("neo", "chunked", 1024),
        ("neo", "chunked", 16),
        ("sft", "plain", 1024),
        ("lora", "chunked", 1024),
    ]
    for row in rows:
        assert row.status == "ok", row
        assert row.peak_kind == PeakKind.LIVE_TENSOR_BYTES  # in-process on a CPU
        assert row.peak_bytes and row.peak_bytes > 0 and row.tokens_per_s and row.tokens_per_s > 0
        assert row.plan_bytes > 0 and row.plan_error_pct is not None
        assert row.loss == pytest.approx(row.loss)  # finite
    base = rows[0]
    assert base.memory_vs_kd == 1.0 and base.speed_vs_kd == 1.0
    assert rows[3].name == "neo chunked" and rows[4].name == "neo chunked (chunk 16)"
    # LoRA arms train only the adapters; full arms the whole student.
    assert (rows[2].trainable_parameters or 0) < (rows[0].trainable_parameters or 0)


def test_report_says_what_was_measured(tiny_report):
    text = format_report(tiny_report)
    assert "# llm-neo bench: tiny" in text
    assert tiny_report.device in text and torch.__version__ in text
    assert "| neo chunked (chunk 16) |" in text
    assert "## Targets" in text
    assert "shown for reference" in text  # the CPU targets are set for cpu-wide at 8 × 256
    run = {t.target: t.result for t in tiny_report.targets if t.rows == "step" and "int8" not in t.target}
    assert set(run.values()) <= {Outcome.PASS, Outcome.FAIL} and run  # every step target's rows were run
    # The targets of rows not run (quantized, whole runs) say so rather than pass.
    assert {t.result for t in tiny_report.targets if t.target not in run} == {Outcome.NA}
    assert from_json(BenchReport, json.loads(dumps(tiny_report))) == tiny_report  # its JSON is itself


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
    (row,) = bench(config, progress=False).results
    assert row.status == "ok", row
    assert row.peak_kind == PeakKind.PROCESS_MAX_RSS
    assert (
        (row.peak_bytes or 0) > (row.baseline_rss_bytes or 0) > 100 * 2**20
    )  # Python + torch + transformers


def test_a_failed_run_is_reported_not_raised():
    config = BenchConfig(shape="tiny", runs=["kd:plain"], steps=1, device="cpu", run_timeout_s=0.01)
    (row,) = bench(config, progress=False).results
    assert row.status == "timeout" and row.error
    assert row.memory_vs_kd is None and row.plan_bytes > 0
    assert row.peak_bytes is None and "peak_bytes" not in to_json(row)  # absent, as the run wrote it


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
    # Unset, the chunk is what users run: llm-neo distill's default for the device and the vocabulary.
    assert BenchConfig().loss_chunk_size == 0 and DistillConfig().loss_chunk_size is None
    assert with_default_chunk(BenchConfig(shape="cpu-wide"), "cpu").loss_chunk_size == 256
    assert with_default_chunk(BenchConfig(shape="cpu-wide"), "cuda").loss_chunk_size == 1024
    given = BenchConfig(shape="cpu-wide", loss_chunk_size=512)
    assert with_default_chunk(given, "cpu").loss_chunk_size == 512


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
    targets = {t.target: t for t in check_targets(results, settings)}
    assert targets["Neo peak ≤ 0.27 × plain full KD"].result == Outcome.PASS
    assert targets["Neo peak ≤ 1.15 × weights floor"].result == Outcome.FAIL  # 20 / 16 = 1.25
    assert targets["Neo tokens/s ≥ 1.05 × plain full KD"].result == Outcome.FAIL
    assert all(t.applies for t in targets.values())


def _spec(**changes):
    spec = RunSpec(
        shape="tiny",
        method="neo",
        impl="chunked",
        chunk_size=1024,
        batch_size=2,
        seq_len=32,
        lora_r=4,
        kd_ratio=0.5,
        warmup_steps=0,
        steps=1,
        gradient_checkpointing=False,
        device="cpu",
        dtype="float32",
        seed=0,
        memory="tracked",
        num_threads=1,
    )
    return dataclasses.replace(spec, **changes)


def test_run_one_catches_nothing_but_oom():
    spec = _spec(chunk_size=8, batch_size=1, seq_len=8, lora_r=2, gradient_checkpointing=True, num_threads=0)
    result = run_one(spec)
    assert result["status"] == "ok" and result["step_times_s"] and result["peak_bytes"] > 0


# ----------------------------------------------------------------------------------------------------
# Quantized rows


@pytest.fixture(scope="module")
def quant_report():
    pytest.importorskip("torchao", reason="the quant extra is not installed: pip install 'llm-neo[quant]'")
    pytest.importorskip(
        "bitsandbytes", reason="the quant extra is not installed: pip install 'llm-neo[quant]'"
    )
    config = BenchConfig(
        shape="tiny",
        runs=["neo:chunked", "neo+int8-teacher:chunked", "neo+nf4-student:chunked"],
        warmup_steps=1,
        steps=1,
        isolate=False,
        device="cpu",
        num_threads=1,
    )
    return bench(config, progress=False)


def test_quantized_rows_record_the_bytes_quantize_teacher_counts(quant_report):
    from transformers import AutoModelForCausalLM

    from llm_neo.models.quant import quantize_teacher, weight_bytes

    shape = get_shape("tiny")
    rows = {r.name: to_json(r) for r in quant_report.results}
    int8, nf4, plain = rows["neo+int8-teacher chunked"], rows["neo+nf4-student chunked"], rows["neo chunked"]
    assert [r["status"] for r in rows.values()] == ["ok"] * 4

    # The teacher's bytes are what quantize_teacher reports for a dense fp32 model of the shape.
    dense = AutoModelForCausalLM.from_config(copy.deepcopy(shape.teacher), dtype=torch.float32)
    before = weight_bytes(dense)
    _, info = quantize_teacher(dense, "int8")
    assert int8["teacher_quant"]["weight_bytes_before"] == before == info["weight_bytes_before"]
    assert int8["teacher_quant"]["weight_bytes_after"] == info["weight_bytes_after"] < before
    assert int8["teacher_saved_bytes"] == before - info["weight_bytes_after"]
    assert nf4["student_quant"]["kind"] == "nf4" and nf4["student_saved_bytes"] > 0
    assert "teacher_quant" not in nf4 and "student_quant" not in int8

    # Counted as live tensor bytes, the int8 teacher lowers the step's peak by exactly what it saves
    # (issue 13), and so does the nf4 base.
    assert int8["peak_cut_bytes"] == int8["teacher_saved_bytes"]
    assert plain["peak_bytes"] - nf4["peak_bytes"] == nf4["student_saved_bytes"]

    # The plan row of each is estimated with the same quantization.
    c = 4  # fp32 on a CPU
    teacher_dims, student_dims = model_dims(shape.teacher), model_dims(shape.student, lora_r=4)
    plan = {name: r["plan_components_gib"] for name, r in rows.items()}
    assert plan["neo+int8-teacher chunked"]["teacher weights"] == pytest.approx(
        weight_bytes_at(teacher_dims, "int8", c) / GiB, abs=1e-4
    )
    assert plan["neo+nf4-student chunked"]["student weights"] == pytest.approx(
        weight_bytes_at(student_dims, "nf4", c) / GiB, abs=1e-4
    )
    # ... and the plan's int8 layout is the one torchao stores: the same bytes saved.
    assert plain["plan_bytes"] - int8["plan_bytes"] == int8["teacher_saved_bytes"]


def test_quantized_targets_and_report(quant_report):
    targets = {t.target: t for t in quant_report.targets}
    cut = targets["int8 teacher cuts Neo's step peak by ≥ the teacher's saved weight bytes"]
    assert cut.value == pytest.approx(1.0) and cut.result == Outcome.PASS
    text = format_report(quant_report)
    int8 = next(r for r in quant_report.results if r.name == "neo+int8-teacher chunked")
    assert int8.teacher_quant is not None
    before, after = (int8.teacher_quant[k] / 2**20 for k in ("weight_bytes_before", "weight_bytes_after"))
    assert f"| neo+int8-teacher chunked | int8: {before:.4g} → {after:.4g} |" in text


# ----------------------------------------------------------------------------------------------------
# Spellings


def test_bad_run_and_variant_spellings_are_config_errors():
    config = BenchConfig(
        shape="tiny",
        runs=["neo+fp4-student:chunked"],
        whole_runs=[
            "neo+int9-teacher:chunked",
            "kd+nf4-student:plain",
            "lora+int8-teacher:chunked",
            "neo+int8-teacher+int8-teacher:chunked",
            "neo:chunked:x",
            "neo",
        ],
    )
    with pytest.raises(ConfigError) as err:
        bench(config, progress=False)
    problems = err.value.problems
    assert err.value.exit_code == 2
    assert any(p.startswith("--runs:") and "'fp4-student' is not a variant" in p for p in problems)
    for fragment in (
        "'int9-teacher' is not a variant",
        "kd+nf4-student:plain",  # a QLoRA base on a full-parameter arm
        "lora+int8-teacher:chunked",  # no teacher to quantize
        "sets --teacher-quant twice",
        "neo:chunked:x",
        "'neo' is not ARM:IMPL",
    ):
        assert any(p.startswith("--whole-runs:") and fragment in p for p in problems), fragment
    assert len(problems) == 7  # every problem, each once


# ----------------------------------------------------------------------------------------------------
# Whole runs


def test_records_tokenize_to_exactly_seq_len(tmp_path):
    path = tmp_path / "data.jsonl"
    write_token_records(path, records=5, seq_len=17, vocab_size=300, seed=3)
    tokenizer = build_word_tokenizer(300)
    assert len(tokenizer) == 300
    examples, dropped = tokenize_records(load_records(str(path)), tokenizer, max_length=10_000)
    assert dropped == 0 and [len(e.input_ids) for e in examples] == [17] * 5
    assert all(
        e.input_ids[0] == tokenizer.bos_token_id and e.input_ids[-1] == tokenizer.eos_token_id
        for e in examples
    )
    assert all(4 <= i < 300 for e in examples for i in e.input_ids[1:-1])


def test_a_whole_run_reads_its_summary_and_its_own_peak(tmp_path):
    # This process's peak RSS is made larger than a tiny run's: a run started from it directly would
    # report at least this much (ru_maxrss survives fork + exec); started from the launcher, it must not.
    big = torch.ones(2**28)  # 1 GiB, touched
    del big
    ours = peak_rss_bytes()
    assert ours > 1.2 * GiB

    spec = _spec(memory="rss", warmup_steps=1, steps=2)
    inputs = prepare_whole_runs(spec, tmp_path / "inputs", with_teacher=True)
    assert (inputs.records, inputs.heldout) == (8, 2)
    result = run_whole(spec, inputs, tmp_path / "run", timeout=300)
    assert result["status"] == "ok", result
    summary = json.loads((tmp_path / "run" / "out" / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["samples"] == {"train": 6, "heldout": 2, "dropped": 0}
    assert result["training_peak_bytes"] == round(summary["peak_memory_gb"] * GiB)
    assert result["training_peak_kind"] == "process_max_rss"
    # The whole process holds everything its training steps did, and then some: a superset. The training
    # peak is /proc's VmHWM read in the run, which reads the kernel's per-CPU RSS counters without
    # folding them (an approximation of up to a batch of pages per CPU), wait4's ru_maxrss the exact
    # count at exit: a few hundred KiB either way (128 KiB below, once, on a loaded machine).
    slack = 2 * 2**20
    assert result["process_peak_bytes"] + slack >= result["training_peak_bytes"] > 0
    assert result["process_to_training"] >= 1.0 - slack / result["training_peak_bytes"]
    # Its own peak, not this process's: the launcher it was started from is a few MiB.
    assert result["process_peak_bytes"] < ours - 0.5 * GiB
    assert result["launcher_peak_bytes"] < 64 * 2**20
    # The sampled high-water mark agrees with the kernel's (within the same slack), and the phases cover
    # the run in order.
    assert 0 < result["sampled_peak_bytes"] <= result["process_peak_bytes"] + slack
    assert [p["phase"] for p in result["phases"]] == list(WHOLE_PHASES)
    ends = [p["end_s"] for p in result["phases"]]
    assert ends == sorted(ends) and result["peak_phase"] in WHOLE_PHASES
    assert "--teacher" in result["command"] and "--max-steps 3" in result["command"]


def test_whole_run_phases_split_the_samples_and_name_the_peak():
    # [t, VmRSS KiB, VmHWM KiB]: the peak (9) is reached at t = 5, inside the held-out eval.
    samples = [[0.5, 1, 1], [1.5, 4, 4], [2.5, 2, 4], [3.5, 3, 4], [5.0, 9, 9], [6.5, 2, 9]]
    ends = {"load": 1.0, "steps": 3.0, "merge check, save": 4.0, "held-out eval": 6.0}
    phases, peak = whole_run_phases(samples, ends, 7.0)
    assert peak == "held-out eval"
    assert [(p["phase"], p["max_rss_bytes"], p["hwm_end_bytes"]) for p in phases] == [
        ("load", 1024, 1024),
        ("steps", 4096, 4096),
        ("merge check, save", 3072, 4096),
        ("held-out eval", 9216, 9216),
        ("exit", 2048, 9216),
    ]
    # A boundary that was not seen merges its phase into the next.
    phases, peak = whole_run_phases(samples, ends | {"load": None}, 7.0)
    assert phases[0]["phase"] == "load, steps" and phases[0]["max_rss_bytes"] == 4096


def test_whole_run_targets():
    def row(arm, impl, peak, training=None, saved=None):
        method, *variants = arm.split("+")
        spec = {
            "method": method,
            "teacher_quant": "int8" if variants else "none",
            "student_quant": "none",
            "impl": impl,
            "chunk_size": 1024,
        }
        res = {"spec": spec, "status": "ok", "process_peak_bytes": peak, "training_peak_bytes": training}
        if saved is not None:
            res["teacher_quant"] = {
                "kind": "int8",
                "weight_bytes_before": 3 * saved,
                "weight_bytes_after": 2 * saved,
            }
        return res

    settings = {"device_type": "cpu", "loss_chunk_size": 1024, "shape": "cpu-wide", "batch_size": 8,
                "seq_len": 256, "gradient_checkpointing": False}  # fmt: skip
    whole = [
        row("kd", "plain", 100),
        row("neo", "chunked", 25, training=24),
        row("neo+int8-teacher", "chunked", 22, saved=4),
    ]
    quantization_cuts(whole, "process_peak_bytes")
    assert whole[2]["peak_cut_bytes"] == 3 and whole[2]["teacher_saved_bytes"] == 4
    targets = {t.target: t for t in check_targets([], settings, whole)}
    within = targets["Whole Neo run: process peak ≤ 1.05 × its training-step peak"]
    assert within.value == pytest.approx(25 / 24) and within.result == Outcome.PASS
    versus_kd = targets["Whole Neo run peak ≤ 0.30 × whole plain full KD run"]
    assert versus_kd.value == pytest.approx(0.25) and versus_kd.result == Outcome.PASS
    cut = targets["int8 teacher cuts the whole Neo run's peak by ≥ the teacher's saved weight bytes"]
    assert cut.value == pytest.approx(0.75) and cut.result == Outcome.FAIL
    assert all(t.applies for t in targets.values())
    # Without whole runs the whole-run targets are n/a, not PASS.
    assert {t.result for t in check_targets([], settings) if t.rows == "whole"} == {Outcome.NA}


# ----------------------------------------------------------------------------------------------------
# The whole runs' launcher, a file of its own


def test_the_launcher_imports_the_standard_library_only():
    import ast
    import sys

    from llm_neo.commands.bench import launcher

    tree = ast.parse(Path(launcher.PATH).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}  # fmt: skip
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                 if node.module}  # fmt: skip
    assert imported and imported <= set(sys.stdlib_module_names) | {"__future__"}, imported


def test_the_launcher_run_by_path_records_the_command(tmp_path):
    import subprocess
    import sys

    from llm_neo.commands.bench import launcher

    result, log = tmp_path / "seen.json", tmp_path / "run.log"
    command = ["/bin/sh", "-c", "echo one; sleep 0.2; echo two >&2; exit 3"]
    proc = subprocess.run(
        [sys.executable, "-S", "-I", launcher.PATH, str(result), str(log), "0.01", "--", *command],
        capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(result.read_text())
    assert seen["returncode"] == 3  # the command's status is recorded, not the launcher's
    assert [text for _, text in seen["lines"]] == ["one", "two"]
    times = [t for t, _ in seen["lines"]]
    assert times == sorted(times) and times[1] - times[0] >= 0.15  # stamped as they came
    assert seen["samples"] and all(rss <= hwm for _, rss, hwm in seen["samples"])
    assert seen["end"] >= seen["start"] + 0.2
    assert seen["launcher_hwm_kib"] < 32 * 1024  # a few MiB: no torch, no site-packages
    assert log.read_text().split() == ["one", "two"]
