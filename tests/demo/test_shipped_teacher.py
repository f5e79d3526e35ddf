"""The default demo's teacher ships with llm-neo: its files match their checksums, it is the teacher the
default demo would train (same key), it scores as its teacher.json says on the held-out split, a damaged
file is refused by name, and `--train-teacher` still trains one within a stated margin of it."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest

from llm_neo.demo import run as demo
from llm_neo.demo.run import (
    DEFAULT,
    SHIPPED_TEACHER,
    ensure_teacher,
    heldout_score,
    teacher_key,
    write_task_data,
)
from llm_neo.errors import ConfigError

META = json.loads((SHIPPED_TEACHER / "teacher.json").read_text())
# A teacher trained again is not bit-identical to the shipped one (another CPU's float summation order,
# or llm-neo's own: the chunked loss's in-place logsumexp, 7 December), and 3000 steps from a random
# initialisation carry a last-bit difference far: measured 86.0% shipped, 92.5% retrained after that
# change (on 1 and on 2 threads). A broken training path lands far below; a teacher a little better than
# the shipped one is no failure of --train-teacher.
RETRAIN_BELOW, RETRAIN_ABOVE = 0.05, 0.10


def test_the_shipped_files_match_their_checksums_and_the_default_demos_key():
    assert META["key"] == teacher_key(DEFAULT, 0)  # else: python -m llm_neo.demo.ship_teacher
    assert {"model.safetensors", "config.json"} <= set(META["sha256"])
    for name, digest in META["sha256"].items():
        assert hashlib.sha256((SHIPPED_TEACHER / name).read_bytes()).hexdigest() == digest, name


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    _, _, path = write_task_data(tmp_path_factory.mktemp("demo-data"), DEFAULT, 0)
    return path


def test_the_shipped_teacher_scores_as_documented(heldout):
    score = heldout_score(SHIPPED_TEACHER, heldout)
    assert score["total"] == META["heldout"]["total"] == 5 * DEFAULT.heldout_per_skill
    # Greedy decoding of the same weights: the same answers, up to a near-tie on another CPU.
    assert abs(score["correct"] - META["heldout"]["correct"]) <= 1


def test_the_default_demo_uses_it_and_a_damaged_file_is_refused(tmp_path, heldout, monkeypatch):
    kwargs = dict(seed=0, data=heldout, cache=tmp_path / "cache", device="cpu", threads=1)
    meta = ensure_teacher(DEFAULT, train=False, **kwargs)
    assert meta["shipped"] and meta["path"] == str(SHIPPED_TEACHER) and not (tmp_path / "cache").exists()
    copy = tmp_path / "teacher"
    shutil.copytree(SHIPPED_TEACHER, copy)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    monkeypatch.setattr(demo, "SHIPPED_TEACHER", copy)
    with pytest.raises(ConfigError, match=r"shipped teacher is damaged: .*model.safetensors does not match"):
        ensure_teacher(DEFAULT, train=False, **kwargs)


def train_teacher(directory: Path) -> list[str]:
    """The path --train-teacher takes, as a subprocess (started early: tests/conftest.py) writing the
    teacher into ``directory``/cache and ensure_teacher's record into ``directory``/meta.json."""
    return [sys.executable, __file__, str(directory)]


@pytest.mark.slow
@pytest.mark.early(command=train_teacher)
def test_train_teacher_trains_one_within_the_margin(early, heldout):
    """--train-teacher trains a teacher of the shipped one's score. Its 3000 steps (about 6 minutes on one
    core) start as collection ends and train beside the other tests; this waits for them."""
    meta = json.loads((early.directory / "meta.json").read_text())
    assert not meta["shipped"] and meta["path"] != str(SHIPPED_TEACHER)
    assert meta["path"] == str(early.directory / "cache" / f"teacher-{META['key']}")
    score = heldout_score(Path(meta["path"]), heldout)
    assert -RETRAIN_BELOW <= score["accuracy"] - META["heldout"]["accuracy"] <= RETRAIN_ABOVE


if __name__ == "__main__":  # train_teacher's subprocess (the guard: the forkserver reimports this file)
    root = Path(sys.argv[1])
    train, _, _ = write_task_data(root / "data", DEFAULT, 0)
    # One thread: the other core is the test session's.
    record = ensure_teacher(
        DEFAULT, seed=0, data=train, cache=root / "cache", device="cpu", threads=1, train=True
    )
    (root / "meta.json").write_text(json.dumps(record))
