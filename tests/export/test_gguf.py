"""GGUF export: an F32 file reloads through transformers' GGUF loader to the source's exact logits (and
fails without llama.cpp's q/k rope permutation), the lossy types stay within their bounds, the tokenizer
and chat template survive, tied models write no output.weight, and the metadata reads back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from llm_neo.errors import ModelError
from llm_neo.models.tiny import build_llama, save_model

gguf = pytest.importorskip("gguf", reason="the gguf extra is not installed: pip install 'llm-neo[gguf]'")

from llm_neo.export.gguf import (  # noqa: E402
    GGUF_BOUNDS,
    check_gguf_family,
    gguf_metadata,
    gguf_pre_tokenizer,
    permute_rope_rows,
    verify_gguf,
    write_gguf,
)


@pytest.fixture(autouse=True, scope="module")
def _threads(one_thread):
    yield


COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


@pytest.fixture(scope="module")
def families(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """One tiny checkpoint per supported family and layout trap."""
    from transformers import (
        AutoTokenizer,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    root = tmp_path_factory.mktemp("gguf_families")
    v = len(tokenizer)
    out = {
        "llama": save_model(
            build_llama(v, hidden_size=64, num_layers=2, num_kv_heads=2, seed=1), tokenizer, root / "llama"
        ),
        "llama_tied": save_model(
            build_llama(v, hidden_size=64, num_layers=2, tie_word_embeddings=True, seed=2),
            tokenizer,
            root / "llama_tied",
        ),
    }
    rope3 = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
        "rope_theta": 500000.0,
    }
    specs = {
        # Llama-3.1/3.2's frequency scaling (rope_freqs.weight), q/k/v/o biases and head_dim != H / heads
        "llama3_rope": (LlamaForCausalLM, LlamaConfig(vocab_size=v, rope_parameters=rope3, **COMMON)),
        "llama_bias": (
            LlamaForCausalLM,
            LlamaConfig(vocab_size=v, attention_bias=True, head_dim=32, **COMMON),
        ),
        "mistral": (MistralForCausalLM, MistralConfig(vocab_size=v, sliding_window=None, **COMMON)),
    }
    for name, (cls, config) in specs.items():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(3)
            out[name] = save_model(cls(config), tokenizer, root / name)
    # Qwen2: its tokenizer class adds <|endoftext|> and the Qwen2 split rule; the embedding table is
    # padded past the tokenizer (as Qwen2.5 pads to a multiple of 64), and small Qwen2s tie.
    scratch = save_model(build_llama(v, num_layers=1, seed=4), tokenizer, root / "scratch")
    config = json.loads((scratch / "config.json").read_text()) | {"model_type": "qwen2"}
    (scratch / "config.json").write_text(json.dumps(config))
    qwen_tok = AutoTokenizer.from_pretrained(scratch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=336, tie_word_embeddings=True, **COMMON))
    out["qwen2"] = save_model(qwen, qwen_tok, root / "qwen2")
    return out


def export(model_dir: Path, tmp_path: Path, gguf_type: str, **kwargs) -> tuple[Path, dict]:
    out = tmp_path / f"{model_dir.name}-{gguf_type}"
    out.mkdir()
    info = write_gguf(model_dir, out / "m.gguf", gguf_type, **kwargs)
    return out, info


@pytest.mark.parametrize("family", ["llama", "llama_tied", "llama3_rope", "llama_bias", "mistral", "qwen2"])
def test_f32_round_trip_is_exact(families, tmp_path, family):
    out, info = export(families[family], tmp_path, "f32")
    result = verify_gguf(families[family], out, "m.gguf", "f32")
    assert result["passed"], result["problems"]
    assert result["logits"]["max_abs_logit_diff"] <= 1e-5
    assert result["logits"]["top1_agreement"] == 1.0
    assert result["token_ids_equal"] and result["chat_template_equal"]
    assert info["architecture"] == ("qwen2" if family == "qwen2" else "llama")
    if family == "llama3_rope":
        assert "rope_freqs.weight" in info["tensors"]
        assert result["rope_freqs_max_rel_error"] < 1e-6


def test_without_the_rope_permutation_the_round_trip_fails(families, tmp_path):
    out, _ = export(families["llama"], tmp_path, "f32", permute_qk=False)
    result = verify_gguf(families["llama"], out, "m.gguf", "f32")
    assert not result["passed"]
    assert result["logits"]["max_abs_logit_diff"] > 1e-3
    assert any("max_abs_logit_diff" in p for p in result["problems"])


def test_permute_rope_rows_turns_half_split_rope_into_interleaved_rope():
    """Attention scores with Hugging Face's rope (rotate x_i with x_{i+d/2}) on the original rows equal
    llama.cpp's (rotate x_{2i} with x_{2i+1}) on the permuted rows: a hand-written reference of both."""
    gen = torch.Generator().manual_seed(0)
    n_head, d, hidden, pos = 2, 8, 5, 7
    wq = torch.randn(n_head * d, hidden, generator=gen, dtype=torch.float64)
    wk = torch.randn(n_head * d, hidden, generator=gen, dtype=torch.float64)
    x_q, x_k = (
        torch.randn(hidden, generator=gen, dtype=torch.float64),
        torch.randn(hidden, generator=gen, dtype=torch.float64),
    )
    freqs = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))  # [d/2]

    def hf_rope(v, p):  # v [d]: pairs (i, i + d/2)
        a, b = v[: d // 2], v[d // 2 :]
        c, s = torch.cos(p * freqs), torch.sin(p * freqs)
        return torch.cat([a * c - b * s, b * c + a * s])

    def gguf_rope(v, p):  # v [d]: pairs (2i, 2i + 1)
        a, b = v[0::2], v[1::2]
        c, s = torch.cos(p * freqs), torch.sin(p * freqs)
        return torch.stack([a * c - b * s, b * c + a * s], dim=-1).flatten()

    pq = torch.from_numpy(permute_rope_rows(wq.numpy(), n_head))
    pk = torch.from_numpy(permute_rope_rows(wk.numpy(), n_head))
    for h in range(n_head):
        rows = slice(h * d, (h + 1) * d)
        hf = hf_rope(wq[rows] @ x_q, pos) @ hf_rope(wk[rows] @ x_k, 0)
        cpp = gguf_rope(pq[rows] @ x_q, pos) @ gguf_rope(pk[rows] @ x_k, 0)
        torch.testing.assert_close(cpp, hf)
        # ... and without the permutation the scores differ
        assert not torch.allclose(gguf_rope(wq[rows] @ x_q, pos) @ gguf_rope(wk[rows] @ x_k, 0), hf)
    assert sorted(pq.sum(1).tolist()) == sorted(wq.sum(1).tolist())  # a permutation of the rows


@pytest.mark.parametrize("gguf_type", ["f16", "q8_0", "q4_0"])
def test_lossy_types_within_their_bounds_and_really_lossy(families, tmp_path, gguf_type):
    out, info = export(families["llama"], tmp_path, gguf_type)
    result = verify_gguf(families["llama"], out, "m.gguf", gguf_type)
    assert result["passed"], result["problems"]
    assert result["bound"] == GGUF_BOUNDS[gguf_type]
    assert result["logits"]["max_abs_logit_diff"] > 0
    assert result["logits"]["kl_per_token"] <= GGUF_BOUNDS[gguf_type]["kl_per_token"]
    assert result["token_ids_equal"]
    types = info["tensors"]
    assert {types[n] for n in types if n.endswith("_norm.weight")} == {"F32"}  # 1-D stays F32
    expected = {"f16": "F16", "q8_0": "Q8_0", "q4_0": "Q4_0"}[gguf_type]
    assert types["blk.0.attn_q.weight"] == types["blk.1.ffn_down.weight"] == expected
    assert types["token_embd.weight"] == ("F16" if gguf_type == "f16" else "Q8_0")
    assert (out / "m.gguf").stat().st_size < (0.6 if gguf_type == "f16" else 0.35) * 4 * sum(
        p.numel() for p in build_llama(320, hidden_size=64, num_layers=2, num_kv_heads=2).parameters()
    )


def test_tied_model_writes_no_output_weight(families, tmp_path):
    tied, _ = export(families["llama_tied"], tmp_path, "f32")
    untied, _ = export(families["llama"], tmp_path, "f32")
    tied_names = {t.name for t in gguf.GGUFReader(str(tied / "m.gguf")).tensors}
    untied_names = {t.name for t in gguf.GGUFReader(str(untied / "m.gguf")).tensors}
    assert "output.weight" not in tied_names and "token_embd.weight" in tied_names
    assert "output.weight" in untied_names


def test_reader_sees_the_expected_metadata(families, tmp_path, tokenizer):
    out, _ = export(families["llama"], tmp_path, "q8_0")
    meta = gguf_metadata(out / "m.gguf")
    assert meta["general.architecture"] == "llama"
    assert meta["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    assert meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.pre"] == "gpt-2"  # the tiny tokenizer is GPT-2's ByteLevel pre-tokenizer
    assert meta["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id
    assert meta["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert meta["llama.block_count"] == 2 and meta["llama.context_length"] == 512
    reader = gguf.GGUFReader(str(out / "m.gguf"))
    assert reader.get_field("tokenizer.chat_template").contents() == tokenizer.chat_template
    assert reader.get_field("llama.attention.head_count_kv").contents() == 2
    tokens = reader.get_field("tokenizer.ggml.tokens").contents()
    types = reader.get_field("tokenizer.ggml.token_type").contents()
    assert len(tokens) == len(types) == len(tokenizer)
    special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    assert {i for i, t in enumerate(types) if t == gguf.TokenType.CONTROL} == special
    assert tokens[tokenizer.convert_tokens_to_ids("<|assistant|>")] == "<|assistant|>"
    assert len(reader.get_field("tokenizer.ggml.merges").contents()) > 0


def test_padded_vocabulary_gets_unused_tokens(families, tmp_path):
    out, info = export(families["qwen2"], tmp_path, "f32")
    reader = gguf.GGUFReader(str(out / "m.gguf"))
    tokens = reader.get_field("tokenizer.ggml.tokens").contents()
    types = reader.get_field("tokenizer.ggml.token_type").contents()
    assert info["n_vocab"] == len(tokens) == 336
    assert tokens[-1] == "[PAD335]" and types[-1] == gguf.TokenType.UNUSED
    assert info["tokenizer_pre"] == "qwen2"


def test_unsupported_family_is_refused_before_any_work(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))  # no weights at all
    with pytest.raises(ModelError, match=r"'gpt2'.*supported families: llama, mistral, qwen2"):
        check_gguf_family(tmp_path)
    with pytest.raises(ModelError, match="supported families"):
        write_gguf(tmp_path, tmp_path / "m.gguf", "f32")
    assert not (tmp_path / "m.gguf").exists()


def test_unsupported_rope_scaling_and_tokenizers_are_refused(families, tmp_path):
    d = tmp_path / "yarn"
    d.mkdir()
    config = json.loads((families["llama"] / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    (d / "config.json").write_text(json.dumps(config))
    (d / "tokenizer.json").write_text((families["llama"] / "tokenizer.json").read_text())
    with pytest.raises(ModelError, match="'yarn' is not supported"):
        check_gguf_family(d)


@pytest.mark.parametrize(
    ("pre", "name"),
    [
        ({"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}, "gpt-2"),
        (
            {
                "type": "Sequence",
                "pretokenizers": [
                    {"type": "Digits", "individual_digits": True},
                    {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
                ],
            },
            "smollm",
        ),
    ],
)
def test_pre_tokenizer_names(pre, name):
    assert gguf_pre_tokenizer({"pre_tokenizer": pre}) == name


def test_an_unknown_pre_tokenizer_asks_for_its_name():
    pre = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "x+"}},
            {"type": "ByteLevel", "use_regex": False},
        ],
    }
    with pytest.raises(ModelError, match="--gguf-pre"):
        gguf_pre_tokenizer({"pre_tokenizer": pre})


def test_q8_0_blocks_round_trip_through_gguf_quants():
    """The Q8_0 bound's source: gguf.quants' own error on a weight is below half a step per block."""
    gen = np.random.default_rng(0)
    w = gen.standard_normal((8, 64)).astype(np.float32)
    q = gguf.quants.dequantize(
        gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    )
    step = np.abs(w.reshape(8, 2, 32)).max(-1, keepdims=True) / 127
    assert (np.abs(q.reshape(8, 2, 32) - w.reshape(8, 2, 32)) <= step / 2 + 1e-6).all()
