"""`llm-neo compare`: the proof of concept on your own teacher, student and data.

Every arm (SFT, LoRA, KD and Neo by default) trains on the same data, seeds, step budget and batch, each
through `llm-neo distill`'s code path; then the teacher, the untrained student and every arm are scored
on the same held-out records: held-out CE, KL to the teacher and top-1 agreement, a task score from
greedy answers to the held-out prompts, and optionally lm-evaluation-harness tasks. The report gives
mean ± std over seeds, Neo's paired difference to every other arm with a 95% interval, what each arm
cost (time, throughput, memory) and a projection of the real run.

    output_dir/
      compare.yaml        the options; a rerun whose result-changing options differ is refused
      splits/             the training and held-out splits compare made, and the --train-records subsets
      cache/              teacher caches (--cache-teacher K)
      arms/<arm>/         one distill run each; its config.yaml reproduces it
      eval/<model>.json   each model's held-out scores
      results.json, report.md, report.html, plots/

Resumable as a whole: run the same command again after a kill and the finished arms are kept, the
running arm resumes from its checkpoint and only what is missing is computed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llm_neo import __version__
from llm_neo.alignment import pair_report
from llm_neo.choices import ARM_VARIANTS, COMPARISON_ORDER, METHOD_NAMES, METHODS
from llm_neo.commands.cost import GPUS, flops_per_token, gpu, parse_tokens, project
from llm_neo.config import (
    ON_POLICY_OPTIONS,
    CacheTeacherConfig,
    DistillConfig,
    TrainOptions,
    check_choices,
    check_data_path,
    check_model_path,
    check_ranges,
    dump_yaml,
    parse_arm,
    validate_distill,
)
from llm_neo.cross_tokenizer import CrossRun, aligned_heldout, read_aligned
from llm_neo.data import Example, load_records, read_examples
from llm_neo.errors import ConfigError
from llm_neo.eval.answers import answer_stats
from llm_neo.eval.generate import greedy_generations
from llm_neo.eval.metrics import heldout_metrics
from llm_neo.eval.scoring import SCORES, parse_score, references, score_answers
from llm_neo.losses import IGNORE_INDEX
from llm_neo.models.loading import (
    kd_vocab_size,
    load_config,
    load_frozen,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
)
from llm_neo.models.quant import load_teacher
from llm_neo.options import (
    DATA,
    MODELS,
    OPTIMISATION,
    RUN,
    Effect,
    canonical_keys,
    load_yaml,
    option_help,
    options_with,
    to_dict,
)
from llm_neo.records import from_json, to_json
from llm_neo.records.compare import (
    SCHEMA_VERSION,
    ArmCost,
    ArmGroup,
    ArmRun,
    ArmTime,
    Budget,
    ComparedData,
    CompareResults,
    Cost,
    CurvePoint,
    GroupStats,
    ModelScores,
    PairedDifference,
    PairedRow,
    Projection,
    ReferenceModels,
    SizeBudget,
    Stats,
    TeacherCacheCost,
    Timing,
)
from llm_neo.records.pair import PairReport
from llm_neo.report.stats import paired_difference, summarize
from llm_neo.runtime.atomic import atomic_write_json, atomic_write_text
from llm_neo.runtime.checkpoint import list_checkpoints
from llm_neo.runtime.distributed import barrier, close, init_world
from llm_neo.runtime.integrity import read_checked, with_checksum
from llm_neo.runtime.lock import releases_locks
from llm_neo.runtime.memory import GiB
from llm_neo.runtime.rundir import Holds, Outcome, Refusal, check_output_dir, write_marker
from llm_neo.runtime.workers import Job, Report, available_cores, load_average, run_jobs, sampled_load
from llm_neo.summary import MemoryKind, RunSummary

log = logging.getLogger("llm_neo")

RESULTS = "results.json"
EVAL = "evaluation"  # the --help group of the scoring options
# --exact-memory: glibc serves blocks from 64 KB up with mmap (see runtime.memory.set_mmap_threshold).
EXACT_MEMORY_MMAP_THRESHOLD = 64 * 1024
# The worker processes import these once, before the first job.
PRELOAD = ("llm_neo.distill", "llm_neo.commands.compare")


@dataclass
class LearningRates:
    """Peak learning rate of each arm (--lr.neo 3e-4); unset: the paper's rule (2e-5 for the
    full-parameter arms, 10x for the LoRA arms)."""

    sft: float | None = field(default=None, metadata=option_help("Learning rate of the sft arm."))
    lora: float | None = field(default=None, metadata=option_help("Learning rate of the lora arm."))
    kd: float | None = field(default=None, metadata=option_help("Learning rate of the kd arm."))
    neo: float | None = field(default=None, metadata=option_help("Learning rate of the neo arm."))


@dataclass
class CompareConfig(TrainOptions):
    """`llm-neo compare`: every arm on your teacher, student and data, scored and costed side by side."""

    methods: list[str] = field(
        default_factory=lambda: list(COMPARISON_ORDER),
        metadata=option_help(
            "Arms to compare (space- or comma-separated): sft lora kd neo, and quantized variants such "
            f"as neo+int8-teacher or lora+nf4-student ({', '.join(ARM_VARIANTS)}).",
            group=MODELS,
        ),
    )
    heldout: str | None = field(
        default=None,
        metadata=option_help(
            "Held-out records every model is scored on (Alpaca, prompt/completion, or chat records "
            "ending with an assistant turn). Default: --eval-fraction of --data, split off once.",
            group=DATA,
        ),
    )
    train_records: list[int] | None = field(
        default=None,
        metadata=option_help(
            "A data-size axis: repeat the comparison on the first N training records for each N "
            "(e.g. 200 800 3200), to see how much data is needed and where the teacher's signal pays.",
            group=DATA,
        ),
    )
    seeds: int = field(
        default=3, metadata=option_help("Seeds per arm: --seed, --seed+1, ...", group=OPTIMISATION)
    )
    seed: int = field(default=42, metadata=option_help("The first seed.", group=OPTIMISATION))
    lr: LearningRates = field(default_factory=LearningRates, metadata=option_help("", group=OPTIMISATION))
    cache_teacher: int = field(
        default=0,
        metadata=option_help(
            "Build a teacher cache with this top-k first and train the KD arms from it (the teacher runs "
            "once for all of them); 0: the teacher runs online in every KD arm.",
            group=MODELS,
        ),
    )
    score: str = field(
        default="normalized",
        metadata=option_help(
            "Task score of the greedy answers against the reference responses: "
            + ", ".join(SCORES)
            + " (agreement with the teacher's own greedy answers: a fidelity score).",
            group=EVAL,
            effect=Effect.SCORING,
        ),
    )
    category_field: str = field(
        default="category",
        metadata=option_help(
            "Record field whose values the task score is also reported by.", group=EVAL, effect=Effect.SCORING
        ),
    )
    max_new_tokens: int | None = field(
        default=None,
        metadata=option_help(
            "Longest greedy answer. Default: the longest reference + 8 tokens.",
            group=EVAL,
            effect=Effect.SCORING,
        ),
    )
    lm_eval_tasks: list[str] | None = field(
        default=None,
        metadata=option_help(
            "lm-evaluation-harness tasks every merged model is also scored on (pip install "
            "'llm-neo[eval]'; the datasets must be on this machine).",
            group=EVAL,
            effect=Effect.SCORING,
        ),
    )
    lm_eval_include: str | None = field(
        default=None,
        metadata=option_help("A directory of local lm-eval task YAMLs.", group=EVAL, effect=Effect.SCORING),
    )
    lm_eval_limit: int | None = field(
        default=None,
        metadata=option_help(
            "Score at most this many documents per lm-eval task.", group=EVAL, effect=Effect.SCORING
        ),
    )
    probes: list[str] = field(
        default_factory=list,
        metadata=option_help(
            "Also probe what each arm inherited from the teacher (llm-neo probe): probe sources, 'builtin' "
            "or files (CrowS-Pairs .csv, StereoSet .json, BBQ or llm-neo .jsonl). The first seed of each "
            "arm is probed, the untrained student is the baseline; the report gains the probe's section.",
            group=EVAL,
            effect=Effect.REPORT,
        ),
    )
    project_tokens: str | None = field(
        default=None,
        metadata=option_help(
            "Project each arm's cost to a full run of this many tokens (e.g. 50M, 2B).",
            group=RUN,
            effect=Effect.REPORT,
        ),
    )
    gpu: str | None = field(
        default=None,
        metadata=option_help(
            f"The card the projection is for: {', '.join(GPUS)}.",
            choices=tuple(GPUS),
            group=RUN,
            effect=Effect.REPORT,
        ),
    )
    gpus: int = field(
        default=1, metadata=option_help("Cards the projected run uses.", group=RUN, effect=Effect.REPORT)
    )
    gpu_price: float | None = field(
        default=None,
        metadata=option_help(
            "Price of one GPU-hour (any currency, e.g. 2.5): the projection gains each arm's cost.",
            group=RUN,
            effect=Effect.REPORT,
        ),
    )
    utilization: float = field(
        default=0.4,
        metadata=option_help(
            "Fraction of the card's bf16 peak a FLOPs-based projection assumes.",
            group=RUN,
            effect=Effect.REPORT,
        ),
    )
    jobs: int | None = field(
        default=None,
        metadata=option_help(
            "Arms trained at once on a CPU, each in its own process. Default 2 (1 on a GPU).",
            group=RUN,
            effect=Effect.RUNTIME,
        ),
    )
    exact_memory: bool = field(
        default=False,
        metadata=option_help(
            "CPU: measure the arms' peak RSS without allocator slack (glibc returns every freed block of "
            "64 KB or more at once, so the RSS tracks live memory). About 2x slower arms.",
            group=RUN,
            effect=Effect.REPORT,
        ),
    )
    plan_only: bool = field(
        default=False,
        metadata=option_help(
            "Say whether the comparison can decide (epochs per arm, trained tokens, held-out size, the "
            "smallest detectable score difference, warnings with their fixes) and stop: nothing trains "
            "and nothing is written to --output-dir.",
            group=RUN,
            effect=Effect.REPORT,
        ),
    )
    output_dir: str = field(
        default="runs/compare", metadata=option_help("Where everything goes.", group=RUN, effect=Effect.PLACE)
    )
    overwrite: bool = field(
        default=False,
        metadata=option_help(
            "Discard a comparison in --output-dir made with other options and start again.",
            group=RUN,
            effect=Effect.EXISTING,
        ),
    )


# Options that change only the report or the scoring (scores are recomputed); any other change between a
# comparison and its rerun would mix results of different settings, and is refused (a COST option too:
# the comparison measures time and memory).
REPORT_ONLY = options_with(CompareConfig, Effect.RUNTIME, Effect.EXISTING, Effect.REPORT)
SCORING = options_with(CompareConfig, Effect.SCORING)


# ------------------------------------------------------------------------------------------------
# Checks, before anything trains


def validate_compare(config: CompareConfig) -> None:
    """Every problem of the options and of the held-out file at once (ConfigError / DataError)."""
    c = config
    p: list[str] = []
    check_choices(p, c)
    arms: dict[str, tuple[str, dict[str, str]]] = {}
    for arm in c.methods:
        try:
            arms[arm] = parse_arm(arm)
        except ConfigError as err:
            p += err.problems
    if not c.methods:
        p.append(f"--methods: none: give some of {', '.join(METHOD_NAMES)}")
    if not c.student:
        p.append("--student is required (a model directory or hub id)")
    if c.probes and not c.teacher:
        p.append("--probes measures what the arms inherited from the teacher: give --teacher too")
    if c.probes:
        from llm_neo.commands.probe import check_probe_sources

        check_probe_sources(p, c.probes)
    check_model_path(p, "student", c.student)
    check_model_path(p, "teacher", c.teacher)
    if any(METHODS[m].kd for m, _ in arms.values()) and not c.teacher and not c.teacher_cache:
        p.append("--teacher is required for the kd and neo arms (or --teacher-cache, or --methods sft lora)")
    check_data_path(p, c.data)
    if c.heldout and not Path(c.heldout).expanduser().exists():
        p.append(f"--heldout: {c.heldout!r} does not exist")
    check_ranges(
        p,
        [
            ("seeds", c.seeds, c.seeds >= 1, ">= 1"),
            ("gpus", c.gpus, c.gpus >= 1, ">= 1"),
            ("utilization", c.utilization, 0 < c.utilization <= 1, "in (0, 1]"),
            ("gpu-price", c.gpu_price, c.gpu_price is None or c.gpu_price >= 0, ">= 0"),
            ("cache-teacher", c.cache_teacher, c.cache_teacher >= 0, ">= 0"),
            ("max-new-tokens", c.max_new_tokens, c.max_new_tokens is None or c.max_new_tokens >= 1, ">= 1"),
        ],
    )
    if c.train_records is not None and (not c.train_records or min(c.train_records) < 1):
        p.append("--train-records: give record counts >= 1, e.g. 200 800 3200")
    for check in (lambda: parse_score(c.score), lambda: c.project_tokens and parse_tokens(c.project_tokens)):
        try:
            check()
        except ConfigError as err:
            p += err.problems
    if c.score == "teacher" and not c.teacher:
        p.append("--score teacher scores agreement with the teacher's own answers: give --teacher")
    if c.project_tokens and not c.gpu:
        p.append("--project-tokens needs --gpu (the card to project to: " + ", ".join(GPUS) + ")")
    if c.gpu_price is not None and not c.project_tokens:
        p.append("--gpu-price prices the projection: give --project-tokens (and --gpu) too, e.g. 50M")
    if c.cross_tokenizer is not None and (c.cache_teacher or c.probes):
        p.append(
            f"--cross-tokenizer {c.cross_tokenizer}: --cache-teacher and --probes do not work across "
            "tokenizers yet; drop them"
        )
    sampled = [arm for arm, (_, variants) in arms.items() if "on_policy" in variants]
    given = [f"--{n.replace('_', '-')}" for n in ("on_policy", *ON_POLICY_OPTIONS) if _differs(c, n)]
    if given and not sampled:
        p.append(
            f"{', '.join(given)}: the on-policy options apply to the +on-policy arms: add neo+on-policy or "
            "kd+on-policy to --methods, or drop them"
        )
    # The arms' own checks (ranges, LoRA, loss, quantization): every arm's config, all problems at once.
    for arm in arms if not p else ():
        try:
            validate_distill(_arm_config(c, arm, c.seed, c.data, Path(c.output_dir) / "arms" / "check"))
        except ConfigError as err:
            p += [f"{arm}: {problem}" for problem in err.problems if f"{arm}: {problem}" not in p]
    if p:
        raise ConfigError(list(dict.fromkeys(p)))


# ------------------------------------------------------------------------------------------------
# The comparison, top to bottom


@dataclass
class Arm:
    """One distill run of the comparison: an arm (a method, perhaps with quantized variants) at a seed
    and a data size."""

    name: str
    method: str
    seed: int
    records: int | None  # training records (None: all of them)
    config: DistillConfig


@dataclass
class Plan:
    """What a comparison trains and scores, resolved from the options and the data."""

    config: CompareConfig
    out: Path
    train: str  # the training data file
    heldout: str  # the held-out data file
    sizes: list[int | None]  # --train-records (None: all the training records)
    arms: list[Arm] = field(default_factory=list)


Extra = Callable[[CompareResults], None]  # adds a caller's (the demo's) facts to the results


@releases_locks
def compare(config: CompareConfig, *, extra: Extra | None = None) -> CompareResults | None:
    """Run (or finish) the comparison; write and return its results (results.json). None on a torchrun
    rank other than 0 (rank 0 scores and reports)."""
    started = time.perf_counter()
    config = dataclasses.replace(config, methods=_split(config.methods))
    validate_compare(config)
    if config.plan_only:
        state_budget(plan_only(config))
        return None
    out = Path(config.output_dir).expanduser()
    # Under torchrun rank 0 decides for all (its refusal ends the launch), and the others write nothing
    # there before it has: a rank checking while another wrote the splits would find "files but no
    # comparison" and refuse the run it is part of.
    world = init_world(config.device)
    if world.rank == 0:
        _check_output_dir(config, out)
    barrier(world)
    plan = _plan(config, out)
    _check_heldout(plan)
    budget = state_budget(plan_budget(plan))
    dump_yaml(config, out / "compare.yaml")
    write_marker(out, "compare", ("compare.yaml", "arms", "eval", "cache", "splits", RESULTS))
    t0 = time.perf_counter()
    with sampled_load() as loads:  # what the arms' times were measured under
        caches = _build_caches(plan)
        summaries = _train_arms(plan, caches)
    close(world)
    if world.rank != 0:
        return None
    arms_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    evaluations = _evaluate(plan, summaries)
    eval_s = time.perf_counter() - t0
    groups = _groups(plan, summaries, evaluations)
    probe, probe_s = None, None
    if config.probes:
        t0 = time.perf_counter()
        probe = _probe(plan, groups)
        probe_s = time.perf_counter() - t0
    timing = Timing(arms_s=arms_s, eval_s=eval_s, probe_s=probe_s, total_s=time.perf_counter() - started)
    results = _results(plan, evaluations, groups, probe, timing)
    results.budget = budget
    if loads:
        results.load_average, results.load_max = round(sum(loads) / len(loads), 2), max(loads)
    if caches:
        teacher = evaluations.get("teacher")
        results.teacher_caches = [
            _cache_cost(path, None if teacher is None else teacher.parameters) for path in caches.values()
        ]
    if extra is not None:
        extra(results)
    from llm_neo.report.compare import write_report

    atomic_write_json(out / RESULTS, to_json(results))
    write_report(results, out)
    return results


def _split(values: list[str]) -> list[str]:
    """Space- or comma-separated values (``--methods sft,neo`` or ``--methods sft neo``)."""
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


def _check_output_dir(config: CompareConfig, out: Path) -> None:
    """A rerun continues the comparison in ``out`` only if every option that shapes its results is the
    same; --overwrite starts again."""
    if int(os.environ.get("RANK", "0")) != 0:
        return  # torchrun: rank 0 alone judges and locks the directory; the others may see it writing
    checked = check_output_dir(
        out,
        flag="--output-dir",
        overwrite=config.overwrite,
        marker="compare.yaml",
        changed=lambda _: _changed_options(config, out / "compare.yaml"),
        continues=True,
        lock="compare",
        known=("arms", RESULTS),
    )
    if checked.refusal is Refusal.NOT_A_RUN:
        raise ConfigError([str(checked.message)])
    if checked.refusal is Refusal.HOLDS_FILES:
        raise ConfigError(
            [
                f"--output-dir {out} holds files but no comparison; choose another --output-dir or "
                "pass --overwrite"
            ]
        )
    if checked.refusal is Refusal.CHANGED:
        raise ConfigError(
            [
                f"--output-dir {out} holds a comparison made with other {', '.join(checked.changed)}: rerun "
                "with the same options to continue it, --overwrite to start again, or choose another "
                "--output-dir"
            ]
        )
    if checked.outcome is Outcome.OVERWRITE and checked.holds is Holds.RUN:
        import shutil

        for name in ("arms", "eval", "cache", "splits", RESULTS):
            target = out / name
            shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)


def _changed_options(config: CompareConfig, saved: Path) -> list[str]:
    """The options that differ from the comparison's compare.yaml and shape its results."""
    # canonical_keys: a compare.yaml written before an option's rename continues under its new name
    before, now = canonical_keys(CompareConfig, load_yaml(saved)), to_dict(config)
    changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    return [k for k in changed if k not in REPORT_ONLY | SCORING]


def _plan(config: CompareConfig, out: Path) -> Plan:
    """The data files and the arms: every size x seed x method."""
    train, heldout = config.data, config.heldout
    if not heldout:
        train, heldout = _split_data(config, out / "splits")
    sizes: list[int | None] = list(config.train_records) if config.train_records else [None]
    plan = Plan(config=config, out=out, train=train, heldout=heldout, sizes=sizes)
    available = len(load_records(train))
    too_many = [n for n in sizes if n is not None and n > available]
    if too_many:
        raise ConfigError(
            [
                f"--train-records: {too_many} exceed the {available} training records in {train}; give "
                "smaller counts"
            ]
        )
    for records in sizes:
        data = train if records in (None, available) else _subset(train, records, config.seed, out / "splits")
        for seed in range(config.seed, config.seed + config.seeds):
            for method in config.methods:  # an arm: a method, perhaps with quantized variants
                name = _arm_name(method, seed, records)
                arm = _arm_config(config, method, seed, data, out / "arms" / name)
                plan.arms.append(Arm(name=name, method=method, seed=seed, records=records, config=arm))
    return plan


def _launched_ranks() -> int:
    """Processes of a torchrun / accelerate launch (1: not launched so)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _arm_name(method: str, seed: int, records: int | None) -> str:
    return f"{method}-seed{seed}" + ("" if records is None else f"-n{records}")


def _arm_config(config: CompareConfig, arm: str, seed: int, data: str, output_dir: Path) -> DistillConfig:
    """One arm: the shared training options, with the arm's method, quantization, seed, learning rate
    (its method's) and output."""
    method, variants = parse_arm(arm)
    quantization = _quantization(variants)
    shared = {f.name: getattr(config, f.name) for f in dataclasses.fields(TrainOptions)}
    shared |= _on_policy_options(config, "on_policy" in variants)
    if config.cross_tokenizer and not METHODS[method].kd:
        # A CE arm never reads the teacher, which cannot read its tokens: the comparison scores it instead.
        shared |= {
            "cross_tokenizer": None,
            "teacher": None,
            "teacher_quant": "none",
            "teacher_quant_backend": "auto",
        }
    # Local paths absolute: the arm's config.yaml, and the command that reruns it, work from anywhere.
    shared |= {name: _absolute(shared[name]) for name in ("student", "teacher", "teacher_cache")}
    steps = config.max_steps
    return DistillConfig(
        **shared
        | quantization
        | {
            "data": _absolute(data),
            "eval_fraction": 0.0,  # every model is scored on the comparison's held-out file instead
            # Checkpoints let a killed comparison resume the running arm (about five per arm).
            "save_every": config.save_every or (max(1, -(-steps // 5)) if steps else 50),
        },
        method=method,
        lr=getattr(config.lr, method),  # the method's: neo+int8-teacher trains at --lr.neo
        seed=seed,
        output_dir=str(output_dir.expanduser().resolve()),
    )


def _quantization(variants: dict[str, str]) -> dict[str, str]:
    """The quantization options among an arm's variants (``parse_arm``'s): +on-policy is not one."""
    return {k: v for k, v in variants.items() if k in ("teacher_quant", "student_quant")}


def _differs(config: CompareConfig, name: str) -> bool:
    """Whether option ``name`` of ``config`` was set to other than its default."""
    default = next(f.default for f in dataclasses.fields(TrainOptions) if f.name == name)
    return bool(getattr(config, name) != default)


def _on_policy_options(config: CompareConfig, on_policy: bool) -> dict[str, Any]:
    """The on-policy options of an arm: a +on-policy arm samples at --on-policy λ (1 when not given) with
    the comparison's sampling options; every other arm trains off-policy (the options' defaults)."""
    names = ("on_policy", *ON_POLICY_OPTIONS)
    if not on_policy:
        return {f.name: f.default for f in dataclasses.fields(TrainOptions) if f.name in names}
    return {name: getattr(config, name) for name in names} | {"on_policy": config.on_policy or 1.0}


def _absolute(path: str | None) -> str | None:
    """A local file or directory's absolute path; a hub id (no such local path) unchanged."""
    if not path or not Path(path).expanduser().exists():
        return path
    return str(Path(path).expanduser().resolve())


def _split_data(config: CompareConfig, data_dir: Path) -> tuple[str, str]:
    """Split --data into training and held-out files once (--eval-fraction of the records, by --seed)."""
    train_file, heldout_file = data_dir / "train.jsonl", data_dir / "heldout.jsonl"
    if train_file.is_file() and heldout_file.is_file():
        return str(train_file), str(heldout_file)
    records = load_records(config.data)
    if len(records) < 2:
        raise ConfigError(
            [f"--data: {config.data} has {len(records)} record(s); give --heldout or more data"]
        )
    order = list(range(len(records)))
    random.Random(config.seed).shuffle(order)
    n_heldout = min(max(round(config.eval_fraction * len(records)), 1), len(records) - 1)
    chosen = set(order[:n_heldout])
    _write_jsonl(heldout_file, [r for i, r in enumerate(records) if i in chosen])
    _write_jsonl(train_file, [r for i, r in enumerate(records) if i not in chosen])
    return str(train_file), str(heldout_file)


def _subset(train: str, records: int, seed: int, data_dir: Path) -> str:
    """The first ``records`` training records of a fixed shuffle: each size's data holds the smaller's."""
    path = data_dir / f"train-n{records}.jsonl"
    if not path.is_file():
        rows = load_records(train)
        order = list(range(len(rows)))
        random.Random(seed).shuffle(order)
        _write_jsonl(path, [rows[i] for i in order[:records]])
    return str(path)


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def _check_heldout(plan: Plan) -> None:
    """The held-out file must give every record a reference response to score answers against."""
    references(load_records(plan.heldout), source=plan.heldout)


# ------------------------------------------------------------------------------------------------
# Can it decide? The budget, stated before the first arm trains


def plan_only(config: CompareConfig, *, time_arms: bool = False) -> Budget:
    """--plan-only: the comparison's budget, from its options and data alone; nothing trains and nothing
    is written to --output-dir (a split of --data is made in a temporary directory, as the run would
    make it: same --seed, same --eval-fraction), so a rerun with other options is not refused. With
    ``time_arms``, each arm is also timed over a few warm-up steps there (``arm_times``)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="llm-neo-plan-") as tmp:
        plan = _plan(config, Path(tmp))
        _check_heldout(plan)
        budget = plan_budget(plan)
        if time_arms:
            budget.arm_times = arm_times(plan, budget.sizes[-1].steps)
        return budget


WARMUP_STEPS = 3  # per arm under --plan-only: the first step loads and warms up, the others are timed


class _WarmedUp(Exception):
    """Raised from a warm-up run's step callback: the steps are timed, the rest is not needed."""


def arm_times(plan: Plan, steps: int) -> list[ArmTime]:
    """Each arm's training time at the largest data size (``steps`` optimizer steps), estimated from a
    ``WARMUP_STEPS``-step run of its first seed in the plan's temporary directory: the load and the
    first step, then the mean of the others times ``steps``. Arms that would read --cache-teacher's cache
    run the teacher online here (the cache is not built): theirs is the online estimate."""
    from llm_neo.distill import distill

    estimates = []
    first: dict[str, Arm] = {}  # each method's first arm (its first seed) at the largest size
    for arm in plan.arms:
        if arm.records == plan.sizes[-1]:
            first.setdefault(arm.method, arm)
    for method in first:
        stamps: list[float] = []

        def timed(step: int, metrics: dict[str, float], stamps: list[float] = stamps) -> None:
            stamps.append(time.perf_counter())
            if step >= WARMUP_STEPS:
                raise _WarmedUp

        config = dataclasses.replace(first[method].config, max_steps=WARMUP_STEPS, save_every=0, report_to=[])
        log.info("compare: --plan-only: timing %d warm-up steps of %s", WARMUP_STEPS, method)
        started = time.perf_counter()
        with contextlib.suppress(_WarmedUp):
            distill(config, on_step=timed)
        per_step = (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1)
        load = max(stamps[0] - started - per_step, 0.0)
        estimates.append(
            ArmTime(
                arm=method,
                warmup_steps=WARMUP_STEPS,
                steps=steps,
                load_seconds=load,
                seconds_per_step=per_step,
                seconds=load + steps * per_step,
            )
        )
    return estimates


def plan_budget(plan: Plan) -> Budget:
    """Epochs and trained tokens per arm at every data size, the held-out split's records and scored
    tokens, the smallest task-score difference they detect at the seeds run (report.power), and the
    warnings; the training and held-out files are tokenized as distill tokenizes them."""
    from llm_neo.distill import planned_steps
    from llm_neo.report.power import METHOD, budget_warnings, detectable_difference

    config = plan.config
    tokenizer = load_tokenizer(config.student, role="student", trust_remote_code=config.trust_remote_code)
    per_step = config.batch_size * config.grad_accum * _launched_ranks()
    sizes = []
    for records in plan.sizes:
        data = next(str(arm.config.data) for arm in plan.arms if arm.records == records)
        _, examples, _ = read_examples(data, tokenizer, config)
        steps = planned_steps(plan.arms[0].config, len(examples), _launched_ranks())
        epochs = steps * per_step / max(len(examples), 1)
        per_epoch = _response_tokens(examples)
        sizes.append(
            SizeBudget(
                records=records,
                train_examples=len(examples),
                steps=steps,
                samples_per_step=per_step,
                epochs=epochs,
                tokens_per_epoch=per_epoch,
                trained_tokens=round(per_epoch * epochs),
            )
        )
    heldout, examples, _ = read_examples(plan.heldout, tokenizer, config)
    budget = Budget(
        sizes=sizes,
        heldout_records=len(heldout),  # every record is scored (its greedy answer)
        heldout_tokens=_response_tokens(examples),
        seeds=config.seeds,
        detectable=detectable_difference(len(heldout), config.seeds),
        method=METHOD,
        warnings=[],
    )
    budget.warnings = budget_warnings(budget)
    return budget


def _response_tokens(examples: list[Example]) -> int:
    """The tokens the loss and the held-out metrics are over: trained labels, shifted as they are."""
    return sum(sum(1 for t in ex.labels[1:] if t != IGNORE_INDEX) for ex in examples)


def state_budget(budget: Budget) -> Budget:
    """Log the budget (INFO) and its warnings (WARNING), before anything trains; returns it."""
    from llm_neo.report.power import budget_lines

    for line in budget_lines(budget):
        log.info("compare: %s", line)
    for warning in budget.warnings:
        log.warning("compare: %s", warning)
    return budget


def _build_caches(plan: Plan) -> dict[tuple[str, str, str], str]:
    """--cache-teacher K: one teacher cache per training data file and teacher quantization; returns
    ``_cache_key`` -> cache dir. Under torchrun every rank calls this: each computes its share of each
    cache's shards, and rank 0 writes its manifest (``cache_teacher``)."""
    config = plan.config
    if config.teacher_cache:  # a damaged or incomplete one is refused here, not by each arm's worker
        from llm_neo.teacher_cache.store import open_cache

        open_cache(config.teacher_cache)
    if not config.cache_teacher or not config.teacher or config.teacher_cache:
        return {}
    from llm_neo.teacher_cache.writer import cache_teacher

    caches = {}
    for key in sorted({_cache_key(arm.config) for arm in plan.arms if _reads_cache(arm.config)}):
        data, quant, backend = key
        target = plan.out / "cache" / (Path(data).stem + ("" if quant == "none" else f"-{quant}-teacher"))
        cache_teacher(
            CacheTeacherConfig(
                teacher=config.teacher,
                data=data,
                output=str(target),
                tokenizer=config.student,
                top_k=config.cache_teacher,
                kd_temperature=config.kd_temperature,
                max_length=config.max_length,
                train_on_prompt=config.train_on_prompt,
                device=config.device,
                dtype=config.dtype,
                trust_remote_code=config.trust_remote_code,
                allow_pickle_weights=config.allow_pickle_weights,
                teacher_quant=quant,
                teacher_quant_backend=backend,
            )
        )
        caches[key] = str(target.resolve())
    return caches


def _cache_cost(path: str, teacher_parameters: int | None) -> TeacherCacheCost:
    """What building the cache at ``path`` cost, from its manifest (its examples and wall time)."""
    from llm_neo.teacher_cache.store import open_cache

    manifest = open_cache(path).manifest
    return TeacherCacheCost(
        path=path,
        examples=int(manifest.get("num_examples") or 0),
        seconds=float((manifest.get("stats") or {}).get("wall_s") or 0.0),
        teacher_parameters=teacher_parameters,
    )


def _reads_cache(config: DistillConfig) -> bool:
    """Whether an arm trains on a --cache-teacher cache: the KD arms, except the +on-policy ones, whose
    teacher scores the student's new samples online (a cache of the data's responses cannot)."""
    return config.uses_kd and config.on_policy == 0


def _cache_key(config: DistillConfig) -> tuple[str, str, str]:
    """What an arm's teacher cache depends on beyond the shared options: its data and its teacher's
    quantization (a neo+int8-teacher arm trains on an int8 teacher's targets)."""
    return str(config.data), config.teacher_quant, config.teacher_quant_backend


def _train_arms(plan: Plan, caches: dict[tuple[str, str, str], str]) -> dict[str, RunSummary]:
    """Train every arm not already done (resuming one that has a checkpoint); returns name -> summary."""
    done: dict[str, RunSummary] = {}
    todo: list[Job] = []
    for arm in plan.arms:
        config = arm.config
        if _reads_cache(config) and _cache_key(config) in caches:
            config = dataclasses.replace(config, teacher_cache=caches[_cache_key(config)])
        finished = _finished(config)
        if finished is not None:
            done[arm.name] = finished
            continue
        out = Path(str(config.output_dir))
        resumable = bool(
            list_checkpoints(out / "checkpoints")
        )  # complete ones, not a killed write's leftovers
        config = dataclasses.replace(config, resume=resumable, overwrite=not resumable)
        steps = config.max_steps or 0
        todo.append(Job(arm.name, distill_job, config, steps, out.parent / f"{arm.name}.log", _rerun(config)))
    if todo and _launched_ranks() > 1:
        # Under torchrun every rank runs each arm in this process, sharded with FSDP2 as distill is, in
        # one process group kept across the arms; rank 0 finishes each arm alone (merge, export, held-out
        # scores) while the others wait for it, and keeps the summaries.
        from llm_neo.distill import distill

        world = init_world(plan.config.device)
        for job in todo:
            summary = distill(job.payload)
            if summary is not None:
                done[job.name] = summary
            barrier(world)
        close(world)
        return done
    if todo:
        log.info(
            "compare: %d of %d arms to train (%d done); logs in %s",
            len(todo),
            len(plan.arms),
            len(done),
            plan.out / "arms",
        )
        parallel, threads = _resources(plan.config)
        summaries, _ = run_jobs(
            todo,
            parallel=parallel,
            threads=threads,
            desc="arms",
            preload=PRELOAD,
            mmap_threshold=EXACT_MEMORY_MMAP_THRESHOLD if plan.config.exact_memory else 0,
            again="the same command (finished arms are kept, stopped ones resume from their checkpoints)",
        )
        done |= {job.name: summary for job, summary in zip(todo, summaries, strict=True)}
    return done


def _finished(config: DistillConfig) -> RunSummary | None:
    """The summary of an arm that ran to the end with these options, or None."""
    out = Path(str(config.output_dir))
    if not (out / "summary.json").is_file() or not (out / "config.yaml").is_file():
        return None
    from llm_neo.distill import with_default_chunk

    # The saved config carries the loss chunk the arm ran with (distill resolves an unset one).
    expected = with_default_chunk(config.resolved(), resolve_device(config.device))
    if canonical_keys(DistillConfig, load_yaml(out / "config.yaml")) != to_dict(
        dataclasses.replace(expected, resume=False, overwrite=False)
    ):
        return None
    try:
        return RunSummary.load(out)
    except ValueError as err:  # a damaged record: the arm is unfinished, its checkpoints resume it
        log.warning("%s; the arm is run again", err)
        return None


def _rerun(config: DistillConfig) -> str:
    return f"llm-neo distill --config {Path(str(config.output_dir)) / 'config.yaml'} --overwrite"


def _resources(config: CompareConfig) -> tuple[int, int]:
    """``(parallel, threads)`` of the worker processes: two arms at a time on a CPU (see runtime.workers),
    one on a GPU."""
    cores = available_cores()
    if resolve_device(config.device).type != "cpu":
        return 1, cores
    parallel = max(1, min(config.jobs or 2, cores))
    return parallel, max(1, cores // parallel)


def distill_job(config: DistillConfig, report: Report) -> RunSummary:
    """A worker's distill run, reporting each optimizer step and its loss."""
    from llm_neo.distill import distill

    summary = distill(config, on_step=lambda step, metrics: report(step, metrics["loss"]))
    assert summary is not None  # a worker runs one process, not a torchrun rank
    return summary


# ------------------------------------------------------------------------------------------------
# Scoring every model on the held-out records


@dataclass
class EvalPayload:
    """A scoring worker's job: the options, the held-out file, the scoring options its scores are cached
    under, and the models it scores (name -> path)."""

    config: CompareConfig
    heldout: str
    scoring: dict[str, Any]
    models: dict[str, str]
    teacher_answers: list[str] | None = None  # --score teacher: every model's references


def _evaluate(plan: Plan, summaries: dict[str, RunSummary]) -> dict[str, ModelScores]:
    """name -> scores, for the teacher, the untrained student and every arm; cached in eval/ (a score
    computed with the same scoring options is not computed again)."""
    config = plan.config
    models = {"student": config.student}
    if config.teacher:
        models = {"teacher": config.teacher} | models
    models |= {name: str(summary.output_dir / "merged") for name, summary in summaries.items()}
    scoring = {k: getattr(config, k) for k in sorted(SCORING)} | {"heldout": plan.heldout}
    against_teacher = parse_score(config.score).against_teacher
    results: dict[str, ModelScores] = {}
    todo = {}
    for name, path in models.items():
        cached = plan.out / "eval" / f"{name}.json"
        found = _cached_scores(cached)
        # Scores from before answers were counted are computed again: the verdict reads the counts; so
        # is a teacher's that kept no answers when they are the other models' references.
        if (
            found is not None
            and found.scoring == scoring
            and found.answers is not None
            and not (against_teacher and name == "teacher" and found.greedy_answers is None)
        ):
            results[name] = found
        else:
            todo[name] = path
    if todo:
        log.info("compare: scoring %d model(s); logs in %s", len(todo), plan.out / "eval")
    if against_teacher and "teacher" in todo:  # its answers are the references: scored first, alone
        results |= _score_models(plan, scoring, {"teacher": todo.pop("teacher")}, None)
    teacher_answers = results["teacher"].greedy_answers if against_teacher else None
    if todo:
        results |= _score_models(plan, scoring, todo, teacher_answers)
    return results


def _score_models(
    plan: Plan, scoring: dict[str, Any], todo: dict[str, str], teacher_answers: list[str] | None
) -> dict[str, ModelScores]:
    """Score the models ``todo`` (name -> path) in parallel workers; each one's scores written to eval/."""
    parallel, threads = _resources(plan.config)
    names = list(todo)
    shares = [names[k::parallel] for k in range(parallel) if names[k::parallel]]
    jobs = [
        Job(
            f"eval{k}",
            eval_job,
            EvalPayload(plan.config, plan.heldout, scoring, {n: todo[n] for n in share}, teacher_answers),
            len(share),
            plan.out / "eval" / f"eval{k}.log",
        )
        for k, share in enumerate(shares)
    ]
    parts, _ = run_jobs(jobs, parallel=parallel, threads=threads, desc="scoring", preload=PRELOAD)
    results: dict[str, ModelScores] = {}
    for part in parts:
        for name, scores in part.items():
            atomic_write_json(plan.out / "eval" / f"{name}.json", with_checksum(to_json(scores)))
            results[name] = scores
    return results


def _cached_scores(path: Path) -> ModelScores | None:
    """Scores cached by an earlier run, or None: none yet, or damaged (then they are computed again)."""
    if not path.is_file():
        return None
    try:
        return from_json(ModelScores, read_checked(path))
    except (OSError, ValueError) as err:  # a RecordError is a ValueError: a cache of another shape
        log.warning("compare: %s is damaged (%s); scoring that model again", path, err)
        return None


@dataclass(frozen=True)
class _CrossHeldout:
    """The held-out records across tokenizers: the student's examples, the teacher's, their alignment."""

    records: list[dict[str, Any]]
    examples: list[Example]
    teacher_tokenizer: Any
    teacher_examples: list[Example]
    run: CrossRun


def _cross_heldout(config: CompareConfig, heldout: str, tokenizer: Any) -> _CrossHeldout:
    assert config.teacher and config.cross_tokenizer
    trust = config.trust_remote_code
    teacher_tokenizer = load_tokenizer(config.teacher, role="teacher", trust_remote_code=trust)
    records, examples, _, run = read_aligned(
        heldout,
        tokenizer,
        teacher_tokenizer,
        config,
        method=config.cross_tokenizer,
        top_k=config.cross_tokenizer_top_k,
        names=(config.student, config.teacher),
    )
    _, teacher_examples, _ = read_examples(heldout, teacher_tokenizer, config)
    return _CrossHeldout(records, examples, teacher_tokenizer, teacher_examples, run)


def _heldout_scores(
    model: torch.nn.Module,
    name: str,
    teacher: torch.nn.Module | None,
    tokenizer: Any,
    examples: list[Example],
    cross: _CrossHeldout | None,
    config: CompareConfig,
    device: torch.device,
    dtype: torch.dtype,
) -> dict[str, float]:
    """A model's held-out metrics against the teacher; across tokenizers its CE and, for the students, the
    divergence on aligned positions (the teacher: its CE on its own tokens)."""
    common: dict[str, Any] = {"batch_size": config.eval_batch_size, "device": device, "dtype": dtype}
    if cross is None or teacher is None:
        kd_vocab = kd_vocab_size(tokenizer, model, teacher) if teacher is not None else None
        return heldout_metrics(
            model, examples, teacher, pad_token_id=tokenizer.pad_token_id, kd_vocab_size=kd_vocab, **common
        )
    if name == "teacher":
        pad = cross.run.pair.teacher_pad_id
        return heldout_metrics(model, cross.teacher_examples, None, pad_token_id=pad, **common)
    metrics = heldout_metrics(model, examples, None, pad_token_id=tokenizer.pad_token_id, **common)
    aligned = aligned_heldout(
        model, teacher, examples, cross.run, pad_token_id=tokenizer.pad_token_id, chunk_size=1024, **common
    )
    return metrics | {k: aligned[k] for k in ("aligned_kl_to_teacher", "aligned_coverage")}


def eval_job(payload: EvalPayload, report: Report) -> dict[str, ModelScores]:
    """A worker's scoring of some models: held-out metrics against the teacher, the task score of greedy
    answers, lm-eval tasks."""
    config = payload.config
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    tokenizer = load_tokenizer(config.student, role="student", trust_remote_code=config.trust_remote_code)
    cross = None
    if config.cross_tokenizer and config.teacher:
        cross = _cross_heldout(config, payload.heldout, tokenizer)
        records, examples = cross.records, cross.examples
    else:
        records, examples, _ = read_examples(payload.heldout, tokenizer, config)
    scorer = parse_score(config.score)
    teacher = None
    if config.teacher:  # quantized only as --teacher-quant says for all arms (not an arm's variant)
        teacher, _ = load_teacher(config, config.teacher, dtype=dtype, device=device, drift_batch=None)
    max_new = config.max_new_tokens or 8 + max(
        len(tokenizer(ref, add_special_tokens=False)["input_ids"])
        for ref in references(records, source="heldout")
    )
    results: dict[str, ModelScores] = {}
    for n, (name, path) in enumerate(payload.models.items(), start=1):
        model = (
            teacher if name == "teacher" else load_frozen(config, path, role=name, dtype=dtype, device=device)
        )
        assert model is not None
        own = cross is not None and name == "teacher"  # a teacher of another tokenizer reads its own
        answers, stopped = greedy_generations(
            model,
            cross.teacher_tokenizer if own and cross else tokenizer,
            records,
            device=device,
            max_new_tokens=max_new,
            progress=False,
        )
        metrics = _heldout_scores(model, name, teacher, tokenizer, examples, cross, config, device, dtype)
        against = (
            (answers if name == "teacher" else payload.teacher_answers) if scorer.against_teacher else None
        )
        task = score_answers(
            records,
            answers,
            scorer,
            category_field=config.category_field,
            source=payload.heldout,
            against=against,
        )
        # The eval layer's dicts become the record here, checked key by key against its types.
        results[name] = scores = from_json(
            ModelScores,
            {
                "scoring": payload.scoring,
                "path": path,
                **task,
                **{k: v for k, v in metrics.items() if k != "tokens"},
                "heldout_tokens": metrics["tokens"],
                "parameters": sum(p.numel() for p in model.parameters()),
                "examples": [
                    {"prompt": _prompt_text(r), "expected": ref, "answer": a}
                    for r, ref, a in list(
                        zip(records, against or references(records, source="heldout"), answers, strict=True)
                    )[:5]
                ],
            },
        )
        scores.answers = answer_stats(answers, stopped)
        if scorer.against_teacher and name == "teacher":
            scores.greedy_answers = answers
        if config.lm_eval_tasks:
            from llm_neo.eval.harness import lm_eval_scores

            scores.lm_eval = lm_eval_scores(
                path,
                config.lm_eval_tasks,
                include=config.lm_eval_include,
                limit=config.lm_eval_limit,
                device=device,
            )
        if model is not teacher:
            del model
        report(n, None)
    return results


def _probe(plan: Plan, groups: list[ArmGroup]) -> dict[str, Any]:
    """``llm-neo probe`` on the teacher, the untrained student (the baseline) and the first seed of every
    arm at the largest data size, written to ``probe/`` and returned (results.json holds it whole)."""
    from llm_neo.commands.probe import ProbeConfig, probe

    config = plan.config
    arms = [g for g in groups if g.records == plan.sizes[-1]]
    return probe(
        ProbeConfig(
            teacher=str(config.teacher),
            models=[
                f"student={config.student}",
                *(f"{g.method}={g.runs[0].output_dir}/merged" for g in arms),
            ],
            probes=list(config.probes),
            output_dir=str(plan.out / "probe"),
            device=config.device,
            dtype=config.dtype,
            trust_remote_code=config.trust_remote_code,
            allow_pickle_weights=config.allow_pickle_weights,
            seed=config.seed,
            overwrite=True,  # the probe is recomputed on every run of the comparison (it is quick)
        )
    )


def _prompt_text(record: dict[str, Any]) -> str:
    for key in ("instruction", "prompt"):
        if key in record:
            return str(record[key]) + (f"\n{record['input']}" if record.get("input") else "")
    messages = record.get("messages") or []
    users = [m["content"] for m in messages if m.get("role") == "user"]
    return str(users[-1]) if users else ""


# ------------------------------------------------------------------------------------------------
# Results


def _groups(
    plan: Plan, summaries: dict[str, RunSummary], evaluations: dict[str, ModelScores]
) -> list[ArmGroup]:
    """Every arm at every data size: its runs over the seeds and their statistics."""
    groups = []
    for records in plan.sizes:
        for method in plan.config.methods:
            runs = [
                _run_row(arm, summaries[arm.name], evaluations[arm.name])
                for arm in plan.arms
                if arm.method == method and arm.records == records
            ]
            base, variants = parse_arm(method)
            quantization = _quantization(variants)
            group = ArmGroup(method, base, quantization, records, runs, _group_stats(runs))
            groups.append(group)
    return groups


def _group_stats(runs: list[ArmRun]) -> GroupStats:
    """Mean, std, min and max over the seeds of each per-run number (left out where a run lacks it)."""

    def over(values: list[float | None]) -> Stats | None:
        present = [v for v in values if v is not None]
        return summarize(present) if len(present) == len(values) else None

    return GroupStats(
        accuracy=summarize([r.accuracy for r in runs]),
        ce=summarize([r.ce for r in runs]),
        kl_to_teacher=over([r.kl_to_teacher for r in runs]),
        top1_agreement=over([r.top1_agreement for r in runs]),
        aligned_kl_to_teacher=over([r.aligned_kl_to_teacher for r in runs]),
        train_time_s=summarize([r.train_time_s for r in runs]),
        wall_time_s=summarize([r.wall_time_s for r in runs]),
        tokens_per_s=over([r.tokens_per_s for r in runs]),
        tokens_processed_per_s=over([r.tokens_processed_per_s for r in runs]),
        peak_memory_gb=summarize([r.peak_memory_gb for r in runs]),
        peak_tensor_memory_gb=over([r.peak_tensor_memory_gb for r in runs]),
        per_category={c: summarize([r.per_category[c] for r in runs]) for c in runs[0].per_category},
    )


def _results(
    plan: Plan,
    evaluations: dict[str, ModelScores],
    groups: list[ArmGroup],
    probe: dict[str, Any] | None,
    timing: Timing,
) -> CompareResults:
    """Everything the report shows (results.json)."""
    config = plan.config
    measured_on = _device_name(config.device)
    return CompareResults(
        schema_version=SCHEMA_VERSION,
        llm_neo_version=__version__,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        config=to_dict(config),
        data=ComparedData(
            train=plan.train,
            heldout=plan.heldout,
            sizes=plan.sizes,
            train_records_available=len(load_records(plan.train)),
        ),
        device=measured_on,
        device_type=resolve_device(config.device).type,
        load_average=load_average(),
        cpus=available_cores(),
        models=ReferenceModels(teacher=evaluations.get("teacher"), student=evaluations["student"]),
        groups=groups,
        paired=_paired(config, groups),
        cost=_cost(plan, groups, measured_on),
        probe=probe,
        timing=timing,
        pair=_pair(config, plan.heldout),
    )


def _pair(config: CompareConfig, heldout: str) -> PairReport | None:
    """--cross-tokenizer: the pair report on the held-out records, for the report."""
    if not (config.cross_tokenizer and config.teacher):
        return None
    trust = config.trust_remote_code
    student = load_tokenizer(config.student, role="student", trust_remote_code=trust)
    teacher = load_tokenizer(config.teacher, role="teacher", trust_remote_code=trust)
    records = load_records(heldout)
    names = (config.student, config.teacher)
    return pair_report(
        student, teacher, names=names, records=records, data=heldout, max_length=config.max_length
    )


def _run_row(arm: Arm, summary: RunSummary, scores: ModelScores) -> ArmRun:
    return ArmRun(
        name=arm.name,
        seed=arm.seed,
        records=arm.records,
        output_dir=summary.output_dir,
        accuracy=scores.accuracy,
        per_category=scores.per_category,
        ce=scores.ce,
        kl_to_teacher=scores.kl_to_teacher,
        top1_agreement=scores.top1_agreement,
        lm_eval=scores.lm_eval,
        train_time_s=summary.train_time_s,
        wall_time_s=summary.wall_time_s,
        tokens_per_s=summary.tokens_trained / summary.train_time_s if summary.train_time_s else None,
        tokens_trained=summary.tokens_trained,
        peak_memory_gb=summary.peak_memory_gb,
        peak_memory_kind=MemoryKind(summary.peak_memory_kind),
        peak_tensor_memory_gb=summary.peak_tensor_memory_gb,
        trainable_parameters=summary.trainable_parameters,
        student_parameters=summary.student_parameters,
        teacher_quant=summary.teacher_quant,
        student_quant=summary.student_quant,
        lr=summary.config["lr"],
        final=summary.final,
        curve=_curve(summary.output_dir / "metrics.jsonl"),
        examples=scores.examples,
        tokens_processed_per_s=summary.tokens_processed / summary.train_time_s
        if summary.tokens_processed is not None and summary.train_time_s
        else None,
        answers=scores.answers,
        aligned_kl_to_teacher=scores.aligned_kl_to_teacher,
    )


def _curve(metrics: Path) -> list[CurvePoint]:
    """The training curve of a run (step, loss, CE, KD) from its metrics.jsonl."""
    lines = metrics.read_text().splitlines() if metrics.is_file() else []
    return [from_json(CurvePoint, json.loads(line)) for line in lines if line.strip()]


# (metric, higher is better) of the paired comparisons.
PAIRED = (
    ("accuracy", True),
    ("kl_to_teacher", False),
    ("aligned_kl_to_teacher", False),
    ("ce", False),
    ("train_time_s", False),
)


def _paired(config: CompareConfig, groups: list[ArmGroup]) -> list[PairedRow]:
    """Neo against every other arm, at every data size, paired by seed."""
    rows: list[PairedRow] = []
    if "neo" not in config.methods:
        return rows
    for neo in (g for g in groups if g.method == "neo"):
        for other in (g for g in groups if g.records == neo.records and g.method != "neo"):
            by_seed = {r.seed: r for r in other.runs}
            pairs = [(r, by_seed[r.seed]) for r in neo.runs if r.seed in by_seed]
            differences: dict[str, PairedDifference] = {}
            for metric, higher in PAIRED:
                a = [getattr(r, metric) for r, _ in pairs]
                b = [getattr(r, metric) for _, r in pairs]
                if pairs and None not in a and None not in b:
                    differences[metric] = paired_difference(a, b, higher_is_better=higher)
            rows.append(PairedRow(against=other.method, records=neo.records, **differences))
    return rows


def _cost(plan: Plan, groups: list[ArmGroup], measured_on: str) -> Cost:
    """Per arm: measured time, throughput and memory, and the projection to --project-tokens on --gpu."""
    config = plan.config
    full = [g for g in groups if g.records == plan.sizes[-1]]
    dims = _model_parameters(config)
    arms: dict[str, ArmCost] = {}
    flops: dict[str, int] = {}
    for g in full:
        method = METHODS[parse_arm(g.method)[0]]
        stats = g.stats
        arm = ArmCost(
            train_time_s=stats.train_time_s.mean,
            tokens_per_s=stats.tokens_per_s.mean if stats.tokens_per_s else None,
            tokens_processed_per_s=stats.tokens_processed_per_s.mean
            if stats.tokens_processed_per_s
            else None,
            peak_memory_gb=stats.peak_memory_gb.mean,
            peak_tensor_memory_gb=stats.peak_tensor_memory_gb.mean if stats.peak_tensor_memory_gb else None,
            trainable_parameters=g.runs[0].trainable_parameters,
        )
        if dims is not None:
            arm.flops_per_token = flops[g.method] = flops_per_token(
                student_parameters=dims.student,
                teacher_parameters=dims.teacher,
                lora=method.lora,
                online_teacher=method.kd and not (config.cache_teacher or config.teacher_cache),
                checkpointing=config.gradient_checkpointing,
            )
            arm.planned_peak_gib = _planned_peak(config, g.method)
        arms[g.method] = arm
    projection = None
    if config.project_tokens and config.gpu and dims is not None:
        tokens, card = parse_tokens(config.project_tokens), gpu(config.gpu)
        projection = Projection(
            tokens=tokens,
            gpu=card.name,
            gpus=config.gpus,
            utilization=config.utilization,
            arms={
                m: project(
                    tokens_per_s=a.tokens_per_s,
                    flops_per_token=flops[m],
                    planned_peak_gib=a.planned_peak_gib,
                    tokens=tokens,
                    card=card,
                    gpus=config.gpus,
                    utilization=config.utilization,
                    measured_on=measured_on,
                )
                for m, a in arms.items()
            },
        )
    return Cost(arms=arms, projection=projection)


@dataclass
class Parameters:
    """Parameter counts of the student and the teacher (0: no teacher)."""

    student: int
    teacher: int


def _model_parameters(config: CompareConfig) -> Parameters | None:
    """Parameter counts of student and teacher from their configs (meta device), or None."""
    from llm_neo.commands.plan import model_dims

    try:
        student = model_dims(
            load_config(config.student, role="student", trust_remote_code=config.trust_remote_code)
        )
        teacher = (
            model_dims(
                load_config(config.teacher, role="teacher", trust_remote_code=config.trust_remote_code)
            )
            if config.teacher
            else None
        )
    except Exception as err:  # the planner cannot count this architecture: the report leaves it out
        log.warning("compare: no parameter counts for the cost projection: %s", err)
        return None
    return Parameters(student=student.parameters, teacher=teacher.parameters if teacher else 0)


def _planned_peak(config: CompareConfig, arm: str) -> float | None:
    """``llm-neo plan``'s estimate (GiB) of one step of the arm at --batch-size x --max-length on a GPU."""
    from llm_neo.commands.plan import PlanConfig, plan_rows

    method, quantization = parse_arm(arm)
    teacher_quant = quantization.get("teacher_quant", config.teacher_quant)
    student_quant = quantization.get("student_quant", config.student_quant)
    try:
        rows, _ = plan_rows(
            PlanConfig(
                teacher=config.teacher,
                student=config.student,
                batch_size=config.batch_size,
                seq_len=config.max_length,
                methods=[method],
                loss_impls=["chunked" if config.loss_impl != "plain" else "plain"],
                lora_r=config.lora.r,
                gradient_checkpointing=config.gradient_checkpointing,
                mlp_chunks=config.mlp_chunks,
                device="cuda",
                dtype="bfloat16",
                teacher_quant=teacher_quant,
                student_quant=student_quant,
            )
        )
    except Exception as err:  # as above: an estimate the planner cannot make is left out, and said
        log.warning("compare: no memory plan for %s: %s", arm, err)
        return None
    return rows[0].total / GiB


def _device_name(device: str) -> str:
    resolved = resolve_device(device)
    if resolved.type == "cuda":
        return torch.cuda.get_device_name(resolved)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {available_cores()} cores)"


def run_compare(config: CompareConfig) -> int:
    """`llm-neo compare`: run (or finish) the comparison, print the verdict and where the report is;
    with --plan-only, print whether it can decide and stop."""
    if config.plan_only:
        from llm_neo.report.power import budget_lines

        config = dataclasses.replace(config, methods=_split(config.methods))
        validate_compare(config)
        budget = plan_only(config, time_arms=True)
        print("\n".join(budget_lines(budget) + [f"warning: {w}" for w in budget.warnings]))
        print("\n--plan-only: nothing trained, nothing written (the warm-ups ran in a temporary directory).")
        return 0
    results = compare(config)
    if results is None:  # a rank other than 0 of a torchrun launch: rank 0 reports
        return 0
    from llm_neo.report.compare import verdict

    out = Path(config.output_dir)
    print("\n".join(verdict(results)))
    print(f"\nreport: {out / 'report.html'} (and report.md, results.json)")
    return 0
