"""Chat data the teacher itself answered: the real-model proof of concept in docs/compare.md.

A travel-support bot's questions (capital, currency, language, time zone, plug type of ~100 countries, a
few phrasings each), answered by the teacher's own greedy decoding, split into training and held-out
records. On such data `llm-neo compare --score teacher` measures fidelity: how often a student's greedy
answer equals the teacher's. Answers that reach --max-new-tokens without an end of turn are dropped
(the count is printed), so every record ends as the teacher ended it.

    python examples/teacher_answered.py --teacher runs/smollm2 --out data/ --train 300 --heldout 120
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

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


def prompts(seed: int) -> list[dict]:
    """Every (country, question) as a chat record with its skill, in a seeded order; the assistant turn
    is a placeholder (generation renders the turns before it) that the teacher's answer replaces."""
    records = [
        {
            "messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": q.format(c=c)},
                {"role": "assistant", "content": "?"},
            ],
            "skill": skill,
        }
        for c in COUNTRIES
        for skill, questions in QUESTIONS.items()
        for q in questions
    ]
    random.Random(seed).shuffle(records)
    return records


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
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.teacher)
    model = AutoModelForCausalLM.from_pretrained(args.teacher, torch_dtype=torch.float32)
    records = prompts(args.seed)[: args.train + args.heldout]
    answers, stopped = greedy_generations(
        model, tokenizer, records, device=torch.device("cpu"), max_new_tokens=args.max_new_tokens
    )
    kept = [
        {**r, "messages": [*r["messages"][:-1], {"role": "assistant", "content": a}]}
        for r, a, done in zip(records, answers, stopped, strict=True)
        if done and a
    ]
    print(
        f"{len(kept)} of {len(records)} answers ended within {args.max_new_tokens} tokens (the rest dropped)"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    cut = round(len(kept) * args.train / (args.train + args.heldout))
    for name, part in (("train", kept[:cut]), ("heldout", kept[cut:])):
        path = args.out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part))
        print(f"{path}: {len(part)} records")


if __name__ == "__main__":
    main()
