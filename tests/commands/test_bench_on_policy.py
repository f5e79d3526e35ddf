"""`llm-neo bench --on-policy` on the tiny shape: on-policy Neo's whole runs (online, and from a cache of
the initial student's samples) beside off-policy Neo on the same prompt records. Never asserts speed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llm_neo.commands.bench import BenchConfig, RunSpec, bench, format_report, prepare_whole_runs
from llm_neo.commands.bench.on_policy import ROWS, run_on_policy, write_prompt_records
from llm_neo.data import load_records, tokenize_records
from llm_neo.errors import ConfigError
from llm_neo.losses import IGNORE_INDEX
from llm_neo.models.tiny import build_word_tokenizer
from llm_neo.records import from_json
from llm_neo.records.bench import BenchReport, OnPolicyRun


def test_prompt_records_tokenize_to_seq_len_and_train_the_completion(tmp_path):
    path = tmp_path / "prompts.jsonl"
    write_prompt_records(path, records=4, seq_len=17, vocab_size=300, seed=3)
    tokenizer = build_word_tokenizer(300)
    examples, dropped = tokenize_records(load_records(str(path)), tokenizer, max_length=10_000)
    assert dropped == 0 and [len(e.input_ids) for e in examples] == [17] * 4
    for e in examples:
        trained = [i for i, label in enumerate(e.labels) if label != IGNORE_INDEX]
        # <s> + 8 prompt words untrained; the 7 completion words and </s> trained: what the student answers
        assert trained == list(range(9, 17)) and e.input_ids[-1] == tokenizer.eos_token_id


def test_on_policy_rows_are_asked_for_with_on_policy_not_as_runs():
    config = BenchConfig(shape="tiny", runs=["neo+on-policy:chunked"], whole_runs=["kd+on-policy:chunked"])
    with pytest.raises(ConfigError) as err:
        bench(config, progress=False)
    assert [p.split(":")[0] for p in err.value.problems] == ["--runs", "--whole-runs"]
    assert all("use --on-policy" in p for p in err.value.problems)
    with pytest.raises(ConfigError, match=r"--on-policy: the teacher scores the student's samples"):
        bench(BenchConfig(shape="tiny", on_policy=True, kd_ratio=0.0), progress=False)


@pytest.mark.slow  # four processes (three distill, one cache-teacher) that import torch
def test_on_policy_rows_beside_off_policy_neo(tmp_path):
    spec = RunSpec(shape="tiny", method="neo", impl="chunked", chunk_size=1024, batch_size=2, seq_len=16,
                   lora_r=4, kd_ratio=0.5, warmup_steps=1, steps=1, gradient_checkpointing=False,
                   device="cpu", dtype="float32", seed=0, memory="rss", num_threads=1)  # fmt: skip
    inputs = prepare_whole_runs(spec, tmp_path / "inputs", with_teacher=True)
    rows = run_on_policy(BenchConfig(shape="tiny", run_timeout_s=600), [spec], inputs, tmp_path)
    assert [r["name"] for r in rows] == list(ROWS)
    assert all(r["status"] == "ok" for r in rows), rows
    off, online, cached = (from_json(OnPolicyRun, r) for r in rows)
    assert off.step_ratio == 1 and off.generation_share is None  # the baseline: no sampling
    assert online.step_ratio and cached.step_ratio  # each against off-policy Neo of this bench
    assert online.generation_share is not None and 0 < online.generation_share < 1
    cap = 7  # the completion: (16 - 2) // 2 words, </s> past the cap
    for row in (online, cached):
        assert row.max_new_tokens == cap + 1 and row.mean_generated_length is not None
        assert 1 <= row.mean_generated_length <= row.max_new_tokens
        assert row.capped_share is not None and 0 <= row.capped_share <= 1
    # Cached: nothing generated while training; generated once, by cache-teacher, timed on the row.
    assert cached.generation_share == 0 and cached.cache_generation_s and cached.cache_wall_s
    assert cached.cache_generation_s < cached.cache_wall_s and cached.generated_tokens_per_s
    assert cached.command and "--teacher-cache" in cached.command and "--teacher " not in cached.command
    assert online.command and "--on-policy 1" in online.command and "--teacher " in online.command
    summary = json.loads((tmp_path / "on-policy" / "cached" / "out" / "summary.json").read_text())
    assert summary["on_policy"]["cached_student"] == str(inputs.student)


def test_the_committed_cpu_result_loads_and_reports_its_on_policy_rows():
    """benchmarks/results' on-policy bench (the figures docs/on-policy.md quotes) reads back as a
    BenchReport, and its Markdown is what format_report writes from it."""
    root = Path(__file__).parents[2] / "benchmarks" / "results"
    data = json.loads((root / "tiny-on-policy-2026-12-07.json").read_text())
    report = from_json(BenchReport, data)
    assert report.on_policy is not None and [r.name for r in report.on_policy] == list(ROWS)
    text = format_report(report)
    assert "## On-policy Neo (λ = 1), beside off-policy Neo" in text
    assert (root / "tiny-on-policy-2026-12-07.md").read_text().strip() == text.strip()
