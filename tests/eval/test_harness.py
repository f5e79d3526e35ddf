"""lm-evaluation-harness on a merged student, offline: a local task YAML over a local JSONL file, scored by
lm-eval's own `hf` model; its accuracy equals a hand computation of the same log-likelihoods, and
`llm-neo compare --lm-eval-tasks` records exactly what lm-eval reports for each arm."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_comparison, write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer

from llm_neo.errors import ConfigError

pytest.importorskip("lm_eval", reason="the eval extra is not installed: pip install 'llm-neo[eval]'")

from llm_neo.eval.harness import lm_eval_scores

pytestmark = pytest.mark.usefixtures("one_thread")

DOCS = [
    {"question": "Add 2 and 3.", "choices": ["5", "6", "7"], "label": 0},
    {"question": "Reverse: abc", "choices": ["abc", "cba", "bca"], "label": 1},
    {"question": "Capital of France?", "choices": ["Rome", "Paris", "Oslo"], "label": 1},
    {"question": "Sort: cab", "choices": ["abc", "cab", "bac"], "label": 0},
    {"question": "Count the a's: aab", "choices": ["1", "2", "3"], "label": 1},
    {"question": "What is 4 minus 1?", "choices": ["2", "3", "4"], "label": 1},
]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lm-eval-task")
    data = write_jsonl(root / "docs.jsonl", DOCS)
    (root / "tiny_choice.yaml").write_text(
        "task: tiny_choice\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        f"  data_files:\n    test: {json.dumps(str(data))}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    return root


def hand_accuracy(model_dir: Path) -> float:
    """Each choice's summed log-probability after the question, as lm-eval computes it: the continuation
    is " " + choice, its tokens those of the whole text past the question's, no special tokens."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    correct = 0
    for doc in DOCS:
        scores = []
        for choice in doc["choices"]:
            context = tokenizer(doc["question"], add_special_tokens=False)["input_ids"]
            whole = tokenizer(doc["question"] + " " + choice, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logprobs = model(torch.tensor([whole])).logits[0].log_softmax(-1)
            scores.append(sum(float(logprobs[t - 1, whole[t]]) for t in range(len(context), len(whole))))
        correct += int(max(range(len(scores)), key=scores.__getitem__) == doc["label"])
    return correct / len(DOCS)


def test_a_local_task_scores_what_a_hand_computation_gives(teacher_dir, task_dir):
    scores = lm_eval_scores(
        str(teacher_dir), ["tiny_choice"], include=str(task_dir), device=torch.device("cpu")
    )
    assert scores["tiny_choice"]["acc"] == pytest.approx(hand_accuracy(teacher_dir))
    assert "acc_stderr" in scores["tiny_choice"]
    with pytest.raises(ConfigError, match="lm-eval knows no task no_such_task"):
        lm_eval_scores(str(teacher_dir), ["no_such_task"], include=str(task_dir), device=torch.device("cpu"))


@pytest.mark.slow
def test_compare_records_lm_evals_scores_for_every_model(tmp_path, teacher_dir, student_dir, task_dir):
    from llm_neo.commands.compare import compare

    records = [{"instruction": f"Add {i} and 1.", "output": str(i + 1)} for i in range(12)]
    results = compare(
        tiny_comparison(
            teacher_dir,
            student_dir,
            tmp_path / "out",
            data=str(write_jsonl(tmp_path / "train.jsonl", records)),
            methods=["neo"],
            seeds=1,
            eval_fraction=0.25,
            lm_eval_tasks=["tiny_choice"],
            lm_eval_include=str(task_dir),
        )
    )
    assert results is not None and results.models.teacher is not None
    (run,) = results.groups[0].runs
    merged = run.output_dir / "merged"
    assert run.lm_eval is not None and results.models.teacher.lm_eval is not None
    assert run.lm_eval["tiny_choice"]["acc"] == pytest.approx(hand_accuracy(merged))
    assert results.models.teacher.lm_eval["tiny_choice"]["acc"] == pytest.approx(hand_accuracy(teacher_dir))
