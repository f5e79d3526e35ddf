"""The cross-tokenizer step run (``--cross-tokenizer`` on a shape whose vocabularies differ): a batch of
text both models read, each in its own tokens, aligned as ``llm-neo distill --cross-tokenizer`` aligns
it, so the step's teacher length, aligned positions and top-k chunks are a real run's.

The student reads ``build_word_tokenizer(V_s)``'s words (``w4`` ... ``w{V_s - 1}``, one token each: the
batch is exactly B × T student tokens); the teacher ``build_split_word_tokenizer(V_t)``, which keeps words
of up to 4 digits whole and splits longer ones (``w12345`` -> ``w1234``, ``5``): words drawn uniformly from
49,152 align exactly about 20% of the time and at their start always, and the teacher reads about 1.8
tokens per student token.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Any

import torch

from llm_neo.commands.bench.runs import RunSpec


@dataclass(frozen=True)
class CrossBatch:
    """One micro-batch of the cross-tokenizer step and what the bench reports of it."""

    batch: dict[str, torch.Tensor]  # data.collate's keys and cross_tokenizer.CROSS_KEYS
    pair: Any  # alignment.CrossPair
    teacher_seq_len: int  # the teacher's longest sequence (its padded width)
    kd_positions: int  # the aligned rows the KD term is taken on (of B·(T − 1))


def distill_top_k() -> int:
    """``distill --cross-tokenizer-top-k``'s default: the teacher tokens a run keeps per aligned position."""
    from llm_neo.config import DistillConfig

    default = next(f.default for f in dataclasses.fields(DistillConfig) if f.name == "cross_tokenizer_top_k")
    assert isinstance(default, int)
    return default


def cross_batch_of(spec: RunSpec, student_vocab: int, teacher_vocab: int) -> CrossBatch:
    """``spec``'s batch of ``batch_size`` text records of exactly ``seq_len`` student tokens (``<s>``,
    words, ``</s>``), seeded, with the teacher's side for ``spec.cross_tokenizer``."""
    from llm_neo.alignment import align_examples, collate_aligned, cross_pair
    from llm_neo.data import collate, tokenize_records
    from llm_neo.models.tiny import (
        WORD_SPECIAL_TOKENS,
        build_split_word_tokenizer,
        build_word_tokenizer,
        word_token,
    )

    assert spec.cross_tokenizer is not None
    student = build_word_tokenizer(student_vocab)
    # the teacher keeps whole the words one digit shorter than the student's longest
    teacher = build_split_word_tokenizer(teacher_vocab, whole_digits=len(str(student_vocab - 1)) - 1)
    rng = random.Random(spec.seed)
    first = len(WORD_SPECIAL_TOKENS)
    records = [
        {"text": " ".join(word_token(rng.randrange(first, student_vocab)) for _ in range(spec.seq_len - 2))}
        for _ in range(spec.batch_size)
    ]
    room = 4 * spec.seq_len  # the teacher's longer reading is never truncated
    examples, dropped = tokenize_records(records, student, max_length=room, source="bench")
    assert not dropped and all(len(ex.input_ids) == spec.seq_len for ex in examples)
    aligned = align_examples(records, examples, student, teacher, max_length=room, source="bench")
    pair = cross_pair(spec.cross_tokenizer, student, teacher, top_k=distill_top_k())
    batch = collate(examples, student.pad_token_id) | collate_aligned(examples, aligned, pair)
    return CrossBatch(
        batch=batch,
        pair=pair,
        teacher_seq_len=int(batch["teacher_input_ids"].shape[1]),
        kd_positions=int(batch["xt_rows"].shape[0]),
    )
