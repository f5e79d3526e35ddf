"""Small local models and tokenizers, built offline, for tests, the demo and benchmarks.

Everything here writes ordinary Hugging Face directories (``save_pretrained``), so the rest of
the pipeline loads them exactly as it loads a real model: nothing in llm-neo special-cases them.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

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


def save_model(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, path: str | Path) -> Path:
    """Save model (safetensors) and tokenizer side by side, as a hub checkpoint would be laid out."""
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)  # type: ignore[operator]
    tokenizer.save_pretrained(path)
    return path
