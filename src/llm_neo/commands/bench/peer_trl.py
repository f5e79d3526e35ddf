"""A peer run: TRL's ``GKDTrainer`` on a whole run's saved inputs, in a process of its own.

``python -m llm_neo.commands.bench.peer_trl RESULT --student S --teacher T --data D ...`` trains the saved
student against the saved teacher for ``--max-steps`` optimizer steps on exactly the micro-batches
``llm-neo distill`` would draw (llm-neo's own tokenization, held-out split and ``data.micro_batch`` order,
fed to TRL in that order by a sequential sampler), and writes RESULT (JSON): the loss of every step as
TRL computed it (before its logging rounds it to 4 digits), each step's seconds, the trainable
parameters and the versions.

The settings are the closest TRL offers to llm-neo's KD: ``lmbda=0`` (no on-policy generation: the
supervised KD GKD still offers), ``beta=0`` (its generalized JSD special-cased to forward
KL(teacher || student)), no CE term (GKD has none) and its full logits for both models (it has no chunked
loss); ``--lora-r R`` trains a PEFT LoRA branch on the same modules as llm-neo's neo arm (every linear
of every block, α = 2r, dropout 0), 0 the full student. The process only loads and trains: no merge,
save or held-out evaluation, which can only make its peak and time smaller than a whole llm-neo run's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from typing import Any


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="peer_trl")
    parser.add_argument("result")
    for name in ("--student", "--teacher", "--data"):
        parser.add_argument(name, required=True)
    for name in ("--lora-r", "--max-steps", "--warmup-steps", "--batch-size", "--max-length", "--seed"):
        parser.add_argument(name, type=int, required=True)
    parser.add_argument("--eval-fraction", type=float, required=True)
    parser.add_argument("--lr", type=float, required=True)
    return parser.parse_args(argv)


def ordered_examples(args: argparse.Namespace, tokenizer: Any) -> list[Any]:
    """The examples of every micro-batch ``llm-neo distill`` trains on, in its order, flattened."""
    from llm_neo.config import TokenizeOptions
    from llm_neo.data import micro_batch, read_examples, split_heldout

    _, examples, _ = read_examples(args.data, tokenizer, TokenizeOptions(max_length=args.max_length))
    train, _ = split_heldout(examples, args.eval_fraction, args.seed)
    return [ex for k in range(args.max_steps) for ex in micro_batch(train, args.batch_size, args.seed, k)]


def main(argv: list[str]) -> int:
    import accelerate
    import datasets
    import peft
    import torch
    import transformers
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from llm_neo.data import collate
    from llm_neo.models.anatomy import default_target_modules

    args = parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(args.student)
    examples = ordered_examples(args, tokenizer)
    student = AutoModelForCausalLM.from_pretrained(args.student, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher, dtype=torch.float32)
    peft_config = (
        peft.LoraConfig(
            r=args.lora_r,
            lora_alpha=2 * args.lora_r,
            lora_dropout=0.0,
            target_modules=default_target_modules(student),
            task_type="CAUSAL_LM",
        )
        if args.lora_r > 0
        else None
    )
    losses: list[float] = []
    step_times: list[float] = []

    class Trainer(GKDTrainer):
        def compute_loss(self, model: Any, inputs: Any, *rest: Any, **kwargs: Any) -> Any:
            loss = super().compute_loss(model, inputs, *rest, **kwargs)
            losses.append(float(loss.detach()))  # the exact value: TRL's log rounds it to 4 digits
            return loss

    class Clock(TrainerCallback):
        def on_step_begin(self, *_: Any, **__: Any) -> None:
            self.start = time.perf_counter()

        def on_step_end(self, *_: Any, **__: Any) -> None:
            step_times.append(time.perf_counter() - self.start)

    with tempfile.TemporaryDirectory(prefix="peer-trl-") as out:
        config = GKDConfig(
            output_dir=out,
            lmbda=0.0,
            beta=0.0,
            max_steps=args.max_steps,
            per_device_train_batch_size=args.batch_size,
            gradient_accumulation_steps=1,
            learning_rate=args.lr,
            max_grad_norm=1.0,
            bf16=False,  # TRL's default is bf16 autocast; llm-neo trains fp32 on a CPU (the loss check)
            max_length=args.max_length,
            seed=args.seed,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            use_cpu=not torch.cuda.is_available(),
            dataloader_num_workers=0,
            train_sampling_strategy="sequential",  # llm-neo's order, already drawn
            disable_tqdm=True,
        )
        trainer = Trainer(
            model=student,
            teacher_model=teacher,
            args=config,
            train_dataset=datasets.Dataset.from_dict({"index": list(range(len(examples)))}),
            processing_class=tokenizer,
            data_collator=lambda rows: collate(
                [examples[row["index"]] for row in rows], tokenizer.pad_token_id
            ),
            peft_config=peft_config,
            callbacks=[Clock()],
        )
        wrapped: torch.nn.Module | None = trainer.model  # the PEFT-wrapped student, with a LoRA config
        assert wrapped is not None
        trainable = sum(int(p.numel()) for p in wrapped.parameters() if p.requires_grad)
        started = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - started
    timed = step_times[args.warmup_steps :] or step_times
    result = {
        "losses": losses,
        "step_times_s": step_times,
        "step_s": statistics.median(timed) if timed else None,
        "train_time_s": train_s,
        "trainable_parameters": trainable,
        "versions": {
            "trl": trl.__version__,
            "accelerate": accelerate.__version__,
            "datasets": datasets.__version__,
            "peft": peft.__version__,
            "transformers": transformers.__version__,
        },
    }
    with open(args.result, "w") as handle:
        json.dump(result, handle)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
