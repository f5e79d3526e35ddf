"""`llm-neo plan --gpu`: the teacher cache's ranks (replicated, FSDP2-sharded) and its time, against hand
arithmetic, and the command's output, JSON and refusals."""

from __future__ import annotations

import itertools
import json

import pytest

from llm_neo.cli import main
from llm_neo.commands.cost import GPUS, Gpu
from llm_neo.commands.plan import GiB, ModelDims, PlanConfig, estimate_cache, model_dims, plan_cache
from llm_neo.commands.shapes import get_shape
from llm_neo.errors import ConfigError

# Round numbers, so every term below is checkable by hand.
TEACHER = ModelDims(
    parameters=1_000_000_000,
    linear_weights=900_000_000,
    hidden_size=1000,
    intermediate_size=4000,
    num_layers=10,
    num_heads=8,
    kv_dim=1000,
    vocab_size=10_000,
    lora_parameters=0,
    lora_linears_per_layer=0,
    block_linear_weights=800_000_000,
    block_linear_rows=1,
)
CARD = Gpu("test card", memory_gib=1.0, bf16_tflops=100.0, device_names=())


def _estimate(capacity: int, **kw):
    options = {"batch_size": 1, "seq_len": 100, "compute_bytes": 2, "utilization": 0.5, "chunk_size": 1024}
    return estimate_cache(TEACHER, CARD, capacity=capacity, **(options | kw))


def test_ranks_to_hold_the_teacher_by_hand():
    est = _estimate(1_000_000_000, tokens=1_000_000_000)
    # bf16 weights 2e9 bytes; the lm_head kept whole by every rank 2·10,000·1,000 = 2e7; two gathered
    # blocks 2·2·8e8/10 = 3.2e8. The forward of 100 tokens: a block's 2·100·(4·1000 + 2·1000 + 3·4000)
    # = 3.6e6, the lm_head chunk's 100·10,000·(2 + 12) + the hidden states 2·100·1000 = 1.42e7: the larger.
    assert est.weights == 2_000_000_000 and est.activations == 14_200_000
    assert est.replicated == 2_014_200_000 and est.ranks_replicated is None  # 2 GB > 1 GB: no card holds it
    # Sharded: (2e9 - 2e7) / W + 2e7 + 3.2e8 + 1.42e7 <= 1e9  =>  W >= 1.98e9 / 6.458e8 = 3.07  =>  4.
    assert est.ranks_sharded == 4
    assert est.sharded == 1_980_000_000 // 4 + 20_000_000 + 320_000_000 + 14_200_000 <= 1_000_000_000
    three = 1_980_000_000 // 3 + 20_000_000 + 320_000_000 + 14_200_000
    assert three > 1_000_000_000  # one rank fewer would not hold it
    # Time: 2·1e9 FLOP per token at 50% of 100 TFLOP/s = 4e-5 s; 1e9 tokens on the 4 ranks: 1e4 s.
    assert est.flops_per_token == 2_000_000_000
    assert est.seconds_per_token == pytest.approx(4e-5)
    assert est.ranks == 4 and est.seconds == pytest.approx(10_000)


def test_a_teacher_that_fits_one_card_is_timed_on_one():
    est = _estimate(3_000_000_000, tokens=1_000_000)
    assert est.ranks_replicated == 1 and est.ranks == 1
    assert est.ranks_sharded == 2  # sharding is still possible (2 ranks at least)
    assert est.seconds == pytest.approx(1_000_000 * 4e-5)


def test_nothing_holds_it_when_the_whole_parts_alone_exceed_a_card():
    est = _estimate(300_000_000, tokens=1000)  # < the lm_head + two gathered blocks + the forward
    assert est.ranks_replicated is None and est.ranks_sharded is None
    assert est.ranks is None and est.seconds is None and est.sharded is None


def test_more_memory_never_needs_more_ranks():
    ranks = [_estimate(int(gb * 1e9)).ranks_sharded for gb in (0.5, 0.7, 1.0, 1.5, 2.0, 4.0)]
    assert all(a >= b for a, b in itertools.pairwise(ranks)) and ranks[0] > ranks[-1]


def test_plan_cache_reads_the_card_and_the_shape():
    config = PlanConfig(shape="llama3-8b-to-1b", gpu="h100", cache_tokens="2B", utilization=0.5)
    est = plan_cache(config)
    assert est is not None
    teacher = model_dims(get_shape("llama3-8b-to-1b").teacher)
    assert est.capacity == int(GPUS["h100"].memory_gib * GiB) and est.compute_bytes == 2
    assert est.weights == 2 * teacher.parameters and est.ranks_replicated == 1
    assert est.tokens == 2_000_000_000
    assert est.seconds == pytest.approx(2e9 * 2 * teacher.parameters / (989e12 * 0.5))
    assert plan_cache(PlanConfig(shape="llama3-8b-to-1b")) is None  # no --gpu: no cache estimate


def test_the_command_prints_and_writes_the_cache_estimate(tmp_path, capsys):
    out = tmp_path / "plan.json"
    argv = ["plan", "--shape", "llama3-8b-to-1b", "--gpu", "a100-40gb", "--device-memory-gb", "12",
            "--cache-tokens", "50M", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "teacher cache (cache-teacher) on a100-40gb (12.0 GiB per card)" in text
    assert (
        "does not fit one card; shard it" in text and "FSDP2-sharded (--teacher-shard fsdp): 2 ranks" in text
    )
    assert "at 40% of 312 TFLOP/s" in text and "50,000,000 tokens:" in text and "an estimate" in text
    cache = json.loads(out.read_text())["teacher_cache"]
    assert cache["ranks_sharded"] == 2 and cache["ranks_replicated"] is None and cache["ranks"] == 2


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["--cache-tokens", "5M"], "--cache-tokens needs --gpu"),
        (["--gpu", "h100", "--cache-tokens", "lots"], "--cache-tokens: 'lots' is not a token count"),
        (["--gpu", "h100", "--utilization", "0"], "--utilization: 0.0 is out of range"),
    ],
)
def test_bad_cache_options_are_refused_by_name(argv, said, capsys):
    assert main(["plan", "--shape", "llama3-8b-to-1b", *argv]) == 2
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err


def test_an_unknown_card_in_a_config_is_refused_with_the_choices():
    with pytest.raises(ConfigError, match="--gpu: 'tpu' is not one of h100, h200"):
        plan_cache(PlanConfig(shape="llama3-8b-to-1b", gpu="tpu"))
