"""The bench's Markdown report."""

from __future__ import annotations

from typing import Any

from llm_neo.commands.bench.runs import GiB, ratio
from llm_neo.commands.bench.whole import SAMPLE_INTERVAL_S, WHOLE_PHASES


def _gib(nbytes: int | None) -> str:
    if not nbytes:
        return ""
    value = nbytes / GiB
    return f"{value:.2f}" if value >= 0.995 else f"{value:.3g}"


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_report(report: dict[str, Any]) -> str:
    """The Markdown report: settings, one table row per run, the targets."""
    s = report["settings"]
    kind = {
        "cuda_max_allocated": "torch.cuda.max_memory_allocated (GiB)",
        "process_max_rss": "peak RSS of the run's own process (GiB), incl. Python/torch/transformers",
        "live_tensor_bytes": "peak live tensor bytes (GiB), counted op by op in this process",
    }.get(report.get("peak_kind", ""), "peak (GiB)")
    lines = [
        f"# llm-neo bench: {s['shape']}",
        "",
        f"- device: {report['device']}",
        f"- torch {report['versions']['torch']}, transformers {report['versions']['transformers']}, "
        f"peft {report['versions']['peft']}, llm-neo {report['versions']['llm_neo']}"
        + (f" (commit {_short(report['git_commit'])})" if report.get("git_commit") else ""),
        f"- date: {report['date']}",
        f"- shape: {s['shape']}: {s['description']}",
        f"- batch {s['batch_size']} × {s['seq_len']} tokens (every token but each sequence's first is a "
        f"target), compute dtype {s['dtype']}, gradient checkpointing "
        f"{'on' if s['gradient_checkpointing'] else 'off'}"
        + (f" (MLP in {s['mlp_chunks']} chunks)" if s.get("mlp_chunks", 1) > 1 else "")
        + f", LoRA r={s['lora_r']} on every linear of every block, loss {1 - s['kd_ratio']:g}·CE + "
        f"{s['kd_ratio']:g}·forward KL, chunk {s['loss_chunk_size']} tokens",
        f"- steps per run: {s['warmup_steps']} warm-up + {s['steps']} timed (AdamW); "
        f"{s['num_threads']} CPU thread(s); "
        f"{'each run in a fresh process' if s['isolate'] else 'all runs in one process'}"
        + (
            f" with MALLOC_MMAP_THRESHOLD_={s['malloc_mmap_threshold']}"
            if s.get("malloc_mmap_threshold") and s["device_type"] == "cpu"
            else ""
        ),
        f"- peak memory: {kind}; plan: `llm-neo plan`'s estimate for the same settings",
    ]
    load = report.get("load_average") or {}
    if s["device_type"] == "cpu" and load.get("start") is not None:
        lines.append(
            f"- machine load (1-minute average) at start / end: {load['start']} / {load['end']} on "
            f"{load['cpus']} CPUs (other processes slow CPU timings down; memory is unaffected)"
        )
    lines += [
        "",
        "| run | peak GiB | plan GiB | plan error | tokens/s | step s | memory vs KD | speed vs KD "
        "| status |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        peak = r.get("peak_bytes") if r.get("status") == "ok" else None
        err = r.get("plan_error_pct")
        lines.append(
            "| "
            + " | ".join(
                [
                    r["name"],
                    _gib(peak),
                    _gib(r.get("plan_bytes")),
                    f"{err:+.0f}%" if err is not None else "",
                    _fmt(r.get("tokens_per_s"), 0),
                    _fmt(r.get("step_s"), 3),
                    _fmt(r.get("memory_vs_kd")),
                    _fmt(r.get("speed_vs_kd")),
                    r.get("status", "") + (f": {r['error']}" if r.get("error") else ""),
                ]
            )
            + " |"
        )
    rss = s["device_type"] == "cpu" and report.get("peak_kind") == "process_max_rss"
    if rss and not s.get("malloc_mmap_threshold"):
        lines += [
            "",
            "On a CPU, glibc keeps freed blocks below its adaptive mmap threshold (up to 32 MiB) mapped, so "
            "a run whose large tensors are under 32 MiB (e.g. chunks of 256 tokens × 32,000 fp32 = 31 MiB) "
            "shows more RSS than the tensors it holds; `--malloc-mmap-threshold 1048576` measures without "
            "that effect (docs/memory.md).",
        ]
    lines += _quantization_lines(report["results"], "peak_bytes", "step peak")
    lines += _whole_run_lines(report)
    lines += ["", "## Targets", ""]
    for t in report["targets"]:
        where = t["set_for"]
        note = (
            ""
            if t["applies"]
            else f" (set for {where['shape']} at {where['batch_size']} × {where['seq_len']}"
            f"{', gradient checkpointing' if where['gradient_checkpointing'] else ''}; shown for reference)"
        )
        value = "not run (or failed)" if t["value"] is None else f"measured {t['value']:.3f}"
        lines.append(f"- {t['result']}: {t['target']}: {value}{note}")
    return "\n".join(lines) + "\n"


def _mib(nbytes: int | None) -> str:
    return "" if nbytes is None else f"{nbytes / 2**20:.4g}"


def _quantization_lines(rows: list[dict[str, Any]], metric: str, what: str) -> list[str]:
    """The quantized rows: weight bytes before/after as quantize_teacher counted them, the plan's, and
    how much the peak fell against the same run with the teacher unquantized."""
    quantized = [r for r in rows if r.get("teacher_quant") or r.get("student_quant")]
    if not quantized:
        return []

    def weights(info: dict[str, Any] | None) -> str:
        if not info:
            return ""
        if info.get("weight_bytes_before") is None:  # a whole run's QLoRA base: its bytes with the adapters
            return f"{info['kind']}: {_mib(info.get('weight_bytes'))}"
        return f"{info['kind']}: {_mib(info['weight_bytes_before'])} → {_mib(info['weight_bytes_after'])}"

    lines = [
        "",
        f"Quantized rows ({what}s; weights as quantize_teacher counts their storage; MiB):",
        "",
        f"| run | teacher weights | saved | plan teacher | student base | saved | plan student | {what} "
        "| cut vs unquantized teacher | cut ÷ saved |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in quantized:
        cut, saved = r.get("peak_cut_bytes"), r.get("teacher_saved_bytes")
        lines.append(
            "| "
            + " | ".join(
                [
                    r["name"],
                    weights(r.get("teacher_quant")),
                    _mib(saved),
                    _mib(r.get("plan_teacher_weight_bytes")),
                    weights(r.get("student_quant")),
                    _mib(r.get("student_saved_bytes")),
                    _mib(r.get("plan_student_weight_bytes")),
                    _mib(r.get(metric) if r.get("status") == "ok" else None),
                    "" if cut is None else f"{cut / 2**20:+.4g}",
                    _fmt(ratio(cut, saved)),
                ]
            )
            + " |"
        )
    return lines


def _whole_run_lines(report: dict[str, Any]) -> list[str]:
    """The whole `llm-neo distill` runs: their process peaks against their training-step peaks, and the
    phase that set each peak."""
    whole, inputs = report.get("whole_runs") or [], report.get("whole_inputs") or {}
    if not whole:
        return []
    s = report["settings"]
    mmap = s.get("malloc_mmap_threshold")
    lines = [
        "",
        "## Whole runs",
        "",
        f"Each row is one `python -m llm_neo distill` process (the command is in the JSON) on the same "
        "random "
        f"models, saved once as safetensors with a word-level tokenizer of exactly the vocabulary, and "
        f"{inputs.get('records')} text records of exactly {s['seq_len']} tokens: {inputs.get('max_steps')} "
        f"optimizer steps of {s['batch_size']} × {s['seq_len']} (--grad-accum 1), then the merge check, the "
        f"save and the held-out evaluation of {inputs.get('heldout_records')} records (one batch). "
        "**process peak**: the process's peak RSS, `os.wait4`'s ru_maxrss (it was started from a launcher "
        "of a "
        "few MiB, so nothing larger is inherited). **training peak**: its summary.json's `peak_memory_gb`, "
        "which on a CPU is the process's VmHWM read right after the last optimizer step (loading and every "
        "step included; the merge check, save and held-out eval not yet). **peak set in**: the phase in "
        "which the sampled VmHWM reached its maximum. glibc "
        + (f"MALLOC_MMAP_THRESHOLD_={mmap}" if mmap else "default malloc (adaptive mmap threshold)")
        + (f", {s['num_threads']} thread(s)" if s.get("num_threads") else "")
        + ".",
        "",
        "| run | process peak GiB | training peak GiB | process ÷ training | peak set in "
        "| step-bench peak GiB "
        "| wall s | train s | memory vs whole KD | status |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in whole:
        ok = r.get("status") == "ok"
        lines.append(
            "| "
            + " | ".join(
                [
                    r["name"],
                    _gib(r.get("process_peak_bytes") if ok else None),
                    _gib(r.get("training_peak_bytes") if ok else None),
                    _fmt(r.get("process_to_training"), 3),
                    r.get("peak_phase") or "",
                    _gib(r.get("step_peak_bytes")),
                    _fmt(r.get("wall_s"), 1),
                    _fmt(r.get("train_time_s"), 1),
                    _fmt(r.get("memory_vs_kd")),
                    r.get("status", "") + (f": {r['error']}" if r.get("error") else ""),
                ]
            )
            + " |"
        )
    lines += [
        "",
        "Largest sampled RSS in each phase (GiB; sampled every "
        f"{SAMPLE_INTERVAL_S * 1000:.0f} ms, so a lower bound of the phase's own peak; **bold**: the phase "
        "that set the process peak):",
        "",
        "| run | " + " | ".join(WHOLE_PHASES) + " |",
        "|---|" + "---|" * len(WHOLE_PHASES),
    ]
    for r in whole:
        if r.get("status") != "ok":
            continue
        by_name = {ph["phase"]: ph for ph in r.get("phases", [])}
        cells = []
        for name in WHOLE_PHASES:
            ph = by_name.get(name)
            value = _gib(ph.get("max_rss_bytes")) if ph else "–"
            cells.append(f"**{value}**" if ph and name == r.get("peak_phase") else value)
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    lines += _quantization_lines(whole, "process_peak_bytes", "process peak")
    return lines


def _short(commit: str) -> str:
    head, _, rest = commit.partition("+")
    return head[:10] + (f"+{rest}" if rest else "")
