"""`llm-neo bench --on-policy`: on-policy Neo's whole runs beside off-policy Neo, in the same bench.

On-policy distillation needs prompts, which the whole runs' text records have none of, so these rows run
on their own records: prompt/completion records of exactly ``seq_len`` tokens (``<s>``, the prompt's words,
the completion's words, ``</s>``; the completion, about half, is what is trained and what the student
answers, capped at its length), beside the whole runs' saved models. Three `llm-neo distill` processes and
one `llm-neo cache-teacher`, each measured as a whole run is (``whole.launch``):

- ``neo`` off-policy on these records: the baseline of the ratios;
- ``neo+on-policy``: ``--on-policy 1``, the student samples every micro-batch as it trains (online);
- ``neo+on-policy (cached)``: ``cache-teacher --student-samples`` (the initial student's samples and the
  teacher's top-k on them, timed on its own row), then ``distill --on-policy 1 --teacher-cache``: no
  teacher, no generation while training (offline, on-policy to the initial student).

Each row gives the median seconds of the timed steps, their ratio to off-policy Neo's in this bench, and
from summary.json the share of step time spent generating, the generated tokens/s, the mean generated
length and the share of samples that hit the cap (a random student seldom says end of turn, so most of its
samples are capped: near the worst case of the cost).
"""

from __future__ import annotations

import json
import random
import shutil
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from llm_neo.commands.bench.isolate import child_env
from llm_neo.commands.bench.runs import BenchConfig, RunSpec, ratio
from llm_neo.commands.bench.whole import WholeInputs, launch, run_whole

ROWS = ("neo", "neo+on-policy", "neo+on-policy (cached)")


def write_prompt_records(path: Path, *, records: int, seq_len: int, vocab_size: int, seed: int) -> None:
    """``records`` prompt/completion lines that the shape's word tokenizer renders (``<s>`` + prompt +
    completion + ``</s>``) to exactly ``seq_len`` tokens: the completion ``(seq_len - 2) // 2`` words, the
    prompt the rest, each word drawn uniformly (seeded) from the non-special tokens."""
    from llm_neo.models.tiny import WORD_SPECIAL_TOKENS, word_token
    from llm_neo.runtime.atomic import atomic_write_text

    if seq_len < 4:
        raise ValueError(f"seq_len must be >= 4 (<s>, a prompt word, a completion word, </s>), got {seq_len}")
    rng = random.Random(seed)
    first = len(WORD_SPECIAL_TOKENS)
    answer = (seq_len - 2) // 2

    def words(n: int) -> str:
        return " ".join(word_token(rng.randrange(first, vocab_size)) for _ in range(n))

    lines = [
        json.dumps({"prompt": words(seq_len - 2 - answer), "completion": " " + words(answer)})
        for _ in range(records)
    ]
    atomic_write_text(path, "\n".join(lines) + "\n")


def cache_command(spec: RunSpec, inputs: WholeInputs, output: Path) -> list[str]:
    """The `llm-neo cache-teacher --student-samples` of the cached row: one sample per prompt, the
    teacher's default top-k, on the whole runs' device and dtype."""
    assert inputs.teacher is not None
    return [sys.executable, "-m", "llm_neo", "cache-teacher", "--teacher", str(inputs.teacher),
            "--student-samples", str(inputs.student), "--data", str(inputs.data), "--output", str(output),
            "--max-length", str(spec.seq_len), "--batch-size", str(spec.batch_size),
            "--device", spec.device, "--dtype", spec.dtype]  # fmt: skip


def _cost(row: dict[str, Any]) -> dict[str, Any]:
    """The generation cost of a finished run's summary.json ``on_policy`` (none off-policy)."""
    found = row.pop("on_policy", None) or {}
    keys = ("generation_share", "generated_tokens_per_s", "mean_generated_length", "capped_share")
    return {k: found.get(k) for k in keys} | {"max_new_tokens": found.get("max_new_tokens")}


def run_on_policy(
    config: BenchConfig, specs: list[RunSpec], inputs: WholeInputs, directory: Path
) -> list[dict[str, Any]]:
    """The three rows (``ROWS``) on the whole run neo:chunked of ``specs``, with the saved models of
    ``inputs`` and prompt records of their own in ``directory``; each row's ratio to off-policy Neo."""
    spec = next(s for s in specs if (s.arm, s.impl) == ("neo", "chunked"))
    root = directory / "on-policy"
    if root.exists():
        shutil.rmtree(root)  # an earlier bench's: distill and cache-teacher refuse a used output
    root.mkdir(parents=True)
    data = root / "prompts.jsonl"
    write_prompt_records(
        data, records=inputs.records, seq_len=spec.seq_len, vocab_size=_vocab(spec), seed=spec.seed
    )
    prompts = replace(inputs, data=data)
    timeout, threshold = config.run_timeout_s, config.malloc_mmap_threshold
    rows: list[dict[str, Any]] = []
    for name, on_policy in ((ROWS[0], False), (ROWS[1], True)):
        found = run_whole(spec, prompts, root / name, timeout=timeout, malloc_mmap_threshold=threshold,
                          on_policy=on_policy)  # fmt: skip
        rows.append(found | {"name": name} | _cost(found))
    cache = root / "cache"
    env = child_env(threshold, spec.num_threads)
    seen = launch(cache_command(spec, prompts, cache), root / "cache-teacher", env, timeout=timeout)
    cached: dict[str, Any]
    if "status" in seen:
        cached = {"run": ROWS[2], "status": seen["status"], "error": f"cache-teacher: {seen['error']}"}
    else:
        manifest = json.loads((cache / "manifest.json").read_text())
        generating = manifest["stats"].get("generation_s")
        found = run_whole(spec, prompts, root / "cached", timeout=timeout, malloc_mmap_threshold=threshold,
                          on_policy=cache)  # fmt: skip
        cached = found | _cost(found)
        # Generated once, by cache-teacher: its rate there (the samples' tokens are the cached positions).
        cached["generated_tokens_per_s"] = ratio(manifest["num_positions"], generating)
        cached |= {"cache_wall_s": seen["end"] - seen["start"], "cache_generation_s": generating}
    rows.append(cached | {"name": ROWS[2]})
    base = rows[0].get("step_s") if rows[0].get("status") == "ok" else None
    for row in rows:
        row["step_ratio"] = ratio(row.get("step_s"), base) if row.get("status") == "ok" else None
    return [_record(row) for row in rows]


def _vocab(spec: RunSpec) -> int:
    from llm_neo.commands.shapes import get_shape

    return get_shape(spec.shape).student.vocab_size


def _record(row: dict[str, Any]) -> dict[str, Any]:
    """What an ``OnPolicyRun`` keeps of a row (the whole run's phases and memory details stay out)."""
    keys = ("name", "status", "error", "command", "step_s", "step_ratio", "wall_s", "train_time_s",
            "process_peak_bytes", "generation_share", "generated_tokens_per_s", "mean_generated_length",
            "capped_share", "max_new_tokens", "cache_wall_s", "cache_generation_s")  # fmt: skip
    return {k: row.get(k) for k in keys}
