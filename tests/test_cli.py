"""The command line as a user meets it: flags, YAML, data formats, exit codes, a hard kill and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import ALPACA, write_jsonl
from safetensors.torch import load_file

from llm_neo.cli import build_parser, main

REQUIRED_FLAGS = [
    "--max-steps",
    "--epochs",
    "--batch-size",
    "--grad-accum",
    "--max-length",
    "--lr",
    "--seed",
    "--kd-ratio",
    "--divergence",
    "--kd-temperature",
    "--save-every",
    "--resume",
    "--eval-fraction",
    "--method",
    "--teacher",
    "--student",
    "--data",
    "--output-dir",
    "--lora.r",
    "--lora.lora-alpha",
    "--lora.variant",
    "--train-on-prompt",
    "--trust-remote-code",
]


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as info:
        main(["distill", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for flag in REQUIRED_FLAGS:
        assert flag in text, flag
    assert "forward_kl" in text and "moslora" in text and "examples:" in text


def test_flags_override_yaml(tmp_path):
    (tmp_path / "c.yaml").write_text("method: kd\nkd_ratio: 0.9\nlora:\n  r: 8\n")
    args = build_parser().parse_args(
        ["distill", "--config", str(tmp_path / "c.yaml"), "--lora.r", "128", "--kd-ratio", "0.2"]
    )
    from llm_neo.config import DistillConfig
    from llm_neo.options import build_config

    config = build_config(DistillConfig, args, args.config)
    assert (config.method, config.kd_ratio, config.lora.r) == ("kd", 0.2, 128)


def test_yaml_problems_are_listed_with_the_file(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("methd: neo\nkd_ratio: high\nlora:\n  rank: 8\n")
    assert main(["distill", "--config", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err
    assert "3 configuration problem(s)" in err
    assert "did you mean method" in err and "kd_ratio" in err and "lora.rank" in err


def test_unknown_method_is_refused(capsys):
    with pytest.raises(SystemExit) as info:
        main(["distill", "--method", "distil"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_malformed_json_line_names_file_and_line(tmp_path, student_dir, teacher_dir, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps(ALPACA[0]) + "\n{oops\n")
    code = main(
        [
            "distill",
            "--student",
            str(student_dir),
            "--teacher",
            str(teacher_dir),
            "--data",
            str(data),
            "--output-dir",
            str(tmp_path / "out"),
        ]
    )
    assert code == 1
    assert "bad.jsonl line 2" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _write_format(tmp_path: Path, kind: str) -> Path:
    if kind == "chat":
        records = [
            {
                "messages": [
                    {"role": "user", "content": r["instruction"] + " " + r["input"]},
                    {"role": "assistant", "content": r["output"]},
                ]
            }
            for r in ALPACA
        ]
        return write_jsonl(tmp_path / "chat.jsonl", records * 2)
    if kind == "prompt_completion":
        records = [{"prompt": r["instruction"] + " " + r["input"], "completion": r["output"]} for r in ALPACA]
        path = tmp_path / "pc.parquet"
        pq.write_table(pa.Table.from_pylist(records * 2), path)
        return path
    if kind == "text":
        path = tmp_path / "text.json"
        path.write_text(json.dumps([{"text": r["instruction"] + " " + r["output"]} for r in ALPACA * 2]))
        return path
    return write_jsonl(tmp_path / "alpaca.jsonl", ALPACA * 2)


@pytest.mark.parametrize("kind", ["alpaca", "chat", "prompt_completion", "text"])
def test_distill_then_eval_on_each_data_format(tmp_path, student_dir, teacher_dir, kind, capsys):
    data = _write_format(tmp_path, kind)
    out = tmp_path / "run"
    code = main(
        [
            "distill",
            "--student",
            str(student_dir),
            "--teacher",
            str(teacher_dir),
            "--data",
            str(data),
            "--output-dir",
            str(out),
            "--max-steps",
            "2",
            "--batch-size",
            "2",
            "--grad-accum",
            "2",
            "--lora.r",
            "4",
            "--eval-fraction",
            "0.25",
            "--divergence",
            "jsd",
            "--temperature",
            "2",
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert "merged model:" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["divergence"] == "jsd" and summary["steps"] == 2

    code = main(
        [
            "eval",
            "--model",
            str(out / "merged"),
            "--teacher",
            str(teacher_dir),
            "--data",
            str(data),
            "--json",
            str(tmp_path / "eval.json"),
        ]
    )
    assert code == 0
    metrics = json.loads((tmp_path / "eval.json").read_text())
    assert {"ce", "perplexity", "kl_to_teacher", "top1_agreement"} <= set(metrics)
    assert metrics["kl_to_teacher"] >= 0 and 0 <= metrics["top1_agreement"] <= 1
    assert metrics["perplexity"] == pytest.approx(2.718281828 ** metrics["ce"], rel=1e-6)


def test_eval_of_the_teacher_against_itself(teacher_dir, alpaca_jsonl, tmp_path):
    assert (
        main(
            [
                "eval",
                "--model",
                str(teacher_dir),
                "--teacher",
                str(teacher_dir),
                "--data",
                str(alpaca_jsonl),
                "--json",
                str(tmp_path / "m.json"),
            ]
        )
        == 0
    )
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["kl_to_teacher"] == pytest.approx(0, abs=1e-6)
    assert metrics["top1_agreement"] == 1.0


def test_hard_kill_then_resume_matches_uninterrupted(tmp_path, student_dir, teacher_dir):
    data = write_jsonl(tmp_path / "train.jsonl", ALPACA * 4)
    common = [
        "distill",
        "--student",
        str(student_dir),
        "--teacher",
        str(teacher_dir),
        "--data",
        str(data),
        "--max-steps",
        "40",
        "--batch-size",
        "2",
        "--grad-accum",
        "4",
        "--lora.r",
        "4",
        "--save-every",
        "5",
        "--eval-fraction",
        "0.1",
        "-q",
    ]
    assert main([*common, "--output-dir", str(tmp_path / "whole")]) == 0

    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "llm_neo", *common, "--output-dir", str(killed)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 600  # generous: a loaded CI machine is slow
    while not (killed / "checkpoints" / "step-000010").exists() and time.time() < deadline:
        if proc.poll() is not None:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "summary.json").exists()

    assert main([*common, "--output-dir", str(killed), "--resume"]) == 0
    a = load_file(tmp_path / "whole" / "merged" / "model.safetensors")
    b = load_file(killed / "merged" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0)
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 41))


@pytest.mark.parametrize(
    "argv",
    [
        ["convert", "in.gguf", "out-dir"],
        ["convert", "--model", "in.gguf", "--output", "out-dir"],
        ["convert", "in.gguf", "--output", "out-dir", "--dtype", "bfloat16"],
    ],
)
def test_convert_takes_its_paths_in_order_or_by_flag(argv):
    from llm_neo.commands.convert import ConvertConfig
    from llm_neo.options import build_config

    config = build_config(ConvertConfig, build_parser("convert").parse_args(argv))
    assert (config.model, config.output) == ("in.gguf", "out-dir")


# ------------------------------------------------------------------------------------------------
# What a newcomer mistypes


def test_a_mistyped_local_path_shaped_like_a_hub_id_fails_at_once(tmp_path, student_dir, monkeypatch, capsys):
    import llm_neo.config as config_module

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").mkdir()
    os.symlink(student_dir, tmp_path / "tiny" / "student")
    write_jsonl(tmp_path / "train.jsonl", ALPACA)
    probes: list[str] = []
    monkeypatch.setattr(config_module, "hub_unreachable", lambda: probes.append("probe") or "no route")
    common = ["distill", "--method", "lora", "--data", "train.jsonl", "--output-dir", "out"]

    # tiny/ exists here: tiny/studnet is a mistyped local directory, whatever the hub's state.
    for offline in ("1", ""):
        monkeypatch.setenv("HF_HUB_OFFLINE", offline)
        started = time.perf_counter()
        assert main([*common, "--student", "tiny/studnet"]) == 2
        assert time.perf_counter() - started < 5
        err = capsys.readouterr().err
        assert "no local directory tiny/studnet (did you mean tiny/student?)" in err
        assert probes == []  # decided without asking the network
    # No such local directory: offline, or a hub that cannot be reached, says so at once too.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main([*common, "--student", "nobody/student"]) == 2
    assert "no local directory nobody/student, and HF_HUB_OFFLINE is set" in capsys.readouterr().err
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    assert main([*common, "--student", "nobody/student"]) == 2
    err = capsys.readouterr().err
    assert "the hub cannot be reached to look it up (no route)" in err and probes == ["probe"]
    # A GGUF path is a local file: a typo in it is a missing file, never a hub id.
    assert main([*common, "--student", "tiny/studnet.gguf"]) == 2
    assert "'tiny/studnet.gguf' does not exist (did you mean tiny/student?)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_loaders_refuse_a_mistyped_path_before_any_hub_request(tmp_path, monkeypatch):
    from llm_neo.errors import ConfigError
    from llm_neo.models.loading import load_config, load_tokenizer

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").mkdir()
    for load in (load_config, load_tokenizer):
        with pytest.raises(ConfigError, match="no local directory tiny/teachr"):
            load("tiny/teachr", role="teacher")


def test_negative_numbers_reach_the_range_check(capsys):
    for flags in (["--lr", "-1e-4"], ["--lr=-1e-4"], ["--kd-ratio", "-.5"]):
        assert main(["distill", *flags]) == 2
        err = capsys.readouterr().err
        assert "expected one argument" not in err
        assert "-0.0001 is out of range; it must be > 0" in err or "-0.5 is out of range" in err


def test_other_tools_names_get_did_you_mean(tmp_path, capsys):
    assert main(["distill", "--lora.rank", "8", "--learning-rate", "1e-4", "--num-train-epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert "--lora.rank: unknown option (did you mean --lora.r?)" in err
    assert "--learning-rate: unknown option (did you mean --lr?)" in err
    assert "--num-train-epochs: unknown option (did you mean --epochs?)" in err
    (tmp_path / "c.yaml").write_text(
        "learning_rate: 1e-4\ngradient_accumulation_steps: 4\nper_device_train_batch_size: 2\n"
        "lora:\n  rank: 8\n  alpha: 16\n"
    )
    assert main(["distill", "--config", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err
    for line in (
        "learning_rate: unknown option (did you mean lr?)",
        "gradient_accumulation_steps: unknown option (did you mean grad_accum?)",
        "per_device_train_batch_size: unknown option (did you mean batch_size?)",
        "lora.rank: unknown option (did you mean lora.r?)",
        "lora.alpha: unknown option (did you mean lora.lora_alpha?)",
    ):
        assert line in err, line


def test_lora_options_given_to_a_full_parameter_arm_are_warned_about(tmp_path, caplog):
    import logging

    from llm_neo.cli import ignored_options
    from llm_neo.config import DistillConfig, LoraOptions

    assert ignored_options(DistillConfig(method="sft")) == []
    assert ignored_options(DistillConfig(method="neo", lora=LoraOptions(r=8))) == []
    (warning,) = ignored_options(DistillConfig(method="kd", lora=LoraOptions(r=8, lora_dropout=0.1)))
    assert warning.startswith("--lora.r, --lora.lora-dropout ignored: --method kd trains every weight")
    # A run's own config.yaml spells lora_alpha = 2r out: not a LoRA option the user gave.
    assert ignored_options(DistillConfig(method="sft").resolved()) == []
    with caplog.at_level(logging.WARNING, logger="llm_neo"):
        main(["distill", "--method", "sft", "--lora.r", "8", "--student", str(tmp_path / "none")])
    assert "--lora.r ignored: --method sft" in caplog.text


@pytest.mark.parametrize(
    "arm", ["neo", "kd+int8-teacher", "lora+nf4-student", "neo+int8-teacher+nf4-student"]
)
def test_an_arm_spelled_back_from_its_options_is_the_arm(arm):
    # compare's --methods and bench's rows spell an arm one way: arm_name inverts parse_arm.
    from llm_neo.config import arm_name, parse_arm

    method, options = parse_arm(arm)
    assert arm_name(method, **options) == arm


def test_the_command_list_answers_without_importing_torch_or_transformers():
    """`llm-neo --help` lists the commands: building every command's options would import their modules
    (torch, transformers: seconds), so it builds none of them."""
    code = (
        "import sys\n"
        "from llm_neo.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "distill" in out and out.strip().splitlines()[-1] == "[]"
