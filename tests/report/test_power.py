"""The detectable difference a comparison states before it trains: the formula by hand, and its claim
(the paired 95% interval excludes 0 about four times in five at that difference) by simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from llm_neo.records.compare import Budget, SizeBudget, Verdict
from llm_neo.report.power import (
    DECISIVE_DIFFERENCE,
    budget_lines,
    budget_warnings,
    detectable_difference,
    records_needed,
    t80,
)
from llm_neo.report.stats import paired_difference


def test_detectable_difference_by_hand():
    # 36 records, 3 seeds: (t(0.975, 2) + t(0.80, 2)) * sqrt(2 * 0.25 / (36 * 3))
    assert detectable_difference(36, 3) == pytest.approx((4.303 + 1.061) * math.sqrt(0.5 / 108))
    assert detectable_difference(36, 3) == pytest.approx(0.365, abs=1e-3)
    # Many seeds: the normal's quantiles, 1.96 + 0.8416 = 2.80 standard errors
    assert detectable_difference(1000, 40) == pytest.approx(2.8016 * math.sqrt(0.5 / 40_000))
    # A proportion far from 50% is less noisy: p = 0.5 is the worst case
    assert detectable_difference(100, 5, p=0.1) < detectable_difference(100, 5)
    # No interval, nothing detectable
    assert detectable_difference(100, 1) is None
    assert detectable_difference(0, 3) is None


def test_records_needed_inverts_the_formula():
    for seeds in (2, 3, 5, 10):
        n = records_needed(DECISIVE_DIFFERENCE, seeds)
        assert n is not None
        assert detectable_difference(n, seeds) <= DECISIVE_DIFFERENCE < detectable_difference(n - 1, seeds)
    assert records_needed(0.1, 1) is None
    with pytest.raises(ValueError):
        records_needed(0.0, 3)


def test_t80_quantiles():
    assert t80(1) == pytest.approx(1.376)
    assert t80(10) == pytest.approx(0.879)
    assert t80(1000) == pytest.approx(0.8416)
    with pytest.raises(ValueError):
        t80(0)


@pytest.mark.parametrize(("records", "seeds"), [(200, 3), (100, 5), (60, 10)])
def test_the_interval_excludes_zero_four_times_in_five_at_the_detectable_difference(records, seeds):
    """Two arms whose true task scores differ by the detectable difference (around 50%), each seed
    scoring ``records`` records: the report's own paired interval excludes 0 in about 80% of comparisons;
    at half that difference far less often (the figure is not just any number)."""
    rng = np.random.default_rng(0)
    d = detectable_difference(records, seeds)
    assert d is not None

    def power(difference: float, trials: int = 2000) -> float:
        a = rng.binomial(records, 0.5 + difference / 2, size=(trials, seeds)) / records
        b = rng.binomial(records, 0.5 - difference / 2, size=(trials, seeds)) / records
        decided = [
            paired_difference(list(x), list(y)).verdict is not Verdict.NEITHER
            for x, y in zip(a, b, strict=True)
        ]
        return float(np.mean(decided))

    assert power(d) == pytest.approx(0.8, abs=0.05)
    assert power(d / 2) < 0.45


def _budget(epochs: float, heldout: int, seeds: int, tokens: int = 5000) -> Budget:
    budget = Budget(
        sizes=[
            SizeBudget(
                records=None,
                train_examples=84,
                steps=round(epochs * 84 / 4),
                samples_per_step=4,
                epochs=epochs,
                tokens_per_epoch=2000,
                trained_tokens=round(2000 * epochs),
            )
        ],
        heldout_records=heldout,
        heldout_tokens=tokens,
        seeds=seeds,
        detectable=detectable_difference(heldout, seeds),
        method="m",
        warnings=[],
    )
    budget.warnings = budget_warnings(budget)
    return budget


def test_warnings_carry_their_fix_in_numbers():
    # The comparison: 84 records, 10 steps of 4 (under half an epoch), 36 held-out records, 2 seeds
    budget = _budget(40 / 84, 36, 2, tokens=400)
    under_epoch, undecidable, small = budget.warnings
    assert "0.48 of an epoch" in under_epoch
    assert "--max-steps 63 covers 3 epochs (21 cover one)" in under_epoch  # 3 * 84 / 4, 84 / 4
    assert "36 held-out records at 2 seeds detect only differences of 117 points" in undecidable
    n2, n5, n10 = (records_needed(0.1, s) for s in (2, 5, 10))
    assert (
        f"{n2:,} held-out records at 2 seeds, {n5} at 5 seeds or {n10} at 10 seeds detect 10 points"
        in undecidable
    )
    assert f"these 36 detect {100 * detectable_difference(36, 5):.0f} points at 5 seeds" in undecidable
    assert "36 records and 400 tokens" in small
    lines = budget_lines(budget)
    assert "0.48 epoch(s) per arm" in lines[0] and "952 trained (response) tokens" in lines[0]
    assert "held-out: 36 records, 400 scored tokens, 2 seed(s)" in lines[1]
    assert (
        "117 points of task score at 95% (more than the whole scale: no difference is detectable)" in lines[2]
    )
    assert "more than the whole scale" not in budget_lines(_budget(3.0, 100, 5))[2]


def test_a_decisive_budget_has_no_warnings():
    assert _budget(3.0, 1000, 5).warnings == []
    one_seed = _budget(3.0, 1000, 1)
    assert len(one_seed.warnings) == 1 and "--seeds 3" in one_seed.warnings[0]
    assert "none" in budget_lines(one_seed)[-1]
