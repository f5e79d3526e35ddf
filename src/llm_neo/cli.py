"""The `llm-neo` command line. Every option comes from the config dataclasses (see config.py)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from llm_neo import __version__
from llm_neo.config import ConfigError, DistillConfig, EvalConfig, add_dataclass_arguments, build_config

EXAMPLES = {
    "distill": """examples:
  llm-neo distill --teacher T_DIR --student S_DIR --data train.jsonl --method neo --output-dir runs/neo
  llm-neo distill --config configs/llama3.1-8b-to-3.2-1b.yaml --lora.r 128
  llm-neo distill --config runs/neo/config.yaml --resume     # continue a killed run

outputs in --output-dir: merged/ (standard HF model), adapter/ (LoRA arms), metrics.jsonl,
summary.json, config.yaml (reproduces the run through --config), checkpoints/ (with --save-every)""",
    "eval": """examples:
  llm-neo eval --model runs/neo/merged --teacher T_DIR --data heldout.jsonl --json eval.json""",
}


def _distill(args: argparse.Namespace) -> int:
    from llm_neo.distill import distill
    from llm_neo.evaluate import format_table

    config = build_config(DistillConfig, args, args.config)
    summary = distill(config)
    heldout = {k: v for k, v in summary["heldout"].items() if k != "tokens"}
    row = {
        **summary["final"],
        **heldout,
        "train_s": summary["train_time_s"],
        "peak_gb": summary["peak_memory_gb"],
        "trainable": summary["trainable_parameters"],
        "merge_diff": summary["merge_check"]["max_abs_logit_diff"],
    }
    print(format_table({summary["method"]: row}, list(row)))
    print(
        f"\nmerged model: {summary['config']['output_dir']}/merged  (summary.json, metrics.jsonl beside it)"
    )
    return 0


def _eval(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from llm_neo.atomic import atomic_write_json
    from llm_neo.evaluate import format_table, run_eval

    config = build_config(EvalConfig, args, args.config)
    metrics = run_eval(config)
    print(format_table({config.model: metrics}, list(metrics)))
    if config.json:
        atomic_write_json(Path(config.json), metrics)
        print(f"\nmetrics written to {config.json}")
    del json
    return 0


COMMANDS: dict[str, tuple[type, Callable[[argparse.Namespace], int], str]] = {
    "distill": (DistillConfig, _distill, "Distill a teacher into a student (neo, kd, lora or sft)."),
    "eval": (EvalConfig, _eval, "Held-out CE, perplexity, KL to the teacher and top-1 agreement."),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm-neo",
        description="LLM-Neo distillation: a frozen teacher, a LoRA student trained on CE + KD, merged "
        "into a model of the student's original architecture.",
    )
    parser.add_argument("--version", action="version", version=f"llm-neo {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="Only warnings and errors on stderr.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (cls, func, help_text) in COMMANDS.items():
        cmd = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=EXAMPLES.get(name),
            formatter_class=argparse.RawDescriptionHelpFormatter,
            parents=[common],
        )
        cmd.add_argument(
            "--config",
            metavar="YAML",
            default=None,
            help="YAML file of options (same names as the flags); flags given here win.",
        )
        add_dataclass_arguments(cmd, cls)
        cmd.set_defaults(func=func)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # PEFT asks transformers 5 a deprecated question on every attach; it is noise to our users.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet = args.__dict__.pop("quiet")
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO, format="[llm-neo] %(message)s", stream=sys.stderr
    )
    func: Any = args.__dict__.pop("func")
    try:
        return int(func(args))
    except ConfigError as err:
        print(f"llm-neo {args.command}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"llm-neo {args.command}: interrupted; completed checkpoints are kept (resume with --resume)",
            file=sys.stderr,
        )
        return 130
    except (ValueError, RuntimeError, OSError) as err:
        # DataError, ModelError, TrainingError and friends: the message already says what to fix.
        print(f"llm-neo {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
