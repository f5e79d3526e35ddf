"""Damaged cache records and poisoned teachers, as a user meets them: a truncated manifest.json or a
garbled key.json is named and repaired from the shards (or refused with the fix, and --overwrite replaces
it); a teacher with a NaN weight is refused at load naming the tensor; a teacher whose outputs are NaN
stops cache-teacher at the example; a NaN KD term beside a finite CE names the teacher or the cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ALPACA, tiny_run, write_jsonl
from safetensors.torch import load_file, save_file

import llm_neo.distill as recipe
import llm_neo.teacher_cache.writer as writer
from llm_neo.cli import main
from llm_neo.config import CacheTeacherConfig
from llm_neo.data import load_records, tokenize_records
from llm_neo.distill import distill
from llm_neo.errors import ModelError, TrainingError
from llm_neo.models.loading import load_tokenizer
from llm_neo.teacher_cache.store import open_cache
from llm_neo.teacher_cache.writer import cache_teacher

pytestmark = pytest.mark.usefixtures("one_thread")

POISONED_TENSOR = "model.layers.1.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", ALPACA)


def _config(teacher: Path, data: Path, out: Path, **overrides: Any) -> CacheTeacherConfig:
    base: dict[str, Any] = dict(teacher=str(teacher), data=str(data), output=str(out), shard_size=3)
    return CacheTeacherConfig(**(base | overrides))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, teacher_dir, data_file) -> Path:
    """The reference: 8 records in 3 shards of 3, 3 and 2."""
    out = tmp_path_factory.mktemp("caches") / "cache"
    cache_teacher(_config(teacher_dir, data_file, out))
    return out


def _shard_bytes(cache: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(cache.glob("shard-*.safetensors"))}


def _cli_distill_from(cache: Path, student_dir: Path, data: Path, out: Path) -> list[str]:
    return ["distill", "--teacher-cache", str(cache), "--student", str(student_dir), "--data", str(data),
            "--max-steps", "1", "--lora.r", "4", "--output-dir", str(out), "-q"]  # fmt: skip


# ------------------------------------------------------------------------------------------------
# Damaged manifest.json and key.json


def test_a_truncated_manifest_is_named_then_rebuilt_from_the_shards(
    tmp_path, teacher_dir, student_dir, data_file, cache_dir, capsys, caplog
):
    cache = tmp_path / "cache"
    shutil.copytree(cache_dir, cache)
    manifest = cache / "manifest.json"
    manifest.write_bytes(manifest.read_bytes()[: manifest.stat().st_size // 2])

    # Reading it (distill --teacher-cache): exit 1, the file and the fix named, no traceback.
    assert main(_cli_distill_from(cache, student_dir, data_file, tmp_path / "run")) == 1
    err = capsys.readouterr().err
    assert f"{manifest} is damaged (truncated: not valid JSON" in err
    assert "Rerun the llm-neo cache-teacher command that made it" in err and "--overwrite" in err
    assert "Traceback" not in err

    # The same cache-teacher command rebuilds the manifest from the shards, computing none again.
    computed: list[int] = []
    with caplog.at_level("WARNING", logger="llm_neo"):
        rebuilt = cache_teacher(
            _config(teacher_dir, data_file, cache), on_shard=lambda i, record: computed.append(i)
        )
    assert computed == []
    assert (
        f"{manifest} is damaged (truncated" in caplog.text and "rebuilding it from the shards" in caplog.text
    )
    reference = json.loads((cache_dir / "manifest.json").read_text())
    for part in ("key", "key_digest", "shards", "num_examples", "num_positions", "bytes", "top_k"):
        assert rebuilt[part] == reference[part], part
    assert _shard_bytes(cache) == _shard_bytes(cache_dir)
    assert open_cache(cache).manifest["shards"] == reference["shards"]


@pytest.mark.parametrize(
    ("garbage", "problem"),
    [(b'{"tokenizer": "sha256:ab', "truncated: not valid JSON"), (b"[]", "a JSON list, not an object")],
)
def test_a_damaged_key_is_written_again_when_every_shard_was_made_for_it(
    tmp_path, teacher_dir, data_file, cache_dir, caplog, garbage, problem
):
    cache = tmp_path / "cache"
    shutil.copytree(cache_dir, cache)
    (cache / "key.json").write_bytes(garbage)
    computed: list[int] = []
    with caplog.at_level("WARNING", logger="llm_neo"):
        cache_teacher(_config(teacher_dir, data_file, cache), on_shard=lambda i, record: computed.append(i))
    assert computed == []
    assert f"{cache / 'key.json'} is damaged ({problem}" in caplog.text
    assert "every shard there was made for these inputs" in caplog.text
    assert json.loads((cache / "key.json").read_text()) == json.loads((cache_dir / "key.json").read_text())
    assert _shard_bytes(cache) == _shard_bytes(cache_dir)


def test_damaged_records_of_a_cache_for_other_inputs_are_refused_and_overwrite_replaces_it(
    tmp_path, teacher_dir, data_file, cache_dir, capsys
):
    cache = tmp_path / "cache"
    shutil.copytree(cache_dir, cache)
    (cache / "key.json").write_text("{not json")
    manifest = cache / "manifest.json"
    manifest.write_bytes(manifest.read_bytes()[:40])
    (cache / "notes.txt").write_text("mine")
    command = ["cache-teacher", "--teacher", str(teacher_dir), "--data", str(data_file),
               "--output", str(cache), "--shard-size", "3", "--max-length", "64", "-q"]  # fmt: skip

    # Other inputs (--max-length 64): the shards prove another key, so the damaged key cannot be repaired.
    assert main(command) == 1
    err = capsys.readouterr().err
    assert f"{cache / 'key.json'} is damaged (not valid JSON" in err
    assert "Pass --overwrite to replace it" in err and "Traceback" not in err
    assert _shard_bytes(cache) == _shard_bytes(cache_dir)  # refused: nothing touched

    assert main([*command, "--overwrite"]) == 0
    assert open_cache(cache).manifest["key"]["max_length"] == 64
    assert (cache / "notes.txt").read_text() == "mine"  # only the cache's own files were replaced


# ------------------------------------------------------------------------------------------------
# Non-finite teachers


@pytest.fixture(scope="module")
def nan_teacher_dir(tmp_path_factory, teacher_dir) -> Path:
    """The conftest teacher with one NaN in one weight tensor (as a damaged download or a diverged run)."""
    out = tmp_path_factory.mktemp("models") / "nan-teacher"
    shutil.copytree(teacher_dir, out)
    weights = out / "model.safetensors"
    tensors = load_file(weights)
    tensors[POISONED_TENSOR][3, 5] = float("nan")
    save_file(tensors, weights, metadata={"format": "pt"})
    return out


def test_a_teacher_with_a_nan_weight_is_refused_at_load_naming_the_tensor(
    tmp_path, nan_teacher_dir, student_dir, data_file, capsys
):
    command = ["cache-teacher", "--teacher", str(nan_teacher_dir), "--data", str(data_file),
               "--output", str(tmp_path / "cache"), "-q"]  # fmt: skip
    assert main(command) == 1
    err = capsys.readouterr().err
    assert f"the teacher {str(nan_teacher_dir)!r} has non-finite weights: tensor {POISONED_TENSOR} " in err
    assert "holds 1 NaN and 0 infinite values" in err and "Traceback" not in err
    assert not list((tmp_path / "cache").glob("shard-*"))  # no poisoned cache

    # Online, the same teacher is refused before a step, and so is such a student.
    config = tiny_run(
        tmp_path / "run", teacher=str(nan_teacher_dir), student=str(student_dir), data=str(data_file)
    )
    with pytest.raises(ModelError, match=f"tensor {POISONED_TENSOR} holds 1 NaN"):
        distill(config)
    config = tiny_run(tmp_path / "sft", method="sft", student=str(nan_teacher_dir), data=str(data_file))
    with pytest.raises(ModelError, match=f"the student .* has non-finite weights: tensor {POISONED_TENSOR}"):
        distill(config)


def _poison_outputs(monkeypatch) -> None:
    """Finite weights, NaN outputs: the hidden states of each batch's first row become NaN."""
    real = writer.final_hidden_states

    def poisoned(model, input_ids, attention_mask):
        hidden = real(model, input_ids, attention_mask).clone()
        hidden[0] = float("nan")
        return hidden

    monkeypatch.setattr(writer, "final_hidden_states", poisoned)


def test_cache_teacher_stops_at_the_first_non_finite_log_prob_naming_example_and_teacher(
    tmp_path, teacher_dir, data_file, monkeypatch, capsys
):
    _poison_outputs(monkeypatch)
    tokenizer = load_tokenizer(str(teacher_dir), role="teacher")
    examples, _ = tokenize_records(load_records(data_file), tokenizer, max_length=2048)
    # The first batch holds the first shard's examples longest first: its first row is the longest.
    first = max(range(3), key=lambda i: len(examples[i].input_ids))
    cache = tmp_path / "cache"
    command = ["cache-teacher", "--teacher", str(teacher_dir), "--data", str(data_file),
               "--output", str(cache), "--shard-size", "3", "-q"]  # fmt: skip
    assert main(command) == 1
    err = capsys.readouterr().err
    assert (
        f"the teacher {teacher_dir} gives non-finite log-probs (NaN or inf) on example {first} of --data"
        in err
    )
    assert "Traceback" not in err
    assert not list(cache.glob("shard-*")) and not (cache / "manifest.json").exists()


def test_a_nan_kd_term_beside_a_finite_ce_names_the_teacher_not_the_learning_rate(
    tmp_path, teacher_dir, student_dir, data_file, monkeypatch
):
    real = recipe.load_teacher

    def nan_outputs(*args, **kwargs):  # finite weights (the load check passes), NaN hidden states
        teacher, quant = real(*args, **kwargs)
        teacher.model.norm.register_forward_hook(lambda module, inputs, output: output * float("nan"))
        return teacher, quant

    monkeypatch.setattr(recipe, "load_teacher", nan_outputs)
    config = tiny_run(
        tmp_path / "run", teacher=str(teacher_dir), student=str(student_dir), data=str(data_file)
    )
    with pytest.raises(TrainingError) as info:
        distill(config)
    message = str(info.value)
    assert message.startswith("step 1: non-finite KD term (kd sum nan), finite CE (")
    assert f"the teacher {teacher_dir} gives non-finite log-probs" in message
    assert "lowering --lr will not help" in message and "Lower --lr" not in message


def test_a_nan_kd_term_from_a_cache_names_the_cache(
    tmp_path, teacher_dir, student_dir, data_file, monkeypatch
):
    # A cache an older llm-neo wrote from a NaN teacher (this one refuses to: the check is switched off).
    _poison_outputs(monkeypatch)
    monkeypatch.setattr(writer, "_refuse_non_finite", lambda *args: None)
    cache = tmp_path / "cache"
    cache_teacher(_config(teacher_dir, data_file, cache))
    config = tiny_run(
        tmp_path / "run",
        teacher_cache=str(cache),
        student=str(student_dir),
        data=str(data_file),
        batch_size=6,
        grad_accum=1,
    )
    with pytest.raises(TrainingError) as info:
        distill(config)
    message = str(info.value)
    assert (
        "non-finite KD term" in message and f"the teacher cache {cache} holds non-finite log-probs" in message
    )
    assert "cache-teacher --overwrite" in message and "Lower --lr" not in message
    assert torch.isnan(load_file(cache / "shard-00000.safetensors")["log_probs"]).any()
