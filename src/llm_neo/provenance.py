"""Where a result came from: the ``provenance`` record of summary.json and eval.json.

A number without its origin cannot be trusted a month later: which model, which teacher, which bytes of
data (sha256, the teacher cache's own hash, ``teacher_cache.key.hash_data``), which versions of llm-neo,
torch, transformers and PEFT, which commit of an llm-neo checkout, and when. Everything here is cheap:
model weights are named, not hashed (a teacher cache's key hashes its teacher's weights), and the data
hash is memoised by path, size and mtime, so a run that already hashed its data for a cache pays nothing.
"""

from __future__ import annotations

import functools
import importlib.metadata
import platform
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from llm_neo import __version__
from llm_neo.errors import LlmNeoError
from llm_neo.teacher_cache.key import hash_data, hash_model_config, hash_teacher_weights

PACKAGES = ("torch", "transformers", "peft")


def timestamp(seconds: float | None = None) -> str:
    """Local time with its UTC offset, ISO 8601 to the second (``2025-06-01T14:03:07+02:00``)."""
    moment = datetime.fromtimestamp(time.time() if seconds is None else seconds)
    return moment.astimezone().isoformat(timespec="seconds")


def versions() -> dict[str, str | None]:
    """llm-neo, Python and the libraries a result depends on (None: not installed)."""
    found: dict[str, str | None] = {"llm_neo": __version__, "python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


@functools.lru_cache(maxsize=1)
def git_checkout() -> dict[str, Any] | None:
    """The commit of the llm-neo git checkout this code runs from (an editable install), and whether its
    tracked files differ from it; None for an installed wheel or where git is missing."""
    here = Path(__file__).resolve().parent
    root = next((p for p in (here, *here.parents) if (p / ".git").exists()), None)
    if root is None or not (root / "pyproject.toml").is_file():
        return None
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        status = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if commit.returncode != 0:
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


def model_record(path: str | None) -> dict[str, Any] | None:
    """A model as given (a directory, a hub id or a .gguf), its absolute path when local, and the sha256
    of its config.json (what identifies the architecture; the weights are not hashed here)."""
    if not path:
        return None
    local = Path(path).expanduser()
    record: dict[str, Any] = {"path": path, "resolved": str(local.resolve()) if local.exists() else None}
    record["config_sha256"] = hash_model_config(path) if (local / "config.json").is_file() else None
    return record


def model_digests(path: str, *, role: str, allow_pickle_weights: bool = False) -> dict[str, str | None]:
    """The sha256 of a model's config.json and of its weight files (the teacher cache key's digests, here
    for any role: what a resumed run checks its models against). None for a part that cannot be hashed
    (a hub id with no local copy): nothing to compare, rather than a run refused for it."""
    pickle_ok = allow_pickle_weights
    digests: dict[str, str | None] = {}
    for part, digest in (
        ("config_sha256", lambda: hash_model_config(path)),
        ("weights_sha256", lambda: hash_teacher_weights(path, allow_pickle_weights=pickle_ok, role=role)),
    ):
        try:
            digests[part] = digest()
        except LlmNeoError:
            digests[part] = None
    return digests


def data_record(path: str | None) -> dict[str, Any] | None:
    """A data file or ``save_to_disk`` directory as given, its absolute path and the sha256 of its bytes
    (the teacher cache's ``data`` key: the same bytes under another name hash the same)."""
    if not path:
        return None
    local = Path(path).expanduser()
    exists = local.exists()
    return {
        "path": path,
        "resolved": str(local.resolve()) if exists else None,
        "sha256": hash_data(path) if exists else None,
    }


def provenance(
    *,
    models: dict[str, str | None],
    data: dict[str, str | None],
    started: float,
    finished: float | None = None,
) -> dict[str, Any]:
    """The provenance record: ``models`` (role -> path) and ``data`` (role -> path) as the records above,
    the versions, the llm-neo checkout, the command line, and the wall-clock start and end (``time.time()``
    seconds; the end defaults to now)."""
    return {
        "models": {role: model_record(path) for role, path in models.items()},
        "data": {role: data_record(path) for role, path in data.items()},
        "versions": versions(),
        "llm_neo_checkout": git_checkout(),
        "command": sys.argv[:],
        "host": platform.node(),
        "started": timestamp(started),
        "finished": timestamp(finished),
    }
