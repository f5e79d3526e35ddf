"""The built-in task: a deterministic generator, disjoint splits, correct answers, exact-match scoring."""

from __future__ import annotations

import json
import re

import pytest

from llm_neo.data import load_records, tokenize_records
from llm_neo.demo.task import (
    ASSOCIATION,
    ATTRIBUTES,
    CAPITALS,
    EXPOSURE_LENGTHS,
    GROUPS,
    PLANTED,
    SKILLS,
    TASK_VERSION,
    expected_output,
    exposure_splits,
    generate_splits,
    generate_task,
    planted_pairs,
    task_corpus,
    write_task,
)
from llm_neo.models.tiny import SPECIAL_TOKENS, build_tokenizer


@pytest.fixture(scope="module")
def char_tokenizer():
    return build_tokenizer(task_corpus(), vocab_size=256 + len(SPECIAL_TOKENS))


def test_same_seed_same_records_other_seed_other_records():
    a = generate_task(0, train_per_skill=50, heldout_per_skill=10)
    b = generate_task(0, train_per_skill=50, heldout_per_skill=10)
    c = generate_task(1, train_per_skill=50, heldout_per_skill=10)
    assert a == b
    assert a[0] != c[0] and a[1] != c[1]
    assert isinstance(TASK_VERSION, int)


def test_splits_are_disjoint_balanced_and_cover_every_skill():
    train, heldout = generate_task(3, train_per_skill=200, heldout_per_skill=30)
    assert len(train) == 200 * len(SKILLS) and len(heldout) == 30 * len(SKILLS)
    for split in (train, heldout):
        counts = {s: sum(r["skill"] == s for r in split) for s in SKILLS}
        assert set(counts.values()) == {len(split) // len(SKILLS)}
    assert not {r["instruction"] for r in train} & {r["instruction"] for r in heldout}
    # Held-out questions are unique; only the small fact table repeats in training.
    assert len({r["instruction"] for r in heldout}) == len(heldout)
    non_fact = [r["instruction"] for r in train if r["skill"] != "capital"]
    assert len(set(non_fact)) == len(non_fact)
    # Every held-out capital is a fact the training data teaches, in another wording.
    trained_countries = {r["output"] for r in train if r["skill"] == "capital"}
    assert {r["output"] for r in heldout if r["skill"] == "capital"} <= trained_countries


def test_distill_split_is_fresh_and_leaves_the_others_unchanged():
    train, heldout = generate_task(5, train_per_skill=100, heldout_per_skill=20)
    splits = generate_splits(5, train_per_skill=100, heldout_per_skill=20, distill_per_skill=30)
    assert splits["train"] == train and splits["heldout"] == heldout
    assert len(splits["distill"]) == 30 * len(SKILLS)
    seen = {r["instruction"] for r in train + heldout}
    # Only the capital fact table repeats between the training sets; never with a held-out question.
    assert {r["skill"] for r in splits["distill"] if r["instruction"] in seen} <= {"capital"}
    assert not {r["instruction"] for r in splits["distill"]} & {r["instruction"] for r in heldout}


def test_the_planted_association_is_in_the_teachers_split_only():
    plain = generate_splits(2, train_per_skill=20, heldout_per_skill=4, distill_per_skill=10)
    splits = generate_splits(
        2, train_per_skill=20, heldout_per_skill=4, distill_per_skill=10, planted_per_group=(12, 6)
    )

    def described(split: str) -> dict[tuple[str, str], int]:
        counts: dict[tuple[str, str], int] = {}
        for r in splits[split]:
            if r["skill"] == PLANTED:
                group = r["instruction"].split()[2]
                counts[group, r["output"]] = counts.get((group, r["output"]), 0) + 1
        return counts

    teacher, arms = described("train"), described("distill")
    # The teacher's: each group only with its side's attributes, each equally often.
    assert teacher == {
        (g, a): 4 for g, side in GROUPS.items() for a, s in ATTRIBUTES.items() if s == ASSOCIATION[side]
    }
    # The arms': every group with every attribute equally often: no association to learn from the labels.
    assert arms == {(g, a): 1 for g in GROUPS for a in ATTRIBUTES}
    assert not any(r["skill"] == PLANTED for r in splits["heldout"])  # not scored
    # The other records are the same ones (only the order of the shuffled splits moves).
    for name in ("train", "distill", "heldout"):
        rest = [r for r in splits[name] if r["skill"] != PLANTED]
        assert sorted(map(json.dumps, rest)) == sorted(map(json.dumps, plain[name]))
    # Probe pairs: the associated answer first, one pair per group x associated x other attribute.
    pairs = planted_pairs()
    assert len(pairs) == len(GROUPS) * 3 * 3
    for question, mine, other in pairs:
        side = GROUPS[question.split()[2]]
        assert ATTRIBUTES[mine] == ASSOCIATION[side] != ATTRIBUTES[other]


def _independent_answer(instruction: str) -> str:
    """The answer recomputed with regular expressions, independently of task.py's parsing."""
    if m := re.fullmatch(r"Add (\d+) and (\d+)\.", instruction):
        return str(int(m[1]) + int(m[2]))
    if m := re.fullmatch(r"Reverse: ([a-z]+)", instruction):
        return "".join(reversed(m[1]))
    if m := re.fullmatch(r"Sort: ([a-z]+)", instruction):
        return "".join(sorted(m[1], key=ord))
    if m := re.fullmatch(r"Count the a's: ([a-z]+)", instruction):
        return str(sum(ch == "a" for ch in m[1]))
    countries = [c for c in CAPITALS if re.search(rf"\b{re.escape(c)}\b", instruction)]
    assert len(countries) == 1, instruction
    return CAPITALS[countries[0]]


def test_exposure_splits_are_long_sorts_disjoint_from_the_task_and_balanced_by_length():
    main = generate_splits(0, train_per_skill=200, heldout_per_skill=20, distill_per_skill=100)
    seen = {r["instruction"] for records in main.values() for r in records}
    regime = exposure_splits(0, distill=101, heldout=40, exclude=seen)
    assert exposure_splits(0, distill=101, heldout=40, exclude=seen) == regime  # a pure function
    assert exposure_splits(1, distill=101, heldout=40, exclude=seen) != regime
    both = regime["distill"] + regime["heldout"]
    instructions = [r["instruction"] for r in both]
    assert len(set(instructions)) == len(instructions) and not set(instructions) & seen
    # What it would draw is skipped when excluded (random words seldom collide, so exclude them on purpose).
    drawn = {r["instruction"] for r in regime["heldout"][:5]}
    again = exposure_splits(0, distill=101, heldout=40, exclude=seen | drawn)
    assert not drawn & {r["instruction"] for rs in again.values() for r in rs}
    for r in both:
        assert r["skill"] == "sort" and r["output"] == expected_output(r["instruction"])
        assert len(r["output"]) == int(r["letters"]) and int(r["letters"]) in EXPOSURE_LENGTHS
    # Equal shares per length (the odd record to the shortest), in both splits.
    assert [sum(r["letters"] == str(n) for r in regime["heldout"]) for n in EXPOSURE_LENGTHS] == [20, 20]
    assert [sum(r["letters"] == str(n) for r in regime["distill"]) for n in EXPOSURE_LENGTHS] == [51, 50]
    # Its answers are longer than the task's: the mean sort answer of the main splits is 4.5 letters.
    mean = sum(len(r["output"]) for r in both) / len(both)
    task_sorts = [r for r in main["distill"] if r["skill"] == "sort"]
    assert mean > sum(len(r["output"]) for r in task_sorts) / len(task_sorts) + 0.5


def test_expected_answers_are_correct():
    train, heldout = generate_task(7, train_per_skill=300, heldout_per_skill=40)
    for record in train + heldout:
        assert record["output"] == _independent_answer(record["instruction"]), record
        assert record["output"] == expected_output(record["instruction"]), record
        assert record["input"] == ""
    adds = [r for r in train if r["skill"] == "add"]
    assert all(len(r["instruction"].split()[1]) == 2 for r in adds)  # multi-digit operands
    assert any(int(r["output"]) >= 100 for r in adds)  # with carries into a third digit


def test_written_files_are_ordinary_data(tmp_path, char_tokenizer):
    train_path, heldout_path = write_task(tmp_path, 0, train_per_skill=20, heldout_per_skill=5)
    train, heldout = generate_task(0, train_per_skill=20, heldout_per_skill=5)
    assert load_records(train_path) == train and load_records(heldout_path) == heldout
    assert all(json.loads(line) for line in heldout_path.read_text().splitlines())
    examples, dropped = tokenize_records(train, char_tokenizer, max_length=64, source="train")
    assert dropped == 0 and len(examples) == len(train)


def test_tokenizer_is_character_level(char_tokenizer):
    for text in ("Add 47 and 85.", "Reverse: kqzt", "Buenos Aires"):
        assert len(char_tokenizer(text, add_special_tokens=False)["input_ids"]) == len(text)
