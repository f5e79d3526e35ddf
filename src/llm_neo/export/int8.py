"""An int8 Hugging Face checkpoint of a model: torchao weight-only int8, saved as safetensors.

Every ``nn.Linear`` of the decoder blocks is quantized by transformers' ``TorchAoConfig`` with torchao's
``Int8WeightOnlyConfig`` (one scale per output row; the lm_head and embeddings stay in the model's
published dtype) and saved with ``save_pretrained``. Servers and scripts that read torchao checkpoints
load it with a plain ``AutoModelForCausalLM.from_pretrained(dir)`` (torchao installed). The export proves
itself: the reloaded tensors equal the saved ones bit for bit, the reloaded logits equal the in-memory
quantized model's exactly, and the drift from the dense source (KL per token, top-1 agreement) is
recorded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from llm_neo.errors import ModelError

__all__ = ["export_int8"]


def _bit_exact(a: torch.Tensor, b: torch.Tensor) -> bool:
    if type(a) is not type(b) and not (
        isinstance(a, torch.nn.Parameter) or isinstance(b, torch.nn.Parameter)
    ):
        return False
    from llm_neo.models.quant import storage_tensors

    pa, pb = list(storage_tensors(a)), list(storage_tensors(b))
    return len(pa) == len(pb) and all(
        x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y) for x, y in zip(pa, pb, strict=True)
    )


def export_int8(
    model_dir: str | Path, output_dir: str | Path, *, texts: tuple[str, ...] | None = None
) -> dict[str, Any]:
    """Write ``model_dir`` quantized to torchao int8 weight-only into ``output_dir`` (which must be empty
    or absent: the caller makes it atomic) and verify it.

    Returns ``{"quantized_linears", "dtype", "bytes", "source_bytes", "verification": {"tensors_bit_exact",
    "logits_equal", "kl_per_token", "top1_agreement", "max_abs_logit_diff", "tokens", "passed",
    "problems"}}``; logits are compared on sample texts tokenized by the model's tokenizer.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, TorchAoConfig

    from llm_neo.export.gguf import SAMPLE_TEXTS, compare_logits, sample_input_ids
    from llm_neo.models.loading import load_model, published_dtype
    from llm_neo.models.quant import is_quantized_linear, require_package, weight_bytes

    require_package("torchao")
    from torchao.quantization import Int8WeightOnlyConfig

    model_dir, output_dir = Path(model_dir), Path(output_dir)
    dtype = published_dtype(AutoConfig.from_pretrained(model_dir))
    cpu = torch.device("cpu")
    try:
        quantized = AutoModelForCausalLM.from_pretrained(
            model_dir,
            dtype=dtype,
            quantization_config=TorchAoConfig(Int8WeightOnlyConfig()),
            device_map={"": cpu},
            use_safetensors=True,
        ).eval()
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception as err:
        raise ModelError(f"could not load {model_dir} for the int8 export: {err}") from err
    n_quantized = sum(1 for m in quantized.modules() if is_quantized_linear(m))
    if n_quantized == 0:
        raise ModelError(f"int8 export of {model_dir}: no linear layer was quantized")

    output_dir.mkdir(parents=True, exist_ok=True)
    quantized.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    reloaded = AutoModelForCausalLM.from_pretrained(
        output_dir, device_map={"": cpu}, use_safetensors=True
    ).eval()

    problems: list[str] = []
    saved, loaded = quantized.state_dict(), reloaded.state_dict()
    if saved.keys() != loaded.keys():
        problems.append(f"reloaded tensor names differ: {sorted(set(saved) ^ set(loaded))[:5]}")
    mismatched = [k for k in saved if k in loaded and not _bit_exact(saved[k], loaded[k])]
    if mismatched:
        problems.append(
            f"{len(mismatched)} reloaded tensors differ from the saved ones, e.g. {mismatched[:3]}"
        )

    input_ids = sample_input_ids(tokenizer, texts or SAMPLE_TEXTS)  # [B, T]
    with torch.no_grad():
        logits_equal = torch.equal(
            quantized(input_ids=input_ids).logits, reloaded(input_ids=input_ids).logits
        )
    if not logits_equal:
        problems.append("the reloaded checkpoint computes other logits than the model that was saved")
    source = load_model(str(model_dir), role="int8 export source", dtype=dtype, device=cpu).eval()
    drift = compare_logits(source.float(), quantized, input_ids)
    files = [p for p in output_dir.iterdir() if p.suffix == ".safetensors"]
    return {
        "quantized_linears": n_quantized,
        "dtype": str(dtype).removeprefix("torch."),
        "bytes": sum(p.stat().st_size for p in files),
        "weight_bytes": weight_bytes(quantized),
        "source_weight_bytes": weight_bytes(source),
        "verification": {
            "tensors_bit_exact": not mismatched and saved.keys() == loaded.keys(),
            "logits_equal": logits_equal,
            **drift,
            "passed": not problems,
            "problems": problems,
        },
    }
