"""Task scores of greedy answers against the records' reference responses.

A score is one of

    exact          the answer equals the reference (both stripped)
    normalized     equal after lower-casing, removing punctuation and collapsing whitespace
    contains       the normalized reference occurs in the normalized answer
    regex:PATTERN  the first match of PATTERN in the answer (its first group, if it has one) equals the
                   reference (both stripped): for answers that wrap the result in text ("The answer is 42")
    teacher        fidelity: equal after normalizing (as "normalized") to the teacher's own greedy answer to
                   the same prompt, which replaces the record's reference (the teacher scores 100% by
                   construction); for data the teacher itself answered, or a task without references

reported overall and per category (a field of the record, ``category`` by default; records without one
count under "other").
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from llm_neo.data import detect_format
from llm_neo.errors import ConfigError, DataError

SCORES = ("exact", "normalized", "contains", "regex:PATTERN", "teacher")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


@dataclass(frozen=True)
class Scorer:
    """A parsed ``--score``: its name (as given) and whether an answer matches a reference."""

    name: str
    matches: Callable[[str, str], bool]  # (answer, reference) -> correct
    against_teacher: bool = False  # the references are the teacher's greedy answers, not the records'


def normalize(text: str) -> str:
    """Lower case, no punctuation, single spaces: what "normalized" and "contains" compare."""
    return " ".join(text.lower().translate(_PUNCTUATION).split())


def parse_score(spec: str) -> Scorer:
    """The scorer named by ``spec`` (one of ``SCORES``); ConfigError naming the option otherwise."""
    if spec == "exact":
        return Scorer(spec, lambda answer, ref: answer.strip() == ref.strip())
    if spec == "normalized":
        return Scorer(spec, _same_normalized)
    if spec == "teacher":
        return Scorer(spec, _same_normalized, against_teacher=True)
    if spec == "contains":
        return Scorer(spec, lambda answer, ref: normalize(ref) in normalize(answer))
    if spec.startswith("regex:"):
        try:
            pattern = re.compile(spec.removeprefix("regex:"))
        except re.error as err:
            raise ConfigError([f"--score {spec!r}: the regular expression does not compile ({err})"]) from err
        return Scorer(spec, lambda answer, ref: _extract(pattern, answer) == ref.strip())
    raise ConfigError([f"--score: {spec!r} is not one of {', '.join(SCORES)}"])


def _same_normalized(answer: str, reference: str) -> bool:
    return normalize(answer) == normalize(reference)


def _extract(pattern: re.Pattern[str], answer: str) -> str | None:
    found = pattern.search(answer)
    if found is None:
        return None
    return (found.group(1) if pattern.groups else found.group(0)).strip()


def reference_response(record: dict[str, Any], *, where: str) -> str | None:
    """The response a record holds for its prompt: an Alpaca ``output``, a chat record's final assistant
    message, a ``completion``; None for a plain-text record (nothing to answer)."""
    fmt = detect_format(record, where=where)
    if fmt == "alpaca":
        return str(record["output"])
    if fmt == "prompt_completion":
        return str(record["completion"])
    if fmt == "chat":
        last = record["messages"][-1]
        return str(last["content"]) if last.get("role") == "assistant" else None
    return None


def references(records: Sequence[dict[str, Any]], *, source: str) -> list[str]:
    """Every record's reference response; DataError naming the file and records that have none."""
    found = [reference_response(r, where=f"{source} record {i}") for i, r in enumerate(records, start=1)]
    missing = [i for i, ref in enumerate(found, start=1) if ref is None]
    if missing:
        shown = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
        raise DataError(
            f"{source}: {len(missing)} of {len(records)} records have no reference response to score "
            f"answers against (records {shown}); a held-out file needs Alpaca (output), "
            "prompt/completion or chat records that end with an assistant message"
        )
    return [ref for ref in found if ref is not None]


def score_answers(
    records: Sequence[dict[str, Any]],
    answers: Sequence[str],
    scorer: Scorer,
    *,
    category_field: str = "category",
    order: Sequence[str] = (),
    source: str = "heldout",
    against: Sequence[str] | None = None,
) -> dict[str, Any]:
    """``{"score", "accuracy", "correct", "total", "per_category"}`` of ``answers`` against the records'
    references (or ``against``, one per record: the teacher's answers for ``--score teacher``);
    categories in ``order`` first, then the others sorted."""
    if len(records) != len(answers) or (against is not None and len(against) != len(records)):
        raise ValueError(f"{len(records)} records but {len(answers)} answers")
    if not records:
        raise DataError(f"{source}: no records to score")
    refs = references(records, source=source) if against is None else list(against)
    totals: dict[str, list[int]] = {}
    for record, answer, ref in zip(records, answers, refs, strict=True):
        hit = int(scorer.matches(answer, ref))
        counts = totals.setdefault(str(record.get(category_field, "other")), [0, 0])
        counts[0] += hit
        counts[1] += 1
    correct = sum(c for c, _ in totals.values())
    ordered = [c for c in order if c in totals] + sorted(set(totals) - set(order))
    return {
        "score": scorer.name,
        "accuracy": correct / len(records),
        "correct": correct,
        "total": len(records),
        "per_category": {c: totals[c][0] / totals[c][1] for c in ordered},
    }
