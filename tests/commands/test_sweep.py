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
    Dimension,
    SweepConfig,
    default_space,
    expand_trials,
    log_axis,
    parse_space,
    plot_metric,
    ranks,
    sweep,
)
from llm_neo.config import DistillConfig
from llm_neo.errors import ConfigError, RunStopped, StateFileError, SweepError, TrainingError
from llm_neo.options import build_config
from llm_neo.records.sweep import Mode, SweepState, Trial, TrialStatus


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

    assert [t.id for t in state.trials] == ["t000", "t001"]
    assert [t.overrides for t in state.trials] == [{"lora.r": 2}, {"lora.r": 4}]
    assert all(t.status == TrialStatus.DONE for t in state.trials)
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
    values = {t.id: t.metrics[metric] for t in state.trials}
    best = min(values, key=values.__getitem__)
    rows = list(csv.DictReader((out / "leaderboard.csv").open()))
    assert [r["trial"] for r in rows] == sorted(values, key=values.__getitem__)
    assert float(rows[0][metric]) == pytest.approx(values[best])
    assert {"lora.r", metric, "heldout.ce", "heldout tokens", "status"} <= set(rows[0])
    # Two ranks 1e-5 apart on a few dozen held-out tokens: a tie, said so, with the held-out size.
    heldout = state.trials[0].heldout
    assert heldout is not None and heldout.records == 4 and isinstance(heldout.tokens, int)
    tokens = heldout.tokens
    assert 0 < tokens < 1000
    stored = json.loads((out / "sweep.json").read_text())
    assert stored["trials"][0]["heldout"] == {"records": 4, "tokens": tokens}
    assert abs(values["t000"] - values["t001"]) < 0.01 * values[best]
    assert [r["rank"] for r in rows] == ["1=", "1="] and rows[0]["heldout tokens"] == str(tokens)
    md = (out / "leaderboard.md").read_text()
    assert md.startswith(f"# Sweep leaderboard: {metric} (lower is better)\n\n**Best: {best}**")
    assert f"| 1= | {best} |" in md and "Tied within 1% (--tie-tolerance) with t00" in md
    assert f"Held out: 4 records, {tokens} tokens per trial — under 1,000 tokens" in md
    assert f"Reproduce it: `llm-neo distill --config {(out / 'best.yaml').resolve()}`" in md
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
    assert [t.status for t in state.trials] == [TrialStatus.DONE, TrialStatus.DONE]
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
    assert [t.status for t in state.trials] == [TrialStatus.FAILED, TrialStatus.DONE]
    assert "non-finite" in str(state.trials[0].error)
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
    assert [t.status for t in state.trials] == [TrialStatus.DONE, TrialStatus.DONE]
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
    assert [t.status for t in state.trials] == [TrialStatus.DONE, TrialStatus.DONE]
    # Both damaged: refused, both files named, and what to do.
    state_file.write_text("{")
    (out / "sweep.json.bak").write_text("[]")
    with pytest.raises(
        StateFileError, match=r"sweep.json is damaged .* backup .*sweep.json.bak \(not a JSON"
    ):
        sweep(dataclasses.replace(config, resume=True))


# ------------------------------------------------------------------------------------------------
# Ranking only what can be ranked


def _state(values: dict[str, float], mode: str = "min", tolerance: float = 0.01) -> SweepState:
    trials = [Trial(t, {}, TrialStatus.DONE, {"heldout.ce": v}, None) for t, v in values.items()]
    return SweepState(1, {}, {}, 0, trials, "heldout.ce", Mode(mode), tolerance)


def test_ranks_within_the_tolerance_are_ties_and_the_rest_are_not():
    values = {"a": 2.000, "b": 2.030, "c": 2.010, "d": 2.500, "e": 2.510, "f": 3.0}
    assert ranks(_state(values)) == {"a": "1=", "c": "1=", "b": "3", "d": "4=", "e": "4=", "f": "6"}
    # b is within 1% of c but not of a, the group's first: ties are measured from the group's leader.
    assert ranks(_state(values, tolerance=0.0)) == {
        "a": "1",
        "c": "2",
        "b": "3",
        "d": "4",
        "e": "5",
        "f": "6",
    }
    assert ranks(_state({"a": 0.90, "b": 0.905}, mode="max")) == {"b": "1=", "a": "1="}


def test_training_losses_of_different_objectives_are_not_ranked(tmp_path, base_yaml):
    def refused(metric: str, grid: str) -> str:
        with pytest.raises(ConfigError) as info:
            sweep(
                SweepConfig(
                    base=str(base_yaml),
                    space=_space(tmp_path, grid),
                    output=str(tmp_path / "s"),
                    metric=metric,
                )
            )
        return str(info.value)

    text = refused("final.loss", "grid:\n  kd_ratio: [0.5, 0.9]\n")
    assert "--metric final.loss: the trials minimise different objectives (" in text and "kd_ratio" in text
    assert "rank on a held-out metric" in text
    assert "different objectives" in refused("final.kd_loss", "grid:\n  divergence: [forward_kl, jsd]\n")
    assert "different objectives" in refused("final.loss", "grid:\n  method: [neo, lora]\n")
    assert not (tmp_path / "s").exists()
    # One objective, several ranks or learning rates: final.loss compares like with like.
    from llm_neo.commands.sweep import _incomparable, objective, trial_config

    same = {
        t: trial_config(yaml.safe_load(base_yaml.read_text()), {"lora.r": r}, tmp_path / t, source=t)
        for t, r in (("t0", 2), ("t1", 4))
    }
    assert _incomparable(same, "final.loss") == []
    assert objective(same["t0"]) == {
        "loss": "ce+kd",
        "kd_ratio": 0.5,
        "divergence": "forward_kl",
        "kd_temperature": 1.0,
    }


def test_the_dense_and_the_topk_kl_are_never_ranked_against_each_other(
    tmp_path, base_yaml, teacher_dir, student_dir, alpaca_jsonl, caplog
):
    from llm_neo.config import CacheTeacherConfig
    from llm_neo.teacher_cache.writer import cache_teacher

    cache = tmp_path / "cache"
    cache_teacher(CacheTeacherConfig(teacher=str(teacher_dir), data=str(alpaca_jsonl), output=str(cache)))
    base = yaml.safe_load(base_yaml.read_text()) | {"teacher_cache": str(cache)}
    del base["teacher"]
    cache_only = tmp_path / "cache-only.yaml"
    cache_only.write_text(yaml.safe_dump(base))
    grid = _space(tmp_path, "grid:\n  lr: [1e-3]\n")
    # Trials that have only a cache report its top-k KL: the default metric follows, saying so.
    with caplog.at_level("WARNING", logger="llm_neo"):
        state = sweep(SweepConfig(base=str(cache_only), space=grid, output=str(tmp_path / "s")))
    assert (
        state.metric == "heldout.kl_to_teacher_topk"
        and "ranking on heldout.kl_to_teacher_topk" in caplog.text
    )
    (trial,) = state.trials
    assert "heldout.kl_to_teacher_topk" in trial.metrics and "heldout.kl_to_teacher" not in trial.metrics
    md = (tmp_path / "s" / "leaderboard.md").read_text()
    assert md.startswith("# Sweep leaderboard: heldout.kl_to_teacher_topk (lower is better)")
    # With a teacher the trials report the dense KL: ranking them on the top-k one is refused.
    with pytest.raises(ConfigError, match=r"with a teacher, rank on heldout\.kl_to_teacher"):
        sweep(
            SweepConfig(
                base=str(base_yaml),
                space=grid,
                output=str(tmp_path / "t"),
                metric="heldout.kl_to_teacher_topk",
            )
        )


def test_plots_use_a_log_axis_for_learning_rates_and_never_an_offset():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lr = Dimension("lr", "grid", (1e-4, 2e-4, 4e-4))
    assert log_axis(lr, [1e-4, 2e-4, 4e-4])  # a learning rate, and geometric
    assert log_axis(Dimension("temperature", "grid", ()), [0.5, 1.0, 2.0, 4.0])  # geometric
    assert not log_axis(Dimension("kd_ratio", "grid", ()), [0.3, 0.5, 0.9])
    assert not log_axis(Dimension("warmup_ratio", "grid", ()), [0.1, 0.2, 0.3, 0.4])
    assert not log_axis(Dimension("lora.r", "grid", ()), [2, 4])  # two values: no spacing to read
    # KL values 1e-6 apart around 1.855e-2, the sweep: tick labels are the values themselves.
    ys = [0.018551, 0.018552, 0.018553]
    fig = plot_metric(lr, [1e-4, 2e-4, 4e-4], ys, "heldout.kl_to_teacher", best=(0, "t000"))
    fig.canvas.draw()
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_xlabel() == "lr (log scale)"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0.0001", "0.0002", "0.0004"]
    assert ax.yaxis.get_major_formatter().get_offset() == ""
    labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
    assert labels and all(label.startswith("0.01855") for label in labels), labels
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# sweep.json as a record


def _todays_state() -> dict:
    """A sweep.json as `sweep` writes it (before the records existed): a done trial with its held-out size,
    a failed one, a running and a pending one, the ranking after the trials."""
    trial = {"id": "t000", "overrides": {"lr": 1e-4, "lora.r": 16}, "status": "done"}
    return {
        "version": 1,
        "base": {"student": "s", "lr": "1e-3", "lora": {"r": 4, "lora_alpha": None}, "eval_fraction": 0.25},
        "space": {"source": "space.yaml", "grid": {"lr": [1e-4, 2e-4], "lora.r": [16, 64]}},
        "seed": 0,
        "trials": [
            trial | {"metrics": {"heldout.ce": 2.5, "train_time_s": 1.0}, "error": None,
                     "heldout": {"records": 4, "tokens": 23}},
            {"id": "t001", "overrides": {"lr": 1e-4, "lora.r": 64}, "status": "failed", "metrics": {},
             "error": "step 1: non-finite loss"},
            {"id": "t002", "overrides": {"lr": 2e-4, "lora.r": 16}, "status": "running", "metrics": {},
             "error": None},
            {"id": "t003", "overrides": {"lr": 2e-4, "lora.r": 64}, "status": "pending", "metrics": {},
             "error": None},
        ],
        "metric": "heldout.ce",
        "mode": "min",
        "tie_tolerance": 0.01,
        "split_differs": [],
    }  # fmt: skip


def test_a_sweep_json_of_todays_format_loads_and_writes_back_unchanged(tmp_path):
    from llm_neo.commands.sweep import _save_state, read_sweep_state
    from llm_neo.runtime.integrity import write_state

    write_state(tmp_path / "a" / "sweep.json", _todays_state())
    state = read_sweep_state(tmp_path / "a" / "sweep.json")
    assert state.trials[0].heldout is not None and state.trials[0].heldout.tokens == 23
    assert [t.status.value for t in state.trials] == ["done", "failed", "running", "pending"]
    assert state.trials[1].heldout is None and state.mode == Mode.MIN
    _save_state(tmp_path / "b", state)
    assert (tmp_path / "b" / "sweep.json").read_text() == (tmp_path / "a" / "sweep.json").read_text()


def test_a_sweep_json_of_the_wrong_shape_is_damage_the_backup_replaces(tmp_path, caplog):
    from llm_neo.commands.sweep import read_sweep_state
    from llm_neo.runtime.integrity import backup_path, write_state

    path = tmp_path / "sweep.json"
    write_state(path, _todays_state())
    wrong = _todays_state()
    wrong["trials"][2]["status"] = "runing"  # checksummed, valid JSON, not a sweep's state
    write_state(path, wrong)
    with caplog.at_level("WARNING", logger="llm_neo"):
        state = read_sweep_state(path)
    assert state.trials[2].status == TrialStatus.RUNNING
    assert "SweepState.trials[2].status: 'runing' is not one of" in caplog.text
    write_state(backup_path(path), wrong | {"trials": "none"})
    with pytest.raises(StateFileError, match=r"sweep.json is damaged .* backup .*sweep.json.bak \("):
        read_sweep_state(path)


def test_the_leaderboard_ranks_finished_trials_and_lists_the_rest():
    from llm_neo.commands.sweep import leaderboard_rows
    from llm_neo.records import from_json
    from llm_neo.records.sweep import leaderboard_cells

    state = from_json(SweepState, _todays_state())
    rows = [leaderboard_cells(r) for r in leaderboard_rows(state, ["lr", "lora.r"])]
    assert rows[0] == {
        "rank": "1",
        "trial": "t000",
        "lr": 1e-4,
        "lora.r": 16,
        "heldout.ce": 2.5,
        "train_time_s": 1.0,
        "heldout tokens": 23,
        "status": "done",
    }
    assert [(r["trial"], r["rank"], r["status"]) for r in rows[1:]] == [
        ("t001", None, "failed"),
        ("t002", None, "running"),
        ("t003", None, "pending"),
    ]


def test_a_finished_trial_without_final_loss_is_listed_and_never_raises(tmp_path):
    """A trial resumed at its last step by an llm-neo that wrote ``"final": {}`` finished without
    final.loss: the leaderboard lists it as such, and the ranking neither drops it silently nor fails."""
    from llm_neo.commands.sweep import Space, write_reports

    space = Space("grid", (Dimension("lr", "grid", (1e-4, 2e-4)),), 2)
    unscored = Trial("t001", {"lr": 2e-4}, TrialStatus.DONE, {}, None)
    state = SweepState(1, {}, {}, 0, [unscored], "final.loss", Mode.MIN, 0.01)
    write_reports(state, tmp_path, space)  # the only finished trial lacks the metric: no best, no KeyError
    board = (tmp_path / "leaderboard.md").read_text()
    assert "No finished trial reported final.loss; the trials below are not ranked." in board
    assert "Finished without final.loss (not ranked; see its summary.json):\n\n- t001" in board
    assert not (tmp_path / "best.yaml").exists()

    (tmp_path / "trials" / "t000").mkdir(parents=True)
    (tmp_path / "trials" / "t000" / "config.yaml").write_text("lr: 0.0001\n")
    scored = Trial("t000", {"lr": 1e-4}, TrialStatus.DONE, {"final.loss": 1.5}, None)
    state.trials = [scored, unscored]
    write_reports(state, tmp_path, space)
    board = (tmp_path / "leaderboard.md").read_text()
    assert "**Best: t000** (lr=0.0001), final.loss = 1.5." in board
    assert "- t001" in board and "| t001 |" in board
    assert "t000" in (tmp_path / "best.yaml").read_text()
