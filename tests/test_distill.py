"""The recipe end to end on tiny models: the four arms, merge/verify/export, resume, failure modes."""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import ALPACA, damage, fill_disk, interrupt_at, tiny_run, write_jsonl
from peft import PeftModel
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import llm_neo.distill as recipe
import llm_neo.models.loading as loading
import llm_neo.runtime.atomic as atomic
from llm_neo.cli import main
from llm_neo.config import DistillConfig, LoraOptions, dump_yaml
from llm_neo.distill import distill
from llm_neo.errors import ConfigError, ModelError, OutputError, RunStopped, TrainingError
from llm_neo.options import build_config, load_yaml
from llm_neo.runtime.checkpoint import checkpoint_problems


@pytest.fixture()
def make_config(tmp_path, student_dir, teacher_dir, alpaca_jsonl):
    def make(method: str = "neo", name: str | None = None, **overrides) -> DistillConfig:
        models = dict(student=str(student_dir), teacher=str(teacher_dir), data=str(alpaca_jsonl))
        return tiny_run(tmp_path / (name or method), **(models | {"method": method} | overrides))

    return make


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


IDS = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46], [1, 50, 60, 70, 80, 90, 100, 110]])


@pytest.mark.parametrize("method", ["neo", "kd", "lora", "sft"])
def test_each_arm_exports_a_plain_student(make_config, student_dir, teacher_dir, method):
    summary = distill(make_config(method))
    out = Path(summary.config["output_dir"])
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    # The deployed student has the student's architecture and exact parameter count.
    assert type(merged) is type(student)
    assert sum(p.numel() for p in merged.parameters()) == sum(p.numel() for p in student.parameters())
    assert set(load_file(out / "merged" / "model.safetensors")) == set(
        load_file(student_dir / "model.safetensors")
    )
    assert (out / "merged" / "tokenizer.json").is_file()
    assert (out / "adapter").is_dir() == (method in ("neo", "lora"))
    # Training changed the student.
    assert not torch.allclose(logits_of(merged, IDS), logits_of(student, IDS))

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert {"step", "loss", "ce_loss", "kd_loss", "lr", "tokens_per_s", "peak_memory_gb"} <= set(r)
        kd_ratio = 0.5 if method in ("neo", "kd") else 0.0
        assert r["loss"] == pytest.approx((1 - kd_ratio) * r["ce_loss"] + kd_ratio * r["kd_loss"])
        assert (r["kd_loss"] > 0) == (method in ("neo", "kd"))

    assert summary.steps == 3
    if method in ("neo", "lora"):
        assert summary.merge_check["applicable"] and summary.merge_check["passed"]
        assert summary.merge_check["max_abs_logit_diff"] <= 1e-3
    else:  # sft and kd merge nothing: the check does not apply, rather than "passed, diff 0"
        assert summary.merge_check["applicable"] is False and "passed" not in summary.merge_check
    assert summary.merged_parameters == summary.student_parameters
    assert {"ce", "perplexity", "kl_to_teacher", "top1_agreement"} <= set(summary.heldout)
    assert summary.samples == {"train": 12, "heldout": 4, "dropped": 0}
    assert summary.config["lr"] == (2e-4 if method in ("neo", "lora") else 2e-5)
    # The CPU's tensor peak: at least what lives through the optimizer step (fp32 weights of both
    # models, trainable weights' gradients and two AdamW moments), at most the whole process.
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    n_student = sum(p.numel() for p in student.parameters())
    n_teacher = sum(p.numel() for p in teacher.parameters()) if method in ("neo", "kd") else 0
    n_trainable = summary.trainable_parameters
    n_lora = n_trainable if method in ("neo", "lora") else 0
    floor = 4 * (n_student + n_teacher + n_lora + 3 * n_trainable)
    assert summary.peak_tensor_memory_steps == 3
    assert floor < summary.peak_tensor_memory_gb * 2**30 < summary.peak_memory_gb * 2**30
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["heldout"] == summary.heldout

    # config.yaml reproduces the run through --config.
    import argparse

    again = build_config(DistillConfig, argparse.Namespace(), str(out / "config.yaml"))
    # The device's default loss chunk is written out: the run is reproduced on another device too.
    chunk = summary.config["loss_chunk_size"]
    assert again == dataclasses.replace(
        make_config(method).resolved(), resume=False, overwrite=False, loss_chunk_size=chunk
    )


def test_neo_trains_only_lora_branches(make_config, student_dir):
    summary = distill(make_config("neo"))
    out = Path(summary.config["output_dir"])
    before = load_file(student_dir / "model.safetensors")
    after = load_file(out / "merged" / "model.safetensors")
    adapted = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    for name, tensor in before.items():
        if name.endswith(tuple(f"{m}.weight" for m in adapted)):
            assert not torch.equal(after[name], tensor), f"{name} should carry the merged LoRA update"
        else:  # embeddings, norms, lm_head: untouched, bit for bit
            assert torch.equal(after[name], tensor), f"{name} changed but is not a LoRA target"
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    assert summary.trainable_parameters == sum(t.numel() for t in adapter.values())


def test_an_unset_loss_chunk_is_the_devices_default_and_recorded(make_config, student_dir, monkeypatch):
    # On a CPU the chunk is sized by the bytes of its [C, V] logits; a budget of 64 tokens' logits at
    # the tiny student's width makes that default differ from the GPU's 1024 (and from any vocabulary).
    import llm_neo.config as memory  # where the CPU chunk budget lives

    vocab = AutoModelForCausalLM.from_pretrained(student_dir).config.vocab_size
    monkeypatch.setattr(memory, "CPU_CHUNK_BYTES", 4 * vocab * 64)
    summary = distill(make_config("neo", device="cpu", max_steps=1))
    assert summary.config["loss_chunk_size"] == 64  # what the run used, for a resume and a reader
    given = distill(make_config("neo", name="given", device="cpu", max_steps=1, loss_chunk_size=5))
    assert given.config["loss_chunk_size"] == 5


def test_teacher_is_frozen_and_unchanged(make_config, teacher_dir, monkeypatch):
    loaded = {}
    real = loading.load_model

    def spy(path, *, role, **kw):
        model = real(path, role=role, **kw)
        loaded[role] = model
        return model

    monkeypatch.setattr(loading, "load_model", spy)  # the teacher loads frozen, through models.loading
    distill(make_config("neo"))
    teacher = loaded["teacher"]
    assert not teacher.training
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    original = load_file(teacher_dir / "model.safetensors")
    for name, tensor in teacher.state_dict().items():
        assert torch.equal(tensor, original[name])


def test_merged_equals_adapter_model(make_config, student_dir):
    out = Path(distill(make_config("neo", lora=LoraOptions(r=4, variant="moslora"))).config["output_dir"])
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    adapter_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(student_dir), out / "adapter"
    )
    torch.testing.assert_close(logits_of(merged, IDS), logits_of(adapter_model, IDS), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["neo", "kd"])
def test_resume_ends_where_an_uninterrupted_run_ends(make_config, method):
    whole = distill(make_config(method, name="whole", max_steps=6, save_every=2))

    killed = make_config(method, name="killed", max_steps=6, save_every=2)
    with pytest.raises(KeyboardInterrupt):
        distill(killed, on_step=interrupt_at(3))
    out = Path(str(killed.output_dir))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002"]
    assert not (out / "merged").exists()
    resumed = distill(dataclasses.replace(killed, resume=True))

    a = load_file(Path(whole.config["output_dir"]) / "merged" / "model.safetensors")
    b = load_file(out / "merged" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0)

    def losses(summary):
        path = Path(summary.config["output_dir"]) / "metrics.jsonl"
        return [
            v for r in map(json.loads, path.read_text().splitlines()) for v in (r["step"], r["loss"], r["lr"])
        ]

    assert losses(resumed) == pytest.approx(losses(whole))
    assert resumed.heldout == pytest.approx(whole.heldout)
    # The token counts carry over the resume: the checkpoint holds them.
    assert (resumed.tokens_trained, resumed.tokens_processed) == (
        whole.tokens_trained,
        whole.tokens_processed,
    )


def test_loss_is_a_token_mean_under_gradient_accumulation(make_config):
    # One micro-batch of 4 and two of 2 see the same samples per step; with the global token count as
    # normaliser the updates, and so the trained students, must agree.
    one = distill(make_config("kd", name="one", batch_size=4, grad_accum=1, max_steps=2))
    two = distill(make_config("kd", name="two", batch_size=2, grad_accum=2, max_steps=2))
    a = load_file(Path(one.config["output_dir"]) / "merged" / "model.safetensors")
    b = load_file(Path(two.config["output_dir"]) / "merged" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=2e-6, rtol=1e-5)
    # The same samples: the same tokens processed (prompt + response), more than the response tokens.
    assert one.tokens_processed == two.tokens_processed
    assert one.tokens_processed is not None and one.tokens_processed > one.tokens_trained


def test_nonfinite_loss_stops_and_keeps_last_checkpoint(make_config, monkeypatch):
    real = recipe.micro_batch_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        parts = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] > 4:  # step 3's first micro-batch (2 per step)
            return parts._replace(loss=parts.loss * float("nan"))
        return parts

    monkeypatch.setattr(recipe, "micro_batch_loss", poisoned)
    config = make_config("neo", max_steps=4, save_every=1)
    with pytest.raises(TrainingError, match=r"step 3: non-finite loss.*step-000002"):
        distill(config)
    out = Path(str(config.output_dir))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001", "step-000002"]
    assert not (out / "merged").exists() and not (out / "summary.json").exists()


def test_padded_student_vocabulary_is_aligned(make_config, padded_student_dir):
    summary = distill(make_config("neo", student=str(padded_student_dir)))
    assert summary.heldout["kl_to_teacher"] > 0
    merged = AutoModelForCausalLM.from_pretrained(Path(summary.config["output_dir"]) / "merged")
    assert merged.config.vocab_size == 352


def test_different_tokenizers_are_refused(make_config, foreign_dir):
    with pytest.raises(ModelError, match=r"teacher has \d+ tokens, the student 320; id \d+ is"):
        distill(make_config("neo", teacher=str(foreign_dir)))


def test_existing_output_dir_is_not_clobbered(make_config):
    config = make_config("lora", max_steps=1)
    distill(config)
    with pytest.raises(ConfigError, match=r"already holds a finished run \(summary.json\); pass --overwrite"):
        distill(config)
    assert distill(dataclasses.replace(config, overwrite=True)).steps == 1


def test_a_run_that_died_before_its_first_checkpoint_says_overwrite(make_config, capsys):
    config = make_config("lora", max_steps=3)

    def die(step: int, metrics: dict) -> None:
        raise KeyboardInterrupt  # a kill before any checkpoint (--save-every 0)

    with pytest.raises(KeyboardInterrupt):
        distill(config, on_step=die)
    out = Path(str(config.output_dir))
    assert (out / "config.yaml").is_file() and not (out / "checkpoints").exists()
    with pytest.raises(ConfigError, match="stopped before its first checkpoint, which --resume cannot"):
        distill(config)
    with pytest.raises(ConfigError) as info:
        distill(dataclasses.replace(config, resume=True))
    again = f"Start it again with: llm-neo distill --config {out / 'config.yaml'} --overwrite"
    assert again in str(info.value)
    assert main(["distill", "--config", str(out / "config.yaml"), "--overwrite", "-q"]) == 0  # what it offers


def test_resume_with_only_the_output_dir_reads_its_config(make_config, capsys):
    config = make_config("lora", max_steps=4, save_every=2)

    with pytest.raises(KeyboardInterrupt):
        distill(config, on_step=interrupt_at(2))
    out = Path(str(config.output_dir))
    # A flag that changes the result is still checked against the saved config...
    assert main(["distill", "--resume", "--output-dir", str(out), "--lr", "1e-3", "-q"]) == 2
    assert f"options differ from the run in {out}: lr." in capsys.readouterr().err
    # ...one that does not may change; --teacher, --student and --data come from out/config.yaml.
    assert main(["distill", "--resume", "--output-dir", f"{out}/", "--log-every", "2", "-q"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["config"]["student"] == config.student


def test_a_run_from_before_the_kd_temperature_rename_resumes(make_config):
    config = make_config("lora", max_steps=4, save_every=2, kd_temperature=2.0)

    with pytest.raises(KeyboardInterrupt):
        distill(config, on_step=interrupt_at(2))
    out = Path(str(config.output_dir))
    saved = (out / "config.yaml").read_text()
    assert "\nkd_temperature: 2.0\n" in saved
    (out / "config.yaml").write_text(
        saved.replace("\nkd_temperature:", "\ntemperature:")
    )  # as it was written
    assert main(["distill", "--resume", "--output-dir", str(out), "-q"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["config"]["kd_temperature"] == 2.0


def test_resume_with_changed_options_is_refused(make_config):
    config = make_config("lora", max_steps=2, save_every=1)
    distill(config)
    with pytest.raises(ConfigError, match=r"options differ.*lr"):
        distill(dataclasses.replace(config, resume=True, lr=1e-3))
    with pytest.raises(ConfigError, match="no checkpoint"):
        distill(make_config("lora", name="fresh", resume=True))


def test_config_problems_are_reported_together(make_config, tmp_path):
    bad = make_config(
        "neo",
        teacher=None,
        data=str(tmp_path / "missing.jsonl"),
        kd_ratio=1.5,
        student=str(tmp_path / "nope"),
        lora=LoraOptions(r=0),
    )
    with pytest.raises(ConfigError) as info:
        distill(bad)
    text = str(info.value)
    for expected in ("--teacher is required", "missing.jsonl", "--kd-ratio", "--student", "--lora.r"):
        assert expected in text
    assert len(info.value.problems) == 5
    assert not (tmp_path / "neo").exists()  # nothing half-written


def test_pickle_weights_need_opt_in(make_config, tmp_path, tokenizer):
    from llm_neo.models.tiny import build_llama

    path = tmp_path / "pickled"
    model = build_llama(len(tokenizer), hidden_size=32, num_layers=1)
    model.config.save_pretrained(path)
    torch.save(model.state_dict(), path / "pytorch_model.bin")  # a pickle checkpoint, as old hub repos have
    tokenizer.save_pretrained(path)
    with pytest.raises(ModelError, match="allow-pickle-weights"):
        distill(make_config("sft", student=str(path), max_steps=1))
    pickled = make_config("sft", name="ok", student=str(path), max_steps=1, allow_pickle_weights=True)
    assert distill(pickled).steps == 1


def test_yaml_config_round_trip(tmp_path):
    text = "method: kd\nlr: 2e-4\nlora:\n  r: 8\n"
    (tmp_path / "c.yaml").write_text(text)
    import argparse

    config = build_config(DistillConfig, argparse.Namespace(**{"lora.r": 16}), str(tmp_path / "c.yaml"))
    assert config.lr == 2e-4 and config.lora.r == 16 and config.method == "kd"
    assert load_yaml(tmp_path / "c.yaml")["lora"] == {"r": 8}


@pytest.mark.parametrize("method", ["neo", "kd"])
def test_chunked_and_plain_loss_train_the_same_student(make_config, method):
    # The chunked path is the default; the plain path (full logits) is its reference.
    chunked = distill(make_config(method, name="chunked", loss_chunk_size=3))
    plain = distill(make_config(method, name="plain", loss_impl="plain"))
    a = load_file(Path(chunked.config["output_dir"]) / "merged" / "model.safetensors")
    b = load_file(Path(plain.config["output_dir"]) / "merged" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-5)
    assert chunked.final == pytest.approx(plain.final, rel=1e-5)


def test_a_run_that_cannot_start_writes_nothing(make_config, tmp_path):
    config = make_config("neo", lora=LoraOptions(r=4, target_modules=["no_such_proj"]))
    with pytest.raises(ValueError, match="no_such_proj"):
        distill(config)
    assert not Path(str(config.output_dir)).exists()
    assert distill(dataclasses.replace(config, lora=LoraOptions(r=4))).steps == 3  # no --overwrite needed


@pytest.mark.parametrize("method", ["neo", "kd"])
def test_liger_loss_trains_the_same_student(make_config, method, monkeypatch):
    # Liger-Kernel's fused JSD loss (an optional extra) against llm-neo's own chunked loss.
    pytest.importorskip("liger_kernel.chunked_loss")
    ours = distill(make_config(method, name="chunked", loss_chunk_size=3))
    calls = []
    real = recipe.liger_distill_loss
    monkeypatch.setattr(recipe, "liger_distill_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    liger = distill(make_config(method, name="liger", loss_impl="liger", loss_chunk_size=3))
    assert len(calls) == 3 * 2  # every micro-batch of the 3 steps (grad_accum 2) went through Liger
    a = load_file(Path(ours.config["output_dir"]) / "merged" / "model.safetensors")
    b = load_file(Path(liger.config["output_dir"]) / "merged" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-5)
    assert liger.final == pytest.approx(ours.final, rel=1e-5)


def test_liger_loss_is_refused_where_it_cannot_run(make_config, tmp_path, monkeypatch):
    import llm_neo.config as config_module

    real_find_spec = config_module.importlib.util.find_spec
    monkeypatch.setattr(
        config_module.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "liger_kernel" else real_find_spec(name, *a),
    )
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "manifest.json").write_text("{}")
    config = make_config("neo", loss_impl="liger", divergence="tvd", teacher_cache=str(cache))
    with pytest.raises(ConfigError) as err:
        distill(config)
    text = str(err.value)
    assert "pip install 'llm-neo[liger]'" in text
    assert "--teacher-cache" in text and "--divergence tvd" in text
    assert not Path(config.output_dir).exists()


@pytest.mark.parametrize("method", ["neo", "kd"])
def test_mlp_chunks_train_the_same_student(make_config, method, monkeypatch):
    # Checkpointing each block's MLP in chunks of the sequence changes memory, not the gradients.
    whole = distill(make_config(method, name="whole", gradient_checkpointing=True))
    split = []
    real = recipe.enable_checkpointing
    monkeypatch.setattr(
        recipe, "enable_checkpointing", lambda model, **kw: split.append(real(model, **kw)) or split[-1]
    )
    chunked = distill(make_config(method, name="mlp3", gradient_checkpointing=True, mlp_chunks=3))
    assert split == [2]  # both blocks of the tiny student had their MLP split
    a = load_file(Path(whole.config["output_dir"]) / "merged" / "model.safetensors")
    b = load_file(Path(chunked.config["output_dir"]) / "merged" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-5)
    assert chunked.final == pytest.approx(whole.final, rel=1e-5)


def test_mlp_chunks_need_gradient_checkpointing(make_config):
    config = make_config("neo", mlp_chunks=4)
    with pytest.raises(ConfigError, match=r"--mlp-chunks 4 .*--gradient-checkpointing"):
        distill(config)
    assert not Path(config.output_dir).exists()


# ----------------------------------------------------------------------------------------------------
# Faults: damaged checkpoints, signals, full or read-only disks, out of memory


@pytest.fixture(scope="module")
def faults(tmp_path_factory, student_dir, teacher_dir, one_thread):
    """A 6-step neo run checkpointing every 2 steps, whole, and the same run killed after step 5 (its
    checkpoints: step-2 and step-4); the fault tests damage copies of the killed one."""
    root = tmp_path_factory.mktemp("faults")
    data = write_jsonl(root / "train.jsonl", ALPACA * 2)

    def config(out: Path, **overrides) -> DistillConfig:
        models = dict(student=str(student_dir), teacher=str(teacher_dir), data=str(data))
        return tiny_run(out, **models, **(dict(max_steps=6, save_every=2) | overrides))

    whole = distill(config(root / "whole"))

    with pytest.raises(KeyboardInterrupt):
        distill(config(root / "killed"), on_step=interrupt_at(5))
    return SimpleNamespace(config=config, whole=whole, killed=root / "killed", root=root)


def merged_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "merged" / "model.safetensors")


def assert_same_run(out: Path, whole) -> None:
    """``out`` ended where the uninterrupted run ``whole`` ended: weights, metrics, held-out scores."""
    a, b = merged_weights(Path(whole.config["output_dir"])), merged_weights(out)
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=0)

    def curve(path: Path) -> list[float]:
        return [v for r in map(json.loads, path.read_text().splitlines()) for v in (r["step"], r["loss"])]

    assert curve(out / "metrics.jsonl") == pytest.approx(
        curve(Path(whole.config["output_dir"]) / "metrics.jsonl")
    )
    assert json.loads((out / "summary.json").read_text())["heldout"] == pytest.approx(whole.heldout)


def copy_run(faults, name: str) -> Path:
    """A copy of the killed run that --resume accepts (its config.yaml names the copy's directory)."""
    out = faults.root / name
    shutil.copytree(faults.killed, out)
    saved = load_yaml(out / "config.yaml")
    (out / "config.yaml").write_text(yaml.safe_dump(saved | {"output_dir": str(out)}, sort_keys=False))
    return out


@pytest.mark.parametrize("how", ["truncate", "corrupt"])
@pytest.mark.parametrize("name", ["trainable.safetensors", "optimizer.pt", "state.pt", "manifest.json"])
def test_resume_falls_back_past_a_damaged_checkpoint_and_ends_where_it_would(faults, name, how, caplog):
    out = copy_run(faults, f"{name}-{how}")
    damage(out / "checkpoints" / "step-000004" / name, how)
    with caplog.at_level(logging.WARNING, logger="llm_neo"):
        resumed = distill(faults.config(out, resume=True))
    newest, older = out / "checkpoints" / "step-000004", out / "checkpoints" / "step-000002"
    assert f"checkpoint {newest} is damaged: {name}: " in caplog.text
    assert f"resuming from {older} instead of the damaged {newest}" in caplog.text
    assert resumed.steps == 6
    assert_same_run(out, faults.whole)


def test_no_intact_checkpoint_stops_with_the_directory_named(faults, capsys):
    out = copy_run(faults, "none-intact")
    damage(out / "checkpoints" / "step-000004" / "optimizer.pt", "truncate")
    damage(out / "checkpoints" / "step-000002" / "trainable.safetensors", "corrupt")
    assert main(["distill", "--config", str(out / "config.yaml"), "--resume"]) == 1
    err = capsys.readouterr().err
    assert f"no intact checkpoint in {out / 'checkpoints'}" in err
    assert "step-000004: optimizer.pt:" in err and "step-000002: trainable.safetensors:" in err


@pytest.mark.parametrize(("signum", "seed"), [(signal.SIGTERM, 0), (signal.SIGINT, 1), (signal.SIGUSR1, 2)])
def test_a_signal_at_a_random_step_checkpoints_it_and_the_resume_ends_where_it_would(faults, signum, seed):
    at = random.Random(seed).randint(1, 5)
    out = faults.root / f"signal-{signum}"

    def signal_at(step, metrics):
        if step == at:
            os.kill(os.getpid(), signum)

    config = faults.config(out, save_every=0)  # no periodic checkpoints: the stop writes one anyway
    with pytest.raises(RunStopped) as info:
        distill(config, on_step=signal_at)
    name = signal.Signals(signum).name
    command = f"llm-neo distill --config {out / 'config.yaml'} --resume"
    assert str(info.value) == (
        f"stopped by {name} after step {at} of 6: checkpoint {out / 'checkpoints' / f'step-{at:06d}'} "
        f"written. Resume with: {command}"
    )
    assert info.value.exit_code == 75 and info.value.resume == command
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step-{at:06d}"]
    assert not (out / "merged").exists()
    assert signal.getsignal(signum) in (signal.SIG_DFL, signal.default_int_handler)  # handlers restored
    assert main(shlex.split(command)[1:]) == 0  # the printed command, as printed
    assert_same_run(out, faults.whole)


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(faults, monkeypatch, capsys):
    out = faults.root / "enospc-checkpoint"
    armed = {"on": False}
    monkeypatch.setattr(
        atomic, "_write", lambda fd, data: _write_all(fd, data, armed)
    )  # a checkpoint's bytes

    def fill_after_step_3(step, metrics):
        armed["on"] = step == 3

    with pytest.raises(OutputError) as info:
        distill(faults.config(out), on_step=fill_after_step_3)
    message = str(info.value)
    ckpt = out / "checkpoints"
    assert (
        f"cannot write checkpoint step-000004 to {ckpt / 'step-000004'}: no space left on the device"
        in message
    )
    assert f"Kept: the previous checkpoint {ckpt / 'step-000002'}." in message
    assert f"Then resume with: llm-neo distill --config {out / 'config.yaml'} --resume" in message
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-000002"]  # intact, and no temporary left
    assert checkpoint_problems(ckpt / "step-000002") == []
    armed["on"] = False
    distill(faults.config(out, resume=True))
    assert_same_run(out, faults.whole)


def _write_all(fd, data, armed):
    if armed["on"]:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view) :]


def test_a_full_disk_during_the_export_keeps_the_adapter_and_checkpoint(faults, monkeypatch):
    import transformers.modeling_utils

    out = faults.root / "enospc-export"

    def full(*args, **kwargs):  # safetensors' own words on a full disk
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)
    with pytest.raises(OutputError) as info:
        distill(faults.config(out))
    message = str(info.value)
    assert f"cannot write the exported student to {out / 'merged'}: no space left on the device" in message
    assert f"adapter/ in {out}" in message
    assert f"checkpoint {out / 'checkpoints' / 'step-000006'} (after fixing it: llm-neo distill" in message
    assert not (out / "merged").exists() and not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.undo()
    resumed = distill(faults.config(out, resume=True))  # no step left: only the merge and the export
    assert resumed.steps == 6
    assert_same_run(out, faults.whole)


def test_a_really_full_disk_mid_run_and_at_the_export(faults, tmpfs):
    mount = tmpfs("16m")
    out = mount / "run"
    fill = {"at": 3, "file": None}

    def fill_disk_at(step, metrics):
        if step == fill["at"]:
            fill["file"] = fill_disk(mount)

    with pytest.raises(OutputError, match="no space left on the device") as info:
        distill(faults.config(out), on_step=fill_disk_at)
    assert f"Kept: the previous checkpoint {out / 'checkpoints' / 'step-000002'}" in str(info.value)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002"]
    fill["file"].unlink()
    fill["at"] = 6  # after the last checkpoint: the export finds the disk full
    with pytest.raises(OutputError, match="no space left on the device") as info:
        distill(faults.config(out, resume=True), on_step=fill_disk_at)
    assert "step-000006 (after fixing it" in str(info.value)
    fill["file"].unlink()
    distill(faults.config(out, resume=True))
    assert_same_run(out, faults.whole)


def test_the_output_directory_vanishing_mid_run_is_named(faults):
    out = faults.root / "vanished"

    def remove(step, metrics):
        if step == 1:
            shutil.rmtree(out)

    with pytest.raises(OutputError, match=r"metrics of step 2 to .*: the directory vanished"):
        distill(faults.config(out, save_every=0), on_step=remove)


def test_an_unwritable_output_directory_is_refused_before_any_model_loads(faults, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(recipe, "load_model", never)
    monkeypatch.setattr(recipe, "load_teacher", never)
    parent = faults.root / "readonly"
    parent.mkdir()
    # Root writes whatever the mode bits say (chmod 0555 does not stop it): fake the permission check.
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == parent else real(p, mode))
    with pytest.raises(ConfigError, match=r"is not writable \(permission denied\); nothing was written"):
        distill(faults.config(parent / "run"))
    assert list(parent.iterdir()) == []
    a_file = faults.root / "a-file"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match="it is a file, not a directory"):
        distill(faults.config(a_file))
    with pytest.raises(ConfigError, match="a-file is a file, not a directory"):
        distill(faults.config(a_file / "run"))


def test_a_read_only_filesystem_is_refused_before_any_model_loads(faults, monkeypatch, tmpfs):
    read_only = tmpfs("1m", read_only=True)  # a real read-only mount (needs root; skips otherwise)
    monkeypatch.setattr(recipe, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ConfigError, match=f"{read_only} is on a read-only filesystem; nothing was written"):
        distill(faults.config(read_only / "run"))


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        MemoryError(),
        RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8589934592 bytes"),
    ],
)
def test_out_of_memory_names_the_step_and_settings_and_keeps_the_checkpoint(
    faults, monkeypatch, capsys, error
):
    out = faults.root / f"oom-{type(error).__name__}"
    real = recipe.train_step
    calls = {"n": 0}

    def runs_out(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(recipe, "train_step", runs_out)
    config = faults.config(out, save_every=1)
    dump_yaml(config, faults.root / f"{out.name}.yaml")
    assert main(["distill", "--config", str(faults.root / f"{out.name}.yaml")]) == 1
    message = capsys.readouterr().err
    assert "step 3 ran out of host memory on cpu" in message
    assert "--batch-size 2 x --grad-accum 2, sequences up to" in message
    assert f"the last good checkpoint is {out / 'checkpoints' / 'step-000002'}" in message
    for advice in ("--batch-size 1 --grad-accum 4", "--gradient-checkpointing", "--loss-chunk-size 512"):
        assert advice in message
    assert f"`llm-neo plan --student {faults.config(out).student}" in message
    assert "llm-neo plan estimates the peak per process: these settings " in message  # the CLI's estimate
    assert "--gradient-checkpointing " in message.split("llm-neo plan estimates")[1]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001", "step-000002"]


@pytest.mark.slow
def test_sigterm_to_the_command_saves_and_the_printed_command_resumes(faults, tmp_path):
    out = tmp_path / "cli"
    args = [
        "distill", "--student", faults.config(out).student, "--teacher", str(faults.config(out).teacher),
        "--data", faults.config(out).data, "--output-dir", str(out), "--max-steps", "6", "--batch-size", "2",
        "--grad-accum", "2", "--eval-fraction", "0.25", "--seed", "0", "--lora.r", "4", "--save-every", "2",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "llm_neo", *args], env=env, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 300
    metrics = out / "metrics.jsonl"
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 3) and time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err
    (line,) = [line for line in err.splitlines() if line.startswith("llm-neo distill: stopped by SIGTERM")]
    step = int(line.split("after step ")[1].split(" ")[0])
    assert 3 <= step <= 6
    command = line.split("Resume with: ")[1]
    assert command == f"llm-neo distill --config {out / 'config.yaml'} --resume"
    done = subprocess.run(
        [sys.executable, "-m", "llm_neo", *shlex.split(command)[1:]], env=env, capture_output=True
    )
    assert done.returncode == 0, done.stderr
    assert_same_run(out, faults.whole)


def test_without_a_terminal_distill_prints_plain_progress_lines(make_config, caplog):
    # Under pytest stderr is not a terminal, as under nohup or a scheduler: the bar is off, lines come.
    with caplog.at_level(logging.INFO, logger="llm_neo"):
        distill(make_config("neo", max_steps=3))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("neo: step ")]
    assert [line.split(",")[0] for line in lines] == [
        "neo: step 1/3 (33%)",
        "neo: step 2/3 (67%)",
        "neo: step 3/3 (100%)",
    ]
    assert "loss " in lines[0] and "(ce " in lines[0] and " tokens/s" in lines[0] and "ETA " in lines[0]


def test_every_output_has_the_mode_an_ordinary_write_would_have(make_config, tmp_path):
    # Teammates on a shared server read each other's results: the umask decides, not mkstemp's 0600.
    from llm_neo.config import CacheTeacherConfig
    from llm_neo.teacher_cache.writer import cache_teacher

    old = os.umask(0o027)
    try:
        config = make_config("neo", max_steps=2, save_every=1)
        cache = tmp_path / "cache"
        cache_teacher(CacheTeacherConfig(teacher=config.teacher, data=config.data, output=str(cache)))
        distill(config)
    finally:
        os.umask(old)
    out = Path(str(config.output_dir))
    files = [p for root in (out, cache) for p in root.rglob("*") if p.is_file()]
    directories = [out, cache, *(p for root in (out, cache) for p in root.rglob("*") if p.is_dir())]
    names = {p.relative_to(tmp_path).as_posix() for p in files}
    assert {
        "neo/summary.json",
        "neo/config.yaml",
        "neo/merged/model.safetensors",
        "cache/manifest.json",
    } <= names
    assert any(n.startswith("neo/checkpoints/step-") and n.endswith("trainable.safetensors") for n in names)
    assert any(n.startswith("cache/shard-") for n in names)
    wrong = {
        p.relative_to(tmp_path).as_posix(): oct(p.stat().st_mode & 0o777)
        for p in files
        if p.stat().st_mode & 0o777 != 0o640
    }
    wrong |= {
        p.as_posix(): oct(p.stat().st_mode & 0o777) for p in directories if p.stat().st_mode & 0o777 != 0o750
    }
    assert not wrong, wrong
