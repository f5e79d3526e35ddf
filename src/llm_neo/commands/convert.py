"""`llm-neo convert`: a GGUF file (llama.cpp, Ollama) to a standard Hugging Face model directory, once.

Every command reads a ``.gguf`` directly, but dequantizing it (and parsing its metadata, tokenizer
included, in Python) takes seconds to minutes on every run. ``convert`` does it once:

    read     transformers' GGUF loader, every tensor dequantized to --dtype
    write    config.json + model.safetensors (tied embeddings stored once, still tied) + the tokenizer
             and chat template from the file + convert.json (source, size, dtype), atomically
    verify   every saved tensor equals the loaded one bit for bit (read back one tensor at a time),
             the saved tokenizer maps every id to the same token and keeps the chat template
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open

from llm_neo import __version__
from llm_neo.errors import ConfigError, ModelError
from llm_neo.models.loading import (
    check_same_vocabulary,
    load_gguf_model,
    load_tokenizer,
    resolve_gguf,
)
from llm_neo.options import option_help
from llm_neo.report.tables import format_table
from llm_neo.runtime.atomic import atomic_write_json
from llm_neo.runtime.lock import releases_locks
from llm_neo.runtime.rundir import check_replaced_dir, hold, marked_directory, output_path_problems

log = logging.getLogger("llm_neo")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ConvertConfig:
    """`llm-neo convert`: write a GGUF checkpoint as a safetensors model directory."""

    model: str = field(
        default="",
        metadata=option_help(
            "The .gguf file to convert (or a directory holding exactly one .gguf).", positional=True
        ),
    )
    output: str = field(
        default="",
        metadata=option_help(
            "Where the model directory (config, safetensors, tokenizer) is written.", positional=True
        ),
    )
    dtype: Literal["float32", "bfloat16", "float16"] = field(
        default="float32",
        metadata=option_help(
            "dtype of the saved weights. float32 holds the dequantized values exactly; bfloat16/float16 "
            "halve the size and round them (an F16 GGUF converts exactly to float16)."
        ),
    )
    overwrite: bool = field(
        default=False, metadata=option_help("Replace an existing, non-empty --output dir.")
    )


def validate_convert(config: ConvertConfig) -> tuple[str, str]:
    """Raise ConfigError listing every problem; return the GGUF's (directory, file name)."""
    c = config
    p: list[str] = []
    gguf: tuple[str, str | None] = ("", None)
    if not c.model:
        p.append("--model is required (the .gguf file to convert)")
    elif not Path(c.model).expanduser().exists():
        p.append(f"--model: {c.model!r} does not exist")
    else:
        try:
            gguf = resolve_gguf(c.model)
        except ModelError as err:
            p.append(f"--model: {err}")
        else:
            if gguf[1] is None:
                p.append(
                    f"--model: {c.model!r} is not a .gguf file (nor a directory holding one without a "
                    "config.json); a Hugging Face model directory needs no conversion"
                )
    if not c.output:
        p.append("--output is required (the model directory to write)")
    else:
        out = Path(c.output).expanduser()
        p += output_path_problems(out, "--output")  # a dangling link: before any model loads
        if refused := check_replaced_dir(
            out, "convert", flag="--output", overwrite=c.overwrite, shown=c.output, record="convert.json"
        ):
            p.append(refused)
    if c.dtype not in DTYPES:
        p.append(f"--dtype: {c.dtype!r} is not one of {', '.join(DTYPES)}")
    if p:
        raise ConfigError(p)
    assert gguf[1] is not None
    return gguf[0], gguf[1]


@releases_locks
def run_convert(config: ConvertConfig) -> dict[str, Any]:
    """`llm-neo convert`: validate, load (dequantize), save atomically, verify; print and return a report
    (also ``<output>/convert.json``)."""
    if config.output:  # before the check: no other process writes there from now on
        hold(Path(config.output), "convert", "--output")
    directory, name = validate_convert(config)
    source = Path(directory) / name
    out = Path(config.output).expanduser()
    dtype = DTYPES[config.dtype]
    started = time.perf_counter()

    tokenizer = load_tokenizer(str(source), role="model")
    model = load_gguf_model(str(source), role="model", dtype=dtype)
    loaded_s = time.perf_counter() - started
    tied = bool(getattr(model.config.get_text_config(), "tie_word_embeddings", False))
    report: dict[str, Any] = {
        "llm_neo_version": __version__,
        "source": str(source),
        "source_bytes": source.stat().st_size,
        "architecture": type(model).__name__,
        "model_type": model.config.model_type,
        "dtype": config.dtype,
        "parameters": sum(p.numel() for p in model.parameters()),
        "tied_embeddings": tied,
        "vocab_size": len(tokenizer),
        "chat_template": bool(tokenizer.chat_template),
        "output": str(out),
        "config": dataclasses.asdict(config),
    }
    with marked_directory(out, "convert") as tmp:
        model.config.dtype = dtype  # what published_dtype reads back: the student is saved in this dtype
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _verify(model, tokenizer, tmp)
        report["output_bytes"] = sum(f.stat().st_size for f in tmp.iterdir() if f.is_file())
        report["seconds"] = time.perf_counter() - started
        atomic_write_json(tmp / "convert.json", report)

    row = {
        "model": report["architecture"],
        "parameters": report["parameters"],
        "tied": "yes" if tied else "no",
        "dtype": config.dtype,
        "GGUF MB": report["source_bytes"] / 1e6,
        "saved MB": report["output_bytes"] / 1e6,
        "load s": loaded_s,
        "total s": report["seconds"],
    }
    print(format_table({name: row}, list(row)))
    print(f"\nsaved to {out}; use it as --teacher/--student/--model {out}")
    return report


def _verify(model: torch.nn.Module, tokenizer: Any, path: Path) -> None:
    """Every saved tensor equals the model's bit for bit (tied weights stored once), and the saved
    tokenizer is the same tokenizer; raise ModelError otherwise. Reads one tensor at a time."""
    state = model.state_dict()
    saved: set[str] = set()
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if key not in state or not torch.equal(handle.get_tensor(key), state[key].cpu()):
                    raise ModelError(f"convert: the saved tensor {key} in {file.name} differs from the model")
                saved.add(key)
    # Tied parameters are saved once; every parameter must be stored under one of its names.
    names_of: dict[int, set[str]] = {}
    for key, param in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), set()).add(key)
    missing = sorted(min(names) for names in names_of.values() if not names & saved)
    if missing:
        raise ModelError(f"convert: parameters missing from the saved files: {', '.join(missing[:5])}")
    reloaded = load_tokenizer(str(path), role="converted model")
    check_same_vocabulary(reloaded, tokenizer)
    if reloaded.chat_template != tokenizer.chat_template:
        raise ModelError("convert: the saved tokenizer lost the GGUF's chat template")
