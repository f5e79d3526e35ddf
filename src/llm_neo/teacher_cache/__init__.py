"""Teacher once, students many: a content-addressed cache of the teacher's top-k next-token log-probs.

Most of a distillation step is the teacher's forward pass, and a study trains many students on one
teacher (arms, seeds, ranks, learning rates). ``llm-neo cache-teacher`` runs the teacher once over the
data and stores what a student's KD term needs; ``llm-neo distill --teacher-cache CACHE`` then trains
without loading the teacher at all.

What is stored, for every trained position of every example (the positions ``distill`` trains: the
shifted next-token targets of the response, or of everything with ``--train-on-prompt``):

    ids        [P, k] int32   the teacher's k most probable tokens, most probable first
    log_probs  [P, k] fp16    their log-probabilities at the cache's temperature T (computed in fp32:
                              ``log_softmax(logits[:, :V] / T)``, V = the tokenizer length)
    tail       [P]    fp16    log of the mass outside the top-k (a logsumexp of the other columns;
                              -inf when k == V)
    offsets    [n+1]  int64   example i of the shard owns rows offsets[i]:offsets[i+1]

in shards of ``--shard-size`` examples (``shard-00000.safetensors``, ...), in the order of the tokenized
examples, which is the order ``distill`` builds them in (its held-out split keeps that order, so each
example maps to its cache row by its index). About k·(4 + 2) + 2 bytes per trained token: 386 at
k = 64. ``--logprob-dtype float32`` doubles the log-prob bytes for exact values.

Content addressing. ``manifest.json`` records a key, one entry per input that changes the stored
numbers or their alignment with the examples:

    teacher_weights   sha256 of the teacher's weight files (streamed: ~1-2 GB/s, 10-20 s for 16 GB)
    teacher_config    sha256 of its config.json (canonical JSON, without transformers_version)
    tokenizer         sha256 of the tokenizer (vocabulary, merges, normalisation, special tokens)
    chat_template     sha256 of the chat template (none: the hash of an empty string)
    data              sha256 of the data file's bytes (every file, for a datasets directory)
    max_length, train_on_prompt, temperature    the values
    tokens            sha256 of the tokenized examples (input ids and trained positions): catches
                      anything else that changes them, such as another llm-neo rendering of records

``distill --teacher-cache`` recomputes every part it can (the teacher's only when ``--teacher`` is
also given) and refuses a cache that differs, naming each part that differs and how to fix it.

Writing is atomic and resumable: the key goes to ``key.json`` first, each shard is written under a
temporary name and renamed, and ``manifest.json`` comes last. Running the same command again after a
kill skips the complete shards (checked against the key) and computes the rest; the result is
byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import array
import hashlib
import itertools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import save as save_safetensors
from tqdm.auto import tqdm

from llm_neo import __version__
from llm_neo.config import ConfigError, _check_data_path, _check_model_path, _help
from llm_neo.data import Example, collate
from llm_neo.losses import IGNORE_INDEX, TopKTargets, next_token_targets, topk_divergence
from llm_neo.runtime.atomic import atomic_write_json

log = logging.getLogger("llm_neo")

FORMAT = "llm-neo-teacher-cache"
VERSION = 1
MANIFEST = "manifest.json"
KEY_FILE = "key.json"
LOGPROB_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

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
        "--temperature",
        "the cache holds the teacher's log-probs at T = {cache}: run with --temperature {cache}, or "
        "cache again with --temperature {run}",
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
    "tokens": (
        "the tokenized examples",
        "the examples tokenize differently although the parts above match (another llm-neo version "
        "renders records differently?): cache the teacher again",
    ),
}


class CacheError(ValueError):
    """A teacher cache that is missing, incomplete, damaged, or made for another run."""


# ------------------------------------------------------------------------------------------------
# Configuration (`llm-neo cache-teacher`)


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
    if c.logprob_dtype not in LOGPROB_DTYPES:
        p.append(f"--logprob-dtype: {c.logprob_dtype!r} is not one of {', '.join(LOGPROB_DTYPES)}")
    if p:
        raise ConfigError(p)


# ------------------------------------------------------------------------------------------------
# The key: content hashes of everything the stored numbers depend on


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
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(16 * 2**20):
            digest.update(block)
    return digest.hexdigest()


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


def hash_teacher_weights(path: str, *, allow_pickle_weights: bool = False) -> str:
    """sha256 over the teacher's weight files (safetensors; pickle files only when allowed and alone)."""
    root = model_dir(path)
    files = sorted(root.glob("*.safetensors"))
    if not files and allow_pickle_weights:
        files = sorted([*root.glob("*.bin"), *root.glob("*.pt")])
    if not files:
        raise CacheError(f"{root}: no weight files to hash (expected *.safetensors)")
    started = time.perf_counter()
    digest = _sha256_files(files, root)
    size = sum(f.stat().st_size for f in files)
    log.info("hashed the teacher's weights: %.2f GB in %.1f s", size / 1e9, time.perf_counter() - started)
    return digest


def hash_model_config(path: str) -> str:
    """sha256 of config.json as canonical JSON, without the fields a mere re-save changes."""
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


def run_key(config: Any, *, tokenizer: Any, examples: Sequence[Example]) -> dict[str, Any]:
    """The key parts of a run (or a cache) from its config: ``llm-neo distill``'s and ``cache-teacher``'s
    configs share the fields read here (data, max_length, train_on_prompt, temperature, teacher,
    allow_pickle_weights). The teacher's parts only when the config names a teacher."""
    teacher = config.teacher
    key: dict[str, Any] = {}
    if teacher:
        pickle_ok = config.allow_pickle_weights
        key["teacher_weights"] = hash_teacher_weights(teacher, allow_pickle_weights=pickle_ok)
        key["teacher_config"] = hash_model_config(teacher)
    key |= {
        "tokenizer": hash_tokenizer(tokenizer),
        "chat_template": hash_chat_template(tokenizer),
        "data": hash_data(config.data),
        "max_length": int(config.max_length),
        "train_on_prompt": bool(config.train_on_prompt),
        "temperature": float(config.temperature),
        "tokens": hash_examples(examples),
    }
    return key


def key_digest(key: dict[str, Any]) -> str:
    return _sha256_text(json.dumps(key, sort_keys=True))


def key_differences(cache_key: dict[str, Any], run: dict[str, Any]) -> list[str]:
    """One line per key part of ``run`` that differs from the cache's: what it is, both values, the fix."""
    lines = []
    for part, (what, fix) in KEY_PARTS.items():
        if part not in run or cache_key.get(part) == run[part]:
            continue
        cached, now = cache_key.get(part), run[part]
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


# ------------------------------------------------------------------------------------------------
# Reading


@dataclass
class TeacherCache:
    """An opened, complete cache. ``targets(rows)`` reads the cached targets of examples ``rows``."""

    path: Path
    manifest: dict[str, Any]
    _handles: dict[int, Any] = field(default_factory=dict, repr=False)
    _offsets: dict[int, list[int]] = field(default_factory=dict, repr=False)

    @property
    def top_k(self) -> int:
        return int(self.manifest["top_k"])

    @property
    def temperature(self) -> float:
        return float(self.manifest["key"]["temperature"])

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @property
    def num_examples(self) -> int:
        return int(self.manifest["num_examples"])

    def _shard(self, index: int) -> tuple[Any, list[int]]:
        if index not in self._handles:
            if len(self._handles) >= 32:  # bound the open files; shards are read roughly in bursts
                oldest = next(iter(self._handles))
                del self._handles[oldest], self._offsets[oldest]
            file = self.path / self.manifest["shards"][index]["file"]
            handle = safe_open(str(file), framework="pt")
            self._handles[index] = handle
            self._offsets[index] = handle.get_tensor("offsets").tolist()
        return self._handles[index], self._offsets[index]

    def example_targets(self, row: int) -> TopKTargets:
        """The cached targets of example ``row``: [P_row, k] ids and log-probs, [P_row] tails."""
        if not 0 <= row < self.num_examples:
            raise IndexError(f"example {row} is not in the cache ({self.num_examples} examples)")
        shard_size = int(self.manifest["shard_size"])
        handle, offsets = self._shard(row // shard_size)
        i = row % shard_size
        a, b = offsets[i], offsets[i + 1]
        return TopKTargets(
            handle.get_slice("ids")[a:b],
            handle.get_slice("log_probs")[a:b],
            handle.get_slice("tail")[a:b],
        )

    def targets(self, rows: Sequence[int]) -> TopKTargets:
        """The targets of examples ``rows``, concatenated in that order: the order of ``targets[trained]``
        of a batch collated from those examples (row-major over [B, T])."""
        parts = [self.example_targets(r) for r in rows]
        return TopKTargets(
            torch.cat([p.ids for p in parts]),
            torch.cat([p.log_probs for p in parts]),
            torch.cat([p.tail for p in parts]),
        )


def open_cache(path: str | Path) -> TeacherCache:
    """Open a complete cache; CacheError if it is missing, incomplete or of another format."""
    root = Path(path).expanduser()
    manifest_file = root / MANIFEST
    if not manifest_file.is_file():
        hint = (
            "it is incomplete (no manifest.json yet): run the same llm-neo cache-teacher command again "
            "to finish it"
            if (root / KEY_FILE).is_file()
            else "create it with llm-neo cache-teacher --teacher T --data D --output CACHE"
        )
        raise CacheError(f"--teacher-cache {root}: not a teacher cache; {hint}")
    manifest = json.loads(manifest_file.read_text())
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CacheError(
            f"{manifest_file}: format {manifest.get('format')!r} version {manifest.get('version')!r}, "
            f"expected {FORMAT!r} version {VERSION}: cache the teacher again with this llm-neo"
        )
    missing = [s["file"] for s in manifest["shards"] if not (root / s["file"]).is_file()]
    if missing:
        raise CacheError(f"{root}: shard files missing ({', '.join(missing[:3])}): cache the teacher again")
    return TeacherCache(path=root, manifest=manifest)


def read_manifest_temperature(path: str | Path) -> float | None:
    """The cache's temperature, or None when ``path`` holds no readable manifest (cheap; for validation)."""
    try:
        return float(json.loads((Path(path).expanduser() / MANIFEST).read_text())["key"]["temperature"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def batch_targets(cache: TeacherCache, rows: Sequence[int]) -> dict[str, torch.Tensor]:
    """The cached targets of a collated batch, as extra entries of its dict (see ``unpack_targets``)."""
    t = cache.targets(rows)
    return {"teacher_ids": t.ids, "teacher_log_probs": t.log_probs, "teacher_tail": t.tail}


def unpack_targets(batch: dict[str, torch.Tensor], device: torch.device) -> TopKTargets | None:
    if "teacher_ids" not in batch:
        return None
    return TopKTargets(
        batch["teacher_ids"].to(device),
        batch["teacher_log_probs"].to(device),
        batch["teacher_tail"].to(device),
    )


# ------------------------------------------------------------------------------------------------
# Writing


def teacher_topk(
    teacher: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    *,
    vocab_size: int,
    top_k: int,
    temperature: float,
    device: torch.device,
    dtype: torch.dtype,
    chunk_size: int = 1024,
) -> TopKTargets:
    """The teacher's top-k targets at the trained positions of a collated batch (row-major), in fp32.

    The lm_head runs chunk by chunk of tokens, so no [tokens, V] logits exist for the batch.
    """
    from llm_neo.eval.metrics import final_hidden_states, model_logits
    from llm_neo.models.loading import autocast

    input_ids = batch["input_ids"].to(device)
    attention_mask = batch["attention_mask"].to(device)
    trained = next_token_targets(batch["labels"]).to(device) != IGNORE_INDEX  # [B, T]
    ids, log_probs, tails = [], [], []
    with torch.inference_mode():
        with autocast(device, dtype):
            hidden = final_hidden_states(teacher, input_ids, attention_mask)[trained]  # [N, H]
        for start in range(0, hidden.shape[0], chunk_size):
            with autocast(device, dtype):
                logits = model_logits(teacher, hidden[start : start + chunk_size])  # [C, V_t]
            log_p = torch.log_softmax(logits.float()[:, :vocab_size] / temperature, dim=-1)  # [C, V]
            top_values, top_ids = log_p.topk(top_k, dim=-1)  # [C, k], most probable first
            rest = log_p.scatter(-1, top_ids, float("-inf"))  # [C, V]: the columns outside the top-k
            ids.append(top_ids.to(torch.int32))
            log_probs.append(top_values)
            tails.append(torch.logsumexp(rest, dim=-1))  # [C]; -inf when k == V
    if not ids:
        return TopKTargets(torch.zeros(0, top_k, dtype=torch.int32), torch.zeros(0, top_k), torch.zeros(0))
    return TopKTargets(torch.cat(ids).cpu(), torch.cat(log_probs).cpu(), torch.cat(tails).cpu())


def _shard_tensors(
    teacher: torch.nn.Module,
    examples: Sequence[Example],
    *,
    config: CacheTeacherConfig,
    pad_token_id: int,
    vocab_size: int,
    device: torch.device,
    dtype: torch.dtype,
    on_tokens: Callable[[int], None],
) -> dict[str, torch.Tensor]:
    """The tensors of one shard: the examples' targets, concatenated in example order."""
    # Longest first, so a batch pads little; the results go back to example order.
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    per_example: dict[int, TopKTargets] = {}
    for start in range(0, len(order), config.batch_size):
        chosen = order[start : start + config.batch_size]
        batch = collate([examples[i] for i in chosen], pad_token_id)
        targets = teacher_topk(
            teacher,
            batch,
            vocab_size=vocab_size,
            top_k=config.top_k,
            temperature=config.temperature,
            device=device,
            dtype=dtype,
            chunk_size=config.chunk_size,
        )
        counts = (next_token_targets(batch["labels"]) != IGNORE_INDEX).sum(dim=1).tolist()
        row = 0
        for i, count in zip(chosen, counts, strict=True):
            per_example[i] = targets.slice(row, row + count)
            row += count
        on_tokens(row)
    parts = [per_example[i] for i in range(len(examples))]
    lengths = [p.ids.shape[0] for p in parts]
    offsets = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int64)
    store = LOGPROB_DTYPES[config.logprob_dtype]
    return {
        "offsets": offsets,
        "ids": torch.cat([p.ids for p in parts]).contiguous(),
        "log_probs": torch.cat([p.log_probs for p in parts]).to(store).contiguous(),
        "tail": torch.cat([p.tail for p in parts]).to(store).contiguous(),
    }


def _trained_positions(example: Example) -> int:
    """Positions trained in ``example``: those whose next-token target (the label to the right) is kept."""
    return sum(1 for label in example.labels[1:] if label != IGNORE_INDEX)


def _write_bytes_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _shard_metadata(digest: str, first_example: int) -> dict[str, str]:
    # One entry: safetensors writes a metadata map in hash order, so two entries would make the bytes
    # of identical shards differ from run to run.
    return {"llm_neo": json.dumps({"key": digest, "first_example": first_example}, sort_keys=True)}


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def _complete_shard(path: Path, digest: str, first_example: int) -> dict[str, Any] | None:
    """The record of a complete shard written for key ``digest`` from ``first_example`` on, or None
    (then it is recomputed)."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            positions = int(handle.get_slice("ids").get_shape()[0])
    except Exception:  # a damaged file is simply recomputed
        return None
    if meta != _shard_metadata(digest, first_example):
        return None
    data = path.read_bytes()
    return {
        "file": path.name,
        "num_positions": positions,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def _prepare_output(out: Path, key: dict[str, Any], overwrite: bool) -> None:
    """Make ``out`` hold this key: resume a cache of the same key, refuse (or replace) another."""
    key_file = out / KEY_FILE
    if key_file.is_file():
        old = json.loads(key_file.read_text())
        if old == key:
            return
        if not overwrite:
            lines = "\n".join(f"  - {line}" for line in key_differences(old, key))
            raise CacheError(
                f"--output {out} holds a cache made for other inputs:\n{lines}\n"
                "Choose another --output, or pass --overwrite to replace it."
            )
    elif out.exists() and any(out.iterdir()) and not overwrite:
        raise CacheError(
            f"--output {out} already holds files that are not a teacher cache; choose another --output "
            "or pass --overwrite"
        )
    if out.exists():
        for stale in [*out.glob("shard-*.safetensors"), out / MANIFEST, key_file]:
            stale.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(key_file, key)


ShardCallback = Callable[[int, dict[str, Any]], None]


def cache_teacher(config: CacheTeacherConfig, *, on_shard: ShardCallback | None = None) -> dict[str, Any]:
    """Write (or finish) the cache; return its manifest. ``on_shard(index, record)`` after each new shard."""
    from llm_neo.data import check_chat_templates, load_records, tokenize_records
    from llm_neo.models.loading import (
        check_same_vocabulary,
        freeze,
        load_model,
        load_tokenizer,
        logit_width,
        resolve_device,
        resolve_dtype,
    )

    validate_cache_teacher(config)
    started = time.perf_counter()
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    trust = config.trust_remote_code
    tokenizer = load_tokenizer(config.tokenizer or config.teacher, role="tokenizer", trust_remote_code=trust)
    records = load_records(config.data)
    if config.tokenizer:
        teacher_tokenizer = load_tokenizer(config.teacher, role="teacher", trust_remote_code=trust)
        check_same_vocabulary(tokenizer, teacher_tokenizer)
        check_chat_templates(records, tokenizer, teacher_tokenizer, source=config.data)
    vocab_size = len(tokenizer)
    if config.top_k > vocab_size:
        raise ConfigError([f"--top-k: {config.top_k} is larger than the vocabulary ({vocab_size} tokens)"])
    examples, dropped = tokenize_records(
        records,
        tokenizer,
        max_length=config.max_length,
        train_on_prompt=config.train_on_prompt,
        source=config.data,
        progress=True,
    )
    key = run_key(config, tokenizer=tokenizer, examples=examples)
    # The layout is part of what a resumed cache must share with its first half (distill needs any k).
    key |= {"top_k": config.top_k, "logprob_dtype": config.logprob_dtype, "shard_size": config.shard_size}
    digest = key_digest(key)
    out = Path(config.output).expanduser()
    manifest_file = out / MANIFEST
    _prepare_output(out, key, config.overwrite)
    if manifest_file.is_file():
        manifest = json.loads(manifest_file.read_text())
        if manifest.get("key") == key:
            log.info("teacher cache %s is complete and matches; nothing to do", out)
            return dict(manifest)

    num_shards = math.ceil(len(examples) / config.shard_size)
    shard_examples = [
        examples[s * config.shard_size : (s + 1) * config.shard_size] for s in range(num_shards)
    ]
    records_by_shard: dict[int, dict[str, Any]] = {}
    for s in range(num_shards):
        found = _complete_shard(out / _shard_name(s), digest, s * config.shard_size)
        if found is not None:
            records_by_shard[s] = found
    total_positions = sum(_trained_positions(ex) for ex in examples)
    done_positions = sum(r["num_positions"] for r in records_by_shard.values())
    if records_by_shard:
        log.info("resuming: %d of %d shards are complete", len(records_by_shard), num_shards)

    teacher = freeze(
        load_model(
            config.teacher,
            role="teacher",
            dtype=dtype,
            device=device,
            trust_remote_code=trust,
            allow_pickle_weights=config.allow_pickle_weights,
        )
    )
    if logit_width(teacher) < vocab_size:
        raise CacheError(
            f"the teacher has {logit_width(teacher)} logit columns but the tokenizer {vocab_size} tokens"
        )
    written_bytes = sum(r["bytes"] for r in records_by_shard.values())
    new_positions = 0
    loop_start = time.perf_counter()
    bar = tqdm(
        total=total_positions, initial=done_positions, desc="cache-teacher", unit="tok", unit_scale=True
    )

    def on_tokens(n: int) -> None:
        nonlocal new_positions
        new_positions += n
        bar.update(n)

    for s in range(num_shards):
        if s in records_by_shard:
            continue
        tensors = _shard_tensors(
            teacher,
            shard_examples[s],
            config=config,
            pad_token_id=tokenizer.pad_token_id,
            vocab_size=vocab_size,
            device=device,
            dtype=dtype,
            on_tokens=on_tokens,
        )
        data = save_safetensors(tensors, metadata=_shard_metadata(digest, s * config.shard_size))
        _write_bytes_atomic(out / _shard_name(s), data)
        record = {
            "file": _shard_name(s),
            "num_positions": int(tensors["ids"].shape[0]),
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
        records_by_shard[s] = record
        written_bytes += len(data)
        elapsed = time.perf_counter() - loop_start
        bar.set_postfix(
            tok_s=f"{new_positions / max(elapsed, 1e-9):.0f}",
            B_tok=f"{written_bytes / max(bar.n, 1):.0f}",
            refresh=False,
        )
        if on_shard is not None:
            on_shard(s, record)
    bar.close()
    compute_s = time.perf_counter() - loop_start

    shards = [
        {
            **records_by_shard[s],
            "first_example": s * config.shard_size,
            "num_examples": len(shard_examples[s]),
        }
        for s in range(num_shards)
    ]
    total_bytes = sum(s["bytes"] for s in shards)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "key": key,
        "key_digest": digest,
        "top_k": config.top_k,
        "vocab_size": vocab_size,
        "logprob_dtype": config.logprob_dtype,
        "shard_size": config.shard_size,
        "num_examples": len(examples),
        "num_positions": total_positions,
        "dropped_examples": dropped,
        "bytes": total_bytes,
        "bytes_per_token": total_bytes / max(total_positions, 1),
        "shards": shards,
        "sources": {
            "teacher": config.teacher,
            "tokenizer": config.tokenizer or config.teacher,
            "data": config.data,
        },
        "teacher_dtype": str(dtype).removeprefix("torch."),
        "llm_neo_version": __version__,
        "stats": {
            "tokens_per_s": new_positions / max(compute_s, 1e-9),
            "compute_s": compute_s,
            "wall_s": time.perf_counter() - started,
            "positions_computed_now": new_positions,
        },
    }
    atomic_write_json(manifest_file, manifest)  # last: its presence means the cache is complete
    return manifest


def run_cache_teacher(config: CacheTeacherConfig) -> int:
    """`llm-neo cache-teacher`: write the cache and print what it holds."""
    from llm_neo.eval.metrics import format_table

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
    print(
        f"\ntrain from it: llm-neo distill --teacher-cache {config.output} --temperature "
        f"{config.temperature:g} --max-length {config.max_length} --data {config.data} ..."
    )
    return 0


# ------------------------------------------------------------------------------------------------
# Held-out metrics against the cache (when distill has no --teacher to load)


@torch.no_grad()
def cached_heldout_metrics(
    model: torch.nn.Module,
    examples: Sequence[Example],
    rows: Sequence[int],
    cache: TeacherCache,
    *,
    pad_token_id: int,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """``evaluate.heldout_metrics`` with the cached teacher: ce, perplexity, kl_to_teacher, top1_agreement.

    ``kl_to_teacher`` is the forward KL on the cache's k + 1 buckets at the cache's temperature
    (without the T² factor): equal to the dense KL for k == V and T = 1, and a lower bound of it
    otherwise (coarse-graining). ``top1_agreement`` compares with the teacher's argmax, exact (the
    cache's first id). ``rows[i]`` is the cache row of ``examples[i]``.
    """
    from llm_neo.eval.metrics import final_hidden_states, model_logits
    from llm_neo.models.loading import autocast

    was_training = model.training
    model.eval()
    ce_sum = kl_sum = agree = 0.0
    tokens = 0
    width = cache.vocab_size
    temperature = cache.temperature
    for start in range(0, len(examples), batch_size):
        batch = collate(list(examples[start : start + batch_size]), pad_token_id)
        teacher = cache.targets(rows[start : start + batch_size]).to(device)
        targets = next_token_targets(batch["labels"]).to(device)
        trained = targets != IGNORE_INDEX
        with autocast(device, dtype):
            hidden = final_hidden_states(
                model, batch["input_ids"].to(device), batch["attention_mask"].to(device)
            )[trained]  # [N, H]
        if teacher.ids.shape[0] != hidden.shape[0]:
            raise CacheError(f"{cache.path}: cached positions do not match the held-out examples")
        for c in range(0, hidden.shape[0], chunk_size):
            with autocast(device, dtype):
                logits = model_logits(model, hidden[c : c + chunk_size]).float()  # [n, V_s]
            ce_sum += float(
                torch.nn.functional.cross_entropy(
                    logits, targets[trained][c : c + chunk_size], reduction="sum"
                )
            )
            part = teacher.slice(c, c + chunk_size)
            kl = topk_divergence("forward_kl", logits[:, :width], part, temperature=temperature)
            kl_sum += float(kl.sum()) / temperature**2
            agree += float((logits[:, :width].argmax(-1) == part.ids[:, 0].long()).sum())
        tokens += int(trained.sum())
    model.train(was_training)
    if tokens == 0:
        raise ValueError("no trained tokens to evaluate")
    return {
        "ce": ce_sum / tokens,
        "perplexity": math.exp(min(ce_sum / tokens, 700.0)),
        "kl_to_teacher": kl_sum / tokens,
        "top1_agreement": agree / tokens,
        "tokens": tokens,
    }
