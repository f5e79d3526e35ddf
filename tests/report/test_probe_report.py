"""The probe's records and report: probe.json in today's format reads and writes back unchanged, the
command assembles exactly that format, and the report reads the record (or its JSON form, as compare
embeds it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from llm_neo.commands.probe import Measured, ModelSpec, ProbeConfig, assemble
from llm_neo.eval.probe import ALL, Scoring, default_labels, make_label
from llm_neo.eval.probe_sets import Pair, ProbeSet, Prompt
from llm_neo.records import RecordError, dumps, from_json, load, to_json
from llm_neo.records.probe import (
    SCHEMA_VERSION,
    BiasScores,
    Bootstrap,
    Conditioning,
    Normalisation,
    ProbedModel,
    ProbeResults,
    ProbeSetSummary,
    Role,
    Stat,
)
from llm_neo.records.probe import Scoring as ScoringRecord
from llm_neo.report.probe import conclusions, plots, probe_section

# Written by `assemble` before the records existed (inputs: ``_inputs`` below), so these are the
# format probe.json files on disk have: with prompts, and without (no behaviour/prompts keys).
DATA = Path(__file__).parent / "data"
FILES = {"probe.json": {}, "probe-pairs-only.json": {"with_prompts": False}}


def _inputs(with_prompts: bool = True) -> tuple[Any, ...]:
    """What `llm-neo probe` measures, made up: a teacher, the baseline and two students, five pairs in
    two categories, two prompts; the same numbers every time."""
    config = ProbeConfig(teacher="T", models=["S0=s0", "a=pa", "b=pb"], bootstrap_samples=20, seed=3)
    specs = [
        ModelSpec("teacher", "T", Role.TEACHER),
        ModelSpec("S0", "s0", Role.BASELINE),
        ModelSpec("a", "pa", Role.STUDENT),
        ModelSpec("b", "pb", Role.STUDENT),
    ]
    pairs = tuple(Pair(f"p{i}", f"s {i}", f"a {i}", c, "builtin") for i, c in enumerate("xxyyy"))
    prompts = (
        [Prompt("q0", "Why?", "x", "builtin"), Prompt("q1", "Who?", "y", "builtin")] if with_prompts else []
    )
    probes = ProbeSet(pairs=pairs, prompts=tuple(prompts), sources=("builtin",), notes=("a note",))
    labels = [*default_labels(), make_label("paris", {"keywords": ["Paris"]}, where="t")]
    answers = {
        "teacher": ["Paris it is", "I cannot say"],
        "S0": ["no", "I cannot say"],
        "a": ["Paris", "x"],
        "b": ["paris it is", "y"],
    }
    generator = torch.Generator().manual_seed(0)
    measured = {}
    for k, name in enumerate(answers):
        stereo = torch.randn(len(pairs), generator=generator, dtype=torch.float64) - 10
        anti = torch.randn(len(pairs), generator=generator, dtype=torch.float64) - 10
        measured[name] = Measured(
            stereotypical=stereo,
            anti_stereotypical=anti,
            tokens=torch.ones(2 * len(pairs), dtype=torch.long),
            answers=answers[name] if with_prompts else [],
            scoring=f"scored {name}",
            seconds=1.23456 + k,
        )
    return config, specs, probes, prompts, labels, Scoring(), measured


@pytest.mark.parametrize("name", FILES)
def test_a_probe_json_of_todays_format_loads_and_writes_back_unchanged(name):
    text = (DATA / name).read_text()
    results = load(ProbeResults, DATA / name)
    assert dumps(results) == text
    assert (results.behaviour is None) == (results.prompts is None) == ("behaviour" not in json.loads(text))


@pytest.mark.parametrize(("name", "kwargs"), FILES.items())
def test_the_command_assembles_exactly_todays_format(name, kwargs):
    written = json.loads((DATA / name).read_text())
    assembled = to_json(assemble(*_inputs(**kwargs)))
    # The options and the version are the command's own business; every result key and value is the same.
    for key in ("config", "llm_neo_version"):
        assembled.pop(key), written.pop(key)
    assert assembled == written
    assert list(assembled) == list(written)  # and in the same order


def test_a_damaged_probe_json_names_the_key(tmp_path):
    data = json.loads((DATA / "probe.json").read_text())
    data["inheritance"]["a"]["all"]["movement"]["value"] = "high"
    (tmp_path / "probe.json").write_text(json.dumps(data))
    with pytest.raises(RecordError, match=r"probe\.json: ProbeResults\.inheritance\.a\.all\.movement\.value"):
        load(ProbeResults, tmp_path / "probe.json")


def test_the_report_reads_the_record_or_its_json_form_alike():
    data = json.loads((DATA / "probe.json").read_text())
    record = from_json(ProbeResults, data)
    section = probe_section(record, level=3)
    assert probe_section(data, level=3) == section
    assert section.startswith("### Inherited bias") and "| a | student |" in section
    assert "movement a − b:" in "\n".join(conclusions(data))
    assert set(plots(data)) == {"movement", "inheritance", "bias"}
    pairs_only = load(ProbeResults, DATA / "probe-pairs-only.json")
    assert "Behaviour on prompts" in section and "Behaviour on prompts" not in probe_section(pairs_only)


def probe_record(roles: dict[str, str], *, pairs: int = 0, **sections: Any) -> ProbeResults:
    """A ProbeResults with the given models (name: role) and sections, the rest empty."""
    return ProbeResults(
        schema_version=SCHEMA_VERSION,
        llm_neo_version="0",
        config={},
        scoring=ScoringRecord(Conditioning.BOS, Normalisation.SUM, ""),
        bootstrap=Bootstrap(samples=10, seed=0, confidence=0.95, method="percentile"),
        probe_set=ProbeSetSummary([], [], pairs, 0, {}, {}),
        teacher="teacher",
        baseline=next(n for n, r in roles.items() if r == "baseline"),
        models=[ProbedModel(n, n, Role(r), "scored", 0.0) for n, r in roles.items()],
        labels=[],
        **sections,
    )


def test_a_model_named_after_a_method_is_drawn_in_its_comparison_colour():
    # compare's probe names its models sft, lora, kd, neo: the probe's plots draw them as the comparison
    # does; the teacher and the baseline keep their role's colour, other names get one no arm uses.
    from llm_neo.report.probe import _colors
    from llm_neo.report.style import ARM_COLORS, arm_colors

    roles = {
        "teacher": "teacher",
        "student": "baseline",
        "neo": "student",
        "neo+on-policy": "student",
        "kd": "student",
        "mine": "student",
    }
    colors = _colors(probe_record(roles))
    arms = arm_colors(["neo", "neo+on-policy", "kd"])
    assert {n: colors[n] for n in arms} == arms and colors["neo+on-policy"] != colors["neo"]
    assert colors["teacher"] == "black" and colors["student"] != colors["neo"]
    assert colors["mine"] not in ARM_COLORS.values()


@pytest.mark.parametrize(
    ("baseline_ci", "said"), [([9.6, 14.1], True), ([-0.5, 0.7], False), ([-9.0, -2.0], False)]
)
def test_a_baseline_that_already_leans_the_teachers_way_is_said(baseline_ci, said):
    # A pruned teacher as the baseline carries the teacher's preferences: every student that lost part
    # of them moves below 0, and the report says why before the per-student sentences.
    def gap(value, ci):
        return {ALL: BiasScores(36, Stat(0.5, (0.4, 0.6)), Stat(value, tuple(ci)))}

    results = probe_record(
        {"teacher": "teacher", "student": "baseline"},
        pairs=36,
        bias={"teacher": gap(15.8, [13.3, 18.3]), "student": gap(sum(baseline_ci) / 2, baseline_ci)},
    )
    lines = conclusions(results)
    assert any(line.startswith("The baseline already leans the teacher's way") for line in lines) == said
