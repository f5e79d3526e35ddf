"""Typed run configuration, and the CLI flags and YAML files derived from it.

Each option is declared once, as a dataclass field whose metadata carries its help text. The
argparse parser, the YAML loader and the validator all walk the same fields, so a new option is a
one-line change and `--help`, `--config` and `config.yaml` can never disagree.

Spelling: a top-level field ``kd_ratio`` is the flag ``--kd-ratio`` and the YAML key ``kd_ratio``;
a nested field ``lora.r`` is the flag ``--lora.r`` and the YAML key ``r`` under ``lora:``.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib.util
import math
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from llm_neo.errors import ConfigError

METHODS = ("neo", "kd", "lora", "sft")
LORA_METHODS = ("neo", "lora")  # arms whose only trainable weights are LoRA branches
KD_METHODS = ("neo", "kd")  # arms trained on CE + the divergence to the teacher
DIVERGENCE_NAMES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")
LORA_VARIANT_NAMES = ("lora", "dora", "rslora", "pissa", "moslora")
LOSS_IMPLS = ("chunked", "plain", "liger")
MLP_CHUNKS_HELP = (
    "With --gradient-checkpointing: checkpoint each block's MLP again in this many chunks of the "
    "sequence, so the backward's recomputed block holds one chunk of the MLP's activations (a third "
    "MLP forward per step). 1: off."
)
# Liger-Kernel's fused distillation loss is a generalized JSD: beta 0 and 1 are forward and reverse KL.
LIGER_DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
# Storage dtypes of a teacher cache's log-probs.
LOGPROB_DTYPE_NAMES = ("float16", "bfloat16", "float32")

# The paper's learning-rate guideline: LoRA arms use 10x the full-parameter rate.
FULL_PARAMETER_LR = 2e-5
LORA_LR = 2e-4


def _help(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": text, **extra}


@dataclass
class LoraOptions:
    """LoRA branches of the student (PEFT's vocabulary)."""

    r: int = field(default=64, metadata=_help("LoRA rank r (paper: 64; its released 1B model used 128)."))
    lora_alpha: float | None = field(
        default=None,
        metadata=_help("LoRA scaling numerator alpha; the update is (alpha/r)·B·A. Default 2·r."),
    )
    lora_dropout: float = field(default=0.0, metadata=_help("Dropout on the LoRA input, in [0, 1)."))
    target_modules: list[str] | None = field(
        default=None,
        metadata=_help(
            "Linear-layer names to adapt, e.g. q_proj v_proj. Default: every linear layer of the "
            "transformer blocks (not embeddings or lm_head), as in the paper."
        ),
    )
    variant: Literal["lora", "dora", "rslora", "pissa", "moslora"] = field(
        default="lora",
        metadata=_help(
            "lora: plain; dora: weight-decomposed; rslora: alpha/sqrt(r) scaling; pissa: principal-"
            "singular-vector init; moslora: learnable r×r mixer between A and B (merged exactly)."
        ),
    )


@dataclass
class DistillConfig:
    """Everything one `llm-neo distill` run needs."""

    # --- models -----------------------------------------------------------------------------------
    student: str = field(default="", metadata=_help("Student model: a local HF model dir or a hub id."))
    teacher: str | None = field(
        default=None, metadata=_help("Teacher model (local dir or hub id). Required for neo and kd.")
    )
    teacher_cache: str | None = field(
        default=None,
        metadata=_help(
            "A teacher cache written by `llm-neo cache-teacher`: neo/kd train on its top-k targets "
            "without loading the teacher (which, if also given, only scores the held-out split)."
        ),
    )
    method: Literal["neo", "kd", "lora", "sft"] = field(
        default="neo",
        metadata=_help(
            "neo: LoRA branches on CE + KD (LLM-Neo); kd: full student on CE + KD; lora: LoRA on CE "
            "only; sft: full student on CE only."
        ),
    )
    # --- data -------------------------------------------------------------------------------------
    data: str = field(
        default="",
        metadata=_help(
            "Training data: .jsonl, .json or .parquet file, or a datasets save_to_disk dir. Records: "
            "Alpaca (instruction/input/output), chat (messages), prompt/completion, or text."
        ),
    )
    max_length: int = field(default=2048, metadata=_help("Truncate each sample to this many tokens."))
    train_on_prompt: bool = field(
        default=False, metadata=_help("Also train on prompt tokens (default: response tokens only).")
    )
    eval_fraction: float = field(
        default=0.05,
        metadata=_help("Fraction of the data held out for evaluation and the merge check, in [0, 1)."),
    )
    # --- optimisation -----------------------------------------------------------------------------
    max_steps: int | None = field(
        default=None, metadata=_help("Optimizer steps to run; overrides --epochs when set.")
    )
    epochs: float = field(default=1.0, metadata=_help("Passes over the training split (fractions allowed)."))
    batch_size: int = field(default=1, metadata=_help("Samples per micro-batch."))
    grad_accum: int = field(default=8, metadata=_help("Micro-batches per optimizer step."))
    lr: float | None = field(
        default=None,
        metadata=_help(
            f"Peak learning rate. Default (paper's rule): {FULL_PARAMETER_LR:g} for sft/kd, "
            f"{LORA_LR:g} (10x) for neo/lora."
        ),
    )
    warmup_ratio: float = field(default=0.1, metadata=_help("Fraction of steps of linear warm-up."))
    scheduler: Literal["cosine", "linear", "constant"] = field(
        default="cosine", metadata=_help("Learning-rate schedule after warm-up.")
    )
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay."))
    max_grad_norm: float = field(default=1.0, metadata=_help("Gradient clipping norm; 0 disables."))
    seed: int = field(
        default=42, metadata=_help("Seed for initialisation, data order and the held-out split.")
    )
    gradient_checkpointing: bool = field(
        default=False, metadata=_help("Recompute student activations in backward to save memory.")
    )
    mlp_chunks: int = field(default=1, metadata=_help(MLP_CHUNKS_HELP))
    # --- loss -------------------------------------------------------------------------------------
    kd_ratio: float = field(
        default=0.5,
        metadata=_help("Weight of the KD term: loss = (1-kd_ratio)·CE + kd_ratio·D(teacher||student)."),
    )
    divergence: Literal["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"] = (
        field(default="forward_kl", metadata=_help("Divergence D between teacher and student."))
    )
    temperature: float = field(
        default=1.0, metadata=_help("Softmax temperature T of the KD term (scaled by T²).")
    )
    loss_impl: Literal["chunked", "plain", "liger"] = field(
        default="chunked",
        metadata=_help(
            "chunked: lm_heads and the loss computed chunk by chunk of tokens, never holding "
            "[tokens × vocab] logits; plain: full logits (the reference and benchmark baseline); liger: "
            "Liger-Kernel's fused linear JSD loss for the KD term (an extra: pip install "
            "'llm-neo[liger]'; forward_kl, reverse_kl or jsd; meant for CUDA)."
        ),
    )
    loss_chunk_size: int = field(default=1024, metadata=_help("Tokens per chunk of the chunked loss."))
    jsd_beta: float = field(default=0.5, metadata=_help("β of the generalized JSD, in (0, 1)."))
    skew_alpha: float = field(default=0.1, metadata=_help("α of the skew KL divergences, in [0, 1)."))
    # --- run --------------------------------------------------------------------------------------
    output_dir: str | None = field(default=None, metadata=_help("Where outputs go. Default runs/<method>."))
    save_every: int = field(
        default=0, metadata=_help("Checkpoint every N optimizer steps (0: only the final state).")
    )
    resume: bool = field(
        default=False, metadata=_help("Continue from the latest checkpoint in --output-dir.")
    )
    overwrite: bool = field(
        default=False, metadata=_help("Replace an earlier run's outputs in --output-dir.")
    )
    log_every: int = field(default=1, metadata=_help("Write a metrics.jsonl record every N steps."))
    eval_batch_size: int = field(default=8, metadata=_help("Batch size of held-out evaluation."))
    merge_tolerance: float = field(
        default=1e-3,
        metadata=_help("Max |merged − adapter| logit difference (fp32) accepted by the merge check."),
    )
    device: str = field(default="auto", metadata=_help("auto, cpu, cuda or cuda:N."))
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto",
        metadata=_help("Compute dtype (autocast). auto: bfloat16 on GPUs that support it, else float32."),
    )
    trust_remote_code: bool = field(
        default=False, metadata=_help("Allow model/tokenizer code from the model dir (off: never run it).")
    )
    allow_pickle_weights: bool = field(
        default=False,
        metadata=_help("Allow loading .bin/.pt (pickle) weights; by default only safetensors are loaded."),
    )
    lora: LoraOptions = field(default_factory=LoraOptions)

    # ---------------------------------------------------------------------------------------------
    @property
    def uses_lora(self) -> bool:
        return self.method in LORA_METHODS

    @property
    def uses_kd(self) -> bool:
        return self.method in KD_METHODS and self.kd_ratio > 0

    def resolved(self) -> DistillConfig:
        """A copy with every derived default filled in (learning rate, alpha, output dir)."""
        lora = dataclasses.replace(
            self.lora,
            lora_alpha=self.lora.lora_alpha if self.lora.lora_alpha is not None else 2 * self.lora.r,
        )
        return dataclasses.replace(
            self,
            lr=self.lr if self.lr is not None else (LORA_LR if self.uses_lora else FULL_PARAMETER_LR),
            output_dir=self.output_dir or f"runs/{self.method}",
            lora=lora,
        )


@dataclass
class EvalConfig:
    """`llm-neo eval`: KD-aware held-out metrics of a model against a teacher."""

    model: str = field(default="", metadata=_help("Model to evaluate (e.g. runs/neo/merged)."))
    data: str = field(default="", metadata=_help("Held-out data, in any format `distill` reads."))
    teacher: str | None = field(
        default=None, metadata=_help("Teacher for kl_to_teacher and top1_agreement (optional).")
    )
    max_length: int = field(default=2048, metadata=_help("Truncate each sample to this many tokens."))
    train_on_prompt: bool = field(default=False, metadata=_help("Score prompt tokens too."))
    batch_size: int = field(default=8, metadata=_help("Evaluation batch size."))
    json: str | None = field(default=None, metadata=_help("Also write the metrics to this JSON file."))
    device: str = field(default="auto", metadata=_help("auto, cpu, cuda or cuda:N."))
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto", metadata=_help("Compute dtype. auto: bfloat16 on capable GPUs, else float32.")
    )
    trust_remote_code: bool = field(default=False, metadata=_help("Allow code from the model dir."))
    allow_pickle_weights: bool = field(default=False, metadata=_help("Allow non-safetensors weights."))


# ------------------------------------------------------------------------------------------------
# Validation: every problem at once, each with how to fix it.


def _looks_like_hub_id(value: str) -> bool:
    # "org/name" that is not a local path; anything else that does not exist is a missing path.
    return value.count("/") == 1 and not value.startswith((".", "/", "~")) and not Path(value).exists()


def _check_model_path(problems: list[str], option: str, value: str | None) -> None:
    if value and not Path(value).expanduser().exists() and not _looks_like_hub_id(value):
        problems.append(f"--{option}: {value!r} does not exist (give a model directory or a hub id org/name)")


def _check_data_path(problems: list[str], value: str | None) -> None:
    if not value:
        problems.append("--data is required (a .jsonl/.json/.parquet file or a datasets directory)")
    elif not Path(value).expanduser().exists():
        problems.append(f"--data: {value!r} does not exist")


def validate_distill(config: DistillConfig) -> None:
    """Raise ConfigError listing every problem of ``config`` (a resolved or unresolved config)."""
    c = config
    p: list[str] = []
    if c.method not in METHODS:
        p.append(f"--method: {c.method!r} is not one of {', '.join(METHODS)}")
    if not c.student:
        p.append("--student is required (a model directory or hub id)")
    _check_model_path(p, "student", c.student)
    if c.method in KD_METHODS and not c.teacher and not c.teacher_cache:
        p.append(
            f"--teacher is required for --method {c.method} (or --teacher-cache CACHE from llm-neo "
            "cache-teacher; or use --method lora/sft)"
        )
    _check_model_path(p, "teacher", c.teacher)
    if c.teacher_cache and not (Path(c.teacher_cache).expanduser() / "manifest.json").is_file():
        p.append(
            f"--teacher-cache: {c.teacher_cache!r} is not a complete teacher cache (no manifest.json); "
            "write it with llm-neo cache-teacher --output DIR, or rerun that command to finish it"
        )
    _check_data_path(p, c.data)
    if c.divergence not in DIVERGENCE_NAMES:
        p.append(f"--divergence: {c.divergence!r} is not one of {', '.join(DIVERGENCE_NAMES)}")
    if c.loss_impl not in LOSS_IMPLS:
        p.append(f"--loss-impl: {c.loss_impl!r} is not one of {', '.join(LOSS_IMPLS)}")
    if c.loss_impl == "liger":
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
    if c.lora.variant not in LORA_VARIANT_NAMES:
        p.append(f"--lora.variant: {c.lora.variant!r} is not one of {', '.join(LORA_VARIANT_NAMES)}")
    for name, value, ok, rule in [
        ("kd-ratio", c.kd_ratio, 0 <= c.kd_ratio <= 1, "in [0, 1]"),
        ("temperature", c.temperature, c.temperature > 0, "> 0"),
        ("jsd-beta", c.jsd_beta, 0 < c.jsd_beta < 1, "in (0, 1)"),
        ("skew-alpha", c.skew_alpha, 0 <= c.skew_alpha < 1, "in [0, 1)"),
        ("epochs", c.epochs, c.epochs > 0, "> 0"),
        ("max-steps", c.max_steps, c.max_steps is None or c.max_steps >= 1, ">= 1"),
        ("batch-size", c.batch_size, c.batch_size >= 1, ">= 1"),
        ("grad-accum", c.grad_accum, c.grad_accum >= 1, ">= 1"),
        ("max-length", c.max_length, c.max_length >= 2, ">= 2"),
        ("lr", c.lr, c.lr is None or c.lr > 0, "> 0"),
        ("warmup-ratio", c.warmup_ratio, 0 <= c.warmup_ratio <= 1, "in [0, 1]"),
        ("weight-decay", c.weight_decay, c.weight_decay >= 0, ">= 0"),
        ("max-grad-norm", c.max_grad_norm, c.max_grad_norm >= 0, ">= 0"),
        ("eval-fraction", c.eval_fraction, 0 <= c.eval_fraction < 1, "in [0, 1)"),
        ("save-every", c.save_every, c.save_every >= 0, ">= 0"),
        ("log-every", c.log_every, c.log_every >= 1, ">= 1"),
        ("loss-chunk-size", c.loss_chunk_size, c.loss_chunk_size >= 1, ">= 1"),
        ("mlp-chunks", c.mlp_chunks, c.mlp_chunks >= 1, ">= 1"),
        ("eval-batch-size", c.eval_batch_size, c.eval_batch_size >= 1, ">= 1"),
        ("merge-tolerance", c.merge_tolerance, c.merge_tolerance > 0, "> 0"),
        ("lora.r", c.lora.r, c.lora.r >= 1, ">= 1"),
        ("lora.lora-alpha", c.lora.lora_alpha, c.lora.lora_alpha is None or c.lora.lora_alpha > 0, "> 0"),
        ("lora.lora-dropout", c.lora.lora_dropout, 0 <= c.lora.lora_dropout < 1, "in [0, 1)"),
    ]:
        if not ok or (isinstance(value, float) and not math.isfinite(value)):
            p.append(f"--{name}: {value} is out of range; it must be {rule}")
    if c.mlp_chunks > 1 and not c.gradient_checkpointing:
        p.append(
            f"--mlp-chunks {c.mlp_chunks} splits the MLP inside checkpointed blocks: add "
            "--gradient-checkpointing, or use --mlp-chunks 1"
        )
    if c.lora.target_modules is not None and not c.lora.target_modules:
        p.append("--lora.target-modules: give at least one module name, or omit it for the default")
    if p:
        raise ConfigError(p)


def validate_eval(config: EvalConfig) -> None:
    p: list[str] = []
    if not config.model:
        p.append("--model is required")
    _check_model_path(p, "model", config.model)
    _check_model_path(p, "teacher", config.teacher)
    _check_data_path(p, config.data)
    if config.max_length < 2:
        p.append(f"--max-length: {config.max_length} is out of range; it must be >= 2")
    if config.batch_size < 1:
        p.append(f"--batch-size: {config.batch_size} is out of range; it must be >= 1")
    if p:
        raise ConfigError(p)


# ------------------------------------------------------------------------------------------------
# The generic machinery: dataclass fields <-> flags <-> YAML.


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _field_types(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _flag(prefix: str, name: str) -> str:
    return f"--{prefix}{name.replace('_', '-')}"


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, prefix: str = "") -> None:
    """Add one flag per field of ``cls`` (recursing into nested dataclasses as ``--section.name``).

    Defaults are suppressed so that only flags the user typed override the YAML file.
    """
    hints = _field_types(cls)
    group = parser.add_argument_group(f"{prefix.rstrip('.')} options") if prefix else parser
    for f in dataclasses.fields(cls):
        tp, _ = _unwrap_optional(hints[f.name])
        if dataclasses.is_dataclass(tp):
            add_dataclass_arguments(parser, tp, prefix=f"{prefix}{f.name}.")  # type: ignore[arg-type]
            continue
        flags = [_flag(prefix, f.name)]
        dest = f"{prefix}{f.name}"
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = f.metadata.get("help", "")
        if default not in (None, "", False):
            help_text += f" [default: {default}]"
        kwargs: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS, "help": help_text}
        if tp is bool:
            group.add_argument(*flags, action=argparse.BooleanOptionalAction, **kwargs)
        elif get_origin(tp) is Literal:
            group.add_argument(
                *flags, choices=list(get_args(tp)), metavar="{" + ",".join(get_args(tp)) + "}", **kwargs
            )
        elif get_origin(tp) is list:
            group.add_argument(*flags, nargs="+", metavar=f.name.upper().removesuffix("S"), **kwargs)
        else:
            group.add_argument(*flags, type=tp, metavar=f.name.upper(), **kwargs)


def _coerce(value: Any, tp: Any, where: str, problems: list[str]) -> Any:
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if not optional:
            problems.append(f"{where}: null is not allowed here")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is float:
        # YAML 1.1 reads "2e-4" as a string; accept it the way a user meant it.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif get_origin(tp) is Literal:
        if value in get_args(tp):
            return value
        problems.append(f"{where}: {value!r} is not one of {', '.join(map(str, get_args(tp)))}")
        return value
    elif get_origin(tp) is list:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
    problems.append(f"{where}: {value!r} is not a valid {getattr(tp, '__name__', tp)}")
    return value


def from_dict(cls: type, data: dict[str, Any], *, source: str, problems: list[str], prefix: str = "") -> Any:
    """Build ``cls`` from a (YAML) mapping; unknown keys and wrong types are appended to ``problems``."""
    hints = _field_types(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        key_norm = str(key).replace("-", "_")
        where = f"{source}: {prefix}{key}"
        if key_norm not in names:
            close = difflib.get_close_matches(key_norm, names, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            problems.append(f"{where}: unknown option{hint}")
            continue
        tp, _ = _unwrap_optional(hints[key_norm])
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                problems.append(f"{where}: expected a mapping of {key_norm} options")
                continue
            kwargs[key_norm] = from_dict(
                tp,  # type: ignore[arg-type]
                value,
                source=source,
                problems=problems,
                prefix=f"{prefix}{key_norm}.",
            )
        else:
            kwargs[key_norm] = _coerce(value, hints[key_norm], where, problems)
    return cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict of a config dataclass (what config.yaml and summary.json hold)."""
    return dataclasses.asdict(config)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"--config: {str(path)!r} does not exist"])
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(
            [f"{path}{where}: invalid YAML ({err.__class__.__name__}); fix the syntax"]
        ) from err
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: the top level must be a mapping of option: value"])
    return data


def build_config(cls: type, args: argparse.Namespace, config_file: str | None = None) -> Any:
    """Merge a YAML file (if any) with the flags the user typed (flags win) into ``cls``."""
    problems: list[str] = []
    data: dict[str, Any] = load_yaml(config_file) if config_file else {}
    for dest, value in vars(args).items():
        if dest in ("command", "config", "func", "quiet", "debug"):
            continue
        node = data
        *parents, leaf = dest.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                break
        else:
            node[leaf] = value
    config = from_dict(cls, data, source=str(config_file or "command line"), problems=problems)
    if problems:
        raise ConfigError(problems)
    return config


def dump_yaml(config: Any, path: str | Path) -> None:
    """Write ``config`` as YAML that ``--config`` reads back to an equal config."""
    from llm_neo.runtime.atomic import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(to_dict(config), sort_keys=False))


@dataclass
class CacheTeacherConfig:
    """`llm-neo cache-teacher`: run the teacher once over the data and store its top-k log-probs."""

    teacher: str = field(default="", metadata=_help("Teacher model: a local HF model dir or a hub id."))
    data: str = field(
        default="",
        metadata=_help("Data to cache, in any format `distill` reads (the file you will distill on)."),
    )
    output: str = field(default="", metadata=_help("Cache directory to write (or to resume)."))
    tokenizer: str | None = field(
        default=None,
        metadata=_help(
            "Model dir whose tokenizer and chat template tokenize the data, as the student's do in "
            "distill. Default: the teacher's. Give the student here if its tokenizer or template "
            "files differ from the teacher's (the cache key records them)."
        ),
    )
    top_k: int = field(
        default=64,
        metadata=_help("Teacher tokens kept per position (the rest is one tail bucket); ~6·k+2 bytes/token."),
    )
    temperature: float = field(
        default=1.0,
        metadata=_help("Temperature T of the stored log-probs; distill must use the same --temperature."),
    )
    max_length: int = field(default=2048, metadata=_help("Truncate each sample to this many tokens."))
    train_on_prompt: bool = field(
        default=False, metadata=_help("Cache prompt positions too (for distill --train-on-prompt).")
    )
    batch_size: int = field(default=8, metadata=_help("Samples per teacher forward pass."))
    shard_size: int = field(default=1024, metadata=_help("Examples per shard file (the unit of resumption)."))
    logprob_dtype: Literal["float16", "bfloat16", "float32"] = field(
        default="float16",
        metadata=_help("Storage dtype of the log-probs and the tail (computed in float32 either way)."),
    )
    chunk_size: int = field(
        default=1024, metadata=_help("Tokens per chunk of the teacher's lm_head (bounds logits memory).")
    )
    device: str = field(default="auto", metadata=_help("auto, cpu, cuda or cuda:N."))
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto",
        metadata=_help("Compute dtype of the teacher. auto: bfloat16 on GPUs that support it, else float32."),
    )
    trust_remote_code: bool = field(
        default=False, metadata=_help("Allow model/tokenizer code from the model dir (off: never run it).")
    )
    allow_pickle_weights: bool = field(
        default=False,
        metadata=_help("Allow loading .bin/.pt (pickle) weights; by default only safetensors are loaded."),
    )
    overwrite: bool = field(
        default=False,
        metadata=_help("Replace a cache in --output made for other inputs (same inputs: it is resumed)."),
    )


def validate_cache_teacher(config: CacheTeacherConfig) -> None:
    c = config
    p: list[str] = []
    if not c.teacher:
        p.append("--teacher is required (a model directory or hub id)")
    _check_model_path(p, "teacher", c.teacher)
    _check_model_path(p, "tokenizer", c.tokenizer)
    _check_data_path(p, c.data)
    if not c.output:
        p.append("--output is required (the cache directory to write)")
    for name, value, ok, rule in [
        ("top-k", c.top_k, c.top_k >= 1, ">= 1"),
        ("temperature", c.temperature, c.temperature > 0 and math.isfinite(c.temperature), "> 0"),
        ("max-length", c.max_length, c.max_length >= 2, ">= 2"),
        ("batch-size", c.batch_size, c.batch_size >= 1, ">= 1"),
        ("shard-size", c.shard_size, c.shard_size >= 1, ">= 1"),
        ("chunk-size", c.chunk_size, c.chunk_size >= 1, ">= 1"),
    ]:
        if not ok:
            p.append(f"--{name}: {value} is out of range; it must be {rule}")
    if c.logprob_dtype not in LOGPROB_DTYPE_NAMES:
        p.append(f"--logprob-dtype: {c.logprob_dtype!r} is not one of {', '.join(LOGPROB_DTYPE_NAMES)}")
    if p:
        raise ConfigError(p)
