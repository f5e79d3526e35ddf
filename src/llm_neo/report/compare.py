"""The comparison's report: ``report.md`` (with PNGs in plots/) and ``report.html`` (one self-contained
file, plots inline), both rendered from the same blocks and from ``results.json`` alone.

The verdict comes first, in three lines: what each arm scored, whether Neo's differences to the other
arms are real at the number of seeds run, and what each arm cost beside Neo. Then the tables behind
them, the paper's claims checked against the measurements (a claim the numbers do not support is said to
be not held), the cost projection with its assumptions, and the plots.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llm_neo.choices import ON_POLICY_DIVERGENCE, ON_POLICY_VARIANT
from llm_neo.eval.metrics import small_heldout
from llm_neo.records.compare import (
    ArmGroup,
    CompareResults,
    Example,
    GroupStats,
    PairedDifference,
    Projection,
    Stats,
    Verdict,
)
from llm_neo.records.pair import pair_lines
from llm_neo.report.conditions import (
    CLAIMS,
    PAPER_ARMS,
    answers_of,
    claim_conditions,
    epochs_covered,
    leaders,
    load_note,
    no_learning,
    settings,
    share,
    teacher_cost_note,
)
from llm_neo.report.document import Block, Bullets, Heading, Image, Paragraph, Table, to_html, to_markdown
from llm_neo.report.power import budget_lines
from llm_neo.report.probe import plots as probe_plots
from llm_neo.report.probe import section_blocks
from llm_neo.report.stats import identical, in_words
from llm_neo.report.style import ARM_COLORS, REFERENCE_COLORS, arm_colors, label, marker
from llm_neo.report.tables import format_duration, format_gib, format_sig
from llm_neo.runtime.atomic import atomic_write_bytes, atomic_write_text
from llm_neo.summary import MemoryKind


def _line(arm: str) -> str:
    return "--" if "+" in arm else "-"


# ------------------------------------------------------------------------------------------------
# Numbers as text


def pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f}"


def mean_std(stats: Stats | None, scale: float = 1.0, digits: int = 1) -> str:
    if not stats:
        return ""
    if stats.n > 1:
        return f"{scale * stats.mean:.{digits}f} ± {scale * stats.std:.{digits}f}"
    return f"{scale * stats.mean:.{digits}f}"


def interval(diff: PairedDifference | None, scale: float = 1.0, digits: int = 1) -> str:
    if not diff:
        return ""
    if identical(diff):  # a zero-width interval: the seeds agreed, which is not a precise zero
        return f"identical on every seed ({scale * diff.mean:+.{digits}f})"
    text = f"{scale * diff.mean:+.{digits}f}"
    if diff.ci is not None:
        low, high = (scale * x for x in diff.ci)
        text += f" [{low:+.{digits}f}, {high:+.{digits}f}]"
    return text


def seconds(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.1f} s" if value < 10 else f"{value:.0f} s"


def _size(records: int | None) -> str:
    return "all" if records is None else f"{records:,}"


def _main_groups(results: CompareResults) -> list[ArmGroup]:
    """The groups of the largest data size (all the training data when there is no size axis)."""
    return [g for g in results.groups if g.records == results.data.sizes[-1]]


Memory = Callable[[GroupStats], Stats | None]  # which of an arm's peaks the report compares


def _memory(results: CompareResults) -> tuple[Memory, str]:
    """The peak that compares arms: live tensors (CUDA's max allocated; counted op by op on a CPU,
    where the process RSS also holds the runtime and allocator slack), and its name."""
    if all(g.stats.peak_tensor_memory_gb is not None for g in _main_groups(results)):
        return (lambda s: s.peak_tensor_memory_gb), "peak of live tensors"
    return (lambda s: s.peak_memory_gb), "peak memory"


def _train_time(stats: GroupStats) -> Stats | None:
    return stats.train_time_s


def _mean(stats: Stats | None) -> float | None:
    return None if stats is None else stats.mean


def _mean_or_inf(stats: Stats | None) -> float:
    """The mean, for ranking arms by it; an arm without the metric ranks last."""
    return float("inf") if stats is None else stats.mean


def _paired_at_largest(results: CompareResults) -> list[tuple[str, PairedDifference]]:
    """``(against, accuracy difference)`` of Neo's paired rows at the largest data size."""
    largest = results.data.sizes[-1]
    return [(p.against, p.accuracy) for p in results.paired if p.records == largest and p.accuracy]


# ------------------------------------------------------------------------------------------------
# The verdict and the conclusion, computed from the numbers


def _score_sentence(score: str) -> str:
    if score == "teacher":
        return (
            "Score: agreement of the greedy answers to the held-out prompts with the teacher's own greedy "
            "answers (`teacher`, after normalizing: a fidelity score; the teacher scores 100% by "
            "construction)."
        )
    return (
        "Score: the task score of greedy answers to the held-out prompts against their reference "
        f"responses (`{score}`)."
    )


def verdict(results: CompareResults) -> list[str]:
    """Three lines a manager can act on: scores, whether Neo's differences are real, what each cost; and
    first, when no arm learned the task, a line that says so and what to change."""
    groups = _main_groups(results)
    score = results.config["score"]
    models = results.models
    ranked = sorted(groups, key=lambda g: -g.stats.accuracy.mean)
    scores = ", ".join(f"{label(g.method)} {mean_std(g.stats.accuracy, 100)}" for g in ranked)
    refs = [
        f"the {name if name == 'teacher' else 'untrained student'} {pct(ev.accuracy)}"
        + (" (by construction)" if name == "teacher" and score == "teacher" else "")
        for name, ev in models.items()
    ]
    seeds = results.config["seeds"]
    lines = [line] if (line := no_learning(results, groups)) else []
    lines += [
        f"Task score ({score}, % of {models.student.total} held-out records, {seeds} seed(s)): {scores}"
        + (f"; {' and '.join(refs)}." if refs else ".")
    ]
    if paired := _paired_at_largest(results):
        parts = [f"vs {label(against)} {_difference(diff)}" for against, diff in paired]
        lines.append("Neo's paired difference: " + "; ".join(parts) + ".")
    else:
        lines.append("No paired differences: Neo was not among the arms.")
    cost = results.cost.arms
    memory_of, memory_name = _memory(results)
    costs = []
    for g in groups:
        arm = cost.get(g.method)
        memory = _mean(memory_of(g.stats))
        time_s = seconds(arm.train_time_s if arm else None)
        costs.append(f"{label(g.method)} {time_s}, {format_gib(memory)} GiB")
    loaded = f" ({note})" if (note := load_note(results)) else ""
    line = "Cost (training time" + loaded + ", " + memory_name + "): " + "; ".join(costs) + "."
    cheapest = min(groups, key=lambda g: cost[g.method].train_time_s if g.method in cost else float("inf"))
    smallest = min(groups, key=lambda g: _mean_or_inf(memory_of(g.stats)))
    line += f" Fastest: {label(cheapest.method)}; least memory: {label(smallest.method)}."
    lines.append(line)
    return lines


def _points(diff: PairedDifference) -> str:
    """A paired score difference in points: "+2.8 [-1.0, +6.6] points", "identical on every seed (+2.8
    points)"."""
    if identical(diff):
        return f"identical on every seed ({100 * diff.mean:+.1f} points)"
    return f"{interval(diff, 100)} points"


def _difference(diff: PairedDifference) -> str:
    """A paired score difference and its verdict in words, each said once."""
    if identical(diff):
        return f"{in_words(diff)} ({100 * diff.mean:+.1f} points)"
    return f"{_points(diff)}, {in_words(diff)}"


CLAIM_STATUS = {Verdict.A: "held", Verdict.B: "not held", Verdict.NEITHER: "not distinguishable"}


def claims(results: CompareResults) -> list[dict[str, str]]:
    """The paper's claims (``report.conditions.CLAIMS``) checked against this comparison: held, not held
    or not distinguishable when measured under the claim's conditions, else "measured under other
    conditions" with the difference named."""
    rows: list[dict[str, str]] = []
    groups = {g.method: g for g in _main_groups(results)}
    paired = dict(_paired_at_largest(results))
    memory_of, name = _memory(results)
    for claim in CLAIMS:
        differs = claim_conditions(results, claim)
        if claim.metric == "score":
            measured = [
                (
                    claim.text.format(arm=label(arm)),
                    _points(diff),
                    CLAIM_STATUS[diff.verdict],
                )
                for arm, diff in paired.items()
                if arm in PAPER_ARMS
            ]
        elif "neo" in groups and "kd" in groups:
            metric = memory_of if claim.metric == "memory" else _train_time
            neo, kd = metric(groups["neo"].stats), metric(groups["kd"].stats)
            if not (neo and kd and kd.mean):
                continue
            ratio = neo.mean / kd.mean
            text = f"{ratio:.2f}x KD's" + (f" {name}" if claim.metric == "memory" else "")
            if claim.metric == "memory" and (rss := _rss_ratio(groups)) and name != "peak memory":
                text += f" (process peak RSS: {rss:.2f}x)"
            if note := teacher_cost_note(results):
                text += f"; {note}"
            measured = [(claim.text, text, "held" if ratio <= 0.8 else "not held")]
        else:
            continue
        for text, value, status in measured:
            if differs:
                status = "measured under other conditions: " + "; ".join(differs)
            rows.append({"claim": text, "measured": value, "status": status})
    return rows


def _rss_ratio(groups: dict[str, ArmGroup]) -> float | None:
    """Neo's peak RSS over KD's, shown beside a live-tensor ratio (the two can differ a lot)."""
    kd = groups["kd"].stats.peak_memory_gb.mean
    return groups["neo"].stats.peak_memory_gb.mean / kd if kd else None


def conclusion(results: CompareResults) -> list[str]:
    """A short plain-language reading of the numbers (each sentence follows from a number above)."""
    out = []
    groups = _main_groups(results)
    teacher, student = results.models.teacher, results.models.student
    if teacher is not None:
        gap = teacher.accuracy - student.accuracy
        out.append(
            f"The teacher scores {pct(teacher.accuracy)}% and the untrained student "
            f"{pct(student.accuracy)}%: {100 * gap:.1f} points for training to recover."
        )
    if stuck := no_learning(results, groups):
        out.insert(0, stuck)
    out.append(_leaders_sentence(groups, results.config["seeds"]))
    real = _paired_at_largest(results)
    undecided = [label(against) for against, diff in real if diff.verdict is Verdict.NEITHER]
    if undecided:
        n = real[0][1].n
        out.append(
            f"Neo's difference to {', '.join(undecided)} is within the noise of {n} seed(s): "
            + ("training that moves the arms off the floor, then " if stuck else "")
            + "more seeds, more data or a task where the teacher's distribution carries more than the "
            "label would be needed to tell them apart."
        )
    if len(results.data.sizes) > 1:
        out.append(
            "The data-size table shows how each arm's score moves with the number of training records."
        )
    return out


def _leaders_sentence(groups: list[ArmGroup], seeds: int) -> str:
    """Who scored best, or that the arms are tied (no "highest mean" is named in a tie)."""
    tied = leaders(groups)
    if len(tied) == 1:
        best = tied[0]
        return (
            f"{label(best.method)} scores best ({mean_std(best.stats.accuracy, 100)}), distinguishably "
            f"above every other arm at {seeds} seed(s)."
        )
    names = ", ".join(f"{label(g.method)} {mean_std(g.stats.accuracy, 100)}" for g in tied)
    return f"Tied at {seeds} seed(s), no difference among them distinguishable: {names}."


def answers_table(results: CompareResults) -> tuple[dict[str, dict[str, Any]], list[str]] | None:
    """How every model's greedy answers ended (eval.answers): the share that never stopped, loop or are
    empty, pooled over an arm's seeds (None: counted for no model, a results.json from before)."""
    counts = [(_reference_name(name), ev.answers) for name, ev in results.models.items()]
    counts += [(label(g.method), answers_of(g)) for g in _main_groups(results)]
    rows = {
        name: {
            "answers": str(a.total),
            "never stopped": share(a.never_stopped, a.total),
            "loop": share(a.looping, a.total),
            "empty": share(a.empty, a.total),
        }
        for name, a in counts
        if a is not None
    }
    return (rows, ["answers", "never stopped", "loop", "empty"]) if rows else None


# ------------------------------------------------------------------------------------------------
# Tables


def _reference_name(name: str) -> str:
    return "teacher" if name == "teacher" else "untrained student"


def results_table(results: CompareResults) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """One row per model: the teacher, the untrained student, then each arm (mean ± std over seeds)."""
    rows: dict[str, dict[str, Any]] = {}
    for name, ev in results.models.items():
        rows[_reference_name(name)] = {
            "score %": pct(ev.accuracy),
            "CE": f"{ev.ce:.3f}",
            "KL to teacher": f"{ev.kl_to_teacher:.3f}" if ev.kl_to_teacher is not None else "",
            "top-1 agree %": pct(ev.top1_agreement),
            "aligned KL to teacher": ""
            if ev.aligned_kl_to_teacher is None
            else f"{ev.aligned_kl_to_teacher:.3f}",
        }
    for g in _main_groups(results):
        s = g.stats
        rows[label(g.method)] = {
            "score %": mean_std(s.accuracy, 100),
            "CE": mean_std(s.ce, digits=3),
            "KL to teacher": mean_std(s.kl_to_teacher, digits=3),
            "top-1 agree %": mean_std(s.top1_agreement, 100),
            "aligned KL to teacher": mean_std(s.aligned_kl_to_teacher, digits=3),
            "train s": mean_std(s.train_time_s, digits=0),
            "tokens/s": mean_std(s.tokens_processed_per_s, digits=0),
            "response tokens/s": mean_std(s.tokens_per_s, digits=0),
            "peak GiB": mean_std(s.peak_memory_gb, digits=3),
            "peak tensors GiB": mean_std(s.peak_tensor_memory_gb, digits=3),
            "trainable": f"{g.runs[0].trainable_parameters:,}",
        }
    # Across tokenizers the divergence is taken on aligned positions (docs/cross-tokenizer.md).
    kl = ["aligned KL to teacher"] if results.pair is not None else ["KL to teacher", "top-1 agree %"]
    columns = [
        "score %",
        "CE",
        *kl,
        "train s",
        "tokens/s",
        "response tokens/s",
        "peak GiB",
        "peak tensors GiB",
        "trainable",
    ]
    return rows, columns


def paired_table(results: CompareResults) -> tuple[dict[str, dict[str, Any]], list[str]]:
    rows = {}
    for p in results.paired:
        name = f"Neo − {label(p.against)}" + (
            "" if len(results.data.sizes) == 1 else f" ({_size(p.records)} records)"
        )
        rows[name] = {
            "Δ score, points [95% CI]": interval(p.accuracy, 100),
            "verdict": in_words(p.accuracy) if p.accuracy else "",
            "Δ KL to teacher": interval(p.kl_to_teacher, digits=3),
            "Δ aligned KL to teacher": interval(p.aligned_kl_to_teacher, digits=3),
            "Δ CE": interval(p.ce, digits=3),
            "Δ train s": interval(p.train_time_s, digits=1),
        }
    kl = "Δ aligned KL to teacher" if results.pair is not None else "Δ KL to teacher"
    return rows, ["Δ score, points [95% CI]", "verdict", kl, "Δ CE", "Δ train s"]


THROUGHPUT = (
    "Tokens/s: every token a training step ran through the student, prompt and response (padding "
    "not counted; blank for runs recorded before llm-neo counted them); response tokens/s: the response "
    "tokens the loss is on, what --project-tokens counts."
)


def cost_table(results: CompareResults) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Every arm's measured cost, and beside it the ratio to Neo's."""
    arms = results.cost.arms
    memory_of, _ = _memory(results)
    groups = {g.method: g for g in _main_groups(results)}
    neo = arms.get("neo")
    neo_memory = _mean(memory_of(groups["neo"].stats)) if "neo" in groups else None
    rows = {}
    for method, arm in arms.items():
        memory = _mean(memory_of(groups[method].stats))
        rows[label(method)] = {
            "train s": f"{arm.train_time_s:.1f}",
            "vs Neo time": f"{arm.train_time_s / neo.train_time_s:.2f}x" if neo and neo.train_time_s else "",
            "tokens/s": f"{arm.tokens_processed_per_s:.0f}" if arm.tokens_processed_per_s else "",
            "response tokens/s": f"{arm.tokens_per_s:.0f}" if arm.tokens_per_s else "",
            "memory GiB": format_gib(memory),
            "vs Neo memory": f"{memory / neo_memory:.2f}x" if memory and neo_memory else "",
            "trainable": f"{arm.trainable_parameters:,}",
        }
    columns = ["train s", "vs Neo time", "tokens/s", "response tokens/s", "memory GiB", "vs Neo memory"]
    return rows, [*columns, "trainable"]


def quantization_table(results: CompareResults) -> tuple[dict[str, dict[str, Any]], list[str]] | None:
    """The quantized arms: what each quantized, what that saved, how far the teacher drifted, and what
    it cost in score and memory beside the same method unquantized (None: no quantized arm)."""
    groups = _main_groups(results)
    quantized = [g for g in groups if any(r.teacher_quant or r.student_quant for r in g.runs)]
    if not quantized:
        return None
    by_method = {g.method: g for g in groups}
    memory_of, _ = _memory(results)
    rows = {}
    for g in quantized:
        run = g.runs[0]
        # RunSummary's quantization dicts (its free-form fields: kind, backend, bytes, drift).
        teacher, student = run.teacher_quant, run.student_quant
        plain = by_method.get(g.base_method)
        plain = plain if plain is not g else None
        row = {
            "teacher": "",
            "teacher weights MiB": "",
            "teacher drift KL/token": "",
            "student base": "",
            "Δ score vs unquantized, points": "",
            "Δ memory vs unquantized, GiB": "",
        }
        if teacher:
            row["teacher"] = f"{teacher['kind']} ({teacher['backend']})"
            row["teacher weights MiB"] = (
                f"{teacher['weight_bytes_before'] / 2**20:.3g} → {teacher['weight_bytes_after'] / 2**20:.3g}"
            )
            drift = teacher.get("drift")
            row["teacher drift KL/token"] = f"{drift['kl_per_token']:.3g}" if drift else "not measured"
        if student:
            row["student base"] = f"{student['kind']}, {student['weight_bytes'] / 2**20:.3g} MiB"
        if plain is not None:
            row["Δ score vs unquantized, points"] = (
                f"{100 * (g.stats.accuracy.mean - plain.stats.accuracy.mean):+.1f}"
            )
            memory, base = _mean(memory_of(g.stats)), _mean(memory_of(plain.stats))
            if memory is not None and base is not None:
                row["Δ memory vs unquantized, GiB"] = f"{memory - base:+.3g}"
        rows[label(g.method)] = row
    return rows, list(next(iter(rows.values())))


def projection_blocks(results: CompareResults, level: int) -> list[Block]:
    projection = results.cost.projection
    if not projection:
        return [
            Heading(level, "Projection"),
            Paragraph(
                "Give `--project-tokens 50M --gpu h100` (and `--gpu-price 2.5` per GPU-hour) for the "
                "time, GPU-hours and cost of the full run."
            ),
        ]
    rows, columns = projection_table(projection, results.config.get("gpu_price"))
    tokens = projection.tokens
    return [
        Heading(level, f"Projection: {tokens:,} training tokens on {projection.gpus} x {projection.gpu}"),
        Table(rows, columns, wrap=True),
        Paragraph(
            "Assumptions: memory is `llm-neo plan`'s estimate of one step at --batch-size x --max-length "
            "(bf16, chunked loss as configured); time is the throughput measured here when it ran on "
            f"that card, else training FLOPs at {projection.utilization:.0%} of its dense bf16 peak "
            "(6·N per token for a full student, 4·N for a LoRA one, +2·N with checkpointing, +2·N of the "
            "teacher when it runs online). Times, GPU-hours and costs to two significant figures: "
            "estimates, not measurements."
        ),
    ]


def projection_table(
    projection: Projection, price: float | None
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Every arm's projected run: its memory, wall time, GPU-hours and, given a ``price`` per GPU-hour,
    its cost (all to two significant figures)."""
    cost = f"cost at {price:g}/GPU-hour" if price is not None else None
    rows = {}
    for method, p in projection.arms.items():
        rows[label(method)] = {
            "planned peak GiB": format_gib(p.planned_peak_gib),
            "fits one card": "" if p.fits is None else ("yes" if p.fits else "no"),
            "time": format_duration(3600 * p.hours),
            "GPU-hours": format_sig(p.gpu_hours),
            **({cost: format_sig(p.gpu_hours * price)} if cost and price is not None else {}),
            "time from": p.basis,
        }
    columns = [
        "planned peak GiB",
        "fits one card",
        "time",
        "GPU-hours",
        *([cost] if cost else []),
        "time from",
    ]
    return rows, columns


def categories_table(results: CompareResults) -> tuple[dict[str, dict[str, Any]], list[str]] | None:
    models = results.models.items()
    categories = list(models[0][1].per_category)  # the teacher's, or the student's without one
    if len(categories) < 2:
        return None
    rows = {}
    for name, ev in models:
        rows[_reference_name(name)] = {c: pct(ev.per_category.get(c)) for c in categories}
    for g in _main_groups(results):
        rows[label(g.method)] = {c: mean_std(g.stats.per_category.get(c), 100) for c in categories}
    return rows, categories


def sizes_table(results: CompareResults) -> tuple[dict[str, dict[str, Any]], list[str]] | None:
    sizes = results.data.sizes
    if len(sizes) < 2:
        return None
    methods = list(dict.fromkeys(g.method for g in results.groups))
    rows = {}
    for records in sizes:
        row = {}
        for g in results.groups:
            if g.records == records:
                row[label(g.method)] = mean_std(g.stats.accuracy, 100)
        rows[f"{_size(records)} records"] = row
    return rows, [label(m) for m in methods]


def reproduce(results: CompareResults) -> list[str]:
    """Commands that rerun one seed of each arm alone, with absolute paths (they work from anywhere)."""
    lines = []
    for g in _main_groups(results):
        config = g.runs[0].output_dir.resolve() / "config.yaml"
        lines.append(f"{label(g.method)}: `llm-neo distill --config {config} --overwrite`")
    return lines


# ------------------------------------------------------------------------------------------------
# The document


def report_blocks(results: CompareResults) -> list[Block]:
    blocks: list[Block] = [
        Heading(1, "llm-neo comparison"),
        Paragraph(_setting(results)),
        Paragraph(settings(results) + _budget(results)),
        *[Paragraph(line) for line in results.context or []],
        *budget_blocks(results),
        Heading(2, "Verdict"),
        Bullets(tuple(verdict(results))),
        Heading(2, "Results"),
        Table(*results_table(results)),
        Paragraph(
            _loaded_times(results)
            + _score_sentence(results.config["score"])
            + " CE, KL to the teacher and top-1 agreement are "
            "per held-out response token. Memory: "
            + (
                "CUDA's max allocated."
                if results.memory_kind is MemoryKind.CUDA_MAX_ALLOCATED
                else "the process's peak resident set (peak GiB) and the peak of live tensors, counted op by "
                "op over the first steps (peak tensors GiB; the RSS also holds the runtime and "
                "allocator slack)."
            )
        ),
        *small_heldout_blocks(results),
        Image("scores", "task score of every model"),
    ]
    if results.pair is not None:  # --cross-tokenizer
        blocks += [
            Heading(3, "The tokenizer pair (llm-neo check-pair)"),
            Bullets(tuple(pair_lines(results.pair))),
            Paragraph(
                "Across tokenizers the divergence is taken where both models predict the same response text: "
                "aligned KL to teacher is the forward KL on the teacher's top-k + tail mapped into the "
                "student's tokens, per exactly aligned held-out position (docs/cross-tokenizer.md)."
            ),
        ]
    if ended := answers_table(results):
        blocks += [
            Heading(3, "How the answers ended"),
            Table(*ended),
            Paragraph(
                "Never stopped: reached --max-new-tokens without an end-of-turn token. Loop: some run of 3 "
                "to 8 words repeats back to back 3 times or over half the answer (llm_neo.eval.answers)."
            ),
        ]
    if results.paired:
        blocks += [
            Heading(2, "Neo against each arm, paired by seed"),
            Table(*paired_table(results), wrap=True),
            Paragraph(
                "Each difference is Neo's minus the other arm's at the same seed; the interval is the 95% "
                "Student-t interval of the mean difference. An interval containing 0 is not a win."
            ),
        ]
    if rows := claims(results):
        blocks += [
            Heading(2, "The paper's claims, checked"),
            Table(
                {f"claim {i}": r for i, r in enumerate(rows, start=1)},
                ["claim", "measured", "status"],
                wrap=True,
            ),
        ]
    blocks += [
        Heading(2, "Cost"),
        Table(*cost_table(results)),
        Paragraph(THROUGHPUT),
        *projection_blocks(results, 3),
    ]
    if quantization := quantization_table(results):
        blocks += [
            Heading(2, "Quantization: what it saved, what it cost"),
            Table(*quantization, wrap=True),
            Paragraph(
                "Teacher drift: the KL per token of the quantized teacher's next-token distribution to the "
                "unquantized one's, on the arm's first held-out batch (docs/quantization.md). Every model is "
                "scored against the same teacher. The differences are between means over seeds; the paired "
                "table above has their intervals where Neo is one of the two."
            ),
        ]
    if note := on_policy_note(results):
        blocks += [Heading(2, "On-policy arms"), Paragraph(note)]
    if sizes := sizes_table(results):
        blocks += [
            Heading(2, "Score against training records"),
            Table(*sizes),
            Image("sizes", "score against records"),
        ]
    if categories := categories_table(results):
        blocks += [Heading(2, f"Score per {results.config['category_field']}"), Table(*categories)]
    if results.probe:
        blocks += section_blocks(results.probe, level=2, images=True)
    blocks += [
        Heading(2, "Quality against cost"),
        Image("memory", "score against memory"),
        Image("time", "score against training time"),
        Heading(2, "Training curves"),
        Paragraph(
            "CE is the term every arm trains on; the KD term only the kd and neo arms do (separate panels)."
        ),
        Image("loss", "training curves"),
        Heading(2, "Conclusion"),
        *[Paragraph(line) for line in conclusion(results)],
        Heading(2, "Reproduce an arm"),
        Bullets(tuple(reproduce(results))),
        Heading(2, "Answers (first held-out records)"),
        Table(*_examples(results), wrap=True),
        Paragraph(
            "Each answer as the model wrote it, cut at 80 characters (…): ↵ marks a newline, (empty) an "
            "empty answer, `\\x??` a byte that is not text and `\\t`, `\\x18`, ... a control character."
        ),
    ]
    return blocks


def budget_blocks(results: CompareResults) -> list[Block]:
    """The section "Can this comparison decide?": the budget stated before training (epochs and trained
    tokens per arm, the held-out size, the detectable difference) and its warnings; nothing for a
    results.json written before compare stated it."""
    budget = results.budget
    if budget is None:
        return []
    blocks: list[Block] = [Heading(2, "Can this comparison decide?"), Bullets(tuple(budget_lines(budget)))]
    if budget.warnings:
        blocks.append(Bullets(tuple(f"**Warning**: {w}" for w in budget.warnings)))
    return blocks


def small_heldout_blocks(results: CompareResults) -> list[Block]:
    """The held-out split's counts beside its metrics, when they are too few to read to their digits."""
    scored = results.models.student
    warning = small_heldout(scored.total, scored.heldout_tokens)
    return [] if warning is None else [Paragraph(f"**Small held-out split**: {warning}.")]


def on_policy_note(results: CompareResults) -> str | None:
    """What the +on-policy arms sampled and trained on (None: no such arm)."""
    c = results.config
    arms = [m for m in c["methods"] if ON_POLICY_VARIANT in m.split("+")[1:]]
    if not arms:
        return None
    cap = c.get("sample_max_new_tokens") or "the longest training response"
    return (
        f"{', '.join(label(a) for a in arms)}: on a λ = {c.get('on_policy') or 1.0:g} share of micro-batches "
        f"the student answers the prompts itself (sampling temperature {c.get('sample_temperature', 1.0):g}, "
        f"top-p {c.get('sample_top_p', 1.0):g}, up to {cap} tokens) and is trained on "
        f"{c.get('on_policy_divergence', ON_POLICY_DIVERGENCE)} to the teacher on its samples alone, no CE; "
        "the other micro-batches train as the arm without +on-policy does. Each run's summary.json has what "
        "generation cost (docs/on-policy.md)."
    )


def _setting(results: CompareResults) -> str:
    c = results.config  # the options, as compare.yaml holds them
    return (
        f"Teacher `{c['teacher']}`, student `{c['student']}`; trained on `{results.data.train}`, "
        "scored "
        f"on `{results.data.heldout}`; arms {', '.join(label(m) for m in c['methods'])} x {c['seeds']} "
        f"seed(s) from seed {c['seed']}, {c['max_steps'] or 'one epoch of'} steps of {c['batch_size']} x "
        f"{c['grad_accum']}; {results.device}; llm-neo {results.llm_neo_version}, {results.created}."
    )


def _loaded_times(results: CompareResults) -> str:
    """A sentence before the results table's notes when the machine was loaded (its times measured the
    other work too); empty otherwise."""
    return f"Times (train s, tokens/s) were taken with the {note}. " if (note := load_note(results)) else ""


def _budget(results: CompareResults) -> str:
    """The machine, its load, and the epochs the largest arms' budget covered, for the header."""
    text = f" Machine: {results.device}"
    if results.cpus is not None:
        text += f", {results.cpus} CPUs usable"
    if results.load_average is not None and results.load_max is not None:
        text += (
            f", load average {results.load_average:g} while the arms trained (highest {results.load_max:g})"
        )
    elif results.load_average is not None:
        text += f", load average {results.load_average:g} at the end of the run"
    text += f" ({note})." if (note := load_note(results)) else "."
    groups = _main_groups(results)
    if groups and (covered := epochs_covered(results, groups[0])):
        text += f" Epochs covered: {covered[0]:.2g}."
    return text


def _examples(results: CompareResults) -> tuple[dict[str, dict[str, Any]], list[str]]:
    answers: dict[str, list[Example]] = {name: ev.examples for name, ev in results.models.items()}
    for g in _main_groups(results):
        answers[label(g.method)] = g.runs[0].examples
    first = next(iter(answers.values()))
    rows = {}
    for i, ex in enumerate(first):
        row = {"prompt": _printable(ex.prompt, 120), "expected": _printable(ex.expected, 80)}
        row |= {
            name: _printable(examples[i].answer, 80)
            for name, examples in answers.items()
            if i < len(examples)
        }
        rows[str(i + 1)] = row
    return rows, ["prompt", "expected", *answers]


def _printable(text: str, limit: int) -> str:
    """A model's text for a table cell, cut to ``limit`` characters: "(empty)" for no text; each newline
    kept and marked ↵ (a looping answer shows its lines, a blank one its newlines); other control
    characters as ASCII escapes (``\\t``, ``\\x18``), and an undecodable byte (an untrained model emits
    any byte; the tokenizer decodes a stray one as U+FFFD) as ``\\x??``: plain ASCII that every font
    draws, so nothing on the page is an unexplained replacement glyph or a missing-glyph box."""
    if not text:
        return "(empty)"
    return "".join(_visible(c) for c in (text if len(text) <= limit else text[: limit - 1] + "…"))


def _visible(char: str) -> str:
    if char == "\n":
        return "↵\n"
    if char == "\ufffd":
        return "\\x??"
    return char if char.isprintable() else repr(char)[1:-1]


# ------------------------------------------------------------------------------------------------
# Plots


def plots(results: CompareResults) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    # One colour per arm for every plot (a variant in a shade of its method's): the probe's plots, which
    # name their models after the same arms in the same order, draw them alike. A name no method owns
    # (a hand-edited results.json) is drawn grey rather than failing the report.
    colors = {g.method: "#555555" for g in results.groups} | arm_colors(g.method for g in results.groups)
    out = {
        "scores": _scores_plot(results, colors),
        "memory": _cost_plot(results, "memory", colors),
        "time": _cost_plot(results, "time", colors),
        "loss": _loss_plot(results, colors),
    }
    if len(results.data.sizes) > 1:
        out["sizes"] = _sizes_plot(results, colors)
    if results.probe:
        out |= probe_plots(results.probe)  # movement, inheritance, bias: names the above do not use
    return out


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")  # tight: the legend beside the axes
    plt.close(fig)
    return buffer.getvalue()


def _reference_lines(ax: Any, results: CompareResults) -> None:
    for name, ev in results.models.items():
        ax.axhline(
            100 * ev.accuracy,
            color=REFERENCE_COLORS[name],
            ls="--" if name == "teacher" else ":",
            lw=1,
            label=_reference_name(name),
        )


def _legend(ax: Any, entries: Any = None) -> None:
    """The legend (of ``ax``, or the ``(handles, labels)`` given) outside the data area, to the right of
    the axes: it never covers a bar or a point."""
    handles, labels = entries or ax.get_legend_handles_labels()
    ax.legend(handles, labels, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)


SCORE_LIMITS = (-3, 103)  # a score of 0 or 100 drawn inside the axes, not under its frame


def _clusters(points: list[tuple[float, float]], spans: tuple[float, float]) -> list[list[int]]:
    """The points (indices) that sit on one spot, each cluster in drawing order: a point joins the first
    cluster whose first point is within 3% of each axis's ``spans`` of it."""
    clusters: list[list[int]] = []
    for i, (x, y) in enumerate(points):
        for cluster in clusters:
            x0, y0 = points[cluster[0]]
            if abs(x - x0) <= 0.03 * spans[0] and abs(y - y0) <= 0.03 * spans[1]:
                cluster.append(i)
                break
        else:
            clusters.append([i])
    return clusters


def _tick_label(arm: str) -> str:
    """An arm's name under its bar, a variant on its own line (long names do not run into each other)."""
    return label(arm).replace(" + ", "\n+ ")


def _fit_ticks(fig: Any, ax: Any, n: int) -> None:
    """Widen ``fig`` until each of the ``n`` bars' names fits its slot under the axes (at 7 arms, names
    like "+ int8 teacher" ran into each other at the default width)."""
    renderer = fig.canvas.get_renderer()
    widest = max((t.get_window_extent(renderer).width for t in ax.get_xticklabels()), default=0.0)
    needed = n * (widest / fig.dpi + 0.15)  # inches, with a gap between neighbours
    have = ax.get_position().width * fig.get_figwidth()
    if needed > have:
        fig.set_size_inches(fig.get_figwidth() + needed - have, fig.get_figheight())


def _scores_plot(results: CompareResults, colors: dict[str, str]) -> bytes:
    import matplotlib.pyplot as plt

    groups = _main_groups(results)
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for i, g in enumerate(groups):
        s = g.stats.accuracy
        # Edged in its method's colour: a variant's lighter or darker bar reads as that method's.
        edge = ARM_COLORS.get(g.method.split("+")[0], colors[g.method])
        ax.bar(i, 100 * s.mean, yerr=100 * s.std, capsize=4, color=colors[g.method], edgecolor=edge, lw=1.5)
        # The seeds spread across the bar, so equal scores are as many dots as there are seeds.
        n = len(g.runs)
        xs = [i + 0.3 * (k - (n - 1) / 2) / max(n - 1, 1) for k in range(n)]  # within ±0.15 of the bar
        ax.scatter(xs, [100 * r.accuracy for r in g.runs], color="black", s=10, zorder=3)
        # The mean written above the bar: a bar of 0 is still read as 0, not as missing.
        ax.text(i, 100 * (s.mean + s.std) + 1.5, f"{100 * s.mean:.1f}", ha="center", fontsize=8)
    _reference_lines(ax, results)
    ax.set_xticks(range(len(groups)), [_tick_label(g.method) for g in groups])
    _fit_ticks(fig, ax, len(groups))
    ax.set_ylabel(f"task score, % ({results.config['score']})")
    ax.set_ylim(*SCORE_LIMITS)
    _legend(ax)
    ax.set_title("held-out task score: mean ± std over seeds, each seed a dot")
    ax.grid(alpha=0.3, axis="y")
    return _png(fig)


def _cost_plot(results: CompareResults, kind: str, colors: dict[str, str]) -> bytes:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    metric, name = _memory(results) if kind == "memory" else (_train_time, "training time")
    unit = "GiB" if kind == "memory" else "s"
    fig, ax = plt.subplots(figsize=(6.5, 4))
    drawn = [(g.method, c, g.stats.accuracy) for g in _main_groups(results) if (c := metric(g.stats))]
    points = [(c.mean, 100 * s.mean) for _, c, s in drawn]
    xs = [x for x, _ in points]
    for cluster in _clusters(points, (max(xs, default=0) - min(xs, default=0) or 1.0, 100)):
        # Arms on one spot (SFT and KD at the same GiB, say): each drawn smaller on top of the one before,
        # in its own shape and full colour, so all stay in sight; the spot is labelled with their names.
        for k, i in enumerate(cluster):
            method, cost, score = drawn[i]
            ax.errorbar(
                *points[i],
                xerr=cost.std,
                yerr=100 * score.std,
                fmt=marker(method),
                ms=max(11 - 3 * k, 4),
                capsize=3,
                color=colors[method],
                label=label(method),
                zorder=3 + k,
            )
        if len(cluster) > 1:
            names = " = ".join(label(drawn[i][0]) for i in cluster)
            ax.annotate(names, points[cluster[0]], xytext=(8, 6), textcoords="offset points", fontsize=7)
    ax.xaxis.set_major_locator(MaxNLocator(5))  # a tiny model's GiB ticks do not run into each other
    _reference_lines(ax, results)
    ax.set_xlabel(f"{name}, {unit}")
    ax.set_ylabel("task score, %")
    ax.set_ylim(*SCORE_LIMITS)
    ax.grid(alpha=0.3)
    _legend(ax)
    ax.set_title(f"score against {name}")
    return _png(fig)


def _loss_plot(results: CompareResults, colors: dict[str, str]) -> bytes:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharex=True)
    for g in _main_groups(results):
        curve = g.runs[0].curve
        steps = [p.step for p in curve]
        style = {
            "color": colors[g.method],
            "label": label(g.method),
            "linestyle": _line(g.method),
            # Markers every few steps, each arm its shape: a curve on top of another still shows.
            "marker": marker(g.method),
            "markevery": max(len(steps) // 8, 1),
            "ms": 5,
        }
        on_policy = any(p.on_policy_kd_loss is not None for p in curve)
        ce, kd = zip(*(p.curves(on_policy) for p in curve), strict=True) if curve else ((), ())
        # None (no CE that step) is a gap in the line: matplotlib draws NaN as one
        axes[0].plot(steps, [math.nan if v is None else v for v in ce], **style)
        if any(kd):
            axes[1].plot(steps, [math.nan if v is None else v for v in kd], **style)
    axes[0].set_title("training CE (every arm), first seed")
    axes[1].set_title("training KD divergence (kd, neo; on-policy: on its samples), first seed")
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("per response token, nats")
        ax.ticklabel_format(axis="y", useOffset=False)  # plain numbers, not "1e-6 + 1.855e-2"
        ax.grid(alpha=0.3)
    if axes[0].get_legend_handles_labels()[0]:
        _legend(axes[1], axes[0].get_legend_handles_labels())  # one legend, every arm, beside both
    return _png(fig)


def _sizes_plot(results: CompareResults, colors: dict[str, str]) -> bytes:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, ax = plt.subplots(figsize=(6.5, 4))
    available = results.data.train_records_available
    sizes: set[int] = set()
    methods = list(dict.fromkeys(g.method for g in results.groups))
    for j, method in enumerate(methods):
        points = [
            (g.records or available or 0, g.stats.accuracy) for g in results.groups if g.method == method
        ]
        points = [p for p in points if p[0]]
        sizes |= {x for x, _ in points}
        # Each arm a little to the side of the size it ran at (a log axis: a factor), so arms with the
        # same score at the same size are side by side, not one behind the other.
        shift = 1 + 0.04 * (j - (len(methods) - 1) / 2)
        ax.errorbar(
            [x * shift for x, _ in points],
            [100 * s.mean for _, s in points],
            yerr=[100 * s.std for _, s in points],
            marker=marker(method),
            capsize=3,
            color=colors[method],
            linestyle=_line(method),
            label=label(method),
        )
    _reference_lines(ax, results)
    ax.set_xscale("log")
    # Ticks at the sizes run, as plain numbers (a log axis labels its minor ticks 3x10^2, 4x10^2, ...
    # on top of each other).
    ax.set_xticks(sorted(sizes), [f"{n:,}" for n in sorted(sizes)])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("training records")
    ax.set_ylabel("task score, %")
    ax.set_ylim(*SCORE_LIMITS)
    ax.grid(alpha=0.3)
    _legend(ax)
    ax.set_title("how much data: score against training records")
    return _png(fig)


def write_report(results: CompareResults, out: Path) -> dict[str, Path]:
    """report.md (+ plots/*.png) and report.html under ``out``; returns their paths."""
    images = plots(results)
    for name, data in images.items():
        atomic_write_bytes(out / "plots" / f"{name}.png", data)
    blocks = report_blocks(results)
    md = out / "report.md"
    atomic_write_text(md, to_markdown(blocks, {name: f"plots/{name}.png" for name in images}))
    html = out / "report.html"
    atomic_write_text(html, to_html(blocks, title="llm-neo comparison", images=images))
    return {"markdown": md, "html": html}
