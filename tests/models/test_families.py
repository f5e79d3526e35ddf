"""The family matrix: every common model family, tiny and random, through every arm and command.

Each family of ``llm_neo.models.tiny.FAMILIES`` gets a 3-block teacher and a smaller 2-block student,
both on the one shared tokenizer, and must pass what a user would run: the four arms (merge verified,
only the LoRA targets changed), ``prune``, ``cache-teacher`` + training from the cache, ``eval``, and
gradient checkpointing with MLP chunks. The teacher and student are built once per family.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers
from conftest import ALPACA, write_jsonl
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from llm_neo.commands.evaluate import run_eval
from llm_neo.commands.prune import PruneConfig, run_prune
from llm_neo.config import CacheTeacherConfig, DistillConfig, EvalConfig, LoraOptions
from llm_neo.distill import distill
from llm_neo.errors import ModelError
from llm_neo.models.anatomy import (
    TESTED_MODEL_TYPES,
    decoder_blocks,
    default_target_modules,
    final_hidden_states,
    model_logits,
)
from llm_neo.models.loading import check_supported, load_config, load_tokenizer
from llm_neo.models.tiny import FAMILIES, build_family, family_config, save_model
from llm_neo.summary import RunSummary
from llm_neo.teacher_cache.writer import cache_teacher

pytestmark = pytest.mark.usefixtures("one_thread")

TEACHER_SHAPE = dict(hidden_size=32, num_layers=3, num_heads=4)
STUDENT_SHAPE = dict(hidden_size=16, num_layers=2, num_heads=2)
TIED = {name for name in FAMILIES if family_config(name, 320).tie_word_embeddings}


@dataclass(frozen=True)
class Pair:
    name: str
    teacher: Path
    student: Path
    data: Path
    root: Path


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request, tmp_path_factory, tokenizer) -> Pair:
    name = request.param
    root = tmp_path_factory.mktemp(name)
    return Pair(
        name=name,
        teacher=save_model(
            build_family(name, len(tokenizer), seed=1, **TEACHER_SHAPE), tokenizer, root / "t"
        ),
        student=save_model(
            build_family(name, len(tokenizer), seed=2, **STUDENT_SHAPE), tokenizer, root / "s"
        ),
        data=write_jsonl(root / "train.jsonl", ALPACA * 2),
        root=root,
    )


def _config(pair: Pair, method: str, out: str, **overrides) -> DistillConfig:
    base = dict(
        student=str(pair.student),
        teacher=str(pair.teacher),
        data=str(pair.data),
        method=method,
        output_dir=str(pair.root / out),
        max_steps=2,
        batch_size=2,
        grad_accum=1,
        eval_fraction=0.25,
        seed=0,
        lora=LoraOptions(r=4),
    )
    base.update(overrides)
    return DistillConfig(**base)


def _first_step(config: DistillConfig) -> tuple[RunSummary, dict]:
    steps: list[dict] = []
    summary = distill(config, on_step=lambda step, metrics: steps.append(metrics))
    return summary, steps[0]


def _block_prefix(model: torch.nn.Module) -> str:
    """The state-dict prefix of the model's block list (model.layers, transformer.h, gpt_neox.layers)."""
    blocks = decoder_blocks(model)[2]
    return next(name for name, module in model.named_modules() if module is blocks)


# ------------------------------------------------------------------------------------------------
# The families, one table


def test_the_tested_families_are_the_table():
    assert {family_config(name, 320).model_type for name in FAMILIES} == set(TESTED_MODEL_TYPES)


def test_check_supported_accepts_every_family(pair):
    for role, method in (("teacher", None), ("student", "neo"), ("student", "kd")):
        check_supported(load_config(str(pair.student)), role=role, method=method)


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (transformers.T5Config(), "encoder-decoder"),
        (transformers.Gemma3Config(), "multimodal"),
        (transformers.BertConfig(), "cannot find its decoder blocks"),
        (transformers.MambaConfig(vocab_size=320, hidden_size=16, num_hidden_layers=1), "state-space"),
    ],
)
def test_check_supported_refuses_what_cannot_work(config, expected):
    with pytest.raises(ModelError, match=expected):
        check_supported(config, role="student", method="neo")


def test_check_supported_refuses_lora_on_fused_experts():
    with pytest.raises(ModelError, match="Qwen3MoeExperts, not a linear layer"):
        check_supported(
            family_config("qwen3-moe", 320), role="student", method="neo", target_modules=["experts"]
        )
    # Full-parameter arms train the experts too: nothing to refuse.
    check_supported(family_config("qwen3-moe", 320), role="student", method="kd", target_modules=["experts"])


def test_default_lora_targets_per_family():
    expected = {
        "gpt2": ["c_attn", "c_fc", "c_proj"],
        "gpt-neox": ["dense", "dense_4h_to_h", "dense_h_to_4h", "query_key_value"],
        "phi3": ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"],
        "qwen3-moe": ["k_proj", "o_proj", "q_proj", "v_proj"],  # attention only: experts are 3-D params
    }
    for name, targets in expected.items():
        assert default_target_modules(build_family(name, 320)) == targets, name
    llama = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    for name in ("llama", "llama-tied", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "olmo2"):
        assert default_target_modules(build_family(name, 320)) == llama, name


# ------------------------------------------------------------------------------------------------
# What the chunked loss relies on


def test_hidden_states_and_head_give_the_forward_logits(pair):
    """final_hidden_states -> model_logits (lm_head, soft-capping) is the model's own forward."""
    model = AutoModelForCausalLM.from_pretrained(pair.teacher).eval()
    ids = torch.randint(3, 300, (2, 40))  # longer than the sliding windows (16)
    mask = torch.ones_like(ids)
    mask[1, 25:] = 0
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        got = model_logits(model, final_hidden_states(model, ids, mask))
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# The four arms


@pytest.mark.parametrize("method", ["sft", "lora", "kd", "neo"])
def test_every_arm_merges_and_changes_only_what_it_trains(pair, method):
    summary = distill(_config(pair, method, method))
    merged_dir = Path(summary.config["output_dir"]) / "merged"
    if method in ("lora", "neo"):
        assert summary.merge_check["passed"]
        assert summary.merge_check["max_abs_logit_diff"] <= 1e-4
    else:
        reason = f"--method {method} trains every weight; nothing is merged"
        assert summary.merge_check == {"applicable": False, "reason": reason}
    assert summary.merged_parameters == summary.student_parameters
    assert summary.heldout["kl_to_teacher"] > 0

    before = load_file(pair.student / "model.safetensors")
    after = load_file(merged_dir / "model.safetensors")
    assert set(after) == set(before)
    student = AutoModelForCausalLM.from_pretrained(pair.student)
    if method in ("lora", "neo"):
        targets = tuple(f".{leaf}.weight" for leaf in default_target_modules(student))
        for key, tensor in before.items():
            if key.endswith(targets):
                assert not torch.equal(after[key], tensor), f"{key} should carry the merged LoRA update"
            else:  # embeddings, norms, biases, routers, experts, lm_head: untouched, bit for bit
                assert torch.equal(after[key], tensor), f"{key} changed but is not a LoRA target"
    else:
        assert any(not torch.equal(after[k], before[k]) for k in before)

    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert type(merged) is type(student)
    tied = merged.get_output_embeddings().weight is merged.get_input_embeddings().weight
    assert tied == (pair.name in TIED)


def test_gradient_checkpointing_with_mlp_chunks_changes_nothing(pair):
    plain, plain_step = _first_step(_config(pair, "neo", "gc-off", max_steps=1))
    chunked, chunked_step = _first_step(
        _config(pair, "neo", "gc-on", max_steps=1, gradient_checkpointing=True, mlp_chunks=2)
    )
    assert chunked_step["loss"] == pytest.approx(plain_step["loss"], rel=1e-6)
    assert chunked_step["grad_norm"] == pytest.approx(plain_step["grad_norm"], rel=1e-4)
    a = load_file(plain.output_dir / "merged" / "model.safetensors")
    b = load_file(chunked.output_dir / "merged" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# prune, cache-teacher, eval


def test_prune_keeps_the_chosen_blocks_exactly(pair):
    report = run_prune(
        PruneConfig(
            model=str(pair.teacher), data=str(pair.data), output=str(pair.root / "pruned"), keep_layers=2
        )
    )
    kept = report["kept_layers"]
    assert len(kept) == 2 and report["num_layers_before"] == 3
    original = AutoModelForCausalLM.from_pretrained(pair.teacher)
    pruned = AutoModelForCausalLM.from_pretrained(pair.root / "pruned")
    assert pruned.config.get_text_config().num_hidden_layers == 2
    assert len(decoder_blocks(pruned)[2]) == 2
    prefix = _block_prefix(original)
    expected = {}
    for key, tensor in original.state_dict().items():
        if key.startswith(prefix + "."):
            index, rest = key.removeprefix(prefix + ".").split(".", 1)
            if int(index) not in kept:
                continue
            key = f"{prefix}.{kept.index(int(index))}.{rest}"
        expected[key] = tensor
    got = pruned.state_dict()
    assert set(got) == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(got[key], tensor), key
    # Renumbered cache slots: decoding with the KV cache gives what recomputing everything gives.
    ids = torch.tensor([[1, 40, 41, 42, 43, 44]])
    with torch.no_grad():
        cached = pruned.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
        full = pruned.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    assert cached.tolist() == full.tolist()


def test_training_from_the_cache_matches_training_from_the_teacher(pair):
    """With every column cached (k = V, fp32) the cached KD term is the teacher's, so the first step
    of a cached Neo run equals the first step of a run with the teacher."""
    vocab = len(load_tokenizer(str(pair.teacher), role="teacher"))
    cache = pair.root / "cache"
    cache_teacher(
        CacheTeacherConfig(
            teacher=str(pair.teacher),
            data=str(pair.data),
            output=str(cache),
            top_k=vocab,
            logprob_dtype="float32",
        )
    )
    cached, cached_step = _first_step(_config(pair, "neo", "cached", teacher=None, teacher_cache=str(cache)))
    _, live_step = _first_step(_config(pair, "neo", "live"))
    assert cached.heldout_reference == "teacher_cache"
    assert cached.merge_check["passed"]
    assert cached_step["kd_loss"] == pytest.approx(live_step["kd_loss"], rel=1e-4)
    assert cached_step["ce_loss"] == pytest.approx(live_step["ce_loss"], rel=1e-6)


def test_eval_scores_the_teacher_against_itself_as_equal(pair):
    common = dict(teacher=str(pair.teacher), data=str(pair.data), max_length=64)
    itself = run_eval(EvalConfig(model=str(pair.teacher), **common))
    assert itself["kl_to_teacher"] == pytest.approx(0.0, abs=1e-6)
    assert itself["top1_agreement"] == 1.0
    student = run_eval(EvalConfig(model=str(pair.student), **common))
    assert student["kl_to_teacher"] > 1e-4
    assert student["tokens"] == itself["tokens"]
