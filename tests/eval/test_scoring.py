"""Task scores: each score mode against hand-made answers, per category, and the errors of bad input."""

from __future__ import annotations

import pytest

from llm_neo.demo.task import SKILLS
from llm_neo.errors import ConfigError, DataError
from llm_neo.eval.scoring import normalize, parse_score, reference_response, score_answers


def _alpaca(output: str, skill: str) -> dict:
    return {"instruction": "q", "input": "", "output": output, "skill": skill}


def test_exact_match_per_skill_in_the_tasks_order():
    records = [
        _alpaca("132", "add"),
        _alpaca("77", "add"),
        _alpaca("tzqk", "reverse"),
        _alpaca("Paris", "capital"),
    ]
    result = score_answers(
        records, ["132", " 77 ", "tzq", "paris"], parse_score("exact"), category_field="skill", order=SKILLS
    )
    assert result["correct"] == 2 and result["total"] == 4 and result["accuracy"] == 0.5
    assert list(result["per_category"].items()) == [("add", 1.0), ("reverse", 0.0), ("capital", 0.0)]
    with pytest.raises(ValueError):
        score_answers(records, ["1"], parse_score("exact"))


def test_each_score():
    records = [_alpaca("Paris", "x"), _alpaca("42", "x"), _alpaca("New York", "x")]
    answers = ["paris.", "The answer is 42, surely", "  new   york!"]
    assert score_answers(records, answers, parse_score("exact"))["correct"] == 0
    assert score_answers(records, answers, parse_score("normalized"))["correct"] == 2  # not the 42
    assert score_answers(records, answers, parse_score("contains"))["correct"] == 3
    assert score_answers(records, answers, parse_score(r"regex:answer is (\d+)"))["correct"] == 1
    assert score_answers(records, answers, parse_score(r"regex:\d+"))["correct"] == 1  # the whole match
    assert normalize(" New,  York! ") == "new york"
    # Records without the category field count under "other".
    assert score_answers([{"prompt": "p", "completion": "c"}], ["c"], parse_score("exact"))[
        "per_category"
    ] == {"other": 1.0}


def test_references_of_every_format_and_the_errors():
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    assert reference_response(chat, where="r") == "hello"
    assert reference_response({"prompt": "p", "completion": "c"}, where="r") == "c"
    assert reference_response({"text": "t"}, where="r") is None
    with pytest.raises(DataError, match=r"h.jsonl: 1 of 2 records have no reference response.*records 2"):
        score_answers([_alpaca("a", "x"), {"text": "t"}], ["a", "b"], parse_score("exact"), source="h.jsonl")
    with pytest.raises(ConfigError, match="does not compile"):
        parse_score("regex:(")
    with pytest.raises(ConfigError, match="--score: 'fuzzy' is not one of"):
        parse_score("fuzzy")
