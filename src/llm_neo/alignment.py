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
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from llm_neo.data import Example, detect_format, render_segments
from llm_neo.errors import DataError
from llm_neo.losses.divergences import TopKTargets
from llm_neo.losses.objective import IGNORE_INDEX
from llm_neo.records.pair import PAIR_VERSION, PairReport, TokenizerSide

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
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(
            f"{where}: aligning tokens by characters needs a fast (Rust) tokenizer's offsets; got "
            f"{type(tokenizer).__name__}. Load it with AutoTokenizer(..., use_fast=True)."
        )
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
    s = encode_side(record, student, max_length=max_length, where=f"{where} (the student's rendering)")
    t = encode_side(record, teacher, max_length=max_length, where=f"{where} (the teacher's rendering)")
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
    train_on_prompt: bool = False,
) -> list[Aligned]:
    """The alignment of every example ``data.tokenize_records`` made from ``records`` (in its order: a
    record without a trained token made none). DataError if the student's tokens differ from the
    examples' (they were tokenized with other options)."""
    out: list[Aligned] = []
    for k, record in enumerate(records, start=1):
        side, aligned = align_record(
            record, student, teacher, max_length=max_length, where=f"{source} record {k}"
        )
        # as tokenize_records drops it: no trained token (with train_on_prompt: no token at all)
        if (not side.ids) if train_on_prompt else all(label == IGNORE_INDEX for label in side.labels):
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


# --------------------------------------------------------------------------------------------------
# Batches and teacher targets


@dataclass(frozen=True)
class CrossPair:
    """What a cross-tokenizer run knows of its pair, built once (``cross_pair``)."""

    method: str  # one of CROSS_TOKENIZER_METHODS
    to_student: torch.Tensor  # [V_t] int64: teacher id -> student id of the same text, -1 for none
    teacher_vocab: int  # the teacher tokenizer's length: logit columns past it are padding
    student_vocab: int
    teacher_pad_id: int
    top_k: int  # teacher tokens kept per aligned position (at most both vocabularies)

    @property
    def mapped(self) -> int:
        return int((self.to_student >= 0).sum())


def cross_pair(
    method: str, student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase, *, top_k: int
) -> CrossPair:
    """The pair's vocabulary map and sizes for ``method``."""
    to_student = torch.tensor(vocab_map(token_texts(teacher), token_texts(student)), dtype=torch.long)
    pad = teacher.pad_token_id if teacher.pad_token_id is not None else teacher.eos_token_id
    return CrossPair(
        method=method,
        to_student=to_student,
        teacher_vocab=len(teacher),
        student_vocab=len(student),
        teacher_pad_id=int(pad if pad is not None else 0),
        top_k=max(1, min(top_k, len(teacher), len(student))),
    )


def collate_aligned(
    examples: Sequence[Example], aligned: Sequence[Aligned], pair: CrossPair
) -> dict[str, torch.Tensor]:
    """The teacher's side of a student batch (``data.collate`` of ``examples``) and where it aligns.

    teacher_input_ids, teacher_attention_mask  [B, T_t], right-padded like the student's
    xt_rows     [M] the aligned rows among the student's trained rows (row-major ``targets != -100``)
    xt_teacher  [M] the aligned teacher positions, flat in [B * T_t]
    xt_t_eot, xt_s_eot  [M] the teacher's / student's end-of-turn token id at an end-of-turn row, else -1

    ``shared-vocab`` keeps the exactly aligned rows, ``uld`` every boundary-aligned one.
    """
    width = max(len(a.teacher_ids) for a in aligned)
    ids = torch.full((len(aligned), width), pair.teacher_pad_id, dtype=torch.long)
    mask = torch.zeros((len(aligned), width), dtype=torch.long)
    rows: list[int] = []
    flat: list[int] = []
    t_eot: list[int] = []
    s_eot: list[int] = []
    first_row = 0  # this example's first row among the batch's trained rows
    for b, (ex, al) in enumerate(zip(examples, aligned, strict=True)):
        ids[b, : len(al.teacher_ids)] = torch.tensor(al.teacher_ids, dtype=torch.long)
        mask[b, : len(al.teacher_ids)] = 1
        # trained rows: positions j whose target labels[j + 1] is trained; rank[j] counts those before j
        trained = [label != IGNORE_INDEX for label in ex.labels[1:]]
        rank = [0] * len(ex.labels)
        for j in range(1, len(ex.labels)):
            rank[j] = rank[j - 1] + int(trained[j - 1])
        for j, n, exact, eot in zip(al.student_rows, al.teacher_rows, al.exact, al.end_of_turn, strict=True):
            if pair.method == "shared-vocab" and not exact:
                continue
            rows.append(first_row + rank[j])
            flat.append(b * width + n)
            t_eot.append(al.teacher_ids[n + 1] if eot else -1)
            s_eot.append(ex.input_ids[j + 1] if eot else -1)
        first_row += sum(trained)
    as_long = functools.partial(torch.tensor, dtype=torch.long)
    return {
        "teacher_input_ids": ids,
        "teacher_attention_mask": mask,
        "xt_rows": as_long(rows),
        "xt_teacher": as_long(flat),
        "xt_t_eot": as_long(t_eot),
        "xt_s_eot": as_long(s_eot),
    }


@torch.no_grad()
def aligned_targets(
    logits_of: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    pair: CrossPair,
    t_eot: torch.Tensor,
    s_eot: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
) -> TopKTargets:
    """The teacher's top-k + tail at the aligned positions, chunk by chunk (no [M, V_t] logits).

    ``hidden [M, H_t]`` the teacher's final hidden states there, ``logits_of`` its lm_head (soft-capping
    included). ``uld``: the plain top-k in the teacher's ids (ULD ignores them). ``shared-vocab``: the
    top-k among the teacher tokens that have a student token of the same text (and, at an end-of-turn
    row, the teacher's end marker, which stands for the student's), their ids mapped into the student's
    vocabulary; everything else, the unmapped tokens' mass included, is the tail bucket. fp32 (fp64 in).
    """
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    to_student = pair.to_student.to(hidden.device)
    k = pair.top_k if pair.method == "uld" else min(pair.top_k, max(pair.mapped, 1))
    ids_out, lp_out, tails = [], [], []
    for start in range(0, hidden.shape[0], chunk_size):
        stop = min(start + chunk_size, hidden.shape[0])
        # [C, V_t] in the loss dtype, a copy edited in place (logits_of may hand back a view of its input):
        # the chunk holds this, one mask and one masked copy, never more [C, V_t] tensors.
        log_p = logits_of(hidden[start:stop])[:, : pair.teacher_vocab].to(dtype, copy=True)
        if temperature != 1.0:
            log_p /= temperature
        log_p -= torch.logsumexp(log_p, dim=-1, keepdim=True)
        if pair.method == "uld":
            values, ids = log_p.topk(k, dim=-1)  # [C, k]
        else:
            eot_t, eot_s = t_eot[start:stop].to(hidden.device), s_eot[start:stop].to(hidden.device)
            blocked = (to_student < 0).expand_as(log_p).clone()  # [C, V_t]
            at_eot = eot_t >= 0
            # the student's end marker is the teacher's end marker there, whatever else maps to it
            blocked[at_eot] |= to_student[None, :] == eot_s[at_eot, None]
            blocked[at_eot.nonzero().squeeze(-1), eot_t[at_eot]] = False
            values, ids = log_p.masked_fill(blocked, float("-inf")).topk(k, dim=-1)
            del blocked
        tails.append(torch.logsumexp(log_p.scatter_(-1, ids, float("-inf")), dim=-1))  # [C]
        del log_p  # else it lives on beside the next chunk's logits and their copy
        if pair.method == "shared-vocab":
            mapped = to_student[ids]
            is_eot = (ids == eot_t[:, None]) & (eot_t[:, None] >= 0)
            ids = torch.where(is_eot, eot_s[:, None].expand_as(ids), mapped)
        ids_out.append(ids)
        lp_out.append(values)
    if not ids_out:
        empty = hidden.new_zeros((0, k), dtype=dtype)
        return TopKTargets(torch.zeros((0, k), dtype=torch.long, device=hidden.device), empty, empty[:, 0])
    return TopKTargets(torch.cat(ids_out), torch.cat(lp_out), torch.cat(tails))


def spread_targets(targets: TopKTargets, rows: torch.Tensor, n: int) -> tuple[TopKTargets, torch.Tensor]:
    """Targets at ``rows`` of ``n`` trained rows -> ([n, k] targets, kd_rows [n] bool): the other rows get
    a placeholder (ids 0..k-1, uniform buckets) that the loss never reads (kd_rows excludes them)."""
    k = targets.k
    device = targets.ids.device
    ids = torch.arange(k, device=device).expand(n, k).clone()
    log_probs = torch.full((n, k), -math.log(k + 1), dtype=targets.log_probs.dtype, device=device)
    tail = torch.full((n,), -math.log(k + 1), dtype=targets.tail.dtype, device=device)
    ids[rows], log_probs[rows], tail[rows] = targets.ids.to(ids.dtype), targets.log_probs, targets.tail
    kd_rows = torch.zeros(n, dtype=torch.bool, device=device)
    kd_rows[rows] = True
    return TopKTargets(ids, log_probs, tail), kd_rows


# --------------------------------------------------------------------------------------------------
# The pair report


def same_tokenizer(student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase) -> bool:
    """Both map every id to the same token (what today's exact path needs; padding is in the logits)."""
    return bool(student.get_vocab() == teacher.get_vocab())


def pair_report(
    student: PreTrainedTokenizerBase,
    teacher: PreTrainedTokenizerBase,
    *,
    names: tuple[str, str],
    records: Sequence[dict[str, Any]] | None = None,
    data: str | None = None,
    max_length: int = 2048,
) -> PairReport:
    """The pair report of (student, teacher), named ``names`` = (student, teacher); with ``records``, how
    their responses tokenize on each side and the aligned coverage (records without a response token in
    ``max_length`` are skipped, as distill drops them)."""
    s_texts, t_texts = token_texts(student), token_texts(teacher)
    shared = sum(1 for j in vocab_map(s_texts, t_texts) if j >= 0)
    per_char: dict[str, float | None] = {"student": None, "teacher": None}
    cov: Coverage | None = None
    n = 0
    if records is not None:
        counts = {"student": 0, "teacher": 0}
        found: list[Aligned] = []
        for k, record in enumerate(records, start=1):
            where = f"{data or 'data'} record {k}"
            for role, tok in (("student", student), ("teacher", teacher)):
                placed = encode_side(record, tok, max_length=max_length, where=where)
                counts[role] += sum(1 for key in placed.keys.values() if key[1] != END_OF_TURN)
            found.append(align_record(record, student, teacher, max_length=max_length, where=where)[1])
        cov, n = coverage(found), len(found)
        per_char = {r: c / cov.response_chars if cov.response_chars else None for r, c in counts.items()}

    def describe(tok: PreTrainedTokenizerBase, model: str, role: str) -> TokenizerSide:
        return TokenizerSide(
            model=model,
            vocab_size=len(tok),
            # the named ones (BOS, EOS, pad ...) and every added token (end-of-turn markers and the like)
            special_tokens=list(
                dict.fromkeys(
                    [*map(str, tok.all_special_tokens), *map(str, tok.added_tokens_decoder.values())]
                )
            ),
            chat_template=bool(getattr(tok, "chat_template", None)),
            tokens_per_char=per_char[role],
        )

    return PairReport(
        schema_version=PAIR_VERSION,
        teacher=describe(teacher, names[1], "teacher"),
        student=describe(student, names[0], "student"),
        exact_path=same_tokenizer(student, teacher),
        shared_tokens=shared,
        shared_share=shared / max(len(s_texts), 1),
        data=data,
        examples=None if cov is None else n,
        response_chars=None if cov is None else cov.response_chars,
        coverage_exact=None if cov is None else cov.share("shared-vocab"),
        coverage_boundary=None if cov is None else cov.share("uld"),
    )
