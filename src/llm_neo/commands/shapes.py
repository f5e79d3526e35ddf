"""Named teacher/student shapes for the benchmark and the memory planner.

Each shape is a pair of ``LlamaConfig``s written out from the public model configs (so nothing is
downloaded: the benchmark random-initialises models of these shapes), plus the batch shape and LoRA rank
the benchmark uses by default.

    name               teacher                   student                  vocab    default batch  r
    llama3-8b-to-1b    Llama-3.1-8B              Llama-3.2-1B (tied)      128,256  8 × 2048       128
    llama2-7b-to-1.1b  Llama-2-7B                TinyLlama-1.1B           32,000   2 × 2048       128
    smollm2-135m-20    SmolLM2-135M (tied)       its first 20 blocks      49,152   4 × 256        16
    gemma3-270m-to-smollm2-20
                       Gemma-3-270M's sizes      SmolLM2-135M, 20 blocks  262,144  2 × 128        16
                       (tied, as a Llama)        (tied)                   / 49,152
    cpu-wide           hidden 256, 4 layers      hidden 128, 2 layers     32,000   8 × 256        16
    tiny               hidden 64, 2 layers       hidden 32, 2 layers      512      2 × 32         4
    tiny-cross         hidden 64, 2 layers       hidden 32, 2 layers      1,024    2 × 32         4
                                                                          / 512

``cpu-wide`` is small enough for a CPU but has a real vocabulary, so, as in the real pairs, the
[tokens × vocab] logits dominate the memory of a plain implementation. ``smollm2-135m-20`` is a real
small model's shape (a user's depth-pruned pair) that a CPU can still train: there the blocks, not the
logits alone, cost time. ``gemma3-270m-to-smollm2-20`` is a cross-tokenizer pair (``cross``: the two
vocabularies differ; the bench gives each model a tokenizer of its own, ``bench.cross``): Gemma-3-270M's
sizes written as a Llama (its sliding-window attention, extra norms and embedding scale change no tensor
size the plan or the step holds), into SmolLM2-135M's 20-block student. ``tiny`` is for tests.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import LlamaConfig

__all__ = ["SHAPES", "Shape", "get_shape"]


@dataclass(frozen=True)
class Shape:
    """A teacher/student pair of model shapes and the benchmark's default batch for it."""

    name: str
    teacher: LlamaConfig
    student: LlamaConfig
    batch_size: int
    seq_len: int
    lora_r: int
    description: str
    cross: bool = False  # the two vocabularies differ: kd/neo need --cross-tokenizer


def _llama(
    *,
    vocab_size: int,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    intermediate_size: int,
    tie_word_embeddings: bool = False,
    rope_theta: float = 10000.0,
    max_position_embeddings: int = 4096,
    rope_scaling: dict[str, float | str] | None = None,
    rms_norm_eps: float = 1e-5,
    head_dim: int | None = None,
) -> LlamaConfig:
    rope: dict[str, float | str] = {"rope_type": "default", "rope_theta": rope_theta}
    if rope_scaling is not None:
        rope = {**rope_scaling, "rope_theta": rope_theta}
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        rope_parameters=rope,
        rms_norm_eps=rms_norm_eps,
        head_dim=head_dim or hidden_size // num_heads,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=0.0,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        use_cache=False,
    )


# Llama 3.1/3.2's RoPE frequency scaling (public configs); it changes no shape and no memory.
LLAMA3_ROPE_SCALING: dict[str, float | str] = {
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def llama31_8b() -> LlamaConfig:
    """meta-llama/Llama-3.1-8B: 8.03 B parameters, untied embeddings."""
    return _llama(
        vocab_size=128256,
        hidden_size=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        intermediate_size=14336,
        rope_theta=500000.0,
        max_position_embeddings=131072,
        rope_scaling=LLAMA3_ROPE_SCALING,
    )


def llama32_1b() -> LlamaConfig:
    """meta-llama/Llama-3.2-1B: 1.24 B parameters, tied embeddings (the lm_head is the embedding)."""
    return _llama(
        vocab_size=128256,
        hidden_size=2048,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        intermediate_size=8192,
        tie_word_embeddings=True,
        rope_theta=500000.0,
        max_position_embeddings=131072,
        rope_scaling=LLAMA3_ROPE_SCALING,
    )


def llama2_7b() -> LlamaConfig:
    """meta-llama/Llama-2-7b-hf: 6.74 B parameters, multi-head attention, untied embeddings."""
    return _llama(
        vocab_size=32000,
        hidden_size=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=32,
        intermediate_size=11008,
        rms_norm_eps=1e-5,
    )


def tinyllama_1b() -> LlamaConfig:
    """TinyLlama/TinyLlama-1.1B (Llama-2 tokenizer): 1.10 B parameters, 4 KV heads, untied."""
    return _llama(
        vocab_size=32000,
        hidden_size=2048,
        num_layers=22,
        num_heads=32,
        num_kv_heads=4,
        intermediate_size=5632,
        max_position_embeddings=2048,
    )


def smollm2_135m(num_layers: int = 30) -> LlamaConfig:
    """HuggingFaceTB/SmolLM2-135M: 30 blocks of hidden 576 (9 heads, 3 KV heads, MLP 1536), tied
    embeddings, vocabulary 49,152; ``num_layers`` fewer blocks give its depth-pruned student."""
    return _llama(
        vocab_size=49152,
        hidden_size=576,
        num_layers=num_layers,
        num_heads=9,
        num_kv_heads=3,
        intermediate_size=1536,
        tie_word_embeddings=True,
        rope_theta=100000.0,
        max_position_embeddings=8192,
    )


def gemma3_270m() -> LlamaConfig:
    """google/gemma-3-270m's sizes: 18 blocks of hidden 640 (4 heads of 256, 1 KV head, MLP 2048), tied
    embeddings, vocabulary 262,144; as a Llama (same tensors, the step's memory and FLOPs alike)."""
    return _llama(
        vocab_size=262144,
        hidden_size=640,
        num_layers=18,
        num_heads=4,
        num_kv_heads=1,
        head_dim=256,
        intermediate_size=2048,
        tie_word_embeddings=True,
        rope_theta=1000000.0,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
    )


def _small(vocab_size: int, hidden_size: int, num_layers: int, num_heads: int) -> LlamaConfig:
    return _llama(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_heads,
        intermediate_size=4 * hidden_size,
        max_position_embeddings=2048,
    )


SHAPES: dict[str, Shape] = {
    "llama3-8b-to-1b": Shape(
        name="llama3-8b-to-1b",
        teacher=llama31_8b(),
        student=llama32_1b(),
        batch_size=8,
        seq_len=2048,
        lora_r=128,
        description="Llama-3.1-8B -> Llama-3.2-1B (vocab 128,256), the paper's released pair",
    ),
    "llama2-7b-to-1.1b": Shape(
        name="llama2-7b-to-1.1b",
        teacher=llama2_7b(),
        student=tinyllama_1b(),
        batch_size=2,
        seq_len=2048,
        lora_r=128,
        description="Llama-2-7B -> TinyLlama-1.1B (vocab 32,000)",
    ),
    "smollm2-135m-20": Shape(
        name="smollm2-135m-20",
        teacher=smollm2_135m(),
        student=smollm2_135m(num_layers=20),
        batch_size=4,
        seq_len=256,
        lora_r=16,
        description="SmolLM2-135M -> its 20-block pruned shape (vocab 49,152, tied; random weights)",
    ),
    "gemma3-270m-to-smollm2-20": Shape(
        name="gemma3-270m-to-smollm2-20",
        teacher=gemma3_270m(),
        student=smollm2_135m(num_layers=20),
        batch_size=2,
        seq_len=128,
        lora_r=16,
        description="Gemma-3-270M's sizes (vocab 262,144) -> SmolLM2-135M's 20 blocks (vocab 49,152), "
        "tokenizers of their own: the cross-tokenizer step (random weights)",
        cross=True,
    ),
    "cpu-wide": Shape(
        name="cpu-wide",
        teacher=_small(32000, 256, 4, 4),
        student=_small(32000, 128, 2, 2),
        batch_size=8,
        seq_len=256,
        lora_r=16,
        description="CPU-sized models with a real vocabulary (32,000): the logits dominate",
    ),
    "tiny-cross": Shape(
        name="tiny-cross",
        teacher=_small(1024, 64, 2, 4),
        student=_small(512, 32, 2, 2),
        batch_size=2,
        seq_len=32,
        lora_r=4,
        description="test-sized models of two tokenizers (vocab 1,024 / 512)",
        cross=True,
    ),
    "tiny": Shape(
        name="tiny",
        teacher=_small(512, 64, 2, 4),
        student=_small(512, 32, 2, 2),
        batch_size=2,
        seq_len=32,
        lora_r=4,
        description="test-sized models (seconds on a CPU)",
    ),
}


def get_shape(name: str) -> Shape:
    """The named shape; ValueError listing the known names otherwise."""
    try:
        return SHAPES[name]
    except KeyError:
        raise ValueError(f"unknown shape {name!r}; choose one of {', '.join(SHAPES)}") from None
