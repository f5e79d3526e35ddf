"""Hyperparameter sweeps: many ordinary `distill` runs over a search space, sharing one teacher cache.

    llm-neo sweep --base base.yaml --space space.yaml --output sweeps/r-lr

``--base`` is a `distill` config (any YAML `--config` reads, e.g. a run's ``config.yaml``); ``--space``
says which options vary, by dotted name (``lora.r``, ``lr``, ``kd_ratio``, ``kd_temperature``,
``divergence``, ...):

    grid:                         # every combination, in this order
      lora.r: [16, 64]
      lr: [1e-4, 2e-4]

    random:                       # `trials` independent draws (seeded by --seed)
      lr: {log_uniform: [5e-5, 5e-4]}
      lora.r: [32, 64, 128]       # a list is a uniform choice
      kd_ratio: {uniform: [0.3, 0.9]}
      lora.lora_dropout: {choice: [0.0, 0.05]}
      warmup_ratio: {int_uniform: [0, 3]}   # integers, both ends included
    trials: 8

Without ``--space`` the paper's guidelines are swept around the base's method: LoRA arms lr 1e-4 / 2e-4 /
4e-4 (the 10× rule around 2e-4) and rank 64 / 128; full-parameter arms lr 1e-5 / 2e-5 / 4e-5; KD arms
``kd_ratio`` 0.5 (the paper) / 0.9 (its released model).

Each trial is a normal run in ``OUTPUT/trials/<id>/`` (all of `distill`'s outputs). Trials run one after
another. KD trials whose base names a ``teacher`` but no ``teacher_cache`` share a cache the sweep builds
once (``OUTPUT/caches/``, one per temperature / length / data combination, top-k ``--cache-top-k``), so
the teacher's forward pass runs once for the whole sweep. ``sweep.json`` records every trial's options,
status and metrics and is rewritten atomically after each change, with a checksum and the previous
version beside it (``sweep.json.bak``, used with a warning if ``sweep.json`` is damaged): a killed sweep
continues with the same command plus ``--resume``: finished trials are kept, an interrupted one resumes
from its checkpoints (``save_every`` in the base) or restarts. A trial that fails (a diverging learning
rate) is recorded as failed and the sweep goes on. SIGTERM, SIGINT or SIGUSR1 stop the running trial
after its current step with a checkpoint (see ``distill``) and the sweep with it (exit code 75); the
message is the command that continues it.

Outputs, refreshed after every trial: ``leaderboard.md`` and ``leaderboard.csv`` ranked by ``--metric``,
``plots/<option>.png`` (the metric against each swept option), and ``best.yaml``: the best trial's
resolved config, ready for ``llm-neo distill --config best.yaml``.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import hashlib
import io
import itertools
import json
import logging
import math
import random
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from llm_neo.choices import METHODS
from llm_neo.config import ALIASES, DistillConfig, validate_distill
from llm_neo.errors import ConfigError, LlmNeoError, RunStopped, SweepError
from llm_neo.options import (
    Effect,
    coerce_option,
    find_option,
    flag_name,
    from_dict,
    load_yaml,
    option_aliases,
    option_help,
    option_names,
    options_with,
    unwrap_optional,
)
from llm_neo.records import from_json, to_json
from llm_neo.records.sweep import (
    STATE_VERSION,
    HeldoutSize,
    LeaderboardRow,
    Mode,
    SweepState,
    Trial,
    TrialStatus,
    leaderboard_cells,
)
from llm_neo.runtime.atomic import (
    atomic_write_bytes,
    atomic_write_text,
    clean_temporaries,
    remove_outputs,
    writing,
)
from llm_neo.runtime.integrity import backup_path, read_state, write_state
from llm_neo.runtime.lock import hold, releases_locks
from llm_neo.runtime.stop import graceful_stop
from llm_neo.summary import RunSummary

log = logging.getLogger("llm_neo")

STATE = "sweep.json"
DISTRIBUTIONS = ("choice", "uniform", "log_uniform", "int_uniform")
# Set by the sweep for each trial; sweeping them would make trials overwrite each other.
NOT_SWEEPABLE = options_with(DistillConfig, Effect.PLACE, Effect.EXISTING)
# Metrics a trial reports (dotted paths into its summary.json), and which way is better.
METRICS = {
    "heldout.kl_to_teacher": "min",
    "heldout.kl_to_teacher_topk": "min",  # trials scored against a teacher cache alone
    "heldout.aligned_kl_to_teacher": "min",  # --cross-tokenizer trials (docs/cross-tokenizer.md)
    "heldout.ce": "min",
    "heldout.perplexity": "min",
    "heldout.top1_agreement": "max",
    "final.loss": "min",
    "final.ce_loss": "min",
    "final.kd_loss": "min",
    "train_time_s": "min",
    "peak_memory_gb": "min",
}
REPORTED = (
    "heldout.kl_to_teacher",
    "heldout.kl_to_teacher_topk",
    "heldout.aligned_kl_to_teacher",
    "heldout.ce",
    "heldout.top1_agreement",
    "final.loss",
    "train_time_s",
    "peak_memory_gb",
)
# Ranks closer than this (relative to the better value) are ties: a leaderboard cannot separate them.
TIE_TOLERANCE = 0.01
# A held-out split of fewer trained tokens is flagged: its means move by more than trials differ.
SMALL_HELDOUT_TOKENS = 1000
# What decides the held-out split (data.split_heldout) and its tokens: trials that differ in these are
# scored on different records.
HELDOUT_SPLIT = ("data", "eval_fraction", "seed", "max_length", "train_on_prompt")


@dataclass
class SweepConfig:
    """`llm-neo sweep`: grid or random search over distill options, one normal run per trial."""

    base: str = field(
        default="",
        metadata=option_help(
            "Base distill config (YAML, as for distill --config); every trial starts from it."
        ),
    )
    space: str | None = field(
        default=None,
        metadata=option_help(
            "Search space YAML: `grid: {lora.r: [16, 64], lr: [1e-4, 2e-4]}`, or `random: {lr: "
            "{log_uniform: [5e-5, 5e-4]}, ...}` with `trials: N`. Default: the paper's guidelines "
            "(lr around the 10x rule, ranks 64/128, kd_ratio 0.5/0.9) for the base's method."
        ),
    )
    output: str = field(
        default="", metadata=option_help("Sweep directory: trials/, leaderboard, plots, best.yaml.")
    )
    metric: str = field(
        default="heldout.kl_to_teacher",
        metadata=option_help(f"Ranking metric, from each trial's summary.json: {', '.join(METRICS)}."),
    )
    mode: Literal["auto", "min", "max"] = field(
        default="auto",
        metadata=option_help(
            "Whether lower or higher --metric is better. auto: max for agreement, min otherwise."
        ),
    )
    trials: int | None = field(
        default=None, metadata=option_help("Random search: number of trials (overrides the space file's).")
    )
    seed: int = field(default=0, metadata=option_help("Seed of the random search's draws (not of the runs)."))
    cache_teacher: bool = field(
        default=True,
        metadata=option_help(
            "Build one shared teacher cache for KD trials whose base has a teacher but no teacher_cache "
            "(off: every KD trial runs the teacher)."
        ),
    )
    cache_top_k: int = field(default=64, metadata=option_help("Top-k of a teacher cache the sweep builds."))
    tie_tolerance: float = field(
        default=TIE_TOLERANCE,
        metadata=option_help(
            "Trials whose --metric is within this fraction of a better one's share its rank (marked =): "
            "the leaderboard does not claim a difference that small. 0: no ties."
        ),
    )
    resume: bool = field(
        default=False, metadata=option_help("Continue the sweep in --output where it stopped.")
    )
    overwrite: bool = field(
        default=False, metadata=option_help("Discard a sweep in --output and start again.")
    )


# ------------------------------------------------------------------------------------------------
# The search space


@dataclass(frozen=True)
class Dimension:
    """One swept option: its dotted name, how it is drawn, and its values (or bounds)."""

    option: str  # dotted DistillConfig path, e.g. "lora.r"
    kind: str  # "grid" (grid search) or one of DISTRIBUTIONS (random search)
    values: tuple[Any, ...]  # the values; (low, high) for uniform, log_uniform, int_uniform


@dataclass(frozen=True)
class Space:
    strategy: Literal["grid", "random"]
    dimensions: tuple[Dimension, ...]
    trials: int  # random search: draws; grid: the number of combinations


def default_space(method: str) -> dict[str, Any]:
    """The paper's guidelines around the base's method, as a space mapping (see the module docstring)."""
    grid: dict[str, list[Any]] = {}
    if METHODS[method].lora:
        grid["lr"] = [1e-4, 2e-4, 4e-4]  # LoRA lr = 10x the full-parameter lr (2e-5 -> 2e-4)
        grid["lora.r"] = [64, 128]  # the paper's 64 and its released model's 128
    else:
        grid["lr"] = [1e-5, 2e-5, 4e-5]
    if METHODS[method].kd:
        grid["kd_ratio"] = [0.5, 0.9]  # the paper's default and its released model's
    return {"grid": grid}


def parse_space(data: dict[str, Any], *, source: str, trials: int | None = None) -> Space:
    """Check and parse a space mapping; ConfigError listing every problem (named by ``source``)."""
    import difflib

    problems: list[str] = []
    strategies = [s for s in ("grid", "random") if s in data]
    unknown = sorted(set(data) - {"grid", "random", "trials"})
    if unknown:
        problems.append(f"{source}: unknown top-level key(s) {', '.join(unknown)}; use grid: or random:")
    if len(strategies) != 1:
        raise ConfigError(
            [*problems, f"{source}: give exactly one of grid: or random: (a mapping of option: values)"]
        )
    strategy = strategies[0]
    body = data[strategy]
    if not isinstance(body, dict) or not body:
        raise ConfigError([*problems, f"{source}: {strategy}: must map option names to values"])
    options = option_names(DistillConfig)
    dims: list[Dimension] = []
    for raw_option, spec in body.items():
        option = str(raw_option).replace("-", "_")
        option = option_aliases(DistillConfig).get(option, option)  # an old name (temperature) as its option
        where = f"{source}: {strategy}.{raw_option}"
        found = find_option(DistillConfig, option)
        if found is None or dataclasses.is_dataclass(unwrap_optional(found[1])[0]):
            close = difflib.get_close_matches(option, options, n=1)
            problems.append(f"{where}: unknown option" + (f" (did you mean {close[0]}?)" if close else ""))
            continue
        if option in NOT_SWEEPABLE:
            problems.append(f"{where}: set by the sweep for each trial; it cannot be swept")
            continue
        if strategy == "grid" or isinstance(spec, list):
            values = spec if isinstance(spec, list) else None
            if not values:
                problems.append(f"{where}: give a non-empty list of values")
                continue
            coerced = tuple(coerce_option(v, found, where, problems) for v in values)
            dims.append(Dimension(option, "grid" if strategy == "grid" else "choice", coerced))
            continue
        if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in DISTRIBUTIONS):
            problems.append(
                f"{where}: expected a list of values or {{{'|'.join(DISTRIBUTIONS)}: ...}}, got {spec!r}"
            )
            continue
        kind, values = next(iter(spec.items()))
        if kind == "choice":
            if not isinstance(values, list) or not values:
                problems.append(f"{where}: choice needs a non-empty list")
                continue
            dims.append(
                Dimension(option, kind, tuple(coerce_option(v, found, where, problems) for v in values))
            )
            continue
        bounds = _bounds(values, kind, where, problems)
        if bounds is None:
            continue
        base_tp, _ = unwrap_optional(found[1])
        if kind == "int_uniform" and base_tp is not int:
            problems.append(f"{where}: int_uniform needs an integer option")
        elif kind != "int_uniform" and base_tp is not float:
            problems.append(f"{where}: {kind} needs a float option (use choice or int_uniform)")
        else:
            dims.append(Dimension(option, kind, bounds))
    count = trials if trials is not None else data.get("trials")
    if strategy == "random":
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            problems.append(f"{source}: random search needs trials: N (N >= 1), or --trials N")
    elif "trials" in data or trials is not None:
        problems.append(f"{source}: trials: applies to random search only (a grid runs every combination)")
    if problems:
        raise ConfigError(problems)
    size = math.prod(len(d.values) for d in dims) if strategy == "grid" else int(count or 0)
    return Space(strategy="grid" if strategy == "grid" else "random", dimensions=tuple(dims), trials=size)


def _bounds(values: Any, kind: str, where: str, problems: list[str]) -> tuple[Any, Any] | None:
    ok = isinstance(values, list) and len(values) == 2
    if ok:
        try:
            low, high = (int(v) if kind == "int_uniform" else float(v) for v in values)
        except (TypeError, ValueError):
            ok = False
    if not ok or not low <= high or (kind == "log_uniform" and low <= 0):
        rule = "0 < low <= high" if kind == "log_uniform" else "low <= high"
        problems.append(f"{where}: {kind} needs [low, high] with {rule}, got {values!r}")
        return None
    return low, high


def expand_trials(space: Space, seed: int) -> list[dict[str, Any]]:
    """The trials' overrides ({option: value}), in run order: a pure function of (space, seed)."""
    if space.strategy == "grid":
        names = [d.option for d in space.dimensions]
        return [
            dict(zip(names, combo, strict=True))
            for combo in itertools.product(*(d.values for d in space.dimensions))
        ]
    rng = random.Random(f"llm-neo-sweep:{seed}")
    trials = []
    for _ in range(space.trials):
        trials.append({d.option: _draw(d, rng) for d in space.dimensions})
    return trials


def _draw(d: Dimension, rng: random.Random) -> Any:
    if d.kind == "choice":
        return d.values[rng.randrange(len(d.values))]
    low, high = d.values
    if d.kind == "int_uniform":
        return rng.randint(low, high)
    if d.kind == "log_uniform":
        return float(f"{math.exp(rng.uniform(math.log(low), math.log(high))):.4g}")
    return float(f"{rng.uniform(low, high):.4g}")


# ------------------------------------------------------------------------------------------------
# Trials


def _set(data: dict[str, Any], option: str, value: Any) -> None:
    *parents, leaf = option.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def trial_config(
    base: dict[str, Any], overrides: dict[str, Any], output_dir: Path, *, source: str
) -> DistillConfig:
    """The DistillConfig of one trial: ``base`` with ``overrides`` applied, in ``output_dir``."""
    data = copy.deepcopy(base)
    for option, value in overrides.items():
        _set(data, option, value)
    data["output_dir"] = str(output_dir)
    data["resume"] = data["overwrite"] = False
    problems: list[str] = []
    config = from_dict(DistillConfig, data, source=source, problems=problems, vocabulary=ALIASES)
    if problems:
        raise ConfigError(problems)
    return config


def _trial_id(index: int) -> str:
    return f"t{index:03d}"


def _metric_value(summary: dict[str, Any], metric: str) -> float | None:
    node: Any = summary
    for part in metric.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return float(node) if isinstance(node, (int, float)) and not isinstance(node, bool) else None


def _trial_metrics(summary: RunSummary) -> dict[str, float]:
    data = summary.to_json()
    return {m: v for m in METRICS if (v := _metric_value(data, m)) is not None}


def resolved_mode(config: SweepConfig) -> str:
    return METRICS.get(config.metric, "min") if config.mode == "auto" else config.mode


def validate_sweep(config: SweepConfig) -> None:
    p: list[str] = []
    if not config.base:
        p.append("--base is required (a distill config YAML, e.g. a run's config.yaml)")
    elif not Path(config.base).expanduser().is_file():
        p.append(f"--base: {config.base!r} does not exist")
    if config.space and not Path(config.space).expanduser().is_file():
        p.append(f"--space: {config.space!r} does not exist")
    if not config.output:
        p.append("--output is required (the sweep directory)")
    if config.metric not in METRICS:
        p.append(f"--metric: {config.metric!r} is not one of {', '.join(METRICS)}")
    if config.trials is not None and config.trials < 1:
        p.append(f"--trials: {config.trials} is out of range; it must be >= 1")
    if config.cache_top_k < 1:
        p.append(f"--cache-top-k: {config.cache_top_k} is out of range; it must be >= 1")
    if not 0 <= config.tie_tolerance < 1:
        p.append(f"--tie-tolerance: {config.tie_tolerance} is out of range; it must be in [0, 1)")
    if config.resume and config.overwrite:
        p.append("--resume and --overwrite contradict each other; give one")
    if p:
        raise ConfigError(p)


def _check_trials(configs: dict[str, DistillConfig], metric: str) -> None:
    """Every trial config valid, able to report the metric, and the metric comparable across trials;
    all problems of all trials at once."""
    problems: list[str] = []
    for trial, config in configs.items():
        try:
            validate_distill(config)
        except ConfigError as err:
            problems += [f"trial {trial}: {p}" for p in err.problems]
        if metric.startswith("heldout.") and config.eval_fraction == 0:
            problems.append(f"trial {trial}: --metric {metric} needs a held-out split (eval_fraction > 0)")
        if metric == "heldout.top1_agreement" and not (config.teacher or config.teacher_cache):
            problems.append(f"trial {trial}: --metric {metric} needs a teacher or teacher_cache in the base")
        cross = config.cross_tokenizer is not None and config.uses_kd
        if metric in ("heldout.kl_to_teacher", "heldout.top1_agreement") and cross:
            problems.append(
                f"trial {trial}: --metric {metric} needs one tokenizer; a --cross-tokenizer trial reports "
                "heldout.aligned_kl_to_teacher"
            )
        if metric == "heldout.aligned_kl_to_teacher" and not cross:
            problems.append(
                f"trial {trial}: --metric {metric} is reported by cross_tokenizer trials (kd, neo) only; "
                "rank on heldout.kl_to_teacher"
            )
        if metric == "heldout.kl_to_teacher" and not config.teacher:
            problems.append(
                f"trial {trial}: --metric {metric} (the dense KL) needs a teacher in the base; trials scored "
                "against a teacher_cache alone report heldout.kl_to_teacher_topk"
            )
        if metric == "heldout.kl_to_teacher_topk" and (config.teacher or not config.teacher_cache):
            problems.append(
                f"trial {trial}: --metric {metric} is the KL to a teacher cache's top-k, which a trial "
                "reports only with a teacher_cache and no teacher; with a teacher, rank on "
                "heldout.kl_to_teacher"
            )
    problems += _incomparable(configs, metric)
    if problems:
        raise ConfigError(sorted(set(problems), key=problems.index))


def objective(config: DistillConfig) -> dict[str, Any]:
    """What a trial's training loss is: CE alone, or CE + kd_ratio x which divergence at which T (and
    the divergence's own parameter). Trials that differ in it do not minimise the same number, so their
    final.loss (and final.kd_loss) cannot be ranked against each other."""
    if not config.uses_kd:
        return {"loss": "ce"}
    keys = ["kd_ratio", "divergence", "kd_temperature"]
    keys += ["jsd_beta"] if config.divergence == "jsd" else []
    keys += ["skew_alpha"] if config.divergence.startswith("skew_") else []
    keys += ["cross_tokenizer"] if config.cross_tokenizer else []  # uld is not the divergence
    return {"loss": "ce+kd"} | {k: getattr(config, k) for k in keys}


def _incomparable(configs: dict[str, DistillConfig], metric: str) -> list[str]:
    """Refuse ranking trials on a training loss whose objective differs between them: final.loss mixes
    CE and KD in proportions kd_ratio sets, final.kd_loss is another divergence (or none) per trial."""
    if metric not in ("final.loss", "final.kd_loss"):
        return []
    if metric == "final.loss":
        kinds = {json.dumps(objective(c), sort_keys=True) for c in configs.values()}
    else:
        kinds = {json.dumps({k: v for k, v in objective(c).items() if k != "kd_ratio"}, sort_keys=True)
                 for c in configs.values()}  # fmt: skip
    if len(kinds) <= 1:
        return []
    varying = sorted({k for c in configs.values() for k in objective(c) if k != "loss"} | {"method"})
    return [
        f"--metric {metric}: the trials minimise different objectives ({', '.join(varying)} differ), so "
        "their training losses are different numbers; rank on a held-out metric (heldout.ce, "
        "heldout.kl_to_teacher, heldout.top1_agreement)"
    ]


def _split_differences(configs: dict[str, DistillConfig]) -> list[str]:
    """The options deciding the held-out split that differ between trials (their held-out metrics are
    then measured on different records)."""
    return [k for k in HELDOUT_SPLIT if len({str(getattr(c, k)) for c in configs.values()}) > 1]


def effective_metric(configs: dict[str, DistillConfig], metric: str, default: str) -> str:
    """The default metric (dense KL) for trials that can only report the cache's top-k KL: no teacher,
    a teacher_cache; the aligned KL for cross-tokenizer trials. Any other metric stays as asked."""
    if metric == default and all(c.cross_tokenizer and c.uses_kd for c in configs.values()):
        log.warning("sweep: the trials distill across tokenizers: ranking on heldout.aligned_kl_to_teacher")
        return "heldout.aligned_kl_to_teacher"
    if metric == default and all(not c.teacher and c.teacher_cache for c in configs.values()):
        log.warning(
            "sweep: the trials have a teacher_cache and no teacher, so they report the KL to the cache's "
            "top-k, not the dense KL: ranking on heldout.kl_to_teacher_topk"
        )
        return "heldout.kl_to_teacher_topk"
    return metric


# ------------------------------------------------------------------------------------------------
# The shared teacher cache


def _cache_group(config: DistillConfig) -> dict[str, Any]:
    """What a trial's teacher cache depends on (trials that agree on all of it share one cache)."""
    return {
        "teacher": config.teacher,
        "student": config.student,
        "data": config.data,
        "max_length": config.max_length,
        "train_on_prompt": config.train_on_prompt,
        "temperature": config.kd_temperature,
    }


def _with_shared_cache(
    config: DistillConfig, out: Path, sweep: SweepConfig, built: dict[str, str]
) -> DistillConfig:
    """``config`` with ``teacher_cache`` pointing at the sweep's shared cache (built on first use)."""
    if not (sweep.cache_teacher and config.uses_kd and config.teacher and not config.teacher_cache):
        return config
    from llm_neo.config import CacheTeacherConfig
    from llm_neo.teacher_cache.writer import cache_teacher

    group = _cache_group(config)
    name = hashlib.sha256(json.dumps(group, sort_keys=True).encode()).hexdigest()[:10]
    path = out / "caches" / name
    if name not in built:
        log.info(
            "sweep: teacher cache %s (T = %g, max length %d)", path, config.kd_temperature, config.max_length
        )
        cache_teacher(
            CacheTeacherConfig(
                teacher=str(config.teacher),
                data=config.data,
                output=str(path),
                tokenizer=config.student,  # the student tokenizes in distill: the cache must match it
                top_k=sweep.cache_top_k,
                kd_temperature=config.kd_temperature,
                max_length=config.max_length,
                train_on_prompt=config.train_on_prompt,
                batch_size=config.eval_batch_size,
                device=config.device,
                dtype=config.dtype,
                trust_remote_code=config.trust_remote_code,
                allow_pickle_weights=config.allow_pickle_weights,
            )
        )
        built[name] = str(path)
    return dataclasses.replace(config, teacher_cache=built[name])


# ------------------------------------------------------------------------------------------------
# The sweep


def _load_space(config: SweepConfig, base: dict[str, Any]) -> tuple[dict[str, Any], str]:
    if config.space:
        return load_yaml(config.space), str(config.space)
    method = str(base.get("method", DistillConfig.method))
    return default_space(method), f"default space for --method {method}"


def read_sweep_state(state_file: Path) -> SweepState:
    """The sweep's state in ``state_file``; its backup (with a warning) when the file is damaged, unreadable
    or not a sweep's state; StateFileError naming both when neither is intact."""
    data = read_state(
        state_file,
        what="the sweep's state",
        fix="the trials' outputs in trials/ are intact, but which ran is lost: start the sweep again "
        "with --overwrite, or in another --output",
        check=lambda data: from_json(SweepState, data),  # a RecordError is damage, like a bad checksum
    )
    return from_json(SweepState, data)


def _prepare(config: SweepConfig, out: Path, fresh: SweepState) -> SweepState:
    """The state to continue from: a fresh one, or (with --resume) the stored one if it is the same sweep."""
    state_file = out / STATE
    if config.resume:
        if not state_file.is_file() and not backup_path(state_file).is_file():
            raise SweepError(f"--resume: no sweep in {out} ({STATE} is missing); start it without --resume")
        stored = read_sweep_state(state_file)
        clean_temporaries(out)
        changed = [k for k in ("base", "space", "seed") if getattr(stored, k) != getattr(fresh, k)]
        if not changed and [t.overrides for t in stored.trials] != [t.overrides for t in fresh.trials]:
            changed = ["trials"]
        if changed:
            raise SweepError(
                f"--resume: the {', '.join(changed)} differ from the sweep in {out}. Resume with the same "
                "--base/--space/--seed, or start a new --output."
            )
        return stored
    if out.exists() and any(out.iterdir()):
        if not config.overwrite:
            raise SweepError(
                f"--output {out} already holds files; pass --resume to continue that sweep, --overwrite to "
                "start again, or choose another --output"
            )
        clean_temporaries(out)
        reports = ("leaderboard.md", "leaderboard.csv", "best.yaml")
        remove_outputs(out, ("trials", "plots", "caches", STATE, backup_path(state_file).name, *reports))
    out.mkdir(parents=True, exist_ok=True)
    _save_state(out, fresh)
    return fresh


def _save_state(out: Path, state: SweepState) -> None:
    with writing(out / STATE, "the sweep's state", kept=f"the trials' outputs in {out / 'trials'}"):
        write_state(out / STATE, to_json(state))


def resume_command(config: SweepConfig) -> str:
    """``llm-neo sweep`` with the options of ``config`` that differ from the defaults, plus --resume."""
    args = ["llm-neo", "sweep"]
    for f in dataclasses.fields(config):
        value, default = getattr(config, f.name), f.default
        if f.name in ("resume", "overwrite") or value == default:
            continue
        flag = flag_name(f.name)
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + flag[2:])
        else:
            args += [flag, str(value)]
    return shlex.join([*args, "--resume"])


StepCallback = Callable[[int, dict[str, float]], None]


@releases_locks
def sweep(
    config: SweepConfig,
    *,
    on_step: StepCallback | None = None,
    on_trial: Callable[[str, Trial], None] | None = None,
) -> SweepState:
    """Run (or continue) the sweep; return its state (also in ``OUTPUT/sweep.json``).

    ``on_step`` is passed to every trial's ``distill``; ``on_trial(id, record)`` runs after each trial.
    """
    from llm_neo.distill import distill
    from llm_neo.runtime.checkpoint import list_checkpoints

    validate_sweep(config)
    out = Path(config.output).expanduser()
    hold(out, "sweep", "--output")  # the trials' directories inside it are distill's to lock
    config, space, configs, fresh = _plan(config, out)
    state = _prepare(config, out, fresh)
    # The ranking is this run's (a --resume may rank on another metric than the run it continues).
    state.metric, state.mode = fresh.metric, fresh.mode
    state.tie_tolerance, state.split_differs = fresh.tie_tolerance, fresh.split_differs
    log.info("sweep: %d trials (%s search) in %s", len(configs), space.strategy, out)

    built: dict[str, str] = {}
    with graceful_stop("finishing the running trial's current step, then stopping the sweep") as stop:
        for record in state.trials:
            trial = record.id
            if record.status in (TrialStatus.DONE, TrialStatus.FAILED):
                continue
            if stop.requested:  # came during the previous trial's finish, which completed it
                raise RunStopped(
                    f"sweep stopped by {stop.name} before trial {trial}",
                    resume=resume_command(config),
                    signal_name=stop.name,
                    verb="Continue it with",
                )
            trial_dir = out / "trials" / trial
            resumable = bool(list_checkpoints(trial_dir / "checkpoints"))
            trial_cfg = dataclasses.replace(configs[trial], resume=resumable, overwrite=not resumable)
            trial_cfg = _with_shared_cache(trial_cfg, out, config, built)
            record.status = TrialStatus.RUNNING
            _save_state(out, state)
            log.info(
                "sweep: trial %s %s%s",
                trial,
                _describe(record.overrides),
                " (resumed)" if resumable else "",
            )
            try:
                summary = distill(trial_cfg, on_step=on_step)
                assert summary is not None  # trials run in one process
            except RunStopped as err:  # not a failed trial: it continues from its checkpoint on --resume
                write_reports(state, out, space)
                raise RunStopped(
                    f"sweep stopped during trial {trial} ({err.what})",
                    resume=resume_command(config),
                    signal_name=err.signal_name,
                    verb="Continue it with",
                ) from err
            except LlmNeoError as err:
                # One diverging trial (a too-high lr) must not end the search; the error is on record.
                record.status, record.error = TrialStatus.FAILED, str(err)
                log.warning("sweep: trial %s failed: %s", trial, err)
            else:
                record.status, record.metrics = TrialStatus.DONE, _trial_metrics(summary)
                record.heldout = HeldoutSize(summary.samples.get("heldout"), summary.heldout.get("tokens"))
                record.error = None
            _save_state(out, state)
            write_reports(state, out, space)
            if on_trial is not None:
                on_trial(trial, record)
    write_reports(state, out, space)
    return state


def _plan(config: SweepConfig, out: Path) -> tuple[SweepConfig, Space, dict[str, DistillConfig], SweepState]:
    """The sweep to run: its config (with the metric its trials can report), space, every trial's
    DistillConfig (all checked) and the fresh state of it, before anything runs."""
    base = load_yaml(config.base)
    space_data, space_source = _load_space(config, base)
    space = parse_space(space_data, source=space_source, trials=config.trials)
    overrides = expand_trials(space, config.seed)
    lora_alpha = (base.get("lora") or {}).get("lora_alpha")
    if any(d.option == "lora.r" for d in space.dimensions) and lora_alpha:
        log.warning(
            "sweep: lora.r is swept but the base fixes lora.lora_alpha = %s, so alpha/r changes with r; "
            "remove lora_alpha from the base for the paper's alpha = 2r",
            lora_alpha,
        )
    configs = {
        _trial_id(i): trial_config(base, o, out / "trials" / _trial_id(i), source=f"trial {_trial_id(i)}")
        for i, o in enumerate(overrides)
    }
    config = dataclasses.replace(config, metric=effective_metric(configs, config.metric, SweepConfig.metric))
    _check_trials(configs, config.metric)  # every trial valid before the first one runs
    split = _split_differences(configs)
    if split and config.metric.startswith("heldout."):
        log.warning(
            "sweep: the trials differ in %s, which decide the held-out split: their %s are measured on "
            "different records",
            ", ".join(split),
            config.metric,
        )
    fresh = SweepState(
        version=STATE_VERSION,
        base=base,
        space={"source": space_source, **space_data},
        seed=config.seed,
        trials=[
            Trial(id=trial, overrides=o, status=TrialStatus.PENDING, metrics={}, error=None)
            for trial, o in zip(configs, overrides, strict=True)
        ],
        metric=config.metric,
        mode=Mode(resolved_mode(config)),
        tie_tolerance=config.tie_tolerance,
        split_differs=split,
    )
    return config, space, configs, fresh


def _describe(overrides: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in overrides.items())


# ------------------------------------------------------------------------------------------------
# Reports


def ranked(state: SweepState) -> list[Trial]:
    """Trials best first: finished ones by the metric, then those without it (failed, pending)."""
    sign = 1 if state.mode == Mode.MIN else -1
    scored = _scored(state)
    rest = [t for t in state.trials if t not in scored]
    return sorted(scored, key=lambda t: sign * t.metrics[state.metric]) + rest


def unscored(state: SweepState) -> list[Trial]:
    """The finished trials whose summary lacks the ranking metric (an older run's ``"final": {}``): listed
    as such, never dropped silently."""
    return [t for t in state.trials if t.status == TrialStatus.DONE and state.metric not in t.metrics]


def _scored(state: SweepState) -> list[Trial]:
    """The finished trials that reported the ranking metric, in trial order."""
    return [t for t in state.trials if t.status == TrialStatus.DONE and state.metric in t.metrics]


def tied(a: float, b: float, tolerance: float) -> bool:
    """Whether ``a`` and ``b`` are within ``tolerance`` of each other, relative to the larger magnitude
    (both zero: tied)."""
    return abs(a - b) <= tolerance * max(abs(a), abs(b))


def ranks(state: SweepState) -> dict[str, str]:
    """Trial id -> its rank on the leaderboard: ``"1"``, ``"2"``, ...; trials within the tie tolerance of
    the trial that opens their group share its rank, marked ``"="`` (``"1="``). Only finished trials
    with the metric have one."""
    metric, tolerance = state.metric, state.tie_tolerance
    order = [t for t in ranked(state) if t.status == TrialStatus.DONE and metric in t.metrics]
    labels: dict[str, str] = {}
    leader: Trial | None = None
    for position, trial in enumerate(order, start=1):
        if leader is not None and tied(trial.metrics[metric], leader.metrics[metric], tolerance):
            labels[trial.id] = labels[leader.id].rstrip("=") + "="
            labels[leader.id] = labels[leader.id].rstrip("=") + "="
        else:
            leader = trial
            labels[trial.id] = str(position)
    return labels


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def leaderboard_rows(state: SweepState, options: list[str]) -> list[LeaderboardRow]:
    metric = state.metric
    done = [t for t in state.trials if t.status == TrialStatus.DONE]
    others = [m for m in REPORTED if m != metric and any(m in t.metrics for t in done)]
    labels = ranks(state)
    return [
        LeaderboardRow(
            rank=labels.get(t.id),
            trial=t.id,
            options={o: t.overrides.get(o) for o in options},
            metrics={c: t.metrics.get(c) for c in [metric, *others]},
            heldout_tokens=t.heldout.tokens if t.heldout else None,
            status=t.status,
        )
        for t in ranked(state)
    ]


def _heldout_sizes(state: SweepState) -> tuple[set[int], set[int | float]]:
    sizes = [t.heldout for t in state.trials if t.status == TrialStatus.DONE and t.heldout is not None]
    records = {h.records for h in sizes if h.records is not None}
    tokens = {h.tokens for h in sizes if h.tokens is not None}
    return records, tokens


def verdict(state: SweepState, out: Path) -> list[str]:
    """The leaderboard's first lines: the best trial (and what it is tied with), on how much held-out data,
    and how to reproduce it."""
    metric, labels = state.metric, ranks(state)
    best = ranked(state)[0] if state.trials else None
    if best is None or best.id not in labels:
        if unscored(state):
            return [f"No finished trial reported {metric}; the trials below are not ranked."]
        return ["No trial has finished yet."]
    value = best.metrics[metric]
    firsts = [t for t, label in labels.items() if label.rstrip("=") == "1"]
    lines = [f"**Best: {best.id}** ({_describe(best.overrides)}), {metric} = {value:.6g}."]
    if len(firsts) > 1:
        lines.append(
            f"Tied within {state.tie_tolerance:.0%} (--tie-tolerance) with "
            f"{', '.join(t for t in firsts if t != best.id)}: the sweep does not separate them; more "
            "held-out data or seeds would."
        )
    records, tokens = _heldout_sizes(state)
    if metric.startswith("heldout.") and tokens:
        counts = "/".join(map(str, sorted(records)))
        size = f"{counts} records, {'/'.join(f'{n:,}' for n in sorted(tokens))} tokens"
        note = f"Held out: {size} per trial"
        if min(tokens) < SMALL_HELDOUT_TOKENS:
            note += f" — under {SMALL_HELDOUT_TOKENS:,} tokens, so differences between trials may be noise"
        if state.split_differs:
            note += f"; the trials differ in {', '.join(state.split_differs)}, so not on the same records"
        lines.append(note + ".")
    lines.append(f"Reproduce it: `llm-neo distill --config {(out / 'best.yaml').resolve()}`")
    return lines


def write_reports(state: SweepState, out: Path, space: Space) -> None:
    """leaderboard.md, leaderboard.csv, plots/<option>.png and best.yaml, each written atomically."""
    options = [d.option for d in space.dimensions]
    rows = [leaderboard_cells(row) for row in leaderboard_rows(state, options)]
    if not rows:
        return
    header = list(rows[0])
    arrow = "lower is better" if state.mode == Mode.MIN else "higher is better"
    lines = [
        f"# Sweep leaderboard: {state.metric} ({arrow})",
        "",
        *verdict(state, out),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    lines += ["| " + " | ".join(_fmt(r[h]) for h in header) + " |" for r in rows]
    lines += [
        "",
        f"Ranks marked = are within {state.tie_tolerance:.0%} of the trial above them that opens their group "
        "(--tie-tolerance, relative): a difference the leaderboard does not claim. `heldout tokens`: the "
        "trained tokens of each trial's held-out split, over which its held-out metrics are means.",
    ]
    if missing := unscored(state):
        lines += ["", f"Finished without {state.metric} (not ranked; see its summary.json):", ""]
        lines += [f"- {t.id}" for t in missing]
    failed = [t for t in state.trials if t.status == TrialStatus.FAILED]
    if failed:
        lines += ["", "Failed trials:", ""] + [f"- {t.id}: {t.error}" for t in failed]
    atomic_write_text(out / "leaderboard.md", "\n".join(lines) + "\n")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=header, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)
    atomic_write_text(out / "leaderboard.csv", buffer.getvalue())
    _write_best(state, out)
    _write_plots(state, out, space)


def _write_best(state: SweepState, out: Path) -> None:
    best = ranked(state)[0]
    if best not in _scored(state):  # none finished with the metric: there is no best to reproduce
        return
    config = load_yaml(out / "trials" / best.id / "config.yaml")  # the trial's resolved options
    config["output_dir"] = str(out / "best")
    value = best.metrics[state.metric]
    head = (
        f"# Best of the sweep in {out}: trial {best.id} ({_describe(best.overrides)}),\n"
        f"# {state.metric} = {value:.6g}. Reproduce: "
        f"llm-neo distill --config {(out / 'best.yaml').resolve()}\n"
    )
    atomic_write_text(out / "best.yaml", head + yaml.safe_dump(config, sort_keys=False))


def log_axis(d: Dimension, values: list[float]) -> bool:
    """Whether a swept numeric option is plotted on a log axis: drawn log-uniformly, a learning rate,
    spanning 10x or more, or spaced geometrically (1e-4, 2e-4, 4e-4)."""
    distinct = sorted(set(values))
    if not distinct or distinct[0] <= 0:
        return False
    if d.kind == "log_uniform" or d.option.split(".")[-1] == "lr" or distinct[-1] / distinct[0] >= 10:
        return True
    ratios = [b / a for a, b in itertools.pairwise(distinct)]
    return len(ratios) >= 2 and min(ratios) >= 1.5 and max(ratios) / min(ratios) < 1.05


def _write_plots(state: SweepState, out: Path, space: Space) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = state.metric
    done = _scored(state)
    if not done:
        return
    best = ranked(state)[0]
    for d in space.dimensions:
        xs = [t.overrides[d.option] for t in done]
        ys = [t.metrics[metric] for t in done]
        marked = done.index(best) if best in done else None
        fig = plot_metric(d, xs, ys, metric, best=None if marked is None else (marked, best.id))
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100)
        plt.close(fig)
        atomic_write_bytes(out / "plots" / f"{d.option}.png", buffer.getvalue())


def plot_metric(
    d: Dimension, xs: list[Any], ys: list[float], metric: str, *, best: tuple[int, str] | None = None
) -> Any:
    """The figure of ``metric`` against the swept option ``d`` (one point per trial, ``best = (index,
    id)`` starred): a log axis for learning rates and geometric ranges (``log_axis``), categories for
    names, and tick labels that are the values themselves (no offset such as "1e-6 + 1.855e-2", which
    hides how close the trials are)."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    if numeric:
        positions = [float(x) for x in xs]
        if log_axis(d, positions):
            ax.set_xscale("log")
            ticks = sorted(set(positions))
            ax.set_xticks(ticks, [f"{x:g}" for x in ticks])
            ax.xaxis.set_minor_formatter(NullFormatter())
        else:
            ax.xaxis.set_major_formatter(ScalarFormatter(useOffset=False))
    else:
        labels = sorted({str(x) for x in xs})
        positions = [float(labels.index(str(x))) for x in xs]
        ax.set_xticks(range(len(labels)), labels)
    formatter = ScalarFormatter(useOffset=False)
    formatter.set_scientific(False)
    ax.yaxis.set_major_formatter(formatter)
    ax.scatter(positions, ys, color="#1f77b4", zorder=2)
    if best is not None:
        i, name = best
        ax.scatter(
            [positions[i]], [ys[i]], color="#d62728", s=90, marker="*", zorder=3, label=f"best ({name})"
        )
        ax.legend(loc="best", fontsize=8)
    ax.set_xlabel(d.option + (" (log scale)" if ax.get_xscale() == "log" else ""))
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs {d.option}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def run_sweep(config: SweepConfig) -> int:
    """`llm-neo sweep`: run it, print the leaderboard; exit 1 when no trial finished."""
    state = sweep(config)
    out = Path(config.output)
    print((out / "leaderboard.md").read_text() if (out / "leaderboard.md").is_file() else "no trials")
    if not any(t.status == TrialStatus.DONE for t in state.trials):
        print("no trial finished; see the errors above and in sweep.json")
        return 1
    print(f"best config: {out / 'best.yaml'}  (llm-neo distill --config {out / 'best.yaml'})")
    return 0
