"""GGUF (llama.cpp, Ollama) files of a Hugging Face causal LM, written with the ``gguf`` package alone.

What a correct file needs, beyond the tensors under llama.cpp's names (``gguf.get_tensor_name_map``):

* **Rope layout.** Hugging Face Llama checkpoints rotate the two *halves* of each head's q/k vector
  (GPT-NeoX style); llama.cpp's ``llama`` architecture rotates *adjacent* pairs. The rows of q_proj and
  k_proj are therefore permuted per head (``permute_rope_rows``); llama.cpp's ``qwen2`` uses the NeoX
  layout, so Qwen2 rows are written as they are. Llama-3's frequency scaling travels as the
  ``rope_freqs.weight`` tensor (one divisor per frequency).
* **Tied embeddings** write no ``output.weight``: the reader ties the head to ``token_embd.weight``.
* **Tokenizer.** Byte-level BPE (``tokenizer.ggml.model = "gpt2"``): the vocabulary in its byte-level
  spelling, the merges, a token type per id (added special tokens CONTROL, other added tokens
  USER_DEFINED, ids without a token UNUSED padding), BOS/EOS/PAD ids, whether BOS/EOS are added, the
  chat template, and ``tokenizer.ggml.pre``, the name under which llama.cpp knows the pre-tokenizer's
  split rule (read here from ``tokenizer.json``'s structure; ``pre_tokenizer=`` overrides it).
* **Types.** 1-D tensors (norms, biases) stay F32 in every file type. F16 converts the 2-D weights;
  Q8_0 quantizes them in blocks of 32 (``gguf.quants``); Q4_0 quantizes the block linears to 4 bits and
  keeps ``token_embd``/``output`` at Q8_0 (the embeddings and head are the most sensitive; llama.cpp's
  own quantizer keeps the head at 6 bits for Q4_0). A weight whose rows are not a multiple of 32 falls
  back to F16. K-quants need llama.cpp's ``llama-quantize`` (see docs/quantization.md).

``verify_gguf`` reloads the file with transformers' GGUF loader and compares it with the source: the
tokenizer's ids on sample texts and the rendered chat template must be identical, and the logits within
``GGUF_BOUNDS`` (F32: exact to 1e-5; the others: KL per token, see the table there).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llm_neo.choices import GGUF_TYPES
from llm_neo.errors import ModelError
from llm_neo.models.anatomy import find_output_head

log = logging.getLogger("llm_neo")


# model_type (config.json) -> llama.cpp architecture name. Mistral is llama.cpp's `llama` (as
# llama.cpp's own converter writes it); its sliding window is not representable there.
GGUF_FAMILIES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
_PERMUTED_ARCHS = {"llama"}  # architectures whose rope rotates adjacent pairs: q/k rows permuted

# Verification bounds. F32 must reproduce the source's logits (max |Δ| <= 1e-5); the lossy types are
# held to a KL per token (forward KL(source ‖ GGUF), nats). Measured on SmolLM2-135M-Instruct (a small
# model: the worst case; docs/quantization.md): F16 4e-6, Q8_0 0.0016, Q4_0 0.38; a file without the
# q/k permutation: KL 1.29 even at F32. Bounds: F16 and Q8_0 ~10x above the measurement, Q4_0 2x (a
# correct small model passes, a broken layout does not).
GGUF_BOUNDS: dict[str, dict[str, float]] = {
    "f32": {"max_abs_logit_diff": 1e-5},
    "f16": {"kl_per_token": 1e-4},
    "q8_0": {"kl_per_token": 2e-2},
    "q4_0": {"kl_per_token": 0.75},
}

# The split rules of byte-level BPE pre-tokenizers, as tokenizer.json spells them, and the names
# llama.cpp (and transformers' GGUF reader) give them.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLIT_NAMES = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}

__all__ = [
    "GGUF_BOUNDS",
    "GGUF_FAMILIES",
    "GGUF_TYPES",
    "check_gguf_family",
    "check_gguf_layout",
    "compare_logits",
    "gguf_metadata",
    "gguf_pre_tokenizer",
    "permute_rope_rows",
    "sample_input_ids",
    "verify_gguf",
    "write_gguf",
]


def _require_gguf() -> Any:
    try:
        import gguf
    except ImportError as err:
        raise ModelError(
            f"GGUF export needs the 'gguf' package, which is not installed ({err}); install it with: "
            "pip install 'llm-neo[gguf]'"
        ) from err
    return gguf


def _read_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"{path} not found: --model must be a Hugging Face model directory") from None
    except json.JSONDecodeError as err:
        raise ModelError(f"{path}: invalid JSON ({err})") from err


def _rope(config: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope theta, the scaling parameters or None) from a config.json, old or new spelling."""
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or None
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type") or (scaling or {}).get("rope_type") or (scaling or {}).get("type")
    if rope_type in (None, "default"):
        return float(theta), None
    return float(theta), {**(scaling or {}), **params, "rope_type": rope_type}


def check_gguf_family(model_dir: str | Path) -> dict[str, Any]:
    """Raise ModelError (before any weight loads) unless ``model_dir`` is a family with a known GGUF layout;
    return its config.json."""
    model_dir = Path(model_dir)
    config = _read_config(model_dir)
    check_gguf_layout(config, str(model_dir))
    if not (model_dir / "tokenizer.json").is_file():
        raise ModelError(
            f"GGUF export of {model_dir}: no tokenizer.json; the GGUF needs the fast tokenizer's files "
            "(save the tokenizer with save_pretrained next to the model)"
        )
    return config


def check_gguf_layout(config: dict[str, Any], model_dir: str) -> None:
    """Raise ModelError unless a config.json dict (of the model at ``model_dir``, named in the message)
    is a family and rope scaling that GGUF export writes: ``distill --export gguf:...`` asks this of the
    student before training."""
    model_type = config.get("model_type")
    supported = ", ".join(sorted(GGUF_FAMILIES))
    if model_type not in GGUF_FAMILIES:
        raise ModelError(
            f"GGUF export of {model_dir}: model_type {model_type!r} has no GGUF layout in llm-neo; supported "
            f"families: {supported} (others: llama.cpp's convert_hf_to_gguf.py, or --format int8)"
        )
    _, scaling = _rope(config)
    if scaling is not None and scaling["rope_type"] != "llama3":
        raise ModelError(
            f"GGUF export of {model_dir}: rope scaling {scaling['rope_type']!r} is not supported (only "
            "Llama-3's 'llama3' scaling is); use llama.cpp's convert_hf_to_gguf.py"
        )
    if scaling is not None and GGUF_FAMILIES[model_type] != "llama":
        raise ModelError(f"GGUF export of {model_dir}: rope scaling is supported for the Llama family only")
    if model_type == "qwen2" and config.get("use_sliding_window"):
        raise ModelError(f"GGUF export of {model_dir}: Qwen2 with use_sliding_window is not supported")


def gguf_pre_tokenizer(tokenizer_json: dict[str, Any]) -> str:
    """llama.cpp's name for a byte-level BPE tokenizer's pre-tokenizer (``tokenizer.ggml.pre``).

    Recognised: GPT-2's (a ByteLevel pre-tokenizer with its own regex) -> ``gpt-2``; digits split one by
    one before GPT-2's rule -> ``smollm``; Llama-3's and Qwen2's split rules -> ``llama-bpe`` /
    ``qwen2``. Anything else raises ModelError naming what was found (pass the name explicitly then).
    """
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if (
        kinds == ["Digits", "ByteLevel"]
        and steps[0].get("individual_digits")
        and steps[1].get("use_regex", True)
    ):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        if pattern in _SPLIT_NAMES:
            return _SPLIT_NAMES[pattern]
    raise ModelError(
        f"cannot name this tokenizer's pre-tokenizer for llama.cpp (tokenizer.json pre_tokenizer: "
        f"{json.dumps(pre)[:300]}); pass its llama.cpp name (tokenizer.ggml.pre, e.g. llama-bpe, qwen2, "
        "gpt-2, smollm) with --gguf-pre"
    )


def permute_rope_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of a q/k projection [n_head·d, ...] from Hugging Face's half-split rope layout to llama.cpp's
    interleaved one: within each head, rows (0..d/2-1 | d/2..d-1) become (0, d/2, 1, d/2+1, ...).

    Hugging Face rotates x_i with x_{i+d/2}; llama.cpp's llama architecture rotates x_{2i} with x_{2i+1}.
    Permuting the output rows of q and k this way makes both compute the same attention scores (q·k is
    unchanged by a permutation applied to both). Biases ([n_head·d]) are permuted the same way.
    """
    rows = weight.shape[0]
    if rows % (2 * n_head):
        raise ModelError(f"q/k projection with {rows} rows cannot be split into {n_head} heads of even size")
    half = rows // n_head // 2
    return weight.reshape(n_head, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _llama3_rope_factors(config: Any) -> np.ndarray:
    """[head_dim/2] divisors llama.cpp applies to each rope frequency: default / llama3-scaled."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, torch.device("cpu"))
    theta, _ = _rope(config.to_dict())
    dim = scaled.shape[0] * 2
    default = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    return (default / scaled).float().numpy()


def _added_bos_eos(tokenizer: Any) -> tuple[bool, bool]:
    """Whether encoding text (special tokens on) adds BOS / EOS, as observed, not as configured."""
    with_special = tokenizer("a")["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    bos = (
        tokenizer.bos_token_id is not None
        and len(with_special) > len(without)
        and with_special[0] == tokenizer.bos_token_id
    )
    eos = (
        tokenizer.eos_token_id is not None
        and len(with_special) > len(without)
        and with_special[-1] == tokenizer.eos_token_id
    )
    return bool(bos), bool(eos)


def _vocabulary(tokenizer: Any, n_vocab: int, gguf: Any) -> tuple[list[str], list[int]]:
    """Token strings (byte-level spelling; added tokens as written) and types, one per embedding row."""
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= n_vocab:
        raise ModelError(
            f"the tokenizer has ids up to {max(vocab.values())} but the model only {n_vocab} embedding rows"
        )
    reverse = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder  # {id: AddedToken}
    tokens: list[str] = []
    types: list[int] = []
    for i in range(n_vocab):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _tensor_type(name: str, array: np.ndarray, gguf_type: str, gguf: Any) -> Any:
    Q = gguf.GGMLQuantizationType
    if array.ndim < 2 or gguf_type == "f32" or name == "rope_freqs.weight":
        return Q.F32
    if gguf_type == "f16":
        return Q.F16
    if array.shape[-1] % 32:
        return Q.F16  # blocks of 32 along a row: not quantizable, F16 as llama.cpp falls back
    if gguf_type == "q4_0" and name not in ("token_embd.weight", "output.weight"):
        return Q.Q4_0
    return Q.Q8_0


def write_gguf(
    model_dir: str | Path,
    path: str | Path,
    gguf_type: str,
    *,
    pre_tokenizer: str | None = None,
    name: str | None = None,
    permute_qk: bool = True,
    progress: bool = False,
) -> dict[str, Any]:
    """Write ``model_dir`` (HF model + tokenizer) as one GGUF file at ``path``; return what was written.

    Args:
        gguf_type: one of ``GGUF_TYPES``.
        pre_tokenizer: ``tokenizer.ggml.pre``; default: recognised by ``gguf_pre_tokenizer``.
        name: ``general.name``; default: the directory's name.
        permute_qk: llama.cpp's rope layout for q/k rows (always, in real use; False exists so the tests
            can prove a file without it is wrong).

    Returns:
        ``{"architecture", "gguf_type", "tensors": {name: ggml type}, "tied_embeddings",
        "tokenizer_pre", "n_vocab", "bytes"}``.
    """
    gguf = _require_gguf()
    from transformers import AutoConfig, AutoTokenizer

    from llm_neo.models.loading import load_model

    if gguf_type not in GGUF_TYPES:
        raise ModelError(f"--gguf-type {gguf_type!r} is not one of {', '.join(GGUF_TYPES)}")
    model_dir, path = Path(model_dir), Path(path)
    raw_config = check_gguf_family(model_dir)
    arch_name = GGUF_FAMILIES[raw_config["model_type"]]
    arch = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}[arch_name]
    pre = pre_tokenizer or gguf_pre_tokenizer(_byte_level_bpe(model_dir))

    config = AutoConfig.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = load_model(str(model_dir), role="export", dtype=torch.float32, device=torch.device("cpu"))
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n_head, n_kv = int(text.num_attention_heads), int(text.num_key_value_heads or text.num_attention_heads)
    n_layers = int(text.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    embeddings = model.get_input_embeddings()
    assert isinstance(embeddings, torch.nn.Embedding)
    n_vocab = embeddings.num_embeddings
    theta, scaling = _rope(raw_config)
    if raw_config["model_type"] == "mistral" and raw_config.get("sliding_window"):
        window = raw_config["sliding_window"]
        if window < raw_config.get("max_position_embeddings", 0):
            log.warning(
                "export: Mistral's sliding window (%d tokens) has no equivalent in llama.cpp's llama "
                "architecture; the GGUF attends to the full context (identical up to %d tokens)",
                window,
                window,
            )

    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    }[gguf_type]
    writer = gguf.GGUFWriter(str(path), arch_name)
    # transformers' GGUF reader takes a llama file whose general.name is exactly "mistral" for its own
    # "mistral" architecture, which gguf-py cannot map: never write that name.
    general_name = name or model_dir.name
    writer.add_name("Mistral" if general_name == "mistral" else general_name)
    _add_hyperparameters(writer, text, n_vocab=n_vocab, theta=theta)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_vocabulary(writer, model_dir, tokenizer, n_vocab=n_vocab, pre=pre, gguf=gguf)

    written: dict[str, str] = {}
    permute = (n_head, n_kv) if permute_qk and arch_name in _PERMUTED_ARCHS else None
    _add_weights(
        writer, model, gguf.get_tensor_name_map(arch, n_layers), gguf_type, gguf, written, tied, permute
    )
    if scaling is not None:  # llama3 (checked): per-frequency divisors, as llama.cpp reads them
        _add_tensor(writer, "rope_freqs.weight", _llama3_rope_factors(config), gguf_type, gguf, written)

    quiet = logging.getLogger("gguf")  # per-file notes (endianness, tensor counts) at INFO
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=progress)
        writer.close()
    finally:
        quiet.setLevel(level)
    return {
        "architecture": arch_name,
        "gguf_type": gguf_type,
        "tensors": written,
        "tied_embeddings": tied,
        "tokenizer_pre": pre,
        "n_vocab": n_vocab,
        "rope_scaling": scaling["rope_type"] if scaling else None,
        "bytes": path.stat().st_size,
    }


def _byte_level_bpe(model_dir: Path) -> dict[str, Any]:
    """``tokenizer.json``, if it is a byte-level BPE tokenizer (the only kind written); else ModelError."""
    tokenizer_json: dict[str, Any] = json.loads((model_dir / "tokenizer.json").read_text())
    model_kind = tokenizer_json.get("model", {}).get("type")
    if model_kind != "BPE" or tokenizer_json["model"].get("byte_fallback"):
        raise ModelError(
            f"GGUF export of {model_dir}: only byte-level BPE tokenizers (Llama-3, Qwen2, SmolLM, GPT-2 "
            f"style) are written by llm-neo; this one is {model_kind}"
            + (" with byte fallback (a converted sentencepiece model)" if model_kind == "BPE" else "")
            + ". Use llama.cpp's convert_hf_to_gguf.py for it"
        )
    return tokenizer_json


def _add_hyperparameters(writer: Any, text: Any, *, n_vocab: int, theta: float) -> None:
    """The architecture's numbers, from the (text) config, as llama.cpp's llama/qwen2 loaders read them."""
    n_head = int(text.num_attention_heads)
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // n_head)
    writer.add_context_length(int(text.max_position_embeddings))
    writer.add_embedding_length(int(text.hidden_size))
    writer.add_block_count(int(text.num_hidden_layers))
    writer.add_feed_forward_length(int(text.intermediate_size))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(int(text.num_key_value_heads or n_head))
    if head_dim != text.hidden_size // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(float(text.rms_norm_eps))
    writer.add_vocab_size(n_vocab)


def _add_vocabulary(
    writer: Any, model_dir: Path, tokenizer: Any, *, n_vocab: int, pre: str, gguf: Any
) -> None:
    """Tokens, their types, merges, special ids (and whether BOS/EOS are added) and the chat template."""
    tokens, types = _vocabulary(tokenizer, n_vocab, gguf)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=n_vocab)
    add_bos, add_eos = _added_bos_eos(tokenizer)
    special.add_special_token["bos"], special.add_special_token["eos"] = add_bos, add_eos
    if special.chat_template is None and getattr(tokenizer, "chat_template", None):
        special.chat_template = tokenizer.chat_template
    special.add_to_gguf(writer, quiet=True)


def _add_weights(
    writer: Any,
    model: Any,
    names: Any,
    gguf_type: str,
    gguf: Any,
    written: dict[str, str],
    tied: bool,
    permute: tuple[int, int] | None,
) -> None:
    """Every weight under its llama.cpp name (a tied head is not written: the reader ties it), q/k rows
    permuted to llama.cpp's rope layout when ``permute`` gives (query heads, key/value heads)."""
    state = model.state_dict()
    head = find_output_head(model)
    head_key = next((k for k, v in state.items() if head is not None and v is head.weight), None)
    for key, tensor in state.items():
        if tied and (key == head_key or key == "lm_head.weight"):
            continue
        gguf_name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ModelError(f"GGUF export: no llama.cpp name for tensor {key!r} of {type(model).__name__}")
        array = tensor.detach().float().cpu().numpy()
        if permute is not None:
            if gguf_name.endswith(("attn_q.weight", "attn_q.bias")):
                array = permute_rope_rows(array, permute[0])
            elif gguf_name.endswith(("attn_k.weight", "attn_k.bias")):
                array = permute_rope_rows(array, permute[1])
        _add_tensor(writer, gguf_name, array, gguf_type, gguf, written)


def _add_tensor(
    writer: Any, name: str, array: np.ndarray, gguf_type: str, gguf: Any, written: dict[str, str]
) -> None:
    qtype = _tensor_type(name, array, gguf_type, gguf)
    Q = gguf.GGMLQuantizationType
    if qtype == Q.F32:
        writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
    elif qtype == Q.F16:
        writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float16))
    else:
        writer.add_tensor(
            name, gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), qtype), raw_dtype=qtype
        )
    written[name] = qtype.name


# ----------------------------------------------------------------------------------------------------
# Verification

SAMPLE_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? Paris. 12345 + 678 = 13023",
    "  leading spaces,\ttabs\nand new lines\n\n",
    "Ünïcödé, emoji 🦙 and 中文.",
)
SAMPLE_CHAT = (
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
)


def sample_input_ids(tokenizer: Any, texts: Sequence[str]) -> torch.Tensor:
    """[B, T] ids of ``texts`` (special tokens as the tokenizer adds them), right-padded. Every position is
    compared, padding included: to both models a pad token is an ordinary input."""
    ids = [tokenizer(t)["input_ids"] for t in texts]
    width = max(len(i) for i in ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return torch.tensor([i + [pad] * (width - len(i)) for i in ids])


def compare_logits(
    source: Any, other: Any, input_ids: torch.Tensor, chunk_size: int = 512
) -> dict[str, float]:
    """max |Δ logits|, KL(source ‖ other) per token and top-1 agreement over every position, chunked."""
    from llm_neo.losses import forward_kl
    from llm_neo.models.anatomy import final_hidden_states, model_logits

    mask = torch.ones_like(input_ids)
    with torch.no_grad():
        hs = final_hidden_states(source, input_ids, mask).flatten(0, 1)  # [N, H]
        ho = final_hidden_states(other, input_ids, mask).flatten(0, 1)
        max_diff = kl = agree = 0.0
        for start in range(0, hs.shape[0], chunk_size):
            s = model_logits(source, hs[start : start + chunk_size]).float()  # [C, V]
            o = model_logits(other, ho[start : start + chunk_size]).float()
            max_diff = max(max_diff, float((s - o).abs().max()))
            kl += float(forward_kl(o, s).sum())
            agree += float((s.argmax(-1) == o.argmax(-1)).sum())
    n = hs.shape[0]
    return {"max_abs_logit_diff": max_diff, "kl_per_token": kl / n, "top1_agreement": agree / n, "tokens": n}


def verify_gguf(
    model_dir: str | Path,
    gguf_dir: str | Path,
    gguf_file: str,
    gguf_type: str,
    *,
    texts: Sequence[str] = SAMPLE_TEXTS,
) -> dict[str, Any]:
    """Reload ``gguf_dir/gguf_file`` with transformers' GGUF loader and compare it with ``model_dir``.

    Returns ``{"logits": {max_abs_logit_diff, kl_per_token, top1_agreement, tokens}, "bound",
    "token_ids_equal", "chat_template_equal", "rope_freqs_max_rel_error" (llama3 scaling only),
    "passed", "problems"}``. The logits are compared on the sample texts tokenized by the source's
    tokenizer (and the chat, when there is a template).
    """
    _require_gguf()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_neo.models.loading import load_model

    model_dir, gguf_dir = Path(model_dir), Path(gguf_dir)
    source_tok = AutoTokenizer.from_pretrained(model_dir)
    gguf_tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    problems: list[str] = []

    token_ids_equal = True
    for text in texts:
        a, b = source_tok(text)["input_ids"], gguf_tok(text)["input_ids"]
        if a != b:
            token_ids_equal = False
            problems.append(f"token ids differ on {text!r}: source {a[:12]}..., GGUF {b[:12]}...")
    template = getattr(source_tok, "chat_template", None)
    chat_template_equal = template == getattr(gguf_tok, "chat_template", None)
    if not chat_template_equal:
        problems.append("the chat template differs from the source's")
    rendered: list[str] = []
    if template and chat_template_equal:
        chat_a = source_tok.apply_chat_template(list(SAMPLE_CHAT), tokenize=False)
        chat_b = gguf_tok.apply_chat_template(list(SAMPLE_CHAT), tokenize=False)
        if (
            chat_a != chat_b
            or source_tok(chat_a, add_special_tokens=False)["input_ids"]
            != gguf_tok(chat_b, add_special_tokens=False)["input_ids"]
        ):
            problems.append("the chat rendered through the GGUF's tokenizer differs from the source's")
        rendered.append(str(chat_a))

    source = load_model(str(model_dir), role="export source", dtype=torch.float32, device=torch.device("cpu"))
    kwargs: dict[str, Any] = {}
    raw = _read_config(model_dir)
    _, scaling = _rope(raw)
    rope_error = None
    if scaling is not None:
        # transformers' GGUF loader ignores rope_freqs: give it the source's scaling, and check separately
        # that the file's rope_freqs reproduce the source's frequencies (what llama.cpp computes with).
        from transformers import AutoConfig

        gguf_config = AutoConfig.from_pretrained(gguf_dir, gguf_file=gguf_file)
        gguf_config.rope_parameters = dict(source.config.rope_parameters)
        kwargs["config"] = gguf_config
        rope_error = _rope_freqs_error(gguf_dir / gguf_file, source.config)
        if rope_error > 1e-6:
            problems.append(f"rope_freqs reproduce the source's frequencies only to {rope_error:.3g}")
    reloaded = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=gguf_file, dtype=torch.float32, **kwargs
    ).eval()
    source.eval()
    input_ids = sample_input_ids(source_tok, [*texts, *rendered])
    logits = compare_logits(source, reloaded, input_ids)
    bound = GGUF_BOUNDS[gguf_type]
    for key, limit in bound.items():
        if not logits[key] <= limit:
            problems.append(f"{key} {logits[key]:.3g} is above the {gguf_type} bound {limit:g}")
    return {
        "logits": logits,
        "bound": bound,
        "token_ids_equal": token_ids_equal,
        "chat_template_equal": chat_template_equal,
        "rope_freqs_max_rel_error": rope_error,
        "passed": not problems,
        "problems": problems,
    }


def _rope_freqs_error(path: Path, config: Any) -> float:
    """Max relative error of (default frequencies / rope_freqs) against the source's scaled frequencies."""
    gguf = _require_gguf()
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    reader = gguf.GGUFReader(str(path))
    factors = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, torch.device("cpu"))
    theta, _ = _rope(config.to_dict())
    dim = scaled.shape[0] * 2
    default = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).double() / dim))
    ours = default / torch.from_numpy(np.array(factors.data, dtype=np.float64))
    return float(((ours - scaled.double()).abs() / scaled.double()).max())


def gguf_metadata(path: str | Path) -> dict[str, Any]:
    """A few keys of a GGUF's metadata, read back with ``GGUFReader`` (for export.json and the tests)."""
    gguf = _require_gguf()
    reader = gguf.GGUFReader(str(path))

    def value(key: str) -> Any:
        field = reader.get_field(key)
        return None if field is None else field.contents()

    arch = value("general.architecture")
    out = {
        "general.architecture": arch,
        "general.file_type": value("general.file_type"),
        "tokenizer.ggml.model": value("tokenizer.ggml.model"),
        "tokenizer.ggml.pre": value("tokenizer.ggml.pre"),
        "tokenizer.ggml.bos_token_id": value("tokenizer.ggml.bos_token_id"),
        "tokenizer.ggml.eos_token_id": value("tokenizer.ggml.eos_token_id"),
        f"{arch}.block_count": value(f"{arch}.block_count"),
        f"{arch}.context_length": value(f"{arch}.context_length"),
        "has_chat_template": reader.get_field("tokenizer.chat_template") is not None,
        "tensor_count": len(reader.tensors),
    }
    return out
