"""How every report draws an arm: its name and its colour, the same in the comparison and the probe."""

from __future__ import annotations

ARM_LABELS = {"sft": "SFT", "lora": "LoRA", "kd": "KD", "neo": "Neo"}
ARM_COLORS = {"sft": "#7f7f7f", "lora": "#1f77b4", "kd": "#ff7f0e", "neo": "#2ca02c"}
REFERENCE_COLORS = {"teacher": "black", "student": "#d62728"}


def label(arm: str) -> str:
    """An arm's name in the report: "Neo", or "Neo + int8 teacher" for the arm neo+int8-teacher."""
    method, *variants = arm.split("+")
    return " + ".join([ARM_LABELS.get(method, method), *(v.replace("-", " ") for v in variants)])


def color(arm: str) -> str:
    """An arm's colour: its method's (a quantized variant is told apart by its label and line style)."""
    return ARM_COLORS.get(arm.split("+")[0], "#555")
