"""torchao int8 export: safetensors that reload bit-exact, compute the saved model's exact logits, and stay
close to the dense source."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("torchao", reason="the quant extra is not installed: pip install 'llm-neo[quant]'")

from transformers import AutoModelForCausalLM

from llm_neo.export import EXPORT_FILE, export_model
from llm_neo.export.int8 import _bit_exact, export_int8
from llm_neo.models.quant import is_quantized_linear, weight_bytes


@pytest.fixture(autouse=True, scope="module")
def _threads(one_thread):
    yield


def test_int8_export_reloads_bit_exact(teacher_dir, tmp_path):
    out = tmp_path / "int8"
    result = export_int8(teacher_dir, out)
    check = result["verification"]
    assert check["passed"], check["problems"]
    assert check["tensors_bit_exact"] and check["logits_equal"]
    assert result["quantized_linears"] == 4 * 7
    assert check["kl_per_token"] < 1e-4 and check["top1_agreement"] > 0.95

    # Independently of the export's own check: a plain from_pretrained gives torchao int8 linears whose
    # every component equals the in-memory quantized model's.
    reloaded = AutoModelForCausalLM.from_pretrained(out, device_map={"": "cpu"})
    assert sum(is_quantized_linear(m) for m in reloaded.modules()) == 4 * 7
    assert not is_quantized_linear(reloaded.lm_head)
    assert weight_bytes(reloaded) == result["weight_bytes"] < 0.5 * result["source_weight_bytes"]
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))


def test_bit_exact_comparison_can_fail(teacher_dir, tmp_path):
    out = tmp_path / "int8"
    export_int8(teacher_dir, out)
    a = AutoModelForCausalLM.from_pretrained(out, device_map={"": "cpu"}).model.layers[0].mlp.up_proj.weight
    b = AutoModelForCausalLM.from_pretrained(out, device_map={"": "cpu"}).model.layers[0].mlp.up_proj.weight
    assert _bit_exact(a, b)
    with torch.no_grad():
        b.qdata[0, 0] += 1
    assert not _bit_exact(a, b)
    assert not _bit_exact(a, b.dequantize())


def test_export_model_int8_writes_export_json(teacher_dir, tmp_path):
    record = export_model(teacher_dir, "int8", None, tmp_path / "out")
    on_disk = json.loads((tmp_path / "out" / EXPORT_FILE).read_text())
    assert on_disk["format"] == "int8" and on_disk["verification"]["passed"]
    assert on_disk["written"]["quantized_linears"] == record["written"]["quantized_linears"] == 28
    assert "model.safetensors" in on_disk["files"]
