"""A held-out split too small to read closely is flagged with its counts at the end of distill: in the
log and under the printed summary, so four-digit metrics over 4 records are not taken at their digits."""

from __future__ import annotations

import pytest
from conftest import tiny_run

from llm_neo.cli import main
from llm_neo.config import dump_yaml
from llm_neo.eval.metrics import SMALL_HELDOUT_RECORDS, SMALL_HELDOUT_TOKENS, small_heldout

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_thresholds():
    assert small_heldout(SMALL_HELDOUT_RECORDS, SMALL_HELDOUT_TOKENS) is None
    assert "49 records and 5,000 tokens" in (small_heldout(SMALL_HELDOUT_RECORDS - 1, 5000) or "")
    assert "500 records and 999 tokens" in (small_heldout(500, SMALL_HELDOUT_TOKENS - 1) or "")


def test_a_four_record_heldout_split_is_flagged(tmp_path, teacher_dir, student_dir, alpaca_jsonl, capsys):
    # 16 records, a quarter held out: 4
    config = tiny_run(
        tmp_path / "run",
        teacher=str(teacher_dir),
        student=str(student_dir),
        data=str(alpaca_jsonl),
        max_steps=1,
    )
    dump_yaml(config, tmp_path / "c.yaml")
    assert main(["distill", "--config", str(tmp_path / "c.yaml")]) == 0
    out, err = capsys.readouterr()
    assert "warning: the held-out metrics are over 4 records and " in out
    assert "held-out: the held-out metrics are over 4 records" in err  # the log's warning
