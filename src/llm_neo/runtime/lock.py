"""One process per output directory: the run lock every writing command takes before it writes.

    hold          take the lock of an output directory (refused at once, naming the holder, while
                  another live process holds it); held until the enclosing ``releases_locks`` call ends
                  or the process exits
    releases_locks  a command function's decorator: the locks taken during its call are released when
                  it returns or raises (RunStopped included)

The lock is ``fcntl.flock`` on a file beside the directory, ``.NAME.llm-neo-lock`` (beside, not in it:
export, convert and prune replace their output directory whole by a rename). The kernel drops a flock
when its process dies, however it dies, so a lock left by a killed run is simply free; the holder
record in the file (pid, host, start time, command line) names the holder in a refusal, and a record
found in a free lock file is the note that a run died holding the directory. On NFS, Linux implements
flock with POSIX byte-range locks that the server arbitrates (NFSv4, or v3 with lockd), so two nodes
exclude each other (not under the ``nolock`` or ``local_lock`` mount options, which keep locks on the
node); Lustre does so when mounted with ``flock`` (``localflock``: per node only). A filesystem that
offers no locks at all (flock fails: Lustre's ``noflock``) falls back to the record: refused while it
names a live process on this host, taken over otherwise; nodes are then not kept apart.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import errno
import fcntl
import functools
import json
import logging
import os
import shlex
import socket
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

from llm_neo.errors import ConfigError, OutputError
from llm_neo.runtime.atomic import check_writable

log = logging.getLogger("llm_neo")

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Holder:
    """Who holds an output directory: what a refusal and a take-over note name."""

    pid: int
    host: str
    started: str  # ISO 8601, UTC
    command: str

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, started {self.started}: {self.command}"


@dataclass
class _Held:
    path: Path  # the lock file
    fd: int


_held: dict[Path, _Held] = {}  # by output directory (resolved)
_scopes: list[list[Path]] = []  # the directories each running ``releases_locks`` call took


def lock_file(directory: Path) -> Path:
    """The lock file of an output directory: beside it, so replacing the directory keeps the lock."""
    resolved = directory.expanduser().resolve()
    return resolved.parent / f".{resolved.name}.llm-neo-lock"


def hold(directory: Path, command: str, flag: str) -> None:
    """Take the lock of ``directory`` (the output of ``command``, given as ``flag``) for this process.

    ConfigError at once when another live process holds it, naming that process. Taking a lock this
    process already holds is a no-op (a sweep's trials, a comparison's arms). A lock left by a dead run
    is taken over with a warning naming it. A path that cannot be written (a dangling link, a file
    where a directory must be, a read-only or unwritable place: ``atomic.check_writable``) is a
    ConfigError too, raised before anything is created beside it: every command that writes takes its
    lock before any model loads, so this is where each refuses such a path, all with exit 2.
    """
    key = directory.expanduser().resolve()
    if key in _held:
        return
    try:
        check_writable(directory, flag)
    except OutputError as err:  # the path given is wrong: a configuration problem, as validation's are
        raise ConfigError([str(err)]) from None
    path = lock_file(directory)
    while True:
        fd = _open(path, directory, flag)
        try:
            previous = _lock(fd, path)
        except ConfigError as refusal:
            os.close(fd)
            raise ConfigError([f"{flag} {directory} {refusal.problems[0]}"]) from None
        if _same_file(fd, path):
            break
        os.close(fd)  # a releasing holder removed the file between our open and lock: lock the new one
    if previous is not None:
        log.warning(
            "%s %s: taking over the lock of a run that stopped without releasing it (%s)",
            flag,
            directory,
            previous.describe(),
        )
    me = Holder(os.getpid(), socket.gethostname(), _now(), _command_line(command))
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(asdict(me)).encode(), 0)
    _held[key] = _Held(path, fd)
    if _scopes:
        _scopes[-1].append(key)


def held_directories() -> list[Path]:
    """The output directories whose lock this process holds."""
    return list(_held)


def release(directory: Path) -> None:
    """Give up the lock of ``directory`` (nothing when this process does not hold it)."""
    held = _held.pop(directory.expanduser().resolve(), None)
    if held is None:
        return
    with contextlib.suppress(OSError):
        held.path.unlink()  # while still locked: nobody can take a file that is about to vanish
    os.close(held.fd)


def releases_locks(command: F) -> F:
    """Decorate a command function: every lock taken during its call is released when it ends."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _scopes.append([])
        try:
            return command(*args, **kwargs)
        finally:
            for directory in _scopes.pop():
                release(directory)

    return wrapper  # type: ignore[return-value]


@atexit.register
def _release_all() -> None:
    for directory in list(_held):
        release(directory)


def _open(path: Path, directory: Path, flag: str) -> int:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:  # a read-only or unwritable place: nothing could be written there anyway
        raise ConfigError(
            [
                f"{flag} {directory}: cannot create its lock file {path} ({err.strerror}); choose a "
                f"writable {flag}"
            ]
        ) from None


def _lock(fd: int, path: Path) -> Holder | None:
    """Lock ``fd``; the holder record a dead run left there (None: none). ConfigError naming the
    holder when a live process holds it."""
    previous = _read_holder(fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        who = previous.describe() if previous else "a process that has not written its record yet"
        raise ConfigError(
            [
                f"is in use by another llm-neo run ({who}); wait for it to finish or stop it, or choose "
                "another output directory"
            ]
        ) from None
    except OSError as err:
        if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
        # No locks on this filesystem: the record decides, for runs on this host.
        if previous and previous.host == socket.gethostname() and _alive(previous.pid):
            raise ConfigError([f"is in use by another llm-neo run ({previous.describe()})"]) from None
    return previous if previous and previous.pid != os.getpid() else None


def _read_holder(fd: int) -> Holder | None:
    try:
        data = json.loads(os.pread(fd, 65536, 0) or b"null")
        return Holder(int(data["pid"]), str(data["host"]), str(data["started"]), str(data["command"]))
    except (ValueError, TypeError, KeyError):
        return None  # empty (a new lock file) or torn (its writer died mid-write)


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == path.stat().st_ino
    except FileNotFoundError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _command_line(command: str) -> str:
    """The holder's command line as its user typed it (``llm-neo distill ...``)."""
    args = sys.argv[1:]
    if Path(sys.argv[0]).name in ("llm-neo", "__main__.py") and args:
        return shlex.join(["llm-neo", *args])
    return f"llm-neo {command} ({shlex.join(sys.argv)})"
