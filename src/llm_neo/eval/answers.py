"""How a model's greedy answers ended: the signs that a model did not learn to answer.

A model that has not learned a chat task rarely answers wrongly and briefly; it runs on to the token
limit without an end of turn, or repeats a phrase ("The answer to the question: The answer to the
question: ..."). Counting those beside the task score tells "no arm learned the task" apart from "the
arms learned it equally".
"""

from __future__ import annotations

from collections.abc import Sequence

from llm_neo.records.compare import AnswerStats

# A loop is an n-gram of LOOP_MIN_N..LOOP_MAX_N words that repeats back to back LOOP_REPEATS times, or
# whose back-to-back repeats cover LOOP_COVERAGE of the answer's words.
LOOP_MIN_N = 3
LOOP_MAX_N = 8
LOOP_REPEATS = 3
LOOP_COVERAGE = 0.5


def loops(text: str) -> bool:
    """Whether ``text`` repeats an n-gram loop: some run of n words (3 <= n <= 8, split on whitespace)
    repeated back to back at least 3 times, or repeated back to back (twice or more) over at least half
    of the answer's words. Punctuation stays part of a word, so "question:" and "question" differ."""
    words = text.split()
    for n in range(LOOP_MIN_N, LOOP_MAX_N + 1):
        for start in range(len(words) - 2 * n + 1):
            gram = words[start : start + n]
            repeats = 1
            while words[start + repeats * n : start + (repeats + 1) * n] == gram:
                repeats += 1
            if repeats >= LOOP_REPEATS or (repeats >= 2 and repeats * n >= LOOP_COVERAGE * len(words)):
                return True
    return False


def answer_stats(answers: Sequence[str], stopped: Sequence[bool]) -> AnswerStats:
    """The counts of ``answers`` that never stopped (``stopped[i]`` False: the generation reached its
    token limit without an end-of-turn or eos token), that loop (``loops``) and that are empty."""
    if len(answers) != len(stopped):
        raise ValueError(f"{len(answers)} answers but {len(stopped)} stop flags")
    return AnswerStats(
        total=len(answers),
        never_stopped=sum(not s for s in stopped),
        looping=sum(loops(a) for a in answers),
        empty=sum(not a.strip() for a in answers),
    )


def pooled(stats: Sequence[AnswerStats]) -> AnswerStats:
    """The counts of several models' answers together (the arms' seeds, or every arm)."""
    return AnswerStats(
        total=sum(s.total for s in stats),
        never_stopped=sum(s.never_stopped for s in stats),
        looping=sum(s.looping for s in stats),
        empty=sum(s.empty for s in stats),
    )
