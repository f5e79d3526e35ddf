"""A distill run's output directory: what it holds, whether a new run may start there or an earlier one
resume, what --overwrite replaces, and the records a resume keeps.

    check_output_dir   take the directory's run lock; refuse to clobber an earlier run or a directory
                       that is not a run; on --resume, the checkpoint to continue from
    start_output_dir   a new run: the earlier run's outputs removed, its marker and config.yaml written
    check_space        warn when the filesystem holds less than the run will write
    check_fingerprint  on resume, refuse a run whose options, data or models changed since its checkpoint
    truncate_metrics   on resume, metrics.jsonl cut back to the checkpoint's step
    last_metrics       the metrics record of a step (how a run resumed at its last step ended)
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch

from llm_neo.config import DistillConfig, dump_yaml
from llm_neo.errors import ConfigError
from llm_neo.options import Effect, canonical_keys, load_yaml, options_with, to_dict
from llm_neo.runtime import rundir
from llm_neo.runtime.atomic import atomic_write_text, remove_outputs
from llm_neo.runtime.checkpoint import Fingerprint, list_checkpoints, read_fingerprint, resume_point
from llm_neo.runtime.distributed import World, all_gather
from llm_neo.summary import SUMMARY_FILE

log = logging.getLogger("llm_neo")

# Options that may differ between a run and its resumption without changing its result.
RESUMABLE_CHANGES = options_with(DistillConfig, Effect.COST, Effect.RUNTIME, Effect.EXISTING, Effect.REPORT)
# Options a checkpoint's fingerprint is not checked on: those above, and where the run is (a run directory
# moved or copied is the same run).
UNFINGERPRINTED = RESUMABLE_CHANGES | options_with(DistillConfig, Effect.PLACE)
# What a run writes in its output directory (and an --overwrite run replaces).
OUTPUTS = (
    "merged", "adapter", "export", "checkpoints", "metrics.jsonl", SUMMARY_FILE, "config.yaml",
    "tensorboard", "wandb", "mlruns",
)  # fmt: skip
# What marks a run directory written before the .llm-neo marker (a finished run, or one with records).
KNOWN = ("checkpoints/step-*", SUMMARY_FILE, "metrics.jsonl")


def check_output_dir(config: DistillConfig, out: Path, world: World) -> Path | None:
    """Refuse to clobber an earlier run; on --resume, check the run is the same and find its newest
    intact checkpoint (every file's size and sha256 checked; a damaged newer one is skipped with a
    warning naming both, CheckpointError when none is intact).

    Run by every rank, so every rank raises the same error; rank 0 first takes the directory's run
    lock (held until ``distill`` returns), the only thing it changes.
    """
    _hold(out, world)
    saved = out / "config.yaml"
    checked = rundir.check_output_dir(
        out,
        flag="--output-dir",
        overwrite=config.overwrite,
        resume=config.resume,
        marker="checkpoints/step-*",  # a run --resume can continue
        changed=lambda _: _changed_options(config, saved),
        known=KNOWN,
    )
    if checked.holds is rundir.Holds.OTHERS:
        raise ConfigError([rundir.not_a_run("--output-dir", str(out))])
    if checked.refusal is rundir.Refusal.NOTHING_TO_RESUME:
        again = (
            f"llm-neo distill --config {saved} --overwrite"
            if saved.is_file()
            else "the same command with --overwrite instead of --resume"
        )
        held = (
            "no run"
            if checked.holds is rundir.Holds.NOTHING
            else "a run that stopped before its first checkpoint"
        )
        raise ConfigError(
            [
                f"--resume: no checkpoint in {out / 'checkpoints'} ({out} holds {held}), so there is "
                f"nothing to continue. Start it again with: {again} (add --save-every N for checkpoints "
                "a later --resume can continue from)"
            ]
        )
    if checked.refusal is rundir.Refusal.CHANGED:
        raise ConfigError(
            [
                f"--resume: options differ from the run in {out}: {', '.join(checked.changed)}. "
                "Resume with the same options, or start a new --output-dir."
            ]
        )
    if checked.refusal is not None:
        if (out / SUMMARY_FILE).is_file():
            what = "a finished run (summary.json); pass --overwrite to replace it"
        elif checked.holds is rundir.Holds.RUN:
            what = (
                "a run that stopped after a checkpoint; pass --resume to continue it, --overwrite to "
                "replace it"
            )
        else:
            what = (
                "a run that stopped before its first checkpoint, which --resume cannot continue; pass "
                "--overwrite to start it again"
            )
        raise ConfigError([f"--output-dir {out} already holds {what}, or choose another --output-dir"])
    if checked.outcome is not rundir.Outcome.RESUME:
        return None
    found, skipped = resume_point(out / "checkpoints")
    if skipped and world.is_main:
        for path, problems in skipped:
            log.warning("checkpoint %s is damaged: %s", path, "; ".join(problems))
        log.warning(
            "resuming from %s instead of the damaged %s (its steps are trained again)",
            found,
            skipped[0][0],
        )
    return found


def _hold(out: Path, world: World) -> None:
    """Rank 0 takes the run lock of ``out``; every rank raises its refusal (none waits for a rank 0
    that has stopped)."""
    refused: list[str] = []
    if world.is_main:
        try:
            rundir.hold(out, "distill", "--output-dir")
        except ConfigError as err:
            refused = err.problems
    if world.enabled:
        refused = all_gather(refused, world)[0]
    if refused:
        raise ConfigError(refused)


def _changed_options(config: DistillConfig, saved: Path) -> list[str]:
    """The options that differ from the run's config.yaml and change its result (none without one)."""
    if not saved.is_file():
        return []
    return sorted(
        _diff_keys(canonical_keys(DistillConfig, load_yaml(saved)), to_dict(config)) - RESUMABLE_CHANGES
    )


def check_space(
    config: DistillConfig, out: Path, n_trainable: int, base_parameters: int, export_dtype: torch.dtype
) -> None:
    """Warn when the output directory's filesystem has less free space than the run will write: up to
    three checkpoints at once (two kept, one being written; 4 bytes per trainable weight and 8 of AdamW
    state) and the exported student."""
    checkpoints = 3 * 12 * n_trainable if config.save_every else 12 * n_trainable  # a stop writes one
    export = base_parameters * torch.empty((), dtype=export_dtype).element_size()
    adapter = 4 * n_trainable if config.uses_lora else 0
    rundir.check_space(out, {"checkpoints": checkpoints, "exported student": export + adapter})


def start_output_dir(config: DistillConfig, out: Path) -> None:
    """Remove what the earlier run there wrote (only what its marker lists), then mark ``out``."""
    remove_outputs(out, rundir.marked_outputs(out, OUTPUTS))
    rundir.write_marker(out, "distill", OUTPUTS)
    dump_yaml(dataclasses.replace(config, resume=False, overwrite=False), out / "config.yaml")


def _diff_keys(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for key in set(a) | set(b):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            keys |= _diff_keys(x, y, f"{prefix}{key}.")
        elif x != y:
            keys.add(f"{prefix}{key}")
    return keys


def check_fingerprint(checkpoint: Path, now: Fingerprint, world: World) -> None:
    """Refuse (ConfigError) to resume from ``checkpoint`` when what the run depends on differs from what
    it was written with: each differing option, data file or model named, old and new, and how to go on.
    A checkpoint written before fingerprints resumes, with a note that it could not be checked."""
    saved = read_fingerprint(checkpoint)
    if saved is None:
        if world.is_main:
            log.warning(
                "--resume: checkpoint %s was written by an llm-neo that kept no fingerprint of its options, "
                "data and models, so they could not be checked against this run's; resuming as given",
                checkpoint,
            )
        return
    changed = fingerprint_differences(saved, now)
    if changed:
        out = checkpoint.parent.parent
        raise ConfigError(
            [
                f"--resume: {line}. The checkpoint {checkpoint} was trained with the earlier one, so "
                f"resuming would mix the two: restore it, or start the run again with --overwrite "
                f"(or choose another --output-dir than {out})"
                for line in changed
            ]
        )


def fingerprint_differences(saved: Fingerprint, now: Fingerprint) -> list[str]:
    """One line per difference that changes the result: an option (not in RESUMABLE_CHANGES), a data
    file's bytes, a model's config or weights, the teacher cache's key (options in UNFINGERPRINTED
    may change)."""
    lines = [
        f"option {key} changed since the checkpoint ({_short(_get(saved.options, key))} -> "
        f"{_short(_get(now.options, key))})"
        for key in sorted(_diff_keys(saved.options, now.options) - UNFINGERPRINTED)
    ]
    for role in sorted(set(saved.data) | set(now.data)):
        if saved.data.get(role) != now.data.get(role):
            name = now.options.get("data") if role == "train" else role
            lines.append(
                f"the {role} data file {name} changed since the checkpoint (sha256 "
                f"{_short(saved.data.get(role))} -> {_short(now.data.get(role))})"
            )
    for role in sorted(set(saved.models) | set(now.models)):
        before, after = saved.models.get(role, {}), now.models.get(role, {})
        parts = [p for p in sorted(set(before) | set(after)) if before.get(p) != after.get(p)]
        if parts:
            shown = ", ".join(f"{p} {_short(before.get(p))} -> {_short(after.get(p))}" for p in parts)
            lines.append(f"the {role} {now.options.get(role)} changed since the checkpoint ({shown})")
    if saved.teacher_cache != now.teacher_cache:
        cache = now.options.get("teacher_cache") or saved.options.get("teacher_cache")
        lines.append(
            f"the teacher cache{f' {cache}' if cache else ''} changed since the checkpoint (key "
            f"{_short(saved.teacher_cache)} -> {_short(now.teacher_cache)})"
        )
    return lines


def _get(options: dict[str, Any], key: str) -> Any:
    """The value of a dotted option (``lora.r``) in nested options; None where absent."""
    node: Any = options
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _short(value: Any) -> str:
    """A value as a message shows it: a digest cut to its first 12 hex digits, anything long elided."""
    text = "none" if value is None else str(value)
    if text.startswith("sha256:"):
        return text[:19] + "…"
    return text if len(text) <= 60 else text[:57] + "..."


def last_metrics(path: Path, step: int) -> dict[str, float] | None:
    """The metrics.jsonl record of ``step`` (None: not there, as with --log-every skipping it)."""
    if not path.is_file():
        return None
    found = None
    for line in path.read_text().splitlines():
        if (record := _parse_record(line)) and record["step"] == step:
            found = record
    return found


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, forget records past the checkpoint so the file ends as an uninterrupted run's would."""
    if not path.exists():
        return
    kept = [
        line
        for line in path.read_text().splitlines()
        if (record := _parse_record(line)) and record["step"] <= step
    ]
    atomic_write_text(path, "".join(f"{line}\n" for line in kept))


def _parse_record(line: str) -> dict[str, Any] | None:
    """A metrics.jsonl record; None for an empty line or a torn one (a write cut short by a full disk)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and "step" in record else None


def last_good(checkpoints: Path) -> str:
    found = list_checkpoints(checkpoints)
    return f"the last good checkpoint is {found[-1]}" if found else "no checkpoint was written yet"


def step_number(checkpoint: Path) -> int:
    return int(checkpoint.name.removeprefix("step-"))
