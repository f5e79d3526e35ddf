"""`llm-neo bench --peers trl`: TRL's GKD rows beside the whole runs, the step-1 loss check, the error
without trl. Never asserts speed or memory levels: ratios are figures, not tests."""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest

from llm_neo.commands.bench import BenchConfig, RunSpec, bench, prepare_whole_runs
from llm_neo.commands.bench import peers as peers_module
from llm_neo.commands.bench.peers import LOSS_CHECK_RTOL, run_peers
from llm_neo.commands.bench.runs import validate, with_default_chunk
from llm_neo.errors import ConfigError

HAS_TRL = importlib.util.find_spec("trl") is not None


def _spec(method: str, impl: str) -> RunSpec:
    return RunSpec(
        shape="tiny", method=method, impl=impl, chunk_size=1024, batch_size=2, seq_len=32, lora_r=4,
        kd_ratio=0.5, warmup_steps=1, steps=1, gradient_checkpointing=False, device="cpu", dtype="auto",
        seed=0, memory="rss", num_threads=1,
    )  # fmt: skip


def test_without_trl_peers_is_a_config_error_naming_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        peers_module.importlib.util, "find_spec", lambda name, *a: None if name == "trl" else real(name, *a)
    )
    with pytest.raises(ConfigError) as err:
        bench(BenchConfig(shape="tiny", runs=["kd:plain"], peers=["trl"], device="cpu"), progress=False)
    assert err.value.exit_code == 2
    assert "--peers trl" in str(err.value) and "pip install 'llm-neo[peers]'" in str(err.value)


def test_an_unknown_peer_is_refused_with_the_choices():
    with pytest.raises(ConfigError, match=r"--peers: 'axolotl' is not one of trl"):
        validate(BenchConfig(shape="tiny", peers=["axolotl"]))


def test_peers_add_the_whole_runs_they_are_set_against():
    _, whole = validate(BenchConfig(shape="tiny", peers=["trl"], whole_runs=["neo:chunked"]))
    # kd:plain, the baseline of every whole-run ratio; kd:chunked and neo:chunked, what TRL is set against.
    assert sorted((k.method, k.impl) for k in whole) == [
        ("kd", "chunked"),
        ("kd", "plain"),
        ("neo", "chunked"),
    ]
    _, none = validate(BenchConfig(shape="tiny"))
    assert none == []


@pytest.mark.skipif(not HAS_TRL, reason="trl is not importable (pip install 'llm-neo[peers]')")
def test_trl_rows_ratios_and_the_step_one_loss_check(tmp_path):
    specs = [_spec("kd", "chunked"), _spec("neo", "chunked")]
    inputs = prepare_whole_runs(specs[0], tmp_path / "inputs", with_teacher=True)
    # llm-neo's whole rows stand in with known figures, so each ratio is checked exactly (llm-neo ÷ TRL).
    mine = {
        "kd": {"process_peak_bytes": 3 * 2**30, "cpu_user_s": 7.0, "cpu_system_s": 1.0, "step_s": 0.5},
        "neo": {"process_peak_bytes": 2**30, "cpu_user_s": 3.0, "cpu_system_s": 1.0, "step_s": 0.25},
    }
    whole = [{"spec": dataclasses.asdict(s), "status": "ok", **mine[s.method]} for s in specs]
    # As bench() passes it: the chunk resolved for the device (the tiny vocabulary: 1024, the specs').
    config = with_default_chunk(
        BenchConfig(shape="tiny", device="cpu", num_threads=1, run_timeout_s=600), "cpu"
    )
    rows, check = run_peers(config, specs, inputs, tmp_path, whole)

    by_name = {r["name"]: r for r in rows}
    lora, full = by_name["TRL GKD+LoRA"], by_name["TRL GKD full"]
    assert lora["status"] == full["status"] == "ok", (lora, full)
    assert (lora["versus"], full["versus"]) == ("neo chunked", "kd chunked")
    assert 0 < lora["trainable_parameters"] < full["trainable_parameters"]
    for row, ours in ((lora, mine["neo"]), (full, mine["kd"])):
        assert len(row["losses"]) == 2 and row["process_peak_bytes"] > 0 and row["versions"]["trl"]
        assert row["memory_ratio"] == ours["process_peak_bytes"] / row["process_peak_bytes"]
        theirs = row["cpu_user_s"] + row["cpu_system_s"]
        assert row["cpu_ratio"] == (ours["cpu_user_s"] + ours["cpu_system_s"]) / theirs
        assert row["step_ratio"] == ours["step_s"] / row["step_s"]
    # What TRL cannot run is a row that says why, with no measurements or ratios.
    unsupported = [r for r in rows if r["status"] == "unsupported"]
    assert any("no CE term" in r["error"] for r in unsupported)
    assert all(r["memory_ratio"] is None and r.get("process_peak_bytes") is None for r in unsupported)
    # The loss check: both TRL rows (LoRA's B starts at zero, so their step 1 is the full student's)
    # against `distill --kd-ratio 1`'s step 1, on the same weights and first batch.
    assert "--kd-ratio 1" in check["command"] and "--max-steps 1" in check["command"]
    assert check["llm_neo_loss"] > 0 and set(check["peer_losses"]) == {"TRL GKD+LoRA", "TRL GKD full"}
    worst = max(abs(v - check["llm_neo_loss"]) / check["llm_neo_loss"] for v in check["peer_losses"].values())
    assert check["max_rel_diff"] == worst and check["rtol"] == LOSS_CHECK_RTOL
    assert check["passed"] is True, check
