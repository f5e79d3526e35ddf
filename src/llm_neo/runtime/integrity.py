"""Integrity of what llm-neo wrote: sizes and sha256 checksums of files, and state files that carry
their own checksum.

Atomic writes (``runtime/atomic.py``) make sure no reader sees half a file. They cannot tell a file
that a disk, a copy or a person damaged afterwards: for that, whoever writes a set of files records
each file's size and sha256 (``file_record``) in a manifest written last, and readers check them
(``check_files``): the sizes with one ``stat`` each, the checksums by reading the files once.

A state file (``sweep.json``, a comparison's state) is one JSON object rewritten after every change.
``write_state`` adds a ``checksum`` field (sha256 of the rest, as canonical JSON) and keeps the
previous good version as ``NAME.bak``; ``read_state`` verifies it, falls back to the backup with a
warning (losing the last change, which the callers redo), and otherwise raises ``StateFileError``
naming both files. A state file written before checksums existed (no ``checksum`` field) is read as is.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llm_neo.errors import StateFileError
from llm_neo.runtime.atomic import atomic_write_bytes, atomic_write_text

log = logging.getLogger("llm_neo")

CHECKSUM = "checksum"
BLOCK = 16 * 2**20


def file_sha256(path: Path) -> str:
    """sha256 (hex) of a file's bytes, streamed in 16 MiB blocks (about 1-2 GB/s)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(BLOCK):
            digest.update(block)
    return digest.hexdigest()


def file_record(path: Path) -> dict[str, Any]:
    """What a manifest records of a file: its size in bytes and its sha256."""
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path)}


def check_file(path: Path, record: dict[str, Any], *, checksum: bool = True) -> str | None:
    """What is wrong with ``path`` against its ``record`` (None: nothing): missing, another size
    (truncated or extended), or, with ``checksum``, other bytes (corrupted)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "missing"
    except OSError as err:
        return f"unreadable ({err.strerror})"
    if size != record["bytes"]:
        how = "truncated" if size < record["bytes"] else "longer than written"
        return f"{size} bytes, {record['bytes']} were written ({how})"
    if checksum:
        try:
            digest = file_sha256(path)
        except OSError as err:
            return f"unreadable ({err.strerror})"
        if digest != record["sha256"]:
            return "its sha256 differs from the one recorded when it was written (corrupted)"
    return None


def check_files(root: Path, records: dict[str, dict[str, Any]], *, checksum: bool = True) -> list[str]:
    """One line per damaged file of ``records`` (name → record) under ``root``: 'NAME: what is wrong'."""
    problems = []
    for name, record in records.items():
        problem = check_file(root / name, record, checksum=checksum)
        if problem:
            problems.append(f"{name}: {problem}")
    return problems


# ----------------------------------------------------------------------------------------------------
# State files


def _digest(data: dict[str, Any]) -> str:
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def with_checksum(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` as a reader will parse it back from JSON, plus a ``checksum`` field over the rest."""
    plain = json.loads(json.dumps(data, default=str))
    return {**plain, CHECKSUM: _digest(plain)}


def without_checksum(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` parsed from JSON, its checksum verified and removed; ValueError if it does not match. An
    object without a checksum field (written before there were any) is returned as it is."""
    data = dict(data)
    stored = data.pop(CHECKSUM, None)
    if stored is not None and stored != _digest(data):
        raise ValueError("its checksum does not match its content (damaged after it was written)")
    return data


def backup_path(path: Path) -> Path:
    return path.with_name(path.name + ".bak")


def read_checked(path: Path, check: Callable[[dict[str, Any]], object] | None = None) -> dict[str, Any]:
    """The JSON object in ``path`` without its checksum field (written by ``write_state`` or as
    ``with_checksum(data)``), verified, and passed by ``check`` if given; ValueError or OSError says what
    is wrong."""
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"not valid JSON (line {err.lineno} column {err.colno}: {err.msg})") from err
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    data = without_checksum(data)
    if check is not None:
        check(data)
    return data


def write_state(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` (a JSON object) atomically with its checksum; the version it replaces, if intact,
    becomes ``NAME.bak`` first, so one good version survives any single damaged file."""
    try:
        previous = path.read_bytes()
        read_checked(path)
    except (OSError, ValueError):
        previous = b""  # none, or damaged: keep the backup as it is
    if previous:
        atomic_write_bytes(backup_path(path), previous)
    atomic_write_text(path, json.dumps(with_checksum(data), indent=2) + "\n")


def read_state(
    path: Path, *, what: str, fix: str, check: Callable[[dict[str, Any]], object] | None = None
) -> dict[str, Any]:
    """The state in ``path``, verified; its backup (with a warning) when ``path`` is damaged or missing;
    StateFileError naming both files and ``fix`` when neither is intact. ``check`` is the reader's test
    of the object's shape (building its record): a ValueError it raises makes a file damaged too."""
    try:
        return read_checked(path, check)
    except (OSError, ValueError) as err:
        problem = f"{err.strerror}" if isinstance(err, OSError) else str(err)
    backup = backup_path(path)
    try:
        data = read_checked(backup, check)
    except (OSError, ValueError) as err:
        backup_problem = f"{err.strerror}" if isinstance(err, OSError) else str(err)
        raise StateFileError(
            f"{what} {path} is damaged or unreadable ({problem}), and so is its backup {backup} "
            f"({backup_problem}): {fix}"
        ) from None
    log.warning(
        "%s %s is damaged or unreadable (%s); continuing from its previous version %s (the last change "
        "it recorded is redone)",
        what,
        path,
        problem,
        backup,
    )
    return data
