"""Checkpoints that are damaged, incomplete or cannot be written: each file is checked against the
manifest, a resume falls back to the newest intact checkpoint, a failed write keeps the previous one."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import damage, fill_disk

import llm_neo.runtime.atomic as atomic
from llm_neo.errors import CheckpointError, OutputError
from llm_neo.runtime.checkpoint import (
    FILES,
    MANIFEST,
    Progress,
    checkpoint_problems,
    list_checkpoints,
    load_checkpoint,
    resume_point,
    save_checkpoint,
)


def training_state(seed: int = 0):
    torch.manual_seed(seed)
    layer = torch.nn.Linear(8, 8)
    trainable = dict(layer.named_parameters())
    optimizer = torch.optim.AdamW(list(trainable.values()), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return layer, trainable, optimizer, scheduler


def step(layer, optimizer, scheduler) -> None:
    layer(torch.randn(4, 8)).square().sum().backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def save_steps(root: Path, steps: int, keep: int = 2):
    """Train ``steps`` steps, checkpointing each; returns the weights after every step."""
    layer, trainable, optimizer, scheduler = training_state()
    after = {}
    for s in range(1, steps + 1):
        step(layer, optimizer, scheduler)
        progress = Progress(step=s, micro_batches=2 * s, tokens=10 * s)
        save_checkpoint(
            root, trainable=trainable, optimizer=optimizer, scheduler=scheduler, progress=progress, keep=keep
        )
        after[s] = {k: v.detach().clone() for k, v in trainable.items()}
    return after


def test_a_checkpoint_records_the_size_and_checksum_of_each_file(tmp_path):
    save_steps(tmp_path, 1)
    manifest = json.loads((tmp_path / "step-000001" / MANIFEST).read_text())
    assert set(manifest["files"]) == set(FILES)
    for name, record in manifest["files"].items():
        assert record["bytes"] == (tmp_path / "step-000001" / name).stat().st_size
        assert len(record["sha256"]) == 64
    assert manifest["progress"] == {
        "step": 1,
        "micro_batches": 2,
        "tokens": 10,
        "tokens_processed": 0,
        "elapsed_s": 0.0,
        "last": None,
        "on_policy": None,  # an off-policy run keeps no on-policy totals
    }
    assert checkpoint_problems(tmp_path / "step-000001") == []


@pytest.mark.parametrize("how", ["truncate", "corrupt", "delete"])
@pytest.mark.parametrize("name", [*FILES, MANIFEST])
def test_resume_falls_back_past_a_damaged_file_and_says_which(tmp_path, name, how):
    after = save_steps(tmp_path, 3, keep=3)
    newest = tmp_path / "step-000003"
    damage(newest / name, how)
    found, skipped = resume_point(tmp_path)
    assert found == tmp_path / "step-000002"
    assert [p for p, _ in skipped] == [newest]
    problem = skipped[0][1][0]
    assert problem.startswith(f"{name}: "), problem
    if name != MANIFEST:
        expected = {"truncate": "(truncated)", "corrupt": "sha256 differs", "delete": "missing"}[how]
        assert expected in problem
    if how != "corrupt" or name == MANIFEST:  # a size or manifest fault: never even listed
        assert newest not in list_checkpoints(tmp_path)
    # What is loaded is exactly the state after step 2.
    _layer, trainable, optimizer, scheduler = training_state(seed=1)
    progress = load_checkpoint(found, trainable=trainable, optimizer=optimizer, scheduler=scheduler)
    assert progress.step == 2
    for k, v in trainable.items():
        assert torch.equal(v, after[2][k])


def test_no_intact_checkpoint_stops_naming_the_directory_and_each_fault(tmp_path):
    save_steps(tmp_path, 2)
    damage(tmp_path / "step-000002" / "optimizer.pt", "truncate")
    damage(tmp_path / "step-000001" / "trainable.safetensors", "corrupt")
    with pytest.raises(CheckpointError) as info:
        resume_point(tmp_path)
    message = str(info.value)
    assert f"no intact checkpoint in {tmp_path}" in message
    assert "step-000002: optimizer.pt:" in message and "step-000001: trainable.safetensors:" in message


def test_half_written_checkpoints_are_never_offered(tmp_path):
    save_steps(tmp_path, 1)
    (tmp_path / ".step-000002.ab12cd34.tmp").mkdir()  # killed while writing
    (tmp_path / "step-000003").mkdir()  # copied without its manifest
    (tmp_path / "step-000003" / "optimizer.pt").write_bytes(b"x")
    assert list_checkpoints(tmp_path) == [tmp_path / "step-000001"]
    found, skipped = resume_point(tmp_path)
    assert found == tmp_path / "step-000001"
    assert skipped == [(tmp_path / "step-000003", ["manifest.json: missing (an incomplete checkpoint)"])]


def test_a_checkpoint_of_the_previous_format_is_still_read(tmp_path):
    after = save_steps(tmp_path, 1)
    path = tmp_path / "step-000001"
    progress = json.loads((path / MANIFEST).read_text())["progress"]
    (path / MANIFEST).unlink()
    (path / "state.json").write_text(json.dumps(progress))  # what llm-neo wrote before manifests
    assert list_checkpoints(tmp_path) == [path]
    assert resume_point(tmp_path) == (path, [])
    _, trainable, optimizer, scheduler = training_state(seed=1)
    assert load_checkpoint(path, trainable=trainable, optimizer=optimizer, scheduler=scheduler).step == 1
    assert all(torch.equal(v, after[1][k]) for k, v in trainable.items())


def test_a_save_after_falling_back_drops_the_abandoned_damaged_checkpoint(tmp_path):
    save_steps(tmp_path, 3, keep=3)
    damage(tmp_path / "step-000003" / "state.pt", "corrupt")
    damage(tmp_path / "step-000002" / "state.pt", "truncate")
    _, trainable, optimizer, scheduler = training_state()
    progress = Progress(step=2, micro_batches=4, tokens=20)
    save_checkpoint(
        tmp_path, trainable=trainable, optimizer=optimizer, scheduler=scheduler, progress=progress
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000001", "step-000002"]
    assert checkpoint_problems(tmp_path / "step-000002") == []


@pytest.mark.parametrize("fault", ["enospc", "erofs"])
def test_a_failed_checkpoint_write_names_it_and_keeps_the_previous_one(tmp_path, monkeypatch, fault):
    save_steps(tmp_path, 1)
    code = {"enospc": errno.ENOSPC, "erofs": errno.EROFS}[fault]

    def failing(fd, data):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(atomic, "_write", failing)  # every byte a checkpoint writes goes through it
    _layer, trainable, optimizer, scheduler = training_state()
    with pytest.raises(OutputError) as info:
        save_checkpoint(
            tmp_path, trainable=trainable, optimizer=optimizer, scheduler=scheduler, progress=Progress(step=2)
        )
    message = str(info.value)
    assert f"cannot write checkpoint step-000002 to {tmp_path / 'step-000002'}" in message
    assert {"enospc": "no space left on the device", "erofs": "the filesystem is read-only"}[fault] in message
    assert f"Kept: the previous checkpoint {tmp_path / 'step-000001'}." in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000001"]  # no temporary left
    assert checkpoint_problems(tmp_path / "step-000001") == []


def test_a_checkpoint_on_a_really_full_disk(tmpfs):
    mount = tmpfs("2m")
    save_steps(mount, 1)
    filler = fill_disk(mount)
    _layer, trainable, optimizer, scheduler = training_state()
    with pytest.raises(OutputError, match="no space left on the device") as info:
        save_checkpoint(
            mount, trainable=trainable, optimizer=optimizer, scheduler=scheduler, progress=Progress(step=2)
        )
    assert f"Kept: the previous checkpoint {mount / 'step-000001'}" in str(info.value)
    assert sorted(p.name for p in mount.iterdir()) == ["filler", "step-000001"]
    assert checkpoint_problems(mount / "step-000001") == []
    filler.unlink()
