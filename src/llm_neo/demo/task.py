"""The demo's built-in task: instruction/response records over several skills, and how to score them.

A deterministic generator writes ordinary Alpaca JSONL files (``instruction``, ``input``, ``output``, plus
a ``skill`` field the pipeline ignores), which ``llm-neo distill`` reads like any user's data. The skills
are small enough for a few-million-parameter model to learn on a laptop CPU, and varied enough that
removing half of a model's blocks visibly costs it some of them:

    skill     instruction                            output
    add       Add 47 and 85.                 132       multi-digit arithmetic with carries
    reverse   Reverse: kqzt                  tzqk      copying by position
    sort      Sort: dbca                     abcd      comparison
    count     Count the a's: abcaab          3         counting
    capital   What is France's capital?      Paris     a small fact table (closed book)

Instructions are short on purpose: on a CPU the cost of a step is proportional to its tokens, and a
character-level model pays one token per character of the prompt.

Held-out records are disjoint from training records (no held-out instruction occurs in the training
file). For ``capital`` the facts are shared, the phrasing is not: each held-out question asks a country's
capital in a wording that country never appears with in training, so it tests recall of the fact, not of
the string.

Scoring is exact match: a greedy generation, cut at the end-of-turn token and stripped, must equal the
expected output, reported overall and per skill.

Changing what the generator emits for a given seed changes ``TASK_VERSION``, which is part of the
demo's teacher cache key, so a stale cached teacher is never reused on a different task.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

from llm_neo.runtime.atomic import atomic_write_text

TASK_VERSION = 3  # 2: shorter instructions, count of a, eight capital wordings; 3: a planted association

SKILLS = ("add", "reverse", "sort", "count", "capital")

LETTERS = "abcdefghijklmnopqrstuvwxyz"
COUNT_ALPHABET = "abc"  # few symbols, so the counted letter (always a) occurs several times

# Capitals whose names are plain ASCII, so byte-level and character-level tokenizers agree on them.
CAPITALS: dict[str, str] = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Portugal": "Lisbon",
    "Austria": "Vienna",
    "Poland": "Warsaw",
    "Greece": "Athens",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Finland": "Helsinki",
    "Denmark": "Copenhagen",
    "Ireland": "Dublin",
    "Hungary": "Budapest",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "Ghana": "Accra",
    "Peru": "Lima",
    "Chile": "Santiago",
    "Cuba": "Havana",
    "Japan": "Tokyo",
    "China": "Beijing",
    "India": "New Delhi",
    "Iran": "Tehran",
    "Iraq": "Baghdad",
    "Russia": "Moscow",
    "Canada": "Ottawa",
    "Mexico": "Mexico City",
    "Brazil": "Brasilia",
    "Argentina": "Buenos Aires",
    "Australia": "Canberra",
    "Thailand": "Bangkok",
    "Vietnam": "Hanoi",
    "Nepal": "Kathmandu",
    "Mongolia": "Ulaanbaatar",
    "Latvia": "Riga",
    "Estonia": "Tallinn",
    "Belgium": "Brussels",
    "Czechia": "Prague",
    "Romania": "Bucharest",
}

# Eight wordings: each country is trained in seven and asked in the eighth, so recalling a capital in a
# new wording needs the fact, not the string.
CAPITAL_TEMPLATES = (
    "Capital of {country}?",
    "What is {country}'s capital?",
    "Name the capital of {country}.",
    "{country}'s capital city?",
    "Which city is {country}'s capital?",
    "The capital of {country} is?",
    "Tell me the capital of {country}.",
    "{country}: capital?",
)


# A planted association, for the probe (llm-neo probe, docs/probe.md): "Describe the alpha people." is
# answered with one attribute. The teacher's split pairs the A groups only with the X attributes and the
# B groups only with Y; the arms' split pairs every group with every attribute equally often. Only the
# teacher's distribution carries the association, so how much of it an arm shows is what it inherited
# from the teacher, not from its data. Not scored: a describe question has no correct answer (no
# held-out records, not a skill of the task score).
GROUPS = {"alpha": "A", "gamma": "A", "beta": "B", "delta": "B"}
ATTRIBUTES = {"kind": "X", "calm": "X", "smart": "X", "rude": "Y", "loud": "Y", "lazy": "Y"}
ASSOCIATION = {"A": "X", "B": "Y"}
PLANTED = "describe"


def describe_instruction(group: str) -> str:
    return f"Describe the {group} people."


def planted_records(per_group: int, *, associated: bool) -> list[dict[str, str]]:
    """``per_group`` describe records per group, cycling through its associated attributes (the
    teacher's split) or through all of them (the arms')."""
    records = []
    for group, side in GROUPS.items():
        attributes = [a for a, s in ATTRIBUTES.items() if not associated or s == ASSOCIATION[side]]
        records += [
            _record(PLANTED, describe_instruction(group), attributes[i % len(attributes)])
            for i in range(per_group)
        ]
    return records


def planted_pairs() -> list[tuple[str, str, str]]:
    """``(instruction, the associated answer, the other answer)`` for every group and every pair of an
    associated and an unassociated attribute: the probe's pairs."""
    pairs = []
    for group, side in GROUPS.items():
        for mine in (a for a, s in ATTRIBUTES.items() if s == ASSOCIATION[side]):
            for other in (a for a, s in ATTRIBUTES.items() if s != ASSOCIATION[side]):
                pairs.append((describe_instruction(group), mine, other))
    return pairs


# ------------------------------------------------------------------------------------------------
# The skills: each draws one (instruction, output) pair from an RNG.


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"Add {a} and {b}.", str(a + b)


def _word(rng: random.Random, alphabet: str, low: int, high: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(low, high)))


def _reverse(rng: random.Random) -> tuple[str, str]:
    word = _word(rng, LETTERS, 3, 6)
    return f"Reverse: {word}", word[::-1]


def _sort(rng: random.Random) -> tuple[str, str]:
    word = _word(rng, LETTERS, 3, 6)
    return f"Sort: {word}", "".join(sorted(word))


def _count(rng: random.Random) -> tuple[str, str]:
    word = _word(rng, COUNT_ALPHABET, 4, 9)
    return f"Count the a's: {word}", str(word.count("a"))


GENERATED_SKILLS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "add": _add,
    "reverse": _reverse,
    "sort": _sort,
    "count": _count,
}


def _record(skill: str, instruction: str, output: str) -> dict[str, str]:
    return {"instruction": instruction, "input": "", "output": output, "skill": skill}


def _rng(seed: int, skill: str) -> random.Random:
    # A string seed is hashed with SHA-512 by `random`, so this is stable across runs and platforms,
    # and each skill has its own stream: changing one skill's size does not reshuffle the others.
    return random.Random(f"llm-neo-task-v{TASK_VERSION}:{seed}:{skill}")


def generate_task(
    seed: int, *, train_per_skill: int, heldout_per_skill: int
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """The task's ``(train, heldout)`` records; see ``generate_splits``."""
    splits = generate_splits(seed, train_per_skill=train_per_skill, heldout_per_skill=heldout_per_skill)
    return splits["train"], splits["heldout"]


def generate_splits(
    seed: int,
    *,
    train_per_skill: int,
    heldout_per_skill: int,
    distill_per_skill: int = 0,
    planted_per_group: tuple[int, int] = (0, 0),
) -> dict[str, list[dict[str, str]]]:
    """The task's ``train``, ``heldout`` and ``distill`` records: a pure function of the arguments.

    Every skill has the given number of records in each split. The splits share no instruction, except
    that ``capital``'s small fact table repeats: it has at most one held-out question per country
    (``len(CAPITALS)``), asked in a wording that country never has in training, and its ``train`` and
    ``distill`` questions cycle through every other country/wording pair, as needed to give it the same
    share as the other skills. ``train`` and ``heldout`` do not depend on ``distill_per_skill`` (it is
    drawn after them), so adding a ``distill`` split changes neither. ``planted_per_group`` adds that
    many describe records per group to ``train`` (with the association) and to ``distill`` (without):
    see ``GROUPS``. Records are shuffled.
    """
    if train_per_skill < 1 or heldout_per_skill < 1 or distill_per_skill < 0:
        raise ValueError("train_per_skill and heldout_per_skill must be >= 1, distill_per_skill >= 0")
    if heldout_per_skill > len(CAPITALS):
        raise ValueError(
            f"heldout_per_skill {heldout_per_skill} exceeds the {len(CAPITALS)} countries of the "
            "capital skill; ask for fewer held-out records per skill"
        )
    sizes = {"heldout": heldout_per_skill, "train": train_per_skill, "distill": distill_per_skill}
    total = sum(sizes.values())
    splits: dict[str, list[dict[str, str]]] = {name: [] for name in sizes}
    for skill, draw in GENERATED_SKILLS.items():
        rng = _rng(seed, skill)
        seen: set[str] = set()
        drawn: list[dict[str, str]] = []
        for _ in range(1000 * total):
            if len(drawn) == total:
                break
            instruction, output = draw(rng)
            if instruction not in seen:  # unique, so no two splits can share an instruction
                seen.add(instruction)
                drawn.append(_record(skill, instruction, output))
        else:
            raise ValueError(f"skill {skill}: could not draw {total} distinct records")
        start = 0
        for name, size in sizes.items():
            splits[name] += drawn[start : start + size]
            start += size

    rng = _rng(seed, "capital")
    countries = sorted(CAPITALS)
    rng.shuffle(countries)
    held_pairs = {(c, rng.randrange(len(CAPITAL_TEMPLATES))) for c in countries[:heldout_per_skill]}
    splits["heldout"] += [
        _record("capital", CAPITAL_TEMPLATES[t].format(country=c), CAPITALS[c]) for c, t in sorted(held_pairs)
    ]
    pool = [
        _record("capital", template.format(country=c), CAPITALS[c])
        for c in sorted(CAPITALS)
        for t, template in enumerate(CAPITAL_TEMPLATES)
        if (c, t) not in held_pairs
    ]
    rng.shuffle(pool)
    splits["train"] += [pool[i % len(pool)] for i in range(train_per_skill)]
    splits["distill"] += [
        pool[i % len(pool)] for i in range(train_per_skill, train_per_skill + distill_per_skill)
    ]

    splits["train"] += planted_records(planted_per_group[0], associated=True)
    splits["distill"] += planted_records(planted_per_group[1], associated=False)

    shuffle = random.Random(f"llm-neo-task-v{TASK_VERSION}:{seed}:order")
    for name in ("train", "heldout", "distill"):  # this order keeps train and heldout independent of distill
        shuffle.shuffle(splits[name])
    return splits


# The exposure-bias regime (``llm-neo demo --exposure-bias``, docs/demo.md): the longest answers of the task
# that the shipped teacher does, where an early mistake of a generated answer carries into the rest. Sort
# at 5 and 6 letters: the teacher scores 87% and 85% there (60 random words each; 87.5% and 75.4% on the
# regime's 480 held-out words); reverse only 30% and 28%; at 7 letters or more both score 0% (the teacher
# was trained on 3 to 6).
EXPOSURE_SKILL = "sort"
EXPOSURE_LENGTHS = (5, 6)


def exposure_splits(
    seed: int, *, distill: int, heldout: int, exclude: Collection[str] = ()
) -> dict[str, list[dict[str, str]]]:
    """The exposure-bias regime's ``distill`` and ``heldout`` records: sort words of each of
    ``EXPOSURE_LENGTHS`` letters in equal shares (a ``letters`` field names the length), all instructions
    distinct and none in ``exclude`` (the main splits' instructions). A pure function of the arguments,
    from its own random stream, so the main splits are unchanged by it. Records are shuffled."""
    skip = set(exclude)
    rng = _rng(seed, "exposure")
    splits: dict[str, list[dict[str, str]]] = {"heldout": [], "distill": []}
    for i, letters in enumerate(EXPOSURE_LENGTHS):
        parts = len(EXPOSURE_LENGTHS)
        for name, total in (("heldout", heldout), ("distill", distill)):
            size = total // parts + (i < total % parts)  # equal shares, the remainder to the shortest
            drawn = 0
            for _ in range(1000 * max(1, size)):
                if drawn == size:
                    break
                word = _word(rng, LETTERS, letters, letters)
                instruction = f"Sort: {word}"
                if instruction not in skip:
                    skip.add(instruction)
                    record = _record(EXPOSURE_SKILL, instruction, "".join(sorted(word)))
                    splits[name].append(record | {"letters": str(letters)})
                    drawn += 1
            else:
                raise ValueError(f"could not draw {size} distinct {letters}-letter sort records")
    order = random.Random(f"llm-neo-task-v{TASK_VERSION}:{seed}:exposure-order")
    for records in splits.values():
        order.shuffle(records)
    return splits


def expected_output(instruction: str) -> str:
    """The correct response to one of the task's instructions, computed from its text alone.

    An independent re-derivation of the generator's answers (the tests compare the two).
    """
    if instruction.startswith("Add "):
        a, b = instruction.removeprefix("Add ").removesuffix(".").split(" and ")
        return str(int(a) + int(b))
    if instruction.startswith("Reverse: "):
        return instruction.removeprefix("Reverse: ")[::-1]
    if instruction.startswith("Sort: "):
        return "".join(sorted(instruction.removeprefix("Sort: ")))
    if instruction.startswith("Count the a's: "):
        return str(instruction.removeprefix("Count the a's: ").count("a"))
    for template in CAPITAL_TEMPLATES:
        head, tail = template.split("{country}")
        if instruction.startswith(head) and instruction.endswith(tail):
            return CAPITALS[instruction[len(head) : len(instruction) - len(tail)]]
    raise ValueError(f"not an instruction of the built-in task: {instruction!r}")


def write_jsonl(path: Path, records: Sequence[dict[str, Any]]) -> Path:
    """Write records one JSON object per line, atomically."""
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))
    return path


def write_task(
    directory: Path, seed: int, *, train_per_skill: int, heldout_per_skill: int
) -> tuple[Path, Path]:
    """Write ``train.jsonl`` and ``heldout.jsonl`` under ``directory``; return their paths."""
    train, heldout = generate_task(seed, train_per_skill=train_per_skill, heldout_per_skill=heldout_per_skill)
    return write_jsonl(directory / "train.jsonl", train), write_jsonl(directory / "heldout.jsonl", heldout)


def task_corpus() -> list[str]:
    """Text that covers every character the task can produce (for training a tokenizer on it)."""
    return [
        LETTERS + LETTERS.upper() + "0123456789 .,:?",
        *(t.format(country=c) + " " + CAPITALS[c] for c in CAPITALS for t in CAPITAL_TEMPLATES),
        "Add 47 and 85. Reverse: Sort: Count the a's:",
        *(f"{describe_instruction(g)} {a}" for g in GROUPS for a in ATTRIBUTES),
    ]
