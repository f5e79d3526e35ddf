"""The choice lists of llm-neo, each defined once: the methods and what they train, the divergences, the
LoRA variants, the loss implementations and the compute dtypes. Configs, losses, models, commands and
the demo import them from here; nothing spells them out again."""

from __future__ import annotations

from dataclasses import dataclass

# The paper's learning-rate guideline: LoRA arms use 10x the full-parameter rate.
FULL_PARAMETER_LR = 2e-5
LORA_LR = 2e-4


@dataclass(frozen=True)
class Method:
    """One arm of the comparison: which weights it trains and what its loss holds."""

    name: str
    lora: bool  # only LoRA branches train (the base stays frozen); else the whole student
    kd: bool  # CE + the divergence to the teacher; else CE alone
    summary: str

    @property
    def default_lr(self) -> float:
        return LORA_LR if self.lora else FULL_PARAMETER_LR


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("neo", lora=True, kd=True, summary="LoRA branches on CE + KD (LLM-Neo)"),
        Method("kd", lora=False, kd=True, summary="full student on CE + KD"),
        Method("lora", lora=True, kd=False, summary="LoRA on CE only"),
        Method("sft", lora=False, kd=False, summary="full student on CE only"),
    )
}
METHOD_NAMES = tuple(METHODS)
LORA_METHODS = tuple(name for name, m in METHODS.items() if m.lora)
KD_METHODS = tuple(name for name, m in METHODS.items() if m.kd)
# The order reports and the demo show the arms in: the baselines first, Neo last.
COMPARISON_ORDER = ("sft", "lora", "kd", "neo")

# D(teacher || student); see llm_neo.losses.divergences for the formulas.
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")
# D on the student's own samples (--on-policy): reverse KL, as MiniLLM and the Qwen3 / Thinking Machines
# recipes use (docs/on-policy.md says why; GKD defaults to its generalized JSD).
ON_POLICY_DIVERGENCE = "reverse_kl"
# Liger-Kernel's fused distillation loss is a generalized JSD: beta 0 and 1 are forward and reverse KL.
LIGER_DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")

# --cross-tokenizer: distilling a teacher whose tokenizer differs from the student's (llm_neo.alignment,
# docs/cross-tokenizer.md): the teacher's mass on tokens of the same text, or ULD's sorted probabilities.
CROSS_TOKENIZER_METHODS = ("shared-vocab", "uld")

# PEFT's variants plus MoSLoRA (llm_neo.models.lora).
LORA_VARIANTS = ("lora", "dora", "rslora", "pissa", "moslora")

# How the loss is computed: chunk by chunk (default), on full logits (the reference), or by Liger.
LOSS_IMPLS = ("chunked", "plain", "liger")

# Compute dtypes a user can ask for; "auto" is bfloat16 on GPUs that support it, else float32.
DTYPES = ("auto", "float32", "bfloat16", "float16")
# Storage dtypes of a teacher cache's log-probs.
LOGPROB_DTYPES = ("float16", "bfloat16", "float32")

# Quantization (llm_neo.models.quant): of the teacher's block linears, and of the LoRA arms' frozen base.
TEACHER_QUANT = ("none", "int8", "nf4")
TEACHER_QUANT_BACKENDS = ("auto", "torchao", "bitsandbytes")
STUDENT_QUANT = ("none", "nf4", "int8")
# How cache-teacher holds its teacher under torchrun: whole on every rank, or FSDP2-sharded across them.
TEACHER_SHARDS = ("auto", "replicate", "fsdp")
# The LoRA variants that merge exactly onto a quantized base (DoRA and PiSSA do not: models.quant).
QLORA_VARIANTS = ("lora", "rslora", "moslora")
# Exports of a merged student (llm_neo.export): the formats, and the GGUF tensor types gguf-py writes.
EXPORT_FORMATS = ("gguf", "int8")
GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0")
# `distill --export SPEC`: a format and, for GGUF, its tensor type.
EXPORT_SPECS = (*(f"gguf:{t}" for t in GGUF_TYPES), "int8")

# Experiment trackers of --report-to (llm_neo.runtime.tracking), beside metrics.jsonl.
TRACKERS = ("tensorboard", "wandb", "mlflow")

# Variants of an arm, joined to its method with "+": neo+int8-teacher, lora+nf4-student,
# neo+int8-teacher+nf4-student (compare's --methods, bench's --runs). Each sets one quantization option,
# or (neo+on-policy, kd+on-policy; compare only) turns on-policy distillation on: compare sets its λ.
QUANT_VARIANTS: dict[str, tuple[str, str]] = {
    **{f"{kind}-teacher": ("teacher_quant", kind) for kind in TEACHER_QUANT if kind != "none"},
    **{f"{kind}-student": ("student_quant", kind) for kind in STUDENT_QUANT if kind != "none"},
}
ON_POLICY_VARIANT = "on-policy"
ARM_VARIANTS: dict[str, tuple[str, str]] = {**QUANT_VARIANTS, ON_POLICY_VARIANT: ("on_policy", "on")}
