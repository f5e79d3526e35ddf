"""The probe report: ``probe_section`` (Markdown, for embedding in other reports), ``probe.md``,
``probe.html`` (self-contained) and the plots, all from the ``ProbeResults`` `llm-neo probe` writes as
``probe.json`` (see ``llm_neo.commands.probe``). The public functions also take that record's JSON form
(a dict, as compare's results.json embeds it)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from llm_neo.eval.probe import ALL
from llm_neo.records import from_json
from llm_neo.records.probe import (
    BiasScores,
    InheritanceScores,
    MovementDifference,
    PairRecord,
    ProbeResults,
    Role,
    Stat,
)
from llm_neo.report.document import Block, Bullets, Heading, Image, Paragraph, Table, to_html, to_markdown
from llm_neo.report.style import ARM_COLORS, arm_colors
from llm_neo.runtime.atomic import atomic_write_bytes, atomic_write_text

PLOTS = {
    "movement": "plots/movement.png",
    "inheritance": "plots/inheritance.png",
    "bias": "plots/bias.png",
}
_ROLE_COLORS = {Role.TEACHER: "black", Role.BASELINE: "#d62728"}
_STUDENT_COLORS = ("#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22")
_ANSWER_CHARS = 120  # answers longer than this are cut in the report's table (probe.json has them whole)


# --------------------------------------------------------------------------------------------------
# Formatting


Results = ProbeResults | dict[str, Any]  # the record, or its JSON form (what compare's results.json holds)


def as_record(results: Results) -> ProbeResults:
    """``results`` as a ``ProbeResults`` (RecordError naming the key if its JSON form is damaged)."""
    return results if isinstance(results, ProbeResults) else from_json(ProbeResults, results)


def fmt(
    stat: Stat | MovementDifference | None, *, digits: int = 2, percent: bool = False, signed: bool = False
) -> str:
    """A statistic as "v [lo, hi]" (percent: "62% [50, 73]"); "n/a" when undefined."""
    if stat is None or stat.value is None:
        return "n/a"
    scale, unit = (100.0, "%") if percent else (1.0, "")
    d = 0 if percent else digits
    sign = "+" if signed else ""
    value = f"{scale * stat.value:{sign}.{d}f}{unit}"
    low, high = stat.ci
    if low is None or high is None:
        return value
    return f"{value} [{scale * low:{sign}.{d}f}, {scale * high:{sign}.{d}f}]"


def _verdict(stat: Stat | MovementDifference, above: str, below: str, neither: str) -> str:
    low, high = stat.ci
    if low is not None and low > 0:
        return above
    if high is not None and high < 0:
        return below
    return neither


def _roles(results: ProbeResults) -> dict[str, Role]:
    return {m.name: m.role for m in results.models}


def _colors(results: ProbeResults) -> dict[str, str]:
    """The teacher and baseline in their role's colour, a model named after an arm (compare's arms) in
    that arm's colour, as the comparison draws it; any other model in the next colour left."""
    students = iter([c for c in _STUDENT_COLORS if c not in ARM_COLORS.values()] * 4)
    arms = arm_colors(m.name for m in results.models if m.role not in _ROLE_COLORS)
    return {m.name: _ROLE_COLORS.get(m.role) or arms.get(m.name) or next(students) for m in results.models}


def _stereo_fraction(scores: BiasScores) -> Stat:
    return scores.stereo_fraction


def _mean_gap(scores: BiasScores) -> Stat:
    return scores.mean_gap


def _categories(table: dict[str, dict[str, Any]]) -> list[str]:
    first = next(iter(table.values()), {})
    return [ALL, *[c for c in first if c != ALL]]


# --------------------------------------------------------------------------------------------------
# Blocks


def conclusions(results: Results) -> list[str]:
    """Plain-language sentences computed from the numbers (one per student, one per compared pair)."""
    results = as_record(results)
    out = []
    pairs = results.probe_set.pairs
    if note := _baseline_note(results):
        out.append(note)
    inheritance = results.inheritance or {}
    for name, role in _roles(results).items():
        if role != Role.STUDENT or name not in inheritance:
            continue
        inh = inheritance[name][ALL]
        if inh.movement.value is None:
            out.append(f"**{name}**: movement undefined (the teacher's gaps equal the baseline's).")
            continue
        amplified = _verdict(
            inh.gap_vs_teacher,
            "its mean gap is above the teacher's (amplified)",
            "its mean gap is below the teacher's",
            f"its mean gap is not distinguishable from the teacher's at {pairs} pairs",
        )
        out.append(
            f"**{name}** moved {fmt(inh.movement)} of the way from the untrained student's preferences "
            f"to the teacher's (0 = untrained, 1 = teacher; correlation with the teacher's gaps "
            f"r = {fmt(inh.correlation)}); {amplified}."
        )
    for d in results.movement_differences or []:
        verdict = _verdict(
            d,
            f"{d.a} carries measurably more of the teacher's preference pattern than {d.b}",
            f"{d.a} carries measurably less of it than {d.b}",
            f"not distinguishable at {pairs} pairs",
        )
        out.append(f"movement {d.a} − {d.b}: {fmt(d, signed=True)}: {verdict}.")
    return out


def _baseline_note(results: ProbeResults) -> str | None:
    """A baseline that already leans the teacher's way (a pruned teacher does): movement then measures
    change from that lean, and a student that lost part of it moves below 0 while keeping the rest."""
    roles = _roles(results)
    teacher = next((n for n, r in roles.items() if r == Role.TEACHER), None)
    baseline = next((n for n, r in roles.items() if r == Role.BASELINE), None)
    bias = results.bias or {}
    if teacher not in bias or baseline not in bias:
        return None
    t, b = bias[teacher][ALL].mean_gap, bias[baseline][ALL].mean_gap
    low, high = b.ci
    if t.value is None or b.value is None or low is None or high is None or t.value == 0:
        return None
    if not (low > 0 if t.value > 0 else high < 0):  # its interval on the teacher's side of 0
        return None
    return (
        f"The baseline already leans the teacher's way (mean gap {fmt(b, signed=True)} against the "
        f"teacher's {fmt(t, signed=True)}): movement is measured from that lean, so a student that lost "
        "part of it moves below 0; the mean gaps say how much each kept."
    )


def section_blocks(results: Results, *, level: int = 2, images: bool = False) -> list[Block]:
    """The probe's findings as blocks: scoring, conclusions, inheritance, bias per category, behaviour."""
    results = as_record(results)
    h, sub = level, level + 1
    roles = _roles(results)
    probe_set, boot = results.probe_set, results.bootstrap
    blocks: list[Block] = [Heading(h, "Inherited bias: what the students took from the teacher")]
    scorings = {m.scoring for m in results.models}
    how = (
        f"each sentence's score is its {scorings.pop()}"
        if len(scorings) == 1
        else "each sentence's score is: " + "; ".join(f"{m.name}: {m.scoring}" for m in results.models)
    )
    blocks.append(
        Paragraph(
            f"{probe_set.pairs} sentence pairs in {len(probe_set.pair_categories)} categories and "
            f"{probe_set.prompts} prompts ({', '.join(probe_set.sources)}). Scoring: {how}; a pair's "
            "gap is score(stereotypical) − score(anti-stereotypical) in nats (> 0 prefers the stereotype). "
            f"Intervals: {100 * boot.confidence:.0f}% percentile bootstrap over items, {boot.samples} "
            f"resamples, seed {boot.seed}. Teacher: `{results.teacher}`; baseline (untrained "
            f"student, movement 0): `{results.baseline}`."
        )
    )
    if probe_set.notes:
        blocks.append(Bullets(tuple(probe_set.notes)))
    if results.inheritance:
        sentences = conclusions(results)
        if sentences:
            blocks.append(Bullets(tuple(sentences)))
        blocks.append(Heading(sub, "Inheritance of the teacher's preference pattern"))
        bias = results.bias or {}
        rows = {}
        for name, inh in results.inheritance.items():
            a = inh[ALL]
            rows[name] = {
                "role": roles[name].value,
                "movement to teacher": fmt(a.movement),
                "r with teacher": fmt(a.correlation),
                "mean gap": fmt(bias[name][ALL].mean_gap, signed=True),
                "gap − teacher's": fmt(a.gap_vs_teacher, signed=True),
                "gap − baseline's": fmt(a.gap_vs_baseline, signed=True),
            }
        blocks.append(Table(rows, list(next(iter(rows.values())))))
        blocks.append(
            Paragraph(
                "Movement m = ⟨g − g₀, g_T − g₀⟩ / ‖g_T − g₀‖² over the per-pair gaps g of a model, g_T of "
                "the teacher and g₀ of the baseline: the least-squares share of the way from the "
                "baseline's preference pattern to the teacher's (0 = unchanged, 1 = the teacher's, > 1 "
                "past it). r is the Pearson correlation of the model's gaps with the teacher's."
            )
        )
        if results.movement_differences:
            diffs = {f"{d.a} − {d.b}": {"movement difference": fmt(d, signed=True)}
                     for d in results.movement_differences}  # fmt: skip
            blocks.append(Table(diffs, ["movement difference"]))
        if images:
            blocks += [
                Image("movement", "movement towards the teacher per model, with 95% intervals"),
                Image("inheritance", "each model's per-pair gap against the teacher's"),
            ]
    if results.bias:
        blocks.append(Heading(sub, "Bias scores per category"))
        categories = _categories(results.bias)
        for title, stat, kwargs in (
            ("fraction of pairs preferring the stereotypical sentence", _stereo_fraction, {"percent": True}),
            ("mean gap (nats)", _mean_gap, {"signed": True}),
        ):
            rows = {
                name: {f"{c} (n={b[c].n})": fmt(stat(b[c]), **kwargs) for c in categories}
                for name, b in results.bias.items()
            }
            blocks += [Paragraph(f"**{title}**"), Table(rows, list(next(iter(rows.values()))))]
        if images:
            blocks.append(Image("bias", "bias scores per category and model, with 95% intervals"))
    if results.behaviour:
        blocks += _behaviour_blocks(results, sub)
    return blocks


def _behaviour_blocks(results: ProbeResults, level: int) -> list[Block]:
    behaviour = results.behaviour or {}
    categories = _categories(behaviour)
    blocks: list[Block] = [
        Heading(level, "Behaviour on prompts"),
        Paragraph(
            "Greedy answers (the prompt as the user's turn, the chat template applied when the tokenizer "
            f"has one; at most {results.config['max_new_tokens']} new tokens). Agreement: the answer "
            "equals the teacher's after collapsing whitespace and case. Labels: "
            + "; ".join(f"`{lab.name}` ({lab.kind.value})" for lab in results.labels)
            + "."
        ),
    ]
    tables: list[tuple[str, str | None]] = [("agreement with the teacher", None)]
    tables += [(f"rate of label {lab.name}", lab.name) for lab in results.labels]
    for title, label in tables:
        rows = {
            name: {
                f"{c} (n={b[c].n})": fmt(
                    b[c].agreement if label is None else b[c].labels[label], percent=True
                )
                for c in categories
            }
            for name, b in behaviour.items()
        }
        blocks += [Paragraph(f"**{title}**"), Table(rows, list(next(iter(rows.values()))))]
    return blocks


def probe_section(results: Results, *, level: int = 2) -> str:
    """The probe's findings as a Markdown section (no images), for another report to embed.

    ``results`` is what `llm-neo probe` writes to ``probe.json`` (the record or its JSON form);
    ``level`` is the section's heading level.
    """
    return to_markdown(section_blocks(results, level=level), {})


def report_blocks(results: ProbeResults) -> list[Block]:
    """probe.md / probe.html: a title, the section with its plots, every prompt's answers, the caveats."""
    blocks: list[Block] = [
        Heading(1, "llm-neo probe: which of the teacher's biases and behaviours the students inherited"),
        *section_blocks(results, level=2, images=True),
    ]
    if results.prompts:
        names = [m.name for m in results.models]
        rows = {
            f"{p.id} ({p.category})": {
                "prompt": _cut(p.prompt),
                **{n: _cut(p.answers[n]) + _tags(p.labels[n]) for n in names},
            }
            for p in results.prompts
        }
        blocks += [Heading(2, "Answers"), Table(rows, ["prompt", *names], wrap=True)]
    blocks += [
        Heading(2, "What these numbers mean and do not mean"),
        Bullets(
            (
                "A gap is a difference of log-probabilities of two sentences: which one the model finds "
                "likelier, not what it would say or do. Preferring the stereotypical sentence on a probe "
                "set is evidence of an association, not a measure of harm in use.",
                "The built-in set is small, templated and illustrative, not a benchmark; a low score on "
                "it (or on any probe set) is not a fairness certification.",
                "Movement compares patterns across pairs: 0.7 means the model's gaps moved, in the least-"
                "squares sense, 70% of the way from the untrained student's to the teacher's; it can be "
                "high while the mean bias is small, and it is undefined when teacher and baseline agree.",
                "Intervals resample the probe items; they do not cover other probe sets, other phrasings, "
                "or retraining with another seed.",
                "See docs/probe.md.",
            )
        ),
    ]
    return blocks


def _cut(text: str) -> str:
    text = " ".join(text.split()).replace("|", "/")
    return text if len(text) <= _ANSWER_CHARS else text[: _ANSWER_CHARS - 1] + "…"


def _tags(labels: list[str]) -> str:
    return f" [{', '.join(labels)}]" if labels else ""


# --------------------------------------------------------------------------------------------------
# Plots (matplotlib, Agg)


def plots(results: Results) -> dict[str, bytes]:
    """PNG bytes of each plot that has data, by the names in PLOTS."""
    import matplotlib

    matplotlib.use("Agg")
    results = as_record(results)
    out = {}
    if results.inheritance:
        out["movement"] = _movement_plot(results, results.inheritance)
        out["inheritance"] = _inheritance_plot(results, results.inheritance, results.pairs or [])
    if results.bias:
        out["bias"] = _bias_plot(results, results.bias)
    return out


def _png(fig: Any, top: float = 1.0) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout(rect=(0, 0, 1, top))
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def _errors(stats: list[Stat], scale: float = 1.0) -> tuple[list[float], list[list[float]]]:
    values, low, high = [], [], []
    for s in stats:
        v = s.value if s.value is not None else float("nan")
        lo, hi = s.ci
        values.append(scale * v)
        low.append(scale * (v - lo) if lo is not None else 0.0)
        high.append(scale * (hi - v) if hi is not None else 0.0)
    return values, [low, high]


def _movement_plot(results: ProbeResults, inheritance: dict[str, dict[str, InheritanceScores]]) -> bytes:
    import matplotlib.pyplot as plt

    colors = _colors(results)
    names = list(inheritance)
    values, err = _errors([inheritance[n][ALL].movement for n in names])
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(names) + 1.4))
    ys = list(range(len(names)))[::-1]
    ax.barh(ys, values, xerr=err, color=[colors[n] for n in names], alpha=0.8, capsize=4)
    ax.set_yticks(ys, names)
    ax.axvline(0, color="#d62728", ls=":", lw=1)
    ax.axvline(1, color="black", ls="--", lw=1)
    ax.set_xlabel("movement towards the teacher (0 = untrained student, 1 = teacher), 95% interval")
    ax.set_title("how much of the teacher's preference pattern each model carries")
    ax.grid(alpha=0.3, axis="x")
    return _png(fig)


def _inheritance_plot(
    results: ProbeResults, inheritance: dict[str, dict[str, InheritanceScores]], pairs: list[PairRecord]
) -> bytes:
    import matplotlib.pyplot as plt

    teacher = results.teacher
    names = [n for n in inheritance if n != teacher]
    categories = sorted({p.category for p in pairs})
    palette = plt.get_cmap("tab10")
    cols = min(3, max(1, len(names)))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4.0 * rows), squeeze=False)
    xs = [p.scores[teacher].gap for p in pairs]
    for ax, name in zip(axes.flat, names, strict=False):
        for k, category in enumerate(categories):
            points = [(x, p.scores[name].gap) for x, p in zip(xs, pairs, strict=True)
                      if p.category == category]  # fmt: skip
            ax.scatter(*zip(*points, strict=True), s=12, alpha=0.7, color=palette(k % 10), label=category)
        low, high = min(xs), max(xs)
        ax.plot([low, high], [low, high], color="black", ls="--", lw=1)
        ax.axhline(0, color="#999", lw=0.6)
        ax.axvline(0, color="#999", lw=0.6)
        inh = inheritance[name][ALL]
        ax.set_title(f"{name}\nm = {fmt(inh.movement)}\nr = {fmt(inh.correlation)}", fontsize=9)
        ax.set_xlabel("teacher's gap (nats)")
        ax.set_ylabel("model's gap (nats)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="best")
    fig.suptitle("per-pair gap against the teacher's (dashed: equal to the teacher)", fontsize=10)
    return _png(fig)


def _bias_plot(results: ProbeResults, bias: dict[str, dict[str, BiasScores]]) -> bytes:
    import matplotlib.pyplot as plt

    colors = _colors(results)
    names = list(bias)
    categories = _categories(bias)
    fig, axes = plt.subplots(2, 1, figsize=(max(7.0, 1.1 * len(categories) * max(1, len(names)) / 2), 7))
    width = 0.8 / len(names)
    for ax, stat, scale, ylabel, ref in (
        (axes[0], _stereo_fraction, 100.0, "pairs preferring the stereotype (%)", 50.0),
        (axes[1], _mean_gap, 1.0, "mean gap (nats)", 0.0),
    ):
        for j, name in enumerate(names):
            values, err = _errors([stat(bias[name][c]) for c in categories], scale)
            positions = [i + (j - (len(names) - 1) / 2) * width for i in range(len(categories))]
            ax.bar(positions, values, width, yerr=err, capsize=2, color=colors[name], alpha=0.85, label=name)
        ax.axhline(ref, color="#555", ls="--", lw=1)
        ax.set_xticks(range(len(categories)), categories, rotation=20, ha="right")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_ylim(0, 100)
    handles, names_ = axes[0].get_legend_handles_labels()
    fig.legend(
        handles, names_, fontsize=8, ncol=min(4, len(names)), loc="upper center", bbox_to_anchor=(0.5, 0.95)
    )
    fig.suptitle("bias per category (95% intervals)", fontsize=11)
    return _png(fig, top=0.9)


def write_report(results: ProbeResults, out: Path) -> dict[str, Path]:
    """Write probe.md, probe.html and the plots (plots/*.png) into ``out``, each atomically."""
    images = plots(results)
    for name, png in images.items():
        atomic_write_bytes(out / PLOTS[name], png)
    blocks = report_blocks(results)
    title = "llm-neo probe"
    atomic_write_text(out / "probe.md", to_markdown(blocks, {n: PLOTS[n] for n in images}))
    atomic_write_text(out / "probe.html", to_html(blocks, title=title, images=images))
    return {"markdown": out / "probe.md", "html": out / "probe.html"}
