"""How every report draws an arm: its name and its colour, the same in the comparison and the probe."""

from __future__ import annotations

ARM_LABELS = {"sft": "SFT", "lora": "LoRA", "kd": "KD", "neo": "Neo"}
ARM_COLORS = {"sft": "#7f7f7f", "lora": "#1f77b4", "kd": "#ff7f0e", "neo": "#2ca02c"}
REFERENCE_COLORS = {"teacher": "black", "student": "#d62728"}
# A marker shape per method, and one per kind of quantized variant (its teacher, its student, both), so
# arms that share a colour or sit on the same point are still told apart.
ARM_MARKERS = {"sft": "o", "lora": "s", "kd": "^", "neo": "D"}
VARIANT_MARKERS = {"teacher": "P", "student": "X", "both": "*"}


def label(arm: str) -> str:
    """An arm's name in the report: "Neo", or "Neo + int8 teacher" for the arm neo+int8-teacher."""
    method, *variants = arm.split("+")
    return " + ".join([ARM_LABELS.get(method, method), *(v.replace("-", " ") for v in variants)])


def marker(arm: str) -> str:
    """An arm's marker shape in a plot: its method's, or its variant's when quantized ("neo+int8-teacher":
    a quantized teacher's)."""
    method, *variants = arm.split("+")
    if not variants:
        return ARM_MARKERS.get(method, "o")
    parts = {part for v in variants for part in ("teacher", "student") if v.endswith(part)}
    return VARIANT_MARKERS["both" if len(parts) == 2 else parts.pop() if parts else "teacher"]


def color(arm: str) -> str:
    """An arm's colour: its method's (a quantized variant is told apart by its label and line style)."""
    return ARM_COLORS.get(arm.split("+")[0], "#555")
