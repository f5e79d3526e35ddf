"""Data loading, rendering, label masking, splitting and batching (llm_neo.data)."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import ALPACA, write_jsonl

from llm_neo.data import (
    FORMATS,
    Example,
    check_chat_templates,
    collate,
    detect_format,
    load_records,
    micro_batch,
    render_segments,
    split_heldout,
    tokenize_records,
)
from llm_neo.errors import DataError
from llm_neo.models.tiny import CHAT_TEMPLATE, build_tokenizer

CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris"},
        {"role": "user", "content": "Reverse the string abc"},
        {"role": "assistant", "content": "cba"},
    ]
}
PROMPT_COMPLETION = {"prompt": "Sort: 3 1 2 =", "completion": " 1 2 3"}
TEXT = {"text": "the quick brown fox"}
# Every format, with fields missing in some rows: columnar files store those as nulls.
MIXED = [*ALPACA[:3], CHAT, PROMPT_COMPLETION, TEXT]


@pytest.fixture(scope="module")
def plain_tokenizer():
    """The shared tokenizer's vocabulary without a chat template."""
    return build_tokenizer(chat_template=None)


def trained_text(tokenizer, example: Example) -> str:
    pairs = zip(example.input_ids, example.labels, strict=True)
    return tokenizer.decode([t for t, lab in pairs if lab != -100])


def untrained_text(tokenizer, example: Example) -> str:
    pairs = zip(example.input_ids, example.labels, strict=True)
    return tokenizer.decode([t for t, lab in pairs if lab == -100])


def tokenize(records, tokenizer, max_length=256, **kwargs):
    return tokenize_records(records, tokenizer, max_length=max_length, **kwargs)


# ------------------------------------------------------------------------------------------------
# Loading


def write_all_kinds(tmp_path: Path, records: list[dict]) -> dict[str, Path]:
    import datasets

    paths = {"jsonl": write_jsonl(tmp_path / "train.jsonl", records)}
    paths["json"] = tmp_path / "train.json"
    paths["json"].write_text(json.dumps(records, indent=2))
    paths["json_wrapped"] = tmp_path / "wrapped.json"
    paths["json_wrapped"].write_text(json.dumps({"data": records, "version": 1}))
    # Columns are the union of all records' fields, null where a record lacks one (from_pylist and
    # from_list would take the columns from the first record only).
    keys = list(dict.fromkeys(k for r in records for k in r))
    columns = {k: [r.get(k) for r in records] for k in keys}
    paths["parquet"] = tmp_path / "train.parquet"
    pq.write_table(pa.table(columns), paths["parquet"])
    paths["saved"] = tmp_path / "saved"
    datasets.Dataset.from_dict(columns).save_to_disk(str(paths["saved"]))
    paths["saved_dict"] = tmp_path / "saved_dict"
    dataset_dict = datasets.DatasetDict({"train": datasets.Dataset.from_dict(columns)})
    dataset_dict.save_to_disk(str(paths["saved_dict"]))
    return paths


def test_every_kind_loads_the_same_examples(tmp_path, tokenizer):
    paths = write_all_kinds(tmp_path, MIXED)
    reference, dropped = tokenize(load_records(paths["jsonl"]), tokenizer)
    assert dropped == 0 and len(reference) == len(MIXED)
    assert [detect_format(r, where="x") for r in load_records(paths["jsonl"])] == [
        "alpaca",
        "alpaca",
        "alpaca",
        "chat",
        "prompt_completion",
        "text",
    ]
    for kind, path in paths.items():
        records = load_records(path)
        assert len(records) == len(MIXED), kind
        assert tokenize(records, tokenizer)[0] == reference, kind


def test_saved_dataset_dict_without_train_split_lists_splits(tmp_path):
    import datasets

    path = tmp_path / "dd"
    datasets.DatasetDict({"validation": datasets.Dataset.from_list(ALPACA)}).save_to_disk(str(path))
    with pytest.raises(DataError, match=r"no 'train' split.*validation"):
        load_records(path)


def test_directory_that_is_not_a_saved_dataset(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match="save_to_disk"):
        load_records(tmp_path)


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    # Line 2 is blank (skipped but counted), the error is on line 3.
    path.write_text(json.dumps(ALPACA[0]) + "\n\n" + '{"instruction": "x" "output": "y"}\n')
    with pytest.raises(DataError, match=r"train\.jsonl line 3: invalid JSON .*Fix or remove that line"):
        load_records(path)


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(ALPACA[0]) + "\n[1, 2]\n")
    with pytest.raises(DataError, match=r"train\.jsonl line 2: expected a JSON object, got an array"):
        load_records(path)


def test_malformed_json_names_line_and_column(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": }\n]')
    with pytest.raises(DataError, match=r"train\.json line 3 column \d+: invalid JSON"):
        load_records(path)


def test_json_object_with_ambiguous_lists_is_refused(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps({"train": ALPACA, "test": ALPACA}))
    with pytest.raises(DataError, match="exactly one list field"):
        load_records(path)


def test_empty_file_missing_path_unknown_suffix(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match=r"empty\.jsonl contains no records"):
        load_records(empty)
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file"):
        load_records(tmp_path / "nope.jsonl")
    csv = tmp_path / "train.csv"
    csv.write_text("a,b\n")
    with pytest.raises(DataError, match=r"unsupported data file kind '\.csv'.*\.jsonl.*\.parquet.*save_to"):
        load_records(csv)


# ------------------------------------------------------------------------------------------------
# Formats and their errors


@pytest.mark.parametrize(
    ("record", "pattern"),
    [
        ({"instruction": "Add.", "input": "1+1"}, r"alpaca record is missing field 'output'"),
        ({"prompt": "hi"}, r"prompt_completion record is missing field 'completion'"),
        ({"output": "5"}, r"matches no known format.*'output' but no 'instruction'"),
        ({"question": "q", "answer": "a"}, r"matches no known format.*\['answer', 'question'\].*alpaca:"),
        ({"text": 3}, r"field 'text' must be a string, got a number"),
        ({"instruction": "x", "input": ["a"], "output": "y"}, r"'input' must be a string"),
        ({"messages": [{"role": "robot", "content": "x"}]}, r"unknown role 'robot'.*system, user, assistant"),
        ({"messages": [{"role": "user"}]}, r"message 1 must be an object with 'role' and 'content'"),
        ({"messages": [{"role": "user", "content": "hi"}]}, r"no assistant turn"),
        ({"messages": []}, r"non-empty list"),
    ],
)
def test_bad_records_are_named_and_explained(record, pattern):
    with pytest.raises(DataError, match=pattern) as info:
        detect_format(record, where="train.jsonl record 3")
    assert str(info.value).startswith("train.jsonl record 3: ")


def test_detect_format_accepts_all_formats_and_optional_input():
    assert detect_format(CHAT, where="x") == "chat"
    assert detect_format({"instruction": "Say hi.", "output": "hi"}, where="x") == "alpaca"
    assert detect_format({"instruction": "Say hi.", "input": None, "output": "hi"}, where="x") == "alpaca"
    assert detect_format(PROMPT_COMPLETION, where="x") == "prompt_completion"
    assert detect_format(TEXT, where="x") == "text"
    assert FORMATS == ("chat", "alpaca", "prompt_completion", "text")


def test_tokenize_reports_every_bad_record_at_once(tokenizer):
    records = [ALPACA[0], {"prompt": "p"}, ALPACA[1], {"foo": 1}]
    with pytest.raises(DataError, match=r"train\.jsonl: 2 bad record") as info:
        tokenize(records, tokenizer, source="train.jsonl")
    assert "train.jsonl record 2" in str(info.value) and "train.jsonl record 4" in str(info.value)


# ------------------------------------------------------------------------------------------------
# Rendering and labels


def test_alpaca_as_chat_trains_only_the_response(tokenizer):
    (example,), dropped = tokenize([ALPACA[0]], tokenizer)
    assert dropped == 0
    assert trained_text(tokenizer, example) == "5<|end|>"
    assert untrained_text(tokenizer, example) == "<s><|user|>Add the numbers.\n\n2 + 3<|end|><|assistant|>"
    # Trained labels equal the inputs; the trained tokens are a contiguous tail here.
    for tok, lab in zip(example.input_ids, example.labels, strict=True):
        assert lab in (-100, tok)
    first = next(i for i, lab in enumerate(example.labels) if lab != -100)
    assert all(lab != -100 for lab in example.labels[first:])


def test_alpaca_without_input_has_no_blank_input_block(tokenizer):
    (example,), _ = tokenize([ALPACA[2]], tokenizer)
    prompt = "<s><|user|>What is the capital of France?<|end|><|assistant|>"
    assert untrained_text(tokenizer, example) == prompt
    assert trained_text(tokenizer, example) == "Paris<|end|>"


def test_train_on_prompt_trains_everything(tokenizer):
    examples, _ = tokenize(MIXED, tokenizer, train_on_prompt=True)
    for example in examples:
        assert example.labels == example.input_ids


def test_multi_turn_chat_trains_both_assistant_turns(tokenizer):
    segments = render_segments(CHAT, tokenizer, where="x")
    full = tokenizer.apply_chat_template(CHAT["messages"], tokenize=False)
    assert "".join(text for text, _ in segments) == full
    assert [text for text, trained in segments if trained] == ["Paris<|end|>", "cba<|end|>"]
    (example,), _ = tokenize([CHAT], tokenizer)
    assert trained_text(tokenizer, example) == "Paris<|end|>cba<|end|>"
    untrained = untrained_text(tokenizer, example)
    assert "What is the capital" in untrained and "Reverse the string abc" in untrained
    assert "Be brief." in untrained


def test_prompt_completion_and_text(tokenizer):
    (pc, text), _ = tokenize([PROMPT_COMPLETION, TEXT], tokenizer)
    assert untrained_text(tokenizer, pc) == "<s>Sort: 3 1 2 ="
    assert trained_text(tokenizer, pc) == " 1 2 3</s>"
    assert text.labels == text.input_ids
    assert tokenizer.decode(text.input_ids) == "<s>the quick brown fox</s>"


def test_bpe_merge_across_boundary_goes_to_the_side_it_starts_on(tokenizer):
    # "Pa" is one token, but the boundary splits it: it starts in the prompt, so it is not trained.
    record = {"prompt": "Q: P", "completion": "aris."}
    (example,), _ = tokenize([record], tokenizer)
    assert tokenizer.decode(example.input_ids) == "<s>Q: Paris.</s>"
    assert "Pa" in tokenizer.convert_ids_to_tokens(example.input_ids)
    assert trained_text(tokenizer, example) == "ris.</s>"


def test_alpaca_without_chat_template_uses_classic_prompt(plain_tokenizer):
    (with_input, no_input), _ = tokenize([ALPACA[0], ALPACA[2]], plain_tokenizer)
    prompt = untrained_text(plain_tokenizer, with_input)
    assert prompt.startswith("<s>Below is an instruction that describes a task, paired with an input")
    assert prompt.endswith("### Instruction:\nAdd the numbers.\n\n### Input:\n2 + 3\n\n### Response:\n")
    assert trained_text(plain_tokenizer, with_input) == "5</s>"
    assert "### Input:" not in untrained_text(plain_tokenizer, no_input)
    assert trained_text(plain_tokenizer, no_input) == "Paris</s>"


def test_chat_record_needs_a_chat_template(plain_tokenizer):
    with pytest.raises(DataError, match=r"d\.jsonl record 1: chat records need a tokenizer with a chat"):
        tokenize([CHAT], plain_tokenizer, source="d.jsonl")


def test_template_that_is_not_prefix_stable_is_refused():
    # Writes the number of messages first, so a shorter conversation is not a prefix of a longer one.
    tok = build_tokenizer(chat_template="{{ messages | length }}" + CHAT_TEMPLATE)
    with pytest.raises(DataError, match="not prefix-stable"):
        render_segments(CHAT, tok, where="x")


def test_needs_fast_tokenizer():
    with pytest.raises(DataError, match="fast"):
        tokenize_records([TEXT], types.SimpleNamespace(is_fast=False), max_length=8)


# ------------------------------------------------------------------------------------------------
# Truncation and dropping


def test_truncation_and_drop_counting(tokenizer):
    (full,), _ = tokenize([ALPACA[5]], tokenizer)
    n_prompt = next(i for i, lab in enumerate(full.labels) if lab != -100)
    # Room for the prompt and two response tokens: kept, cut to exactly max_length.
    (cut,), dropped = tokenize([ALPACA[5]], tokenizer, max_length=n_prompt + 2)
    assert dropped == 0
    assert cut.input_ids == full.input_ids[: n_prompt + 2] and cut.labels == full.labels[: n_prompt + 2]
    assert sum(lab != -100 for lab in cut.labels) == 2
    # A long prompt that alone fills max_length is dropped; the short record survives and is counted.
    long_prompt = {"instruction": "Say hello. " * 20, "output": "hi"}
    short = {"instruction": ALPACA[5]["instruction"], "output": "hi"}  # the same prompt as above
    examples, dropped = tokenize([long_prompt, short], tokenizer, max_length=n_prompt + 2)
    assert dropped == 1 and len(examples) == 1
    assert all(len(ex.input_ids) <= n_prompt + 2 for ex in examples)


def test_all_dropped_is_an_error(tokenizer):
    with pytest.raises(DataError, match=r"train\.jsonl: no trainable tokens.*--max-length"):
        tokenize(ALPACA, tokenizer, max_length=3, source="train.jsonl")


def test_example_lengths_must_match():
    with pytest.raises(ValueError, match="same length"):
        Example(input_ids=[1, 2], labels=[1])


# ------------------------------------------------------------------------------------------------
# Splitting and collating


def make_examples(n: int) -> list[Example]:
    return [Example(input_ids=[i, i + 1], labels=[-100, i + 1]) for i in range(n)]


@pytest.mark.parametrize(
    ("n", "fraction", "expected"),
    [(100, 0.1, 10), (10, 0.01, 1), (2, 0.9, 1), (1, 0.5, 0), (10, 0.0, 0), (5, 0.5, 2)],
)
def test_split_heldout_sizes(n, fraction, expected):
    examples = make_examples(n)
    train, heldout = split_heldout(examples, fraction, seed=0)
    assert len(heldout) == expected and len(train) == n - expected and len(train) >= 1
    ids = [ex.input_ids[0] for ex in train + heldout]
    assert sorted(ids) == list(range(n))  # disjoint and complete
    # Order within each part follows the input.
    assert [ex.input_ids[0] for ex in train] == sorted(ex.input_ids[0] for ex in train)
    assert [ex.input_ids[0] for ex in heldout] == sorted(ex.input_ids[0] for ex in heldout)


def test_split_heldout_is_deterministic_per_seed():
    examples = make_examples(50)
    original = list(examples)
    a = split_heldout(examples, 0.2, seed=7)
    assert a == split_heldout(examples, 0.2, seed=7)
    assert a[1] != split_heldout(examples, 0.2, seed=8)[1]
    assert examples == original
    with pytest.raises(ValueError):
        split_heldout(examples, 1.0, seed=0)


def test_collate_pads_right_and_masks():
    batch = collate([Example([5, 6, 7], [-100, 6, 7]), Example([8], [8])], pad_token_id=0)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(t.dtype == torch.long and t.shape == (2, 3) for t in batch.values())
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


# ------------------------------------------------------------------------------------------------
# Teacher/student chat templates


def test_check_chat_templates_passes_for_the_same_template(tokenizer):
    check_chat_templates(MIXED, tokenizer, build_tokenizer(), source="train.jsonl")


def test_check_chat_templates_fails_for_a_different_template(tokenizer):
    teacher = build_tokenizer(chat_template=CHAT_TEMPLATE.replace("'<|end|>'", "'<|end|>\\n'"))
    with pytest.raises(
        DataError,
        match=r"train\.jsonl record 1: teacher and student chat templates render "
        r"different tokens.*first difference at token \d+",
    ) as info:
        check_chat_templates(ALPACA, tokenizer, teacher, source="train.jsonl")
    assert "must render the same tokens" in str(info.value)


def test_check_chat_templates_fails_for_a_teacher_without_template(tokenizer, plain_tokenizer):
    with pytest.raises(DataError, match=r"record 4: the teacher tokenizer has no chat template"):
        check_chat_templates([PROMPT_COMPLETION, TEXT, TEXT, CHAT], tokenizer, plain_tokenizer)


def test_check_chat_templates_is_a_noop_without_chat_rendered_records(tokenizer, plain_tokenizer):
    check_chat_templates([PROMPT_COMPLETION, TEXT], tokenizer, plain_tokenizer)
    # Without a student chat template, alpaca uses the classic prompt: nothing to compare.
    check_chat_templates(ALPACA, plain_tokenizer, plain_tokenizer)


def _examples(n: int) -> list[Example]:
    return [Example(input_ids=[i], labels=[i], index=i) for i in range(n)]


@pytest.mark.parametrize(("n", "batch_size"), [(10, 3), (8, 4), (5, 8)])
def test_each_epoch_of_micro_batches_is_the_whole_data_once_reshuffled_by_the_seed(n, batch_size):
    examples, per_epoch = _examples(n), -(-n // batch_size)
    epochs = [
        [
            ex.index
            for k in range(e * per_epoch, (e + 1) * per_epoch)
            for ex in micro_batch(examples, batch_size, 7, k)
        ]
        for e in range(3)
    ]
    assert all(sorted(epoch) == list(range(n)) for epoch in epochs)
    assert all(
        len(micro_batch(examples, batch_size, 7, k)) == min(batch_size, n) for k in range(per_epoch - 1)
    )
    if n > 3:
        assert epochs[0] != epochs[1]  # reshuffled each epoch
        assert epochs[0] != [  # and by the seed
            ex.index for k in range(per_epoch) for ex in micro_batch(examples, batch_size, 8, k)
        ]


def test_a_micro_batch_depends_only_on_its_position_not_on_the_ones_made_before():
    """What resume relies on: step s's data made without steps 0..s-1 is the data they would have led to."""
    examples = _examples(11)
    in_order = [micro_batch(examples, 4, 3, k) for k in range(12)]
    for k in [9, 0, 11, 4, 5, 2]:  # out of order, across epochs, past the cached ones
        assert micro_batch(examples, 4, 3, k) == in_order[k]
