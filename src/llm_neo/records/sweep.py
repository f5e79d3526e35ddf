"""The records of `llm-neo sweep`: ``SweepState`` is what ``sweep.json`` holds (its ``version`` 1, with the
checksum ``runtime.integrity`` adds beside it), one ``Trial`` per trial; ``LeaderboardRow`` is a row of
``leaderboard.md`` and ``leaderboard.csv``. Built and read by ``llm_neo.commands.sweep``."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from llm_neo.records import OPTIONAL_KEY

STATE_VERSION = 1


class TrialStatus(str, enum.Enum):
    PENDING = "pending"
    RUNNING = "running"  # started; on --resume it continues from its checkpoints or restarts
    DONE = "done"
    FAILED = "failed"  # its error is recorded and the sweep went on


class Mode(str, enum.Enum):
    """Which way the ranking metric is better."""

    MIN = "min"
    MAX = "max"


@dataclass
class HeldoutSize:
    """A finished trial's held-out split: records, and trained tokens its held-out metrics are means over."""

    records: int | None
    tokens: int | float | None  # summary.json's heldout.tokens (an int as distill writes it)


@dataclass
class Trial:
    """One trial in ``sweep.json``: its options over the base, where it is, what it reported."""

    id: str  # t000, t001, ...: its directory under trials/
    overrides: dict[str, Any]  # dotted option -> value
    status: TrialStatus
    metrics: dict[str, float]  # metric (a dotted path into its summary.json) -> value, once done
    error: str | None  # why it failed
    heldout: HeldoutSize | None = field(default=None, metadata=OPTIONAL_KEY)  # once done
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class SweepState:
    """``sweep.json``: what the sweep is (base, space, seed: a --resume must match them), every trial, and
    how the trials are ranked."""

    version: int
    base: dict[str, Any]  # the base distill config as its YAML read
    space: dict[str, Any]  # {"source": where the space came from, **the space mapping}
    seed: int
    trials: list[Trial]
    # How trials are ranked: set by every run of the sweep before it ranks anything (a state saved in
    # the moment before, by an llm-neo that set them later, reads with these placeholders).
    metric: str = ""
    mode: Mode = Mode.MIN
    tie_tolerance: float = 0.0
    split_differs: list[str] = field(default_factory=list)  # held-out split options differing by trial
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class LeaderboardRow:
    """A trial's row of the leaderboard: its rank (None: unranked), options, metrics and status."""

    rank: str | None  # "1", "2=", ...: "=" marks a tie within the tolerance
    trial: str
    options: dict[str, Any]  # swept option -> this trial's value
    metrics: dict[str, float | None]  # the ranking metric first, then the others reported
    heldout_tokens: int | float | None
    status: TrialStatus


def leaderboard_cells(row: LeaderboardRow) -> dict[str, Any]:
    """The row as the leaderboard's columns, in order: rank, trial, the options, the metrics, ``heldout
    tokens``, status (a value, None where empty)."""
    return {
        "rank": row.rank,
        "trial": row.trial,
        **row.options,
        **row.metrics,
        "heldout tokens": row.heldout_tokens,
        "status": row.status.value,
    }
