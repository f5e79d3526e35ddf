"""The record of `llm-neo check-pair`: ``PairReport``, what a teacher/student tokenizer pair shares and how
much of the data's responses the cross-tokenizer alignment covers. Built by ``llm_neo.alignment.pair_report``;
printed by check-pair and at the start of a cross-tokenizer distill run, saved as ``pair.json`` in its
run directory and shown in compare's report."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llm_neo.records import OPTIONAL_KEY

PAIR_VERSION = 1


@dataclass
class TokenizerSide:
    """One model's tokenizer, as the pair report shows it."""

    model: str
    vocab_size: int  # the tokenizer's length (added tokens included; logit padding excluded)
    special_tokens: list[str]
    chat_template: bool
    # response tokens per response character over the data (None without --data)
    tokens_per_char: float | None = field(default=None, metadata=OPTIONAL_KEY)


@dataclass
class PairReport:
    """``pair.json``: the pair, and what cross-tokenizer distillation on it can train."""

    schema_version: int
    teacher: TokenizerSide
    student: TokenizerSide
    # The id -> token maps agree (up to padding): the exact same-tokenizer path applies, no alignment.
    exact_path: bool
    shared_tokens: int  # student ids whose text (read mid-sequence) the teacher has
    shared_share: float  # of the student's vocabulary
    data: str | None = field(default=None, metadata=OPTIONAL_KEY)
    examples: int | None = field(default=None, metadata=OPTIONAL_KEY)
    response_chars: int | None = field(default=None, metadata=OPTIONAL_KEY)
    # Share of response characters inside an aligned student token: exactly aligned (what shared-vocab
    # trains) and boundary-aligned (what uld trains).
    coverage_exact: float | None = field(default=None, metadata=OPTIONAL_KEY)
    coverage_boundary: float | None = field(default=None, metadata=OPTIONAL_KEY)
    extra: dict[str, Any] = field(default_factory=dict)


def pair_lines(report: PairReport) -> list[str]:
    """The report as the terminal shows it."""
    lines = []
    for role, side in (("teacher", report.teacher), ("student", report.student)):
        per = "" if side.tokens_per_char is None else f", {side.tokens_per_char:.3f} response tokens/char"
        lines.append(
            f"{role}: {side.model}: {side.vocab_size:,} tokens, {len(side.special_tokens):,} special "
            f"({' '.join(side.special_tokens[:8])}{' ...' if len(side.special_tokens) > 8 else ''}), "
            f"chat template {'yes' if side.chat_template else 'no'}{per}"
        )
    lines.append(
        f"shared: {report.shared_tokens:,} student tokens ({100 * report.shared_share:.1f}%) read as a "
        "teacher token's text"
    )
    if report.coverage_exact is not None and report.coverage_boundary is not None:
        lines.append(
            f"data: {report.examples:,} examples, {report.response_chars:,} response characters; aligned "
            f"coverage {100 * report.coverage_exact:.1f}% exact (shared-vocab), "
            f"{100 * report.coverage_boundary:.1f}% at shared boundaries (uld)"
        )
    lines.append(
        "exact path: yes (same tokenizer up to padding: distill without --cross-tokenizer)"
        if report.exact_path
        else "exact path: no (distill with --cross-tokenizer shared-vocab or uld)"
    )
    return lines
