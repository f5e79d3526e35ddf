"""Progress where there is no terminal: plain lines in a log, every N steps or M seconds.

tqdm draws its bar only on a terminal (``disable=None``); under ``nohup``, a scheduler or ``> log``
it prints nothing, and a run would say nothing between its first lines and its result. ``ProgressLines``
is the bar's counterpart there: one line per report, through the ``llm_neo`` logger (so ``-q`` silences
it as it does the other information), e.g.

    [llm-neo] neo: step 40/200 (20%), loss 2.3456 (ce 2.1002, kd 2.5910), 1,234 tokens/s, ETA 3m12s

It reports the first step, then whenever ``every_steps`` steps or ``every_s`` seconds have passed since
its last line, and the last step. Rates and the ETA are averages over this process's steps (a resumed
run's earlier steps are not in them).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

log = logging.getLogger("llm_neo")

EVERY_S = 30.0  # at most this long between two lines
LINES_PER_RUN = 20  # and a line every 1/20 of the run


def on_terminal() -> bool:
    """Whether stderr is a terminal (where tqdm draws its bar)."""
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def every_steps_for(total: int) -> int:
    """The default step interval of a run of ``total`` steps: about ``LINES_PER_RUN`` lines in all."""
    return max(1, math.ceil(total / LINES_PER_RUN))


@dataclass
class ProgressLines:
    """Plain progress lines for ``label`` over ``total`` units (optimizer steps, or a job's units),
    starting at ``initial``. ``enabled`` None: when stderr is not a terminal (the bar's complement)."""

    label: str
    total: int
    initial: int = 0
    initial_tokens: int = 0  # tokens trained before ``initial`` (a resumed run's)
    unit: str = "step"  # the word before the count ("" for none)
    every_steps: int | None = None  # default: every_steps_for(total)
    every_s: float = EVERY_S
    enabled: bool | None = None
    clock: float = field(default_factory=lambda: time.perf_counter())  # when this process began counting
    _last_step: int = field(default=-1, init=False)
    _last_time: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        if self.enabled is None:
            self.enabled = not on_terminal()
        if self.every_steps is None:
            self.every_steps = every_steps_for(self.total)
        self._last_step = self.initial
        self._last_time = self.clock

    def update(self, done: int, *, tokens: int | None = None, details: str = "") -> str | None:
        """``done`` units are done (``tokens`` trained in all, if counted); log a line if one is due and
        return it (None: not due, or disabled). ``details`` goes after the count (the loss)."""
        if not self.enabled:
            return None
        now = time.perf_counter()
        first = self._last_step == self.initial and done > self.initial
        due = (
            first
            or done >= self.total
            or done - self._last_step >= (self.every_steps or 1)
            or now - self._last_time >= self.every_s
        )
        if not due or done == self._last_step:
            return None
        self._last_step, self._last_time = done, now
        elapsed = now - self.clock
        unit = f"{self.unit} " if self.unit else ""
        parts = [f"{self.label}: {unit}{done}/{self.total} ({100 * done / max(self.total, 1):.0f}%)"]
        if details:
            parts.append(details)
        if tokens is not None and elapsed > 0:
            parts.append(f"{(tokens - self.initial_tokens) / elapsed:,.0f} response tokens/s")
        parts.append(f"ETA {format_clock(self.eta(done, elapsed))}" if done < self.total else "done")
        line = ", ".join(parts)
        log.info("%s", line)
        return line

    def eta(self, done: int, elapsed: float) -> float:
        """Seconds left at this process's average rate."""
        here = done - self.initial
        return elapsed / here * (self.total - done) if here > 0 else math.inf


def format_clock(seconds: float) -> str:
    """``3m12s``, ``1h05m``, ``42s``; ``?`` when unknown."""
    if not math.isfinite(seconds):
        return "?"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def tracked(items: Sequence[T], label: str, *, unit: str, enabled: bool = True) -> Iterator[T]:
    """``items`` one by one, with their progress shown where a person waits: tqdm's bar on a terminal,
    plain lines with an ETA (``ProgressLines``) elsewhere; nothing with ``enabled=False``."""
    lines = ProgressLines(label, len(items), unit=unit, enabled=None if enabled else False)
    bar = tqdm(items, desc=label, unit=unit, disable=None if enabled else True, leave=False)
    for done, item in enumerate(bar, 1):
        yield item
        lines.update(done)
