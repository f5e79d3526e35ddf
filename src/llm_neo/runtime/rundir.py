"""The one output-directory check every command makes before it writes: may a run start in this
directory, continue the run there, or replace it?

    check_output_dir   what the directory holds (nothing, a file, a run of this command, other files),
                       what --resume/--overwrite and the run's options make of it: a RunDir
    check_space        warn when the directory's filesystem holds less than the command will write

A run of a command is recognised by its marker (a path pattern the command writes there: distill's
checkpoints, compare's compare.yaml); the run lock and the llm-neo marker of "Nothing lost, nothing
mixed" belong in ``check_output_dir``, the one place every command passes through. The check is
read-only; each command words a refusal its own way (``RunDir.refusal``) or uses ``RunDir.message``.
"""

from __future__ import annotations

import enum
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from llm_neo.errors import OutputError
from llm_neo.runtime.atomic import check_writable
from llm_neo.runtime.memory import GiB

log = logging.getLogger("llm_neo")


class Holds(enum.Enum):
    """What the output directory holds before the command writes."""

    NOTHING = "nothing"  # missing or empty
    FILE = "file"  # the path is a file, not a directory
    RUN = "run"  # a run of this command (its marker is there)
    FILES = "files"  # files, but no run of this command


class Outcome(enum.Enum):
    """What the command does with the directory."""

    NEW = "new"  # nothing there: start
    RESUME = "resume"  # continue the run there
    OVERWRITE = "overwrite"  # replace what is there
    REFUSED = "refused"


class Refusal(enum.Enum):
    """Why the command may not write there."""

    A_FILE = "a file"
    HOLDS_FILES = "holds files"  # not a run of this command; --overwrite replaces them
    HOLDS_A_RUN = "holds a run"  # --resume continues it, --overwrite replaces it
    CHANGED = "changed"  # the run there was made with other options
    NOTHING_TO_RESUME = "nothing to resume"  # --resume, but no run of this command there


@dataclass(frozen=True)
class RunDir:
    """The check's answer: what ``path`` holds and what the command does with it."""

    path: Path
    holds: Holds
    outcome: Outcome
    refusal: Refusal | None = None  # set when outcome is REFUSED
    changed: tuple[str, ...] = ()  # the options that differ from the run there
    message: str | None = None  # a refusal in words that name the directory and the flag to pass


def check_output_dir(
    path: Path,
    *,
    flag: str,
    overwrite: bool,
    resume: bool = False,
    marker: str | None = None,
    changed: Callable[[Path], list[str]] | None = None,
    continues: bool = False,
    shown: str | None = None,
) -> RunDir:
    """What a command may do in its output directory ``path`` (given as ``flag``, e.g. ``--output``).

    ``marker``: a glob pattern relative to ``path`` whose match makes the directory a run of this
    command (None: the command has no runs to continue, so any file there is someone else's).
    ``changed(path)``: the options that differ between that run and this one (they refuse a resume).
    ``continues``: a run with the same options continues without --resume (compare, cache-teacher);
    with other options, --overwrite replaces it. Otherwise a run continues only on --resume.
    ``shown``: how the directory is named in the message (default ``path``, as given).
    """
    name = shown if shown is not None else str(path)
    holds = _holds(path, marker)
    differ = tuple(changed(path)) if changed is not None and holds is Holds.RUN else ()
    refusal: Refusal | None = None
    outcome = Outcome.NEW
    if holds is Holds.FILE:
        refusal = Refusal.A_FILE
    elif holds is Holds.RUN and (resume or continues):
        if not differ:
            outcome = Outcome.RESUME
        elif overwrite and not resume:
            outcome = Outcome.OVERWRITE
        else:
            refusal = Refusal.CHANGED
    elif resume:
        refusal = Refusal.NOTHING_TO_RESUME
    elif holds is not Holds.NOTHING:
        outcome = Outcome.OVERWRITE
        if not overwrite:
            refusal = Refusal.HOLDS_A_RUN if holds is Holds.RUN else Refusal.HOLDS_FILES
    if refusal is None:
        return RunDir(path, holds, outcome, changed=differ)
    message = _message(refusal, flag, name, differ)
    return RunDir(path, holds, Outcome.REFUSED, refusal, differ, message)


def _holds(path: Path, marker: str | None) -> Holds:
    if path.exists() and not path.is_dir():
        return Holds.FILE
    if not path.is_dir() or not any(path.iterdir()):
        return Holds.NOTHING
    if marker is not None and any(path.glob(marker)):
        return Holds.RUN
    return Holds.FILES


def _message(refusal: Refusal, flag: str, name: str, changed: tuple[str, ...]) -> str:
    """The plain wording of a refusal (prune's, convert's and export's)."""
    if refusal is Refusal.A_FILE:
        return f"{flag}: {name!r} is a file; give a directory"
    if refusal is Refusal.NOTHING_TO_RESUME:
        return f"--resume: {flag} {name!r} holds no run to continue; start it without --resume"
    if refusal is Refusal.CHANGED:
        return (
            f"{flag}: {name!r} holds a run made with other {', '.join(changed)}: rerun with the same "
            f"options, pass --overwrite to replace it, or choose another {flag}"
        )
    return f"{flag}: {name!r} already holds files; pass --overwrite to replace it"


def check_space(path: Path, needs: dict[str, int]) -> None:
    """Warn when the filesystem of ``path`` (an existing directory) has less free space than the
    command writes there (``needs``: bytes by what writes them). An estimate: the write itself reports
    a full disk precisely."""
    needed = sum(needs.values())
    free = shutil.disk_usage(path).free
    if free < needed:
        parts = ", ".join(f"{what} {size / GiB:.2f} GiB" for what, size in needs.items())
        log.warning(
            "only %.2f GiB free on the filesystem of %s; this run writes up to about %.2f GiB there (%s)",
            free / GiB,
            path,
            needed / GiB,
            parts,
        )


def output_path_problems(path: Path, flag: str) -> list[str]:
    """Why ``path`` (given as ``flag``) cannot be written, in words for a ConfigError: a symbolic link
    to nothing (itself or a parent), a parent that is a file, an unwritable or read-only directory
    (``atomic.check_writable``); [] when it can. A path that is a file is left to ``check_output_dir``,
    which words it. Read at validation, so it is refused before any model loads."""
    if path.exists() and not path.is_dir():
        return []
    try:
        check_writable(path, flag)
    except OutputError as err:
        return [str(err)]
    return []
