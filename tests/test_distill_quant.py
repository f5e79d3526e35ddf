"""Quantization in the recipe: an int8 teacher whose drift the run records, a QLoRA student merged onto a
fresh copy of its quantized base into a dense model equal to the adapter, the export after the merge,
a resumed QLoRA run ending where an uninterrupted one ends, a quantized teacher cache, and the refusals."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import interrupt_at, tiny_run
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

pytest.importorskip("torchao", reason="the quant extra is not installed: pip install 'llm-neo[quant]'")
pytest.importorskip("bitsandbytes", reason="the quant extra is not installed: pip install 'llm-neo[quant]'")

import llm_neo.distill as recipe
from llm_neo.config import CacheTeacherConfig, DistillConfig, LoraOptions
from llm_neo.distill import distill
from llm_neo.errors import CacheError, ConfigError, ModelError
from llm_neo.models.quant import load_quantized_base, train_mode_without_dropout
from llm_neo.runtime.distributed import World
from llm_neo.teacher_cache.key import run_key
from llm_neo.teacher_cache.writer import cache_teacher

CPU, F32 = torch.device("cpu"), torch.float32
IDS = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46], [1, 50, 60, 70, 80, 90, 100, 110]])


@pytest.fixture(autouse=True, scope="module")
def _threads(one_thread):
    yield


@pytest.fixture()
def make(tmp_path, wide_student_dir, teacher_dir, alpaca_jsonl):
    def make_config(name: str = "run", **overrides) -> DistillConfig:
        models = dict(student=str(wide_student_dir), teacher=str(teacher_dir), data=str(alpaca_jsonl))
        return tiny_run(tmp_path / name, **(models | overrides))

    return make_config


def logits(model, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_qlora_with_an_int8_teacher_merges_to_a_dense_student_equal_to_the_adapter(
    make, wide_student_dir, kind
):
    summary = distill(make(student_quant=kind, teacher_quant="int8"))
    out = summary.output_dir

    teacher = summary.teacher_quant
    assert teacher["kind"] == "int8" and teacher["backend"] == "torchao"
    assert teacher["weight_bytes_after"] < teacher["weight_bytes_before"] / 2
    assert 0 <= teacher["drift"]["kl_per_token"] < 1e-4 and teacher["drift"]["tokens"] > 0
    assert summary.student_quant["kind"] == kind

    dense = AutoModelForCausalLM.from_pretrained(wide_student_dir)
    assert summary.merged_parameters == summary.student_parameters == dense.num_parameters()
    assert summary.merge_check["passed"] and summary.merge_check["max_abs_logit_diff"] <= 1e-5
    config = json.loads((out / "merged" / "config.json").read_text())
    assert "quantization_config" not in config  # a plain model of the student's architecture
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert {p.dtype for p in merged.parameters()} == {F32}

    # Independently of the run: the saved adapter on a freshly loaded quantized base computes what the
    # merged student computes (train-mode forwards without dropout: no bitsandbytes repack).
    adapter = PeftModel.from_pretrained(
        load_quantized_base(str(wide_student_dir), kind, dtype=F32, device=CPU), out / "adapter"
    )
    with train_mode_without_dropout(adapter):
        expected = logits(adapter)
    torch.testing.assert_close(logits(merged), expected, atol=1e-5, rtol=0)
    # ... and training moved it: the merged student is not the dequantized base.
    with train_mode_without_dropout(adapter), adapter.disable_adapter():
        base = logits(adapter)
    assert float((expected - base).abs().max()) > 1e-4


def test_an_int8_teachers_saved_bytes_show_in_the_runs_peak_of_live_tensors(make):
    # On a CPU the summary's peak of live tensors (what compare reports for each arm) counts a quantized
    # weight by its int8 components, not by the dense size its torchao wrapper's storage reads as.
    dense = distill(make("dense"))
    int8 = distill(make("int8", teacher_quant="int8"))
    saved = int8.teacher_quant["weight_bytes_before"] - int8.teacher_quant["weight_bytes_after"]
    assert saved > 0
    gib = 2**30
    # less by most of the saved bytes (a dequantized layer's transient may take some of it back)
    assert int8.peak_tensor_memory_gb * gib <= dense.peak_tensor_memory_gb * gib - 0.5 * saved


def test_a_resumed_qlora_run_ends_where_an_uninterrupted_one_ends(make):
    settings = dict(max_steps=6, save_every=2, student_quant="nf4", teacher_quant="int8")
    whole = distill(make("whole", **settings))

    killed = make("killed", **settings)
    with pytest.raises(KeyboardInterrupt):
        distill(killed, on_step=interrupt_at(3))
    resumed = distill(dataclasses.replace(killed, resume=True))

    a = load_file(whole.output_dir / "merged" / "model.safetensors")
    b = load_file(resumed.output_dir / "merged" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0)
    assert resumed.heldout == pytest.approx(whole.heldout)
    assert resumed.teacher_quant == whole.teacher_quant  # the same quantized teacher, the same drift


def test_the_export_after_the_merge_is_verified_and_recorded(make):
    pytest.importorskip("gguf", reason="the gguf extra is not installed: pip install 'llm-neo[gguf]'")
    summary = distill(make(student_quant="int8", export="gguf:f32"))
    export = summary.export
    assert export["format"] == "gguf" and export["gguf_type"] == "f32"
    path = Path(export["path"])
    assert path == summary.output_dir / "export" and (path / export["file"]).is_file()
    assert export["file"] == f"{summary.output_dir.resolve().name}-F32.gguf"  # the run's name, not "merged"
    record = json.loads((path / "export.json").read_text())
    assert record["verification"]["passed"] and record["verification"] == export["verification"]
    # The GGUF file computes exactly what the merged student computes.
    from_gguf = AutoModelForCausalLM.from_pretrained(path, gguf_file=export["file"])
    merged = AutoModelForCausalLM.from_pretrained(summary.output_dir / "merged")
    torch.testing.assert_close(logits(from_gguf), logits(merged), atol=1e-5, rtol=0)


def test_an_int8_teacher_cache_is_what_a_run_must_ask_for(make, teacher_dir, alpaca_jsonl, tmp_path):
    cache = tmp_path / "cache-int8"
    manifest = cache_teacher(
        CacheTeacherConfig(
            teacher=str(teacher_dir), data=str(alpaca_jsonl), output=str(cache), teacher_quant="int8"
        )
    )
    quant = manifest["teacher_quant"]
    assert quant["kind"] == "int8" and 0 <= quant["drift"]["kl_per_token"] < 1e-4
    assert manifest["key"]["teacher_quant"] == "int8/torchao"

    plain = make("plain", teacher=None, teacher_cache=str(cache))
    with pytest.raises(
        CacheError, match=r"teacher_quant \(--teacher-quant\) differs: cache int8/torchao, this run none"
    ):
        distill(plain)
    summary = distill(dataclasses.replace(plain, teacher_quant="int8"))
    assert summary.teacher_quant == quant  # the run records what its targets came from

    # An unquantized cache's key has no quantization part: caches written before it existed still match.
    tokenizer = recipe.load_tokenizers(str(teacher_dir), None, role="t", trust_remote_code=False)[0]
    assert "teacher_quant" not in run_key(make(), tokenizer=tokenizer, examples=[])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(method="kd", student_quant="nf4"), "QLoRA quantizes the frozen base of the LoRA arms"),
        (dict(student_quant="nf4", lora=LoraOptions(r=4, variant="dora")), "cannot be merged exactly"),
        (dict(student_quant="int8", lora=LoraOptions(r=4, variant="pissa")), "cannot be merged exactly"),
        (dict(method="lora", teacher=None, teacher_quant="int8"), "give --teacher too"),
        (dict(teacher_quant_backend="torchao"), "applies with --teacher-quant int8 or nf4"),
        (dict(teacher_quant="nf4", teacher_quant_backend="torchao"), "nf4 uses bitsandbytes"),
    ],
)
def test_combinations_that_cannot_work_are_refused_before_anything_loads(make, overrides, message):
    config = make(**overrides)
    with pytest.raises(ConfigError, match=message):
        distill(config)
    assert not config.output_dir or not Path(config.output_dir).exists()


def test_a_gguf_student_cannot_be_quantized_directly(make, tmp_path):
    gguf = tmp_path / "student.Q8_0.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ConfigError, match="convert the GGUF student first"):
        distill(make(student=str(gguf), student_quant="nf4"))


def test_a_gguf_export_the_student_cannot_have_is_refused_before_training(
    make, wide_student_dir, tmp_path, monkeypatch
):
    student = tmp_path / "scaled"
    student.mkdir()
    config = json.loads((wide_student_dir / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": "linear", "factor": 2.0}
    (student / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(recipe, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    run = make(student=str(student), export="gguf:q8_0")
    with pytest.raises(ConfigError, match=r"--export gguf:q8_0: GGUF export of .* rope scaling 'linear'"):
        distill(run)
    assert not Path(str(run.output_dir)).exists()


def test_bitsandbytes_int8_teacher_on_a_cpu_is_refused_with_the_alternative(make):
    run = make(teacher_quant="int8", teacher_quant_backend="bitsandbytes")
    with pytest.raises(ModelError, match=r"runs on CUDA only.*torchao int8"):
        distill(run)
    assert not Path(str(run.output_dir)).exists()  # the teacher loads first; nothing was written


@pytest.mark.parametrize("flags", [dict(teacher_quant="int8"), dict(student_quant="nf4")])
def test_quantized_models_are_not_sharded(make, flags):
    with pytest.raises(ConfigError, match="not sharded across the 2 processes of torchrun"):
        recipe._check_quantized_world(make(**flags), World(rank=0, size=2))
    recipe._check_quantized_world(make(**flags), World())  # one process: fine
