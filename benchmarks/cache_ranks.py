"""`llm-neo cache-teacher` on 1 process and on 2 gloo ranks (teacher replicated, FSDP2-sharded), on CPU.

    python benchmarks/cache_ranks.py            # the committed figures (~2 min on 2 CPU cores)
    python benchmarks/cache_ranks.py --quick    # a smoke run (a few seconds of teacher work)

The ``cpu-wide`` shape's teacher (hidden 256, 4 layers, vocabulary 32,000; ``llm_neo.commands.shapes``),
random, saved with a word-level tokenizer of exactly its vocabulary; records of exactly 256 tokens
(``text``, so every token but the first is trained). Each launch is a real ``python -m llm_neo
cache-teacher`` (under ``torch.distributed.run`` for 2 ranks) with one intra-op thread per process, and
its numbers are the ones its manifest records: per rank the tokens it computed, its seconds (tokens/s),
its peak resident set and the teacher parameters it held; in total, tokens/s of all ranks together.
Writes ``benchmarks/results/cache_ranks.{json,md}``. The caches of the three launches must be equal
(same key, same top-k ids): checked, or the script fails.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from llm_neo.commands.bench import write_token_records
from llm_neo.commands.bench.step import build_model
from llm_neo.commands.shapes import get_shape
from llm_neo.models.tiny import build_word_tokenizer, save_model

RESULTS = Path(__file__).parent / "results"


def _launch(args: list[str], ranks: int) -> float:
    """Run ``llm-neo cache-teacher ARGS`` on ``ranks`` processes; its wall seconds."""
    if ranks == 1:
        cmd = [sys.executable, "-m", "llm_neo", "cache-teacher", *args]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}",
               f"--master-port={port}", "-m", "llm_neo", "cache-teacher", *args]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}")
    return time.perf_counter() - started


def _same_cache(a: Path, b: Path) -> None:
    ma, mb = (json.loads((c / "manifest.json").read_text()) for c in (a, b))
    assert ma["key_digest"] == mb["key_digest"], "the caches' keys differ"
    for shard in ma["shards"]:
        assert torch.equal(load_file(a / shard["file"])["ids"], load_file(b / shard["file"])["ids"]), shard


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="8 records instead of 64")
    args = parser.parse_args()
    shape = get_shape("cpu-wide")
    records = 8 if args.quick else 64
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        torch.manual_seed(0)
        teacher = save_model(
            build_model(shape.teacher, torch.float32, torch.device("cpu")),
            build_word_tokenizer(shape.teacher.vocab_size),
            root / "teacher",
        )
        data = root / "train.jsonl"
        write_token_records(
            data, records=records, seq_len=shape.seq_len, vocab_size=shape.teacher.vocab_size, seed=0
        )
        caches = {}
        for name, ranks, placement in (("1 process", 1, "auto"), ("2 ranks, replicated", 2, "replicate"),
                                       ("2 ranks, FSDP2-sharded", 2, "fsdp")):  # fmt: skip
            out = root / name.replace(" ", "").replace(",", "-")
            common = ["--teacher", str(teacher), "--data", str(data), "--output", str(out), "--device",
                      "cpu", "--batch-size", "8", "--shard-size", "8", "--top-k", "64",
                      "--teacher-shard", placement]  # fmt: skip
            wall = _launch(common, ranks)
            manifest = json.loads((out / "manifest.json").read_text())
            caches[name] = out
            rows.append({
                "launch": name,
                "wall_s": round(wall, 2),
                "tokens_per_s_total": round(manifest["stats"]["tokens_per_s"], 1),
                "ranks": [{
                    "rank": share["rank"],
                    "tokens": share["tokens"],
                    "tokens_per_s": round(share["tokens"] / share["seconds"], 1),
                    "peak_rss_gib": round(share["peak_memory_gb"], 3),
                    "teacher_parameters": share["teacher_parameters"],
                } for share in manifest["ranks"]],
            })  # fmt: skip
        for out in caches.values():
            _same_cache(out, caches["1 process"])
    result = {
        "shape": "cpu-wide teacher (hidden 256, 4 layers, vocabulary 32,000), records of 256 tokens, top-64",
        "records": records,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cache_ranks.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# cache-teacher on 1 process and on 2 gloo ranks (CPU)",
        "",
        f"{result['shape']}; {records} records; {result['machine']}; load average at the end "
        f"{result['load_average']}; torch {result['torch']}. One intra-op thread per process. Written by "
        "`benchmarks/cache_ranks.py`; the three caches are equal (same key, same top-k ids).",
        "",
        "| launch | rank | tokens | tokens/s (rank) | tokens/s (all ranks) | peak RSS GiB "
        "| teacher params held |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        for share in row["ranks"]:
            lines.append(
                f"| {row['launch']} | {share['rank']} | {share['tokens']} | {share['tokens_per_s']} | "
                f"{row['tokens_per_s_total']} | {share['peak_rss_gib']} | {share['teacher_parameters']:,} |"
            )
    (RESULTS / "cache_ranks.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
