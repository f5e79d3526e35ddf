"""Invariants of llm_neo.models.lora: only LoRA trains, merge == adapter model, saved adapters reload
exactly."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import NewTensors
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from llm_neo.choices import LORA_VARIANTS
from llm_neo.models.anatomy import default_target_modules
from llm_neo.models.lora import (
    MixedLoraA,
    attach_lora,
    merge_lora,
    save_adapter,
    trainable_parameters,
)
from llm_neo.models.tiny import build_llama

LLAMA_PROJECTIONS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
R = 4
ATOL = 1e-5


def load_student(student_dir) -> LlamaForCausalLM:
    model = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    return model.eval()


def batch(vocab_size: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (2, 12), generator=gen)  # [B, T]


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()  # [B, T, V]


@torch.no_grad()
def perturb(model, seed: int = 0) -> None:
    """Move every trainable tensor off its init (B ≠ 0, M ≠ its init) so ΔW is non-trivial."""
    gen = torch.Generator().manual_seed(seed)
    for p in trainable_parameters(model).values():
        p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def base_name(peft_name: str) -> str:
    """PEFT parameter name -> the plain model's name for the same base tensor."""
    return peft_name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def expected_trainable(model, variant: str, r: int = R) -> int:
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in LLAMA_PROJECTIONS:
            total += r * (module.in_features + module.out_features)
            if variant == "moslora":
                total += r * r
            if variant == "dora":
                total += module.out_features
    return total


@pytest.fixture()
def student(student_dir) -> LlamaForCausalLM:
    return load_student(student_dir)


# ---------------------------------------------------------------------------------------- targets, args


def test_default_target_modules_llama():
    model = build_llama(100, hidden_size=16, num_heads=2)
    assert default_target_modules(model) == LLAMA_PROJECTIONS
    tied = build_llama(100, hidden_size=16, num_heads=2, tie_word_embeddings=True)
    targets = default_target_modules(tied)
    assert targets == LLAMA_PROJECTIONS
    assert "lm_head" not in targets and "embed_tokens" not in targets


def test_default_targets_leave_lm_head_and_embeddings_alone(student):
    model = attach_lora(student, r=R)
    names = list(trainable_parameters(model))
    assert names and not any("lm_head" in n or "embed_tokens" in n for n in names)
    assert type(model.get_output_embeddings()) is torch.nn.Linear  # not wrapped by PEFT


def test_bad_arguments_raise_informative_errors(student):
    with pytest.raises(ValueError, match="unknown variant 'qlora'") as err:
        attach_lora(student, r=R, variant="qlora")
    assert all(v in str(err.value) for v in LORA_VARIANTS)
    with pytest.raises(ValueError, match="r must be an integer >= 1"):
        attach_lora(student, r=0)
    with pytest.raises(ValueError, match=r"match no nn\.Linear") as err:
        attach_lora(student, r=R, target_modules=["q_proj", "qkv"])
    assert "qkv" in str(err.value) and all(p in str(err.value) for p in LLAMA_PROJECTIONS)
    # All problems reported at once.
    with pytest.raises(ValueError) as err:
        attach_lora(student, r=-1, variant="nope", lora_dropout=1.5)
    assert "variant" in str(err.value) and "r must" in str(err.value) and "lora_dropout" in str(err.value)
    # The failed calls left the model untouched.
    assert not isinstance(student, PeftModel)
    assert not any("lora" in n for n, _ in student.named_parameters())


def test_caller_inputs_not_mutated_and_alpha_default(student):
    targets = ["v_proj", "q_proj"]
    model = attach_lora(student, r=R, target_modules=targets)
    assert targets == ["v_proj", "q_proj"]
    config = model.peft_config["default"]
    assert config.lora_alpha == 2 * R and config.r == R
    assert set(config.target_modules) == {"q_proj", "v_proj"}
    assert all(".q_proj." in n or ".v_proj." in n for n in trainable_parameters(model))


def test_rslora_scaling(student):
    model = attach_lora(student, r=R, lora_alpha=8, variant="rslora")
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(8 / math.sqrt(R))


def test_seeded_and_rng_neutral(student_dir):
    state = torch.get_rng_state()
    a = trainable_parameters(attach_lora(load_student(student_dir), r=R, variant="moslora", seed=3))
    assert torch.equal(torch.get_rng_state(), state)
    b = trainable_parameters(attach_lora(load_student(student_dir), r=R, variant="moslora", seed=3))
    c = trainable_parameters(attach_lora(load_student(student_dir), r=R, variant="moslora", seed=4))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if "lora_A" in k)


def test_adapter_is_fp32_on_bf16_base():
    base = build_llama(100, hidden_size=16, num_heads=2).to(torch.bfloat16)
    for variant in ("lora", "moslora"):
        model = attach_lora(
            build_llama(100, hidden_size=16, num_heads=2).to(torch.bfloat16), r=R, variant=variant
        )
        assert all(p.dtype == torch.float32 for p in trainable_parameters(model).values())
        assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if not p.requires_grad)
        model(input_ids=batch(100))  # the mixed-dtype forward runs
    assert base.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------- per variant


@pytest.mark.parametrize("variant", LORA_VARIANTS)
def test_only_lora_parameters_trainable(student, variant):
    expected = expected_trainable(student, variant)
    model = attach_lora(student, r=R, variant=variant)
    trainable = trainable_parameters(model)
    assert all(".lora_" in n for n in trainable)
    assert sum(p.numel() for p in trainable.values()) == expected
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and not any(".lora_" in n for n in frozen)
    mixers = [n for n in trainable if n.endswith(".mixer")]
    assert len(mixers) == (2 * len(LLAMA_PROJECTIONS) if variant == "moslora" else 0)


@pytest.mark.parametrize("variant", LORA_VARIANTS)
def test_init_preserves_outputs(student_dir, variant):
    original = load_student(student_dir)
    ids = batch(original.config.vocab_size)
    reference = logits(original, ids)
    model = attach_lora(original, r=R, variant=variant).eval()
    # ΔW = 0 at init (PiSSA: W_res + s·B0·A0 = W, up to SVD rounding).
    atol = 1e-4 if variant == "pissa" else 1e-6
    torch.testing.assert_close(logits(model, ids), reference, atol=atol, rtol=0)


@pytest.mark.parametrize("variant", LORA_VARIANTS)
def test_merge_equals_adapter_model(student_dir, tmp_path, variant):
    original = load_student(student_dir)
    n_params = sum(p.numel() for p in original.parameters())
    keys = set(original.state_dict())
    ids = batch(original.config.vocab_size)
    model = attach_lora(load_student(student_dir), r=R, variant=variant).eval()
    perturb(model)
    adapter_logits = logits(model, ids)
    assert not torch.allclose(adapter_logits, logits(original, ids), atol=1e-3)  # ΔW is really non-zero

    merged = merge_lora(model)
    assert type(merged) is LlamaForCausalLM
    assert set(merged.state_dict()) == keys
    assert sum(p.numel() for p in merged.parameters()) == n_params
    assert not any("lora" in n or "mixer" in n for n, _ in merged.named_modules())
    torch.testing.assert_close(logits(merged.eval(), ids), adapter_logits, atol=ATOL, rtol=0)

    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert type(reloaded) is LlamaForCausalLM
    torch.testing.assert_close(logits(reloaded, ids), adapter_logits, atol=ATOL, rtol=0)


def test_moslora_delta_is_b_m_a(student_dir):
    original = load_student(student_dir)
    w0 = original.model.layers[0].mlp.up_proj.weight.detach().clone()
    model = attach_lora(original, r=R, variant="moslora")
    perturb(model)
    layer = model.base_model.model.model.layers[0].mlp.up_proj
    lora_a = layer.lora_A["default"]
    assert isinstance(lora_a, MixedLoraA)
    a, m, b = lora_a.weight.detach(), lora_a.mixer.detach(), layer.lora_B["default"].weight.detach()
    assert not torch.allclose(m, torch.eye(R), atol=1e-2)
    expected = w0 + layer.scaling["default"] * b @ m @ a
    merged = merge_lora(model)
    torch.testing.assert_close(merged.model.layers[0].mlp.up_proj.weight, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("variant", LORA_VARIANTS)
def test_save_adapter_reloads_on_original_and_leaves_model_alone(student_dir, tmp_path, variant):
    ids = batch(load_student(student_dir).config.vocab_size)
    model = attach_lora(load_student(student_dir), r=R, variant=variant).eval()
    perturb(model)
    before_logits = logits(model, ids)
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    before_types = {n: type(m) for n, m in model.named_modules()}

    save_adapter(model, tmp_path / "adapter")

    # The live model is untouched: same modules, same tensors, same outputs, still trainable.
    assert {n: type(m) for n, m in model.named_modules()} == before_types
    after_state = model.state_dict()
    assert after_state.keys() == before_state.keys()
    assert all(torch.equal(after_state[k], v) for k, v in before_state.items())
    assert torch.equal(logits(model, ids), before_logits)
    assert all(".lora_" in n for n in trainable_parameters(model))

    # A standard PEFT adapter, applied to the ORIGINAL student (never the PiSSA residual).
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert not any("mixer" in k for k in tensors)
    assert config["r"] == (2 * R if variant == "pissa" else R)
    assert config["init_lora_weights"] is True
    reloaded = PeftModel.from_pretrained(load_student(student_dir), tmp_path / "adapter").eval()
    torch.testing.assert_close(logits(reloaded, ids), before_logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("variant", LORA_VARIANTS)
def test_optimizer_step_changes_only_lora(student_dir, variant):
    original = load_student(student_dir)
    original_state = original.state_dict()
    model = attach_lora(load_student(student_dir), r=R, variant=variant).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = trainable_parameters(model)

    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    ids = batch(original.config.vocab_size)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()

    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= set(trainable)
    assert any(".lora_B." in n for n in changed)
    for name, param in model.named_parameters():
        if name in trainable:
            continue
        assert torch.equal(param, before[name]), name  # bit-identical during training
        targeted = ".base_layer." in name and name.endswith(".weight")
        if variant == "pissa" and targeted:
            # PiSSA replaced W by the residual at init, and only then.
            assert not torch.equal(param, original_state[base_name(name)]), name
        else:
            assert torch.equal(param, original_state[base_name(name)]), name


# ---------------------------------------------------------------------------------------- in-place add


def _peft_forward_everywhere(model) -> None:
    """Undo llm-neo's in-place forward: every LoRA layer runs PEFT's class forward again."""
    for module in model.modules():
        module.__dict__.pop("forward", None)


@pytest.mark.parametrize("variant", LORA_VARIANTS)
def test_in_place_forward_equals_pefts_to_the_bit(student_dir, variant):
    # The same values and gradients as PEFT's own out-of-place forward, on every variant (DoRA keeps
    # PEFT's forward: its branch is not a plain add).
    ids = batch(64)
    runs = []
    for in_place in (True, False):
        model = attach_lora(load_student(student_dir), r=R, variant=variant).train()
        perturb(model)
        if not in_place:
            _peft_forward_everywhere(model)
        out = model(input_ids=ids).logits
        out.float().pow(2).mean().backward()
        grads = {n: p.grad for n, p in trainable_parameters(model).items()}
        runs.append((out.detach(), grads))
    (out_a, grads_a), (out_b, grads_b) = runs
    assert torch.equal(out_a, out_b)
    assert grads_a.keys() == grads_b.keys() and all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)


def test_in_place_forward_makes_two_output_sized_tensors_where_pefts_makes_four(student_dir):
    model = attach_lora(load_student(student_dir), r=R).train()
    layer = model.base_model.model.model.layers[0].mlp.up_proj
    x = torch.randn(2, 12, layer.in_features, requires_grad=True)
    counts = []
    for in_place in (True, False):
        if not in_place:
            _peft_forward_everywhere(model)
        with NewTensors(numel=2 * 12 * layer.out_features) as mode:
            out = layer(x)
        counts.append(mode.count)
        del out
    assert counts == [2, 4]  # base output and branch, kept as one; PEFT adds the scaled branch and the sum


def test_in_place_forward_leaves_merged_disabled_and_dora_layers_to_peft(student_dir):
    from peft.tuners.lora import Linear as LoraLinear

    dora = attach_lora(load_student(student_dir), r=R, variant="dora")
    assert not any("forward" in m.__dict__ for m in dora.modules() if isinstance(m, LoraLinear))
    model = attach_lora(load_student(student_dir), r=R).eval()
    perturb(model)
    ids = batch(64)
    with model.disable_adapter():  # disabled adapters: the base model's logits, as PEFT gives them
        disabled = logits(model, ids)
    _peft_forward_everywhere(model)
    with model.disable_adapter():
        assert torch.equal(disabled, logits(model, ids))
