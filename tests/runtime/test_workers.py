def test_the_load_is_sampled_while_the_block_runs(monkeypatch):
    """Samples at the start, every interval, and at the end: the load the block ran under."""
    import itertools
    import time as _time

    from llm_neo.runtime import workers

    values = itertools.count(1.0)
    monkeypatch.setattr(workers, "load_average", lambda: next(values))
    with workers.sampled_load(every_s=0.05) as samples:
        _time.sleep(0.3)
    assert len(samples) >= 4 and samples == sorted(samples) and samples[0] == 1.0
