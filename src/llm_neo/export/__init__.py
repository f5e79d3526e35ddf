"""Deployable files of a (merged) student: GGUF for llama.cpp / Ollama, int8 safetensors for HF servers.

``export_model`` is the one entry point (``llm-neo export`` and ``distill --export`` call it): it checks
the request before any weight loads, writes the export into a temporary sibling of ``output``, verifies
it by reloading it (``gguf.verify_gguf``: transformers' GGUF loader; ``int8.export_int8``:
``from_pretrained``), records everything in ``export.json`` and only then renames the directory into
place, so ``output`` holds either a complete, verified export or nothing new. A failed verification
raises ``ModelError`` listing what differed, and leaves nothing behind.

    output/
      <name>-<TYPE>.gguf     (gguf)  loads with from_pretrained(output, gguf_file=...) and llama.cpp
      config.json, model.safetensors, tokenizer files   (int8)  loads with from_pretrained(output)
      export.json            what was written, from what, and the verification's numbers
      .llm-neo               the marker: the command and every file above (what --overwrite replaces)
"""

from __future__ import annotations

import logging
from importlib import metadata
from pathlib import Path
from typing import Any

from llm_neo.choices import EXPORT_FORMATS, EXPORT_SPECS
from llm_neo.errors import ModelError

log = logging.getLogger("llm_neo")

EXPORT_FILE = "export.json"

__all__ = ["EXPORT_FILE", "EXPORT_FORMATS", "export_model", "parse_export_spec"]


def parse_export_spec(spec: str) -> tuple[str, str | None]:
    """``"gguf:q8_0"`` -> ("gguf", "q8_0"); ``"int8"`` -> ("int8", None). Raises ModelError when malformed
    (``distill --export`` takes this form)."""
    if spec not in EXPORT_SPECS:
        raise ModelError(f"export {spec!r}: choose one of {', '.join(EXPORT_SPECS)}")
    fmt, _, kind = spec.partition(":")
    return fmt, kind or None


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for package in ("llm-neo", "torch", "transformers", "gguf", "torchao"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = None
    return out


def export_model(
    model_dir: str | Path,
    fmt: str,
    gguf_type: str | None,
    output: str | Path,
    *,
    gguf_pre: str | None = None,
    overwrite: bool = False,
    name: str | None = None,
) -> dict[str, Any]:
    """Export the HF model directory ``model_dir`` (weights + tokenizer) as ``fmt`` into directory ``output``.

    Args:
        fmt: ``"gguf"`` or ``"int8"``.
        gguf_type: for gguf: ``f32``, ``f16``, ``q8_0`` or ``q4_0`` (None for int8).
        output: the export directory; an existing one is replaced only with ``overwrite``.
        gguf_pre: llama.cpp's pre-tokenizer name, when ``tokenizer.json`` does not make it recognisable.
        name: the GGUF file's stem before its type (``NAME-Q8_0.gguf``); default ``model_dir``'s name.

    Returns:
        The ``export.json`` record (also written into ``output``): ``format``, ``gguf_type``, ``source``,
        ``file`` (gguf) or ``files`` (int8), ``bytes``, what was written, ``verification`` (``passed``
        is always True here: a failed verification raises) and package versions.

    Raises:
        ModelError: unsupported format, type or model family (before any weight loads), an existing
        ``output`` without ``overwrite``, or a verification that failed (with its problems).
    """
    from llm_neo import __version__
    from llm_neo.export.gguf import GGUF_TYPES, check_gguf_family, gguf_metadata, verify_gguf, write_gguf
    from llm_neo.runtime.atomic import atomic_write_json
    from llm_neo.runtime.rundir import marked_directory

    model_dir, output = Path(model_dir), Path(output)
    if fmt not in EXPORT_FORMATS:
        raise ModelError(f"export format {fmt!r} is not one of {', '.join(EXPORT_FORMATS)}")
    if fmt == "gguf" and gguf_type not in GGUF_TYPES:
        raise ModelError(f"--gguf-type {gguf_type!r} is not one of {', '.join(GGUF_TYPES)}")
    if fmt == "int8" and gguf_type is not None:
        raise ModelError("--gguf-type applies to --format gguf only")
    if not (model_dir / "config.json").is_file():
        raise ModelError(f"{model_dir} is not a Hugging Face model directory (no config.json)")
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise ModelError(f"{output} already exists and is not empty; pass --overwrite to replace it")
    if output.resolve() == model_dir.resolve():
        raise ModelError("--output must differ from --model")
    if fmt == "gguf":
        check_gguf_family(model_dir)  # before any weight loads

    record: dict[str, Any] = {
        "llm_neo_version": __version__,
        "format": fmt,
        "gguf_type": gguf_type,
        "source": str(model_dir.resolve()),
    }
    with marked_directory(output, "export") as tmp:
        if fmt == "gguf":
            assert gguf_type is not None
            file = f"{name or model_dir.name}-{gguf_type.upper()}.gguf"
            written = write_gguf(model_dir, tmp / file, gguf_type, pre_tokenizer=gguf_pre, progress=True)
            verification = verify_gguf(model_dir, tmp, file, gguf_type)
            record |= {
                "file": file,
                "bytes": written.pop("bytes"),
                "written": written,
                "metadata": gguf_metadata(tmp / file),
                "verification": verification,
                "load_with": f"AutoModelForCausalLM.from_pretrained('{output}', gguf_file='{file}')",
            }
        else:
            from llm_neo.export.int8 import export_int8

            result = export_int8(model_dir, tmp)
            verification = result.pop("verification")
            record |= {
                "files": sorted(p.name for p in tmp.iterdir()),
                "bytes": result.pop("bytes"),
                "written": result,
                "verification": verification,
                "load_with": f"AutoModelForCausalLM.from_pretrained('{output}')  # needs torchao",
            }
        record["versions"] = _versions()
        if not verification["passed"]:
            raise ModelError(
                f"the {fmt} export of {model_dir} failed its verification (nothing was written to {output}): "
                + "; ".join(verification["problems"])
            )
        atomic_write_json(tmp / EXPORT_FILE, record)
    log.info("export: %s written to %s (%.1f MiB), verified", fmt, output, record["bytes"] / 2**20)
    return record
