"""No two runs share an output directory, and only llm-neo's own outputs are ever called a run or
removed: the user's paths of issue 21, through the command line."""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import interrupt_at, tiny_run

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


def start_slow_distill(gate: Path, args: list[str]) -> subprocess.Popen:
    """``llm-neo ARGS`` in a second process (SLOW_DISTILL), returned once it waits at step 2."""
    process = subprocess.Popen([sys.executable, "-c", SLOW_DISTILL, str(gate), *args])
    deadline = time.monotonic() + 300
    while not (gate / "at-step-2").exists():
        assert process.poll() is None and time.monotonic() < deadline, "the first run did not reach step 2"
        time.sleep(0.1)
    return process


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
    first = start_slow_distill(tmp_path, args)
    try:
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
    first = start_slow_distill(tmp_path, args)
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

    with pytest.raises(KeyboardInterrupt):
        distill(config, on_step=interrupt_at(2))
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


# ----------------------------------------------------------------------------------------------------
# export, convert and prune: an output replaced whole, so replaced only when all of it is llm-neo's


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory, teacher_dir) -> Path:
    """The teacher as an F32 GGUF: what convert reads."""
    pytest.importorskip("gguf", reason="the gguf extra is not installed: pip install 'llm-neo[gguf]'")
    from llm_neo.export import export_model

    out = tmp_path_factory.mktemp("gguf") / "teacher"
    return out / export_model(teacher_dir, "gguf", "f32", out)["file"]


def replacing_args(command: str, out: Path, source: Path, data: Path, second: bool = False) -> list[str]:
    """``command`` writing ``out`` from ``source``; ``second``: another option, so its output differs."""
    return {
        "export": ["export", "--model", str(source), "--gguf-type", "f16" if second else "f32"],
        "convert": ["convert", str(source), "--dtype", "float16" if second else "float32"],
        "prune": [
            "prune",
            "--model",
            str(source),
            "--data",
            str(data),
            "--keep-layers",
            "2" if second else "3",
        ],
    }[command] + ["--output", str(out), "-q"]


RECORD = {"export": "export.json", "convert": "convert.json", "prune": "pruning.json"}


def source_of(command: str, request: pytest.FixtureRequest) -> Path:
    if command == "export":
        pytest.importorskip("gguf", reason="the gguf extra is not installed: pip install 'llm-neo[gguf]'")
    return request.getfixturevalue("gguf_file" if command == "convert" else "teacher_dir")


@pytest.mark.parametrize("command", ["export", "convert", "prune"])
def test_a_directory_llm_neo_did_not_write_is_never_replaced(
    command, tmp_path, alpaca_jsonl, request, capsys
):
    """A project directory given as --output: refused with and without --overwrite (exit 2, the path and
    the fix named), before any model loads; every file of it kept."""
    from transformers import PreTrainedModel

    source = source_of(command, request)
    request.getfixturevalue("monkeypatch").setattr(
        PreTrainedModel, "from_pretrained", classmethod(lambda *a, **k: pytest.fail("a model was loaded"))
    )
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.md").write_text("mine")
    (project / RECORD[command]).write_text("{}")  # a name the command writes, too
    before = files_of(project)
    for flags in ([], ["--overwrite"]):
        assert main(replacing_args(command, project, source, alpaca_jsonl) + flags) == 2
        err = capsys.readouterr().err
        assert f"--output: {str(project)!r} is not an llm-neo output (it holds files but no {MARKER}" in err
        assert "never replaces files llm-neo did not write: choose another --output, or remove it" in err
        assert files_of(project) == before
    assert not lock_file(project).exists()
    a_file = tmp_path / "model.gguf"  # a file the user wrote where the output directory would go
    a_file.write_bytes(b"GGUF mine")
    assert main([*replacing_args(command, a_file, source, alpaca_jsonl), "--overwrite"]) == 2
    assert "it is a file, not a directory" in capsys.readouterr().err
    assert a_file.read_bytes() == b"GGUF mine"


@pytest.mark.parametrize("command", ["export", "convert", "prune"])
def test_an_earlier_output_is_replaced_only_with_overwrite_and_only_while_it_is_all_llm_neos(
    command, tmp_path, alpaca_jsonl, request, capsys
):
    source = source_of(command, request)
    out = tmp_path / "out"
    assert main(replacing_args(command, out, source, alpaca_jsonl)) == 0
    first = files_of(out)
    marker = json.loads((out / MARKER).read_text())
    assert marker == {
        "command": command,
        "outputs": sorted(p.name for p in out.iterdir() if p.name != MARKER),
    }
    assert RECORD[command] in marker["outputs"]

    assert main(replacing_args(command, out, source, alpaca_jsonl, second=True)) == 2
    assert (
        f"--output: {str(out)!r} already holds a {command} output; pass --overwrite"
        in capsys.readouterr().err
    )
    (out / "notes.md").write_text("the user's, beside the output")
    assert main([*replacing_args(command, out, source, alpaca_jsonl, second=True), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert f"--output: {str(out)!r} holds files llm-neo did not write (notes.md)" in err
    assert "move them out, or choose another --output" in err
    assert files_of(out) == first | {"notes.md": b"the user's, beside the output"}

    (out / "notes.md").unlink()  # the user moves it out
    assert main([*replacing_args(command, out, source, alpaca_jsonl, second=True), "--overwrite"]) == 0
    second = json.loads((out / RECORD[command]).read_text())
    assert second != json.loads(first[RECORD[command]])
    assert json.loads((out / MARKER).read_text())["outputs"] == sorted(
        p.name for p in out.iterdir() if p.name != MARKER
    )
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == []  # no temporary


# `llm-neo prune ARGS` in a second process that kill -9s itself while its output is half written (the
# model saved into the temporary directory, pruning.json not yet).
KILLED_PRUNE = textwrap.dedent(
    """
    import os, signal, sys
    import llm_neo.commands.prune as prune
    from llm_neo.cli import main
    prune.atomic_write_json = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
    sys.exit(main(sys.argv[1:]))
    """
)


def test_a_killed_prune_leaves_no_marked_partial_output_and_keeps_the_earlier_one(
    tmp_path, teacher_dir, alpaca_jsonl
):
    out = tmp_path / "out"
    assert main(replacing_args("prune", out, teacher_dir, alpaca_jsonl)) == 0
    earlier = files_of(out)
    args = [*replacing_args("prune", out, teacher_dir, alpaca_jsonl, second=True), "--overwrite"]
    killed = subprocess.run([sys.executable, "-c", KILLED_PRUNE, *args], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert files_of(out) == earlier  # the earlier output, whole and still marked
    (partial,) = [p for p in tmp_path.iterdir() if p.name.startswith(".out.") and p.name.endswith(".tmp")]
    assert (partial / "model.safetensors").is_file() and not (partial / MARKER).exists()
    assert not (partial / "pruning.json").exists()
    assert lock_file(out).is_file()  # what kill -9 leaves beside it: the next run takes it over
    assert main(args) == 0  # the rerun replaces the earlier output and removes the partial one
    assert json.loads((out / "pruning.json").read_text())["num_layers_after"] == 2
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")] == []


# ----------------------------------------------------------------------------------------------------
# A damaged marker: named before any model loads


@pytest.mark.parametrize("command", ["distill", "compare", "prune"])
@pytest.mark.parametrize("damage", ["torn", "no outputs", "alone"])
def test_a_damaged_marker_is_named_before_any_model_loads(
    command, damage, make_config, tmp_path, teacher_dir, student_dir, alpaca_jsonl, monkeypatch, capsys
):
    from transformers import PreTrainedModel

    monkeypatch.setattr(
        PreTrainedModel, "from_pretrained", classmethod(lambda *a, **k: pytest.fail("a model was loaded"))
    )
    out = tmp_path / "out"
    out.mkdir()
    if damage != "alone":
        (out / "metrics.jsonl" if command == "distill" else out / "model.safetensors").write_text("")
    (out / MARKER).write_text('{"command": "dist' if damage == "torn" else '{"command": "distill"}')
    before = files_of(out)
    models = ["--teacher", str(teacher_dir), "--student", str(student_dir), "--data", str(alpaca_jsonl)]
    args = {
        "distill": ["distill", *models, "--output-dir", str(out)],
        "compare": ["compare", *models, "--output-dir", str(out)],
        "prune": replacing_args("prune", out, teacher_dir, alpaca_jsonl),
    }[command]
    assert main([*args, "--overwrite", "-q"]) == 2
    err = capsys.readouterr().err
    assert f"{out / MARKER} is damaged (" in err and f"it lists what llm-neo wrote in {out}" in err
    assert "Remove the outputs you want replaced and then" in err and "Traceback" not in err
    assert files_of(out) == before
