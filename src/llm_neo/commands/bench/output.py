"""The bench's Markdown report, written as ``report.document`` blocks from its record (LABEL.json)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llm_neo.commands.bench.runs import ratio
from llm_neo.commands.bench.whole import SAMPLE_INTERVAL_S, WHOLE_PHASES
from llm_neo.records.bench import (
    BenchReport,
    FailedWholeRun,
    PeakKind,
    StepRun,
    TargetResult,
    WholeRun,
)
from llm_neo.report.document import Block, Bullets, Heading, Paragraph, Table, to_markdown
from llm_neo.report.tables import format_gib
from llm_neo.runtime.memory import GiB


def _gib(nbytes: int | None) -> str:
    return format_gib(nbytes / GiB if nbytes else None)  # 0 bytes: not measured


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


_PEAK_KINDS = {
    PeakKind.CUDA_MAX_ALLOCATED: "torch.cuda.max_memory_allocated (GiB)",
    PeakKind.PROCESS_MAX_RSS: "peak RSS of the run's own process (GiB), incl. Python/torch/transformers",
    PeakKind.LIVE_TENSOR_BYTES: "peak live tensor bytes (GiB), counted op by op in this process",
}


def _table(rows: list[tuple[str, list[str]]], columns: list[str]) -> Table:
    """A table of pre-formatted cells, one row per run (a run's name is its row's name; a repeated one,
    as ``neo:plain`` and ``neo:plain:16`` both are "neo plain", gets its position so no row is lost)."""
    named: dict[str, dict[str, Any]] = {}
    for i, (name, cells) in enumerate(rows):
        named[name if name not in named else f"{name} ({i + 1})"] = dict(zip(columns, cells, strict=True))
    return Table(named, columns)


def format_report(report: BenchReport) -> str:
    """The Markdown report: settings, one table row per run, the quantized and whole runs, the targets."""
    s, v = report.settings, report.versions
    kind = _PEAK_KINDS[report.peak_kind] if report.peak_kind else "peak (GiB)"
    mlp_chunks = s.mlp_chunks or 1
    bullets = [
        f"device: {report.device}",
        f"torch {v.torch}, transformers {v.transformers}, peft {v.peft}, llm-neo {v.llm_neo}"
        + (f" (commit {_short(report.git_commit)})" if report.git_commit else ""),
        f"date: {report.date}",
        f"shape: {s.shape}: {s.description}",
        f"batch {s.batch_size} × {s.seq_len} tokens (every token but each sequence's first is a "
        f"target), compute dtype {s.dtype}, gradient checkpointing "
        f"{'on' if s.gradient_checkpointing else 'off'}"
        + (f" (MLP in {mlp_chunks} chunks)" if mlp_chunks > 1 else "")
        + f", LoRA r={s.lora_r} on every linear of every block, loss {1 - s.kd_ratio:g}·CE + "
        f"{s.kd_ratio:g}·forward KL, chunk {s.loss_chunk_size} tokens",
        f"steps per run: {s.warmup_steps} warm-up + {s.steps} timed (AdamW); "
        f"{s.num_threads} CPU thread(s); "
        f"{'each run in a fresh process' if s.isolate else 'all runs in one process'}"
        + (
            f" with MALLOC_MMAP_THRESHOLD_={s.malloc_mmap_threshold}"
            if s.malloc_mmap_threshold and s.device_type == "cpu"
            else f" with llm-neo's CPU allocator policy ({s.cpu_mmap_threshold // 2**20} MiB mmap threshold)"
            if s.cpu_mmap_threshold and s.isolate
            else ""
        ),
        f"peak memory: {kind}; plan: `llm-neo plan`'s estimate for the same settings",
    ]
    load = report.load_average
    if s.device_type == "cpu" and load.start is not None:
        bullets.append(
            f"machine load (1-minute average) at start / end: {load.start} / {load.end} on "
            f"{load.cpus} CPUs (other processes slow CPU timings down; memory is unaffected)"
        )
    blocks: list[Block] = [Heading(1, f"llm-neo bench: {s.shape}"), Bullets(tuple(bullets))]
    blocks.append(
        _table(
            [(r.name, _step_cells(r)) for r in report.results],
            ["peak GiB", "plan GiB", "plan error", "tokens/s", "step s", "memory vs KD", "speed vs KD",
             "status"],
        )
    )  # fmt: skip
    rss = s.device_type == "cpu" and report.peak_kind == PeakKind.PROCESS_MAX_RSS
    if rss and s.cpu_mmap_threshold:
        blocks.append(
            Paragraph(
                "On a CPU, each run's process (as llm-neo distill) serves blocks of "
                f"{s.cpu_mmap_threshold // 2**20} MiB or more with mmap, so the chunked loss's freed "
                "chunks go back to the system; smaller freed blocks stay in glibc's heap and count in the "
                "RSS. `--malloc-mmap-threshold 1048576` measures nearer the live tensors (docs/memory.md)."
            )
        )
    elif rss and not s.malloc_mmap_threshold:  # results from before the allocator policy
        blocks.append(
            Paragraph(
                "On a CPU, glibc keeps freed blocks below its adaptive mmap threshold (up to 32 MiB) "
                "mapped, so a run whose large tensors are under 32 MiB (e.g. chunks of 256 tokens × "
                "32,000 fp32 = 31 MiB) shows more RSS than the tensors it holds; "
                "`--malloc-mmap-threshold 1048576` measures without that effect (docs/memory.md)."
            )
        )
    blocks += _cross_blocks(report.results)
    blocks += _quantization_blocks(report.results, "step peak")
    blocks += _whole_run_blocks(report)
    blocks += _peer_blocks(report)
    blocks += _cache_rank_blocks(report)
    blocks += _on_policy_blocks(report)
    blocks += [Heading(2, "Targets"), Bullets(tuple(_target_line(t) for t in report.targets))]
    return to_markdown(blocks, {})


def _step_cells(r: StepRun) -> list[str]:
    err = r.plan_error_pct
    return [
        _gib(r.peak_bytes if r.status == "ok" else None),
        _gib(r.plan_bytes),
        f"{err:+.0f}%" if err is not None else "",
        _fmt(r.tokens_per_s, 0),
        _fmt(r.step_s, 3),
        _fmt(r.memory_vs_kd),
        _fmt(r.speed_vs_kd),
        r.status + (f": {r.error}" if r.error else ""),
    ]


def _cross_blocks(rows: Sequence[StepRun]) -> list[Block]:
    """The cross-tokenizer rows against the same arm with one tokenizer (the teacher at the student's
    vocabulary), with the teacher's length and the positions KD was taken on."""
    cross = [r for r in rows if r.spec.get("cross_tokenizer")]
    if not cross:
        return []
    return [
        Heading(2, "Across tokenizers"),
        Paragraph(
            "Each row against the same arm with one tokenizer in this bench (the teacher at the student's "
            "vocabulary, random tokens): the teacher reads its own tokens of the same text and its top-k "
            "is taken chunk by chunk over its whole vocabulary."
        ),
        _table(
            [
                (
                    r.name,
                    [
                        str(r.teacher_seq_len or ""),
                        f"{r.kd_positions} / {r.spec['batch_size'] * (r.spec['seq_len'] - 1)}"
                        if r.kd_positions is not None
                        else "",
                        _fmt(r.memory_vs_same_tokenizer),
                        _fmt(r.speed_vs_same_tokenizer),
                    ],
                )
                for r in cross
            ],
            [
                "teacher tokens per sequence",
                "KD positions",
                "memory vs one tokenizer",
                "speed vs one tokenizer",
            ],
        ),
    ]


def _target_line(t: TargetResult) -> str:
    where = t.set_for
    note = (
        ""
        if t.applies
        else f" (set for {where['shape']} at {where['batch_size']} × {where['seq_len']}"
        f"{', gradient checkpointing' if where['gradient_checkpointing'] else ''}; shown for reference)"
    )
    value = "not run (or failed)" if t.value is None else f"measured {t.value:.3f}"
    return f"{t.result.value}: {t.target}: {value}{note}"


def _mib(nbytes: int | None) -> str:
    return "" if nbytes is None else f"{nbytes / 2**20:.4g}"


def _quantization_blocks(rows: Sequence[StepRun | WholeRun], what: str) -> list[Block]:
    """The quantized rows: weight bytes before/after as quantize_teacher counted them, the plan's, and
    how much the peak fell against the same run with the teacher unquantized."""
    quantized = [r for r in rows if r.teacher_quant or r.student_quant]
    if not quantized:
        return []

    def weights(info: dict[str, Any] | None) -> str:
        if not info:
            return ""
        if info.get("weight_bytes_before") is None:  # a whole run's QLoRA base: its bytes with the adapters
            return f"{info['kind']}: {_mib(info.get('weight_bytes'))}"
        return f"{info['kind']}: {_mib(info['weight_bytes_before'])} → {_mib(info['weight_bytes_after'])}"

    def cells(r: StepRun | WholeRun) -> list[str]:
        cut, saved = r.peak_cut_bytes, r.teacher_saved_bytes
        step = r if isinstance(r, StepRun) else None  # the plan's bytes: step rows only
        peak = r.peak_bytes if isinstance(r, StepRun) else r.process_peak_bytes
        return [
            weights(r.teacher_quant),
            _mib(saved),
            _mib(step.plan_teacher_weight_bytes if step else None),
            weights(r.student_quant),
            _mib(r.student_saved_bytes),
            _mib(step.plan_student_weight_bytes if step else None),
            _mib(peak if r.status == "ok" else None),
            "" if cut is None else f"{cut / 2**20:+.4g}",
            _fmt(ratio(cut, saved)),
        ]

    # A Table's columns are keys: the student base's "saved" is "base saved" (the one renamed column).
    columns = ["teacher weights", "saved", "plan teacher", "student base", "base saved", "plan student",
               what, "cut vs unquantized teacher", "cut ÷ saved"]  # fmt: skip
    return [
        Paragraph(f"Quantized rows ({what}s; weights as quantize_teacher counts their storage; MiB):"),
        _table([(r.name, cells(r)) for r in quantized], columns),
    ]


def _whole_run_blocks(report: BenchReport) -> list[Block]:
    """The whole `llm-neo distill` runs: their process peaks against their training-step peaks, and the
    phase that set each peak."""
    whole, inputs = report.whole_runs, report.whole_inputs
    if not whole:
        return []
    s = report.settings
    mmap = s.malloc_mmap_threshold
    records, heldout, max_steps = (
        (inputs.records, inputs.heldout_records, inputs.max_steps) if inputs else (None, None, None)
    )
    about = (
        "Each row is one `python -m llm_neo distill` process (the command is in the JSON) on the same "
        "random models, saved once as safetensors with a word-level tokenizer of exactly the vocabulary, "
        f"and {records} text records of exactly {s.seq_len} tokens: {max_steps} optimizer steps of "
        f"{s.batch_size} × {s.seq_len} (--grad-accum 1), then the merge check, the save and the held-out "
        f"evaluation of {heldout} records (one batch). **process peak**: the process's peak RSS, "
        "`os.wait4`'s ru_maxrss (it was started from a launcher of a few MiB, so nothing larger is "
        "inherited). **training peak**: its summary.json's `peak_memory_gb`, which on a CPU is the "
        "process's VmHWM read right after the last optimizer step (loading and every step included; the "
        "merge check, save and held-out eval not yet). **peak set in**: the phase in which the sampled "
        "VmHWM reached its maximum. glibc "
        + (
            f"MALLOC_MMAP_THRESHOLD_={mmap}"
            if mmap
            else f"malloc with llm-neo's CPU policy (mmap threshold {s.cpu_mmap_threshold // 2**20} MiB)"
            if s.cpu_mmap_threshold
            else "default malloc (adaptive mmap threshold)"
        )
        + (f", {s.num_threads} thread(s)" if s.num_threads else "")
        + "."
    )
    columns = ["process peak GiB", "training peak GiB", "process ÷ training", "peak set in",
               "step-bench peak GiB", "wall s", "train s", "memory vs whole KD", "status"]  # fmt: skip
    done = [r for r in whole if isinstance(r, WholeRun)]
    return [
        Heading(2, "Whole runs"),
        Paragraph(about),
        _table([(r.name, _whole_cells(r)) for r in whole], columns),
        Paragraph(
            "Largest sampled RSS in each phase (GiB; sampled every "
            f"{SAMPLE_INTERVAL_S * 1000:.0f} ms, so a lower bound of the phase's own peak; **bold**: the "
            "phase that set the process peak):"
        ),
        _table([(r.name, _phase_cells(r)) for r in done], list(WHOLE_PHASES)),
        *_quantization_blocks(done, "process peak"),
    ]


def _whole_cells(r: WholeRun | FailedWholeRun) -> list[str]:
    if isinstance(r, FailedWholeRun):
        measured = [""] * 4 + [_gib(r.step_peak_bytes), "", ""]
        return [*measured, _fmt(r.memory_vs_kd), f"{r.status}: {r.error}" if r.error else r.status]
    return [
        _gib(r.process_peak_bytes),
        _gib(r.training_peak_bytes),
        _fmt(r.process_to_training, 3),
        r.peak_phase or "",
        _gib(r.step_peak_bytes),
        _fmt(r.wall_s, 1),
        _fmt(r.train_time_s, 1),
        _fmt(r.memory_vs_kd),
        r.status,
    ]


def _phase_cells(r: WholeRun) -> list[str]:
    """Each phase's largest sampled RSS, in bold for the phase that set the peak ("–": not seen)."""
    by_name = {ph.phase: ph for ph in r.phases}
    cells = []
    for name in WHOLE_PHASES:
        ph = by_name.get(name)
        value = _gib(ph.max_rss_bytes) if ph else "–"
        cells.append(f"**{value}**" if ph and name == r.peak_phase else value)
    return cells


def _peer_blocks(report: BenchReport) -> list[Block]:
    """The peers beside llm-neo's whole runs, the ratios (llm-neo ÷ peer) and the step-1 loss check."""
    from llm_neo.commands.bench.peers import SETTINGS_NOTE

    if report.peers is None:
        return []
    whole = {r.name: r for r in report.whole_runs if isinstance(r, WholeRun)}
    columns = ["process peak GiB", "CPU s (user + sys)", "s/step", "wall s", "step-1 loss", "vs",
               "peak: llm-neo ÷ peer", "CPU s: llm-neo ÷ peer", "s/step: llm-neo ÷ peer",
               "status"]  # fmt: skip
    rows: list[tuple[str, list[str]]] = []
    for name in dict.fromkeys(p.versus for p in report.peers):
        ours = whole.get(name)
        if ours is not None:
            rows.append(
                (f"llm-neo {name}", [_gib(ours.process_peak_bytes), _cpu(ours.cpu_user_s, ours.cpu_system_s),
                 _fmt(ours.step_s), _fmt(ours.wall_s, 1), "", "", "", "", "", ours.status])
            )  # fmt: skip
    for p in report.peers:
        status = p.status if p.status == "ok" else f"{p.status}: {p.error}"
        rows.append(
            (p.name, [_gib(p.process_peak_bytes), _cpu(p.cpu_user_s, p.cpu_system_s), _fmt(p.step_s),
             _fmt(p.wall_s, 1), _fmt(p.losses[0], 6) if p.losses else "", p.versus, _fmt(p.memory_ratio),
             _fmt(p.cpu_ratio), _fmt(p.step_ratio), status])
        )  # fmt: skip
    blocks: list[Block] = [
        Heading(2, "Peers, side by side"),
        Paragraph(
            SETTINGS_NOTE
            + " Same saved models, data, micro-batches and order as the whole runs; each row one process "
            "from the same launcher (peak RSS and CPU seconds from `os.wait4`); s/step: the median of the "
            "timed steps. Ratios below 1: llm-neo uses less. On a shared machine the ratios within one run "
            "are what count, not the absolute seconds."
        ),
        _table(rows, columns),
    ]
    check = report.peer_loss_check
    if check is not None:
        verdict = {True: "PASS", False: "FAIL", None: "n/a"}[check.passed]
        worst = _fmt(check.max_rel_diff, 9) if check.max_rel_diff is not None else "n/a"
        losses = ", ".join(f"{name} {loss:.8g}" for name, loss in check.peer_losses.items())
        blocks.append(
            Paragraph(
                f"Loss check (step 1, before any update: the weights and the first batch alone): "
                f"`llm-neo distill --method kd --kd-ratio 1` {_fmt(check.llm_neo_loss, 8)}; {losses}; "
                f"largest relative difference {worst} against a tolerance of {check.rtol:g}: **{verdict}**"
                + (f" ({check.error})" if check.error else "")
                + "."
            )
        )
    return blocks


def _cache_rank_blocks(report: BenchReport) -> list[Block]:
    """The multi-rank cache row (--cache-ranks): per launch and rank, tokens/s and peak, and the ratios."""
    c = report.cache_ranks
    if c is None:
        return []
    columns = ["tokens", "tokens/s (rank)", "tokens/s (all ranks)", "peak GiB", "teacher params held",
               "tokens/s vs 1 process", "peak vs 1 process", "same cache", "status"]  # fmt: skip
    rows: list[tuple[str, list[str]]] = []
    for launch in c.launches:
        same = {True: "yes", False: "NO", None: ""}[launch.same_cache]
        if launch.status != "ok":
            rows.append(
                (launch.name, ["", "", "", "", "", "", "", "", "", f"{launch.status}: {launch.error}"])
            )
        for share in launch.shares:
            rows.append(
                (f"{launch.name}, rank {share.rank}", [str(share.tokens),
                 _fmt(share.tokens_per_s, 1), _fmt(launch.tokens_per_s_total, 1), _gib(share.peak_bytes),
                 f"{share.teacher_parameters:,}", _fmt(launch.speed_vs_one), _fmt(launch.peak_vs_one), same,
                 launch.status])
            )  # fmt: skip
    threads = f"{c.threads_per_process} intra-op thread(s) per process; " if c.threads_per_process else ""
    return [
        Heading(2, f"Teacher cache on 1 process and on {c.ranks} ranks"),
        Paragraph(
            f"`llm-neo cache-teacher` of the shape's random teacher over {c.records} records of {c.seq_len} "
            f"tokens, top-{c.top_k}, micro-batches of {c.batch_size}: one process, then {c.ranks} ranks "
            f"under torchrun with the teacher replicated and FSDP2-sharded; {threads}figures from each "
            "launch's manifest (a rank's seconds are its teacher work; all ranks' tokens/s: their tokens "
            "over the slowest rank's seconds). Same cache: the same key and top-k ids as the one process's."
        ),
        _table(rows, columns),
    ]


def _on_policy_blocks(report: BenchReport) -> list[Block]:
    """On-policy Neo's rows beside off-policy Neo on the same prompt records (``--on-policy``)."""
    if report.on_policy is None:
        return []
    columns = ["s/step", "vs off-policy Neo", "generating", "generated tokens/s", "mean length (cap)",
               "capped", "cache-teacher s (generating)", "process peak GiB", "status"]  # fmt: skip
    rows: list[tuple[str, list[str]]] = []
    for r in report.on_policy:
        length = f"{r.mean_generated_length:.1f} ({r.max_new_tokens})" if r.mean_generated_length else ""
        cache = (
            f"{r.cache_wall_s:.1f} ({_fmt(r.cache_generation_s, 1)})" if r.cache_wall_s is not None else ""
        )
        rows.append(
            (r.name, [_fmt(r.step_s), _fmt(r.step_ratio), _share(r.generation_share),
             _fmt(r.generated_tokens_per_s, 1), length, _share(r.capped_share), cache,
             _gib(r.process_peak_bytes), r.status if r.status == "ok" else f"{r.status}: {r.error}"])
        )  # fmt: skip
    return [
        Heading(2, "On-policy Neo (λ = 1), beside off-policy Neo"),
        Paragraph(
            "Whole `llm-neo distill` runs of neo:chunked on prompt/completion records of the same shape "
            "(the completion, about half the tokens, is trained and is what the student answers, capped at "
            "its length), the same saved models: off-policy (the baseline of the ratio), online on-policy "
            "(the student samples every micro-batch as it trains), and cached (`cache-teacher "
            "--student-samples` first, timed on its row; training reads the samples and the teacher's top-k, "
            "on-policy to the initial student). s/step: the median of the timed steps; generating: the "
            "share of the training time spent sampling (the cached row's generated tokens/s: "
            "cache-teacher's, while it sampled). A random student seldom says end of turn, so most samples "
            "run to the cap: near the cost's worst case."
        ),
        _table(rows, columns),
    ]


def _share(value: float | None) -> str:
    return f"{value:.0%}" if value is not None else ""


def _cpu(user: float | None, system: float | None) -> str:
    if user is None or system is None:
        return ""
    return f"{user + system:.1f} ({user:.1f} + {system:.1f})"


def _short(commit: str) -> str:
    head, _, rest = commit.partition("+")
    return head[:10] + (f"+{rest}" if rest else "")
