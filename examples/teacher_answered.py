"""Data the teacher itself answered: the real-model proof of concept in docs/compare.md, and the
cross-tokenizer pair's records in docs/models.md.

A travel-support bot's questions (capital, currency, language, plug type of ~80 countries, a few
phrasings each), answered by the teacher's own greedy decoding, split into training and held-out
records. On such data `llm-neo compare --score teacher` measures fidelity: how often a student's greedy
answer equals the teacher's. Answers that reach --max-new-tokens without an end of turn are dropped
(the count is printed), so every record ends as the teacher ended it.

    python examples/teacher_answered.py --teacher runs/smollm2 --out data/ --train 300 --heldout 120

A base model (no chat template, e.g. Gemma-3-270M) gets --format prompt_completion: each question as
"Question: ...\nAnswer:", its completion the teacher's text up to the end of that line, leading space
kept, so prompt + completion is exactly what the teacher wrote (answers that end no line are dropped):

    python examples/teacher_answered.py --teacher gemma3 --format prompt_completion --out data/ \
        --train 60 --heldout 24 --max-new-tokens 24
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llm_neo.eval.generate import greedy_generations

SYSTEM = "You are a travel-support assistant. Answer in one short sentence."
COUNTRIES = [
    "Albania",
    "Argentina",
    "Australia",
    "Austria",
    "Bangladesh",
    "Belgium",
    "Bolivia",
    "Brazil",
    "Bulgaria",
    "Cambodia",
    "Canada",
    "Chile",
    "China",
    "Colombia",
    "Croatia",
    "Cuba",
    "Czechia",
    "Denmark",
    "Ecuador",
    "Egypt",
    "Estonia",
    "Ethiopia",
    "Finland",
    "France",
    "Georgia",
    "Germany",
    "Ghana",
    "Greece",
    "Hungary",
    "Iceland",
    "India",
    "Indonesia",
    "Iran",
    "Ireland",
    "Israel",
    "Italy",
    "Jamaica",
    "Japan",
    "Jordan",
    "Kenya",
    "Laos",
    "Latvia",
    "Lebanon",
    "Lithuania",
    "Luxembourg",
    "Malaysia",
    "Mexico",
    "Mongolia",
    "Morocco",
    "Nepal",
    "Netherlands",
    "Nigeria",
    "Norway",
    "Pakistan",
    "Panama",
    "Peru",
    "Philippines",
    "Poland",
    "Portugal",
    "Qatar",
    "Romania",
    "Russia",
    "Senegal",
    "Serbia",
    "Singapore",
    "Slovakia",
    "Slovenia",
    "Spain",
    "Sweden",
    "Switzerland",
    "Taiwan",
    "Tanzania",
    "Thailand",
    "Tunisia",
    "Turkey",
    "Uganda",
    "Ukraine",
    "Uruguay",
    "Venezuela",
    "Vietnam",
    "Zambia",
]
QUESTIONS = {
    "capital": ("What is the capital of {c}?", "Which city is the capital of {c}?"),
    "currency": ("Which currency do they use in {c}?", "What money should I bring to {c}?"),
    "language": ("What language do people speak in {c}?", "Which language is spoken in {c}?"),
    "plugs": ("Which power plugs are used in {c}?",),
}


FORMATS = ("chat", "prompt_completion")


def prompts(seed: int, fmt: str = "chat") -> list[dict]:
    """Every (country, question) as a record of ``fmt`` with its skill, in a seeded order; the response
    (the assistant turn, or the completion) is a placeholder that the teacher's answer replaces."""
    records = [
        _question(q.format(c=c), fmt) | {"skill": skill}
        for c in COUNTRIES
        for skill, questions in QUESTIONS.items()
        for q in questions
    ]
    random.Random(seed).shuffle(records)
    return records


def _question(question: str, fmt: str) -> dict:
    if fmt == "prompt_completion":
        return {"prompt": f"Question: {question}\nAnswer:", "completion": "?"}
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": question},
            {"role": "assistant", "content": "?"},
        ]
    }


def answered(record: dict, answer: str) -> dict:
    """``record`` with the teacher's ``answer`` as its response."""
    if "completion" in record:
        return {**record, "completion": answer}
    return {**record, "messages": [*record["messages"][:-1], {"role": "assistant", "content": answer}]}


def teacher_answered(
    model: torch.nn.Module, tokenizer: Any, records: list[dict], *, max_new_tokens: int
) -> list[dict]:
    """``records`` answered by the teacher's greedy decoding, those whose answer ended within
    ``max_new_tokens`` (at the end of turn; for prompt_completion records, at the end of the line)."""
    base = bool(records) and "completion" in records[0]
    answers, stopped = greedy_generations(
        model,
        tokenizer,
        records,
        device=torch.device("cpu"),
        max_new_tokens=max_new_tokens,
        end_at="\n" if base else None,
    )
    return [
        answered(r, a) for r, a, done in zip(records, answers, stopped, strict=True) if done and a.strip()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--teacher", required=True, help="the teacher's model directory")
    parser.add_argument("--out", required=True, type=Path, help="where train.jsonl and heldout.jsonl go")
    parser.add_argument("--train", type=int, default=300)
    parser.add_argument("--heldout", type=int, default=120)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--format", choices=FORMATS, default="chat", help="prompt_completion for a base model (see above)"
    )
    parser.add_argument(
        "--ask",
        type=int,
        default=None,
        help="questions asked (default --train + --heldout; more leaves "
        "room for dropped answers, the split is then cut to --train + --heldout)",
    )
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.teacher)
    model = AutoModelForCausalLM.from_pretrained(args.teacher, dtype=torch.float32)
    wanted = args.train + args.heldout
    records = prompts(args.seed, args.format)[: args.ask or wanted]
    kept = teacher_answered(model, tokenizer, records, max_new_tokens=args.max_new_tokens)
    print(
        f"{len(kept)} of {len(records)} answers ended within {args.max_new_tokens} tokens (the rest dropped)"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    kept = kept[:wanted]
    cut = round(len(kept) * args.train / wanted)
    for name, part in (("train", kept[:cut]), ("heldout", kept[cut:])):
        path = args.out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part))
        print(f"{path}: {len(part)} records")


if __name__ == "__main__":
    main()
