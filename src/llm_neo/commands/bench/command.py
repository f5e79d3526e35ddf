"""`llm-neo bench` itself: every run of a config, the plan beside each, the ratios, the targets; the
report printed and written."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from llm_neo.commands.bench.cache_ranks import cache_ranks_row
from llm_neo.commands.bench.isolate import run_isolated
from llm_neo.commands.bench.on_policy import run_on_policy
from llm_neo.commands.bench.output import format_report
from llm_neo.commands.bench.peers import require_peers, run_peers
from llm_neo.commands.bench.runs import (
    BenchConfig,
    RunKey,
    RunSpec,
    find_row,
    ratio,
    result_key,
    row_name,
    validate,
    with_default_chunk,
)
from llm_neo.commands.bench.step import device_name, run_here
from llm_neo.commands.bench.targets import check_targets, quantization_cuts
from llm_neo.commands.bench.whole import WholeInputs, run_whole_runs
from llm_neo.records import dumps, from_json
from llm_neo.records.bench import (
    BenchReport,
    FailedWholeRun,
    LoadAverage,
    OnPolicyRun,
    PeakKind,
    PeerLossCheck,
    PeerRun,
    Settings,
    StepRun,
    Versions,
    WholeRun,
    WholeRunInputs,
)
from llm_neo.runtime.memory import CPU_MMAP_THRESHOLD, GiB
from llm_neo.runtime.workers import load_average


def add_plan(results: list[dict[str, Any]], config: BenchConfig, settings: dict[str, Any]) -> None:
    """The planner's estimate next to each measurement (on CPU with this run's measured process baseline)."""
    from llm_neo.commands.bench.step import teacher_config
    from llm_neo.commands.plan import RunShape, StepShape, estimate_arm, model_dims
    from llm_neo.commands.shapes import get_shape

    shape = get_shape(config.shape)
    student = model_dims(shape.student, lora_r=settings["lora_r"])
    # on a shape of two tokenizers a same-tokenizer run's teacher has the student's vocabulary (step.py)
    teachers = {
        x: model_dims(teacher_config(shape, x)) for x in {r["spec"].get("cross_tokenizer") for r in results}
    }
    for res in results:
        spec = res["spec"]
        across = spec.get("cross_tokenizer")
        device_type = settings["device_type"]
        if res.get("peak_kind") == "live_tensor_bytes":
            device_type, baseline = "cuda", 0  # tensor bytes only, like CUDA's allocated memory
        else:
            baseline = int(res.get("baseline_rss_bytes") or 0)
        run = RunShape(
            batch_size=spec["batch_size"],
            seq_len=spec["seq_len"],
            compute_bytes=settings["compute_dtype_bytes"],
            lora_r=spec["lora_r"],
            gradient_checkpointing=spec["gradient_checkpointing"],
            mlp_chunks=spec.get("mlp_chunks", 1),
            chunk_size=spec["chunk_size"],
            device_type=device_type,
            baseline=baseline,
            teacher_quant=spec.get("teacher_quant", "none"),
            student_quant=spec.get("student_quant", "none"),
            cross_tokenizer=across,
            # the teacher's length as this batch measured it (the plan's --teacher-length-ratio)
            teacher_length_ratio=(res.get("teacher_seq_len") or spec["seq_len"]) / spec["seq_len"],
        )
        est = estimate_arm(spec["method"], spec["impl"], StepShape(student, teachers[across], run))
        res["plan_bytes"] = est.total
        res["plan_phase"] = est.phase
        res["plan_components_gib"] = {k: round(v / GiB, 4) for k, v in est.components.items()}
        res["plan_teacher_weight_bytes"] = est.components["teacher weights"]
        res["plan_student_weight_bytes"] = est.components["student weights"]
        res["weights_floor_bytes"] = est.floor
        peak = res.get("peak_bytes") if res.get("status") == "ok" else None
        res["plan_error_pct"] = 100 * (est.total / peak - 1) if peak else None


def _versions() -> Versions:
    import peft
    import transformers

    from llm_neo import __version__

    return Versions(
        torch=torch.__version__,
        transformers=transformers.__version__,
        peft=peft.__version__,
        llm_neo=__version__,
        python=platform.python_version(),
    )


def _git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parents[3]

        def git(*args: str) -> str:
            run = subprocess.run(
                ["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=False
            )
            return run.stdout.strip()

        commit = git("rev-parse", "HEAD")
        # "+modified": a module the runs execute differs from that commit, which then does not describe them
        import llm_neo.distill  # noqa: F401  (the runs' code: train_step and everything it imports)

        files = sorted(
            str(Path(file).resolve())
            for name, m in list(sys.modules.items())
            if name.startswith("llm_neo") and (file := getattr(m, "__file__", None))
        )
        dirty = git("status", "--porcelain", "--", *files)
        return (commit + ("+modified" if dirty else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


def _step_runs(
    config: BenchConfig, specs: list[RunSpec], *, progress: bool, partial: Path | None
) -> list[dict[str, Any]]:
    """Every step run of ``specs``, isolated or here; each result appended to ``partial`` as it exists."""
    from tqdm.auto import tqdm

    results = []
    bar = tqdm(
        specs,
        desc=f"bench {config.shape}",
        unit="run",
        disable=None if progress else True,
        dynamic_ncols=True,
    )
    for one in bar:
        bar.set_postfix_str(one.name + ("" if one.impl == "plain" else f":{one.chunk_size}"))
        if config.isolate:
            res = run_isolated(one, config.run_timeout_s, config.malloc_mmap_threshold)
        else:
            res = run_here(one)
        res["name"] = row_name(one, config.loss_chunk_size)
        results.append(res)
        if partial is not None:  # each run's result as soon as it exists: a killed bench keeps them
            with partial.open("a") as handle:
                handle.write(json.dumps(res) + "\n")
    bar.close()
    return results


def _add_ratios(results: list[dict[str, Any]], whole: list[dict[str, Any]], chunk: int) -> None:
    """Each row's memory and speed against plain full KD's (step rows) or whole KD's (whole rows), the
    quantized rows' cuts, and each whole row's own step-bench peak."""
    base = next(x for x in results if (x["spec"]["method"], x["spec"]["impl"]) == ("kd", "plain"))
    base_ok = base.get("status") == "ok"
    for res in results:
        ok = res.get("status") == "ok" and base_ok
        res["memory_vs_kd"] = ratio(res.get("peak_bytes"), base.get("peak_bytes")) if ok else None
        res["speed_vs_kd"] = ratio(res.get("tokens_per_s"), base.get("tokens_per_s")) if ok else None
    quantization_cuts(results, "peak_bytes")
    for res in results:  # a cross-tokenizer run against the same arm with one tokenizer
        key = result_key(res["spec"])
        same = find_row(results, key._replace(cross=None)) if key.cross else None
        if same is not None and res.get("status") == "ok":
            res["memory_vs_same_tokenizer"] = ratio(res.get("peak_bytes"), same.get("peak_bytes"))
            res["speed_vs_same_tokenizer"] = ratio(res.get("tokens_per_s"), same.get("tokens_per_s"))
    if whole:
        whole_base = find_row(whole, RunKey("kd", "none", "none", "plain", chunk))
        for res in whole:
            ok = res.get("status") == "ok" and whole_base is not None
            res["memory_vs_kd"] = (
                ratio(res.get("process_peak_bytes"), whole_base.get("process_peak_bytes"))
                if ok and whole_base is not None
                else None
            )
            # The same run's step benchmark, if it was one of --runs: its training step alone, measured
            # the same way.
            step = find_row(results, result_key(res["spec"]))
            res["step_peak_bytes"] = step.get("peak_bytes") if step is not None else None
        quantization_cuts(whole, "process_peak_bytes")


def bench(config: BenchConfig, *, progress: bool = True) -> BenchReport:
    """Run every run of ``config`` and return the report (what LABEL.json holds).

    The rows are dicts while they are measured (each stage adds its keys: the run, the plan, the ratios,
    the quantization cuts), then records in the report."""
    from llm_neo.commands.shapes import get_shape
    from llm_neo.models.loading import resolve_device, resolve_dtype

    device = resolve_device(config.device)
    config = with_default_chunk(config, device.type)
    runs, whole_runs = validate(config)
    if config.peers:
        require_peers(config.peers)
    shape = get_shape(config.shape)
    dtype = resolve_dtype(config.dtype, device)
    batch = config.batch_size or shape.batch_size
    seq = config.seq_len or shape.seq_len
    r = config.lora_r or shape.lora_r
    memory = "cuda" if device.type == "cuda" else ("rss" if config.isolate else "tracked")

    def spec(key: RunKey, memory: str) -> RunSpec:
        return RunSpec(
            shape=config.shape,
            method=key.method,
            teacher_quant=key.teacher_quant,
            student_quant=key.student_quant,
            impl=key.impl,
            chunk_size=key.chunk,
            batch_size=batch,
            seq_len=seq,
            lora_r=r,
            kd_ratio=config.kd_ratio,
            warmup_steps=config.warmup_steps,
            steps=config.steps,
            gradient_checkpointing=config.gradient_checkpointing,
            mlp_chunks=config.mlp_chunks,
            device=config.device,
            dtype=config.dtype,
            seed=config.seed,
            memory=memory,
            num_threads=config.num_threads,
            cross_tokenizer=key.cross,
        )

    specs = [spec(key, memory) for key in runs]
    whole_specs = [spec(key, "rss") for key in whole_runs]
    load_start = load_average()
    date = dt.date.today().isoformat()
    label = config.label or f"{config.shape}-{date}"
    partial = Path(config.output) / f"{label}.runs.jsonl" if config.output else None
    if partial is not None:
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text("")
    results = _step_runs(config, specs, progress=progress, partial=partial)
    whole: list[dict[str, Any]] = []
    whole_inputs: dict[str, Any] | None = None
    peers: list[tuple[list[dict[str, Any]], dict[str, Any]]] = []  # the rows and the loss check
    on_policy: list[list[dict[str, Any]]] = []  # its rows, when asked for

    def run_the_others(inputs: WholeInputs, directory: Path, done: list[dict[str, Any]]) -> None:
        if config.peers:
            peers.append(run_peers(config, whole_specs, inputs, directory, done))
        if config.on_policy:
            on_policy.append(run_on_policy(config, whole_specs, inputs, directory))

    if whole_specs:
        whole, whole_inputs = run_whole_runs(
            config,
            whole_specs,
            progress=progress,
            partial=partial,
            also=run_the_others if config.peers or config.on_policy else None,
        )

    settings = _settings(config, shape.description, dtype, device, (batch, seq, r))
    cache_ranks = cache_ranks_row(
        config, Path(config.whole_run_dir) / "cache-ranks" if config.whole_run_dir else None
    )
    add_plan(results, config, settings)
    _add_ratios(results, whole, config.loss_chunk_size)
    device_names = [x["device"] for x in results if x.get("device")]
    peer_rows, check = peers[0] if peers else (None, None)
    versions = _versions()
    versions.trl = next((p["versions"]["trl"] for p in peer_rows or [] if p["versions"].get("trl")), None)
    return BenchReport(
        label=label,
        date=date,
        device=device_names[0] if device_names else device_name(device),
        versions=versions,
        git_commit=_git_commit(),
        settings=from_json(Settings, settings),
        load_average=LoadAverage(start=load_start, end=load_average(), cpus=os.cpu_count()),
        peak_kind=next((PeakKind(x["peak_kind"]) for x in results if x.get("peak_kind")), None),
        results=[from_json(StepRun, x, f"results[{i}]") for i, x in enumerate(results)],
        whole_runs=[_whole_row(x, f"whole_runs[{i}]") for i, x in enumerate(whole)],
        whole_inputs=from_json(WholeRunInputs, whole_inputs) if whole_inputs is not None else None,
        targets=check_targets(results, settings, whole),
        peers=[from_json(PeerRun, x, f"peers[{i}]") for i, x in enumerate(peer_rows)]
        if peer_rows is not None
        else None,
        peer_loss_check=from_json(PeerLossCheck, check) if check is not None else None,
        cache_ranks=cache_ranks,
        on_policy=[from_json(OnPolicyRun, x, f"on_policy[{i}]") for i, x in enumerate(on_policy[0])]
        if on_policy
        else None,
    )


def _settings(
    config: BenchConfig,
    description: str,
    dtype: torch.dtype,
    device: torch.device,
    size: tuple[int, int, int],
) -> dict[str, Any]:
    """The report's settings record: what every row ran with (``size``: batch, sequence length, LoRA r)."""
    batch, seq, r = size
    return {
        "shape": config.shape,
        "description": description,
        "batch_size": batch,
        "seq_len": seq,
        "lora_r": r,
        "kd_ratio": config.kd_ratio,
        "dtype": str(dtype).removeprefix("torch."),
        "compute_dtype_bytes": 4 if dtype == torch.float32 else 2,
        "device_type": device.type,
        "gradient_checkpointing": config.gradient_checkpointing,
        "mlp_chunks": config.mlp_chunks,
        "loss_chunk_size": config.loss_chunk_size,
        "warmup_steps": config.warmup_steps,
        "steps": config.steps,
        "isolate": config.isolate,
        "seed": config.seed,
        "num_threads": config.num_threads or torch.get_num_threads(),
        "malloc_mmap_threshold": config.malloc_mmap_threshold or None,
        "cpu_mmap_threshold": CPU_MMAP_THRESHOLD
        if device.type == "cpu" and not config.malloc_mmap_threshold
        else None,
    }


def _whole_row(row: dict[str, Any], where: str) -> WholeRun | FailedWholeRun:
    """A whole run's record: a failed run has its error and none of the measurements."""
    if row.get("status") == "ok":
        return from_json(WholeRun, row, where)
    return from_json(FailedWholeRun, row, where)


def run_bench(config: BenchConfig) -> int:
    """Run the benchmark, print the Markdown report and write LABEL.md/LABEL.json to --output.

    Returns 0 when every run (and cache launch) finished (an OOM or crash of a run is reported in its row
    and gives 1);
    targets that fail do not change the exit code: they are figures, not tests.
    """
    report = bench(config)
    text = format_report(report)
    print(text)
    if config.output:
        from llm_neo.runtime.atomic import atomic_write_text

        out = Path(config.output)
        out.mkdir(parents=True, exist_ok=True)
        label = report.label
        atomic_write_text(out / f"{label}.md", text)
        atomic_write_text(out / f"{label}.json", dumps(report))
        # The per-run progress file only matters when a bench is killed; the JSON now holds every run.
        (out / f"{label}.runs.jsonl").unlink(missing_ok=True)
        print(f"written: {out / label}.md, {out / label}.json")
    peers_ok = all(p.status in ("ok", "unsupported") for p in report.peers or [])
    cache_ok = all(c.status == "ok" for c in (report.cache_ranks.launches if report.cache_ranks else []))
    runs_ok = all(r.status == "ok" for r in [*report.results, *report.whole_runs])
    return 0 if peers_ok and cache_ok and runs_ok else 1
