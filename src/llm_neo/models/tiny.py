"""Small local models and tokenizers, built offline, for tests, the demo and benchmarks.

Everything here writes ordinary Hugging Face directories (``save_pretrained``), so the rest of
the pipeline loads them exactly as it loads a real model: nothing in llm-neo special-cases them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

# A minimal chat template in the usual Jinja form. The generation prompt is exactly the assistant
# header, so a prompt rendered with ``add_generation_prompt=True`` is a prefix of the full chat.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

DEFAULT_CORPUS = (
    "Below is an instruction that describes a task. Write a response that completes the request.",
    "### Instruction:\n### Input:\n### Response:\n",
    "the quick brown fox jumps over the lazy dog 0123456789 + - * = ? !",
    "What is the capital of France? Paris. Reverse the string abc: cba. Sort: 1 2 3.",
)


def build_tokenizer(
    corpus: Iterable[str] = DEFAULT_CORPUS,
    vocab_size: int = 320,
    chat_template: str | None = CHAT_TEMPLATE,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``corpus``.

    Byte-level so any text encodes; ``vocab_size`` counts the 256 byte symbols, the merges and the
    special tokens. Deterministic for a given corpus and size.
    """
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(list(corpus), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        chat_template=chat_template,
    )


# The special tokens of ``build_word_tokenizer``, at ids 0..3 (pad, bos, eos as ``build_llama`` sets them).
WORD_SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]


def word_token(index: int) -> str:
    """The text of ``build_word_tokenizer``'s token ``index`` (an id past the special tokens)."""
    return f"w{index}"


def build_word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with exactly ``vocab_size`` tokens: the 4 special ones (``<pad>`` 0, ``<s>``
    1, ``</s>`` 2, ``<unk>`` 3), then ``w4`` ... ``w{vocab_size - 1}`` at their own ids (``word_token``).

    Text is split on whitespace and every word is one token, so a text of n words encodes to exactly n
    ids: what a benchmark needs to give every id of a large vocabulary (32,000, 128,256) a token without
    training a BPE on a corpus that large, and to write records of an exact token length.
    """
    if vocab_size <= len(WORD_SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size must exceed the {len(WORD_SPECIAL_TOKENS)} special tokens, got {vocab_size}"
        )
    vocab = {token: i for i, token in enumerate(WORD_SPECIAL_TOKENS)}
    vocab |= {word_token(i): i for i in range(len(WORD_SPECIAL_TOKENS), vocab_size)}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    words.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=words, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def build_split_word_tokenizer(vocab_size: int, *, whole_digits: int = 4) -> PreTrainedTokenizerFast:
    """A tokenizer that reads ``build_word_tokenizer``'s text differently, with exactly ``vocab_size``
    tokens: the same 4 special ones, the words ``w0`` ... ``w{10**whole_digits - 1}`` whole, the digits
    ``0``-``9`` alone, then unreachable fillers (``<f{i}>``) up to the size.

    A word of more digits splits after ``whole_digits`` of them (``w12345`` -> ``w1234``, ``5``), so against
    ``build_word_tokenizer`` the short words align exactly (same text, same span) and the long ones share
    only their start: a cross-tokenizer pair whose alignment is neither all nor nothing, at any pair of
    vocabulary sizes (a BPE of 262,144 merges would need a corpus that large).
    """
    words = [f"w{i}" for i in range(10**whole_digits)]
    digits = [str(d) for d in range(10)]
    fixed = len(WORD_SPECIAL_TOKENS) + len(words) + len(digits)
    if vocab_size < fixed:
        raise ValueError(
            f"vocab_size must be at least {fixed} with whole_digits={whole_digits}, got {vocab_size}"
        )
    tokens = [*WORD_SPECIAL_TOKENS, *words, *digits, *(f"<f{i}>" for i in range(vocab_size - fixed))]
    split = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    split.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Split(Regex(rf"w\d{{1,{whole_digits}}}"), behavior="isolated"),
        ]
    )
    split.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(
        tokenizer_object=split, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def build_llama(
    vocab_size: int,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 512,
    tie_word_embeddings: bool = False,
    seed: int = 0,
) -> LlamaForCausalLM:
    """A randomly initialised Llama of the given shape (seeded, so fixtures are reproducible)."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval()


# ------------------------------------------------------------------------------------------------
# One tiny random model of each common family, for the family matrix (tests/models/test_families.py),
# the docs and anyone who wants to try a family offline. Shapes are tiny; everything that makes a
# family different from Llama (fused projections, Conv1D, soft-capping, sliding windows, q/k norms,
# experts, other block containers) is kept as the real checkpoints have it. Dropout is 0 everywhere
# so runs are deterministic (GPT-2 ships with 0.1).

# The ids of the tiny tokenizer's special tokens (build_tokenizer: <pad>, <s>, </s> come first).
_TOKEN_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


@dataclass(frozen=True)
class Family:
    """A model family: how to configure a tiny random one, and what is special about it."""

    config_class: str  # the transformers config class, by name (imported lazily)
    # (vocab_size, hidden_size, num_layers, num_heads) -> the config's keyword arguments
    kwargs: Callable[[int, int, int, int], dict[str, Any]]
    features: str  # what this family adds over Llama, as the docs list it


def _decoder(vocab: int, hidden: int, layers: int, heads: int) -> dict[str, Any]:
    """The keyword arguments every Llama-style config shares."""
    return {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads // 2),  # grouped-query attention, as most families ship
        "max_position_embeddings": 512,
        **_TOKEN_IDS,
    }


def _gemma(vocab: int, hidden: int, layers: int, heads: int) -> dict[str, Any]:
    head_dim = hidden // heads
    return _decoder(vocab, hidden, layers, heads) | {
        "head_dim": head_dim,
        "query_pre_attn_scalar": head_dim,
        "sliding_window": 16,  # shorter than the test samples, so the sliding layers really slide
        "layer_types": [("sliding_attention", "full_attention")[i % 2] for i in range(layers)],
        "tie_word_embeddings": True,
    }


FAMILIES: dict[str, Family] = {
    "llama": Family("LlamaConfig", _decoder, "the reference: RMSNorm, RoPE, SwiGLU, GQA, untied lm_head"),
    "llama-tied": Family(
        "LlamaConfig",
        lambda v, h, n, a: _decoder(v, h, n, a) | {"tie_word_embeddings": True},
        "tied embeddings (Llama-3.2-1B/3B, SmolLM2)",
    ),
    "qwen2": Family(
        "Qwen2Config",
        # transformers loads every qwen2 directory's tokenizer as Qwen2Tokenizer, which adds
        # <|endoftext|> (id 320 here); and Qwen pads its embedding table to a multiple of 64 anyway
        # (Qwen2.5: 151,665 tokens, 151,936 rows), which keeps the padded-vocabulary path exercised.
        lambda v, h, n, a: _decoder(v, h, n, a) | {"vocab_size": -(-(v + 1) // 64) * 64},
        "q/k/v biases; embedding table padded past the tokenizer (Qwen2, Qwen2.5)",
    ),
    "qwen3": Family(
        "Qwen3Config", lambda v, h, n, a: _decoder(v, h, n, a) | {"head_dim": h // a}, "q/k RMSNorms"
    ),
    "mistral": Family(
        "MistralConfig",
        lambda v, h, n, a: _decoder(v, h, n, a) | {"sliding_window": 16, "head_dim": h // a},
        "sliding-window attention",
    ),
    "gemma2": Family(
        "Gemma2Config",
        lambda v, h, n, a: (
            _gemma(v, h, n, a) | {"final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0}
        ),
        "final-logit and attention soft-capping, scaled embeddings, tied, alternating sliding/full layers",
    ),
    "gemma3": Family(
        "Gemma3TextConfig",
        _gemma,
        "q/k norms, scaled embeddings, tied, sliding/full layers with their own RoPE bases",
    ),
    "phi3": Family(
        "Phi3Config",
        lambda v, h, n, a: _decoder(v, h, n, a) | {"num_key_value_heads": a},
        "fused qkv_proj and gate_up_proj",
    ),
    "olmo2": Family("Olmo2Config", _decoder, "post-norm blocks, q/k norms over the whole projection"),
    "gpt2": Family(
        "GPT2Config",
        lambda v, h, n, a: {
            "vocab_size": v,
            "n_embd": h,
            "n_layer": n,
            "n_head": a,
            "n_positions": 512,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            **_TOKEN_IDS,
        },
        "Conv1D projections (weights stored [in, out]), learned positions, blocks in transformer.h, tied",
    ),
    "gpt-neox": Family(
        "GPTNeoXConfig",
        lambda v, h, n, a: {
            "vocab_size": v,
            "hidden_size": h,
            "intermediate_size": 4 * h,
            "num_hidden_layers": n,
            "num_attention_heads": a,
            "max_position_embeddings": 512,
            **_TOKEN_IDS,
        },
        "Pythia: parallel residual, fused query_key_value, partial RoPE, blocks in gpt_neox.layers",
    ),
    "qwen3-moe": Family(
        "Qwen3MoeConfig",
        lambda v, h, n, a: (
            _decoder(v, h, n, a)
            | {"head_dim": h // a, "moe_intermediate_size": h, "num_experts": 4, "num_experts_per_tok": 2}
        ),
        "mixture of experts: 4 routed experts per block (fused 3-D expert weights), top-2 routing",
    ),
}


def family_config(
    family: str, vocab_size: int, *, hidden_size: int = 32, num_layers: int = 2, num_heads: int = 4
) -> PretrainedConfig:
    """The config of a tiny ``family`` model (a key of ``FAMILIES``)."""
    if family not in FAMILIES:
        raise KeyError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    spec = FAMILIES[family]
    config_class = getattr(transformers, spec.config_class)
    config: PretrainedConfig = config_class(**spec.kwargs(vocab_size, hidden_size, num_layers, num_heads))
    return config


def build_family(
    family: str,
    vocab_size: int,
    *,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    seed: int = 0,
) -> PreTrainedModel:
    """A randomly initialised tiny model of ``family`` (seeded, so fixtures are reproducible)."""
    config = family_config(
        family, vocab_size, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    return model.eval()


def save_model(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, path: str | Path) -> Path:
    """Save model (safetensors) and tokenizer side by side, as a hub checkpoint would be laid out."""
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)  # type: ignore[operator]
    tokenizer.save_pretrained(path)
    return path
