"""The run lock: one process per output directory, the holder named, a dead holder's lock taken over."""

import errno
import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from llm_neo.errors import ConfigError
from llm_neo.runtime import lock
from llm_neo.runtime.lock import hold, lock_file, release, releases_locks

# A second process that takes the lock of argv[1], says so, and holds it until its stdin closes.
HOLDER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from llm_neo.runtime.lock import hold
    sys.argv = ["llm-neo", "distill", "--output-dir", sys.argv[1]]
    hold(Path(sys.argv[3]), "distill", "--output-dir")
    print("held", flush=True)
    sys.stdin.read()
    """
)


def start_holder(out):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline() == "held\n"
    return holder


def test_a_second_process_is_refused_naming_the_holder_and_free_after_it(tmp_path):
    out = tmp_path / "run"
    holder = start_holder(out)
    try:
        with pytest.raises(ConfigError) as refused:
            hold(out, "distill", "--output-dir")
        message = str(refused.value)
        assert f"--output-dir {out} is in use by another llm-neo run (pid {holder.pid} on " in message
        assert socket.gethostname() in message and f"llm-neo distill --output-dir {out}" in message
        assert "wait for it to finish or stop it, or choose another output directory" in message
    finally:
        holder.stdin.close()
        assert holder.wait(timeout=30) == 0
    assert not lock_file(out).exists()  # released on exit, its record removed
    hold(out, "distill", "--output-dir")  # free now
    release(out)


def test_a_lock_left_by_a_killed_process_is_taken_over_with_a_note(tmp_path, caplog):
    out = tmp_path / "run"
    holder = start_holder(out)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    assert json.loads(lock_file(out).read_text())["pid"] == holder.pid  # what kill -9 leaves
    with caplog.at_level(logging.WARNING, logger="llm_neo"):
        hold(out, "distill", "--output-dir")
    try:
        note = f"taking over the lock of a run that stopped without releasing it (pid {holder.pid} "
        assert note in caplog.text
        assert json.loads(lock_file(out).read_text())["pid"] == os.getpid()
    finally:
        release(out)


def test_a_command_releases_its_locks_when_it_raises_and_takes_its_own_again(tmp_path):
    out, inner = tmp_path / "sweep", tmp_path / "sweep" / "trials" / "t1"

    @releases_locks
    def command():
        hold(out, "sweep", "--output")
        hold(out, "sweep", "--output")  # taken again by the same process: no refusal
        nested()
        assert lock_file(inner).exists() is False  # the nested command released its own
        raise RuntimeError("boom")

    @releases_locks
    def nested():
        hold(inner, "distill", "--output-dir")
        assert lock_file(inner).exists()

    with pytest.raises(RuntimeError):
        command()
    assert not lock_file(out).exists() and not lock.held_directories()


def test_without_locks_on_the_filesystem_the_record_decides(tmp_path, monkeypatch):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    out = tmp_path / "run"
    holder = start_holder(out)  # a live process on this host, recorded in the lock file
    monkeypatch.setattr(fcntl, "flock", no_locks)
    try:
        with pytest.raises(ConfigError, match=f"in use by another llm-neo run \\(pid {holder.pid} "):
            hold(out, "distill", "--output-dir")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    hold(out, "distill", "--output-dir")  # its holder is dead: taken over
    release(out)
