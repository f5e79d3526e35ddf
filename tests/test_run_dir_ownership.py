"""No two runs share an output directory, and only llm-neo's own outputs are ever called a run or
removed: the user's paths of issue 21, through the command line."""

from __future__ import annotations

import dataclasses
import logging
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import tiny_run

from llm_neo.cli import main
from llm_neo.config import dump_yaml
from llm_neo.distill import distill
from llm_neo.runtime.lock import lock_file
from llm_neo.runtime.rundir import MARKER

# `llm-neo distill ARGS` in a second process whose step 2 waits (having said so in GATE/at-step-2)
# until GATE/go exists: a run that is alive and mid-training for as long as the test needs.
SLOW_DISTILL = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import llm_neo.distill as recipe
    from llm_neo.cli import main
    gate, args = Path(sys.argv[1]), sys.argv[2:]
    def wait(step, metrics):
        if step == 2:
            (gate / "at-step-2").touch()
            while not (gate / "go").exists():
                time.sleep(0.05)
    plain = recipe.distill
    recipe.distill = lambda config: plain(config, on_step=wait)
    sys.argv = ["llm-neo", *args]
    sys.exit(main(args))
    """
)


@pytest.fixture()
def make_config(tmp_path, student_dir, teacher_dir, alpaca_jsonl):
    def make(name: str = "run", **overrides):
        models = dict(student=str(student_dir), teacher=str(teacher_dir), data=str(alpaca_jsonl))
        return tiny_run(tmp_path / name, **(models | {"method": "lora"} | overrides))

    return make


def files_of(directory: Path) -> dict[str, bytes]:
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    return {str(p.relative_to(directory)): p.read_bytes() for p in files}


def test_a_second_distill_in_a_running_runs_directory_is_refused_naming_it(make_config, tmp_path, capsys):
    config = make_config(max_steps=4, save_every=1)
    out = Path(str(config.output_dir))
    dump_yaml(config, tmp_path / "run.yaml")
    args = ["distill", "--config", str(tmp_path / "run.yaml"), "-q"]
    first = subprocess.Popen([sys.executable, "-c", SLOW_DISTILL, str(tmp_path), *args])
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "at-step-2").exists():
            assert first.poll() is None and time.monotonic() < deadline, "the first run did not reach step 2"
            time.sleep(0.1)
        before = files_of(out)
        # The printed --resume command, a rerun and an --overwrite, all while the first run is alive:
        for again in (["--resume", "--output-dir", str(out)], ["--config", str(tmp_path / "run.yaml")]):
            for flags in ([], ["--overwrite"]) if "--config" in again else ([],):
                assert main(["distill", *again, *flags, "-q"]) == 2
                err = capsys.readouterr().err
                assert f"--output-dir {out} is in use by another llm-neo run (pid {first.pid} on " in err
                assert socket.gethostname() in err and f"llm-neo {' '.join(args)}" in err
        assert files_of(out) == before  # nothing of the first run touched: its checkpoint included
    finally:
        (tmp_path / "go").touch()
        assert first.wait(timeout=300) == 0
    assert main(["distill", "--config", str(tmp_path / "run.yaml"), "--overwrite", "-q"]) == 0  # free again
    assert not lock_file(out).exists()


def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_note(make_config, tmp_path, caplog):
    config = make_config(max_steps=4, save_every=1)
    out = Path(str(config.output_dir))
    dump_yaml(config, tmp_path / "run.yaml")
    args = ["distill", "--config", str(tmp_path / "run.yaml"), "-q"]
    first = subprocess.Popen([sys.executable, "-c", SLOW_DISTILL, str(tmp_path), *args])
    deadline = time.monotonic() + 300
    while not (tmp_path / "at-step-2").exists():
        assert first.poll() is None and time.monotonic() < deadline, "the first run did not reach step 2"
        time.sleep(0.1)
    first.send_signal(signal.SIGKILL)  # kill -9: nothing released, the holder record stays
    first.wait(timeout=60)
    assert lock_file(out).is_file()
    with caplog.at_level(logging.WARNING, logger="llm_neo"):
        summary = distill(dataclasses.replace(config, resume=True))
    assert summary.steps == 4
    assert f"taking over the lock of a run that stopped without releasing it (pid {first.pid} " in caplog.text
    assert not lock_file(out).exists()


def test_a_project_directory_is_not_a_run_and_overwrite_removes_nothing_of_it(make_config, tmp_path, capsys):
    project = tmp_path / "project"
    project.mkdir()
    config = make_config("project")
    dump_yaml(config, project / "config.yaml")
    mine = "# my own settings, commented by hand\n" + (project / "config.yaml").read_text()
    (project / "config.yaml").write_text(mine)
    (project / "notes.md").write_text("mine too")
    (project / "metrics").mkdir()
    before = files_of(project)
    for flags in ([], ["--overwrite"]):
        assert main(["distill", "--config", str(project / "config.yaml"), *flags, "-q"]) == 2
        err = capsys.readouterr().err
        assert f"--output-dir: {str(project)!r} is not an llm-neo run directory" in err
        assert "--overwrite never replaces files llm-neo did not write; choose an empty or new" in err
        assert files_of(project) == before and (project / "metrics").is_dir()
    assert not lock_file(project).exists()


def test_overwrite_removes_only_what_the_run_wrote(make_config):
    config = make_config(max_steps=1)
    out = Path(str(config.output_dir))
    distill(config)
    assert (out / MARKER).is_file()
    (out / "notes.md").write_text("the user's, written beside the run")
    (out / "plots").mkdir()
    assert distill(dataclasses.replace(config, overwrite=True)).steps == 1
    assert (out / "notes.md").read_text() == "the user's, written beside the run" and (out / "plots").is_dir()


def test_a_run_from_before_the_marker_still_resumes_and_is_still_a_run(make_config, capsys):
    config = make_config(max_steps=4, save_every=2)

    def stop_after_two(step: int, metrics: dict) -> None:
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill(config, on_step=stop_after_two)
    out = Path(str(config.output_dir))
    (out / MARKER).unlink()  # as runs were written before it
    assert main(["distill", "--output-dir", str(out), "--config", str(out / "config.yaml"), "-q"]) == 2
    assert "a run that stopped after a checkpoint; pass --resume" in capsys.readouterr().err
    assert main(["distill", "--resume", "--output-dir", str(out), "-q"]) == 0
    assert distill(dataclasses.replace(config, overwrite=True)).steps == 4  # and --overwrite replaces it


def test_compare_refuses_a_project_directory_and_keeps_it(tmp_path, student_dir, teacher_dir, alpaca_jsonl):
    from llm_neo.commands.compare import CompareConfig, compare
    from llm_neo.errors import ConfigError

    project = tmp_path / "project"
    project.mkdir()
    (project / "compare.txt").write_text("my notes on the comparison")
    (project / "eval").mkdir()  # a name compare writes too
    (project / "eval" / "mine.json").write_text("{}")
    before = files_of(project)
    for overwrite in (False, True):
        config = CompareConfig(
            teacher=str(teacher_dir),
            student=str(student_dir),
            data=str(alpaca_jsonl),
            heldout=str(alpaca_jsonl),
            methods=["sft"],
            seeds=1,
            max_steps=1,
            device="cpu",
            output_dir=str(project),
            overwrite=overwrite,
        )
        with pytest.raises(ConfigError, match="is not an llm-neo run directory"):
            compare(config)
        assert files_of(project) == before
    assert not lock_file(project).exists()
