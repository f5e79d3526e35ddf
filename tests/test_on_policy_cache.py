"""Offline on-policy distillation (cache-teacher --student-samples, the Lightning-OPD condition) on the
tiny models: what the cache holds (the student's own samples, the teacher's top-k on them), training on
it with no teacher, and the refusals of a changed student or changed sampling options."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ALPACA, tiny_run, write_jsonl
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import llm_neo.distill as recipe
from llm_neo.config import CacheTeacherConfig
from llm_neo.data import read_examples
from llm_neo.distill import distill
from llm_neo.errors import CacheError, ConfigError
from llm_neo.losses import IGNORE_INDEX
from llm_neo.models.loading import load_tokenizer
from llm_neo.sampling import Sampling, response_start, sample_responses, seed_of, stop_token_ids
from llm_neo.teacher_cache.store import open_cache
from llm_neo.teacher_cache.writer import cache_teacher

pytestmark = pytest.mark.usefixtures("one_thread")

PER_PROMPT = 2
CAP = 6


def _config(teacher: Path, student: Path, data: Path, out: Path, **overrides: Any) -> CacheTeacherConfig:
    # Shards of 3 rows: a prompt's two samples straddle shards; top-8 keeps the files small.
    base: dict[str, Any] = dict(
        teacher=str(teacher),
        data=str(data),
        output=str(out),
        student_samples=str(student),
        samples_per_prompt=PER_PROMPT,
        sample_max_new_tokens=CAP,
        shard_size=3,
        batch_size=2,
        top_k=8,
    )
    return CacheTeacherConfig(**(base | overrides))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", ALPACA)


@pytest.fixture(scope="module")
def models(tmp_path_factory, teacher_dir, student_dir) -> dict[str, Path]:
    """Copies of the session's models, so that one test may remove the teacher."""
    root = tmp_path_factory.mktemp("own_models")
    return {
        name: Path(shutil.copytree(d, root / name))
        for name, d in (("teacher", teacher_dir), ("student", student_dir))
    }


@pytest.fixture(scope="module")
def samples_cache(tmp_path_factory, models, data_file) -> Path:
    out = tmp_path_factory.mktemp("caches") / "samples"
    cache_teacher(_config(models["teacher"], models["student"], data_file, out))
    return out


def _run(tmp_path: Path, models: dict[str, Path], cache: Path, data: Path, **overrides: Any):
    options = dict(student=str(models["student"]), teacher=None, teacher_cache=str(cache), data=str(data))
    return tiny_run(
        tmp_path / "run", **(options | {"on_policy": 1.0, "sample_max_new_tokens": CAP} | overrides)
    )


# ----------------------------------------------------------------------------------------------------
# What the cache holds


def test_the_cache_holds_the_students_seeded_samples_and_the_teachers_topk_on_them(
    samples_cache, models, data_file
):
    cache = open_cache(samples_cache)
    loaded = load_tokenizer(str(models["teacher"]), role="teacher")
    _, examples, _ = read_examples(str(data_file), loaded, CacheTeacherConfig(max_length=2048))
    assert cache.num_examples == PER_PROMPT * len(examples) == 16
    assert cache.manifest["student_samples"]["condition"] == "on-policy to the initial student"
    student = AutoModelForCausalLM.from_pretrained(models["student"])
    teacher = AutoModelForCausalLM.from_pretrained(models["teacher"]).eval()
    sampling = Sampling(1.0, 1.0, tuple(stop_token_ids(loaded, examples)), int(loaded.pad_token_id))
    differs = 0
    for row in range(cache.num_examples):
        sample, data_example = cache.sample(row), examples[row // PER_PROMPT]
        start = response_start(sample)
        prompt = data_example.input_ids[: response_start(data_example)]
        assert sample.input_ids[:start] == prompt  # the record's prompt, as training renders it
        assert sample.labels == [IGNORE_INDEX] * start + sample.input_ids[start:]
        # The response is the student's own, drawn directly with the row's seed (record, sample index).
        seed = seed_of(row // PER_PROMPT, row % PER_PROMPT)
        [drawn] = sample_responses(student, [prompt], [CAP], sampling, seed=seed, device=torch.device("cpu"))
        assert sample.input_ids[start:] == drawn.tokens
        differs += sample.input_ids != data_example.input_ids
        # The targets are the teacher's top-k on that sample, computed here with full logits.
        with torch.no_grad():
            logits = teacher(input_ids=torch.tensor([sample.input_ids])).logits[0, :-1, : len(loaded)]
        log_p = torch.log_softmax(logits.float(), dim=-1)[
            start - 1 :
        ]  # the positions predicting the response
        values, ids = log_p.topk(8, dim=-1)
        targets = cache.example_targets(row)
        assert torch.equal(targets.ids.long(), ids)
        torch.testing.assert_close(targets.log_probs.float(), values, atol=2e-3, rtol=2e-3)
    assert differs == cache.num_examples  # none is the data's reference response
    # A record's two samples are two draws, not one drawn twice.
    assert any(cache.sample(2 * i).input_ids != cache.sample(2 * i + 1).input_ids for i in range(8))


def test_a_sample_depends_on_its_record_and_index_only(tmp_path, samples_cache, models, data_file):
    """Another shard layout and batch size (what another number of ranks changes: who computes which
    shard) hold the same samples row for row, and the first sample of each prompt is the same at n = 1."""
    out = tmp_path / "other_layout"
    cache_teacher(_config(models["teacher"], models["student"], data_file, out, shard_size=16, batch_size=5))
    one = tmp_path / "one_per_prompt"
    cache_teacher(_config(models["teacher"], models["student"], data_file, one, samples_per_prompt=1))
    reference, other, single = open_cache(samples_cache), open_cache(out), open_cache(one)
    for row in range(reference.num_examples):
        assert other.sample(row) == reference.sample(row)
        torch.testing.assert_close(
            other.example_targets(row).log_probs, reference.example_targets(row).log_probs
        )
    for record in range(single.num_examples):
        assert single.sample(record).input_ids == reference.sample(PER_PROMPT * record).input_ids


def test_the_same_command_again_finds_the_cache_complete_and_other_sampling_is_refused(
    samples_cache, models, data_file
):
    before = {f.name: f.read_bytes() for f in samples_cache.glob("shard-*")}
    cache_teacher(_config(models["teacher"], models["student"], data_file, samples_cache))
    assert {f.name: f.read_bytes() for f in samples_cache.glob("shard-*")} == before
    hotter = _config(models["teacher"], models["student"], data_file, samples_cache, sample_temperature=0.7)
    with pytest.raises(CacheError, match=r"sampling \(how the student's responses were drawn"):
        cache_teacher(hotter)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (dict(student_samples=None), r"--sample-max-new-tokens, --samples-per-prompt set how the student's"),
        (dict(train_on_prompt=True), r"--student-samples: .* drop --train-on-prompt"),
        (dict(samples_per_prompt=0), r"--samples-per-prompt: 0 is out of range"),
        (dict(sample_top_p=0.0), r"--sample-top-p: 0.0 is out of range"),
    ],
)
def test_cache_teacher_refusals(tmp_path, models, data_file, overrides, expected):
    config = _config(models["teacher"], models["student"], data_file, tmp_path / "refused", **overrides)
    with pytest.raises(ConfigError, match=expected):
        cache_teacher(config)
    assert not (tmp_path / "refused").exists()


def test_the_command_says_the_condition_and_how_to_train_from_it(tmp_path, models, data_file, capsys):
    from llm_neo.cli import main

    out = tmp_path / "cli"
    args = ["cache-teacher", "--teacher", str(models["teacher"]), "--data", str(data_file),
            "--output", str(out), "--student-samples", str(models["student"]),
            "--sample-temperature", "0.5", "--top-k", "4", "-q"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "8 samples of" in printed and "on-policy to this initial student" in printed
    assert (
        f"--teacher-cache {out} --student {models['student']} --on-policy 1 --sample-temperature 0.5"
        in printed
    )


# ----------------------------------------------------------------------------------------------------
# Training on it


def test_distill_trains_on_the_cached_samples_with_no_teacher(tmp_path, samples_cache, models, data_file):
    gone = models["teacher"].with_name("teacher_gone")
    models["teacher"].rename(gone)  # no teacher to load: every target must come from the cache
    trained: list[list[int]] = []
    real_step = recipe.train_step

    def spy(student, teacher, micro, **kw):
        assert teacher is None
        for batch in micro:
            assert "on_policy" in batch and "teacher_ids" in batch  # KD only, on the cached targets
            for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True):
                trained.append(ids[mask.bool()].tolist())
        return real_step(student, teacher, micro, **kw)

    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(recipe, "train_step", spy)
            summary = distill(_run(tmp_path, models, samples_cache, data_file))
    finally:
        gone.rename(models["teacher"])
    cache = open_cache(samples_cache)
    samples = [cache.sample(r).input_ids for r in range(cache.num_examples)]
    _, data, _ = read_examples(
        str(data_file), load_tokenizer(str(models["student"]), role="student"), CacheTeacherConfig()
    )
    assert len(trained) == 3 * 2 * 2  # 3 steps of 2 micro-batches of 2
    assert all(ids in samples for ids in trained)  # the cached samples, not the data's responses
    assert not any(ids == ex.input_ids for ids in trained for ex in data)
    assert summary.samples["train"] == PER_PROMPT * 6  # the 6 training records' samples; 2 held out
    assert summary.on_policy is not None and summary.on_policy.cached_student == str(models["student"])
    assert summary.on_policy.share == 1 and summary.on_policy.generation_share == 0
    assert summary.on_policy.mean_generated_length and summary.on_policy.mean_generated_length <= CAP
    assert summary.heldout_reference is None  # the cache has no teacher on the held-out responses
    assert summary.merge_check["passed"]
    assert summary.final["on_policy_kd_loss"] > 0


def _changed_student(student: Path, out: Path) -> Path:
    changed = Path(shutil.copytree(student, out))
    weights = load_file(changed / "model.safetensors")
    name = next(n for n in weights if n.endswith("down_proj.weight"))
    weights[name] = weights[name] * 1.01
    save_file(weights, changed / "model.safetensors", metadata={"format": "pt"})
    return changed


def test_a_changed_student_is_refused_naming_both(tmp_path, samples_cache, models, data_file):
    changed = _changed_student(models["student"], tmp_path / "warmed_up")
    config = _run(tmp_path, models, samples_cache, data_file, student=str(changed))
    with pytest.raises(ConfigError, match=r"is not the student whose samples the teacher cache") as err:
        distill(config)
    assert str(changed) in str(err.value) and str(models["student"]) in str(err.value)
    assert "--student-samples" in str(err.value)  # the fix: cache this student's samples
    assert not Path(config.output_dir).exists()


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            dict(sample_temperature=0.7),
            r"--sample-temperature: .* drawn with --sample-temperature 1.0, this run asks for 0.7",
        ),
        (
            dict(sample_max_new_tokens=None),
            r"--sample-max-new-tokens: .* drawn with --sample-max-new-tokens 6",
        ),
        (dict(on_policy=0.5), r"train on them with --on-policy 1"),
        (dict(on_policy=0.0), r"train on them with --on-policy 1"),
        (dict(method="lora"), r"applies to the KD methods"),
    ],
)
def test_other_sampling_options_or_shares_are_refused_before_anything_loads(
    tmp_path, samples_cache, models, data_file, overrides, expected, monkeypatch
):
    monkeypatch.setattr(recipe, "load_model", lambda *a, **k: pytest.fail("a model loaded"))
    config = _run(tmp_path, models, samples_cache, data_file, **overrides)
    with pytest.raises(ConfigError, match=expected):
        distill(config)
    assert not Path(config.output_dir).exists()


def test_a_cache_of_the_datas_responses_still_refuses_on_policy(tmp_path, models, data_file):
    out = tmp_path / "reference"
    cache_teacher(
        CacheTeacherConfig(teacher=str(models["teacher"]), data=str(data_file), output=str(out), top_k=8)
    )
    config = _run(tmp_path, models, out, data_file, sample_max_new_tokens=None)
    with pytest.raises(ConfigError, match=r"cannot score the student's new samples.*--student-samples"):
        distill(config)
    manifest = json.loads((out / "manifest.json").read_text())
    assert "sampling" not in manifest["key"] and "student_samples" not in manifest
