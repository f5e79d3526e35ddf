"""Every error llm-neo expects, explains and exits on, under one base that carries the exit code.

The CLI catches ``LlmNeoError`` only: its message already says what went wrong and how to fix it, so
the user sees that message and the exit code (2 for configuration problems, 75 for a run stopped by a
signal after saving its work, 1 for everything else), and ``--debug`` adds the traceback. Any other
exception is a bug and shows its traceback. Each class also derives from the builtin a caller would
expect (ValueError for bad input, RuntimeError for a run that could not finish, OSError for a failed
write), so library users can catch either.
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


class NonFiniteTargets(NonFiniteError):
    """A non-finite KD term beside a finite CE: the teacher's (or the cache's) targets, not the student."""


class WorkerError(LlmNeoError, RuntimeError):
    """A job of a worker process failed or its process died; the message names its log and the rerun."""


class SweepError(LlmNeoError, RuntimeError):
    """The sweep cannot go on (another sweep in --output, nothing finished, ...); the message says why."""


class OutputError(LlmNeoError, OSError):
    """Something could not be written: no space left, a read-only or vanished directory, a path that is
    a file. The message names the path, what was being written, why, what was kept and what to do."""

    def __init__(self, message: str, *, path: str = "", errno: int | None = None):
        super().__init__(message)
        self.path = path
        self.errno = errno  # the OSError's, when one was the cause

    def __str__(self) -> str:
        return str(self.args[0])


class CheckpointError(TrainingError):
    """No intact checkpoint to resume from; the message names the directory and what is wrong with each."""


class StateFileError(LlmNeoError, ValueError):
    """A state file (sweep.json, ...) and its backup are damaged or unreadable; the message names them."""


class OutOfMemory(TrainingError):
    """A step ran out of (GPU or host) memory. Carries the settings that decided the step's memory, so the
    CLI can add an estimate; the message says which options lower it. The last checkpoint is kept."""

    def __init__(self, message: str, *, step: int, settings: dict[str, object]):
        super().__init__(message)
        self.step = step
        self.settings = settings


class RunStopped(LlmNeoError):
    """A signal (SIGTERM, SIGINT, SIGUSR1) stopped the run after its current optimizer step and a
    checkpoint; the message says what was kept and the command that resumes. Exit code 75 (EX_TEMPFAIL
    of sysexits.h: a temporary failure, retrying is expected to work)."""

    exit_code = 75

    def __init__(self, what: str, *, resume: str, signal_name: str = "", verb: str = "Resume with"):
        super().__init__(f"{what}. {verb}: {resume}")
        self.what = what  # what stopped, when, and what was kept
        self.resume = resume  # the command that continues the run
        self.signal_name = signal_name
