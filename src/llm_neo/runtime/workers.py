"""Worker processes: jobs run in children of a forkserver, a few at a time, under one progress bar.

Why processes: on a CPU a run's peak memory is its process's peak resident set, a high-water mark
that never goes down, so each run needs a process of its own for its number to be its own. Why two at
a time on two cores, one thread each: small models keep one core busy with one thread, and two
single-threaded runs use both cores fully without the synchronisation a two-thread run pays at every
small operation (which, on a machine with any other load, makes it several times slower). Children
fork from a server that has already imported torch and transformers, so each starts in a fraction of
a second rather than paying the ~5 s import again.

A job is a module-level function ``run(payload, report) -> result`` (picklable by reference), where
``report(units_done, loss_or_None)`` moves the shared progress bar.

Stopping: workers run in process groups of their own, so SIGTERM, SIGINT (Ctrl-C) or SIGUSR1 reach
the parent alone, which passes SIGTERM on to each running worker once and starts no more jobs. A
``distill`` job stops after its current step with a checkpoint (see ``runtime/stop.py``); the parent
waits for them and raises RunStopped saying what each job kept. A second signal is passed on too (the
workers exit at once) before the parent exits.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import queue
import resource
import signal
import sys
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llm_neo.errors import RunStopped, WorkerError
from llm_neo.runtime.logs import setup_logging
from llm_neo.runtime.memory import set_mmap_threshold
from llm_neo.runtime.progress import ProgressLines
from llm_neo.runtime.stop import graceful_stop

Report = Callable[[int, "float | None"], None]


@dataclass
class Job:
    """One unit of work for a worker process."""

    name: str
    run: Callable[[Any, Report], Any]  # a module-level function: children receive it by reference
    payload: Any
    units: int  # progress units it reports (optimizer steps, or models evaluated)
    log: Path  # the child's stdout and stderr
    rerun: str = ""  # a command that reruns the job alone, shown when it fails


def run_jobs(
    jobs: list[Job],
    *,
    parallel: int,
    threads: int,
    desc: str,
    mmap_threshold: int = 0,
    preload: Sequence[str] = ("llm_neo.distill",),
    again: str = "the same command",
) -> tuple[list[Any], float]:
    """Run ``jobs``, ``parallel`` at a time, each in its own process with ``threads`` torch threads.

    ``mmap_threshold`` > 0 sets glibc's M_MMAP_THRESHOLD in the children (peak RSS without allocator
    slack, see ``set_mmap_threshold``); ``preload`` are the modules the forkserver imports once (on its
    first use in this process). One progress bar counts every job's units; a failing job stops the
    others and raises WorkerError naming its log; a stop (a signal, see the module docstring) raises
    RunStopped listing what each job kept, and ``again``, the command that starts it all again.
    Returns the jobs' results in order, and the CPU seconds the jobs used together.
    """
    from tqdm.auto import tqdm

    ctx = _context(preload)
    messages = ctx.Queue()
    results: list[Any] = [None] * len(jobs)
    cpu_seconds = 0.0
    reported = [0] * len(jobs)
    status: dict[int, str] = {}
    running: dict[int, Any] = {}
    pending = list(range(len(jobs)))
    total = sum(j.units for j in jobs)
    bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, disable=None)
    lines = ProgressLines(desc, total, unit="")  # without a terminal: plain lines (the jobs' units)

    def advance(i: int, units: int) -> None:
        bar.update(units - reported[i])
        reported[i] = units
        lines.update(sum(reported), details=" | ".join(status.values()))

    stopped: dict[int, str] = {}  # job → what it kept
    finished: set[int] = set()
    passed_on = False
    with graceful_stop("stopping the workers after their current step (each keeps a checkpoint)") as stop:
        stop.on_second.append(lambda signum: _signal(running.values(), signum))
        try:
            while pending or running:
                if (stop.requested or stopped) and not passed_on:  # pass the stop on, once
                    pending, passed_on = [], True
                    _signal(running.values(), signal.SIGTERM)
                while pending and len(running) < parallel:
                    i = pending.pop(0)
                    jobs[i].log.parent.mkdir(parents=True, exist_ok=True)
                    job = jobs[i]
                    process = ctx.Process(
                        target=_worker,
                        args=(i, job.run, job.payload, threads, mmap_threshold, str(job.log), messages),
                        name=f"llm-neo-{jobs[i].name}",
                        daemon=True,
                    )
                    process.start()
                    running[i] = process
                    status[i] = jobs[i].name
                try:
                    kind, i, *rest = messages.get(timeout=1.0)
                except queue.Empty:
                    for i, process in list(running.items()):
                        if process.is_alive():
                            continue
                        if passed_on:  # a job that does not stop gracefully, ended by the signal
                            stopped[i] = f"ended by the stop (exit code {process.exitcode})"
                            running.pop(i).join()
                            continue
                        # Died without a word: killed, out of memory, crashed.
                        raise WorkerError(_failure(jobs[i], f"exit code {process.exitcode}")) from None
                    continue
                if kind == "step":
                    units, loss = rest
                    status[i] = f"{jobs[i].name} {loss:.3f}" if loss is not None else jobs[i].name
                    advance(i, units)
                    bar.set_postfix_str(" | ".join(status.values()), refresh=False)
                elif kind == "done":
                    results[i], cpu = rest
                    cpu_seconds += cpu
                    advance(i, jobs[i].units)
                    running.pop(i).join()
                    status.pop(i, None)
                    finished.add(i)
                elif kind == "stopped":
                    stopped[i] = rest[0]
                    running.pop(i).join()
                    status.pop(i, None)
                else:
                    raise WorkerError(_failure(jobs[i], rest[0]))
        finally:
            for process in running.values():
                process.terminate()
                process.join()
            bar.close()
    if passed_on:
        kept = [f"{job.name}: {stopped[i]}" for i, job in enumerate(jobs) if i in stopped]
        kept += [f"{job.name}: finished" for i, job in enumerate(jobs) if i in finished]
        how = f"by {stop.name}" if stop.requested else "(a worker was stopped)"
        what = f"stopped {how}: {'; '.join(kept) or 'no job had started'}"
        raise RunStopped(what, resume=again, verb="Start again with")
    return results, cpu_seconds


def _signal(processes: Iterable[Any], signum: int) -> None:
    """Send ``signum`` to each of ``processes`` that is still running."""
    for process in list(processes):
        if process.pid is not None and process.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signum)


def _failure(job: Job, error: str) -> str:
    tail = job.log.read_text(errors="replace").strip().splitlines()[-15:] if job.log.is_file() else []
    rerun = f"; rerun it alone with: {job.rerun}" if job.rerun else ""
    return f"{job.name} failed: {error}. Its log is {job.log}{rerun}" + (
        "\n  " + "\n  ".join(tail) if tail else ""
    )


_CONTEXT: Any = None


def _context(preload: Sequence[str]) -> Any:
    global _CONTEXT
    if _CONTEXT is None:
        if "forkserver" in multiprocessing.get_all_start_methods():
            from multiprocessing import forkserver

            _CONTEXT = multiprocessing.get_context("forkserver")
            # runtime.logs first: its import quiets the libraries the other modules import.
            _CONTEXT.set_forkserver_preload(["llm_neo.runtime.logs", *preload])
            # OpenMP threads that wait for work sleep instead of spinning: a spinning thread steals the
            # core another process (the other arm, or anything else on a 2-core laptop) needs, which
            # makes multi-threaded small-model training several times slower on a busy machine. Read
            # once, when the server loads torch; the caller's own environment is left as it was.
            saved = os.environ.get("OMP_WAIT_POLICY")
            os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
            try:
                forkserver.ensure_running()
            finally:
                if saved is None:
                    del os.environ["OMP_WAIT_POLICY"]
        else:  # Windows: spawn (each job pays the import)
            _CONTEXT = multiprocessing.get_context("spawn")
    return _CONTEXT


def _worker(
    index: int,
    run: Callable[[Any, Report], Any],
    payload: Any,
    threads: int,
    mmap_threshold: int,
    log_path: str,
    messages: Any,
) -> None:
    """The child: its output goes to its log (the parent draws the progress), its results to the queue."""
    _die_with_parent()
    if hasattr(os, "setpgid"):
        os.setpgid(0, 0)  # a group of its own: terminal signals reach the parent, which passes them on
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)  # less the umask
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    torch.set_num_threads(threads)
    if mmap_threshold:
        set_mmap_threshold(mmap_threshold)
    setup_logging(logging.INFO)
    try:
        result = run(payload, lambda units, loss: messages.put(("step", index, units, loss)))
        usage = resource.getrusage(resource.RUSAGE_SELF)  # a forked child's counters start at zero
        messages.put(("done", index, result, usage.ru_utime + usage.ru_stime))
    except RunStopped as err:
        messages.put(("stopped", index, f"{err.what} (resume it alone with: {err.resume})"))
        messages.close()
        messages.join_thread()
        raise SystemExit(err.exit_code) from err
    except BaseException as err:
        traceback.print_exc()
        messages.put(("error", index, f"{type(err).__name__}: {err}"))
        messages.close()
        messages.join_thread()  # the message must leave before the process does
        raise SystemExit(1) from err


def _die_with_parent() -> None:
    """Linux: the kernel kills this worker when the process that started it dies (kill -9 included), so
    a killed run never leaves a worker behind that writes into the outputs its rerun is writing."""
    if not sys.platform.startswith("linux"):
        return
    import contextlib
    import ctypes
    import signal

    with contextlib.suppress(OSError):  # not glibc: the worker outlives a killed parent until its job ends
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def load_average() -> float | None:
    """The 1-minute load average: how busy the machine was (CPU timings depend on it)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):  # not available on this platform
        return None


@contextlib.contextmanager
def sampled_load(every_s: float = 15.0) -> Iterator[list[float]]:
    """The 1-minute load average sampled every ``every_s`` seconds while the block runs, at its start
    and at its end (a thread that only reads /proc/loadavg): the load the block's timings were taken
    under, not the load at one moment after it."""
    import threading

    samples: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        while True:
            if (load := load_average()) is not None:
                samples.append(load)
            if stop.wait(every_s):
                return

    thread = threading.Thread(target=sample, name="llm-neo-load", daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        stop.set()
        thread.join()
        if (load := load_average()) is not None:
            samples.append(load)


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, where the platform has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
