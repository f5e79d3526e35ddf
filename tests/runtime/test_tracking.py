"""--report-to: TensorBoard, W&B (offline) and MLflow get what metrics.jsonl gets, a resumed run continues
the same TensorBoard log without duplicates, and a tracker that cannot run is refused before training."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from conftest import interrupt_at, tiny_run

from llm_neo.config import DistillConfig
from llm_neo.distill import distill
from llm_neo.errors import ConfigError

pytest.importorskip("tensorboard", reason="the track extra is not installed: pip install 'llm-neo[track]'")
pytest.importorskip("wandb", reason="the track extra is not installed: pip install 'llm-neo[track]'")
pytest.importorskip("mlflow", reason="the track extra is not installed: pip install 'llm-neo[track]'")

import llm_neo.runtime.tracking as tracking

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def make(tmp_path, student_dir, teacher_dir, alpaca_jsonl):
    def make_config(name: str, **overrides) -> DistillConfig:
        models = dict(student=str(student_dir), teacher=str(teacher_dir), data=str(alpaca_jsonl))
        return tiny_run(tmp_path / name, **(models | overrides))

    return make_config


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def tensorboard_scalars(out: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_every_tracker_logs_what_metrics_jsonl_holds(make):
    summary = distill(make("all", report_to=["tensorboard", "wandb", "mlflow"]))
    out = summary.output_dir
    records = metrics(out)
    expected = [(r["step"], r["loss"]) for r in records]

    assert tensorboard_scalars(out, "train/loss") == [(s, pytest.approx(v, rel=1e-6)) for s, v in expected]
    assert tensorboard_scalars(out, "heldout/ce") == [(3, pytest.approx(summary.heldout["ce"], rel=1e-6))]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("llm-neo").experiment_id])
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(s, pytest.approx(v, rel=1e-9)) for s, v in expected]
    assert run.data.params["method"] == "neo" and run.info.status == "FINISHED"

    # W&B offline: one run directory under the run, its records holding every logged value.
    (wandb_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    data = wandb_file.read_bytes()
    assert b"train/loss" in data and b"heldout/kl_to_teacher" in data
    for _, value in expected:
        assert json.dumps(value).encode() in data


def test_a_resumed_run_continues_the_same_tensorboard_log(make):
    whole = distill(make("whole", max_steps=6, save_every=2, report_to=["tensorboard"]))

    killed = make("killed", max_steps=6, save_every=2, report_to=["tensorboard"])
    with pytest.raises(KeyboardInterrupt):
        # the checkpoint is step 2: step 3 is logged, then redone by the resumed run
        distill(killed, on_step=interrupt_at(3))
    resumed = distill(dataclasses.replace(killed, resume=True))

    logged = tensorboard_scalars(resumed.output_dir, "train/loss")
    assert [s for s, _ in logged] == [1, 2, 3, 4, 5, 6]  # step 3 once: the stopped run's is purged
    assert [v for _, v in logged] == pytest.approx([r["loss"] for r in metrics(whole.output_dir)], rel=1e-5)


def test_a_tracker_that_cannot_run_is_refused_before_anything_loads(make, monkeypatch):
    with pytest.raises(ConfigError, match="--report-to: 'neptune' is not one of tensorboard, wandb, mlflow"):
        distill(make("unknown", report_to=["neptune"]))
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(
        tracking.importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    config = make("missing", report_to=["wandb"])
    with pytest.raises(
        ConfigError, match=r"the wandb package is not installed; pip install 'llm-neo\[track\]'"
    ):
        distill(config)
    assert not Path(str(config.output_dir)).exists()
