"""Memory measurement: a child process's peak RSS is its own, and live tensor bytes are counted exactly."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from llm_neo.runtime.memory import LiveTensorBytes, peak_rss_bytes

MiB = 2**20


def test_child_peak_rss_is_not_the_parents():
    # ru_maxrss of a child started by fork + exec carries the parent's resident set at the fork; the
    # benchmark's children are started from a test runner or a notebook that may be large.
    parent = bytearray(800 * MiB)
    for i in range(0, len(parent), 4096):  # touch every page: resident, not just reserved
        parent[i] = 1
    assert peak_rss_bytes() > 800 * MiB
    code = "from llm_neo.runtime.memory import peak_rss_bytes; print(peak_rss_bytes())"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    child = int(run.stdout)
    # The child imports torch (a few hundred MB) and allocates nothing else.
    assert 0 < child < 700 * MiB
    del parent


def test_live_tensor_bytes_counts_what_is_alive():
    with LiveTensorBytes() as mode:
        a = torch.ones(1000, 250)  # 1 MB
        b = a * 2  # 2 MB live
        del a
        c = b + 1  # 2 MB live again
        b.mul_(3)  # in place: the same storage, nothing new
        del b, c
    assert mode.peak == 2 * 1000 * 250 * 4
    assert mode.current == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim is glibc's")
def test_returning_the_free_heap_gives_back_what_freed_tensors_left():
    # Blocks freed between live ones stay resident in glibc's heap (nothing to trim off its top); the
    # finish phase of a run starts from such a heap. 32 KiB: below any mmap threshold a run sets.
    from llm_neo.runtime.memory import return_free_heap, rss_bytes

    blocks = [torch.ones(8192) for _ in range(6000)]  # 6000 x 32 KiB = 188 MiB, every byte touched
    del blocks[1::2]  # half of it freed, in holes between the other half
    before = rss_bytes()
    assert return_free_heap()
    released = before - rss_bytes()
    assert released > 0.5 * 3000 * 32 * 1024, released  # most of the 94 MiB freed
    del blocks
