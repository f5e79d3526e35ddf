"""The records of `llm-neo bench`: ``BenchReport`` is what ``LABEL.json`` holds, one ``StepRun`` per step
run, one ``WholeRun`` (or ``FailedWholeRun``) per whole run, one ``TargetResult`` per acceptance target,
with ``--peers`` one ``PeerRun`` per peer setting beside the whole runs and the ``PeerLossCheck``,
with ``--cache-ranks`` the multi-rank cache row, ``CacheRanks``, and with ``--on-policy`` one
``OnPolicyRun`` per on-policy Neo row and its off-policy baseline.

``llm_neo.commands.bench`` computes its rows as dicts (each measurement adds its keys as it is taken) and
turns the finished report into these records; its Markdown report reads them by attribute. The JSON keys
are the fields' names in their order (the order the bench has always written them in), so a file written
before these records existed loads and writes back unchanged. A key a row holds only sometimes (a
quantized row's bytes, a failed run's measurements) is a field with ``metadata=OPTIONAL_KEY``.

``LABEL.json`` carries no ``schema_version`` yet (its fields are unchanged from the files in
benchmarks/results); ``schema_version`` is read when present, and a later change of meaning writes it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Literal

from llm_neo.records import OPTIONAL_KEY
from llm_neo.summary import MemoryKind

Status = Literal["ok", "oom", "error", "timeout"]
Failure = Literal["oom", "error", "timeout"]
Rows = Literal["step", "whole"]
PeerStatus = Literal["ok", "oom", "error", "timeout", "unsupported"]  # unsupported: the peer cannot run it


class PeakKind(enum.Enum):
    """What a step run's ``peak_bytes`` measured."""

    CUDA_MAX_ALLOCATED = "cuda_max_allocated"  # torch.cuda.max_memory_allocated, reset after the build
    PROCESS_MAX_RSS = "process_max_rss"  # the run's own process's peak RSS (--isolate on a CPU)
    LIVE_TENSOR_BYTES = "live_tensor_bytes"  # live tensor bytes counted op by op (--no-isolate, CPU)


class Outcome(enum.Enum):
    """A target's result: n/a when a row it needs was not run or failed."""

    PASS = "PASS"
    FAIL = "FAIL"
    NA = "n/a"


@dataclass(kw_only=True)
class StepRun:
    """One step run (a row of the report's first table): its measurements, the plan beside them, its
    ratios to plain full KD, and for a quantized run the bytes quantization saved and cut."""

    run: str  # ARM:IMPL as given to --runs
    spec: dict[str, Any]  # the RunSpec it ran (commands.bench.runs), as its fields
    status: Status
    baseline_rss_bytes: int | None = field(default=None, metadata=OPTIONAL_KEY)
    teacher_quant: dict[str, Any] | None = field(default=None, metadata=OPTIONAL_KEY)  # quantize_teacher's
    student_quant: dict[str, Any] | None = field(default=None, metadata=OPTIONAL_KEY)
    trainable_parameters: int | None = field(default=None, metadata=OPTIONAL_KEY)
    step_s: float | None = field(default=None, metadata=OPTIONAL_KEY)
    step_times_s: list[float] | None = field(default=None, metadata=OPTIONAL_KEY)
    tokens_per_s: float | None = field(default=None, metadata=OPTIONAL_KEY)
    loss: float | None = field(default=None, metadata=OPTIONAL_KEY)
    error: str | None = field(default=None, metadata=OPTIONAL_KEY)
    peak_bytes: int | None = field(default=None, metadata=OPTIONAL_KEY)
    reserved_bytes: int | None = field(default=None, metadata=OPTIONAL_KEY)  # on a GPU
    peak_kind: PeakKind | None = field(default=None, metadata=OPTIONAL_KEY)
    device: str | None = field(default=None, metadata=OPTIONAL_KEY)
    name: str
    plan_bytes: int
    plan_phase: str
    plan_components_gib: dict[str, float]
    plan_teacher_weight_bytes: int | None = field(default=None, metadata=OPTIONAL_KEY)  # since 2026-12
    plan_student_weight_bytes: int | None = field(default=None, metadata=OPTIONAL_KEY)
    weights_floor_bytes: int
    plan_error_pct: float | None
    memory_vs_kd: float | None
    speed_vs_kd: float | None
    teacher_saved_bytes: int | None = field(default=None, metadata=OPTIONAL_KEY)
    student_saved_bytes: int | None = field(default=None, metadata=OPTIONAL_KEY)
    peak_cut_bytes: int | None = field(default=None, metadata=OPTIONAL_KEY)
    # a cross-tokenizer run (spec's cross_tokenizer): the teacher's padded length, the aligned rows KD is
    # taken on, and the run against the same arm with one tokenizer (the teacher at the student's vocabulary)
    teacher_seq_len: int | None = field(default=None, metadata=OPTIONAL_KEY)
    kd_positions: int | None = field(default=None, metadata=OPTIONAL_KEY)
    memory_vs_same_tokenizer: float | None = field(default=None, metadata=OPTIONAL_KEY)
    speed_vs_same_tokenizer: float | None = field(default=None, metadata=OPTIONAL_KEY)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class Phase:
    """A phase of a whole run and the largest RSS sampled in it (None: no sample fell inside)."""

    phase: str
    start_s: float
    end_s: float
    max_rss_bytes: int | None
    hwm_end_bytes: int | None


@dataclass(kw_only=True)
class WholeRun:
    """A whole `llm-neo distill` process that finished: its own peak, its summary.json's, the phases."""

    run: str
    spec: dict[str, Any]
    kind: Literal["whole"]
    command: str  # the distill command line, paths relative to the whole runs' directory
    status: Literal["ok"]
    process_peak_bytes: int
    training_peak_bytes: int
    training_peak_kind: MemoryKind | None
    process_to_training: float | None  # None when the training peak is not an RSS (a GPU)
    tensor_peak_bytes: int | None
    sampled_peak_bytes: int
    launcher_peak_bytes: int
    peak_phase: str | None
    phases: list[Phase]
    wall_s: float
    train_time_s: float | None
    summary_wall_time_s: float | None
    steps: int | None
    tokens_trained: int | None
    teacher_quant: dict[str, Any] | None  # summary.json's, as RunSummary holds them
    student_quant: dict[str, Any] | None
    heldout: dict[str, Any] | None
    merge_check: dict[str, Any] | None
    device: str | None
    name: str
    memory_vs_kd: float | None
    step_peak_bytes: int | None  # the same run's step benchmark, when it was one of --runs
    teacher_saved_bytes: int | None = field(default=None, metadata=OPTIONAL_KEY)
    student_saved_bytes: int | None = field(default=None, metadata=OPTIONAL_KEY)
    peak_cut_bytes: int | None = field(default=None, metadata=OPTIONAL_KEY)
    # Since --peers (2026-12): the process's CPU seconds (os.wait4's ru_utime, ru_stime) and the median
    # seconds of its timed steps (metrics.jsonl, the warm-up steps left out).
    cpu_user_s: float | None = field(default=None, metadata=OPTIONAL_KEY)
    cpu_system_s: float | None = field(default=None, metadata=OPTIONAL_KEY)
    step_s: float | None = field(default=None, metadata=OPTIONAL_KEY)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class FailedWholeRun:
    """A whole run that did not finish: what it was and why (its measurements do not exist)."""

    run: str
    spec: dict[str, Any]
    kind: Literal["whole"]
    command: str
    status: Failure
    error: str
    name: str
    memory_vs_kd: float | None
    step_peak_bytes: int | None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class PeerRun:
    """A peer's process on the whole runs' inputs (``--peers``), set against the llm-neo whole run it is
    compared with (``versus``): each ratio is llm-neo's value ÷ the peer's (below 1: llm-neo uses less).
    A setting the peer cannot run has its status and error, and no measurements."""

    peer: str  # a name of --peers
    name: str  # "TRL GKD+LoRA", "TRL GKD full"
    lora_r: int  # 0: the full student
    versus: str  # the llm-neo whole run's name
    command: str  # the peer process's command line, paths relative to the whole runs' directory
    status: PeerStatus
    error: str | None
    process_peak_bytes: int | None = None
    cpu_user_s: float | None = None
    cpu_system_s: float | None = None
    wall_s: float | None = None
    train_time_s: float | None = None
    step_s: float | None = None  # median of the timed steps (the warm-up steps left out)
    losses: list[float]  # every step's loss as the peer computed it
    trainable_parameters: int | None = None
    versions: dict[str, str]  # the peer's packages
    memory_ratio: float | None  # llm-neo's process peak ÷ this one's
    cpu_ratio: float | None  # llm-neo's CPU seconds (user + system) ÷ this one's
    step_ratio: float | None  # llm-neo's s/step ÷ this one's
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class OnPolicyRun:
    """An on-policy Neo row (``--on-policy``, ``commands.bench.on_policy``): a whole `llm-neo distill`
    process on the bench's prompt records, its step time against off-policy Neo's on the same records
    and what generating cost it. A failed row has its status and error, and no measurements."""

    name: str  # "neo" (off-policy, the baseline), "neo+on-policy", "neo+on-policy (cached)"
    status: Status
    error: str | None
    command: str | None
    step_s: float | None  # median of the timed steps (the warm-up steps left out)
    step_ratio: float | None  # step_s ÷ off-policy Neo's in this bench
    wall_s: float | None  # the distill process's
    train_time_s: float | None
    process_peak_bytes: int | None
    generation_share: float | None  # of the training time, spent generating (0: cached)
    generated_tokens_per_s: float | None  # cached: while cache-teacher generated the samples
    mean_generated_length: float | None
    capped_share: float | None  # samples that hit the cap without an end-of-turn token
    max_new_tokens: int | None  # the cap
    cache_wall_s: float | None  # the cached row's cache-teacher --student-samples process
    cache_generation_s: float | None  # of which generating the samples
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class PeerLossCheck:
    """Step 1's loss of each peer row against an llm-neo run of the same objective (``distill --method kd
    --kd-ratio 1``: forward KL, no CE term, one step on the same first batch): before any update the loss
    depends only on the weights and the batch, so the two must agree to ``rtol`` (relative)."""

    llm_neo_loss: float | None
    peer_losses: dict[str, float]  # peer row name -> its step-1 loss
    max_rel_diff: float | None
    rtol: float
    passed: bool | None  # None: a side did not run
    command: str
    error: str | None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class TargetResult:
    """One acceptance target (benchmarks/targets.yaml) as measured: the ratio, its bound, the outcome, and
    whether this bench ran the shape and batch the target was set for."""

    target: str  # its name
    rows: Rows | None = field(default=None, metadata=OPTIONAL_KEY)  # since whole runs (2026-12)
    value: float | None
    threshold: float
    result: Outcome
    set_for: dict[str, Any]
    applies: bool


@dataclass(kw_only=True)
class Settings:
    """What every run of the bench shares."""

    shape: str
    description: str
    batch_size: int
    seq_len: int
    lora_r: int
    kd_ratio: float
    dtype: str
    compute_dtype_bytes: int
    device_type: str
    gradient_checkpointing: bool
    mlp_chunks: int | None = field(default=None, metadata=OPTIONAL_KEY)  # since 2026-12 (1 before)
    loss_chunk_size: int
    warmup_steps: int
    steps: int
    isolate: bool
    seed: int
    num_threads: int
    malloc_mmap_threshold: int | None
    # The CPU allocator policy's mmap threshold in the runs' own processes (runtime.memory), since
    # 2026-12-07; None: glibc's default (earlier results), a --malloc-mmap-threshold, or a GPU.
    cpu_mmap_threshold: int | None = field(default=None, metadata=OPTIONAL_KEY)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class Versions:
    torch: str
    transformers: str
    peft: str
    llm_neo: str
    python: str
    trl: str | None = field(default=None, metadata=OPTIONAL_KEY)  # with --peers trl
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class LoadAverage:
    """The machine's 1-minute load average at the start and the end (None where the platform has none)."""

    start: float | None
    end: float | None
    cpus: int | None


@dataclass(kw_only=True)
class WholeRunInputs:
    """What the whole runs trained and were evaluated on."""

    records: int
    heldout_records: int
    eval_fraction: float
    max_steps: int
    directory: str | None  # kept with --whole-run-dir; None: a temporary directory, removed


@dataclass(kw_only=True)
class CacheRankShare:
    """One rank's share of a cache launch, as its manifest records it."""

    rank: int
    tokens: int  # the trained positions it computed
    seconds: float
    tokens_per_s: float
    peak_bytes: int  # the process's peak RSS (CPU) or the tensors' peak (GPU)
    teacher_parameters: int  # the teacher parameters it held (sharded: its shards and the whole lm_head)


@dataclass(kw_only=True)
class CacheLaunch:
    """One ``cache-teacher`` launch of the multi-rank cache row (``--cache-ranks``)."""

    name: str  # "1 process", "2 ranks, replicated", "2 ranks, FSDP2-sharded"
    ranks: int
    teacher_shard: str  # the placement the manifest records (replicate, fsdp)
    command: str  # paths relative to the row's directory
    status: Literal["ok", "error"]
    error: str | None
    wall_s: float  # the launch's wall time, process starts and teacher loading included
    tokens_per_s_total: float | None = None  # all ranks side by side
    shares: list[CacheRankShare] = field(default_factory=list)
    speed_vs_one: float | None = None  # tokens_per_s_total ÷ the one process's
    peak_vs_one: float | None = None  # the largest rank's peak ÷ the one process's
    same_cache: bool | None = None  # same key and top-k ids as the one process's cache


@dataclass(kw_only=True)
class CacheRanks:
    """The multi-rank cache row: its inputs and its launches (the one process first)."""

    ranks: int
    records: int
    seq_len: int
    batch_size: int
    top_k: int
    threads_per_process: int | None  # CPU intra-op threads of each process (None on a GPU)
    launches: list[CacheLaunch]


@dataclass(kw_only=True)
class BenchReport:
    """``LABEL.json``: the bench's settings, where it ran, every run and the targets."""

    schema_version: int | None = field(default=None, metadata=OPTIONAL_KEY)
    label: str
    date: str
    device: str
    versions: Versions
    git_commit: str | None  # "+modified" when a module the runs execute differs from that commit
    settings: Settings
    load_average: LoadAverage
    peak_kind: PeakKind | None
    results: list[StepRun]
    whole_runs: list[WholeRun | FailedWholeRun] = field(default_factory=list)
    whole_inputs: WholeRunInputs | None = None
    targets: list[TargetResult]
    peers: list[PeerRun] | None = field(default=None, metadata=OPTIONAL_KEY)  # --peers
    peer_loss_check: PeerLossCheck | None = field(default=None, metadata=OPTIONAL_KEY)
    cache_ranks: CacheRanks | None = field(default=None, metadata=OPTIONAL_KEY)  # --cache-ranks
    on_policy: list[OnPolicyRun] | None = field(default=None, metadata=OPTIONAL_KEY)  # --on-policy
    extra: dict[str, Any] = field(default_factory=dict)
