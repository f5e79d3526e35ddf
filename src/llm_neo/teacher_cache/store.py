"""Reading a complete cache: its manifest, its shards, and the targets of any examples by index.

Integrity: the manifest records each shard's size and sha256. ``open_cache`` checks every shard's size
(one ``stat`` each, so a truncated or missing shard is refused before training starts); each shard's
sha256 is checked the first time a process reads from it. Checking every checksum up front would read
the whole cache before the first step (a 1M-sample cache is hundreds of GB: minutes); checked on first
use it costs about one extra sequential read of each shard, which an epoch reads anyway. A damaged
shard is refused (CacheError naming it); ``llm-neo cache-teacher`` with the same options rewrites it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from llm_neo.data import Example
from llm_neo.errors import CacheError
from llm_neo.losses import IGNORE_INDEX, TopKTargets
from llm_neo.runtime.integrity import check_file

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
    _verified: set[int] = field(default_factory=set, repr=False)  # shards whose sha256 matched

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

    @property
    def sampling(self) -> dict[str, Any] | None:
        """How a cache of student samples drew them (its key's ``sampling`` part); None for a cache of
        the data's responses."""
        found = self.manifest["key"].get("sampling")
        return found if isinstance(found, dict) else None

    @property
    def cross_tokenizer(self) -> str | None:
        """The --cross-tokenizer method a cross-tokenizer cache was aligned for; None: same tokenizer."""
        found = self.manifest["key"].get("cross_tokenizer")
        return str(found) if found else None

    @property
    def samples_per_prompt(self) -> int:
        return 1 if self.sampling is None else int(self.sampling["samples_per_prompt"])

    def sample(self, row: int) -> Example:
        """Example ``row`` of a cache of student samples: the prompt (not trained) and the student's
        response (trained), as cache-teacher --student-samples drew it; index ``row``, its cache row."""
        if self.sampling is None:
            raise CacheError(
                f"teacher cache {self.path} holds no student samples (cache-teacher --student-samples)"
            )
        if not 0 <= row < self.num_examples:
            raise IndexError(f"example {row} is not in the cache ({self.num_examples} examples)")
        shard_size = int(self.manifest["shard_size"])
        handle, _ = self._shard(row // shard_size)
        i = row % shard_size
        a, b = handle.get_slice("input_offsets")[i : i + 2].tolist()
        ids = handle.get_slice("input_ids")[a:b].tolist()
        start = int(handle.get_slice("response_starts")[i : i + 1][0])
        return Example(input_ids=ids, labels=[IGNORE_INDEX] * start + ids[start:], index=row)

    def _shard(self, index: int) -> tuple[Any, list[int]]:
        if index not in self._handles:
            if len(self._handles) >= 32:  # bound the open files; shards are read roughly in bursts
                oldest = next(iter(self._handles))
                del self._handles[oldest], self._offsets[oldest]
            record = self.manifest["shards"][index]
            file = self.path / record["file"]
            if index not in self._verified:
                problem = check_file(file, record) if "sha256" in record else None
                if problem:
                    raise damaged_shard(self.path, self.manifest, record["file"], problem)
                self._verified.add(index)
            try:
                handle = safe_open(str(file), framework="pt")
                offsets = handle.get_tensor("offsets").tolist()
            except Exception as err:  # changed since it was checked, or a cache without checksums
                raise damaged_shard(self.path, self.manifest, record["file"], str(err)) from err
            self._handles[index] = handle
            self._offsets[index] = offsets
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

    def kd_rows(self, rows: Sequence[int]) -> torch.Tensor:
        """[P] bool over the trained positions of examples ``rows`` (in ``targets``' order): those with a
        target in a cross-tokenizer cache (the others hold a placeholder)."""
        shard_size = int(self.manifest["shard_size"])
        parts = []
        for row in rows:
            handle, offsets = self._shard(row // shard_size)
            i = row % shard_size
            parts.append(handle.get_slice("kd_rows")[offsets[i] : offsets[i + 1]])
        return torch.cat(parts)

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
    manifest = read_record(manifest_file)
    if isinstance(manifest, str):
        raise CacheError(
            f"--teacher-cache {root}: {manifest_file} is damaged ({manifest}). Rerun the llm-neo "
            "cache-teacher command that made it (same --teacher, --data, --output and options): it "
            "rebuilds the manifest from the intact shards without computing them again; or make the "
            "cache again with --overwrite"
        )
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CacheError(
            f"{manifest_file}: format {manifest.get('format')!r} version {manifest.get('version')!r}, "
            f"expected {FORMAT!r} version {VERSION}: cache the teacher again with this llm-neo"
        )
    for shard in manifest["shards"]:
        problem = check_file(root / shard["file"], shard, checksum=False) if "bytes" in shard else None
        if problem is None and not (root / shard["file"]).is_file():
            problem = "missing"
        if problem:
            raise damaged_shard(root, manifest, shard["file"], problem)
    return TeacherCache(path=root, manifest=manifest)


# What a reader indexes in a manifest without looking: a file lacking one is damaged, not a KeyError.
MANIFEST_FIELDS: dict[str, type] = {
    "format": str,
    "version": int,
    "key": dict,
    "top_k": int,
    "vocab_size": int,
    "shard_size": int,
    "num_examples": int,
    "shards": list,
}


def read_record(file: Path) -> dict[str, Any] | str:
    """The JSON object in ``manifest.json`` or ``key.json``, or what is wrong with the file (truncated,
    not JSON, not an object, a manifest field missing or of the wrong type): a string for the message."""
    try:
        text = file.read_text()
    except (OSError, UnicodeDecodeError) as err:
        return f"unreadable: {err}"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        # The text ends where the parser wanted more: the file was cut short (a full disk, a killed copy).
        ended = err.pos >= len(text.rstrip()) or err.msg.startswith("Unterminated string")
        cut = "truncated: " if ended else ""
        return f"{cut}not valid JSON ({err.msg}: line {err.lineno} column {err.colno})"
    if not isinstance(data, dict):
        return f"a JSON {type(data).__name__}, not an object"
    if file.name != MANIFEST:
        return data if data else "an empty object"
    for name, kind in MANIFEST_FIELDS.items():
        if not isinstance(data.get(name), kind):
            return f"field {name!r} is missing or not a JSON {kind.__name__}"
    if not all(isinstance(s, dict) and isinstance(s.get("file"), str) for s in data["shards"]):
        return "a 'shards' entry without its 'file'"
    return data


def damaged_shard(root: Path, manifest: dict[str, Any], name: str, problem: str) -> CacheError:
    """The refusal of a damaged shard: which one, what is wrong, and the command that rewrites it."""
    sources = manifest.get("sources") or {}
    command = (
        f"llm-neo cache-teacher --teacher {sources.get('teacher', 'T')} --data {sources.get('data', 'D')} "
        f"--output {root} with the options it was made with"
    )
    return CacheError(
        f"teacher cache {root}: shard {name} is damaged ({problem}). Rerun {command}: it checks every "
        "shard and rewrites the damaged ones"
    )


def batch_targets(cache: TeacherCache, rows: Sequence[int]) -> dict[str, torch.Tensor]:
    """The cached targets of a collated batch, as extra entries of its dict (see ``unpack_targets``)."""
    t = cache.targets(rows)
    out = {"teacher_ids": t.ids, "teacher_log_probs": t.log_probs, "teacher_tail": t.tail}
    if cache.cross_tokenizer is not None:
        out["teacher_kd_rows"] = cache.kd_rows(rows)
    return out


def unpack_targets(batch: dict[str, torch.Tensor], device: torch.device) -> TopKTargets | None:
    if "teacher_ids" not in batch:
        return None
    return TopKTargets(
        batch["teacher_ids"].to(device),
        batch["teacher_log_probs"].to(device),
        batch["teacher_tail"].to(device),
    )
