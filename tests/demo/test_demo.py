"""`llm-neo demo --quick` end to end: every stage runs, the comparison's report holds what it promises,
the teacher is cached and reused."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from transformers import AutoConfig

from llm_neo.choices import COMPARISON_ORDER
from llm_neo.commands.compare import _rerun, distill_job
from llm_neo.config import DistillConfig
from llm_neo.demo.run import (
    DEFAULT,
    OUTPUTS,
    QUICK,
    DemoConfig,
    resolve_settings,
    run_demo,
    teacher_key,
    validate_demo,
)
from llm_neo.demo.task import EXPOSURE_LENGTHS, SKILLS, expected_output
from llm_neo.errors import ConfigError, WorkerError
from llm_neo.records import load
from llm_neo.records.compare import CompareResults
from llm_neo.runtime.workers import Job, run_jobs
from llm_neo.summary import RunSummary

LABELS = {"sft": "SFT", "lora": "LoRA", "kd": "KD", "neo": "Neo"}


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory):
    """Two quick demos sharing one teacher cache: the first trains the teacher, the second reuses it and
    also runs the exposure-bias regime (which must leave the main comparison as it was)."""
    root = tmp_path_factory.mktemp("demo")
    cache = root / "cache"
    first = run_demo(DemoConfig(output_dir=str(root / "first"), quick=True, cache_dir=str(cache)))
    second = run_demo(
        DemoConfig(output_dir=str(root / "second"), quick=True, cache_dir=str(cache), exposure_bias=True)
    )
    assert first == 0 and second == 0
    return root, cache


def test_report_has_every_model_and_its_plots(quick_runs):
    root, _ = quick_runs
    out = root / "first"
    report = (out / "report.md").read_text()
    assert report.index("## Verdict") < report.index("## Results")
    table = report[report.index("## Results") :].split("\n\n")[1]
    names = [line.split("|")[1].strip() for line in table.splitlines()[2:]]
    assert names == ["teacher", "untrained student", *(LABELS[m] for m in COMPARISON_ORDER)]
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert len(images) >= 4
    for image in images:
        png = out / image
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", image
    assert "Quick mode" in report and "The teacher:" in report and "## Score per skill" in report
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(images)


def test_results_json_structure(quick_runs):
    root, _ = quick_runs
    results = load(CompareResults, root / "first" / "results.json")
    demo = results.demo  # the demo's own facts, free-form
    assert demo is not None and results.context
    assert demo["quick"] is True and results.config["seeds"] == 1 and results.config["seed"] == 0
    assert [name for name, _ in results.models.items()] == ["teacher", "student"]
    for _, entry in results.models.items():
        assert 0 <= entry.accuracy <= 1
        assert set(entry.per_category) == set(SKILLS)
        assert entry.ce > 0 and entry.kl_to_teacher is not None and entry.top1_agreement is not None
    assert results.models.teacher is not None
    assert results.models.teacher.kl_to_teacher == pytest.approx(0.0, abs=1e-5)
    assert results.models.teacher.top1_agreement == 1.0
    assert len(demo["student"]["kept_layers"]) == 1 and len(demo["student"]["scores"]) == 2
    assert [g.method for g in results.groups] == list(COMPARISON_ORDER)
    for group in results.groups:
        (run,) = group.runs
        assert run.peak_tensor_memory_gb is not None
        assert run.peak_memory_gb > run.peak_tensor_memory_gb > 0 and run.train_time_s > 0
        assert [p.step for p in run.curve] == [1, 2, 3]
        assert group.stats.accuracy.n == 1
        # Each arm's run is an ordinary distill run, reproducible from its config.yaml.
        assert (run.output_dir / "config.yaml").is_file()
        assert (run.output_dir / "merged" / "model.safetensors").is_file()
    trainable = {g.method: g.runs[0].trainable_parameters for g in results.groups}
    assert 0 < trainable["neo"] < trainable["kd"]
    assert {"teacher_s", "prune_s", "total_s"} <= set(demo["timing"])
    # The demo's arms use the task's own learning rates (LoRA arms 10x) and answer budget.
    lrs = {g.method: g.runs[0].lr for g in results.groups}
    assert lrs["neo"] == lrs["lora"] == pytest.approx(10 * lrs["sft"]) and lrs["kd"] == lrs["sft"]
    assert results.config["score"] == "exact" and results.config["category_field"] == "skill"


def test_student_is_the_pruned_teacher(quick_runs):
    root, _ = quick_runs
    results = json.loads((root / "first" / "results.json").read_text())
    student = AutoConfig.from_pretrained(results["config"]["student"])
    teacher = AutoConfig.from_pretrained(results["config"]["teacher"])
    assert student.num_hidden_layers == 1 and teacher.num_hidden_layers == 2
    assert student.hidden_size == teacher.hidden_size
    assert (Path(results["config"]["student"]) / "pruning.json").is_file()


def test_second_run_reuses_the_cached_teacher(quick_runs):
    root, cache = quick_runs
    first = json.loads((root / "first" / "results.json").read_text())
    second = json.loads((root / "second" / "results.json").read_text())
    assert first["demo"]["teacher"]["cached"] is False and second["demo"]["teacher"]["cached"] is True
    assert first["config"]["teacher"] == second["config"]["teacher"]
    assert Path(first["config"]["teacher"]).parent == cache
    assert [p.name for p in cache.iterdir() if not p.name.startswith(".")] == [
        Path(first["config"]["teacher"]).name
    ]
    # Same teacher, same data, same seeds: the arms reproduce exactly.
    groups = [load(CompareResults, root / name / "results.json").groups for name in ("first", "second")]
    for a, b in zip(*groups, strict=True):
        assert a.runs[0].curve == b.runs[0].curve
        assert a.runs[0].accuracy == b.runs[0].accuracy


def test_exposure_bias_regime_pairs_neo_with_on_policy_neo_on_longer_answers(quick_runs):
    root, _ = quick_runs
    out = root / "second"

    def records(name: str) -> list[dict]:
        return [json.loads(line) for line in (out / "data" / name).read_text().splitlines()]

    regime, regime_heldout = records("exposure-distill.jsonl"), records("exposure-heldout.jsonl")
    base = records("distill.jsonl")
    assert len(regime) == QUICK.exposure_records and len(regime_heldout) == QUICK.exposure_heldout

    def mean_answer(rs: list[dict]) -> float:
        return sum(len(r["output"]) for r in rs) / len(rs)

    # Longer answers than the base regime's, every one of the lengths the teacher does, sorted right.
    assert mean_answer(regime) > mean_answer(base) and mean_answer(regime_heldout) > mean_answer(base)
    for r in regime + regime_heldout:
        assert len(r["output"]) in EXPOSURE_LENGTHS and r["output"] == expected_output(r["instruction"])
    main = {r["instruction"] for name in ("train", "distill", "heldout") for r in records(f"{name}.jsonl")}
    instructions = [r["instruction"] for r in regime + regime_heldout]
    assert len(set(instructions)) == len(instructions) and not set(instructions) & main

    # Both arms: the same records, seeds, steps and batch; only the on-policy options differ.
    results = load(CompareResults, out / "exposure-bias" / "results.json")
    assert [g.method for g in results.groups] == ["neo", "neo+on-policy"]
    configs = {g.method: RunSummary.load(g.runs[0].output_dir).config for g in results.groups}
    neo, sampled = configs["neo"], configs["neo+on-policy"]
    for name in ("data", "seed", "max_steps", "batch_size", "lr", "kd_ratio", "student", "teacher"):
        assert neo[name] == sampled[name], name
    assert Path(neo["data"]).name == "exposure-distill.jsonl"
    assert neo["on_policy"] == 0 and sampled["on_policy"] == 1.0
    assert [p.against for p in results.paired] == ["neo+on-policy"]

    # What it showed, stated in the demo's results, on its page and in its verdict, λ and sampling named.
    demo = load(CompareResults, out / "results.json").demo
    assert demo is not None
    shown = demo["exposure_bias"]
    assert shown["paired_accuracy"]["n"] == 1 and set(shown["accuracy"]) == {"neo", "neo+on-policy"}
    for stated in ("λ = 1", "sampling temperature 1", "top-p 1", "reverse_kl", "paired by seed"):
        assert stated in shown["verdict"], stated
    assert shown["verdict"] in (out / "report.md").read_text()
    assert "## On-policy arms" in (out / "exposure-bias" / "report.md").read_text()
    # The first demo ran without it: no regime, nothing said.
    first = load(CompareResults, root / "first" / "results.json").demo
    assert first is not None and "exposure_bias" not in first
    assert not (root / "first" / "exposure-bias").exists()


def test_a_rerun_in_place_keeps_the_finished_arms(quick_runs):
    root, cache = quick_runs
    out = root / "first"
    summaries = sorted(out.glob("arms/*/summary.json"))
    before = [p.stat().st_mtime_ns for p in summaries]
    assert run_demo(DemoConfig(output_dir=str(out), quick=True, cache_dir=str(cache))) == 0
    assert [p.stat().st_mtime_ns for p in summaries] == before


def test_teacher_key_covers_what_shapes_the_teacher():
    base = teacher_key(DEFAULT, 0)
    assert teacher_key(DEFAULT, 0) == base
    assert teacher_key(DEFAULT, 1) != base
    for change in ({"teacher_steps": 10}, {"hidden_size": 64}, {"teacher_lr": 1e-3}, {"train_per_skill": 5}):
        assert (
            teacher_key(resolve_settings(DemoConfig()).__class__(**{**DEFAULT.__dict__, **change}), 0) != base
        )
    # Arm settings do not retrain the teacher.
    assert teacher_key(resolve_settings(DemoConfig(steps=7, seeds=5)), 0) == base


def test_refuses_a_directory_that_holds_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"notes\.txt"):
        run_demo(DemoConfig(output_dir=str(tmp_path), quick=True, cache_dir=str(tmp_path / "c")))
    earlier = tmp_path / "earlier"
    for name in OUTPUTS[:3]:
        (earlier / name).mkdir(parents=True)
    (earlier / "report.md").write_text("earlier")
    validate_demo(DemoConfig(output_dir=str(earlier)))  # an earlier demo's outputs: no error
    with pytest.raises(ConfigError, match="--seeds"):
        run_demo(DemoConfig(output_dir=str(tmp_path / "new"), seeds=0))


def test_a_failing_job_names_its_log_and_how_to_rerun(tmp_path):
    bad = DistillConfig(
        student=str(tmp_path / "missing-student"),
        data=str(tmp_path / "missing.jsonl"),
        method="sft",
        output_dir=str(tmp_path / "arm"),
    )
    log = tmp_path / "arm.log"
    with pytest.raises(WorkerError) as failure:
        run_jobs([Job("sft/0", distill_job, bad, 3, log, _rerun(bad))], parallel=1, threads=1, desc="arms")
    message = str(failure.value)
    assert "sft/0 failed" in message and str(log) in message and "configuration problem" in message
    assert "llm-neo distill --config" in message
    assert log.is_file()
