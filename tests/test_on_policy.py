"""On-policy distillation (--on-policy λ) on the tiny models: the sampler, the recipe's invariants, the
refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import ALPACA, interrupt_at, tiny_run, write_jsonl
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import llm_neo.distill as recipe
from llm_neo.data import Example
from llm_neo.distill import distill
from llm_neo.errors import ConfigError
from llm_neo.losses import IGNORE_INDEX
from llm_neo.sampling import (
    Response,
    Sampling,
    longest_response,
    response_example,
    response_start,
    sample_responses,
    stop_token_ids,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def make_config(tmp_path, student_dir, teacher_dir, alpaca_jsonl):
    def make(method: str = "neo", name: str | None = None, **overrides):
        models = dict(student=str(student_dir), teacher=str(teacher_dir), data=str(alpaca_jsonl))
        return tiny_run(tmp_path / (name or method), **(models | {"method": method} | overrides))

    return make


def merged(summary) -> dict[str, torch.Tensor]:
    return load_file(Path(summary.config["output_dir"]) / "merged" / "model.safetensors")


def metrics(summary) -> list[dict]:
    text = (Path(summary.config["output_dir"]) / "metrics.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines()]


# ----------------------------------------------------------------------------------------------------
# The sampler


def test_response_start_is_the_last_trained_run():
    ex = Example(input_ids=[1, 2, 3, 4, 5, 6, 7], labels=[-100, 2, -100, -100, 5, 6, -100])
    assert response_start(ex) == 4  # the final response; the earlier trained turn stays in the prompt
    assert longest_response([ex]) == 3  # positions 4..6 (the trailing untrained token is rendered too)
    sample = response_example([1, 2, 3], Response([9, 8], ended=True))
    assert sample.input_ids == [1, 2, 3, 9, 8]
    assert sample.labels == [IGNORE_INDEX] * 3 + [9, 8]


def greedy_reference(model, prompt: list[int], steps: int) -> list[int]:
    """Greedy decoding by full forwards, no KV cache and no padding: what temperature 0 must give."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


def test_temperature_zero_is_greedy_decoding_and_stops_at_end_of_turn(student_dir):
    model = AutoModelForCausalLM.from_pretrained(student_dir).train()
    prompts = [[1, 40, 41, 42, 43, 44], [1, 50, 60]]  # different lengths: the batch is left-padded
    expected = [greedy_reference(model, p, 6) for p in prompts]
    sampling = Sampling(temperature=0.0, top_p=1.0, stop_ids=(), pad_id=0)
    got = sample_responses(model, prompts, [6, 4], sampling, seed=0, device=torch.device("cpu"))
    assert [r.tokens for r in got] == [expected[0], expected[1][:4]]  # each row cut at its own cap
    assert not any(r.ended for r in got)
    assert model.training  # the mode is restored
    # A stop token ends the row after it (kept: the student learns to stop).
    stop = expected[0][2]
    first = expected[0].index(stop)
    stopped = sample_responses(
        model, prompts[:1], [6], Sampling(0.0, 1.0, (stop,), 0), seed=0, device=torch.device("cpu")
    )
    assert stopped[0] == Response(expected[0][: first + 1], ended=True)


def test_sampling_is_seeded_and_leaves_the_global_rng_alone(student_dir):
    model = AutoModelForCausalLM.from_pretrained(student_dir)
    prompts, caps = [[1, 40, 41], [1, 50, 60, 70]], [12, 12]
    sampling = Sampling(temperature=1.0, top_p=1.0, stop_ids=(), pad_id=0)
    cpu = torch.device("cpu")
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = sample_responses(model, prompts, caps, sampling, seed=7, device=cpu)
    assert torch.equal(torch.get_rng_state(), state)
    assert sample_responses(model, prompts, caps, sampling, seed=7, device=cpu) == a
    assert sample_responses(model, prompts, caps, sampling, seed=8, device=cpu) != a


def test_stop_tokens_are_eos_and_the_templates_end_of_turn(tokenizer):
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], tokenize=False
    )
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids[-3:]) == ["y", "o", "<|end|>"]  # the response, ended
    ex = Example(input_ids=ids, labels=[IGNORE_INDEX] * (len(ids) - 3) + ids[-3:])
    stops = stop_token_ids(tokenizer, [ex])
    # <|end|> is an added special token, not one of the named ones (eos, pad, ...): it must count too.
    end_of_turn = tokenizer.convert_tokens_to_ids("<|end|>")
    assert end_of_turn not in tokenizer.all_special_ids
    assert stops == sorted({tokenizer.eos_token_id, end_of_turn})


# ----------------------------------------------------------------------------------------------------
# The recipe


def test_lambda_zero_and_a_lambda_that_never_draws_train_todays_weights(make_config):
    today = distill(make_config(name="today"))
    zero = distill(make_config(name="zero", on_policy=0.0))
    # The on-policy path with no micro-batch drawn: the off-policy share is exactly today's CE + KD.
    never = distill(make_config(name="never", on_policy=1e-12))
    assert never.on_policy is not None and never.on_policy.on_policy_micro_batches == 0
    for other in (zero, never):
        a, b = merged(today), merged(other)
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert [m["loss"] for m in metrics(other)] == [m["loss"] for m in metrics(today)]
    assert zero.on_policy is None and "generation_share" not in metrics(zero)[0]


def test_student_equal_to_the_teacher_has_zero_divergence_and_zero_gradient(make_config, student_dir):
    # Neo's LoRA branches start at B = 0: the student is its base, here also the teacher.
    summary = distill(make_config(name="same", teacher=str(student_dir), on_policy=1.0, max_steps=1))
    (record,) = metrics(summary)
    assert record["on_policy_micro_batches"] == 2 and record["on_policy_tokens"] > 0
    assert record["on_policy_kd_loss"] == pytest.approx(0.0, abs=1e-6)
    assert record["grad_norm"] == pytest.approx(0.0, abs=1e-6)


def test_the_teacher_scores_the_students_samples_on_exactly_the_generated_positions(
    make_config, monkeypatch, tokenizer
):
    sampled: list[tuple[list[list[int]], list[Response]]] = []  # the prompts, the student's responses
    real_sample = recipe.sample_responses

    def sample_spy(model, prompts, *args, **kw):
        sampled.append(([list(p) for p in prompts], real_sample(model, prompts, *args, **kw)))
        return sampled[-1][1]

    monkeypatch.setattr(recipe, "sample_responses", sample_spy)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []  # the teacher's input_ids and the batch's labels
    real_loss = recipe.micro_batch_loss

    def spy(student, teacher, batch, **kw):
        if "on_policy" in batch:
            seen.append((batch["input_ids"].clone(), batch["labels"].clone()))
        return real_loss(student, teacher, batch, **kw)

    teacher_inputs: list[torch.Tensor] = []
    real_hidden = recipe.final_hidden_states

    def hidden_spy(model, input_ids, attention_mask):
        if not model.training:  # the frozen teacher (eval mode); the student trains
            teacher_inputs.append(input_ids.clone())
        return real_hidden(model, input_ids, attention_mask)

    monkeypatch.setattr(recipe, "micro_batch_loss", spy)
    monkeypatch.setattr(recipe, "final_hidden_states", hidden_spy)
    config = make_config(name="spied", on_policy=1.0, max_steps=1, sample_max_new_tokens=5)
    distill(config)
    assert len(sampled) == len(seen) == 2
    for (prompts, responses), (input_ids, labels), teacher_ids in zip(
        sampled, seen, teacher_inputs, strict=True
    ):
        assert torch.equal(teacher_ids, input_ids)  # the teacher ran on what the student is trained on
        for row, response in enumerate(responses):
            trained = (labels[row] != IGNORE_INDEX).nonzero().flatten().tolist()
            start = trained[0]
            assert trained == list(range(start, start + len(response.tokens)))  # the samples, nothing else
            assert input_ids[row, start : start + len(response.tokens)].tolist() == response.tokens
            assert 1 <= len(response.tokens) <= 5
            # The prompt, as training renders it, precedes the sample and is not trained.
            assert input_ids[row, :start].tolist() == prompts[row]
            instructions = [r["instruction"] for r in ALPACA]
            assert any(i in tokenizer.decode(prompts[row]) for i in instructions)
            # Padding after the sample, masked.
            assert labels[row, start + len(response.tokens) :].eq(IGNORE_INDEX).all()


def test_only_lora_weights_change_and_the_merge_is_verified(make_config, monkeypatch):
    checked = []
    real_train = recipe.train

    def train(run, **kw):
        frozen = {n: p.detach().clone() for n, p in run.student.named_parameters() if "lora_" not in n}
        trained = real_train(run, **kw)
        after = dict(run.student.named_parameters())
        checked.append(all(torch.equal(after[n], p) for n, p in frozen.items()))
        return trained

    monkeypatch.setattr(recipe, "train", train)
    summary = distill(make_config(name="lora-only", on_policy=1.0, max_steps=2, lr=1e-2))
    assert checked == [True]
    assert summary.merge_check["passed"]
    assert summary.on_policy.on_policy_micro_batches == 4
    assert summary.on_policy.divergence == "reverse_kl"
    assert 0 < summary.on_policy.generation_share < 1
    assert summary.on_policy.generated_tokens_per_s > 0
    assert summary.on_policy.mean_generated_length >= 1
    assert 0 <= summary.on_policy.capped_share <= 1


def test_a_killed_on_policy_run_resumes_to_the_uninterrupted_one(tmp_path, student_dir, teacher_dir):
    data = write_jsonl(tmp_path / "train.jsonl", ALPACA * 2)

    def config(name: str, **overrides):
        models = dict(student=str(student_dir), teacher=str(teacher_dir), data=str(data))
        return tiny_run(tmp_path / name, **models, max_steps=4, save_every=2, on_policy=0.5, **overrides)

    whole = distill(config("whole"))

    with pytest.raises(KeyboardInterrupt):
        distill(config("killed"), on_step=interrupt_at(3))
    resumed = distill(config("killed", resume=True))
    a, b = merged(whole), merged(resumed)
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=0)
    keys = ("loss", "on_policy_micro_batches", "mean_generated_length")
    assert [m.get(k, -1) for m in metrics(resumed) for k in keys] == pytest.approx(
        [m.get(k, -1) for m in metrics(whole) for k in keys]
    )
    assert whole.on_policy.on_policy_micro_batches > 0  # the draw did sample
    assert resumed.on_policy.micro_batches == whole.on_policy.micro_batches == 8  # totals kept across resume
    assert resumed.on_policy.on_policy_micro_batches == whole.on_policy.on_policy_micro_batches


# ----------------------------------------------------------------------------------------------------
# Refusals, before anything loads


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (dict(on_policy=1.5), r"--on-policy: 1.5 is out of range; it must be in \[0, 1\]"),
        (dict(on_policy=-0.1), r"--on-policy: -0.1 is out of range"),
        (dict(sample_temperature=0.7), r"--sample-temperature sets the on-policy sampling: add --on-policy"),
        (
            dict(sample_top_p=0.9, sample_max_new_tokens=8),
            r"--sample-top-p, --sample-max-new-tokens set the on-policy sampling",
        ),
        (dict(on_policy_divergence="jsd"), r"--on-policy-divergence sets the on-policy sampling"),
        (dict(on_policy=1.0, method="sft"), r"applies to the KD methods \(neo, kd\), not --method sft"),
        (dict(on_policy=1.0, method="lora"), r"not --method lora"),
        (dict(on_policy=1.0, on_policy_divergence="kl"), r"--on-policy-divergence: 'kl' is not one of"),
        (dict(on_policy=1.0, sample_top_p=0.0), r"--sample-top-p: 0.0 is out of range"),
        (dict(on_policy=1.0, kd_ratio=0.0), r"--kd-ratio 0 turns the teacher off"),
        (dict(on_policy=1.0, train_on_prompt=True), r"drop --train-on-prompt"),
    ],
)
def test_refusals(make_config, overrides, expected):
    config = make_config(name="refused", **overrides)
    with pytest.raises(ConfigError, match=expected):
        distill(config)
    assert not Path(config.output_dir).exists()


def test_a_teacher_cache_is_refused(make_config, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "manifest.json").write_text("{}")
    config = make_config(name="cached", teacher=None, teacher_cache=str(cache), on_policy=0.5)
    with pytest.raises(ConfigError, match=r"cannot score the student's new samples"):
        distill(config)
    assert not Path(config.output_dir).exists()


def test_text_records_have_no_prompt_to_answer(make_config, tmp_path):
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": f"some text number {i}"} for i in range(8)])
    config = make_config(name="text", data=str(data), on_policy=0.5)
    with pytest.raises(ConfigError, match=r"have no prompt \(text records"):
        distill(config)
    assert not Path(config.output_dir).exists()


# ----------------------------------------------------------------------------------------------------
# compare's +on-policy arms


def test_compare_runs_on_policy_arms_beside_their_method(tmp_path, teacher_dir, student_dir):
    from conftest import tiny_comparison

    from llm_neo.commands.compare import compare
    from llm_neo.summary import RunSummary

    records = [{"instruction": f"Add {i} and 1.", "input": "", "output": str(i + 1)} for i in range(30)]
    train = write_jsonl(tmp_path / "train.jsonl", records[:24])
    heldout = write_jsonl(tmp_path / "heldout.jsonl", records[24:])
    arms = ["neo", "neo+on-policy", "kd+on-policy"]
    out = tmp_path / "out"
    config = tiny_comparison(
        teacher_dir,
        student_dir,
        out,
        data=str(train),
        heldout=str(heldout),
        methods=arms,
        seeds=1,
        on_policy=0.5,
        sample_temperature=0.7,
        cache_teacher=8,  # the off-policy arm reads it; the on-policy arms run the teacher online
    )
    results = compare(config)
    assert results is not None
    groups = {g.method: g for g in results.groups}
    assert list(groups) == arms
    runs = {name: RunSummary.load(g.runs[0].output_dir) for name, g in groups.items()}
    assert runs["neo"].on_policy is None and runs["neo"].teacher_cache is not None
    for arm in ("neo+on-policy", "kd+on-policy"):
        assert runs[arm].on_policy is not None and runs[arm].teacher_cache is None
        assert runs[arm].on_policy.share == 0.5 and runs[arm].on_policy.sample_temperature == 0.7
    assert runs["neo"].config["sample_temperature"] == 1.0  # the off-policy arm keeps the defaults
    assert [p.against for p in results.paired] == ["neo+on-policy", "kd+on-policy"]
    report = (out / "report.md").read_text()
    assert "## On-policy arms" in report
    assert "λ = 0.5" in report and "sampling temperature 0.7" in report and "reverse_kl" in report


def test_compare_refuses_on_policy_options_without_an_on_policy_arm(tmp_path, teacher_dir, student_dir):
    from conftest import tiny_comparison

    from llm_neo.commands.compare import compare

    train = write_jsonl(tmp_path / "train.jsonl", ALPACA * 2)
    config = tiny_comparison(teacher_dir, student_dir, tmp_path / "out", data=str(train), sample_top_p=0.9)
    with pytest.raises(ConfigError, match=r"--sample-top-p: the on-policy options apply to the \+on-policy"):
        compare(config)
    refused = tiny_comparison(
        teacher_dir, student_dir, tmp_path / "out2", data=str(train), methods=["sft+on-policy"]
    )
    with pytest.raises(ConfigError, match=r"sft\+on-policy: --on-policy 1: .* not --method sft"):
        compare(refused)


# ----------------------------------------------------------------------------------------------------
# plan: the KV cache of the student's sampling


def test_plan_counts_the_students_kv_cache():
    import dataclasses

    from llm_neo.commands.plan import ModelDims, RunShape, StepShape, estimate_arm

    # An MHA student (kv_dim = hidden) with checkpointing: its KV cache outweighs the saved block inputs.
    student = ModelDims(
        parameters=10**6, linear_weights=10**6, hidden_size=64, intermediate_size=64, num_layers=64,
        num_heads=4, kv_dim=64, vocab_size=100, lora_parameters=1000, lora_linears_per_layer=7,
    )  # fmt: skip
    run = RunShape(batch_size=8, seq_len=4096, compute_bytes=2, lora_r=4, gradient_checkpointing=True)
    off = estimate_arm("neo", "chunked", StepShape(student, student, run))
    on = estimate_arm("neo", "chunked", StepShape(student, student, dataclasses.replace(run, on_policy=True)))
    assert on.phase == "generate" and off.phase != "generate"
    assert on.components["activations"] == 2 * 64 * 8 * 4096 * 64 * 2  # k, v · layers · B·T · kv_dim · c
    assert on.total > off.total
    # The CE-only arms sample nothing.
    sft = estimate_arm("sft", "chunked", StepShape(student, None, dataclasses.replace(run, on_policy=True)))
    assert sft.phase != "generate"


def test_running_out_of_memory_while_generating_is_the_steps_out_of_memory(make_config, monkeypatch):
    from llm_neo.errors import OutOfMemory

    def runs_out(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(recipe, "sample_responses", runs_out)
    config = make_config(name="oom", on_policy=1.0, max_length=64)
    with pytest.raises(OutOfMemory, match=r"step 1 ran out of host memory .* sequences up to 64 tokens"):
        distill(config)
