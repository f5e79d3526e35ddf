"""Whether a comparison can be read at all, and under which conditions its numbers were measured.

Three readings the verdict and the claims rest on, each computed from results.json alone:
- ``no_learning``: no arm learned the task (every arm within noise of the untrained student, or most of
  the arms' answers never stopped or loop), with the counts and what to change;
- ``leaders``: the arms that share the best score (a tie names no winner);
- ``CLAIMS`` and ``claim_conditions``: the paper's claims and the conditions under which a measurement
  can hold or refute each; a claim measured otherwise is "measured under other conditions", the
  difference named.
The header's settings (``settings``) and the loaded-machine note (``load_note``) live here too.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from llm_neo.config import TrainOptions
from llm_neo.eval.answers import pooled
from llm_neo.options import Effect, option_aliases, options_with
from llm_neo.records.compare import AnswerStats, ArmGroup, CompareResults, Verdict
from llm_neo.report.power import SUGGESTED_EPOCHS
from llm_neo.report.stats import paired_difference, within_noise
from llm_neo.report.style import label
from llm_neo.report.tables import format_duration

# More than this share of the arms' answers never stopping (or looping) means they did not learn to answer.
BROKEN_SHARE = 0.5
# The kd_ratio of the paper's released model (REFERENCE.md: the official code defaults to 0.5, the
# released Llama-3.2-1B model used 0.9): the recipe the claims were made with.
PAPER_KD_RATIO = 0.9


def share(count: int, total: int) -> str:
    return f"{100 * count / total:.0f}%" if total else "n/a"


def answers_of(group: ArmGroup) -> AnswerStats | None:
    """An arm's answer counts over its seeds (None: a run scored before answers were counted)."""
    stats = [r.answers for r in group.runs]
    return pooled([s for s in stats if s is not None]) if all(s is not None for s in stats) else None


def epochs_covered(results: CompareResults, group: ArmGroup) -> tuple[float, int] | None:
    """(epochs the arm's budget covered, --max-steps that covers ``SUGGESTED_EPOCHS`` epochs): the budget
    the comparison stated before training (``results.budget``, its examples and steps as run); for a
    results.json from before that, from the options: steps x batch x grad_accum samples over the arm's
    training records (None: unknown)."""
    if results.budget is not None:
        size = next((s for s in results.budget.sizes if s.records == group.records), None)
        if size is not None:
            return size.epochs, math.ceil(SUGGESTED_EPOCHS * size.train_examples / size.samples_per_step)
    c = results.config
    records = group.records or results.data.train_records_available
    per_step = int(c.get("batch_size") or 0) * int(c.get("grad_accum") or 1)
    if not records or not per_step:
        return None
    max_steps = c.get("max_steps")
    epochs = max_steps * per_step / records if max_steps else float(c.get("epochs") or 1.0)
    return epochs, math.ceil(SUGGESTED_EPOCHS * records / per_step)


def no_learning(results: CompareResults, groups: list[ArmGroup]) -> str | None:
    """The verdict's first line when no arm learned the task, or None when one did.

    No arm learned when every arm's mean score is within noise of the untrained student's
    (``report.stats.within_noise`` on the held-out records), or when more than half of the arms'
    answers never stopped (reached --max-new-tokens without an end of turn) or loop
    (``eval.answers.loops``). The line gives the counts and what to change: a budget of
    ``SUGGESTED_EPOCHS`` epochs and more held-out records."""
    student = results.models.student
    n = student.total
    floor = bool(groups) and all(within_noise(g.stats.accuracy.mean, student.accuracy, n) for g in groups)
    counts = [answers_of(g) for g in groups]
    answers = pooled([a for a in counts if a is not None]) if all(counts) and counts else None
    broken = (
        answers is not None
        and answers.total > 0
        and (max(answers.never_stopped, answers.looping) > BROKEN_SHARE * answers.total)
    )
    if not floor and not broken:
        return None
    reasons = []
    if floor:
        reasons.append(
            f"every arm's score is within noise of the untrained student's ({100 * student.accuracy:.1f}%) "
            f"on {n} held-out records"
        )
    if answers is not None:
        reasons.append(
            f"of the arms' {answers.total} answers {share(answers.never_stopped, answers.total)} never "
            f"stopped, {share(answers.looping, answers.total)} loop and "
            f"{share(answers.empty, answers.total)} are empty"
        )
    advice = ["train longer"]
    if groups and (covered := epochs_covered(results, groups[-1])):
        epochs, steps = covered
        advice = [
            f"train longer (the arms covered {epochs:.2g} epochs; "
            f"--max-steps {steps} covers {SUGGESTED_EPOCHS})"
        ]
    advice.append(f"score on more held-out records ({n} now)")
    return f"No arm learned the task: {'; '.join(reasons)}. To change: {' and '.join(advice)}."


def leaders(groups: list[ArmGroup]) -> list[ArmGroup]:
    """The arms that share the best score: the arm with the highest mean and every arm whose paired
    difference to it (by seed) is not distinguishable, or whose mean is equal. One arm: a winner."""
    best = max(groups, key=lambda g: g.stats.accuracy.mean)
    tied = []
    for g in groups:
        if g is best or g.stats.accuracy.mean == best.stats.accuracy.mean:
            tied.append(g)
            continue
        mine = {r.seed: r.accuracy for r in g.runs}
        seeds = [r.seed for r in best.runs if r.seed in mine]
        theirs = {r.seed: r.accuracy for r in best.runs}
        diff = paired_difference([theirs[s] for s in seeds], [mine[s] for s in seeds]) if seeds else None
        if diff is None or diff.verdict is Verdict.NEITHER:
            tied.append(g)
    return tied


# ------------------------------------------------------------------------------------------------
# The paper's claims and the conditions a measurement of each needs


@dataclass(frozen=True)
class Claim:
    """One of the paper's claims: what it says, which measurement checks it, under which conditions."""

    text: str  # "{arm}" is the other arm's name
    metric: str  # "score" (Neo's paired score difference), "memory" or "time" (Neo / KD)
    conditions: tuple[str, ...]  # keys of CONDITIONS


CLAIMS = (
    Claim("Neo scores higher than {arm}", "score", ("kd_ratio",)),
    Claim("Neo needs about 25% less memory than KD", "memory", ("teacher_cost", "memory_measure")),
    Claim("Neo needs about 25% less training time than KD", "time", ("teacher_cost", "machine")),
)
PAPER_ARMS = ("sft", "lora", "kd")  # the arms the paper compares Neo with


def claim_conditions(results: CompareResults, claim: Claim) -> list[str]:
    """What differs from the conditions ``claim`` was made under, in words (empty: like for like)."""
    c = results.config
    found = []
    for name in claim.conditions:
        if name == "kd_ratio" and c.get("kd_ratio") != PAPER_KD_RATIO:
            found.append(f"kd_ratio {c.get('kd_ratio')} (the paper's released recipe: {PAPER_KD_RATIO})")
        if name == "teacher_cost" and c.get("cache_teacher") and not results.teacher_caches:
            found.append(
                f"KD and Neo read a teacher cache (top-{c['cache_teacher']}): the teacher's own time and "
                "memory are not in their figures, and are not reported beside them"
            )
        if name == "memory_measure" and len({r.peak_memory_kind for g in results.groups for r in g.runs}) > 1:
            found.append("the arms' memory was measured in different ways")
        if name == "machine" and (note := load_note(results)):
            found.append(note)
        if name == "machine" and results.device_type == "cpu" and (c.get("jobs") or 2) > 1:
            found.append(f"{c.get('jobs') or 2} arms trained at once, sharing the CPU cores")
    return found


def teacher_cost_note(results: CompareResults) -> str | None:
    """Beside a time or memory claim measured with both KD arms reading a teacher cache: what the cache
    cost, once, and that it is in neither arm's figure (None: no cache, or its cost is not known)."""
    if not results.teacher_caches:
        return None
    seconds = sum(cache.seconds for cache in results.teacher_caches)
    parameters = results.teacher_caches[0].teacher_parameters
    teacher = f"the teacher's {parameters / 1e6:,.0f}M parameters" if parameters else "the teacher"
    return (
        f"both read the teacher cache, built once in {format_duration(seconds)} for every KD arm; "
        f"{teacher} were loaded by neither arm, so neither figure holds the teacher's time or memory"
    )


def load_note(results: CompareResults) -> str | None:
    """The note "machine loaded: load 6.5 on 2 CPUs" when the load average exceeded the cores (its times
    then measure the other work too); None when it did not, or is not known."""
    load, cpus = results.load_average, results.cpus
    if cpus is None and (named := re.search(r"(\d+) cores\)$", results.device)):
        cpus = int(named.group(1))  # a results.json from before cpus was kept: its CPU's name has them
    if load is None or cpus is None or load <= cpus:
        return None
    return f"machine loaded: load {load:g} on {cpus} CPUs"


# ------------------------------------------------------------------------------------------------
# The settings that change results


# Shown in the header's first sentence already (models, data), or not a setting of the training.
_SHOWN_ELSEWHERE = {"student", "teacher", "data", "heldout", "teacher_cache", "trust_remote_code"}
_SHOWN_ELSEWHERE |= {"allow_pickle_weights", "merge_tolerance", "eval_fraction"}


def settings(results: CompareResults) -> str:
    """Every option that changes a trained arm's results (declared ``Effect.RESULTS`` on the training
    options), as results.json holds it, then each arm's learning rate and the teacher cache's top-k."""
    c = results.config
    aliases = {option: alias for alias, option in option_aliases(TrainOptions).items()}
    parts = []
    for name in sorted(options_with(TrainOptions, Effect.RESULTS) - _SHOWN_ELSEWHERE):
        value = _lookup(c, name)
        if value is _MISSING and name in aliases:  # a file written before the option's rename
            value = _lookup(c, aliases[name])
        if value is not _MISSING:
            parts.append(f"{name} {'default' if value is None else value}")
    lrs: dict[str, float] = {}
    for g in results.groups:
        lrs.setdefault(label(g.method), g.runs[0].lr)
    parts.append("lr " + ", ".join(f"{arm} {lr:g}" for arm, lr in lrs.items()))
    parts.append(f"teacher cache top-k {c.get('cache_teacher') or 'none (online teacher)'}")
    return "Settings that change results: " + "; ".join(parts) + "."


_MISSING = object()


def _lookup(config: dict[str, Any], dotted: str) -> Any:
    value: Any = config
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            return _MISSING
        value = value[key]
    return value
