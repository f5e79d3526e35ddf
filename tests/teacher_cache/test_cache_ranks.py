"""`cache-teacher` under torchrun, 2 CPU processes (gloo): the examples split across ranks, the teacher
replicated or FSDP2-sharded, the cache equal to the one-process cache and a student trained from it equal
to one trained from the one-process cache; a killed 2-rank cache finished by
1 process; a failure on one rank stopping both, naming the record, with no manifest."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ALPACA, tiny_run, write_jsonl
from safetensors.torch import load_file, save_file

from llm_neo.cli import main
from llm_neo.config import CacheTeacherConfig
from llm_neo.distill import distill
from llm_neo.models.loading import load_tokenizer
from llm_neo.teacher_cache.writer import cache_teacher

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available"),
]

# 8 records in shards of 3, 3 and 2: rank 0 computes shards 0 and 2 (3 forwards of 2), rank 1 shard 1
# (2 forwards), so a sharded teacher needs one idle forward on rank 1.
OPTIONS = {"shard_size": 3, "batch_size": 2}
POISON = "~"  # the one byte the poisoned teacher's logits overflow on


def _torchrun(*args: str, log_dir: Path | None = None) -> subprocess.Popen:
    """``llm-neo ARGS`` in 2 processes under torchrun (gloo on CPU), each with one intra-op thread."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    logs = ["--redirects", "3", "--log-dir", str(log_dir)] if log_dir else []
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={port}"]
    cmd = [*launcher, *logs, "-m", "llm_neo", *args]
    return subprocess.Popen(
        cmd,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _ranks(launcher: int) -> list[int]:
    """The worker processes of a torchrun launcher (Linux /proc). It starts each in a session of its own,
    so a kill of the launcher's process group would leave them running."""
    children = Path(f"/proc/{launcher}/task/{launcher}/children")
    deadline = time.time() + 60
    while len(pids := children.read_text().split()) < 2 and time.time() < deadline:
        time.sleep(0.01)
    return [int(pid) for pid in pids]


def _wait_gone(pid: int, deadline: float) -> None:
    """Until process ``pid`` has exited (a zombie has: its files and locks are released)."""
    while time.time() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return
        if state in ("Z", "X"):
            return
        time.sleep(0.01)


def _cli(teacher: Path, data: Path, out: Path, **options: Any) -> list[str]:
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in (OPTIONS | options).items()]
    return ["cache-teacher", "--teacher", str(teacher), "--data", str(data), "--output", str(out), *flags]


def _config(teacher: Path, data: Path, out: Path, **options: Any) -> CacheTeacherConfig:
    return CacheTeacherConfig(teacher=str(teacher), data=str(data), output=str(out), **(OPTIONS | options))


def _manifest(cache: Path) -> dict[str, Any]:
    return json.loads((cache / "manifest.json").read_text())


def _assert_same_cache(cache: Path, reference: Path) -> None:
    """Same key, same shard files (names, example offsets, top-k ids); values to float tolerance."""
    got, want = _manifest(cache), _manifest(reference)
    assert (cache / "key.json").read_text() == (reference / "key.json").read_text()
    assert got["key_digest"] == want["key_digest"]
    assert [s["file"] for s in got["shards"]] == [s["file"] for s in want["shards"]]
    assert [s["num_positions"] for s in got["shards"]] == [s["num_positions"] for s in want["shards"]]
    for shard in want["shards"]:
        a, b = load_file(cache / shard["file"]), load_file(reference / shard["file"])
        assert torch.equal(a["offsets"], b["offsets"]) and torch.equal(a["ids"], b["ids"])
        torch.testing.assert_close(a["log_probs"], b["log_probs"], atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(a["tail"], b["tail"], atol=1e-3, rtol=1e-3)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", ALPACA)


@pytest.fixture(scope="module")
def one_process_cache(tmp_path_factory, teacher_dir, data_file) -> Path:
    out = tmp_path_factory.mktemp("caches") / "one"
    cache_teacher(_config(teacher_dir, data_file, out))
    return out


def test_one_process_records_itself_as_the_only_rank(one_process_cache):
    manifest = _manifest(one_process_cache)
    assert manifest["world_size"] == 1 and manifest["teacher_shard"] == "replicate"
    [share] = manifest["ranks"]
    assert (share["rank"], share["shards"], share["examples"]) == (0, 3, 8)
    assert share["tokens"] == manifest["num_positions"] == manifest["stats"]["positions_computed_now"]
    assert share["teacher_parameters"] > 0 and share["peak_memory_gb"] > 0


def test_a_sharded_quantized_teacher_is_refused(tmp_path, teacher_dir, data_file, capsys):
    command = _cli(teacher_dir, data_file, tmp_path / "cache", teacher_shard="fsdp", teacher_quant="int8")
    assert main(command) == 2
    err = capsys.readouterr().err
    assert "--teacher-shard fsdp shards dense weights only: pass --teacher-quant none" in err
    assert "Traceback" not in err and not (tmp_path / "cache").exists()


@pytest.fixture(scope="module", params=["replicate", "fsdp"])
def two_rank_cache(request, tmp_path_factory, teacher_dir, data_file) -> tuple[Path, str, str]:
    """The cache written by 2 ranks with the teacher replicated or FSDP2-sharded: its directory, the
    placement and the launch's output. Each launch: two processes that import torch, 15-20 s on CPU."""
    placement = request.param
    out = tmp_path_factory.mktemp("caches") / f"two-{placement}"
    proc = _torchrun(*_cli(teacher_dir, data_file, out, teacher_shard=placement))
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output
    return out, placement, output


@pytest.mark.slow  # the 2-rank launches (two_rank_cache)
def test_two_ranks_write_the_one_process_cache(teacher_dir, data_file, one_process_cache, two_rank_cache):
    out, placement, output = two_rank_cache
    _assert_same_cache(out, one_process_cache)
    manifest = _manifest(out)
    assert manifest["world_size"] == 2 and manifest["teacher_shard"] == placement
    shares = manifest["ranks"]
    assert [(s["rank"], s["shards"], s["examples"]) for s in shares] == [(0, 2, 5), (1, 1, 3)]
    assert sum(s["tokens"] for s in shares) == manifest["num_positions"]
    assert all(s["seconds"] > 0 and s["peak_memory_gb"] > 0 for s in shares)
    one_rank = _manifest(one_process_cache)["ranks"][0]["teacher_parameters"]
    for share in shares:  # replicated: the whole teacher; sharded: half its blocks, the whole lm_head
        held = share["teacher_parameters"] / one_rank
        assert held == 1 if placement == "replicate" else 0.45 < held < 0.65
    for rank, examples in ((0, 5), (1, 3)):  # each rank says its share as it starts
        assert f"rank {rank} of 2: " in output and f"{examples} examples" in output
    # Finished: the same launch again computes nothing, at any world size.
    proc = _torchrun(*_cli(teacher_dir, data_file, out, teacher_shard=placement))
    assert proc.communicate(timeout=600)[0] and proc.returncode == 0
    assert _manifest(out) == manifest


def _train_from(cache: Path, out: Path, student_dir: Path, data: Path) -> tuple[dict[str, torch.Tensor], Any]:
    """A neo student trained 3 steps from ``cache`` (the teacher never loaded), at a learning rate that
    moves it well beyond the comparison's tolerance: its merged weights and its summary."""
    config = tiny_run(
        out, student=str(student_dir), data=str(data), teacher_cache=str(cache), kd_ratio=0.9, lr=1e-2
    )
    summary = distill(config)
    return load_file(out / "merged" / "model.safetensors"), summary


@pytest.fixture(scope="module")
def one_process_student(tmp_path_factory, one_process_cache, student_dir, data_file):
    return _train_from(one_process_cache, tmp_path_factory.mktemp("runs") / "one", student_dir, data_file)


@pytest.mark.slow  # the 2-rank launches (two_rank_cache)
def test_a_student_trained_from_two_ranks_cache_equals_one_from_one_process(
    tmp_path, student_dir, data_file, one_process_student, two_rank_cache
):
    cache, placement, _ = two_rank_cache
    got, summary = _train_from(cache, tmp_path / "run", student_dir, data_file)
    want, reference = one_process_student
    assert summary.teacher_cache["key_digest"] == reference.teacher_cache["key_digest"]
    assert summary.final["kd_loss"] == pytest.approx(reference.final["kd_loss"], rel=1e-4)
    assert got.keys() == want.keys()
    for name in want:  # the caches agree to float tolerance, so do the students trained from them
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=f"{placement}: {name}")
    # Not vacuous: the training moved the student by far more than that tolerance.
    untrained = load_file(student_dir / "model.safetensors")
    moved = max((want[n] - untrained[n]).abs().max().item() for n in want if n in untrained)
    assert moved > 1e-3, moved


@pytest.mark.slow  # each torchrun launch: two processes that import torch, 15-20 s on CPU
def test_a_killed_two_rank_cache_is_finished_by_one_process(tmp_path, teacher_dir):
    # Enough shards (64 of 4 examples, one forward each) that the kill lands mid-cache.
    data = write_jsonl(tmp_path / "train.jsonl", ALPACA * 32)
    options = {"shard_size": 4, "batch_size": 4}
    reference = tmp_path / "uninterrupted"
    cache_teacher(_config(teacher_dir, data, reference, **options))
    killed = tmp_path / "killed"
    proc = _torchrun(*_cli(teacher_dir, data, killed, **options))
    deadline = time.time() + 300
    while len(list(killed.glob("shard-*.safetensors"))) < 4 and time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.005)
    ranks = _ranks(proc.pid)
    os.kill(ranks[-1], signal.SIGKILL)  # one rank, mid-cache: the launcher stops the other
    proc.communicate(timeout=300)
    assert proc.returncode != 0
    for pid in ranks:  # gone (rank 0's lock with it) before the rerun
        _wait_gone(pid, deadline)
    assert not (killed / "manifest.json").exists(), "the cache finished before the kill: make it longer"
    kept = {f.name: f.stat().st_mtime_ns for f in killed.glob("shard-*.safetensors")}
    assert len(kept) >= 4

    computed: list[int] = []
    cache_teacher(
        _config(teacher_dir, data, killed, **options), on_shard=lambda s, record: computed.append(s)
    )
    assert {f"shard-{s:05d}.safetensors" for s in computed}.isdisjoint(kept)  # the complete ones are kept
    assert len(computed) + len(kept) == 64
    assert all(killed.joinpath(name).stat().st_mtime_ns == mtime for name, mtime in kept.items())
    _assert_same_cache(killed, reference)
    manifest = _manifest(killed)
    assert manifest["world_size"] == 1 and manifest["ranks"][0]["shards"] == len(computed)


@pytest.fixture(scope="module")
def poisoned_teacher(tmp_path_factory, teacher_dir) -> Path:
    """The teacher with finite weights (the load check passes) whose logits overflow to ±inf at every
    position whose input is POISON, and only there: hidden dimension 0 is zero everywhere except in
    POISON's embedding, and the final norm scales it by 3e38."""
    out = tmp_path_factory.mktemp("models") / "poisoned"
    out.mkdir()
    for f in teacher_dir.iterdir():
        if f.is_file() and f.name != "model.safetensors":
            (out / f.name).write_bytes(f.read_bytes())
    tensors = load_file(teacher_dir / "model.safetensors")
    token = load_tokenizer(str(teacher_dir), role="teacher")(POISON, add_special_tokens=False)["input_ids"][
        -1
    ]
    tensors["model.embed_tokens.weight"][:, 0] = 0
    tensors["model.embed_tokens.weight"][token, 0] = 1
    for name, tensor in tensors.items():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            tensor[0] = 0  # no block writes dimension 0
    tensors["model.norm.weight"][0] = 3e38
    head = tensors["lm_head.weight"]
    head[:, 0] = torch.linspace(-10, 10, head.shape[0])
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.mark.slow  # each torchrun launch: two processes that import torch, 15-20 s on CPU
@pytest.mark.parametrize("placement", ["replicate", "fsdp"])
def test_a_failure_on_one_rank_stops_both_naming_the_record(tmp_path, poisoned_teacher, placement):
    records = [dict(r) for r in ALPACA]
    records[4]["output"] = f"3 {POISON}"  # example 4: in shard 1, rank 1's share
    data = write_jsonl(tmp_path / "train.jsonl", records)
    out, logs = tmp_path / "cache", tmp_path / "logs"
    proc = _torchrun(*_cli(poisoned_teacher, data, out, teacher_shard=placement), log_dir=logs)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode != 0, output
    assert not (out / "manifest.json").exists()
    said = {rank: next(logs.rglob(f"attempt_0/{rank}/stderr.log")).read_text() for rank in (0, 1)}
    named = "gives non-finite log-probs (NaN or inf) on example 4 of --data"
    assert named in said[1], said[1]
    assert "rank 1 of 2 failed, so every rank stopped and no manifest was written" in said[0], said[0]
    assert named in said[0] and "Traceback" not in said[0] + said[1]


@pytest.mark.slow  # each torchrun launch: two processes that import torch, 15-20 s on CPU
def test_compare_under_torchrun_builds_its_cache_across_the_ranks(tmp_path, teacher_dir, student_dir):
    data = write_jsonl(tmp_path / "train.jsonl", ALPACA * 4)
    out = tmp_path / "cmp"
    proc = _torchrun("compare", "--teacher", str(teacher_dir), "--student", str(student_dir), "--data",
                     str(data), "--methods", "neo", "--seeds", "1", "--max-steps", "1", "--batch-size", "2",
                     "--lora.r", "4", "--max-length", "64", "--max-new-tokens", "2", "--device", "cpu",
                     "--cache-teacher", "8", "--output-dir", str(out))  # fmt: skip
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output
    manifest = _manifest(out / "cache" / "train")
    assert manifest["teacher_shard"] == "replicate"  # auto, on CPU
    assert manifest["world_size"] == 2 and [share["rank"] for share in manifest["ranks"]] == [0, 1]
    assert sum(share["examples"] for share in manifest["ranks"]) == manifest["num_examples"]
    summary = json.loads(next((out / "arms").rglob("summary.json")).read_text())
    assert summary["teacher_cache"]["key_digest"] == manifest["key_digest"]


@pytest.mark.slow  # one torchrun launch: two processes that import torch, 15-20 s on CPU
def test_two_ranks_write_the_one_process_cache_of_student_samples(
    tmp_path, teacher_dir, student_dir, data_file
):
    """--student-samples: each rank draws its own shards' samples (seeded by data example and sample
    index), so 2 ranks write the samples and the targets 1 process writes."""
    samples = {
        "student_samples": student_dir,
        "samples_per_prompt": 2,
        "sample_max_new_tokens": 6,
        "top_k": 8,
    }
    one = tmp_path / "one"
    cache_teacher(_config(teacher_dir, data_file, one, **samples))
    out = tmp_path / "two"
    proc = _torchrun(*_cli(teacher_dir, data_file, out, **samples))
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output
    _assert_same_cache(out, one)
    manifest = _manifest(out)
    assert manifest["world_size"] == 2 and manifest["num_examples"] == 16
    for shard in manifest["shards"]:  # the samples' tokens too, not only the targets
        a, b = load_file(out / shard["file"]), load_file(one / shard["file"])
        for name in ("input_ids", "input_offsets", "response_starts"):
            assert torch.equal(a[name], b[name])
    assert all(share["generation_s"] > 0 for share in manifest["ranks"])
