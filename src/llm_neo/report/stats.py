"""Statistics honest enough to decide on: mean ± std over seeds, and paired differences with a 95% interval.

Two arms run with the same seeds share their data order and initialisation noise, so the difference of
their scores at each seed is what measures one against the other; its mean has the Student t interval
``mean ± t(0.975, n - 1) · sd / √n``. An interval that contains 0 is "not distinguishable at n seeds",
never a win; one seed has no interval at all.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from llm_neo.records.compare import PairedDifference, Stats, Verdict

# Two-sided 95% quantiles of Student's t distribution, t(0.975, df), df = 1..30 (standard tables); the
# normal quantile beyond.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip
_Z975 = 1.960


def t975(df: int) -> float:
    """t(0.975, df): the half-width multiplier of a two-sided 95% interval."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return _T975[df - 1] if df <= len(_T975) else _Z975


def summarize(values: Sequence[float]) -> Stats:
    """Mean, sample std (0 for one value), min, max and count of ``values``."""
    if not values:
        raise ValueError("no values to summarize")
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return Stats(mean=statistics.fmean(values), std=std, min=min(values), max=max(values), n=len(values))


def paired_difference(
    a: Sequence[float], b: Sequence[float], *, higher_is_better: bool = True
) -> PairedDifference:
    """The difference a − b over paired values (the same seed at the same index), with its 95% interval
    (None for one pair) and a verdict: ``Verdict.A`` / ``Verdict.B`` (which is better, when the interval
    excludes 0) or ``Verdict.NEITHER``; ``text`` says it in words."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired values need equal, non-zero lengths, got {len(a)} and {len(b)}")
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    n = len(diffs)
    mean = statistics.fmean(diffs)
    ci = None
    if n > 1:
        half = t975(n - 1) * statistics.stdev(diffs) / math.sqrt(n)
        ci = (mean - half, mean + half)
    verdict = Verdict.NEITHER
    if ci is not None and (ci[0] > 0 or ci[1] < 0):
        a_higher = ci[0] > 0
        verdict = Verdict.A if a_higher == higher_is_better else Verdict.B
    difference = PairedDifference(mean=mean, ci=ci, n=n, verdict=verdict, text="")
    difference.text = in_words(difference)
    return difference


def identical(diff: PairedDifference) -> bool:
    """Whether the difference was the same at every seed (more than one): its interval has zero width,
    which says the seeds agreed, not that the difference is known to that precision."""
    return diff.ci is not None and diff.ci[0] == diff.ci[1]


def in_words(diff: PairedDifference) -> str:
    """The verdict in words: "better", "worse", "not distinguishable at 3 seeds", and "identical on every
    seed" (with "better"/"worse" in front when it is not 0) for a zero-width interval. The report calls it
    on every difference it shows, so a results.json written before this wording reads the same."""
    seeds = f"{diff.n} seed{'s' if diff.n != 1 else ''}"
    text = {Verdict.A: "better", Verdict.B: "worse", Verdict.NEITHER: f"not distinguishable at {seeds}"}
    if not identical(diff):
        return text[diff.verdict]
    same = "identical on every seed"
    return same if diff.verdict is Verdict.NEITHER else f"{text[diff.verdict]}, {same}"


def within_noise(a: float, b: float, records: int) -> bool:
    """Whether two scores (fractions correct) on ``records`` held-out records are within noise of each
    other: their difference is at most the 95% half-width of a difference of two proportions,
    ``1.96 · √(2 · p(1 − p) / records)`` at their mean ``p``, and never less than one record (``1 /
    records``: scores one answer apart are never told apart)."""
    if records < 1:
        raise ValueError(f"a score needs at least one record, got {records}")
    p = (a + b) / 2
    half = max(_Z975 * math.sqrt(2 * p * (1 - p) / records), 1 / records)
    return abs(a - b) <= half + 1e-12  # float slack: 2/36 - 0/36 at 2/36 is within
