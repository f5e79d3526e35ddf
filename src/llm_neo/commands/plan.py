"""`llm-neo plan`: each arm's peak memory, estimated from the model configs before any weight loads.

The estimate is a sum of components, each a product of a count the configs give exactly (parameters,
tokens, vocabulary, hidden sizes) and a byte coefficient that says how many bytes the training step holds
per unit of that count. The coefficients were measured on llm-neo's own training step
(``llm_neo.distill.train_step``) by counting live tensor bytes, and checked against H200 measurements of
the real Llama shapes (see ``docs/memory.md``, which derives each one):

    component          what it is                                                  bytes
    teacher weights    the frozen teacher in the compute dtype                     c · P_t
                       (--teacher-quant: block linears P_bl at q bytes each)       q·P_bl + c·(P_t − P_bl)
    student weights    full arms: fp32 master weights; LoRA arms: the frozen base  4 · P_s  |  c · P_s
                       in the compute dtype (--student-quant: block linears at q)
    trainable states   LoRA arms: fp32 LoRA weights; AdamW's two fp32 states;       (4 +) 8 · P_train
                       fp32 gradients where alive at the peak                      (+ 4 · P_train)
    weight copies      autocast's low-precision copies of the weights it casts     c · P_cast
                       (full arms: every linear weight; LoRA arms: the adapters)
    activations        what autograd saves, per token per layer (SDPA attention:   L · B·T · a(H, H_kv, I, r)
                       no T² term); with gradient checkpointing only each block's
                       input, plus one block recomputed in the backward
    logits             plain: [B, T, V] logits of both models, fp32 log-softmaxes  k · B·T·V
                       and their gradients; chunked: the same per chunk of tokens   k · min(C, N)·V + …
                       (--cross-tokenizer: the teacher's top-k chunk or the         (cross_logit_bytes)
                       student's, the larger; the teacher at its own length)
    process baseline   CPU only: Python, torch, transformers (measured here)       RSS after imports

c is the compute dtype's size (2 for bf16 autocast on GPUs, 4 for fp32 on CPUs). q, the bytes per quantized
block-linear weight (``QUANT_BYTES``): int8 (torchao weight-only) 1 + 5/in (a fp32 scale and an int8 zero
point per row); nf4 (bitsandbytes, double-quantized absmax) 0.5 + 1/64 + 4/16384. Embeddings, norms and the
lm_head stay at c. A torchao int8 *student* base also holds, for the backward, a compute-dtype copy of each
weight it multiplied (its linear is plain autograd over ``q.to(c)``): c · P_bl while every block's
activations are saved, one block's worth with gradient checkpointing. bitsandbytes' 4-bit matmul saves only
the packed weight. The peak is the largest
of three phases of a step: the loss (activations and logits alive), the backward of a checkpointed model
(one block recomputed, gradients accumulating) and the optimizer step (gradients, states and AdamW's
temporary). Coefficients are for Llama-style decoders (RMSNorm, RoPE, SDPA, SwiGLU MLP) and the forward-KL
divergence; other architectures and divergences get the same formula as an approximation.

With ``--gpu CARD`` the plan is for that card, and adds the teacher cache's (``estimate_cache``): the ranks
that hold the teacher replicated or FSDP2-sharded, and the time of ``--cache-tokens`` at a stated
utilisation of the card's bf16 peak (an estimate from FLOPs, not a measurement).
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from llm_neo.choices import (
    CROSS_TOKENIZER_METHODS,
    KD_METHODS,
    METHOD_NAMES,
    METHODS,
    STUDENT_QUANT,
    TEACHER_QUANT,
)
from llm_neo.commands.cost import GPUS, Gpu, parse_tokens
from llm_neo.config import DeviceOptions, default_chunk_size
from llm_neo.options import Effect, option_help
from llm_neo.runtime.memory import GiB, rss_bytes

__all__ = [
    "ArmEstimate",
    "CacheEstimate",
    "ModelDims",
    "PlanConfig",
    "RunShape",
    "StepShape",
    "estimate_arm",
    "estimate_cache",
    "model_dims",
    "plan_rows",
    "run_plan",
]

IMPLS = ("plain", "chunked")

# --- Byte coefficients (measured on llm-neo's train_step; derivation in docs/memory.md) --------------
# Logits, per element of [B, T, V] (plain) or of one [chunk, V] block (chunked). KD: forward KL + CE.
PLAIN_KD_BASE = 25  # fp32 log-softmaxes, KL terms and gradients, [N, V] indexed copies: + 4·c more below
PLAIN_KD_PER_C = 4  # four [B, T, V] / [N, V] logits tensors (both models, full and indexed) in dtype c
PLAIN_CE = 12  # CE only (sft, lora): fp32 copy, log-softmax and its gradient
# The chunk loop's analytic CE + forward-KL gradient holds three fp32 [chunk, V] tensors at its peak
# (student logits turned gradient, teacher log-ratio, teacher probabilities); CE alone holds one.
CHUNK_KD = 12
CHUNK_CE = 4
# Across tokenizers (--cross-tokenizer, docs/cross-tokenizer.md), measured by live bytes like the rest:
# the student's chunk goes through autograd against the teacher's top-k (CE, log-softmax and their
# gradients: 16 bytes per [chunk, V_s] element, + 8 for the KD rows' copy, all rows aligned at most);
# the teacher's top-k chunk, in inference mode before it, holds a fp32 [chunk, V_t] log-softmax edited in
# place and then either logsumexp's temporary (uld: 8) or a bool mask and one masked fp32 copy
# (shared-vocab: 9); the lm_head's compute-dtype logits and their copy (c + 4) die before those.
XT_STUDENT_CHUNK = 24
XT_TEACHER_CHUNK = {"shared-vocab": 9, "uld": 8}
XT_TARGET_BYTES = 12  # per [N, k] target: an int64 id and a fp32 log-probability
# Activations per token per layer (bytes), as a_H·H + a_kv·H_kv + a_I·I + a_r·r·(adapted linears) + heads.
ACT_KV_PER_C = 2  # k and v projections (saved for the rotary/attention backward)
ACT_I_PER_C = 4  # gate, act(gate), up, act·up of the SwiGLU MLP
ACT_HEADS = 1  # attention log-sum-exp statistics
MLP_LINEARS = 3  # gate, up and down projections: the adapted linears inside the MLP
OUTSIDE_LAYERS_FULL = 8  # per token·H outside the blocks, full arms (final norm and lm_head input)
ADAMW_TEMP = 4  # foreach AdamW's sqrt(v) temporary, per trainable parameter


@dataclass(frozen=True)
class ModelDims:
    """What the estimate needs to know about one model, all exact counts from its config."""

    parameters: int
    linear_weights: int  # numel of every nn.Linear weight (incl. lm_head): what autocast casts
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    kv_dim: int  # num_key_value_heads · head_dim
    vocab_size: int  # logit width
    lora_parameters: int  # for the LoRA rank/targets given to model_dims (0 if none)
    lora_linears_per_layer: int
    block_linear_weights: int = (
        0  # numel of the nn.Linear weights inside the blocks: what quantization stores
    )
    block_linear_rows: int = 0  # their output rows (one scale each at int8)


def model_dims(
    config: Any, *, lora_r: int | None = None, lora_target_modules: Sequence[str] | None = None
) -> ModelDims:
    """Count a model's parameters from its config, instantiating it on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM

    from llm_neo.models.anatomy import default_target_modules, find_output_head, logit_width

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    parameters = sum(p.numel() for p in model.parameters())
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    linear_weights = sum(m.weight.numel() for _, m in linears)
    head = find_output_head(model)
    lora_parameters = lora_per_layer = 0
    if lora_r:
        targets = set(lora_target_modules or default_target_modules(model))
        adapted = [
            (n, m)
            for n, m in linears
            if m is not head and n.rsplit(".", 1)[-1] in targets and any(p.isdigit() for p in n.split("."))
        ]
        lora_parameters = sum(lora_r * (m.in_features + m.out_features) for _, m in adapted)
        layers = {next(p for p in n.split(".") if p.isdigit()) for n, _ in adapted}
        lora_per_layer = round(len(adapted) / max(len(layers), 1))
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(text.hidden_size)
    heads = int(text.num_attention_heads)
    head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    vocab = logit_width(model) if head is not None else int(text.vocab_size)
    in_blocks = [m for n, m in linears if m is not head and any(p.isdigit() for p in n.split(".")[:-1])]
    return ModelDims(
        parameters=parameters,
        linear_weights=linear_weights,
        hidden_size=hidden,
        intermediate_size=int(getattr(text, "intermediate_size", None) or 4 * hidden),
        num_layers=int(text.num_hidden_layers),
        num_heads=heads,
        kv_dim=kv_heads * head_dim,
        vocab_size=vocab,
        lora_parameters=lora_parameters,
        lora_linears_per_layer=lora_per_layer,
        block_linear_weights=sum(m.weight.numel() for m in in_blocks),
        block_linear_rows=sum(m.out_features for m in in_blocks),
    )


QUANT_KINDS = ("none", "int8", "nf4")
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit codes, a uint8 absmax per 64, a fp32 one per 256 of those


def weight_bytes_at(dims: ModelDims, kind: str, c: int) -> int:
    """Bytes of a frozen model's weights with its block linears stored as ``kind`` (none, int8, nf4) and
    everything else (embeddings, norms, lm_head) in the compute dtype (c bytes)."""
    if kind == "none":
        return c * dims.parameters
    rest = c * (dims.parameters - dims.block_linear_weights)
    if (
        kind == "int8"
    ):  # torchao Int8WeightOnlyConfig: int8 codes, a fp32 scale and an int8 zero point per row
        return rest + dims.block_linear_weights + 5 * dims.block_linear_rows
    if kind == "nf4":
        return rest + math.ceil(NF4_BYTES * dims.block_linear_weights)
    raise ValueError(f"unknown quantization {kind!r}; one of {QUANT_KINDS}")


def fsdp_rank_share(total: int, whole: int, world_size: int) -> int:
    """One rank's share of ``total`` (bytes or a count) under llm-neo's FSDP2 sharding over
    ``world_size`` ranks: everything but ``whole``, the lm_head (a tied head: the embeddings), which every
    rank keeps whole, split evenly."""
    return total if world_size <= 1 else (total - whole) // world_size + whole


def activation_bytes_per_token_layer(dims: ModelDims, *, lora: bool, c: int, lora_r: int) -> int:
    """Bytes autograd saves per token per decoder block (no checkpointing).

    Full arms keep fp32 master weights, so their residual stream and norms are fp32 and the norm weights'
    gradients need the normalised inputs: 28 + c bytes per hidden unit. LoRA arms freeze the norms:
    24. Projections and the MLP's four [tokens, I] tensors are saved in the compute dtype.
    """
    a_h = 24 if lora else 28 + c
    per = a_h * dims.hidden_size + ACT_KV_PER_C * c * dims.kv_dim + ACT_I_PER_C * c * dims.intermediate_size
    per += ACT_HEADS * dims.num_heads
    if lora:
        per += c * lora_r * dims.lora_linears_per_layer  # each adapter's [tokens, r] intermediate
    return per


@dataclass
class ArmEstimate:
    """One arm's estimated peak: components in bytes, and which phase of the step the peak is in."""

    method: str
    impl: str
    components: dict[str, int]
    phase: str
    total: int
    floor: int  # the weights floor: what no implementation can go below (weights + trainable states)

    def gib(self) -> dict[str, float]:
        return {k: v / GiB for k, v in self.components.items()} | {"total": self.total / GiB}


@dataclass(frozen=True)
class RunShape:
    """What one training step's peak depends on besides its models: the micro-batch, the precision, the
    memory options and the sharding.

    ``compute_bytes`` is c: 2 for bf16/fp16 autocast, 4 for fp32. ``baseline`` (CPU: the process floor)
    is added as is. ``world_size`` W: the per-rank peak under llm-neo's FSDP2 sharding. ``teacher_quant``
    / ``student_quant`` (none, int8, nf4): the teacher's and the LoRA arms' frozen student base's block
    linears stored quantized (``weight_bytes_at``).
    """

    batch_size: int
    seq_len: int
    compute_bytes: int
    lora_r: int
    gradient_checkpointing: bool = False
    mlp_chunks: int = 1
    chunk_size: int = 1024
    device_type: str = "cuda"
    baseline: int = 0
    world_size: int = 1
    teacher_quant: str = "none"
    student_quant: str = "none"
    on_policy: bool = False  # the student also generates (distill --on-policy): its KV cache's phase
    cross_tokenizer: str | None = None  # distill --cross-tokenizer: the teacher reads its own tokens
    teacher_length_ratio: float = 1.0  # teacher tokens per student token on the same text
    cross_top_k: int = 64  # teacher tokens kept per aligned position


@dataclass(frozen=True)
class StepShape:
    """Everything ``estimate_arm`` reads: the two models' dimensions (no teacher: the CE-only arms) and
    the run's shape."""

    student: ModelDims
    teacher: ModelDims | None
    run: RunShape


@dataclass(frozen=True)
class _Weights:
    """The step's weight and optimizer-state bytes, per rank (see ``estimate_arm``)."""

    teacher: int
    student: int
    trainable: int  # trainable parameters (a count)
    lora: int
    adam: int
    grads: int
    adam_temp: int
    copies: int  # autocast's low-precision copies of the weights it casts
    int8_copies: int  # a torchao int8 student base's compute-dtype copies, alive until the backward


def _weight_bytes(shape: StepShape, *, lora: bool, kd: bool) -> _Weights:
    student, teacher, run = shape.student, shape.teacher, shape.run
    c = run.compute_bytes
    w = max(run.world_size, 1)

    teacher_w = (
        fsdp_rank_share(
            weight_bytes_at(teacher, run.teacher_quant, c), c * teacher.vocab_size * teacher.hidden_size, w
        )
        if (kd and teacher is not None)
        else 0
    )
    head = student.vocab_size * student.hidden_size
    trainable = student.lora_parameters // w if lora else fsdp_rank_share(student.parameters, head, w)
    base_quant = run.student_quant if lora else "none"
    student_w = (
        fsdp_rank_share(weight_bytes_at(student, base_quant, c), c * head, w)
        if lora
        else 4 * fsdp_rank_share(student.parameters, head, w)
    )
    # Autocast casts each weight it multiplies once per forward; the copies live until the backward.
    copies = c * (student.lora_parameters if lora else student.linear_weights) // w if c < 4 else 0
    return _Weights(
        teacher=teacher_w,
        student=student_w,
        trainable=trainable,
        lora=4 * trainable if lora else 0,
        adam=8 * trainable,
        grads=4 * trainable,
        # foreach AdamW (the default on GPUs) holds a sqrt(v) temporary for every parameter at once
        adam_temp=ADAMW_TEMP * trainable if (run.device_type == "cuda" and w == 1) else 0,
        copies=copies,
        # A torchao int8 base's linear is autograd over q.to(c): the copy lives until the backward.
        int8_copies=c * student.block_linear_weights // w if base_quant == "int8" else 0,
    )


def _logit_bytes(shape: StepShape, impl: str, *, lora: bool, kd: bool) -> int:
    """The loss's logits and what it derives from them (plain: the whole batch; chunked: one chunk)."""
    student, teacher, run = shape.student, shape.teacher, shape.run
    c, vocab, h = run.compute_bytes, student.vocab_size, student.hidden_size
    tokens = run.batch_size * run.seq_len
    trained = run.batch_size * max(run.seq_len - 1, 1)
    if impl == "plain":
        k = (PLAIN_KD_BASE + PLAIN_KD_PER_C * c) if kd else PLAIN_CE
        return k * tokens * vocab
    if kd and teacher is not None and run.cross_tokenizer is not None:
        return cross_logit_bytes(student, teacher, run) + (0 if lora else 4 * vocab * h)
    k = CHUNK_KD if kd else CHUNK_CE
    logits = k * min(run.chunk_size, trained) * vocab
    # final hidden states, their [N, H] selection and its gradient; the teacher's in the compute dtype
    logits += trained * (2 * c * h + (c * teacher.hidden_size if kd and teacher is not None else 0))
    if not lora:
        logits += 4 * vocab * h  # the lm_head gradient, accumulated over chunks in fp32
    return logits


def teacher_seq_len(run: RunShape) -> int:
    """The teacher's tokens per sequence: the student's T across tokenizers scaled by the length ratio."""
    if run.cross_tokenizer is None:
        return run.seq_len
    return max(math.ceil(run.teacher_length_ratio * run.seq_len), 2)


def cross_logit_bytes(student: ModelDims, teacher: ModelDims, run: RunShape) -> int:
    """The chunked loss's bytes across tokenizers (``llm_neo.cross_tokenizer.cross_targets``, then the
    chunked loss against its targets): never [tokens × V] for either model.

    Alive throughout: the student's [N, H_s] final hidden states and their gradient (2c·N·H_s). Then the
    larger of two moments. The teacher's: its [B, T_t, H_t] final hidden states, their [M, H_t] aligned
    rows (M ≤ N), one [C, V_t] top-k chunk. The student's: the [N, k] targets and one [C, V_s] autograd
    chunk. N = B·(T − 1), T_t = ``teacher_seq_len``, C = min(chunk, N)."""
    c = run.compute_bytes
    trained = run.batch_size * max(run.seq_len - 1, 1)
    chunk = min(run.chunk_size, trained)
    teacher_side = (
        c * run.batch_size * teacher_seq_len(run) * teacher.hidden_size
        + c * trained * teacher.hidden_size
        + XT_TEACHER_CHUNK[run.cross_tokenizer or "shared-vocab"] * chunk * teacher.vocab_size
    )
    student_side = XT_TARGET_BYTES * trained * run.cross_top_k + XT_STUDENT_CHUNK * chunk * student.vocab_size
    return 2 * c * trained * student.hidden_size + max(teacher_side, student_side)


def estimate_arm(method: str, impl: str, shape: StepShape) -> ArmEstimate:
    """The peak of one training step of ``method`` (kd, neo, sft, lora) with loss ``impl``, for the
    models and the run ``shape`` gives.

    Under FSDP2 (``world_size`` W > 1, docs/distributed.md): weights except the whole lm_head, trainable
    states and autocast copies divided by W; activations and logits are per rank's own micro-batch,
    unchanged. Tokens: every position of the B×T batch runs through both models; N = B·(T-1) positions
    are trained (all but each sequence's last, whose next token is not in the batch). Full arms train
    every weight and ignore ``student_quant``.
    """
    if method not in METHOD_NAMES or impl not in IMPLS:
        raise ValueError(f"unknown arm {method}:{impl}; methods {METHOD_NAMES}, impls {IMPLS}")
    student, run = shape.student, shape.run
    c = run.compute_bytes
    lora, kd = METHODS[method].lora, METHODS[method].kd
    if kd and run.cross_tokenizer is not None and impl != "chunked":
        raise ValueError(f"{method}:{impl}: the cross-tokenizer step has the chunked loss only")
    tokens = run.batch_size * run.seq_len
    h = student.hidden_size
    wt = _weight_bytes(shape, lora=lora, kd=kd)
    loss_copies = wt.copies + (0 if run.gradient_checkpointing else wt.int8_copies)

    per_layer = activation_bytes_per_token_layer(student, lora=lora, c=c, lora_r=run.lora_r)
    outside = 0 if lora else OUTSIDE_LAYERS_FULL * h * tokens
    if run.gradient_checkpointing:
        residual = c if lora else 4  # bytes of the residual stream each block receives
        saved_inputs = student.num_layers * tokens * residual * h
        loss_acts = saved_inputs + outside
    else:
        saved_inputs = 0
        loss_acts = student.num_layers * tokens * per_layer + outside

    common = {
        "teacher weights": wt.teacher,
        "student weights": wt.student,
    }
    phases: dict[str, dict[str, int]] = {
        "loss": common
        | {
            "trainable states": wt.lora + wt.adam,
            "weight copies": loss_copies,
            "activations": loss_acts,
            "logits": _logit_bytes(shape, impl, lora=lora, kd=kd),
        },
        "optimizer": common
        | {
            "trainable states": wt.lora + wt.adam + wt.grads + wt.adam_temp,
            "weight copies": 0,
            "activations": 0,
            "logits": 0,
        },
    }
    if run.gradient_checkpointing:
        # One block recomputed while all gradients accumulate: the backward's peak. Its activations and
        # their gradients: x 5/4 for attention and norms, x 3/2 for the MLP, whose [tokens, I] tensors
        # get gradients of their own size (measured by live bytes on MLP-heavy blocks). With the MLP
        # checkpointed in K chunks inside the block, one chunk of those exists at a time.
        mlp = ACT_I_PER_C * c * student.intermediate_size + (c * run.lora_r * MLP_LINEARS if lora else 0)
        recompute = tokens * ((per_layer - mlp) * 5 // 4 + mlp * 3 // (2 * max(run.mlp_chunks, 1)))
        phases["backward"] = common | {
            "trainable states": wt.lora + wt.adam + wt.grads,
            "weight copies": wt.copies + wt.int8_copies // max(student.num_layers, 1),
            "activations": saved_inputs + recompute + outside,
            "logits": 0,
        }
    if run.on_policy and kd:
        # The student's sampling, before the step's forwards: its KV cache, k and v of every layer for the
        # whole sequence (prompt + response, at most T), and one position's fp32 logits per sequence.
        phases["generate"] = common | {
            "trainable states": wt.lora + wt.adam,
            "weight copies": wt.copies,
            "activations": 2 * student.num_layers * tokens * student.kv_dim * c,
            "logits": 4 * run.batch_size * student.vocab_size,
        }
    if run.device_type == "cpu":
        for parts in phases.values():
            parts["process baseline"] = run.baseline
    phase, parts = max(phases.items(), key=lambda kv: sum(kv[1].values()))
    floor = wt.teacher + wt.student + 16 * wt.trainable
    return ArmEstimate(
        method=method, impl=impl, components=dict(parts), phase=phase, total=sum(parts.values()), floor=floor
    )


# ----------------------------------------------------------------------------------------------------
# The teacher cache on a card (``cache-teacher``): the ranks that hold the teacher, the time N tokens take

# The cache's forward runs in inference mode, so nothing is saved for a backward: its largest moments are
# one block's (the [tokens, H] residual, normed input, attention output and q; k and v; the MLP's gate, up
# and act(gate)·up, all in the compute dtype) and one lm_head chunk's ([C, V] logits in the compute dtype,
# their fp32 copy, log-softmax and the top-k's scattered rest: teacher_cache.writer.teacher_topk).
CACHE_ACT_H = 4
CACHE_ACT_I = 3
CACHE_LOGITS_FP32 = 12
# FSDP2 gathers a block's whole weights for its forward and prefetches the next block's meanwhile.
FSDP_GATHERED_BLOCKS = 2


@dataclass(frozen=True)
class CacheEstimate:
    """``cache-teacher`` of one teacher on one card: what a rank holds replicated and FSDP2-sharded, the
    fewest ranks that hold it each way, and the time a cache of ``tokens`` takes (all bytes, seconds).

    ``ranks_replicated`` is 1 when the whole teacher and a micro-batch's forward fit one card, else None
    (no number of ranks helps); ``ranks_sharded`` the fewest ranks (>= 2) whose shards fit, None when even
    the parts every rank keeps whole do not. The time is teacher forward FLOPs, ``2 · parameters`` per
    token, at ``utilization`` of the card's dense bf16 peak, on ``ranks`` cards: 1 when replicated fits,
    else ``ranks_sharded`` (None: no time)."""

    card: str
    capacity: int
    compute_bytes: int
    weights: int
    activations: int
    replicated: int
    ranks_replicated: int | None
    sharded: int | None  # per rank at ranks_sharded
    ranks_sharded: int | None
    utilization: float
    peak_tflops: float
    flops_per_token: int
    seconds_per_token: float  # on one card
    tokens: int | None
    ranks: int | None
    seconds: float | None  # tokens on ``ranks`` cards


def cache_activation_bytes(teacher: ModelDims, *, tokens: int, chunk_size: int, c: int) -> int:
    """Bytes of one micro-batch's cache forward of ``tokens`` tokens at its largest moment (see
    ``CACHE_ACT_H``): a block's, or the lm_head chunk's beside the selected final hidden states."""
    block = (
        c
        * tokens
        * (CACHE_ACT_H * teacher.hidden_size + 2 * teacher.kv_dim + CACHE_ACT_I * teacher.intermediate_size)
    )
    head = min(chunk_size, tokens) * teacher.vocab_size * (c + CACHE_LOGITS_FP32)
    return max(block, head + c * tokens * teacher.hidden_size)


def estimate_cache(
    teacher: ModelDims,
    card: Gpu,
    *,
    batch_size: int,
    seq_len: int,
    compute_bytes: int,
    utilization: float,
    tokens: int | None = None,
    chunk_size: int = 1024,
    capacity: int | None = None,
) -> CacheEstimate:
    """The teacher cache of ``teacher`` on ``card`` (its memory, or ``capacity`` bytes) with micro-batches
    of ``batch_size × seq_len`` (see ``CacheEstimate``). Sharded, a rank holds its share of the weights
    (``fsdp_rank_share``: the lm_head whole), FSDP_GATHERED_BLOCKS gathered blocks and the forward."""
    c = compute_bytes
    capacity = capacity if capacity is not None else int(card.memory_gib * GiB)
    weights = c * teacher.parameters
    head = c * teacher.vocab_size * teacher.hidden_size
    gathered = FSDP_GATHERED_BLOCKS * c * teacher.block_linear_weights // max(teacher.num_layers, 1)
    acts = cache_activation_bytes(teacher, tokens=batch_size * seq_len, chunk_size=chunk_size, c=c)
    replicated = weights + acts
    room = capacity - head - gathered - acts  # what the split part of the weights may take per rank
    ranks_sharded = max(2, math.ceil((weights - head) / room)) if room > 0 else None
    ranks_replicated = 1 if replicated <= capacity else None
    ranks = ranks_replicated or ranks_sharded
    flops = 2 * teacher.parameters
    per_token = flops / (card.bf16_tflops * 1e12 * utilization)
    return CacheEstimate(
        card=card.name,
        capacity=capacity,
        compute_bytes=c,
        weights=weights,
        activations=acts,
        replicated=replicated,
        ranks_replicated=ranks_replicated,
        sharded=fsdp_rank_share(weights, head, ranks_sharded) + gathered + acts if ranks_sharded else None,
        ranks_sharded=ranks_sharded,
        utilization=utilization,
        peak_tflops=card.bf16_tflops,
        flops_per_token=flops,
        seconds_per_token=per_token,
        tokens=tokens,
        ranks=ranks,
        seconds=tokens * per_token / ranks if tokens is not None and ranks else None,
    )


def format_cache(est: CacheEstimate, *, gpu: str, batch_size: int, seq_len: int) -> str:
    """The cache estimate as the few lines ``llm-neo plan --gpu`` prints under its table."""
    from llm_neo.report.tables import format_duration, format_sig

    dtype = {2: "bf16", 4: "fp32"}[est.compute_bytes]
    lines = [
        f"teacher cache (cache-teacher) on {gpu} ({est.capacity / GiB:.1f} GiB per card), micro-batch "
        f"{batch_size} × {seq_len}, {dtype}:",
        f"  replicated: {est.weights / GiB:.2f} GiB weights + {est.activations / GiB:.2f} GiB forward = "
        f"{est.replicated / GiB:.2f} GiB per rank: "
        + ("fits one card" if est.ranks_replicated else "does not fit one card; shard it"),
        (
            f"  FSDP2-sharded (--teacher-shard fsdp): {est.ranks_sharded} ranks at least, "
            f"{(est.sharded or 0) / GiB:.2f} GiB per rank"
            if est.ranks_sharded
            else "  FSDP2-sharded: does not fit at any number of ranks (the lm_head and a micro-batch's "
            "forward alone exceed a card); a smaller --batch-size or --seq-len"
        ),
        f"  time (an estimate): 2 × {format_sig(est.flops_per_token / 2e9)} B parameters = "
        f"{format_sig(est.flops_per_token / 1e9)} GFLOP per token at {est.utilization:.0%} of "
        f"{est.peak_tflops:g} TFLOP/s (dense bf16 peak): {format_sig(est.seconds_per_token * 1e6)} µs per "
        "token per card",
    ]
    if est.tokens is not None and est.seconds is not None:
        lines.append(
            f"  {format_sig(est.tokens)} tokens: {format_duration(est.seconds)} on {est.ranks} "
            f"card{'s' if est.ranks != 1 else ''} ({format_sig(est.seconds * (est.ranks or 1) / 3600)} "
            "GPU-hours; more ranks divide the time)"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# The command


@dataclass
class PlanConfig(DeviceOptions):
    """`llm-neo plan`: estimate each arm's peak memory from the configs alone (no weights are loaded)."""

    shape: str | None = field(
        default=None,
        metadata=option_help(
            "A named shape (llama3-8b-to-1b, llama2-7b-to-1.1b, cpu-wide, tiny); or give --teacher and "
            "--student."
        ),
    )
    teacher: str | None = field(
        default=None, metadata=option_help("Teacher model dir or hub id; only its config.json is read.")
    )
    student: str | None = field(
        default=None, metadata=option_help("Student model dir or hub id; only its config.json is read.")
    )
    batch_size: int | None = field(
        default=None, metadata=option_help("Sequences per micro-batch. Default: the shape's, else 1.")
    )
    seq_len: int | None = field(
        default=None, metadata=option_help("Tokens per sequence. Default: the shape's, else 2048.")
    )
    methods: list[str] = field(
        default_factory=lambda: ["kd", "neo"], metadata=option_help("Arms to estimate: kd, neo, sft, lora.")
    )
    loss_impls: list[str] = field(
        default_factory=lambda: ["plain", "chunked"],
        metadata=option_help("Loss implementations: plain, chunked."),
    )
    loss_chunk_size: int | None = field(
        default=None,
        metadata=option_help(
            "Tokens per chunk of the chunked loss. Default: llm-neo distill's for the device."
        ),
    )
    lora_r: int | None = field(
        default=None, metadata=option_help("LoRA rank. Default: the shape's, else 64.")
    )
    lora_target_modules: list[str] | None = field(
        default=None, metadata=option_help("LoRA target linear layers. Default: every linear of every block.")
    )
    gradient_checkpointing: bool = field(
        default=False, metadata=option_help("Estimate with gradient checkpointing of the student.")
    )
    mlp_chunks: int = field(
        default=1,
        metadata=option_help("With --gradient-checkpointing: the MLP checkpointed in this many chunks."),
    )
    device_memory_gb: float | None = field(
        default=None,
        metadata=option_help(
            "Memory to fit in, GiB. Default: the GPU's total memory (CUDA), the available RAM (CPU)."
        ),
    )
    strict: bool = field(
        default=False, metadata=option_help("Exit with status 3 when an arm is not expected to fit.")
    )
    world_size: int = field(
        default=1,
        metadata=option_help("Processes the run is sharded over (FSDP2); the estimate is per rank."),
    )
    teacher_quant: str = field(
        default="none",
        metadata=option_help(
            "The teacher's block linears quantized (distill --teacher-quant): int8 (torchao weight-only, "
            "~1 byte per weight) or nf4 (~0.52 byte). Embeddings and lm_head stay in the compute dtype.",
            choices=TEACHER_QUANT,
        ),
    )
    student_quant: str = field(
        default="none",
        metadata=option_help(
            "The LoRA arms' frozen student base quantized (QLoRA, distill --student-quant).",
            choices=STUDENT_QUANT,
        ),
    )
    on_policy: bool = field(
        default=False,
        metadata=option_help(
            "The kd/neo arms also sample from the student (distill --on-policy): count its KV cache "
            "(a phase of its own: the sampling comes before the step's forwards)."
        ),
    )
    cross_tokenizer: str | None = field(
        default=None,
        metadata=option_help(
            "The kd/neo arms distill across tokenizers (distill --cross-tokenizer): the teacher reads its "
            "own tokens (--teacher-length-ratio) and its top-k is taken chunk by chunk over its "
            "vocabulary. The chunked loss only: their plain rows are not estimated.",
            choices=CROSS_TOKENIZER_METHODS,
        ),
    )
    teacher_length_ratio: float = field(
        default=1.0,
        metadata=option_help(
            "With --cross-tokenizer: teacher tokens per student token on the same text, check-pair's "
            "teacher tokens/char over the student's (Gemma-3 -> SmolLM2: 0.448 / 0.495 = 0.91)."
        ),
    )
    cross_tokenizer_top_k: int = field(
        default=64,
        metadata=option_help("With --cross-tokenizer: teacher tokens kept per aligned position."),
    )
    gpu: str | None = field(
        default=None,
        metadata=option_help(
            f"The card to plan for ({', '.join(GPUS)}): its memory is the one to fit in, and the plan "
            "adds the teacher cache's: the ranks that hold the teacher replicated and FSDP2-sharded, and "
            "the time per token at --utilization of its bf16 peak.",
            choices=tuple(GPUS),
            effect=Effect.REPORT,
        ),
    )
    utilization: float = field(
        default=0.4,
        metadata=option_help(
            "With --gpu: the fraction of the card's bf16 peak the teacher cache's time assumes.",
            effect=Effect.REPORT,
        ),
    )
    cache_tokens: str | None = field(
        default=None,
        metadata=option_help(
            "With --gpu: the time a teacher cache of this many tokens takes (e.g. 50M, 2B).",
            effect=Effect.REPORT,
        ),
    )
    json: str | None = field(
        default=None, metadata=option_help("Also write the estimates to this JSON file.")
    )
    trust_remote_code: bool = field(
        default=False, metadata=option_help("Allow config code from the model dir.")
    )


def _device_type(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name).type


def _compute_bytes(dtype: str, device_type: str) -> int:
    if dtype == "auto":
        return 2 if device_type == "cuda" else 4
    return 4 if dtype == "float32" else 2


def device_memory_bytes(device: str) -> int | None:
    """Total GPU memory (CUDA) or available RAM (CPU); None if unknown."""
    device_type = _device_type(device)
    if device_type == "cuda":
        if not torch.cuda.is_available():
            return None
        index = torch.device(device).index if device not in ("auto", "cuda") else None
        return int(torch.cuda.mem_get_info(index)[1])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _validate(config: PlanConfig) -> None:
    from llm_neo.commands.shapes import SHAPES
    from llm_neo.errors import ConfigError

    p: list[str] = []
    if config.shape is None and not config.student:
        p.append("give --shape NAME, or --student (and --teacher for kd/neo) to read their configs")
    if config.shape is not None and config.shape not in SHAPES:
        p.append(f"--shape: {config.shape!r} is not one of {', '.join(SHAPES)}")
    if config.shape is not None and (config.student or config.teacher):
        p.append("--shape and --student/--teacher exclude each other; give one or the other")
    for m in config.methods:
        if m not in METHOD_NAMES:
            p.append(f"--methods: {m!r} is not one of {', '.join(METHOD_NAMES)}")
    for i in config.loss_impls:
        if i not in IMPLS:
            p.append(f"--loss-impls: {i!r} is not one of {', '.join(IMPLS)}")
    kd_arms = any(m in KD_METHODS for m in config.methods)
    if config.shape in SHAPES and SHAPES[config.shape].cross and kd_arms and config.cross_tokenizer is None:
        p.append(
            f"--shape {config.shape}: its teacher and student tokenizers differ; the kd/neo arms need "
            f"--cross-tokenizer ({', '.join(CROSS_TOKENIZER_METHODS)}), or --methods sft lora"
        )
    if config.shape is None and kd_arms and not config.teacher:
        p.append("--teacher is required to estimate kd/neo (or use --methods sft lora)")
    for name, value in (
        ("batch-size", config.batch_size),
        ("seq-len", config.seq_len),
        ("lora-r", config.lora_r),
        ("loss-chunk-size", config.loss_chunk_size),
        ("world-size", config.world_size),
        ("mlp-chunks", config.mlp_chunks),
        ("cross-tokenizer-top-k", config.cross_tokenizer_top_k),
    ):
        if value is not None and value < 1:
            p.append(f"--{name}: {value} is out of range; it must be >= 1")
    if config.seq_len is not None and config.seq_len < 2:
        p.append(f"--seq-len: {config.seq_len} is out of range; it must be >= 2")
    for who, kind in (("teacher", config.teacher_quant), ("student", config.student_quant)):
        if kind not in QUANT_KINDS:
            p.append(f"--{who}-quant: {kind!r} is not one of {', '.join(QUANT_KINDS)}")
    if config.cross_tokenizer is not None and config.cross_tokenizer not in CROSS_TOKENIZER_METHODS:
        p.append(
            f"--cross-tokenizer: {config.cross_tokenizer!r} is not one of "
            + ", ".join(CROSS_TOKENIZER_METHODS)
        )
    if config.cross_tokenizer is not None and "chunked" not in config.loss_impls:
        p.append(
            "--cross-tokenizer: the cross-tokenizer step has the chunked loss only; "
            "add chunked to --loss-impls"
        )
    if not config.teacher_length_ratio > 0:
        p.append(f"--teacher-length-ratio: {config.teacher_length_ratio} must be > 0 (e.g. 0.91)")
    if config.device_memory_gb is not None and config.device_memory_gb <= 0:
        p.append(f"--device-memory-gb: {config.device_memory_gb} must be > 0")
    if config.gpu is not None and config.gpu not in GPUS:
        p.append(f"--gpu: {config.gpu!r} is not one of {', '.join(GPUS)}")
    if not 0 < config.utilization <= 1:
        p.append(f"--utilization: {config.utilization} is out of range; it must be in (0, 1], e.g. 0.4")
    if config.cache_tokens is not None:
        if config.gpu is None:
            p.append(f"--cache-tokens needs --gpu (the card the cache is built on: {', '.join(GPUS)})")
        try:
            parse_tokens(config.cache_tokens, option="--cache-tokens")
        except ConfigError as err:
            p += err.problems
    if config.gpu is not None and config.shape is None and not config.teacher:
        p.append("--gpu plans the teacher cache too: give --teacher (or --shape)")
    if p:
        raise ConfigError(p)


def _configs(config: PlanConfig) -> tuple[Any, Any, int, int, int]:
    """The teacher's config (None: none given), the student's, and the batch, length and LoRA rank."""
    from llm_neo.commands.shapes import get_shape

    if config.shape is not None:
        shape = get_shape(config.shape)
        return (
            shape.teacher,
            shape.student,
            config.batch_size or shape.batch_size,
            config.seq_len or shape.seq_len,
            config.lora_r or shape.lora_r,
        )
    from llm_neo.models.loading import load_config  # a model dir, hub id or GGUF file

    assert config.student is not None  # _validate
    trust = config.trust_remote_code
    s_config = load_config(config.student, trust_remote_code=trust)
    t_config = load_config(config.teacher, trust_remote_code=trust) if config.teacher else None
    return t_config, s_config, config.batch_size or 1, config.seq_len or 2048, config.lora_r or 64


def plan_cache(config: PlanConfig) -> CacheEstimate | None:
    """The teacher cache's estimate on ``config.gpu`` (None without --gpu): micro-batches of the plan's
    batch and length, in the compute dtype a card uses (bf16 unless --dtype says otherwise)."""
    _validate(config)
    if config.gpu is None:
        return None
    t_config, _, batch, seq, _ = _configs(config)
    card = GPUS[config.gpu]
    return estimate_cache(
        model_dims(t_config),
        card,
        batch_size=batch,
        seq_len=seq,
        compute_bytes=_compute_bytes(config.dtype, "cuda"),
        utilization=config.utilization,
        tokens=parse_tokens(config.cache_tokens, option="--cache-tokens") if config.cache_tokens else None,
        chunk_size=config.loss_chunk_size or default_chunk_size("cuda", int(t_config.vocab_size)),
        capacity=int(config.device_memory_gb * GiB) if config.device_memory_gb is not None else None,
    )


def plan_rows(config: PlanConfig, *, baseline: int | None = None) -> tuple[list[ArmEstimate], dict[str, Any]]:
    """The estimates for every (method, impl) of ``config``, and the resolved settings they assume."""
    _validate(config)
    t_config, s_config, batch, seq, r = _configs(config)
    device_type = "cuda" if config.gpu else _device_type(config.device)  # --gpu: planned for that card
    c = _compute_bytes(config.dtype, device_type)
    student = model_dims(s_config, lora_r=r, lora_target_modules=config.lora_target_modules)
    teacher = model_dims(t_config) if t_config is not None else None
    base = (rss_bytes() if baseline is None else baseline) if device_type == "cpu" else 0
    chunk = config.loss_chunk_size or default_chunk_size(device_type, student.vocab_size)
    step_shape = StepShape(
        student,
        teacher,
        RunShape(
            batch_size=batch,
            seq_len=seq,
            compute_bytes=c,
            lora_r=r,
            gradient_checkpointing=config.gradient_checkpointing,
            mlp_chunks=config.mlp_chunks if config.gradient_checkpointing else 1,
            chunk_size=chunk,
            device_type=device_type,
            baseline=base,
            world_size=config.world_size,
            teacher_quant=config.teacher_quant,
            student_quant=config.student_quant,
            on_policy=config.on_policy,
            cross_tokenizer=config.cross_tokenizer,
            teacher_length_ratio=config.teacher_length_ratio,
            cross_top_k=config.cross_tokenizer_top_k,
        ),
    )
    rows = [
        estimate_arm(method, impl, step_shape)
        for method in config.methods
        for impl in config.loss_impls
        # across tokenizers the kd/neo arms have the chunked loss only (distill refuses the others)
        if impl == "chunked" or config.cross_tokenizer is None or method not in KD_METHODS
    ]
    settings = {
        "shape": config.shape,
        "teacher": config.teacher,
        "student": config.student,
        "batch_size": batch,
        "seq_len": seq,
        "lora_r": r,
        "device_type": device_type,
        "compute_dtype_bytes": c,
        "gradient_checkpointing": config.gradient_checkpointing,
        "mlp_chunks": config.mlp_chunks,
        "world_size": config.world_size,
        "loss_chunk_size": chunk,
        "teacher_parameters": teacher.parameters if teacher else None,
        "student_parameters": student.parameters,
        "lora_parameters": student.lora_parameters,
        "teacher_quant": config.teacher_quant,
        "student_quant": config.student_quant,
        "on_policy": config.on_policy,
        "cross_tokenizer": config.cross_tokenizer,
        "teacher_seq_len": teacher_seq_len(step_shape.run) if config.cross_tokenizer else None,
        "cross_tokenizer_top_k": config.cross_tokenizer_top_k if config.cross_tokenizer else None,
        "gpu": config.gpu,
    }
    return rows, settings


COLUMNS = [
    "teacher weights",
    "student weights",
    "trainable states",
    "weight copies",
    "activations",
    "logits",
    "process baseline",
    "total",
    "phase",
]


def format_plan(rows: list[ArmEstimate], capacity: int | None) -> str:
    """The plan as a Markdown table (GiB), one row per arm."""
    from llm_neo.report.tables import format_table

    columns = [c for c in COLUMNS if c != "process baseline" or any(c in r.components for r in rows)]
    table: dict[str, dict[str, Any]] = {}
    for row in rows:
        cells: dict[str, Any] = {k: f"{v:.2f}" for k, v in row.gib().items()}
        cells["phase"] = row.phase
        if capacity:
            cells["fits"] = "yes" if row.total <= capacity else "NO"
        table[f"{row.method} {row.impl}"] = cells
    if capacity:
        columns.append("fits")
    return format_table(table, columns)


def run_plan(config: PlanConfig) -> int:
    """Print the estimates (and a warning per arm that will not fit); 0, or 3 with --strict and a misfit."""
    rows, settings = plan_rows(config)
    if config.device_memory_gb is not None:
        capacity: int | None = int(config.device_memory_gb * GiB)
    elif config.gpu is not None:
        capacity = int(GPUS[config.gpu].memory_gib * GiB)
    else:
        capacity = device_memory_bytes(config.device)
    where = f"{settings['shape']}" if settings["shape"] else f"{settings['teacher']} -> {settings['student']}"
    dtype = {2: "bf16", 4: "fp32"}[settings["compute_dtype_bytes"]]
    print(
        f"memory plan: {where}, batch {settings['batch_size']} × {settings['seq_len']}, {dtype}, "
        f"LoRA r={settings['lora_r']}, gradient checkpointing "
        f"{'on' if settings['gradient_checkpointing'] else 'off'}, chunk {settings['loss_chunk_size']}, "
        f"device {settings['device_type']}"
        + (f" ({capacity / GiB:.1f} GiB)" if capacity else "")
        + "".join(
            f", {who} {settings[f'{who}_quant']}"
            for who in ("teacher", "student")
            if settings[f"{who}_quant"] != "none"
        )
        + (
            f", cross-tokenizer {settings['cross_tokenizer']} (teacher {settings['teacher_seq_len']} tokens "
            f"per sequence, top-{settings['cross_tokenizer_top_k']})"
            if settings["cross_tokenizer"]
            else ""
        )
    )
    print()
    print(format_plan(rows, capacity))
    misfits = [r for r in rows if capacity and r.total > capacity]
    for r in misfits:
        assert capacity is not None
        remedies = ["a smaller batch or sequence length"]
        if r.impl == "plain":
            remedies.insert(0, "the chunked loss (--loss-impl chunked)")
        if not settings["gradient_checkpointing"]:
            remedies.insert(-1, "--gradient-checkpointing")
        print(
            f"warning: {r.method} {r.impl} needs about {r.total / GiB:.1f} GiB, more than the "
            f"{capacity / GiB:.1f} GiB available; try {', '.join(remedies)}",
            file=sys.stderr,
        )
    cache = plan_cache(config)
    if cache is not None and config.gpu is not None:
        print()
        print(
            format_cache(
                cache, gpu=config.gpu, batch_size=settings["batch_size"], seq_len=settings["seq_len"]
            )
        )
    if config.json:
        from llm_neo.runtime.atomic import atomic_write_json

        payload = {
            "settings": settings,
            "device_memory_gib": capacity / GiB if capacity else None,
            "arms": [asdict(r) | {"total_gib": r.total / GiB} for r in rows],
            "teacher_cache": asdict(cache) if cache is not None else None,
        }
        atomic_write_json(Path(config.json), payload)
    return 3 if (config.strict and misfits) else 0
