"""How answers ended: a loop is found where one was planted and nowhere else; the counts add up."""

from __future__ import annotations

import pytest

from llm_neo.eval.answers import answer_stats, loops, pooled
from llm_neo.records.compare import AnswerStats


@pytest.mark.parametrize(
    "text",
    [
        # The students: a 5-word phrase back to back.
        "The answer to the question:\n\nThe answer to the question: The answer to the question:",
        "Paris is the capital. " + "of the of the of the of the of the",  # a 3-word run, 3+ times
        "one two three four five six seven eight " * 2,  # an 8-word run twice: all of the answer
        "the the the the the the the the the",  # one word repeated: a 3-gram three times
    ],
)
def test_a_planted_loop_is_found(text):
    assert loops(text)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Paris",
        "The capital of France is Paris, and its currency is the euro.",
        # A phrase twice among many other words: neither 3 times nor half the answer.
        "I think that it is Paris. Some say that it is Lyon, but most of the maps and books agree on Paris.",
        "a b a b a b",  # a 2-word loop is below the 3-word minimum
    ],
)
def test_an_answer_without_a_loop_is_not_one(text):
    assert not loops(text)


def test_answer_stats_count_never_stopped_looping_and_empty():
    answers = ["Paris", "", "go on go on go on go on", "Euro"]
    stats = answer_stats(answers, [True, True, False, False])
    assert stats == AnswerStats(total=4, never_stopped=2, looping=1, empty=1)
    assert pooled([stats, stats]) == AnswerStats(total=8, never_stopped=4, looping=2, empty=2)
    with pytest.raises(ValueError, match="stop flags"):
        answer_stats(answers, [True])
