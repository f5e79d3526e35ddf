"""How the reports draw an arm (llm_neo.report.style): each variant named as the docs write it, and in a
colour of its own that keeps its method's hue, the same in every plot of a comparison and its probe."""

from __future__ import annotations

import colorsys
import io
from dataclasses import replace
from itertools import pairwise
from pathlib import Path

import pytest

from llm_neo.choices import ARM_VARIANTS, METHOD_NAMES
from llm_neo.records import from_json, load
from llm_neo.records.compare import CompareResults
from llm_neo.records.probe import ProbeResults
from llm_neo.report.compare import plots
from llm_neo.report.probe import _colors as probe_colors
from llm_neo.report.style import ARM_COLORS, REFERENCE_COLORS, arm_colors, label, marker, shade, variant_label

ROOT = Path(__file__).parents[2]
DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize(
    ("arm", "text"),
    [
        ("neo", "Neo"),
        ("neo+on-policy", "Neo + on-policy"),
        ("kd+on-policy", "KD + on-policy"),
        ("neo+int8-teacher", "Neo + int8 teacher"),
        ("lora+nf4-student", "LoRA + nf4 student"),
        ("neo+int8-teacher+nf4-student+on-policy", "Neo + int8 teacher + nf4 student + on-policy"),
    ],
)
def test_an_arm_reads_as_the_docs_write_it(arm, text):
    assert label(arm) == text


@pytest.mark.parametrize("variant", list(ARM_VARIANTS))
def test_every_variant_s_label_is_the_docs_term(variant):
    # The term a reader meets in the docs' prose, not the identifier with its hyphen taken out
    # ("on policy" is in no doc).
    docs = " ".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
    assert variant_label(variant) in docs


def _hue(color: str) -> float:
    return colorsys.rgb_to_hls(*(int(color[i : i + 2], 16) / 255 for i in (1, 3, 5)))[0]


def test_each_variant_has_a_colour_of_its_own_in_its_method_s_hue():
    arms = [*METHOD_NAMES, *(f"{m}+{v}" for m in METHOD_NAMES for v in ARM_VARIANTS)]
    colors = arm_colors(arms)
    assert set(colors) == set(arms)
    # Every arm told apart from every other, and from the teacher's and the student's lines.
    assert len(set(colors.values())) == len(arms)
    assert not set(colors.values()) & {shade("#000000", 0), REFERENCE_COLORS["student"]}
    for method in METHOD_NAMES:
        assert colors[method] == ARM_COLORS[method]
        for v in ARM_VARIANTS:
            variant = colors[f"{method}+{v}"]
            assert variant != colors[method]
            if method != "sft":  # grey has no hue; its shades stay grey
                assert abs(_hue(variant) - _hue(colors[method])) < 0.02, (method, v)


def test_two_variants_of_a_method_alternate_lighter_and_darker():
    colors = arm_colors(["neo", "neo+int8-teacher", "neo+on-policy", "kd", "mine"])
    assert "mine" not in colors  # not an arm: the caller colours it
    light, dark = colors["neo+int8-teacher"], colors["neo+on-policy"]
    assert light == shade(ARM_COLORS["neo"], 0.5) and dark == shade(ARM_COLORS["neo"], -0.5)
    assert shade("#2ca02c", 0.5) == "#96d096" and shade("#2ca02c", -0.5) == "#165016"
    # The colour is the report's, not the order a plot meets the arms in: repeats change nothing.
    assert arm_colors(["neo", "neo+int8-teacher", "neo", "neo+on-policy", "neo+int8-teacher"]) == {
        k: colors[k] for k in ("neo", "neo+int8-teacher", "neo+on-policy")
    }


def test_an_on_policy_arm_has_its_own_marker_not_a_quantized_teacher_s():
    assert marker("neo+on-policy") not in {marker(a) for a in ("neo", "neo+int8-teacher", "neo+nf4-student")}
    assert marker("neo+on-policy+int8-teacher") == marker("neo+int8-teacher")


def _count(png: bytes, color: str) -> int:
    """Pixels of ``png`` in ``color`` (the antialiased edges aside)."""
    import matplotlib.image

    pixels = (matplotlib.image.imread(io.BytesIO(png))[:, :, :3] * 255).round()
    rgb = tuple(int(color[i : i + 2], 16) for i in (1, 3, 5))
    return int((abs(pixels - rgb).max(axis=-1) < 4).sum())


def test_an_arm_has_the_same_colour_in_every_plot_and_in_the_probe():
    results = load(CompareResults, DATA / "compare-results.json")
    arms = list(dict.fromkeys(g.method for g in results.groups))
    assert arms == ["sft", "neo", "neo+int8-teacher", "neo+nf4-student"]
    for g in results.groups:  # the fixture's arms all scored 0: bars of some height, points apart
        g.stats.accuracy = replace(g.stats.accuracy, mean=0.2 * (1 + arms.index(g.method)), std=0.0)
    colors = arm_colors(arms)
    assert len(set(colors.values())) == len(arms)
    images = plots(results)
    for name in ("scores", "memory", "time", "loss", "sizes"):
        for arm in arms:
            assert _count(images[name], colors[arm]) > 20, (name, arm, colors[arm])
    # The probe's plots name its models after the same arms: they draw them alike.
    assert results.probe is not None
    probed = probe_colors(from_json(ProbeResults, results.probe))
    assert {arm: probed[arm] for arm in arms} == colors


def test_the_names_under_the_bars_do_not_run_into_each_other():
    # Seven arms, three of them variants: at the default width "+ int8 teacher" overlapped its neighbours.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from llm_neo.report.compare import _fit_ticks, _tick_label

    arms = ["sft", "lora", "kd", "neo", "neo+on-policy", "neo+int8-teacher", "kd+on-policy"]

    def overlaps(fit: bool) -> bool:
        fig, ax = plt.subplots(figsize=(7, 3.8))
        ax.bar(range(len(arms)), [1] * len(arms))
        ax.set_xticks(range(len(arms)), [_tick_label(a) for a in arms])
        if fit:
            _fit_ticks(fig, ax, len(arms))
        renderer = fig.canvas.get_renderer()
        boxes = [t.get_window_extent(renderer) for t in ax.get_xticklabels()]
        plt.close(fig)
        return any(a.x1 > b.x0 for a, b in pairwise(boxes))

    assert overlaps(fit=False)  # the check sees the overlap
    assert not overlaps(fit=True)
