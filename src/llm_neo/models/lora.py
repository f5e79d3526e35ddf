"""LoRA branches for the student: attach, train, save, merge.

LLM-Neo trains only a low-rank update ``ΔW = (α/r)·B·A`` on every linear layer of every block of the
student, on CE + KD, and then folds ΔW into the base weights so that the deployed student has its
original architecture and parameter count. Everything PEFT can do is done by PEFT (and keeps PEFT's
vocabulary: ``r``, ``lora_alpha``, ``lora_dropout``, ``target_modules``); this module adds

* the variant switch (``choices.LORA_VARIANTS``) and boundary validation with actionable messages;
* MoSLoRA (arXiv 2406.11909), which PEFT lacks: a learnable r×r mixer ``M`` between A and B,
  ``ΔW = (α/r)·B·M·A``, implemented as a drop-in replacement of PEFT's ``lora_A`` module;
* adapter saving that never touches the live training model and always yields a standard PEFT
  adapter that applies to the *original* student weights (MoSLoRA folded, PiSSA converted);
* PEFT's plain LoRA forward with the branch added into the base layer's output in place
  (``_forward_adding_in_place``): the same values, two fewer output-sized tensors per layer.

Only one adapter (PEFT's ``"default"``) is ever used.
"""

from __future__ import annotations

import contextlib
import copy
import math
import types
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from llm_neo.choices import LORA_VARIANTS
from llm_neo.errors import ModelError
from llm_neo.losses.objective import softcap
from llm_neo.models.anatomy import (
    available_linear_leaves,
    default_target_modules,
    final_hidden_states,
    linear_modules,
    logit_softcap,
    output_head,
)

ADAPTER_NAME = "default"  # PEFT's default adapter name; llm-neo uses exactly one adapter.
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"  # what PeftModel.from_pretrained looks for

# Attribute on the PeftModel holding PiSSA's initial (A0, B0) adapter tensors, keyed like
# get_peft_model_state_dict. PiSSA rewrites the base weights at init (W_res = W - (α/r)·B0·A0), so an
# adapter that should apply to the original W must carry -B0·A0 too; see save_adapter.
_PISSA_INIT_ATTR = "_llm_neo_pissa_init"

__all__ = [
    "MixedLoraA",
    "attach_lora",
    "merge_lora",
    "merge_verified",
    "save_adapter",
    "trainable_parameters",
]


class MixedLoraA(nn.Linear):
    """MoSLoRA's ``lora_A``: ``x ↦ M·(A·x)`` with A = ``weight`` [r, in] and the mixer M = ``mixer`` [r, r].

    A subclass of ``nn.Linear`` so that PEFT's ``lora.Linear.forward``, which computes
    ``lora_B(lora_A(dropout(x))) * scaling`` and reads ``lora_A.weight.dtype``, works unchanged. PEFT's own
    ``get_delta_weight`` (used by ``merge_adapter`` / ``merge_and_unload``) reads ``lora_A.weight`` only and
    would ignore M, so call :func:`merge_lora`, which folds the mixer first, never PEFT's merge directly.
    """

    def __init__(self, weight: nn.Parameter, mixer: nn.Parameter) -> None:
        r, in_features = weight.shape
        if tuple(mixer.shape) != (r, r):
            raise ValueError(f"mixer must be [{r}, {r}] for lora_A of shape {tuple(weight.shape)}")
        # Build on the meta device: the real A is the existing PEFT parameter, reused as is (same object,
        # so its init, dtype, device and any optimizer state stay valid).
        super().__init__(in_features, r, bias=False, device="meta")
        self.weight = weight
        self.mixer = mixer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [..., in] -> [..., r] -> [..., r]
        return F.linear(F.linear(x, self.weight), self.mixer)

    def folded_weight(self) -> torch.Tensor:
        """``M·A`` [r, in] (detached): the plain-LoRA A that gives the same ΔW with the same B."""
        with torch.no_grad():
            return (self.mixer @ self.weight).detach()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mixer={tuple(self.mixer.shape)}"


def _fan_in_fan_out(model: nn.Module, target_modules: list[str]) -> bool:
    """True when the targeted layers are Conv1D (weights [in, out]); ModelError when Linear and Conv1D
    are mixed, since PEFT's fan_in_fan_out is one flag for the whole adapter."""
    kinds = {
        type(module) is Conv1D
        for name, module in linear_modules(model)
        if any(name == t or name.endswith("." + t) for t in target_modules)
    }
    if len(kinds) > 1:
        raise ModelError(
            f"attach_lora: target_modules {target_modules} mix nn.Linear and Conv1D layers in "
            f"{type(model).__name__}; PEFT adapts one kind per adapter: target one kind only"
        )
    return kinds == {True}


def _lora_config(
    variant: str,
    *,
    r: int,
    lora_alpha: float,
    lora_dropout: float,
    target_modules: list[str],
    fan_in_fan_out: bool = False,
) -> LoraConfig:
    return LoraConfig(
        r=r,
        lora_alpha=lora_alpha,  # type: ignore[arg-type]  # annotated int in PEFT; any real α works
        lora_dropout=lora_dropout,
        target_modules=list(target_modules),  # a copy: never hand the caller's list to PEFT
        bias="none",
        fan_in_fan_out=fan_in_fan_out,  # Conv1D stores W as [in, out]: B·A must be transposed to merge
        task_type="CAUSAL_LM",
        use_dora=variant == "dora",
        use_rslora=variant == "rslora",
        init_lora_weights="pissa" if variant == "pissa" else True,
    )


def attach_lora(
    model: PreTrainedModel,
    *,
    r: int,
    lora_alpha: float | None = None,
    lora_dropout: float = 0.0,
    target_modules: list[str] | None = None,
    variant: str = "lora",
    seed: int = 0,
) -> PeftModel:
    """Wrap ``model`` with trainable LoRA branches; everything else is frozen.

    Args:
        model: the student. PEFT wraps it **in place** (its linear layers are replaced by LoRA layers and,
            for ``"pissa"``, its targeted base weights are overwritten with the residual W - (α/r)·B0·A0);
            keep a separate copy if the original is still needed. Nothing else passed in is mutated.
        r: rank, >= 1.
        lora_alpha: α; defaults to 2·r (LLM-Neo). Scaling is α/r, or α/√r for ``"rslora"``.
        lora_dropout: dropout on the LoRA branch input, in [0, 1).
        target_modules: leaf names of the linear layers to adapt; defaults to
            :func:`default_target_modules` (every linear in every block).
        variant: one of ``LORA_VARIANTS``: ``"lora"`` plain; ``"dora"`` (PEFT use_dora, adds a trainable
            magnitude vector per layer); ``"rslora"`` (PEFT use_rslora); ``"pissa"`` (PEFT
            init_lora_weights="pissa", principal-SVD init, base weights become residuals); ``"moslora"``
            (plain LoRA plus a trainable r×r mixer between A and B, orthogonally initialised).
        seed: seeds the random adapter init (A's Kaiming init, MoSLoRA mixers) without touching the global
            RNG state, so the same call gives the same adapter.

    Returns:
        The PeftModel. Its trainable parameters are exactly the LoRA parameters (lora_A/lora_B, DoRA
        magnitudes, MoSLoRA mixers), all in fp32 even when the base is bf16/fp16 (PEFT's
        autocast_adapter_dtype); at init ΔW = 0 for every variant except that PiSSA's ΔW is relative to
        the residual base, so the wrapped model's outputs equal the original ones up to rounding.

    Raises:
        ValueError: listing every problem at once: unknown variant, r < 1, dropout out of range, target
            names absent from the model, or a model that is already a PeftModel.
    """
    problems: list[str] = []
    if isinstance(model, PeftModel):
        problems.append("model is already a PeftModel; attach_lora expects the plain student")
    if variant not in LORA_VARIANTS:
        problems.append(f"unknown variant {variant!r}; choose one of {', '.join(LORA_VARIANTS)}")
    if not isinstance(r, int) or r < 1:
        problems.append(f"r must be an integer >= 1, got {r!r}")
    if not 0.0 <= lora_dropout < 1.0:
        problems.append(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
    if lora_alpha is not None and lora_alpha <= 0:
        problems.append(f"lora_alpha must be > 0, got {lora_alpha!r}")
    if target_modules is not None:
        linear_names = [name for name, _ in linear_modules(model)]
        missing = [t for t in target_modules if not any(n == t or n.endswith("." + t) for n in linear_names)]
        if not target_modules:
            problems.append("target_modules is empty; pass None for every linear layer in the blocks")
        if missing:
            problems.append(
                f"target_modules {missing} match no nn.Linear or Conv1D in {type(model).__name__}; "
                f"available linear layers: {available_linear_leaves(model)}"
            )
    if problems:
        raise ModelError("attach_lora: " + "; ".join(problems))

    targets = list(target_modules) if target_modules is not None else default_target_modules(model)
    alpha = float(lora_alpha) if lora_alpha is not None else 2.0 * r
    config = _lora_config(
        variant,
        r=r,
        lora_alpha=alpha,
        lora_dropout=lora_dropout,
        target_modules=targets,
        fan_in_fan_out=_fan_in_fan_out(model, targets),
    )

    # Seed only the adapter init; fork the RNGs of every device the model lives on so the caller's RNG
    # stream is left exactly where it was.
    cuda_devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config, adapter_name=ADAPTER_NAME)
    assert isinstance(peft_model, PeftModel)

    if variant == "moslora":
        _add_mixers(peft_model, seed)
    if variant == "pissa":
        # The initial adapter, copied off the live tensors (on CPU: it is only read when saving).
        init = get_peft_model_state_dict(peft_model, adapter_name=ADAPTER_NAME, save_embedding_layers=False)
        setattr(peft_model, _PISSA_INIT_ATTR, {k: v.detach().to("cpu", copy=True) for k, v in init.items()})

    # PEFT already froze the base; re-assert it so the contract holds whatever PEFT's defaults become.
    for name, param in peft_model.named_parameters():
        param.requires_grad_(_is_adapter_parameter(name))
    for _, layer in _lora_layers(peft_model):
        if isinstance(layer, LoraLinear) and _adds_in_place(layer):
            layer.forward = types.MethodType(_forward_adding_in_place, layer)  # type: ignore[method-assign]
    return peft_model


def _adds_in_place(layer: LoraLayer) -> bool:
    """Whether ``layer``'s branch may be added into its base layer's output in place: PEFT's plain
    ``Linear`` over a plain ``nn.Linear`` with dense weights (a quantized base's own kernels or a
    variant's forward may keep their output, so those keep PEFT's forward)."""
    base = getattr(layer, "base_layer", None)
    return (
        type(layer) is LoraLinear
        and type(base) is nn.Linear
        and type(base.weight.data) is torch.Tensor
        and ADAPTER_NAME not in layer.lora_variant
    )


def _forward_adding_in_place(self: LoraLinear, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """PEFT's plain LoRA forward, ``base(x) + B(A(dropout(x))) * scaling``, with the branch scaled and
    added in place: into the branch's own output, then into the base layer's (neither is saved for the
    backward of a linear layer, so autograd allows it). The values are PEFT's to the bit.

    Why: PEFT's out-of-place form allocates two more tensors of the output's size per layer and frees
    two. On a CPU, blocks of a few MiB come from glibc's heap, and the freed ones stay there as holes
    between the activations kept for the backward; on the SmolLM2 shape (llm-neo bench, batch 4 × 256)
    that was about 0.3 GiB of a 3.0 GiB Neo step peak. Anything off the plain path (merged or disabled
    adapters, another adapter, per-call ``adapter_names``, extra arguments, dtypes PEFT would cast)
    goes through PEFT's own forward.
    """
    if (
        args
        or kwargs
        or ADAPTER_NAME not in self.lora_B
        or self.disable_adapters
        or self.merged
        or list(self.active_adapters) != [ADAPTER_NAME]
        or not x.dtype == self.lora_B[ADAPTER_NAME].weight.dtype == self.base_layer.weight.dtype
    ):
        return LoraLinear.forward(self, x, *args, **kwargs)
    result = self.base_layer(x)
    branch = self.lora_B[ADAPTER_NAME](self.lora_A[ADAPTER_NAME](self.lora_dropout[ADAPTER_NAME](x)))
    return result.add_(branch.mul_(self.scaling[ADAPTER_NAME]))


def _is_adapter_parameter(name: str) -> bool:
    return ".lora_" in name  # lora_A/lora_B (incl. MoSLoRA mixers under lora_A), lora_magnitude_vector


def _lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER_NAME in module.lora_A:
            yield name, module


def _add_mixers(model: PeftModel, seed: int) -> None:
    # A CPU generator makes the mixers identical whatever device the model is on.
    generator = torch.Generator().manual_seed(seed)
    for _, layer in _lora_layers(model):
        lora_a = layer.lora_A[ADAPTER_NAME]
        weight = getattr(lora_a, "weight", None)
        if not isinstance(lora_a, nn.Linear) or not isinstance(weight, nn.Parameter):
            raise TypeError(f"MoSLoRA needs nn.Linear lora_A modules, got {type(lora_a).__name__}")
        r = weight.shape[0]
        mixer = torch.empty(r, r, dtype=torch.float32)
        # Orthogonal M keeps A's row space and scale (M·A has the same singular values as A); B = 0 still
        # gives ΔW = 0 at init.
        nn.init.orthogonal_(mixer, generator=generator)
        mixer_param = nn.Parameter(mixer.to(device=weight.device, dtype=weight.dtype), requires_grad=True)
        layer.lora_A[ADAPTER_NAME] = MixedLoraA(weight, mixer_param)


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """``name -> parameter`` for every parameter with ``requires_grad``, in ``named_parameters`` order.

    For a model from :func:`attach_lora` these are exactly the LoRA parameters; the dict is what the
    optimizer gets and what checkpoints store.
    """
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _fold_mixers(model: PeftModel) -> None:
    # Replace every MixedLoraA by a plain nn.Linear holding A' = M·A: exact, and afterwards PEFT sees a
    # standard LoRA model, so its merge is exact too.
    for _, layer in _lora_layers(model):
        lora_a = layer.lora_A[ADAPTER_NAME]
        if isinstance(lora_a, MixedLoraA):
            folded = lora_a.folded_weight()
            plain = nn.Linear(lora_a.in_features, lora_a.out_features, bias=False, device="meta")
            plain.weight = nn.Parameter(folded, requires_grad=lora_a.weight.requires_grad)
            layer.lora_A[ADAPTER_NAME] = plain


def merge_lora(model: PeftModel) -> PreTrainedModel:
    """Fold ΔW into the base weights and return the plain student (PEFT ``merge_and_unload``).

    The result has the student's original class, module tree, state-dict keys and parameter count: no
    lora_* or mixer parameters, no PEFT wrappers. Works for every variant: MoSLoRA mixers are folded first
    (A' = M·A); DoRA and PiSSA are merged by PEFT (PiSSA: W_res + (α/r)·B·A = W + ΔW).

    **Consumes** ``model``: the merge happens in place on its layers, so the PeftModel must not be used
    afterwards; compute any adapter-model outputs to compare with before calling this. The returned
    parameters keep ``requires_grad=False``.
    """
    _fold_mixers(model)
    # safe_merge checks the merged weights for NaN/inf before committing them.
    merged = model.merge_and_unload(safe_merge=True)
    if not isinstance(merged, PreTrainedModel):
        raise TypeError(f"merge_and_unload returned {type(merged).__name__}, expected a PreTrainedModel")
    return merged


@torch.no_grad()
def merge_verified(
    model: PeftModel,
    batch: dict[str, torch.Tensor],
    device: torch.device,
    *,
    chunk_size: int = 1024,
    merge: Callable[[PeftModel], PreTrainedModel] | None = None,
    forward_mode: Callable[[torch.nn.Module], AbstractContextManager[Any]] = contextlib.nullcontext,
) -> tuple[PreTrainedModel, float]:
    """``merge(model)`` (default ``merge_lora``), and the largest |merged - adapter| logit difference over
    the real (non-padding) positions of ``batch`` [B, T], in the models' dtype (call it on fp32 models
    to measure the merge, not rounding). Both forwards run inside ``forward_mode(model)``: a quantized
    base is compared in ``models.quant.train_mode_without_dropout``, with ``merge_quantized``.

    The logits are compared chunk by chunk of tokens from the two models' final hidden states, so no
    [B, T, V] tensor exists: at Llama-3's vocabulary and 8 x 2048 tokens that would be 8 GiB each.
    **Consumes** ``model`` as ``merge_lora`` does.
    """
    input_ids = batch["input_ids"].to(device)
    attention_mask = batch["attention_mask"].to(device)
    real = attention_mask.bool()  # [B, T]
    with forward_mode(model):
        adapter_hidden = final_hidden_states(model, input_ids, attention_mask)[real]  # [N, H]
    head = output_head(model)
    # A LoRA-wrapped lm_head changes in the merge: keep a copy of the adapter model's one to compare with.
    adapter_head = copy.deepcopy(head) if isinstance(head, LoraLayer) else head
    cap = logit_softcap(model)
    merged = (merge or merge_lora)(model)
    with forward_mode(merged):
        merged_hidden = final_hidden_states(merged, input_ids, attention_mask)[real]  # [N, H]
    merged_head = output_head(merged)
    diff = 0.0
    for start in range(0, adapter_hidden.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        before = softcap(adapter_head(adapter_hidden[rows]), cap)  # [C, V]
        after = softcap(merged_head(merged_hidden[rows]), cap)
        diff = max(diff, float(after.sub_(before).abs_().max()))  # in place: no third [C, V] tensor
    return merged, diff


def _adapter_state_dict(model: PeftModel) -> tuple[dict[str, torch.Tensor], LoraConfig]:
    """The adapter to save, as (PEFT checkpoint state dict, config), computed from copies only.

    MoSLoRA: ``lora_A`` := M·A and the mixers dropped. PiSSA: converted to a LoRA on the original weights
    exactly as PEFT's ``LoraModel.subtract_mutated_init`` does it: ΔW = s·(B·A - B0·A0) =
    s·[B | -B0]·[A ; A0], i.e. rank 2r with α doubled so that the scaling s = α/r is unchanged.
    """
    config = copy.deepcopy(model.peft_config[ADAPTER_NAME])
    assert isinstance(config, LoraConfig)
    state = get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME, save_embedding_layers=False)
    out = {k: v.detach() for k, v in state.items()}

    mixers = {k.removesuffix(".mixer"): v for k, v in out.items() if k.endswith(".lora_A.mixer")}
    for prefix, mixer in mixers.items():
        key = f"{prefix}.weight"
        out[key] = (mixer.float() @ out[key].float()).to(out[key].dtype)
        del out[f"{prefix}.mixer"]

    pissa_init: dict[str, torch.Tensor] | None = getattr(model, _PISSA_INIT_ATTR, None)
    if pissa_init is not None:
        for key in list(out):
            init = pissa_init[key].to(out[key].device)
            if ".lora_A." in key:
                out[key] = torch.cat([out[key], init], dim=0)  # [2r, in]
            elif ".lora_B." in key:
                out[key] = torch.cat([out[key], -init], dim=1)  # [out, 2r]
        config.init_lora_weights = True  # the converted adapter applies to the original, unmodified W
        config.r *= 2
        # rsLoRA scales by α/√r, so √2·α keeps the scaling at rank 2r; plain LoRA needs 2·α.
        config.lora_alpha = config.lora_alpha * (math.sqrt(2) if config.use_rslora else 2)  # type: ignore[assignment]

    config.inference_mode = True
    return {k: v.to("cpu").contiguous() for k, v in out.items()}, config


def save_adapter(model: PeftModel, path: str | Path) -> None:
    """Write a standard PEFT adapter dir (``adapter_config.json`` + ``adapter_model.safetensors``).

    ``PeftModel.from_pretrained(original_student, path)`` reproduces ``model``'s outputs, where
    ``original_student`` is the student as it was before :func:`attach_lora` (never the PiSSA residual).
    MoSLoRA is saved folded (a plain LoRA with A' = M·A, same rank); PiSSA is saved converted (rank 2r,
    α doubled, see :func:`_adapter_state_dict`); the other variants as PEFT saves them. The live ``model``
    is only read, never modified, so this is safe mid-training.
    """
    state, config = _adapter_state_dict(model)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(path))
    save_file(state, str(path / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
