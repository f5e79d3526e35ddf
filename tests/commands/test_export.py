"""`llm-neo export` front end: flags, validation of all problems at once, export.json, atomic output."""

from __future__ import annotations

import json

import pytest

from llm_neo.cli import main
from llm_neo.errors import ModelError

pytest.importorskip("gguf", reason="the gguf extra is not installed: pip install 'llm-neo[gguf]'")


def test_export_gguf_from_the_command_line(teacher_dir, tmp_path, capsys):
    out = tmp_path / "gguf"
    rc = main(
        [
            "export",
            "--model",
            str(teacher_dir),
            "--format",
            "gguf",
            "--gguf-type",
            "q8_0",
            "--output",
            str(out),
        ]
    )
    assert rc == 0
    record = json.loads((out / "export.json").read_text())
    assert record["format"] == "gguf" and record["gguf_type"] == "q8_0"
    assert (out / record["file"]).is_file() and record["file"] == "teacher-Q8_0.gguf"
    assert record["verification"]["passed"] and record["verification"]["token_ids_equal"]
    assert record["metadata"]["general.architecture"] == "llama"
    assert record["bytes"] == (out / record["file"]).stat().st_size
    assert "gguf:q8_0" in capsys.readouterr().out
    # A second export into the same place is refused unless --overwrite.
    rc = main(["export", "--model", str(teacher_dir), "--gguf-type", "f32", "--output", str(out)])
    assert rc == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (
        main(
            ["export", "--model", str(teacher_dir), "--gguf-type", "f32", "--output", str(out), "--overwrite"]
        )
        == 0
    )
    assert json.loads((out / "export.json").read_text())["gguf_type"] == "f32"
    assert [p.name for p in out.glob("*.gguf")] == ["teacher-F32.gguf"]


def test_an_unknown_gguf_type_is_refused_with_the_choices(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["export", "--model", str(tmp_path), "--gguf-type", "q2_k"])
    assert exit_.value.code == 2
    assert "choose from 'f32', 'f16', 'q8_0', 'q4_0'" in capsys.readouterr().err


def test_export_config_problems_at_once(tmp_path, capsys):
    rc = main(["export", "--model", str(tmp_path / "missing"), "--format", "int8", "--gguf-pre", "gpt-2"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "3 configuration problem(s)" in err
    assert "not a local Hugging Face model directory" in err and "--output is required" in err
    assert "--gguf-pre applies to --format gguf only" in err


def test_unsupported_family_fails_before_writing(tmp_path, capsys):
    model = tmp_path / "gpt2"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    rc = main(["export", "--model", str(model), "--output", str(tmp_path / "out")])
    assert rc == 1
    assert "supported families: llama, mistral, qwen2" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_failed_verification_leaves_nothing(teacher_dir, tmp_path, monkeypatch):
    import llm_neo.export.gguf as gguf_export

    def broken(*args, **kwargs):
        return {"passed": False, "problems": ["logits differ"], "logits": {}}

    monkeypatch.setattr(gguf_export, "verify_gguf", broken)
    from llm_neo.export import export_model

    with pytest.raises(ModelError, match=r"failed its verification.*logits differ"):
        export_model(teacher_dir, "gguf", "f32", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temporary left either


def test_an_output_named_like_a_gguf_file_is_refused_before_reading_the_model(teacher_dir, tmp_path, capsys):
    """``--output tiny.gguf``: the user expects a file there, not a directory of that name."""
    out = tmp_path / "tiny.gguf"
    assert main(["export", "--model", str(teacher_dir), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--output: {str(out)!r} names a .gguf file, but an export is a directory" in err
    assert f"give a directory, e.g. {str(tmp_path / 'tiny')!r}" in err
    assert list(tmp_path.iterdir()) == []
