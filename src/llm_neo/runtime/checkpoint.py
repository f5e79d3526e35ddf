"""Training checkpoints: everything needed for a resumed run to end where an uninterrupted one would.

A checkpoint is a directory ``checkpoints/step-000123/`` holding
  trainable.safetensors   the trainable weights (LoRA branches, or the whole student for sft/kd)
  optimizer.pt            AdamW state (loaded with ``weights_only=True``: no code runs on load)
  state.pt                scheduler state and RNG states (torch CPU, CUDA)
  manifest.json           written last: step, micro-batches consumed, tokens seen, elapsed time, the
                          last step's metrics, the size and sha256 of each file above, the run's
                          fingerprint (``Fingerprint``: what a resume must find unchanged), and a
                          checksum of itself
It is written under a temporary name, fsynced and renamed into place, so a kill at any moment leaves
the previous complete checkpoint; only the newest ``keep`` are kept. Sharded weights and optimizer
states are gathered whole (rank 0 writes), so the files are the same for any number of processes.

Integrity. ``list_checkpoints`` offers only complete checkpoints whose files have the recorded sizes
(a ``stat`` each); ``resume_point`` also checks every file's sha256 (one read of the checkpoint) and
falls back from a damaged newest checkpoint to the newest intact one, saying which file is damaged and
how. Checkpoints written before manifests existed (``state.json`` instead of ``manifest.json``) are
still listed and loaded, unverified.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, cast

import torch
from safetensors.torch import load_file, save_file

from llm_neo.errors import CheckpointError, TrainingError
from llm_neo.runtime.atomic import atomic_directory, output_stream, writing
from llm_neo.runtime.distributed import (
    World,
    barrier,
    gather_optimizer,
    gather_state,
    load_optimizer,
    load_whole_into,
)
from llm_neo.runtime.integrity import check_files, file_record, with_checksum, without_checksum

_STEP_DIR = re.compile(r"^step-(\d+)$")
FORMAT = "llm-neo-checkpoint"
VERSION = 2
MANIFEST = "manifest.json"
LEGACY_STATE = "state.json"  # version 1: the progress alone, no sizes or checksums
FILES = ("trainable.safetensors", "optimizer.pt", "state.pt")


@dataclass
class Progress:
    """Where the loop stands; saved in the manifest."""

    step: int = 0  # optimizer steps done
    micro_batches: int = 0  # micro-batches consumed (the data position)
    tokens: int = 0  # trained tokens seen
    # Every token the steps ran through the student (prompt and response, no padding); None: resumed
    # from a checkpoint written before it was counted, so the count would be short.
    tokens_processed: int | None = 0
    elapsed_s: float = 0.0  # training wall time before this process
    # The last step's metrics record (None: no step yet, or a checkpoint written before it was kept), so a
    # resume that starts at the last step still reports how training ended.
    last: dict[str, float] | None = None
    # On-policy runs: the generation totals so far (distill's ``OnPolicyTotals`` keys), so that a resumed
    # run's summary measures every step; None off-policy.
    on_policy: dict[str, float] | None = None


@dataclass(frozen=True)
class Fingerprint:
    """What a run's result depends on beyond its checkpoint, computed once at setup and written into each
    checkpoint so that --resume can refuse a run whose inputs changed since (``distill_dir`` compares).

    ``options`` are the resolved options (all of them: a resume without config.yaml takes them from
    here); ``data`` maps each data file as given to its sha256; ``models`` maps a role (student, teacher)
    to its ``config_sha256`` and ``weights_sha256``; ``teacher_cache`` is the key digest of the cache read.
    """

    options: dict[str, Any]
    data: dict[str, str | None]
    models: dict[str, dict[str, str | None]]
    teacher_cache: str | None = None


def read_fingerprint(path: Path) -> Fingerprint | None:
    """The fingerprint recorded in checkpoint ``path``; None for one written before fingerprints (or
    without a readable manifest)."""
    manifest = read_manifest(path)
    recorded = None if manifest is None else manifest.get("fingerprint")
    if not isinstance(recorded, dict) or not all(
        isinstance(recorded.get(part), dict) for part in ("options", "data", "models")
    ):
        return None  # a fingerprint of another shape: treated as none, which resume notes
    try:
        return Fingerprint(**recorded)
    except TypeError:
        return None


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
    fingerprint: Fingerprint | None = None,
) -> Path:
    """Write ``root/step-N`` atomically (with ``fingerprint`` in its manifest), then delete all but the
    newest ``keep`` checkpoints.

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
        with (
            writing(path, f"checkpoint {path.name}", kept=lambda: _kept(root, path)),
            atomic_directory(path) as tmp,
        ):
            save_file(weights, str(tmp / "trainable.safetensors"))
            with output_stream(tmp / "optimizer.pt") as sink:
                torch.save(optim, cast(IO[bytes], sink))
            with output_stream(tmp / "state.pt") as sink:
                torch.save({"scheduler": scheduler.state_dict(), "rng": rngs}, cast(IO[bytes], sink))
            manifest = {
                "format": FORMAT,
                "version": VERSION,
                "progress": asdict(progress),
                "files": {name: file_record(tmp / name) for name in FILES},
            }
            if fingerprint is not None:
                manifest["fingerprint"] = asdict(fingerprint)
            with output_stream(tmp / MANIFEST) as sink:  # last: it vouches for the files above
                sink.write(json.dumps(with_checksum(manifest), indent=2).encode())
        # Keep the newest ``keep`` intact ones up to this step. Past it: what is left of a stretch a
        # resume abandoned when it fell back from a damaged checkpoint.
        intact = set(list_checkpoints(root))
        earlier = [p for s, p in _step_dirs(root) if s <= progress.step and p in intact]
        doomed = [p for s, p in _step_dirs(root) if s > progress.step or (p not in intact and p != path)]
        for old in [*earlier[:-keep], *doomed]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(world)
    return path


def _kept(root: Path, failed: Path) -> str:
    intact = [p for p in list_checkpoints(root) if p != failed]
    return (
        f"the previous checkpoint {intact[-1]}" if intact else "no earlier checkpoint (none was written yet)"
    )


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every ``step-N`` directory under ``root``, intact or not, oldest first."""
    if not root.is_dir():
        return []
    return sorted(
        (int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()
    )


def read_manifest(path: Path) -> dict[str, Any] | None:
    """The checkpoint's manifest (a legacy one built from state.json: no ``files``); None if there is
    neither, or it cannot be parsed."""
    try:
        if (path / MANIFEST).is_file():
            manifest = json.loads((path / MANIFEST).read_text())
            if not isinstance(manifest, dict):
                return None
            manifest = without_checksum(manifest)
            return manifest if "progress" in manifest and "files" in manifest else None
        if (path / LEGACY_STATE).is_file():
            return {"format": FORMAT, "version": 1, "progress": json.loads((path / LEGACY_STATE).read_text())}
    except (OSError, ValueError):
        return None
    return None


def checkpoint_problems(path: Path, *, checksum: bool = True) -> list[str]:
    """What is wrong with the checkpoint ``path`` (empty: intact): an unreadable manifest, or a file that
    is missing, has another size than written, or (``checksum``) other bytes."""
    manifest = read_manifest(path)
    if manifest is None:
        what = "damaged" if (path / MANIFEST).exists() else "missing (an incomplete checkpoint)"
        return [f"{MANIFEST}: {what}"]
    if manifest.get("version", 0) > VERSION:
        return [f"{MANIFEST}: written by a newer llm-neo (version {manifest['version']}); upgrade llm-neo"]
    if "files" not in manifest:  # legacy: nothing to check but the files' presence
        return [f"{name}: missing" for name in FILES if not (path / name).is_file()]
    return check_files(path, manifest["files"], checksum=checksum)


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first: a manifest and files of the recorded sizes
    (temporary directories of a checkpoint being written are never listed)."""
    return [p for _, p in _step_dirs(root) if not checkpoint_problems(p, checksum=False)]


def resume_point(root: Path) -> tuple[Path, list[tuple[Path, list[str]]]]:
    """The newest intact checkpoint under ``root`` (every file's size and sha256 checked), and the newer
    ones skipped with what is wrong with each. CheckpointError naming ``root`` if none is intact."""
    if not root.is_dir():
        raise CheckpointError(f"--resume: {root} does not exist: no checkpoint was written")
    skipped: list[tuple[Path, list[str]]] = []
    for _, path in reversed(_step_dirs(root)):
        problems = checkpoint_problems(path)
        if not problems:
            return path, skipped
        skipped.append((path, problems))
    listing = "; ".join(f"{p.name}: {', '.join(problems)}" for p, problems in skipped)
    raise CheckpointError(
        f"--resume: no intact checkpoint in {root}"
        + (f" ({listing})" if listing else " (it holds none)")
        + ". Start the run again without --resume (with --overwrite), or restore the checkpoints from a copy."
    )


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
    manifest = read_manifest(path)
    if manifest is None:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is missing or damaged")
    try:
        weights = load_file(str(path / "trainable.safetensors"))
        optim = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
        state = torch.load(path / "state.pt", weights_only=True, map_location="cpu")
    except Exception as err:  # an unverifiable legacy checkpoint, or a file damaged since it was checked
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(err).__name__}: {err})") from err
    missing = sorted(set(trainable) - set(weights))
    unexpected = sorted(set(weights) - set(trainable))
    if missing or unexpected:
        raise TrainingError(
            f"checkpoint {path} does not match this run's trainable weights (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}): it was written by a different method or LoRA setting"
        )
    for name, param in trainable.items():
        load_whole_into(param, weights[name])
    load_optimizer(optimizer, optim)
    scheduler.load_state_dict(state["scheduler"])
    rngs = state["rng"]
    set_rng_state(rngs[world.rank] if len(rngs) == world.size else rngs[0])
    return Progress(**{"tokens_processed": None, **manifest["progress"]})
