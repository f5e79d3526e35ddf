"""`llm-neo cache-teacher`: write (or finish) a teacher cache and print what it holds."""

from __future__ import annotations

from llm_neo.config import SAMPLING_OPTIONS, CacheTeacherConfig, SamplingOptions
from llm_neo.models.quant import describe_teacher_quant
from llm_neo.options import flag_name
from llm_neo.report.tables import format_table
from llm_neo.teacher_cache.writer import cache_teacher


def run_cache_teacher(config: CacheTeacherConfig) -> int:
    """`llm-neo cache-teacher`: write the cache and print what it holds."""
    manifest = cache_teacher(config)
    row = {
        "examples": manifest["num_examples"],
        "tokens": manifest["num_positions"],
        "shards": len(manifest["shards"]),
        "top_k": manifest["top_k"],
        "MB": manifest["bytes"] / 1e6,
        "bytes/token": manifest["bytes_per_token"],
        "tokens/s": manifest["stats"]["tokens_per_s"],
    }
    print(format_table({str(config.output): row}, list(row)))
    teacher_line = describe_teacher_quant(manifest.get("teacher_quant"))
    if teacher_line:
        print(teacher_line)
    quant = ""
    if config.teacher_quant != "none":
        quant = f" --teacher-quant {config.teacher_quant}"
        if config.teacher_quant_backend != "auto":
            quant += f" --teacher-quant-backend {config.teacher_quant_backend}"
    samples = ""
    if config.student_samples:
        samples = f" --student {config.student_samples} --on-policy 1{sampling_flags(config)}"
        print(
            f"{manifest['num_examples']} samples of {config.student_samples} "
            f"({config.samples_per_prompt} per prompt): training on them is on-policy to this initial "
            "student, not to the student as it trains"
        )
    if config.cross_tokenizer:  # distill needs the method and k to take the cached targets as aligned
        samples = f" --student {config.tokenizer} --cross-tokenizer {config.cross_tokenizer} "
        samples += f"--cross-tokenizer-top-k {config.top_k}"
    print(
        f"\ntrain from it: llm-neo distill --teacher-cache {config.output}{samples} --kd-temperature "
        f"{config.kd_temperature:g} --max-length {config.max_length}{quant} --data {config.data} ..."
    )
    return 0


def sampling_flags(config: SamplingOptions) -> str:
    """The sampling options that differ from their defaults, as flags (distill must repeat them)."""
    defaults = SamplingOptions()
    flags = ""
    for name in SAMPLING_OPTIONS:
        value = getattr(config, name)
        if value != getattr(defaults, name):
            flags += f" {flag_name(name)} {value:g}"
    return flags
