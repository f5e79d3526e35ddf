"""Quantization in training: an 8-bit teacher, and a quantized (QLoRA) student base merged exactly.

Teacher (``quantize_teacher``): every ``nn.Linear`` inside the decoder blocks is quantized in place;
the embeddings and the lm_head stay as they are, because the chunked loss multiplies the teacher's
lm_head weight directly (``llm_neo.models.anatomy.lm_head``) and the head's error would reach the KD
targets unfiltered. Measured drift to the fp32 teacher (SmolLM2-135M-Instruct, torch 2.13 CPU; this
module on 152 tokens of mixed text, and issue #13's survey of backends):

    kind   backend        KL per token   top-1 agreement   weight bytes
    int8   torchao        0.005 - 0.007  0.97              2.44x fewer
    int8   bitsandbytes   0.037          -                 (CUDA only)
    nf4    bitsandbytes   0.3 - 0.7      0.61 - 0.73       3.2x fewer (a different teacher: warned)

``teacher_drift`` measures the same on a held-out batch of the run; ``reference_hidden_states`` lets it
do so without a second, unquantized copy of the teacher in memory.

Student base (``load_quantized_base``): bitsandbytes nf4 (double-quantized absmax, the QLoRA layout) or
torchao int8 weight-only, loaded through transformers' quantization configs so that PEFT wraps the
quantized linears with its own LoRA layers (``attach_lora`` works unchanged). Gradients through both
equal those through the dequantized weight. Bases whose linears quantize their *activations* (torchao's
dynamic-activation configs) round the inputs with no gradient: every layer below gets a wrong (mostly
zero) gradient, silently. ``check_trainable_base`` refuses them, by type and by a gradient probe.

Merge (``merge_quantized``): a fresh quantized base is loaded, each quantized linear dequantized exactly
as the training forward dequantizes it, ΔW = s·B·A added in fp32, and a plain dense model of the
student's architecture returned. PEFT's ``merge_and_unload`` is never used on a quantized base (it
re-quantizes W + ΔW and rounds most of ΔW away). The trained base is never dequantized: bitsandbytes
4-bit on a CPU with AVX512-BF16 repacks its weight in place at the first eval-mode forward, after
which ``dequantize_4bit`` and ``save_pretrained`` return garbage; ``dequantized_weight`` refuses such
a weight. Compare merged and adapter logits with train-mode forwards (``train_mode_without_dropout``):
an eval-mode forward is what triggers the repack, and the repacked kernel computes differently.

torchao and bitsandbytes are optional (``pip install 'llm-neo[quant]'``); each function imports what it
needs and says how to install it.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from llm_neo.choices import QLORA_VARIANTS, STUDENT_QUANT, TEACHER_QUANT
from llm_neo.choices import TEACHER_QUANT_BACKENDS as TEACHER_BACKENDS
from llm_neo.errors import ModelError
from llm_neo.losses import IGNORE_INDEX, forward_kl_inplace, next_token_targets
from llm_neo.models.anatomy import final_hidden_states, find_output_head, model_logits
from llm_neo.runtime.memory import GiB

log = logging.getLogger("llm_neo")

NF4_TEACHER_DRIFT = (
    "an nf4 teacher is a different teacher: measured on SmolLM2-135M-Instruct, 4-bit teachers drift by "
    "KL 0.3-0.7 per token from the fp32 teacher, with top-1 agreement 0.61-0.73 (int8: KL 0.005-0.007, "
    "agreement 0.97); the student will learn the quantized teacher's distribution. Use "
    "--teacher-quant int8 unless memory leaves no choice"
)

__all__ = [
    "NF4_TEACHER_DRIFT",
    "QLORA_VARIANTS",
    "STUDENT_QUANT",
    "TEACHER_BACKENDS",
    "TEACHER_QUANT",
    "block_linears",
    "check_qlora_variant",
    "check_trainable_base",
    "dequantized_weight",
    "describe_teacher_quant",
    "float32_compute",
    "is_quantized_linear",
    "load_quantized_base",
    "load_teacher",
    "merge_quantized",
    "parameter_count",
    "quantize_teacher",
    "reference_hidden_states",
    "require_package",
    "resolve_teacher_backend",
    "storage_tensors",
    "teacher_drift",
    "train_mode_without_dropout",
    "weight_bytes",
    "weight_storages",
]


# ----------------------------------------------------------------------------------------------------
# Optional packages


def require_package(package: str) -> Any:
    """Import ``package`` (torchao or bitsandbytes) or raise ModelError saying how to install it."""
    import importlib

    # Both print import-time notes about optional kernels they could not load (CUDA builds, the
    # `kernels` package); nothing a user of the CPU or CUDA path here can act on.
    names = ("torchao", "torchao.kernel.intmm", "bitsandbytes", "bitsandbytes.backends.cpu.ops")
    quiet = [logging.getLogger(name) for name in names]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.ERROR)
    try:
        return importlib.import_module(package)
    except ImportError as err:
        raise ModelError(
            f"quantization needs the {package!r} package, which is not installed ({err}); install the "
            "extra with: pip install 'llm-neo[quant]'"
        ) from err
    finally:
        for q, level in zip(quiet, levels, strict=True):
            q.setLevel(level)


def _is_torchao_tensor(t: Any) -> bool:
    return type(t).__module__.startswith("torchao.")


def _is_bnb_module(module: nn.Module, name: str) -> bool:
    return type(module).__module__.startswith("bitsandbytes.") and type(module).__name__ == name


def is_quantized_linear(module: nn.Module) -> bool:
    """True for a linear layer whose weight is stored quantized (bitsandbytes module, torchao tensor)."""
    if _is_bnb_module(module, "Linear4bit") or _is_bnb_module(module, "Linear8bitLt"):
        return True
    return isinstance(module, nn.Linear) and _is_torchao_tensor(module.weight)


# ----------------------------------------------------------------------------------------------------
# Bytes


def storage_tensors(t: torch.Tensor) -> Iterator[torch.Tensor]:
    """The plain tensors that hold ``t``'s bytes: a torchao tensor's components, a bitsandbytes
    parameter's packed data and its quantization state (absmax, code, nested statistics, scales)."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        for name in names:
            yield from storage_tensors(getattr(t, name))
        return
    yield t
    state = getattr(t, "quant_state", None)
    while state is not None:  # bitsandbytes QuantState, possibly nested (double quantization)
        for value in vars(state).values():
            if isinstance(value, torch.Tensor):
                yield value
        state = getattr(state, "state2", None)
    scales = getattr(t, "SCB", None)  # bitsandbytes Int8Params: one scale per row
    if isinstance(scales, torch.Tensor):
        yield scales


def weight_storages(*models: nn.Module) -> Iterator[torch.Tensor]:
    """The plain tensors that hold ``models``' parameters and buffers (``storage_tensors`` of each): what
    their weights occupy, quantized ones by their components, not the dense size a wrapper reads as."""
    for model in models:
        for tensor in [*model.parameters(), *model.buffers()]:
            yield from storage_tensors(tensor)


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by ``model``'s parameters and buffers, quantized storage included; each storage once
    (tied weights count once)."""
    seen: set[tuple[str, int]] = set()
    total = 0
    for part in weight_storages(model):
        if part.device.type == "meta":
            continue
        storage = part.untyped_storage()
        key = (str(part.device), storage.data_ptr())
        if key in seen:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


def parameter_count(model: nn.Module) -> int:
    """Parameters as the dense model counts them (tied ones once). A bitsandbytes 4-bit parameter's
    ``numel`` is its packed byte count (half the weights); its quantization state holds the real shape."""
    total = 0
    for param in model.parameters():
        state = getattr(param, "quant_state", None)
        shape = getattr(state, "shape", None)
        total += int(torch.Size(shape).numel()) if shape is not None else param.numel()
    return total


# ----------------------------------------------------------------------------------------------------
# The teacher


def block_linears(model: nn.Module) -> list[str]:
    """Module names of every ``nn.Linear`` inside the numbered decoder blocks, lm_head excluded: what
    ``quantize_teacher`` quantizes (the blocks hold ~85-95% of an LLM's weights)."""
    head = find_output_head(model)
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and module is not head
        and any(part.isdigit() for part in name.split(".")[:-1])
    ]


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def quantize_teacher(
    model: PreTrainedModel, kind: str, *, backend: str = "auto", role: str = "teacher"
) -> tuple[PreTrainedModel, dict[str, Any]]:
    """Quantize the frozen teacher's block linears in place; return it and what was done.

    Args:
        model: the teacher, loaded dense on its device (CPU or CUDA) in the compute dtype; frozen.
            Modified in place: its block ``nn.Linear`` weights become quantized (the modules stay
            ``nn.Linear`` for torchao, become bitsandbytes modules for ``backend="bitsandbytes"``).
        kind: ``"none"`` (nothing happens), ``"int8"`` (weight-only, one scale per output row) or
            ``"nf4"`` (4-bit NormalFloat, blocks of 64 with double-quantized scales; logs a warning of
            the measured drift, ``NF4_TEACHER_DRIFT``).
        backend: ``"auto"`` (int8: torchao, nf4: bitsandbytes), ``"torchao"`` (int8; CPU and CUDA) or
            ``"bitsandbytes"`` (int8: LLM.int8() on CUDA only; nf4: CPU needs bitsandbytes >= 0.50).
        role: what the model is, for the log; the nf4 drift warning is a teacher's only (``llm-neo
            bench`` quantizes a random student base in place with ``role="student"``).

    Returns:
        ``(model, info)``: the same model object, and ``{"kind", "backend", "quantized_linears",
        "weight_bytes_before", "weight_bytes_after"}`` for the run's summary.

    Raises:
        ModelError: unknown kind/backend, a combination this machine cannot run (bitsandbytes int8
        without CUDA), a missing package, or a model with no block linears.
    """
    if kind not in TEACHER_QUANT:
        raise ModelError(f"teacher quantization {kind!r} is not one of {', '.join(TEACHER_QUANT)}")
    if backend not in TEACHER_BACKENDS:
        raise ModelError(f"quantization backend {backend!r} is not one of {', '.join(TEACHER_BACKENDS)}")
    before = weight_bytes(model)
    if kind == "none":
        info = {"kind": "none", "backend": None, "quantized_linears": 0}
        return model, info | {"weight_bytes_before": before, "weight_bytes_after": before}
    backend = resolve_teacher_backend(kind, backend)
    if kind == "nf4" and backend != "bitsandbytes":
        raise ModelError("nf4 teacher quantization uses bitsandbytes; pass backend='bitsandbytes' (or auto)")
    device = _model_device(model)
    if kind == "int8" and backend == "bitsandbytes" and device.type != "cuda":
        raise ModelError(
            "bitsandbytes int8 (LLM.int8()) runs on CUDA only; on this device use the torchao int8 "
            "backend (the default), which is also closer to the fp32 teacher (KL 0.005-0.007 vs 0.037)"
        )
    targets = block_linears(model)
    if not targets:
        raise ModelError(
            f"{type(model).__name__} has no nn.Linear inside numbered decoder blocks to quantize"
        )

    if kind == "nf4" and role == "teacher":
        log.warning("teacher: %s", NF4_TEACHER_DRIFT)
    if backend == "torchao":
        require_package("torchao")
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        wanted = set(targets)
        quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda _m, fqn: fqn in wanted)
    else:
        _replace_with_bnb(model, targets, kind, device)
    model.requires_grad_(False)
    after = weight_bytes(model)
    log.info(
        "%s: %s (%s) on %d block linears: weights %.3g GiB -> %.3g GiB",
        role,
        kind,
        backend,
        len(targets),
        before / GiB,
        after / GiB,
    )
    info = {"kind": kind, "backend": backend, "quantized_linears": len(targets)}
    return model, info | {"weight_bytes_before": before, "weight_bytes_after": after}


def _replace_with_bnb(model: nn.Module, targets: list[str], kind: str, device: torch.device) -> None:
    bnb = require_package("bitsandbytes")
    for name in targets:
        old = model.get_submodule(name)
        assert isinstance(old, nn.Linear)
        bias = old.bias is not None
        new: nn.Module
        if kind == "nf4":
            new = bnb.nn.Linear4bit(
                old.in_features,
                old.out_features,
                bias=bias,
                compute_dtype=old.weight.dtype,
                compress_statistics=True,
                quant_type="nf4",
                device="meta",
            )
            new.weight = bnb.nn.Params4bit(
                old.weight.data.to("cpu"),
                requires_grad=False,
                compress_statistics=True,
                quant_type="nf4",
                module=new,
            )
        else:
            new = bnb.nn.Linear8bitLt(
                old.in_features, old.out_features, bias=bias, has_fp16_weights=False, device="meta"
            )
            new.weight = bnb.nn.Int8Params(
                old.weight.data.to("cpu"), requires_grad=False, has_fp16_weights=False
            )
        if bias:
            assert old.bias is not None
            new.bias = nn.Parameter(old.bias.data.clone(), requires_grad=False)
        new.to(device)  # moving a bitsandbytes parameter to its device is what quantizes it
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name), leaf, new)


def _drift_positions(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B, T] bool: the trained (shifted-label) positions when the batch has labels, else every real token."""
    if "labels" in batch:
        return next_token_targets(batch["labels"]) != IGNORE_INDEX
    return batch["attention_mask"].bool()


@torch.no_grad()
def reference_hidden_states(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[N, H] final hidden states of ``model`` at the drift positions of ``batch`` (see ``teacher_drift``).

    Take them from the unquantized teacher before ``quantize_teacher``: since the lm_head is never
    quantized, they are all ``teacher_drift`` needs of the reference, and no second teacher is held.
    """
    device = _model_device(model)
    positions = _drift_positions(batch).to(device)
    hidden = final_hidden_states(model, batch["input_ids"].to(device), batch["attention_mask"].to(device))
    return hidden[positions]


@torch.no_grad()
def teacher_drift(
    quantized: nn.Module,
    reference: nn.Module | torch.Tensor,
    batch: dict[str, torch.Tensor],
    *,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """How far the quantized teacher's next-token distribution is from the unquantized one's.

    Args:
        quantized: the quantized teacher.
        reference: the unquantized teacher, or its ``reference_hidden_states`` on this batch [N, H]
            (then the reference logits are ``quantized``'s own, unquantized lm_head on them).
        batch: ``input_ids``/``attention_mask`` [B, T] (+ ``labels``: then only the trained positions,
            as ``collate`` makes them; otherwise every real token).
        chunk_size: tokens per chunk of logits: no [N, V] tensor for the whole batch exists.

    Returns:
        ``kl_per_token`` (mean forward KL(p_reference ‖ p_quantized), nats), ``top1_agreement``
        (fraction of positions whose argmax agrees) and ``tokens`` (N).
    """
    device = _model_device(quantized)
    positions = _drift_positions(batch).to(device)
    input_ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    hidden = final_hidden_states(quantized, input_ids, mask)[positions]  # [N, H]
    if isinstance(reference, torch.Tensor):
        head = find_output_head(quantized)
        if head is None or is_quantized_linear(head) or _is_torchao_tensor(getattr(head, "weight", None)):
            raise ModelError(
                "teacher_drift from reference hidden states needs the quantized teacher's lm_head "
                "unquantized (quantize_teacher never quantizes it); pass the reference model instead"
            )
        ref_model: nn.Module = quantized
        ref_hidden = reference.to(device)
    else:
        ref_model = reference
        ref_device = _model_device(reference)
        ref_hidden = final_hidden_states(reference, input_ids.to(ref_device), mask.to(ref_device))[
            positions.to(ref_device)
        ].to(device)
    if ref_hidden.shape[0] != hidden.shape[0]:
        raise ModelError(
            f"reference hidden states have {ref_hidden.shape[0]} positions, the batch {hidden.shape[0]}: "
            "take them with reference_hidden_states on this same batch"
        )
    tokens = hidden.shape[0]
    if tokens == 0:
        raise ModelError("teacher_drift: the batch has no position to compare")
    kl_sum = agree = 0.0
    for start in range(0, tokens, chunk_size):
        q = model_logits(quantized, hidden[start : start + chunk_size]).float()  # [C, V]
        r = model_logits(ref_model, ref_hidden[start : start + chunk_size].to(_model_device(ref_model)))
        r = r.float().to(device)  # [C, V]
        agree += float((q.argmax(-1) == r.argmax(-1)).sum())
        kl_sum += float(forward_kl_inplace(q, r).sum())  # in place: two [C, V] tensors, no temporaries
    return {"kl_per_token": kl_sum / tokens, "top1_agreement": agree / tokens, "tokens": tokens}


def load_teacher(
    options: Any,
    path: str,
    *,
    dtype: torch.dtype,
    device: torch.device,
    drift_batch: dict[str, torch.Tensor] | None,
) -> tuple[PreTrainedModel, dict[str, Any] | None]:
    """The frozen teacher of a run, quantized as ``options.teacher_quant``/``teacher_quant_backend`` say
    (``config.TeacherQuantOptions``; loading as ``config.LoadOptions``): distill, compare's arms and
    cache-teacher load their teacher here.

    Args:
        drift_batch: a collated held-out batch [B, T] (``data.collate``): the reference hidden states
            are taken from the dense teacher on it before quantizing, and ``teacher_drift`` after, chunk
            by chunk of ``options.loss_chunk_size`` tokens (cache-teacher: ``chunk_size``), in place.

    Returns:
        ``(teacher, info)``: info is None for an unquantized teacher, else ``quantize_teacher``'s record
        plus ``drift`` (``teacher_drift``'s numbers) or ``drift_skipped`` (why it was not measured).

    The dense teacher is loaded first and quantized in place, before anything else of the run is
    built, so the run's later peak holds only the quantized one. On a GPU that cannot hold the dense
    teacher it is loaded quantized by transformers instead (the same quantized weights), and the drift
    is skipped: there is no dense teacher to compare with.
    """
    from llm_neo.models.loading import freeze, is_gguf, load_config, load_frozen

    kind, backend = options.teacher_quant, options.teacher_quant_backend
    if kind == "none":
        return load_frozen(options, path, role="teacher", dtype=dtype, device=device), None
    backend = resolve_teacher_backend(kind, backend)
    dense = dense_weight_bytes(load_config(path, role="teacher"), dtype)
    free = _free_bytes(device)
    if free is not None and dense > free and not is_gguf(path):
        why = (
            f"the dense teacher ({dense / GiB:.2f} GiB) does not fit in the {free / GiB:.2f} GiB free on "
            f"{device}: loaded quantized, so there is no unquantized teacher to compare with"
        )
        log.warning("teacher drift not measured: %s", why)
        teacher = _load_quantized(
            path,
            kind,
            backend,
            role="teacher",
            dtype=dtype,
            device=device,
            trust_remote_code=bool(getattr(options, "trust_remote_code", False)),
            allow_pickle_weights=bool(getattr(options, "allow_pickle_weights", False)),
        )
        return freeze(teacher), {**_quant_record(teacher, kind, backend, dense), "drift_skipped": why}
    teacher = load_frozen(options, path, role="teacher", dtype=dtype, device=device)
    reference = reference_hidden_states(teacher, drift_batch) if drift_batch is not None else None
    teacher, info = quantize_teacher(teacher, kind, backend=backend)
    if reference is None:
        return teacher, {**info, "drift_skipped": "no batch to measure it on"}
    chunk = int(getattr(options, "loss_chunk_size", getattr(options, "chunk_size", 1024)))
    drift = teacher_drift(teacher, reference, drift_batch, chunk_size=chunk)  # type: ignore[arg-type]
    log.info(
        "teacher drift (%s vs unquantized, %d held-out tokens): KL %.3g per token, top-1 agreement %.3f",
        kind,
        drift["tokens"],
        drift["kl_per_token"],
        drift["top1_agreement"],
    )
    return teacher, {**info, "drift": drift}


def describe_teacher_quant(info: dict[str, Any] | None) -> str | None:
    """One line on a quantized teacher (``load_teacher``'s record) for a command's output; None if not
    quantized."""
    if info is None:
        return None
    head = f"{info['kind']} teacher ({info['backend']})"
    if "drift" not in info:
        return f"{head}: drift not measured ({info.get('drift_skipped', 'unknown reason')})"
    drift = info["drift"]
    return (
        f"{head}: KL {drift['kl_per_token']:.3g} per token to its unquantized self, top-1 agreement "
        f"{drift['top1_agreement']:.3f} ({drift['tokens']} tokens)"
    )


def resolve_teacher_backend(kind: str, backend: str) -> str:
    """The backend ``auto`` stands for: torchao for int8, bitsandbytes for nf4 (a QLoRA base's too)."""
    if backend != "auto":
        return backend
    return "torchao" if kind == "int8" else "bitsandbytes"


def dense_weight_bytes(hf_config: Any, dtype: torch.dtype) -> int:
    """Bytes of a model's weights at ``dtype``, from its config alone (a meta-device skeleton)."""
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(hf_config)
    return parameter_count(skeleton) * torch.empty((), dtype=dtype).element_size()


def _free_bytes(device: torch.device) -> int | None:
    """Free accelerator memory; None on a CPU (host memory is not what runs out first there)."""
    if device.type != "cuda":
        return None
    return int(torch.cuda.mem_get_info(device)[0])


def _quantization_config(kind: str, backend: str, dtype: torch.dtype) -> Any:
    """transformers' quantization config that loads block linears as ``quantize_teacher`` and QLoRA
    store them: bitsandbytes nf4 with double quantization, torchao int8 weight-only, or LLM.int8()."""
    from transformers import BitsAndBytesConfig, TorchAoConfig

    if kind == "nf4":
        require_package("bitsandbytes")
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    if backend == "bitsandbytes":
        require_package("bitsandbytes")
        return BitsAndBytesConfig(load_in_8bit=True)
    require_package("torchao")
    from torchao.quantization import Int8WeightOnlyConfig

    return TorchAoConfig(Int8WeightOnlyConfig())


def _load_quantized(
    path: str,
    kind: str,
    backend: str,
    *,
    role: str,
    dtype: torch.dtype,
    device: torch.device,
    trust_remote_code: bool = False,
    allow_pickle_weights: bool = False,
) -> PreTrainedModel:
    """``path`` loaded by transformers with its block linears quantized (``_quantization_config``): a
    teacher too large to load dense first, or a QLoRA student base."""
    try:
        return AutoModelForCausalLM.from_pretrained(
            path,
            dtype=dtype,
            quantization_config=_quantization_config(kind, backend, dtype),
            device_map={"": device},
            use_safetensors=not allow_pickle_weights,
            trust_remote_code=trust_remote_code,
        )
    except Exception as err:
        raise ModelError(
            f"could not load the {role} from {path!r} quantized to {kind} ({backend}): {err}"
        ) from err


def _quant_record(model: nn.Module, kind: str, backend: str, dense_bytes: int) -> dict[str, Any]:
    return {
        "kind": kind,
        "backend": backend,
        "quantized_linears": sum(1 for _ in _quantized_linears(model)),
        "weight_bytes_before": dense_bytes,
        "weight_bytes_after": weight_bytes(model),
    }


# ----------------------------------------------------------------------------------------------------
# The QLoRA student base


def load_quantized_base(
    path: str,
    kind: str,
    *,
    dtype: torch.dtype,
    device: torch.device,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """Load the student from ``path`` (safetensors) with its block linears quantized, ready for LoRA.

    Args:
        kind: ``"nf4"`` (bitsandbytes 4-bit NormalFloat, double-quantized absmax: QLoRA's layout; on a
            CPU it needs bitsandbytes >= 0.50) or ``"int8"`` (torchao weight-only, one scale per row).
            Embeddings, norms and the lm_head stay in ``dtype``.
        dtype: the compute dtype (the dtype the non-quantized weights load in and the quantized ones
            dequantize to).
        device: where the model lives.

    Returns:
        The model, frozen nowhere (``attach_lora`` freezes), checked by ``check_trainable_base``.
        Loading is deterministic: the same path and kind give bit-identical quantized weights, which is
        what ``merge_quantized`` relies on.

    Raises:
        ModelError: unknown kind, missing package, unreadable checkpoint, or a base that cannot train
        (activation-quantized: the checkpoint at ``path`` may carry its own quantization config).
    """
    if kind not in STUDENT_QUANT or kind == "none":
        raise ModelError(f"student quantization {kind!r}: choose nf4 or int8 (none loads the plain student)")
    model = _load_quantized(
        path,
        kind,
        resolve_teacher_backend(kind, "auto"),
        role="student",
        dtype=dtype,
        device=device,
        trust_remote_code=trust_remote_code,
    )
    check_trainable_base(model)
    return model


def check_qlora_variant(variant: str) -> None:
    """Raise ModelError unless LoRA ``variant`` can be merged exactly onto a quantized base."""
    if variant in QLORA_VARIANTS:
        return
    why = {
        "dora": "DoRA rescales each column by the norm of W + ΔW, which PEFT computes from the quantized "
        "weight in ways llm-neo does not reproduce exactly",
        "pissa": "PiSSA rewrites the base weights at init (W - B0·A0); a fresh quantized base does not "
        "hold that residual, so the merge could not be exact",
    }.get(variant, "it is not one of llm-neo's LoRA variants")
    raise ModelError(
        f"--lora.variant {variant} with a quantized student base: {why}. Use one of "
        f"{', '.join(QLORA_VARIANTS)}, or --student-quant none"
    )


def _activation_quantization(weight: Any) -> str | None:
    """What quantizes the inputs of a linear with this (torchao) weight, or None for weight-only."""
    for attr in ("act_quant_kwargs", "activation_quantization", "input_quant_func", "act_pre_scale"):
        value = getattr(weight, attr, None)
        if value is not None:
            return f"{type(weight).__name__}.{attr}={value!r}"
    inner = getattr(weight, "original_weight_tensor", None)  # torchao's LinearActivationQuantizedTensor
    if inner is not None:
        return f"{type(weight).__name__} (activations quantized before the matmul)"
    return None


_REPACKED = (
    "this bitsandbytes 4-bit weight has run an eval-mode forward on a CPU and was repacked in place for "
    "bitsandbytes' CPU kernel; dequantize_4bit (and save_pretrained) would return corrupted weights. "
    "Dequantize a freshly loaded base that has only run train-mode forwards"
)


def _repacked(module: nn.Module) -> bool:
    """A bitsandbytes 4-bit weight repacked in place by an eval-mode CPU forward (AVX512-BF16 CPUs)."""
    state = getattr(module.weight, "quant_state", None)
    return bool(getattr(state, "packing_format_for_cpu", False))


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The weight [out, in] a quantized linear computes with in a training forward, dense.

    Always fp32, the values an fp32 forward multiplies with (a bf16 forward's are their bf16 rounding).
    bitsandbytes 4-bit: ``dequantize_4bit`` of the packed data, code·absmax in fp32 (equal to the 4-bit
    gemm's output bit for bit in an fp32 forward, tested). torchao: ``dequantize(float32)``, i.e. q·s
    (int8 weight-only computes ``(x·q^T)·s``, equal to ``x·(q·s)^T`` up to fp32 rounding). A plain
    linear: its weight.

    Raises:
        ModelError: a bitsandbytes 4-bit weight that was repacked in place for the CPU kernel (it has
        run an eval-mode forward): dequantizing it returns garbage. Load a fresh base instead.
    """
    weight = module.weight
    if _is_bnb_module(module, "Linear4bit"):
        bnb = require_package("bitsandbytes")
        if _repacked(module):
            raise ModelError(_REPACKED)
        # In fp32: bitsandbytes' 4-bit gemm multiplies by code·absmax in the input's dtype, so fp32 values
        # are what an fp32 forward computes with, and a bf16 forward's weight is their bf16 rounding.
        # (dequantize_4bit in the quantized-from dtype would round first.)
        state = copy.copy(weight.quant_state)  # type: ignore[union-attr]
        state.dtype = torch.float32
        return bnb.functional.dequantize_4bit(weight.data, state)
    if _is_bnb_module(module, "Linear8bitLt"):
        bnb = require_package("bitsandbytes")
        return bnb.functional.int8_vectorwise_dequant(weight.data, weight.SCB)  # type: ignore[union-attr]
    if _is_torchao_tensor(weight):
        # In fp32 whatever the tensor's nominal dtype: q·s, what (x·q^T)·s computes at fp32.
        return weight.dequantize(torch.float32)  # type: ignore[call-arg, operator]
    assert isinstance(weight, torch.Tensor)
    return weight


def _quantized_linears(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if is_quantized_linear(module) and not _is_lora_wrapper(module):
            yield name, module


def _is_lora_wrapper(module: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    return isinstance(module, LoraLayer)


def check_trainable_base(model: nn.Module) -> int:
    """Raise ModelError unless gradients pass through every quantized linear of ``model`` exactly.

    Two checks: the type (bitsandbytes ``Linear4bit``, torchao weight-only tensors; anything that
    quantizes activations is refused with the attribute that does it), and a probe: for each quantized
    linear, the gradient with respect to a random input must equal ``v·W`` with W its dequantized weight
    (relative error below 1e-2), which catches any layer that cuts or bends the graph whatever its type.
    Returns how many quantized linears were checked.
    """
    checked = 0
    problems: list[str] = []
    for name, module in _quantized_linears(model):
        checked += 1
        if _is_bnb_module(module, "Linear8bitLt"):
            problems.append(f"{name}: bitsandbytes int8 (LLM.int8()) is not a supported student base")
            continue
        if _is_torchao_tensor(module.weight):
            act = _activation_quantization(module.weight)
            if act is not None:
                problems.append(
                    f"{name}: its activations are quantized ({act}); rounding the inputs has no gradient, "
                    "so every layer below would train on a wrong, mostly zero gradient. Use a "
                    "weight-only base (--student-quant int8 is torchao Int8WeightOnlyConfig)"
                )
                continue
        problem = _gradient_probe(name, module)
        if problem:
            problems.append(problem)
        if len(problems) >= 3:
            break
    if problems:
        raise ModelError("the quantized student base cannot be trained with LoRA: " + "; ".join(problems))
    return checked


def _gradient_probe(name: str, module: nn.Module) -> str | None:
    weight = dequantized_weight(module)  # [out, in]
    out_features, in_features = weight.shape
    dtype = getattr(module, "compute_dtype", None) or weight.dtype
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, in_features, generator=generator).to(weight.device, dtype).requires_grad_(True)
    v = torch.randn(2, out_features, generator=generator).to(weight.device, dtype)
    with torch.enable_grad():
        y = module(x)
        grad = torch.autograd.grad((y * v).sum(), x, allow_unused=True)[0] if y.requires_grad else None
    if grad is None:
        return f"{name}: no gradient reaches its input (the graph is cut)"
    expected = v.float() @ weight.float()  # [2, in]
    error = float((grad.float() - expected).norm() / expected.norm().clamp_min(1e-12))
    if not error < 1e-2:
        return (
            f"{name}: the gradient through it differs from the dequantized weight's "
            f"(relative error {error:.3g})"
        )
    return None


def float32_compute(model: nn.Module) -> nn.Module:
    """Make a model on a quantized base compute in fp32 (in place), as the merge check wants: every
    floating-point parameter and buffer to fp32 (``Module.float``), and each bitsandbytes 4-bit layer's
    compute dtype to fp32 (its dequantized weight keeps its exact values). torchao int8 layers already
    compute in their input's dtype. Returns ``model``."""
    nn.Module.float(model)  # transformers' own .float() refuses quantized models
    for module in model.modules():
        if _is_bnb_module(module, "Linear4bit"):
            setattr(module, "compute_dtype", torch.float32)  # noqa: B010  (bitsandbytes attribute)
    return model


@contextlib.contextmanager
def train_mode_without_dropout(model: nn.Module) -> Iterator[nn.Module]:
    """Train mode with every dropout (``nn.Dropout`` p and attention dropout) at 0, restored afterwards.

    The forward to compare an adapter on a quantized base with its merge: deterministic like eval mode,
    but on the training code path (bitsandbytes repacks and computes differently in eval mode on a CPU).
    """
    training = {m: m.training for m in model.modules()}
    dropouts = {d: d.p for d in model.modules() if isinstance(d, nn.Dropout)}
    attention = {
        a: float(getattr(a, "attention_dropout"))  # noqa: B009  (an attribute only some modules have)
        for a in model.modules()
        if isinstance(getattr(a, "attention_dropout", None), float)
    }
    try:
        model.train()
        for d in dropouts:
            d.p = 0.0
        for a in attention:
            setattr(a, "attention_dropout", 0.0)  # noqa: B010
        yield model
    finally:
        for d, p in dropouts.items():
            d.p = p
        for a, p in attention.items():
            setattr(a, "attention_dropout", p)  # noqa: B010
        for m, flag in training.items():
            m.training = flag


# ----------------------------------------------------------------------------------------------------
# The exact merge

_PEFT_PREFIX = "base_model.model."


def _lora_deltas(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    """``{module name in the plain model: ΔW = s·B·A [out, in] in fp32}`` for every LoRA layer."""
    from peft.tuners.lora import LoraLayer

    from llm_neo.models.lora import ADAPTER_NAME, MixedLoraA

    deltas: dict[str, torch.Tensor] = {}
    for name, layer in peft_model.named_modules():
        if not isinstance(layer, LoraLayer) or ADAPTER_NAME not in layer.lora_A:
            continue
        lora_a, lora_b = layer.lora_A[ADAPTER_NAME], layer.lora_B[ADAPTER_NAME]
        if not isinstance(lora_a, nn.Linear) or not isinstance(lora_b, nn.Linear):
            raise ModelError(f"{name}: only linear LoRA layers can be merged onto a quantized base")
        with torch.no_grad():
            a = lora_a.folded_weight() if isinstance(lora_a, MixedLoraA) else lora_a.weight  # [r, in]
            delta = (lora_b.weight.float() @ a.float()) * float(layer.scaling[ADAPTER_NAME])  # [out, in]
        if getattr(layer, "fan_in_fan_out", False):
            delta = delta.T
        deltas[name.removeprefix(_PEFT_PREFIX)] = delta.detach()
    return deltas


def _check_mergeable(peft_model: nn.Module) -> None:
    from peft import LoraConfig, PeftModel

    from llm_neo.models.lora import ADAPTER_NAME

    if not isinstance(peft_model, PeftModel):
        raise ModelError(
            f"merge_quantized expects the PeftModel from attach_lora, got {type(peft_model).__name__}"
        )
    config = peft_model.peft_config.get(ADAPTER_NAME)
    if not isinstance(config, LoraConfig) or len(peft_model.peft_config) != 1:
        raise ModelError("merge_quantized merges exactly one LoRA adapter named 'default'")
    if config.use_dora:
        check_qlora_variant("dora")
    init = config.init_lora_weights
    if isinstance(init, str) and init.lower().startswith(("pissa", "olora", "corda", "eva", "loftq")):
        check_qlora_variant("pissa" if init.lower().startswith("pissa") else str(init))
    if getattr(config, "lora_bias", False):
        raise ModelError("merge_quantized: lora_bias adapters are not supported")
    if any(getattr(m, "merged", False) for m in peft_model.modules() if _is_lora_wrapper(m)):
        raise ModelError(
            "the adapter is already merged into its (quantized) base; merge a fresh adapter model"
        )


def _same_quantized_weights(trained: nn.Module, fresh: nn.Module) -> bool | None:
    """Whether two quantized linears hold bit-identical weights; None when the trained one cannot be
    compared without touching it (bitsandbytes repacked it in place)."""
    if _repacked(trained):
        return None
    tw, fw = trained.weight, fresh.weight
    assert isinstance(tw, torch.Tensor) and isinstance(fw, torch.Tensor)
    parts_t, parts_f = list(storage_tensors(tw)), list(storage_tensors(fw))
    return len(parts_t) == len(parts_f) and all(
        a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu())
        for a, b in zip(parts_t, parts_f, strict=True)
    )


def merge_quantized(
    peft_model: nn.Module,
    load_base: Callable[[], PreTrainedModel],
    *,
    dtype: torch.dtype,
) -> PreTrainedModel:
    """The dense student that computes what the adapter on its quantized base computes.

    Args:
        peft_model: the trained PeftModel (``attach_lora`` on ``load_quantized_base``); only read:
            its LoRA weights and, to prove the fresh base is the trained one, its quantized weights.
            It is never dequantized, so an eval-mode forward it ran (bitsandbytes' CPU repack) does not
            matter.
        load_base: loads a fresh copy of the same quantized base, e.g.
            ``functools.partial(load_quantized_base, path, kind, dtype=..., device=...)``.
        dtype: the dtype of the returned model (the student's published dtype; fp32 to measure the
            merge itself before casting).

    Returns:
        A plain model of the student's class (no quantization config, no PEFT wrappers, the student's
        parameter count): every quantized linear of the fresh base dequantized as the training forward
        dequantizes it, plus ΔW = s·B·A (MoSLoRA: M folded into A), summed in fp32, then cast to
        ``dtype``. Equal to the adapter model in train-mode forwards up to fp32 rounding.

    Raises:
        ModelError: DoRA/PiSSA/other adapters that cannot be merged exactly, a fresh base that is not
        quantized or holds other quantized weights than the trained one, or a fresh base that has
        already been repacked by an eval forward.
    """
    _check_mergeable(peft_model)
    deltas = _lora_deltas(peft_model)
    fresh = load_base()
    quantized = dict(_quantized_linears(fresh))
    if not quantized:
        raise ModelError(
            "load_base returned a model without quantized linears; merge a dense base with merge_lora"
        )
    trained_root: nn.Module = peft_model.get_base_model()  # type: ignore[operator]
    unverified = 0
    for name, module in quantized.items():
        if _repacked(module):
            raise ModelError(f"the fresh base's {name}: {_REPACKED}")
        trained = trained_root.get_submodule(name)
        if _is_lora_wrapper(trained):
            trained = trained.get_base_layer()  # type: ignore[operator]
        same = _same_quantized_weights(trained, module)
        if same is None:
            unverified += 1
        elif not same:
            raise ModelError(
                f"{name}: the freshly loaded base holds other quantized weights than the base the adapter "
                "was trained on; load_base must load the same checkpoint with the same quantization"
            )
    if unverified:
        log.info("merge: %d trained layers were repacked by an eval forward and not compared", unverified)
    missing = sorted(set(deltas) - {n for n, _ in fresh.named_modules()})
    if missing:
        raise ModelError(f"LoRA layers {missing[:3]} have no counterpart in the fresh base")

    config_dict = fresh.config.to_dict()
    for key in ("quantization_config", "_pre_quantization_dtype"):
        config_dict.pop(key, None)
    dense_config = type(fresh.config).from_dict(config_dict)
    with torch.device("meta"):
        dense = AutoModelForCausalLM.from_config(dense_config, dtype=torch.float32)
    device = _model_device(fresh)
    state: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for key in dense.state_dict():
            module_name, _, attr = key.rpartition(".")
            source = fresh.get_submodule(module_name)
            if attr == "weight" and module_name in quantized:
                tensor = dequantized_weight(source).float()
            else:
                tensor = getattr(source, attr).detach().float()
            if attr == "weight" and module_name in deltas:
                tensor = tensor + deltas[module_name].to(tensor.device)
            state[key] = tensor.to(device, dtype).contiguous()
    dense.load_state_dict(state, strict=True, assign=True)
    # Non-persistent buffers (rotary inv_freq) are not in the state dict: take the fresh base's.
    for name, buffer in list(dense.named_buffers()):
        if buffer.is_meta:
            module_name, _, attr = name.rpartition(".")
            real = fresh.get_buffer(name)
            dense.get_submodule(module_name).register_buffer(attr, real.clone(), persistent=False)
    dense.tie_weights()
    dense.requires_grad_(False)
    del fresh
    return dense.eval()
