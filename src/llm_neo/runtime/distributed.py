"""Many processes, one result: FSDP2 sharding of student and teacher over torch.distributed.

A run is distributed when it is launched by `torchrun` or `accelerate launch` (they set WORLD_SIZE,
RANK, LOCAL_RANK, MASTER_ADDR/PORT); otherwise every function here is the identity of one process.

What is sharded, and why this way:
- Every decoder block (``model.layers``, ``transformer.h``, ``gpt_neox.layers``: whatever
  ``decoder_blocks`` finds) and the decoder itself (embeddings, final norm) of both models are wrapped with
  ``fully_shard``, so each rank holds 1/world of their weights, gradients and AdamW states; the teacher
  too (the official LLM-Neo code replicates it on every rank).
- The lm_head stays whole on every rank. The chunked loss multiplies hidden states by the head weight
  directly, never through the module's forward, which is where FSDP would gather a sharded weight.
  That costs one vocab × hidden matrix per model and rank (about 6% of an 8B model). A tied head is the
  embedding matrix, so for tied models the embeddings stay whole as well.
- Gradients are summed over ranks, not averaged (``set_gradient_divide_factor(1)``), because the loss is
  already normalised by the global count of trained tokens; the whole trainable parameters that FSDP
  does not manage have their gradients all-reduced here. So N processes with the same global batch
  compute the same update as one.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from llm_neo.errors import ModelError


@dataclass(frozen=True)
class World:
    """This process's place in the run; ``size == 1`` means a single process, no process group."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    # Whether this World set the process group up (and so ``close`` ends it). A caller that runs several
    # runs in one launch (compare) sets the group up once and keeps it across them, so that no rank can
    # join the next run's group while rank 0 still finishes the last run alone.
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_world(device: str) -> World:
    """Join the process group set up by the launcher, if any; pick this rank's device."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    owns = not dist.is_initialized()
    if owns:
        use_cuda = device != "cpu" and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=30)
        )
    return World(rank=rank, size=size, local_rank=local_rank, owns_group=owns)


def rank_device(world: World, device: torch.device) -> torch.device:
    """Each rank of a node drives its own GPU."""
    if world.enabled and device.type == "cuda":
        return torch.device("cuda", world.local_rank)
    return device


def shard(
    decoder: torch.nn.Module,
    layers: torch.nn.ModuleList,
    head: torch.nn.Module,
    *,
    param_dtype: torch.dtype | None = None,
) -> None:
    """FSDP2-wrap a model's decoder blocks ``layers`` and its ``decoder`` in place, its lm_head ``head``
    left whole (see the module docstring). ``models.anatomy`` finds the three for each family; they are
    handed in because runtime sits below models (the layer contract), so the anatomy has one home."""
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError as err:  # fully_shard became public (with ignored_params) in torch 2.7
        raise ModelError(
            "multi-process distillation needs torch >= 2.7 (FSDP2 fully_shard): upgrade torch"
        ) from err
    keep_whole = {p for p in head.parameters()} & set(decoder.parameters())  # a tied head
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for layer in layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(decoder, mp_policy=policy, ignored_params=keep_whole or None)
    for module in [*layers, decoder]:
        module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no pre-multiplied sum


def is_sharded(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (a collective for sharded tensors: all ranks must call it)."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor  # type: ignore[attr-defined]


def all_reduce_sum(value: float, world: World, device: torch.device) -> float:
    if not world.enabled:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor.item())


def sync_whole_grads(params: list[torch.nn.Parameter], world: World) -> None:
    """Sum the gradients of trainable parameters that FSDP does not shard (a tied head, for example)."""
    if not world.enabled:
        return
    for p in params:
        if p.grad is not None and not is_sharded(p):
            dist.all_reduce(p.grad)


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float, world: World) -> torch.Tensor:
    """The global gradient norm over all ranks' shards; gradients scaled down to ``max_norm`` if above.

    torch's clip_grad_norm_ cannot mix sharded and whole gradients; squares of the local shards are
    summed over ranks, whole gradients (identical on every rank after syncing) are counted once.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    if not world.enabled:
        norm = torch.nn.utils.get_total_norm(grads)
    else:
        device = grads[0].device
        sharded = torch.zeros((), dtype=torch.float64, device=device)
        whole = torch.zeros((), dtype=torch.float64, device=device)
        for g in grads:
            if is_sharded(g):
                sharded += g.to_local().double().pow(2).sum()  # type: ignore[attr-defined]
            else:
                whole += g.double().pow(2).sum()
        dist.all_reduce(sharded)
        norm = (sharded + whole).sqrt().float()
    if max_norm > 0:
        if world.enabled:  # one tensor at a time: foreach kernels refuse a mix of DTensors and tensors
            scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            for g in grads:
                g.mul_(scale.to(g.device) if not is_sharded(g) else scale.item())
        else:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


def gather_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole CPU copies of possibly sharded tensors (a collective: every rank must call it)."""
    return {name: full_tensor(t.detach()).to("cpu").contiguous().clone() for name, t in tensors.items()}


def load_whole_into(param: torch.Tensor, whole: torch.Tensor) -> None:
    """Copy a whole tensor into ``param``, keeping only this rank's shard when ``param`` is sharded."""
    with torch.no_grad():
        if is_sharded(param):
            from torch.distributed.tensor import distribute_tensor

            local = distribute_tensor(
                whole.to(param.device, param.dtype),
                param.device_mesh,  # type: ignore[attr-defined]
                param.placements,  # type: ignore[attr-defined]
            )
            param.to_local().copy_(local.to_local())  # type: ignore[attr-defined]
        else:
            param.copy_(whole.to(param.device, param.dtype))


def gather_optimizer(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state dict with whole tensors, the same on disk for any number of ranks."""
    state = optimizer.state_dict()
    return {
        "state": {
            idx: {k: full_tensor(v).to("cpu").clone() if torch.is_tensor(v) else v for k, v in s.items()}
            for idx, s in state["state"].items()
        },
        "param_groups": state["param_groups"],
    }


def load_optimizer(optimizer: torch.optim.Optimizer, whole: dict[str, Any]) -> None:
    """Load a ``gather_optimizer`` state, re-sharding each state tensor like its parameter."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict[str, Any]] = {}
    for idx, saved in whole["state"].items():
        param = params[int(idx)]
        state[int(idx)] = {}
        for key, value in saved.items():
            if torch.is_tensor(value) and value.shape == param.shape and is_sharded(param):
                target = torch.empty_like(param)
                load_whole_into(target, value)
                state[int(idx)][key] = target
            else:
                state[int(idx)][key] = value
    optimizer.load_state_dict({"state": state, "param_groups": whole["param_groups"]})


def barrier(world: World) -> None:
    if world.enabled:
        dist.barrier()


def close(world: World) -> None:
    """End the process group, if this World set it up."""
    if world.enabled and world.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def all_gather(value: Any, world: World) -> list[Any]:
    """``value`` of every rank, in rank order (``[value]`` in one process)."""
    if not world.enabled:
        return [value]
    values: list[Any] = [None] * world.size
    dist.all_gather_object(values, value)
    return values


def local_numel(model: torch.nn.Module | None) -> int:
    """Parameters this process holds of ``model`` (its shards, plus whatever is kept whole)."""
    if model is None:
        return 0
    local = [p.to_local() if is_sharded(p) else p for p in model.parameters()]  # type: ignore[attr-defined]
    return sum(int(p.numel()) for p in local)


def broadcast(value: Any, world: World) -> Any:
    """Rank 0's ``value`` on every rank (``value`` itself in one process)."""
    if not world.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def first_failure(failed: str | None, world: World, device: torch.device) -> tuple[int, str] | None:
    """(rank, message) of the lowest rank whose ``failed`` is a message, or None when no rank failed.

    Every rank must call it at the same point: a rank that failed calls it instead of its next
    collective, so the others learn of the failure there rather than wait for it until the timeout.
    The flag is summed first (one scalar); the messages are gathered only when one is set."""
    if not world.enabled:
        return None if failed is None else (0, failed)
    if all_reduce_sum(float(failed is not None), world, device) == 0:
        return None
    messages = all_gather(failed, world)
    return next((rank, m) for rank, m in enumerate(messages) if m is not None)
