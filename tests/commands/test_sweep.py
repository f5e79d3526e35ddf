"""Sweeps: trials are ordinary runs sharing one teacher cache; a killed sweep resumes; reports, best.yaml."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import signal
from pathlib import Path

import pytest
import yaml

import llm_neo.distill as recipe
from llm_neo.commands.sweep import (
    SweepConfig,
    default_space,
    expand_trials,
    parse_space,
    sweep,
)
from llm_neo.config import DistillConfig, build_config
from llm_neo.errors import ConfigError, RunStopped, StateFileError, SweepError, TrainingError


@pytest.fixture()
def base_yaml(tmp_path, student_dir, teacher_dir, alpaca_jsonl) -> Path:
    base = {
        "student": str(student_dir),
        "teacher": str(teacher_dir),
        "data": str(alpaca_jsonl),
        "method": "neo",
        "max_steps": 2,
        "batch_size": 2,
        "grad_accum": 1,
        "eval_fraction": 0.25,
        "save_every": 1,
        "seed": 0,
        "lr": "1e-3",
        "lora": {"r": 4},
    }
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


def _space(tmp_path: Path, text: str) -> str:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return str(path)


def _spy_distill(monkeypatch) -> list[DistillConfig]:
    calls: list[DistillConfig] = []
    real = recipe.distill

    def spy(config, **kw):
        calls.append(config)
        return real(config, **kw)

    monkeypatch.setattr(recipe, "distill", spy)
    return calls


def test_grid_sweep_shares_one_teacher_cache_and_reports(tmp_path, base_yaml, monkeypatch):
    calls = _spy_distill(monkeypatch)
    out = tmp_path / "sweep"
    config = SweepConfig(
        base=str(base_yaml), space=_space(tmp_path, "grid:\n  lora.r: [2, 4]\n"), output=str(out)
    )
    state = sweep(config)

    assert [t["id"] for t in state["trials"]] == ["t000", "t001"]
    assert [t["overrides"] for t in state["trials"]] == [{"lora.r": 2}, {"lora.r": 4}]
    assert all(t["status"] == "done" for t in state["trials"])
    # Every trial is a normal run in its own directory, training from the one shared cache.
    assert [c.lora.r for c in calls] == [2, 4]
    caches = {c.teacher_cache for c in calls}
    assert len(caches) == 1 and list((out / "caches").iterdir()) == [Path(next(iter(caches)))]
    for trial in ("t000", "t001"):
        summary = json.loads((out / "trials" / trial / "summary.json").read_text())
        assert summary["teacher_cache"]["top_k"] == 64
        assert summary["heldout_reference"] == "teacher"  # the base's teacher scores the held-out split

    # The leaderboard is ranked by the metric (lower KL first), in Markdown and CSV.
    metric = "heldout.kl_to_teacher"
    values = {t["id"]: t["metrics"][metric] for t in state["trials"]}
    best = min(values, key=values.__getitem__)
    rows = list(csv.DictReader((out / "leaderboard.csv").open()))
    assert [r["trial"] for r in rows] == sorted(values, key=values.__getitem__)
    assert rows[0]["rank"] == "1" and float(rows[0][metric]) == pytest.approx(values[best])
    assert {"lora.r", metric, "heldout.ce", "status"} <= set(rows[0])
    md = (out / "leaderboard.md").read_text()
    assert md.startswith(f"# Sweep leaderboard: {metric} (lower is better)") and f"| 1 | {best} |" in md
    assert (out / "plots" / "lora.r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # best.yaml is the best trial's resolved config, ready for --config (only the output moves).
    loaded = build_config(DistillConfig, argparse.Namespace(), str(out / "best.yaml"))
    trial = build_config(DistillConfig, argparse.Namespace(), str(out / "trials" / best / "config.yaml"))
    assert loaded == dataclasses.replace(trial, output_dir=str(out / "best"))
    assert loaded.teacher_cache == next(iter(caches))


def test_killed_sweep_resumes_where_it_stopped(tmp_path, base_yaml, monkeypatch):
    out = tmp_path / "sweep"
    config = SweepConfig(
        base=str(base_yaml), space=_space(tmp_path, "grid:\n  lora.r: [2, 4]\n"), output=str(out)
    )
    steps = {"n": 0}

    def kill_in_second_trial(step: int, metrics: dict) -> None:
        steps["n"] += 1
        if steps["n"] == 3:  # trial t001's first step (t000 has 2)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sweep(config, on_step=kill_in_second_trial)
    state = json.loads((out / "sweep.json").read_text())
    assert [t["status"] for t in state["trials"]] == ["done", "running"]
    assert (out / "leaderboard.md").is_file()  # reports are written after every trial

    with pytest.raises(SweepError, match="--resume"):
        sweep(config)
    calls = _spy_distill(monkeypatch)
    state = sweep(dataclasses.replace(config, resume=True))
    # The finished trial is not rerun; the interrupted one resumes from its step-1 checkpoint.
    assert [Path(str(c.output_dir)).name for c in calls] == ["t001"] and calls[0].resume
    assert [t["status"] for t in state["trials"]] == ["done", "done"]
    lines = (out / "trials" / "t001" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]
    rows = list(csv.DictReader((out / "leaderboard.csv").open()))
    assert sorted(r["trial"] for r in rows) == ["t000", "t001"] and all(r["status"] == "done" for r in rows)

    with pytest.raises(SweepError, match="space differ"):
        sweep(dataclasses.replace(config, resume=True, space=_space(tmp_path, "grid:\n  lora.r: [2, 8]\n")))


def test_a_failed_trial_is_recorded_and_the_sweep_goes_on(tmp_path, base_yaml, monkeypatch):
    real = recipe.distill

    def diverge_at_high_lr(config, **kw):
        if config.lr == 1.0:
            raise TrainingError("step 1: non-finite loss")
        return real(config, **kw)

    monkeypatch.setattr(recipe, "distill", diverge_at_high_lr)
    out = tmp_path / "sweep"
    state = sweep(
        SweepConfig(
            base=str(base_yaml),
            space=_space(tmp_path, "grid:\n  lr: [1.0, 1e-3]\n"),
            output=str(out),
            metric="heldout.ce",
            cache_teacher=False,
        )
    )
    assert [t["status"] for t in state["trials"]] == ["failed", "done"]
    assert "non-finite" in state["trials"][0]["error"]
    rows = list(csv.DictReader((out / "leaderboard.csv").open()))
    assert [(r["trial"], r["rank"]) for r in rows] == [("t001", "1"), ("t000", "")]
    assert "t000: step 1: non-finite loss" in (out / "leaderboard.md").read_text()
    assert "lr: 0.001" in (out / "best.yaml").read_text()


def test_random_space_is_seeded_and_within_bounds():
    space = parse_space(
        {
            "random": {
                "lr": {"log_uniform": ["5e-5", 5e-4]},
                "kd_ratio": {"uniform": [0.3, 0.9]},
                "lora.r": [32, 64, 128],
                "seed": {"int_uniform": [0, 3]},
                "divergence": {"choice": ["forward_kl", "jsd"]},
            },
            "trials": 20,
        },
        source="space.yaml",
    )
    trials = expand_trials(space, seed=1)
    assert len(trials) == 20 and trials == expand_trials(space, seed=1) != expand_trials(space, seed=2)
    for t in trials:
        assert 5e-5 <= t["lr"] <= 5e-4 and 0.3 <= t["kd_ratio"] <= 0.9
        assert t["lora.r"] in (32, 64, 128) and t["seed"] in range(4) and isinstance(t["seed"], int)
        assert t["divergence"] in ("forward_kl", "jsd")
    assert len({t["lora.r"] for t in trials}) > 1 and len({t["lr"] for t in trials}) == 20


def test_grid_expands_every_combination_in_order():
    space = parse_space({"grid": {"lora.r": [16, 64], "lr": [1e-4, "2e-4"]}}, source="s")
    assert space.trials == 4
    assert expand_trials(space, seed=0) == [
        {"lora.r": 16, "lr": 1e-4},
        {"lora.r": 16, "lr": 2e-4},
        {"lora.r": 64, "lr": 1e-4},
        {"lora.r": 64, "lr": 2e-4},
    ]


def test_space_problems_are_reported_together():
    with pytest.raises(ConfigError) as info:
        parse_space(
            {
                "random": {
                    "lora.rank": [8],
                    "output_dir": ["a", "b"],
                    "lr": {"log_uniform": [0, 1]},
                    "lora.r": {"uniform": [1, 4]},
                    "kd_ratio": ["high"],
                }
            },
            source="space.yaml",
        )
    text = str(info.value)
    for expected in (
        "lora.rank: unknown option (did you mean lora.r?)",
        "output_dir: set by the sweep",
        "log_uniform needs [low, high] with 0 < low <= high",
        "uniform needs a float option",
        "'high' is not a valid float",
        "random search needs trials: N",
    ):
        assert expected in text, expected
    assert len(info.value.problems) == 6


def test_trial_problems_are_found_before_anything_runs(tmp_path, base_yaml):
    with pytest.raises(ConfigError, match=r"trial t001: --lora.r: 0 is out of range"):
        sweep(
            SweepConfig(
                base=str(base_yaml),
                space=_space(tmp_path, "grid:\n  lora.r: [2, 0]\n"),
                output=str(tmp_path / "s"),
            )
        )
    assert not (tmp_path / "s").exists()


def test_default_space_follows_the_papers_guidelines():
    assert default_space("neo") == {
        "grid": {"lr": [1e-4, 2e-4, 4e-4], "lora.r": [64, 128], "kd_ratio": [0.5, 0.9]}
    }
    assert default_space("kd") == {"grid": {"lr": [1e-5, 2e-5, 4e-5], "kd_ratio": [0.5, 0.9]}}
    assert default_space("lora")["grid"].keys() == {"lr", "lora.r"}
    assert parse_space(default_space("neo"), source="default").trials == 12


def test_sweep_config_problems(tmp_path):
    with pytest.raises(ConfigError) as info:
        sweep(SweepConfig(base=str(tmp_path / "none.yaml"), metric="accuracy", resume=True, overwrite=True))
    text = str(info.value)
    for expected in ("none.yaml", "--output is required", "--metric: 'accuracy'", "contradict"):
        assert expected in text, expected


# ------------------------------------------------------------------------------------------------
# Stops and damaged state


def test_a_signal_stops_the_running_trial_and_the_sweep_resumes_it(tmp_path, base_yaml, one_thread):
    out = tmp_path / "sweep"
    config = SweepConfig(
        base=str(base_yaml), space=_space(tmp_path, "grid:\n  lora.r: [2, 4]\n"), output=str(out)
    )
    steps = {"n": 0}

    def sigterm_in_second_trial(step: int, metrics: dict) -> None:
        steps["n"] += 1
        if steps["n"] == 3:  # trial t001's first step
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(RunStopped) as info:
        sweep(config, on_step=sigterm_in_second_trial)
    checkpoint = out / "trials" / "t001" / "checkpoints" / "step-000001"
    command = f"llm-neo sweep --base {base_yaml} --space {config.space} --output {out} --resume"
    assert str(info.value) == (
        f"sweep stopped during trial t001 (stopped by SIGTERM after step 1 of 2: checkpoint {checkpoint} "
        f"written). Continue it with: {command}"
    )
    state = json.loads((out / "sweep.json").read_text())
    assert [t["status"] for t in state["trials"]] == ["done", "running"]  # not a failed trial
    state = sweep(dataclasses.replace(config, resume=True))
    assert [t["status"] for t in state["trials"]] == ["done", "done"]
    lines = (out / "trials" / "t001" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]


def test_a_damaged_sweep_state_falls_back_to_its_backup(tmp_path, base_yaml, caplog, one_thread):
    out = tmp_path / "sweep"
    config = SweepConfig(
        base=str(base_yaml), space=_space(tmp_path, "grid:\n  lora.r: [2, 4]\n"), output=str(out)
    )

    def kill_in_second_trial(step: int, metrics: dict) -> None:
        if step == 1 and (out / "trials" / "t001").exists():
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sweep(config, on_step=kill_in_second_trial)
    state_file = out / "sweep.json"
    state_file.write_text(state_file.read_text()[:-40])  # a disk fault: truncated
    with caplog.at_level("WARNING", logger="llm_neo"):
        state = sweep(dataclasses.replace(config, resume=True))
    assert "sweep.json is damaged or unreadable (not valid JSON" in caplog.text
    assert [t["status"] for t in state["trials"]] == ["done", "done"]
    # Both damaged: refused, both files named, and what to do.
    state_file.write_text("{")
    (out / "sweep.json.bak").write_text("[]")
    with pytest.raises(
        StateFileError, match=r"sweep.json is damaged .* backup .*sweep.json.bak \(not a JSON"
    ):
        sweep(dataclasses.replace(config, resume=True))
