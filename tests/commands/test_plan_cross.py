"""The plan across tokenizers (--cross-tokenizer): the teacher at its own length, its top-k chunk beside
the student's autograd chunk, checked by hand arithmetic and against the live bytes of the real step's
loss (``cross_tokenizer.cross_targets`` then the chunked loss), never [tokens × V]."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from llm_neo.alignment import CrossPair
from llm_neo.commands.plan import (
    GiB,
    PlanConfig,
    RunShape,
    StepShape,
    cross_logit_bytes,
    estimate_arm,
    model_dims,
    plan_rows,
)
from llm_neo.commands.shapes import get_shape
from llm_neo.cross_tokenizer import cross_targets
from llm_neo.errors import ConfigError
from llm_neo.losses import LossOptions
from llm_neo.losses.chunked import HeadInput, chunked_distill_loss
from llm_neo.models.anatomy import final_hidden_states, lm_head
from llm_neo.models.tiny import build_llama
from llm_neo.runtime.memory import LiveTensorBytes

SHAPE = get_shape("gemma3-270m-to-smollm2-20")


def _run(**kw) -> RunShape:
    base = dict(
        batch_size=2,
        seq_len=128,
        compute_bytes=4,
        lora_r=16,
        chunk_size=1024,
        device_type="cpu",
        cross_tokenizer="shared-vocab",
        teacher_length_ratio=1.5,
        cross_top_k=64,
    )
    return RunShape(**(base | kw))


def test_cross_logits_by_hand():
    """B=2, T=128: N = 254 trained rows, C = min(1024, 254) = 254, T_t = ceil(1.5·128) = 192."""
    student, teacher = model_dims(SHAPE.student, lora_r=16), model_dims(SHAPE.teacher)
    run = _run()
    n, chunk, t_t = 254, 254, 192
    teacher_side = 4 * 2 * t_t * 640 + 4 * n * 640 + 9 * chunk * 262144
    student_side = 12 * n * 64 + 24 * chunk * 49152
    expected = 2 * 4 * n * 576 + max(teacher_side, student_side)
    assert cross_logit_bytes(student, teacher, run) == expected
    # the teacher's 262,144-wide chunk is the larger moment here (0.56 GiB vs 0.28)
    assert teacher_side > student_side
    neo = estimate_arm("neo", "chunked", StepShape(student, teacher, run))
    assert neo.components["logits"] == expected
    # kd adds the fp32 lm_head gradient accumulated over chunks, as without --cross-tokenizer
    kd = estimate_arm("kd", "chunked", StepShape(model_dims(SHAPE.student), teacher, run))
    assert kd.components["logits"] == expected + 4 * 49152 * 576


def test_never_tokens_times_vocab():
    """Past one chunk of rows, more tokens add [tokens × H] terms only: no [tokens × V] anywhere."""
    student, teacher = model_dims(SHAPE.student, lora_r=16), model_dims(SHAPE.teacher)
    small = cross_logit_bytes(student, teacher, _run(batch_size=16, seq_len=1024, chunk_size=256))
    large = cross_logit_bytes(student, teacher, _run(batch_size=32, seq_len=1024, chunk_size=256))
    per_token = 2 * 4 * 576 + 4 * 640 * (1 + 1.5) + 12 * 64  # the bound on what a token may add
    assert large - small <= 16 * 1024 * per_token
    assert large < 16 * 1024 * 262144  # one [tokens × V_t] fp32 of the small batch alone is far more


def test_teacher_length_and_the_method_choice():
    student, teacher = model_dims(SHAPE.student, lora_r=16), model_dims(SHAPE.teacher)
    short = cross_logit_bytes(student, teacher, _run(teacher_length_ratio=0.5, batch_size=64))
    long = cross_logit_bytes(student, teacher, _run(teacher_length_ratio=2.0, batch_size=64))
    assert long - short == 4 * 64 * (256 - 64) * 640  # [B, T_t, H_t] teacher hidden states
    with pytest.raises(ValueError, match="chunked loss only"):
        estimate_arm("neo", "plain", StepShape(student, teacher, _run()))
    # CE arms never read the teacher: --cross-tokenizer changes nothing for them
    sft = estimate_arm("sft", "plain", StepShape(student, None, _run()))
    assert (
        sft.total == estimate_arm("sft", "plain", StepShape(student, None, _run(cross_tokenizer=None))).total
    )


def test_plan_command_across_tokenizers():
    config = PlanConfig(
        shape=SHAPE.name,
        device="cpu",
        dtype="float32",
        methods=["neo", "sft"],
        cross_tokenizer="uld",
        teacher_length_ratio=0.91,
    )
    rows, settings = plan_rows(config)
    assert [(r.method, r.impl) for r in rows] == [("neo", "chunked"), ("sft", "plain"), ("sft", "chunked")]
    assert settings["teacher_seq_len"] == 117 and settings["cross_tokenizer"] == "uld"
    with pytest.raises(ConfigError) as err:
        plan_rows(dataclasses.replace(config, cross_tokenizer=None))
    assert "--cross-tokenizer" in str(err.value)
    with pytest.raises(ConfigError) as err:
        plan_rows(
            dataclasses.replace(config, loss_impls=["plain"], teacher_length_ratio=0, cross_tokenizer_top_k=0)
        )
    for fragment in ("add chunked to --loss-impls", "--teacher-length-ratio", "--cross-tokenizer-top-k"):
        assert fragment in str(err.value)


@pytest.mark.parametrize("method", ["shared-vocab", "uld"])
def test_cross_logits_match_live_bytes_of_the_step_loss(method):
    """The loss of ``distill._cross_loss`` on random models with real-sized vocabularies (teacher 65,536,
    student 16,384), every student row aligned (the plan's bound): its live bytes above the student's
    hidden states against ``cross_logit_bytes``. The alignment indices are built here, not from text:
    memory depends on their counts alone."""
    torch.manual_seed(0)
    b, t, t_t, k, chunk = 2, 96, 144, 64, 128
    teacher = build_llama(65536, hidden_size=64, num_layers=1, seed=1).eval()
    student = build_llama(16384, hidden_size=32, num_layers=1, seed=2)
    n = b * (t - 1)
    rows = torch.arange(n)
    flat = torch.cat([torch.arange(t - 1), t_t + torch.arange(t - 1)])  # aligned teacher positions
    batch = {
        "teacher_input_ids": torch.randint(0, 65536, (b, t_t)),
        "teacher_attention_mask": torch.ones(b, t_t, dtype=torch.long),
        "xt_rows": rows,
        "xt_teacher": flat,
        "xt_t_eot": torch.full((n,), -1),
        "xt_s_eot": torch.full((n,), -1),
    }
    to_student = torch.where(torch.rand(65536) < 0.5, torch.randint(0, 16384, (65536,)), -1)
    pair = CrossPair(method, to_student, 65536, 16384, 0, k)
    ids = torch.randint(0, 16384, (b, t))
    hidden = final_hidden_states(student, ids, torch.ones_like(ids)).reshape(-1, 32)[:n].detach()
    hidden.requires_grad_(True)
    weights = [p for m in (teacher, student) for p in m.parameters()]
    tracker = LiveTensorBytes(hidden, *weights, *batch.values(), to_student)
    before = tracker.current
    with tracker:
        targets, kd_rows = cross_targets(
            teacher,
            batch,
            pair,
            n,
            device=torch.device("cpu"),
            dtype=torch.float32,
            temperature=1.0,
            chunk_size=chunk,
        )
        options = LossOptions(kd_ratio=0.5, chunk_size=chunk, uld=method == "uld")
        head = HeadInput(hidden, *lm_head(student), None)
        chunked_distill_loss(
            head, ids.reshape(-1)[1 : n + 1], targets, options=options, num_tokens=n, kd_rows=kd_rows
        ).loss.backward()
    measured = tracker.peak - before + 4 * n * 32  # + the hidden states' gradient the plan counts
    run = _run(
        batch_size=b,
        seq_len=t,
        chunk_size=chunk,
        teacher_length_ratio=t_t / t,
        cross_top_k=k,
        cross_tokenizer=method,
    )
    planned = cross_logit_bytes(model_dims(student.config, lora_r=4), model_dims(teacher.config), run)
    assert planned == pytest.approx(measured, rel=0.05), f"plan {planned / GiB:.4f} vs {measured / GiB:.4f}"
