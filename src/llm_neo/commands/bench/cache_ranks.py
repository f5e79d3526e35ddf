"""The bench's multi-rank cache row (``--cache-ranks N``): ``llm-neo cache-teacher`` of the shape's random
teacher in one process and on N ranks (torchrun: gloo on a CPU, NCCL on GPUs), the teacher replicated and
FSDP2-sharded, in the same bench.

The teacher is saved once, seeded as the step runs build it, in the compute dtype with a word-level
tokenizer of exactly its vocabulary, beside ``8 × batch`` records of exactly ``seq_len`` tokens (``text``:
every token but the first is a trained position). Each launch is a real ``python -m llm_neo cache-teacher``
(``--batch-size`` and ``--shard-size`` the bench's batch, ``--top-k`` CACHE_TOP_K), on a CPU with
``--num-threads`` (default 1) intra-op threads per process, so that N ranks use N times the cores of one
process. Its numbers are those its manifest records: per rank the tokens it computed, its seconds, its
peak (``llm_neo.runtime.memory.peak_memory_gb``: the process's peak RSS on a CPU, the tensors' peak on a
GPU) and the teacher parameters it held; in total, the tokens/s of all ranks side by side. Each N-rank
cache is checked against the one-process cache: the same key and the same top-k ids.
"""

from __future__ import annotations

import gc
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from llm_neo.commands.bench.isolate import child_env
from llm_neo.commands.bench.runs import BenchConfig, ratio
from llm_neo.commands.bench.step import build_model
from llm_neo.commands.bench.whole import write_token_records
from llm_neo.records.bench import CacheLaunch, CacheRanks, CacheRankShare
from llm_neo.runtime.memory import GiB

CACHE_TOP_K = 64
RECORDS_PER_BATCH = 8  # the cache's records: 8 micro-batches, so each of 2 ranks runs 4 forwards


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cache_command(args: list[str], ranks: int) -> list[str]:
    """``llm-neo cache-teacher ARGS`` in one process, or under ``torch.distributed.run`` on ``ranks``."""
    if ranks == 1:
        return [sys.executable, "-m", "llm_neo", "cache-teacher", *args]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}",
            f"--master-port={_port()}", "-m", "llm_neo", "cache-teacher", *args]  # fmt: skip


def same_cache(a: Path, b: Path) -> bool:
    """Whether two caches have the same key and, shard by shard, the same top-k ids."""
    from safetensors.torch import load_file

    ma, mb = (json.loads((c / "manifest.json").read_text()) for c in (a, b))
    if ma["key_digest"] != mb["key_digest"] or [s["file"] for s in ma["shards"]] != [
        s["file"] for s in mb["shards"]
    ]:
        return False
    return all(
        torch.equal(load_file(a / s["file"])["ids"], load_file(b / s["file"])["ids"]) for s in ma["shards"]
    )


def _launch(name: str, ranks: int, placement: str, common: list[str], out: Path, config: BenchConfig,
            root: Path) -> CacheLaunch:  # fmt: skip
    """One launch, timed; its shares from its manifest, or its error (never a raise)."""
    cmd = cache_command([*common, "--output", str(out), "--teacher-shard", placement], ranks)
    env = child_env(config.malloc_mmap_threshold, config.num_threads or 1)
    started = time.perf_counter()
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=config.run_timeout_s)
        failed = None if done.returncode == 0 else f"exit {done.returncode}: {done.stderr[-2000:]}"
    except subprocess.TimeoutExpired:
        failed = f"timed out after {config.run_timeout_s:g} s"
    wall = time.perf_counter() - started
    command = " ".join(cmd[1:]).replace(str(root) + "/", "")
    if failed is not None:
        return CacheLaunch(name=name, ranks=ranks, teacher_shard=placement, command=command,
                           status="error", error=failed, wall_s=wall)  # fmt: skip
    manifest = json.loads((out / "manifest.json").read_text())
    shares = [
        CacheRankShare(
            rank=share["rank"],
            tokens=share["tokens"],
            seconds=share["seconds"],
            tokens_per_s=share["tokens"] / max(share["seconds"], 1e-9),
            peak_bytes=int(share["peak_memory_gb"] * GiB),
            teacher_parameters=share["teacher_parameters"],
        )
        for share in manifest["ranks"]
    ]
    return CacheLaunch(name=name, ranks=ranks, teacher_shard=manifest["teacher_shard"], command=command,
                       status="ok", error=None, wall_s=wall,
                       tokens_per_s_total=manifest["stats"]["tokens_per_s"], shares=shares)  # fmt: skip


def run_cache_ranks(config: BenchConfig, ranks: int, directory: Path) -> CacheRanks:
    """The multi-rank cache row: one process, then ``ranks`` ranks replicated and FSDP2-sharded, in
    ``directory`` (see the module docstring); each launch's ratios to the one process's."""
    from llm_neo.commands.shapes import get_shape
    from llm_neo.models.loading import resolve_device, resolve_dtype
    from llm_neo.models.tiny import build_word_tokenizer, save_model

    shape = get_shape(config.shape)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    batch = config.batch_size or shape.batch_size
    seq = config.seq_len or shape.seq_len
    torch.manual_seed(config.seed)
    model = build_model(shape.teacher, dtype, device)
    teacher = save_model(model, build_word_tokenizer(shape.teacher.vocab_size), directory / "teacher")
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the launches need the memory, not this process
    records = RECORDS_PER_BATCH * batch
    data = directory / "cache-data.jsonl"
    write_token_records(data, records=records, seq_len=seq, vocab_size=shape.teacher.vocab_size, seed=0)
    common = ["--teacher", str(teacher), "--data", str(data), "--device", config.device, "--dtype",
              config.dtype, "--batch-size", str(batch), "--shard-size", str(batch), "--top-k",
              str(CACHE_TOP_K), "--max-length", str(seq)]  # fmt: skip
    launches: list[tuple[CacheLaunch, Path]] = []
    for name, n, placement in (("1 process", 1, "auto"), (f"{ranks} ranks, replicated", ranks, "replicate"),
                               (f"{ranks} ranks, FSDP2-sharded", ranks, "fsdp")):  # fmt: skip
        out = directory / f"cache-{n}-{placement}"
        launches.append((_launch(name, n, placement, common, out, config, directory), out))
    one, one_out = launches[0]
    for launch, out in launches[1:]:
        if launch.status == "ok" and one.status == "ok":
            launch.speed_vs_one = ratio(launch.tokens_per_s_total, one.tokens_per_s_total)
            launch.peak_vs_one = ratio(max(s.peak_bytes for s in launch.shares), one.shares[0].peak_bytes)
            launch.same_cache = same_cache(out, one_out)
    return CacheRanks(
        ranks=ranks,
        records=records,
        seq_len=seq,
        batch_size=batch,
        top_k=CACHE_TOP_K,
        threads_per_process=(config.num_threads or 1) if device.type == "cpu" else None,
        launches=[launch for launch, _ in launches],
    )


def cache_ranks_row(config: BenchConfig, directory: Path | None) -> CacheRanks | None:
    """Nothing without ``--cache-ranks``; else ``run_cache_ranks`` in ``directory`` (a temporary one when
    None, removed afterwards)."""
    import tempfile

    if not config.cache_ranks:
        return None
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
        return run_cache_ranks(config, config.cache_ranks, directory)
    with tempfile.TemporaryDirectory(prefix="llm-neo-cache-ranks-") as tmp:
        return run_cache_ranks(config, config.cache_ranks, Path(tmp))
