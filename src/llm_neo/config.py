"""Typed configuration: the options of the training commands, and their validation.

Each option is declared once, as a dataclass field whose metadata (``options.option_help``) carries its
help text, its choices and its group in ``--help``. The argparse parser, the YAML loader (both in
``llm_neo.options``) and the validator all walk the same fields, so a new option is a one-line change
and `--help`, `--config` and `config.yaml` can never disagree. Options that several commands share
(where models run and how they load; how records are tokenized) are defined once, in small base
dataclasses the commands' configs derive from: data-only mixins, so a command's config is still one
flat set of flags and YAML keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib.util
import json
import math
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from llm_neo.choices import (
    ARM_VARIANTS,
    CROSS_TOKENIZER_METHODS,
    DIVERGENCES,
    DTYPES,
    EXPORT_SPECS,
    FULL_PARAMETER_LR,
    KD_METHODS,
    LIGER_DIVERGENCES,
    LOGPROB_DTYPES,
    LORA_LR,
    LORA_VARIANTS,
    LOSS_IMPLS,
    METHOD_NAMES,
    METHODS,
    ON_POLICY_DIVERGENCE,
    QLORA_VARIANTS,
    STUDENT_QUANT,
    TEACHER_QUANT,
    TEACHER_QUANT_BACKENDS,
    TEACHER_SHARDS,
)
from llm_neo.errors import ConfigError
from llm_neo.options import (
    DATA,
    LOADING,
    LORA,
    LOSS,
    MODELS,
    OPTIMISATION,
    QUANT,
    RUN,
    Effect,
    flag_name,
    option_help,
    yaml_text,
)
from llm_neo.runtime.tracking import check_trackers

MLP_CHUNKS_HELP = (
    "With --gradient-checkpointing: checkpoint each block's MLP again in this many chunks of the "
    "sequence, so the backward's recomputed block holds one chunk of the MLP's activations (a third "
    "MLP forward per step). 1: off."
)

# ------------------------------------------------------------------------------------------------
# Shared options: one definition for the commands that have them (each in its own place in --help)


# The chunked loss's chunk when none is given (--loss-chunk-size), here beside the option and free of torch
# (the command list imports this module). On a GPU, 1024 tokens. On a CPU, the most tokens (a multiple of
# 64, at most 1024) whose [C, V] fp32 tensor fits CPU_CHUNK_BYTES: above runtime.memory's mmap threshold,
# so each chunk's tensors go back to the system when freed, and a quarter of a 1024-token chunk's
# memory at V = 32,000 (256 tokens) for a few percent of step time (docs/memory.md).
GPU_CHUNK_TOKENS = 1024
CPU_CHUNK_BYTES = 32 * 2**20


def default_chunk_size(device_type: str, vocab_size: int) -> int:
    """Tokens per chunk of the chunked loss when the user sets none, for a device type ("cpu", "cuda",
    ...) and the KD vocabulary: 1024 off the CPU; on it, 64 to 1024 tokens, [C, V] fp32 within
    ``CPU_CHUNK_BYTES`` (256 at V = 32,000, 128 at 49,152, 64 at 128,256)."""
    if device_type != "cpu":
        return GPU_CHUNK_TOKENS
    fits = CPU_CHUNK_BYTES // (4 * max(1, vocab_size)) // 64 * 64
    return max(64, min(GPU_CHUNK_TOKENS, fits))


def cross_tokenizer_option(text: str, *, group: str) -> Any:
    """The ``--cross-tokenizer METHOD`` field (distill, compare, sweep, eval): its choices and default
    here, its help text the command's (what the method does there)."""
    return field(default=None, metadata=option_help(text, choices=CROSS_TOKENIZER_METHODS, group=group))


def cross_tokenizer_top_k_option(*, group: str) -> Any:
    """The ``--cross-tokenizer-top-k`` field: the k of the teacher's top-k + tail at an aligned position,
    which ``aligned_kl_to_teacher`` is measured on too (so eval takes the run's value)."""
    return field(
        default=64,
        metadata=option_help(
            "Teacher tokens kept at each aligned position with --cross-tokenizer; the rest of its mass "
            "is one tail bucket (a teacher cache's format).",
            group=group,
        ),
    )


# ------------------------------------------------------------------------------------------------
# Shared option groups


@dataclass
class DeviceOptions:
    """Where models run."""

    device: str = field(
        default="auto",
        metadata=option_help("auto, cpu, cuda or cuda:N.", group=LOADING, effect=Effect.RUNTIME),
    )
    dtype: str = field(
        default="auto",
        metadata=option_help(
            "Compute dtype (autocast). auto: bfloat16 on GPUs that support it, else float32.",
            choices=DTYPES,
            group=LOADING,
        ),
    )


@dataclass
class LoadOptions(DeviceOptions):
    """Where models run and how their files are trusted: every command that loads weights has these."""

    trust_remote_code: bool = field(
        default=False,
        metadata=option_help(
            "Allow model/tokenizer code from the model dir (off: never run it).", group=LOADING
        ),
    )
    allow_pickle_weights: bool = field(
        default=False,
        metadata=option_help(
            "Allow loading .bin/.pt (pickle) weights; by default only safetensors are loaded.", group=LOADING
        ),
    )


@dataclass
class TokenizeOptions:
    """How records become token examples; the commands that read data as distill does share them."""

    max_length: int = field(
        default=2048, metadata=option_help("Truncate each sample to this many tokens.", group=DATA)
    )
    train_on_prompt: bool = field(
        default=False,
        metadata=option_help(
            "Also train on (score, cache) prompt tokens; default: response tokens only.", group=DATA
        ),
    )


@dataclass
class TeacherQuantOptions:
    """How the frozen teacher's weights are stored (models.quant.load_teacher): distill, compare and
    cache-teacher share them."""

    teacher_quant: str = field(
        default="none",
        metadata=option_help(
            "Quantize the teacher's block linears: int8 (weight-only; KL ≈ 0.005/token to the unquantized "
            "teacher) or nf4 (4-bit: a different teacher, warned). The drift is measured on a held-out "
            "batch and recorded.",
            choices=TEACHER_QUANT,
            group=QUANT,
        ),
    )
    teacher_quant_backend: str = field(
        default="auto",
        metadata=option_help(
            "auto (int8: torchao, nf4: bitsandbytes), torchao, or bitsandbytes (int8 on CUDA only).",
            choices=TEACHER_QUANT_BACKENDS,
            group=QUANT,
        ),
    )


@dataclass
class LoraOptions:
    """LoRA branches of the student (PEFT's vocabulary)."""

    r: int = field(
        default=64, metadata=option_help("LoRA rank r (paper: 64; its released 1B model used 128).")
    )
    lora_alpha: float | None = field(
        default=None,
        metadata=option_help("LoRA scaling numerator alpha; the update is (alpha/r)·B·A. Default 2·r."),
    )
    lora_dropout: float = field(default=0.0, metadata=option_help("Dropout on the LoRA input, in [0, 1)."))
    target_modules: list[str] | None = field(
        default=None,
        metadata=option_help(
            "Linear-layer names to adapt, e.g. q_proj v_proj. Default: every linear layer of the "
            "transformer blocks (not embeddings or lm_head), as in the paper."
        ),
    )
    variant: str = field(
        default="lora",
        metadata=option_help(
            "lora: plain; dora: weight-decomposed; rslora: alpha/sqrt(r) scaling; pissa: principal-"
            "singular-vector init; moslora: learnable r×r mixer between A and B (merged exactly).",
            choices=LORA_VARIANTS,
        ),
    )


@dataclass
class SamplingOptions:
    """How the student's responses are drawn for on-policy distillation: distill's --on-policy draws
    them as it trains, cache-teacher's --student-samples once, into a teacher cache."""

    sample_temperature: float = field(
        default=1.0,
        metadata=option_help(
            "On-policy sampling temperature (0: greedy); not the KD term's --kd-temperature.", group=LOSS
        ),
    )
    sample_top_p: float = field(
        default=1.0, metadata=option_help("On-policy nucleus sampling: top-p in (0, 1].", group=LOSS)
    )
    sample_max_new_tokens: int | None = field(
        default=None,
        metadata=option_help(
            "Cap of an on-policy response in tokens (also capped by --max-length minus its prompt). "
            "Default: the longest training response.",
            group=LOSS,
        ),
    )


@dataclass
class _TrainFields(TeacherQuantOptions, TokenizeOptions, LoadOptions):
    """TrainOptions but its sampling options (see TrainOptions)."""

    # --- models -----------------------------------------------------------------------------------
    student: str = field(
        default="", metadata=option_help("Student model: a local HF model dir or a hub id.", group=MODELS)
    )
    teacher: str | None = field(
        default=None,
        metadata=option_help("Teacher model (local dir or hub id). Required for neo and kd.", group=MODELS),
    )
    teacher_cache: str | None = field(
        default=None,
        metadata=option_help(
            "A teacher cache written by `llm-neo cache-teacher`: neo/kd train on its top-k targets "
            "without loading the teacher (which, if also given, only scores the held-out split).",
            group=MODELS,
        ),
    )
    # --- data -------------------------------------------------------------------------------------
    data: str = field(
        default="",
        metadata=option_help(
            "Training data: .jsonl, .json or .parquet file, or a datasets save_to_disk dir. Records: "
            "Alpaca (instruction/input/output), chat (messages), prompt/completion, or text.",
            group=DATA,
        ),
    )
    eval_fraction: float = field(
        default=0.05,
        metadata=option_help(
            "Fraction of the data held out for evaluation and the merge check, in [0, 1).", group=DATA
        ),
    )
    # --- optimisation -----------------------------------------------------------------------------
    max_steps: int | None = field(
        default=None,
        metadata=option_help("Optimizer steps to run; overrides --epochs when set.", group=OPTIMISATION),
    )
    epochs: float = field(
        default=1.0,
        metadata=option_help("Passes over the training split (fractions allowed).", group=OPTIMISATION),
    )
    batch_size: int = field(default=1, metadata=option_help("Samples per micro-batch.", group=OPTIMISATION))
    grad_accum: int = field(
        default=8, metadata=option_help("Micro-batches per optimizer step.", group=OPTIMISATION)
    )
    warmup_ratio: float = field(
        default=0.1, metadata=option_help("Fraction of steps of linear warm-up.", group=OPTIMISATION)
    )
    scheduler: Literal["cosine", "linear", "constant"] = field(
        default="cosine", metadata=option_help("Learning-rate schedule after warm-up.", group=OPTIMISATION)
    )
    weight_decay: float = field(default=0.0, metadata=option_help("AdamW weight decay.", group=OPTIMISATION))
    max_grad_norm: float = field(
        default=1.0, metadata=option_help("Gradient clipping norm; 0 disables.", group=OPTIMISATION)
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata=option_help("Recompute student activations in backward to save memory.", group=OPTIMISATION),
    )
    mlp_chunks: int = field(
        default=1, metadata=option_help(MLP_CHUNKS_HELP, group=OPTIMISATION, effect=Effect.COST)
    )
    # --- loss -------------------------------------------------------------------------------------
    kd_ratio: float = field(
        default=0.5,
        metadata=option_help(
            "Weight of the KD term: loss = (1-kd_ratio)·CE + kd_ratio·D(teacher||student).", group=LOSS
        ),
    )
    divergence: str = field(
        default="forward_kl",
        metadata=option_help("Divergence D between teacher and student.", choices=DIVERGENCES, group=LOSS),
    )
    # kd_: the temperature of the KD term; on-policy sampling will have its own (TRL's GKDConfig calls
    # its sampling one ``temperature``).
    kd_temperature: float = field(
        default=1.0,
        metadata=option_help(
            "Softmax temperature T of the KD term (scaled by T²).", group=LOSS, aliases=("temperature",)
        ),
    )
    loss_impl: str = field(
        default="chunked",
        metadata=option_help(
            "chunked: lm_heads and the loss computed chunk by chunk of tokens, never holding "
            "[tokens × vocab] logits; plain: full logits (the reference and benchmark baseline); liger: "
            "Liger-Kernel's fused linear JSD loss for the KD term (an extra: pip install "
            "'llm-neo[liger]'; forward_kl, reverse_kl or jsd; meant for CUDA).",
            choices=LOSS_IMPLS,
            group=LOSS,
        ),
    )
    loss_chunk_size: int | None = field(
        default=None,
        metadata=option_help(
            f"Tokens per chunk of the chunked loss. Default: {GPU_CHUNK_TOKENS} on a GPU; on a CPU the "
            f"tokens whose [tokens × vocab] fp32 logits fit {CPU_CHUNK_BYTES // 2**20} MiB "
            f"({default_chunk_size('cpu', 32000)} at a vocabulary of 32,000).",
            group=LOSS,
        ),
    )
    jsd_beta: float = field(
        default=0.5, metadata=option_help("β of the generalized JSD, in (0, 1).", group=LOSS)
    )
    skew_alpha: float = field(
        default=0.1, metadata=option_help("α of the skew KL divergences, in [0, 1).", group=LOSS)
    )
    # --- cross-tokenizer (docs/cross-tokenizer.md) ------------------------------------------------
    cross_tokenizer: str | None = cross_tokenizer_option(
        "Distill a teacher whose tokenizer differs from the student's (kd, neo): positions are aligned "
        "by the response characters both read; shared-vocab trains the divergence on the teacher's "
        "tokens of the same text where both predict the same span, uld the sorted-probability L1 "
        "(Boizard et al. 2024) wherever a token boundary is shared. `llm-neo check-pair` reports a "
        "pair first.",
        group=LOSS,
    )
    cross_tokenizer_top_k: int = cross_tokenizer_top_k_option(group=LOSS)
    # --- on-policy (docs/on-policy.md) ---------------------------------------------------------------
    on_policy: float = field(
        default=0.0,
        metadata=option_help(
            "On-policy share λ in [0, 1] (kd, neo): each micro-batch is, with probability λ, the "
            "student's own responses to its prompts, trained on --on-policy-divergence alone (no CE: "
            "a sample has no label); the others train on the data as usual. 0: off.",
            group=LOSS,
        ),
    )
    on_policy_divergence: str = field(
        default=ON_POLICY_DIVERGENCE,
        metadata=option_help(
            "D(teacher||student) on the student's samples. Default reverse_kl, as MiniLLM and the "
            "Qwen3 / Thinking Machines recipes use: mode-seeking, and on the student's own samples the "
            "per-token part of the sequence-level reverse KL (GKD's default is jsd).",
            choices=DIVERGENCES,
            group=LOSS,
        ),
    )
    # --- run --------------------------------------------------------------------------------------
    save_every: int = field(
        default=0,
        metadata=option_help(
            "Checkpoint every N optimizer steps and at the last (0: none, but a stop by SIGTERM, SIGINT "
            "or SIGUSR1 always writes one).",
            group=RUN,
            effect=Effect.COST,
        ),
    )
    log_every: int = field(
        default=1,
        metadata=option_help("Write a metrics.jsonl record every N steps.", group=RUN, effect=Effect.RUNTIME),
    )
    eval_batch_size: int = field(
        default=8, metadata=option_help("Batch size of held-out evaluation.", group=RUN, effect=Effect.COST)
    )
    report_to: list[str] = field(
        default_factory=list,
        metadata=option_help(
            "Also log each step to these trackers, under OUTPUT_DIR: tensorboard, wandb (offline), mlflow "
            "(a local file store); pip install 'llm-neo[track]'.",
            group=RUN,
            effect=Effect.COST,
        ),
    )
    merge_tolerance: float = field(
        default=1e-3,
        metadata=option_help(
            "Max |merged − adapter| logit difference (fp32) accepted by the merge check.", group=RUN
        ),
    )
    lora: LoraOptions = field(default_factory=LoraOptions, metadata=option_help("", group=LORA))
    # --- quantization -----------------------------------------------------------------------------
    student_quant: str = field(
        default="none",
        metadata=option_help(
            "QLoRA for the LoRA arms: load the frozen student base with its block linears nf4 "
            "(bitsandbytes) or int8 (torchao); the merge dequantizes it exactly and saves a dense model.",
            choices=STUDENT_QUANT,
            group=QUANT,
        ),
    )


@dataclass
class TrainOptions(SamplingOptions, _TrainFields):
    """How a student is trained, whatever the arm: the options `llm-neo distill` and `llm-neo compare`
    share (an arm adds its method, learning rate, seed and output directory).

    SamplingOptions comes before _TrainFields among the bases so that its fields come after theirs
    (dataclasses collect fields from the last base first): --help, config.yaml and summary.json list the
    sampling options after --on-policy-divergence, where they always were."""


@dataclass
class DistillConfig(TrainOptions):
    """Everything one `llm-neo distill` run needs: the training options and the arm."""

    method: str = field(
        default="neo",
        metadata=option_help(
            "; ".join(f"{m.name}: {m.summary}" for m in METHODS.values()) + ".",
            choices=METHOD_NAMES,
            group=MODELS,
        ),
    )
    lr: float | None = field(
        default=None,
        metadata=option_help(
            f"Peak learning rate. Default (paper's rule): {FULL_PARAMETER_LR:g} for sft/kd, "
            f"{LORA_LR:g} (10x) for neo/lora.",
            group=OPTIMISATION,
        ),
    )
    seed: int = field(
        default=42,
        metadata=option_help(
            "Seed for initialisation, data order and the held-out split.", group=OPTIMISATION
        ),
    )
    output_dir: str | None = field(
        default=None,
        metadata=option_help("Where outputs go. Default runs/<method>.", group=RUN, effect=Effect.PLACE),
    )
    resume: bool = field(
        default=False,
        metadata=option_help(
            "Continue from the newest intact checkpoint in --output-dir (each file's size and sha256 "
            "checked; a damaged one is skipped with a warning). Without --config, the options are read "
            "from OUTPUT_DIR/config.yaml (flags given override them and are checked against it).",
            group=RUN,
            effect=Effect.EXISTING,
        ),
    )
    overwrite: bool = field(
        default=False,
        metadata=option_help(
            "Replace an earlier run's outputs in --output-dir.", group=RUN, effect=Effect.EXISTING
        ),
    )
    export: str | None = field(
        default=None,
        metadata=option_help(
            "After the merge, also export the student (verified by reloading it) into OUTPUT_DIR/export: "
            "gguf:TYPE for llama.cpp/Ollama, or int8 (torchao safetensors).",
            choices=EXPORT_SPECS,
            group=RUN,
            effect=Effect.COST,
        ),
    )

    # ---------------------------------------------------------------------------------------------
    @property
    def uses_lora(self) -> bool:
        return self.method in METHODS and METHODS[self.method].lora

    @property
    def uses_kd(self) -> bool:
        return self.method in METHODS and METHODS[self.method].kd and self.kd_ratio > 0

    def resolved(self) -> DistillConfig:
        """A copy with every derived default filled in (learning rate, alpha, output dir)."""
        lora = dataclasses.replace(
            self.lora,
            lora_alpha=self.lora.lora_alpha if self.lora.lora_alpha is not None else 2 * self.lora.r,
        )
        return dataclasses.replace(
            self,
            lr=self.lr if self.lr is not None else METHODS[self.method].default_lr,
            output_dir=self.output_dir or f"runs/{self.method}",
            lora=lora,
        )


@dataclass
class EvalConfig(TokenizeOptions, LoadOptions):
    """`llm-neo eval`: KD-aware held-out metrics of a model against a teacher."""

    model: str = field(
        default="", metadata=option_help("Model to evaluate (e.g. runs/neo/merged).", group=MODELS)
    )
    data: str = field(
        default="", metadata=option_help("Held-out data, in any format `distill` reads.", group=DATA)
    )
    teacher: str | None = field(
        default=None,
        metadata=option_help("Teacher for kl_to_teacher and top1_agreement (optional).", group=MODELS),
    )
    cross_tokenizer: str | None = cross_tokenizer_option(
        "A teacher whose tokenizer differs from the model's: score aligned_kl_to_teacher (the divergence "
        "on exactly aligned response positions, as a --cross-tokenizer run's summary.json does; the same "
        "for either method) instead of kl_to_teacher and top1_agreement. Give the run's method.",
        group=MODELS,
    )
    cross_tokenizer_top_k: int = cross_tokenizer_top_k_option(group=MODELS)
    batch_size: int = field(default=8, metadata=option_help("Evaluation batch size.", group=RUN))
    json: str | None = field(
        default=None, metadata=option_help("Also write the metrics to this JSON file.", group=RUN)
    )


@dataclass
class CacheTeacherConfig(SamplingOptions, TeacherQuantOptions, TokenizeOptions, LoadOptions):
    """`llm-neo cache-teacher`: run the teacher once over the data and store its top-k log-probs (on the
    data's responses, or with --student-samples on a student's own responses to the data's prompts)."""

    teacher: str = field(
        default="", metadata=option_help("Teacher model: a local HF model dir or a hub id.", group=MODELS)
    )
    data: str = field(
        default="",
        metadata=option_help(
            "Data to cache, in any format `distill` reads (the file you will distill on).", group=DATA
        ),
    )
    output: str = field(
        default="", metadata=option_help("Cache directory to write (or to resume).", group=RUN)
    )
    tokenizer: str | None = field(
        default=None,
        metadata=option_help(
            "Model dir whose tokenizer and chat template tokenize the data, as the student's do in "
            "distill. Default: the teacher's. Give the student here if its tokenizer or template "
            "files differ from the teacher's (the cache key records them).",
            group=MODELS,
        ),
    )
    top_k: int = field(
        default=64,
        metadata=option_help(
            "Teacher tokens kept per position (the rest is one tail bucket); ~6·k+2 bytes/token.", group=RUN
        ),
    )
    cross_tokenizer: str | None = cross_tokenizer_option(
        "Cache a teacher whose tokenizer differs from --tokenizer's (the student's, then required): the "
        "targets distill --cross-tokenizer METHOD computes online, at the student's positions, aligned "
        "as docs/cross-tokenizer.md says; --top-k is its --cross-tokenizer-top-k.",
        group=RUN,
    )
    kd_temperature: float = field(
        default=1.0,
        metadata=option_help(
            "Temperature T of the stored log-probs; distill must use the same --kd-temperature.",
            group=RUN,
            aliases=("temperature",),
        ),
    )
    batch_size: int = field(default=8, metadata=option_help("Samples per teacher forward pass.", group=RUN))
    shard_size: int = field(
        default=1024, metadata=option_help("Examples per shard file (the unit of resumption).", group=RUN)
    )
    logprob_dtype: str = field(
        default="float16",
        metadata=option_help(
            "Storage dtype of the log-probs and the tail (computed in float32 either way).",
            choices=LOGPROB_DTYPES,
            group=RUN,
        ),
    )
    chunk_size: int = field(
        default=1024,
        metadata=option_help("Tokens per chunk of the teacher's lm_head (bounds logits memory).", group=RUN),
    )
    overwrite: bool = field(
        default=False,
        metadata=option_help(
            "Replace a cache in --output made for other inputs (same inputs: it is resumed).", group=RUN
        ),
    )
    teacher_shard: str = field(
        default="auto",
        metadata=option_help(
            "Under torchrun: the teacher whole on every rank (replicate) or FSDP2-sharded across them "
            "(fsdp, for a teacher too big for one device). auto: fsdp when its weights exceed 80 percent "
            "of the GPU's memory; replicate on CPU.",
            choices=TEACHER_SHARDS,
            effect=Effect.RUNTIME,
            group=RUN,
        ),
    )
    # --- offline on-policy (docs/on-policy.md) ------------------------------------------------------
    student_samples: str | None = field(
        default=None,
        metadata=option_help(
            "A student model dir (its initial weights, or a warm-up run's merged/): cache the teacher on "
            "this student's own responses to the data's prompts instead of the data's responses, for "
            "distill --on-policy 1 --teacher-cache (on-policy to this student, not to the one training).",
            group=MODELS,
        ),
    )
    samples_per_prompt: int = field(
        default=1,
        metadata=option_help("With --student-samples: responses drawn per record's prompt.", group=DATA),
    )


# ------------------------------------------------------------------------------------------------
# Validation: every problem at once, each with how to fix it.


def _looks_like_hub_id(value: str) -> bool:
    # "org/name" that is not a local path; anything else that does not exist is a missing path. A .gguf
    # is a local file: the loaders read GGUF files from disk only.
    return (
        value.count("/") == 1
        and not value.startswith((".", "/", "~"))
        and not value.endswith(".gguf")
        and not Path(value).exists()
    )


_TRUE = ("1", "on", "yes", "true")


def hub_offline() -> str | None:
    """The variable that puts the Hugging Face hub offline (HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE), or None."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(name, "").strip().lower() in _TRUE:
            return name
    return None


def _in_hub_cache(repo_id: str) -> bool:
    """Whether the local hub cache holds a snapshot of ``repo_id`` (what an offline load can use)."""
    from huggingface_hub import constants

    folder = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    return folder.is_dir() and any(folder.iterdir())


@functools.lru_cache(maxsize=4)
def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the hub cannot be reached from here (a failed name lookup or connection, in at most about
    ``timeout`` seconds), or None when it can (or a proxy is configured, which this probe cannot use):
    one probe instead of a minute of retries that end in the same failure."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as err:
        return f"{host}: {err.strerror or err}"
    return None


def _did_you_mean(value: str) -> str:
    """`` (did you mean tiny/student?)`` for the closest existing entry of ``value``'s parent directory
    (empty when there is none)."""
    local = Path(value).expanduser()
    parent = local.parent
    if not parent.is_dir():
        return ""
    entries = sorted(e.name for e in parent.iterdir() if not e.name.startswith("."))
    close = difflib.get_close_matches(local.name, entries, n=1, cutoff=0.6)
    if not close:
        return ""
    return f" (did you mean {Path(value).parent / close[0]}?)"


def missing_model(option: str, value: str) -> str | None:
    """The problem with a model path that does not exist locally, or None when it may still load (a hub
    id the hub or its local cache can serve).

    A value shaped like a hub id (``org/name``) is taken for a mistyped local path at once when ``org``
    is a local directory, when the hub is offline (HF_HUB_OFFLINE) and its cache lacks the id, or when
    the hub cannot be reached: the message names the closest local directory instead of a minute of
    retries that blame the network."""
    if Path(value).expanduser().exists():
        return None
    hint = _did_you_mean(value)
    if not _looks_like_hub_id(value):
        return (
            f"--{option}: {value!r} does not exist{hint or ' (give a model directory or a hub id org/name)'}"
        )
    org = value.split("/")[0]
    if Path(org).is_dir():
        return (
            f"--{option}: no local directory {value}{hint}; {org}/ is a local directory, so {value} is not "
            "looked up on the hub"
        )
    if _in_hub_cache(value):
        return None
    offline = hub_offline()
    if offline:
        return (
            f"--{option}: no local directory {value}{hint}, and {offline} is set while the hub cache has no "
            f"{value}: give a local model directory, or download it once with the hub online"
        )
    unreachable = hub_unreachable()
    if unreachable:
        return (
            f"--{option}: no local directory {value}{hint}, and the hub cannot be reached to look it up "
            f"({unreachable}): give a local model directory, or check the network"
        )
    return None


def check_model_path(problems: list[str], option: str, value: str | None) -> None:
    """Append the problem of a ``--teacher/--student/--model`` value that cannot load (``missing_model``)."""
    problem = missing_model(option, value) if value else None
    if problem:
        problems.append(problem)


def check_data_path(problems: list[str], value: str | None) -> None:
    if not value:
        problems.append("--data is required (a .jsonl/.json/.parquet file or a datasets directory)")
    elif not Path(value).expanduser().exists():
        problems.append(f"--data: {value!r} does not exist")


Range = tuple[str, Any, bool, str]  # (flag name, value, whether it is in range, the rule)


def check_ranges(problems: list[str], ranges: list[Range]) -> None:
    """Append one problem per value out of its range (or not finite), naming the flag and the rule."""
    for name, value, ok, rule in ranges:
        if not ok or (isinstance(value, float) and not math.isfinite(value)):
            problems.append(f"--{name}: {value} is out of range; it must be {rule}")


def check_choices(problems: list[str], config: Any, prefix: str = "") -> None:
    """Append one problem per field whose value is not among its declared ``choices`` (also for configs
    built in code, which the CLI and YAML parsers never saw)."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            check_choices(problems, value, prefix=f"{prefix}{f.name}.")
        choices = f.metadata.get("choices")
        if choices is not None and value is not None and value not in choices:
            problems.append(f"{flag_name(prefix + f.name)}: {value!r} is not one of {', '.join(choices)}")


def check_teacher_quant(problems: list[str], config: TeacherQuantOptions) -> None:
    if config.teacher_quant == "none" and config.teacher_quant_backend != "auto":
        problems.append("--teacher-quant-backend applies with --teacher-quant int8 or nf4")
    if config.teacher_quant == "nf4" and config.teacher_quant_backend == "torchao":
        problems.append(
            "--teacher-quant nf4 uses bitsandbytes: pass --teacher-quant-backend auto or bitsandbytes"
        )


def parse_arm(arm: str, *, option: str = "--methods") -> tuple[str, dict[str, str]]:
    """``"neo+int8-teacher"`` -> ``("neo", {"teacher_quant": "int8"})``; ConfigError naming the choices
    and ``option``, the flag the arm was given in."""
    method, *variants = arm.split("+")
    if method not in METHOD_NAMES:
        raise ConfigError([f"{option}: {arm!r}: the arm's method must be one of {', '.join(METHOD_NAMES)}"])
    overrides: dict[str, str] = {}
    for variant in variants:
        if variant not in ARM_VARIANTS:
            raise ConfigError(
                [f"{option}: {arm!r}: {variant!r} is not a variant; use one of {', '.join(ARM_VARIANTS)}"]
            )
        key, kind = ARM_VARIANTS[variant]
        if key in overrides:
            raise ConfigError([f"{option}: {arm!r} sets --{key.replace('_', '-')} twice"])
        overrides[key] = kind
    return method, overrides


def arm_name(method: str, teacher_quant: str = "none", student_quant: str = "none") -> str:
    """The arm as ``--methods`` spells it: ``neo``, ``neo+int8-teacher``, ``neo+int8-teacher+nf4-student``
    (``parse_arm``'s inverse)."""
    options = {"teacher_quant": teacher_quant, "student_quant": student_quant}
    return "+".join([method, *(v for v, (key, kind) in ARM_VARIANTS.items() if options.get(key) == kind)])


def check_quantization(problems: list[str], config: TrainOptions) -> None:
    """The quantization options a training run cannot combine (distill's and compare's arms)."""
    c = config
    if c.teacher_quant != "none" and not c.teacher and not c.teacher_cache:
        problems.append("--teacher-quant quantizes the teacher: give --teacher too (or leave it at none)")
    check_teacher_quant(problems, c)
    if c.student_quant == "none":
        return
    method = getattr(c, "method", None)
    if method is not None and method in METHODS and not METHODS[method].lora:
        problems.append(
            f"--student-quant {c.student_quant}: QLoRA quantizes the frozen base of the LoRA arms (neo, "
            f"lora); --method {method} trains every weight. Drop --student-quant or use neo/lora"
        )
    if c.lora.variant not in QLORA_VARIANTS:
        problems.append(
            f"--lora.variant {c.lora.variant} cannot be merged exactly onto a quantized base "
            f"(--student-quant {c.student_quant}): use one of {', '.join(QLORA_VARIANTS)}"
        )
    if Path(c.student).expanduser().suffix == ".gguf" or _gguf_only_dir(c.student):
        problems.append(
            f"--student-quant {c.student_quant} loads the student's safetensors: convert the GGUF student "
            "first (llm-neo convert --model FILE.gguf --output DIR) and pass --student DIR"
        )


def _gguf_only_dir(path: str) -> bool:
    directory = Path(path).expanduser() if path else None
    return bool(
        directory
        and directory.is_dir()
        and not (directory / "config.json").exists()
        and any(directory.glob("*.gguf"))
    )


def _check_tokenize(problems: list[str], config: TokenizeOptions) -> None:
    check_ranges(problems, [("max-length", config.max_length, config.max_length >= 2, ">= 2")])


def validate_distill(config: DistillConfig) -> None:
    """Raise ConfigError listing every problem of ``config`` (a resolved or unresolved config)."""
    c = config
    p: list[str] = []
    check_choices(p, c)
    if not c.student:
        p.append("--student is required (a model directory or hub id)")
    check_model_path(p, "student", c.student)
    if c.method in METHODS and METHODS[c.method].kd and not c.teacher and not c.teacher_cache:
        p.append(
            f"--teacher is required for --method {c.method} (or --teacher-cache CACHE from llm-neo "
            "cache-teacher; or use --method lora/sft)"
        )
    check_model_path(p, "teacher", c.teacher)
    if c.teacher_cache and not (Path(c.teacher_cache).expanduser() / "manifest.json").is_file():
        p.append(
            f"--teacher-cache: {c.teacher_cache!r} is not a complete teacher cache (no manifest.json); "
            "write it with llm-neo cache-teacher --output DIR, or rerun that command to finish it"
        )
    check_data_path(p, c.data)
    if c.loss_impl == "liger":
        _check_liger(p, c)
    _check_tokenize(p, c)
    check_ranges(
        p,
        [
            ("kd-ratio", c.kd_ratio, 0 <= c.kd_ratio <= 1, "in [0, 1]"),
            ("kd-temperature", c.kd_temperature, c.kd_temperature > 0, "> 0"),
            ("jsd-beta", c.jsd_beta, 0 < c.jsd_beta < 1, "in (0, 1)"),
            ("skew-alpha", c.skew_alpha, 0 <= c.skew_alpha < 1, "in [0, 1)"),
            ("epochs", c.epochs, c.epochs > 0, "> 0"),
            ("max-steps", c.max_steps, c.max_steps is None or c.max_steps >= 1, ">= 1"),
            ("batch-size", c.batch_size, c.batch_size >= 1, ">= 1"),
            ("grad-accum", c.grad_accum, c.grad_accum >= 1, ">= 1"),
            ("lr", c.lr, c.lr is None or c.lr > 0, "> 0"),
            ("warmup-ratio", c.warmup_ratio, 0 <= c.warmup_ratio <= 1, "in [0, 1]"),
            ("weight-decay", c.weight_decay, c.weight_decay >= 0, ">= 0"),
            ("max-grad-norm", c.max_grad_norm, c.max_grad_norm >= 0, ">= 0"),
            ("eval-fraction", c.eval_fraction, 0 <= c.eval_fraction < 1, "in [0, 1)"),
            ("save-every", c.save_every, c.save_every >= 0, ">= 0"),
            ("log-every", c.log_every, c.log_every >= 1, ">= 1"),
            (
                "loss-chunk-size",
                c.loss_chunk_size,
                c.loss_chunk_size is None or c.loss_chunk_size >= 1,
                ">= 1",
            ),
            ("mlp-chunks", c.mlp_chunks, c.mlp_chunks >= 1, ">= 1"),
            ("eval-batch-size", c.eval_batch_size, c.eval_batch_size >= 1, ">= 1"),
            ("merge-tolerance", c.merge_tolerance, c.merge_tolerance > 0, "> 0"),
            ("lora.r", c.lora.r, c.lora.r >= 1, ">= 1"),
            ("lora.lora-alpha", c.lora.lora_alpha, c.lora.lora_alpha is None or c.lora.lora_alpha > 0, "> 0"),
            ("lora.lora-dropout", c.lora.lora_dropout, 0 <= c.lora.lora_dropout < 1, "in [0, 1)"),
        ],
    )
    check_quantization(p, c)
    check_trackers(p, c.report_to)
    if c.mlp_chunks > 1 and not c.gradient_checkpointing:
        p.append(
            f"--mlp-chunks {c.mlp_chunks} splits the MLP inside checkpointed blocks: add "
            "--gradient-checkpointing, or use --mlp-chunks 1"
        )
    if c.lora.target_modules is not None and not c.lora.target_modules:
        p.append("--lora.target-modules: give at least one module name, or omit it for the default")
    check_on_policy(p, c)
    check_cross_tokenizer(p, c)
    if p:
        raise ConfigError(p)


# The options of SamplingOptions; with on_policy_divergence, the options that mean something only with
# --on-policy.
SAMPLING_OPTIONS = ("sample_temperature", "sample_top_p", "sample_max_new_tokens")
ON_POLICY_OPTIONS = ("on_policy_divergence", *SAMPLING_OPTIONS)


def given_options(c: Any, names: tuple[str, ...]) -> list[str]:
    """The flags of the options ``names`` of ``c`` that differ from their defaults."""
    return [
        flag_name(f.name)
        for f in dataclasses.fields(c)
        if f.name in names and getattr(c, f.name) != f.default
    ]


def check_sampling(p: list[str], c: SamplingOptions) -> None:
    """The sampling options' ranges (distill's --on-policy, cache-teacher's --student-samples)."""
    top_p, cap = c.sample_top_p, c.sample_max_new_tokens
    check_ranges(
        p,
        [
            ("sample-temperature", c.sample_temperature, c.sample_temperature >= 0, ">= 0 (0: greedy)"),
            ("sample-top-p", top_p, 0 < top_p <= 1, "in (0, 1]"),
            ("sample-max-new-tokens", cap, cap is None or cap >= 1, ">= 1"),
        ],
    )


def cached_sampling(cache: str | None) -> dict[str, Any] | None:
    """The sampling key part of a teacher cache of student samples (cache-teacher --student-samples), or
    None for a cache of the data's responses (or one whose manifest cannot be read: opening it says why).
    Read here, from the manifest's JSON, so that its refusals come before anything loads."""
    if not cache:
        return None
    try:
        manifest = json.loads((Path(cache).expanduser() / "manifest.json").read_text())
        found = manifest["key"].get("sampling")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return found if isinstance(found, dict) else None


def check_cross_tokenizer(p: list[str], c: DistillConfig) -> None:
    """What --cross-tokenizer needs and cannot be combined with (yet)."""
    if c.cross_tokenizer is None:
        return
    flag = f"--cross-tokenizer {c.cross_tokenizer}"
    if c.method not in KD_METHODS:
        p.append(
            f"{flag} distills a teacher: it applies to --method {' or '.join(KD_METHODS)}, not {c.method}"
        )
    check_cross_top_k(p, c.cross_tokenizer_top_k)
    if not c.teacher and not c.teacher_cache:
        p.append(
            f"{flag} aligns a teacher's tokens: give --teacher, or --teacher-cache of a cache written by "
            f"llm-neo cache-teacher --cross-tokenizer {c.cross_tokenizer}"
        )
    if c.loss_impl != "chunked":
        p.append(f"{flag} runs on --loss-impl chunked only (got {c.loss_impl}); drop --loss-impl")
    if c.on_policy:
        p.append(f"{flag}: --on-policy is not supported across tokenizers yet; drop one of the two")


def check_cross_top_k(p: list[str], top_k: int) -> None:
    check_ranges(p, [("cross-tokenizer-top-k", top_k, top_k >= 1, ">= 1")])


def check_on_policy(p: list[str], c: DistillConfig) -> None:
    """The on-policy options' ranges, and what on-policy distillation cannot be combined with."""
    check_ranges(
        p,
        [
            (
                "on-policy",
                c.on_policy,
                0 <= c.on_policy <= 1,
                "in [0, 1] (the share of on-policy micro-batches)",
            )
        ],
    )
    check_sampling(p, c)
    cached = cached_sampling(c.teacher_cache)
    if cached is not None:
        _check_cached_samples(p, c, cached)
    if c.on_policy == 0:
        given = given_options(c, ON_POLICY_OPTIONS)
        if given and cached is None:
            verb = "sets" if len(given) == 1 else "set"
            p.append(f"{', '.join(given)} {verb} the on-policy sampling: add --on-policy λ (> 0), or drop it")
        return
    on = f"--on-policy {c.on_policy:g}"
    if c.method not in KD_METHODS:
        p.append(
            f"{on}: the teacher scores the student's samples, so it applies to the KD methods "
            f"({', '.join(KD_METHODS)}), not --method {c.method}; use --method neo or kd, or drop it"
        )
    elif c.kd_ratio == 0:
        p.append(f"{on}: --kd-ratio 0 turns the teacher off; give --kd-ratio > 0 or drop --on-policy")
    if c.teacher_cache and cached is None:
        p.append(
            f"{on}: --teacher-cache holds the teacher's targets on the data's responses and cannot score "
            "the student's new samples; give --teacher instead of --teacher-cache (or cache the teacher on "
            "the student's samples: llm-neo cache-teacher --student-samples STUDENT)"
        )
    if c.train_on_prompt:
        p.append(
            f"{on}: the student answers each record's prompt, which --train-on-prompt trains on as well; "
            "drop --train-on-prompt"
        )
    if c.loss_impl == "liger" and c.on_policy_divergence not in LIGER_DIVERGENCES:
        p.append(
            f"--loss-impl liger computes {', '.join(LIGER_DIVERGENCES)}, not --on-policy-divergence "
            f"{c.on_policy_divergence}; use --loss-impl chunked for it"
        )


def _check_cached_samples(p: list[str], c: DistillConfig, cached: dict[str, Any]) -> None:
    """A teacher cache of student samples: the run trains on those samples alone (λ = 1) and draws
    nothing itself, so its sampling options must say how they were drawn (a run that asks for other
    samples would otherwise silently get the cached ones)."""
    cache = c.teacher_cache
    if c.on_policy != 1:
        p.append(
            f"--teacher-cache {cache} holds the teacher's targets on a student's own samples, not on the "
            f"data's responses: train on them with --on-policy 1 (--on-policy {c.on_policy:g} would need "
            "targets on the data's responses too), or use a cache of the data (cache-teacher without "
            "--student-samples)"
        )
    for name in SAMPLING_OPTIONS:
        if name in cached and getattr(c, name) != cached[name]:
            flag = flag_name(name)
            p.append(
                f"{flag}: the teacher cache {cache} holds samples drawn with {flag} {cached[name]}, this run "
                f"asks for {getattr(c, name)}; run with {flag} {cached[name]}, or cache the student's "
                f"samples again with {flag} {getattr(c, name)} (llm-neo cache-teacher --student-samples)"
            )


def _check_liger(p: list[str], c: DistillConfig) -> None:
    if importlib.util.find_spec("liger_kernel") is None:
        p.append(
            "--loss-impl liger: Liger-Kernel is not installed; pip install 'llm-neo[liger]' (it needs "
            "Triton), or use --loss-impl chunked, llm-neo's own fused loss"
        )
    if c.teacher_cache:
        p.append(
            "--loss-impl liger runs the teacher's lm_head and cannot read a --teacher-cache; use "
            "--loss-impl chunked with a cache"
        )
    if c.divergence not in LIGER_DIVERGENCES:
        p.append(
            f"--loss-impl liger computes {', '.join(LIGER_DIVERGENCES)} (Liger's generalized JSD), "
            f"not --divergence {c.divergence}; use --loss-impl chunked for it"
        )


def validate_eval(config: EvalConfig) -> None:
    p: list[str] = []
    check_choices(p, config)
    if not config.model:
        p.append("--model is required")
    check_model_path(p, "model", config.model)
    check_model_path(p, "teacher", config.teacher)
    check_data_path(p, config.data)
    _check_tokenize(p, config)
    check_ranges(p, [("batch-size", config.batch_size, config.batch_size >= 1, ">= 1")])
    if config.cross_tokenizer is not None:
        check_cross_top_k(p, config.cross_tokenizer_top_k)
        if not config.teacher:
            p.append(
                f"--cross-tokenizer {config.cross_tokenizer} scores the model against a teacher of another "
                "tokenizer: give --teacher, or drop --cross-tokenizer"
            )
    if p:
        raise ConfigError(p)


def validate_cache_teacher(config: CacheTeacherConfig) -> None:
    c = config
    p: list[str] = []
    check_choices(p, c)
    if not c.teacher:
        p.append("--teacher is required (a model directory or hub id)")
    check_model_path(p, "teacher", c.teacher)
    check_model_path(p, "tokenizer", c.tokenizer)
    check_data_path(p, c.data)
    if not c.output:
        p.append("--output is required (the cache directory to write)")
    check_teacher_quant(p, c)
    if c.teacher_shard == "fsdp" and c.teacher_quant != "none":
        # FSDP2's DTensors do not wrap torchao's or bitsandbytes' tensors (as in distill).
        p.append(
            "--teacher-shard fsdp shards dense weights only: pass --teacher-quant none, or "
            "--teacher-shard replicate to quantize a whole teacher on every rank"
        )
    _check_tokenize(p, c)
    _check_student_samples(p, c)
    if c.cross_tokenizer and not c.tokenizer:
        p.append(
            f"--cross-tokenizer {c.cross_tokenizer} aligns the teacher's tokens with the student's: give the "
            "student with --tokenizer STUDENT (its tokenizer and chat template tokenize the data)"
        )
    if c.cross_tokenizer and c.student_samples:
        p.append(
            f"--cross-tokenizer {c.cross_tokenizer}: --student-samples is not supported across tokenizers; "
            "drop one of the two"
        )
    check_ranges(
        p,
        [
            ("top-k", c.top_k, c.top_k >= 1, ">= 1"),
            ("kd-temperature", c.kd_temperature, c.kd_temperature > 0, "> 0"),
            ("batch-size", c.batch_size, c.batch_size >= 1, ">= 1"),
            ("shard-size", c.shard_size, c.shard_size >= 1, ">= 1"),
            ("chunk-size", c.chunk_size, c.chunk_size >= 1, ">= 1"),
        ],
    )
    if p:
        raise ConfigError(p)


def _check_student_samples(p: list[str], c: CacheTeacherConfig) -> None:
    """cache-teacher's --student-samples and the sampling options, which mean something only with it."""
    check_sampling(p, c)
    check_ranges(p, [("samples-per-prompt", c.samples_per_prompt, c.samples_per_prompt >= 1, ">= 1")])
    if not c.student_samples:
        given = given_options(c, (*SAMPLING_OPTIONS, "samples_per_prompt"))
        if given:
            verb = "sets" if len(given) == 1 else "set"
            p.append(
                f"{', '.join(given)} {verb} how the student's responses are drawn: add --student-samples "
                "STUDENT, or drop it"
            )
        return
    check_model_path(p, "student-samples", c.student_samples)
    if c.train_on_prompt:
        p.append(
            "--student-samples: the student answers each record's prompt, which --train-on-prompt would "
            "cache as well; drop --train-on-prompt"
        )


# ------------------------------------------------------------------------------------------------
# Names from other tools: the vocabulary of the suggestion an unknown option gets
# (``options.suggest_option``).

# What other tools (PEFT, transformers' TrainingArguments, LLaMA-Factory, Axolotl, torchtune) call our
# options: an unknown option that is one of these gets "did you mean ...?" even where its spelling is far
# from ours. Keys are dotted names with "_" (a flag's "-" is normalised first).
ALIASES = {
    "rank": "lora.r",
    "lora_r": "lora.r",
    "lora_rank": "lora.r",
    "lora.rank": "lora.r",
    "alpha": "lora.lora_alpha",
    "lora.alpha": "lora.lora_alpha",
    "lora_alpha": "lora.lora_alpha",
    "lora.dropout": "lora.lora_dropout",
    "lora_dropout": "lora.lora_dropout",
    "lora_target": "lora.target_modules",
    "lora_target_modules": "lora.target_modules",
    "target_modules": "lora.target_modules",
    "lora.target": "lora.target_modules",
    "learning_rate": "lr",
    "num_train_epochs": "epochs",
    "num_epochs": "epochs",
    "per_device_train_batch_size": "batch_size",
    "micro_batch_size": "batch_size",
    "train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "gradient_accumulation": "grad_accum",
    "lr_scheduler_type": "scheduler",
    "lr_scheduler": "scheduler",
    "max_seq_length": "max_length",
    "max_seq_len": "max_length",
    "sequence_len": "max_length",
    "cutoff_len": "max_length",
    "model_name_or_path": "student",
    "base_model": "student",
    "teacher_model": "teacher",
    "teacher_model_name_or_path": "teacher",
    "dataset": "data",
    "train_file": "data",
    "val_size": "eval_fraction",
    "val_set_size": "eval_fraction",
    "logging_steps": "log_every",
    "save_steps": "save_every",
    "output": "output_dir",
    "alpha_kd": "kd_ratio",
    "kd_alpha": "kd_ratio",
    "kd_weight": "kd_ratio",
    "kd_loss_ratio": "kd_ratio",
    "loss_type": "divergence",
}


def dump_yaml(config: Any, path: str | Path) -> None:
    """Write ``config`` as YAML that ``--config`` reads back to an equal config (atomically)."""
    from llm_neo.runtime.atomic import atomic_write_text

    atomic_write_text(Path(path), yaml_text(config))
