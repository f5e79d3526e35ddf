"""The verdict a manager acts on: it says first when no arm learned (with the counts and the steps to
cover 3 epochs), names no winner in a tie, says identical seeds as such, and checks the paper's claims
only under the conditions they were made under; the header lists the settings and the machine's load."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from llm_neo.records import from_json, to_json
from llm_neo.records.compare import CompareResults, TeacherCacheCost, Verdict
from llm_neo.report.compare import claims, conclusion, interval, paired_table, report_blocks, verdict
from llm_neo.report.document import to_markdown
from llm_neo.report.stats import paired_difference, summarize, within_noise

RESULTS = Path(__file__).parent / "data" / "compare-results.json"
LARGEST = 24  # the example's data sizes are 8 and 24 records; the report reads the largest


@pytest.fixture
def data() -> dict:
    return json.loads(RESULTS.read_text())


def _set_scores(data: dict, method: str, scores: list[float]) -> None:
    """The arm's per-seed scores at the largest size, and its statistics to match."""
    for group in data["groups"]:
        if group["method"] == method and group["records"] == LARGEST:
            for run, score in zip(group["runs"], scores, strict=True):
                run["accuracy"] = score
            group["stats"]["accuracy"] = to_json(summarize(scores))


def _set_answers(data: dict, **counts: int) -> None:
    for group in data["groups"]:
        for run in group["runs"]:
            run["answers"] = {"total": 6, **counts}


def _with_kd(data: dict, **config) -> CompareResults:
    """The example with a kd arm (a copy of sft at the largest size, 2x Neo's time and memory)."""
    sft = next(g for g in data["groups"] if g["method"] == "sft" and g["records"] == LARGEST)
    kd = copy.deepcopy(sft) | {"method": "kd", "base_method": "kd"}
    neo = next(g for g in data["groups"] if g["method"] == "neo" and g["records"] == LARGEST)
    for key in ("train_time_s", "peak_memory_gb", "peak_tensor_memory_gb"):
        if neo["stats"].get(key):
            kd["stats"][key] = {**neo["stats"][key], "mean": 2 * neo["stats"][key]["mean"]}
    data["groups"].append(kd)
    data["cost"]["arms"]["kd"] = data["cost"]["arms"]["sft"]
    data["config"] |= config
    return from_json(CompareResults, data)


def test_every_arm_at_the_floor_says_no_arm_learned_first_with_the_steps_to_change(data):
    # The example: every arm and the untrained student score 0 on 6 held-out records, after 2 steps of
    # 4 records over 24 training records (a third of an epoch).
    _set_answers(data, never_stopped=6, looping=3, empty=0)
    results = from_json(CompareResults, data)
    first = verdict(results)[0]
    assert first.startswith("No arm learned the task: every arm's score is within noise")
    assert "100% never stopped, 50% loop and 0% are empty" in first
    assert "covered 0.33 epochs; --max-steps 18 covers 3" in first
    assert "more held-out records (6 now)" in first
    text = " ".join(conclusion(results))
    assert "highest" not in text and "Tied at 2 seed(s)" in text
    assert conclusion(results)[0] == first


def test_answers_that_never_stop_say_no_arm_learned_even_above_the_floor(data):
    for method in ("sft", "neo", "neo+int8-teacher", "neo+nf4-student"):
        _set_scores(data, method, [1.0, 1.0])  # 6 of 6: far from the student's 0 of 6
    _set_answers(data, never_stopped=4, looping=0, empty=1)
    first = verdict(from_json(CompareResults, data))[0]
    assert first.startswith("No arm learned the task: of the arms' 48 answers 67% never stopped")
    assert "within noise" not in first
    _set_answers(data, never_stopped=0, looping=0, empty=0)  # the same scores, answers that stop
    assert verdict(from_json(CompareResults, data))[0].startswith("Task score")


def test_a_clear_winner_is_named_and_a_tie_is_not(data):
    _set_scores(data, "sft", [1.0, 5 / 6])
    for method in ("neo", "neo+int8-teacher", "neo+nf4-student"):
        _set_scores(data, method, [1 / 6, 0.0])  # 5 records below SFT at each seed
    assert "SFT scores best" in " ".join(conclusion(from_json(CompareResults, data)))
    _set_scores(data, "neo", [5 / 6, 1.0])  # level with SFT on average, not on each seed
    text = " ".join(conclusion(from_json(CompareResults, data)))
    assert "Tied at 2 seed(s)" in text and "SFT 91.7 ± 11.8, Neo 91.7 ± 11.8" in text
    assert "scores best" not in text


def test_a_difference_identical_on_every_seed_is_said_so():
    same = paired_difference([0.5, 0.75], [0.25, 0.5])
    assert same.verdict is Verdict.A and same.text == "better, identical on every seed"
    assert interval(same, 100) == "identical on every seed (+25.0)"
    zero = paired_difference([0.5, 0.5], [0.5, 0.5])
    assert zero.text == "identical on every seed" and interval(zero, 100) == "identical on every seed (+0.0)"
    varied = paired_difference([0.5, 0.75], [0.25, 0.25])
    assert "identical" not in varied.text and interval(varied, 100).startswith("+37.5 [")


def test_an_earlier_file_s_identical_seeds_read_the_new_way(data):
    # Written as "not distinguishable at 2 seeds" with [+0.0, +0.0] before the wording changed.
    results = from_json(CompareResults, data)
    rows, _ = paired_table(results)
    row = rows["Neo − SFT (24 records)"]
    assert row["Δ score, points [95% CI]"] == "identical on every seed (+0.0)"
    assert row["verdict"] == "identical on every seed"
    assert "+0.0 [+0.0, +0.0]" not in " ".join(verdict(results))


def _claim(results: CompareResults, start: str) -> dict[str, str]:
    return next(r for r in claims(results) if r["claim"].startswith(start))


def test_claims_are_judged_only_under_like_conditions(data):
    like = _with_kd(copy.deepcopy(data), cache_teacher=0, kd_ratio=0.9, jobs=1)
    assert _claim(like, "Neo needs about 25% less memory")["status"] == "held"  # 0.5x KD's
    assert _claim(like, "Neo needs about 25% less training time")["status"] == "held"
    assert _claim(like, "Neo scores higher than SFT")["status"] == "not distinguishable"
    assert not any(r["claim"].endswith("int8 teacher") for r in claims(like))  # not a paper's arm

    cached = _with_kd(copy.deepcopy(data), cache_teacher=64, kd_ratio=0.9, jobs=1)
    for claim in ("Neo needs about 25% less memory", "Neo needs about 25% less training time"):
        status = _claim(cached, claim)["status"]
        assert status.startswith("measured under other conditions: KD and Neo read a teacher cache")
        assert "teacher's own time and memory are not in their figures" in status
    assert _claim(cached, "Neo scores higher than SFT")["status"] == "not distinguishable"
    # Both cached, with the cache's own cost reported beside them: like for like (the condition)
    costed = _with_kd(copy.deepcopy(data), cache_teacher=64, kd_ratio=0.9, jobs=1)
    costed.teacher_caches = [
        TeacherCacheCost(path="cache/train", examples=24, seconds=125.0, teacher_parameters=134_515_008)
    ]
    for claim in ("Neo needs about 25% less memory", "Neo needs about 25% less training time"):
        row = _claim(costed, claim)
        assert row["status"] == "held"
        assert "both read the teacher cache, built once in 2.1 min for every KD arm" in row["measured"]
        assert "the teacher's 135M parameters were loaded by neither arm" in row["measured"]
    assert from_json(CompareResults, to_json(costed)).teacher_caches == costed.teacher_caches

    other_ratio = _with_kd(copy.deepcopy(data), cache_teacher=0, kd_ratio=0.5, jobs=1)
    assert _claim(other_ratio, "Neo scores higher than SFT")["status"] == (
        "measured under other conditions: kd_ratio 0.5 (the paper's released recipe: 0.9)"
    )

    loaded_data = copy.deepcopy(data) | {"load_average": 6.5, "cpus": 2}
    loaded = _with_kd(loaded_data, cache_teacher=0, kd_ratio=0.9, jobs=2)
    status = _claim(loaded, "Neo needs about 25% less training time")["status"]
    assert "machine loaded: load 6.5 on 2 CPUs" in status and "2 arms trained at once" in status
    assert _claim(loaded, "Neo needs about 25% less memory")["status"] == "held"
    assert "Cost (training time (machine loaded: load 6.5 on 2 CPUs)" in verdict(loaded)[-1]


def test_the_header_lists_the_settings_that_change_results_and_the_machine(data):
    data |= {"load_average": 6.5, "cpus": 2}
    markdown = to_markdown(report_blocks(from_json(CompareResults, data)), {})
    header = markdown.split("## Verdict")[0]
    for setting in (
        "kd_ratio 0.5",
        "divergence forward_kl",
        "kd_temperature 1.0",  # the file calls it temperature, the option's old name
        "lora.r 4",
        "lora.lora_alpha default",
        "max_steps 2",
        "batch_size 4",
        "grad_accum 1",
        "max_length 64",
        "lr SFT 2e-05, Neo 0.0002",
        "teacher cache top-k 16",
        "Epochs covered: 0.33",
        "Machine: CPU (x86_64, 2 cores), 2 CPUs usable, load average 6.5",
        "(machine loaded: load 6.5 on 2 CPUs)",
    ):
        assert setting in header, setting
    assert "Times (train s, tokens/s) were taken with the machine loaded: load 6.5 on 2 CPUs." in markdown
    del data["cpus"]  # a file from before cpus was kept: the CPU's name says "2 cores"
    assert "(machine loaded: load 6.5 on 2 CPUs)" in to_markdown(
        report_blocks(from_json(CompareResults, data)), {}
    )
    data["load_average"] = 1.5  # under the CPUs: no note anywhere
    assert "machine loaded" not in to_markdown(report_blocks(from_json(CompareResults, data)), {})


def test_new_keys_round_trip(data):
    _set_answers(data, never_stopped=1, looping=2, empty=3)
    data["models"]["student"]["answers"] = {"total": 6, "never_stopped": 6, "looping": 0, "empty": 0}
    data["cpus"] = 2
    assert to_json(from_json(CompareResults, data)) == data


@pytest.mark.parametrize(
    ("a", "b", "records", "within"),
    [
        (2 / 36, 0.0, 36, True),  # the 5.6% against 0%: 2 answers
        (18 / 36, 0.0, 36, False),
        (1 / 6, 0.0, 6, True),  # one record apart is never told apart
        (0.55, 0.45, 1000, False),
        (0.55, 0.45, 100, True),
    ],
)
def test_within_noise(a, b, records, within):
    assert within_noise(a, b, records) is within
