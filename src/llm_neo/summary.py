"""What one distill run reports: ``RunSummary``, written as the run's ``summary.json``.

Every reader of a run (the CLI's table, the demo, the sweep, the comparison report) reads this one
typed record, in memory or from the JSON file, instead of indexing a dict by hand.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUMMARY_FILE = "summary.json"


class MemoryKind(enum.Enum):
    """What a run's ``peak_memory_gb`` measured (``RunSummary.peak_memory_kind`` holds the value)."""

    CUDA_MAX_ALLOCATED = "cuda_max_allocated"  # torch.cuda.max_memory_allocated: live tensors
    PROCESS_MAX_RSS = "process_max_rss"  # the CPU process's peak RSS: runtime and allocator slack too


@dataclass
class OnPolicySummary:
    """What an on-policy run (``--on-policy λ``) sampled and what its generation cost, over all its steps
    (docs/on-policy.md)."""

    share: float  # λ: the probability of a micro-batch being the student's samples
    divergence: str  # D on the samples (--on-policy-divergence)
    sample_temperature: float
    sample_top_p: float
    max_new_tokens: int  # the cap used (--sample-max-new-tokens, or the longest training response)
    micro_batches: int  # all the run's micro-batches, all ranks together
    on_policy_micro_batches: int  # those sampled
    generation_share: float  # of the training wall time, spent generating
    generated_tokens_per_s: float
    mean_generated_length: float | None  # None: nothing was sampled
    capped_share: float | None  # samples that hit the cap without an end-of-turn token
    # A run on a teacher cache of student samples: the student that drew them before training (the run
    # is "on-policy to the initial student": the samples do not follow it as it trains). None: online.
    cached_student: str | None = None


@dataclass
class RunSummary:
    """The outcome of one ``llm-neo distill`` run (the fields of summary.json, in its order)."""

    llm_neo_version: str
    method: str
    config: dict[str, Any]  # the resolved options, as config.yaml holds them
    steps: int  # optimizer steps done
    tokens_trained: int
    samples: dict[str, int]  # train, heldout, dropped
    final: dict[str, float]  # the last step's loss, ce_loss, kd_loss (and on_policy_kd_loss: --on-policy)
    heldout: dict[str, float]  # ce, perplexity, kl_to_teacher, top1_agreement, tokens (empty: no split)
    # What kl_to_teacher / top1_agreement were measured against: "teacher", "teacher_cache" (the cache's
    # top-k + tail buckets, a lower bound of the dense KL) or None.
    heldout_reference: str | None
    teacher_cache: dict[str, Any] | None  # path, key_digest, top_k, temperature
    train_time_s: float
    wall_time_s: float
    peak_memory_gb: float  # the largest rank's; CUDA max allocated, or the CPU process's peak RSS
    peak_memory_gb_per_rank: list[float]
    world_size: int
    teacher_parameters_per_rank: list[int]
    peak_memory_kind: str  # a MemoryKind's value
    # Peak bytes of live tensors: CUDA's max allocated; on a CPU counted op by op over the first steps.
    peak_tensor_memory_gb: float | None
    peak_tensor_memory_steps: int | None
    trainable_parameters: int
    student_parameters: int
    merged_parameters: int
    merge_check: dict[str, Any]  # max_abs_logit_diff, tolerance, passed
    device: str
    dtype: str
    export_dtype: str
    # Quantization (docs/quantization.md): the teacher's (kind, backend, quantized_linears,
    # weight_bytes_before/after, and drift {kl_per_token, top1_agreement, tokens} or drift_skipped) and
    # the QLoRA base's (kind, weight_bytes); None when not quantized.
    teacher_quant: dict[str, Any] | None = None
    student_quant: dict[str, Any] | None = None
    # Every token the steps ran through the student, prompt and response (tokens_trained counts the
    # response tokens the loss is on); None in older summaries or after resuming an older checkpoint.
    tokens_processed: int | None = None
    export: dict[str, Any] | None = None  # distill --export: format, gguf_type, path, bytes, verification
    # Where the result came from (llm_neo.provenance): models, data (path, sha256), versions, the llm-neo
    # checkout's commit, the command, start and end. None in summaries written before it existed.
    provenance: dict[str, Any] | None = None
    on_policy: OnPolicySummary | None = None  # --on-policy runs: what was sampled, what it cost
    # --cross-tokenizer runs: the pair report (records.pair.PairReport as JSON, also pair.json); their
    # held-out divergence is heldout's aligned_kl_to_teacher (heldout_reference "teacher_aligned").
    pair: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # fields a newer llm-neo wrote, kept on re-save

    @property
    def output_dir(self) -> Path:
        return Path(str(self.config["output_dir"]))

    def to_json(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        if self.on_policy is not None:
            data["on_policy"] = dataclasses.asdict(self.on_policy)
        return {**data, **self.extra}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunSummary:
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        if isinstance(known.get("on_policy"), dict):
            known["on_policy"] = OnPolicySummary(**known["on_policy"])
        return cls(**known, extra={k: v for k, v in data.items() if k not in names})

    @classmethod
    def load(cls, path: str | Path) -> RunSummary:
        """The summary of the run in ``path`` (its output dir) or in the summary file ``path``.

        ValueError naming the file when it cannot be read or is not a summary (truncated, not JSON, a
        field missing): a reader decides what a damaged record means (compare runs the arm again).
        """
        file = Path(path)
        if file.is_dir():
            file = file / SUMMARY_FILE
        try:
            data = json.loads(file.read_text())
            if not isinstance(data, dict):
                raise ValueError(f"a JSON {type(data).__name__}, not an object")
            return cls.from_json(data)
        except (OSError, UnicodeDecodeError, ValueError, TypeError) as err:
            # ValueError covers JSONDecodeError; TypeError is a required field missing.
            raise ValueError(f"{file} is damaged ({err})") from err
