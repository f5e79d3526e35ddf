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
    seeds = f"{n} seed{'s' if n != 1 else ''}"
    text = {Verdict.A: "better", Verdict.B: "worse", Verdict.NEITHER: f"not distinguishable at {seeds}"}
    return PairedDifference(mean=mean, ci=ci, n=n, verdict=verdict, text=text[verdict])
