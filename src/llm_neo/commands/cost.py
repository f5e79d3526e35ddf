"""What the full run would cost: a comparison's measured throughput and memory projected to the user's
real run (``llm-neo compare --project-tokens 50M --gpu h100``).

    time    the measured tokens/s when the comparison ran on the card projected to (the same models and
            settings: the best estimate there is), else training FLOPs at a stated utilisation of the
            card's dense bf16 peak: 6·N per token for a full-parameter student (forward, activation and
            weight gradients), 4·N for a LoRA one (its frozen base has no weight gradients), +2·N with
            gradient checkpointing (the recomputed forward), +2·N_teacher for a teacher run online (none
            from a teacher cache)
    memory  ``llm-neo plan``'s estimate of the step's peak for the same models, batch and length

Every projection is printed with these assumptions and to two significant figures (the report's
``format_duration`` and ``format_sig``); none is a measurement. ``--gpu-price`` turns GPU-hours into
a cost in the report alone (it changes no result).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from llm_neo.errors import ConfigError
from llm_neo.records.compare import ArmProjection
from llm_neo.report.tables import format_sig


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gib: float  # what torch reports as the card's total memory, approximately
    bf16_tflops: float  # dense bf16 tensor-core peak, from the vendor's data sheet
    device_names: tuple[str, ...]  # substrings of torch.cuda.get_device_name() that identify it


GPUS: dict[str, Gpu] = {
    "h100": Gpu("NVIDIA H100 80GB (SXM)", 79.6, 989.0, ("H100",)),
    "h200": Gpu("NVIDIA H200 141GB", 139.8, 989.0, ("H200",)),
    "a100": Gpu("NVIDIA A100 80GB", 79.3, 312.0, ("A100-SXM4-80GB", "A100 80GB", "A100-PCIE-80GB")),
    "a100-40gb": Gpu("NVIDIA A100 40GB", 39.4, 312.0, ("A100-SXM4-40GB", "A100-PCIE-40GB")),
    "l40s": Gpu("NVIDIA L40S 48GB", 44.4, 362.0, ("L40S",)),
}

_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}


def parse_tokens(text: str, *, option: str = "--project-tokens") -> int:
    """``50M``, ``2B``, ``1.5e9``, ``300000`` → a token count; ConfigError naming ``option`` otherwise."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmbgt]?)\s*", text.lower())
    if match is None:
        raise ConfigError([f"{option}: {text!r} is not a token count (e.g. 50M, 2B, 300000)"])
    return int(float(match.group(1)) * _SUFFIX[match.group(2)])


def gpu(name: str) -> Gpu:
    if name not in GPUS:
        raise ConfigError([f"--gpu: {name!r} is not one of {', '.join(GPUS)}"])
    return GPUS[name]


def flops_per_token(
    *, student_parameters: int, teacher_parameters: int, lora: bool, online_teacher: bool, checkpointing: bool
) -> int:
    """Training FLOPs of one token (see the module docstring)."""
    student = (4 if lora else 6) + (2 if checkpointing else 0)
    return student * student_parameters + (2 * teacher_parameters if online_teacher else 0)


def project(
    *,
    tokens_per_s: float | None,
    flops_per_token: int,
    planned_peak_gib: float | None,
    tokens: int,
    card: Gpu,
    gpus: int,
    utilization: float,
    measured_on: str,
) -> ArmProjection:
    """The projected wall time and GPU-hours of one arm from its measured ``tokens_per_s`` (when it ran
    on the card projected to), else its ``flops_per_token``, and the ``planned_peak_gib`` of one step;
    ``measured_on`` is the device the comparison ran on (torch's name for it)."""
    same_card = any(key in measured_on for key in card.device_names)
    if same_card and tokens_per_s:
        seconds = tokens / (tokens_per_s * gpus)
        basis = f"the throughput measured here on {measured_on}, x{gpus} cards"
    else:
        seconds = tokens * flops_per_token / (gpus * card.bf16_tflops * 1e12 * utilization)
        basis = (
            f"{format_sig(flops_per_token / 1e9)} GFLOP/token at {utilization:.0%} of {card.bf16_tflops:g} "
            "TFLOP/s"
        )
    return ArmProjection(
        hours=seconds / 3600,
        gpu_hours=seconds * gpus / 3600,
        basis=basis,
        planned_peak_gib=planned_peak_gib,
        fits=None if planned_peak_gib is None else planned_peak_gib <= card.memory_gib,
    )
