"""llm_neo.records: to_json / from_json round trips and names the key that is wrong."""

from __future__ import annotations

import enum
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from llm_neo.records import OPTIONAL_KEY, RecordError, dumps, from_json, load, to_json


class Verdict(enum.Enum):
    A = "a"
    B = "b"
    NEITHER = "neither"


@dataclass
class Stats:
    mean: float
    std: float
    n: int


@dataclass
class Group:
    name: str
    stats: dict[str, Stats]
    verdict: Verdict
    ci: tuple[float, float] | None
    runs: list[Path]
    note: str | None = None


@dataclass
class Results:
    schema_version: int
    groups: list[Group]
    extra: dict[str, Any] = field(default_factory=dict)


def _results() -> Results:
    group = Group(
        "neo", {"accuracy": Stats(0.5, 0.1, 3)}, Verdict.NEITHER, (-0.1, 0.2), [Path("/runs/a")], note=None
    )
    return Results(1, [group, Group("kd", {}, Verdict.A, None, [])])


def test_a_record_round_trips_through_json_text():
    record = _results()
    assert from_json(Results, json.loads(dumps(record))) == record


def test_enums_paths_and_tuples_become_plain_json():
    data = to_json(_results())
    assert data["groups"][0]["verdict"] == "neither"
    assert data["groups"][0]["runs"] == ["/runs/a"]
    assert data["groups"][0]["ci"] == [-0.1, 0.2]


def test_unknown_keys_are_kept_in_extra_and_written_back():
    data = to_json(_results()) | {"written_by_a_newer_version": [1, 2]}
    record = from_json(Results, data)
    assert record.extra == {"written_by_a_newer_version": [1, 2]}
    assert to_json(record) == data


def test_an_int_where_a_float_is_declared_reads_as_float_and_nan_passes():
    data = to_json(_results())
    data["groups"][0]["stats"]["accuracy"]["mean"] = 1
    data["groups"][0]["stats"]["accuracy"]["std"] = math.nan
    stats = from_json(Results, data).groups[0].stats["accuracy"]
    assert isinstance(stats.mean, float) and stats.mean == 1.0 and math.isnan(stats.std)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda d: d["groups"][0]["stats"]["accuracy"].pop("mean"),
            "Results.groups[0].stats.accuracy: missing key 'mean'",
        ),
        (
            lambda d: d["groups"][1].update(verdict="maybe"),
            "Results.groups[1].verdict: 'maybe' is not one of",
        ),
        (lambda d: d["groups"][0].update(ci=[1.0]), "Results.groups[0].ci: expected 2 items, found 1"),
        (lambda d: d["groups"][0]["stats"]["accuracy"].update(n="3"), "accuracy.n: expected int, found str"),
        (lambda d: d["groups"][0].update(name=None), "Results.groups[0].name: expected str, found NoneType"),
        (lambda d: d.update(groups={}), "Results.groups: expected a list, found dict"),
    ],
)
def test_a_damaged_record_names_the_key(mutate, message):
    data = to_json(_results())
    mutate(data)
    with pytest.raises(RecordError, match=message.replace("[", r"\[").replace("]", r"\]")):
        from_json(Results, data)


def test_load_names_the_file_for_damaged_json_and_wrong_shapes(tmp_path):
    bad = tmp_path / "results.json"
    bad.write_text('{"schema_version": 1, "groups": [')
    with pytest.raises(RecordError, match=f"{bad}: cannot read it as JSON"):
        load(Results, bad)
    bad.write_text('{"groups": []}')
    with pytest.raises(RecordError, match=f"{bad}: Results: missing key 'schema_version'"):
        load(Results, bad)
    bad.write_text(dumps(_results()))
    assert load(Results, bad) == _results()


@dataclass
class Sometimes:
    always: int
    sometimes: list[int] | None = field(default=None, metadata=OPTIONAL_KEY)


def test_an_optional_key_is_left_out_while_none_and_read_back_as_none():
    assert to_json(Sometimes(1)) == {"always": 1}
    assert to_json(Sometimes(1, [2])) == {"always": 1, "sometimes": [2]}
    assert from_json(Sometimes, {"always": 1}) == Sometimes(1)
    assert from_json(Sometimes, {"always": 1, "sometimes": None}) == Sometimes(1)


@dataclass
class NullOrAbsent:
    always: float | None
    sometimes: float | None = field(default=None, metadata=OPTIONAL_KEY)


def test_an_optional_key_is_absent_while_none_and_a_plain_optional_stays_null():
    assert to_json(NullOrAbsent(None)) == {"always": None}
    assert to_json(NullOrAbsent(None, 2.0)) == {"always": None, "sometimes": 2.0}
    assert from_json(NullOrAbsent, {"always": 1.0}) == NullOrAbsent(1.0, None)
    assert from_json(NullOrAbsent, {"always": None, "sometimes": 3.0}).sometimes == 3.0


def test_an_on_policy_curve_draws_kd_on_its_samples_and_no_ce_where_a_step_had_no_data():
    from llm_neo.records.compare import CurvePoint

    # A metrics.jsonl line of an on-policy step at λ = 1 (every batch sampled) and of an off-policy one.
    sampled = from_json(CurvePoint, {"step": 1, "loss": 0.4, "ce_loss": 0.0, "kd_loss": 0.0,
                                     "on_policy_kd_loss": 0.8, "lr": 1e-4})  # fmt: skip
    mixed = from_json(CurvePoint, {"step": 2, "loss": 1.0, "ce_loss": 2.0, "kd_loss": 0.5,
                                   "on_policy_kd_loss": 0.7})  # fmt: skip
    plain = from_json(CurvePoint, {"step": 1, "loss": 1.0, "ce_loss": 2.0, "kd_loss": 0.5})
    assert sampled.curves(on_policy=True) == (None, 0.8)
    assert mixed.curves(on_policy=True) == (2.0, 0.7)
    assert plain.curves(on_policy=False) == (2.0, 0.5)
    assert "on_policy_kd_loss" not in to_json(plain)  # off-policy results.json keep their shape
