"""Experiment tracking beside ``metrics.jsonl``: TensorBoard, Weights & Biases (offline) and MLflow
(a local file store), the ecosystem's usual ways to look at training curves.

Every tracker writes under the run's output directory and nothing leaves the machine: TensorBoard's event
files in ``tensorboard/`` (``tensorboard --logdir OUTPUT_DIR``), a W&B offline run in ``wandb/``
(``wandb sync OUTPUT_DIR/wandb/offline-run-*`` uploads it later, if you want), an MLflow file store in
``mlruns/`` (``mlflow ui --backend-store-uri OUTPUT_DIR/mlruns``). Each step's record is the one
``metrics.jsonl`` gets (loss, ce_loss, kd_loss, lr, grad_norm, tokens_per_s, ...) under ``train/``, and
the held-out metrics of the merged student under ``heldout/`` at the last step. The packages are an
optional extra: ``pip install 'llm-neo[track]'``.

A resumed run continues the same logs: TensorBoard drops what the stopped run wrote after the
checkpoint it resumes from (``purge_step``), W&B resumes the same offline run id, MLflow the same run.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm_neo.choices import TRACKERS
from llm_neo.errors import ConfigError, OutputError

# tracker -> (the module that must be importable, the pip package)
PACKAGES = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow-skinny"),
}

Log = Callable[[int, dict[str, float]], None]


@dataclass
class Trackers:
    """The open trackers of a run: ``log(step, metrics)`` to each, ``close()`` them all (idempotent)."""

    names: list[str] = field(default_factory=list)
    _logs: list[Log] = field(default_factory=list)
    _closes: list[Callable[[], None]] = field(default_factory=list)

    def log(self, step: int, metrics: dict[str, Any], prefix: str = "train") -> None:
        numbers = {
            f"{prefix}/{k}": float(v)
            for k, v in metrics.items()
            if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)
        }
        for log in self._logs:
            log(step, numbers)

    def close(self) -> None:
        closes, self._closes, self._logs = self._closes, [], []
        for close in closes:
            close()


def check_trackers(problems: list[str], names: list[str]) -> None:
    """One problem per --report-to name that is unknown or whose package is not installed."""
    for name in names:
        if name not in TRACKERS:
            problems.append(f"--report-to: {name!r} is not one of {', '.join(TRACKERS)}")
        elif importlib.util.find_spec(PACKAGES[name][0]) is None:
            problems.append(
                f"--report-to {name}: the {PACKAGES[name][1]} package is not installed; pip install "
                f"'llm-neo[track]' (or pip install {PACKAGES[name][1]})"
            )


def open_trackers(
    names: list[str], out: Path, *, run_name: str, config: dict[str, Any], start_step: int
) -> Trackers:
    """Open each tracker of ``names`` for the run in ``out`` (resumed at ``start_step``, 0: a new run)."""
    problems: list[str] = []
    check_trackers(problems, names)
    if problems:
        raise ConfigError(problems)
    trackers = Trackers(names=list(names))
    run_id = hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:16]  # stable across resumes
    for name in names:
        try:
            log, close = _OPENERS[name](out, run_name, run_id, config, start_step)
        except Exception as err:  # a tracker that cannot start: say which, before any step is lost
            trackers.close()
            raise OutputError(f"--report-to {name}: could not open its log in {out}: {err}") from err
        trackers._logs.append(log)
        trackers._closes.append(close)
    return trackers


def _tensorboard(
    out: Path, run_name: str, run_id: str, config: dict[str, Any], start_step: int
) -> tuple[Log, Callable[[], None]]:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(
        log_dir=str(out / "tensorboard"), purge_step=start_step + 1 if start_step else None
    )
    if not start_step:
        writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```")

    def log(step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            writer.add_scalar(key, value, step)
        writer.flush()

    return log, writer.close


def _wandb(
    out: Path, run_name: str, run_id: str, config: dict[str, Any], start_step: int
) -> tuple[Log, Callable[[], None]]:
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    run = wandb.init(
        mode="offline",  # nothing leaves the machine; `wandb sync` uploads it later if wanted
        dir=str(out),
        project="llm-neo",
        name=run_name,
        id=run_id,
        resume="allow",
        config=config,
        settings=wandb.Settings(console="off", x_disable_stats=True),
    )

    def log(step: int, metrics: dict[str, float]) -> None:
        run.log(metrics, step=step)

    return log, run.finish


def _mlflow(
    out: Path, run_name: str, run_id: str, config: dict[str, Any], start_step: int
) -> tuple[Log, Callable[[], None]]:
    from mlflow.tracking import MlflowClient

    # MLflow 3 keeps its local file store in maintenance mode behind this switch; a database backend
    # would need SQLAlchemy, which mlflow-skinny does not bring. The file store is what `mlflow ui` reads.
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("llm-neo")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("llm-neo")
    found = client.search_runs([experiment_id], filter_string=f"tags.llm_neo_run = '{run_id}'")
    if found:
        run_uuid = found[0].info.run_id
    else:
        run_uuid = client.create_run(
            experiment_id, run_name=run_name, tags={"llm_neo_run": run_id}
        ).info.run_id
        for key, value in _flat(config).items():
            client.log_param(run_uuid, key, str(value)[:500])

    def log(step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            client.log_metric(run_uuid, key, value, step=step)

    def close() -> None:
        client.set_terminated(run_uuid)

    return log, close


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


_OPENERS = {"tensorboard": _tensorboard, "wandb": _wandb, "mlflow": _mlflow}
