"""Can a comparison decide? The smallest task-score difference its held-out size and seed count detect.

Before anything trains, ``llm-neo compare`` states what its budget can show; these are the numbers and
their wording, so the log, ``--plan-only`` and the report say the same thing.

The method (a power calculation for the paired t interval the report uses, ``report.stats``): an arm's
task score at one seed is a proportion on ``n`` held-out records, each answered right with probability
``p``, so its variance is ``p(1 − p)/n``, and the difference of two arms at the same seed has variance
``σ² = 2·p(1 − p)/n`` (the arms' answers taken as independent; p = 0.5, the largest variance, unless
told). With ``s`` seeds the paired 95% interval ``mean ± t(0.975, s − 1)·sd/√s`` excludes 0 four times in
five when the true difference is

    d = (t(0.975, s − 1) + t(0.80, s − 1)) · √(2·p(1 − p) / (n·s))

(the usual approximation of the t test's power; checked against a simulation of that interval in
tests/report/test_power.py: 77–82% at 3 to 10 seeds). One seed has no interval: nothing is detectable.
"""

from __future__ import annotations

import math

from llm_neo.eval.metrics import small_heldout
from llm_neo.records.compare import Budget
from llm_neo.report.stats import t975
from llm_neo.report.tables import format_duration

# Quantiles t(0.80, df) of Student's t distribution, df = 1..30 (standard tables); the normal's beyond.
_T80 = (
    1.376, 1.061, 0.978, 0.941, 0.920, 0.906, 0.896, 0.889, 0.883, 0.879,
    0.876, 0.873, 0.870, 0.868, 0.866, 0.865, 0.863, 0.862, 0.861, 0.860,
    0.859, 0.858, 0.858, 0.857, 0.856, 0.856, 0.855, 0.855, 0.854, 0.854,
)  # fmt: skip
_Z80 = 0.8416
POWER = 0.8  # the chance of the interval excluding 0 at the detectable difference
# A comparison whose detectable difference is larger than this (10 points of task score) is warned of.
DECISIVE_DIFFERENCE = 0.10
# An arm trained on less than this many passes over its data is warned of: it has not seen every record.
MIN_EPOCHS = 1.0
# The epochs the warning's fix proposes.
SUGGESTED_EPOCHS = 3
METHOD = (
    "paired 95% t interval over seeds, 80% power, a score's per-seed noise that of a proportion at 50% "
    "on the held-out records: d = (t(0.975, s-1) + t(0.80, s-1))·√(0.5/(n·s))"
)


def t80(df: int) -> float:
    """t(0.80, df): the one-sided 80% quantile of Student's t with ``df`` degrees of freedom."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return _T80[df - 1] if df <= len(_T80) else _Z80


def detectable_difference(records: int, seeds: int, *, p: float = 0.5) -> float | None:
    """The smallest true difference of two arms' task scores (a fraction: 0.1 is 10 points) that
    ``seeds`` paired seeds scored on ``records`` held-out records detect at 95% with 80% power, by the
    formula of this module's docstring; None when there is no interval (one seed, no records)."""
    if seeds < 2 or records < 1:
        return None
    multiplier = t975(seeds - 1) + t80(seeds - 1)
    return multiplier * math.sqrt(2 * p * (1 - p) / (records * seeds))


def records_needed(difference: float, seeds: int, *, p: float = 0.5) -> int | None:
    """The fewest held-out records whose detectable difference at ``seeds`` seeds is at most
    ``difference`` (the same formula solved for n); None at one seed (no number of records will do)."""
    if seeds < 2:
        return None
    if difference <= 0:
        raise ValueError(f"the difference must be > 0, got {difference}")
    multiplier = t975(seeds - 1) + t80(seeds - 1)
    return max(1, math.ceil(2 * p * (1 - p) * (multiplier / difference) ** 2 / seeds))


def points(fraction: float) -> str:
    """A score difference in points, to the precision a decision needs."""
    value = 100 * fraction
    return f"{value:.0f}" if value >= 9.5 else f"{value:.1f}"


def heldout_advice(records: int, seeds: int) -> str:
    """What held-out size and seed count would detect ``DECISIVE_DIFFERENCE``: at these seeds (if two
    or more) and at 5 and 10 seeds, computed with ``records_needed``."""
    needed = [
        f"{records_needed(DECISIVE_DIFFERENCE, s):,}"
        + (" held-out records" if i == 0 else "")
        + f" at {s} seeds"
        for i, s in enumerate(s for s in sorted({seeds, 5, 10} - {1}) if s >= seeds)
    ]
    text = f"{', '.join(needed[:-1])} or {needed[-1]}" if len(needed) > 1 else needed[0]
    text += f" detect {points(DECISIVE_DIFFERENCE)} points"
    more = detectable_difference(records, 5)
    if more is not None and seeds < 5:
        text += f"; these {records:,} detect {points(more)} points at 5 seeds"
    return text


def epochs_advice(train_examples: int, samples_per_step: int) -> str:
    """The --max-steps that covers ``SUGGESTED_EPOCHS`` epochs, and one."""
    steps = math.ceil(SUGGESTED_EPOCHS * train_examples / samples_per_step)
    one = math.ceil(train_examples / samples_per_step)
    return f"--max-steps {steps} covers {SUGGESTED_EPOCHS} epochs ({one} cover one)"


def budget_lines(budget: Budget) -> list[str]:
    """The statement, one line each: the budget of every data size, the held-out split and what it can
    detect (the warnings are ``budget.warnings``)."""
    lines = []
    for size in budget.sizes:
        what = "all" if size.records is None else f"{size.records:,}"
        lines.append(
            f"training ({what} records: {size.train_examples:,} examples): {size.steps:,} steps x "
            f"{size.samples_per_step} samples = {size.epochs:.2g} epoch(s) per arm, "
            f"{size.trained_tokens:,} trained (response) tokens per arm ({size.tokens_per_epoch:,} per epoch)"
        )
    lines.append(
        f"held-out: {budget.heldout_records:,} records, {budget.heldout_tokens:,} scored tokens, "
        f"{budget.seeds} seed(s)"
    )
    if budget.arm_times:
        times = ", ".join(
            f"{t.arm} {format_duration(t.seconds)} ({t.seconds_per_step:.2g} s/step x {t.steps:,} + "
            f"{format_duration(t.load_seconds)} to load)"
            for t in budget.arm_times
        )
        warmup = budget.arm_times[0].warmup_steps
        lines.append(
            f"time per arm and seed, estimated from a {warmup}-step warm-up run of each arm on this machine, "
            f"one at a time: {times}; scoring not included. An upper bound: the warm-up steps count live "
            "tensors, as a run's first 10 do (later steps are faster), and KD arms run the teacher online "
            "(with --cache-teacher they read its cache)"
        )
    if budget.detectable is None:
        lines.append("detectable difference: none (one seed gives no interval; --seeds 3 or more)")
    else:
        beyond = " (more than the whole scale: no difference is detectable)" if budget.detectable >= 1 else ""
        lines.append(
            f"detectable difference: {points(budget.detectable)} points of task score at 95%{beyond} "
            f"({budget.method})"
        )
    return lines


def budget_warnings(budget: Budget) -> list[str]:
    """What keeps the comparison from deciding, each with its fix in numbers: a data size trained on
    less than ``MIN_EPOCHS``, a detectable difference over ``DECISIVE_DIFFERENCE`` (or none at all), a
    small held-out split. Warnings, not refusals: a quick run to check the pipeline is legitimate."""
    out = []
    for size in budget.sizes:
        if size.epochs < MIN_EPOCHS:
            what = "" if size.records is None else f" at {size.records:,} records"
            fix = epochs_advice(size.train_examples, size.samples_per_step)
            out.append(
                f"each arm{what} trains on {size.epochs:.2g} of an epoch: it has not seen every training "
                f"record, and may not learn the task; {fix}"
            )
    if budget.detectable is None:
        out.append(
            f"one seed gives no interval: no difference between arms can be told from noise; --seeds 3 "
            f"or more ({heldout_advice(budget.heldout_records, 3)})"
        )
    elif budget.detectable > DECISIVE_DIFFERENCE:
        fix = heldout_advice(budget.heldout_records, budget.seeds)
        out.append(
            f"{budget.heldout_records:,} held-out records at {budget.seeds} seeds detect only differences "
            f"of {points(budget.detectable)} points or more; {fix}"
        )
    if small := small_heldout(budget.heldout_records, budget.heldout_tokens):
        out.append(small)
    return out
