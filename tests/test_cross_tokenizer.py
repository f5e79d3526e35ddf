"""Cross-tokenizer Neo end to end on tiny models: a teacher whose tokenizer splits the text differently,
the identity through the cross path, a permuted vocabulary, check-pair, and the refusals."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import ALPACA, tiny_run, write_jsonl
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from llm_neo import cross_tokenizer
from llm_neo.alignment import CrossPair, aligned_targets, spread_targets
from llm_neo.cli import main
from llm_neo.data import load_records, split_heldout, tokenize_records
from llm_neo.distill import distill
from llm_neo.errors import ConfigError
from llm_neo.losses import HeadInput, LossOptions, chunked_distill_loss
from llm_neo.models.loading import load_tokenizer
from llm_neo.models.tiny import build_llama, build_tokenizer, save_model
from llm_neo.records.pair import PAIR_VERSION, PairReport, TokenizerSide, pair_lines

# Another corpus and size: words, digits and spaces merge differently from the student's tokenizer.
TEACHER_CORPUS = (
    "What is the capital of France? Paris is the capital. Add the numbers 2 + 3 = 5 and 10 + 7 = 17.",
    "Reverse the string abc to cba and dog to god. Say hello there, friend! Count the letters of fox.",
    "Sort the digits 3 1 2 to 1 2 3. Below is an instruction that describes a task.",
)


@pytest.fixture(scope="module")
def xt_teacher_dir(tmp_path_factory) -> Path:
    tok = build_tokenizer(TEACHER_CORPUS, vocab_size=360)
    return save_model(
        build_llama(len(tok), hidden_size=48, num_layers=2, seed=11),
        tok,
        tmp_path_factory.mktemp("xt") / "teacher",
    )


@pytest.fixture()
def data(tmp_path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", ALPACA * 2)


def run(tmp_path, student_dir, teacher, data, name, **options):
    models = dict(student=str(student_dir), teacher=str(teacher), data=str(data))
    return tiny_run(tmp_path / name, **(models | options))


@pytest.mark.parametrize("method", ["shared-vocab", "uld"])
def test_neo_across_tokenizers_trains_lora_only_and_merges_to_the_original_student(
    tmp_path, student_dir, xt_teacher_dir, data, method
):
    seen: list[dict[str, float]] = []
    summary = distill(
        run(tmp_path, student_dir, xt_teacher_dir, data, method, cross_tokenizer=method),
        on_step=lambda step, m: seen.append(m),
    )
    assert all(m["kd_loss"] > 0 for m in seen)  # the teacher's signal arrived at aligned positions
    trained = [b["tokens"] - a["tokens"] for a, b in zip([{"tokens": 0}, *seen[:-1]], seen, strict=True)]
    assert all(0 < m["kd_positions"] < n for m, n in zip(seen, trained, strict=True))  # some, not all
    out = Path(summary.config["output_dir"])
    before = load_file(student_dir / "model.safetensors")
    after = load_file(out / "merged" / "model.safetensors")
    adapted = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor) != name.endswith(tuple(f"{m}.weight" for m in adapted)), name
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    original = AutoModelForCausalLM.from_pretrained(student_dir)
    assert sum(p.numel() for p in merged.parameters()) == sum(p.numel() for p in original.parameters())
    # The held-out divergence across vocabularies is its own metric, never kl_to_teacher.
    heldout = summary.heldout
    assert "kl_to_teacher" not in heldout and summary.heldout_reference == "teacher_aligned"
    assert heldout["aligned_kl_to_teacher"] >= 0 and heldout["aligned_positions"] > 0
    assert 0 < heldout["aligned_coverage"] <= 1
    pair = json.loads((out / "pair.json").read_text())
    assert pair == summary.pair and pair["exact_path"] is False and 0 < pair["coverage_exact"] < 1


def test_identical_tokenizers_forced_through_the_cross_path_equal_the_exact_path(
    tmp_path, student_dir, teacher_dir, data, monkeypatch
):
    # k = V and every id mapped to itself: the top-k + tail buckets are the dense distribution, every
    # response position is exactly aligned, so the steps and the held-out KL must be today's.
    exact_steps: list[dict[str, float]] = []
    exact = distill(
        run(tmp_path, student_dir, teacher_dir, data, "exact"), on_step=lambda s, m: exact_steps.append(m)
    )
    monkeypatch.setattr(cross_tokenizer, "refuse_same_tokenizer", lambda *a: None)  # test-only
    cross_steps: list[dict[str, float]] = []
    cross = distill(
        run(
            tmp_path,
            student_dir,
            teacher_dir,
            data,
            "cross",
            cross_tokenizer="shared-vocab",
            cross_tokenizer_top_k=320,
        ),
        on_step=lambda s, m: cross_steps.append(m),
    )
    assert len(exact_steps) == len(cross_steps) == 3
    for a, b in zip(exact_steps, cross_steps, strict=True):
        for key in ("loss", "ce_loss", "kd_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    assert cross.heldout["aligned_coverage"] == 1.0
    assert cross.heldout["aligned_kl_to_teacher"] == pytest.approx(exact.heldout["kl_to_teacher"], rel=1e-4)


def test_a_permuted_vocabulary_gives_the_unpermuted_loss_and_gradient():
    g = torch.Generator().manual_seed(0)
    v, h_s, h_t, n = 16, 8, 12, 10
    student_head = torch.randn(v, h_s, generator=g, dtype=torch.float64)
    teacher_head = torch.randn(v, h_t, generator=g, dtype=torch.float64)
    teacher_hidden = torch.randn(n, h_t, generator=g, dtype=torch.float64)
    hidden = torch.randn(n, h_s, generator=g, dtype=torch.float64)
    targets = torch.randint(0, v, (n,), generator=g)
    perm = torch.randperm(v, generator=g)  # teacher id i is student id perm[i]
    options = LossOptions(kd_ratio=0.5, divergence="jsd", chunk_size=3)
    # today's path: a teacher whose ids are the student's (its head rows permuted into student order)
    same_vocab = torch.empty_like(teacher_head)
    same_vocab[perm] = teacher_head
    h1 = hidden.clone().requires_grad_()
    want = chunked_distill_loss(
        HeadInput(h1, student_head),
        targets,
        HeadInput(teacher_hidden, same_vocab),
        options=options,
        num_tokens=n,
    )
    # the cross path: the teacher in its own ids, mapped through perm; every row aligned, k = V
    pair = CrossPair("shared-vocab", perm, v, v, 0, v)
    none = torch.full((n,), -1)
    found = aligned_targets(lambda x: x @ teacher_head.T, teacher_hidden, pair, none, none, chunk_size=4)
    topk, rows = spread_targets(found, torch.arange(n), n)
    h2 = hidden.clone().requires_grad_()
    got = chunked_distill_loss(
        HeadInput(h2, student_head), targets, topk, options=options, num_tokens=n, kd_rows=rows
    )
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-10, atol=1e-12)
    (g1,), (g2,) = torch.autograd.grad(want.loss, [h1]), torch.autograd.grad(got.loss, [h2])
    torch.testing.assert_close(g2, g1, rtol=1e-9, atol=1e-12)


def test_unmapped_teacher_mass_goes_to_the_tail_and_end_markers_map_to_each_other():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]], dtype=torch.float64)  # teacher ids 0..4
    to_student = torch.tensor([-1, 7, 5, -1, -1])  # only teacher ids 1 and 2 have a student text
    pair = CrossPair("shared-vocab", to_student, 5, 9, 0, 2)
    found = aligned_targets(lambda x: x, logits, pair, torch.tensor([-1]), torch.tensor([-1]))
    p = logits.softmax(-1)[0]
    assert found.ids.tolist() == [[7, 5]]
    torch.testing.assert_close(found.log_probs.exp()[0], p[[1, 2]])
    torch.testing.assert_close(found.tail.exp()[0], p[[0, 3, 4]].sum())
    # at an end-of-turn row the teacher's end marker (id 0, unmapped) stands for the student's (id 8)
    eot = aligned_targets(lambda x: x, logits, pair, torch.tensor([0]), torch.tensor([8]))
    assert eot.ids.tolist() == [[8, 7]]
    torch.testing.assert_close(eot.tail.exp()[0], p[[2, 3, 4]].sum())


def test_eval_across_tokenizers_gives_the_runs_heldout_aligned_kl(
    tmp_path, student_dir, xt_teacher_dir, data, capsys
):
    """`llm-neo eval --cross-tokenizer` on a run's merged student and its held-out records measures what
    the run's summary.json measured (the untrained student's "before" of a real pair is taken this way)."""
    summary = distill(run(tmp_path, student_dir, xt_teacher_dir, data, "uld", cross_tokenizer="uld"))
    # The run's held-out records, drawn as distill draws them (every ALPACA record tokenizes: index = row).
    records = load_records(data)
    examples, _ = tokenize_records(records, load_tokenizer(str(student_dir), role="student"), max_length=2048)
    _, heldout = split_heldout(examples, 0.25, seed=0)
    heldout_file = write_jsonl(tmp_path / "heldout.jsonl", [records[ex.index] for ex in heldout])
    merged = Path(summary.config["output_dir"]) / "merged"
    argv = ["eval", "--model", str(merged), "--teacher", str(xt_teacher_dir), "--data", str(heldout_file)]
    out = tmp_path / "eval.json"
    # uld trained it; the held-out divergence is on exactly aligned positions for either method.
    assert main([*argv, "--cross-tokenizer", "uld", "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    assert "kl_to_teacher" not in got and "top1_agreement" not in got
    for key in ("aligned_kl_to_teacher", "aligned_coverage", "aligned_positions", "ce", "tokens"):
        assert got[key] == pytest.approx(summary.heldout[key], rel=1e-5), key
    assert got["aligned_positions"] > 0
    # The untrained student scores differently: eval reads the model it is given.
    before = tmp_path / "before.json"
    argv[2] = str(student_dir)
    assert main([*argv, "--cross-tokenizer", "shared-vocab", "--json", str(before)]) == 0
    assert json.loads(before.read_text())["aligned_kl_to_teacher"] != got["aligned_kl_to_teacher"]
    # Refused as distill refuses, exit 2 and the option named: no teacher, a bad k, the same tokenizer.
    capsys.readouterr()
    assert main(argv[:3] + argv[5:] + ["--cross-tokenizer", "uld"]) == 2
    assert main([*argv, "--cross-tokenizer", "uld", "--cross-tokenizer-top-k", "0"]) == 2
    same = ["eval", "--model", str(student_dir), "--teacher", str(student_dir), "--data", str(heldout_file)]
    assert main([*same, "--cross-tokenizer", "uld"]) == 2
    err = capsys.readouterr().err
    assert "give --teacher" in err and "cross-tokenizer-top-k" in err and "drop --cross-tokenizer" in err


def test_check_pair_prints_the_report_and_writes_its_json(
    tmp_path, student_dir, xt_teacher_dir, data, capsys
):
    out = tmp_path / "pair.json"
    code = main(
        [
            "check-pair",
            "--teacher",
            str(xt_teacher_dir),
            "--student",
            str(student_dir),
            "--data",
            str(data),
            "--output",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "exact path: no" in printed and "aligned coverage" in printed
    report = json.loads(out.read_text())
    assert report["student"]["vocab_size"] == 320 and report["teacher"]["vocab_size"] == 360
    assert 0 < report["coverage_exact"] <= report["coverage_boundary"] <= 1
    assert report["examples"] == len(ALPACA) * 2 and report["exact_path"] is False
    main(["check-pair", "--teacher", str(student_dir), "--student", str(student_dir)])
    assert "exact path: yes" in capsys.readouterr().out


def test_every_count_check_pair_prints_has_a_thousands_separator():
    side = TokenizerSide("teacher-model", 151_665, [f"<|extra_{i}|>" for i in range(6384)], True, 0.287)
    report = PairReport(
        schema_version=PAIR_VERSION, teacher=side, student=replace(side, model="student-model"),
        exact_path=False, shared_tokens=48_000, shared_share=0.5, data="data.jsonl", examples=12_345,
        response_chars=1_234_567, coverage_exact=0.9, coverage_boundary=0.95,
    )  # fmt: skip
    text = "\n".join(pair_lines(report))
    assert "151,665 tokens, 6,384 special" in text and "12,345 examples" in text
    # No count of four or more digits left without its separator (the shares have at most 3 decimals).
    assert not re.search(r"\d{4,}", text), text


def test_refusals_come_before_anything_loads(
    tmp_path, student_dir, teacher_dir, xt_teacher_dir, data, monkeypatch
):
    def no_load(*a, **k):
        raise AssertionError("a model loaded before the refusal")

    monkeypatch.setattr("llm_neo.distill._build_student", no_load)
    monkeypatch.setattr("llm_neo.distill._load_teacher", no_load)
    with pytest.raises(ConfigError, match="exact same-tokenizer path applies: drop --cross-tokenizer"):
        distill(run(tmp_path, student_dir, teacher_dir, data, "same", cross_tokenizer="uld"))
    assert not (tmp_path / "same").exists()
    cases = [
        ({"cross_tokenizer": "bpe-magic"}, "--cross-tokenizer: 'bpe-magic' is not one of shared-vocab, uld"),
        ({"cross_tokenizer": "uld", "loss_impl": "plain"}, "--loss-impl chunked only"),
        ({"cross_tokenizer": "uld", "method": "lora"}, "applies to --method"),
        ({"cross_tokenizer": "uld", "cross_tokenizer_top_k": 0}, "cross-tokenizer-top-k"),
    ]
    for options, message in cases:
        with pytest.raises(ConfigError, match=message):
            distill(run(tmp_path, student_dir, xt_teacher_dir, data, "bad", **options))
    # and a differing pair without the option names it
    with pytest.raises(Exception, match="--cross-tokenizer shared-vocab \\(or uld\\)"):
        distill(run(tmp_path, student_dir, xt_teacher_dir, data, "plain"))


def test_compare_across_tokenizers_scores_aligned_kl_and_shows_the_pair(
    tmp_path, student_dir, xt_teacher_dir, data
):
    from conftest import tiny_comparison

    from llm_neo.commands.compare import compare, validate_compare

    heldout = write_jsonl(tmp_path / "heldout.jsonl", ALPACA[:4])
    config = tiny_comparison(
        xt_teacher_dir,
        student_dir,
        tmp_path / "cmp",
        data=str(data),
        heldout=str(heldout),
        cross_tokenizer="uld",
    )
    with pytest.raises(ConfigError, match="--cache-teacher and --probes do not work across tokenizers"):
        validate_compare(
            tiny_comparison(
                xt_teacher_dir,
                student_dir,
                tmp_path / "c2",
                data=str(data),
                cross_tokenizer="uld",
                cache_teacher=1,
            )
        )
    results = compare(config)
    assert results is not None and results.pair is not None and results.pair.exact_path is False
    neo, sft = (next(g for g in results.groups if g.method == m) for m in ("neo", "sft"))
    for group in (neo, sft):  # every arm is scored on aligned positions, none on kl_to_teacher
        assert all(r.aligned_kl_to_teacher is not None and r.kl_to_teacher is None for r in group.runs)
    summary_neo = json.loads((Path(neo.runs[0].output_dir) / "summary.json").read_text())
    summary_sft = json.loads((Path(sft.runs[0].output_dir) / "summary.json").read_text())
    assert (
        summary_neo["config"]["cross_tokenizer"] == "uld" and summary_sft["config"]["cross_tokenizer"] is None
    )
    teacher = results.models.teacher
    assert teacher is not None and teacher.aligned_kl_to_teacher is None and teacher.kl_to_teacher is None
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert "aligned KL to teacher" in report and "The tokenizer pair" in report


def test_sweep_ranks_cross_tokenizer_trials_on_the_aligned_kl(tmp_path, student_dir, xt_teacher_dir, data):
    from llm_neo.commands.sweep import SweepConfig, effective_metric, objective

    trials = {
        f"t{i}": run(tmp_path, student_dir, xt_teacher_dir, data, f"t{i}", cross_tokenizer=m)
        for i, m in enumerate(("shared-vocab", "uld"))
    }
    default = SweepConfig.metric
    assert effective_metric(trials, default, default) == "heldout.aligned_kl_to_teacher"
    # the two methods minimise different objectives: their final.loss is not one number
    assert objective(trials["t0"]) != objective(trials["t1"])
