"""Shared fixtures: tiny random Llama models with a shared byte-level tokenizer, saved to disk.

Built once per test session under a temporary directory; nothing is downloaded.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from llm_neo.models.tiny import build_llama, build_tokenizer, save_model


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """With LLM_NEO_NO_SKIPS=1 (CI, which installs every optional extra and browser), a skipped test is
    a failure: a missing package there would otherwise turn its tests into silent skips."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("LLM_NEO_NO_SKIPS") == "1" and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped where no test may skip (LLM_NEO_NO_SKIPS=1): {reason}"


@dataclass(frozen=True)
class Early:
    """A test's work started in a subprocess as collection ended (``@pytest.mark.early(command=...)``)."""

    process: subprocess.Popen
    directory: Path  # where it writes (its output in output.log); removed when the session ends


EARLY = pytest.StashKey[Early]()


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the work of every selected test marked ``early(command=...)``: ``command(directory)`` is the
    argv of a subprocess that does it, writing into ``directory``. Most tests keep to one core (one
    intra-op thread), so on CI's 2 cores a long test's work started now runs beside them on the other;
    the test's ``early`` fixture waits for what is left of it."""
    if session.config.option.collectonly:
        return
    for item in session.items:
        marker = item.get_closest_marker("early")
        if marker is not None:
            directory = Path(tempfile.mkdtemp(prefix="llm-neo-early-"))
            command = marker.kwargs["command"](directory)
            with (directory / "output.log").open("wb") as log:  # a pipe nobody reads would fill and block it
                process = subprocess.Popen(
                    command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
            item.stash[EARLY] = Early(process, directory)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """An early test's subprocess never outlives the session (-x, Ctrl-C, a failure before its test)."""
    for item in session.items:
        early = item.stash.get(EARLY, None)
        if early is None:
            continue
        if early.process.poll() is None:
            os.killpg(early.process.pid, signal.SIGKILL)  # its session: the workers it started too
            early.process.wait()
        shutil.rmtree(early.directory, ignore_errors=True)


@pytest.fixture()
def early(request) -> Early:
    """The test's early work (pytest_collection_finish), waited for; it must have exited with 0."""
    started = request.node.stash.get(EARLY, None)
    assert started is not None, "the test is not marked @pytest.mark.early(command=...)"
    started.process.wait()
    output = (started.directory / "output.log").read_text(errors="replace")
    assert started.process.returncode == 0, output[-3000:]
    return started


@pytest.fixture(scope="session")
def tokenizer():
    """The shared tokenizer (320 ids, chat template included)."""
    return build_tokenizer()


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def teacher_dir(models_dir, tokenizer) -> Path:
    """A 4-layer, hidden-64 teacher."""
    return save_model(
        build_llama(len(tokenizer), hidden_size=64, num_layers=4, seed=1), tokenizer, models_dir / "teacher"
    )


@pytest.fixture(scope="session")
def student_dir(models_dir, tokenizer) -> Path:
    """A 2-layer, hidden-32 student sharing the teacher's tokenizer."""
    return save_model(
        build_llama(len(tokenizer), hidden_size=32, num_layers=2, seed=2), tokenizer, models_dir / "student"
    )


@pytest.fixture(scope="session")
def padded_student_dir(models_dir, tokenizer) -> Path:
    """Same tokenizer, but an embedding table padded to 352 rows (as Qwen2.5 pads to 64)."""
    return save_model(
        build_llama(352, hidden_size=32, num_layers=2, seed=3), tokenizer, models_dir / "padded_student"
    )


@pytest.fixture(scope="session")
def wide_student_dir(models_dir, tokenizer) -> Path:
    """A 2-layer student of hidden 64: bitsandbytes' CPU repack needs in_features >= its block size (64);
    narrower layers make its eval-mode forward crash instead of repacking (the QLoRA tests' student)."""
    return save_model(
        build_llama(len(tokenizer), hidden_size=64, num_layers=2, seed=7),
        tokenizer,
        models_dir / "wide_student",
    )


@pytest.fixture(scope="session")
def foreign_dir(models_dir) -> Path:
    """A model whose tokenizer was trained on other text: ids map to different tokens."""
    tok = build_tokenizer(["completely different corpus zzz yyy xxx www", "qqq ppp ooo"], vocab_size=300)
    return save_model(
        build_llama(len(tok), hidden_size=32, num_layers=1, seed=4), tok, models_dir / "foreign"
    )


ALPACA = [
    {"instruction": "Add the numbers.", "input": "2 + 3", "output": "5"},
    {"instruction": "Reverse the string.", "input": "abc", "output": "cba"},
    {"instruction": "What is the capital of France?", "input": "", "output": "Paris"},
    {"instruction": "Sort the digits.", "input": "3 1 2", "output": "1 2 3"},
    {"instruction": "Count the letters.", "input": "fox", "output": "3"},
    {"instruction": "Say hello.", "input": "", "output": "hello there, friend!"},
    {"instruction": "Add the numbers.", "input": "10 + 7", "output": "17"},
    {"instruction": "Reverse the string.", "input": "dog", "output": "god"},
]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


class NewTensors(TorchDispatchMode):
    """Counts the tensors that ops allocate (an output sharing no input's storage: not a view, not an
    in-place or ``out=`` result) with exactly ``numel`` elements, or at least ``at_least``."""

    def __init__(self, *, numel: int | None = None, at_least: int | None = None) -> None:
        super().__init__()
        self.numel, self.at_least, self.count = numel, at_least, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        inputs = {
            t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if torch.is_tensor(t)
        }
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not torch.is_tensor(t) or t.untyped_storage().data_ptr() in inputs:
                continue
            if t.numel() == self.numel or (self.at_least is not None and t.numel() >= self.at_least):
                self.count += 1
        return out


def interrupt_at(at: int):
    """A ``distill`` step callback that stops the run with KeyboardInterrupt once step ``at`` is logged,
    as a kill at that point would (the last checkpoint before it is what a resume starts from)."""

    def interrupt(step: int, metrics: dict) -> None:
        if step == at:
            raise KeyboardInterrupt

    return interrupt


def tiny_run(output_dir: Path, **options):
    """A DistillConfig for a few-step run on the tiny models: neo, 3 steps of 2 x 2, a quarter held out,
    seed 0, LoRA r = 4; ``options`` give the models and data and override the rest."""
    from llm_neo.config import DistillConfig, LoraOptions

    base = dict(
        method="neo",
        output_dir=str(output_dir),
        max_steps=3,
        batch_size=2,
        grad_accum=2,
        eval_fraction=0.25,
        seed=0,
        lora=LoraOptions(r=4),
    )
    return DistillConfig(**(base | options))


def tiny_comparison(teacher_dir: Path, student_dir: Path, output_dir: Path, **options):
    """A CompareConfig on the tiny models: sft and neo, 2 seeds of 2 steps of 4 x 1, LoRA r = 4, answers of
    4 tokens, one job on the CPU; ``options`` give the data and override the rest."""
    from llm_neo.commands.compare import CompareConfig
    from llm_neo.config import LoraOptions

    base = dict(
        teacher=str(teacher_dir),
        student=str(student_dir),
        methods=["sft", "neo"],
        seeds=2,
        max_steps=2,
        batch_size=4,
        grad_accum=1,
        lora=LoraOptions(r=4),
        max_length=64,
        max_new_tokens=4,
        jobs=1,
        device="cpu",
        output_dir=str(output_dir),
    )
    return CompareConfig(**(base | options))


@pytest.fixture()
def alpaca_jsonl(tmp_path) -> Path:
    """Sixteen Alpaca records (the list above twice) as JSONL."""
    return write_jsonl(tmp_path / "train.jsonl", ALPACA * 2)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of many tiny-tensor tests: extra threads only add spin-wait
    overhead (10x on a busy 2-core machine). Restored afterwards so other modules are unaffected."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def loss_kwargs(kw: dict) -> dict:
    """The tests spell loss options as keywords (kd_ratio=0.5, divergence="jsd", ...); the losses take
    them as one LossOptions: build it from them and pass the rest (num_tokens) through."""
    import dataclasses

    from llm_neo.losses import LossOptions

    names = {f.name for f in dataclasses.fields(LossOptions)}
    rest = {k: v for k, v in kw.items() if k not in names}
    return {"options": LossOptions(**{k: v for k, v in kw.items() if k in names}), **rest}


@pytest.fixture()
def tmpfs(tmp_path):
    """``mount(size, read_only=False)``: a fresh tmpfs of ``size`` ("4m") under tmp_path, unmounted
    afterwards: a real full or read-only filesystem. Needs root (skips otherwise)."""
    mounts: list[Path] = []

    def mount(size: str = "4m", *, read_only: bool = False) -> Path:
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("mounting a tmpfs needs root")
        target = tmp_path / f"fs{len(mounts)}"
        target.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounts.append(target)
        return target

    yield mount
    for target in reversed(mounts):
        subprocess.run(["umount", "-l", str(target)], check=False)


def fill_disk(directory: Path) -> Path:
    """Write a file in ``directory`` until its filesystem is full (the next write raises ENOSPC); delete
    the returned file to free the space again."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    block = b"\0" * 65536
    try:
        while True:
            os.write(fd, block)
    except OSError as err:
        assert err.errno == errno.ENOSPC, err
    finally:
        os.close(fd)
    return filler


def damage(path: Path, how: str) -> None:
    """Damage a file as disks and copies do: ``truncate`` (its second half gone), ``corrupt`` (one byte
    flipped: the same size, so only a checksum tells) or ``delete``."""
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "corrupt":
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    elif how == "delete":
        path.unlink()
    else:
        raise ValueError(how)
