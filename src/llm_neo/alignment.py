"""Cross-tokenizer alignment: which student positions and teacher positions predict the same text.

Each model renders a record with its own chat template (``data.render_segments``); the responses are the
same strings on both sides, so their characters are the common ground. A token's *span* is the character
range of the response it covers (from a fast tokenizer's offsets). Position j predicts token j + 1, so a
student position and a teacher position are

- **boundary-aligned** when their next tokens start at the same response character (both have read the
  same response prefix): what ULD trains;
- **exactly aligned** when their next tokens also end at the same character (the same text is predicted
  next): what ``shared-vocab`` trains, since only there do equal token strings mean equal predictions.

The token that follows a response on each side (the end-of-turn or EOS marker, whatever its text) is
aligned with the other side's explicitly: both mean "the response ends here". Tokens without clean
offsets (byte-fallback pieces sharing one character's span, empty spans) and tokens crossing the
response's end are never exactly aligned. BOS or any other prompt token on one side only changes the
positions, never the alignment: positions are found from characters, not counted.

Coverage: the share of response characters inside an aligned student token (per method), logged by
distill and reported by ``check-pair``.

The vocabulary map of ``shared-vocab`` (``vocab_map``) pairs teacher and student ids whose tokens read as
the same text mid-sequence (decoded after an anchor token, so SentencePiece's "▁" and byte-level BPE's
"Ġ" both read as a space); pieces that decode to no valid text (byte fallback) pair by their raw token
string, special tokens by their content.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llm_neo.data import Example, detect_format, render_segments
from llm_neo.errors import DataError
from llm_neo.losses.objective import IGNORE_INDEX

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# The key of a token's end-of-turn role in ``_Side.keys`` (in place of its response start character).
END_OF_TURN = -1


@dataclass(frozen=True)
class Aligned:
    """One example's alignment: the teacher's own tokens and the positions both models predict alike.

    ``student_rows[a]`` and ``teacher_rows[a]`` are positions (indices into each side's ``input_ids``)
    whose next tokens start at the same response character; ``exact[a]`` when they also end at the same
    one; ``end_of_turn[a]`` when both next tokens are the marker after a response. Sorted by student row.
    """

    teacher_ids: list[int]  # the teacher's rendering of the record, tokenized (truncated to max_length)
    student_rows: list[int]
    teacher_rows: list[int]
    exact: list[bool]
    end_of_turn: list[bool]
    response_chars: int  # characters of the record's responses
    exact_chars: int  # of them, inside an exactly aligned student token
    boundary_chars: int  # of them, inside a boundary-aligned student token (exact ones included)


@dataclass(frozen=True)
class _Side:
    """One model's tokenization of a record: ids, trained labels, and each response token's place."""

    ids: list[int]
    labels: list[int]
    # token index -> (turn, start char in the turn's response or END_OF_TURN, end char or -1, clean)
    keys: dict[int, tuple[int, int, int, bool]]
    turn_lengths: list[int]


def responses(record: dict[str, Any]) -> list[str]:
    """The record's trained response texts in order, as the data formats define them (data.py)."""
    fmt = detect_format(record, where="record")
    if fmt == "chat":
        return [m["content"] for m in record["messages"] if m["role"] == "assistant"]
    return [record[{"alpaca": "output", "prompt_completion": "completion", "text": "text"}[fmt]]]


def encode_side(
    record: dict[str, Any], tokenizer: PreTrainedTokenizerBase, *, max_length: int, where: str
) -> _Side:
    """Render and tokenize ``record`` as ``data.tokenize_records`` does (its labels included), and place
    every response token: its turn, its span in the response, whether its offsets are clean."""
    segments = render_segments(record, tokenizer, where=where)
    text = "".join(t for t, _ in segments)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, return_attention_mask=False)
    ids = list(enc["input_ids"])[:max_length]
    offsets = [tuple(o) for o in enc["offset_mapping"]][:max_length]
    starts, flags, pos = [], [], 0
    trained_ranges: list[tuple[int, int]] = []
    for seg, trained in segments:
        starts.append(pos)
        flags.append(trained)
        if trained:
            trained_ranges.append((pos, pos + len(seg)))
        pos += len(seg)
    labels = [
        tok if flags[max(bisect.bisect_right(starts, b) - 1, 0)] else IGNORE_INDEX
        for tok, (b, _e) in zip(ids, offsets, strict=True)
    ]
    turns = _locate_responses(text, trained_ranges, responses(record))
    keys: dict[int, tuple[int, int, int, bool]] = {}
    for turn, (c0, c1, seg_end) in enumerate(turns):
        ended = False
        for m, (b, e) in enumerate(offsets):
            if labels[m] == IGNORE_INDEX:
                continue
            if c0 <= b < c1:
                # Byte pieces of one character share its span: the first one is placed (it starts there)
                # but is never exact; the others start nowhere of their own. An empty span is not clean.
                if m > 0 and offsets[m - 1] == (b, e):
                    continue
                shared = m + 1 < len(offsets) and offsets[m + 1] == (b, e)
                keys[m] = (turn, b - c0, min(e, seg_end) - c0, e > b and not shared and e <= c1)
            elif c1 <= b < seg_end and not ended:
                keys[m] = (turn, END_OF_TURN, -1, True)
                ended = True
    return _Side(ids, labels, keys, [c1 - c0 for c0, c1, _ in turns])


def _locate_responses(
    text: str, trained: list[tuple[int, int]], texts: list[str]
) -> list[tuple[int, int, int]]:
    """(start, end, end of its trained segment) of each response inside the trained segments, in order;
    a response the template changed (not found verbatim) is left out: it aligns nothing."""
    found: list[tuple[int, int, int]] = []
    seg = 0
    for response in texts:
        for s in range(seg, len(trained)):
            a, b = trained[s]
            at = text.find(response, a, b) if response else -1
            if at >= 0:
                found.append((at, at + len(response), b))
                seg = s + 1
                break
    return found


def align_record(
    record: dict[str, Any],
    student: PreTrainedTokenizerBase,
    teacher: PreTrainedTokenizerBase,
    *,
    max_length: int,
    where: str = "record",
) -> tuple[_Side, Aligned]:
    """The student's tokenization of ``record`` and its alignment with the teacher's (see the module)."""
    s = encode_side(record, student, max_length=max_length, where=where)
    t = encode_side(record, teacher, max_length=max_length, where=where)
    teacher_at = {(k[0], k[1]): (m, k[2], k[3]) for m, k in t.keys.items() if m >= 1}
    rows: list[tuple[int, int, bool, bool]] = []
    exact_chars = boundary_chars = 0
    for m, (turn, start, end, clean) in sorted(s.keys.items()):
        if m < 1 or (turn, start) not in teacher_at:
            continue
        n, t_end, t_clean = teacher_at[(turn, start)]
        eot = start == END_OF_TURN
        exact = eot or (clean and t_clean and end == t_end)
        rows.append((m - 1, n - 1, exact, eot))
        if not eot:
            span = max(0, min(end, s.turn_lengths[turn]) - start)
            boundary_chars += span
            exact_chars += span if exact else 0
    aligned = Aligned(
        teacher_ids=t.ids,
        student_rows=[r[0] for r in rows],
        teacher_rows=[r[1] for r in rows],
        exact=[r[2] for r in rows],
        end_of_turn=[r[3] for r in rows],
        response_chars=sum(len(r) for r in responses(record)),
        exact_chars=exact_chars,
        boundary_chars=boundary_chars,
    )
    return s, aligned


def align_examples(
    records: Sequence[dict[str, Any]],
    examples: Sequence[Example],
    student: PreTrainedTokenizerBase,
    teacher: PreTrainedTokenizerBase,
    *,
    max_length: int,
    source: str = "data",
) -> list[Aligned]:
    """The alignment of every example ``data.tokenize_records`` made from ``records`` (in its order: a
    record without a trained token made none). DataError if the student's tokens differ from the
    examples' (they were tokenized with other options)."""
    out: list[Aligned] = []
    for k, record in enumerate(records, start=1):
        side, aligned = align_record(
            record, student, teacher, max_length=max_length, where=f"{source} record {k}"
        )
        if all(label == IGNORE_INDEX for label in side.labels):
            continue
        if len(out) >= len(examples) or examples[len(out)].input_ids != side.ids:
            raise DataError(
                f"{source} record {k}: its student tokens differ from the training example's; align the "
                "examples tokenized from these records with the same --max-length"
            )
        out.append(aligned)
    if len(out) != len(examples):
        raise DataError(
            f"{source}: {len(examples)} training examples but {len(out)} records with a trained token; "
            "align the examples tokenized from these records with the same --max-length"
        )
    return out


@dataclass(frozen=True)
class Coverage:
    """Response characters and those covered by aligned positions, summed over examples."""

    response_chars: int
    exact_chars: int
    boundary_chars: int

    def share(self, method: str) -> float:
        """The covered share for ``method``: exact positions for shared-vocab, boundary ones for uld."""
        covered = self.exact_chars if method == "shared-vocab" else self.boundary_chars
        return covered / self.response_chars if self.response_chars else 0.0


def coverage(aligned: Sequence[Aligned]) -> Coverage:
    return Coverage(
        response_chars=sum(a.response_chars for a in aligned),
        exact_chars=sum(a.exact_chars for a in aligned),
        boundary_chars=sum(a.boundary_chars for a in aligned),
    )


# --------------------------------------------------------------------------------------------------
# The vocabulary map (shared-vocab)


def token_texts(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """What each id reads as mid-sequence, the key two vocabularies are matched on.

    A token's text is decoded after an anchor token and the anchor's own text removed, so a leading
    space marker ("▁", "Ġ") reads as a space whatever the tokenizer's convention, and a SentencePiece
    decoder cannot strip it as a sequence's first space. Special and added tokens read as their content
    (prefixed by NUL: they never equal plain text); pieces that decode to no valid text (a byte-fallback
    or a lone byte of a multi-byte character) read as their raw token string, likewise prefixed.
    """
    size = len(tokenizer)
    raw = tokenizer.convert_ids_to_tokens(list(range(size)))
    added = {i: str(t) for i, t in tokenizer.added_tokens_decoder.items()}
    anchor = _anchor_id(tokenizer)
    head = str(tokenizer.decode([anchor], skip_special_tokens=False, clean_up_tokenization_spaces=False))
    decoded = tokenizer.batch_decode(
        [[anchor, i] for i in range(size)], skip_special_tokens=False, clean_up_tokenization_spaces=False
    )
    out: list[str] = []
    for i in range(size):
        if i in added:
            out.append("\x00" + added[i])
        elif decoded[i].startswith(head) and "\ufffd" not in decoded[i]:
            out.append(decoded[i][len(head) :])
        else:
            out.append("\x00" + str(raw[i]))
    return out


def _anchor_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """A plain one-letter token to decode others after."""
    for text in ("a", "x", "0"):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) == 1:
            return int(ids[0])
    raise DataError("the tokenizer encodes none of 'a', 'x', '0' as one token; cannot read its vocabulary")


def vocab_map(teacher: Sequence[str], student: Sequence[str]) -> list[int]:
    """teacher id -> the student id whose text (``token_texts``) is the same, or -1; one-to-one (the
    first id of a text on each side takes it)."""
    student_id: dict[str, int] = {}
    for i, text in enumerate(student):
        student_id.setdefault(text, i)
    out, taken = [], set()
    for text in teacher:
        j = student_id.get(text, -1)
        if j in taken:
            j = -1
        taken.add(j)
        out.append(j)
    return out
