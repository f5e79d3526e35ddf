"""Memory measurement: a child process's peak RSS is its own, and live tensor bytes are counted exactly."""

from __future__ import annotations

import os
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


# ----------------------------------------------------------------------------------------------------
# The CPU allocator policy and the CPU loss chunk (runtime.memory: one place for both)


@pytest.fixture
def fresh_policy(monkeypatch):
    """A process whose allocator policy is not decided yet; ``calls`` records every mallopt."""
    from llm_neo.runtime import memory

    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(memory, "_allocator", {})
    monkeypatch.setattr(memory, "_mallopt", lambda param, value: calls.append((param, value)) or True)
    monkeypatch.delenv(memory.ALLOCATOR_ENV, raising=False)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    return memory, calls


def test_the_cpu_allocator_policy_is_applied_once(fresh_policy):
    memory, calls = fresh_policy
    first = memory.cpu_allocator_policy()
    assert memory.cpu_allocator_policy() == first
    assert calls == [(memory._M_MMAP_THRESHOLD, memory.CPU_MMAP_THRESHOLD)]
    assert "16 MiB" in first


@pytest.mark.parametrize("value", ["default", "off", "0"])
def test_the_environment_turns_the_allocator_policy_off(fresh_policy, monkeypatch, value):
    memory, calls = fresh_policy
    monkeypatch.setenv(memory.ALLOCATOR_ENV, value)
    assert "default" in memory.cpu_allocator_policy()
    assert calls == []


def test_a_threshold_given_to_glibc_or_set_before_is_kept(fresh_policy, monkeypatch):
    memory, calls = fresh_policy
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert "MALLOC_MMAP_THRESHOLD_=65536" in memory.cpu_allocator_policy()
    assert calls == []
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    monkeypatch.setattr(memory, "_allocator", {})
    memory.set_mmap_threshold(65536)  # compare --exact-memory's workers set theirs before the run starts
    assert "65536" in memory.cpu_allocator_policy()
    assert calls == [(memory._M_MMAP_THRESHOLD, 65536)]


def test_without_glibc_the_allocator_is_left_alone(fresh_policy, monkeypatch):
    memory, _ = fresh_policy
    monkeypatch.setattr(memory, "_mallopt", lambda param, value: False)  # macOS, musl: no mallopt
    assert "not glibc" in memory.cpu_allocator_policy()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
@pytest.mark.parametrize("policy", ["llm-neo", "default"])
def test_with_the_policy_freed_chunks_go_back_to_the_system(policy):
    # glibc's adaptive threshold: the first 24 MiB block is mmapped, its free raises the threshold above
    # it, and the next ones come from the heap and stay resident when freed (a chunk of the loss at
    # 256 tokens x 32,000 is 31 MiB). With the policy every such block is unmapped when freed. A fresh
    # process each: glibc's state is the process's.
    code = """
import torch
from llm_neo.runtime.memory import cpu_allocator_policy, rss_bytes
print(cpu_allocator_policy())
before = rss_bytes()
for _ in range(3):
    t = torch.ones(6 * 2**20)  # 24 MiB, every page touched
    del t
print((rss_bytes() - before) / 2**20)
"""
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    env["LLM_NEO_MALLOC"] = "on" if policy == "llm-neo" else "default"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    said, kept_mib = run.stdout.strip().splitlines()[-2:]
    if policy == "llm-neo":
        assert "mmap threshold" in said
        assert float(kept_mib) < 8, said
    else:  # the contrast: without it, at least one 24 MiB block stays resident
        assert float(kept_mib) > 20, said


def test_the_cpu_chunk_is_above_the_mmap_threshold_and_within_its_budget():
    # The two CPU defaults work together: a chunk's [C, V] fp32 tensors must be mmapped (above the
    # threshold) to go back to the system when freed, and stay within the budget the chunk is sized by.
    from llm_neo.config import CPU_CHUNK_BYTES, GPU_CHUNK_TOKENS, default_chunk_size
    from llm_neo.runtime.memory import CPU_MMAP_THRESHOLD

    for vocab in (32_000, 49_152, 128_256):  # Llama-2, SmolLM2, Llama-3
        chunk = default_chunk_size("cpu", vocab)
        assert chunk % 64 == 0
        assert CPU_MMAP_THRESHOLD <= 4 * chunk * vocab <= CPU_CHUNK_BYTES, (vocab, chunk)
    for vocab in (151_936, 262_144):  # Qwen2.5, Gemma 3: the 64-token floor, over the budget
        assert default_chunk_size("cpu", vocab) == 64
    assert default_chunk_size("cpu", 32_000) == 256
    assert default_chunk_size("cpu", 512) == GPU_CHUNK_TOKENS  # a tiny vocabulary: never above the GPU's
    assert default_chunk_size("cuda", 32_000) == GPU_CHUNK_TOKENS
