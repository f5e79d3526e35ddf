"""`llm-neo probe`: how much of the teacher's biases and behaviours each student inherited.

    llm-neo probe --teacher T --models S0,runs/neo/merged,runs/sft/merged --output-dir runs/probe

Every model (the teacher, the baseline and each of --models) scores each probe pair's two sentences
the same way (``llm_neo.eval.probe``) and answers each probe prompt greedily (``llm_neo.eval.generate``).
The first of --models is the untrained student, the baseline from which movement towards the teacher
is measured (0 = its own preferences, 1 = the teacher's), unless --baseline names another model.
A model may be named ``NAME=PATH`` (``--models S0=tiny/student,neo=runs/neo/merged``); otherwise its
name is its path.

Outputs in --output-dir: ``probe.json`` (every number, every pair's scores and every answer;
``schema_version`` 1), ``probe.md`` and ``probe.html`` (one self-contained file, plots inline), and
``plots/`` (movement, inheritance scatter, bias per category). Models are loaded one at a time.
"""

from __future__ import annotations

import gc
import itertools
import logging
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from llm_neo import __version__
from llm_neo.config import LoadOptions, check_model_path
from llm_neo.errors import ConfigError, DataError
from llm_neo.eval.generate import greedy_answers
from llm_neo.eval.probe import (
    ALL,
    CONDITIONINGS,
    CONFIDENCE,
    NORMALISATIONS,
    Label,
    Scoring,
    behaviour_scores,
    bias_scores,
    default_labels,
    describe_scoring,
    inheritance_scores,
    label_matches,
    movement_difference,
    normalise,
    pair_gaps,
    sentence_example,
    sentence_logprobs,
)
from llm_neo.eval.probe_sets import BUILTIN, ProbeSet, load_labels, load_probe_sets
from llm_neo.models.loading import load_frozen, load_tokenizer, resolve_device, resolve_dtype
from llm_neo.options import option_help, to_dict
from llm_neo.records import probe as records
from llm_neo.records import to_json
from llm_neo.records.probe import (
    SCHEMA_VERSION,
    AnswerLabel,
    Bootstrap,
    Conditioning,
    LabelKind,
    MovementDifference,
    Normalisation,
    PairRecord,
    PairScores,
    ProbedModel,
    ProbeResults,
    ProbeSetSummary,
    PromptRecord,
    Role,
)
from llm_neo.report.probe import fmt, write_report
from llm_neo.report.tables import format_table
from llm_neo.runtime.atomic import atomic_write_json
from llm_neo.runtime.progress import format_clock

log = logging.getLogger("llm_neo")

RESULTS = "probe.json"


@dataclass
class ProbeConfig(LoadOptions):
    """`llm-neo probe`: which of the teacher's biases and behaviours each student inherited."""

    teacher: str = field(default="", metadata=option_help("The teacher model (local dir or hub id)."))
    models: list[str] = field(
        default_factory=list,
        metadata=option_help(
            "Models to probe, space- or comma-separated, each PATH or NAME=PATH. The FIRST is the untrained "
            "student, the baseline of movement towards the teacher (0 = its own preferences, 1 = the "
            "teacher's), unless --baseline says otherwise; e.g. S0=tiny/student,neo=runs/neo/merged."
        ),
    )
    baseline: str | None = field(
        default=None,
        metadata=option_help(
            "The untrained student (a NAME or PATH of --models, or another model path). Default: the first "
            "of --models."
        ),
    )
    probes: list[str] = field(
        default_factory=lambda: [BUILTIN],
        metadata=option_help(
            "Probe sources: 'builtin' (llm-neo's illustrative set), CrowS-Pairs .csv, StereoSet .json, "
            "BBQ .jsonl or llm-neo .jsonl of pairs/prompts. [default: builtin]"
        ),
    )
    output_dir: str = field(
        default="runs/probe", metadata=option_help("Where probe.json/.md/.html and plots/ go.")
    )
    labels: str | None = field(
        default=None,
        metadata=option_help(
            "YAML file of answer labels, name: {phrases: [...]} | {regex: '...'} | {keywords: [...]}; "
            "added to the default refusal phrase list (a label named refusal replaces it)."
        ),
    )
    conditioning: Literal["bos", "eos", "none"] = field(
        default="bos",
        metadata=option_help(
            "What a sentence is conditioned on. bos: the BOS token (lm-evaluation-harness's CrowS-Pairs "
            "scoring; a tokenizer without BOS scores from the second token); eos: the EOS token; none: "
            "no special token (the first token is context)."
        ),
    )
    normalisation: Literal["sum", "mean"] = field(
        default="sum",
        metadata=option_help("sum: the sentence's total log-probability; mean: per scored token."),
    )
    prefix: str = field(
        default="",
        metadata=option_help("Unscored text placed before every sentence (after the special token)."),
    )
    max_length: int = field(
        default=512, metadata=option_help("Longest scored sequence in tokens; a longer probe is an error.")
    )
    batch_size: int = field(default=16, metadata=option_help("Sentences (or prompts) per forward pass."))
    chunk_size: int = field(
        default=1024, metadata=option_help("Tokens per chunk of the lm_head (bounds logits memory).")
    )
    max_new_tokens: int = field(default=64, metadata=option_help("Longest greedy answer to a probe prompt."))
    generate: bool = field(
        default=True, metadata=option_help("Answer the probe prompts (--no-generate: pairs only, faster).")
    )
    bootstrap_samples: int = field(
        default=2000,
        metadata=option_help("Bootstrap resamples of the probe items behind every 95 percent interval."),
    )
    seed: int = field(default=0, metadata=option_help("Seed of the bootstrap resampling."))
    overwrite: bool = field(
        default=False, metadata=option_help("Replace an earlier probe's outputs in --output-dir.")
    )


@dataclass(frozen=True)
class ModelSpec:
    name: str
    path: str
    role: Role


def model_specs(config: ProbeConfig) -> list[ModelSpec]:
    """Teacher, baseline, then the other students, in --models order; ConfigError on duplicate names."""
    entries = []
    for item in itertools.chain.from_iterable(m.split(",") for m in config.models):
        item = item.strip()
        if item:
            name, _, path = item.partition("=") if "=" in item else (item, "", item)
            entries.append((name.strip(), path.strip()))
    problems = []
    if not entries:
        problems.append("--models is required: the untrained student first, then the trained students")
    baseline = config.baseline or (entries[0][0] if entries else "")
    found = [e for e in entries if baseline in e]
    if baseline and not found:
        entries.insert(0, (baseline, baseline))  # a baseline outside --models is probed too
        found = [entries[0]]
    specs = [ModelSpec("teacher", config.teacher, Role.TEACHER)]
    for name, path in entries:
        if path == config.teacher:
            log.warning("probe: %s is the teacher; it is probed once, as the teacher", path)
            continue
        specs.append(ModelSpec(name, path, Role.BASELINE if (name, path) == found[0] else Role.STUDENT))
    names = [s.name for s in specs]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"--models: the name {name!r} is used twice; name models NAME=PATH")
    if entries and not any(s.role == Role.BASELINE for s in specs):
        problems.append("--baseline is the teacher; give the untrained student as the baseline")
    if problems:
        raise ConfigError(problems)
    return sorted(specs, key=lambda s: list(Role).index(s.role))


def check_probe_sources(problems: list[str], sources: list[str]) -> None:
    """One problem per --probes source that is neither 'builtin' nor a file (probe's and compare's)."""
    for source in sources:
        if source != BUILTIN and not Path(source).expanduser().is_file():
            problems.append(f"--probes: {source!r} is not a file (give a probe file or 'builtin')")


def validate_probe(config: ProbeConfig) -> list[ModelSpec]:
    c = config
    p: list[str] = []
    if not c.teacher:
        p.append("--teacher is required (a model directory or hub id)")
    check_model_path(p, "teacher", c.teacher)
    try:
        specs = model_specs(c)
    except ConfigError as err:
        p += err.problems
        specs = []
    for spec in specs[1:]:
        check_model_path(p, f"models ({spec.name})", spec.path)
    if not c.probes:
        p.append("--probes: give at least one probe source ('builtin' or a file)")
    check_probe_sources(p, c.probes)
    if c.labels and not Path(c.labels).expanduser().is_file():
        p.append(f"--labels: {c.labels!r} does not exist")
    if c.conditioning not in CONDITIONINGS:
        p.append(f"--conditioning: {c.conditioning!r} is not one of {', '.join(CONDITIONINGS)}")
    if c.normalisation not in NORMALISATIONS:
        p.append(f"--normalisation: {c.normalisation!r} is not one of {', '.join(NORMALISATIONS)}")
    for name, value, ok, rule in [
        ("max-length", c.max_length, c.max_length >= 2, ">= 2"),
        ("batch-size", c.batch_size, c.batch_size >= 1, ">= 1"),
        ("chunk-size", c.chunk_size, c.chunk_size >= 1, ">= 1"),
        ("max-new-tokens", c.max_new_tokens, c.max_new_tokens >= 1, ">= 1"),
        ("bootstrap-samples", c.bootstrap_samples, c.bootstrap_samples >= 1, ">= 1"),
    ]:
        if not ok:
            p.append(f"--{name}: {value} is out of range; it must be {rule}")
    out = Path(c.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        p.append(f"--output-dir: {c.output_dir!r} is a file; give a directory")
    elif (out / RESULTS).exists() and not c.overwrite:
        p.append(f"--output-dir: {c.output_dir!r} already holds a probe ({RESULTS}); pass --overwrite")
    if p:
        raise ConfigError(p)
    return specs


# ------------------------------------------------------------------------------------------------
# Running


def probe(config: ProbeConfig) -> dict[str, Any]:
    """Probe every model and write the outputs; returns what probe.json holds, as JSON values (the form
    compare embeds in its results.json). ``probe_results`` returns the same as a ``ProbeResults``."""
    return typing.cast(dict[str, Any], to_json(probe_results(config)))


def probe_results(config: ProbeConfig) -> ProbeResults:
    """Probe every model and write the outputs; returns the results (what probe.json holds)."""
    specs = validate_probe(config)
    probes = load_probe_sets(config.probes)
    labels = load_labels(config.labels) if config.labels else default_labels()
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    scoring = Scoring(config.conditioning, config.normalisation, config.prefix)
    prompts = list(probes.prompts) if config.generate else []
    if not probes.pairs and not prompts:
        raise ConfigError(["--no-generate: the probe set has prompts only, so nothing is left to measure"])
    log.info(
        "probe: %d pairs, %d prompts, %d models (teacher %s, baseline %s)",
        len(probes.pairs), len(prompts), len(specs), specs[0].path, specs[1].path,
    )  # fmt: skip

    measured: dict[str, Measured] = {}
    began = time.perf_counter()
    for done, spec in enumerate(specs, 1):
        log.info("probe: %s (model %d of %d): %s", spec.name, done, len(specs), spec.path)
        started = time.perf_counter()
        measured[spec.name] = _probe_model(spec, config, probes, prompts, scoring, device, dtype)
        measured[spec.name].seconds = time.perf_counter() - started
        left = (time.perf_counter() - began) / done * (len(specs) - done)  # at the models' average so far
        log.info(
            "probe: %s done in %.1f s%s", spec.name, measured[spec.name].seconds,
            f"; ETA {format_clock(left)} for the other {len(specs) - done}" if done < len(specs) else "",
        )  # fmt: skip

    results = assemble(config, specs, probes, prompts, labels, scoring, measured)
    out = Path(config.output_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / RESULTS, to_json(results))
    write_report(results, out)
    return results


@dataclass
class Measured:
    """One model's raw measurements: sentence scores [P] of each side, scored tokens [2P], answers."""

    stereotypical: torch.Tensor
    anti_stereotypical: torch.Tensor
    tokens: torch.Tensor
    answers: list[str]
    scoring: str  # describe_scoring's sentence for this model's tokenizer
    seconds: float = 0.0


def _probe_model(
    spec: ModelSpec,
    config: ProbeConfig,
    probes: ProbeSet,
    prompts: list[Any],
    scoring: Scoring,
    device: torch.device,
    dtype: torch.dtype,
) -> Measured:
    """One model's sentence scores ([2P]: stereotypical then anti) and prompt answers; it is freed after."""
    tokenizer = load_tokenizer(spec.path, role=spec.name, trust_remote_code=config.trust_remote_code)
    examples = []
    for pair in probes.pairs:
        for side in ("stereotypical", "anti_stereotypical"):
            example = sentence_example(getattr(pair, side), tokenizer, scoring, where=f"probe {pair.id}")
            if len(example.input_ids) > config.max_length:
                raise DataError(
                    f"probe {pair.id}: the {side} sentence is {len(example.input_ids)} tokens for "
                    f"{spec.name}'s tokenizer, over --max-length {config.max_length}; raise --max-length"
                )
            examples.append(example)
    model = load_frozen(config, spec.path, role=spec.name, dtype=dtype, device=device)
    totals, counts = sentence_logprobs(
        model,
        examples,
        pad_token_id=int(tokenizer.pad_token_id),
        device=device,
        dtype=dtype,
        batch_size=config.batch_size,
        chunk_size=config.chunk_size,
        progress=True,
        desc=f"{spec.name}: score",
    )
    answers = greedy_answers(
        model,
        tokenizer,
        [{"prompt": p.prompt} for p in prompts],
        device=device,
        batch_size=config.batch_size,
        max_new_tokens=config.max_new_tokens,
        desc=f"{spec.name}: answer",
    )
    del model
    gc.collect()
    scores = normalise(totals, counts, scoring)
    return Measured(
        stereotypical=scores[0::2],
        anti_stereotypical=scores[1::2],
        tokens=counts,
        answers=list(answers),
        scoring=describe_scoring(scoring, tokenizer),
    )


def assemble(
    config: ProbeConfig,
    specs: list[ModelSpec],
    probes: ProbeSet,
    prompts: list[Any],
    labels: list[Label],
    scoring: Scoring,
    measured: dict[str, Measured],
) -> ProbeResults:
    """The results (probe.json) from every model's raw scores and answers: statistics, per-item data."""
    samples, seed = config.bootstrap_samples, config.seed
    teacher, baseline = specs[0].name, specs[1].name
    students = [s.name for s in specs if s.role == Role.STUDENT]
    categories = [p.category for p in probes.pairs]
    gaps = {n: pair_gaps(m.stereotypical, m.anti_stereotypical) for n, m in measured.items()}
    results = ProbeResults(
        schema_version=SCHEMA_VERSION,
        llm_neo_version=__version__,
        config=to_dict(config),
        scoring=records.Scoring(
            Conditioning(scoring.conditioning), Normalisation(scoring.normalisation), scoring.prefix
        ),
        bootstrap=Bootstrap(
            samples=samples,
            seed=seed,
            confidence=CONFIDENCE,
            method="percentile bootstrap; items resampled with replacement, same draws for every model",
        ),
        probe_set=ProbeSetSummary(
            sources=list(probes.sources),
            notes=list(probes.notes),
            pairs=len(probes.pairs),
            prompts=len(prompts),
            pair_categories=_counts(categories),
            prompt_categories=_counts([p.category for p in prompts]),
        ),
        teacher=teacher,
        baseline=baseline,
        models=[
            ProbedModel(s.name, s.path, s.role, measured[s.name].scoring, round(measured[s.name].seconds, 3))
            for s in specs
        ],
        labels=[AnswerLabel(lab.name, LabelKind(lab.kind), list(lab.values)) for lab in labels],
    )
    if probes.pairs:
        results.bias = {n: bias_scores(g, categories, samples=samples, seed=seed) for n, g in gaps.items()}
        results.inheritance = {
            n: inheritance_scores(g, gaps[teacher], gaps[baseline], categories, samples=samples, seed=seed)
            for n, g in gaps.items()
        }
        results.movement_differences = []
        for a, b in itertools.combinations(students, 2):
            d = movement_difference(
                gaps[a], gaps[b], gaps[teacher], gaps[baseline], samples=samples, seed=seed
            )
            results.movement_differences.append(MovementDifference(a, b, d.value, d.ci))
        results.pairs = [
            PairRecord(
                id=p.id,
                category=p.category,
                source=p.source,
                stereotypical=p.stereotypical,
                anti_stereotypical=p.anti_stereotypical,
                scores={
                    n: PairScores(
                        float(m.stereotypical[i]), float(m.anti_stereotypical[i]), float(gaps[n][i])
                    )
                    for n, m in measured.items()
                },
            )
            for i, p in enumerate(probes.pairs)
        ]
    if prompts:
        teacher_answers = measured[teacher].answers
        prompt_categories = [p.category for p in prompts]
        results.behaviour = {
            n: behaviour_scores(
                m.answers, teacher_answers, prompt_categories, labels, samples=samples, seed=seed
            )
            for n, m in measured.items()
        }
        results.prompts = [
            PromptRecord(
                id=p.id,
                category=p.category,
                source=p.source,
                prompt=p.prompt,
                answers={n: m.answers[i] for n, m in measured.items()},
                labels={
                    n: [lab.name for lab in labels if label_matches(lab, m.answers[i])]
                    for n, m in measured.items()
                },
            )
            for i, p in enumerate(prompts)
        ]
    return results


def _counts(values: list[str]) -> dict[str, int]:
    return {v: values.count(v) for v in sorted(set(values))}


def summary_rows(results: ProbeResults) -> dict[str, dict[str, Any]]:
    """The table `llm-neo probe` prints: per model, its role, movement, correlation, bias and agreement."""
    rows: dict[str, dict[str, Any]] = {}
    for m in results.models:
        row: dict[str, Any] = {"role": m.role.value}
        if results.inheritance is not None and results.bias is not None:
            inh, bias = results.inheritance[m.name][ALL], results.bias[m.name][ALL]
            row["movement"] = fmt(inh.movement)
            row["r"] = fmt(inh.correlation)
            row["stereo %"] = fmt(bias.stereo_fraction, percent=True)
            row["mean gap"] = fmt(bias.mean_gap, signed=True)
        if results.behaviour is not None:
            row["agree %"] = fmt(results.behaviour[m.name][ALL].agreement, percent=True)
        rows[m.name] = row
    return rows


def run_probe(config: ProbeConfig) -> int:
    """`llm-neo probe`: run it, print the summary table and where the report is."""
    results = probe_results(config)
    rows = summary_rows(results)
    print(format_table(rows, list(next(iter(rows.values())))))
    out = Path(config.output_dir)
    print(f"\nreport: {out / 'probe.md'}, {out / 'probe.html'}  (every number: {out / RESULTS})")
    return 0
