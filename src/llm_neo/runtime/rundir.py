"""The one output-directory check every command makes before it writes: may a run start in this
directory, continue the run there, or replace it?

    check_output_dir   what the directory holds (nothing, a file, a run of this command, other files),
                       what --resume/--overwrite and the run's options make of it: a RunDir
    check_space        warn when the directory's filesystem holds less than the command will write
    write_marker       a run's ``.llm-neo`` file: the command and the outputs it writes there
    read_marker        a directory's marker (ConfigError naming it when damaged)
    marked_outputs     what --overwrite may remove: the outputs a directory's marker lists
    check_replaced_dir export's, convert's and prune's check: their output is replaced whole, so only
                       a directory their own marker describes entirely may be replaced
    marked_directory   write such an output atomically, its marker inside before the rename

A run of a command is recognised by its marker (a path pattern the command writes there: distill's
checkpoints, compare's compare.yaml). ``check_output_dir`` first takes the directory's run lock
(runtime/lock.py) when asked, so no other process starts, resumes or cleans up there meanwhile; the
check itself is read-only, and each command words a refusal its own way (``RunDir.refusal``) or uses
``RunDir.message``. A command with runs never calls a directory holding neither ``.llm-neo`` nor
its known outputs a run, and never replaces it: those files are someone else's.

Export, convert and prune have no runs: each writes one directory, replaced whole by a rename. Their
marker is written into the temporary directory last, listing everything in it, so a completed output
always carries it and an interrupted one (a ``.NAME.*.tmp`` sibling) never is the output. Such an
output is replaced (--overwrite) only when its marker names the command and lists every file there:
a file the user added beside it, a directory without a marker, or a plain file at the path is refused,
never deleted.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from llm_neo.errors import ConfigError, OutputError
from llm_neo.runtime.atomic import atomic_directory, atomic_write_json, check_writable
from llm_neo.runtime.lock import hold as hold  # the run lock, also taken by commands directly
from llm_neo.runtime.memory import GiB

log = logging.getLogger("llm_neo")


class Holds(enum.Enum):
    """What the output directory holds before the command writes."""

    NOTHING = "nothing"  # missing or empty
    FILE = "file"  # the path is a file, not a directory
    RUN = "run"  # a run of this command (its marker is there)
    FILES = "files"  # llm-neo's files, but no run of this command
    OTHERS = "others"  # files no llm-neo command wrote (no .llm-neo marker, no known output)


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
    NOT_A_RUN = "not a run"  # files no llm-neo command wrote: --overwrite does not replace them


MARKER = ".llm-neo"  # what every run directory holds from its start: {"command", "outputs"}


@dataclass(frozen=True)
class Marker:
    """A directory's ``.llm-neo`` file: the llm-neo command that wrote there and the names it writes."""

    command: str
    outputs: tuple[str, ...]


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
    lock: str | None = None,
    known: tuple[str, ...] | None = None,
) -> RunDir:
    """What a command may do in its output directory ``path`` (given as ``flag``, e.g. ``--output``).

    ``marker``: a glob pattern relative to ``path`` whose match makes the directory a run of this
    command (None: the command has no runs to continue, so any file there is someone else's).
    ``changed(path)``: the options that differ between that run and this one (they refuse a resume).
    ``continues``: a run with the same options continues without --resume (compare, cache-teacher);
    with other options, --overwrite replaces it. Otherwise a run continues only on --resume.
    ``shown``: how the directory is named in the message (default ``path``, as given).
    ``lock``: the command, when the check should first take the directory's run lock for this process
    (ConfigError naming the holder while another process holds it).
    ``known``: glob patterns of what the command wrote before run directories had a ``.llm-neo``
    marker; given, a directory holding neither is not a run and is never replaced (None: any files
    there count as the command's to replace).
    A damaged ``.llm-neo`` there is a ConfigError naming it (``read_marker``): the check runs before any
    model loads, and nothing there can be told apart without it.
    """
    name = shown if shown is not None else str(path)
    if lock is not None:
        hold(path, lock, flag)
    holds = _holds(path, marker, known)
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
    elif holds is Holds.OTHERS:
        refusal = Refusal.NOT_A_RUN
    elif holds is not Holds.NOTHING:
        outcome = Outcome.OVERWRITE
        if not overwrite:
            refusal = Refusal.HOLDS_A_RUN if holds is Holds.RUN else Refusal.HOLDS_FILES
    if refusal is None:
        return RunDir(path, holds, outcome, changed=differ)
    message = _message(refusal, flag, name, differ)
    return RunDir(path, holds, Outcome.REFUSED, refusal, differ, message)


def _holds(path: Path, marker: str | None, known: tuple[str, ...] | None) -> Holds:
    if path.exists() and not path.is_dir():
        return Holds.FILE
    # A damaged marker is refused here, before any model loads (even alone: --overwrite reads it later).
    marked = path.is_dir() and read_marker(path) is not None
    if not path.is_dir() or not any(p.name != MARKER for p in path.iterdir()):
        return Holds.NOTHING
    if marker is not None and any(path.glob(marker)):
        return Holds.RUN
    if known is None or marked or any(any(path.glob(k)) for k in known):
        return Holds.FILES
    return Holds.OTHERS


def write_marker(path: Path, command: str, outputs: tuple[str, ...]) -> None:
    """Mark ``path`` as a run directory of ``command`` that writes ``outputs`` (names in it): what
    tells llm-neo's files from a user's there, and what --overwrite may remove."""
    atomic_write_json(path / MARKER, {"command": command, "outputs": list(outputs)})


def read_marker(path: Path) -> Marker | None:
    """The marker of directory ``path`` (None: it has none). ConfigError naming the file, and what to
    do, when it is damaged: it alone tells llm-neo's files there from a user's, so nothing is guessed."""
    file = path / MARKER
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text())
        outputs = data["outputs"]
        if not isinstance(data["command"], str) or not all(isinstance(n, str) for n in outputs):
            raise TypeError("'command' must be a name and 'outputs' a list of names")
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(
            [
                f"{file} is damaged ({err}); it lists what llm-neo wrote in {path}. Remove the outputs "
                f"you want replaced and then {file} by hand, or choose another output directory"
            ]
        ) from None
    return Marker(data["command"], tuple(outputs))


def marked_outputs(path: Path, outputs: tuple[str, ...]) -> tuple[str, ...]:
    """Of a command's ``outputs``, those that ``path``'s marker lists (all of them in a directory from
    before markers, which ``check_output_dir`` recognised by its known outputs). ConfigError naming the
    file when the marker is damaged."""
    marker = read_marker(path)
    if marker is None:
        return outputs
    return tuple(name for name in outputs if name in marker.outputs)


def check_replaced_dir(
    path: Path, command: str, *, flag: str, overwrite: bool, shown: str, record: str
) -> str | None:
    """Why ``command`` may not write its output directory ``path`` (given as ``flag``, named ``shown``),
    which it replaces whole; None when it may: nothing there, or (with ``overwrite``) an earlier output
    of ``command`` whose marker lists every file in it. ``record``: the file the command's outputs held
    before markers (export.json), named in the refusal of such an output. Read-only."""
    if path.exists() and not path.is_dir():
        return (
            f"{flag}: {shown!r} is a file; llm-neo writes a directory there and never replaces a file it "
            f"did not write, --overwrite included: choose another {flag}, or remove the file yourself"
        )
    if not path.is_dir():
        return None
    try:
        marker = read_marker(path)
    except ConfigError as err:
        return err.problems[0]
    held = sorted(p.name for p in path.iterdir() if p.name != MARKER)
    if not held:
        return None
    if marker is None:
        older = (
            f"; its {record} says an llm-neo from before output markers wrote it, but not which files "
            "there are its own"
            if (path / record).is_file()
            else ""
        )
        return (
            f"{flag}: {shown!r} is not an llm-neo output (it holds files but no {MARKER} marker{older}), "
            f"and --overwrite never replaces files llm-neo did not write: choose another {flag}, or "
            "remove it yourself"
        )
    if marker.command != command:
        return (
            f"{flag}: {shown!r} holds the outputs of llm-neo {marker.command}, not of {command}; "
            f"--overwrite does not replace them: choose another {flag}"
        )
    strangers = [name for name in held if name not in marker.outputs]
    if strangers:
        return (
            f"{flag}: {shown!r} holds files llm-neo did not write ({', '.join(strangers)}) beside its "
            f"{command} output; replacing the directory would delete them, so it is never replaced "
            f"while they are there: move them out, or choose another {flag}"
        )
    if not overwrite:
        return f"{flag}: {shown!r} already holds a {command} output; pass --overwrite to replace it"
    return None


@contextlib.contextmanager
def marked_directory(path: Path, command: str) -> Iterator[Path]:
    """``atomic_directory`` for an output ``command`` replaces whole: when the block succeeds, a marker
    listing everything written in the temporary directory is added last, before the rename, so the
    published directory always carries it and an interrupted write never leaves a marked output."""
    with atomic_directory(path) as tmp:
        yield tmp
        write_marker(tmp, command, tuple(sorted(p.name for p in tmp.iterdir() if p.name != MARKER)))


def _message(refusal: Refusal, flag: str, name: str, changed: tuple[str, ...]) -> str:
    """The plain wording of a refusal."""
    if refusal is Refusal.A_FILE:
        return f"{flag}: {name!r} is a file; give a directory"
    if refusal is Refusal.NOT_A_RUN:
        return not_a_run(flag, name)
    if refusal is Refusal.NOTHING_TO_RESUME:
        return f"--resume: {flag} {name!r} holds no run to continue; start it without --resume"
    if refusal is Refusal.CHANGED:
        return (
            f"{flag}: {name!r} holds a run made with other {', '.join(changed)}: rerun with the same "
            f"options, pass --overwrite to replace it, or choose another {flag}"
        )
    return f"{flag}: {name!r} already holds files; pass --overwrite to replace it"


def not_a_run(flag: str, name: str) -> str:
    """The refusal of a directory holding files no llm-neo command wrote (--overwrite included)."""
    return (
        f"{flag}: {name!r} is not an llm-neo run directory (it holds files but no {MARKER} marker), "
        f"and --overwrite never replaces files llm-neo did not write; choose an empty or new {flag}"
    )


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
