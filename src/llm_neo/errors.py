"""Every error llm-neo expects, explains and exits on, under one base that carries the exit code.

The CLI catches ``LlmNeoError`` only: its message already says what went wrong and how to fix it, so
the user sees that message and the exit code (2 for configuration problems, 1 for everything else),
and ``--debug`` adds the traceback. Any other exception is a bug and shows its traceback. Each class
also derives from the builtin a caller would expect (ValueError for bad input, RuntimeError for a
run that could not finish), so library users can catch either.
"""

from __future__ import annotations


class LlmNeoError(Exception):
    """An expected failure with an actionable message; ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class ConfigError(LlmNeoError, ValueError):
    """One or more configuration problems; the message lists all of them, each with its fix."""

    exit_code = 2

    def __init__(self, problems: list[str]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} configuration problem(s):\n{lines}")


class DataError(LlmNeoError, ValueError):
    """Bad input data: the message names the file, the record or line, and what to fix."""


class ModelError(LlmNeoError, ValueError):
    """A model or tokenizer could not be loaded, or teacher and student are incompatible."""


class CacheError(LlmNeoError, ValueError):
    """A teacher cache that is missing, incomplete, damaged, or made for another run."""


class TrainingError(LlmNeoError, RuntimeError):
    """Training stopped (non-finite loss, failed merge check); the last good checkpoint is kept."""


class NonFiniteError(TrainingError):
    """A NaN or infinite loss or gradient norm; raised before the optimizer touches the weights."""


class WorkerError(LlmNeoError, RuntimeError):
    """A job of a worker process failed or its process died; the message names its log and the rerun."""


class SweepError(LlmNeoError, RuntimeError):
    """The sweep cannot go on (another sweep in --output, nothing finished, ...); the message says why."""
