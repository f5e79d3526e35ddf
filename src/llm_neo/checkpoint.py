"""Training checkpoints: everything needed for a resumed run to end where an uninterrupted one would.

A checkpoint is a directory ``checkpoints/step-000123/`` holding
  trainable.safetensors   the trainable weights (LoRA branches, or the whole student for sft/kd)
  optimizer.pt            AdamW state (loaded with ``weights_only=True``: no code runs on load)
  state.pt                scheduler state and RNG states (torch CPU, CUDA)
  state.json              step, micro-batches consumed, tokens seen, elapsed time
It is written under a temporary name and renamed into place, so a kill at any moment leaves the
previous complete checkpoint; only the newest ``keep`` are kept.
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

from llm_neo.atomic import atomic_directory

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
    keep: int = 2,
) -> Path:
    """Write ``root/step-N`` atomically, then delete all but the newest ``keep`` checkpoints."""
    path = root / f"step-{progress.step:06d}"
    with atomic_directory(path) as tmp:
        # Contiguous CPU copies: safetensors refuses shared or non-contiguous storage.
        weights = {name: p.detach().to("cpu").contiguous().clone() for name, p in trainable.items()}
        save_file(weights, str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save({"scheduler": scheduler.state_dict(), "rng": rng_state()}, tmp / "state.pt")
        (tmp / "state.json").write_text(json.dumps(asdict(progress), indent=2))
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
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
) -> Progress:
    """Restore weights, optimizer, scheduler and RNG from ``path`` in place; return the progress."""
    weights = load_file(str(path / "trainable.safetensors"))
    missing = sorted(set(trainable) - set(weights))
    unexpected = sorted(set(weights) - set(trainable))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not match this run's trainable weights (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}): it was written by a different method or LoRA setting"
        )
    with torch.no_grad():
        for name, param in trainable.items():
            param.copy_(weights[name].to(param.device, param.dtype))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
    state = torch.load(path / "state.pt", weights_only=True, map_location="cpu")
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return Progress(**json.loads((path / "state.json").read_text()))
