"""Wrong inputs named before any work (issue 21): a YAML key given twice, an output path that is a
dangling link, the teacher given as the student, and what killed writes leave beside an output."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import llm_neo.distill as recipe
from llm_neo.cli import main
from llm_neo.errors import ConfigError, ModelError
from llm_neo.options import load_yaml
from llm_neo.runtime.atomic import FOREIGN_STALE_AFTER_S, atomic_directory, clean_temporaries


def _distill_args(teacher_dir: Path, student_dir: Path, data: Path, out: Path) -> list[str]:
    return [
        "--teacher",
        str(teacher_dir),
        "--student",
        str(student_dir),
        "--data",
        str(data),
        "--output-dir",
        str(out),
    ]


# ----------------------------------------------------------------------------------------------------
# YAML: a key given twice


def test_a_second_teacher_line_is_refused_naming_file_line_and_key(
    tmp_path, teacher_dir, student_dir, alpaca_jsonl, monkeypatch, capsys
):
    """The user's slip: a second ``teacher:`` line (PyYAML keeps the last: the student was distilled into
    itself, exit 0). Refused before anything loads, naming both lines."""
    monkeypatch.setattr(recipe, "setup", lambda *a, **k: pytest.fail("the run started"))
    config = tmp_path / "neo.yaml"
    config.write_text(
        f"teacher: {teacher_dir}\nstudent: {student_dir}\ndata: {alpaca_jsonl}\n"
        f"output_dir: {tmp_path / 'run'}\n# the teacher, as a student\nteacher: {student_dir}\n"
    )
    assert main(["distill", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"{config} line 6: duplicate key 'teacher' (first given on line 1)" in err
    assert "delete one of them" in err
    assert not (tmp_path / "run").exists()


def test_a_key_given_twice_in_a_nested_mapping_is_refused(tmp_path, capsys):
    config = tmp_path / "neo.yaml"
    config.write_text("method: neo\nlora:\n  r: 8\n  lora_alpha: 16\n  r: 64\n")
    assert main(["distill", "--config", str(config)]) == 2
    assert f"{config} line 5: duplicate key 'r' (first given on line 3)" in capsys.readouterr().err


def test_distinct_keys_anchors_and_merge_keys_load_as_yaml_does(tmp_path):
    text = "base: &base {r: 8, lora_alpha: 16}\nlora:\n  <<: *base\n  r: 4\nlists: [1, 1]\nsame: {a: 1}\n"
    (tmp_path / "c.yaml").write_text(text)
    assert load_yaml(tmp_path / "c.yaml") == yaml.safe_load(text)
    assert load_yaml(tmp_path / "c.yaml")["lora"] == {
        "r": 4,
        "lora_alpha": 16,
    }  # a merge key may be overridden


def test_a_duplicate_key_is_a_config_error_not_a_yaml_one(tmp_path):
    (tmp_path / "c.yaml").write_text("a:\n  - b: 1\n    b: 2\n")  # inside a list, too
    with pytest.raises(ConfigError, match=r"line 3: duplicate key 'b' \(first given on line 2\)"):
        load_yaml(tmp_path / "c.yaml")


# ----------------------------------------------------------------------------------------------------
# Output paths: refused before any model loads


def _no_model_loads(monkeypatch) -> None:
    def never(*args, **kwargs):
        pytest.fail("a model was loaded")

    monkeypatch.setattr(recipe, "load_model", never)
    monkeypatch.setattr(recipe, "load_teacher", never)


def test_a_dangling_output_dir_link_is_refused_before_any_model_loads(
    tmp_path, teacher_dir, student_dir, alpaca_jsonl, monkeypatch, capsys
):
    """``runs`` links to a disk that is not mounted: refused at once (it was a FileExistsError traceback
    after both models had loaded), and nothing is created behind the link."""
    _no_model_loads(monkeypatch)
    target = tmp_path / "mnt" / "scratch"
    link = tmp_path / "runs"
    link.symlink_to(target)
    for out, where in ((link, "it"), (link / "neo", str(link))):
        assert main(["distill", *_distill_args(teacher_dir, student_dir, alpaca_jsonl, out)]) == 2
        err = capsys.readouterr().err
        assert f"--output-dir {out}: {where} is a symbolic link to {target}, which does not exist" in err
        assert "nothing was written" in err and "Traceback" not in err
    assert link.is_symlink() and not target.exists() and not (tmp_path / "mnt").exists()


# ----------------------------------------------------------------------------------------------------
# The teacher given as the student


def test_the_teacher_given_as_the_student_is_warned_about(
    tmp_path, student_dir, alpaca_jsonl, monkeypatch, caplog
):
    """The same weights under two names (a link): a warning before anything loads."""
    monkeypatch.setattr(recipe, "load_model", lambda *a, **k: (_ for _ in ()).throw(ModelError("stop")))
    monkeypatch.setattr(recipe, "load_teacher", lambda *a, **k: (_ for _ in ()).throw(ModelError("stop")))
    alias = tmp_path / "teacher"
    alias.symlink_to(student_dir)
    with caplog.at_level(logging.WARNING, logger="llm_neo"):
        assert main(["distill", *_distill_args(alias, student_dir, alpaca_jsonl, tmp_path / "run")]) == 1
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"are the same weights ({student_dir.resolve()})" in w for w in warned), warned


def test_a_copy_of_the_student_given_as_the_teacher_is_warned_about_by_its_digest(
    tmp_path, student_dir, teacher_dir, alpaca_jsonl, monkeypatch, caplog
):
    """The same weights copied to another path: the paths differ, the weights' sha256 (hashed for the
    run's fingerprint anyway) does not. Warned once, before any model loads; a re-saved copy with other
    bytes is not the same weights and is not warned about."""
    monkeypatch.setattr(recipe, "load_model", lambda *a, **k: (_ for _ in ()).throw(ModelError("stop")))
    monkeypatch.setattr(recipe, "load_teacher", lambda *a, **k: (_ for _ in ()).throw(ModelError("stop")))
    copy = tmp_path / "copy"
    shutil.copytree(student_dir, copy)
    with caplog.at_level(logging.WARNING, logger="llm_neo"):
        assert main(["distill", *_distill_args(copy, student_dir, alpaca_jsonl, tmp_path / "run")]) == 1
    warned = [r.getMessage() for r in caplog.records if "same weights" in r.getMessage()]
    assert (
        len(warned) == 1 and f"the teacher ({copy}) and the student ({student_dir}) are copies" in warned[0]
    )
    assert "(both sha256:" in warned[0]
    caplog.clear()
    (copy / "model.safetensors").write_bytes((teacher_dir / "model.safetensors").read_bytes())
    with caplog.at_level(logging.WARNING, logger="llm_neo"):
        main(["distill", *_distill_args(copy, student_dir, alpaca_jsonl, tmp_path / "run2")])
    assert not [r for r in caplog.records if "same weights" in r.getMessage()]


def test_a_different_teacher_is_not_warned_about(
    tmp_path, teacher_dir, student_dir, alpaca_jsonl, monkeypatch, caplog
):
    monkeypatch.setattr(recipe, "load_model", lambda *a, **k: (_ for _ in ()).throw(ModelError("stop")))
    monkeypatch.setattr(recipe, "load_teacher", lambda *a, **k: (_ for _ in ()).throw(ModelError("stop")))
    with caplog.at_level(logging.WARNING, logger="llm_neo"):
        main(["distill", *_distill_args(teacher_dir, student_dir, alpaca_jsonl, tmp_path / "run")])
    assert not [r for r in caplog.records if "same weights" in r.getMessage()]


# ----------------------------------------------------------------------------------------------------
# Temporaries of killed writes

_WRITER = """
import sys, time
from pathlib import Path
from llm_neo.runtime.atomic import atomic_directory
with atomic_directory(Path(sys.argv[1])) as tmp:
    (tmp / "RUN-Q8_0.gguf").write_bytes(b"GGUF" + bytes(1 << 16))  # half an export
    print(tmp.name, flush=True)
    time.sleep(120)
"""


def _start_writer(out: Path) -> tuple[subprocess.Popen[str], Path]:
    """Another process in the middle of an export to ``out`` (atomic_directory, as the export writes)."""
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(out)], stdout=subprocess.PIPE, text=True)
    assert writer.stdout is not None
    return writer, out.parent / writer.stdout.readline().strip()


def test_a_killed_exports_temporary_is_removed_by_the_next_write_and_a_live_one_kept(tmp_path):
    out = tmp_path / "export"
    writer, partial = _start_writer(out)
    try:
        assert partial.is_dir() and partial.name.startswith(f".export.{writer.pid}-")
        with atomic_directory(out) as tmp:  # a second export while the first one still writes
            (tmp / "RUN-F32.gguf").write_bytes(b"GGUF")
        assert (partial / "RUN-Q8_0.gguf").is_file(), "a live process's temporary was removed"
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait()
        assert partial.is_dir()  # what kill -9 leaves
        with atomic_directory(out) as tmp:  # the next run
            (tmp / "RUN-F32.gguf").write_bytes(b"GGUF")
        assert not partial.exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
        assert (out / "RUN-F32.gguf").read_bytes() == b"GGUF"
    finally:
        writer.kill()
        writer.wait()


def test_only_the_outputs_own_temporaries_are_touched(tmp_path):
    """The sibling cleanup of ``export`` leaves ``merged``'s temporaries and the user's files alone."""
    other = tmp_path / ".merged.1-1@elsewhere.abcdefgh.tmp"
    other.mkdir()
    mine = tmp_path / ".export.k2j4h5g1.tmp"  # an older llm-neo's name: no writer in it
    mine.mkdir()
    (tmp_path / "notes.tmp").write_text("mine")
    with atomic_directory(tmp_path / "export"):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name, "export", "notes.tmp"]


def test_another_hosts_temporary_is_kept_until_it_has_not_changed_for_a_day(tmp_path):
    """Its writer cannot be asked from here (a shared filesystem): it is kept while anything in it changes."""
    partial = tmp_path / ".export.4242-99@othernode.abcdefgh.tmp"
    partial.mkdir()
    (partial / "RUN-Q8_0.gguf").write_bytes(b"GGUF")
    assert clean_temporaries(tmp_path) == []
    old = time.time() - FOREIGN_STALE_AFTER_S - 60
    for path in (partial / "RUN-Q8_0.gguf", partial):
        os.utime(path, (old, old))
    assert clean_temporaries(tmp_path) == [partial.name]


# ----------------------------------------------------------------------------------------------------
# An output path that cannot be written: one answer from every command that writes


def _command_args(
    command: str, tmp_path: Path, teacher: Path, student: Path, data: Path, out: Path
) -> list[str]:
    """The shortest command line of ``command`` that writes to ``out``."""
    models = ["--teacher", str(teacher), "--student", str(student), "--data", str(data)]
    if command == "sweep":
        base = tmp_path / "base.yaml"
        base.write_text(yaml.safe_dump({"teacher": str(teacher), "student": str(student), "data": str(data)}))
        return ["sweep", "--base", str(base), "--output", str(out)]
    if command == "convert":
        gguf = tmp_path / "model.gguf"
        gguf.write_bytes(b"GGUF")  # never read: the output is refused first
        return ["convert", str(gguf), str(out)]
    return {
        "distill": ["distill", *models, "--output-dir", str(out)],
        "compare": ["compare", *models, "--output-dir", str(out)],
        "cache-teacher": ["cache-teacher", *models[:2], *models[4:], "--output", str(out)],
        "export": ["export", "--model", str(student), "--output", str(out)],
        "prune": ["prune", "--model", str(teacher), *models[4:], "--output", str(out), "--keep-layers", "2"],
    }[command]


@pytest.mark.parametrize("how", ["dangling link", "below a file", "not writable"])
@pytest.mark.parametrize(
    "command", ["distill", "compare", "sweep", "cache-teacher", "export", "convert", "prune"]
)
def test_an_output_path_that_cannot_be_written_is_a_config_error_in_every_command(
    command, how, tmp_path, teacher_dir, student_dir, alpaca_jsonl, monkeypatch, capsys
):
    """Exit 2 (a configuration problem: the path given is wrong), the path and the fix named, before any
    model loads, and nothing created there."""
    from transformers import PreTrainedModel

    monkeypatch.setattr(
        PreTrainedModel, "from_pretrained", classmethod(lambda *a, **k: pytest.fail("loaded"))
    )
    if how == "dangling link":
        out = tmp_path / "runs"
        out.symlink_to(tmp_path / "gone")
        expected = f"it is a symbolic link to {tmp_path / 'gone'}, which does not exist"
    elif how == "below a file":
        (tmp_path / "a-file").write_text("mine")
        out = tmp_path / "a-file" / "run"
        expected = f"{tmp_path / 'a-file'} is a file, not a directory. Remove or rename it"
    else:
        parent = tmp_path / "readonly"
        parent.mkdir()
        out = parent / "run"
        real = os.access  # root writes whatever the mode bits say: fake the permission check
        monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == parent else real(p, mode))
        expected = f"{parent} is not writable (permission denied); nothing was written"
    args = _command_args(command, tmp_path, teacher_dir, student_dir, alpaca_jsonl, out)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(args) == 2
    err = capsys.readouterr().err
    assert expected in err and f" {out}: " in err and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert not (tmp_path / "gone").exists()
