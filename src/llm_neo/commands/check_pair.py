"""`llm-neo check-pair`: what a teacher and a student tokenizer share, before anything trains.

Loads the two tokenizers only (no weights), then reports (``records.pair.PairReport``): vocabulary sizes,
the share of the student's vocabulary whose text the teacher has, the special tokens on each side, and,
with ``--data``, how the responses tokenize on each side and the share of response characters
cross-tokenizer distillation trains (exactly aligned: ``shared-vocab``; at shared boundaries: ``uld``);
and whether the exact same-tokenizer path applies. ``--output FILE`` also writes it as JSON.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from llm_neo.alignment import pair_report
from llm_neo.config import check_data_path, check_model_path
from llm_neo.data import load_records
from llm_neo.errors import ConfigError
from llm_neo.models.loading import load_tokenizer
from llm_neo.options import DATA, MODELS, option_help
from llm_neo.records import to_json
from llm_neo.records.pair import PairReport, pair_lines
from llm_neo.runtime.atomic import atomic_write_json


@dataclass
class CheckPairConfig:
    """`llm-neo check-pair`: the pair report of a teacher and a student."""

    teacher: str = field(
        default="", metadata=option_help("Teacher model: a local HF model dir or a hub id.", group=MODELS)
    )
    student: str = field(
        default="", metadata=option_help("Student model: a local HF model dir or a hub id.", group=MODELS)
    )
    data: str | None = field(
        default=None,
        metadata=option_help(
            "Training data (as for distill): report how its responses tokenize and the aligned coverage.",
            group=DATA,
        ),
    )
    max_length: int = field(
        default=2048,
        metadata=option_help("Truncate each sample to this many tokens (as distill).", group=DATA),
    )
    output: str | None = field(
        default=None, metadata=option_help("Also write the report as JSON to this file.")
    )
    trust_remote_code: bool = field(
        default=False, metadata=option_help("Allow tokenizer code from the model dir (off: never run it).")
    )


def run_check_pair(config: CheckPairConfig) -> PairReport:
    """Print the pair report (and write it with --output); ConfigError for missing or bad options."""
    c = config
    p: list[str] = []
    for option, value in (("teacher", c.teacher), ("student", c.student)):
        if not value:
            p.append(f"--{option} is required (a model directory or hub id)")
        check_model_path(p, option, value)
    if c.data is not None:
        check_data_path(p, c.data)
    if c.max_length < 1:
        p.append(f"--max-length must be >= 1, got {c.max_length}")
    if p:
        raise ConfigError(p)
    student = load_tokenizer(c.student, role="student", trust_remote_code=c.trust_remote_code)
    teacher = load_tokenizer(c.teacher, role="teacher", trust_remote_code=c.trust_remote_code)
    records = load_records(c.data) if c.data else None
    report = pair_report(
        student, teacher, names=(c.student, c.teacher), records=records, data=c.data, max_length=c.max_length
    )
    print("\n".join(pair_lines(report)))
    if c.output:
        atomic_write_json(Path(c.output), to_json(report))
    return report
