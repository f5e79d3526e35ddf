"""Invariants of llm_neo.models.quant: an int8 teacher close to its fp32 self in half the bytes; QLoRA
bases that train with exact gradients; a merge equal to the adapter on its quantized base; the
bitsandbytes CPU repack never reaching a merge; activation-quantized bases refused."""

from __future__ import annotations

import copy
import functools
import logging
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from llm_neo.errors import ModelError
from llm_neo.models.loading import load_model
from llm_neo.models.lora import attach_lora, trainable_parameters

pytest.importorskip("torchao", reason="the quant extra is not installed: pip install 'llm-neo[quant]'")
pytest.importorskip("bitsandbytes", reason="the quant extra is not installed: pip install 'llm-neo[quant]'")

import llm_neo.models.quant as quant
from llm_neo.models.quant import (
    block_linears,
    check_qlora_variant,
    check_trainable_base,
    dequantized_weight,
    float32_compute,
    is_quantized_linear,
    load_quantized_base,
    load_teacher,
    merge_quantized,
    parameter_count,
    quantize_teacher,
    reference_hidden_states,
    teacher_drift,
    train_mode_without_dropout,
    weight_bytes,
)

CPU = torch.device("cpu")
F32 = torch.float32


@pytest.fixture(autouse=True, scope="module")
def _threads(one_thread):
    yield


def make_batch(vocab: int, seed: int = 0, shape: tuple[int, int] = (2, 16)) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, shape, generator=gen)  # [B, T]
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # a padded row: padding must not count
    return {"input_ids": ids, "attention_mask": mask}


def plain(path) -> nn.Module:
    return load_model(str(path), role="test", dtype=F32, device=CPU).eval()


# ----------------------------------------------------------------------------------------------------
# The teacher


def test_int8_teacher_in_place_close_and_under_half_the_bytes(teacher_dir):
    teacher = plain(teacher_dir)
    reference = copy.deepcopy(teacher)
    batch = make_batch(teacher.config.vocab_size)
    hidden = reference_hidden_states(teacher, batch)
    targets = block_linears(teacher)

    out, info = quantize_teacher(teacher, "int8")

    assert out is teacher
    for name in targets:  # quantized in place: the same module, its weight now a torchao int8 tensor
        assert type(teacher.get_submodule(name).weight).__name__ == "Int8Tensor"
    assert not is_quantized_linear(teacher.lm_head)
    assert type(teacher.model.embed_tokens.weight) is nn.Parameter

    # Hand count: fp32 everywhere before; after, 1 byte per block weight + per row one fp32
    # scale and one int8 zero point (torchao stores it even for symmetric quantization).
    # (Buffers, e.g. the rotary frequencies, are held too and stay as they are.)
    params = sum(p.numel() for p in reference.parameters())
    buffers = sum(b.numel() * b.element_size() for b in reference.buffers())
    linears = [reference.get_submodule(n) for n in targets]
    block_w = sum(m.weight.numel() for m in linears)
    rows = sum(m.out_features for m in linears)
    assert info["weight_bytes_before"] == 4 * params + buffers == weight_bytes(reference)
    assert info["weight_bytes_after"] == 4 * (params - block_w) + block_w + 5 * rows + buffers
    assert info["weight_bytes_after"] < info["weight_bytes_before"] / 2
    assert info["quantized_linears"] == len(targets) == 4 * 7

    drift = teacher_drift(teacher, hidden, batch)
    assert drift["tokens"] == int(batch["attention_mask"].sum())
    assert 0 <= drift["kl_per_token"] < 1e-4
    assert drift["top1_agreement"] > 0.95
    # The two routes to the reference (a model, or its hidden states under the shared lm_head) agree.
    assert teacher_drift(teacher, reference, batch) == pytest.approx(drift, rel=1e-5)


def test_teacher_drift_is_zero_against_itself_and_counts_trained_positions(teacher_dir):
    teacher = plain(teacher_dir)
    batch = make_batch(teacher.config.vocab_size)
    labels = batch["input_ids"].clone()
    labels[:, :5] = -100  # the prompt
    drift = teacher_drift(teacher, copy.deepcopy(teacher), batch | {"labels": labels})
    assert drift["kl_per_token"] == pytest.approx(0.0, abs=1e-7)
    assert drift["top1_agreement"] == 1.0
    assert drift["tokens"] == 2 * (16 - 5)  # shifted: position t predicts label t + 1 (positions 4..14)


def test_teacher_drift_matches_an_fp64_reference_in_any_chunking(teacher_dir):
    teacher = plain(teacher_dir)
    other = copy.deepcopy(teacher)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        other.lm_head.weight.add_(0.5 * torch.randn(other.lm_head.weight.shape, generator=gen))
    batch = make_batch(teacher.config.vocab_size)
    with torch.no_grad():
        mask = batch["attention_mask"].bool()
        log_q = other(**batch).logits.double().log_softmax(-1)[mask]  # [N, V]
        log_p = teacher(**batch).logits.double().log_softmax(-1)[mask]
    kl = float((log_p.exp() * (log_p - log_q)).sum(-1).mean())
    agree = float((log_p.argmax(-1) == log_q.argmax(-1)).double().mean())
    for chunk in (10_000, 7):
        drift = teacher_drift(other, teacher, batch, chunk_size=chunk)
        assert drift["kl_per_token"] == pytest.approx(kl, rel=1e-4)
        assert drift["top1_agreement"] == pytest.approx(agree)
    assert kl > 1e-2


TEACHER_OPTIONS = dict(teacher_quant_backend="auto", trust_remote_code=False, allow_pickle_weights=False)


def test_load_teacher_measures_the_drift_of_the_teacher_it_quantized(teacher_dir):
    batch = make_batch(320)
    options = SimpleNamespace(teacher_quant="int8", **TEACHER_OPTIONS)
    teacher, info = load_teacher(options, str(teacher_dir), dtype=F32, device=CPU, drift_batch=batch)
    expected = teacher_drift(teacher, plain(teacher_dir), batch)  # against a second, dense teacher
    assert info["drift"] == pytest.approx(expected, rel=1e-5)
    assert info["kind"] == "int8" and info["weight_bytes_after"] == weight_bytes(teacher)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    none, no_info = load_teacher(
        SimpleNamespace(teacher_quant="none", **TEACHER_OPTIONS),
        str(teacher_dir),
        dtype=F32,
        device=CPU,
        drift_batch=batch,
    )
    assert no_info is None and not any(is_quantized_linear(m) for m in none.modules())


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_a_teacher_the_gpu_cannot_hold_dense_loads_quantized_to_the_same_weights(
    teacher_dir, kind, monkeypatch
):
    """On a GPU without room for the dense teacher, transformers loads it quantized; the weights must be
    those quantize_teacher makes, and the record must say why the drift is missing."""
    monkeypatch.setattr(quant, "_free_bytes", lambda device: 1)  # as if a GPU had 1 byte free
    batch = make_batch(320)
    options = SimpleNamespace(teacher_quant=kind, **TEACHER_OPTIONS)
    teacher, info = load_teacher(options, str(teacher_dir), dtype=F32, device=CPU, drift_batch=batch)
    assert "drift" not in info and "does not fit in the 0.00 GiB free" in info["drift_skipped"]
    reference, _ = quantize_teacher(plain(teacher_dir), kind)
    assert info["quantized_linears"] == len(block_linears(reference))
    assert info["weight_bytes_after"] == weight_bytes(reference)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    # Train-mode forwards: in eval mode bitsandbytes' CPU kernel repacks the 4-bit weights transformers
    # loaded (not those quantize_teacher builds) and computes differently (≈ 2e-3 here), same weights.
    with train_mode_without_dropout(teacher), train_mode_without_dropout(reference), torch.no_grad():
        torch.testing.assert_close(teacher(**batch).logits, reference(**batch).logits, atol=1e-6, rtol=0)


def test_nf4_teacher_warns_with_the_measured_drift(teacher_dir, caplog):
    teacher = plain(teacher_dir)
    with caplog.at_level(logging.WARNING, logger="llm_neo"):
        _, info = quantize_teacher(teacher, "nf4")
    assert "KL 0.3-0.7" in caplog.text and "different teacher" in caplog.text
    assert info["backend"] == "bitsandbytes"
    assert all(
        type(teacher.get_submodule(n)).__name__ == "Linear4bit" for n in block_linears(plain(teacher_dir))
    )
    assert info["weight_bytes_after"] < 0.5 * info["weight_bytes_before"]


def test_teacher_quant_refusals(teacher_dir):
    teacher = plain(teacher_dir)
    with pytest.raises(ModelError, match="not one of"):
        quantize_teacher(teacher, "int4")
    with pytest.raises(ModelError, match="CUDA only"):
        quantize_teacher(teacher, "int8", backend="bitsandbytes")
    model, info = quantize_teacher(teacher, "none")
    assert model is teacher and info["weight_bytes_after"] == info["weight_bytes_before"]


# ----------------------------------------------------------------------------------------------------
# The QLoRA student base


def loader(path, kind):
    return functools.partial(load_quantized_base, str(path), kind, dtype=F32, device=CPU)


def dense_twin(path, base: nn.Module) -> nn.Module:
    """The plain student with every quantized weight of ``base`` replaced by its dequantized value."""
    twin = plain(path)
    with torch.no_grad():
        for name, module in base.named_modules():
            if is_quantized_linear(module):
                twin.get_submodule(name).weight.copy_(dequantized_weight(module))
    return twin


def perturb(model: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainable_parameters(model).values():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_qlora_trains_with_the_dequantized_weights_gradients(student_dir, kind):
    base = loader(student_dir, kind)()
    assert check_trainable_base(base) == 2 * 7
    twin = attach_lora(dense_twin(student_dir, base), r=4, seed=3)
    model = attach_lora(base, r=4, seed=3)
    batch = make_batch(base.config.vocab_size)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model.train()
    twin.train()

    # First backward: B = 0 everywhere, so the first block's lora_B gradient only exists if the
    # gradient passed back through every quantized layer above it.
    loss = model(**batch, labels=labels).loss
    loss.backward()
    twin(**batch, labels=labels).loss.backward()
    first = trainable_parameters(model)[
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"
    ]
    assert first.grad is not None and first.grad.abs().sum() > 0
    for (name, p), (_, q) in zip(
        trainable_parameters(model).items(), trainable_parameters(twin).items(), strict=True
    ):
        assert q.grad is not None and p.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)

    optimizer = torch.optim.AdamW(trainable_parameters(model).values(), lr=1e-2)
    losses = []
    for _ in range(3):
        optimizer.step()
        optimizer.zero_grad()
        loss = model(**batch, labels=labels).loss
        loss.backward()
        losses.append(loss.item())
    assert losses[0] > losses[1] > losses[2]


@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("variant", ["lora", "rslora", "moslora"])
def test_merge_equals_adapter_on_quantized_base(student_dir, kind, variant):
    load = loader(student_dir, kind)
    model = attach_lora(load(), r=4, variant=variant, seed=1, lora_dropout=0.1)
    perturb(model)
    batch = make_batch(model.config.vocab_size, seed=5)
    model.eval()
    with train_mode_without_dropout(model), torch.no_grad():
        assert model.training and all(m.p == 0 for m in model.modules() if isinstance(m, nn.Dropout))
        reference = model(**batch).logits
    assert not model.training  # restored, dropout too
    assert {m.p for m in model.modules() if isinstance(m, nn.Dropout)} == {0.1}

    merged = merge_quantized(model, load, dtype=F32)

    assert type(merged).__name__ == "LlamaForCausalLM"
    assert getattr(merged.config, "quantization_config", None) is None
    assert not any(is_quantized_linear(m) for m in merged.modules())
    dense_count = sum(p.numel() for p in plain(student_dir).parameters())
    assert sum(p.numel() for p in merged.parameters()) == dense_count == parameter_count(load())
    assert parameter_count(merged) == dense_count
    with torch.no_grad():
        logits = merged(**batch).logits
    mask = batch["attention_mask"].bool()
    assert float((logits - reference)[mask].abs().max()) <= 1e-5
    # ... and the delta is real: the plain dequantized base alone is far from the adapter model.
    with torch.no_grad():
        bare = dense_twin(student_dir, load())(**batch).logits
    assert float((bare - reference)[mask].abs().max()) > 1e-3


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_merge_of_a_bf16_base_measured_in_fp32_is_exact(student_dir, kind):
    """A run in bf16 (a GPU's): the check casts the adapter model to fp32 compute and merges in fp32, so it
    measures the merge, not bf16 rounding."""
    load = functools.partial(load_quantized_base, str(student_dir), kind, dtype=torch.bfloat16, device=CPU)
    model = attach_lora(load(), r=4, seed=1)
    perturb(model)
    batch = make_batch(model.config.vocab_size, seed=2)
    with train_mode_without_dropout(model), torch.no_grad():
        bf16 = model(**batch).logits.float()
    float32_compute(model)
    with train_mode_without_dropout(model), torch.no_grad():
        reference = model(**batch).logits
    merged = merge_quantized(model, load, dtype=F32)
    with torch.no_grad():
        logits = merged(**batch).logits
    mask = batch["attention_mask"].bool()
    assert float((logits - reference)[mask].abs().max()) <= 1e-5
    assert float((bf16 - reference)[mask].abs().max()) > 1e-5  # what the fp32 compute takes out


def test_merge_is_cast_to_the_requested_dtype(student_dir):
    load = loader(student_dir, "int8")
    model = attach_lora(load(), r=4)
    merged = merge_quantized(model, load, dtype=torch.bfloat16)
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}


def _repacks_on_eval(module: nn.Module) -> bool:
    return bool(getattr(module.weight.quant_state, "packing_format_for_cpu", False))


def test_eval_forward_before_merging_changes_nothing(wide_student_dir):
    load = loader(wide_student_dir, "nf4")
    model = attach_lora(load(), r=4, seed=2)
    perturb(model)
    batch = make_batch(model.config.vocab_size)
    with train_mode_without_dropout(model), torch.no_grad():
        reference = model(**batch).logits
    untouched = merge_quantized(copy.deepcopy(model), load, dtype=F32).state_dict()

    model.eval()
    with torch.no_grad():
        model(**batch)  # on an AVX512-BF16 CPU this repacks every trained 4-bit weight in place
    after_eval = merge_quantized(model, load, dtype=F32)

    for key, tensor in after_eval.state_dict().items():
        assert torch.equal(tensor, untouched[key]), key
    with torch.no_grad():
        assert float((after_eval(**batch).logits - reference).abs().max()) <= 1e-5


def test_a_repacked_base_is_never_dequantized(wide_student_dir):
    base = loader(wide_student_dir, "nf4")()
    layer = base.model.layers[0].self_attn.q_proj
    before = dequantized_weight(layer).clone()
    base.eval()
    with torch.no_grad():
        base(**make_batch(base.config.vocab_size))
    if not _repacks_on_eval(layer):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not repack, there is no trap to guard")
    # The trap is real: the raw packed data no longer decodes to the weight ...
    import bitsandbytes as bnb

    garbage = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert garbage.shape != before.shape or not torch.equal(garbage, before)
    # ... and llm-neo refuses to dequantize it, directly or as the "fresh" base of a merge.
    with pytest.raises(ModelError, match="repacked"):
        dequantized_weight(layer)
    model = attach_lora(loader(wide_student_dir, "nf4")(), r=4)
    with pytest.raises(ModelError, match="repacked"):
        merge_quantized(model, lambda: base, dtype=F32)


def test_merge_refuses_a_base_other_than_the_trained_one(student_dir, models_dir, tokenizer):
    from llm_neo.models.tiny import build_llama, save_model

    other = save_model(
        build_llama(len(tokenizer), hidden_size=32, num_layers=2, seed=99),
        tokenizer,
        models_dir / "other_student",
    )
    model = attach_lora(loader(student_dir, "int8")(), r=4)
    with pytest.raises(ModelError, match="other quantized weights"):
        merge_quantized(model, loader(other, "int8"), dtype=F32)
    with pytest.raises(ModelError, match="without quantized linears"):
        merge_quantized(model, lambda: plain(student_dir), dtype=F32)


def test_variants_that_cannot_merge_exactly_are_refused(student_dir):
    for variant in ("dora", "pissa"):
        with pytest.raises(ModelError, match=f"--lora.variant {variant}"):
            check_qlora_variant(variant)
    for variant in ("lora", "rslora", "moslora"):
        check_qlora_variant(variant)
    load = loader(student_dir, "int8")
    dora = attach_lora(load(), r=4, variant="dora")
    with pytest.raises(ModelError, match="DoRA"):
        merge_quantized(dora, load, dtype=F32)


def _dynamic_activation_base(path):
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig
    from transformers import AutoModelForCausalLM, TorchAoConfig

    return AutoModelForCausalLM.from_pretrained(
        str(path),
        dtype=F32,
        quantization_config=TorchAoConfig(Int8DynamicActivationInt8WeightConfig()),
        device_map={"": CPU},
    )


def test_an_activation_quantized_base_cuts_the_graph_and_is_refused(student_dir, tmp_path):
    # Why it is refused: LoRA on it gets no gradient in the first block at the first step.
    model = attach_lora(_dynamic_activation_base(student_dir), r=4)
    model.train()
    batch = make_batch(model.config.vocab_size)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    first = trainable_parameters(model)[
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"
    ]
    assert first.grad is None or float(first.grad.abs().sum()) == 0.0

    with pytest.raises(ModelError, match="activations are quantized"):
        check_trainable_base(_dynamic_activation_base(student_dir))
    # A checkpoint saved that way brings its own quantization config: load_quantized_base refuses it too.
    _dynamic_activation_base(student_dir).save_pretrained(tmp_path / "dyn", safe_serialization=True)
    with pytest.raises(ModelError, match="activations are quantized"):
        load_quantized_base(str(tmp_path / "dyn"), "int8", dtype=F32, device=CPU)


def test_gradient_probe_catches_a_layer_that_cuts_the_graph(student_dir):
    base = loader(student_dir, "int8")()
    layer = base.model.layers[1].mlp.down_proj
    forward = layer.forward
    layer.forward = lambda x: forward(x.detach())  # an unknown quantized type that drops the graph
    with pytest.raises(ModelError, match=r"layers\.1\.mlp\.down_proj: no gradient"):
        check_trainable_base(base)
