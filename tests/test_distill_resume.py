"""--resume checks what the run depends on (its checkpoint's fingerprint), and a resume that starts at the
last step still reports how training ended (issue 21)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import ALPACA, interrupt_at, tiny_run, write_jsonl
from safetensors.torch import load_file, save_file

import llm_neo.distill as recipe
from llm_neo.cli import main
from llm_neo.config import DistillConfig
from llm_neo.distill import distill
from llm_neo.errors import ConfigError
from llm_neo.options import load_yaml
from llm_neo.runtime.checkpoint import MANIFEST, list_checkpoints
from llm_neo.runtime.integrity import with_checksum, without_checksum


@pytest.fixture(scope="module")
def run(tmp_path_factory, student_dir, teacher_dir, one_thread):
    """A 4-step neo run checkpointing every 2 steps, whole, and the same run killed after step 3 (its one
    checkpoint: step-2), on its own copies of the data and the student, which tests edit and restore."""
    root = tmp_path_factory.mktemp("resume")
    data = write_jsonl(root / "train.jsonl", ALPACA * 2)
    student = shutil.copytree(student_dir, root / "student")

    def config(out: Path, **overrides) -> DistillConfig:
        models = dict(student=str(student), teacher=str(teacher_dir), data=str(data))
        return tiny_run(out, **models, **(dict(max_steps=4, save_every=2) | overrides))

    whole = distill(config(root / "whole"))

    with pytest.raises(KeyboardInterrupt):
        distill(config(root / "killed"), on_step=interrupt_at(3))
    killed = root / "killed"
    return SimpleNamespace(config=config, whole=whole, killed=killed, root=root, data=data, student=student)


def copy_run(run, name: str) -> Path:
    """A copy of the killed run (its config.yaml names the copy's directory)."""
    out = run.root / name
    shutil.copytree(run.killed, out)
    saved = load_yaml(out / "config.yaml")
    (out / "config.yaml").write_text(yaml.safe_dump(saved | {"output_dir": str(out)}, sort_keys=False))
    return out


def contents(out: Path) -> dict[str, bytes]:
    """Every file under ``out`` and its bytes: what a refused resume must leave as it found."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def assert_same_run(out: Path, whole) -> None:
    """``out`` ended where the uninterrupted run ended: weights, final training losses, held-out scores."""
    a = load_file(Path(whole.config["output_dir"]) / "merged" / "model.safetensors")
    b = load_file(out / "merged" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=0)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == whole.steps
    assert set(summary["final"]) == {"loss", "ce_loss", "kd_loss"}
    assert summary["final"] == pytest.approx(whole.final)
    assert summary["heldout"] == pytest.approx(whole.heldout)


def edit_manifests(out: Path, edit) -> None:
    """Rewrite each checkpoint's manifest through ``edit`` (checksum renewed): an older llm-neo's."""
    for checkpoint in list_checkpoints(out / "checkpoints"):
        manifest = without_checksum(json.loads((checkpoint / MANIFEST).read_text()))
        edit(manifest)
        (checkpoint / MANIFEST).write_text(json.dumps(with_checksum(manifest), indent=2))


def test_data_edited_between_the_kill_and_resume_is_refused_by_name(run, capsys):
    out = copy_run(run, "data-edited")
    before, original = contents(out), run.data.read_bytes()
    try:
        run.data.write_bytes(original.replace(b'"5"', b'"6"'))  # one answer corrected in place
        assert main(["distill", "--config", str(out / "config.yaml"), "--resume", "-q"]) == 2
    finally:
        run.data.write_bytes(original)
    err = capsys.readouterr().err
    assert f"--resume: the train data file {run.data} changed since the checkpoint (sha256 sha256:" in err
    assert f"The checkpoint {out / 'checkpoints' / 'step-000002'} was trained with the earlier one" in err
    assert "restore it, or start the run again with --overwrite" in err
    assert contents(out) == before  # nothing removed, nothing written


def test_student_weights_replaced_between_the_kill_and_resume_are_refused_by_name(run, capsys):
    out = copy_run(run, "student-replaced")
    before = contents(out)
    weights = run.student / "model.safetensors"
    original = weights.read_bytes()
    try:
        tensors = load_file(weights)
        name = next(iter(tensors))
        tensors[name] = tensors[name] + 0.01  # another revision of the same architecture
        save_file(tensors, weights, metadata={"format": "pt"})
        assert main(["distill", "--config", str(out / "config.yaml"), "--resume", "-q"]) == 2
    finally:
        weights.write_bytes(original)
    err = capsys.readouterr().err
    assert f"--resume: the student {run.student} changed since the checkpoint (weights_sha256 sha256:" in err
    assert "config_sha256" not in err  # the config did not change: only what did is named
    assert contents(out) == before


def test_a_changed_kd_ratio_without_config_yaml_is_refused_and_the_checkpoint_holds_the_options(run, capsys):
    out = copy_run(run, "no-config")
    (out / "config.yaml").unlink()
    # The library's own check: no config.yaml to compare with, the checkpoint's fingerprint still has it.
    with pytest.raises(ConfigError, match=r"option kd_ratio changed since the checkpoint \(0\.5 -> 0\.3\)"):
        distill(run.config(out, resume=True, kd_ratio=0.3))
    assert not (out / "summary.json").exists() and (out / "checkpoints" / "step-000002").is_dir()
    # The command: --output-dir alone is enough; config.yaml is written again from the checkpoint.
    assert main(["distill", "--resume", "--output-dir", str(out), "--kd-ratio", "0.3", "-q"]) == 2
    assert "kd_ratio" in capsys.readouterr().err
    assert load_yaml(out / "config.yaml") == load_yaml(run.killed / "config.yaml") | {"output_dir": str(out)}
    (out / "config.yaml").unlink()
    assert main(["distill", "--resume", "--output-dir", str(out), "-q"]) == 0
    assert_same_run(out, run.whole)


def test_a_checkpoint_from_before_fingerprints_resumes_with_a_note(run, caplog):
    out = copy_run(run, "no-fingerprint")
    edit_manifests(out, lambda m: (m.pop("fingerprint"), m["progress"].pop("last")))
    with caplog.at_level(logging.WARNING, logger="llm_neo"):
        distill(run.config(out, resume=True))
    checkpoint = out / "checkpoints" / "step-000002"
    assert (
        f"--resume: checkpoint {checkpoint} was written by an llm-neo that kept no fingerprint of its "
        "options, data and models, so they could not be checked against this run's" in caplog.text
    )
    assert_same_run(out, run.whole)


@pytest.mark.parametrize("record", ["checkpoint", "metrics.jsonl"])
def test_a_kill_during_the_merge_resumes_with_the_final_losses_of_the_run(run, monkeypatch, record):
    out = run.root / f"merge-kill-{record}"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # as a kill -9 would leave it: trained, checkpointed, nothing merged

    monkeypatch.setattr(recipe, "merge_verified", killed)
    with pytest.raises(KeyboardInterrupt):
        distill(run.config(out))
    monkeypatch.undo()
    assert not (out / "merged").exists() and not (out / "summary.json").exists()
    if record == "metrics.jsonl":  # a checkpoint written before it kept the last step's metrics
        edit_manifests(out, lambda m: m["progress"].pop("last"))
    resumed = distill(run.config(out, resume=True))  # no step left: only the merge and the export
    assert resumed.final and resumed.final == pytest.approx(run.whole.final)
    assert_same_run(out, run.whole)


def test_fingerprint_differences_name_what_changes_results_and_only_that():
    from llm_neo.distill_dir import fingerprint_differences
    from llm_neo.runtime.checkpoint import Fingerprint

    options = {
        "data": "d.jsonl",
        "student": "s",
        "lr": 1e-4,
        "lora": {"r": 4},
        "save_every": 2,
        "output_dir": "a",
    }
    before = Fingerprint(
        options, {"train": "sha256:" + "a" * 64}, {"student": {"weights_sha256": "w1"}}, "k1"
    )
    moved = Fingerprint(options | {"save_every": 5, "output_dir": "b"}, before.data, before.models, "k1")
    assert fingerprint_differences(before, moved) == []  # cost and place only: the same run
    changed = Fingerprint(
        options | {"lora": {"r": 8}},
        {"train": "sha256:" + "b" * 64},
        {"student": {"weights_sha256": "w2"}},
        "k2",
    )
    assert fingerprint_differences(before, changed) == [
        "option lora.r changed since the checkpoint (4 -> 8)",
        f"the train data file d.jsonl changed since the checkpoint (sha256 sha256:{'a' * 12}… -> "
        f"sha256:{'b' * 12}…)",
        "the student s changed since the checkpoint (weights_sha256 w1 -> w2)",
        "the teacher cache changed since the checkpoint (key k1 -> k2)",
    ]
