"""lm-evaluation-harness tasks on a merged student (``llm-neo compare --lm-eval-tasks``; the extra
``llm-neo[eval]``).

A merged student is an ordinary Hugging Face model directory, so this is lm-eval's own ``hf`` model on
it, not a re-implementation: the scores are the ones lm-eval reports for that directory. Nothing is
downloaded here; a task's dataset must be on this machine (a local task YAML under ``include`` whose
``dataset_path`` is ``json`` with local ``data_files``, or a dataset already in the datasets cache).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from llm_neo.errors import ConfigError

log = logging.getLogger("llm_neo")


def lm_eval_scores(
    model_dir: str,
    tasks: list[str],
    *,
    include: str | None = None,
    limit: int | None = None,
    device: torch.device,
    batch_size: int = 8,
) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` of lm-eval's ``simple_evaluate`` on ``model_dir`` (fp32 on a CPU, bf16
    on a GPU), with the metrics' standard errors as ``<metric>_stderr``."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ConfigError(
            ["--lm-eval-tasks: lm-evaluation-harness is not installed; pip install 'llm-neo[eval]'"]
        ) from err
    # Indexing lm-eval's own thousands of task files takes most of a minute: only local tasks, if enough.
    manager = TaskManager(include_path=include, include_defaults=False) if include else None
    if manager is None or any(task not in manager.all_tasks for task in tasks):
        manager = TaskManager(include_path=include)
    missing = [task for task in tasks if task not in manager.all_tasks]
    if missing:
        raise ConfigError(
            [
                f"--lm-eval-tasks: lm-eval knows no task {', '.join(missing)} (local tasks: "
                "--lm-eval-include DIR)"
            ]
        )
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    out = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={model_dir},dtype={dtype}",
        tasks=list(tasks),
        task_manager=manager,
        limit=limit,
        device=str(device),
        batch_size=batch_size,
        log_samples=False,
    )
    assert out is not None
    scores: dict[str, dict[str, float]] = {}
    for task, metrics in out["results"].items():
        row: dict[str, Any] = {}
        for key, value in metrics.items():
            name, _, _filter = str(key).partition(",")
            if isinstance(value, (int, float)) and not isinstance(value, bool) and name != "sample_len":
                row[name] = float(value)
        scores[task] = row
    return scores
