"""Real 2-process distillation on CPU (gloo + FSDP2), compared with one process on the same global batch."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ALPACA, write_jsonl
from safetensors.torch import load_file

from llm_neo.cli import main
from llm_neo.models.tiny import build_family, save_model

pytestmark = pytest.mark.skipif(
    not hasattr(torch.distributed, "is_available") or not torch.distributed.is_available(),
    reason="torch.distributed is not available",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _torchrun(args: list[str], nproc: int = 2) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        f"--master-port={_free_port()}",
        "-m",
        "llm_neo",
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def _args(student_dir, teacher_dir, data, out, method, grad_accum, *extra) -> list[str]:
    return [
        "distill",
        "--student",
        str(student_dir),
        "--teacher",
        str(teacher_dir),
        "--data",
        str(data),
        "--method",
        method,
        "--output-dir",
        str(out),
        "--batch-size",
        "2",
        "--grad-accum",
        str(grad_accum),
        "--lora.r",
        "4",
        "--eval-fraction",
        "0.125",
        "--seed",
        "3",
        "-q",
        *extra,
    ]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "merged" / "model.safetensors")


@pytest.mark.parametrize("method", ["neo", "kd"])
def test_two_processes_follow_one(tmp_path, student_dir, teacher_dir, method):
    data = write_jsonl(tmp_path / "train.jsonl", ALPACA * 4)
    # Global batch 8 samples a step either way: 1 process × 4 micro-batches, or 2 × 2.
    proc = _torchrun(_args(student_dir, teacher_dir, data, tmp_path / "two", method, 2, "--max-steps", "3"))
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output
    assert main(_args(student_dir, teacher_dir, data, tmp_path / "one", method, 4, "--max-steps", "3")) == 0

    one, two = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=1e-5, rtol=1e-4)
    s1 = json.loads((tmp_path / "one" / "summary.json").read_text())
    s2 = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert s2["world_size"] == 2 and s1["world_size"] == 1
    assert s2["final"] == pytest.approx(s1["final"], rel=1e-4)
    # Each rank holds about half of the teacher: its blocks are sharded, only the lm_head is whole.
    total = s1["teacher_parameters_per_rank"][0]
    for held in s2["teacher_parameters_per_rank"]:
        assert 0.45 < held / total < 0.65
    assert s2["merge_check"]["passed"] if method == "neo" else s2["merge_check"]["applicable"] is False


@pytest.mark.slow
def test_two_processes_follow_one_on_gpt2(tmp_path, tokenizer):
    """FSDP2 on another layout: GPT-2's blocks in transformer.h, Conv1D projections, a tied lm_head
    (kept whole, its embedding too) and learned position embeddings (sharded with the decoder)."""
    teacher = save_model(
        build_family("gpt2", len(tokenizer), hidden_size=32, num_layers=3, seed=1), tokenizer, tmp_path / "t"
    )
    student = save_model(
        build_family("gpt2", len(tokenizer), hidden_size=16, num_layers=2, seed=2), tokenizer, tmp_path / "s"
    )
    data = write_jsonl(tmp_path / "train.jsonl", ALPACA * 4)
    proc = _torchrun(_args(student, teacher, data, tmp_path / "two", "neo", 2, "--max-steps", "3"))
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output
    assert main(_args(student, teacher, data, tmp_path / "one", "neo", 4, "--max-steps", "3")) == 0

    one, two = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert set(one) == set(two) and "lm_head.weight" not in one  # tied: stored once
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=1e-5, rtol=1e-4)
    s1 = json.loads((tmp_path / "one" / "summary.json").read_text())
    s2 = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert s2["world_size"] == 2 and s2["final"] == pytest.approx(s1["final"], rel=1e-4)
    assert s2["merge_check"]["passed"]
    # Each rank holds its half of the teacher's blocks plus the whole tied embedding.
    total = s1["teacher_parameters_per_rank"][0]
    for held in s2["teacher_parameters_per_rank"]:
        assert 0.5 < held / total < 0.9


def test_killed_two_process_run_resumes(tmp_path, student_dir, teacher_dir):
    data = write_jsonl(tmp_path / "train.jsonl", ALPACA * 4)
    common = ["--max-steps", "12", "--save-every", "2"]
    killed = tmp_path / "killed"
    proc = _torchrun(_args(student_dir, teacher_dir, data, killed, "neo", 2, *common))
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "step-000004").exists() and time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks, mid-run
    proc.wait()
    assert not (killed / "summary.json").exists()

    proc = _torchrun(_args(student_dir, teacher_dir, data, killed, "neo", 2, *common, "--resume"))
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output
    assert main(_args(student_dir, teacher_dir, data, tmp_path / "one", "neo", 4, *common)) == 0
    one, resumed = _weights(tmp_path / "one"), _weights(killed)
    for name in one:
        torch.testing.assert_close(resumed[name], one[name], atol=1e-5, rtol=1e-4)
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))


@pytest.mark.slow
def test_sigterm_under_torchrun_stops_every_rank_after_the_same_step(tmp_path, student_dir, teacher_dir):
    data = write_jsonl(tmp_path / "train.jsonl", ALPACA * 4)
    stopped = tmp_path / "stopped"
    # No --save-every: the stop writes the only checkpoint.
    proc = _torchrun(_args(student_dir, teacher_dir, data, stopped, "neo", 2, "--max-steps", "12"))
    metrics = stopped / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 3) and time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.02)
    # The launcher and both ranks at once (as Slurm's scancel or Ctrl-C): each rank gets it twice, once
    # directly and once passed on by torchrun, and still stops after one step, the same on both.
    os.killpg(proc.pid, signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    (checkpoint,) = (stopped / "checkpoints").iterdir()
    step = int(checkpoint.name.removeprefix("step-"))
    assert 3 <= step < 12, output
    assert json.loads((checkpoint / "manifest.json").read_text())["progress"]["step"] == step
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == list(range(1, step + 1))
    command = f"torchrun --nproc-per-node=2 -m llm_neo distill --config {stopped / 'config.yaml'} --resume"
    assert (
        f"stopped by SIGTERM after step {step} of 12: checkpoint {checkpoint} written. Resume with: {command}"
        in output
    )
    assert not (stopped / "summary.json").exists()

    proc = _torchrun(["distill", "--config", str(stopped / "config.yaml"), "--resume", "-q"])
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output
    one = tmp_path / "one"
    assert main(_args(student_dir, teacher_dir, data, one, "neo", 4, "--max-steps", "12")) == 0
    for name, tensor in _weights(one).items():
        torch.testing.assert_close(_weights(stopped)[name], tensor, atol=1e-5, rtol=1e-4)
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, 13))


@pytest.mark.slow
def test_compare_under_torchrun_shards_every_arm(tmp_path, student_dir, teacher_dir):
    """llm-neo compare launched by torchrun: every arm trains on both ranks, rank 0 scores and reports."""
    data = write_jsonl(tmp_path / "train.jsonl", ALPACA * 2)
    out = tmp_path / "compare"
    proc = _torchrun(
        ["compare", "--teacher", str(teacher_dir), "--student", str(student_dir), "--data", str(data),
         "--methods", "sft,neo", "--seeds", "1", "--max-steps", "2", "--batch-size", "2", "--grad-accum", "1",
         "--eval-fraction", "0.25", "--max-new-tokens", "4", "--device", "cpu", "--output-dir", str(out)]
    )  # fmt: skip
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output
    results = json.loads((out / "results.json").read_text())
    assert [g["method"] for g in results["groups"]] == ["sft", "neo"]
    for group in results["groups"]:
        summary = json.loads((Path(group["runs"][0]["output_dir"]) / "summary.json").read_text())
        merged = summary["merge_check"]["passed"] if group["method"] == "neo" else True
        assert summary["world_size"] == 2 and merged
        assert summary["merge_check"]["applicable"] == (group["method"] == "neo")
    assert (out / "report.html").is_file()


@pytest.mark.slow
def test_two_processes_follow_one_on_policy(tmp_path, student_dir, teacher_dir):
    """--on-policy 1 under FSDP2: each rank generates on sharded modules in lockstep (synced decoding
    steps, or a rank whose samples end first would hang the other) and trains what one process does."""
    data = write_jsonl(tmp_path / "train.jsonl", ALPACA * 4)
    extra = (
        "--max-steps",
        "2",
        "--on-policy",
        "1",
        "--sample-temperature",
        "0",
        "--sample-max-new-tokens",
        "6",
    )
    proc = _torchrun(_args(student_dir, teacher_dir, data, tmp_path / "two", "neo", 2, *extra))
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output
    assert main(_args(student_dir, teacher_dir, data, tmp_path / "one", "neo", 4, *extra)) == 0
    one, two = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=1e-5, rtol=1e-4)
    s1 = json.loads((tmp_path / "one" / "summary.json").read_text())
    s2 = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert s2["world_size"] == 2
    assert s2["on_policy"]["on_policy_micro_batches"] == s1["on_policy"]["on_policy_micro_batches"] == 8
    assert s2["on_policy"]["mean_generated_length"] == s1["on_policy"]["mean_generated_length"]
    assert s2["final"] == pytest.approx(s1["final"], rel=1e-4)
