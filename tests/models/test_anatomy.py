"""models.anatomy on every tiny family the test matrix builds: the head it finds is the module whose output
is the logits, a tied head shares the embedding's weight, a PEFT wrapper changes none of it, and the
soft-cap is read where a config sets one."""

from __future__ import annotations

import pytest
import torch

from llm_neo.errors import ModelError
from llm_neo.losses.objective import softcap
from llm_neo.models.anatomy import (
    decoder_blocks,
    final_logit_softcap,
    find_output_head,
    lm_head,
    logit_softcap,
    logit_width,
    num_layers,
    output_head,
)
from llm_neo.models.lora import attach_lora
from llm_neo.models.tiny import FAMILIES, build_family, family_config

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 320


def _head_output(model: torch.nn.Module, head: torch.nn.Module, ids: torch.Tensor) -> tuple:
    """(what ``head`` computed, the model's logits) in one forward."""
    seen: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda module, args, output: seen.append(output))
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits
    finally:
        handle.remove()
    assert len(seen) == 1, "the head runs once per forward"
    return seen[0], logits


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_head_found_is_the_module_whose_output_is_the_logits(family):
    model = build_family(family, VOCAB)
    head = output_head(model)
    ids = torch.randint(3, 300, (2, 12))
    computed, logits = _head_output(model, head, ids)
    torch.testing.assert_close(softcap(computed, logit_softcap(model)), logits, atol=1e-5, rtol=1e-5)
    weight, bias = lm_head(model)
    assert weight is head.weight and bias is getattr(head, "bias", None)
    assert logit_width(model) == logits.shape[-1] == weight.shape[0]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_tied_head_shares_the_embedding_weight_and_an_untied_one_does_not(family):
    model = build_family(family, VOCAB)
    tied = bool(family_config(family, VOCAB).tie_word_embeddings)
    embedding = model.get_input_embeddings().weight
    assert (output_head(model).weight is embedding) == tied
    assert (lm_head(model)[0].data_ptr() == embedding.data_ptr()) == tied


@pytest.mark.parametrize("family", ["llama", "llama-tied", "gpt2", "gemma2"])
def test_a_peft_wrapped_model_gives_the_same_head_blocks_and_softcap(family):
    model = build_family(family, VOCAB)
    head, weight = output_head(model), lm_head(model)[0]
    blocks = decoder_blocks(model)[2]
    cap = logit_softcap(model)
    wrapped = attach_lora(model, r=2)
    assert output_head(wrapped) is head
    assert lm_head(wrapped)[0] is weight
    assert decoder_blocks(wrapped)[2] is blocks
    assert logit_softcap(wrapped) == cap


def test_a_lora_wrapped_head_still_gives_the_base_weight():
    model = build_family("llama", VOCAB)
    weight = lm_head(model)[0]
    wrapped = attach_lora(model, r=2, target_modules=["lm_head"])
    assert output_head(wrapped) is not None and type(output_head(wrapped)) is not torch.nn.Linear
    assert lm_head(wrapped)[0] is weight
    ids = torch.randint(3, 300, (1, 8))
    computed, logits = _head_output(wrapped, output_head(wrapped), ids)
    torch.testing.assert_close(computed, logits)


def test_the_soft_cap_is_read_for_gemma2_like_configs_only():
    assert final_logit_softcap(family_config("gemma2", VOCAB)) == 30.0
    assert logit_softcap(build_family("gemma2", VOCAB)) == 30.0
    for family in ("llama", "gemma3", "gpt2"):
        assert final_logit_softcap(family_config(family, VOCAB)) is None, family
        assert logit_softcap(build_family(family, VOCAB)) is None, family
    assert logit_softcap(None) is None


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_config_declares_as_many_layers_as_the_decoder_holds(family):
    assert num_layers(family_config(family, VOCAB, num_layers=3)) == 3
    assert len(decoder_blocks(build_family(family, VOCAB, num_layers=3))[2]) == 3


def test_a_model_without_a_head_is_refused_by_name():
    plain = torch.nn.Sequential(torch.nn.Linear(4, 4))
    assert find_output_head(plain) is None
    with pytest.raises(ModelError, match="Sequential: get_output_embeddings\\(\\) gives no lm_head"):
        output_head(plain)
