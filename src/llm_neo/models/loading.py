"""Loading teacher and student, and the vocabulary checks that make their distributions comparable.

KD compares two next-token distributions column by column, so column i must mean the same token in
both models. ``check_same_vocabulary`` proves it from the tokenizers; ``kd_vocab_size`` handles the
common case of embedding tables padded past the tokenizer (Qwen2.5: 151,936 vs 152,064 logits).

A model is a Hugging Face model directory, a hub id, or a GGUF file (llama.cpp / Ollama; or a
directory holding exactly one ``.gguf`` and no ``config.json``). GGUF weights are dequantized to the
compute dtype by transformers' GGUF loader (the ``gguf`` package: ``pip install 'llm-neo[gguf]'``), and
the tokenizer and chat template come from the file. ``llm-neo convert`` does it once, to safetensors.

Where the families differ, ``models.anatomy`` is the one place that knows; ``check_supported`` refuses
what cannot work before any weight loads.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import logging
import re
import time
import warnings
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

from llm_neo.choices import LORA_METHODS
from llm_neo.config import LoadOptions, missing_model
from llm_neo.errors import ConfigError, ModelError
from llm_neo.models.anatomy import (
    LINEAR_TYPES,
    STATE_SPACE_MODEL_TYPES,
    TESTED_MODEL_TYPES,
    decoder_blocks,
    default_target_modules,
    logit_width,
    output_head,
)
from llm_neo.runtime.atomic import atomic_directory

log = logging.getLogger("llm_neo")

GGUF_SUFFIX = ".gguf"
# llama.cpp's split files (NAME-00001-of-00003.gguf), which transformers' loader reads one at a time.
_SPLIT_GGUF = re.compile(r"-\d{5}-of-\d{5}\.gguf$")


# ------------------------------------------------------------------------------------------------
# Where a model's files are: a model directory / hub id, or a GGUF file.


def resolve_gguf(path: str) -> tuple[str, str | None]:
    """``(directory or hub id, GGUF file name or None)`` for a ``--teacher/--student/--model`` value.

    A ``.gguf`` file gives its directory and name; a directory with no ``config.json`` that holds
    exactly one ``.gguf`` gives that file (several: ModelError naming them, so the user picks one).
    Anything else is an ordinary model directory or hub id, returned as given.
    """
    local = Path(path).expanduser()
    if local.is_file():
        if local.suffix != GGUF_SUFFIX:
            raise ModelError(
                f"{path!r} is a file but not a .gguf: give a model directory (config.json + safetensors), "
                "a hub id, or a .gguf file"
            )
        file = local
    elif local.is_dir() and not (local / "config.json").is_file():
        found = sorted(local.glob(f"*{GGUF_SUFFIX}"))
        if not found:
            return path, None  # not a model directory either; the loader's error says so
        if len(found) > 1:
            names = ", ".join(f.name for f in found)
            raise ModelError(
                f"{path!r} holds {len(found)} .gguf files ({names}) and no config.json: name one, e.g. "
                f"{local / found[0].name}"
            )
        file = found[0]
    else:
        return path, None
    if _SPLIT_GGUF.search(file.name):
        raise ModelError(
            f"{file} is one part of a split GGUF: merge the parts first "
            "(llama.cpp: llama-gguf-split --merge FIRST-PART.gguf OUT.gguf), then pass the merged file"
        )
    return str(file.parent), file.name


def refuse_missing(path: str, role: str) -> None:
    """ConfigError at once for a model path that cannot load: a mistyped local path shaped like a hub id,
    or a hub id while the hub is offline or unreachable (``config.missing_model``), before any loader
    spends a minute on hub retries."""
    problem = missing_model(role, path)
    if problem:
        raise ConfigError([problem])


def is_gguf(path: str) -> bool:
    """Whether ``path`` names a GGUF checkpoint (see ``resolve_gguf``)."""
    return resolve_gguf(path)[1] is not None


def _require_gguf(path: str) -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ModelError(
            f"{path!r} is a GGUF file: reading it needs the gguf package; pip install 'llm-neo[gguf]' "
            "(or pip install gguf)"
        )


def load_config(path: str, *, role: str = "model", trust_remote_code: bool = False) -> PretrainedConfig:
    """The model's config (config.json, or the GGUF file's metadata) without loading any weight: what
    every check before loading reads.

    A GGUF's metadata is parsed once per file (it takes seconds: the tokenizer is in it too) and
    copied on every later call. The returned config never carries a ``quantization_config``.
    """
    refuse_missing(path, role)
    check_model_files(path, role)
    directory, gguf_file = resolve_gguf(path)
    try:
        if gguf_file is None:
            return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        _require_gguf(path)
        file = Path(directory) / gguf_file
        stat = file.stat()
        return copy.deepcopy(_gguf_config(str(file), stat.st_size, stat.st_mtime_ns))
    except ModelError:
        raise
    except Exception as err:  # OSError, ValueError, JSON errors: all mean "not a readable model"
        raise ModelError(f"could not read the {role} model's config from {path!r}: {err}") from err


@functools.lru_cache(maxsize=8)
def _gguf_config(file: str, size: int, mtime_ns: int) -> PretrainedConfig:
    path = Path(file)
    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    config.__dict__.pop("quantization_config", None)
    return config


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


def load_tokenizer(path: str, *, role: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer (and chat template) of a model directory, hub id or GGUF file."""
    refuse_missing(path, role)
    check_model_files(path, role)
    directory, gguf_file = resolve_gguf(path)
    tokenizer: PreTrainedTokenizerBase
    try:
        if gguf_file is None:
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        else:
            _require_gguf(path)
            tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
            tokenizer = _drop_tokens_past(tokenizer, int(load_config(path).vocab_size))
    except ModelError:
        raise
    except Exception as err:  # HF raises OSError, ValueError, JSON errors... all mean the same here
        raise ModelError(f"could not load the {role} tokenizer from {path!r}: {err}") from err
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out of every loss, so any id will do; eos is the usual choice.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _drop_tokens_past(tokenizer: PreTrainedTokenizerBase, rows: int) -> PreTrainedTokenizerBase:
    """The tokenizer without added tokens whose id is ``rows`` or more (past the embedding table).

    transformers rebuilds a byte-level GGUF vocabulary with GPT2Tokenizer, which appends
    ``<|endoftext|>`` when the file has none (Llama-3 files: theirs is ``<|end_of_text|>``): one id past
    the model's rows, which would make the tokenizer longer than the model's logits. No text the
    model was trained on contains it, so the tokenizer is rebuilt without it.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or len(tokenizer) <= rows:
        return tokenizer
    data = json.loads(backend.to_str())
    dropped = {t["content"] for t in data.get("added_tokens", []) if t["id"] >= rows}
    data["added_tokens"] = [t for t in data.get("added_tokens", []) if t["id"] < rows]
    special = {
        name: value
        for name in ("bos_token", "eos_token", "unk_token", "pad_token")
        if (value := getattr(tokenizer, name, None)) is not None and str(value) not in dropped
    }
    rebuilt = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(data)),
        chat_template=tokenizer.chat_template,
        **special,
    )
    log.info("tokenizer: dropped %s (ids past the model's %d rows)", ", ".join(sorted(dropped)), rows)
    return rebuilt


def load_model(
    path: str,
    *,
    role: str,
    dtype: torch.dtype,
    device: torch.device,
    trust_remote_code: bool = False,
    allow_pickle_weights: bool = False,
) -> PreTrainedModel:
    """Load a causal LM from a local dir or hub id, weights from safetensors unless the user opts in; or
    from a GGUF file (see ``load_gguf_model``)."""
    hf_logging.disable_progress_bar()
    refuse_missing(path, role)
    check_model_files(path, role)  # a short shard named here, not as a reshape error inside the loader
    if is_gguf(path):
        model = load_gguf_model(path, role=role, dtype=dtype)
        log.info(
            "%s: to skip dequantizing on every run, convert it once: llm-neo convert --model %s", role, path
        )
        return model.to(device)  # type: ignore[arg-type]
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


def load_gguf_model(path: str, *, role: str, dtype: torch.dtype) -> PreTrainedModel:
    """A plain (dense, trainable, savable) model from a GGUF file, its weights dequantized to ``dtype``.

    transformers' GGUF loader is asked to dequantize every tensor (it could keep them packed for its
    inference kernels, which cannot train). Its model still carries the GGUF quantizer, which makes
    ``save_pretrained`` refuse it ("quantized with gguf and is not serializable"), so the weights are
    moved, not copied, into a model of the same class built from the config without its
    ``quantization_config``. Tied embeddings stay tied (the class ties them from the config).
    """
    from transformers import GgufConfig

    directory, gguf_file = resolve_gguf(path)
    assert gguf_file is not None
    config = load_config(path)
    hf_logging.disable_progress_bar()
    started = time.perf_counter()
    try:
        packed = AutoModelForCausalLM.from_pretrained(
            directory,
            gguf_file=gguf_file,
            config=copy.deepcopy(config),
            dtype=dtype,
            quantization_config=GgufConfig(dequantize=True),
        )
        state = packed.state_dict()
        model = type(packed).from_pretrained(None, config=config, state_dict=state, dtype=dtype)
    except Exception as err:
        raise ModelError(
            f"could not load the {role} model from the GGUF file {path!r}: {err} (transformers reads GGUF "
            "files of the architectures it lists in transformers.integrations.ggml; convert others to a "
            "Hugging Face directory with llama.cpp's tools)"
        ) from err
    del packed, state
    log.info(
        "%s: dequantized %s to %s in %.1f s",
        role,
        gguf_file,
        str(dtype).removeprefix("torch."),
        time.perf_counter() - started,
    )
    return model


def check_supported(
    hf_config: PretrainedConfig,
    *,
    role: str,
    method: str | None = None,
    target_modules: list[str] | None = None,
    trust_remote_code: bool = False,
) -> None:
    """Raise ModelError, naming every part that cannot work, unless llm-neo can run this model as ``role``
    ("teacher", "student", "model") in ``method`` (one of ``choices.METHODS``; None: no training).

    Reads the config only: the module tree is built on the meta device (no memory, no weights), so a
    checkpoint that cannot work is refused before anything heavy loads. What it checks: a decoder-only
    causal LM that transformers has a class for (or whose code is trusted), not a vision-language or
    encoder-decoder checkpoint; a base decoder with a list of blocks and an lm_head with a weight
    (the chunked loss, held-out metrics, pruning and FSDP need them); for LoRA methods, linear layers
    to adapt (``target_modules``, or the default of every linear layer in the blocks).
    """
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    name = f"the {role} ({getattr(hf_config, 'model_type', type(hf_config).__name__)})"
    if getattr(hf_config, "is_encoder_decoder", False):
        raise ModelError(
            f"{name} is an encoder-decoder model; llm-neo distills decoder-only causal LMs (token-level KD "
            "on the next-token distribution of one decoder)"
        )
    if getattr(hf_config, "vision_config", None) is not None or getattr(hf_config, "audio_config", None):
        raise ModelError(
            f"{name} is a multimodal checkpoint (it has a vision/audio tower); llm-neo distills text-only "
            "causal LMs: use the text-only release of the family (e.g. Gemma 3 270M/1B, model_type "
            "gemma3_text)"
        )
    known = type(hf_config) in MODEL_FOR_CAUSAL_LM_MAPPING
    if not known and not (trust_remote_code and getattr(hf_config, "auto_map", None)):
        raise ModelError(
            f"{name}: transformers has no causal-LM class for {type(hf_config).__name__}; if the model "
            "directory ships its own code and you trust it, pass --trust-remote-code"
        )
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        skeleton = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=trust_remote_code)
    problems: list[str] = []
    for check in (decoder_blocks, output_head):
        try:
            check(skeleton)
        except ModelError as err:
            problems.append(str(err))
    lora = method in LORA_METHODS
    if lora and getattr(hf_config, "model_type", None) in STATE_SPACE_MODEL_TYPES:
        refused = {"out_proj", "conv1d"} & set(target_modules or ["out_proj"])
        if refused:
            problems.append(
                f"PEFT refuses LoRA on the {' and '.join(sorted(refused))} layers of state-space (Mamba) "
                "blocks, which the default targets include: pass --lora.target-modules in_proj x_proj "
                "dt_proj, or use --method kd or sft"
            )
    if lora:
        try:
            if target_modules is None:
                default_target_modules(skeleton)
            else:
                modules = dict(skeleton.named_modules())
                for target in target_modules:
                    hits = [m for n, m in modules.items() if n == target or n.endswith("." + target)]
                    if hits and not any(isinstance(m, LINEAR_TYPES) for m in hits):
                        problems.append(
                            f"--lora.target-modules {target}: it is a {type(hits[0]).__name__}, not a linear "
                            "layer; LoRA adapts nn.Linear / Conv1D layers (the routed experts of "
                            "mixture-of-experts blocks are fused 3-D parameters: llm-neo adapts attention)"
                        )
        except ModelError as err:
            problems.append(str(err))
    if problems:
        raise ModelError(f"{name} cannot be used: " + "; ".join(problems))
    if getattr(hf_config, "model_type", None) not in TESTED_MODEL_TYPES:
        log.warning(
            "%s is not one of the families llm-neo tests (%s); it may work, check the merge check and "
            "the held-out metrics",
            name,
            ", ".join(TESTED_MODEL_TYPES),
        )


def freeze(model: PreTrainedModel) -> PreTrainedModel:
    """The teacher's state: eval mode (no dropout), no gradients, hence no optimizer state either."""
    model.eval()
    model.requires_grad_(False)
    return model


def load_frozen(
    options: LoadOptions, path: str, *, role: str, dtype: torch.dtype, device: torch.device
) -> PreTrainedModel:
    """``load_model`` under a command's loading options, frozen: a teacher, or a model to score."""
    model = load_model(
        path,
        role=role,
        dtype=dtype,
        device=device,
        trust_remote_code=options.trust_remote_code,
        allow_pickle_weights=options.allow_pickle_weights,
    )
    check_finite_weights(model, role=role, source=path)
    return freeze(model)


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
        "family (e.g. Llama-3.1-8B -> Llama-3.2-1B), or pass --cross-tokenizer shared-vocab (or uld) to "
        "distill across tokenizers; `llm-neo check-pair` reports the pair first."
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


def check_finite_weights(model: torch.nn.Module, *, role: str, source: str) -> None:
    """ModelError naming the first parameter of ``model`` that holds a NaN or an infinity.

    One NaN weight poisons every output (a teacher's every log-prob, a student's every loss), and the
    failure it causes later names a step and the learning rate, not the weights. One ``isfinite`` pass
    over the floating-point tensors costs about one read of the weights: well under a second per GB on a
    GPU, a few seconds per GB on a CPU. Integer tensors (quantized weights) cannot hold a NaN.
    """
    for name, tensor in model.named_parameters():  # not buffers: a causal mask may hold -inf by design
        data = tensor.detach()
        if not data.is_floating_point() or data.is_meta or type(data) is not torch.Tensor:
            # A tensor subclass (torchao's Int8Tensor of a QLoRA base, a DTensor) stores its values in
            # another form and supports few ops; its integer data cannot hold a NaN.
            continue
        # In blocks of 16 M values: the boolean mask of a whole embedding table would be 0.5 GB at 8 B.
        flat = data.reshape(-1)
        if not all(bool(torch.isfinite(block).all()) for block in flat.split(1 << 24)):
            bad = data.float()
            nans, infs = int(bad.isnan().sum()), int(bad.isinf().sum())
            raise ModelError(
                f"the {role} {source!r} has non-finite weights: tensor {name} holds {nans} NaN and {infs} "
                f"infinite values of {tensor.numel()}. Every output it computes would be NaN: the weight "
                "files are damaged (download or export them again) or the model diverged while training "
                "(use an earlier checkpoint)"
            )


def same_weights(teacher: str, student: str) -> str | None:
    """The one place both names lead to when ``teacher`` and ``student`` are the same weights (the same
    hub id, or local paths that resolve to the same directory or GGUF file, through links and ``..``);
    None otherwise. Paths only: digests of copies would read every weight twice."""
    if teacher == student:
        return teacher
    places = []
    for name in (teacher, student):
        local = Path(name).expanduser()
        if not local.exists():
            return None  # a hub id (different from the other name) or a mistyped path: not the same
        directory, gguf_file = resolve_gguf(name)
        places.append(Path(directory) / gguf_file if gguf_file else local)
    return str(places[0].resolve()) if places[0].resolve() == places[1].resolve() else None


def warn_same_weights(
    teacher: str | None, student: str, digests: tuple[str | None, str | None] | None = None
) -> None:
    """Warn when the teacher and the student are the same weights: the student would be distilled into
    itself (its KD term starts at zero and teaches nothing), usually a slip in a config file.

    Without ``digests``: the same place (``same_weights``), before anything is read. With them (the
    teacher's and the student's weight sha256, where a run computes them anyway): a copy of the same
    weights under another path, which the paths cannot tell; a pair the paths already told is not
    warned about twice."""
    if not teacher:
        return
    place = same_weights(teacher, student)
    if digests is None and place:
        log.warning(
            "the teacher (%s) and the student (%s) are the same weights (%s): KD would distill the "
            "student into itself; check --teacher/--student (and teacher:/student: in the config file)",
            teacher,
            student,
            place,
        )
    elif digests is not None and place is None and digests[0] is not None and digests[0] == digests[1]:
        log.warning(
            "the teacher (%s) and the student (%s) are copies of the same weights (both %s): KD would "
            "distill the student into itself; check --teacher/--student (and teacher:/student: in the "
            "config file)",
            teacher,
            student,
            digests[0],
        )


# ------------------------------------------------------------------------------------------------
# Damaged or wrong model paths, named before any loader reads them (headers and sizes only).

# teacher_cache.store's KEY_FILE: that package sits above this one in the import layers.
_CACHE_KEY_FILE = "key.json"
_DOWNLOAD_AGAIN = "download or copy it again (a cut-off transfer or a full disk leaves a short file)"


def check_model_files(path: str, role: str) -> None:
    """ModelError naming the file, the cause and the fix for a local model path that no loader can read:
    an llm-neo run directory or teacher cache given as a model, a truncated or corrupt GGUF (its
    declared tensor data end vs the file's size), a truncated or corrupt safetensors shard (its header's
    declared data size vs the file's), a shard the index names that is missing. Reads headers only.
    Hub ids and paths that do not exist pass (``refuse_missing`` and the loaders speak for those)."""
    local = Path(path).expanduser()
    if local.is_dir() and not (local / "config.json").is_file():
        _refuse_llm_neo_directory(local, path, role)
    directory, gguf_file = resolve_gguf(path)
    if gguf_file is not None:
        file = Path(directory) / gguf_file
        stat = file.stat()
        problem = _gguf_problem(str(file), stat.st_size, stat.st_mtime_ns)
        if problem:
            raise ModelError(f"the {role} GGUF file {file} is damaged: {problem}; {_DOWNLOAD_AGAIN}")
    elif local.is_dir():
        problems = _safetensors_problems(local)
        if problems:
            raise ModelError(
                f"the {role} model {path!r} is damaged: {'; '.join(problems)}; {_DOWNLOAD_AGAIN}"
            )


def _refuse_llm_neo_directory(local: Path, path: str, role: str) -> None:
    """ModelError with a did-you-mean for what llm-neo itself wrote and a user passes as a model."""
    flag = f"--{role}" if role in ("teacher", "student", "model") else "the model path"
    if (local / _CACHE_KEY_FILE).is_file():
        fix = f"pass it as --teacher-cache {path}"
        fix += " instead of --teacher" if role == "teacher" else f", and a model directory as {flag}"
        raise ModelError(
            f"{flag} {path}: this is a teacher cache (llm-neo cache-teacher's output), not a model: {fix}"
        )
    if (local / "merged" / "config.json").is_file():
        raise ModelError(
            f"{flag} {path}: this is an llm-neo run directory, not a model: did you mean {local / 'merged'}?"
        )
    if (local / "config.yaml").is_file() and (
        (local / "checkpoints").is_dir() or (local / "summary.json").is_file()
    ):
        raise ModelError(
            f"{flag} {path}: this is an llm-neo run directory with no merged/ model yet (the run has not "
            f"finished): finish it with llm-neo distill --config {local / 'config.yaml'} --resume, then pass "
            f"{local / 'merged'}"
        )


@functools.lru_cache(maxsize=8)
def _gguf_problem(file: str, size: int, mtime_ns: int) -> str | None:
    """What is wrong with the GGUF file ``file`` of ``size`` bytes, from its header: not a GGUF, the
    header cut off, or tensor data declared past the file's end. None when it is whole."""
    import gguf

    with open(file, "rb") as f:
        header = _GgufHeader(f, size)
        try:
            end = header.declared_end(gguf)
        except EOFError:
            return f"it ends after {size} bytes, inside its header (truncated)"
        except ValueError as err:
            return str(err)
    if end is None or end == size:
        return None
    if end > size:
        missing = end - size
        return (
            f"its tensors end at byte {end:,}, the file has {size:,} bytes ({missing:,} missing: truncated)"
        )
    return None  # trailing bytes past the tensors: llama.cpp ignores them, so does transformers


class _GgufHeader:
    """A reader of a GGUF header (magic, version, metadata, tensor infos) that never reads tensor data:
    ``gguf.GGUFReader`` maps the whole file and fails on a short one with a reshape error."""

    def __init__(self, f: Any, size: int):
        self.f, self.size, self.order = f, size, "<"

    def read(self, n: int) -> bytes:
        data: bytes = self.f.read(n)
        if len(data) < n:
            raise EOFError
        return data

    def number(self, fmt: str) -> int:
        import struct

        return int(struct.unpack(self.order + fmt, self.read(struct.calcsize(fmt)))[0])

    def string(self) -> bytes:
        length = self.number("Q")
        if length > self.size:
            raise ValueError(f"a string of {length:,} bytes in a file of {self.size:,} (corrupt header)")
        return self.read(length)

    def skip_value(self, kind: int, sizes: dict[int, int]) -> Any:
        if kind == 8:  # STRING
            return self.string()
        if kind == 9:  # ARRAY: element type, count, elements
            item, count = self.number("I"), self.number("Q")
            if item in sizes:
                self.f.seek(sizes[item] * count, 1)
            else:
                for _ in range(count):
                    self.skip_value(item, sizes)
            return None
        if kind not in sizes:
            raise ValueError(f"an unknown metadata value type {kind} (corrupt header)")
        return self.number({1: "B", 2: "H", 4: "I", 8: "Q"}[sizes[kind]])

    def declared_end(self, gguf: Any) -> int | None:
        """The byte where the last tensor's data ends; None for a tensor type this gguf does not know."""
        magic = self.read(4)
        if magic != b"GGUF":
            raise ValueError(f"it does not start with GGUF but with {magic!r}: not a GGUF file")
        if self.number("I") > 0xFFFF:
            self.order = ">"  # a big-endian file (its version reads huge in little-endian)
        tensors, metadata = self.number("Q"), self.number("Q")
        sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
        alignment = 32
        for _ in range(metadata):
            key, kind = self.string(), self.number("I")
            value = self.skip_value(kind, sizes)
            if key == b"general.alignment" and isinstance(value, int) and value > 0:
                alignment = value
        end, known = 0, True
        for _ in range(tensors):
            self.string()
            dims = [self.number("Q") for _ in range(self.number("I"))]
            kind, offset = self.number("I"), self.number("Q")
            try:
                block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(kind)]
            except (KeyError, ValueError):
                known = False
                continue
            elements = 1
            for d in dims:
                elements *= d
            end = max(end, offset + elements // block * type_size)
        start = -(-self.f.tell() // alignment) * alignment
        return start + end if known else None


def _safetensors_problems(directory: Path) -> list[str]:
    """Each damaged or missing safetensors shard of a model directory: a header that is not one, data
    declared past the file's end (truncated) or short of it, a shard the index names but that is not
    there."""
    problems = []
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            named = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            problems.append(f"{index.name} is not a readable shard index ({err})")
            named = set()
        problems += [
            f"{name} is missing (named in {index.name})"
            for name in sorted(named)
            if not (directory / name).is_file()
        ]
    for shard in sorted(directory.glob("*.safetensors")):
        problem = _safetensors_problem(shard)
        if problem:
            problems.append(f"{shard.name}: {problem}")
    return problems


def _safetensors_problem(shard: Path) -> str | None:
    size = shard.stat().st_size
    with open(shard, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{size} bytes, shorter than a safetensors header (truncated)"
        length = int.from_bytes(head, "little")
        if length > size - 8:
            return f"its header declares {length:,} header bytes in a file of {size:,} (truncated or corrupt)"
        try:
            header = json.loads(f.read(length))
            ends = [int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"]
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
            return f"its header is not safetensors JSON ({err.__class__.__name__}: corrupt)"
    declared = 8 + length + max(ends, default=0)
    if declared == size:
        return None
    what = "missing: truncated" if declared > size else "too many: corrupt"
    gap = abs(declared - size)
    return f"its header declares {declared:,} bytes, the file has {size:,} bytes ({gap:,} {what})"
