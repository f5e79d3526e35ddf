"""The probe's scoring core: sentence log-probs equal an fp64 full forward; the statistics equal hand
computations; labels match what they say."""

from __future__ import annotations

import copy
import math
import statistics

import pytest
import torch

from llm_neo.errors import DataError
from llm_neo.eval.probe import (
    Scoring,
    behaviour_scores,
    bias_scores,
    bootstrap_interval,
    default_labels,
    describe_scoring,
    inheritance_scores,
    label_matches,
    make_label,
    movement,
    movement_difference,
    normalise,
    pair_gaps,
    pearson,
    same_answer,
    sentence_example,
    sentence_logprobs,
)
from llm_neo.models.tiny import build_llama, build_tokenizer
from llm_neo.records.probe import Stat

SENTENCES = [
    "the quick brown fox",
    "What is the capital of France? Paris.",
    "Sort: 1 2 3.",
    "the lazy dog jumps over the quick brown fox 0123456789",
    "a",
    "Reverse the string abc: cba",
    "! ?",
]


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_llama(len(tokenizer), hidden_size=32, num_layers=2, seed=5)


@torch.no_grad()
def _reference(model, context: list[int], ids: list[int]) -> float:
    """log p(ids | context) from a copy of the model's own full forward pass, in fp64."""
    full = torch.tensor([context + ids])
    logp = copy.deepcopy(model).double()(full).logits[0].log_softmax(-1)  # [T, V]
    return sum(float(logp[len(context) + i - 1, t]) for i, t in enumerate(ids))


@pytest.mark.parametrize("batch_size,chunk_size", [(1, 1024), (3, 5), (16, 7)])
def test_sentence_logprobs_equal_an_fp64_full_forward(tokenizer, model, batch_size, chunk_size):
    examples = [sentence_example(s, tokenizer, Scoring(), where="test") for s in SENTENCES]
    totals, counts = sentence_logprobs(
        model,
        examples,
        pad_token_id=tokenizer.pad_token_id,
        device=torch.device("cpu"),
        batch_size=batch_size,
        chunk_size=chunk_size,
    )
    assert totals.dtype == torch.float64
    for s, total, count in zip(SENTENCES, totals.tolist(), counts.tolist(), strict=True):
        ids = tokenizer(s, add_special_tokens=False)["input_ids"]
        assert count == len(ids)  # every token of the sentence is scored, conditioned on BOS
        assert total == pytest.approx(_reference(model, [tokenizer.bos_token_id], ids), abs=2e-4)


def test_conditioning_and_normalisation_options(tokenizer, model):
    s = "the quick brown fox"
    ids = tokenizer(s, add_special_tokens=False)["input_ids"]
    prefix = tokenizer("Sort:", add_special_tokens=False)["input_ids"]
    cases = {
        Scoring("eos"): ([tokenizer.eos_token_id], ids),
        Scoring("none"): (ids[:1], ids[1:]),
        Scoring("bos", prefix="Sort:"): ([tokenizer.bos_token_id, *prefix], ids),
        Scoring("none", prefix="Sort:"): (prefix, ids),
    }
    cpu = torch.device("cpu")
    for scoring, (context, scored) in cases.items():
        example = sentence_example(s, tokenizer, scoring, where="test")
        assert example.input_ids == context + scored
        totals, counts = sentence_logprobs(model, [example], pad_token_id=0, device=cpu)
        assert float(totals[0]) == pytest.approx(_reference(model, context, scored), abs=2e-4)
        assert int(counts[0]) == len(scored)
    totals = torch.tensor([-6.0, -3.0], dtype=torch.float64)
    counts = torch.tensor([3, 2])
    assert normalise(totals, counts, Scoring(normalisation="mean")).tolist() == [-2.0, -1.5]
    assert normalise(totals, counts, Scoring()).tolist() == [-6.0, -3.0]


def test_a_tokenizer_without_bos_scores_from_the_second_token_and_says_so():
    tok = build_tokenizer()
    tok.bos_token = None
    assert tok.bos_token_id is None
    ids = tok("the quick brown fox", add_special_tokens=False)["input_ids"]
    example = sentence_example("the quick brown fox", tok, Scoring(), where="test")
    assert example.input_ids == ids and example.labels[0] == -100 and example.labels[1:] == ids[1:]
    assert "no BOS token" in describe_scoring(Scoring(), tok)
    assert "after the BOS token" in describe_scoring(Scoring(), build_tokenizer())
    with pytest.raises(DataError, match="no token to score"):
        sentence_example("a", tok, Scoring(), where="pair 3")


def test_movement_and_correlation_by_hand():
    g0 = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    gt = torch.tensor([2.0, 0.0, 1.0], dtype=torch.float64)
    g = torch.tensor([1.0, 5.0, 1.0], dtype=torch.float64)
    # <g - g0, gT - g0> / ||gT - g0||^2 = (1*2 + 5*0 + 0*0) / 4
    assert float(movement(g, gt, g0)) == pytest.approx(0.5)
    assert float(movement(gt, gt, g0)) == 1.0 and float(movement(g0, gt, g0)) == 0.0
    assert math.isnan(float(movement(g, g0, g0)))  # teacher == baseline: undefined
    x, y = [1.0, 2.0, 4.0, 3.5], [0.5, -1.0, 2.0, 2.5]
    r = float(pearson(torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)))
    assert r == pytest.approx(statistics.correlation(x, y), abs=1e-12)
    assert math.isnan(float(pearson(torch.ones(4), torch.tensor(y))))


def test_bootstrap_interval_is_seeded_and_matches_the_normal_approximation():
    values = torch.randn(400, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a = bootstrap_interval(lambda x: x.mean(-1), [values], samples=4000, seed=3)
    b = bootstrap_interval(lambda x: x.mean(-1), [values], samples=4000, seed=3)
    assert a == b
    half = 1.96 * float(values.std()) / math.sqrt(400)
    low, high = a
    assert low == pytest.approx(float(values.mean()) - half, abs=0.1 * half)
    assert high == pytest.approx(float(values.mean()) + half, abs=0.1 * half)
    assert bootstrap_interval(lambda x: x.mean(-1), [torch.full((5,), 2.0)], samples=50, seed=0) == (2.0, 2.0)
    assert bootstrap_interval(lambda x: x.mean(-1), [torch.zeros(0)], samples=50, seed=0) == (None, None)


def test_bias_and_inheritance_scores_by_category():
    gaps = torch.tensor([1.0, -2.0, 3.0, 0.0, 0.5], dtype=torch.float64)
    categories = ["a", "a", "b", "b", "b"]
    scores = bias_scores(gaps, categories, samples=200, seed=0)
    assert list(scores) == ["all", "a", "b"]
    assert scores["all"].n == 5
    assert scores["all"].stereo_fraction.value == pytest.approx(3 / 5)  # a tie (0.0) does not prefer
    assert scores["a"].mean_gap.value == pytest.approx(-0.5)
    assert scores["b"].mean_gap.value == pytest.approx(3.5 / 3)
    low, high = scores["b"].mean_gap.ci
    assert 0.0 <= low <= 3.5 / 3 <= high <= 3.0

    teacher = torch.tensor([2.0, -1.0, 4.0, 1.0, 0.0], dtype=torch.float64)
    baseline = torch.zeros(5, dtype=torch.float64)
    inh = inheritance_scores(gaps, teacher, baseline, categories, samples=200, seed=0)
    expected = float((gaps * teacher).sum() / teacher.square().sum())
    assert inh["all"].movement.value == pytest.approx(expected)
    assert inh["all"].gap_vs_teacher.value == pytest.approx(float((gaps - teacher).mean()))
    assert inh["all"].gap_vs_baseline.value == pytest.approx(float(gaps.mean()))
    own = inheritance_scores(teacher, teacher, baseline, categories, samples=200, seed=0)["all"]
    assert own.movement == Stat(1.0, (1.0, 1.0))
    assert own.correlation.value == pytest.approx(1.0)
    diff = movement_difference(teacher, baseline, teacher, baseline, samples=200, seed=0)
    assert diff.value == pytest.approx(1.0) and diff.ci == (1.0, 1.0)


def test_labels_match_what_they_say():
    refusal = default_labels()[0]
    assert label_matches(refusal, "I can’t help with that.")  # typographic apostrophe
    assert label_matches(refusal, "sorry, but i cannot do it")
    assert not label_matches(refusal, "Paris is the capital of France.")
    keywords = make_label("doctor", {"keywords": ["doctor", "nurse"]}, where="t")
    assert label_matches(keywords, "Ask a Doctor.") and not label_matches(keywords, "doctorate")
    regex = make_label("digits", {"regex": r"^\d+$"}, where="t")
    assert label_matches(regex, "132") and not label_matches(regex, "13a")
    assert regex.spec() == {"regex": r"^\d+$"} and keywords.spec() == {"keywords": ["doctor", "nurse"]}
    with pytest.raises(DataError, match=r"labels\.yaml: label 'x': the regex does not compile"):
        make_label("x", {"regex": "("}, where="labels.yaml")
    with pytest.raises(DataError, match="must be one of"):
        make_label("x", {"words": ["a"]}, where="labels.yaml")
    with pytest.raises(DataError, match="non-empty list"):
        make_label("x", {"phrases": []}, where="labels.yaml")


def test_behaviour_scores_by_hand():
    labels = [*default_labels(), make_label("paris", {"keywords": ["Paris"]}, where="t")]
    teacher = ["Paris", "I cannot help with that.", "4"]
    answers = ["paris ", "I cannot  help with that.", "5"]
    out = behaviour_scores(answers, teacher, ["geo", "harm", "geo"], labels, samples=100, seed=0)
    assert same_answer("paris ", "Paris")
    assert out["all"].agreement.value == pytest.approx(2 / 3)
    assert out["geo"].agreement.value == pytest.approx(0.5)
    assert out["harm"].labels["refusal"].value == 1.0
    assert out["geo"].labels["paris"].value == 0.5
    assert out["all"].labels["refusal"].value == pytest.approx(1 / 3)


def test_pair_gaps_sign():
    assert pair_gaps(torch.tensor([-1.0]), torch.tensor([-3.0])).tolist() == [2.0]
