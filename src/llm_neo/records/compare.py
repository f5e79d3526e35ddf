"""What ``llm-neo compare`` finds: ``CompareResults``, written as the comparison's ``results.json``.

The report (``report.compare``), the demo and ``llm-neo compare`` itself read these records by attribute;
``llm_neo.records`` writes and reads them (``dumps``, ``load``), so a damaged file names the key that is
wrong. The JSON keys are the fields' names in their order; a key results.json holds only sometimes (the
probe, a paired metric with no values at some seed) is a field with ``metadata=OPTIONAL_KEY``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm_neo.records import OPTIONAL_KEY
from llm_neo.records.pair import PairReport
from llm_neo.summary import MemoryKind

SCHEMA_VERSION = 1


class Verdict(enum.Enum):
    """Which of a paired difference's two sides is better: one only when its 95% interval excludes 0."""

    A = "a"
    B = "b"
    NEITHER = "neither"


@dataclass
class Stats:
    """One metric over seeds (sample std; 0 for one seed)."""

    mean: float
    std: float
    min: float
    max: float
    n: int


@dataclass
class PairedDifference:
    """The mean of a − b over paired seeds, its 95% t interval (None at one seed), the verdict, and the
    verdict in words (``text``: "better", "worse", "not distinguishable at 3 seeds")."""

    mean: float
    ci: tuple[float, float] | None
    n: int
    verdict: Verdict
    text: str


@dataclass
class Example:
    """A held-out prompt, its reference response and a model's greedy answer."""

    prompt: str
    expected: str
    answer: str


@dataclass
class AnswerStats:
    """How a model's greedy answers to the held-out prompts ended (``eval.answers``): how many there
    were, how many reached --max-new-tokens without an end-of-turn token, loop, or are empty."""

    total: int
    never_stopped: int
    looping: int
    empty: int


@dataclass
class CurvePoint:
    """One optimizer step of a run's training curve (its metrics.jsonl)."""

    step: int
    loss: float
    ce_loss: float  # per data token (0 in a step that had none: an on-policy step at λ = 1)
    kd_loss: float  # likewise
    # on-policy runs: the divergence to the teacher per token the student sampled
    on_policy_kd_loss: float | None = field(default=None, metadata=OPTIONAL_KEY)

    def curves(self, on_policy: bool) -> tuple[float | None, float | None]:
        """(CE, KD) as a run's training curves draw this step: an on-policy run's KD is the divergence on
        its samples, and a step with no data tokens (both per-data-token losses exactly 0) has no CE."""
        if not on_policy:
            return self.ce_loss, self.kd_loss
        no_data = self.ce_loss == 0.0 and self.kd_loss == 0.0
        return (None if no_data else self.ce_loss), self.on_policy_kd_loss


@dataclass(kw_only=True)
class ModelScores:
    """One model's held-out scores (``eval/<model>.json``, and the teacher's and the untrained student's
    in results.json): the task score of its greedy answers and its held-out metrics."""

    scoring: dict[str, Any]  # the scoring options these scores were computed with (a rerun's cache key)
    path: str
    score: str  # the task score's name
    accuracy: float
    correct: int
    total: int
    per_category: dict[str, float]
    ce: float
    perplexity: float
    kl_to_teacher: float | None = field(default=None, metadata=OPTIONAL_KEY)  # with a teacher only
    top1_agreement: float | None = field(default=None, metadata=OPTIONAL_KEY)
    # --cross-tokenizer (docs/cross-tokenizer.md): the divergence on aligned positions, never kl_to_teacher
    aligned_kl_to_teacher: float | None = field(default=None, metadata=OPTIONAL_KEY)
    aligned_coverage: float | None = field(default=None, metadata=OPTIONAL_KEY)
    heldout_tokens: int
    parameters: int
    examples: list[Example]  # the first held-out records' answers
    answers: AnswerStats | None = field(default=None, metadata=OPTIONAL_KEY)  # (older files: absent)
    # Every held-out answer, kept for the teacher under --score teacher: the other models' references.
    greedy_answers: list[str] | None = field(default=None, metadata=OPTIONAL_KEY)
    # Task -> metric -> value
    lm_eval: dict[str, dict[str, float]] | None = field(default=None, metadata=OPTIONAL_KEY)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class ReferenceModels:
    """The models every arm is measured against: the teacher (when there is one), the untrained student."""

    teacher: ModelScores | None = field(default=None, metadata=OPTIONAL_KEY)
    student: ModelScores

    def items(self) -> list[tuple[str, ModelScores]]:
        """``(name, scores)`` of the teacher (if any), then the student."""
        return [(name, s) for name, s in (("teacher", self.teacher), ("student", self.student)) if s]


@dataclass
class ArmRun:
    """One trained arm at one seed and data size: its scores and what its distill run reported."""

    name: str
    seed: int
    records: int | None  # training records (None: all of them)
    output_dir: Path
    accuracy: float
    per_category: dict[str, float]
    ce: float
    kl_to_teacher: float | None
    top1_agreement: float | None
    lm_eval: dict[str, dict[str, float]] | None
    train_time_s: float
    wall_time_s: float
    tokens_per_s: float | None
    tokens_trained: int
    peak_memory_gb: float
    peak_memory_kind: MemoryKind
    peak_tensor_memory_gb: float | None
    trainable_parameters: int
    student_parameters: int
    teacher_quant: dict[str, Any] | None  # RunSummary's
    student_quant: dict[str, Any] | None
    lr: float
    final: dict[str, float]  # the last step's loss, ce_loss, kd_loss
    curve: list[CurvePoint]
    examples: list[Example]
    # Every token the steps processed (prompt + response) per second; tokens_per_s counts the response
    # tokens trained on alone. None: a run whose summary predates the count.
    tokens_processed_per_s: float | None = field(default=None, metadata=OPTIONAL_KEY)
    answers: AnswerStats | None = field(default=None, metadata=OPTIONAL_KEY)  # (older files: absent)
    # Every held-out answer, kept for the teacher under --score teacher: the other models' references.
    greedy_answers: list[str] | None = field(default=None, metadata=OPTIONAL_KEY)
    aligned_kl_to_teacher: float | None = field(default=None, metadata=OPTIONAL_KEY)  # --cross-tokenizer


@dataclass(kw_only=True)
class GroupStats:
    """An arm's per-run numbers over its seeds; a metric some run lacks is left out (None)."""

    accuracy: Stats
    ce: Stats
    kl_to_teacher: Stats | None = field(default=None, metadata=OPTIONAL_KEY)
    top1_agreement: Stats | None = field(default=None, metadata=OPTIONAL_KEY)
    aligned_kl_to_teacher: Stats | None = field(default=None, metadata=OPTIONAL_KEY)
    train_time_s: Stats
    wall_time_s: Stats
    tokens_per_s: Stats | None = field(default=None, metadata=OPTIONAL_KEY)
    tokens_processed_per_s: Stats | None = field(default=None, metadata=OPTIONAL_KEY)
    peak_memory_gb: Stats
    peak_tensor_memory_gb: Stats | None = field(default=None, metadata=OPTIONAL_KEY)
    per_category: dict[str, Stats]


@dataclass
class ArmGroup:
    """Every seed of one arm at one data size."""

    method: str  # the arm: its method and quantized variants ("neo+int8-teacher")
    base_method: str
    quantization: dict[str, str]  # the variants' options (teacher_quant, student_quant)
    records: int | None
    runs: list[ArmRun]
    stats: GroupStats


@dataclass(kw_only=True)
class PairedRow:
    """Neo against another arm at one data size, paired by seed; a metric without values at every seed
    is left out."""

    against: str
    records: int | None
    accuracy: PairedDifference | None = field(default=None, metadata=OPTIONAL_KEY)
    kl_to_teacher: PairedDifference | None = field(default=None, metadata=OPTIONAL_KEY)
    aligned_kl_to_teacher: PairedDifference | None = field(default=None, metadata=OPTIONAL_KEY)
    ce: PairedDifference | None = field(default=None, metadata=OPTIONAL_KEY)
    train_time_s: PairedDifference | None = field(default=None, metadata=OPTIONAL_KEY)


@dataclass(kw_only=True)
class ArmCost:
    """An arm's measured cost (means over seeds at the largest data size) and, when the planner can count
    the models, what a projection needs."""

    train_time_s: float
    tokens_per_s: float | None  # response tokens trained on, per second (what --project-tokens counts)
    tokens_processed_per_s: float | None = field(default=None, metadata=OPTIONAL_KEY)  # prompt + response
    peak_memory_gb: float
    peak_tensor_memory_gb: float | None
    trainable_parameters: int
    flops_per_token: int | None = field(default=None, metadata=OPTIONAL_KEY)
    # Llm-neo plan's estimate of one step on a GPU
    planned_peak_gib: float | None = field(default=None, metadata=OPTIONAL_KEY)


@dataclass
class ArmProjection:
    """One arm's full run projected to a card (commands.cost.project)."""

    hours: float
    gpu_hours: float
    basis: str  # where the time came from, in words
    planned_peak_gib: float | None
    fits: bool | None  # the planned peak fits one card (None: no plan)


@dataclass
class Projection:
    """--project-tokens on --gpu: every arm's projected run."""

    tokens: int
    gpu: str  # the card's name
    gpus: int
    utilization: float
    arms: dict[str, ArmProjection]


@dataclass
class Cost:
    arms: dict[str, ArmCost]
    projection: Projection | None


@dataclass
class ComparedData:
    train: str
    heldout: str
    sizes: list[int | None]  # the data-size axis (None: all the training records)
    train_records_available: int


@dataclass(kw_only=True)
class Timing:
    """Seconds each stage of the comparison took."""

    arms_s: float
    eval_s: float
    probe_s: float | None = field(default=None, metadata=OPTIONAL_KEY)
    total_s: float


@dataclass(kw_only=True)
class TeacherCacheCost:
    """A teacher cache the KD arms read instead of running the teacher: its cost, from its manifest."""

    path: str
    examples: int
    seconds: float  # its build's wall time, load to manifest (when it was built, not on a rerun)
    teacher_parameters: int | None  # the weights neither KD arm loaded (None: not known)


@dataclass(kw_only=True)
class CompareResults:
    """A comparison's results (results.json), everything its report is rendered from."""

    schema_version: int
    llm_neo_version: str
    created: str
    config: dict[str, Any]  # the comparison's options, as compare.yaml holds them
    data: ComparedData
    device: str  # where it was measured (torch's name for a GPU)
    device_type: str
    load_average: float | None  # the mean 1-minute load while the arms trained (older files: at the end)
    load_max: float | None = field(default=None, metadata=OPTIONAL_KEY)  # its highest sample then
    cpus: int | None = field(default=None, metadata=OPTIONAL_KEY)  # cores the run could use (older: absent)
    models: ReferenceModels
    groups: list[ArmGroup]
    paired: list[PairedRow]
    cost: Cost
    # Llm-neo probe's results (--probes)
    probe: dict[str, Any] | None = field(default=None, metadata=OPTIONAL_KEY)
    timing: Timing
    # Paragraphs a caller (the demo) puts first
    context: list[str] | None = field(default=None, metadata=OPTIONAL_KEY)
    # How the demo made its teacher and student
    demo: dict[str, Any] | None = field(default=None, metadata=OPTIONAL_KEY)
    # Whether it can decide, stated before training (results.json written before it existed lack it)
    budget: Budget | None = field(default=None, metadata=OPTIONAL_KEY)
    # --cache-teacher: what building each teacher cache cost, once, for every KD arm that read it
    teacher_caches: list[TeacherCacheCost] | None = field(default=None, metadata=OPTIONAL_KEY)
    # --cross-tokenizer: the pair report on the held-out records (records.pair)
    pair: PairReport | None = field(default=None, metadata=OPTIONAL_KEY)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def memory_kind(self) -> MemoryKind:
        """What the arms' ``peak_memory_gb`` measured (every arm ran on the same device)."""
        return self.groups[0].runs[0].peak_memory_kind


@dataclass(kw_only=True)
class SizeBudget:
    """What every arm trains at one data size, known before the first step."""

    records: int | None  # the data-size axis's value (None: all the training records)
    train_examples: int  # the records that tokenize to a trained token: what an epoch passes over
    steps: int  # optimizer steps per arm
    samples_per_step: int  # batch size x gradient accumulation (x ranks)
    epochs: float  # steps x samples per step / train examples
    tokens_per_epoch: int  # trained (response) tokens of one pass over the training examples
    trained_tokens: int  # tokens_per_epoch x epochs


@dataclass(kw_only=True)
class ArmTime:
    """--plan-only's estimate of one arm's training time, from a short warm-up run of it."""

    arm: str
    warmup_steps: int  # the steps run: the first loads and warms up, the others are timed
    steps: int  # the optimizer steps the arm will take at the largest data size
    load_seconds: float  # start to the end of the first warm-up step, less one step
    seconds_per_step: float  # the mean of the warm-up steps after the first
    seconds: float  # load_seconds + steps x seconds_per_step


@dataclass(kw_only=True)
class Budget:
    """Whether the comparison can decide, stated before it trains (report.power): each data size's
    budget, the held-out split's size, and the smallest task-score difference it detects."""

    sizes: list[SizeBudget]
    heldout_records: int
    heldout_tokens: int  # the held-out response tokens CE, KL and top-1 agreement are averaged over
    seeds: int
    detectable: float | None  # a fraction (0.1: 10 points); None: no interval (one seed)
    method: str  # how ``detectable`` was computed, in words
    warnings: list[str]  # each with its fix in numbers
    # --plan-only's per-arm time estimates (empty in a run's results: its times are measured)
    arm_times: list[ArmTime] = field(default_factory=list, metadata=OPTIONAL_KEY)
