"""The bench's settings and its runs: `BenchConfig`, one run's `RunSpec`, the ARM:IMPL[:CHUNK] spellings
parsed and validated, and the lookups every part of the bench shares."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from llm_neo.choices import CROSS_TOKENIZER_METHODS, METHOD_NAMES, METHODS, QUANT_VARIANTS
from llm_neo.config import GPU_CHUNK_TOKENS, MLP_CHUNKS_HELP, DeviceOptions, arm_name, parse_arm
from llm_neo.options import option_help

PEER_NAMES = ("trl",)  # --peers: the tools run side by side (commands.bench.peers)


@dataclass
class BenchConfig(DeviceOptions):
    """`llm-neo bench`: memory and speed of each arm × loss implementation on a named shape."""

    shape: str = field(
        default="cpu-wide",
        metadata=option_help(
            "Named shape: llama3-8b-to-1b, llama2-7b-to-1.1b, cpu-wide (CPU-sized), tiny (tests)."
        ),
    )
    batch_size: int | None = field(
        default=None, metadata=option_help("Sequences per step. Default: the shape's.")
    )
    seq_len: int | None = field(
        default=None, metadata=option_help("Tokens per sequence. Default: the shape's.")
    )
    runs: list[str] = field(
        default_factory=lambda: ["kd:plain", "kd:chunked", "neo:plain", "neo:chunked"],
        metadata=option_help(
            "Step runs as ARM:IMPL[:CHUNK]: ARM a method (kd, neo, sft, lora) or a quantized variant as "
            "llm-neo compare spells it (neo+int8-teacher, neo+nf4-student, neo+int8-teacher+nf4-student; "
            f"variants {', '.join(QUANT_VARIANTS)}), IMPL plain or chunked. kd:plain, the baseline of every "
            "ratio, is always run."
        ),
    )
    whole_runs: list[str] = field(
        default_factory=list,
        metadata=option_help(
            "Whole `llm-neo distill` processes (load, steps, merge check, save, held-out eval) on the same "
            "shape, spelled as --runs; their peak RSS against their own training-step peak. Recommended: "
            "kd:plain neo:chunked neo+int8-teacher:chunked (kd:plain is always run when any is given)."
        ),
    )
    peers: list[str] = field(
        default_factory=list,
        metadata=option_help(
            "Peers run side by side with the whole runs, on the same inputs, batches and order "
            f"({', '.join(PEER_NAMES)}: TRL's GKDTrainer with and without a LoRA branch, forward KL, "
            "no CE term); adds the whole runs kd:chunked and neo:chunked they are set against. Needs "
            "pip install 'llm-neo[peers]'."
        ),
    )
    on_policy: bool = field(
        default=False,
        metadata=option_help(
            "Also on-policy Neo's whole runs (λ = 1): online, and from a cache of the initial student's "
            "samples (cache-teacher --student-samples, timed on its row), beside off-policy Neo on the same "
            "prompt/completion records; their step time against off-policy Neo's and what generating "
            "costs. Adds the whole run neo:chunked whose models they use."
        ),
    )
    whole_run_dir: str | None = field(
        default=None,
        metadata=option_help(
            "Directory for the whole runs' models, data and outputs, kept afterwards. Default: a "
            "temporary directory, removed at the end."
        ),
    )
    cache_ranks: int = field(
        default=0,
        metadata=option_help(
            "Also the multi-rank cache row: `llm-neo cache-teacher` of the shape's teacher in one process "
            "and on this many ranks (torchrun; gloo on a CPU), the teacher replicated and FSDP2-sharded: "
            "tokens/s per rank and in all, peak per rank, ratios to the one process; its files kept in "
            "--whole-run-dir/cache-ranks when that is given. 0: no such row."
        ),
    )
    cross_tokenizer: list[str] = field(
        default_factory=list,
        metadata=option_help(
            "On a shape whose tokenizers differ (gemma3-270m-to-smollm2-20): each kd/neo chunked step run "
            "is also measured across tokenizers with each method given (distill --cross-tokenizer: "
            f"{', '.join(CROSS_TOKENIZER_METHODS)}), on text both models read in their own tokens; the "
            "same-tokenizer runs there give the teacher the student's vocabulary."
        ),
    )
    warmup_steps: int = field(default=1, metadata=option_help("Untimed steps first (AdamW states, kernels)."))
    steps: int = field(default=3, metadata=option_help("Timed optimizer steps per run."))
    gradient_checkpointing: bool = field(
        default=False, metadata=option_help("Recompute the student's activations in the backward.")
    )
    mlp_chunks: int = field(default=1, metadata=option_help(MLP_CHUNKS_HELP))
    loss_chunk_size: int = field(
        default=0,
        metadata=option_help(
            "Tokens per chunk of the chunked loss. 0: llm-neo distill's default for the device and the "
            "shape's vocabulary (1024 on a GPU; 256 for cpu-wide on a CPU)."
        ),
    )
    lora_r: int | None = field(
        default=None, metadata=option_help("LoRA rank of neo/lora. Default: the shape's.")
    )
    kd_ratio: float = field(
        default=0.5, metadata=option_help("Weight of the KD term (forward KL) for kd/neo.")
    )
    isolate: bool = field(
        default=True,
        metadata=option_help(
            "Each run in a fresh subprocess (peak RSS on CPU; an OOM ends only that run). Without it, "
            "runs share this process and CPU peaks are live tensor bytes."
        ),
    )
    run_timeout_s: float = field(
        default=1800.0, metadata=option_help("Seconds before an isolated or whole run is killed.")
    )
    seed: int = field(default=0, metadata=option_help("Seed of the random weights and tokens."))
    num_threads: int = field(
        default=0,
        metadata=option_help("CPU threads of each run (torch.set_num_threads); 0: torch's default."),
    )
    malloc_mmap_threshold: int = field(
        default=0,
        metadata=option_help(
            "CPU, isolated and whole runs: glibc's MALLOC_MMAP_THRESHOLD_ (bytes) for each run's process, "
            "so freed "
            "blocks above it go back to the OS and the peak RSS tracks live tensors; 0: glibc's default "
            "(a threshold that adapts up to 32 MiB and keeps freed blocks below it mapped)."
        ),
    )
    output: str | None = field(
        default=None, metadata=option_help("Directory for LABEL.md and LABEL.json (also printed to stdout).")
    )
    label: str | None = field(
        default=None, metadata=option_help("File name stem. Default: SHAPE-YYYY-MM-DD.")
    )


@dataclass(frozen=True)
class RunSpec:
    """One run: what a (child) process builds and measures."""

    shape: str
    method: str
    impl: str
    chunk_size: int
    batch_size: int
    seq_len: int
    lora_r: int
    kd_ratio: float
    warmup_steps: int
    steps: int
    gradient_checkpointing: bool
    device: str
    dtype: str
    seed: int
    memory: str  # "cuda" | "rss" | "tracked"
    num_threads: int = 0
    mlp_chunks: int = 1
    teacher_quant: str = "none"  # none, int8, nf4: the teacher's block linears (kd, neo)
    student_quant: str = "none"  # none, nf4, int8: the frozen student base's block linears (neo, lora)
    cross_tokenizer: str | None = None  # shared-vocab, uld: the step across tokenizers (kd, neo chunked)

    @property
    def arm(self) -> str:
        return arm_name(self.method, self.teacher_quant, self.student_quant)

    @property
    def name(self) -> str:
        across = f" --cross-tokenizer {self.cross_tokenizer}" if self.cross_tokenizer else ""
        return f"{self.arm}:{self.impl}{across}"


class RunKey(NamedTuple):
    """What tells two runs apart: the arm (a method and its quantization) and the loss implementation."""

    method: str
    teacher_quant: str
    student_quant: str
    impl: str
    chunk: int
    cross: str | None = None  # the cross-tokenizer method; None: one tokenizer


def result_key(spec: dict[str, Any]) -> RunKey:
    """The RunKey of a result's spec (results written before quantized rows existed have none)."""
    return RunKey(
        spec["method"],
        spec.get("teacher_quant", "none"),
        spec.get("student_quant", "none"),
        spec["impl"],
        spec["chunk_size"],
        spec.get("cross_tokenizer"),
    )


def parse_run(text: str, default_chunk: int, option: str = "--runs") -> RunKey:
    """``"neo+int8-teacher:chunked:256"`` -> its RunKey; ConfigError naming ``option`` otherwise."""
    from llm_neo.commands.plan import IMPLS
    from llm_neo.errors import ConfigError

    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise ConfigError(
            [f"{option}: {text!r} is not ARM:IMPL or ARM:IMPL:CHUNK (e.g. neo+int8-teacher:chunked)"]
        )
    try:
        method, quant = parse_arm(parts[0], option=option)
    except ConfigError as err:
        raise ConfigError([f"{problem} (in {text!r})" for problem in err.problems]) from None
    if "on_policy" in quant:  # on-policy needs prompts, which the random-token rows have none of
        raise ConfigError(
            [f"{option}: {text!r}: bench's on-policy rows are whole runs of their own: use --on-policy"]
        )
    impl = parts[1]
    try:
        chunk = int(parts[2]) if len(parts) == 3 else default_chunk
    except ValueError:
        chunk = 0
    if method not in METHOD_NAMES or impl not in IMPLS or chunk < 1:
        raise ConfigError(
            [
                f"{option}: {text!r}: methods are {', '.join(METHOD_NAMES)}, impls {', '.join(IMPLS)}, "
                "chunk >= 1"
            ]
        )
    key = RunKey(method, quant.get("teacher_quant", "none"), quant.get("student_quant", "none"), impl, chunk)
    if key.teacher_quant != "none" and not METHODS[method].kd:
        raise ConfigError(
            [f"{option}: {text!r}: {method} has no teacher to quantize; teacher variants are for kd and neo"]
        )
    if key.student_quant != "none" and not METHODS[method].lora:
        raise ConfigError(
            [
                f"{option}: {text!r}: a quantized (QLoRA) student base is for the LoRA arms (neo, lora); "
                f"{method} trains every weight of the student"
            ]
        )
    return key


def parse_runs(texts: list[str], default_chunk: int, option: str, problems: list[str]) -> list[RunKey]:
    """Every entry of ``texts`` parsed (duplicates once, kd:plain first if absent); problems collected."""
    from llm_neo.errors import ConfigError

    keys: list[RunKey] = []
    for text in texts:
        try:
            key = parse_run(text, default_chunk, option)
        except ConfigError as err:
            problems.extend(err.problems)
            continue
        if key not in keys:
            keys.append(key)
    if not any(k[:4] == ("kd", "none", "none", "plain") for k in keys):
        keys.insert(0, RunKey("kd", "none", "none", "plain", default_chunk))
    return keys


def with_default_chunk(config: BenchConfig, device_type: str) -> BenchConfig:
    """``config`` with ``--loss-chunk-size 0`` replaced by llm-neo distill's default for the device type
    and the shape's vocabulary (``config.default_chunk_size``); an unknown shape is left to
    ``validate``."""
    from llm_neo.commands.shapes import SHAPES
    from llm_neo.config import default_chunk_size

    if config.loss_chunk_size != 0 or config.shape not in SHAPES:
        return config
    vocab = SHAPES[config.shape].student.vocab_size
    return dataclasses.replace(config, loss_chunk_size=default_chunk_size(device_type, vocab))


def validate(config: BenchConfig) -> tuple[list[RunKey], list[RunKey]]:
    """The step runs and the whole runs (kd:plain added to each list: the baseline of the ratios; no
    whole runs when none are asked for); ConfigError listing every problem."""
    from llm_neo.commands.shapes import SHAPES
    from llm_neo.errors import ConfigError

    p: list[str] = []
    if config.shape not in SHAPES:
        p.append(f"--shape: {config.shape!r} is not one of {', '.join(SHAPES)}")
    # 0 is left only where the shape is unknown (reported above): any chunk then parses the runs.
    chunk = config.loss_chunk_size or GPU_CHUNK_TOKENS
    runs = parse_runs(config.runs, chunk, "--runs", p)
    peer_runs = [f"kd:chunked:{chunk}", f"neo:chunked:{chunk}"] if config.peers else []
    if config.on_policy and f"neo:chunked:{chunk}" not in peer_runs:
        peer_runs.append(f"neo:chunked:{chunk}")
    wanted = [*config.whole_runs, *(r for r in peer_runs if r not in config.whole_runs)]
    whole = parse_runs(wanted, chunk, "--whole-runs", p) if wanted else []
    p += [
        f"--peers: {peer!r} is not one of {', '.join(PEER_NAMES)}"
        for peer in config.peers
        if peer not in PEER_NAMES
    ]
    for name, value, ok in (
        ("steps", config.steps, config.steps >= 1),
        ("warmup-steps", config.warmup_steps, config.warmup_steps >= 0),
        ("batch-size", config.batch_size, config.batch_size is None or config.batch_size >= 1),
        ("seq-len", config.seq_len, config.seq_len is None or config.seq_len >= 2),
        ("lora-r", config.lora_r, config.lora_r is None or config.lora_r >= 1),
        ("loss-chunk-size", config.loss_chunk_size, config.loss_chunk_size >= 0),
        ("kd-ratio", config.kd_ratio, 0 <= config.kd_ratio <= 1),
        ("run-timeout-s", config.run_timeout_s, config.run_timeout_s > 0),
        ("mlp-chunks", config.mlp_chunks, config.mlp_chunks >= 1),
        ("cache-ranks", config.cache_ranks, config.cache_ranks == 0 or config.cache_ranks >= 2),
    ):
        if not ok:
            p.append(f"--{name}: {value} is out of range")
    p += cross_problems(config, runs, whole)
    if config.mlp_chunks > 1 and not config.gradient_checkpointing:
        p.append(f"--mlp-chunks {config.mlp_chunks} needs --gradient-checkpointing")
    if config.on_policy and config.kd_ratio == 0:
        p.append("--on-policy: the teacher scores the student's samples; give --kd-ratio > 0")
    if whole and config.seq_len is not None and config.seq_len < 3:
        p.append(
            f"--seq-len {config.seq_len}: a whole run's records are <s>, a token or more, </s>: use >= 3"
        )
    if p:
        raise ConfigError(p)
    across = [
        key._replace(cross=method)
        for key in runs
        if METHODS[key.method].kd and key.impl == "chunked"
        for method in config.cross_tokenizer
    ]
    return runs + across, whole


def cross_problems(config: BenchConfig, runs: list[RunKey], whole: list[RunKey]) -> list[str]:
    """What --cross-tokenizer and a cross-tokenizer shape refuse: unknown methods, a shape of one
    vocabulary, no kd/neo chunked run to measure, whole runs (their data is one tokenizer's)."""
    from llm_neo.commands.shapes import SHAPES

    p = [
        f"--cross-tokenizer: {m!r} is not one of {', '.join(CROSS_TOKENIZER_METHODS)}"
        for m in config.cross_tokenizer
        if m not in CROSS_TOKENIZER_METHODS
    ]
    cross_shape = config.shape in SHAPES and SHAPES[config.shape].cross
    if config.cross_tokenizer and config.shape in SHAPES and not cross_shape:
        cross = [n for n, s in SHAPES.items() if s.cross]
        p.append(
            f"--cross-tokenizer: shape {config.shape} has one tokenizer; use a shape of two "
            f"({', '.join(cross)})"
        )
    if config.cross_tokenizer and not any(METHODS[k.method].kd and k.impl == "chunked" for k in runs):
        p.append(
            "--cross-tokenizer: no kd/neo chunked run in --runs to measure across tokenizers "
            "(e.g. neo:chunked)"
        )
    if cross_shape and whole:
        p.append(
            f"--shape {config.shape}: whole runs, peers and --on-policy are not measured across tokenizers "
            "yet (their data has one tokenizer); step runs only"
        )
    return p


def row_name(spec: RunSpec, default_chunk: int) -> str:
    name = f"{spec.arm} {spec.impl}"
    if spec.cross_tokenizer:
        name += f" across tokenizers ({spec.cross_tokenizer})"
    return (
        name
        if spec.impl == "plain" or spec.chunk_size == default_chunk
        else f"{name} (chunk {spec.chunk_size})"
    )


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def find_row(rows: Sequence[dict[str, Any]], key: RunKey) -> dict[str, Any] | None:
    """The finished row of ``key`` (a plain run at any chunk size: the chunk does not apply to it)."""
    for res in rows:
        found = result_key(res["spec"])
        same = found == key or (key.impl == "plain" and found[:4] == key[:4])
        if same and res.get("status") == "ok":
            return res
    return None
