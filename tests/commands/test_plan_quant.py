"""The planner's quantized bytes against what llm_neo.models.quant actually holds."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from llm_neo.commands.plan import (
    GiB,
    PlanConfig,
    RunShape,
    StepShape,
    estimate_arm,
    model_dims,
    plan_rows,
    weight_bytes_at,
)
from llm_neo.commands.shapes import get_shape
from llm_neo.errors import ConfigError
from llm_neo.models.loading import load_model

pytest.importorskip("torchao", reason="the quant extra is not installed: pip install 'llm-neo[quant]'")
pytest.importorskip("bitsandbytes", reason="the quant extra is not installed: pip install 'llm-neo[quant]'")

from llm_neo.models.quant import load_quantized_base, quantize_teacher, weight_bytes

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def wide_dir(models_dir, tokenizer):
    from llm_neo.models.tiny import build_llama, save_model

    return save_model(
        build_llama(len(tokenizer), hidden_size=256, num_layers=2, intermediate_size=512, seed=11),
        tokenizer,
        models_dir / "plan_wide",
    )


def _buffers(model: torch.nn.Module) -> int:
    return sum(b.numel() * b.element_size() for b in model.buffers())


def test_int8_teacher_bytes_are_exact(teacher_dir):
    teacher = load_model(str(teacher_dir), role="t", dtype=torch.float32, device=CPU)
    dims = model_dims(teacher.config)
    _, info = quantize_teacher(teacher, "int8")
    assert weight_bytes_at(dims, "int8", 4) == info["weight_bytes_after"] - _buffers(teacher)
    assert weight_bytes_at(dims, "none", 4) == info["weight_bytes_before"] - _buffers(teacher)


@pytest.mark.parametrize("who", ["teacher", "student base"])
def test_nf4_bytes_within_two_percent(wide_dir, who):
    if who == "teacher":
        model = load_model(str(wide_dir), role="t", dtype=torch.float32, device=CPU)
        dims = model_dims(model.config)
        _, info = quantize_teacher(model, "nf4")
        held = info["weight_bytes_after"]
    else:
        model = load_quantized_base(str(wide_dir), "nf4", dtype=torch.float32, device=CPU)
        dims = model_dims(model.config)
        held = weight_bytes(model)
    planned = weight_bytes_at(dims, "nf4", 4)
    assert planned == pytest.approx(held - _buffers(model), rel=0.02)


def _fresh_saved_bytes(model: torch.nn.Module, ids: torch.Tensor) -> int:
    """Bytes of the tensors autograd saves for the backward that the model does not already hold."""
    from llm_neo.models.quant import storage_tensors

    held = {
        part.untyped_storage().data_ptr()
        for t in [*model.parameters(), *model.buffers()]
        for part in storage_tensors(t)
    }
    seen: set[int] = set()
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in held and ptr not in seen and not hasattr(t, "__tensor_flatten__"):
            seen.add(ptr)
            total += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    return total


def test_int8_student_base_keeps_a_copy_of_each_weight_as_planned(wide_dir):
    from llm_neo.models.lora import attach_lora

    ids = torch.randint(3, 300, (1, 8), generator=torch.Generator().manual_seed(0))
    dense = attach_lora(load_model(str(wide_dir), role="s", dtype=torch.float32, device=CPU), r=4)
    int8 = attach_lora(load_quantized_base(str(wide_dir), "int8", dtype=torch.float32, device=CPU), r=4)
    nf4 = attach_lora(load_quantized_base(str(wide_dir), "nf4", dtype=torch.float32, device=CPU), r=4)
    for m in (dense, int8, nf4):
        m.train()
    dims = model_dims(dense.get_base_model().config)
    extra_int8 = _fresh_saved_bytes(int8, ids) - _fresh_saved_bytes(dense, ids)
    extra_nf4 = _fresh_saved_bytes(nf4, ids) - _fresh_saved_bytes(dense, ids)
    # Every int8 weight's fp32 copy is saved, except the first block's q/k/v: their input (the frozen
    # embeddings, normed) needs no gradient, so autograd keeps no weight for them. The plan counts them
    # too (an over-estimate of 3 of 7·L linears).
    first_qkv = sum(
        dense.get_base_model().get_submodule(f"model.layers.0.self_attn.{n}").base_layer.weight.numel()
        for n in ("q_proj", "k_proj", "v_proj")
    )
    assert extra_int8 == 4 * (dims.block_linear_weights - first_qkv)
    assert extra_nf4 < 0.05 * 4 * dims.block_linear_weights  # bitsandbytes saves the packed weight only

    run = RunShape(batch_size=1, seq_len=8, compute_bytes=4, lora_r=4)
    plain = estimate_arm("lora", "chunked", StepShape(dims, None, run))
    with_int8 = estimate_arm("lora", "chunked", StepShape(dims, None, replace(run, student_quant="int8")))
    assert (
        with_int8.components["weight copies"] - plain.components["weight copies"]
        == 4 * dims.block_linear_weights
    )


def test_quantization_changes_only_what_it_should():
    config = dict(
        shape="llama3-8b-to-1b", batch_size=8, seq_len=2048, gradient_checkpointing=True, device="cuda"
    )
    base, _ = plan_rows(PlanConfig(**config, methods=["kd", "neo"], loss_impls=["chunked"]))
    quant, settings = plan_rows(
        PlanConfig(
            **config, methods=["kd", "neo"], loss_impls=["chunked"], teacher_quant="int8", student_quant="nf4"
        )
    )
    shape = get_shape("llama3-8b-to-1b")
    teacher = model_dims(shape.teacher)
    saved_t = 2 * teacher.block_linear_weights - (
        teacher.block_linear_weights + 5 * teacher.block_linear_rows
    )
    for b, q in zip(base, quant, strict=True):
        assert b.components["teacher weights"] - q.components["teacher weights"] == saved_t
    kd_b, neo_b = base
    kd_q, neo_q = quant
    assert kd_q.components["student weights"] == kd_b.components["student weights"]  # full KD trains them all
    assert neo_q.components["student weights"] < 0.45 * neo_b.components["student weights"]
    assert settings["teacher_quant"] == "int8" and settings["student_quant"] == "nf4"
    # Llama-3.1-8B's block linears are 87% of its weights; its embeddings and lm_head stay bf16.
    assert teacher.block_linear_weights / teacher.parameters == pytest.approx(0.87, abs=0.01)
    assert q.total / GiB < b.total / GiB - 6


def test_unknown_quantization_is_a_config_problem():
    with pytest.raises(ConfigError, match="--teacher-quant: 'int4'"):
        plan_rows(PlanConfig(shape="tiny", teacher_quant="int4"))  # type: ignore[arg-type]
