"""Atomic writes that fail: the error names the path, the reason and what was kept; nothing half-written
is left under a final name, and temporaries are removed then or at the next run."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch
from conftest import fill_disk
from safetensors import SafetensorError
from safetensors.torch import save_file

import llm_neo.runtime.atomic as atomic
from llm_neo.errors import LlmNeoError, OutputError
from llm_neo.runtime.atomic import (
    atomic_directory,
    atomic_write_bytes,
    check_writable,
    clean_temporaries,
    io_error,
    output_stream,
    writing,
)


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def temporaries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_a_full_disk_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "state.json"
    atomic_write_bytes(target, b"old")
    monkeypatch.setattr(atomic, "_write", no_space)
    with pytest.raises(OutputError) as info, writing(target, "the state", kept="the old state"):
        atomic_write_bytes(target, b"new")
    message = str(info.value)
    assert f"cannot write the state to {target}: no space left on the device [ENOSPC]" in message
    assert "Kept: the old state." in message and f"df -h {tmp_path}" in message
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, (OSError, LlmNeoError))
    assert target.read_bytes() == b"old"
    assert temporaries(tmp_path) == []


def test_torch_save_reports_the_failed_write_not_its_own_error(tmp_path, monkeypatch):
    # Saved to a path, torch.save reports a full disk as RuntimeError("unexpected pos ..."); through an
    # output_stream the write's OSError is what the caller sees.
    monkeypatch.setattr(atomic, "_write", no_space)
    with pytest.raises(OSError) as info, output_stream(tmp_path / "x.pt") as sink:
        torch.save({"w": torch.zeros(1000)}, sink)  # type: ignore[arg-type]
    assert info.value.errno == errno.ENOSPC


def test_a_library_that_reports_the_errno_in_its_message_is_understood(tmp_path):
    # safetensors' own words on a full disk (seen on a full tmpfs; see the tmpfs test below).
    err = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    cause = io_error(err)
    assert cause is not None and cause.errno == errno.ENOSPC
    assert io_error(RuntimeError("shapes do not match")) is None
    with pytest.raises(RuntimeError, match="shapes"), writing(tmp_path / "x", "x"):
        raise RuntimeError("shapes do not match")  # not an I/O error: passes unchanged


def test_a_failed_directory_write_leaves_the_old_directory(tmp_path, monkeypatch):
    target = tmp_path / "merged"
    with atomic_directory(target) as tmp:
        (tmp / "model.bin").write_bytes(b"v1")
    monkeypatch.setattr(atomic, "_write", no_space)
    with (
        pytest.raises(OutputError, match="no space left"),
        writing(target, "the model"),
        atomic_directory(target) as tmp,
        output_stream(tmp / "model.bin") as sink,
    ):
        sink.write(b"v2")
    assert (target / "model.bin").read_bytes() == b"v1"
    assert temporaries(tmp_path) == []


def test_leftovers_of_killed_writes_are_cleaned_at_the_next_run(tmp_path):
    (tmp_path / ".summary.json.k2j4h5g1.tmp").write_text("half")
    (tmp_path / ".step-000004.a1b2c3d4.tmp").mkdir()
    (tmp_path / ".step-000004.a1b2c3d4.tmp" / "optimizer.pt").write_text("half")
    # Killed between atomic_directory's two renames: the old version is all there is.
    (tmp_path / ".merged.old").mkdir()
    (tmp_path / ".merged.old" / "model.safetensors").write_text("v1")
    (tmp_path / ".adapter.old").mkdir()  # ... or the new one is in place already
    (tmp_path / "adapter").mkdir()
    (tmp_path / "keep.txt").write_text("mine")
    (tmp_path / ".hidden.tmp").write_text("not one of ours")  # no random part: not a temporary
    removed = clean_temporaries(tmp_path)
    assert len(removed) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden.tmp", "adapter", "keep.txt", "merged"]
    assert (tmp_path / "merged" / "model.safetensors").read_text() == "v1"


def test_an_output_path_that_cannot_be_written_is_refused_before_any_work(tmp_path, monkeypatch):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(OutputError, match=r"--output-dir .*file: it is a file, not a directory"):
        check_writable(a_file, "--output-dir")
    with pytest.raises(OutputError, match=r"file is a file, not a directory"):
        check_writable(a_file / "run", "--output-dir")
    # Root may write anywhere whatever the mode bits say, so the permission check is faked (os.access);
    # test_a_read_only_filesystem_is_refused below uses a real read-only mount.
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == tmp_path else real(p, mode))
    with pytest.raises(OutputError, match=r"is not writable \(permission denied\); nothing was written"):
        check_writable(tmp_path / "runs" / "neo", "--output-dir")
    monkeypatch.undo()
    check_writable(tmp_path / "runs" / "neo", "--output-dir")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # the probe left nothing


def test_a_read_only_filesystem_is_refused(tmpfs):
    mount = tmpfs("1m", read_only=True)
    with pytest.raises(OutputError, match="is on a read-only filesystem") as info:
        check_writable(mount / "run", "--output-dir")
    assert info.value.errno == errno.EROFS


def test_a_really_full_filesystem_is_named_for_every_writer(tmpfs):
    """Real ENOSPC from the libraries' own writers (safetensors in Rust, torch.save in C++)."""
    mount = tmpfs("1m")
    filler = fill_disk(mount)
    tensors = {"w": torch.zeros(4096)}

    def with_safetensors(tmp: Path) -> None:
        save_file(tensors, str(tmp / "w.safetensors"))

    def with_torch(tmp: Path) -> None:
        with output_stream(tmp / "w.pt") as sink:
            torch.save(tensors, sink)  # type: ignore[arg-type]

    def with_bytes(tmp: Path) -> None:
        atomic_write_bytes(tmp / "w.bin", b"\0" * 65536)

    for write in (with_safetensors, with_torch, with_bytes):
        with (
            pytest.raises(OutputError, match="no space left on the device") as info,
            writing(mount / "ckpt", "a checkpoint"),
            atomic_directory(mount / "ckpt") as tmp,
        ):
            write(tmp)
        assert info.value.errno == errno.ENOSPC, write.__name__
        assert sorted(p.name for p in mount.iterdir()) == ["filler"], write.__name__
    filler.unlink()


@pytest.fixture()
def umask_027():
    """Run under umask 027 (group may read, others nothing), restored afterwards."""
    old = os.umask(0o027)
    yield
    os.umask(old)


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_atomic_writes_end_with_the_mode_of_an_ordinary_write(tmp_path, umask_027):
    ordinary = tmp_path / "ordinary.txt"
    ordinary.write_text("x")
    (tmp_path / "ordinary-dir").mkdir()
    assert (mode(ordinary), mode(tmp_path / "ordinary-dir")) == (0o640, 0o750)

    atomic_write_bytes(tmp_path / "new.json", b"{}")
    atomic_write_bytes(tmp_path / "new.json", b"{}")  # replacing keeps it so
    with atomic_directory(tmp_path / "model") as tmp:
        save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))
        with output_stream(tmp / "optimizer.pt") as sink:
            sink.write(b"state")
    assert mode(tmp_path / "new.json") == mode(ordinary)
    assert mode(tmp_path / "model") == 0o750
    assert mode(tmp_path / "model" / "model.safetensors") == mode(ordinary)
    assert mode(tmp_path / "model" / "optimizer.pt") == mode(ordinary)


def test_a_permissive_umask_gives_world_readable_outputs(tmp_path):
    old = os.umask(0o002)
    try:
        atomic_write_bytes(tmp_path / "summary.json", b"{}")
        with atomic_directory(tmp_path / "merged") as tmp:
            (tmp / "config.json").write_text("{}")
    finally:
        os.umask(old)
    assert mode(tmp_path / "summary.json") == 0o664
    assert mode(tmp_path / "merged") == 0o775
