"""Measuring memory: peak live tensor bytes on any device, and the process's resident set on a CPU.

On a GPU, ``torch.cuda.max_memory_allocated`` is the peak of live tensor bytes. A CPU has no such
counter, and its peak resident set (RSS) also holds the ~0.4 GB Python/torch runtime and whatever
the C allocator keeps mapped after tensors are freed, which can differ between two runs by more than
the tensors they hold. ``LiveTensorBytes`` is the CPU's ``max_memory_allocated``: it sees every tensor
an aten op returns and counts its storage until the storage is freed.
"""

from __future__ import annotations

import functools
import logging
import os
import resource
import sys
import weakref
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

# Bytes per GiB: every memory number llm-neo reports is in GiB (2**30 bytes), fields named *_gb included.
GiB = 2**30

__all__ = [
    "GiB",
    "LiveTensorBytes",
    "cpu_allocator_policy",
    "peak_memory_gb",
    "peak_rss_bytes",
    "return_free_heap",
    "rss_bytes",
    "set_mmap_threshold",
]


class LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of live tensor storages, op by op, and their peak: ``max_memory_allocated`` for
    the CPU, without allocator rounding. Tensors that exist before entering are counted if passed in."""

    def __init__(self, *existing: torch.Tensor) -> None:
        super().__init__()
        self._known: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.current = self.peak = 0
        for t in existing:
            self._track(t)

    def _release_ref(self, nbytes: int, _ref: object) -> None:
        self.current -= nbytes

    def _track(self, t: Any) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        storage = t.untyped_storage()
        if storage in self._known:
            return
        nbytes = storage.nbytes()
        # The weakref's callback runs when the storage is freed (by whatever held it last).
        self._known[storage] = weakref.ref(storage, functools.partial(self._release_ref, nbytes))
        self.current += nbytes
        self.peak = max(self.peak, self.current)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            self._track(t)
        return out


def rss_bytes() -> int:
    """Resident memory of this process now (Linux: /proc/self/statm); elsewhere the peak so far."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()
    return pages * resource.getpagesize()


def peak_rss_bytes() -> int:
    """The process's peak resident set: Linux's VmHWM of its own address space, else ru_maxrss.

    Why not ru_maxrss on Linux: across fork + exec the kernel keeps the larger of the old and new address
    spaces' peaks, so a child started from a big process (a test runner, a notebook) reports at least
    its parent's size at the fork. VmHWM belongs to the current address space and starts again at exec.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def peak_memory_gb(device: torch.device) -> float:
    """CUDA: max allocated by tensors; CPU: the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GiB
    return peak_rss_bytes() / GiB


# glibc's mallopt parameter (malloc.h) and the environment variable through which glibc itself reads it.
_M_MMAP_THRESHOLD = -3
_GLIBC_THRESHOLD_ENV = "MALLOC_MMAP_THRESHOLD_"
# The CPU allocator policy's threshold: blocks this size or larger are mmapped and unmapped when freed.
# The chunked loss's [C, V] fp32 tensors (31 MiB at C = 256, V = 32,000) are above it; a block's
# activations and gradients at the CPU shapes (1-9 MiB) stay below it, in the heap that reuses them
# step after step without a system call. docs/memory.md has the measurements.
CPU_MMAP_THRESHOLD = 16 * 2**20
# Set to "default" (or "0", "off"), the run keeps glibc's own allocator policy.
ALLOCATOR_ENV = "LLM_NEO_MALLOC"
# What the process's allocator policy has been, once decided: the first decision stands.
_allocator: dict[str, str] = {}


def set_mmap_threshold(nbytes: int) -> None:
    """glibc: serve blocks of ``nbytes`` or more with mmap, so that freeing them returns the memory.

    By default glibc keeps freed blocks in the heap for reuse, and a process that allocates many
    differently sized tensors (the LoRA arms' small adapter products among them) fragments it: its peak
    resident set then exceeds its peak live memory by tens of MB, more than the methods differ by at
    the demo's scale. Every such allocation then costs a system call and fresh page faults, hence slower.
    A threshold set here is the process's allocator policy: ``cpu_allocator_policy`` keeps it.
    """
    ok = _mallopt(_M_MMAP_THRESHOLD, nbytes)
    _allocator["policy"] = f"mmap threshold {nbytes} bytes (set by the caller)"
    if not ok:
        logging.getLogger("llm_neo").warning(
            "not a glibc system: the mmap threshold is unchanged, peak RSS is as measured"
        )


def cpu_allocator_policy() -> str:
    """The allocator policy of a run on a CPU, applied once per process; returns it, in words.

    glibc's default mmap threshold adapts upwards (to 32 MiB) each time an mmapped block is freed, so the
    chunked loss's [C, V] chunks soon land in the heap, where freed blocks stay resident: a whole
    ``distill`` process then peaks 0.1-0.4 GiB above its live tensors (docs/memory.md). A fixed
    threshold (``CPU_MMAP_THRESHOLD``) returns them to the system when freed. Kept as is: a threshold
    the user gave glibc (``MALLOC_MMAP_THRESHOLD_``), one this process already set, a non-glibc libc,
    and ``LLM_NEO_MALLOC=default``.
    """
    if "policy" in _allocator:
        return _allocator["policy"]
    if os.environ.get(ALLOCATOR_ENV, "").strip().lower() in ("default", "0", "off", "glibc"):
        policy = f"the C library's default ({ALLOCATOR_ENV}={os.environ[ALLOCATOR_ENV]})"
    elif given := os.environ.get(_GLIBC_THRESHOLD_ENV):
        policy = f"glibc's, as the environment sets it ({_GLIBC_THRESHOLD_ENV}={given})"
    elif _mallopt(_M_MMAP_THRESHOLD, CPU_MMAP_THRESHOLD):
        policy = f"mmap threshold {CPU_MMAP_THRESHOLD // 2**20} MiB"
    else:
        policy = "the C library's default (not glibc)"
    _allocator["policy"] = policy
    return policy


def _mallopt(param: int, value: int) -> bool:
    """glibc's ``mallopt``; False where there is none (macOS, musl) or it refuses."""
    try:
        return bool(_libc().mallopt(param, value))
    except (OSError, AttributeError):  # not glibc: keep the default allocator
        return False


def _libc() -> Any:
    import ctypes
    import ctypes.util

    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def return_free_heap() -> bool:
    """glibc: give the heap's free pages back to the system (``malloc_trim(0)``); False elsewhere.

    A training step frees its activations into glibc's heap, which keeps them for reuse: the process's
    resident set stays at the steps' high-water mark, and the finish phase (merge check, save, held-out
    evaluation), allocating in other sizes, then grows it past that mark. Trimming between the phases
    returns what the earlier one left, at the cost of a scan of the heap (milliseconds).
    """
    try:
        return bool(_libc().malloc_trim(0))
    except (OSError, AttributeError):  # not glibc (macOS, musl)
        return False
