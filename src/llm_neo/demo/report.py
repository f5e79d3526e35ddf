"""The demo's report: ``report.md`` with a results table and the PNG plots it embeds, and ``results.json``.

Input is the dict ``llm_neo.demo.collect_results`` builds; nothing here trains or evaluates. The
targets of the comparison (the paper's ordering, the memory claim, a competent teacher and a weakened
pruned student) are checked against the measurements and stated as held or not held, with the
numbers; a closing note explains any that did not hold from the measurements themselves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llm_neo.runtime.atomic import atomic_write_json, atomic_write_text

ARM_LABELS = {"sft": "SFT", "lora": "LoRA", "kd": "KD", "neo": "Neo"}
ARM_COLORS = {"sft": "#7f7f7f", "lora": "#1f77b4", "kd": "#ff7f0e", "neo": "#2ca02c"}
PLOTS = {
    "loss": "plots/training_loss.png",
    "memory": "plots/accuracy_vs_memory.png",
    "time": "plots/accuracy_vs_time.png",
    "skills": "plots/accuracy_per_skill.png",
}


def write_report(results: dict[str, Any], out: Path) -> Path:
    """Write results.json, the plots and report.md under ``out``; return the report's path."""
    results["targets"] = check_targets(results)
    atomic_write_json(out / "results.json", results)
    write_plots(results, out)
    path = out / "report.md"
    atomic_write_text(path, render_report(results))
    return path


# ------------------------------------------------------------------------------------------------
# Numbers


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _mean_std(stats: dict[str, float], scale: float = 1.0, digits: int = 1) -> str:
    if stats["n"] > 1:
        return f"{scale * stats['mean']:.{digits}f} ± {scale * stats['std']:.{digits}f}"
    return f"{scale * stats['mean']:.{digits}f}"


def _cell(stats: dict[str, Any], key: str, scale: float = 1.0, digits: int = 1) -> str:
    return _mean_std(stats[key], scale, digits) if key in stats else ""


def table_rows(results: dict[str, Any]) -> list[dict[str, str]]:
    """One row per model: teacher, pruned student, then each arm (mean ± std over seeds)."""
    teacher, student = results["teacher"], results["student"]
    rows = []
    for name, ev in (("teacher", teacher), ("pruned student", student)):
        rows.append(
            {
                "model": name,
                "accuracy %": _pct(ev["accuracy"]),
                "CE": f"{ev['ce']:.3f}",
                "KL to teacher": f"{ev['kl_to_teacher']:.3f}",
                "top-1 agree %": _pct(ev["top1_agreement"]),
                "trainable": f"{ev['parameters']:,}" if name == "teacher" else "",
                "peak tensors MB": "",
                "est. peak MB": "",
                "peak RSS MB": "",
                "train state MB": "",
                "train s": f"{teacher['train_time_s']:.0f}" if name == "teacher" else "",
            }
        )
    for method, arm in results["arms"].items():
        s = arm["summary"]
        rows.append(
            {
                "model": method,
                "accuracy %": _cell(s, "accuracy", 100),
                "CE": _cell(s, "ce", digits=3),
                "KL to teacher": _cell(s, "kl_to_teacher", digits=3),
                "top-1 agree %": _cell(s, "top1_agreement", 100),
                "trainable": f"{arm['trainable_parameters']:,}",
                "peak tensors MB": _cell(s, "peak_tensor_memory_gb", 1024, 1),
                "est. peak MB": _cell(s, "planned_peak_mb", digits=1),
                "peak RSS MB": _cell(s, "peak_memory_gb", 1024, 0),
                "train state MB": _cell(s, "training_state_mb", digits=1),
                "train s": _cell(s, "train_time_s", digits=1),
            }
        )
    return rows


def format_results_table(results: dict[str, Any]) -> str:
    """The results table in Markdown (also what the demo prints at the end)."""
    rows = table_rows(results)
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row[c] for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def _per_skill_table(results: dict[str, Any]) -> str:
    skills = list(results["teacher"]["per_skill"])
    lines = ["| model | " + " | ".join(skills) + " |", "|---|" + "---|" * len(skills)]
    for name, ev in (("teacher", results["teacher"]), ("pruned student", results["student"])):
        lines.append(f"| {name} | " + " | ".join(_pct(ev["per_skill"][k]) for k in skills) + " |")
    for method, arm in results["arms"].items():
        cells = [_mean_std(arm["summary"]["per_skill"][k], 100) for k in skills]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mean(results: dict[str, Any], key: str, scale: float = 1.0) -> dict[str, float]:
    arms = results["arms"]
    return {m: scale * arms[m]["summary"][key]["mean"] for m in arms if key in arms[m]["summary"]}


def check_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The comparison's targets, each ``{"target", "held", "measured"}``, from the measurements."""
    acc = _mean(results, "accuracy", 100)
    tensors = _mean(results, "peak_tensor_memory_gb", 1024)
    planned = _mean(results, "planned_peak_mb")
    state = _mean(results, "training_state_mb")
    teacher, student = 100 * results["teacher"]["accuracy"], 100 * results["student"]["accuracy"]
    n = len(results["seeds"])
    over = f"mean over {n} seed{'s' if n > 1 else ''}"
    targets = [
        {
            "target": "teacher clearly competent (>= 90% exact match)",
            "held": teacher >= 90,
            "measured": f"teacher {teacher:.1f}%",
        },
        {
            "target": "pruned student clearly worse than the teacher before training (>= 20 points)",
            "held": teacher - student >= 20,
            "measured": f"pruned student {student:.1f}% vs teacher {teacher:.1f}%",
        },
        {
            "target": "Neo >= KD - 1 point",
            "held": acc["neo"] >= acc["kd"] - 1,
            "measured": f"Neo {acc['neo']:.1f}% vs KD {acc['kd']:.1f}% ({over})",
        },
        {
            "target": "Neo > LoRA",
            "held": acc["neo"] > acc["lora"],
            "measured": f"Neo {acc['neo']:.1f}% vs LoRA {acc['lora']:.1f}% ({over})",
        },
        {
            "target": "Neo > SFT",
            "held": acc["neo"] > acc["sft"],
            "measured": f"Neo {acc['neo']:.1f}% vs SFT {acc['sft']:.1f}% ({over})",
        },
        {
            "target": "Neo's memory below KD's: training state (weights, gradients, AdamW)",
            "held": state["neo"] < state["kd"],
            "measured": f"Neo {state['neo']:.1f} MB vs KD {state['kd']:.1f} MB",
        },
    ]
    if "neo" in planned and "kd" in planned:
        targets.append(
            {
                "target": "Neo's peak memory below KD's: estimated step peak (+ activations, logits)",
                "held": planned["neo"] < planned["kd"],
                "measured": f"Neo {planned['neo']:.1f} MB vs KD {planned['kd']:.1f} MB",
            }
        )
    if "neo" in tensors and "kd" in tensors:
        targets.append(
            {
                "target": TENSOR_TARGET,
                "held": tensors["neo"] < tensors["kd"],
                "measured": f"Neo {tensors['neo']:.1f} MB vs KD {tensors['kd']:.1f} MB",
            }
        )
    return targets


# ------------------------------------------------------------------------------------------------
# Plots (matplotlib, Agg: no display needed)


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average: per-step losses of a 32-sample batch are noisy."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def write_plots(results: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (out / "plots").mkdir(parents=True, exist_ok=True)
    arms = results["arms"]
    teacher_acc, student_acc = 100 * results["teacher"]["accuracy"], 100 * results["student"]["accuracy"]

    # Training loss per arm: each arm's own objective, and its CE part (the one term all arms share).
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    window = 1
    for method, arm in arms.items():
        curves = [run["curve"] for run in arm["runs"]]
        length = min(len(c) for c in curves)
        steps = [p["step"] for p in curves[0][:length]]
        window = max(1, length // 25)
        for ax, key in zip(axes, ("loss", "ce_loss"), strict=True):
            runs = [_smooth([p[key] for p in c[:length]], window) for c in curves]
            mean = [sum(r[i] for r in runs) / len(runs) for i in range(length)]
            ax.plot(steps, mean, label=ARM_LABELS[method], color=ARM_COLORS[method])
            if len(runs) > 1:
                low = [min(r[i] for r in runs) for i in range(length)]
                high = [max(r[i] for r in runs) for i in range(length)]
                ax.fill_between(steps, low, high, color=ARM_COLORS[method], alpha=0.15, lw=0)
    axes[0].set_title("training loss (each arm's objective)")
    axes[1].set_title("training CE (the term all arms share)")
    for ax in axes:
        ax.set_xlabel(f"optimizer step (moving average over {window})")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("per response token (nats)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / PLOTS["loss"], dpi=110)
    plt.close(fig)

    def scatter(ax: Any, key: str, scale: float, xlabel: str) -> None:
        for method, arm in arms.items():
            s = arm["summary"]
            if key not in s:
                continue
            ax.errorbar(
                scale * s[key]["mean"],
                100 * s["accuracy"]["mean"],
                xerr=scale * s[key]["std"],
                yerr=100 * s["accuracy"]["std"],
                fmt="o",
                ms=8,
                capsize=3,
                color=ARM_COLORS[method],
                label=ARM_LABELS[method],
            )
        ax.axhline(teacher_acc, color="black", ls="--", lw=1, label="teacher")
        ax.axhline(student_acc, color="red", ls=":", lw=1, label="pruned student, untrained")
        ax.set_xlabel(xlabel)
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharey=True)
    scatter(axes[0], "training_state_mb", 1.0, "training state, MB (weights + gradients + AdamW)")
    scatter(axes[1], "peak_tensor_memory_gb", 1024.0, "measured peak of live tensors, MB")
    scatter(axes[2], "peak_memory_gb", 1024.0, "measured peak RSS of the arm's process, MB")
    axes[0].set_ylabel("held-out exact match (%)")
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle("accuracy against memory: training state (left), measured tensors (middle), process (right)")
    fig.tight_layout()
    fig.savefig(out / PLOTS["memory"], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    scatter(ax, "train_time_s", 1.0, "training time, s (the optimisation loop)")
    ax.set_ylabel("held-out exact match (%)")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("accuracy against time")
    fig.tight_layout()
    fig.savefig(out / PLOTS["time"], dpi=110)
    plt.close(fig)

    skills = list(results["teacher"]["per_skill"])
    names = ["teacher", "pruned student", *arms]
    values = [
        [100 * results["teacher"]["per_skill"][k] for k in skills],
        [100 * results["student"]["per_skill"][k] for k in skills],
        *[[100 * arms[m]["summary"]["per_skill"][k]["mean"] for k in skills] for m in arms],
    ]
    colors = ["black", "red", *[ARM_COLORS[m] for m in arms]]
    fig, ax = plt.subplots(figsize=(11, 4.2))
    width = 0.8 / len(names)
    for j, (name, vals) in enumerate(zip(names, values, strict=True)):
        xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(skills))]
        ax.bar(xs, vals, width, label=ARM_LABELS.get(name, name), color=colors[j], alpha=0.85)
    ax.set_xticks(range(len(skills)), skills)
    ax.set_ylabel("held-out exact match (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8, ncol=len(names), loc="upper center", bbox_to_anchor=(0.5, -0.08))
    ax.set_title("accuracy per skill")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(out / PLOTS["skills"], dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# report.md


def render_report(results: dict[str, Any]) -> str:
    s = results["settings"]
    teacher, student = results["teacher"], results["student"]
    seeds = results["seeds"]
    n = len(seeds)
    timing, res = results.get("timing", {}), results["resources"]
    lines = ["# llm-neo demo report", ""]
    if results["quick"]:
        lines += [
            "> **Quick mode**: tiny models and a few steps, a smoke test of every stage. The numbers below "
            "say nothing about the methods; run `llm-neo demo` without `--quick` for the comparison.",
            "",
        ]
    lines += [
        f"A teacher, its depth-pruned student, and the student trained four ways (SFT, LoRA, KD, LLM-Neo) "
        f"for {s['arm_steps']} steps each on the same data, over {n} seed{'s' if n > 1 else ''} "
        f"({', '.join(map(str, seeds))}); every model is scored on the same {teacher['total']} held-out "
        f"questions. {results['device'].replace('cpu', 'CPU')}, {res['cores']} cores ({res['parallel']} "
        f"runs at a time, {res['threads_per_job']} thread{'s' if res['threads_per_job'] > 1 else ''} each)"
        + (f"; {timing['total_s'] / 60:.1f} min in all" if "total_s" in timing else "")
        + f", teacher {'reused from the cache' if teacher['cached'] else 'trained in this run'}.",
        "",
        "## Results",
        "",
        format_results_table(results),
        "",
        "*Accuracy*: exact match of greedy generations on the held-out split. *CE*, *KL to teacher* "
        "(forward KL, nats per response token) and *top-1 agree* (argmax equal to the teacher's): the same "
        "split, teacher-forced. Arms: mean ± standard deviation over seeds. Memory, four ways: *peak "
        "tensors* is measured, the peak bytes of live tensors during the first training steps (weights, "
        "trainable states, activations, logits: what `torch.cuda.max_memory_allocated` measures on a GPU; "
        "on a CPU llm-neo counts them op by op); *est. peak* is `llm-neo plan`'s estimate of the same, made "
        "before any weight loads; *peak RSS* is the peak resident memory of the arm's own process, most of "
        "it the ~0.4 GB Python/torch runtime every arm pays alike, plus what the C allocator keeps mapped; "
        "*train state* is the weights, gradients and AdamW moments alone. *Train s*: the optimisation "
        "loop's wall time.",
        "",
        "### Targets",
        "",
        "| target | held | measured |",
        "|---|---|---|",
    ]
    lines += [
        f"| {t['target']} | {'yes' if t['held'] else '**no**'} | {t['measured']} |"
        for t in results["targets"]
    ]
    lines += [
        "",
        "### Per skill (held-out exact match, %)",
        "",
        _per_skill_table(results),
        "",
        "## Plots",
        "",
        f"![training loss]({PLOTS['loss']})",
        "",
        f"![accuracy against memory]({PLOTS['memory']})",
        "",
        f"![accuracy against time]({PLOTS['time']})",
        "",
        f"![accuracy per skill]({PLOTS['skills']})",
        "",
        "## Closing note",
        "",
        *closing_note(results),
        "",
        "## What ran",
        "",
        f"- **Task** (version {results['data']['task_version']}, seed {results['config']['seed']}): "
        f"{s['train_per_skill']} training and {s['heldout_per_skill']} held-out records per skill "
        f"(`data/train.jsonl`, `data/heldout.jsonl`). The arms train on {s['distill_per_skill']} more per "
        "skill (`data/distill.jsonl`, one epoch of their step budget) that the teacher never saw. No "
        "instruction occurs in two splits, except that the capital facts repeat between the training sets; "
        "the held-out capital questions use a wording never seen with that country.",
        f"- **Teacher**: a Llama with {teacher['num_layers']} blocks, hidden {s['hidden_size']}, "
        f"{teacher['parameters']:,} parameters and a character-level tokenizer, trained from a random "
        f"initialisation by `distill --method sft` for {teacher['steps']} steps (lr {s['teacher_lr']:g}, "
        f"batch {s['batch_size']}, cosine, 10% warm-up) in {teacher['train_time_s']:.0f} s; cached in "
        f"`{teacher['path']}`.",
        f"- **Student**: the teacher pruned by `llm-neo prune` to {len(student['kept_layers'])} of "
        f"{teacher['num_layers']} blocks: kept {student['kept_layers']}, dropped {student['dropped_layers']} "
        f"by block importance ({student['metric']}: "
        f"{', '.join(f'{x:.3f}' for x in student['scores'])}), {student['parameters']:,} parameters.",
        f"- **Arms**: {s['arm_steps']} steps, batch {s['batch_size']}, AdamW, cosine schedule with 10% "
        f"warm-up, fp32 on CPU, the same data and seed for all four. SFT and KD train every weight at lr "
        f"{s['full_lr']:g}; LoRA and Neo train rank-{s['lora_r']} branches (alpha {2 * s['lora_r']}) on "
        f"every linear layer of every block at lr {s['lora_lr']:g}, the paper's rule of 10x the "
        "full-parameter rate. KD and Neo minimise 0.5·CE + 0.5·KL(teacher ‖ student), forward KL over the "
        "whole vocabulary, no temperature (the paper's defaults). LoRA branches are merged into the weights "
        "and the merge is verified, so every arm ends as a plain student of the same shape.",
    ]
    if results["config"].get("exact_memory"):
        lines.append(
            "- **--exact-memory**: the arms ran with glibc returning every freed block of 64 KB or more to "
            "the system at once, so their peak RSS tracks live memory; their times are about twice the "
            "default's."
        )
    if timing:
        loads = res.get("load_average_1min") or []
        if loads and max(loads) > res["cores"] + 0.5:
            lines.append(
                f"- **A busy machine**: the 1-minute load average reached {max(loads):.1f} on "
                f"{res['cores']} cores (other processes competing for the CPU), so every time in this "
                "report is longer than on an idle machine."
            )
        parts = [f"{k.removesuffix('_s')} {v:.0f} s" for k, v in timing.items() if k != "total_s"]
        cpu = results.get("cpu_s", {})
        lines.append(
            f"- **Time**: {', '.join(parts)}; total {timing.get('total_s', 0):.0f} s"
            + (f" ({sum(cpu.values()):.0f} CPU-seconds in the worker processes)" if cpu else "")
            + "."
        )
    lines += [
        "",
        "## Reproduce an arm, or run the comparison on real models",
        "",
        "Each arm's directory (`arms/<method>-seed<k>/`) holds the `config.yaml` that reproduces it: "
        "`llm-neo distill --config arms/neo-seed0/config.yaml --overwrite`. On real models the same "
        "comparison is `llm-neo prune` (for a pruned student), four `llm-neo distill` runs with `--method "
        "sft|lora|kd|neo` on the same `--data`, `--seed` and `--max-steps`, and `llm-neo eval`; see "
        "docs/demo.md.",
        "",
    ]
    return "\n".join(lines)


def closing_note(results: dict[str, Any]) -> list[str]:
    """What the measurements say, in plain words, including why a target did not hold."""
    arms = results["arms"]
    settings = results["settings"]
    acc = _mean(results, "accuracy", 100)
    std = {m: 100 * arms[m]["summary"]["accuracy"]["std"] for m in arms}
    ce = _mean(results, "ce")
    kl = _mean(results, "kl_to_teacher")
    state = _mean(results, "training_state_mb")
    planned = _mean(results, "planned_peak_mb")
    tensors = _mean(results, "peak_tensor_memory_gb", 1024)
    rss = _mean(results, "peak_memory_gb", 1024)
    secs = _mean(results, "train_time_s")
    held = {t["target"]: t["held"] for t in results["targets"]}
    teacher, student = 100 * results["teacher"]["accuracy"], 100 * results["student"]["accuracy"]
    n = len(results["seeds"])
    notes: list[str] = []
    if results["quick"]:
        notes.append(
            "Quick mode: the teacher trained for a handful of steps and is not competent, so no comparison "
            "below means anything; the quick demo only proves that every stage runs."
        )
    ranking = sorted(acc, key=lambda m: -acc[m])
    notes.append(
        "Held-out accuracy, best first: "
        + ", ".join(
            f"{ARM_LABELS[m]} {acc[m]:.1f}%" + (f" (± {std[m]:.1f})" if n > 1 else "") for m in ranking
        )
        + f". The teacher scores {teacher:.1f}%, the pruned student {student:.1f}% before any training."
    )
    failed = [t for t in results["targets"] if not t["held"]]
    if failed:
        notes.append(
            "Did **not** hold: " + "; ".join(f"{t['target']} ({t['measured']})" for t in failed) + "."
        )
    else:
        notes.append("Every target held.")
    if n > 1:
        spread = max(std.values())
        margins = ", ".join(f"{ARM_LABELS[m]} {acc['neo'] - acc[m]:+.1f}" for m in ("kd", "lora", "sft"))
        notes.append(
            f"How sure: Neo's margins are {margins} points; the seed-to-seed standard deviation of an arm's "
            f"accuracy is up to {spread:.1f} points (a seed changes the data order and the LoRA "
            "initialisation). A margin below that spread is not evidence either way; the ordering is "
            "measured on small models and a small task, and should be read as such."
        )
    skills = list(results["teacher"]["per_skill"])
    t_skill = {k: 100 * results["teacher"]["per_skill"][k] for k in skills}
    s_skill = {k: 100 * results["student"]["per_skill"][k] for k in skills}
    best = {k: max(100 * arms[m]["summary"]["per_skill"][k]["mean"] for m in arms) for k in skills}
    lost = [k for k in skills if t_skill[k] - s_skill[k] >= 20]
    if lost:
        stuck = [k for k in lost if t_skill[k] - best[k] >= 30]
        notes.append(
            "Pruning cost most in "
            + ", ".join(f"{k} ({t_skill[k]:.0f}% -> {s_skill[k]:.0f}%)" for k in lost)
            + (
                f"; within {settings['arm_steps']} steps no arm recovers "
                + ", ".join(f"{k} (best arm {best[k]:.0f}%)" for k in stuck)
                + ", a skill the dropped blocks carried and a short run does not rebuild"
                if stuck
                else ""
            )
            + "."
        )
    if not held["teacher clearly competent (>= 90% exact match)"]:
        notes.append(
            "The teacher is below 90%: it was not trained long enough for this run's settings (raise "
            "`--teacher-steps`); the arms distil a weaker teacher, which caps what KD and Neo can add."
        )
    lora_gain = acc["lora"] - acc["sft"]
    kd_gain = {"full": acc["kd"] - acc["sft"], "lora": acc["neo"] - acc["lora"]}
    notes.append(
        f"What the KD term adds: KD vs SFT {kd_gain['full']:+.1f} points, Neo vs LoRA {kd_gain['lora']:+.1f} "
        f"(KL to the teacher: KD {kl['kd']:.3f} vs SFT {kl['sft']:.3f}, Neo {kl['neo']:.3f} vs LoRA "
        f"{kl['lora']:.3f}). What LoRA's update adds over full fine-tuning at the paper's 10x learning rate: "
        f"LoRA vs SFT {lora_gain:+.1f}, Neo vs KD {acc['neo'] - acc['kd']:+.1f}."
    )
    if not held["Neo > SFT"]:
        notes.append(
            f"SFT is at or above Neo here: it moves every weight of the student, Neo only rank-"
            f"{settings['lora_r']} branches, and on a task whose labels are exact the teacher's distribution "
            f"carries little that the label does not (held-out CE SFT {ce['sft']:.3f}, Neo {ce['neo']:.3f})."
        )
    if not held["Neo > LoRA"]:
        notes.append(
            "LoRA is at or above Neo here: the KD term did not help within this step budget. Its labels are "
            "exact and the teacher is confident, so the teacher's distribution is close to the one-hot label "
            "on most tokens, and Neo gives half of its loss weight to matching it instead of the label."
        )
    if not held["Neo >= KD - 1 point"]:
        notes.append(
            f"KD is more than a point above Neo: KD trains all {arms['kd']['trainable_parameters']:,} "
            f"weights of the student, Neo {arms['neo']['trainable_parameters']:,}, and within "
            f"{settings['arm_steps']} steps the full update recovers more of what pruning removed."
        )
    memory = (
        f"Memory: Neo holds the same frozen teacher as KD but gradients and AdamW moments for the LoRA "
        f"branches only: training state {state['neo']:.1f} MB vs KD's {state['kd']:.1f} MB "
        f"({100 * (1 - state['neo'] / state['kd']):.0f}% less)"
    )
    if "neo" in tensors and "kd" in tensors:
        memory += (
            f"; measured over the first training steps, the peak of live tensors is {tensors['neo']:.1f} MB "
            f"vs {tensors['kd']:.1f} MB, {100 * (1 - tensors['neo'] / tensors['kd']):.0f}% less"
        )
    if "neo" in planned and "kd" in planned:
        memory += f" (estimated before the run: {planned['neo']:.1f} vs {planned['kd']:.1f} MB)"
    exact = results["config"].get("exact_memory", False)
    memory += (
        f". The peak RSS of the arms' processes is Neo {rss['neo']:.0f} MB and KD {rss['kd']:.0f} MB: "
        "about 400 MB of each is the Python/torch runtime every arm pays alike"
    )
    if rss["neo"] < rss["kd"]:
        memory += ", and the few MB the methods differ by show through" + (
            " (measured with --exact-memory, so allocator slack does not hide them)." if exact else "."
        )
    elif exact:
        memory += (
            ", and even with --exact-memory the difference of a few MB is within what the runtime's own "
            "allocations vary by."
        )
    else:
        memory += (
            "; Neo's is not the lower one because glibc's allocator keeps freed blocks in the heap, where "
            "the LoRA arms' many small adapter tensors fragment it by more than the few MB Neo saves (the "
            "RSS counts those blocks, the tensor peak does not). `llm-neo demo --exact-memory` returns freed "
            "blocks to the system at once, so the peak RSS tracks live memory (at about twice the training "
            "time)."
        )
    memory += " The saving scales with the models: on an 8B teacher and a 1B student it is gigabytes."
    notes.append(memory)
    notes.append(
        f"Time: training loops took SFT {secs['sft']:.1f} s, LoRA {secs['lora']:.1f} s, "
        f"KD {secs['kd']:.1f} s, Neo {secs['neo']:.1f} s on average. KD and Neo run the teacher's forward "
        "pass at every step; Neo saves the full student's weight gradients and optimizer update, not the "
        "teacher's forward pass."
    )
    return [f"- {note}" for note in notes]


TENSOR_TARGET = "Neo's peak memory below KD's: measured peak of live tensors"
