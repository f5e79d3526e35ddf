"""Plain progress lines where there is no terminal: when they come, and what they say."""

from __future__ import annotations

import logging

import pytest

import llm_neo.runtime.progress as progress
from llm_neo.runtime.progress import ProgressLines, every_steps_for, format_clock


def test_lines_come_every_n_steps_and_at_the_first_and_last():
    lines = ProgressLines("neo", 10, every_steps=4, every_s=1e9, enabled=True)
    said = {step for step in range(1, 11) if lines.update(step)}
    assert said == {1, 5, 9, 10}


def test_lines_come_every_m_seconds_however_slow_the_steps(monkeypatch):
    now = {"t": 0.0}
    monkeypatch.setattr(progress.time, "perf_counter", lambda: now["t"])
    lines = ProgressLines("kd", 1000, every_steps=1000, every_s=30.0, enabled=True)
    said = []
    for step in range(1, 8):
        now["t"] = 12.0 * step  # 12 s a step: a line every third step, by time
        if lines.update(step, tokens=100 * step):
            said.append(step)
    assert said == [1, 4, 7]
    line = lines.update(1000, tokens=100_000)  # the last step: always, and done
    assert line is not None and line.startswith("kd: step 1000/1000 (100%)") and line.endswith("done")


def test_a_line_says_step_loss_tokens_per_second_and_eta(monkeypatch, caplog):
    now = {"t": 100.0}
    monkeypatch.setattr(progress.time, "perf_counter", lambda: now["t"])
    # A resumed run: 20 steps and 2,000 tokens before this process; its rates are its own.
    lines = ProgressLines("neo", 200, initial=20, initial_tokens=2000, enabled=True)
    now["t"] = 110.0  # 10 s for 10 steps of 500 tokens
    with caplog.at_level(logging.INFO, logger="llm_neo"):
        line = lines.update(30, tokens=7000, details="loss 2.3456")
    assert line == "neo: step 30/200 (15%), loss 2.3456, 500 response tokens/s, ETA 2m50s"
    assert line in caplog.text


def test_on_a_terminal_the_bar_alone_reports(monkeypatch):
    monkeypatch.setattr(progress, "on_terminal", lambda: True)
    assert ProgressLines("neo", 10).update(1) is None
    monkeypatch.setattr(progress, "on_terminal", lambda: False)
    assert ProgressLines("neo", 10).update(1) is not None


@pytest.mark.parametrize(
    ("seconds", "text"), [(42.4, "42s"), (192, "3m12s"), (3900, "1h05m"), (float("inf"), "?")]
)
def test_durations_read_as_people_write_them(seconds, text):
    assert format_clock(seconds) == text


def test_about_twenty_lines_a_run():
    assert [every_steps_for(n) for n in (1, 20, 45, 1000)] == [1, 1, 3, 50]


def test_worker_jobs_report_plain_lines_too(tmp_path, student_dir, alpaca_jsonl, caplog):
    # compare and demo train their arms in worker processes: the parent reports their steps.
    from llm_neo.commands.compare import distill_job
    from llm_neo.config import DistillConfig
    from llm_neo.runtime.workers import Job, run_jobs

    config = DistillConfig(
        student=str(student_dir),
        data=str(alpaca_jsonl),
        method="sft",
        max_steps=3,
        batch_size=2,
        grad_accum=1,
        output_dir=str(tmp_path / "arm"),
    )
    with caplog.at_level(logging.INFO, logger="llm_neo"):
        run_jobs(
            [Job("sft-0", distill_job, config, 3, tmp_path / "arm.log")], parallel=1, threads=1, desc="arms"
        )
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("arms: ")]
    assert lines and lines[-1].startswith("arms: 3/3 (100%)"), lines
    assert any("sft-0 " in line for line in lines)  # the job's name and its loss


def test_tracked_yields_every_item_and_says_where_it_is_without_a_terminal(monkeypatch, caplog):
    """What probe and generation wait on: off a terminal, plain lines up to the last item's "done"."""
    monkeypatch.setattr(progress, "on_terminal", lambda: False)
    with caplog.at_level(logging.INFO, logger="llm_neo"):
        assert list(progress.tracked(["a", "b", "c"], "teacher: score", unit="batch")) == ["a", "b", "c"]
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("teacher: score: batch 1/3 (33%)") and "ETA" in lines[0]
    assert lines[-1].startswith("teacher: score: batch 3/3 (100%)") and lines[-1].endswith("done")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="llm_neo"):
        assert list(progress.tracked([1, 2], "quiet", unit="batch", enabled=False)) == [1, 2]
    assert not caplog.records
