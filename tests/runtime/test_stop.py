"""Graceful stop: the first signal is recorded, a second one exits at once, a worker pool passes the
signal on to its workers and reports what each kept."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from conftest import ALPACA, write_jsonl

from llm_neo.commands.compare import distill_job
from llm_neo.config import DistillConfig, LoraOptions
from llm_neo.errors import RunStopped
from llm_neo.runtime.checkpoint import checkpoint_problems, list_checkpoints
from llm_neo.runtime.stop import graceful_stop
from llm_neo.runtime.workers import Job, run_jobs

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="POSIX signals")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_a_signal_is_recorded_and_the_handlers_restored(signum):
    before = signal.getsignal(signum)
    with graceful_stop() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signum)
        time.sleep(0.01)  # the handler runs at the next bytecode boundary
        assert stop.requested and stop.signum == signum
        with graceful_stop("inner plan") as inner:  # nested: one request for the process
            assert inner is stop and stop.plan == "inner plan"
        assert stop.plan != "inner plan"
    assert signal.getsignal(signum) == before


def test_a_second_signal_exits_at_once_and_a_duplicate_does_not(tmp_path):
    script = textwrap.dedent(
        """
        import logging, os, signal, sys, time
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        from llm_neo.runtime.stop import graceful_stop
        with graceful_stop("finishing up") as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)  # a duplicate (group + launcher): still one request
            time.sleep(0.2)
            print("still running", stop.name, flush=True)
            time.sleep(1.2)
            os.kill(os.getpid(), signal.SIGTERM)  # a second request: the default action, now
            time.sleep(5)
            print("not reached", flush=True)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == -signal.SIGTERM, done.stderr
    assert "still running SIGTERM" in done.stdout and "not reached" not in done.stdout
    assert "SIGTERM received: finishing up (send it again to exit at once)" in done.stderr


def test_a_worker_pool_passes_the_stop_on_and_reports_what_was_kept(
    tmp_path, student_dir, teacher_dir, one_thread
):
    data = write_jsonl(tmp_path / "train.jsonl", ALPACA * 2)
    config = DistillConfig(
        student=str(student_dir),
        teacher=str(teacher_dir),
        data=str(data),
        method="neo",
        output_dir=str(tmp_path / "arm"),
        max_steps=5000,  # far more than it gets to
        batch_size=2,
        grad_accum=1,
        eval_fraction=0.0,
        lora=LoraOptions(r=4),
        device="cpu",
    )
    metrics = tmp_path / "arm" / "metrics.jsonl"

    def stop_parent_once_training() -> None:
        deadline = time.time() + 120
        while time.time() < deadline and not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)  # to the parent only, as `docker stop` does

    threading.Thread(target=stop_parent_once_training, daemon=True).start()
    log = tmp_path / "arm.log"
    with pytest.raises(RunStopped) as info:
        run_jobs(
            [Job("neo/0", distill_job, config, 5000, log, "llm-neo distill ...")],
            parallel=1,
            threads=1,
            desc="arms",
        )
    message = str(info.value)
    (checkpoint,) = list_checkpoints(tmp_path / "arm" / "checkpoints")
    step = int(checkpoint.name.removeprefix("step-"))
    assert 2 <= step < 5000 and checkpoint_problems(checkpoint) == []
    assert message.startswith(f"stopped by SIGTERM: neo/0: stopped by SIGTERM after step {step} of 5000: ")
    assert f"checkpoint {checkpoint} written" in message
    assert f"llm-neo distill --config {Path(tmp_path / 'arm' / 'config.yaml')} --resume" in message
    assert info.value.exit_code == 75
    assert metrics.read_text().count("\n") == step
