"""How every report draws an arm: its name and its colour, the same in the comparison and the probe."""

from __future__ import annotations

from collections.abc import Iterable

from llm_neo.choices import QUANT_VARIANTS

ARM_LABELS = {"sft": "SFT", "lora": "LoRA", "kd": "KD", "neo": "Neo"}
# Matplotlib's tab10 colours, each method one hue; a plot never tells arms apart by colour alone (each
# method has its marker shape too, and a variant its line style).
ARM_COLORS = {"sft": "#7f7f7f", "lora": "#1f77b4", "kd": "#ff7f0e", "neo": "#2ca02c"}
REFERENCE_COLORS = {"teacher": "black", "student": "#d62728"}
# A marker shape per method, and one per kind of variant (a quantized teacher, student, both; on-policy),
# so arms that share a hue or sit on the same point are still told apart.
ARM_MARKERS = {"sft": "o", "lora": "s", "kd": "^", "neo": "D"}
VARIANT_MARKERS = {"teacher": "P", "student": "X", "both": "*", "on-policy": "p"}
# How far a variant's shade moves from its method's colour, towards white (lighter) and towards black
# (darker). Lightness is the cue every kind of colour vision keeps, so a variant differs from its method
# in lightness, not hue: it still reads as that method's. The bounds keep a light shade visible on the
# white page and a dark one apart from the teacher's black line.
LIGHTEST, DARKEST = 0.5, 0.5


def label(arm: str) -> str:
    """An arm's name for people: "Neo", "Neo + int8 teacher" for neo+int8-teacher, "Neo + on-policy" for
    neo+on-policy (each variant as the docs write it)."""
    method, *variants = arm.split("+")
    return " + ".join([ARM_LABELS.get(method, method), *map(variant_label, variants)])


def variant_label(variant: str) -> str:
    """A variant as the docs write it: a quantization as its kind and whose weights ("int8 teacher" for
    int8-teacher); any other variant as it is spelled (on-policy is one hyphenated term)."""
    if variant in QUANT_VARIANTS:
        option, kind = QUANT_VARIANTS[variant]
        return f"{kind} {option.removesuffix('_quant')}"
    return variant


def marker(arm: str) -> str:
    """An arm's marker shape in a plot: its method's, or its variant's ("neo+int8-teacher": a quantized
    teacher's; "neo+on-policy": on-policy's; a quantization's wins over on-policy's)."""
    method, *variants = arm.split("+")
    if not variants:
        return ARM_MARKERS.get(method, "o")
    parts = {QUANT_VARIANTS[v][0].removesuffix("_quant") for v in variants if v in QUANT_VARIANTS}
    if not parts:
        return VARIANT_MARKERS["on-policy"]
    return VARIANT_MARKERS["both" if len(parts) == 2 else parts.pop()]


def arm_colors(names: Iterable[str]) -> dict[str, str]:
    """The colour of each of ``names`` that is an arm (its method one of ARM_COLORS; the other names are
    left out, for the caller to colour): a method's own arm in the method's colour, each of its variants
    in a shade of it of its own, alternately lighter and darker, in the order the variants first come.
    Give every arm a report draws, once for the whole report: the shades depend on how many variants a
    method has, and a report's charts and legends then all draw an arm alike."""
    arms = list(dict.fromkeys(names))
    variants: dict[str, list[str]] = {}
    for name in arms:
        method = name.split("+")[0]
        if method in ARM_COLORS and name != method:
            variants.setdefault(method, []).append(name)
    colors = {name: ARM_COLORS[name] for name in arms if name in ARM_COLORS}
    for method, shaded in variants.items():
        # Lighter at even positions, darker at odd ones; each side in even steps from its bound inwards,
        # so the first variant is the furthest from its method's colour.
        sides = {0: (LIGHTEST, -(-len(shaded) // 2)), 1: (-DARKEST, len(shaded) // 2)}
        for k, arm in enumerate(shaded):
            bound, n = sides[k % 2]
            colors[arm] = shade(ARM_COLORS[method], bound * (n - k // 2) / n)
    return colors


def shade(color: str, share: float) -> str:
    """``color`` ("#rrggbb") mixed with white by ``share`` (> 0) or with black by ``-share`` (< 0)."""
    rgb = [int(color[i : i + 2], 16) for i in (1, 3, 5)]
    target = 255 if share > 0 else 0
    return "#" + "".join(f"{round(c + abs(share) * (target - c)):02x}" for c in rgb)
