"""`llm-neo bench --cache-ranks 2`: the multi-rank cache row beside the one-process cache (2 gloo ranks on
a CPU, the teacher replicated and FSDP2-sharded), its record, its report section and its refusals."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from llm_neo.commands.bench import BenchConfig, bench, format_report
from llm_neo.commands.bench.cache_ranks import same_cache
from llm_neo.errors import ConfigError
from llm_neo.records import dumps, from_json
from llm_neo.records.bench import BenchReport


@pytest.fixture(scope="module")
def cache_report(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bench")
    config = BenchConfig(
        shape="tiny", runs=["kd:plain"], warmup_steps=0, steps=1, isolate=False, device="cpu",
        num_threads=1, cache_ranks=2, whole_run_dir=str(directory),
    )  # fmt: skip
    return bench(config, progress=False), directory / "cache-ranks"


@pytest.mark.slow  # two torchrun launches of 2 processes that import torch, 15-20 s each on CPU
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_the_row_sets_two_ranks_beside_one_process(cache_report):
    report, directory = cache_report
    row = report.cache_ranks
    assert row is not None and row.ranks == 2 and row.threads_per_process == 1
    assert [(x.name, x.ranks, x.teacher_shard, x.status) for x in row.launches] == [
        ("1 process", 1, "replicate", "ok"),
        ("2 ranks, replicated", 2, "replicate", "ok"),
        ("2 ranks, FSDP2-sharded", 2, "fsdp", "ok"),
    ]
    one, *two = row.launches
    [alone] = one.shares
    for launch in two:
        assert [s.rank for s in launch.shares] == [0, 1]
        assert sum(s.tokens for s in launch.shares) == alone.tokens  # the work split, none done twice
        assert launch.same_cache is True
        assert launch.speed_vs_one == pytest.approx(launch.tokens_per_s_total / one.tokens_per_s_total)
        peak = max(s.peak_bytes for s in launch.shares)
        assert launch.peak_vs_one == pytest.approx(peak / alone.peak_bytes)
        for share in launch.shares:
            assert share.tokens_per_s == pytest.approx(share.tokens / share.seconds)
            assert share.peak_bytes > 100 * 2**20  # a process's RSS: torch alone is more
    replicated, sharded = two
    assert all(s.teacher_parameters == alone.teacher_parameters for s in replicated.shares)
    assert all(s.teacher_parameters < alone.teacher_parameters for s in sharded.shares)
    manifest = json.loads((directory / "cache-1-auto" / "manifest.json").read_text())
    assert manifest["num_positions"] == alone.tokens


@pytest.mark.slow  # the same launches (cache_report)
def test_same_cache_sees_one_changed_id(cache_report, tmp_path):
    _, directory = cache_report
    changed = tmp_path / "changed"
    shutil.copytree(directory / "cache-2-fsdp", changed)
    shard = changed / json.loads((changed / "manifest.json").read_text())["shards"][-1]["file"]
    tensors = load_file(shard)
    tensors["ids"][-1, -1] += 1
    save_file(tensors, shard)
    assert same_cache(directory / "cache-2-fsdp", directory / "cache-1-auto")
    assert not same_cache(changed, directory / "cache-1-auto")


@pytest.mark.slow  # the same launches (cache_report)
def test_the_row_is_in_the_report_and_its_json(cache_report):
    report, _ = cache_report
    text = format_report(report)
    assert "## Teacher cache on 1 process and on 2 ranks" in text
    for name in ("1 process, rank 0", "2 ranks, replicated, rank 1", "2 ranks, FSDP2-sharded, rank 0"):
        assert f"| {name} |" in text
    data = json.loads(dumps(report))
    assert data["cache_ranks"]["launches"][2]["teacher_shard"] == "fsdp"
    assert from_json(BenchReport, data) == report


def test_cache_ranks_of_one_is_refused_by_name():
    with pytest.raises(ConfigError, match="--cache-ranks: 1 is out of range"):
        bench(BenchConfig(shape="tiny", cache_ranks=1), progress=False)
