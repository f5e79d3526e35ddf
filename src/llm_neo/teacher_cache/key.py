"""The cache key: content hashes of everything the stored numbers depend on, and how a mismatch is
reported (each differing part named, with its fix)."""

from __future__ import annotations

import array
import hashlib
import json
import logging
import time
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llm_neo.data import Example
from llm_neo.errors import CacheError
from llm_neo.models.loading import is_gguf, load_config, resolve_gguf
from llm_neo.runtime.integrity import file_sha256
from llm_neo.runtime.memory import GiB

if TYPE_CHECKING:
    from llm_neo.teacher_cache.store import TeacherCache

log = logging.getLogger("llm_neo")

# The key parts, in the order a mismatch is reported (causes before their consequences), each with
# what it is and how to fix a mismatch. ``{cache}`` and ``{run}`` are the two values.
KEY_PARTS: dict[str, tuple[str, str]] = {
    "teacher_weights": (
        "the teacher's weights",
        "the cache was made with another teacher or the weights changed: cache this --teacher again "
        "(llm-neo cache-teacher), or leave --teacher out to train from the cache alone",
    ),
    "teacher_config": (
        "the teacher's config.json",
        "the cache was made with another teacher: cache this --teacher again, or leave --teacher out",
    ),
    "teacher_quant": (
        "--teacher-quant",
        "the cache's targets come from a teacher quantized as {cache}: run with the cache's "
        "--teacher-quant (and backend), or cache the teacher again with this run's",
    ),
    "tokenizer": (
        "the tokenizer",
        "the student's tokenizer is not the one the cache tokenized with: cache again with "
        "llm-neo cache-teacher --tokenizer <student dir>, or use a student with the cached tokenizer",
    ),
    "chat_template": (
        "the chat template",
        "the student's chat template renders the data differently from the cached one: cache again "
        "with llm-neo cache-teacher --tokenizer <student dir>",
    ),
    "data": (
        "the data file",
        "--data is not the data the cache was made from (its bytes differ): cache this data "
        "(llm-neo cache-teacher --data ...), or point --data at the cached file",
    ),
    "max_length": (
        "--max-length",
        "run with --max-length {cache}, or cache again with --max-length {run}",
    ),
    "train_on_prompt": (
        "--train-on-prompt",
        "run with the cache's setting ({cache}), or cache again with this one",
    ),
    "temperature": (
        "--kd-temperature",
        "the cache holds the teacher's log-probs at T = {cache}: run with --kd-temperature {cache}, or "
        "cache again with --kd-temperature {run}",
    ),
    "top_k": ("--top-k", "pass --top-k {cache} to resume the cache in --output, or --overwrite it"),
    "logprob_dtype": (
        "--logprob-dtype",
        "pass --logprob-dtype {cache} to resume the cache in --output, or --overwrite it",
    ),
    "shard_size": (
        "--shard-size",
        "pass --shard-size {cache} to resume the cache in --output, or --overwrite it",
    ),
    "student_weights": (
        "the student whose samples the cache holds (--student-samples)",
        "the cache in --output holds another student's samples: choose another --output, or pass "
        "--overwrite to cache this student's",
    ),
    "sampling": (
        "how the student's responses were drawn (--samples-per-prompt, --sample-*)",
        "run with the cache's sampling options ({cache}) to resume it, or --overwrite it",
    ),
    "cross_tokenizer": (
        "--cross-tokenizer",
        "the cache holds targets aligned for --cross-tokenizer {cache}: run with it, or cache again with "
        "llm-neo cache-teacher --cross-tokenizer {run}",
    ),
    "teacher_tokenizer": (
        "the teacher's tokenizer (--cross-tokenizer)",
        "the cache was aligned with another teacher tokenizer: cache this --teacher again",
    ),
    "teacher_chat_template": (
        "the teacher's chat template (--cross-tokenizer)",
        "the teacher renders the data differently from the cached alignment: cache this --teacher again",
    ),
    "tokens": (
        "the tokenized examples",
        "the examples tokenize differently although the parts above match (another llm-neo version "
        "renders records differently?): cache the teacher again",
    ),
}


def _sha256_files(files: Iterable[Path], root: Path) -> str:
    """One sha256 over (relative name, size, bytes) of each file, in name order, streamed in 16 MiB blocks."""
    digest = hashlib.sha256()
    for path in sorted(files, key=lambda f: f.relative_to(root).as_posix()):
        stat = path.stat()
        digest.update(f"{path.relative_to(root).as_posix()}\0{stat.st_size}\0".encode())
        digest.update(_file_digest(str(path), stat.st_size, stat.st_mtime_ns).encode())
    return "sha256:" + digest.hexdigest()


@lru_cache(maxsize=256)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    # Memoised on (path, size, mtime): a sweep checks the same teacher's weights once, not per trial.
    return file_sha256(Path(path))


def _sha256_text(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def model_dir(path: str) -> Path:
    """The local directory of a model given as a dir or a hub id (the hub's local snapshot)."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.bin", "*.pt"]))
    except Exception as err:  # the hub raises many kinds; all mean "cannot get the files"
        raise CacheError(f"cannot find the files of model {path!r} to hash them: {err}") from err


def hash_teacher_weights(path: str, *, allow_pickle_weights: bool = False, role: str = "teacher") -> str:
    """sha256 over the teacher's weight files (safetensors; pickle files only when allowed and alone;
    the .gguf file of a GGUF teacher)."""
    directory, gguf_file = resolve_gguf(path)
    if gguf_file is not None:
        root = Path(directory)
        return _sha256_files([root / gguf_file], root)
    root = model_dir(path)
    files = sorted(root.glob("*.safetensors"))
    if not files and allow_pickle_weights:
        files = sorted([*root.glob("*.bin"), *root.glob("*.pt")])
    if not files:
        raise CacheError(f"{root}: no weight files to hash (expected *.safetensors)")
    started = time.perf_counter()
    digest = _sha256_files(files, root)
    size = sum(f.stat().st_size for f in files)
    log.info("hashed the %s's weights: %.2f GiB in %.1f s", role, size / GiB, time.perf_counter() - started)
    return digest


def hash_model_config(path: str) -> str:
    """sha256 of config.json as canonical JSON, without the fields a mere re-save changes (of the config
    read from the metadata of a GGUF teacher)."""
    if is_gguf(path):
        data = load_config(path).to_dict()
        return _sha256_text(
            json.dumps({k: v for k, v in data.items() if k != "transformers_version"}, sort_keys=True)
        )
    file = model_dir(path) / "config.json"
    if not file.is_file():
        raise CacheError(f"{file} does not exist: cannot identify the teacher")
    data = json.loads(file.read_text())
    for volatile in ("transformers_version", "_name_or_path"):
        data.pop(volatile, None)
    return _sha256_text(json.dumps(data, sort_keys=True))


def hash_tokenizer(tokenizer: Any) -> str:
    """sha256 of the fast tokenizer's full definition plus the special tokens templates render."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise CacheError(f"{type(tokenizer).__name__} is not a fast tokenizer: cannot identify it")
    special = {name: getattr(tokenizer, name, None) for name in ("bos_token", "eos_token", "unk_token")}
    return _sha256_text(backend.to_str() + "\0" + json.dumps(special, sort_keys=True))


def hash_chat_template(tokenizer: Any) -> str:
    template = getattr(tokenizer, "chat_template", None)
    text = template if isinstance(template, str) else json.dumps(template, sort_keys=True) if template else ""
    return _sha256_text(text)


def hash_data(path: str) -> str:
    """sha256 of the data file's bytes (of every file, for a datasets save_to_disk directory)."""
    root = Path(path).expanduser()
    if root.is_dir():
        return _sha256_files([f for f in root.rglob("*") if f.is_file()], root)
    stat = root.stat()  # the bytes only: the same data under another name or path is the same data
    return "sha256:" + _file_digest(str(root), stat.st_size, stat.st_mtime_ns)


def hash_examples(examples: Sequence[Example]) -> str:
    """sha256 of the tokenized examples: what the cache rows are aligned with."""
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(len(ex.input_ids).to_bytes(8, "little"))
        digest.update(array.array("q", ex.input_ids).tobytes())
        digest.update(array.array("q", ex.labels).tobytes())
    return "sha256:" + digest.hexdigest()


# Parts a key holds only when they differ from their default, so caches written before the part existed
# keep their digest (an unquantized teacher's cache is the same cache as before).
KEY_DEFAULTS: dict[str, Any] = {"teacher_quant": "none"}


def teacher_quant_key(config: Any) -> str:
    """``"none"``, or the teacher's quantization and the backend that did it (``int8/torchao``): the two
    int8 backends give different teachers."""
    from llm_neo.models.quant import resolve_teacher_backend

    kind = getattr(config, "teacher_quant", "none")
    if kind == "none":
        return "none"
    return f"{kind}/{resolve_teacher_backend(kind, config.teacher_quant_backend)}"


def run_key(config: Any, *, tokenizer: Any, examples: Sequence[Example]) -> dict[str, Any]:
    """The key parts of a run (or a cache) from its config: ``llm-neo distill``'s and ``cache-teacher``'s
    configs share the fields read here (data, max_length, train_on_prompt, kd_temperature, teacher,
    allow_pickle_weights). The teacher's parts only when the config names a teacher."""
    teacher = config.teacher
    key: dict[str, Any] = {}
    if teacher:
        pickle_ok = config.allow_pickle_weights
        key["teacher_weights"] = hash_teacher_weights(teacher, allow_pickle_weights=pickle_ok)
        key["teacher_config"] = hash_model_config(teacher)
    if teacher_quant_key(config) != KEY_DEFAULTS["teacher_quant"]:
        key["teacher_quant"] = teacher_quant_key(config)
    key |= {
        "tokenizer": hash_tokenizer(tokenizer),
        "chat_template": hash_chat_template(tokenizer),
        "data": hash_data(config.data),
        "max_length": int(config.max_length),
        "train_on_prompt": bool(config.train_on_prompt),
        "temperature": float(config.kd_temperature),  # the part keeps its name: older caches match
        "tokens": hash_examples(examples),
    }
    return key


def samples_key(config: Any) -> dict[str, Any]:
    """The key parts of a cache of student samples (cache-teacher --student-samples): the student's
    weights and the sampling options as given (``sample_max_new_tokens`` None: the longest response),
    which ``distill`` checks against its own before anything loads (config.cached_sampling)."""
    weights = hash_teacher_weights(
        config.student_samples, allow_pickle_weights=config.allow_pickle_weights, role="student"
    )
    return {
        "student_weights": weights,
        "sampling": {
            "samples_per_prompt": int(config.samples_per_prompt),
            "sample_temperature": float(config.sample_temperature),
            "sample_top_p": float(config.sample_top_p),
            "sample_max_new_tokens": config.sample_max_new_tokens,
        },
    }


def cross_key(method: str, teacher_tokenizer: Any) -> dict[str, Any]:
    """The key parts a cross-tokenizer cache adds (cache-teacher --cross-tokenizer): the method and the
    teacher's tokenizer and chat template, which decide its tokens and so the alignment (the student's
    are the ``tokenizer`` and ``chat_template`` parts, as in any cache)."""
    return {
        "cross_tokenizer": method,
        "teacher_tokenizer": hash_tokenizer(teacher_tokenizer),
        "teacher_chat_template": hash_chat_template(teacher_tokenizer),
    }


def key_digest(key: dict[str, Any]) -> str:
    return _sha256_text(json.dumps(key, sort_keys=True))


def key_differences(cache_key: dict[str, Any], run: dict[str, Any]) -> list[str]:
    """One line per key part of ``run`` that differs from the cache's: what it is, both values, the fix."""
    lines = []
    for part, (what, fix) in KEY_PARTS.items():
        if part in KEY_DEFAULTS:
            cached, now = cache_key.get(part, KEY_DEFAULTS[part]), run.get(part, KEY_DEFAULTS[part])
        elif part not in run:
            continue  # a part this run cannot check (the teacher's, when only the cache is given)
        else:
            cached, now = cache_key.get(part), run[part]
        if cached == now:
            continue
        shown = [
            str(v)[:19] + "…" if isinstance(v, str) and v.startswith("sha256:") else v for v in (cached, now)
        ]
        lines.append(
            f"{part} ({what}) differs: cache {shown[0]}, this run {shown[1]}; "
            + fix.format(cache=cached, run=now)
        )
    return lines


def check_key(cache: TeacherCache, run: dict[str, Any]) -> None:
    """Raise CacheError naming every key part in which ``run`` differs from the cache."""
    lines = key_differences(cache.manifest["key"], run)
    if lines:
        body = "\n".join(f"  - {line}" for line in lines)
        raise CacheError(f"teacher cache {cache.path} does not match this run:\n{body}")
