"""Reading a complete cache: its manifest, its shards, and the targets of any examples by index."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from llm_neo.errors import CacheError
from llm_neo.losses import TopKTargets

FORMAT = "llm-neo-teacher-cache"
VERSION = 1
MANIFEST = "manifest.json"
KEY_FILE = "key.json"
LOGPROB_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

# The key parts, in the order a mismatch is reported (causes before their consequences), each with
# what it is and how to fix a mismatch. ``{cache}`` and ``{run}`` are the two values.


@dataclass
class TeacherCache:
    """An opened, complete cache. ``targets(rows)`` reads the cached targets of examples ``rows``."""

    path: Path
    manifest: dict[str, Any]
    _handles: dict[int, Any] = field(default_factory=dict, repr=False)
    _offsets: dict[int, list[int]] = field(default_factory=dict, repr=False)

    @property
    def top_k(self) -> int:
        return int(self.manifest["top_k"])

    @property
    def temperature(self) -> float:
        return float(self.manifest["key"]["temperature"])

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @property
    def num_examples(self) -> int:
        return int(self.manifest["num_examples"])

    def _shard(self, index: int) -> tuple[Any, list[int]]:
        if index not in self._handles:
            if len(self._handles) >= 32:  # bound the open files; shards are read roughly in bursts
                oldest = next(iter(self._handles))
                del self._handles[oldest], self._offsets[oldest]
            file = self.path / self.manifest["shards"][index]["file"]
            handle = safe_open(str(file), framework="pt")
            self._handles[index] = handle
            self._offsets[index] = handle.get_tensor("offsets").tolist()
        return self._handles[index], self._offsets[index]

    def example_targets(self, row: int) -> TopKTargets:
        """The cached targets of example ``row``: [P_row, k] ids and log-probs, [P_row] tails."""
        if not 0 <= row < self.num_examples:
            raise IndexError(f"example {row} is not in the cache ({self.num_examples} examples)")
        shard_size = int(self.manifest["shard_size"])
        handle, offsets = self._shard(row // shard_size)
        i = row % shard_size
        a, b = offsets[i], offsets[i + 1]
        return TopKTargets(
            handle.get_slice("ids")[a:b],
            handle.get_slice("log_probs")[a:b],
            handle.get_slice("tail")[a:b],
        )

    def targets(self, rows: Sequence[int]) -> TopKTargets:
        """The targets of examples ``rows``, concatenated in that order: the order of ``targets[trained]``
        of a batch collated from those examples (row-major over [B, T])."""
        parts = [self.example_targets(r) for r in rows]
        return TopKTargets(
            torch.cat([p.ids for p in parts]),
            torch.cat([p.log_probs for p in parts]),
            torch.cat([p.tail for p in parts]),
        )


def open_cache(path: str | Path) -> TeacherCache:
    """Open a complete cache; CacheError if it is missing, incomplete or of another format."""
    root = Path(path).expanduser()
    manifest_file = root / MANIFEST
    if not manifest_file.is_file():
        hint = (
            "it is incomplete (no manifest.json yet): run the same llm-neo cache-teacher command again "
            "to finish it"
            if (root / KEY_FILE).is_file()
            else "create it with llm-neo cache-teacher --teacher T --data D --output CACHE"
        )
        raise CacheError(f"--teacher-cache {root}: not a teacher cache; {hint}")
    manifest = json.loads(manifest_file.read_text())
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CacheError(
            f"{manifest_file}: format {manifest.get('format')!r} version {manifest.get('version')!r}, "
            f"expected {FORMAT!r} version {VERSION}: cache the teacher again with this llm-neo"
        )
    missing = [s["file"] for s in manifest["shards"] if not (root / s["file"]).is_file()]
    if missing:
        raise CacheError(f"{root}: shard files missing ({', '.join(missing[:3])}): cache the teacher again")
    return TeacherCache(path=root, manifest=manifest)


def batch_targets(cache: TeacherCache, rows: Sequence[int]) -> dict[str, torch.Tensor]:
    """The cached targets of a collated batch, as extra entries of its dict (see ``unpack_targets``)."""
    t = cache.targets(rows)
    return {"teacher_ids": t.ids, "teacher_log_probs": t.log_probs, "teacher_tail": t.tail}


def unpack_targets(batch: dict[str, torch.Tensor], device: torch.device) -> TopKTargets | None:
    if "teacher_ids" not in batch:
        return None
    return TopKTargets(
        batch["teacher_ids"].to(device),
        batch["teacher_log_probs"].to(device),
        batch["teacher_tail"].to(device),
    )
