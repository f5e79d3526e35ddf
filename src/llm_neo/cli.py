"""The `llm-neo` command line. Every option comes from a config dataclass (see config.py; options.py
turns them into flags).

Each command is a (config dataclass, run function) pair named by import path, imported only when that
command runs, so `llm-neo --help` answers without loading torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import sys
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm_neo import __version__
from llm_neo.config import ALIASES, DistillConfig
from llm_neo.errors import ConfigError, LlmNeoError, RunStopped
from llm_neo.options import (
    add_dataclass_arguments,
    build_config,
    find_option,
    flag_name,
    option_aliases,
    option_names,
    suggest_option,
    unwrap_optional,
)
from llm_neo.runtime.logs import quiet_libraries, setup_logging


@dataclass(frozen=True)
class Command:
    config: str  # "module:DataclassName"
    run: str  # "module:function", called with the built config; an int result is the exit code
    help: str
    examples: str = ""


COMMANDS: dict[str, Command] = {
    "demo": Command(
        "llm_neo.demo.run:DemoConfig",
        "llm_neo.demo.run:run_demo",
        "The LLM-Neo story on a laptop CPU: teacher, pruned student, SFT/LoRA/KD/Neo, and a report.",
        """examples:
  llm-neo demo                     # the whole comparison, report in runs/demo/report.md
  llm-neo demo --quick             # a reduced version in about a minute
  llm-neo demo --seeds 1           # one seed instead of three

Nothing is downloaded: the task, the tokenizer and the teacher are built and trained here; the teacher
is cached (keyed by seed and task version) so a second run reuses it.""",
    ),
    "distill": Command(
        "llm_neo.config:DistillConfig",
        "llm_neo.cli:run_distill",
        "Distill a teacher into a student (neo, kd, lora or sft).",
        """examples:
  llm-neo distill --teacher T_DIR --student S_DIR --data train.jsonl --method neo --output-dir runs/neo
  llm-neo distill --config configs/llama3.1-8b-to-3.2-1b.yaml --lora.r 128
  llm-neo distill --config runs/neo/config.yaml --resume     # continue a killed run
  llm-neo distill --resume --output-dir runs/neo              # the same: its config.yaml is read

outputs in --output-dir: merged/ (standard HF model), adapter/ (LoRA arms), metrics.jsonl,
summary.json, config.yaml (reproduces the run through --config), checkpoints/ (with --save-every)

stopping: SIGTERM, SIGINT (Ctrl-C) or SIGUSR1 finish the current optimizer step, write a checkpoint
(also with --save-every 0), print the command that resumes, and exit with status 75; a second signal
exits at once. --resume checks every checkpoint file's size and sha256 and falls back to the newest
intact checkpoint. Under torchrun pass --signals-to-handle SIGTERM,SIGINT,SIGUSR1 to forward SIGUSR1.

exit status: 0 done, 1 error (the message says what and how to fix it), 2 configuration problem,
75 stopped by a signal (resumable)""",
    ),
    "compare": Command(
        "llm_neo.commands.compare:CompareConfig",
        "llm_neo.commands.compare:run_compare",
        "The proof of concept: SFT, LoRA, KD and Neo on your models and data, scored, costed and compared.",
        """examples:
  llm-neo compare --teacher T_DIR --student S_DIR --data train.jsonl --heldout heldout.jsonl \\
      --max-steps 200 --seeds 3 --output-dir runs/compare
  llm-neo compare --config base.yaml --methods lora,neo --lr.neo 3e-4 --score contains
  llm-neo compare ... --train-records 200 800 3200            # a data-size axis
  llm-neo compare ... --project-tokens 50M --gpu h100         # what the full run costs
  llm-neo compare ... --lm-eval-tasks arc_easy --lm-eval-include tasks/   # pip install 'llm-neo[eval]'

Every arm trains on the same data, seeds, step budget and batch through distill's code path; the
teacher, the untrained student and every arm are scored on the same held-out records. Outputs in
--output-dir: report.html (one self-contained file), report.md, results.json, arms/ (each arm's run,
config.yaml reproduces it), eval/. Killed, the same command continues where it stopped.""",
    ),
    "eval": Command(
        "llm_neo.config:EvalConfig",
        "llm_neo.commands.evaluate:run_evaluation",
        "Held-out CE, perplexity, KL to the teacher and top-1 agreement of a model.",
        """examples:
  llm-neo eval --model runs/neo/merged --teacher T_DIR --data heldout.jsonl --json eval.json""",
    ),
    "check-pair": Command(
        "llm_neo.commands.check_pair:CheckPairConfig",
        "llm_neo.commands.check_pair:run_check_pair",
        "What a teacher and a student tokenizer share, and what cross-tokenizer distillation would train.",
        """examples:
  llm-neo check-pair --teacher T_DIR --student S_DIR --data train.jsonl --output pair.json
  llm-neo distill --teacher T_DIR --student S_DIR --data train.jsonl --cross-tokenizer shared-vocab

Only the tokenizers load. See docs/cross-tokenizer.md for what each method trains and loses.""",
    ),
    "cache-teacher": Command(
        "llm_neo.config:CacheTeacherConfig",
        "llm_neo.commands.cache_teacher:run_cache_teacher",
        "Run the teacher once over the data and store its top-k log-probabilities for later students.",
        """examples:
  llm-neo cache-teacher --teacher T_DIR --data train.jsonl --output cache/ --top-k 64
  llm-neo distill --teacher-cache cache/ --student S_DIR --data train.jsonl --method neo

The cache is keyed by the teacher's weights and config, the tokenizer, the chat template, the data, the
max length, k and the temperature; a run whose key differs is refused, naming the part that differs.""",
    ),
    "sweep": Command(
        "llm_neo.commands.sweep:SweepConfig",
        "llm_neo.commands.sweep:run_sweep",
        "Grid or random search over distill options; a leaderboard, plots and the best config.",
        """examples:
  llm-neo sweep --base base.yaml --space space.yaml --output runs/sweep
  llm-neo sweep --base base.yaml --space space.yaml --output runs/sweep --resume   # continue a killed sweep

base.yaml is a distill config (as for distill --config); space.yaml is `grid: {lora.r: [64, 128], lr: [...]}`
or `random: {...}` with `trials: N`. Without --space the paper's guidelines give the default space.

SIGTERM, SIGINT or SIGUSR1 stop the running trial after its current step with a checkpoint and exit with
status 75; the message is the command that continues the sweep.""",
    ),
    "prune": Command(
        "llm_neo.commands.prune:PruneConfig",
        "llm_neo.commands.prune:run_prune",
        "Depth-prune a model: drop the decoder blocks that change their hidden states least.",
        """examples:
  llm-neo prune --model T_DIR --data calib.jsonl --keep-layers 16 --output pruned/

Block importance is 1 - cos(block input, block output), averaged over the calibration tokens (ShortGPT's
Block Influence); the --keep-layers most important blocks are kept in order. The output is a standard HF
model dir with its tokenizer and pruning.json (scores, kept and dropped blocks).""",
    ),
    "convert": Command(
        "llm_neo.commands.convert:ConvertConfig",
        "llm_neo.commands.convert:run_convert",
        "Convert a GGUF file (llama.cpp, Ollama) to a safetensors model directory, once.",
        """examples:
  llm-neo convert --model SmolLM2-135M-Instruct.Q4_1.gguf --output smollm2/
  llm-neo convert --model teacher.Q8_0.gguf --output teacher/ --dtype bfloat16

Every command also reads a .gguf directly (--teacher/--student/--model FILE.gguf), dequantizing it on
every run; convert does that once. Needs the gguf package: pip install 'llm-neo[gguf]'. The tokenizer
and chat template come from the file; tied embeddings stay tied.""",
    ),
    "plan": Command(
        "llm_neo.commands.plan:PlanConfig",
        "llm_neo.commands.plan:run_plan",
        "Estimate each arm's peak memory from the model configs and batch shape, before loading weights.",
        """examples:
  llm-neo plan --shape llama3-8b-to-1b --batch-size 8 --seq-len 2048 --gradient-checkpointing
  llm-neo plan --teacher T_DIR --student S_DIR --batch-size 2 --seq-len 2048""",
    ),
    "export": Command(
        "llm_neo.commands.export:ExportConfig",
        "llm_neo.commands.export:run_export",
        "Write a model as a GGUF file (llama.cpp, Ollama) or int8 safetensors, verified by reloading it.",
        """examples:
  llm-neo export --model runs/neo/merged --format gguf --gguf-type q8_0 --output runs/neo/gguf
  llm-neo export --model runs/neo/merged --format gguf --gguf-type f32 --output runs/neo/gguf-f32
  llm-neo export --model runs/neo/merged --format int8 --output runs/neo/int8

The export is reloaded (transformers' GGUF loader / from_pretrained) and compared with the source:
token ids and chat template identical, logits exact for f32, within a stated bound for f16/q8_0/q4_0
(docs/quantization.md); the numbers go to export.json in --output. Needs: pip install 'llm-neo[gguf]'
(gguf) or 'llm-neo[quant]' (int8).""",
    ),
    "bench": Command(
        "llm_neo.commands.bench:BenchConfig",
        "llm_neo.commands.bench:run_bench",
        "Measure peak memory and tokens/s of each arm and loss implementation on a named shape.",
        """examples:
  llm-neo bench --shape cpu-wide                      # CPU: peak RSS per run in its own process
  llm-neo bench --shape llama3-8b-to-1b --gradient-checkpointing --output benchmarks/results""",
    ),
    "probe": Command(
        "llm_neo.commands.probe:ProbeConfig",
        "llm_neo.commands.probe:run_probe",
        "Measure which of the teacher's biases and behaviours each student inherited.",
        """examples:
  llm-neo probe --teacher T_DIR --models S0=S_DIR,neo=runs/neo/merged,sft=runs/sft/merged
  llm-neo probe --teacher T_DIR --models S_DIR runs/kd/merged --probes crows_pairs.csv prompts.jsonl

The FIRST of --models is the untrained student: the baseline from which movement towards the teacher is
measured (0 = the untrained student's own preferences, 1 = the teacher's), unless --baseline names
another. Per pair of sentences (stereotypical / anti-stereotypical) every model's log-probability gap;
per model and category the fraction preferring the stereotype and the mean gap; per model the
correlation with the teacher's gaps and the movement, all with bootstrap 95% intervals; greedy answers
to the probe prompts, agreement with the teacher and label rates (refusal, --labels). Outputs in
--output-dir: probe.json, probe.md, probe.html (self-contained), plots/. See docs/probe.md.""",
    ),
}


def ignored_options(config: DistillConfig) -> list[str]:
    """Warnings for options this run ignores: LoRA options given to an arm that trains every weight."""
    from llm_neo.choices import METHODS
    from llm_neo.config import LoraOptions
    from llm_neo.options import to_dict

    method = METHODS.get(config.method)
    if method is None or method.lora:
        return []
    default, given = to_dict(LoraOptions()), to_dict(config.lora)
    if given["lora_alpha"] == 2 * given["r"]:  # the default, as a run's own config.yaml spells it out
        given["lora_alpha"] = None
    changed = [flag_name(f"lora.{k}") for k in given if given[k] != default[k]]
    if not changed:
        return []
    return [
        f"{', '.join(changed)} ignored: --method {config.method} trains every weight of the student, "
        "without LoRA branches (the LoRA options apply to neo and lora)"
    ]


def run_distill(config: DistillConfig) -> int:
    from llm_neo.distill import distill
    from llm_neo.errors import OutOfMemory
    from llm_neo.eval.metrics import small_heldout
    from llm_neo.models.quant import describe_teacher_quant
    from llm_neo.report.tables import format_table

    try:
        summary = distill(config)
    except OutOfMemory as err:
        estimate = _plan_estimate(config, err)
        if not estimate:
            raise
        raise OutOfMemory(f"{err}\n{estimate}", step=err.step, settings=err.settings) from err
    if summary is None:  # a rank other than 0 of a distributed run: rank 0 reports
        return 0
    heldout = {k: v for k, v in summary.heldout.items() if k != "tokens"}
    row = {
        **summary.final,
        **heldout,
        "train_s": summary.train_time_s,
        "peak_gb": summary.peak_memory_gb,
        "trainable": summary.trainable_parameters,
        "merge_diff": summary.merge_check.get("max_abs_logit_diff", "n/a"),  # n/a: sft/kd merge nothing
    }
    print(format_table({summary.method: row}, list(row)))
    heldout_counts = (summary.samples["heldout"], int(summary.heldout.get("tokens", 0)))
    if summary.heldout and (small := small_heldout(*heldout_counts)):
        print(f"\nwarning: {small}")
    print(f"\nmerged model: {summary.output_dir}/merged  (summary.json, metrics.jsonl beside it)")
    teacher_line = describe_teacher_quant(summary.teacher_quant)
    if teacher_line:
        print(teacher_line)
    if summary.export is not None:
        exported = summary.export
        where = Path(exported["path"]) / (exported["file"] or "")
        print(f"export: {where}  ({exported['bytes'] / 2**20:.1f} MiB, verified; export.json beside it)")
    return 0


def _plan_estimate(config: DistillConfig, err: Any) -> str:
    """What `llm-neo plan` estimates for the settings that ran out of memory and for the usual remedies
    (empty when it cannot estimate them: a model whose config it does not read, say)."""
    import dataclasses

    from llm_neo.commands.plan import PlanConfig, plan_rows
    from llm_neo.runtime.memory import GiB

    s = err.settings
    base = PlanConfig(
        teacher=None if s["teacher_cache"] else config.teacher,
        student=config.student,
        batch_size=s["batch_size"],
        seq_len=max(2, s["seq_len"]),
        methods=[config.method],
        loss_impls=[s["loss_impl"] if s["loss_impl"] in ("plain", "chunked") else "chunked"],
        loss_chunk_size=s["loss_chunk_size"],
        lora_r=s["lora_r"],
        gradient_checkpointing=s["gradient_checkpointing"],
        mlp_chunks=s["mlp_chunks"],
        world_size=s["world_size"],
        device=s["device"],
        dtype=config.dtype,
    )
    variants = {"these settings": base}
    if s["batch_size"] > 1:
        variants[f"--batch-size {s['batch_size'] // 2}"] = dataclasses.replace(
            base, batch_size=s["batch_size"] // 2
        )
    if not s["gradient_checkpointing"]:
        variants["--gradient-checkpointing"] = dataclasses.replace(base, gradient_checkpointing=True)
    elif s["mlp_chunks"] == 1:
        variants["--mlp-chunks 4"] = dataclasses.replace(base, mlp_chunks=4)
    try:
        parts = []
        for name, plan in variants.items():
            (row,), _ = plan_rows(plan)
            parts.append(f"{name} {row.total / GiB:.2f} GiB")
    except Exception:  # the estimate is a courtesy; the error above stands without it
        return ""
    return "llm-neo plan estimates the peak per process: " + ", ".join(parts) + "."


# A value argparse would take for a flag: "-1e-4", "-3", "-.5", "-inf" (it only knows "-3" and "-.5").
_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|nan)$", re.IGNORECASE)


def join_negative_values(argv: list[str], cls: Any) -> list[str]:
    """``--lr -1e-4`` as ``--lr=-1e-4``: argparse reads a token that starts with "-" and is not a plain
    integer or decimal as a flag and fails with "expected one argument". Joined, the value reaches the
    range checks, which say what is wrong with it."""
    aliases = option_aliases(cls)
    takes_value = {
        flag_name(name)
        for name in [*option_names(cls), *aliases]
        if (found := find_option(cls, aliases.get(name, name))) is not None
        and unwrap_optional(found[1])[0] is not bool
    }
    out: list[str] = []
    for token in argv:
        if out and _NEGATIVE_NUMBER.match(token) and out[-1] in takes_value:
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


def unknown_arguments(extras: list[str], cls: Any) -> list[str]:
    """One problem per argument the parser did not know, with the option the user most likely meant
    (``--lora.rank`` -> ``--lora.r``, ``--learning-rate`` -> ``--lr``: config.ALIASES)."""
    problems = []
    for token in extras:
        if token.startswith("--"):
            name = token[2:].split("=", 1)[0]
            meant = suggest_option(cls, name, ALIASES)
            hint = f" (did you mean {flag_name(meant)}?)" if meant else " (llm-neo COMMAND --help lists them)"
            problems.append(f"--{name}: unknown option{hint}")
        elif not problems or not extras[extras.index(token) - 1].startswith("--"):
            problems.append(f"{token!r}: unexpected argument (options are given as --name VALUE)")
    return problems


def _resume_config_file(args: argparse.Namespace) -> str | None:
    """`distill --resume --output-dir X` without --config: X/config.yaml, the options the run was started
    with (flags given still override them, and --resume checks them against it)."""
    if args.config is not None or not getattr(args, "resume", False):
        return args.config
    out = Path(getattr(args, "output_dir", None) or f"runs/{getattr(args, 'method', DistillConfig.method)}")
    saved = out / "config.yaml"
    if not saved.is_file() and not _restore_config(out, saved):
        return None  # distill says there is nothing to resume
    from llm_neo.options import load_yaml

    recorded = load_yaml(saved).get("output_dir")
    if recorded and Path(str(recorded)).resolve() == out.resolve():
        args.output_dir = recorded  # the same directory, however it was spelled: not a changed option
    logging.getLogger("llm_neo").info("--resume: the options of %s (flags given here override them)", saved)
    return str(saved)


def _restore_config(out: Path, saved: Path) -> bool:
    """config.yaml lost: write it again from the options the newest checkpoint's fingerprint holds (the
    run's own resolved options, as it first wrote them); False where no checkpoint holds them."""
    import dataclasses

    from llm_neo.config import dump_yaml
    from llm_neo.options import from_dict
    from llm_neo.runtime.checkpoint import list_checkpoints, read_fingerprint

    recorded = [f for p in reversed(list_checkpoints(out / "checkpoints")) if (f := read_fingerprint(p))]
    if not recorded:
        return False
    problems: list[str] = []
    config = from_dict(DistillConfig, recorded[0].options, source=str(out / "checkpoints"), problems=problems)
    if problems:  # options of another llm-neo version: resume from the flags alone, as before
        return False
    # Named where it is now: a run directory moved or copied is the same run.
    dump_yaml(dataclasses.replace(config, output_dir=str(out), resume=False, overwrite=False), saved)
    logging.getLogger("llm_neo").warning(
        "--resume: %s was missing; written again from the options its newest checkpoint records", saved
    )
    return True


def _resolve(path: str) -> Any:
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def build_parser(command: str | None = None, *, options: bool = True) -> argparse.ArgumentParser:
    """The parser; only ``command``'s options are built in full (all of them when it is None; none with
    ``options=False``, which is all ``llm-neo --help`` needs: building a command's options imports its
    module, and some import torch and transformers, seconds for a list of commands)."""
    parser = argparse.ArgumentParser(
        prog="llm-neo",
        description="LLM-Neo distillation: a frozen teacher, a LoRA student trained on CE + KD, merged "
        "into a model of the student's original architecture.",
        epilog="exit status: 0 done, 1 error, 2 configuration problem, 75 stopped by SIGTERM/SIGINT/SIGUSR1 "
        "after saving its work (resumable; the message says how), 128+N killed by signal N.",
    )
    parser.add_argument("--version", action="version", version=f"llm-neo {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="Only warnings and errors on stderr.")
    common.add_argument(
        "--debug",
        action="store_true",
        help="Also show the traceback of expected errors (a bug always shows it).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, spec in COMMANDS.items():
        cmd = sub.add_parser(
            name,
            help=spec.help,
            description=spec.help,
            epilog=spec.examples or None,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            parents=[common],
        )
        if options and command in (None, name):
            cmd.add_argument(
                "--config",
                metavar="YAML",
                default=None,
                help="YAML file of options (same names as the flags); flags given here win.",
            )
            add_dataclass_arguments(cmd, _resolve(spec.config))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_libraries()  # before the commands import them
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if a in COMMANDS), None)
    if command is not None:
        argv = join_negative_values(argv, _resolve(COMMANDS[command].config))
    args, extras = build_parser(command, options=command is not None).parse_known_args(argv)
    quiet = args.__dict__.pop("quiet")
    debug = args.__dict__.pop("debug")
    setup_logging(logging.WARNING if quiet else logging.INFO)
    spec = COMMANDS[args.command]
    try:
        if extras:
            raise ConfigError(unknown_arguments(extras, _resolve(spec.config)))
        config_file = args.config
        if spec.config == COMMANDS["distill"].config:
            config_file = _resume_config_file(args)
        config = build_config(_resolve(spec.config), args, config_file, vocabulary=ALIASES)
        if isinstance(config, DistillConfig):
            for warning in ignored_options(config):
                logging.getLogger("llm_neo").warning(warning)
        result = _resolve(spec.run)(config)
        return result if isinstance(result, int) else 0
    except LlmNeoError as err:
        # An expected failure: its message says what to fix. Anything else is a bug and shows its traceback.
        if debug:
            traceback.print_exc()
        if isinstance(err, RunStopped) and os.environ.get("RANK", "0") != "0":
            return err.exit_code  # under torchrun every rank stops alike; rank 0 says so once
        kind = "" if isinstance(err, (ConfigError, RunStopped)) else "error: "
        print(f"llm-neo {args.command}: {kind}{err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(
            f"llm-neo {args.command}: interrupted; completed checkpoints are kept (resume with --resume)",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
