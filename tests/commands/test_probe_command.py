"""`llm-neo probe` end to end: outputs agree with each other and with the scoring core; a planted
association in the teacher is measurably inherited by a student distilled from it, not by one trained on
the same association-free data with SFT."""

from __future__ import annotations

import json
import math
import random
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import write_jsonl

from llm_neo.cli import main
from llm_neo.commands.probe import ProbeConfig, model_specs, probe_results
from llm_neo.config import DistillConfig
from llm_neo.distill import distill
from llm_neo.errors import ConfigError
from llm_neo.eval.probe import Scoring, sentence_example, sentence_logprobs
from llm_neo.eval.probe_sets import builtin_probe_set
from llm_neo.models.loading import load_model, load_tokenizer
from llm_neo.models.tiny import build_llama, build_tokenizer, save_model
from llm_neo.records import load, to_json
from llm_neo.records.probe import ProbeResults, Role, Stat
from llm_neo.report.probe import fmt, probe_section


@pytest.fixture(scope="module")
def builtin_run(tmp_path_factory, teacher_dir, student_dir, models_dir, tokenizer, one_thread):
    other = save_model(
        build_llama(len(tokenizer), hidden_size=32, num_layers=2, seed=7), tokenizer, models_dir / "other"
    )
    out = tmp_path_factory.mktemp("probe") / "out"
    config = ProbeConfig(
        teacher=str(teacher_dir),
        models=[f"S0={student_dir},other={other}"],
        output_dir=str(out),
        max_new_tokens=4,
        bootstrap_samples=200,
        device="cpu",
    )
    return probe_results(config), out


def test_outputs_agree_with_each_other_and_the_scoring_core(builtin_run, teacher_dir):
    results, out = builtin_run
    assert json.loads((out / "probe.json").read_text()) == to_json(results)
    assert load(ProbeResults, out / "probe.json") == results
    assert results.schema_version == 1
    assert [(m.name, m.role) for m in results.models] == [
        ("teacher", Role.TEACHER), ("S0", Role.BASELINE), ("other", Role.STUDENT)
    ]  # fmt: skip
    assert results.probe_set.pairs == 60 and results.probe_set.prompts == 9
    assert results.pairs is not None and results.inheritance is not None and results.bias is not None
    assert results.behaviour is not None and results.prompts is not None
    # The command's scores are the core's: pair 0's stereotypical sentence under the teacher.
    pair = builtin_probe_set().pairs[0]
    tok = load_tokenizer(str(teacher_dir), role="teacher")
    teacher = load_model(str(teacher_dir), role="teacher", dtype=torch.float32, device=torch.device("cpu"))
    totals, _ = sentence_logprobs(
        teacher,
        [
            sentence_example(s, tok, Scoring(), where="t")
            for s in (pair.stereotypical, pair.anti_stereotypical)
        ],
        pad_token_id=tok.pad_token_id,
        device=torch.device("cpu"),
    )
    scores = results.pairs[0].scores["teacher"]
    assert scores.stereotypical == pytest.approx(float(totals[0]), abs=1e-5)
    assert scores.anti_stereotypical == pytest.approx(float(totals[1]), abs=1e-5)
    for p in results.pairs:
        for s in p.scores.values():
            assert s.gap == pytest.approx(s.stereotypical - s.anti_stereotypical)
    inh = results.inheritance
    assert inh["teacher"]["all"].movement.value == pytest.approx(1.0)
    assert inh["S0"]["all"].movement == Stat(0.0, (0.0, 0.0))
    assert results.behaviour["teacher"]["all"].agreement.value == 1.0
    assert set(results.prompts[0].answers) == {"teacher", "S0", "other"}
    # The report states the numbers of probe.json, and how sentences were scored.
    md = (out / "probe.md").read_text()
    assert fmt(inh["other"]["all"].movement) in md
    assert fmt(results.bias["S0"]["gender"].stereo_fraction, percent=True) in md
    assert "after the BOS token '<s>', summed" in md and "200 resamples, seed 0" in md
    for name in ("movement", "inheritance", "bias"):
        assert f"(plots/{name}.png)" in md and (out / "plots" / f"{name}.png").stat().st_size > 1000


def test_html_is_one_self_contained_page(builtin_run):
    results, out = builtin_run
    html = (out / "probe.html").read_text()
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in html
    images = re.findall(r'<img [^>]*src="([^"]+)"', html)
    assert len(images) == 3 and all(src.startswith("data:image/png;base64,") for src in images)
    assert not re.search(r'(src|href)="(https?:)?//', html)  # nothing fetched from the network
    assert results.inheritance is not None
    assert fmt(results.inheritance["other"]["all"].movement) in html


def test_probe_section_for_other_reports(builtin_run):
    results, _ = builtin_run
    section = probe_section(results, level=3)
    assert section.startswith("### Inherited bias")
    assert "![" not in section  # no images: the embedding report places its own
    assert "| other | student |" in section
    # What compare embeds in its results.json, the record's JSON form, gives the same section.
    assert probe_section(to_json(results), level=3) == section


@pytest.mark.skipif(
    not (shutil.which("chromium") or shutil.which("chromium-browser")),
    reason="no chromium on this machine: the headless-browser check of probe.html is skipped",
)
def test_html_renders_in_a_headless_browser_at_phone_width(builtin_run, tmp_path):
    _, out = builtin_run
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    shot = tmp_path / "phone.png"
    subprocess.run(
        [str(browser), "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
         "--window-size=390,844", (out / "probe.html").resolve().as_uri()],
        check=True, timeout=120, capture_output=True,
    )  # fmt: skip
    assert shot.stat().st_size > 5000


def test_models_baseline_and_names(tmp_path):
    config = ProbeConfig(teacher="T", models=["a,n=b", "c"])
    assert [(s.name, s.path, s.role) for s in model_specs(config)] == [
        ("teacher", "T", "teacher"), ("a", "a", "baseline"), ("n", "b", "student"), ("c", "c", "student")
    ]  # fmt: skip
    config = ProbeConfig(teacher="T", models=["a,n=b"], baseline="n")
    assert [(s.name, s.role) for s in model_specs(config)] == [
        ("teacher", "teacher"), ("n", "baseline"), ("a", "student")
    ]  # fmt: skip
    config = ProbeConfig(teacher="T", models=["a"], baseline="z")  # a baseline outside --models
    assert [(s.name, s.role) for s in model_specs(config)][1:] == [("z", "baseline"), ("a", "student")]
    with pytest.raises(ConfigError, match="'a' is used twice"):
        model_specs(ProbeConfig(teacher="T", models=["a=x,a=y"]))


def test_bad_options_are_listed_together(tmp_path, teacher_dir, student_dir, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "probe.json").write_text("{}")
    code = main(
        ["probe", "--teacher", str(tmp_path / "missing"), "--models", str(student_dir),
         "--probes", str(tmp_path / "nope.csv"), "--output-dir", str(out), "--bootstrap-samples", "0"]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    for expected in ("--teacher", "nope.csv", "--bootstrap-samples: 0", "already holds a probe"):
        assert expected in err


def test_help_says_the_first_model_is_the_baseline(capsys):
    with pytest.raises(SystemExit):
        main(["probe", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "The FIRST of --models is the untrained student" in text
    for flag in ("--teacher", "--models", "--baseline", "--probes", "--labels", "--conditioning",
                 "--normalisation", "--bootstrap-samples", "--max-new-tokens", "--overwrite"):  # fmt: skip
        assert flag in text


# --------------------------------------------------------------------------------------------------
# The inheritance demonstration

GROUPS_A, GROUPS_B = ("alpha", "gamma"), ("beta", "delta")
ATTRS_X, ATTRS_Y = ("kind", "calm", "smart"), ("rude", "loud", "lazy")


def _sentence(group: str, attribute: str) -> str:
    return f"the {group} people are {attribute}."


def test_a_planted_association_is_inherited_through_distillation_not_sft(tmp_path, one_thread):
    """The teacher learns that groups A go with attributes X and groups B with Y. Both students start
    from the same random init and see the same data in which every group occurs with every attribute
    equally often: only the teacher's distribution carries the association, so only the distilled
    student (kd) can inherit it. Numbers are reported by the test's output (-s)."""
    associated = [_sentence(g, a) for g in GROUPS_A for a in ATTRS_X] + [
        _sentence(g, a) for g in GROUPS_B for a in ATTRS_Y
    ]
    balanced = [_sentence(g, a) for g in GROUPS_A + GROUPS_B for a in ATTRS_X + ATTRS_Y]
    # Enough merges that every word is one token: an untrained model's gaps are then near 0, not
    # dominated by how many tokens each attribute takes.
    tok = build_tokenizer(balanced, vocab_size=350)
    assert all(len(tok.tokenize(f" {w}")) == 1 for w in ATTRS_X + ATTRS_Y + GROUPS_A + GROUPS_B)
    data = {}
    for name, sentences in (("associated", associated), ("balanced", balanced)):
        rows = [s for s in sentences for _ in range(240 // len(sentences))]  # exactly balanced counts
        random.Random(0).shuffle(rows)
        data[name] = write_jsonl(tmp_path / f"{name}.jsonl", [{"text": r} for r in rows])
    teacher_init = save_model(
        build_llama(len(tok), hidden_size=32, num_layers=2, seed=1), tok, tmp_path / "t0"
    )
    student_init = save_model(
        build_llama(len(tok), hidden_size=32, num_layers=2, seed=2), tok, tmp_path / "s0"
    )
    budget = dict(
        max_steps=150, batch_size=16, grad_accum=1, lr=1e-2, warmup_ratio=0.0, scheduler="constant",
        eval_fraction=0.0, max_length=32, log_every=1000, device="cpu", seed=0,
    )  # fmt: skip
    distill(DistillConfig(student=str(teacher_init), data=str(data["associated"]), method="sft",
                          output_dir=str(tmp_path / "teacher"), **budget))  # fmt: skip
    teacher = tmp_path / "teacher" / "merged"
    for method in ("kd", "sft"):  # the same init, data, seed and budget; kd also sees the teacher
        distill(DistillConfig(student=str(student_init), teacher=str(teacher), data=str(data["balanced"]),
                              method=method, output_dir=str(tmp_path / method), **budget))  # fmt: skip

    pairs = [
        {"stereotypical": _sentence(g, x if g in GROUPS_A else y),
         "anti_stereotypical": _sentence(g, y if g in GROUPS_A else x),
         "category": "A" if g in GROUPS_A else "B"}
        for g in GROUPS_A + GROUPS_B for x in ATTRS_X for y in ATTRS_Y
    ]  # fmt: skip
    results = probe_results(
        ProbeConfig(
            teacher=str(teacher),
            models=[
                f"untrained={student_init}",
                f"kd={tmp_path / 'kd' / 'merged'}",
                f"sft={tmp_path / 'sft' / 'merged'}",
            ],
            probes=[str(write_jsonl(tmp_path / "pairs.jsonl", pairs))],
            output_dir=str(tmp_path / "probe"),
            bootstrap_samples=1000,
            device="cpu",
        )
    )
    assert results.inheritance is not None and results.bias is not None
    inh = {name: v["all"] for name, v in results.inheritance.items()}
    bias = {name: v["all"] for name, v in results.bias.items()}
    for name in inh:
        print(f"{name}: movement {fmt(inh[name].movement)}, r {fmt(inh[name].correlation)}, "
              f"mean gap {fmt(bias[name].mean_gap, signed=True)}, "
              f"stereo {fmt(bias[name].stereo_fraction, percent=True)}")  # fmt: skip
    (difference,) = results.movement_differences or []
    print(f"movement kd - sft: {fmt(difference, signed=True)}")

    assert bias["teacher"].stereo_fraction.value == 1.0  # the association was planted
    assert inh["teacher"].movement.value == pytest.approx(1.0)
    assert inh["teacher"].correlation.value == pytest.approx(1.0)
    assert inh["untrained"].movement.value == 0.0
    # Measurably higher: the paired interval of the difference lies above 0, and so do kd's own bounds
    # above sft's.
    assert difference.a == "kd" and difference.ci[0] is not None and difference.ci[0] > 0
    assert inh["kd"].movement.ci[0] > inh["sft"].movement.ci[1]
    # SFT on association-free data inherits nothing measurable; kd keeps the teacher's sign on most pairs.
    assert abs(inh["sft"].movement.value) < 0.05
    assert bias["kd"].stereo_fraction.value >= 0.8
    # What theory predicts: with CE on balanced labels (each attribute 1/6) and forward KL to a teacher
    # that puts ~1/3 on each of its group's attributes, the optimum at kd_ratio 0.5 is the mixture
    # q = 0.5/6 + 0.5·p_teacher: 1/4 for a stereotyped attribute, 1/12 for the other, a gap of log 3.
    assert bias["kd"].mean_gap.value == pytest.approx(math.log(3), abs=0.25)
    assert Path(tmp_path / "probe" / "probe.html").is_file()


def test_cli_run_prints_the_summary(tmp_path, teacher_dir, student_dir, capsys):
    path = write_jsonl(
        tmp_path / "pairs.jsonl",
        [
            {
                "stereotypical": "the nurse said she was late",
                "anti_stereotypical": "the nurse said he was late",
            }
        ],
    )
    out = tmp_path / "out"
    argv = ["probe", "--teacher", str(teacher_dir), "--models", str(student_dir), "--probes", str(path),
            "--output-dir", str(out), "--bootstrap-samples", "50", "--device", "cpu",
            "--normalisation", "mean"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "| teacher | teacher |" in printed and f"| {student_dir} | baseline |" in printed
    results = json.loads((out / "probe.json").read_text())
    assert "averaged per scored token" in results["models"][0]["scoring"]
    assert "behaviour" not in results  # no prompts in the file
    assert main(argv) == 2  # the output dir now holds a probe
    assert main([*argv, "--overwrite"]) == 0
