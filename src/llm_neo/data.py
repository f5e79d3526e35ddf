"""Records in, token examples out.

The pipeline is: ``load_records`` (a file or a saved dataset → plain dicts) → ``detect_format`` and
``render_segments`` (a dict → the exact text the model sees, cut into trained / untrained spans) →
``tokenize_records`` (text → ``Example`` with labels masked to the trained spans) → ``split_heldout``
and ``collate`` (examples → padded batches).

Labels follow the Hugging Face convention: ``labels[i]`` is aligned with ``input_ids[i]`` (−100 where
not trained), and whoever computes the loss shifts them by one. The same masks select the positions
where the KD divergence is taken, so CE and KD are computed on exactly the same response tokens.

Accepted record formats (checked in this order, the first whose key is present wins):

- ``chat``: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``, at least
  one assistant turn; rendered with the tokenizer's chat template, assistant turns are trained.
- ``alpaca``: ``{"instruction": str, "input": str (optional), "output": str}``; ``output`` is trained.
- ``prompt_completion``: ``{"prompt": str, "completion": str}``; ``completion`` is trained.
- ``text``: ``{"text": str}``; everything is trained (plain language modelling).
"""

from __future__ import annotations

import bisect
import functools
import json
import math
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from llm_neo.config import TokenizeOptions
from llm_neo.errors import DataError
from llm_neo.losses.objective import IGNORE_INDEX

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

FORMATS = ("chat", "alpaca", "prompt_completion", "text")

CHAT_ROLES = ("system", "user", "assistant")

# One line per format, reused in every "what is accepted" message so they never drift apart.
_FORMAT_HELP = (
    'chat: {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}; '
    'alpaca: {"instruction": "...", "input": "..." (optional), "output": "..."}; '
    'prompt_completion: {"prompt": "...", "completion": "..."}; '
    'text: {"text": "..."}'
)

_JSONL_SUFFIXES = (".jsonl", ".ndjson")
_JSON_SUFFIXES = (".json",)
_PARQUET_SUFFIXES = (".parquet", ".pq")
_SUPPORTED_KINDS = (
    ".jsonl (one JSON object per line), .json (an array of objects), .parquet, "
    "or a directory written by datasets' save_to_disk"
)

# The classic Alpaca prompts (Taori et al., 2023), used when the tokenizer has no chat template.
_ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
_ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)

# How many bad records one DataError lists: enough to see a pattern, short enough to read.
_MAX_REPORTED_ERRORS = 10


@dataclass(frozen=True)
class Example:
    """One tokenized training sequence.

    ``labels`` has the length of ``input_ids``; ``labels[i]`` is ``IGNORE_INDEX`` (−100) where the
    token is not trained, else ``input_ids[i]``. Not shifted: the loss shifts.
    """

    input_ids: list[int]
    labels: list[int]
    # Its position among the tokenized examples of its data (records that tokenize to no trained token
    # are dropped and get none): the row of a teacher cache made from the same data.
    index: int = -1

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.labels):
            raise ValueError(
                f"input_ids ({len(self.input_ids)}) and labels ({len(self.labels)}) must have the same length"
            )


# --------------------------------------------------------------------------------------------------
# Loading


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """Read every record of a data file into a list of dicts.

    Accepted: ``.jsonl``/``.ndjson`` (one JSON object per line, blank lines skipped); ``.json`` (a
    JSON array of objects, or an object with exactly one list-valued field such as
    ``{"data": [...]}``, whose list is used); ``.parquet``; a directory written by
    ``datasets.Dataset.save_to_disk`` (a ``DatasetDict`` must have a ``"train"`` split, which is
    used). Records are returned as loaded; their format is checked later by ``detect_format``.

    Raises ``DataError`` for a missing path, an unsupported kind, unparsable content, a record that is
    not an object, or zero records.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory. Check the path to the training data.")
    suffix = path.suffix.lower()
    if path.is_dir():
        records = _load_saved_dataset(path)
    elif suffix in _JSONL_SUFFIXES:
        records = _load_jsonl(path)
    elif suffix in _JSON_SUFFIXES:
        records = _load_json(path)
    elif suffix in _PARQUET_SUFFIXES:
        records = _load_parquet(path)
    else:
        raise DataError(
            f"{path}: unsupported data file kind {suffix or '(no suffix)'!r}. Supported: {_SUPPORTED_KINDS}."
        )
    if not records:
        raise DataError(f"{path} contains no records. Add at least one record ({_FORMAT_HELP}).")
    return records


def read_text(path: Path) -> str:
    """The file's text as UTF-8 (a byte-order mark tolerated); DataError naming the file otherwise."""
    try:
        # utf-8-sig: tolerate the byte-order mark some editors write at the start of the file.
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 ({e}). Re-save the file as UTF-8.") from e


def read_jsonl(path: Path, *, expected: str = _FORMAT_HELP) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for every non-blank line of a JSONL file.

    Raises DataError naming the file and line of invalid JSON or of a line that is not an object
    (``expected`` says what each line should be).
    """
    # Parsed line by line (not with a library reader) so an error can name the exact line.
    rows: list[tuple[int, dict[str, Any]]] = []
    for lineno, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path.name} line {lineno}: invalid JSON ({e}). Fix or remove that line.") from e
        if not isinstance(obj, dict):
            raise DataError(
                f"{path.name} line {lineno}: expected a JSON object, got "
                f"{_json_kind(obj)}. Each line must be one record object ({expected})."
            )
        rows.append((lineno, obj))
    return rows


def _load_jsonl(path: Path) -> list[dict[str, Any]]:
    return [obj for _, obj in read_jsonl(path)]


def _load_json(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path.name} line {e.lineno} column {e.colno}: invalid JSON ({e.msg}). "
            "Fix the file (or write one record per line as .jsonl)."
        ) from e
    if isinstance(data, dict):
        # Many dumps wrap the records, e.g. {"data": [...]}; accept that only when unambiguous.
        lists = [key for key, value in data.items() if isinstance(value, list)]
        if len(lists) != 1:
            raise DataError(
                f"{path.name}: expected a JSON array of records, or an object with exactly one "
                f"list field holding them; found an object with list fields {lists}. "
                "Write the records as a top-level array."
            )
        data = data[lists[0]]
    if not isinstance(data, list):
        raise DataError(f"{path.name}: expected a JSON array of records, got {_json_kind(data)}.")
    for i, obj in enumerate(data, start=1):
        if not isinstance(obj, dict):
            raise DataError(
                f"{path.name} record {i}: expected a JSON object, got {_json_kind(obj)}. "
                f"Each record must be an object ({_FORMAT_HELP})."
            )
    return data


def _load_parquet(path: Path) -> list[dict[str, Any]]:
    # pyarrow directly: datasets.Dataset.from_parquet would also write an Arrow copy to the HF cache.
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(
            f"{path.name}: cannot read as Parquet ({e}). Check the file is a valid Parquet file."
        ) from e
    return [_drop_nulls(r) for r in table.to_pylist()]


def _load_saved_dataset(path: Path) -> list[dict[str, Any]]:
    import datasets

    with _quiet_datasets():
        try:
            loaded = datasets.load_from_disk(str(path))
        except FileNotFoundError as e:
            raise DataError(
                f"{path}: a directory, but not one written by datasets' save_to_disk ({e}). "
                f"Point at a data file instead: {_SUPPORTED_KINDS}."
            ) from e
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise DataError(
                f"{path}: saved DatasetDict has no 'train' split (splits: "
                f"{sorted(loaded)}). Save the training split as 'train', or save a single "
                "Dataset."
            )
        loaded = loaded["train"]
    return [_drop_nulls(r) for r in loaded.to_list()]


def _drop_nulls(record: dict[str, Any]) -> dict[str, Any]:
    # Columnar files store a missing field as null (a table has one schema for all rows), so a
    # null means "absent", exactly as a missing key in JSON would.
    return {k: v for k, v in record.items() if v is not None}


@contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Silence ``datasets`` progress bars for the duration, restoring the caller's setting."""
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def _json_kind(value: object) -> str:
    return {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "null",
    }.get(type(value), type(value).__name__)


# --------------------------------------------------------------------------------------------------
# Formats


def detect_format(record: dict[str, Any], *, where: str) -> str:
    """Return which of ``FORMATS`` ``record`` is, after checking it is well formed.

    The first present key among ``messages``, ``instruction``, ``prompt``, ``text`` decides the
    format; then that format's required fields must be present and be strings (``input`` may be
    missing, null or empty). Raises ``DataError`` naming ``where`` (e.g. ``"train.jsonl record 3"``)
    and the accepted formats otherwise.
    """
    if not isinstance(record, dict):
        raise DataError(
            f"{where}: expected a record object, got {_json_kind(record)}. Accepted formats: {_FORMAT_HELP}."
        )
    if _present(record, "messages"):
        _check_messages(record["messages"], where=where)
        return "chat"
    if _present(record, "instruction"):
        _require_strings(record, ("instruction", "output"), fmt="alpaca", where=where)
        if _present(record, "input") and not isinstance(record["input"], str):
            raise DataError(
                f"{where}: alpaca field 'input' must be a string (or omitted), got "
                f"{_json_kind(record['input'])}."
            )
        return "alpaca"
    if _present(record, "prompt"):
        _require_strings(record, ("prompt", "completion"), fmt="prompt_completion", where=where)
        return "prompt_completion"
    if _present(record, "text"):
        _require_strings(record, ("text",), fmt="text", where=where)
        return "text"
    # Name the near misses: a lone 'output' or 'completion' almost always means a renamed field.
    hint = ""
    if _present(record, "output"):
        hint = " It has 'output' but no 'instruction' (alpaca needs both)."
    elif _present(record, "completion"):
        hint = " It has 'completion' but no 'prompt' (prompt_completion needs both)."
    raise DataError(
        f"{where}: record matches no known format (its fields: {sorted(record)}).{hint} "
        f"Accepted formats: {_FORMAT_HELP}."
    )


def _present(record: dict[str, Any], key: str) -> bool:
    return record.get(key) is not None


def _require_strings(record: dict[str, Any], keys: Sequence[str], *, fmt: str, where: str) -> None:
    for key in keys:
        if not _present(record, key):
            raise DataError(
                f"{where}: {fmt} record is missing field {key!r} (it needs "
                f"{', '.join(repr(k) for k in keys)}). Accepted formats: {_FORMAT_HELP}."
            )
        if not isinstance(record[key], str):
            raise DataError(f"{where}: {fmt} field {key!r} must be a string, got {_json_kind(record[key])}.")


def _check_messages(messages: object, *, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError(
            f'{where}: \'messages\' must be a non-empty list of {{"role": ..., "content": ...}} objects.'
        )
    for j, message in enumerate(messages, start=1):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(
                f"{where}: message {j} must be an object with 'role' and 'content' "
                f"(roles: {', '.join(CHAT_ROLES)})."
            )
        if message["role"] not in CHAT_ROLES:
            raise DataError(
                f"{where}: message {j} has unknown role {message['role']!r}; allowed roles: "
                f"{', '.join(CHAT_ROLES)}."
            )
        if not isinstance(message["content"], str):
            raise DataError(
                f"{where}: message {j} 'content' must be a string, got {_json_kind(message['content'])}."
            )
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(
            f"{where}: chat has no assistant turn, so there is nothing to train on. Add an "
            "assistant message or remove the record."
        )


# --------------------------------------------------------------------------------------------------
# Rendering


def render_segments(
    record: dict[str, Any], tokenizer: PreTrainedTokenizerBase, *, where: str
) -> list[tuple[str, bool]]:
    """Render ``record`` to the text the model sees, as ordered ``(text, trained)`` segments.

    The concatenation of the segment texts is the full rendered text, special tokens written out
    (so it must be tokenized with ``add_special_tokens=False``). Adjacent segments alternate between
    trained and untrained and none is empty. See the module docstring for what each format trains.
    Raises ``DataError`` for a malformed record, a chat record without a chat template on the
    tokenizer, or a chat template whose renderings are not prefix-stable.
    """
    fmt = detect_format(record, where=where)
    bos = tokenizer.bos_token or ""
    eos = tokenizer.eos_token or ""
    if fmt == "chat":
        return _render_chat(record["messages"], tokenizer, where=where)
    if fmt == "alpaca":
        user = record["instruction"]
        if record.get("input"):
            user += "\n\n" + record["input"]
        if _has_chat_template(tokenizer):
            # Same text the chat model would see at inference, so the student learns its own format.
            messages = [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
            return _render_chat(messages, tokenizer, where=where)
        template = _ALPACA_PROMPT_WITH_INPUT if record.get("input") else _ALPACA_PROMPT_NO_INPUT
        prompt = template.format(instruction=record["instruction"], input=record.get("input") or "")
        return _segments([(bos + prompt, False), (record["output"] + eos, True)])
    if fmt == "prompt_completion":
        return _segments([(bos + record["prompt"], False), (record["completion"] + eos, True)])
    return _segments([(bos + record["text"] + eos, True)])


def _has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _render_chat(
    messages: list[dict[str, Any]], tokenizer: PreTrainedTokenizerBase, *, where: str
) -> list[tuple[str, bool]]:
    if not _has_chat_template(tokenizer):
        raise DataError(
            f"{where}: chat records need a tokenizer with a chat template, and this tokenizer "
            "has none. Use an instruct model's tokenizer, set tokenizer.chat_template, or "
            "convert the data to prompt_completion records."
        )
    full = _apply_template(tokenizer, messages, add_generation_prompt=False, where=where)
    # The template is a black box; to find an assistant turn we render the conversation up to it
    # (with the generation prompt, i.e. the assistant header) and up to its end. Both must be
    # string prefixes of the full rendering, which holds for ordinary templates and fails for ones
    # that rewrite history (e.g. drop earlier reasoning), where masking by prefix would be wrong.
    segments: list[tuple[str, bool]] = []
    done = 0  # characters of ``full`` already assigned to segments
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _apply_template(tokenizer, messages[:i], add_generation_prompt=True, where=where)
        turn = (
            full
            if i + 1 == len(messages)
            else _apply_template(tokenizer, messages[: i + 1], add_generation_prompt=False, where=where)
        )
        start, end = len(prompt), len(turn)
        if not (full.startswith(prompt) and full.startswith(turn) and done <= start <= end):
            raise DataError(
                f"{where}: the chat template is not prefix-stable: rendering the conversation "
                f"up to assistant message {i + 1} does not give a prefix of the whole "
                "rendering, so the assistant tokens cannot be located. Use a template whose "
                "renderings extend each other (no history rewriting), or split the "
                "conversation into single-turn records."
            )
        segments += [(full[done:start], False), (full[start:end], True)]
        done = end
    segments.append((full[done:], False))
    return _segments(segments)


def _apply_template(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool,
    where: str,
) -> str:
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as e:  # jinja raises TemplateError, and templates call raise_exception() freely
        raise DataError(
            f"{where}: the chat template failed to render this conversation ({e}). Fix the "
            "messages (e.g. role order the template requires) or the template."
        ) from e
    if not isinstance(text, str):
        raise DataError(f"{where}: the chat template returned {type(text).__name__}, expected text.")
    return text


def _segments(parts: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    """Drop empty segments and merge neighbours with the same flag (the text is unchanged)."""
    merged: list[tuple[str, bool]] = []
    for text, trained in parts:
        if not text:
            continue
        if merged and merged[-1][1] == trained:
            merged[-1] = (merged[-1][0] + text, trained)
        else:
            merged.append((text, trained))
    return merged


# --------------------------------------------------------------------------------------------------
# Tokenizing

_TOKENIZE_CHUNK = 512  # records per batched tokenizer call: amortises the call, keeps progress live


def tokenize_records(
    records: Sequence[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    train_on_prompt: bool = False,
    source: str = "data",
    progress: bool = False,
) -> tuple[list[Example], int]:
    """Render and tokenize ``records``; return ``(examples, n_dropped)``.

    Each record's full text is tokenized once (``add_special_tokens=False``: the rendering already
    holds them) with a fast tokenizer's offsets; a token is trained when its first character lies
    in a trained segment, so a BPE merge across a segment boundary is assigned to one side rather
    than breaking alignment. With ``train_on_prompt`` every token is trained. Sequences keep their
    first ``max_length`` tokens; those left without a trained token are dropped and counted.
    Examples keep the order of their records.

    Raises ``DataError`` (listing every bad record, up to a limit, named as ``"{source} record N"``
    with N 1-based) for malformed records, and when no example is left.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(
            f"{source}: tokenizing needs a fast (Rust) tokenizer for character offsets; got "
            f"{type(tokenizer).__name__}. Load it with AutoTokenizer(..., use_fast=True)."
        )
    if not records:
        raise DataError(f"{source} contains no records.")

    from tqdm.auto import tqdm

    examples: list[Example] = []
    errors: list[str] = []
    n_errors = 0
    dropped = 0
    with tqdm(total=len(records), desc="tokenizing", unit="rec", disable=None if progress else True) as bar:
        for chunk_start in range(0, len(records), _TOKENIZE_CHUNK):
            chunk = records[chunk_start : chunk_start + _TOKENIZE_CHUNK]
            rendered: list[list[tuple[str, bool]]] = []
            for k, record in enumerate(chunk, start=chunk_start + 1):
                try:
                    rendered.append(render_segments(record, tokenizer, where=f"{source} record {k}"))
                except DataError as e:
                    # Keep going: one run should report every bad record, not the first one only.
                    n_errors += 1
                    if len(errors) < _MAX_REPORTED_ERRORS:
                        errors.append(str(e))
            if n_errors:
                bar.update(len(chunk))
                continue
            texts = ["".join(text for text, _ in segments) for segments in rendered]
            encoded = tokenizer(
                texts, add_special_tokens=False, return_offsets_mapping=True, return_attention_mask=False
            )
            for segments, ids, offsets in zip(
                rendered, encoded["input_ids"], encoded["offset_mapping"], strict=True
            ):
                example = _label(
                    segments, ids[:max_length], offsets[:max_length], train_on_prompt, len(examples)
                )
                if example is None:
                    dropped += 1
                else:
                    examples.append(example)
            bar.update(len(chunk))
    if n_errors:
        more = f"\n... and {n_errors - len(errors)} more" if n_errors > len(errors) else ""
        raise DataError(f"{source}: {n_errors} bad record(s):\n" + "\n".join(errors) + more)
    if not examples:
        raise DataError(
            f"{source}: no trainable tokens: all {len(records)} records were dropped because "
            f"no response token fits in the first {max_length} tokens. Raise --max-length "
            "or check the data."
        )
    return examples, dropped


def _label(
    segments: list[tuple[str, bool]],
    ids: list[int],
    offsets: list[tuple[int, int]],
    train_on_prompt: bool,
    index: int,
) -> Example | None:
    """Build the Example for one tokenized record, or None if no token is trained."""
    if train_on_prompt:
        labels = list(ids)
    else:
        # Segment start characters; a token belongs to the segment its first character falls in.
        starts: list[int] = []
        flags: list[bool] = []
        pos = 0
        for text, trained in segments:
            starts.append(pos)
            flags.append(trained)
            pos += len(text)
        labels = [
            tok if flags[max(bisect.bisect_right(starts, begin) - 1, 0)] else IGNORE_INDEX
            for tok, (begin, _end) in zip(ids, offsets, strict=True)
        ]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return Example(input_ids=list(ids), labels=labels, index=index)


# --------------------------------------------------------------------------------------------------
# Splitting and batching


def split_heldout(
    examples: list[Example], eval_fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """Split ``examples`` into ``(train, heldout)``.

    Membership is drawn by a ``random.Random(seed)`` shuffle of the indices (deterministic for a
    seed); both parts keep the input order. ``heldout`` has ``round(eval_fraction * n)`` examples,
    at least 1 when ``eval_fraction > 0`` and ``n >= 2``, and never all of them (training keeps at
    least one). ``eval_fraction == 0`` gives ``(all, [])``. The input list is not modified.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    n = len(examples)
    if eval_fraction == 0.0 or n < 2:
        return list(examples), []
    n_heldout = min(max(round(eval_fraction * n), 1), n - 1)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    heldout_idx = set(order[:n_heldout])
    train = [ex for i, ex in enumerate(examples) if i not in heldout_idx]
    heldout = [ex for i, ex in enumerate(examples) if i in heldout_idx]
    return train, heldout


def micro_batch(examples: list[Example], batch_size: int, seed: int, k: int) -> list[Example]:
    """Micro-batch ``k`` (counted from 0 over the whole run) of ``examples``: epochs of consecutive
    ``batch_size`` slices (the last one shorter) of an order reshuffled each epoch with ``seed + epoch``.

    A pure function of (examples, batch_size, seed, k), so any step's data can be made without the
    steps before it: what lets a resumed run train on exactly what the uninterrupted run would have.
    """
    epoch, j = divmod(k, math.ceil(len(examples) / batch_size))
    order = _epoch_order(len(examples), seed + epoch)
    return [examples[i] for i in order[j * batch_size : (j + 1) * batch_size]]


@functools.lru_cache(maxsize=2)  # the current epoch's order, and the next one's at an epoch boundary
def _epoch_order(n: int, seed: int) -> tuple[int, ...]:
    return tuple(torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist())


def collate(examples: list[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest example.

    Returns ``input_ids`` [B, T], ``attention_mask`` [B, T] (1 real, 0 padding) and ``labels`` [B, T]
    (−100 on padding), all ``torch.long``.
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    width = max(len(ex.input_ids) for ex in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)  # [B, T]
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)  # [B, T]
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)  # [B, T]
    for row, ex in enumerate(examples):
        length = len(ex.input_ids)
        input_ids[row, :length] = torch.tensor(ex.input_ids, dtype=torch.long)
        attention_mask[row, :length] = 1
        labels[row, :length] = torch.tensor(ex.labels, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# --------------------------------------------------------------------------------------------------
# Teacher / student agreement


def check_chat_templates(
    records: Sequence[dict[str, Any]],
    student_tokenizer: PreTrainedTokenizerBase,
    teacher_tokenizer: PreTrainedTokenizerBase,
    *,
    source: str = "data",
    limit: int = 8,
) -> None:
    """Check teacher and student render the first ``limit`` chat-rendered records to the same tokens.

    The KD loss compares the two models position by position on the student's token sequence, which
    is only meaningful when the teacher would have seen the same tokens: a teacher whose template
    differs (other headers, a default system prompt) is scored on text it was never trained on.
    Chat-rendered records are chat records, and alpaca records when the student has a chat template.
    A no-op when there are none. Raises ``DataError`` naming the record and the first differing
    position, or when the teacher tokenizer has no chat template.
    """
    student_chat = _has_chat_template(student_tokenizer)
    checked = 0
    for k, record in enumerate(records, start=1):
        if checked >= limit:
            break
        where = f"{source} record {k}"
        fmt = detect_format(record, where=where)
        if not (fmt == "chat" or (fmt == "alpaca" and student_chat)):
            continue
        checked += 1
        if not _has_chat_template(teacher_tokenizer):
            raise DataError(
                f"{where}: the teacher tokenizer has no chat template, but this {fmt} record is "
                "rendered with the student's. Teacher and student templates must render the "
                "same tokens: give the teacher the student's chat_template (in its "
                "tokenizer_config.json) or use an instruct teacher."
            )
        student_ids = _render_ids(record, student_tokenizer, where=where)
        teacher_ids = _render_ids(record, teacher_tokenizer, where=where)
        if student_ids == teacher_ids:
            continue
        pos = next(
            (i for i, (s, t) in enumerate(zip(student_ids, teacher_ids, strict=False)) if s != t),
            min(len(student_ids), len(teacher_ids)),
        )
        student_tok = _token_at(student_tokenizer, student_ids, pos)
        teacher_tok = _token_at(teacher_tokenizer, teacher_ids, pos)
        raise DataError(
            f"{where}: teacher and student chat templates render different tokens (lengths "
            f"{len(teacher_ids)} vs {len(student_ids)}; first difference at token {pos}: teacher "
            f"{teacher_tok}, student {student_tok}). Teacher and student templates must render "
            "the same tokens, or KD compares predictions for different text: use models of "
            "the same family or give both the same chat_template."
        )


def _render_ids(record: dict[str, Any], tokenizer: PreTrainedTokenizerBase, *, where: str) -> list[int]:
    text = "".join(text for text, _ in render_segments(record, tokenizer, where=where))
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _token_at(tokenizer: PreTrainedTokenizerBase, ids: list[int], pos: int) -> str:
    if pos >= len(ids):
        return "(end of sequence)"
    return f"{ids[pos]} {tokenizer.convert_ids_to_tokens(ids[pos])!r}"


def read_examples(
    path: str,
    tokenizer: PreTrainedTokenizerBase,
    options: TokenizeOptions,
    *,
    teacher_tokenizer: PreTrainedTokenizerBase | None = None,
    progress: bool = False,
) -> tuple[list[dict[str, Any]], list[Example], int]:
    """The records of ``path`` and their examples, tokenized as ``distill`` tokenizes them (with
    ``options``' max length and prompt tokens), and how many records were dropped. With a teacher
    tokenizer, its chat template is first checked to render the same tokens as the student's."""
    records = load_records(path)
    if teacher_tokenizer is not None:
        check_chat_templates(records, tokenizer, teacher_tokenizer, source=path)
    examples, dropped = tokenize_records(
        records,
        tokenizer,
        max_length=options.max_length,
        train_on_prompt=options.train_on_prompt,
        source=path,
        progress=progress,
    )
    return records, examples, dropped
