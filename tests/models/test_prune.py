"""Depth pruning: the scores measure what a block does, the right blocks go, the rest is untouched."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

from llm_neo.commands.prune import PruneConfig, run_prune
from llm_neo.data import collate, load_records, tokenize_records
from llm_neo.errors import ConfigError, ModelError
from llm_neo.models.prune import block_importance, choose_layers, prune_layers
from llm_neo.models.tiny import build_family, build_llama, family_config, save_model

CPU = torch.device("cpu")


def _examples(tokenizer, data: Path, n: int = 16):
    examples, _ = tokenize_records(load_records(data)[:n], tokenizer, max_length=64, train_on_prompt=True)
    return examples


def _batches(tokenizer, data: Path, batch_size: int = 4):
    examples = _examples(tokenizer, data)
    return [
        collate(examples[i : i + batch_size], tokenizer.pad_token_id)
        for i in range(0, len(examples), batch_size)
    ]


def _make_identity(model, index: int):
    """Zero the block's two output projections: attention and MLP add 0, the residual passes through."""
    with torch.no_grad():
        model.model.layers[index].self_attn.o_proj.weight.zero_()
        model.model.layers[index].mlp.down_proj.weight.zero_()
    return model


def _renamed(state: dict[str, torch.Tensor], kept: list[int]) -> dict[str, torch.Tensor]:
    """The original's state dict restricted to the kept blocks, renumbered as in the pruned model."""
    out = {}
    for name, tensor in state.items():
        if name.startswith("model.layers."):
            index, rest = name.removeprefix("model.layers.").split(".", 1)
            if int(index) not in kept:
                continue
            name = f"model.layers.{kept.index(int(index))}.{rest}"
        out[name] = tensor
    return out


def _assert_same_weights(pruned, original_state, kept):
    expected = _renamed(original_state, kept)
    got = pruned.state_dict()
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


def _greedy(model, tokenizer, use_cache: bool) -> list[int]:
    ids = tokenizer("the quick brown fox", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=5, do_sample=False, use_cache=use_cache, pad_token_id=0)
    assert out.shape[1] == ids["input_ids"].shape[1] + 5
    return out[0].tolist()


# ------------------------------------------------------------------------------------------------
# Scores


def test_one_score_per_block_in_range(teacher_dir, tokenizer, alpaca_jsonl):
    model = AutoModelForCausalLM.from_pretrained(teacher_dir)
    batches = _batches(tokenizer, alpaca_jsonl)
    cosine = block_importance(model, batches, device=CPU, dtype=torch.float32)
    angular = block_importance(model, batches, device=CPU, dtype=torch.float32, metric="angular")
    assert len(cosine) == len(angular) == 4
    assert all(0 < s <= 2 for s in cosine)  # random blocks all change their input
    assert all(0 < s <= 1 for s in angular)
    # Scoring leaves the model as it was: no hooks left behind, same logits.
    assert all(not layer._forward_hooks for layer in model.model.layers)


def test_padding_is_left_out_of_the_scores(teacher_dir, tokenizer, alpaca_jsonl):
    """A token mean: scoring examples one by one or padded together in one batch gives the same."""
    model = AutoModelForCausalLM.from_pretrained(teacher_dir)
    examples = sorted(_examples(tokenizer, alpaca_jsonl, n=6), key=lambda ex: len(ex.input_ids))
    assert len(examples[0].input_ids) < len(examples[-1].input_ids)  # so the batch really is padded
    alone = block_importance(model, [collate([ex], 0) for ex in examples], device=CPU, dtype=torch.float32)
    together = block_importance(model, [collate(examples, 0)], device=CPU, dtype=torch.float32)
    torch.testing.assert_close(torch.tensor(together), torch.tensor(alone), rtol=1e-4, atol=1e-6)


def test_choose_keeps_the_highest_in_order():
    assert choose_layers([0.3, 0.1, 0.5, 0.2], 2) == [0, 2]
    assert choose_layers([0.3, 0.1, 0.5, 0.2], 4) == [0, 1, 2, 3]
    assert choose_layers([0.2, 0.2, 0.2], 2) == [0, 1]  # ties keep the earlier block
    with pytest.raises(ValueError, match="keep"):
        choose_layers([0.1, 0.2], 0)


# ------------------------------------------------------------------------------------------------
# The command end to end


@pytest.mark.parametrize("identity", [1, 3])  # 3: the last block, whose HF hidden_states entry is normed
def test_identity_block_is_the_one_dropped(tmp_path, tokenizer, alpaca_jsonl, identity):
    original = _make_identity(build_llama(len(tokenizer), hidden_size=64, num_layers=4, seed=5), identity)
    with torch.no_grad():
        # A non-uniform final norm: then cos(h, norm(h)) != 1, so a score taken from HF's hidden_states
        # (whose last entry is the final-norm output) would not see that the last block is an identity.
        original.model.norm.weight.uniform_(0.5, 1.5)
    model_dir = save_model(original, tokenizer, tmp_path / "model")
    out = tmp_path / "pruned"
    report = run_prune(
        PruneConfig(
            model=str(model_dir), data=str(alpaca_jsonl), output=str(out), keep_layers=3, num_samples=10
        )
    )

    scores = report["scores"]
    assert len(scores) == 4
    assert min(range(4), key=scores.__getitem__) == identity
    assert scores[identity] < 1e-6
    assert all(s > 1e-3 for i, s in enumerate(scores) if i != identity)
    kept = [i for i in range(4) if i != identity]
    assert report["kept_layers"] == kept and report["dropped_layers"] == [identity]

    pruned = AutoModelForCausalLM.from_pretrained(out)
    assert pruned.config.num_hidden_layers == 3 and len(pruned.model.layers) == 3
    _assert_same_weights(pruned, original.state_dict(), kept)

    # Dropping an exact identity changes nothing: same logits on a padded batch, at real tokens.
    batch = collate(_examples(tokenizer, alpaca_jsonl, n=4), tokenizer.pad_token_id)
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        before = original(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        after = pruned(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(after[mask], before[mask], rtol=0, atol=1e-5)

    assert _greedy(pruned, tokenizer, use_cache=True) == _greedy(pruned, tokenizer, use_cache=False)
    assert AutoTokenizer.from_pretrained(out).get_vocab() == tokenizer.get_vocab()

    saved = json.loads((out / "pruning.json").read_text())
    assert saved["scores"] == pytest.approx(scores)
    assert saved["kept_layers"] == kept and saved["dropped_layers"] == [identity]
    assert saved["model"] == str(model_dir)
    assert saved["num_layers_before"] == 4 and saved["num_layers_after"] == 3
    assert saved["parameters_before"] == sum(p.numel() for p in original.parameters())
    assert saved["parameters_after"] == sum(p.numel() for p in pruned.parameters())
    assert saved["parameters_after"] < saved["parameters_before"]
    calibration = _examples(tokenizer, alpaca_jsonl, n=10)
    assert saved["calibration_samples"] == 10
    assert saved["calibration_tokens"] == sum(len(ex.input_ids) for ex in calibration)


def test_saved_weights_keep_the_published_dtype(tmp_path, tokenizer, alpaca_jsonl):
    """A bf16 model scored in fp32 is saved in bf16, bit for bit the original's kept blocks."""
    original = build_llama(len(tokenizer), hidden_size=64, num_layers=4, seed=6).to(torch.bfloat16)
    model_dir = save_model(original, tokenizer, tmp_path / "model")
    out = tmp_path / "pruned"
    report = run_prune(
        PruneConfig(
            model=str(model_dir), data=str(alpaca_jsonl), output=str(out), keep_layers=2, dtype="float32"
        )
    )
    pruned = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert pruned.dtype == torch.bfloat16
    _assert_same_weights(pruned, original.state_dict(), report["kept_layers"])


def test_overwrite_replaces_the_output(tmp_path, teacher_dir, alpaca_jsonl):
    """An earlier prune's output (its .llm-neo marker lists its files) is replaced whole."""
    out = tmp_path / "pruned"
    config = PruneConfig(model=str(teacher_dir), data=str(alpaca_jsonl), output=str(out), keep_layers=3)
    run_prune(config)
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 3
    run_prune(dataclasses.replace(config, keep_layers=2, overwrite=True))
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 2
    assert json.loads((out / "pruning.json").read_text())["num_layers_after"] == 2


# ------------------------------------------------------------------------------------------------
# prune_layers in memory


def test_prune_layers_renumbers_the_cache_slots(tokenizer):
    model = build_llama(len(tokenizer), hidden_size=64, num_layers=4, seed=7)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    # Dropping block 0 shifts every later block: without renumbering, block 3 would address a cache
    # slot past the end of a 2-layer cache.
    assert prune_layers(model, [1, 3]) is model
    assert model.config.num_hidden_layers == 2
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    _assert_same_weights(model, state, [1, 3])
    assert _greedy(model, tokenizer, use_cache=True) == _greedy(model, tokenizer, use_cache=False)


def test_prune_layers_cuts_layer_types(tmp_path, tokenizer):
    """Sliding / full attention per block must follow the blocks, in the config and the cache."""
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=2,
        pad_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(8)
        model = Qwen3ForCausalLM(config).eval()
    assert model.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    prune_layers(model, [0, 2, 3])
    assert model.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    assert _greedy(model, tokenizer, use_cache=True) == _greedy(model, tokenizer, use_cache=False)

    model.save_pretrained(tmp_path / "q")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert reloaded.config.layer_types == model.config.layer_types
    ids = tokenizer("the quick brown fox jumps over the lazy dog", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


def test_prune_layers_rejects_bad_input(tokenizer):
    model = build_llama(len(tokenizer), hidden_size=32, num_layers=3, seed=9)
    for keep in ([], [0, 0], [3], [-1]):
        with pytest.raises(ValueError, match=r"keep must be distinct block indices in \[0, 2\]"):
            prune_layers(model, keep)
    assert len(model.model.layers) == 3
    with pytest.raises(ModelError, match="Linear: cannot find its base decoder"):
        prune_layers(torch.nn.Linear(2, 2), [0])  # type: ignore[arg-type]


def test_prune_layers_keeps_each_moe_block_sparse_or_dense(tmp_path, tokenizer):
    """Qwen-MoE places its experts by block index (every decoder_sparse_step-th block, minus
    mlp_only_layers); the pruned config must rebuild each kept block as it was."""
    config = family_config("qwen3-moe", len(tokenizer), num_layers=5)
    config.decoder_sparse_step = 2  # blocks 1 and 3 sparse
    config.mlp_only_layers = [3]  # ... but block 3 dense: only block 1 has experts
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(10)
        model = AutoModelForCausalLM.from_config(config).eval()
    sparse = [hasattr(layer.mlp, "experts") for layer in model.model.layers]
    assert sparse == [False, True, False, False, False]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    prune_layers(model, [0, 1, 3, 4])
    assert model.config.decoder_sparse_step == 1 and model.config.mlp_only_layers == [0, 2, 3]
    model.save_pretrained(tmp_path / "moe")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "moe")
    assert [hasattr(layer.mlp, "experts") for layer in reloaded.model.layers] == [False, True, False, False]
    _assert_same_weights(reloaded, state, [0, 1, 3, 4])
    assert _greedy(reloaded, tokenizer, use_cache=True) == _greedy(reloaded, tokenizer, use_cache=False)


def test_index_dependent_configs_are_refused_before_loading(tmp_path, tokenizer, alpaca_jsonl):
    model = build_family("gpt2", len(tokenizer), num_layers=3)
    model.config.scale_attn_by_inverse_layer_idx = True  # block i scales attention by 1/(i + 1)
    save_model(model, tokenizer, tmp_path / "gpt2")
    config = PruneConfig(
        model=str(tmp_path / "gpt2"), data=str(alpaca_jsonl), output=str(tmp_path / "p"), keep_layers=2
    )
    with pytest.raises(ConfigError, match="scale_attn_by_inverse_layer_idx"):
        run_prune(config)
    with pytest.raises(ModelError, match="scale_attn_by_inverse_layer_idx"):
        prune_layers(model, [0, 2])
    assert len(model.transformer.h) == 3


# ------------------------------------------------------------------------------------------------
# Errors: all at once, naming the option, nothing written


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"keep_layers": 0}, ["--keep-layers: 0 is out of range"]),
        ({"keep_layers": 4}, ["--keep-layers: 4 is out of range; the model has 4 layers"]),
        ({"data": "missing.jsonl"}, ["--data: 'missing.jsonl' does not exist"]),
        ({"model": "", "output": "", "keep_layers": -1}, ["--model is required", "--output is required"]),
        ({"data": "", "keep_layers": 9}, ["--data is required", "the model has 4 layers"]),
        ({"num_samples": 0, "batch_size": 0}, ["--num-samples: 0", "--batch-size: 0"]),
    ],
)
def test_config_errors(tmp_path, teacher_dir, alpaca_jsonl, change, expected):
    out = tmp_path / "pruned"
    config = PruneConfig(model=str(teacher_dir), data=str(alpaca_jsonl), output=str(out), keep_layers=2)
    for key, value in change.items():
        setattr(config, key, value)
    with pytest.raises(ConfigError) as err:
        run_prune(config)
    for text in expected:
        assert text in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.jsonl"]  # nothing written


def test_existing_output_is_kept_without_overwrite(tmp_path, teacher_dir, alpaca_jsonl):
    out = tmp_path / "pruned"
    config = PruneConfig(model=str(teacher_dir), data=str(alpaca_jsonl), output=str(out), keep_layers=3)
    run_prune(config)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ConfigError, match=r"--output: .* already holds a prune output; pass --overwrite"):
        run_prune(dataclasses.replace(config, keep_layers=2))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    (out / "keep.txt").write_text("mine")  # a user's file beside it: kept, --overwrite included
    with pytest.raises(ConfigError, match=r"holds files llm-neo did not write \(keep.txt\)"):
        run_prune(dataclasses.replace(config, keep_layers=2, overwrite=True))
    assert (out / "keep.txt").read_text() == "mine" and json.loads((out / "pruning.json").read_text())[
        "num_layers_after"
    ] == 3
    with pytest.raises(ConfigError, match="--output must differ from --model"):
        run_prune(PruneConfig(model=str(teacher_dir), data=str(alpaca_jsonl), output=str(teacher_dir)))
