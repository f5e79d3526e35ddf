"""The memory planner: exact counts from configs, and estimates against measurements.

Measurements: benchmarks/results/h200-anchors.json (H200, real Llama shapes, plain implementations,
torch.cuda.max_memory_allocated), live tensor
bytes of llm-neo's own train_step on a CPU (counted op by op, CUDA's "allocated" without a GPU), and the
peak RSS of a fresh process on the cpu-wide shape.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from llm_neo.commands.bench import BenchConfig, RunSpec, bench, run_one
from llm_neo.commands.plan import (
    GiB,
    PlanConfig,
    RunShape,
    StepShape,
    estimate_arm,
    model_dims,
    plan_rows,
    run_plan,
)
from llm_neo.commands.shapes import SHAPES, get_shape
from llm_neo.errors import ConfigError
from llm_neo.models.lora import attach_lora, trainable_parameters
from llm_neo.records.bench import PeakKind

# (shape, batch, seq_len, gradient checkpointing, method, impl) -> peak GiB on an H200.
ANCHORS = json.loads((Path(__file__).parents[2] / "benchmarks" / "results" / "h200-anchors.json").read_text())
H200 = [
    (r["shape"], r["batch"], r["seq_len"], r["gradient_checkpointing"], r["method"], r["impl"], r["peak_gib"])
    for r in ANCHORS["rows"]
]


def _estimate(shape: str, batch: int, seq: int, ckpt: bool, method: str, impl: str, **kw) -> float:
    config = PlanConfig(
        shape=shape,
        batch_size=batch,
        seq_len=seq,
        gradient_checkpointing=ckpt,
        methods=[method],
        loss_impls=[impl],
        device=kw.pop("device", "cuda"),
        dtype=kw.pop("dtype", "bfloat16"),
        **kw,
    )
    rows, _ = plan_rows(config)
    return rows[0].total / GiB


@pytest.mark.parametrize(("shape", "batch", "seq", "ckpt", "method", "impl", "measured"), H200)
def test_plan_matches_h200_measurements(shape, batch, seq, ckpt, method, impl, measured):
    estimate = _estimate(shape, batch, seq, ckpt, method, impl)
    assert estimate == pytest.approx(measured, rel=0.20), f"plan {estimate:.1f} GiB vs H200 {measured} GiB"


def test_weights_match_the_published_sizes():
    shape = get_shape("llama3-8b-to-1b")
    teacher = model_dims(shape.teacher)
    student = model_dims(shape.student, lora_r=128)
    assert teacher.parameters == 8_030_261_248  # Llama-3.1-8B
    assert student.parameters == 1_235_814_400  # Llama-3.2-1B (tied embeddings)
    assert 2 * teacher.parameters / GiB == pytest.approx(ANCHORS["teacher_bf16_weights_gib"], abs=0.05)
    assert 2 * student.parameters / GiB == pytest.approx(2.3, abs=0.05)
    # r=128 on q, k, v, o, gate, up, down of 16 blocks: r·(in + out) each.
    per_block = 128 * (2 * (2048 + 2048) + 2 * (2048 + 512) + 2 * (2048 + 8192) + (8192 + 2048))
    assert student.lora_parameters == 16 * per_block
    assert 16 * student.lora_parameters / GiB == pytest.approx(1.34, abs=0.01)  # "1.4" in the issue
    row = plan_rows(
        PlanConfig(shape="llama3-8b-to-1b", methods=["neo"], loss_impls=["chunked"], device="cuda")
    )[0][0]
    assert row.floor / GiB == pytest.approx(18.7, rel=0.02)  # the weights floor


# The shapes whose student is small enough to instantiate in a unit test (the real ones are counted above).
SMALL = [name for name in SHAPES if get_shape(name).student.hidden_size <= 512]


@pytest.mark.parametrize("name", SMALL)
def test_counts_equal_real_models(name):
    """Parameter and LoRA counts from the meta device equal those of the instantiated models."""
    shape = get_shape(name)
    dims = model_dims(shape.student, lora_r=shape.lora_r)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(copy.deepcopy(shape.student))
    assert dims.parameters == sum(p.numel() for p in model.parameters())
    assert dims.linear_weights == sum(
        m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)
    )
    peft_model = attach_lora(model, r=shape.lora_r)
    assert dims.lora_parameters == sum(p.numel() for p in trainable_parameters(peft_model).values())


@pytest.mark.parametrize(
    ("method", "impl", "ckpt"),
    [("kd", "plain", False), ("neo", "plain", False), ("neo", "chunked", False), ("kd", "chunked", True)],
)
def test_plan_matches_live_tensor_bytes_of_train_step(method, impl, ckpt):
    """On the cpu-wide shape (vocabulary 32,000), fewer tokens: the plan vs the step's live tensor bytes."""
    spec = RunSpec(
        shape="cpu-wide",
        method=method,
        impl=impl,
        chunk_size=256,
        batch_size=2,
        seq_len=128,
        lora_r=16,
        kd_ratio=0.5,
        warmup_steps=1,
        steps=1,
        gradient_checkpointing=ckpt,
        device="cpu",
        dtype="float32",
        seed=0,
        memory="tracked",
        num_threads=1,
    )
    measured = run_one(spec)["peak_bytes"] / GiB
    shape = get_shape("cpu-wide")
    estimate = (
        estimate_arm(
            method,
            impl,
            StepShape(
                model_dims(shape.student, lora_r=16),
                model_dims(shape.teacher),
                RunShape(
                    batch_size=2,
                    seq_len=128,
                    compute_bytes=4,
                    lora_r=16,
                    gradient_checkpointing=ckpt,
                    chunk_size=256,
                    device_type="cpu",
                    baseline=0,
                ),
            ),
        ).total
        / GiB
    )
    assert estimate == pytest.approx(measured, rel=0.10), f"plan {estimate:.3f} vs tracked {measured:.3f} GiB"


def test_plan_matches_peak_rss_of_a_cpu_run(tmp_path):
    """The real thing on a CPU: peak RSS of fresh processes (cpu-wide, 4 × 256 tokens), within ±20%.

    With a fixed 1 MiB mmap threshold: glibc's default threshold adapts up to 32 MiB and keeps freed
    blocks below it mapped, slack of 0.1-0.2 GiB that is the allocator's, not the step's (docs/memory.md).
    """
    report = bench(
        BenchConfig(
            shape="cpu-wide",
            batch_size=4,
            runs=["kd:plain", "neo:chunked"],
            warmup_steps=1,
            steps=1,
            device="cpu",
            num_threads=1,
            malloc_mmap_threshold=1 << 20,
        ),
        progress=False,
    )
    for row in report.results:
        assert row.status == "ok", row
        assert row.peak_kind is PeakKind.PROCESS_MAX_RSS
        assert row.plan_error_pct is not None and abs(row.plan_error_pct) <= 20, row.name


def test_chunked_removes_the_logits_term():
    """What the chunked path removes: plain grows with B·T·V, chunked holds a chunk whatever B·T."""
    small = _estimate("llama3-8b-to-1b", 2, 2048, True, "neo", "chunked")
    large = _estimate("llama3-8b-to-1b", 8, 2048, True, "neo", "chunked")
    plain_small = _estimate("llama3-8b-to-1b", 2, 2048, True, "neo", "plain")
    plain_large = _estimate("llama3-8b-to-1b", 8, 2048, True, "neo", "plain")
    # GiB: what grows with B·T when the logits do not: checkpointed block inputs, the recomputed block
    # and the final hidden states, about 0.35 GiB per 2048-token sequence
    assert large - small < 3.0
    assert plain_large - plain_small > 40.0  # three more [B, T, 128256] batches of logits terms


def test_run_plan_prints_a_table_and_warns(capsys, tmp_path):
    out = tmp_path / "plan.json"
    config = PlanConfig(
        shape="llama3-8b-to-1b", device="cuda", device_memory_gb=40.0, strict=True, json=str(out)
    )
    assert run_plan(config) == 3  # kd/neo plain do not fit 40 GiB: --strict makes that an exit status
    captured = capsys.readouterr()
    assert "| neo chunked |" in captured.out and "teacher weights" in captured.out
    assert "warning: kd plain needs about" in captured.err
    assert out.is_file()
    config = dataclasses.replace(config, strict=False)
    assert run_plan(config) == 0


def test_reads_configs_from_model_dirs(teacher_dir, student_dir, capsys):
    config = PlanConfig(
        teacher=str(teacher_dir), student=str(student_dir), batch_size=2, seq_len=64, lora_r=4
    )
    assert run_plan(config) == 0
    assert "| neo chunked |" in capsys.readouterr().out


def test_validation_lists_every_problem():
    with pytest.raises(ConfigError) as err:
        plan_rows(PlanConfig(shape="nope", methods=["neo", "dpo"], loss_impls=["fused"], batch_size=0))
    text = str(err.value)
    for fragment in ("--shape", "dpo", "fused", "--batch-size"):
        assert fragment in text
    with pytest.raises(ConfigError, match="--teacher is required"):
        plan_rows(PlanConfig(student="x"))


def test_plan_per_rank_under_fsdp():
    # Sharding over W ranks divides everything but the whole lm_head; per-rank micro-batch memory stays.
    (one,) = plan_rows(
        PlanConfig(
            shape="llama3-8b-to-1b",
            methods=["neo"],
            loss_impls=["chunked"],
            device="cuda",
            gradient_checkpointing=True,
        )
    )[0]
    (eight,) = plan_rows(
        PlanConfig(
            shape="llama3-8b-to-1b",
            methods=["neo"],
            loss_impls=["chunked"],
            device="cuda",
            gradient_checkpointing=True,
            world_size=8,
        )
    )[0]
    teacher = get_shape("llama3-8b-to-1b").teacher
    head = teacher.vocab_size * teacher.hidden_size
    expected = (one.components["teacher weights"] // 2 - head) // 8 * 2 + 2 * head
    assert eight.components["teacher weights"] == pytest.approx(expected, rel=1e-6)
    assert eight.components["trainable states"] == pytest.approx(
        one.components["trainable states"] / 8, rel=1e-3
    )
    assert eight.components["logits"] == one.components["logits"]
    assert eight.total < one.total / 2
    with pytest.raises(ConfigError, match="world-size"):
        plan_rows(PlanConfig(shape="tiny", world_size=0))


@pytest.mark.parametrize("method", ["neo", "kd"])
def test_mlp_chunks_shrink_the_checkpointed_backward_as_planned(method, monkeypatch):
    """A model whose MLP is most of its activations (hidden 64, intermediate 2048) with checkpointing:
    the checkpointed backward is the peak, and --mlp-chunks 4 cuts it as the plan says (live bytes)."""
    import llm_neo.commands.shapes as shapes

    mlp_heavy = shapes.Shape(
        name="mlp-heavy",
        teacher=shapes._llama(
            vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4, intermediate_size=512
        ),
        student=shapes._llama(
            vocab_size=512, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=4, intermediate_size=2048
        ),
        batch_size=4,
        seq_len=256,
        lora_r=8,
        description="test: MLP-dominated activations",
    )
    monkeypatch.setitem(shapes.SHAPES, "mlp-heavy", mlp_heavy)
    measured, planned = {}, {}
    for chunks in (1, 4):
        spec = RunSpec(
            shape="mlp-heavy", method=method, impl="chunked", chunk_size=256, batch_size=4, seq_len=256,
            lora_r=8, kd_ratio=0.5, warmup_steps=1, steps=1, gradient_checkpointing=True, device="cpu",
            dtype="float32", seed=0, memory="tracked", num_threads=1, mlp_chunks=chunks,
        )  # fmt: skip
        measured[chunks] = run_one(spec)["peak_bytes"]
        run = RunShape(
            batch_size=4, seq_len=256, compute_bytes=4, lora_r=8, gradient_checkpointing=True,
            mlp_chunks=chunks, chunk_size=256, device_type="cpu", baseline=0,
        )  # fmt: skip
        models = StepShape(model_dims(mlp_heavy.student, lora_r=8), model_dims(mlp_heavy.teacher), run)
        est = estimate_arm(method, "chunked", models)
        planned[chunks] = est.total
        assert est.phase == "backward"
        assert planned[chunks] == pytest.approx(measured[chunks], rel=0.10), (chunks, planned, measured)
    assert measured[4] < 0.75 * measured[1]  # the MLP's four [tokens, 2048] tensors were most of the peak
