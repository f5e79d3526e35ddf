"""File records (size + sha256) and state files with a checksum and a backup."""

from __future__ import annotations

import hashlib
import json
import logging

import pytest

from llm_neo.errors import StateFileError
from llm_neo.runtime.integrity import backup_path, check_file, file_record, read_state, write_state


def test_a_file_record_tells_every_kind_of_damage(tmp_path):
    path = tmp_path / "optimizer.pt"
    data = bytes(range(256)) * 100
    path.write_bytes(data)
    record = file_record(path)
    assert record == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert check_file(path, record) is None

    path.write_bytes(data[:-1])
    assert check_file(path, record) == f"{len(data) - 1} bytes, {len(data)} were written (truncated)"
    path.write_bytes(data + b"x")
    assert "longer than written" in str(check_file(path, record))
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(flipped))
    assert check_file(path, record, checksum=False) is None  # same size: only the checksum sees it
    assert "sha256 differs" in str(check_file(path, record))
    path.unlink()
    assert check_file(path, record) == "missing"


def test_a_state_file_carries_its_checksum_and_keeps_its_previous_version(tmp_path):
    path = tmp_path / "sweep.json"
    write_state(path, {"trials": [{"id": "t000", "status": "pending"}], "lr": 2e-4})
    write_state(path, {"trials": [{"id": "t000", "status": "done"}], "lr": 2e-4})
    assert read_state(path, what="state", fix="x") == {
        "trials": [{"id": "t000", "status": "done"}],
        "lr": 2e-4,
    }
    assert json.loads(backup_path(path).read_text())["trials"][0]["status"] == "pending"
    assert "checksum" in json.loads(path.read_text())


def test_a_damaged_state_file_falls_back_to_its_backup(tmp_path, caplog):
    path = tmp_path / "sweep.json"
    write_state(path, {"step": 1})
    write_state(path, {"step": 2})
    # Still valid JSON, but not what was written: only the checksum can tell.
    path.write_text(path.read_text().replace('"step": 2', '"step": 3'))
    with caplog.at_level(logging.WARNING, logger="llm_neo"):
        assert read_state(path, what="the sweep's state", fix="start again") == {"step": 1}
    assert "checksum does not match" in caplog.text and str(backup_path(path)) in caplog.text
    # A damaged file is not made the backup of the next write: the good backup stays.
    write_state(path, {"step": 2})
    assert read_state(backup_path(path), what="backup", fix="x") == {"step": 1}


def test_a_state_file_and_backup_both_damaged_stop_with_both_named(tmp_path):
    path = tmp_path / "sweep.json"
    write_state(path, {"step": 1})
    write_state(path, {"step": 2})
    path.write_text(path.read_text()[:10])  # truncated
    backup_path(path).write_text("{}" + backup_path(path).read_text())
    with pytest.raises(StateFileError) as info:
        read_state(path, what="the sweep's state", fix="start the sweep again with --overwrite")
    message = str(info.value)
    assert str(path) in message and str(backup_path(path)) in message and "not valid JSON" in message
    assert message.endswith("start the sweep again with --overwrite")


def test_a_state_file_written_before_checksums_is_read_as_is(tmp_path):
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps({"version": 1, "trials": []}))
    assert read_state(path, what="state", fix="x") == {"version": 1, "trials": []}
