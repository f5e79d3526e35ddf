"""Every key a run writes is documented: docs/outputs.md lists each key of summary.json and eval.json."""

from __future__ import annotations

import json
import re
from pathlib import Path

from llm_neo.cli import main

DOC = Path(__file__).resolve().parents[1] / "docs" / "outputs.md"
# Objects whose keys are documented elsewhere, as a whole: the options (--help), the export's check.
OPAQUE = {"config", "export.verification", "provenance.versions"}


def documented(section: str) -> set[str]:
    """The backticked key names in the first column of the tables of ``section`` of docs/outputs.md."""
    text = DOC.read_text().split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    keys: set[str] = set()
    for line in text.splitlines():
        if line.startswith("| `"):
            keys |= set(re.findall(r"`([^`]+)`", line.split("|")[1]))
    return keys


def written(record: dict, prefix: str = "") -> set[str]:
    """Every dotted key of a JSON object, into nested objects (not into OPAQUE ones or lists)."""
    keys = set()
    for key, value in record.items():
        name = f"{prefix}{key}"
        keys.add(name)
        if isinstance(value, dict) and name not in OPAQUE:
            keys |= written(value, f"{name}.")
    return keys


def test_every_key_of_summary_and_eval_json_is_documented(tmp_path, student_dir, teacher_dir, alpaca_jsonl):
    common = ["--teacher", str(teacher_dir), "--data", str(alpaca_jsonl), "-q"]
    # A merge check that applies, one that does not, and an on-policy run (its generation cost).
    for method, extra in (("neo", []), ("sft", []), ("neo", ["--on-policy", "1"])):
        out = tmp_path / (f"{method}-on-policy" if extra else method)
        args = [
            "distill",
            "--student",
            str(student_dir),
            "--method",
            method,
            "--output-dir",
            str(out),
            *extra,
        ]
        assert main([*args, *common, "--max-steps", "1", "--lora.r", "4", "--eval-fraction", "0.25"]) == 0
        summary = json.loads((out / "summary.json").read_text())
        missing = written(summary) - documented("summary.json")
        assert not missing, f"summary.json keys missing from docs/outputs.md: {sorted(missing)}"
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert set(records[0]) <= documented("metrics.jsonl")

    assert summary["provenance"]["data"]["train"]["sha256"].startswith("sha256:")
    assert summary["provenance"]["versions"]["torch"] and summary["provenance"]["versions"]["peft"]
    assert summary["provenance"]["started"] <= summary["provenance"]["finished"]

    eval_json = tmp_path / "eval.json"
    assert main(["eval", "--model", str(tmp_path / "neo" / "merged"), *common, "--json", str(eval_json)]) == 0
    record = json.loads(eval_json.read_text())
    # Its provenance is summary.json's, with the roles of eval: model for student, heldout for train.
    roles = {
        "provenance.models.model": "provenance.models.student",
        "provenance.data.heldout": "provenance.data.train",
    }
    keys = set()
    for key in written(record):
        for eval_role, summary_role in roles.items():
            key = key.replace(eval_role, summary_role)
        keys.add(key)
    missing = {k for k in keys if not k.startswith("provenance.")} - documented("eval.json")
    missing |= {k for k in keys if k.startswith("provenance.")} - documented("summary.json")
    assert not missing, f"eval.json keys missing from docs/outputs.md: {sorted(missing)}"
    assert record["provenance"]["models"]["model"]["path"] == str(tmp_path / "neo" / "merged")
    assert (
        record["provenance"]["data"]["heldout"]["sha256"] == summary["provenance"]["data"]["train"]["sha256"]
    )
