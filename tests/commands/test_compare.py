"""`llm-neo compare` end to end on tiny models: the report's numbers are the arms' own, a killed comparison
continues without retraining what finished, the statistics are the textbook ones, the HTML report shows
every arm in a real browser, and bad input is refused before anything trains."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_comparison, write_jsonl

from llm_neo.commands.compare import CompareConfig, compare
from llm_neo.errors import ConfigError, DataError
from llm_neo.records import load, to_json
from llm_neo.records.compare import CompareResults, ModelScores, Verdict
from llm_neo.report.compare import verdict
from llm_neo.report.stats import in_words, paired_difference, summarize, t975
from llm_neo.summary import MemoryKind, RunSummary

pytestmark = pytest.mark.usefixtures("one_thread")


def _records(n: int, start: int = 0) -> list[dict]:
    return [
        {
            "instruction": f"Add {i} and 1.",
            "input": "",
            "output": str(i + 1),
            "category": "even" if i % 2 == 0 else "odd",
        }
        for i in range(start, start + n)
    ]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("compare-data")
    return write_jsonl(root / "train.jsonl", _records(24)), write_jsonl(
        root / "heldout.jsonl", _records(6, 100)
    )


def _config(teacher_dir, student_dir, data, out: Path, **overrides) -> CompareConfig:
    train, heldout = data
    return tiny_comparison(
        teacher_dir, student_dir, out, **({"data": str(train), "heldout": str(heldout)} | overrides)
    )


@pytest.fixture(scope="module")
def finished(tmp_path_factory, teacher_dir, student_dir, data) -> tuple[CompareResults, Path]:
    out = tmp_path_factory.mktemp("compare") / "out"
    results = compare(_config(teacher_dir, student_dir, data, out))
    assert results is not None
    return results, out


def test_the_report_holds_each_arms_own_numbers(finished):
    results, out = finished
    assert load(CompareResults, out / "results.json") == results
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(to_json(results)))
    assert results.schema_version == 1
    assert [(g.method, len(g.runs)) for g in results.groups] == [("sft", 2), ("neo", 2)]
    for group in results.groups:
        for run in group.runs:
            summary = RunSummary.load(run.output_dir)
            assert summary.method == group.method and summary.config["seed"] == run.seed
            assert run.train_time_s == summary.train_time_s
            assert run.peak_memory_gb == summary.peak_memory_gb
            assert run.peak_memory_kind is MemoryKind(summary.peak_memory_kind) is MemoryKind.PROCESS_MAX_RSS
            assert run.tokens_per_s == pytest.approx(summary.tokens_trained / summary.train_time_s)
            # Every token the steps ran through, prompts too: more than the response tokens trained on.
            assert summary.tokens_processed is not None and summary.tokens_processed > summary.tokens_trained
            assert run.tokens_processed_per_s == pytest.approx(
                summary.tokens_processed / summary.train_time_s
            )
            scores = load(ModelScores, out / "eval" / f"{run.name}.json")
            assert run.accuracy == scores.accuracy and run.ce == scores.ce
        accuracies = [r.accuracy for r in group.runs]
        assert group.stats.accuracy == summarize(accuracies)
        processed = summarize([r.tokens_processed_per_s for r in group.runs])
        assert group.stats.tokens_processed_per_s == processed
        assert results.cost.arms[group.method].tokens_processed_per_s == processed.mean
    # The teacher and the untrained student are scored on the same records as the arms.
    assert [name for name, _ in results.models.items()] == ["teacher", "student"]
    assert results.models.teacher is not None
    assert results.models.teacher.kl_to_teacher == pytest.approx(0.0, abs=1e-6)
    assert {r.total for _, r in results.models.items()} == {6}
    # The same learning-rate rule as distill: LoRA arms 10x the full-parameter rate.
    assert {g.method: g.runs[0].lr for g in results.groups} == {"sft": 2e-5, "neo": 2e-4}


def test_every_models_answers_are_counted_and_the_floor_is_said(finished):
    results, out = finished
    for _, scores in results.models.items():
        assert scores.answers is not None and scores.answers.total == 6
    for group in results.groups:
        for run in group.runs:
            assert run.answers == load(ModelScores, out / "eval" / f"{run.name}.json").answers
            assert run.answers is not None and run.answers.total == 6
            assert max(run.answers.never_stopped, run.answers.looping, run.answers.empty) <= 6
    # Two steps of tiny random models: every arm stays at the untrained student's floor.
    assert results.cpus is not None and results.cpus >= 1
    assert verdict(results)[0].startswith("No arm learned the task")
    assert "--max-steps 18 covers 3" in verdict(results)[0]


def test_the_paired_difference_is_neo_minus_the_arm_at_each_seed(finished):
    results, _ = finished
    (row,) = results.paired
    assert row.against == "sft" and row.ce is not None
    neo = {r.seed: r for r in next(g for g in results.groups if g.method == "neo").runs}
    sft = {r.seed: r for r in next(g for g in results.groups if g.method == "sft").runs}
    diffs = [neo[s].ce - sft[s].ce for s in sorted(neo)]
    assert row.ce.mean == pytest.approx(sum(diffs) / 2)
    assert row.ce.n == 2


def test_paired_statistics_equal_a_hand_computation():
    a, b = [0.70, 0.80, 0.60], [0.60, 0.75, 0.65]
    got = paired_difference(a, b)
    diffs = [0.10, 0.05, -0.05]
    mean = sum(diffs) / 3
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
    half = 4.303 * sd / math.sqrt(3)  # t(0.975, 2) from the tables
    assert got.mean == pytest.approx(mean)
    assert got.ci == pytest.approx((mean - half, mean + half))
    assert got.verdict is Verdict.NEITHER and got.text == "not distinguishable at 3 seeds"
    clear = paired_difference([0.9, 0.91, 0.92], [0.5, 0.52, 0.49])
    assert clear.verdict is Verdict.A and clear.ci is not None and clear.ci[0] > 0 and clear.text == "better"
    lower_is_better = paired_difference([0.9, 0.91, 0.92], [0.5, 0.52, 0.49], higher_is_better=False)
    assert lower_is_better.verdict is Verdict.B
    single = paired_difference([0.9], [0.1])
    assert single.ci is None and single.text == "not distinguishable at 1 seed"
    assert t975(1) == 12.706 and t975(30) == 2.042 and t975(200) == 1.96


def test_report_files(finished):
    results, out = finished
    md, html = (out / "report.md").read_text(), (out / "report.html").read_text()
    assert md.index("## Verdict") < md.index("## Results")  # the verdict first
    said = in_words(results.paired[0].accuracy)  # whichever it is: at the floor, identical on every seed
    for text in (md, html):
        assert "Neo − SFT" in text and said in text
    assert html.count("data:image/png;base64,") >= 4 and "<script" not in html
    assert all((out / "plots" / f"{name}.png").is_file() for name in ("scores", "memory", "time", "loss"))
    neo = next(g for g in results.groups if g.method == "neo").stats.accuracy
    assert f"{100 * neo.mean:.1f} ± {100 * neo.std:.1f}" in md
    # The verdict names the fastest arm and the one that needed least memory, whichever they are.
    groups = results.groups
    fastest = min(groups, key=lambda g: results.cost.arms[g.method].train_time_s)
    tensors = all(g.stats.peak_tensor_memory_gb is not None for g in groups)
    smallest = min(
        groups, key=lambda g: (g.stats.peak_tensor_memory_gb if tensors else g.stats.peak_memory_gb).mean
    )
    labels = {"sft": "SFT", "neo": "Neo"}
    assert f"Fastest: {labels[fastest.method]}; least memory: {labels[smallest.method]}." in md
    # Each arm's rerun command points at its own config.yaml with an absolute path.
    for group in results.groups:
        assert str(group.runs[0].output_dir.resolve() / "config.yaml") in md
    # The load the arms trained under: sampled while they trained, its mean and highest in the header
    assert results.load_average is not None and results.load_max is not None
    assert results.load_average <= results.load_max
    assert (
        f"load average {results.load_average:g} while the arms trained (highest {results.load_max:g})" in md
    )


@pytest.mark.skipif(
    shutil.which("chromium") is None, reason="no chromium: the browser check of report.html is skipped"
)
def test_the_html_report_in_a_real_browser(finished, tmp_path):
    import matplotlib.image

    _, out = finished
    page = (out / "report.html").resolve().as_uri()
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--no-first-run",
    ]
    dom = subprocess.run(
        ["chromium", *flags, "--dump-dom", page], capture_output=True, text=True, timeout=120
    ).stdout
    for name in ("SFT", "Neo", "teacher", "untrained student"):
        assert f"<th>{name}</th>" in dom
    shot = tmp_path / "report.png"
    subprocess.run(["chromium", *flags, f"--screenshot={shot}", "--window-size=1200,6000", page],
                   capture_output=True, timeout=120, check=True)  # fmt: skip
    pixels = (matplotlib.image.imread(shot)[:, :, :3] * 255).round()
    # The plots are drawn: the arms' colours (Neo's green, SFT's grey) are on the rendered page.
    for colour in ((44, 160, 44), (127, 127, 127)):
        assert (abs(pixels - colour).max(axis=-1) < 6).sum() > 200, colour


def test_a_killed_comparison_continues_without_retraining(tmp_path, teacher_dir, student_dir, data):
    out = tmp_path / "out"
    config = _config(teacher_dir, student_dir, data, out, max_steps=6, save_every=2)
    args = [
        sys.executable, "-m", "llm_neo", "compare", "--teacher", config.teacher, "--student", config.student,
        "--data", config.data, "--heldout", str(config.heldout), "--methods", "sft,neo", "--seeds", "1",
        "--max-steps", "6", "--save-every", "2", "--batch-size", "4", "--grad-accum", "1", "--lora.r", "4",
        "--max-length", "64", "--max-new-tokens", "4", "--jobs", "1", "--device", "cpu",
        "--output-dir", str(out),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    second = out / "arms" / "neo-seed42" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not (second.is_dir() and any(second.iterdir())):
        assert proc.poll() is None, "the comparison ended before its second arm was killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the comparison and its worker, at once
    proc.wait()
    first = out / "arms" / "sft-seed42" / "summary.json"
    assert first.is_file() and not (out / "results.json").exists()
    before = first.stat().st_mtime_ns
    assert subprocess.run(args, env=env, capture_output=True, timeout=600).returncode == 0
    assert first.stat().st_mtime_ns == before  # the finished arm was kept, not trained again
    results = load(CompareResults, out / "results.json")
    neo = next(g for g in results.groups if g.method == "neo").runs[0]
    assert RunSummary.load(neo.output_dir).steps == 6  # the killed arm resumed and ran to the end
    # A changed option that alters the results is refused, naming it.
    changed = subprocess.run([*args[:-2], "--output-dir", str(out), "--kd-ratio", "0.9"], env=env,
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    assert changed.returncode == 2 and "kd_ratio" in changed.stderr


def test_bad_input_is_refused_before_anything_trains(tmp_path, teacher_dir, student_dir, data):
    out = tmp_path / "out"
    with pytest.raises(
        ConfigError, match=r"--methods: 'dpo': the arm's method must be one of neo, kd, lora, sft"
    ):
        compare(_config(teacher_dir, student_dir, data, out, methods=["sft", "dpo"]))
    with pytest.raises(ConfigError, match="does not compile"):
        compare(_config(teacher_dir, student_dir, data, out, score="regex:(unclosed"))
    with pytest.raises(ConfigError, match=r"--train-records: \[1000\] exceed the 24 training records"):
        compare(_config(teacher_dir, student_dir, data, out, train_records=[8, 1000]))
    with pytest.raises(ConfigError, match=r"--gpu-price prices the projection: give --project-tokens"):
        compare(_config(teacher_dir, student_dir, data, out, gpu_price=2.5))
    with pytest.raises(ConfigError, match=r"gpu-price.*>= 0"):
        compare(_config(teacher_dir, student_dir, data, out, gpu_price=-1.0, project_tokens="1M", gpu="h100"))
    texts = write_jsonl(tmp_path / "texts.jsonl", [{"text": "no reference here"}] * 3)
    with pytest.raises(DataError, match=r"texts.jsonl: 3 of 3 records have no reference response"):
        compare(_config(teacher_dir, student_dir, data, out, heldout=str(texts)))
    assert not (out / "arms").exists()


def test_a_data_size_axis(tmp_path, teacher_dir, student_dir, data):
    results = compare(
        _config(
            teacher_dir, student_dir, data, tmp_path / "out", methods=["lora"], seeds=1, train_records=[8, 16]
        )
    )
    assert results is not None
    assert [(g.method, g.records) for g in results.groups] == [("lora", 8), ("lora", 16)]
    small = results.groups[0].runs[0].output_dir
    assert len((small.parent.parent / "splits" / "train-n8.jsonl").read_text().splitlines()) == 8
    assert "Score against training records" in (tmp_path / "out" / "report.md").read_text()


def test_the_reproduce_command_works_from_anywhere(tmp_path, teacher_dir, student_dir, data, monkeypatch):
    """Run with relative paths, the report's rerun command, pasted from another directory, retrains the
    arm to the same weights (up to float rounding)."""
    import re

    from safetensors.torch import load_file

    from llm_neo.cli import main

    work = tmp_path / "work"
    (work / "models").mkdir(parents=True)
    os.symlink(student_dir, work / "models" / "student")
    os.symlink(teacher_dir, work / "models" / "teacher")
    shutil.copy(data[0], work / "train.jsonl")
    shutil.copy(data[1], work / "heldout.jsonl")
    monkeypatch.chdir(work)
    relative = ("models/teacher", "models/student"), ("train.jsonl", "heldout.jsonl")
    results = compare(_config(*relative[0], relative[1], Path("out"), methods=["neo"], seeds=1))
    (command,) = re.findall(
        r"`(llm-neo distill --config \S+ --overwrite)`", (work / "out" / "report.md").read_text()
    )
    assert results is not None
    arm = results.groups[0].runs[0].output_dir
    assert arm.is_absolute()
    before = load_file(arm / "merged" / "model.safetensors")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(command.split()[1:]) == 0
    after = load_file(arm / "merged" / "model.safetensors")
    # The same run up to float rounding: the comparison trained it in a worker process, whose kernels
    # may sum in another order (about 1e-9 here); a wrong data file, seed or rate would be far off.
    assert before.keys() == after.keys()
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=1e-7)
    assert list(elsewhere.iterdir()) == []  # nothing written where it was pasted


def test_quantized_arms_beside_their_method(tmp_path, teacher_dir, wide_student_dir, data):
    """neo+int8-teacher trains on its own int8-teacher cache at Neo's learning rate, neo+nf4-student on
    a QLoRA base; both are scored against the same (unquantized) teacher, paired with Neo, and the report
    says what each saved and cost."""
    pytest.importorskip("torchao", reason="the quant extra is not installed: pip install 'llm-neo[quant]'")
    pytest.importorskip("bitsandbytes", reason="the quant extra is not installed")
    arms = ["neo", "neo+int8-teacher", "neo+nf4-student"]
    out = tmp_path / "out"
    results = compare(
        _config(teacher_dir, wide_student_dir, data, out, methods=arms, seeds=1, cache_teacher=16)
    )
    assert results is not None
    groups = {g.method: g for g in results.groups}
    assert list(groups) == arms
    assert groups["neo+int8-teacher"].base_method == "neo"
    assert groups["neo+int8-teacher"].quantization == {"teacher_quant": "int8"}
    runs = {name: g.runs[0] for name, g in groups.items()}
    assert runs["neo"].teacher_quant is None and runs["neo"].student_quant is None
    # RunSummary's quantization dicts, carried as they are.
    int8, nf4 = runs["neo+int8-teacher"].teacher_quant, runs["neo+nf4-student"].student_quant
    assert int8 is not None and int8["kind"] == "int8" and int8["drift"]["kl_per_token"] < 1e-4
    assert nf4 is not None and nf4["kind"] == "nf4"
    assert runs["neo+nf4-student"].teacher_quant is None
    assert len({r.lr for r in runs.values()}) == 1  # every variant at the method's learning rate
    # One teacher cache per teacher quantization, each what its arms trained on.
    caches = sorted(p.name for p in (out / "cache").iterdir())
    assert caches == ["train", "train-int8-teacher"]
    manifest = json.loads((out / "cache" / "train-int8-teacher" / "manifest.json").read_text())
    assert manifest["teacher_quant"]["kind"] == "int8"
    # What building each cost, once, is in the results (the claims read it)
    costs = {Path(c.path).name: c for c in results.teacher_caches or []}
    assert sorted(costs) == caches and costs["train-int8-teacher"].seconds == manifest["stats"]["wall_s"] > 0
    assert (
        costs["train"].examples == 24
        and costs["train"].teacher_parameters == results.models.teacher.parameters
    )
    summary = RunSummary.load(runs["neo+int8-teacher"].output_dir)
    assert summary.teacher_cache["path"].endswith("train-int8-teacher")
    # The teacher every model is scored against is the unquantized one.
    assert results.models.teacher is not None
    assert results.models.teacher.kl_to_teacher == pytest.approx(0.0, abs=1e-6)
    assert [p.against for p in results.paired] == ["neo+int8-teacher", "neo+nf4-student"]
    report = (out / "report.md").read_text()
    assert "## Quantization: what it saved, what it cost" in report
    assert "Neo + int8 teacher" in report and "Neo + nf4 student" in report
    assert "int8 (torchao)" in report


def test_probes_add_what_each_arm_inherited_to_the_report(tmp_path, teacher_dir, student_dir, data):
    probes = write_jsonl(
        tmp_path / "probes.jsonl",
        [
            {"stereotypical": f"the {g} people are kind.", "anti_stereotypical": f"the {g} people are rude."}
            for g in ("alpha", "beta", "gamma", "delta")
        ]
        + [{"prompt": "Add 2 and 1.", "category": "benign"}],
    )
    out = tmp_path / "out"
    results = compare(
        _config(teacher_dir, student_dir, data, out, methods=["sft", "neo"], seeds=1, probes=[str(probes)])
    )
    assert results is not None and results.probe is not None
    found = results.probe  # llm-neo probe's results, as probe.json holds them
    assert json.loads((out / "probe" / "probe.json").read_text()) == json.loads(json.dumps(found))
    assert [m["name"] for m in found["models"]] == ["teacher", "student", "sft", "neo"]
    # The probed arms are the arms' own merged models.
    assert {m["name"]: m["path"] for m in found["models"]}[
        "neo"
    ] == f"{results.groups[1].runs[0].output_dir}/merged"
    movement = {name: inh["all"]["movement"]["value"] for name, inh in found["inheritance"].items()}
    assert movement["teacher"] == pytest.approx(1.0) and movement["student"] == pytest.approx(0.0, abs=1e-9)
    report = (out / "report.md").read_text()
    assert "Inherited bias: what the students took from the teacher" in report
    assert (out / "plots" / "movement.png").is_file()
    with pytest.raises(ConfigError, match=r"--probes: 'missing\.jsonl' is not a file"):
        compare(_config(teacher_dir, student_dir, data, tmp_path / "o2", probes=["missing.jsonl"]))


def test_quantized_arms_that_cannot_work_are_refused(tmp_path, teacher_dir, student_dir, data):
    out = tmp_path / "out"
    with pytest.raises(
        ConfigError, match=r"'neo\+int4-teacher': 'int4-teacher' is not a variant; use one of"
    ):
        compare(_config(teacher_dir, student_dir, data, out, methods=["neo+int4-teacher"]))
    with pytest.raises(ConfigError, match=r"kd\+nf4-student: --student-quant nf4: QLoRA quantizes"):
        compare(_config(teacher_dir, student_dir, data, out, methods=["neo", "kd+nf4-student"]))
    with pytest.raises(ConfigError, match="sets --teacher-quant twice"):
        compare(_config(teacher_dir, student_dir, data, out, methods=["neo+int8-teacher+nf4-teacher"]))
    assert not (out / "arms").exists()


@pytest.mark.slow
def test_a_signal_stops_the_comparison_and_a_rerun_continues(tmp_path, teacher_dir, student_dir, data):
    out = tmp_path / "out"
    config = _config(teacher_dir, student_dir, data, out)
    args = [
        sys.executable, "-m", "llm_neo", "compare", "--teacher", config.teacher, "--student", config.student,
        "--data", config.data, "--heldout", str(config.heldout), "--methods", "sft,neo", "--seeds", "1",
        "--max-steps", "40", "--batch-size", "4", "--grad-accum", "1", "--lora.r", "4",
        "--max-length", "64", "--max-new-tokens", "4", "--jobs", "1", "--device", "cpu",
        "--output-dir", str(out),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True)
    metrics = out / "arms" / "neo-seed42" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGTERM)  # the parent alone (docker stop): it passes the stop on
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err
    (checkpoint,) = (out / "arms" / "neo-seed42" / "checkpoints").iterdir()
    step = int(checkpoint.name.removeprefix("step-"))
    assert f"neo-seed42: stopped by SIGTERM after step {step} of 40: checkpoint {checkpoint} written" in err
    assert "sft-seed42: finished" in err and "Start again with: the same command" in err
    first = out / "arms" / "sft-seed42" / "summary.json"
    before = first.stat().st_mtime_ns

    assert subprocess.run(args, env=env, capture_output=True, timeout=600).returncode == 0
    assert first.stat().st_mtime_ns == before  # kept
    lines = metrics.read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 41))  # resumed, not restarted
    # A damaged score cache is scored again, with a warning, to the same numbers.
    results = load(CompareResults, out / "results.json")
    cached = out / "eval" / "neo-seed42.json"
    cached.write_text(cached.read_text().replace('"accuracy": ', '"accuracy": 1', 1))
    again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and f"{cached} is damaged (its checksum does not match" in again.stderr
    assert load(CompareResults, out / "results.json").groups == results.groups


def test_a_comparison_from_before_the_kd_temperature_rename_continues(
    tmp_path, teacher_dir, student_dir, data
):
    """compare.yaml written with the old key ``temperature`` reads as kd_temperature: the same options,
    so no change is reported; a different value still is."""
    from llm_neo.commands.compare import _changed_options
    from llm_neo.config import dump_yaml

    config = _config(teacher_dir, student_dir, data, tmp_path / "out", kd_temperature=2.0)
    saved = tmp_path / "compare.yaml"
    dump_yaml(config, saved)
    text = saved.read_text()
    assert "kd_temperature: 2.0" in text
    saved.write_text(text.replace("kd_temperature:", "temperature:"))
    assert _changed_options(config, saved) == []
    saved.write_text(text.replace("kd_temperature: 2.0", "temperature: 3.0"))
    assert _changed_options(config, saved) == ["kd_temperature"]


def test_score_teacher_measures_agreement_with_the_teachers_own_answers(
    tmp_path, teacher_dir, student_dir, data
):
    """--score teacher: the teacher's greedy answers are everyone's references (it scores 100%), and a
    model's score is the share of its greedy answers equal to the teacher's after normalizing."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_neo.data import load_records
    from llm_neo.eval.generate import greedy_generations
    from llm_neo.eval.scoring import normalize

    with pytest.raises(ConfigError, match=r"--score teacher scores agreement with the teacher's own answers"):
        compare(_config(teacher_dir, student_dir, data, tmp_path / "refused", score="teacher", teacher=None))
    out = tmp_path / "out"
    results = compare(
        _config(teacher_dir, student_dir, data, out, score="teacher", methods=["lora"], seeds=1)
    )
    assert results is not None
    teacher, student = results.models.teacher, results.models.student
    assert teacher is not None and teacher.accuracy == 1.0 and teacher.correct == teacher.total == 6
    assert teacher.greedy_answers is not None and len(teacher.greedy_answers) == 6
    # The untrained student's score, computed by hand from its own greedy answers.
    records = load_records(str(data[1]))
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    model = AutoModelForCausalLM.from_pretrained(student_dir)
    answers, _ = greedy_generations(model, tokenizer, records, device=torch.device("cpu"), max_new_tokens=4)
    agree = sum(normalize(a) == normalize(t) for a, t in zip(answers, teacher.greedy_answers, strict=True))
    assert student.correct == agree
    assert [e.expected for e in student.examples] == teacher.greedy_answers[:5]  # shown against the teacher
    assert "a fidelity score" in (out / "report.md").read_text()
