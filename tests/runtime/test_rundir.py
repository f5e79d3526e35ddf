"""The one output-directory check: every outcome, and refusals that name the directory and the flag."""

import json
import logging
import shutil
from collections import namedtuple

import pytest

from llm_neo.runtime.rundir import Holds, Outcome, Refusal, check_output_dir, check_space


def run_in(tmp_path, *, marker="run.yaml"):
    out = tmp_path / "out"
    out.mkdir()
    (out / marker).write_text("x")
    return out


def test_nothing_there_starts_new(tmp_path):
    for out in (tmp_path / "missing", tmp_path):
        checked = check_output_dir(out, flag="--output", overwrite=False, marker="run.yaml")
        assert (checked.holds, checked.outcome, checked.refusal, checked.message) == (
            Holds.NOTHING,
            Outcome.NEW,
            None,
            None,
        )


def test_a_file_is_refused_naming_it(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    checked = check_output_dir(path, flag="--output", overwrite=True, shown="my/file")
    assert (checked.holds, checked.outcome, checked.refusal) == (Holds.FILE, Outcome.REFUSED, Refusal.A_FILE)
    assert checked.message == "--output: 'my/file' is a file; give a directory"


def test_other_files_are_refused_without_overwrite_and_replaced_with_it(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    refused = check_output_dir(tmp_path, flag="--output", overwrite=False, marker="run.yaml")
    assert (refused.holds, refused.outcome, refused.refusal) == (
        Holds.FILES,
        Outcome.REFUSED,
        Refusal.HOLDS_FILES,
    )
    assert (
        refused.message == f"--output: {str(tmp_path)!r} already holds files; pass --overwrite to replace it"
    )
    replaced = check_output_dir(tmp_path, flag="--output", overwrite=True, marker="run.yaml")
    assert (replaced.outcome, replaced.refusal, replaced.message) == (Outcome.OVERWRITE, None, None)


def test_without_a_marker_every_file_is_someone_elses(tmp_path):
    out = run_in(tmp_path)
    checked = check_output_dir(out, flag="--output", overwrite=False)
    assert (checked.holds, checked.refusal) == (Holds.FILES, Refusal.HOLDS_FILES)


def test_a_run_is_refused_without_a_flag_resumed_with_resume_replaced_with_overwrite(tmp_path):
    out = run_in(tmp_path)
    refused = check_output_dir(out, flag="--output-dir", overwrite=False, marker="run.yaml")
    assert (refused.holds, refused.refusal) == (Holds.RUN, Refusal.HOLDS_A_RUN)
    assert str(out) in refused.message and "--overwrite" in refused.message
    resumed = check_output_dir(out, flag="--output-dir", overwrite=False, resume=True, marker="run.yaml")
    assert (resumed.outcome, resumed.refusal) == (Outcome.RESUME, None)
    replaced = check_output_dir(out, flag="--output-dir", overwrite=True, marker="run.yaml")
    assert (replaced.outcome, replaced.refusal) == (Outcome.OVERWRITE, None)


def test_the_marker_is_a_pattern(tmp_path):
    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / ".step-000002.tmp").mkdir()  # a killed write's leftovers: no run to resume
    checked = check_output_dir(
        out, flag="--output-dir", overwrite=False, resume=True, marker="checkpoints/step-*"
    )
    assert (checked.holds, checked.refusal) == (Holds.FILES, Refusal.NOTHING_TO_RESUME)
    (out / "checkpoints" / "step-000002").mkdir()
    checked = check_output_dir(
        out, flag="--output-dir", overwrite=False, resume=True, marker="checkpoints/step-*"
    )
    assert (checked.holds, checked.outcome) == (Holds.RUN, Outcome.RESUME)


@pytest.mark.parametrize("with_files", [False, True])
def test_resume_without_a_run_is_refused_naming_the_directory(tmp_path, with_files):
    if with_files:
        (tmp_path / "notes.txt").write_text("mine")
    checked = check_output_dir(tmp_path, flag="--output", overwrite=False, resume=True, marker="run.yaml")
    assert (checked.outcome, checked.refusal) == (Outcome.REFUSED, Refusal.NOTHING_TO_RESUME)
    assert str(tmp_path) in checked.message and "--output" in checked.message
    assert "without --resume" in checked.message


def test_a_resume_with_other_options_is_refused_even_with_overwrite(tmp_path):
    out = run_in(tmp_path)
    seen = []
    checked = check_output_dir(
        out,
        flag="--output",
        overwrite=True,
        resume=True,
        marker="run.yaml",
        changed=lambda path: seen.append(path) or ["lr", "seed"],
    )
    assert seen == [out]
    assert (checked.outcome, checked.refusal, checked.changed) == (
        Outcome.REFUSED,
        Refusal.CHANGED,
        ("lr", "seed"),
    )
    assert "lr, seed" in checked.message and str(out) in checked.message and "--overwrite" in checked.message


def test_changed_is_asked_only_of_a_run(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    checked = check_output_dir(
        tmp_path, flag="--output", overwrite=True, marker="run.yaml", changed=lambda _: pytest.fail("asked")
    )
    assert checked.outcome is Outcome.OVERWRITE


def test_a_continuing_command_goes_on_with_the_same_options_whatever_the_flags(tmp_path):
    out = run_in(tmp_path)
    for overwrite in (False, True):
        checked = check_output_dir(
            out, flag="--output", overwrite=overwrite, marker="run.yaml", changed=lambda _: [], continues=True
        )
        assert (checked.outcome, checked.refusal) == (Outcome.RESUME, None)


def test_a_continuing_command_with_other_options_needs_overwrite(tmp_path):
    out = run_in(tmp_path)
    common = dict(flag="--output", marker="run.yaml", changed=lambda _: ["lr"], continues=True)
    refused = check_output_dir(out, overwrite=False, **common)
    assert (refused.refusal, refused.changed) == (Refusal.CHANGED, ("lr",))
    assert "--overwrite" in refused.message and "--output" in refused.message
    replaced = check_output_dir(out, overwrite=True, **common)
    assert (replaced.outcome, replaced.refusal, replaced.changed) == (Outcome.OVERWRITE, None, ("lr",))


def test_the_check_writes_nothing(tmp_path):
    out = run_in(tmp_path)
    before = sorted(p.name for p in out.iterdir())
    check_output_dir(out, flag="--output", overwrite=True, marker="run.yaml", changed=lambda _: ["lr"])
    check_output_dir(tmp_path / "missing", flag="--output", overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == before and not (tmp_path / "missing").exists()


Usage = namedtuple("Usage", "total used free")


def test_space_warns_only_when_short(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(shutil, "disk_usage", lambda _: Usage(0, 0, 3 * 2**30))
    with caplog.at_level(logging.WARNING, logger="llm_neo"):
        check_space(tmp_path, {"checkpoints": 2**30, "exported student": 2**30})
        assert not caplog.records
        check_space(tmp_path, {"checkpoints": 2 * 2**30, "exported student": 2 * 2**30})
    assert caplog.messages == [
        f"only 3.00 GiB free on the filesystem of {tmp_path}; this run writes up to about 4.00 GiB there "
        "(checkpoints 2.00 GiB, exported student 2.00 GiB)"
    ]


def test_files_no_llm_neo_command_wrote_are_never_a_run_nor_replaced(tmp_path):
    from llm_neo.runtime.rundir import MARKER, marked_outputs, write_marker

    (tmp_path / "config.yaml").write_text("# mine\n")
    for overwrite in (False, True):
        checked = check_output_dir(
            tmp_path, flag="--output-dir", overwrite=overwrite, marker="run.yaml", known=("old.json",)
        )
        assert (checked.holds, checked.outcome, checked.refusal) == (
            Holds.OTHERS,
            Outcome.REFUSED,
            Refusal.NOT_A_RUN,
        )
        assert f"--output-dir: {str(tmp_path)!r} is not an llm-neo run directory" in checked.message
    assert marked_outputs(tmp_path, ("config.yaml", "merged")) == ("config.yaml", "merged")
    write_marker(tmp_path, "distill", ("merged",))  # a run marked here, which wrote no config.yaml
    replaced = check_output_dir(tmp_path, flag="--output-dir", overwrite=True, marker="run.yaml", known=())
    assert (replaced.holds, replaced.outcome) == (Holds.FILES, Outcome.OVERWRITE)
    assert marked_outputs(tmp_path, ("config.yaml", "merged")) == ("merged",)
    (tmp_path / MARKER).unlink()
    (tmp_path / "old.json").write_text("{}")  # what the command wrote before markers
    old = check_output_dir(tmp_path, flag="--output-dir", overwrite=True, marker="run.yaml", known=("old.*",))
    assert old.holds is Holds.FILES
    only_marker = tmp_path / "only"
    write_marker(only_marker.mkdir() or only_marker, "distill", ())
    assert _holds_of(only_marker) is Holds.NOTHING


def _holds_of(path):
    return check_output_dir(path, flag="--output-dir", overwrite=False, marker="run.yaml", known=()).holds


def test_a_replaced_output_is_only_ever_one_its_command_wrote_whole(tmp_path):
    """check_replaced_dir (export, convert, prune): every answer, each naming the path and the fix."""
    from llm_neo.runtime.rundir import MARKER, check_replaced_dir, marked_directory

    def check(path, overwrite=True):
        return check_replaced_dir(
            path, "prune", flag="--output", overwrite=overwrite, shown="o", record="pruning.json"
        )

    out = tmp_path / "o"
    assert check(out) is None  # nothing there
    with marked_directory(out, "prune") as tmp:
        (tmp / "model.safetensors").write_text("w")
        (tmp / "pruning.json").write_text("{}")
    assert json.loads((out / MARKER).read_text()) == {
        "command": "prune",
        "outputs": ["model.safetensors", "pruning.json"],
    }
    assert check(out) is None
    assert (
        check(out, overwrite=False)
        == "--output: 'o' already holds a prune output; pass --overwrite to replace it"
    )
    (out / MARKER).write_text(
        json.dumps({"command": "distill", "outputs": ["model.safetensors", "pruning.json"]})
    )
    assert "holds the outputs of llm-neo distill, not of prune; --overwrite does not replace them" in check(
        out
    )
    (out / MARKER).unlink()  # an output of an llm-neo from before markers
    refused = check(out)
    assert refused.startswith(
        "--output: 'o' is not an llm-neo output (it holds files but no .llm-neo marker; its"
    )
    assert "pruning.json says an llm-neo from before output markers wrote it" in refused
    (out / "pruning.json").unlink()
    assert "pruning.json says" not in check(out)
    assert "'o' is a file; llm-neo writes a directory there and never replaces" in check(
        out / "model.safetensors"
    )
