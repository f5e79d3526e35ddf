"""`llm-neo demo --quick` end to end: every stage runs, the report holds what it promises, the teacher
is cached and reused."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from transformers import AutoConfig

from llm_neo.config import DistillConfig
from llm_neo.demo.report import TENSOR_TARGET
from llm_neo.demo.run import (
    ARMS,
    DEFAULT,
    NUMERIC,
    DemoConfig,
    _clear_output_dir,
    distill_job,
    rerun_command,
    resolve_settings,
    run_demo,
    teacher_key,
    training_state_mb,
    validate_demo,
)
from llm_neo.demo.task import SKILLS
from llm_neo.errors import ConfigError, WorkerError
from llm_neo.runtime.workers import Job, run_jobs


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory):
    """Two quick demos sharing one teacher cache: the first trains the teacher, the second reuses it."""
    root = tmp_path_factory.mktemp("demo")
    cache = root / "cache"
    first = run_demo(DemoConfig(output_dir=str(root / "first"), quick=True, cache_dir=str(cache)))
    second = run_demo(DemoConfig(output_dir=str(root / "second"), quick=True, cache_dir=str(cache)))
    assert first == 0 and second == 0
    return root, cache


def test_report_has_every_row_and_its_plots(quick_runs):
    root, _ = quick_runs
    out = root / "first"
    report = (out / "report.md").read_text()
    table = [line for line in report.splitlines() if line.startswith("| ")]
    names = [line.split("|")[1].strip() for line in table]
    for row in ("teacher", "pruned student", *ARMS):
        assert row in names, f"row {row!r} missing from the results table"
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert len(images) >= 3
    for image in images:
        png = out / image
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", image
    assert "Quick mode" in report and "Closing note" in report and "Targets" in report


def test_results_json_structure(quick_runs):
    root, _ = quick_runs
    results = json.loads((root / "first" / "results.json").read_text())
    assert results["quick"] is True and results["seeds"] == [0]
    for model in ("teacher", "student"):
        entry = results[model]
        assert 0 <= entry["accuracy"] <= 1
        assert set(entry["per_skill"]) == set(SKILLS)
        assert {"ce", "kl_to_teacher", "top1_agreement"} <= set(entry)
    assert results["teacher"]["kl_to_teacher"] == pytest.approx(0.0, abs=1e-5)
    assert results["teacher"]["top1_agreement"] == 1.0
    assert len(results["student"]["kept_layers"]) == 1 and len(results["student"]["scores"]) == 2
    assert set(results["arms"]) == set(ARMS)
    for method, arm in results["arms"].items():
        (run,) = arm["runs"]
        assert set(NUMERIC) | {"trainable_parameters", "per_skill", "curve"} <= set(run), method
        assert run["peak_memory_gb"] > run["peak_tensor_memory_gb"] > 0 and run["train_time_s"] > 0
        assert [p["step"] for p in run["curve"]] == [1, 2, 3]
        assert arm["summary"]["accuracy"]["n"] == 1
        # Each arm's run is an ordinary distill run, reproducible from its config.yaml.
        assert (Path(run["output_dir"]) / "config.yaml").is_file()
        assert (Path(run["output_dir"]) / "merged" / "model.safetensors").is_file()
    lora, full = results["arms"]["neo"]["trainable_parameters"], results["arms"]["kd"]["trainable_parameters"]
    assert 0 < lora < full
    targets = {t["target"] for t in results["targets"]}
    assert targets >= {"Neo > LoRA", "Neo > SFT", "Neo >= KD - 1 point", TENSOR_TARGET}
    assert {"teacher_s", "prune_s", "arms_s", "eval_s", "total_s"} <= set(results["timing"])


def test_student_is_the_pruned_teacher(quick_runs):
    root, _ = quick_runs
    results = json.loads((root / "first" / "results.json").read_text())
    student = AutoConfig.from_pretrained(results["student"]["path"])
    teacher = AutoConfig.from_pretrained(results["teacher"]["path"])
    assert student.num_hidden_layers == 1 and teacher.num_hidden_layers == 2
    assert student.hidden_size == teacher.hidden_size
    assert (Path(results["student"]["path"]) / "pruning.json").is_file()


def test_second_run_reuses_the_cached_teacher(quick_runs):
    root, cache = quick_runs
    first = json.loads((root / "first" / "results.json").read_text())
    second = json.loads((root / "second" / "results.json").read_text())
    assert first["teacher"]["cached"] is False and second["teacher"]["cached"] is True
    assert first["teacher"]["path"] == second["teacher"]["path"]
    assert Path(first["teacher"]["path"]).parent == cache
    assert [p.name for p in cache.iterdir() if not p.name.startswith(".")] == [
        Path(first["teacher"]["path"]).name
    ]
    # Same teacher, same data, same seeds: the arms reproduce exactly.
    for method in ARMS:
        a, b = first["arms"][method]["runs"][0], second["arms"][method]["runs"][0]
        assert a["curve"] == b["curve"]
        assert a["accuracy"] == b["accuracy"]


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


def test_replaces_an_earlier_demo_but_not_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"notes\.txt"):
        run_demo(DemoConfig(output_dir=str(tmp_path), quick=True, cache_dir=str(tmp_path / "c")))
    earlier = tmp_path / "earlier"
    (earlier / "arms" / "old-seed9").mkdir(parents=True)
    (earlier / "report.md").write_text("earlier")
    validate_demo(DemoConfig(output_dir=str(earlier)))  # an earlier demo's outputs: replaced, no error
    _clear_output_dir(earlier)
    assert list(earlier.iterdir()) == []
    with pytest.raises(ConfigError, match="--seeds"):
        run_demo(DemoConfig(output_dir=str(tmp_path / "new"), seeds=0))


def test_training_state_accounting():
    # KD: fp32 weights + grads + two AdamW moments of the whole student, plus the frozen teacher.
    def state(method: str, trainable: int) -> float:
        return training_state_mb(
            method,
            student_parameters=1000,
            trainable_parameters=trainable,
            teacher_parameters=3000,
            compute_bytes=4,
        )

    kd, neo, sft = state("kd", 1000), state("neo", 100), state("sft", 1000)
    assert kd * 2**20 == 16 * 1000 + 4 * 3000
    assert neo * 2**20 == 4 * 1000 + 16 * 100 + 4 * 3000
    assert sft * 2**20 == 16 * 1000
    assert neo < kd


def test_a_failing_job_names_its_log_and_how_to_rerun(tmp_path):
    bad = DistillConfig(
        student=str(tmp_path / "missing-student"),
        data=str(tmp_path / "missing.jsonl"),
        method="sft",
        output_dir=str(tmp_path / "arm"),
    )
    log = tmp_path / "arm.log"
    with pytest.raises(WorkerError) as failure:
        run_jobs(
            [Job("sft/0", distill_job, bad, 3, log, rerun_command(bad))], parallel=1, threads=1, desc="arms"
        )
    message = str(failure.value)
    assert "sft/0 failed" in message and str(log) in message and "configuration problem" in message
    assert "llm-neo distill --config" in message
    assert log.is_file()
