"""`llm-neo export`: a verified GGUF (llama.cpp, Ollama) or torchao int8 (safetensors) copy of a model dir.

The work is ``llm_neo.export.export_model``; this is its command line: options, validation of all of
them at once, and a summary table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from llm_neo.errors import ConfigError
from llm_neo.export import EXPORT_FILE
from llm_neo.options import option_help
from llm_neo.runtime.lock import releases_locks
from llm_neo.runtime.rundir import check_replaced_dir, hold, output_path_problems

__all__ = ["ExportConfig", "run_export", "validate_export"]


@dataclass
class ExportConfig:
    """`llm-neo export`: write a model directory as GGUF or int8 safetensors and verify it by reloading."""

    model: str = field(
        default="",
        metadata=option_help(
            "The model to export: a local Hugging Face model dir (weights + tokenizer), e.g. runs/neo/merged."
        ),
    )
    format: Literal["gguf", "int8"] = field(
        default="gguf",
        metadata=option_help(
            "gguf: one .gguf file for llama.cpp / Ollama (Llama, Mistral, Qwen2 families); int8: torchao "
            "int8 weight-only safetensors that from_pretrained loads (needs torchao)."
        ),
    )
    gguf_type: Literal["f32", "f16", "q8_0", "q4_0"] = field(
        default="q8_0",
        metadata=option_help(
            "GGUF tensor type: f32 (exact), f16, q8_0 (8-bit blocks, ~1/4 of f32), q4_0 (4-bit block "
            "linears, q8_0 embeddings/head). K-quants: run llama.cpp's llama-quantize on the f16 file."
        ),
    )
    output: str = field(
        default="",
        metadata=option_help("Directory to write: the .gguf file or the int8 checkpoint, and export.json."),
    )
    gguf_pre: str | None = field(
        default=None,
        metadata=option_help(
            "llama.cpp's name of the tokenizer's pre-tokenizer (tokenizer.ggml.pre: llama-bpe, qwen2, "
            "gpt-2, smollm, ...) when it cannot be recognised from tokenizer.json."
        ),
    )
    overwrite: bool = field(
        default=False, metadata=option_help("Replace an existing, non-empty --output dir.")
    )


def validate_export(config: ExportConfig) -> None:
    """Raise ConfigError listing every problem of ``config``."""
    c = config
    p: list[str] = []
    model = Path(c.model).expanduser() if c.model else None
    if model is None:
        p.append("--model is required (a local model directory, e.g. runs/neo/merged)")
    elif not (model / "config.json").is_file():
        p.append(f"--model: {c.model!r} is not a local Hugging Face model directory (no config.json there)")
    if not c.output:
        p.append("--output is required (the directory the export is written to)")
    else:
        out = Path(c.output).expanduser()
        p += output_path_problems(out, "--output")  # a dangling link: before any model loads
        if model is not None and out.resolve() == model.resolve():
            p.append("--output must differ from --model")
        elif out.suffix == ".gguf" and not out.is_dir():
            # A user naming a file expects a file; a directory called x.gguf would surprise llama.cpp too.
            p.append(
                f"--output: {c.output!r} names a .gguf file, but an export is a directory (the "
                f"<model>-<TYPE>.gguf file, {EXPORT_FILE} and an llm-neo marker in it): give a directory, "
                f"e.g. {str(Path(c.output).with_suffix(''))!r}"
            )
        elif refused := check_replaced_dir(
            out, "export", flag="--output", overwrite=c.overwrite, shown=c.output, record=EXPORT_FILE
        ):
            p.append(refused)
    if c.format not in ("gguf", "int8"):
        p.append(f"--format: {c.format!r} is not one of gguf, int8")
    if c.gguf_type not in ("f32", "f16", "q8_0", "q4_0"):
        p.append(f"--gguf-type: {c.gguf_type!r} is not one of f32, f16, q8_0, q4_0")
    if c.format == "int8" and c.gguf_pre:
        p.append("--gguf-pre applies to --format gguf only")
    if p:
        raise ConfigError(p)


@releases_locks
def run_export(config: ExportConfig) -> dict[str, Any]:
    """Validate, export, print what was written and how close it is to the source; return export.json."""
    from llm_neo.export import export_model
    from llm_neo.report.tables import format_table

    if config.output:  # before the check: no other process writes there from now on
        hold(Path(config.output), "export", "--output")
    validate_export(config)
    record = export_model(
        config.model,
        config.format,
        config.gguf_type if config.format == "gguf" else None,
        config.output,
        gguf_pre=config.gguf_pre,
        overwrite=config.overwrite,
    )
    check = record["verification"]
    numbers = check.get("logits", check)
    row = {
        "MiB": f"{record['bytes'] / 2**20:.1f}",
        "max |Δlogit|": f"{numbers['max_abs_logit_diff']:.3g}",
        "KL/token": f"{numbers['kl_per_token']:.3g}",
        "top-1 agree": f"{numbers['top1_agreement']:.4f}",
        "token ids": "equal" if check.get("token_ids_equal", True) else "DIFFER",
        "verified": "yes",
    }
    name = f"{config.format}:{config.gguf_type}" if config.format == "gguf" else "int8"
    print(format_table({name: row}, list(row)))
    print(
        f"\n{config.output}: {record.get('file') or 'model dir'}, export.json beside it; "
        f"load with {record['load_with']}"
    )
    return record
