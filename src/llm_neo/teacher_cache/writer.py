"""Writing a cache: the teacher's top-k targets, shard by shard, atomically and resumably."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import torch
from safetensors import safe_open
from safetensors.torch import save as save_safetensors
from tqdm.auto import tqdm

from llm_neo import __version__
from llm_neo.config import CacheTeacherConfig, validate_cache_teacher
from llm_neo.cross_tokenizer import CrossRun, cross_batch, cross_targets, read_cross_data
from llm_neo.data import Example, collate, read_examples
from llm_neo.errors import CacheError, ConfigError
from llm_neo.losses import IGNORE_INDEX, TopKTargets, next_token_targets
from llm_neo.models.anatomy import final_hidden_states, fsdp_parts, logit_width, model_logits
from llm_neo.models.loading import (
    autocast,
    check_supported,
    load_config,
    load_model,
    load_tokenizer,
    load_tokenizers,
    resolve_device,
    resolve_dtype,
)
from llm_neo.models.quant import dense_weight_bytes, load_teacher
from llm_neo.records import to_json
from llm_neo.runtime.atomic import (
    atomic_write_bytes,
    atomic_write_json,
    clean_temporaries,
    writing,
)
from llm_neo.runtime.distributed import (
    World,
    all_gather,
    broadcast,
    close,
    first_failure,
    init_world,
    local_numel,
    rank_device,
)
from llm_neo.runtime.distributed import (
    shard as fsdp_shard,
)
from llm_neo.runtime.integrity import check_file
from llm_neo.runtime.lock import hold, releases_locks
from llm_neo.runtime.memory import peak_memory_gb
from llm_neo.runtime.progress import ProgressLines
from llm_neo.sampling import (
    Sampling,
    longest_response,
    response_example,
    response_start,
    sample_responses,
    seed_of,
    stop_token_ids,
)
from llm_neo.teacher_cache.key import cross_key, key_differences, key_digest, run_key, samples_key
from llm_neo.teacher_cache.store import FORMAT, KEY_FILE, LOGPROB_DTYPES, MANIFEST, VERSION, read_record

log = logging.getLogger("llm_neo")
T = TypeVar("T")


def teacher_topk(
    teacher: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    *,
    vocab_size: int,
    top_k: int,
    temperature: float,
    device: torch.device,
    dtype: torch.dtype,
    chunk_size: int = 1024,
) -> TopKTargets:
    """The teacher's top-k targets at the trained positions of a collated batch (row-major), in fp32.

    The lm_head runs chunk by chunk of tokens, so no [tokens, V] logits exist for the batch.
    """
    input_ids = batch["input_ids"].to(device)
    attention_mask = batch["attention_mask"].to(device)
    trained = next_token_targets(batch["labels"]).to(device) != IGNORE_INDEX  # [B, T]
    ids, log_probs, tails = [], [], []
    with torch.inference_mode():
        with autocast(device, dtype):
            hidden = final_hidden_states(teacher, input_ids, attention_mask)[trained]  # [N, H]
        for start in range(0, hidden.shape[0], chunk_size):
            with autocast(device, dtype):
                logits = model_logits(teacher, hidden[start : start + chunk_size])  # [C, V_t]
            log_p = torch.log_softmax(logits.float()[:, :vocab_size] / temperature, dim=-1)  # [C, V]
            top_values, top_ids = log_p.topk(top_k, dim=-1)  # [C, k], most probable first
            rest = log_p.scatter(-1, top_ids, float("-inf"))  # [C, V]: the columns outside the top-k
            ids.append(top_ids.to(torch.int32))
            log_probs.append(top_values)
            tails.append(torch.logsumexp(rest, dim=-1))  # [C]; -inf when k == V
    if not ids:
        return TopKTargets(torch.zeros(0, top_k, dtype=torch.int32), torch.zeros(0, top_k), torch.zeros(0))
    return TopKTargets(torch.cat(ids).cpu(), torch.cat(log_probs).cpu(), torch.cat(tails).cpu())


def _batches(examples: Sequence[Example], batch_size: int) -> list[list[int]]:
    """The teacher's micro-batches of a shard: indices into ``examples``, longest first, so a batch pads
    little (the results go back to example order when the shard is assembled)."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


# An example's cached rows: its targets at its trained positions, and with --cross-tokenizer which of
# them have one (the KD row mask; None: every row).
Rows = tuple[TopKTargets, torch.Tensor | None]


def _batch_targets(
    teacher: torch.nn.Module,
    examples: Sequence[Example],
    chosen: list[int],
    *,
    config: CacheTeacherConfig,
    inputs: _Inputs,
    device: torch.device,
    dtype: torch.dtype,
) -> dict[int, Rows]:
    """The rows of examples ``chosen`` (indices into ``examples``), from one teacher forward; across
    tokenizers the teacher reads its own tokens and its targets are those distill's online
    ``cross_tokenizer.cross_targets`` computes, at the student's trained positions."""
    picked = [examples[i] for i in chosen]
    batch = collate(picked, inputs.tokenizer.pad_token_id)
    counts = (next_token_targets(batch["labels"]) != IGNORE_INDEX).sum(dim=1).tolist()
    kd_rows: torch.Tensor | None = None
    if inputs.cross is not None:
        batch |= cross_batch(picked, inputs.cross)
        found_all, kd_rows = cross_targets(
            teacher,
            batch,
            inputs.cross.pair,
            sum(counts),
            device=device,
            dtype=dtype,
            temperature=config.kd_temperature,
            chunk_size=config.chunk_size,
        )
        targets = TopKTargets(found_all.ids.to(torch.int32), found_all.log_probs, found_all.tail).to("cpu")
        kd_rows = kd_rows.cpu()
    else:
        targets = teacher_topk(
            teacher,
            batch,
            vocab_size=len(inputs.tokenizer),
            top_k=config.top_k,
            temperature=config.kd_temperature,
            device=device,
            dtype=dtype,
            chunk_size=config.chunk_size,
        )
    found: dict[int, Rows] = {}
    row = 0
    for i, count in zip(chosen, counts, strict=True):
        found[i] = (targets.slice(row, row + count), None if kd_rows is None else kd_rows[row : row + count])
        _refuse_non_finite(found[i][0], examples[i], config.teacher)
        row += count
    return found


def _idle_forward(teacher: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """A one-token forward whose output is discarded: a rank whose share of a sharded teacher's forwards
    is done runs these, so that every rank joins each forward's parameter all-gathers (one that skipped
    them would leave the others waiting)."""
    ids = torch.zeros(1, 1, dtype=torch.long, device=device)
    with torch.inference_mode(), autocast(device, dtype):
        final_hidden_states(teacher, ids, torch.ones_like(ids))


def _shard_tensors(
    per_example: dict[int, Rows], config: CacheTeacherConfig, samples: Sequence[Example] | None
) -> dict[str, torch.Tensor]:
    """The tensors of one shard: its examples' targets, concatenated in example order; with ``samples``
    (a cache of student samples) also their tokens, which distill trains on instead of the data's:

        input_ids        [L]    int32  prompt + response of every sample, concatenated
        input_offsets    [n+1]  int64  sample i is input_ids[input_offsets[i]:input_offsets[i+1]]
        response_starts  [n]    int64  where its response starts (its prompt is not trained)

    and with --cross-tokenizer ``kd_rows [P] bool``: the rows that have a target (the others hold a
    placeholder the loss never reads).
    """
    parts = [per_example[i][0] for i in range(len(per_example))]
    lengths = [p.ids.shape[0] for p in parts]
    offsets = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int64)
    store = LOGPROB_DTYPES[config.logprob_dtype]
    tensors = {
        "offsets": offsets,
        "ids": torch.cat([p.ids for p in parts]).contiguous(),
        "log_probs": torch.cat([p.log_probs for p in parts]).to(store).contiguous(),
        "tail": torch.cat([p.tail for p in parts]).to(store).contiguous(),
    }
    masks = [per_example[i][1] for i in range(len(per_example))]
    if masks and masks[0] is not None:
        tensors["kd_rows"] = torch.cat([m for m in masks if m is not None]).to(torch.bool).contiguous()
    if samples is not None:
        sizes = [len(ex.input_ids) for ex in samples]
        tensors |= {
            "input_ids": torch.tensor([t for ex in samples for t in ex.input_ids], dtype=torch.int32),
            "input_offsets": torch.tensor([0, *itertools.accumulate(sizes)], dtype=torch.int64),
            "response_starts": torch.tensor([response_start(ex) for ex in samples], dtype=torch.int64),
        }
    return tensors


def _refuse_non_finite(targets: TopKTargets, example: Example, teacher: str) -> None:
    """CacheError at the first example whose teacher log-probs hold a NaN or infinity.

    Cached, they would make every student trained from the cache fail at its first step, blamed on the
    learning rate. The tail is -inf when k == V (nothing outside the top-k), so only NaN and +inf count
    there."""
    bad_top = ~torch.isfinite(targets.log_probs)
    bad_tail = targets.tail.isnan() | (targets.tail == float("inf"))
    if not (bool(bad_top.any()) or bool(bad_tail.any())):
        return
    positions = int((bad_top.any(dim=-1) | bad_tail).sum())
    raise CacheError(
        f"the teacher {teacher} gives non-finite log-probs (NaN or inf) on example {example.index} of "
        f"--data (0-based, among the tokenized examples), at {positions} of its {targets.ids.shape[0]} "
        "trained positions; nothing of this shard was written. Its weights are finite (checked at load), so "
        "its logits overflow in this precision: run with --dtype float32, or check the teacher"
    )


def _trained_positions(example: Example) -> int:
    """Positions trained in ``example``: those whose next-token target (the label to the right) is kept."""
    return sum(1 for label in example.labels[1:] if label != IGNORE_INDEX)


def _shard_metadata(digest: str, first_example: int) -> dict[str, str]:
    # One entry: safetensors writes a metadata map in hash order, so two entries would make the bytes
    # of identical shards differ from run to run.
    return {"llm_neo": json.dumps({"key": digest, "first_example": first_example}, sort_keys=True)}


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def _complete_shard(path: Path, digest: str, first_example: int) -> dict[str, Any] | None:
    """The record of a complete shard written for key ``digest`` from ``first_example`` on, or None
    (then it is recomputed)."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            positions = int(handle.get_slice("ids").get_shape()[0])
    except Exception:  # a damaged file is simply recomputed
        return None
    if meta != _shard_metadata(digest, first_example):
        return None
    return _shard_record(path.name, positions, path.read_bytes())


def _shard_record(name: str, positions: int, data: bytes) -> dict[str, Any]:
    """What the manifest records of a shard: its file, positions, size and checksum."""
    digest = hashlib.sha256(data).hexdigest()
    return {"file": name, "num_positions": positions, "bytes": len(data), "sha256": digest}


def _prepare_output(out: Path, key: dict[str, Any], overwrite: bool) -> None:
    """Make ``out`` hold this key: resume a cache of the same key, refuse (or replace) another."""
    key_file = out / KEY_FILE
    if key_file.is_file():
        old = read_record(key_file)
        if isinstance(old, str):
            if not overwrite and not _repair_key(out, key, old):
                raise CacheError(
                    f"--output {out}: {key_file} is damaged ({old}) and the shards there were not all "
                    "made for these inputs, so it cannot be told what the cache is. Pass --overwrite to "
                    "replace it, or choose another --output"
                )
            if not overwrite:
                return
            log.warning(
                "teacher cache %s: %s is damaged (%s); --overwrite replaces the cache", out, key_file, old
            )
        elif old == key:
            return
        elif not overwrite:
            lines = "\n".join(f"  - {line}" for line in key_differences(old, key))
            raise CacheError(
                f"--output {out} holds a cache made for other inputs:\n{lines}\n"
                "Choose another --output, or pass --overwrite to replace it."
            )
    elif out.exists() and any(out.iterdir()) and not overwrite:
        raise CacheError(
            f"--output {out} already holds files that are not a teacher cache; choose another --output "
            "or pass --overwrite"
        )
    if out.exists():
        for stale in [*out.glob("shard-*.safetensors"), out / MANIFEST, key_file]:
            stale.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    with writing(key_file, "the cache's key", kept="nothing yet"):
        atomic_write_json(key_file, key)


def _repair_key(out: Path, key: dict[str, Any], problem: str) -> bool:
    """Rewrite a damaged ``key.json`` when every shard in ``out`` carries this key's digest (each shard's
    metadata holds the digest of the key it was made for, so they prove which key the cache had); False
    when a shard was made for another key or cannot be read (then only --overwrite may replace it)."""
    digest = key_digest(key)
    for shard in sorted(out.glob("shard-*.safetensors")):
        try:
            with safe_open(str(shard), framework="pt") as handle:
                made_for = json.loads((handle.metadata() or {}).get("llm_neo", "{}")).get("key")
        except Exception:  # an unreadable shard proves nothing: it may belong to another key
            return False
        if made_for != digest:
            return False
    log.warning(
        "teacher cache %s: %s is damaged (%s); every shard there was made for these inputs, so it is "
        "written again",
        out,
        out / KEY_FILE,
        problem,
    )
    with writing(out / KEY_FILE, "the cache's key", kept="every shard"):
        atomic_write_json(out / KEY_FILE, key)
    return True


def _damaged_shards(out: Path, manifest: dict[str, Any]) -> list[tuple[str, str]]:
    """(file, what is wrong) of every shard of a complete cache that does not match its manifest
    record (size and sha256: this reads the whole cache once)."""
    damaged = []
    for shard in manifest["shards"]:
        problem = check_file(out / shard["file"], shard) if "sha256" in shard else None
        if problem:
            damaged.append((shard["file"], problem))
    return damaged


ShardCallback = Callable[[int, dict[str, Any]], None]


@dataclass
class _Inputs:
    """What the cache is made of: the tokenized data and its key; with --student-samples, how the
    student's responses are drawn (``sampling``) and their cap."""

    tokenizer: Any
    examples: list[Example]
    dropped: int
    key: dict[str, Any]
    digest: str
    sampling: Sampling | None = None
    max_new_tokens: int = 0
    cross: CrossRun | None = None  # --cross-tokenizer: the pair and the data's alignment

    @property
    def rows(self) -> int:
        """The cache's examples: one per data example, or with --student-samples one per sample
        (row r: the (r mod n)-th sample of data example r // n, n = --samples-per-prompt)."""
        return len(self.examples) * (1 if self.sampling is None else self.per_prompt)

    @property
    def per_prompt(self) -> int:
        return int(self.key["sampling"]["samples_per_prompt"]) if self.sampling is not None else 1


@releases_locks
def cache_teacher(config: CacheTeacherConfig, *, on_shard: ShardCallback | None = None) -> dict[str, Any]:
    """Write (or finish) the cache; return its manifest. ``on_shard(index, record)`` after each new shard.

    Under torchrun (or accelerate launch) every rank computes its share of the missing shards (the
    i-th missing shard goes to rank i mod world size), and rank 0 alone locks ``--output``, prepares it,
    verifies every rank's shards and writes the manifest. The shard layout depends on ``--shard-size``
    only, so N ranks write the cache one process writes, and a killed cache resumes at any world size.
    A failure on any rank stops every rank at the same micro-batch, naming it, with no manifest."""
    validate_cache_teacher(config)
    started = time.perf_counter()
    world = init_world(config.device)
    trust = config.trust_remote_code
    teacher_config = load_config(config.teacher, role="teacher", trust_remote_code=trust)
    check_supported(teacher_config, role="teacher", trust_remote_code=trust)  # before any weight loads
    out = Path(config.output).expanduser()
    device = rank_device(world, resolve_device(config.device))
    inputs = _inputs(config, progress=world.is_main)  # every rank: its examples and the key's digest
    done, records = _on_main(world, device, lambda: _open_output(config, out, inputs))
    if done is not None:
        close(world)
        return done
    if world.enabled:  # a node that does not share --output would fail at its first shard, less clearly
        unseen = not (out / KEY_FILE).is_file()
        _stop_together(CacheError(_not_shared(out, world.rank)) if unseen else None, world, device)
    dtype = resolve_dtype(config.dtype, device)
    placement = _teacher_placement(config, teacher_config, world, device, dtype)
    teacher, quantization = _load_cache_teacher(config, inputs, placement, device=device, dtype=dtype)
    shard_size = config.shard_size
    # Each row as its data example; a cache of samples draws a shard's samples when it computes it.
    rows = [inputs.examples[r // inputs.per_prompt] for r in range(inputs.rows)]
    shards = [rows[i : i + shard_size] for i in range(0, len(rows), shard_size)]
    student = None
    if config.student_samples:
        student = load_model(
            config.student_samples,
            role="student",
            dtype=dtype,
            device=device,
            trust_remote_code=config.trust_remote_code,
            allow_pickle_weights=config.allow_pickle_weights,
        )
        if logit_width(student) < len(inputs.tokenizer):  # its samples must be ids of the cached tokenizer
            raise CacheError(
                f"--student-samples {config.student_samples} has {logit_width(student)} logit columns, "
                f"the tokenizer {len(inputs.tokenizer)} tokens: pass its tokenizer with --tokenizer, or a "
                "student of the teacher's vocabulary"
            )
    share = _write_shards(
        config,
        teacher,
        inputs,
        shards,
        records,
        out,
        student=student,
        world=world,
        placement=placement,
        device=device,
        dtype=dtype,
        on_shard=on_shard,
    )
    del teacher, student
    shares = all_gather(share, world)

    def finish() -> dict[str, Any]:  # rank 0, once every rank is done
        problem = _collect_records(out, inputs.digest, shards, shard_size, records, shares)
        if problem is not None:
            raise CacheError(problem)
        manifest = _manifest(config, inputs, shards, records, teacher_dtype=dtype)
        if quantization is not None:
            manifest["teacher_quant"] = quantization  # distill records it as its run's teacher_quant
        manifest |= _world_record(shares, placement, wall_s=time.perf_counter() - started)
        kept = f"all {len(shards)} shards; run the command again"
        with writing(out / MANIFEST, "the cache's manifest", kept=kept):
            atomic_write_json(out / MANIFEST, manifest)  # last: its presence means the cache is complete
        return manifest

    manifest = _on_main(world, device, finish)
    close(world)
    return dict(manifest)


def _on_main(world: World, device: torch.device, step: Callable[[], T]) -> T:
    """``step()`` run by rank 0 alone, its result on every rank; a failure there stops every rank."""
    if not world.enabled:
        return step()
    result, error = None, None
    if world.is_main:
        try:
            result = step()
        except Exception as err:  # the others must learn of it, not wait for rank 0 until the timeout
            error = err
    _stop_together(error, world, device)
    return cast(T, broadcast(result, world))


def _stop_together(error: BaseException | None, world: World, device: torch.device) -> None:
    """Raise on every rank when any rank failed (each rank calls this at the same point): the failed
    rank its own error, the others a CacheError with its message and rank."""
    failure = first_failure(None if error is None else str(error), world, device)
    if failure is None:
        return
    if error is not None:
        raise error
    rank, message = failure
    raise CacheError(
        f"rank {rank} of {world.size} failed, so every rank stopped and no manifest was written: {message}"
    )


def _open_output(
    config: CacheTeacherConfig, out: Path, inputs: _Inputs
) -> tuple[dict[str, Any] | None, dict[int, dict[str, Any]]]:
    """Lock and prepare ``--output`` for this key (rank 0's part): the manifest of a complete, intact
    cache (then nothing is left to do), else None and the records of the shards already complete."""
    hold(out, "cache-teacher", "--output")  # refuses a path that cannot be written, too
    _prepare_output(out, inputs.key, config.overwrite)
    clean_temporaries(out)  # what a killed run left half-written
    if (out / MANIFEST).is_file():
        manifest = read_record(out / MANIFEST)
        if isinstance(manifest, str):
            # The shards carry the key's digest and their own sizes; their sha256 is computed again.
            log.warning(
                "teacher cache %s: %s is damaged (%s); rebuilding it from the shards made for these "
                "inputs (only missing or unreadable ones are computed again)",
                out,
                out / MANIFEST,
                manifest,
            )
            (out / MANIFEST).unlink()
        elif manifest.get("key") == inputs.key:
            damaged = _damaged_shards(out, manifest)
            if not damaged:
                log.info(
                    "teacher cache %s is complete, matches and every shard is intact; nothing to do", out
                )
                return dict(manifest), {}
            for name, problem in damaged:
                log.warning(
                    "teacher cache %s: shard %s is damaged (%s); computing it again", out, name, problem
                )
            (out / MANIFEST).unlink()  # incomplete again until the damaged shards are rewritten
            for name, _ in damaged:
                (out / name).unlink(missing_ok=True)
    shard_size = config.shard_size
    records: dict[int, dict[str, Any]] = {}
    for s in range(-(-len(inputs.examples) // shard_size)):
        found = _complete_shard(out / _shard_name(s), inputs.digest, s * shard_size)
        if found is not None:
            records[s] = found
    if records:
        log.info("resuming: %d shards are complete (whichever ranks wrote them)", len(records))
    return None, records


def _not_shared(out: Path, rank: int) -> str:
    return (
        f"rank {rank} does not see {out / KEY_FILE}, which rank 0 wrote: --output must be the same "
        "directory on every node (a filesystem they all share, at the same path)"
    )


def _teacher_placement(
    config: CacheTeacherConfig, teacher_config: Any, world: World, device: torch.device, dtype: torch.dtype
) -> str:
    """``replicate`` or ``fsdp``: what ``--teacher-shard`` means for this launch. auto shards a teacher
    whose dense weights exceed 80% of the GPU's memory (the rest is for the activations and the lm_head's
    logit chunks); on a CPU, or quantized (FSDP2 cannot shard quantized tensors), it is replicated."""
    if not world.enabled:
        return "replicate"  # one process: nothing to shard over
    if config.teacher_shard != "auto":
        return config.teacher_shard
    if device.type != "cuda" or config.teacher_quant != "none":
        return "replicate"
    weights = dense_weight_bytes(teacher_config, dtype)
    memory = torch.cuda.get_device_properties(device).total_memory
    return "fsdp" if weights > 0.8 * memory else "replicate"


def _load_cache_teacher(
    config: CacheTeacherConfig, inputs: _Inputs, placement: str, *, device: torch.device, dtype: torch.dtype
) -> tuple[torch.nn.Module, dict[str, Any] | None]:
    """The teacher, whole on ``device`` or (``fsdp``) loaded on the host and sharded across the ranks,
    each rank's blocks on ``device`` and its lm_head whole there (see ``runtime.distributed``)."""
    # A quantized teacher's drift from its unquantized self, on the first batch of the data.
    drift_batch = collate(inputs.examples[: config.batch_size], inputs.tokenizer.pad_token_id)
    load_on = torch.device("cpu") if placement == "fsdp" else device
    teacher, quantization = load_teacher(
        config, config.teacher, dtype=dtype, device=load_on, drift_batch=drift_batch
    )
    if placement == "fsdp":
        fsdp_shard(*fsdp_parts(teacher))  # FSDP2 moves each rank's shards to the mesh's device
        torch.nn.Module.to(teacher, device)  # the parts it keeps whole (the lm_head; a tied embedding)
    vocab_size = len(inputs.tokenizer) if inputs.cross is None else inputs.cross.pair.teacher_vocab
    if logit_width(teacher) < vocab_size:
        raise CacheError(
            f"the teacher has {logit_width(teacher)} logit columns but the tokenizer {vocab_size} tokens"
        )
    return teacher, quantization


def _inputs(config: CacheTeacherConfig, *, progress: bool = True) -> _Inputs:
    """The data tokenized as the student's distill run will tokenize it, and the cache's key."""
    if config.cross_tokenizer:
        return _cross_inputs(config, progress=progress)
    # Another tokenizer (the student's) is checked against the teacher's; the teacher's own needs no check.
    tokenizer, teacher_tokenizer = load_tokenizers(
        config.tokenizer or config.teacher,
        config.teacher if config.tokenizer else None,
        role="tokenizer",
        trust_remote_code=config.trust_remote_code,
    )
    if config.top_k > len(tokenizer):
        vocabulary = f"the vocabulary ({len(tokenizer)} tokens)"
        raise ConfigError([f"--top-k: {config.top_k} is larger than {vocabulary}"])
    _, examples, dropped = read_examples(
        config.data, tokenizer, config, teacher_tokenizer=teacher_tokenizer, progress=progress
    )
    key = run_key(config, tokenizer=tokenizer, examples=examples)
    # The layout is part of what a resumed cache must share with its first half (distill needs any k).
    key |= {"top_k": config.top_k, "logprob_dtype": config.logprob_dtype, "shard_size": config.shard_size}
    if not config.student_samples:
        return _Inputs(tokenizer, examples, dropped, key, key_digest(key))
    promptless = sum(1 for ex in examples if response_start(ex) == 0)
    if promptless:
        raise ConfigError(
            [
                f"--student-samples: {promptless} of {len(examples)} examples have no prompt (text records "
                "train on every token), so the student has nothing to answer; use records with a response "
                "(alpaca, chat, prompt/completion)"
            ]
        )
    key |= samples_key(config)
    # As distill's --on-policy resolves them (stop tokens, the default cap), from all the data's examples.
    sampling = Sampling(
        temperature=config.sample_temperature,
        top_p=config.sample_top_p,
        stop_ids=tuple(stop_token_ids(tokenizer, examples)),
        pad_id=int(tokenizer.pad_token_id),
    )
    cap = config.sample_max_new_tokens or longest_response(examples)
    return _Inputs(tokenizer, examples, dropped, key, key_digest(key), sampling, cap)


def _cross_inputs(config: CacheTeacherConfig, *, progress: bool) -> _Inputs:
    """The data tokenized for the student (--tokenizer) and aligned with the teacher's tokenization, as
    distill --cross-tokenizer aligns it; the key adds the method and the teacher's tokenizer."""
    assert config.cross_tokenizer and config.tokenizer
    tokenizer, examples, _, dropped, cross = read_cross_data(
        config,
        student=config.tokenizer,
        teacher=config.teacher,
        method=config.cross_tokenizer,
        top_k=config.top_k,
        progress=progress,
    )
    trust = config.trust_remote_code
    teacher_tokenizer = load_tokenizer(config.teacher, role="teacher", trust_remote_code=trust)
    key = run_key(config, tokenizer=tokenizer, examples=examples)
    key |= {"top_k": config.top_k, "logprob_dtype": config.logprob_dtype, "shard_size": config.shard_size}
    key |= cross_key(config.cross_tokenizer, teacher_tokenizer)
    return _Inputs(tokenizer, examples, dropped, key, key_digest(key), cross=cross)


def _draw_samples(
    student: Any,
    inputs: _Inputs,
    first: int,
    count: int,
    config: CacheTeacherConfig,
    *,
    device: torch.device,
    dtype: torch.dtype,
) -> list[Example]:
    """Rows ``first`` .. ``first + count`` of a cache of student samples: each data example's prompt,
    rendered as training renders it, answered by the student (``sampling.sample_responses``, as
    distill's --on-policy answers it), one sample at a time seeded by (data example, sample index):
    what a row holds depends on nothing else (not the shard, the batch or the number of ranks)."""
    assert inputs.sampling is not None
    rows = []
    for row in range(first, first + count):
        record, j = divmod(row, inputs.per_prompt)
        example = inputs.examples[record]
        prompt = example.input_ids[: response_start(example)]
        cap = min(inputs.max_new_tokens, config.max_length - len(prompt))  # as a training example fits
        with autocast(device, dtype):
            (response,) = sample_responses(
                student, [prompt], [cap], inputs.sampling, seed=seed_of(record, j), device=device
            )
        rows.append(response_example(prompt, response, index=row))
    return rows


def _write_shards(
    config: CacheTeacherConfig,
    teacher: torch.nn.Module,
    inputs: _Inputs,
    shards: list[list[Example]],
    records: dict[int, dict[str, Any]],
    out: Path,
    *,
    student: Any = None,
    world: World,
    placement: str,
    device: torch.device,
    dtype: torch.dtype,
    on_shard: ShardCallback | None,
) -> dict[str, Any]:
    """Compute and write this rank's share of the shards not in ``records`` (adding them there);
    returns the share: its shards' records, examples, tokens, seconds, peak memory and the teacher
    parameters it held.

    Every rank runs the same number of steps, one micro-batch each: a rank whose share is done idles
    (a sharded teacher: a discarded one-token forward instead), and after each step the ranks learn
    whether one failed, so a failure stops them all there instead of leaving the others waiting.

    A cache of student samples draws a shard's samples (``student``) when it starts the shard, before
    its first teacher forward; ``tokens`` is then an upper bound (every sample at its cap)."""
    missing = [s for s in range(len(shards)) if s not in records]
    plan = {  # (s, b): the b-th micro-batch of shard s (``_batches``)
        r: [(s, b) for s in missing[r :: world.size] for b in range(-(-len(shards[s]) // config.batch_size))]
        for r in range(world.size)
    }
    work, steps = plan[world.rank], max(len(items) for items in plan.values())
    mine = missing[world.rank :: world.size]
    tokens = sum(_trained_positions(ex) for s in mine for ex in shards[s])
    if inputs.sampling is not None:
        tokens = sum(
            min(inputs.max_new_tokens, config.max_length - response_start(ex))
            for s in mine
            for ex in shards[s]
        )
    examples = sum(len(shards[s]) for s in mine)
    log.info(
        "rank %d of %d: %d of the %d missing shards, %d examples, %d tokens (teacher %s)",
        world.rank,
        world.size,
        len(mine),
        len(missing),
        examples,
        tokens,
        placement,
    )
    bar = tqdm(
        total=tokens,
        desc="cache-teacher",
        unit="tok",
        unit_scale=True,
        disable=None if world.is_main else True,
    )
    # Without a terminal, plain lines instead of the bar (runtime/progress.py); rank 0's share only.
    lines = ProgressLines("cache-teacher", tokens, unit="tokens", enabled=None if world.is_main else False)
    written: dict[int, dict[str, Any]] = {}
    per_example: dict[int, dict[int, Rows]] = {s: {} for s in mine}
    done, generating = 0, 0.0
    loop_start = time.perf_counter()
    for step in range(steps):
        error = None
        if step < len(work):
            s, b = work[step]
            try:
                if b == 0 and student is not None:  # the shard's samples, before its first teacher forward
                    drawn = time.perf_counter()
                    first = s * config.shard_size
                    shards[s] = _draw_samples(
                        student, inputs, first, len(shards[s]), config, device=device, dtype=dtype
                    )
                    generating += time.perf_counter() - drawn
                chosen = _batches(shards[s], config.batch_size)[b]
                per_example[s] |= _batch_targets(
                    teacher, shards[s], chosen, config=config, inputs=inputs, device=device, dtype=dtype
                )
                done += sum(p[0].ids.shape[0] for i, p in per_example[s].items() if i in chosen)
                if len(per_example[s]) == len(shards[s]):
                    samples = shards[s] if student is not None else None
                    tensors = _shard_tensors(per_example.pop(s), config, samples)
                    kept = len(records) + len(written)
                    written[s] = _write_shard(out, s, tensors, inputs, config, kept=kept, total=len(shards))
                    if on_shard is not None:
                        on_shard(s, written[s])
            except Exception as err:  # stops every rank, below; a kill or ^C is the launcher's to spread
                error = err
        elif placement == "fsdp":
            _idle_forward(teacher, device, dtype)
        _stop_together(error, world, device)
        bar.update(done - bar.n)
        lines.update(done, tokens=done)
        elapsed = time.perf_counter() - loop_start
        bar.set_postfix(tok_s=f"{done / max(elapsed, 1e-9):.0f}", refresh=False)
    bar.close()
    return {
        "rank": world.rank,
        "shards": len(mine),
        "examples": examples,
        "tokens": done,
        "seconds": time.perf_counter() - loop_start,
        "peak_memory_gb": peak_memory_gb(device),  # CUDA: max allocated; CPU: the process's peak RSS
        "teacher_parameters": local_numel(teacher),  # held by this rank: 1/world of the blocks when sharded
        "records": written,
    } | ({} if student is None else {"generation_s": generating})


def _write_shard(
    out: Path,
    s: int,
    tensors: dict[str, torch.Tensor],
    inputs: _Inputs,
    config: CacheTeacherConfig,
    *,
    kept: int,
    total: int,
) -> dict[str, Any]:
    """Write shard ``s`` atomically; its manifest record."""
    data = save_safetensors(tensors, metadata=_shard_metadata(inputs.digest, s * config.shard_size))
    name = _shard_name(s)
    rest = f"{kept} complete shards of {total}: the same command computes only the rest"
    with writing(out / name, f"teacher-cache shard {name}", kept=rest):
        atomic_write_bytes(out / name, data)
    return _shard_record(name, int(tensors["ids"].shape[0]), data)


def _collect_records(
    out: Path,
    digest: str,
    shards: list[list[Example]],
    shard_size: int,
    records: dict[int, dict[str, Any]],
    shares: list[dict[str, Any]],
) -> str | None:
    """Rank 0: add every rank's new shards to ``records``, another rank's checked as a resumed one is
    (the file in ``out`` read back: its key digest, first example, size and sha256 against what its rank
    wrote); what is wrong, or None."""
    for share in shares:
        if share["rank"] == 0:  # its own, just written
            records |= share["records"]
            continue
        for s, record in share["records"].items():
            found = _complete_shard(out / record["file"], digest, s * shard_size)
            if found is None or found["sha256"] != record["sha256"]:
                return (
                    f"shard {record['file']}, written by rank {share['rank']}, is "
                    f"{'missing or unreadable' if found is None else 'not the file it wrote'} in {out} as "
                    "rank 0 sees it: every rank must write the same --output directory (on several "
                    "nodes, a filesystem they all share, at the same path). Run the command again: "
                    "the complete shards are kept"
                )
            records[s] = found
    if len(records) != len(shards):
        absent = sorted(set(range(len(shards))) - set(records))
        return f"shards {absent} were not written by any rank; run the command again"
    return None


def _world_record(shares: list[dict[str, Any]], placement: str, *, wall_s: float) -> dict[str, Any]:
    """What the manifest records of the launch that finished the cache: its world size, the teacher's
    placement, each rank's share of the shards it computed, and the throughput of all of them."""
    tokens = sum(share["tokens"] for share in shares)
    compute_s = max(share["seconds"] for share in shares)  # the ranks run side by side
    generation = [share["generation_s"] for share in shares if "generation_s" in share]
    return {
        "world_size": len(shares),
        "teacher_shard": placement,
        "ranks": [{k: v for k, v in share.items() if k != "records"} for share in shares],
        "stats": {
            "tokens_per_s": tokens / max(compute_s, 1e-9),
            "compute_s": compute_s,
            "positions_computed_now": tokens,
            "wall_s": wall_s,
        }
        | ({"generation_s": max(generation)} if generation else {}),
    }


def _manifest(
    config: CacheTeacherConfig,
    inputs: _Inputs,
    shards: list[list[Example]],
    records: dict[int, dict[str, Any]],
    *,
    teacher_dtype: torch.dtype,
) -> dict[str, Any]:
    entries = [
        {**records[s], "first_example": s * config.shard_size, "num_examples": len(examples)}
        for s, examples in enumerate(shards)
    ]
    total_bytes = sum(e["bytes"] for e in entries)
    positions = sum(e["num_positions"] for e in entries)  # of the samples, in a cache of student samples
    samples: dict[str, Any] = {}
    if inputs.sampling is not None:
        samples["student_samples"] = {
            "student": config.student_samples,
            "condition": "on-policy to the initial student",
            "samples_per_prompt": inputs.per_prompt,
            "max_new_tokens": inputs.max_new_tokens,
            "stop_ids": list(inputs.sampling.stop_ids),
        }
    return {
        "format": FORMAT,
        "version": VERSION,
        "key": inputs.key,
        "key_digest": inputs.digest,
        "top_k": config.top_k,
        "vocab_size": len(inputs.tokenizer),
        "logprob_dtype": config.logprob_dtype,
        "shard_size": config.shard_size,
        "num_examples": inputs.rows,
        "num_positions": positions,
        "dropped_examples": inputs.dropped,
        "bytes": total_bytes,
        "bytes_per_token": total_bytes / max(positions, 1),
        "shards": entries,
        "sources": {
            "teacher": config.teacher,
            "tokenizer": config.tokenizer or config.teacher,
            "data": config.data,
        },
        # across tokenizers: the pair report a run from the cache alone writes as its pair.json
        **({} if inputs.cross is None else {"pair": to_json(inputs.cross.report)}),
        "teacher_dtype": str(teacher_dtype).removeprefix("torch."),
        "llm_neo_version": __version__,
    } | samples
