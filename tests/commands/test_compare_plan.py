"""`llm-neo compare` says before training whether it can decide: the plan's epochs, tokens and held-out
size are the data's and the options', --plan-only trains and writes nothing, and a finished comparison
keeps the same statement in results.json and its report."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from conftest import tiny_comparison, write_jsonl

from llm_neo.cli import main
from llm_neo.commands.compare import CompareConfig, compare, plan_only
from llm_neo.data import read_examples
from llm_neo.losses import IGNORE_INDEX
from llm_neo.models.loading import load_tokenizer
from llm_neo.records import load
from llm_neo.records.compare import CompareResults
from llm_neo.report.power import detectable_difference
from llm_neo.summary import RunSummary

pytestmark = pytest.mark.usefixtures("one_thread")


def _records(n: int, start: int = 0) -> list[dict]:
    return [
        {"instruction": f"Add {i} and 1.", "input": "", "output": str(i + 1)} for i in range(start, start + n)
    ]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("plan-data")
    return write_jsonl(root / "train.jsonl", _records(24)), write_jsonl(
        root / "heldout.jsonl", _records(4, 100)
    )


def _config(teacher_dir, student_dir, data, out: Path, **overrides) -> CompareConfig:
    train, heldout = data
    return tiny_comparison(
        teacher_dir, student_dir, out, **({"data": str(train), "heldout": str(heldout)} | overrides)
    )


def _response_tokens(path: Path, student_dir: Path, config: CompareConfig) -> int:
    _, examples, _ = read_examples(str(path), load_tokenizer(str(student_dir), role="student"), config)
    return sum(sum(1 for t in ex.labels[1:] if t != IGNORE_INDEX) for ex in examples)


def test_the_plan_is_the_datas_and_the_options(tmp_path, teacher_dir, student_dir, data):
    config = _config(teacher_dir, student_dir, data, tmp_path / "out", train_records=[12, 24])
    budget = plan_only(config)
    small, full = budget.sizes
    assert (small.records, small.train_examples, full.records, full.train_examples) == (12, 12, 24, 24)
    assert small.steps == full.steps == 2 and small.samples_per_step == 4
    assert small.epochs == pytest.approx(8 / 12) and full.epochs == pytest.approx(8 / 24)
    per_epoch = _response_tokens(data[0], student_dir, config)
    assert full.tokens_per_epoch == per_epoch and full.trained_tokens == round(per_epoch / 3)
    assert budget.heldout_records == 4 and budget.heldout_tokens == _response_tokens(
        data[1], student_dir, config
    )
    assert budget.detectable == detectable_difference(4, 2)
    under_12, under_24, undecidable, small_split = budget.warnings
    assert "at 12 records trains on 0.67 of an epoch" in under_12
    assert "--max-steps 9 covers 3 epochs (3 cover one)" in under_12  # 3 x 12 / 4
    assert "--max-steps 18 covers 3 epochs (6 cover one)" in under_24
    assert "4 held-out records at 2 seeds detect only differences of" in undecidable
    assert "over 4 records and" in small_split
    # Without --max-steps: --epochs decides the steps as distill does (ceil(2 x 24 / 4) = 12)
    epochs = plan_only(_config(teacher_dir, student_dir, data, tmp_path / "out", max_steps=None, epochs=2.0))
    assert epochs.sizes[0].steps == 12 and epochs.sizes[0].epochs == pytest.approx(2.0)
    assert not any("of an epoch" in w for w in epochs.warnings)


def test_plan_only_trains_and_writes_nothing(tmp_path, teacher_dir, student_dir, data, capsys):
    out = tmp_path / "out"
    config = _config(teacher_dir, student_dir, data, out, plan_only=True)
    assert compare(config) is None
    assert not out.exists()
    train, heldout = data
    argv = ["compare", "--teacher", str(teacher_dir), "--student", str(student_dir), "--data", str(train)]
    argv += ["--heldout", str(heldout), "--methods", "sft", "neo", "--seeds", "2", "--max-steps", "2"]
    argv += ["--batch-size", "4", "--grad-accum", "1", "--device", "cpu", "--output-dir", str(out)]
    assert main([*argv, "--plan-only"]) == 0
    printed = capsys.readouterr().out
    assert (
        not out.exists()
    )  # no arms/, no splits/, no compare.yaml: a rerun with other options is not refused
    assert "0.33 epoch(s) per arm" in printed
    assert (
        "warning: each arm trains on 0.33 of an epoch" in printed
        and "--max-steps 18 covers 3 epochs" in printed
    )
    assert "held-out: 4 records" in printed and "nothing trained" in printed
    # Each arm timed over a warm-up run in the temporary directory, and its time said per arm
    assert "time per arm and seed, estimated from a 3-step warm-up run of each arm" in printed
    assert all(f"{arm} " in printed.split("time per arm")[1] for arm in ("sft", "neo"))
    timed = plan_only(config, time_arms=True)
    assert [t.arm for t in timed.arm_times] == ["sft", "neo"] and not out.exists()
    for t in timed.arm_times:
        assert t.warmup_steps == 3 and t.steps == 2 and t.seconds_per_step > 0
        assert t.seconds == pytest.approx(t.load_seconds + 2 * t.seconds_per_step)
    # A split of --data is made as the run makes it, in a temporary directory
    split = _config(teacher_dir, student_dir, data, out, heldout=None, eval_fraction=0.25, plan_only=True)
    assert plan_only(split).heldout_records == 6 and not out.exists()


def test_a_finished_comparison_keeps_its_plan(tmp_path, teacher_dir, student_dir, data):
    out = tmp_path / "out"
    results = compare(_config(teacher_dir, student_dir, data, out, methods=["sft"], max_steps=1))
    assert results is not None and results.budget is not None
    assert load(CompareResults, out / "results.json").budget == results.budget
    (size,) = results.budget.sizes
    for run in results.groups[0].runs:  # the plan's steps are the ones each arm ran
        assert RunSummary.load(run.output_dir).steps == size.steps == 1
    assert results.budget.heldout_tokens == results.models.student.heldout_tokens  # what was scored
    assert size.epochs == pytest.approx(4 / 24) and not math.isnan(size.epochs)
    report = (out / "report.md").read_text()
    assert "## Can this comparison decide?" in report and "--max-steps 18 covers 3 epochs" in report
    assert "**Small held-out split**: the held-out metrics are over 4 records" in report
