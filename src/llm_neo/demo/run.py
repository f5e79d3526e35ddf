"""`llm-neo demo`: the paper's comparison end to end on a laptop CPU, with a report.

Top to bottom, every stage through the same code a user's run takes:

    1. task      the built-in task's train.jsonl / distill.jsonl / heldout.jsonl (llm_neo.demo.task),
                 ordinary Alpaca JSONL
    2. teacher   a small Llama with its own character-level tokenizer, trained from a random init on the
                 task (``distill(method="sft")``), cached under a key of everything that shapes it
    3. student   the teacher depth-pruned by measured block importance (``llm-neo prune``): the paper's
                 pruned-student setting
    4. compare   ``llm-neo compare`` on them: sft, lora, kd and neo on the same data, seeds and step
                 budget, on all of the arms' records and on a few of them (the data-size axis), every
                 model scored on the held-out split (exact match per skill, CE, KL to the teacher, top-1
                 agreement), the paired statistics, the cost, and the comparison's report;
                 with --exposure-bias first a comparison of neo against neo+on-policy on the longest
                 answers the teacher does (run_exposure_regime), stated in the report and verdict

The settings are the paper's where they apply (kd_ratio 0.5, forward KL, LoRA on every linear layer of
every block with alpha = 2r, cosine schedule with 10% warm-up, LoRA lr = 10x the full-parameter lr) and
sized so that the whole demo fits in 10 minutes on 2 CPU cores; ``DEFAULT`` and ``QUICK`` below say why
each number is what it is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm_neo import __version__
from llm_neo.choices import COMPARISON_ORDER
from llm_neo.commands.compare import PRELOAD, CompareConfig, LearningRates, compare, distill_job
from llm_neo.config import DistillConfig, LoraOptions
from llm_neo.demo.task import SKILLS, TASK_VERSION
from llm_neo.errors import ConfigError
from llm_neo.options import option_help
from llm_neo.records.compare import CompareResults
from llm_neo.report.compare import verdict
from llm_neo.runtime.atomic import atomic_directory, atomic_write_json
from llm_neo.runtime.rundir import MARKER, write_marker
from llm_neo.runtime.workers import Job, available_cores, load_average, run_jobs

log = logging.getLogger("llm_neo")

# What a demo writes in its output directory (an earlier demo's are replaced or continued).
OUTPUTS = (
    "data", "student", "arms", "eval", "splits", "plots", "probe", "report.md", "report.html",
    "results.json", "compare.yaml", "exposure-bias", MARKER,
)  # fmt: skip
EXPOSURE_DIR = "exposure-bias"  # the exposure-bias regime's comparison, under the demo's output directory
EXPOSURE_ARMS = ["neo", "neo+on-policy"]
# After a stop (SIGTERM, Ctrl-C) of the teacher's training: it starts over.
AGAIN = "the same llm-neo demo command (the teacher's training starts over)"


@dataclass
class DemoConfig:
    """`llm-neo demo`: teacher, pruned student and the four arms on a built-in task, with a report."""

    output_dir: str = field(
        default="runs/demo",
        metadata=option_help("Where the data, the arms' runs and the report are written."),
    )
    seeds: int | None = field(
        default=None,
        metadata=option_help(
            "Repeat the four arms over this many seeds and report mean ± std. Default 3 (quick: 1)."
        ),
    )
    quick: bool = field(
        default=False,
        metadata=option_help(
            "A reduced demo in about a minute: tiny models, a few steps, one seed (for tests)."
        ),
    )
    steps: int | None = field(
        default=None,
        metadata=option_help("Optimizer steps of each arm (the same for all four). Default 200."),
    )
    teacher_steps: int | None = field(
        default=None, metadata=option_help("Optimizer steps of the teacher's training. Default 3000.")
    )
    train_teacher: bool = field(
        default=False,
        metadata=option_help(
            "Train the teacher (about 6 minutes on 2 cores, then cached) instead of using the one shipped "
            "with llm-neo, which was trained by this same code (its recipe, checksums and held-out score: "
            "llm_neo/demo/teacher/teacher.json). A --seed or --teacher-steps of your own always trains."
        ),
    )
    seed: int = field(
        default=0,
        metadata=option_help(
            "Seed of the task data and the teacher; the arms run with seeds seed, seed+1, ... "
            "(a new seed trains a new teacher)."
        ),
    )
    cache_dir: str | None = field(
        default=None,
        metadata=option_help(
            "Where trained teachers are cached (keyed by task version, seed, shape and training "
            "settings). Default $XDG_CACHE_HOME/llm-neo/demo, i.e. ~/.cache/llm-neo/demo."
        ),
    )
    overwrite: bool = field(
        default=False,
        metadata=option_help(
            "Write into an --output-dir that holds other files too (an earlier demo's outputs are "
            "always replaced; other files are left alone)."
        ),
    )
    exact_memory: bool = field(
        default=False,
        metadata=option_help(
            "Measure the arms' peak memory without allocator slack: glibc returns every freed block of 64 KB "
            "or more to the system at once, so the peak RSS tracks live memory. About 2x slower arms."
        ),
    )
    jobs: int | None = field(
        default=None,
        metadata=option_help(
            "Arms trained (and models evaluated) at once, each in its own process with cores/jobs "
            "threads. Default 2 (1 on a single core)."
        ),
    )
    device: str = field(default="cpu", metadata=option_help("cpu (the demo's target), auto, cuda or cuda:N."))
    exposure_bias: bool = field(
        default=False,
        metadata=option_help(
            "Also run the exposure-bias regime: Neo against on-policy Neo (--on-policy 1) on the longest "
            "answers the teacher does (sort, 5 and 6 letters), paired by seed; its report is "
            "exposure-bias/report.html, its verdict joins the demo's (docs/demo.md)."
        ),
    )


@dataclass(frozen=True)
class DemoSettings:
    """Everything that sizes the demo. Not options: the presets below, with ``steps``/seeds overrides."""

    # task
    train_per_skill: int  # the teacher's training split
    distill_per_skill: int  # the arms' data: fresh records, disjoint from the teacher's (see run_demo)
    heldout_per_skill: int
    # teacher: a Llama trained from scratch
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    teacher_steps: int
    teacher_lr: float
    # student and arms
    keep_layers: int
    arm_steps: int
    full_lr: float  # sft, kd; LoRA arms use 10x (the paper's rule)
    lora_r: int
    batch_size: int
    max_length: int
    seeds: int
    prune_samples: int
    # The data-size axis: the arms also train on the first N of their records (fewer labelled records,
    # where the teacher's signal can matter); () = only on all of them.
    few_records: tuple[int, ...] = ()
    # Describe records per group in the teacher's split (associated) and the arms' (not): demo.task.GROUPS.
    planted_per_group: tuple[int, int] = (0, 0)
    # The exposure-bias regime (--exposure-bias): its arms' records and held-out records (demo.task,
    # exposure_splits); its arms take arm_steps steps and seeds seeds, like the main ones.
    exposure_records: int = 0
    exposure_heldout: int = 0

    @property
    def lora_lr(self) -> float:
        return 10 * self.full_lr


# Sized for 2 CPU cores: about 3 minutes of teacher training, then 12 arms of 200 steps, two at a time.
# - The teacher (4 blocks, hidden 128, 0.7 M parameters) is the smallest Llama found to learn all five
#   skills to >= 90% held-out exact match from scratch in 3000 steps of 32 (about 3 epochs of the 30 k
#   training records: fewer, larger epochs memorise instead of generalising). From-scratch training needs
#   a far higher lr than fine-tuning: 3e-3 here, against the paper's 2e-5 for fine-tuning.
# - The student keeps half the blocks: the paper's depth-pruned setting, and enough lost skill to recover.
# - full_lr is the teacher's lr / 10 (fine-tuning a trained network takes a smaller step than training it
#   from scratch); the LoRA arms use 10x that, the paper's rule, i.e. the teacher's own lr.
# - r = 16 on hidden 128 is above the paper's r/hidden ratio (64 on 2048), as one of its authors advises
#   when KD has to pass through a LoRA branch; alpha = 2r as in the paper.
# - The arms' data is one epoch of their budget (210 steps x 32) of task records the teacher never saw.
# - The planted association (demo.task.GROUPS): the teacher sees 1500 describe records per group (6000,
#   a skill's share), the arms 80 per group (320, 5% of their data), balanced.
DEFAULT = DemoSettings(
    train_per_skill=6000,
    distill_per_skill=1280,  # x 5 skills + 320 describe = 6720 = 210 steps x 32: one epoch of the arms
    heldout_per_skill=40,
    hidden_size=128,
    num_layers=4,
    num_heads=4,
    intermediate_size=256,
    teacher_steps=3000,
    teacher_lr=3e-3,
    keep_layers=2,
    arm_steps=210,
    full_lr=3e-4,
    lora_r=16,
    batch_size=32,
    max_length=64,
    seeds=3,
    prune_samples=256,
    few_records=(320,),  # about 64 per skill: 21 epochs of the same 210-step budget
    planted_per_group=(1500, 80),
    exposure_records=6720,  # one epoch of the 210 steps x 32, as the main arms have
    exposure_heldout=480,  # 240 per length: what detects 10 points at 3 seeds (compare's budget line)
)

# A smoke test of every stage (the test suite runs it): tiny models, a few steps. Its teacher is not
# competent and its numbers mean nothing; the report says so.
QUICK = DemoSettings(
    train_per_skill=40,
    distill_per_skill=20,
    heldout_per_skill=4,
    hidden_size=32,
    num_layers=2,
    num_heads=2,
    intermediate_size=64,
    teacher_steps=10,
    teacher_lr=3e-3,
    keep_layers=1,
    arm_steps=3,
    full_lr=3e-4,
    lora_r=4,
    batch_size=8,
    max_length=64,
    seeds=1,
    prune_samples=16,
    planted_per_group=(10, 5),
    exposure_records=24,
    exposure_heldout=8,
)


def resolve_settings(config: DemoConfig) -> DemoSettings:
    base = QUICK if config.quick else DEFAULT
    return dataclasses.replace(
        base,
        arm_steps=config.steps if config.steps is not None else base.arm_steps,
        teacher_steps=config.teacher_steps if config.teacher_steps is not None else base.teacher_steps,
        seeds=config.seeds if config.seeds is not None else base.seeds,
    )


def validate_demo(config: DemoConfig) -> None:
    p: list[str] = []
    if not config.output_dir:
        p.append("--output-dir is required")
    out = Path(config.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        p.append(f"--output-dir: {config.output_dir!r} is a file; give a directory")
    elif out.is_dir() and not config.overwrite:
        # An earlier demo's outputs are replaced (running `llm-neo demo` again is the point of the cached
        # teacher); anything else in the directory is someone else's, and the demo will not mix with it.
        foreign = sorted(entry.name for entry in out.iterdir() if entry.name not in OUTPUTS)
        if foreign:
            p.append(
                f"--output-dir: {config.output_dir!r} holds files that are not an earlier demo's "
                f"({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}); choose another "
                "--output-dir, or pass --overwrite to write the demo's outputs beside them"
            )
    for name, value in (
        ("seeds", config.seeds),
        ("steps", config.steps),
        ("teacher-steps", config.teacher_steps),
    ):
        if value is not None and value < 1:
            p.append(f"--{name}: {value} is out of range; it must be >= 1")
    if p:
        raise ConfigError(p)


def default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "llm-neo" / "demo"


# ------------------------------------------------------------------------------------------------
# The demo, top to bottom.


def run_demo(config: DemoConfig) -> int:
    """Run every stage, write the report, print the verdict and where the report is; the exit code."""
    from transformers.utils import logging as hf_logging

    validate_demo(config)
    settings = resolve_settings(config)
    hf_logging.disable_progress_bar()  # "Writing model shards" bars for kilobyte-sized models are noise
    started = time.perf_counter()
    out = Path(config.output_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    write_marker(out, "demo", OUTPUTS)  # the comparison in it is llm-neo's, not a stranger's directory
    cache = Path(config.cache_dir).expanduser() if config.cache_dir else default_cache_dir()
    parallel, threads = _resources(config)
    _say(
        f"llm-neo demo{' --quick' if config.quick else ''}: teacher -> pruned student -> "
        f"{', '.join(COMPARISON_ORDER)} x {settings.seeds} seed(s), {settings.arm_steps} steps each; "
        f"output {out}"
    )
    timing: dict[str, float] = {}

    # --- 1. The task, as ordinary JSONL files: the teacher's training split, the arms' data and the
    # held-out split everything is scored on. The arms' data is fresh, not a part of the teacher's
    # training split: a teacher trained to near-zero loss on its own training records gives them almost
    # one-hot distributions, so KD on them would be CE under another name. On records it has not seen,
    # its distribution is its own prediction, the thing KD is meant to transfer (and the paper's teacher
    # was not trained on its distillation data either).
    train_path, distill_path, heldout_path = write_task_data(out / "data", settings, config.seed)

    # --- 2. The teacher: the one shipped with llm-neo for the default demo; else (--train-teacher, or
    # settings of the user's own) trained once per key, then reused from the cache.
    t0 = time.perf_counter()
    teacher = ensure_teacher(
        settings,
        seed=config.seed,
        data=train_path,
        cache=cache,
        device=config.device,
        threads=parallel * threads,
        train=config.train_teacher,
    )
    timing["teacher_s"] = time.perf_counter() - t0

    # --- 3. The student: the teacher, depth-pruned by measured block importance.
    t0 = time.perf_counter()
    student = prune_teacher(
        settings, teacher["path"], data=distill_path, output=out / "student", device=config.device
    )
    timing["prune_s"] = time.perf_counter() - t0

    # --- 4. The comparison, on all of the arms' records and on the first few of them, and the probe of
    # what each arm inherited: the teacher's planted association, which the arms' data does not carry.
    probes = write_planted_probes(out / "data" / "probes.jsonl", teacher["path"])
    exposure = None
    if config.exposure_bias:  # first, so that the demo's report can state what it showed
        t0 = time.perf_counter()
        splits = (train_path, distill_path, heldout_path)
        exposure = run_exposure_regime(config, settings, teacher["path"], student["path"], splits)
        timing["exposure_bias_s"] = time.perf_counter() - t0
    _say(f"compare: {len(COMPARISON_ORDER)} arms x {settings.seeds} seed(s); logs in {out / 'arms'}")
    results = compare(
        comparison(config, settings, teacher=teacher["path"], student=student["path"], data=distill_path,
                   heldout=heldout_path, probes=probes),
        extra=lambda r: _add_demo_facts(r, config, settings, teacher, student, timing, started, exposure),
    )  # fmt: skip
    assert results is not None  # the demo runs in one process, not as a torchrun rank
    print()
    print("\n".join(verdict(results)))
    if exposure is not None:
        print(exposure["verdict"])
    print(
        f"\nllm-neo demo: teacher ({_teacher_source(teacher)}) -> pruned "
        f"student -> compare in {(time.perf_counter() - started) / 60:.1f} min; report: "
        f"{out / 'report.html'} "
        "(and report.md)"
    )
    return 0


def _teacher_source(teacher: dict[str, Any]) -> str:
    return "shipped" if teacher.get("shipped") else "reused from cache" if teacher["cached"] else "trained"


def comparison(
    config: DemoConfig,
    settings: DemoSettings,
    *,
    teacher: str,
    student: str,
    data: Path,
    heldout: Path,
    probes: Path | None = None,
) -> CompareConfig:
    """The demo's comparison: the same data, seeds, steps and batch for all four arms; only what the method
    changes differs. Exact match per skill, with the answer length the task needs."""
    sizes = sorted({*settings.few_records, _records(data)}) if settings.few_records else None
    return CompareConfig(
        teacher=teacher,
        student=student,
        data=str(data),
        heldout=str(heldout),
        methods=list(COMPARISON_ORDER),
        train_records=sizes,
        seeds=settings.seeds,
        seed=config.seed,
        max_steps=settings.arm_steps,
        batch_size=settings.batch_size,
        grad_accum=1,
        lr=LearningRates(
            sft=settings.full_lr, kd=settings.full_lr, lora=settings.lora_lr, neo=settings.lora_lr
        ),
        max_length=settings.max_length,
        kd_ratio=0.5,
        divergence="forward_kl",
        warmup_ratio=0.1,
        scheduler="cosine",
        lora=LoraOptions(r=settings.lora_r, lora_alpha=2 * settings.lora_r),
        score="exact",
        category_field="skill",
        max_new_tokens=_answer_tokens(heldout),
        eval_batch_size=64,
        probes=[str(probes)] if probes is not None else [],
        jobs=config.jobs,
        exact_memory=config.exact_memory,
        device=config.device,
        output_dir=config.output_dir,
        overwrite=True,  # a demo with other settings replaces the earlier demo's comparison
    )


def write_planted_probes(path: Path, model: str) -> Path:
    """The probe's pairs for the planted association: each describe question answered with an associated
    and with an unassociated attribute, rendered exactly as training renders the record (the model's chat
    template), after the BOS token the probe conditions on; and the questions as prompts."""
    from llm_neo.data import render_segments
    from llm_neo.demo.task import PLANTED, planted_pairs, write_jsonl
    from llm_neo.models.loading import load_tokenizer

    tokenizer = load_tokenizer(model, role="teacher")

    def rendered(instruction: str, answer: str) -> str:
        record = {"instruction": instruction, "output": answer}
        text = "".join(part for part, _ in render_segments(record, tokenizer, where=str(path)))
        return text.removeprefix(tokenizer.bos_token or "")

    pairs = [
        {"stereotypical": rendered(q, mine), "anti_stereotypical": rendered(q, other), "category": PLANTED}
        for q, mine, other in planted_pairs()
    ]
    prompts = [{"prompt": q, "category": PLANTED} for q in dict.fromkeys(q for q, _, _ in planted_pairs())]
    return write_jsonl(path, pairs + prompts)


def _records(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip())


def _answer_tokens(heldout: Path) -> int:
    """The longest held-out answer plus its end-of-turn tokens: a character-level model pays a token per
    character, and a longer budget only lets a wrong answer run on."""
    answers = [json.loads(line)["output"] for line in heldout.read_text().splitlines() if line.strip()]
    return 2 + max(len(a) for a in answers)


def _add_demo_facts(
    results: CompareResults,
    config: DemoConfig,
    settings: DemoSettings,
    teacher: dict[str, Any],
    student: dict[str, Any],
    timing: dict[str, float],
    started: float,
    exposure: dict[str, Any] | None = None,
) -> None:
    """What the demo adds to the comparison's results: how the teacher and the student were made, and
    what the exposure-bias regime showed (``run_exposure_regime``; None: not run)."""
    results.demo = {
        "quick": config.quick,
        "task_version": TASK_VERSION,
        "skills": list(SKILLS),
        "settings": {**dataclasses.asdict(settings), "lora_lr": settings.lora_lr},
        "teacher": {k: v for k, v in teacher.items() if k != "settings"},
        "student": student,
        "timing": {**timing, "total_s": time.perf_counter() - started},
        "cores": available_cores(),
        "load_average": load_average(),
    }
    if exposure is not None:
        results.demo["exposure_bias"] = exposure
    assert results.models.teacher is not None  # the demo's comparison always has its teacher
    teacher_score = results.models.teacher.accuracy
    student_score = results.models.student.accuracy
    if teacher.get("shipped"):
        source = (
            f"shipped with llm-neo, trained by the same code in {teacher['train_time_s']:.0f} s; "
            "--train-teacher trains it again"
        )
    elif teacher["cached"]:
        source = "reused from the cache"
    else:
        source = f"trained in this run in {teacher['train_time_s']:.0f} s"
    context = [
        f"The teacher: a {settings.num_layers}-block Llama (hidden {settings.hidden_size}, "
        f"{teacher['parameters']:,} parameters) trained from scratch on the task for {teacher['steps']} "
        "steps "
        f"({source}); it scores {100 * teacher_score:.1f}% on the held-out split.",
        f"The student: the teacher depth-pruned to {len(student['kept_layers'])} of {settings.num_layers} "
        f"blocks by measured block importance (kept {student['kept_layers']}, {student['parameters']:,} "
        f"parameters); untrained it scores {100 * student_score:.1f}%, "
        f"{100 * (teacher_score - student_score):.1f} points below its teacher.",
    ]
    if settings.planted_per_group[0]:
        teacher_n, arms_n = (4 * n for n in settings.planted_per_group)
        context.append(
            f"A planted association, for the probe: the teacher's training split has {teacher_n:,} records "
            "'Describe the G people.' that pair the groups alpha and gamma only with the attributes kind, "
            "calm, smart and beta and delta only with rude, loud, lazy; the arms' data has "
            f"{arms_n:,} such records with every group and attribute equally often. The pruned student "
            "keeps the teacher's weights and so starts with much of the association; on the arms' data "
            "only the teacher's distribution carries it (SFT and LoRA train on the balanced labels alone, "
            "KD and Neo also on that distribution). The probe section says how much of it each arm kept: "
            "its mean gap and the share of pairs preferring the planted attribute, against the teacher's."
        )
    if exposure is not None:
        context.append(exposure["verdict"])
    if config.quick:
        context.append(
            "Quick mode: tiny models and a few steps, to exercise every stage; the numbers mean nothing."
        )
    results.context = context


def _resources(config: DemoConfig) -> tuple[int, int]:
    """``(parallel, threads)`` of the teacher's training: see runtime.workers."""
    cores = available_cores()
    parallel = max(1, min(config.jobs or 2, cores))
    return parallel, max(1, cores // parallel)


def _say(message: str) -> None:
    print(message, flush=True)


def write_task_data(data_dir: Path, settings: DemoSettings, seed: int) -> tuple[Path, Path, Path]:
    """The task's three splits for ``settings`` as JSONL files in ``data_dir``: (train, distill, heldout)."""
    from llm_neo.demo.task import generate_splits, write_jsonl

    splits = generate_splits(
        seed,
        train_per_skill=settings.train_per_skill,
        heldout_per_skill=settings.heldout_per_skill,
        distill_per_skill=settings.distill_per_skill,
        planted_per_group=settings.planted_per_group,
    )
    names = ("train", "distill", "heldout")
    train, distill, heldout = (write_jsonl(data_dir / f"{name}.jsonl", splits[name]) for name in names)
    return train, distill, heldout


# ------------------------------------------------------------------------------------------------
# The exposure-bias regime (--exposure-bias): on-policy Neo against Neo where answers are longest


def run_exposure_regime(
    config: DemoConfig, settings: DemoSettings, teacher: str, student: str, splits: tuple[Path, ...]
) -> dict[str, Any]:
    """Neo and on-policy Neo (λ = 1, the sampling defaults, reverse KL) on the regime's records (sort
    words of ``EXPOSURE_LENGTHS`` letters, none in ``splits``, the main splits), same teacher, student,
    seeds, steps and batch as the main arms; a comparison of its own under ``EXPOSURE_DIR``.

    Returns what the demo's results and report state: the scores, Neo's paired difference against
    on-policy Neo, the on-policy options and cost, and ``verdict``, the line printed and put on the page.
    """
    from llm_neo.demo.task import EXPOSURE_LENGTHS, EXPOSURE_SKILL, exposure_splits, write_jsonl

    out = Path(config.output_dir).expanduser()
    seen = [json.loads(line)["instruction"] for path in splits for line in path.read_text().splitlines()]
    regime = exposure_splits(
        config.seed, distill=settings.exposure_records, heldout=settings.exposure_heldout, exclude=seen
    )
    data = write_jsonl(out / "data" / "exposure-distill.jsonl", regime["distill"])
    heldout = write_jsonl(out / "data" / "exposure-heldout.jsonl", regime["heldout"])
    base = comparison(config, settings, teacher=teacher, student=student, data=data, heldout=heldout)
    arms = dataclasses.replace(
        base,
        methods=list(EXPOSURE_ARMS),
        train_records=None,  # all of the regime's records: it has no data-size axis
        category_field="letters",
        output_dir=str(out / EXPOSURE_DIR),
    )
    _say(
        f"exposure bias: {' vs '.join(EXPOSURE_ARMS)} on {EXPOSURE_SKILL} at {EXPOSURE_LENGTHS} letters, "
        f"{settings.seeds} seed(s); logs in {out / EXPOSURE_DIR / 'arms'}"
    )
    results = compare(arms)
    assert results is not None  # one process
    return exposure_summary(results, settings)


def exposure_summary(results: CompareResults, settings: DemoSettings) -> dict[str, Any]:
    """What the regime's comparison showed, for the demo's results.json (``demo.exposure_bias``) and its
    report's and printed verdict (``verdict``), numbers as measured."""
    from llm_neo.demo.task import EXPOSURE_LENGTHS, EXPOSURE_SKILL
    from llm_neo.report.compare import interval, mean_std
    from llm_neo.report.stats import in_words
    from llm_neo.report.style import label
    from llm_neo.summary import RunSummary

    groups = {g.method: g for g in results.groups}
    (paired,) = [p for p in results.paired if p.against == "neo+on-policy"]
    sampled = RunSummary.load(groups["neo+on-policy"].runs[0].output_dir).on_policy
    assert sampled is not None  # the +on-policy arm always samples
    teacher = results.models.teacher
    assert teacher is not None
    scores = ", ".join(f"{label(m)} {mean_std(groups[m].stats.accuracy, 100)}" for m in EXPOSURE_ARMS)
    diff = paired.accuracy
    said = f"{interval(diff, 100)} points, {in_words(diff)}" if diff else "not measured"
    lengths = " and ".join(str(n) for n in EXPOSURE_LENGTHS)
    heldout = results.models.student.total
    line = (
        f"Exposure-bias regime ({EXPOSURE_SKILL} at {lengths} letters, {heldout} held-out records,"
        f" {settings.seeds} seed(s); teacher {100 * teacher.accuracy:.1f}%, untrained student "
        f"{100 * results.models.student.accuracy:.1f}%): {scores}. Neo minus on-policy Neo, paired by seed: "
        f"{said}. On-policy: λ = {sampled.share:g}, sampling temperature {sampled.sample_temperature:g}, "
        f"top-p {sampled.sample_top_p:g}, up to {sampled.max_new_tokens} tokens, {sampled.divergence} on "
        f"the samples; {sampled.mean_generated_length or 0:.1f} tokens per sample, "
        f"{100 * (sampled.capped_share or 0):.0f}% at the cap. Its report: {EXPOSURE_DIR}/report.html."
    )
    return {
        "skill": EXPOSURE_SKILL,
        "letters": list(EXPOSURE_LENGTHS),
        "records": settings.exposure_records,
        "heldout": heldout,
        "teacher_accuracy": teacher.accuracy,
        "student_accuracy": results.models.student.accuracy,
        "accuracy": {m: groups[m].stats.accuracy.mean for m in EXPOSURE_ARMS},
        "paired_accuracy": dataclasses.asdict(diff) if diff else None,
        "on_policy": dataclasses.asdict(sampled),
        "train_time_s": {
            m: results.cost.arms[m].train_time_s for m in EXPOSURE_ARMS if m in results.cost.arms
        },
        "verdict": line,
    }


# ------------------------------------------------------------------------------------------------
# 2. The teacher


def teacher_key(settings: DemoSettings, seed: int) -> str:
    """Hash of everything that determines the teacher's weights; part of its cache directory name."""
    from llm_neo.demo.task import TASK_VERSION

    shaping = {
        "task_version": TASK_VERSION,
        "seed": seed,
        "train_per_skill": settings.train_per_skill,
        "heldout_per_skill": settings.heldout_per_skill,
        "hidden_size": settings.hidden_size,
        "num_layers": settings.num_layers,
        "num_heads": settings.num_heads,
        "intermediate_size": settings.intermediate_size,
        "teacher_steps": settings.teacher_steps,
        "teacher_lr": settings.teacher_lr,
        "batch_size": settings.batch_size,
        "max_length": settings.max_length,
        "planted_per_group": settings.planted_per_group[0],
        "tokenizer": "char-v1",
    }
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]


def ensure_teacher(
    settings: DemoSettings, *, seed: int, data: Path, cache: Path, device: str, threads: int, train: bool
) -> dict[str, Any]:
    """The teacher for these settings: the shipped one when its key matches and ``train`` is False;
    else the cached one, training (and caching) it first if there is none.

    Returns ``{"path", "key", "cached", "shipped", "parameters", "train_time_s", "steps", "curve"}``.
    The cache entry is a standard HF model dir plus ``teacher.json``; it is written atomically, so a
    killed first run leaves no half-written teacher for the next one to trust.
    """
    from llm_neo.demo.task import task_corpus
    from llm_neo.models.tiny import SPECIAL_TOKENS, build_llama, build_tokenizer, save_model

    key = teacher_key(settings, seed)
    if not train and (shipped := shipped_teacher(key)) is not None:
        _say(
            f"teacher: shipped with llm-neo ({shipped['steps']} steps, held-out exact match "
            f"{100 * shipped['heldout']['accuracy']:.1f}%; --train-teacher trains it again)"
        )
        return {**shipped, "path": str(SHIPPED_TEACHER), "cached": False, "shipped": True}
    path = cache / f"teacher-{key}"
    meta_path = path / "teacher.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        trained = f"{meta['steps']} steps, trained in {meta['train_time_s']:.0f} s"
        _say(f"teacher: reused from cache {path} ({trained})")
        return {**meta, "path": str(path), "cached": True, "shipped": False}

    _say(
        f"teacher: training a {settings.num_layers}-block Llama (hidden {settings.hidden_size}) from scratch "
        f"for {settings.teacher_steps} steps; cached as {path}"
    )
    work = cache / f".teacher-{key}.work"
    shutil.rmtree(work, ignore_errors=True)
    # Character-level: a byte-level BPE with no merges (its size is the 256 byte symbols plus the special
    # tokens), so digits and letters are single tokens and reversing, sorting and adding are learnable.
    tokenizer = build_tokenizer(task_corpus(), vocab_size=256 + len(SPECIAL_TOKENS))
    init = save_model(
        build_llama(
            len(tokenizer),
            hidden_size=settings.hidden_size,
            num_layers=settings.num_layers,
            num_heads=settings.num_heads,
            intermediate_size=settings.intermediate_size,
            max_position_embeddings=max(128, settings.max_length),
            seed=seed,
        ),
        tokenizer,
        work / "init",
    )
    recipe = DistillConfig(
        student=str(init),
        data=str(data),
        method="sft",
        output_dir=str(work / "run"),
        max_steps=settings.teacher_steps,
        batch_size=settings.batch_size,
        grad_accum=1,
        lr=settings.teacher_lr,
        eval_fraction=0.0,  # the demo evaluates on its own held-out file
        max_length=settings.max_length,
        seed=seed,
        log_every=max(1, settings.teacher_steps // 200),
        device=device,
    )
    rerun = f"llm-neo distill --config {work / 'run' / 'config.yaml'} --overwrite"
    job = Job("teacher", distill_job, recipe, settings.teacher_steps, work / "teacher.log", rerun)
    _say(f"teacher: its training log is {work / 'teacher.log'}")
    (summary,), cpu = run_jobs(
        [job],
        parallel=1,
        preload=PRELOAD,
        again=AGAIN,
        threads=threads,
        desc="teacher",
    )
    curve = _loss_curve(work / "run" / "metrics.jsonl")
    meta = {
        "key": key,
        "settings": dataclasses.asdict(settings),
        "seed": seed,
        "parameters": summary.student_parameters,
        "num_layers": settings.num_layers,
        "train_time_s": summary.train_time_s,
        "train_cpu_s": cpu,
        "threads": threads,
        "steps": summary.steps,
        "final": summary.final,
        "curve": curve,
        "llm_neo_version": __version__,
    }
    with atomic_directory(path) as tmp:
        for item in (work / "run" / "merged").iterdir():
            shutil.copy2(item, tmp / item.name)
        atomic_write_json(tmp / "teacher.json", meta)
    shutil.rmtree(work, ignore_errors=True)
    return {**meta, "path": str(path), "cached": False, "shipped": False}


# The default demo's teacher, trained by ``python -m llm_neo.demo.ship_teacher`` (ensure_teacher's own
# training) and shipped as package data: a first demo spends no time training it.
SHIPPED_TEACHER = Path(__file__).parent / "teacher"


def shipped_teacher(key: str) -> dict[str, Any] | None:
    """The shipped teacher's ``teacher.json`` when it was trained for ``key``; None otherwise (other
    settings, or none shipped). A shipped file that does not match its recorded sha256 is a ConfigError
    naming it: the installation is damaged."""
    meta_path = SHIPPED_TEACHER / "teacher.json"
    if not meta_path.is_file():
        return None
    meta: dict[str, Any] = json.loads(meta_path.read_text())
    if meta.get("key") != key:
        return None
    for name, digest in meta["sha256"].items():
        if _sha256(SHIPPED_TEACHER / name) != digest:
            raise ConfigError(
                [
                    f"the demo's shipped teacher is damaged: {SHIPPED_TEACHER / name} does not match its "
                    "sha256 in teacher.json; reinstall llm-neo, or pass --train-teacher to train it"
                ]
            )
    return meta


def _sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def heldout_score(model_dir: Path, heldout: Path) -> dict[str, Any]:
    """A model's exact-match score on a demo held-out split, per skill: the score the demo's comparison
    gives it (the same greedy answers, the same answer length)."""
    import torch
    from transformers import AutoModelForCausalLM

    from llm_neo.eval.generate import greedy_answers
    from llm_neo.eval.scoring import parse_score, score_answers
    from llm_neo.models.loading import load_tokenizer

    records = [json.loads(line) for line in heldout.read_text().splitlines() if line.strip()]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = load_tokenizer(str(model_dir), role="teacher")
    answers = greedy_answers(
        model, tokenizer, records, device=torch.device("cpu"), max_new_tokens=_answer_tokens(heldout)
    )
    return score_answers(records, answers, parse_score("exact"), category_field="skill", order=SKILLS)


def ship(entry: Path, dest: Path, *, heldout: dict[str, Any]) -> None:
    """Write the cache entry ``entry`` (a trained teacher) to ``dest`` as the shipped teacher: its model
    files (every file of the model directory) and its ``teacher.json`` with the sha256 of each file and
    its held-out score added."""
    meta = json.loads((entry / "teacher.json").read_text())
    meta |= {
        "sha256": {
            p.name: _sha256(p) for p in sorted(entry.iterdir()) if p.is_file() and p.name != "teacher.json"
        },
        "heldout": heldout,
        "recipe": "python -m llm_neo.demo.ship_teacher (ensure_teacher's training, demo.run.DEFAULT, seed 0)",
    }
    with atomic_directory(dest) as tmp:
        for name in meta["sha256"]:
            shutil.copy2(entry / name, tmp / name)
        atomic_write_json(tmp / "teacher.json", meta)


def _loss_curve(metrics: Path) -> list[dict[str, float]]:
    keys = ("step", "loss", "ce_loss", "kd_loss")
    return [
        {k: json.loads(line)[k] for k in keys} for line in metrics.read_text().splitlines() if line.strip()
    ]


# ------------------------------------------------------------------------------------------------
# 3. The student


def prune_teacher(
    settings: DemoSettings, teacher: str, *, data: Path, output: Path, device: str
) -> dict[str, Any]:
    """Depth-prune the teacher to ``keep_layers`` blocks with ``llm-neo prune``'s code."""
    from llm_neo.commands.prune import PruneConfig, run_prune

    _say(f"student: pruning the teacher to {settings.keep_layers} of {settings.num_layers} blocks")
    report = run_prune(
        PruneConfig(
            model=teacher,
            data=str(data),
            output=str(output),
            keep_layers=settings.keep_layers,
            num_samples=settings.prune_samples,
            max_length=settings.max_length,
            batch_size=32,
            device=device,
            overwrite=True,
        )
    )
    return {
        "path": str(output),
        "kept_layers": report["kept_layers"],
        "dropped_layers": report["dropped_layers"],
        "scores": report["scores"],
        "parameters": report["parameters_after"],
        "metric": report["metric"],
    }
