"""Teacher cache: top-k + tail divergences vs dense, the cache format and key, resume, distill from it."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import ALPACA, damage, loss_kwargs, tiny_run, write_jsonl
from safetensors.torch import load_file

import llm_neo.distill as recipe
import llm_neo.models.loading as loading
from llm_neo.config import CacheTeacherConfig, DistillConfig
from llm_neo.data import load_records, tokenize_records
from llm_neo.distill import distill
from llm_neo.errors import CacheError, ConfigError, OutputError
from llm_neo.eval.metrics import heldout_metrics
from llm_neo.losses import (
    DIVERGENCES,
    HeadInput,
    LossOptions,
    TopKTargets,
    chunked_distill_loss,
    distill_loss,
    divergence,
    reference_divergence,
)
from llm_neo.models.loading import freeze, load_model, load_tokenizer
from llm_neo.teacher_cache.store import open_cache
from llm_neo.teacher_cache.writer import cache_teacher

Tensor = torch.Tensor
VOCAB = 320  # the conftest tokenizer's length


pytestmark = pytest.mark.usefixtures("one_thread")


def _targets_from_logits(teacher_logits: Tensor, k: int, temperature: float = 1.0) -> TopKTargets:
    """What the cache stores, computed directly: top-k log-probs at T and the log-mass outside them."""
    log_p = torch.log_softmax(teacher_logits / temperature, dim=-1)
    values, ids = log_p.topk(k, dim=-1)
    tail = torch.logsumexp(log_p.scatter(-1, ids, float("-inf")), dim=-1)
    return TopKTargets(ids, values, tail)


def _logits(n: int, v: int, seed: int, scale: float = 2.0, dtype: torch.dtype = torch.float64) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=g) * scale).to(dtype)


# ------------------------------------------------------------------------------------------------
# Divergences on the top-k support + tail


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_divergence_equals_dense_when_k_is_the_vocabulary(name, temperature):
    student, teacher = _logits(6, 17, 0), _logits(6, 17, 1)
    targets = _targets_from_logits(teacher, k=17, temperature=temperature)
    assert torch.isneginf(targets.tail).all()  # the tail bucket is empty: zero mass, -inf in log space

    s1 = student.clone().requires_grad_()
    s2 = student.clone().requires_grad_()
    sparse = divergence(name, s1, targets, temperature=temperature, beta=0.3, skew_alpha=0.2)
    dense = divergence(name, s2, teacher, temperature=temperature, beta=0.3, skew_alpha=0.2)
    torch.testing.assert_close(sparse, dense, atol=1e-12, rtol=1e-12)
    weights = torch.rand(6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    (sparse * weights).sum().backward()
    (dense * weights).sum().backward()
    assert s1.grad is not None and s2.grad is not None and torch.isfinite(s1.grad).all()
    torch.testing.assert_close(s1.grad, s2.grad, atol=1e-12, rtol=1e-12)
    reference = reference_divergence(
        name, student, teacher, temperature=temperature, beta=0.3, skew_alpha=0.2
    )
    torch.testing.assert_close(sparse.detach(), reference, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("k", [1, 4, 16])
def test_topk_divergence_matches_fp64_reference_and_is_bounded_by_dense(name, k):
    student, teacher = _logits(8, 23, 3), _logits(8, 23, 4)
    targets = _targets_from_logits(teacher, k=k)
    value = divergence(name, student, targets)
    torch.testing.assert_close(value, reference_divergence(name, student, targets), atol=1e-12, rtol=1e-9)
    assert (value >= 0).all()
    # Merging columns into one bucket never increases an f-divergence (data-processing inequality).
    assert (value <= divergence(name, student, teacher) + 1e-12).all()
    # The student that equals the teacher is at zero divergence, whatever k.
    assert divergence(name, teacher, targets).abs().max() < 1e-12


@pytest.mark.parametrize("name", DIVERGENCES)
def test_topk_divergence_gradcheck(name):
    student = _logits(3, 9, 5).requires_grad_()
    targets = _targets_from_logits(_logits(3, 9, 6), k=4)
    assert torch.autograd.gradcheck(lambda s: divergence(name, s, targets, temperature=1.5), (student,))


def test_fp16_cache_rounding_never_makes_a_divergence_negative():
    teacher = _logits(64, 50, 7, dtype=torch.float32)
    exact = _targets_from_logits(teacher, k=8)
    rounded = TopKTargets(exact.ids.int(), exact.log_probs.half(), exact.tail.half())
    for name in DIVERGENCES:
        value = divergence(name, teacher, rounded)  # the student equals the teacher
        assert value.min() > -1e-6 and value.max() < 1e-3, name  # zero up to fp16/fp32 rounding
    # Without the renormalisation the rounded buckets miss 1 by ~1e-4 and forward KL goes negative.
    log_q = torch.log_softmax(teacher, -1)
    q = torch.cat([log_q.gather(-1, exact.ids), exact.tail[:, None]], -1)
    p_raw = torch.cat([rounded.log_probs.float(), rounded.tail.float()[:, None]], -1)
    assert (p_raw.exp() * (p_raw - q)).sum(-1).min() < -1e-5


@pytest.mark.parametrize("kd_ratio", [1.0, 0.7])
def test_cached_losses_equal_online_losses_at_full_k(kd_ratio):
    n, h, v = 11, 8, 30
    g = torch.Generator().manual_seed(8)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    head = torch.randn(v + 5, h, generator=g, dtype=torch.float64)  # padded student: 5 columns past V
    bias = torch.randn(v + 5, generator=g, dtype=torch.float64)
    teacher = _logits(n, v, 9)
    y = torch.randint(0, v, (n,), generator=g)
    targets = _targets_from_logits(teacher, k=v, temperature=2.0)
    options: dict[str, Any] = dict(
        kd_ratio=kd_ratio, num_tokens=20, divergence="jsd", temperature=2.0, beta=0.4, kd_vocab_size=v
    )

    def grads(fn) -> tuple[list[Tensor], Any]:
        leaves = [t.clone().requires_grad_() for t in (hidden, head, bias)]
        parts = fn(*leaves)
        parts.loss.backward()
        return [t.grad for t in leaves], parts

    g_online, online = grads(
        lambda x, w, b: distill_loss(
            F.linear(x, w, b), y, F.pad(teacher, (0, 5), value=-1e30), **loss_kwargs(options)
        )
    )
    g_plain, plain = grads(
        lambda x, w, b: distill_loss(F.linear(x, w, b), y, targets, **loss_kwargs(options))
    )
    # distill_loss computes CE in float32 even for float64 logits, the chunked path in float64: where
    # CE enters (kd_ratio < 1) they agree to float32 precision, the KD term to float64 precision.
    tol = dict(atol=1e-12, rtol=1e-10) if kd_ratio == 1.0 else dict(atol=1e-7, rtol=1e-5)
    for chunk in (1, 4, 1000):
        g_chunk, chunked = grads(
            lambda x, w, b, c=chunk: chunked_distill_loss(
                HeadInput(x, w, b), y, targets, **loss_kwargs({**options, "chunk_size": c})
            )
        )
        for parts, grad in ((plain, g_plain), (chunked, g_chunk)):
            torch.testing.assert_close(parts.kd_sum, online.kd_sum, atol=1e-12, rtol=1e-10)
            torch.testing.assert_close(parts.ce_sum.double(), online.ce_sum.double(), atol=1e-9, rtol=1e-6)
            torch.testing.assert_close(parts.loss.double(), online.loss.double(), **tol)
            for a, b in zip(grad, g_online, strict=True):
                torch.testing.assert_close(a, b, **tol)


def test_cached_loss_errors_name_the_problem():
    logits = _logits(4, 10, 0)
    y = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"needs the teacher.*cached teacher targets"):
        distill_loss(logits, y, None, options=LossOptions(kd_ratio=0.5), num_tokens=4)
    bad = _targets_from_logits(_logits(3, 10, 1), k=2)
    with pytest.raises(ValueError, match="must be \\[N, k\\], \\[N, k\\] and \\[N\\]"):
        distill_loss(logits, y, bad, options=LossOptions(kd_ratio=0.5), num_tokens=4)


# ------------------------------------------------------------------------------------------------
# The cache on disk


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", ALPACA * 2)


def _cache_config(teacher_dir: Path, data: Path, out: Path, **overrides: Any) -> CacheTeacherConfig:
    base: dict[str, Any] = dict(
        teacher=str(teacher_dir), data=str(data), output=str(out), shard_size=4, batch_size=3
    )
    base.update(overrides)
    return CacheTeacherConfig(**base)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, teacher_dir, data_file) -> Path:
    """k = 64, fp16: the default format, over the 16 conftest records in 4 shards of 4."""
    out = tmp_path_factory.mktemp("caches") / "k64"
    cache_teacher(_cache_config(teacher_dir, data_file, out))
    return out


@pytest.fixture(scope="module")
def full_cache_dir(tmp_path_factory, teacher_dir, data_file) -> Path:
    """k = V, fp32: exactly the teacher's distribution."""
    out = tmp_path_factory.mktemp("caches") / "full"
    cache_teacher(_cache_config(teacher_dir, data_file, out, top_k=VOCAB, logprob_dtype="float32"))
    return out


def _teacher_examples(teacher_dir: Path, data: Path):
    tokenizer = load_tokenizer(str(teacher_dir), role="teacher")
    examples, _ = tokenize_records(load_records(data), tokenizer, max_length=2048)
    return tokenizer, examples


def test_cache_holds_the_teachers_topk_in_example_order(cache_dir, teacher_dir, data_file):
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    assert manifest["top_k"] == 64 and manifest["vocab_size"] == VOCAB
    assert manifest["num_examples"] == 16 and len(manifest["shards"]) == 4
    assert set(manifest["key"]) >= {
        "teacher_weights",
        "teacher_config",
        "tokenizer",
        "chat_template",
        "data",
        "max_length",
        "temperature",
        "tokens",
    }
    cache = open_cache(cache_dir)
    _, examples = _teacher_examples(teacher_dir, data_file)
    teacher = freeze(
        load_model(str(teacher_dir), role="teacher", dtype=torch.float32, device=torch.device("cpu"))
    )
    for row in (0, 5, 15):  # one example at a time: no padding, the teacher's plain forward
        ex = examples[row]
        with torch.no_grad():
            logits = teacher(input_ids=torch.tensor([ex.input_ids])).logits[0]
        trained = torch.tensor([*ex.labels[1:], -100]) != -100
        expected = _targets_from_logits(logits[trained].float(), k=64)
        got = cache.example_targets(row)
        assert torch.equal(got.ids.long(), expected.ids)
        assert got.log_probs.dtype == torch.float16
        torch.testing.assert_close(got.log_probs.float(), expected.log_probs, atol=2e-2, rtol=1e-3)
        torch.testing.assert_close(got.tail.float(), expected.tail, atol=2e-2, rtol=1e-3)
        assert (got.log_probs[:, :-1] >= got.log_probs[:, 1:]).all()  # most probable first


def test_cache_is_compact(tmp_path, teacher_dir):
    # 64 records: enough tokens that per-shard headers no longer matter, as on real data.
    data = write_jsonl(tmp_path / "train.jsonl", ALPACA * 8)
    manifest = cache_teacher(_cache_config(teacher_dir, data, tmp_path / "cache", shard_size=64))
    assert manifest["bytes_per_token"] <= 400
    files = sum(f.stat().st_size for f in (tmp_path / "cache").glob("shard-*.safetensors"))
    assert manifest["bytes"] == files


def test_killed_cache_resumes_to_identical_shards(tmp_path, teacher_dir, data_file, cache_dir):
    out = tmp_path / "killed"
    computed: list[int] = []

    def kill_after_second(index: int, record: dict) -> None:
        computed.append(index)
        if index == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache_teacher(_cache_config(teacher_dir, data_file, out), on_shard=kill_after_second)
    assert sorted(p.name for p in out.glob("shard-*")) == [
        "shard-00000.safetensors",
        "shard-00001.safetensors",
    ]
    assert not (out / "manifest.json").exists()
    with pytest.raises(CacheError, match="incomplete"):
        open_cache(out)

    computed.clear()
    manifest = cache_teacher(_cache_config(teacher_dir, data_file, out), on_shard=kill_after_second)
    assert computed == [2, 3]  # the complete shards were not recomputed
    for name in (f"shard-{i:05d}.safetensors" for i in range(4)):
        assert (out / name).read_bytes() == (cache_dir / name).read_bytes(), name
    reference = json.loads((cache_dir / "manifest.json").read_text())
    assert manifest["key"] == reference["key"] and manifest["shards"] == reference["shards"]
    # Once complete, the same command is a no-op.
    computed.clear()
    cache_teacher(_cache_config(teacher_dir, data_file, out), on_shard=kill_after_second)
    assert computed == []


def test_cache_output_made_for_other_inputs_is_refused(tmp_path, teacher_dir, data_file, cache_dir):
    out = tmp_path / "c"
    shutil.copytree(cache_dir, out)
    with pytest.raises(CacheError, match=r"max_length \(--max-length\) differs: cache 2048, this run 64"):
        cache_teacher(_cache_config(teacher_dir, data_file, out, max_length=64))
    manifest = cache_teacher(_cache_config(teacher_dir, data_file, out, max_length=64, overwrite=True))
    assert manifest["key"]["max_length"] == 64


def test_cache_config_problems_are_reported_together(tmp_path):
    with pytest.raises(ConfigError) as info:
        cache_teacher(CacheTeacherConfig(teacher="", data=str(tmp_path / "no.jsonl"), top_k=0))
    text = str(info.value)
    for expected in ("--teacher is required", "no.jsonl", "--output is required", "--top-k"):
        assert expected in text


# ------------------------------------------------------------------------------------------------
# Distilling from the cache


@pytest.fixture()
def run_config(tmp_path, student_dir, data_file):
    def make(name: str, **overrides: Any) -> DistillConfig:
        return tiny_run(tmp_path / name, **(dict(student=str(student_dir), data=str(data_file)) | overrides))

    return make


@pytest.mark.parametrize("method", ["neo", "kd"])
def test_distill_from_cache_never_loads_the_teacher(run_config, cache_dir, monkeypatch, method):
    roles: list[str] = []
    real = recipe.load_model

    def spy(path, *, role, **kw):
        roles.append(role)
        return real(path, role=role, **kw)

    # Every way a model loads: the recipe's own call (the student) and the frozen loads (a teacher).
    monkeypatch.setattr(recipe, "load_model", spy)
    monkeypatch.setattr(loading, "load_model", spy)
    summary = distill(run_config(method, method=method, teacher_cache=str(cache_dir)))
    assert "teacher" not in roles and "student" in roles
    assert summary.steps == 3 and summary.final["kd_loss"] > 0
    assert summary.heldout_reference == "teacher_cache"
    # Against the cache the KL is the top-k bucket one, under its own name: never the dense one's.
    assert {"ce", "kl_to_teacher_topk", "top1_agreement"} <= set(summary.heldout)
    assert "kl_to_teacher" not in summary.heldout
    assert summary.teacher_cache["top_k"] == 64
    out = Path(summary.config["output_dir"])
    assert (out / "merged" / "model.safetensors").is_file()


@pytest.mark.parametrize("loss_impl", ["chunked", "plain"])
def test_full_vocabulary_cache_trains_exactly_like_the_online_teacher(
    run_config, full_cache_dir, teacher_dir, loss_impl
):
    # k == V and fp32 log-probs: the cached run must follow the online run step for step.
    common = dict(method="neo", loss_impl=loss_impl, loss_chunk_size=5, divergence="jsd")
    online = distill(run_config("online", teacher=str(teacher_dir), **common))
    cached = distill(
        run_config("cached", teacher_cache=str(full_cache_dir), teacher=str(teacher_dir), **common)
    )
    assert cached.heldout_reference == "teacher"

    def curve(summary: dict) -> list[float]:
        lines = (Path(summary.config["output_dir"]) / "metrics.jsonl").read_text().splitlines()
        return [r[k] for r in map(json.loads, lines) for k in ("loss", "ce_loss", "kd_loss", "grad_norm")]

    assert curve(cached) == pytest.approx(curve(online), rel=1e-5, abs=1e-7)
    a = load_file(Path(online.config["output_dir"]) / "merged" / "model.safetensors")
    b = load_file(Path(cached.config["output_dir"]) / "merged" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=1e-5)
    assert cached.heldout == pytest.approx(online.heldout, rel=1e-5)


def test_heldout_metrics_from_a_full_cache_equal_the_teachers(
    full_cache_dir, teacher_dir, student_dir, data_file
):
    tokenizer, examples = _teacher_examples(teacher_dir, data_file)
    cpu = torch.device("cpu")
    student = freeze(load_model(str(student_dir), role="student", dtype=torch.float32, device=cpu))
    teacher = freeze(load_model(str(teacher_dir), role="teacher", dtype=torch.float32, device=cpu))
    rows = [3, 0, 7, 12, 9]
    subset = [examples[r] for r in rows]
    options: dict[str, Any] = dict(
        pad_token_id=tokenizer.pad_token_id, batch_size=2, device=cpu, dtype=torch.float32
    )
    dense = heldout_metrics(student, subset, teacher=teacher, kd_vocab_size=VOCAB, **options)
    from_cache = heldout_metrics(student, subset, open_cache(full_cache_dir), **options)
    # k = V: the bucket KL is the dense one, but it keeps its own name.
    assert from_cache.pop("kl_to_teacher_topk") == pytest.approx(dense.pop("kl_to_teacher"), rel=1e-5)
    assert from_cache == pytest.approx(dense, rel=1e-5)


def test_topk_kl_is_a_lower_bound_reported_under_its_own_name(cache_dir, teacher_dir, student_dir, data_file):
    tokenizer, examples = _teacher_examples(teacher_dir, data_file)
    cpu = torch.device("cpu")
    student = freeze(load_model(str(student_dir), role="student", dtype=torch.float32, device=cpu))
    teacher = freeze(load_model(str(teacher_dir), role="teacher", dtype=torch.float32, device=cpu))
    options: dict[str, Any] = dict(
        pad_token_id=tokenizer.pad_token_id, batch_size=4, device=cpu, dtype=torch.float32
    )
    dense = heldout_metrics(student, examples, teacher=teacher, kd_vocab_size=VOCAB, **options)
    topk = heldout_metrics(student, examples, open_cache(cache_dir), **options)  # k = 64 of 320
    assert "kl_to_teacher" not in topk and "kl_to_teacher_topk" not in dense
    assert 0 < topk["kl_to_teacher_topk"] < dense["kl_to_teacher"]
    assert topk["top1_agreement"] == pytest.approx(dense["top1_agreement"], abs=1e-6)  # exact from a cache


def _copy_with_template(src: Path, dst: Path, template: str) -> Path:
    shutil.copytree(src, dst)
    tokenizer = load_tokenizer(str(dst), role="student")
    tokenizer.chat_template = template
    for stale in ("chat_template.jinja",):
        (dst / stale).unlink(missing_ok=True)
    tokenizer.save_pretrained(dst)
    return dst


def test_cache_key_refuses_a_run_it_was_not_made_for(
    run_config, cache_dir, data_file, tmp_path, foreign_dir, student_dir
):
    def refused(part: str, **overrides: Any) -> str:
        with pytest.raises(CacheError) as info:
            distill(run_config(part, teacher_cache=str(cache_dir), **overrides))
        assert not (tmp_path / part).exists()  # refused before anything is written
        text = str(info.value)
        assert f"{part} (" in text, text
        return text

    changed = write_jsonl(
        tmp_path / "changed.jsonl", [*ALPACA, {"instruction": "x", "input": "", "output": "y"}, *ALPACA]
    )
    text = refused("data", data=str(changed))
    assert "tokens (" in text  # the consequence is reported too, after its cause
    text = refused("max_length", max_length=64)
    assert "cache 2048, this run 64; run with --max-length 2048" in text
    refused("temperature", kd_temperature=2.0)  # the key part keeps its name
    refused("train_on_prompt", train_on_prompt=True)
    text = refused("tokenizer", student=str(foreign_dir))
    assert "--tokenizer <student dir>" in text
    other_template = _copy_with_template(
        student_dir,
        tmp_path / "templated",
        "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}",
    )
    text = refused("chat_template", student=str(other_template))
    assert "tokenizer (" not in text  # same vocabulary: only the template differs

    # The data's bytes are the key, not its name: a renamed copy is the same data.
    renamed = shutil.copy(data_file, tmp_path / "renamed.jsonl")
    assert distill(run_config("renamed", teacher_cache=str(cache_dir), data=str(renamed), max_steps=1))


def test_cache_key_checks_the_teacher_when_one_is_given(run_config, cache_dir, models_dir, tokenizer):
    from llm_neo.models.tiny import build_llama, save_model

    other = save_model(
        build_llama(len(tokenizer), hidden_size=64, num_layers=4, seed=11),
        tokenizer,
        models_dir / "other_teacher",
    )
    with pytest.raises(CacheError, match=r"teacher_weights \(the teacher's weights\) differs"):
        distill(run_config("other", teacher_cache=str(cache_dir), teacher=str(other)))


def test_incomplete_cache_is_a_config_problem(run_config, tmp_path):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "key.json").write_text("{}")
    with pytest.raises(ConfigError, match="not a complete teacher cache"):
        distill(run_config("x", teacher_cache=str(tmp_path / "half")))
    # No teacher and no cache for a KD arm: the message offers both.
    with pytest.raises(ConfigError, match="--teacher-cache CACHE"):
        distill(run_config("y", method="neo"))


def test_lora_arm_with_a_cache_ignores_its_temperature(run_config, cache_dir):
    summary = distill(
        run_config("lora", method="lora", teacher_cache=str(cache_dir), kd_temperature=3.0, max_steps=1)
    )
    assert summary.final["kd_loss"] == 0 and summary.heldout_reference == "teacher_cache"
    assert dataclasses.asdict(DistillConfig()).keys() >= {"teacher_cache"}


def test_command_line_cache_then_distill_as_a_new_user(tmp_path, teacher_dir, student_dir, data_file, capsys):
    from llm_neo.cli import main

    cache = tmp_path / "cache"
    assert (
        main(
            [
                "cache-teacher",
                "--teacher",
                str(teacher_dir),
                "--data",
                str(data_file),
                "--output",
                str(cache),
                "-q",
            ]
        )
        == 0
    )
    assert "bytes/token" in capsys.readouterr().out
    common = ["distill", "--teacher-cache", str(cache), "--student", str(student_dir), "--max-steps", "1"]
    common += ["--lora.r", "4", "--eval-fraction", "0.25", "-q"]
    assert main([*common, "--data", str(data_file), "--output-dir", str(tmp_path / "neo")]) == 0
    assert json.loads((tmp_path / "neo" / "summary.json").read_text())["teacher_cache"]["top_k"] == 64
    changed = write_jsonl(tmp_path / "other.jsonl", ALPACA[:4])
    assert main([*common, "--data", str(changed), "--output-dir", str(tmp_path / "other")]) == 1
    err = capsys.readouterr().err
    assert "does not match this run" in err and "data (the data file) differs" in err


# ------------------------------------------------------------------------------------------------
# Damaged shards and full disks


def test_a_truncated_shard_is_refused_before_training(
    run_config, cache_dir, teacher_dir, tmp_path, monkeypatch
):
    cache = tmp_path / "cache"
    shutil.copytree(cache_dir, cache)
    shard = cache / "shard-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    monkeypatch.setattr(recipe, "load_model", lambda *a, **k: pytest.fail("the student was loaded"))
    with pytest.raises(CacheError) as info:
        distill(run_config("neo", method="neo", teacher_cache=str(cache)))
    message = str(info.value)
    assert f"teacher cache {cache}: shard shard-00002.safetensors is damaged (" in message
    assert "(truncated)" in message and f"llm-neo cache-teacher --teacher {teacher_dir}" in message
    assert "rewrites the damaged ones" in message


def test_a_corrupted_shard_is_refused_when_first_read(run_config, cache_dir, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(cache_dir, cache)
    damage(cache / "shard-00001.safetensors", "corrupt")
    open_cache(cache)  # sizes match: opening is cheap and does not read the shards
    with pytest.raises(CacheError, match=r"shard shard-00001.safetensors is damaged \(its sha256 differs"):
        distill(run_config("neo", method="neo", teacher_cache=str(cache), max_steps=8))


def test_cache_teacher_rewrites_damaged_shards_to_the_same_bytes(
    tmp_path, teacher_dir, data_file, cache_dir, caplog
):
    out = tmp_path / "cache"
    shutil.copytree(cache_dir, out)
    damage(out / "shard-00002.safetensors", "corrupt")
    (out / "shard-00001.safetensors").write_bytes((out / "shard-00001.safetensors").read_bytes()[:100])
    (out / ".shard-00003.safetensors.a1b2c3d4.tmp").write_bytes(b"half")  # a killed write's leftover
    computed: list[int] = []
    with caplog.at_level("WARNING", logger="llm_neo"):
        manifest = cache_teacher(
            _cache_config(teacher_dir, data_file, out), on_shard=lambda i, record: computed.append(i)
        )
    assert computed == [1, 2]  # only the damaged shards were computed again
    assert "shard shard-00001.safetensors is damaged" in caplog.text and "shard-00002" in caplog.text
    for name in (f"shard-{i:05d}.safetensors" for i in range(4)):
        assert (out / name).read_bytes() == (cache_dir / name).read_bytes(), name
    assert manifest["shards"] == json.loads((cache_dir / "manifest.json").read_text())["shards"]
    assert not list(out.glob(".*.tmp"))
    computed.clear()
    cache_teacher(_cache_config(teacher_dir, data_file, out), on_shard=lambda i, record: computed.append(i))
    assert computed == []  # intact now: nothing to do


def test_a_full_disk_while_caching_keeps_the_complete_shards(
    tmp_path, teacher_dir, data_file, cache_dir, monkeypatch
):
    import errno
    import os

    import llm_neo.runtime.atomic as atomic

    out = tmp_path / "cache"
    full = {"on": False}
    real = atomic._write

    def write(fd, data):
        if full["on"]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd, data)

    monkeypatch.setattr(atomic, "_write", write)

    def fill_after_first(index: int, record: dict) -> None:
        full["on"] = True

    with pytest.raises(OutputError) as info:
        cache_teacher(_cache_config(teacher_dir, data_file, out), on_shard=fill_after_first)
    message = str(info.value)
    assert (
        f"cannot write teacher-cache shard shard-00001.safetensors to {out / 'shard-00001.safetensors'}"
        in message
    )
    assert "no space left on the device" in message
    assert "Kept: 1 complete shards of 4: the same command computes only the rest." in message
    assert sorted(p.name for p in out.iterdir()) == ["key.json", "shard-00000.safetensors"]
    full["on"] = False
    computed: list[int] = []
    cache_teacher(_cache_config(teacher_dir, data_file, out), on_shard=lambda i, record: computed.append(i))
    assert computed == [1, 2, 3]
    for name in (f"shard-{i:05d}.safetensors" for i in range(4)):
        assert (out / name).read_bytes() == (cache_dir / name).read_bytes(), name


def test_without_a_terminal_cache_teacher_reports_plain_lines(
    tmp_path, teacher_dir, data_file, caplog, capsys
):
    """Under nohup or a scheduler the bar is off (it would fill the log with carriage returns); plain
    lines say how far the cache is, ending at every trained position."""
    import logging

    with caplog.at_level(logging.INFO, logger="llm_neo"):
        manifest = cache_teacher(_cache_config(teacher_dir, data_file, tmp_path / "cache"))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("cache-teacher: tokens ")]
    total = manifest["num_positions"]
    assert lines and lines[-1].startswith(f"cache-teacher: tokens {total}/{total} (100%)"), lines
    assert "\r" not in capsys.readouterr().err
