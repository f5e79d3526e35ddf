"""GGUF checkpoints in: a .gguf (or a directory holding one) is a teacher, student or model like any
other, dequantized by transformers' loader; `llm-neo convert` writes it once as safetensors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import ALPACA, write_jsonl
from gguf_files import write_llama_gguf
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from llm_neo.cli import main
from llm_neo.commands import convert as convert_module
from llm_neo.commands.convert import ConvertConfig, run_convert
from llm_neo.commands.evaluate import run_eval
from llm_neo.commands.prune import PruneConfig, run_prune
from llm_neo.config import DistillConfig, EvalConfig, LoraOptions
from llm_neo.distill import distill
from llm_neo.errors import ConfigError, ModelError
from llm_neo.models.loading import load_config, load_model, load_tokenizer, resolve_gguf
from llm_neo.models.tiny import build_llama, save_model

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def originals(tokenizer):
    """The models the GGUF files hold: a tied 3-block and an untied 2-block Llama (GQA)."""
    return {
        "tied": build_llama(
            len(tokenizer), hidden_size=32, num_layers=3, num_kv_heads=2, tie_word_embeddings=True, seed=5
        ),
        "untied": build_llama(len(tokenizer), hidden_size=32, num_layers=2, num_kv_heads=2, seed=6),
    }


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory, originals, tokenizer) -> Path:
    root = tmp_path_factory.mktemp("gguf")
    for name, model in originals.items():
        (root / name).mkdir()
        write_llama_gguf(model, tokenizer, root / name / f"{name}.F32.gguf")
        save_model(model, tokenizer, root / f"{name}-hf")
    return root


def _file(gguf_dir: Path, name: str) -> str:
    return str(gguf_dir / name / f"{name}.F32.gguf")


# ------------------------------------------------------------------------------------------------
# Paths


def test_resolve_gguf(tmp_path, gguf_dir):
    assert resolve_gguf(_file(gguf_dir, "tied")) == (str(gguf_dir / "tied"), "tied.F32.gguf")
    assert resolve_gguf(str(gguf_dir / "tied")) == (str(gguf_dir / "tied"), "tied.F32.gguf")
    hf = str(gguf_dir / "tied-hf")
    assert resolve_gguf(hf) == (hf, None)  # a model directory stays one
    assert resolve_gguf("org/name") == ("org/name", None)

    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.Q4_0.gguf", "b.Q8_0.gguf"):
        (two / name).write_bytes(b"GGUF")
    with pytest.raises(ModelError, match=r"holds 2 \.gguf files \(a\.Q4_0\.gguf, b\.Q8_0\.gguf\)"):
        resolve_gguf(str(two))
    split = tmp_path / "big-00001-of-00003.gguf"
    split.write_bytes(b"GGUF")
    with pytest.raises(ModelError, match="llama-gguf-split --merge"):
        resolve_gguf(str(split))
    other = tmp_path / "weights.bin"
    other.write_bytes(b"")
    with pytest.raises(ModelError, match=r"not a \.gguf"):
        resolve_gguf(str(other))


def test_missing_gguf_package_is_named(monkeypatch, gguf_dir):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a)
    )
    with pytest.raises(ModelError, match=r"pip install 'llm-neo\[gguf\]'"):
        load_tokenizer(_file(gguf_dir, "untied"), role="teacher")


# ------------------------------------------------------------------------------------------------
# Loading


@pytest.mark.parametrize("name", ["tied", "untied"])
def test_gguf_loads_the_exact_weights_and_tokenizer(gguf_dir, originals, tokenizer, name):
    model = load_model(str(gguf_dir / name), role="teacher", dtype=torch.float32, device=CPU)
    original = originals[name]
    assert type(model) is type(original)
    assert getattr(model, "hf_quantizer", None) is None  # a plain model: trainable and savable
    expected, got = original.state_dict(), model.state_dict()
    assert set(got) == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(got[key], tensor), key  # F32 round-trips exactly (q/k rows un-permuted)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == (name == "tied")

    loaded = load_tokenizer(_file(gguf_dir, name), role="teacher")
    # Same ids for the same tokens (the spurious <|endoftext|> transformers adds is gone), same template.
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert loaded.chat_template == tokenizer.chat_template
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == ("<s>", "</s>", "<pad>")
    chat = [{"role": "user", "content": "Sort: 3 1 2"}, {"role": "assistant", "content": "1 2 3"}]
    assert loaded.apply_chat_template(chat, tokenize=True) == tokenizer.apply_chat_template(
        chat, tokenize=True
    )


def test_gguf_loads_in_the_compute_dtype(gguf_dir):
    model = load_model(_file(gguf_dir, "untied"), role="student", dtype=torch.bfloat16, device=CPU)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_gguf_config_has_no_quantization_config(gguf_dir):
    config = load_config(_file(gguf_dir, "tied"))
    assert config.model_type == "llama" and config.num_hidden_layers == 3 and config.tie_word_embeddings
    assert "quantization_config" not in config.to_dict()


# ------------------------------------------------------------------------------------------------
# Every command takes a GGUF


def _kd_config(tmp_path, teacher: str, student: str, out: str, **overrides) -> DistillConfig:
    base = dict(
        teacher=teacher,
        student=student,
        data=str(write_jsonl(tmp_path / "train.jsonl", ALPACA * 2)),
        method="neo",
        output_dir=str(tmp_path / out),
        max_steps=2,
        batch_size=2,
        grad_accum=1,
        eval_fraction=0.25,
        lora=LoraOptions(r=4),
    )
    return DistillConfig(**(base | overrides))


def test_a_gguf_teacher_is_the_same_teacher(tmp_path, gguf_dir, student_dir):
    steps: dict[str, list[dict]] = {"gguf": [], "hf": []}
    for kind, teacher in (("gguf", _file(gguf_dir, "tied")), ("hf", str(gguf_dir / "tied-hf"))):
        summary = distill(
            _kd_config(tmp_path, teacher, str(student_dir), kind),
            on_step=lambda step, metrics, kind=kind: steps[kind].append(metrics),
        )
        assert summary.merge_check["passed"]
    for a, b in zip(steps["gguf"], steps["hf"], strict=True):
        assert a["kd_loss"] == pytest.approx(b["kd_loss"], rel=1e-6)


def test_a_gguf_student_is_distilled_and_exported(tmp_path, gguf_dir, teacher_dir):
    summary = distill(_kd_config(tmp_path, str(teacher_dir), _file(gguf_dir, "untied"), "student"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "student" / "merged")
    assert summary.merge_check["passed"] and type(merged).__name__ == "LlamaForCausalLM"


def test_prune_and_eval_take_a_gguf(tmp_path, gguf_dir, originals):
    data = write_jsonl(tmp_path / "calib.jsonl", ALPACA * 2)
    report = run_prune(
        PruneConfig(model=str(gguf_dir / "tied"), data=str(data), output=str(tmp_path / "p"), keep_layers=2)
    )
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "p")
    assert report["num_layers_before"] == 3 and pruned.config.num_hidden_layers == 2
    assert pruned.get_output_embeddings().weight is pruned.get_input_embeddings().weight
    metrics = run_eval(
        EvalConfig(model=_file(gguf_dir, "tied"), teacher=str(gguf_dir / "tied-hf"), data=str(data))
    )
    assert metrics["kl_to_teacher"] == pytest.approx(0.0, abs=1e-6) and metrics["top1_agreement"] == 1.0


# ------------------------------------------------------------------------------------------------
# llm-neo convert


@pytest.mark.parametrize("name", ["tied", "untied"])
def test_convert_writes_the_same_model_once(tmp_path, gguf_dir, originals, tokenizer, name):
    out = tmp_path / "converted"
    assert main(["convert", "--model", _file(gguf_dir, name), "--output", str(out), "-q"]) == 0
    files = load_file(out / "model.safetensors")
    assert ("lm_head.weight" in files) == (name == "untied")  # a tied head is stored once
    model = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == (name == "tied")
    for key, tensor in originals[name].state_dict().items():
        assert torch.equal(model.state_dict()[key], tensor), key
    saved = AutoTokenizer.from_pretrained(out)
    assert saved.get_vocab() == tokenizer.get_vocab() and saved.chat_template == tokenizer.chat_template
    report = json.loads((out / "convert.json").read_text())
    assert report["tied_embeddings"] == (name == "tied") and report["dtype"] == "float32"
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"


def test_convert_to_bfloat16_publishes_bfloat16(tmp_path, gguf_dir, originals):
    run_convert(
        ConvertConfig(model=_file(gguf_dir, "untied"), output=str(tmp_path / "bf16"), dtype="bfloat16")
    )
    files = load_file(tmp_path / "bf16" / "model.safetensors")
    assert {t.dtype for t in files.values()} == {torch.bfloat16}
    for key, tensor in originals["untied"].state_dict().items():
        assert torch.equal(files[key], tensor.to(torch.bfloat16)), key


def test_convert_refuses_bad_input_all_at_once(tmp_path, gguf_dir):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("")
    with pytest.raises(ConfigError) as info:
        run_convert(ConvertConfig(model=str(gguf_dir / "tied-hf"), output=str(taken)))
    text = str(info.value)
    assert "is not a .gguf file" in text and "--overwrite" in text
    with pytest.raises(ConfigError, match="--output is required"):
        run_convert(ConvertConfig(model=_file(gguf_dir, "tied")))


def test_a_failed_convert_leaves_nothing(tmp_path, gguf_dir, monkeypatch):
    def broken(*args, **kwargs):
        raise ModelError("verification failed")

    monkeypatch.setattr(convert_module, "_verify", broken)
    with pytest.raises(ModelError, match="verification failed"):
        run_convert(ConvertConfig(model=_file(gguf_dir, "tied"), output=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.iterdir())  # no temporary directory left either
