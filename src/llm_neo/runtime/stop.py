"""Graceful stop: SIGTERM, SIGINT and SIGUSR1 end a run at its next safe point instead of killing it.

Schedulers preempt with SIGTERM (Kubernetes, ``docker stop``, Slurm), some warn with SIGUSR1 first
(Slurm's ``--signal``), users press Ctrl-C (SIGINT). Inside ``graceful_stop()`` the first of these only
records the request; the code in charge looks at it at its safe points (the training loop after every
optimizer step, through ``agreed``, which under torchrun makes every rank stop after the same step)
and stops there, keeping its work. A second signal ends the process at once by the signal's default
action (exit status 128 + the signal's number: 143 for SIGTERM, 130 for SIGINT), after the
``on_second`` hooks (a worker pool passes the signal on to its workers). A repeat within
``REPEAT_WINDOW_S`` of the first is not a second request: a signal sent to a process group reaches a
torchrun worker twice within milliseconds (directly, and passed on by the launcher), as does Ctrl-C.

Nested ``graceful_stop`` blocks share the outermost request, so a sweep sees a stop that arrived during
one of its trials. Handlers can only be installed by the main thread; elsewhere the block does nothing
and signals keep their usual effect.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from llm_neo.runtime.distributed import World, all_reduce_sum

log = logging.getLogger("llm_neo")

REPEAT_WINDOW_S = 1.0
SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, name))


@dataclass
class StopRequest:
    """Whether a stop was asked for, by which signal, and what the process does about it."""

    signum: int | None = None
    at: float = 0.0  # when the first signal came (time.monotonic)
    # What the first signal's log line says will happen; the code in charge keeps it current.
    plan: str = "stopping at the next safe point"
    on_second: list[Callable[[int], None]] = field(default_factory=list)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""


_active: StopRequest | None = None


@contextlib.contextmanager
def graceful_stop(plan: str | None = None) -> Iterator[StopRequest]:
    """Record SIGTERM/SIGINT/SIGUSR1 instead of dying of them, inside the block (see the module
    docstring); the previous handlers come back afterwards. ``plan`` replaces the request's plan for
    the block (and is restored after it, when nested)."""
    global _active
    if _active is not None:  # nested: one request for the whole process
        saved = _active.plan
        if plan is not None:
            _active.plan = plan
        try:
            yield _active
        finally:
            _active.plan = saved
        return
    request = StopRequest(plan=plan or StopRequest.plan)
    if threading.current_thread() is not threading.main_thread():
        yield request  # no handlers off the main thread: signals act as usual
        return

    def handle(signum: int, frame: object) -> None:
        if request.signum is None:
            request.signum, request.at = signum, time.monotonic()
            log.warning(
                "%s received: %s (send it again to exit at once)", signal.Signals(signum).name, request.plan
            )
            return
        if time.monotonic() - request.at < REPEAT_WINDOW_S:
            return  # the same request delivered twice (process group + launcher), not a second one
        for hook in request.on_second:
            with contextlib.suppress(Exception):
                hook(signum)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    previous = {s: signal.signal(s, handle) for s in SIGNALS}
    _active = request
    try:
        yield request
    finally:
        _active = None
        for s, handler in previous.items():
            signal.signal(s, handler)


def agreed(request: StopRequest, world: World, device: torch.device) -> bool:
    """Whether any rank was asked to stop. A collective under torchrun (every rank calls it at the same
    point, so all stop at the same step, whichever of them the signal reached)."""
    return all_reduce_sum(float(request.requested), world, device) > 0
