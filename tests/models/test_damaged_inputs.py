"""Damaged or wrong model inputs named with their cause and fix, before any loader reads them (issue 21):
a truncated or corrupt GGUF, a truncated or corrupt safetensors shard, an llm-neo run directory or
teacher cache given as a model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from gguf_files import write_llama_gguf

from llm_neo.cli import main
from llm_neo.errors import ModelError
from llm_neo.models.loading import check_model_files
from llm_neo.models.tiny import build_llama, save_model
from llm_neo.teacher_cache import store

pytestmark = pytest.mark.usefixtures("one_thread")
DOWNLOAD_AGAIN = "download or copy it again"


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory, tokenizer) -> Path:
    model = build_llama(len(tokenizer), hidden_size=32, num_layers=2, num_kv_heads=2, seed=6)
    return write_llama_gguf(model, tokenizer, tmp_path_factory.mktemp("gguf") / "tiny.F32.gguf")


def _cut(source: Path, target: Path, missing: int) -> Path:
    """``source`` copied to ``target`` without its last ``missing`` bytes: a cut-off download."""
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(source.read_bytes()[:-missing])
    return target


def _never_loads(monkeypatch) -> None:
    def never(*args, **kwargs):
        pytest.fail("a loader was called")

    import transformers

    for name in ("AutoModelForCausalLM", "AutoTokenizer"):
        monkeypatch.setattr(getattr(transformers, name), "from_pretrained", never)


# ----------------------------------------------------------------------------------------------------
# GGUF


def test_a_truncated_gguf_is_named_with_its_declared_and_actual_size(
    gguf_file, tmp_path, monkeypatch, capsys
):
    """It failed with "cannot reshape array of size 3168 into shape (128,64)", blamed on the tokenizer."""
    short = _cut(gguf_file, tmp_path / "dl" / "tiny.F32.gguf", 1000)
    size = gguf_file.stat().st_size
    _never_loads(monkeypatch)
    assert main(["convert", "--model", str(short), "--output", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert (
        f"the model GGUF file {short} is damaged: its tensors end at byte {size:,}, the file has "
        f"{size - 1000:,} bytes (1,000 missing: truncated); {DOWNLOAD_AGAIN}"
    ) in err
    assert "reshape" not in err and not (tmp_path / "out").exists()


def test_a_gguf_cut_inside_its_header_or_not_a_gguf_is_named(gguf_file, tmp_path):
    head = _cut(gguf_file, tmp_path / "head.gguf", gguf_file.stat().st_size - 2000)
    with pytest.raises(
        ModelError, match=r"head.gguf is damaged: it ends after 2000 bytes, inside its header"
    ):
        check_model_files(str(head), "student")
    html = tmp_path / "error-page.gguf"  # what a failed download saves under the file's name
    html.write_bytes(b"<!DOCTYPE html><html>403 Forbidden</html>")
    with pytest.raises(ModelError, match=r"does not start with GGUF but with b'<!DO': not a GGUF file"):
        check_model_files(str(html), "teacher")
    check_model_files(str(gguf_file), "student")  # the whole file passes


# ----------------------------------------------------------------------------------------------------
# safetensors


@pytest.fixture()
def sharded_dir(tmp_path, tokenizer) -> Path:
    """A tiny model saved in several shards with their index, as the hub holds large ones."""
    model = build_llama(len(tokenizer), hidden_size=32, num_layers=2, num_kv_heads=2, seed=3)
    out = tmp_path / "sharded"
    model.save_pretrained(out, safe_serialization=True, max_shard_size="60KB")
    tokenizer.save_pretrained(out)
    assert len(list(out.glob("model-*.safetensors"))) >= 2
    return out


def test_a_truncated_shard_is_named_before_any_model_loads(
    sharded_dir, teacher_dir, alpaca_jsonl, tmp_path, monkeypatch, capsys
):
    shard = sorted(sharded_dir.glob("model-*.safetensors"))[-1]
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[:-100])
    _never_loads(monkeypatch)
    args = ["--teacher", str(teacher_dir), "--student", str(sharded_dir), "--data", str(alpaca_jsonl)]
    assert main(["distill", *args, "--output-dir", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert (
        f"the student model {str(sharded_dir)!r} is damaged: {shard.name}: its header declares {size:,} "
        f"bytes, the file has {size - 100:,} bytes (100 missing: truncated); {DOWNLOAD_AGAIN}"
    ) in err
    assert not (tmp_path / "run").exists()


def test_a_corrupt_shard_header_and_a_missing_shard_are_named(sharded_dir):
    first, *rest = sorted(sharded_dir.glob("model-*.safetensors"))
    data = bytearray(first.read_bytes())
    data[8] ^= 0xFF  # the header's first byte: '{' no more
    first.write_bytes(bytes(data))
    rest[-1].unlink()
    with pytest.raises(ModelError) as info:
        check_model_files(str(sharded_dir), "teacher")
    message = str(info.value)
    assert f"{rest[-1].name} is missing (named in model.safetensors.index.json)" in message
    assert f"{first.name}: its header is not safetensors JSON" in message


def test_an_intact_model_directory_passes(student_dir):
    check_model_files(str(student_dir), "student")


# ----------------------------------------------------------------------------------------------------
# llm-neo's own directories given as a model


def test_a_run_directory_given_as_the_student_says_did_you_mean_merged(
    tmp_path, student_dir, teacher_dir, alpaca_jsonl, tokenizer, capsys
):
    run = tmp_path / "runs" / "neo"
    save_model(build_llama(len(tokenizer), hidden_size=32, num_layers=2, seed=1), tokenizer, run / "merged")
    (run / "config.yaml").write_text(f"student: {student_dir}\n")
    (run / "summary.json").write_text("{}")
    args = ["--teacher", str(teacher_dir), "--student", str(run), "--data", str(alpaca_jsonl)]
    assert main(["distill", *args, "--output-dir", str(tmp_path / "next")]) == 1
    err = capsys.readouterr().err
    assert (
        f"--student {run}: this is an llm-neo run directory, not a model: did you mean {run / 'merged'}?"
        in err
    )
    assert "model_type" not in err

    shutil.rmtree(run / "merged")  # stopped before its merge
    (run / "checkpoints").mkdir()
    with pytest.raises(ModelError, match=r"run directory with no merged/ model yet .* --resume"):
        check_model_files(str(run), "student")


def test_a_teacher_cache_given_as_a_model_says_teacher_cache(tmp_path, teacher_dir, alpaca_jsonl, capsys):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / store.KEY_FILE).write_text(json.dumps({"teacher": str(teacher_dir)}))
    (cache / store.MANIFEST).write_text(json.dumps({"format": store.FORMAT}))
    (cache / "shard-00000.safetensors").write_bytes(b"")
    args = ["--teacher", str(cache), "--student", str(teacher_dir), "--data", str(alpaca_jsonl)]
    assert main(["distill", *args, "--output-dir", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert (
        f"--teacher {cache}: this is a teacher cache (llm-neo cache-teacher's output), not a model: " in err
    )
    assert f"pass it as --teacher-cache {cache} instead of --teacher" in err
    with pytest.raises(
        ModelError, match=f"pass it as --teacher-cache {cache}, and a model directory as --student"
    ):
        check_model_files(str(cache), "student")
