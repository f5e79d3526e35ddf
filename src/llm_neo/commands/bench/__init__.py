"""`llm-neo bench`: peak memory and throughput of each arm and loss implementation, on named shapes.

For a shape (``llm_neo.commands.shapes``: real Llama shapes or small CPU ones), random-initialised teacher and
student are built directly on the device (nothing is downloaded), and each run (an arm × a loss
implementation) trains a few warm-up and timed steps through ``llm_neo.distill.train_step``, the function
``llm-neo distill`` runs, on random tokens. Every token of the B×T batch except each sequence's first is a
target (labels = inputs; ``next_token_targets`` shifts them), so N = B·(T−1) positions are trained.

Each run goes in a fresh subprocess (``--isolate``, the default), so that one run's memory cannot leak
into the next's and an out-of-memory error ends only that run. Peak memory is
``torch.cuda.max_memory_allocated`` on a GPU (reset after the models are built, so it includes the
weights) and the process's peak resident set on a CPU (so it includes the ~0.4 GiB of Python, torch and
transformers); without isolation on a CPU it is the peak of live tensor bytes, counted op by op.

Runs may be quantized variants, spelled as ``llm-neo compare`` spells its arms
(``llm_neo.config.parse_arm``): ``neo+int8-teacher:chunked`` quantizes the random teacher's block linears
in place right after it is built (``llm_neo.models.quant.quantize_teacher``), ``neo+nf4-student:chunked``
quantizes the random dense student's (the layout ``load_quantized_base`` gives a QLoRA base) before the
adapters are attached; each row records the weight bytes before and after, and its plan the same
quantization.

Whole runs (``--whole-runs``) are what users see: the same random teacher and student are saved once
(safetensors, with a word-level tokenizer of exactly the shape's vocabulary) beside a data file of
records of exactly ``seq_len`` tokens, and each entry runs a whole ``python -m llm_neo distill`` process
(load, steps, merge check, save, held-out evaluation) for ``warmup_steps + steps`` optimizer steps. Its
peak is the process's own peak resident set, from ``os.wait4`` (``ru_maxrss``) in a minimal launcher
process so that nothing of this process's size is inherited; it is set against the run's own
training-step peak (summary.json's ``peak_memory_gb``), and the launcher's sampling of the process's
VmRSS/VmHWM says which phase set it.

With ``--peers trl`` (``commands.bench.peers``), TRL's ``GKDTrainer`` runs on the same saved inputs and
batches, with and without a LoRA branch, each in its own process measured as the whole runs are; the
report sets them beside llm-neo's ``neo`` and ``kd`` whole runs and checks that step 1's losses agree.

The report (Markdown and JSON, printed and written to ``--output``) gives each run's peak, tokens/s and the
ratios to plain full-parameter KD, the planner's estimate (``llm_neo.commands.plan``) next to each
measurement, the whole runs, and the acceptance targets (benchmarks/targets.yaml) with PASS/FAIL.
"""

from llm_neo.commands.bench.command import bench, run_bench
from llm_neo.commands.bench.output import format_report
from llm_neo.commands.bench.runs import BenchConfig, RunKey, RunSpec
from llm_neo.commands.bench.step import run_one
from llm_neo.commands.bench.targets import check_targets, quantization_cuts
from llm_neo.commands.bench.whole import (
    WHOLE_PHASES,
    WholeInputs,
    prepare_whole_runs,
    run_whole,
    whole_run_phases,
    write_token_records,
)

__all__ = [
    "WHOLE_PHASES",
    "BenchConfig",
    "RunKey",
    "RunSpec",
    "WholeInputs",
    "bench",
    "check_targets",
    "format_report",
    "prepare_whole_runs",
    "quantization_cuts",
    "run_bench",
    "run_one",
    "run_whole",
    "whole_run_phases",
    "write_token_records",
]
