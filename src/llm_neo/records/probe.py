"""The records of `llm-neo probe`: ``ProbeResults`` is what ``probe.json`` holds (``schema_version`` 1),
built by ``llm_neo.commands.probe`` from the statistics of ``llm_neo.eval.probe`` and read by attribute
in ``llm_neo.report.probe`` (and embedded whole in compare's results).

Per-category tables are dicts keyed by category, ``"all"`` (the whole set) first; per-model tables by
model name, in probe order (teacher, baseline, students). The sections of pairs (``bias``,
``inheritance``, ``movement_differences``, ``pairs``) are absent from the file when the probe set has no
pairs, those of prompts (``behaviour``, ``prompts``) when it has none or ``--no-generate`` was given.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from llm_neo.records import OPTIONAL_KEY

SCHEMA_VERSION = 1


class Role(str, enum.Enum):
    """A probed model's part: movement runs from the baseline (0) to the teacher (1)."""

    TEACHER = "teacher"
    BASELINE = "baseline"
    STUDENT = "student"


class Conditioning(str, enum.Enum):
    BOS = "bos"
    EOS = "eos"
    NONE = "none"


class Normalisation(str, enum.Enum):
    SUM = "sum"
    MEAN = "mean"


class LabelKind(str, enum.Enum):
    PHRASES = "phrases"
    REGEX = "regex"
    KEYWORDS = "keywords"


@dataclass
class Stat:
    """A statistic and its percentile bootstrap interval; None where undefined (no items, NaN)."""

    value: float | None
    ci: tuple[float | None, float | None]


@dataclass
class BiasScores:
    """One model's bias on one category: the fraction of pairs preferring the stereotype, the mean gap."""

    n: int
    stereo_fraction: Stat
    mean_gap: Stat


@dataclass
class InheritanceScores:
    """One model's inheritance on one category: correlation with the teacher's gaps, movement from the
    baseline towards the teacher, and the mean gap minus the teacher's and the baseline's."""

    n: int
    correlation: Stat
    movement: Stat
    gap_vs_teacher: Stat
    gap_vs_baseline: Stat


@dataclass
class BehaviourScores:
    """One model's behaviour on one category of prompts: agreement with the teacher, each label's rate."""

    n: int
    agreement: Stat
    labels: dict[str, Stat]


@dataclass
class MovementDifference:
    """movement(a) - movement(b) over all pairs, with a paired bootstrap interval."""

    a: str
    b: str
    value: float | None
    ci: tuple[float | None, float | None]


@dataclass
class Scoring:
    """How sentences were scored (``llm_neo.eval.probe.Scoring`` as written)."""

    conditioning: Conditioning
    normalisation: Normalisation
    prefix: str


@dataclass
class Bootstrap:
    samples: int
    seed: int
    confidence: float
    method: str


@dataclass
class ProbeSetSummary:
    """Where the probes came from and how many of each category there are."""

    sources: list[str]
    notes: list[str]
    pairs: int
    prompts: int
    pair_categories: dict[str, int]
    prompt_categories: dict[str, int]


@dataclass
class ProbedModel:
    name: str
    path: str
    role: Role
    scoring: str  # one sentence: how this model's tokenizer scored the sentences
    seconds: float


@dataclass
class AnswerLabel:
    name: str
    kind: LabelKind
    values: list[str]


@dataclass
class PairScores:
    """One model's scores of one pair's sentences and their gap (stereotypical - anti-stereotypical)."""

    stereotypical: float
    anti_stereotypical: float
    gap: float


@dataclass
class PairRecord:
    id: str
    category: str
    source: str
    stereotypical: str
    anti_stereotypical: str
    scores: dict[str, PairScores]  # by model name


@dataclass
class PromptRecord:
    id: str
    category: str
    source: str
    prompt: str
    answers: dict[str, str]  # by model name
    labels: dict[str, list[str]]  # by model name: the labels its answer matched


@dataclass
class ProbeResults:
    """``probe.json``: every number, every pair's scores and every answer."""

    schema_version: int
    llm_neo_version: str
    config: dict[str, Any]
    scoring: Scoring
    bootstrap: Bootstrap
    probe_set: ProbeSetSummary
    teacher: str
    baseline: str
    models: list[ProbedModel]
    labels: list[AnswerLabel]
    bias: dict[str, dict[str, BiasScores]] | None = field(default=None, metadata=OPTIONAL_KEY)
    inheritance: dict[str, dict[str, InheritanceScores]] | None = field(default=None, metadata=OPTIONAL_KEY)
    movement_differences: list[MovementDifference] | None = field(default=None, metadata=OPTIONAL_KEY)
    pairs: list[PairRecord] | None = field(default=None, metadata=OPTIONAL_KEY)
    behaviour: dict[str, dict[str, BehaviourScores]] | None = field(default=None, metadata=OPTIONAL_KEY)
    prompts: list[PromptRecord] | None = field(default=None, metadata=OPTIONAL_KEY)
    extra: dict[str, Any] = field(default_factory=dict)
