"""Memory measurement: a child process's peak RSS is its own, and live tensor bytes are counted exactly."""

from __future__ import annotations

import subprocess
import sys

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
