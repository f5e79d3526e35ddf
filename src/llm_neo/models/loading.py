"""Loading teacher and student, and the vocabulary checks that make their distributions comparable.

KD compares two next-token distributions column by column, so column i must mean the same token in
both models. ``check_same_vocabulary`` proves it from the tokenizers; ``kd_vocab_size`` handles the
common case of embedding tables padded past the tokenizer (Qwen2.5: 151,936 vs 152,064 logits).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from llm_neo.config import LoadOptions
from llm_neo.errors import ModelError
from llm_neo.losses.objective import softcap
from llm_neo.runtime.atomic import atomic_directory


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The compute dtype: bf16 on GPUs that support it, fp32 on CPU (CPU autocast is slow and lossy)."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def autocast(device: torch.device, dtype: torch.dtype) -> torch.autocast:
    """Mixed precision for ``dtype`` below fp32; a disabled (no-op) context for fp32."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def load_config(path: str, *, role: str, trust_remote_code: bool = False) -> PretrainedConfig:
    """A model's config.json (no weights): what every check before loading reads."""
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as err:  # OSError, ValueError, JSON errors: all mean "not a readable model"
        raise ModelError(f"could not read the {role} model's config from {path!r}: {err}") from err


def load_tokenizer(path: str, *, role: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as err:  # HF raises OSError, ValueError, JSON errors... all mean the same here
        raise ModelError(f"could not load the {role} tokenizer from {path!r}: {err}") from err
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out of every loss, so any id will do; eos is the usual choice.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    path: str,
    *,
    role: str,
    dtype: torch.dtype,
    device: torch.device,
    trust_remote_code: bool = False,
    allow_pickle_weights: bool = False,
) -> PreTrainedModel:
    """Load a causal LM from a local dir or hub id, weights from safetensors unless the user opts in."""
    hf_logging.disable_progress_bar()
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if not allow_pickle_weights:
        kwargs["use_safetensors"] = True
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except Exception as err:
        hint = ""
        local = Path(path)
        if local.is_dir() and not any(local.glob("*.safetensors")) and not allow_pickle_weights:
            hint = (
                " (no .safetensors weights there: convert the checkpoint to safetensors, or pass "
                "--allow-pickle-weights if you trust its source)"
            )
        raise ModelError(f"could not load the {role} model from {path!r}: {err}{hint}") from err
    return model.to(device)  # type: ignore[arg-type]


def freeze(model: PreTrainedModel) -> PreTrainedModel:
    """The teacher's state: eval mode (no dropout), no gradients, hence no optimizer state either."""
    model.eval()
    model.requires_grad_(False)
    return model


def load_frozen(
    options: LoadOptions, path: str, *, role: str, dtype: torch.dtype, device: torch.device
) -> PreTrainedModel:
    """``load_model`` under a command's loading options, frozen: a teacher, or a model to score."""
    return freeze(
        load_model(
            path,
            role=role,
            dtype=dtype,
            device=device,
            trust_remote_code=options.trust_remote_code,
            allow_pickle_weights=options.allow_pickle_weights,
        )
    )


def load_tokenizers(
    path: str, teacher: str | None, *, role: str, trust_remote_code: bool
) -> tuple[PreTrainedTokenizerBase, PreTrainedTokenizerBase | None]:
    """The tokenizer of ``path`` and, when a teacher is given, the teacher's, proven to map every id to
    the same token (ModelError otherwise)."""
    tokenizer = load_tokenizer(path, role=role, trust_remote_code=trust_remote_code)
    if not teacher:
        return tokenizer, None
    teacher_tokenizer = load_tokenizer(teacher, role="teacher", trust_remote_code=trust_remote_code)
    check_same_vocabulary(tokenizer, teacher_tokenizer)
    return tokenizer, teacher_tokenizer


def logit_width(model: torch.nn.Module) -> int:
    head = model.get_output_embeddings()  # type: ignore[operator]
    if head is not None and hasattr(head, "weight"):
        return int(head.weight.shape[0])
    config: Any = model.config
    return int(config.vocab_size)


def check_same_vocabulary(student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase) -> None:
    """Raise ModelError unless both tokenizers map every id to the same token.

    The message names both vocabulary sizes and the first id that disagrees, the fact a user needs
    to see that the pair cannot be distilled token-for-token.
    """
    s_vocab, t_vocab = student.get_vocab(), teacher.get_vocab()
    if s_vocab == t_vocab:
        return
    s_ids = {i: tok for tok, i in s_vocab.items()}
    t_ids = {i: tok for tok, i in t_vocab.items()}
    first = next(i for i in range(max(len(s_ids), len(t_ids)) + 1) if s_ids.get(i) != t_ids.get(i))
    raise ModelError(
        f"teacher and student tokenizers differ: the teacher has {len(t_vocab)} tokens, the student "
        f"{len(s_vocab)}; id {first} is {t_ids.get(first)!r} in the teacher and {s_ids.get(first)!r} in "
        "the student. Token-level distillation needs a shared tokenizer: pick a student of the teacher's "
        "family (e.g. Llama-3.1-8B -> Llama-3.2-1B)."
    )


def kd_vocab_size(
    tokenizer: PreTrainedTokenizerBase, student: torch.nn.Module, teacher: torch.nn.Module
) -> int:
    """Columns compared by the divergence: the tokenizer's length.

    Logit columns past it are embedding-table padding that no text can produce; dropping them from
    both models is the same as giving them zero probability, and it makes differently padded widths
    comparable.
    """
    size = len(tokenizer)
    for role, model in (("student", student), ("teacher", teacher)):
        width = logit_width(model)
        if width < size:
            raise ModelError(
                f"the {role} has {width} logit columns but the tokenizer has {size} tokens: its "
                "embedding table is too small for this tokenizer (resize it or use the matching tokenizer)"
            )
    return size


def final_hidden_states(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """[B, T, H] hidden states after the final norm: the lm_head's input (works through PEFT wrappers)."""
    decoder = model.get_decoder()  # type: ignore[operator]
    return decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


def model_logits(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The model's lm_head on ``hidden`` [n, H] -> [n, V], with Gemma-style soft-capping where configured."""
    return softcap(model.get_output_embeddings()(hidden), logit_softcap(model))  # type: ignore[operator]


def lm_head(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The lm_head's weight [V, H] and bias [V] (None without one): what the chunked loss multiplies."""
    head = model.get_output_embeddings()  # type: ignore[operator]
    return head.weight, getattr(head, "bias", None)


def logit_softcap(model: torch.nn.Module | None) -> float | None:
    """Gemma-style final logit soft-capping, which the chunked path must apply as the model's forward does."""
    config = getattr(model, "config", None)
    return getattr(config, "final_logit_softcapping", None) if config is not None else None


def published_dtype(hf_config: PretrainedConfig) -> torch.dtype:
    """The dtype the weights were published in (fp32 when the config does not say): what a saved student
    is cast back to, so it is a drop-in replacement for the original."""
    dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def save_model_dir(model: PreTrainedModel, tokenizer: Any, path: Path, dtype: torch.dtype) -> None:
    """Write a standard HF model dir (safetensors + tokenizer) in ``dtype``, atomically, and prove it
    reloads bit-exact. ``model`` is cast to ``dtype`` and back to fp32 afterwards."""
    model.config.use_cache = True
    with atomic_directory(path) as tmp:
        torch.nn.Module.to(model, dtype)  # the plain cast; HF's typed wrapper of .to confuses mypy
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype, use_safetensors=True)
        saved = reloaded.state_dict()
        for name, tensor in model.state_dict().items():
            if name in saved and not torch.equal(saved[name].cpu(), tensor.cpu()):
                raise ModelError(f"the weights saved in {path} differ from the model at {name}")
        del reloaded
    model.float()
