"""Cross-tokenizer alignment on hand-built tokenizers: positions and coverage worked out by hand."""

from __future__ import annotations

import pytest
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from llm_neo.alignment import align_examples, align_record, coverage, token_texts, vocab_map
from llm_neo.data import tokenize_records
from llm_neo.errors import DataError
from llm_neo.models.tiny import build_tokenizer

WORDS = ["Q", ":", "hi", "ok", "a", "x", "0"]


def word_tokenizer(pattern: str, pieces: list[str], **special: str) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``pieces`` that splits text by ``pattern`` (each match one token)."""
    names = list(dict.fromkeys(["<unk>", *special.values()]))
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys([*names, *pieces]))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", **special)


@pytest.fixture(scope="module")
def student_tok() -> PreTrainedTokenizerFast:
    # Words and whole numbers carry their leading space; BOS "<s>", EOS "</s>".
    pieces = [*WORDS, " hi", " 12", " ok", " "]
    return word_tokenizer(r" ?[A-Za-z]+| ?[0-9]+|[^A-Za-z0-9]", pieces, bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def teacher_tok() -> PreTrainedTokenizerFast:
    # Spaces alone, one digit a token; no BOS; an added end-of-turn token as its EOS.
    pieces = [*WORDS, " ", "1", "2"]
    return word_tokenizer(r"[A-Za-z]+|[0-9]| |[^A-Za-z0-9 ]", pieces, eos_token="<|eot|>")


RECORD = {"prompt": "Q:", "completion": "hi 12 ok"}


def test_word_digit_whitespace_splits_bos_on_one_side_and_end_of_turn(student_tok, teacher_tok):
    side, al = align_record(RECORD, student_tok, teacher_tok, max_length=64)
    # student: <s> Q : | hi " 12" " ok" </s>   teacher: Q : | hi " " 1 2 " " ok <|eot|>
    assert side.ids == student_tok.convert_tokens_to_ids(["<s>", "Q", ":", "hi", " 12", " ok", "</s>"])
    assert al.teacher_ids == teacher_tok.convert_tokens_to_ids(
        ["Q", ":", "hi", " ", "1", "2", " ", "ok", "<|eot|>"]
    )
    # Position j predicts token j + 1: "hi" (starts at 0) from student 2 / teacher 1; " 12" and " "
    # both start at 2; " ok" and " " at 5; the two end markers are aligned explicitly.
    assert al.student_rows == [2, 3, 4, 5]
    assert al.teacher_rows == [1, 2, 5, 7]
    assert al.exact == [True, False, False, True]
    assert al.end_of_turn == [False, False, False, True]
    # 8 response characters; "hi" (2) exact, every student token at an aligned boundary (2 + 3 + 3).
    assert (al.response_chars, al.exact_chars, al.boundary_chars) == (8, 2, 8)
    cov = coverage([al, al])
    assert cov.share("shared-vocab") == pytest.approx(0.25) and cov.share("uld") == 1.0


def test_the_other_direction(student_tok, teacher_tok):
    _, al = align_record(RECORD, teacher_tok, student_tok, max_length=64)
    # The teacher-side tokens now train: "hi" exact, " " at 2 and at 5 boundary-aligned, "1", "2", "ok"
    # start where the other side has no token start.
    assert al.student_rows == [1, 2, 5, 7]
    assert al.teacher_rows == [2, 3, 4, 5]
    assert (al.response_chars, al.exact_chars, al.boundary_chars) == (8, 2, 4)


def test_identical_tokenizers_align_every_response_token():
    tok = build_tokenizer()
    record = {"prompt": "Say hi", "completion": "hello there, friend 123"}
    side, al = align_record(record, tok, tok, max_length=64)
    trained = [m - 1 for m, label in enumerate(side.labels) if label != -100]
    assert al.student_rows == al.teacher_rows == trained
    assert all(al.exact) and al.exact_chars == al.response_chars == len(record["completion"])


def test_byte_pieces_of_one_character_are_never_exact():
    tok = build_tokenizer()
    record = {"prompt": "Q", "completion": "caf\u00e9 ok"}  # é is two byte tokens sharing one span
    _, al = align_record(record, tok, tok, max_length=64)
    assert al.response_chars == 7
    assert al.boundary_chars == 7 and al.exact_chars == 6  # é's first piece starts at 3, ends nowhere exact
    assert al.exact.count(False) == 1


def test_truncation_aligns_nothing_past_it(student_tok, teacher_tok):
    _, al = align_record(RECORD, student_tok, teacher_tok, max_length=4)  # <s> Q : hi and Q : hi " "
    assert al.student_rows == [2] and al.teacher_rows == [1]
    assert (al.response_chars, al.exact_chars, al.boundary_chars) == (8, 2, 2)


def test_chat_records_with_different_templates():
    a = build_tokenizer()
    b = build_tokenizer(
        ["the quick brown fox 0 1 2 3 hello there", "Paris France capital"],
        vocab_size=290,
        chat_template=(
            "{% for m in messages %}"
            "{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
        ),
    )
    record = {
        "messages": [
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris"},
            {"role": "user", "content": "And 12 + 3?"},
            {"role": "assistant", "content": "15"},
        ]
    }
    _, al = align_record(record, a, b, max_length=128)
    assert al.response_chars == 7
    assert al.end_of_turn.count(True) == 2  # both turns' end markers
    assert 0 < al.boundary_chars <= 7


def test_align_examples_pairs_records_with_their_examples(student_tok, teacher_tok):
    records = [RECORD, {"prompt": "Q:", "completion": "ok"}]
    examples, _ = tokenize_records(records, student_tok, max_length=64)
    aligned = align_examples(records, examples, student_tok, teacher_tok, max_length=64)
    assert [a.student_rows for a in aligned] == [[2, 3, 4, 5], [2, 3]]
    with pytest.raises(DataError, match="max-length"):
        align_examples(records, examples, student_tok, teacher_tok, max_length=3)


def test_vocab_map_reads_tokens_as_text(student_tok, teacher_tok):
    s, t = token_texts(student_tok), token_texts(teacher_tok)
    mapping = vocab_map(t, s)
    named = {teacher_tok.convert_ids_to_tokens(i): mapping[i] for i in range(len(t))}
    assert named["hi"] == student_tok.convert_tokens_to_ids("hi")
    assert named[" "] == student_tok.convert_tokens_to_ids(" ")
    assert named["1"] == -1 and named["<|eot|>"] == -1  # no "1" in the student; end markers differ
    assert named["<unk>"] == student_tok.convert_tokens_to_ids("<unk>")  # same special content
    assert len({j for j in mapping if j >= 0}) == sum(j >= 0 for j in mapping)  # one-to-one


def test_space_markers_read_alike():
    # A SentencePiece-style "▁" word and a byte-level "Ġ" word are both " hi" mid-sequence.
    from tokenizers import decoders

    sp = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1, "\u2581the": 2}, unk_token="<unk>"))
    sp.pre_tokenizer = pre_tokenizers.Metaspace()
    sp.decoder = decoders.Metaspace()
    sp_tok = PreTrainedTokenizerFast(tokenizer_object=sp, unk_token="<unk>")
    byte_tok = build_tokenizer()
    assert token_texts(sp_tok)[2] == " the"
    mapping = vocab_map(token_texts(sp_tok), token_texts(byte_tok))
    assert byte_tok.convert_ids_to_tokens(mapping[2]) == "\u0120the"  # "Ġthe"


def test_a_teacher_without_a_chat_template_is_named_for_chat_records(student_tok):
    plain = build_tokenizer(chat_template=None)
    record = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "ok"}]}
    with pytest.raises(DataError, match=r"the teacher's rendering.*chat template"):
        align_record(record, build_tokenizer(), plain, max_length=64)
