"""Atomic writes: a crash or kill leaves either the old file/directory or the new one, never half.

Files are written next to their destination, flushed, fsynced and renamed over it (rename is atomic
on POSIX within one filesystem). Directories are built under a temporary name, their files fsynced,
and renamed into place. A write killed half-way leaves its temporary (``.NAME.PID-START@HOST.XXXXXXXX.tmp``:
the name says which process wrote it) behind; ``clean_temporaries`` removes those whose writer is gone at
the next run and before each write of that output, and no reader ever takes one for the real thing.

Failed writes are reported, not just raised: ``writing(path, what, kept)`` turns an I/O failure of
any library inside it (an OSError; safetensors' "os error 28"; torch.save's "unexpected pos", whose
cause ``output_stream`` keeps) into an ``OutputError`` that names the path, what was being written,
the reason (no space, read-only, a file where a directory must be, a vanished directory), what was
kept and what to do. ``check_writable`` refuses an unwritable output path before any work starts.

Permissions. What these functions publish has the mode an ordinary ``open(path, "w")`` or ``mkdir``
would give it under the process's umask (0644 / 0755 under the usual 022), not the 0600 / 0700 of the
``mkstemp`` / ``mkdtemp`` temporaries: teammates on a shared server must be able to read the results
and load the model.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from llm_neo.errors import OutputError

log = logging.getLogger("llm_neo")

# mkstemp/mkdtemp names: ``.NAME.`` and the writer (``PID-START@HOST.``: see ``temporary_prefix``),
# eight random characters of [a-z0-9_], ``.tmp``. Names written before the writer was part of them
# have none.
_TEMPORARY = re.compile(
    r"^\.(?P<name>.+?)(?:\.(?P<pid>\d+)-(?P<start>\d+)@(?P<host>[A-Za-z0-9-]+))?\.[A-Za-z0-9_]{8}\.tmp$"
)
# A temporary of a writer on another host is taken for abandoned only when nothing in it changed for
# this long: its process cannot be asked, and a live export writes its file continuously.
FOREIGN_STALE_AFTER_S = 24 * 3600
_OLD = re.compile(r"^\.(?P<name>.+)\.old$")

REASONS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exhausted",
    errno.EROFS: "the filesystem is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENOTDIR: "a part of the path is a file, not a directory",
    errno.EISDIR: "it is a directory",
    errno.ENOENT: "the directory vanished (deleted or unmounted while the run was writing?)",
    errno.EIO: "the device reported an I/O error",
    errno.EFBIG: "the file is larger than the filesystem allows",
}
FIXES = {
    errno.ENOSPC: "free space there (df -h {dir}) or choose another output directory",
    errno.EDQUOT: "free space within your quota or choose another output directory",
    errno.EROFS: "remount it read-write or choose another output directory",
    errno.EACCES: "fix the directory's permissions or choose another output directory",
    errno.EPERM: "fix the directory's permissions or choose another output directory",
    errno.ENOTDIR: "remove or rename the file, or choose another output directory",
    errno.ENOENT: "check the disk is mounted and choose an existing output directory",
    errno.EIO: "check the device (dmesg) or choose another output directory",
}


def current_umask() -> int:
    """The process's umask. Read from /proc where Linux offers it (no change to the process state);
    elsewhere set and restored at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def ordinary_mode(directory: bool = False) -> int:
    """The mode an ordinary write creates under the current umask: 0666 (files) or 0777 (directories)
    less the umask."""
    return (0o777 if directory else 0o666) & ~current_umask()


def _write(fd: int, data: bytes | bytearray | memoryview) -> None:
    """Write all of ``data`` to ``fd``: every byte llm-neo writes itself goes through here."""
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view) :]


class Sink:
    """A write-only binary file object over a descriptor. Remembers the OSError of a failed write, which
    some libraries replace by their own error (torch.save reports ENOSPC as RuntimeError "unexpected
    pos ..."): ``output_stream`` raises the OSError instead."""

    def __init__(self, fd: int):
        self.fd = fd
        self.error: OSError | None = None

    def write(self, data: bytes | bytearray | memoryview) -> int:
        try:
            _write(self.fd, data)
        except OSError as err:
            self.error = err
            raise
        return memoryview(data).nbytes

    def flush(self) -> None:
        pass


@contextlib.contextmanager
def output_stream(path: Path) -> Iterator[Sink]:
    """A new binary file at ``path`` (not atomic by itself: write it inside ``atomic_directory``, or use
    ``atomic_write_bytes``), fsynced when the block succeeds. An error raised because a write failed is
    replaced by that write's OSError (chained to it)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)  # less the umask, as open() does
    sink = Sink(fd)
    try:
        yield sink
        os.fsync(fd)
    except Exception as err:
        if sink.error is not None and err is not sink.error:
            raise sink.error from err
        raise
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_temporaries(path.parent, name=path.name)  # what a killed write of this file left
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temporary_prefix(path.name), suffix=".tmp")
    try:
        os.fchmod(fd, ordinary_mode())  # mkstemp's 0600 would be what the final file keeps
    finally:
        os.close(fd)
    try:
        with output_stream(Path(tmp)) as sink:
            sink.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def remove_outputs(out: Path, names: Iterable[str]) -> None:
    """Delete the named files and directories of an earlier run from ``out`` (nothing else there), then
    make sure ``out`` exists: what a run that replaces its predecessor's outputs does first."""
    for name in names:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    out.mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def atomic_directory(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success its files are fsynced and it replaces ``path``
    in one rename.

    An existing ``path`` is moved aside first (``.NAME.old``) and deleted only after the new one is in
    place, so at every instant one complete version exists on disk (``clean_temporaries`` puts the old
    one back if a kill lands between the two renames).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_temporaries(path.parent, name=path.name)  # a killed export's partial GGUF: gigabytes
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=temporary_prefix(path.name), suffix=".tmp"))
    # mkdtemp makes the directory private (0700); a model directory should be as readable as any other.
    os.chmod(tmp, ordinary_mode(directory=True))
    try:
        yield tmp
        _ordinary_modes(tmp)
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _ordinary_modes(root: Path) -> None:
    """Give every file and directory under ``root`` the mode an ordinary write would: libraries that
    write through a private temporary (safetensors' ``save_file`` leaves 0600) would otherwise publish
    files nobody else can read. An executable file stays executable (0777 less the umask)."""
    files, directories = ordinary_mode(), ordinary_mode(directory=True)
    for directory, subdirectories, names in os.walk(root):
        for name in subdirectories:
            os.chmod(os.path.join(directory, name), directories)
        for name in names:
            path = os.path.join(directory, name)
            if not os.path.islink(path):
                os.chmod(path, directories if os.stat(path).st_mode & 0o111 else files)


def _fsync_tree(root: Path) -> None:
    """Flush every file under ``root`` to the device, so the rename never publishes unwritten data."""
    for directory, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(directory, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(root)


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform or filesystem can fsync a directory
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def temporary_prefix(name: str) -> str:
    """``.NAME.PID-START@HOST.``: the start of a temporary's name for output ``name``, naming the process
    that writes it (its pid, the pid's start time, the host), so a later run can tell a live write from
    a killed one (``writer_alive``). The start time tells a reused pid (a container's pid 1) apart."""
    return f".{name}.{os.getpid()}-{_process_start(os.getpid())}@{_host()}."


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname().split(".")[0]) or "host"


def _process_start(pid: int) -> int:
    """When process ``pid`` started (clock ticks since boot, /proc/PID/stat's 22nd field); 0 where
    there is no /proc (the pid alone is then compared)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError):
        return 0


def _last_change(entry: Path) -> float:
    """The newest modification time of ``entry`` and (a directory) anything in it."""
    newest = entry.lstat().st_mtime
    if entry.is_dir() and not entry.is_symlink():
        for directory, _, names in os.walk(entry):
            for name in names:
                with contextlib.suppress(OSError):
                    newest = max(newest, os.lstat(os.path.join(directory, name)).st_mtime)
    return newest


def writer_alive(entry: Path) -> bool:
    """Whether a live process may still be writing the temporary ``entry``: its writer (named in the
    name) runs on this host with the same start time; or it is on another host and something in it
    changed within ``FOREIGN_STALE_AFTER_S``. A name without a writer (an older llm-neo's) is taken for
    abandoned, as it always was."""
    m = _TEMPORARY.match(entry.name)
    if m is None or m.group("pid") is None:
        return False
    if m.group("host") != _host():
        return time.time() - _last_change(entry) < FOREIGN_STALE_AFTER_S
    pid, start = int(m.group("pid")), int(m.group("start"))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's live process
    return start == 0 or _process_start(pid) in (0, start)


def clean_temporaries(directory: Path, name: str | None = None) -> list[str]:
    """Remove what interrupted atomic writes left in ``directory`` (not below it): temporary files and
    directories ``.NAME.*.tmp`` whose writer is gone (``writer_alive``: a live one is kept), and
    ``.NAME.old`` (moved back to ``NAME`` if that is missing: a kill between atomic_directory's two
    renames). With ``name``, only that output's. Returns the names it removed or restored."""
    if not directory.is_dir():
        return []
    done = []
    for entry in sorted(directory.iterdir()):
        if (m := _TEMPORARY.match(entry.name)) and name in (None, m.group("name")):
            if writer_alive(entry):
                log.info("kept %s: a live process (pid %s on %s) is writing it", entry, m["pid"], m["host"])
                continue
            with contextlib.suppress(FileNotFoundError):  # removed meanwhile by another cleaner
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            log.info("removed %s, left by an interrupted write", entry)
            done.append(entry.name)
        elif (m := _OLD.match(entry.name)) and entry.is_dir() and name in (None, m.group("name")):
            final = directory / m.group("name")
            if final.exists():
                shutil.rmtree(entry)
            else:
                os.replace(entry, final)
            done.append(entry.name)
    return done


# ----------------------------------------------------------------------------------------------------
# Failed writes, reported


def io_error(err: BaseException) -> OSError | None:
    """The OSError behind ``err``: itself, one in its cause/context chain, or one a library reported
    only in its message (safetensors: "I/O error: No space left on device (os error 28)")."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno is not None:
            return current
        if m := re.search(r"os error (\d+)", str(current)):
            code = int(m.group(1))
            return OSError(code, os.strerror(code))
        current = current.__cause__ or current.__context__
    return None


def output_error(path: Path, what: str, cause: OSError, kept: str = "") -> OutputError:
    """The OutputError for ``cause`` while writing ``what`` to ``path``: names the path, the reason,
    the file that failed (when another), what was kept and what to do."""
    code = cause.errno
    reason = REASONS.get(code, cause.strerror or str(cause)) if code is not None else str(cause)
    detail = f" (writing {cause.filename})" if cause.filename and str(cause.filename) != str(path) else ""
    if code == errno.ENOTDIR:
        blocker = _nearest_existing(path)
        if not blocker.is_dir():
            detail = f" ({blocker} is a file)"
    name = errno.errorcode.get(code, "") if code is not None else ""
    message = f"cannot write {what} to {path}: {reason}{f' [{name}]' if name else ''}{detail}."
    if kept:
        message += f" Kept: {kept}."
    fix = FIXES.get(code) if code is not None else None
    if fix:
        message += " To go on: " + fix.format(dir=_nearest_existing(path)) + "."
    return OutputError(message, path=str(path), errno=code)


@contextlib.contextmanager
def writing(path: Path, what: str, kept: str | Callable[[], str] = "") -> Iterator[None]:
    """Turn an I/O failure inside the block into an ``OutputError`` (see ``output_error``); ``kept``
    says what is still intact (a callable is asked only on failure). Other errors pass unchanged, and
    so does an OutputError raised inside (the innermost block knows best what it was writing)."""
    try:
        yield
    except OutputError:
        raise
    except Exception as err:
        cause = io_error(err)
        if cause is None:
            raise
        raise output_error(path, what, cause, kept() if callable(kept) else kept) from err


def _nearest_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (as a file or a directory)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(path: Path, what: str) -> None:
    """Refuse, before any work starts, an output directory that cannot be written: a file where it or
    one of its parents must be a directory, or a read-only, unwritable nearest existing directory.
    Leaves nothing behind (a probe file is created and removed there)."""
    _refuse_dangling_link(path, what)
    existing = _nearest_existing(path)
    if not existing.is_dir():
        where = "it is a file" if existing == Path(os.path.abspath(path)) else f"{existing} is a file"
        raise OutputError(
            f"{what} {path}: {where}, not a directory. Remove or rename it, or choose another path.",
            path=str(path),
            errno=errno.ENOTDIR,
        )
    read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY) if hasattr(os, "statvfs") else False
    if read_only or not os.access(existing, os.W_OK | os.X_OK):
        reason = "is on a read-only filesystem" if read_only else "is not writable (permission denied)"
        raise OutputError(
            f"{what} {path}: {existing} {reason}; nothing was written. Choose a writable directory"
            f"{' or remount it read-write' if read_only else ' or fix its permissions'}.",
            path=str(path),
            errno=errno.EROFS if read_only else errno.EACCES,
        )
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".llm-neo-probe.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise output_error(path, what, err, "nothing was written") from err


def _refuse_dangling_link(path: Path, what: str) -> None:
    """Refuse ``path`` when it or one of its parents is a symbolic link to nothing (a moved or unmounted
    target): ``exists()`` calls it missing, so the first ``mkdir`` would raise a bare FileExistsError."""
    absolute = Path(os.path.abspath(path))
    for part in (absolute, *absolute.parents):
        if part.is_symlink() and not part.exists():
            target = os.readlink(part)
            where = "it" if part == absolute else str(part)
            raise OutputError(
                f"{what} {path}: {where} is a symbolic link to {target}, which does not exist (a moved or "
                "unmounted target?); nothing was written. Create the target, remove the link, or choose "
                "another path.",
                path=str(path),
                errno=errno.ENOENT,
            )
