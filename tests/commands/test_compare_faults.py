"""A damaged record of a finished compare arm: the arm counts as unfinished and runs again, named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tiny_comparison, write_jsonl

from llm_neo.commands.compare import compare
from llm_neo.summary import RunSummary

pytestmark = pytest.mark.usefixtures("one_thread")


def _records(n: int, start: int = 0) -> list[dict]:
    return [
        {"instruction": f"Add {i} and 1.", "input": "", "output": str(i + 1)} for i in range(start, start + n)
    ]


def test_a_damaged_arm_summary_is_named_and_the_arm_runs_again(tmp_path, teacher_dir, student_dir, caplog):
    config = tiny_comparison(
        teacher_dir,
        student_dir,
        tmp_path / "out",
        data=str(write_jsonl(tmp_path / "train.jsonl", _records(16))),
        heldout=str(write_jsonl(tmp_path / "heldout.jsonl", _records(4, 100))),
        seeds=1,
        max_new_tokens=2,
    )
    assert compare(config) is not None
    arms = tmp_path / "out" / "arms"
    damaged, kept = arms / "neo-seed42" / "summary.json", arms / "sft-seed42" / "summary.json"
    damaged.write_bytes(damaged.read_bytes()[:100])  # truncated, as by a full disk or a killed copy
    kept_before = kept.stat().st_mtime_ns
    with pytest.raises(ValueError, match="is damaged"):
        RunSummary.load(damaged.parent)

    with caplog.at_level("WARNING", logger="llm_neo"):
        results = compare(config)
    assert results is not None
    assert f"{damaged} is damaged (" in caplog.text and "the arm is run again" in caplog.text
    assert RunSummary.load(damaged.parent).steps == 2  # written again, whole
    assert RunSummary.load(damaged.parent).final  # its last step's metrics, though the rerun resumed at it
    assert kept.stat().st_mtime_ns == kept_before  # the intact arm was not trained again
    neo = json.loads((tmp_path / "out" / "results.json").read_text())
    assert any(group["method"] == "neo" and group["runs"] for group in neo["groups"])
    assert Path(str(RunSummary.load(damaged.parent).config["output_dir"])) == damaged.parent


def test_compare_from_a_cache_with_a_damaged_manifest_names_it_before_any_arm_trains(
    tmp_path, teacher_dir, student_dir, capsys
):
    from llm_neo.cli import main
    from llm_neo.config import CacheTeacherConfig
    from llm_neo.teacher_cache.writer import cache_teacher

    train = write_jsonl(tmp_path / "train.jsonl", _records(16))
    heldout = write_jsonl(tmp_path / "heldout.jsonl", _records(4, 100))
    cache = tmp_path / "cache"
    cache_teacher(
        CacheTeacherConfig(teacher=str(teacher_dir), data=str(train), output=str(cache), max_length=64)
    )
    manifest = cache / "manifest.json"
    manifest.write_bytes(manifest.read_bytes()[:-30])
    code = main(["compare", "--teacher-cache", str(cache), "--student", str(student_dir),
                 "--data", str(train), "--heldout", str(heldout), "--methods", "sft,neo", "--seeds", "1",
                 "--max-steps", "2",
                 "--batch-size", "4", "--lora.r", "4", "--max-length", "64", "--max-new-tokens", "2",
                 "--jobs", "1", "--device", "cpu", "--output-dir", str(tmp_path / "out")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1
    assert f"{manifest} is damaged (truncated" in err and "Rerun the llm-neo cache-teacher command" in err
    assert "failed" not in err and "File " not in err  # refused before any arm's worker, no traceback
    assert not (tmp_path / "out" / "arms").exists() or not any((tmp_path / "out" / "arms").iterdir())
