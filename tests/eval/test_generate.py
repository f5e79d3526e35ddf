"""Greedy generation: the prompt is the training rendering, answers stop at the end of turn, batching
does not change them."""

from __future__ import annotations

import pytest
import torch

from llm_neo.demo.task import SKILLS, generate_task, task_corpus
from llm_neo.eval.generate import greedy_answers, greedy_generations, prompt_and_stop
from llm_neo.eval.scoring import parse_score, score_answers
from llm_neo.models.tiny import SPECIAL_TOKENS, build_llama, build_tokenizer


@pytest.fixture(scope="module")
def char_tokenizer():
    return build_tokenizer(task_corpus(), vocab_size=256 + len(SPECIAL_TOKENS))


def test_prompt_is_the_training_rendering_up_to_the_response(char_tokenizer):
    record = {"instruction": "Add 1 and 2.", "input": "", "output": "3", "skill": "add"}
    prompt, stop = prompt_and_stop(record, char_tokenizer)
    assert prompt == char_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Add 1 and 2."}], tokenize=False, add_generation_prompt=True
    )
    assert stop == "<|end|>"


class _Scripted(torch.nn.Module):
    """A fake causal LM whose greedy continuation of every prompt is a fixed script of token ids."""

    def __init__(self, tokenizer, replies: dict[str, str]):
        super().__init__()
        self.tokenizer = tokenizer
        self.replies = {
            tuple(tokenizer(prompt, add_special_tokens=False)["input_ids"]): tokenizer(
                reply, add_special_tokens=False
            )["input_ids"]
            for prompt, reply in replies.items()
        }
        self.training = False

    def generate(self, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id, **_):
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist(), strict=True):
            prompt = tuple(t for t, m in zip(ids, mask, strict=True) if m)
            reply = self.replies[prompt][:max_new_tokens]
            rows.append(ids + reply + [pad_token_id] * (max_new_tokens - len(reply)))
        return torch.tensor(rows)


def test_greedy_answers_cut_at_end_of_turn_and_score(char_tokenizer):
    records = [
        {"instruction": "Add 47 and 85.", "input": "", "output": "132", "skill": "add"},
        {"instruction": "Reverse: abc", "input": "", "output": "cba", "skill": "reverse"},
        {"instruction": "Capital of Peru?", "input": "", "output": "Lima", "skill": "capital"},
    ]
    prompts = [prompt_and_stop(r, char_tokenizer)[0] for r in records]
    # Right, wrong, and right but followed by junk after the end-of-turn token (which must be cut).
    fake = _Scripted(
        char_tokenizer, dict(zip(prompts, ["132<|end|>", "cab<|end|>", "Lima<|end|>xyz"], strict=True))
    )
    answers = greedy_answers(
        fake, char_tokenizer, records, device=torch.device("cpu"), batch_size=2, progress=False
    )
    assert answers == ["132", "cab", "Lima"]
    scored = score_answers(records, answers, parse_score("exact"), category_field="skill", order=SKILLS)
    assert scored["per_category"] == {"add": 1.0, "capital": 1.0, "reverse": 0.0}


def test_an_answer_that_reaches_the_token_limit_never_stopped(char_tokenizer):
    records = [
        {"instruction": "Add 47 and 85.", "input": "", "output": "132"},
        {"instruction": "Capital of Peru?", "input": "", "output": "Lima"},
        {"instruction": "Reverse: abc", "input": "", "output": "cba"},
    ]
    prompts = [prompt_and_stop(r, char_tokenizer)[0] for r in records]
    # Stops in time; runs on past the limit; ends exactly at the limit with no end-of-turn token.
    replies = ["132<|end|>", "Lima Lima Lima Lima", "cba!"]
    fake = _Scripted(char_tokenizer, dict(zip(prompts, replies, strict=True)))
    answers, stopped = greedy_generations(
        fake, char_tokenizer, records, device=torch.device("cpu"), max_new_tokens=4, progress=False
    )
    assert answers == ["132", "Lima", "cba!"]
    assert stopped == [True, False, False]


def test_greedy_answers_of_a_real_model_are_batch_independent(char_tokenizer):
    # Left padding must not change a greedy generation: batched answers equal one-at-a-time answers.
    _, heldout = generate_task(0, train_per_skill=5, heldout_per_skill=3)
    model = build_llama(len(char_tokenizer), hidden_size=32, num_layers=2, seed=0)
    cpu = torch.device("cpu")
    batched = greedy_answers(
        model, char_tokenizer, heldout, device=cpu, batch_size=len(heldout), progress=False
    )
    single = greedy_answers(model, char_tokenizer, heldout, device=cpu, batch_size=1, progress=False)
    assert batched == single


def test_a_prompt_only_record_is_asked_as_the_users_instruction(char_tokenizer):
    alpaca = {"instruction": "Capital of Peru?", "input": "", "output": "Lima"}
    assert prompt_and_stop({"prompt": "Capital of Peru?"}, char_tokenizer) == prompt_and_stop(
        alpaca, char_tokenizer
    )
    plain = build_tokenizer(task_corpus(), vocab_size=256 + len(SPECIAL_TOKENS), chat_template=None)
    prompt, stop = prompt_and_stop({"prompt": "Capital of Peru?"}, plain)
    assert prompt.startswith("<s>Below is an instruction") and prompt.endswith("### Response:\n")
    assert stop == "</s>"  # without a chat template the response ends at eos


def test_prompt_only_answers_need_max_new_tokens(char_tokenizer):
    records = [{"prompt": "Capital of Peru?"}]
    prompt = prompt_and_stop(records[0], char_tokenizer)[0]
    fake = _Scripted(char_tokenizer, {prompt: "Lima<|end|>xyz"})
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_answers(fake, char_tokenizer, records, device=cpu, progress=False)
    assert greedy_answers(fake, char_tokenizer, records, device=cpu, max_new_tokens=8, progress=False) == [
        "Lima"
    ]


def test_a_base_models_answer_ends_at_end_at_and_keeps_its_spaces(char_tokenizer):
    # A base model's one-line answer: cut at the newline, its leading space kept (prompt + answer is the
    # text it wrote); stopped when end_at or eos came within the limit.
    records = [
        {"prompt": "Capital of Peru?", "completion": "?"},
        {"prompt": "Reverse: abc", "completion": "?"},
        {"prompt": "Add 47 and 85.", "completion": "?"},
    ]
    prompts = [prompt_and_stop(r, char_tokenizer)[0] for r in records]
    replies = [" Lima\nxyz", "  cba cba", " 132</s>"]
    fake = _Scripted(char_tokenizer, dict(zip(prompts, replies, strict=True)))
    cpu = torch.device("cpu")
    answers, stopped = greedy_generations(
        fake, char_tokenizer, records, device=cpu, max_new_tokens=8, progress=False, end_at="\n"
    )
    assert answers == [" Lima", "  cba cb", " 132"]
    assert stopped == [True, False, True]
    plain, _ = greedy_generations(fake, char_tokenizer, records, device=cpu, max_new_tokens=8, progress=False)
    assert plain == ["Lima\nxy", "cba cb", "132"]  # without end_at: stripped, cut at the limit
