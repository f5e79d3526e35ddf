"""Training checkpoints: everything needed for a resumed run to end where an uninterrupted one would.

A checkpoint is a directory ``checkpoints/step-000123/`` holding
  trainable.safetensors   the trainable weights (LoRA branches, or the whole student for sft/kd)
  optimizer.pt            AdamW state (loaded with ``weights_only=True``: no code runs on load)
  state.pt                scheduler state and RNG states (torch CPU, CUDA)
  state.json              step, micro-batches consumed, tokens seen, elapsed time
It is written under a temporary name and renamed into place, so a kill at any moment leaves the
previous complete checkpoint; only the newest ``keep`` are kept. Sharded weights and optimizer states
are gathered whole (rank 0 writes), so the files are the same for any number of processes.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from llm_neo.errors import TrainingError
from llm_neo.runtime.atomic import atomic_directory
from llm_neo.runtime.distributed import (
    World,
    barrier,
    gather_optimizer,
    gather_state,
    load_optimizer,
    load_whole_into,
)

_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class Progress:
    """Where the loop stands; saved in state.json."""

    step: int = 0  # optimizer steps done
    micro_batches: int = 0  # micro-batches consumed (the data position)
    tokens: int = 0  # trained tokens seen
    elapsed_s: float = 0.0  # training wall time before this process


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    root: Path,
    *,
    trainable: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    progress: Progress,
    world: World | None = None,
    keep: int = 2,
) -> Path:
    """Write ``root/step-N`` atomically, then delete all but the newest ``keep`` checkpoints.

    Every rank must call it (gathering sharded tensors is a collective); rank 0 writes.
    """
    world = world or World()
    path = root / f"step-{progress.step:06d}"
    weights = gather_state(dict(trainable))  # contiguous whole CPU copies: what safetensors wants
    optim = gather_optimizer(optimizer)
    rngs: list[Any] = [rng_state()]
    if world.enabled:
        rngs = [None] * world.size
        torch.distributed.all_gather_object(rngs, rng_state())
    if world.is_main:
        with atomic_directory(path) as tmp:
            save_file(weights, str(tmp / "trainable.safetensors"))
            torch.save(optim, tmp / "optimizer.pt")
            torch.save({"scheduler": scheduler.state_dict(), "rng": rngs}, tmp / "state.pt")
            (tmp / "state.json").write_text(json.dumps(asdict(progress), indent=2))
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(world)
    return path


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (temporary dirs are never listed)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / "state.json").is_file()]


def load_checkpoint(
    path: Path,
    *,
    trainable: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    world: World | None = None,
) -> Progress:
    """Restore weights, optimizer, scheduler and RNG from ``path`` in place; return the progress.

    Each rank keeps its own shard of the whole tensors on disk and its own RNG state (when the number
    of processes is unchanged; otherwise rank 0's).
    """
    world = world or World()
    weights = load_file(str(path / "trainable.safetensors"))
    missing = sorted(set(trainable) - set(weights))
    unexpected = sorted(set(weights) - set(trainable))
    if missing or unexpected:
        raise TrainingError(
            f"checkpoint {path} does not match this run's trainable weights (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}): it was written by a different method or LoRA setting"
        )
    for name, param in trainable.items():
        load_whole_into(param, weights[name])
    load_optimizer(optimizer, torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
    state = torch.load(path / "state.pt", weights_only=True, map_location="cpu")
    scheduler.load_state_dict(state["scheduler"])
    rngs = state["rng"]
    set_rng_state(rngs[world.rank] if len(rngs) == world.size else rngs[0])
    return Progress(**json.loads((path / "state.json").read_text()))
