"""How llm-neo's processes log: one format, and the libraries' import-time noise kept out.

The quantization libraries log at import what this build lacks (CUDA-only kernels on a CPU, an optional
``kernels`` package), torch a deprecation in torchao's registrations, gguf its byte order: not our
users' concern, and printed before any of our own lines. ``setup_logging`` is what the CLI and every
worker process call; importing this module already quiets the libraries, because the worker processes'
forkserver imports it first (``runtime.workers``), before the modules that import those libraries, and
has no other hook.
"""

from __future__ import annotations

import logging
import sys
import warnings
from typing import Any

FORMAT = "[llm-neo] %(message)s"
# huggingface_hub logs every retry of a hub request twice (its own handler and ours); a load that fails
# says why once, in its error.
QUIET_LIBRARIES = ("torchao", "bitsandbytes", "torch.utils._pytree", "gguf", "huggingface_hub")


def quiet_libraries() -> None:
    for library in QUIET_LIBRARIES:
        logging.getLogger(library).setLevel(logging.ERROR)
    # PEFT asks transformers 5 a deprecated question on every attach; it is noise to our users.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


class _CurrentStderr(logging.StreamHandler):
    """A handler that writes to whatever ``sys.stderr`` is when a line is logged. A plain StreamHandler
    keeps the stream of the call that set it up: once that stream is replaced and closed (pytest's
    per-test capture, an application redirecting stderr), every later line fails with "I/O operation on
    closed file"."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass  # StreamHandler.__init__ and setStream assign one; the current sys.stderr is always used


def setup_logging(level: int = logging.INFO) -> None:
    """llm-neo's lines on stderr as ``[llm-neo] message``; the noisy libraries at ERROR only."""
    quiet_libraries()
    root = logging.getLogger()
    # Replace only a handler of ours (a second call, a worker after its fork): basicConfig(force=True)
    # would also drop handlers others installed (pytest's capture, an embedding application's).
    for handler in [h for h in root.handlers if getattr(h, "llm_neo", False)]:
        root.removeHandler(handler)
    handler = _CurrentStderr()
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.llm_neo = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)


quiet_libraries()
