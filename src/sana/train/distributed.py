"""Data-parallel training over the processes that torchrun starts: DDP or FSDP2, as `[distributed]` says.

    torchrun --nproc-per-node 8 -m sana train configs/train/sana-600m-1024.toml --set distributed.strategy=fsdp2

torchrun tells each process its place in the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT);
`setup` reads it, joins the process group (NCCL on CUDA, gloo on the CPU) and puts each process on cuda:LOCAL_RANK.
Every process trains on its own share of the batches (see `BucketBatchSampler`); rank 0 alone writes files.

    DDP    every process holds the whole model; after the last micro-batch of an update the gradients are averaged
           (all-reduce), so every process takes the same optimizer step and keeps the same EMA.
    FSDP2  `fully_shard` per block, then the root: weights, gradients, optimizer state and EMA are DTensors sharded
           on dim 0; a block's weights are gathered for its forward and backward (in `param_dtype`), its gradients
           reduce-scattered (in `reduce_dtype`). The text keys / values of every block are computed before the
           blocks run (`encode_text`), so each block's `cross_attn.kv` (and `k_norm`) is a unit of its own.

Checkpoints always hold full tensors in the single-process layout (FSDP2 gathers them onto rank 0's CPU), so a run
resumes under any strategy and number of processes. The functions here are collectives where the docstring says
so: every rank must call them, in the same order.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from sana.errors import ConfigError
from sana.train.config import DistributedConfig, DType, Strategy
from sana.train.model import resolve_device


@dataclass(frozen=True)
class Context:
    """Where this process stands: the strategy (never AUTO), its rank among world_size, its device."""

    strategy: Strategy
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # this run joined the process group, and leaves it at the end

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.strategy is Strategy.FSDP2


def setup(cfg: DistributedConfig, device: str, env: Mapping[str, str] = os.environ) -> Context:
    """Resolve the strategy and this process's device; join the process group from torchrun's environment `env`
    unless one exists already (then it is used as it is)."""
    joined = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if joined else int(env.get("WORLD_SIZE", "1"))
    strategy = cfg.strategy
    if strategy is Strategy.AUTO:
        strategy = Strategy.DDP if world > 1 else Strategy.NONE
    if strategy is Strategy.NONE:
        if world > 1:
            raise ConfigError(
                f'distributed.strategy = "none", but {world} processes were started: each would train alone and '
                'write the same files; use "ddp" or "fsdp2"'
            )
        return Context(Strategy.NONE, device=resolve_device(device))
    if not joined and "RANK" not in env:
        raise ConfigError(
            f"distributed.strategy = {strategy.value!r} needs processes started by torchrun: "
            "torchrun --nproc-per-node N -m sana train CONFIG"
        )
    rank = dist.get_rank() if joined else int(env["RANK"])
    local_rank = int(env.get("LOCAL_RANK", rank))
    where = _rank_device(device, local_rank)
    if not joined:
        dist.init_process_group(
            "nccl" if where.type == "cuda" else "gloo",
            timeout=timedelta(seconds=cfg.timeout_s),
            device_id=where if where.type == "cuda" else None,
        )
    return Context(strategy, rank, world, where, owns_group=not joined)


def _rank_device(name: str, local_rank: int) -> torch.device:
    """cuda:LOCAL_RANK for "auto" (with CUDA) and "cuda"; the CPU for "cpu" (and "auto" without CUDA)."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if name not in ("auto", "cuda"):
        raise ConfigError(
            f'device = {name!r}: under torchrun each process uses cuda:LOCAL_RANK; set device = "cuda", "auto" or "cpu"'
        )
    if not torch.cuda.is_available() or local_rank >= torch.cuda.device_count():
        raise ConfigError(f"process LOCAL_RANK={local_rank} has no GPU ({torch.cuda.device_count()} visible)")
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return device


def teardown(ctx: Context) -> None:
    """Leave the process group if this run joined it."""
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


_DTYPES = {DType.BF16: torch.bfloat16, DType.FP32: torch.float32}


def parallelize(model: nn.Module, ctx: Context, cfg: DistributedConfig) -> nn.Module:
    """The module to train with: `model` itself (none), a DDP wrapper around it, or `model` sharded in place (FSDP2).

    Call it before building the optimizer: FSDP2 replaces the parameters by sharded DTensors.
    """
    if ctx.strategy is Strategy.NONE:
        return model
    if ctx.strategy is Strategy.DDP:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        # The transformer has no buffers to keep in sync; gradients live in DDP's all-reduce buckets (no copy).
        return DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True)
    if ctx.strategy is Strategy.FSDP2:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

        mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
        # The model casts its inputs itself (the flow time must stay fp32): no casting by FSDP.
        policy = MixedPrecisionPolicy(
            param_dtype=_DTYPES[cfg.param_dtype], reduce_dtype=_DTYPES[cfg.reduce_dtype], cast_forward_inputs=False
        )
        shard = dict(mesh=mesh, mp_policy=policy)
        for block in model.blocks:
            attn = block.cross_attn
            fully_shard([m for m in (attn.kv, attn.k_norm) if m is not None], **shard, reshard_after_forward=True)
            fully_shard(block, **shard, reshard_after_forward=cfg.reshard_after_forward)
        fully_shard(model, **shard, reshard_after_forward=False)  # the root's weights are needed again at once
        register_fsdp_forward_method(model, "encode_text")  # the samplers call it directly (validation images)
        return model
    raise ValueError(f"unknown strategy {ctx.strategy!r}")


def grad_sync(train_model: nn.Module, ctx: Context, last_micro_batch: bool):
    """DDP: no all-reduce after a micro-batch that is not the last of its update (its gradients accumulate).

    FSDP2 reduce-scatters every micro-batch instead: the accumulation then happens in the sharded fp32 gradients,
    not in full-size unsharded ones (param_dtype).
    """
    if ctx.strategy is Strategy.DDP and not last_micro_batch:
        return train_model.no_sync()
    return contextlib.nullcontext()


def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float) -> float:
    """Scale the gradients to a global L2 norm of at most max_norm; returns the norm before. A collective under
    FSDP2 (each rank holds a shard of every gradient)."""
    from torch.distributed.tensor import DTensor

    params = list(params)
    total = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if isinstance(total, DTensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return float(total)


# ----------------------------------------------------------------------------------------------------------
# Small collectives (no-ops on one process)


def all_reduce_sum(values: list[float], ctx: Context) -> list[float]:
    """The sums over the ranks of each value (float64). A collective."""
    if ctx.world_size == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return t.tolist()


def any_rank(flag: bool, ctx: Context) -> bool:
    """True on every rank when `flag` is true on one of them. A collective."""
    return all_reduce_sum([float(flag)], ctx)[0] > 0


def gather_objects(obj: Any, ctx: Context) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank. A collective."""
    if ctx.world_size == 1:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, ctx: Context) -> Any:
    """Rank 0's obj on every rank. A collective."""
    if ctx.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ctx: Context) -> None:
    if ctx.world_size > 1:
        dist.barrier()


@contextlib.contextmanager
def main_first(ctx: Context) -> Iterator[None]:
    """Rank 0 runs the body first (e.g. downloads into the Hugging Face cache), then the others (reading it)."""
    if not ctx.is_main:
        barrier(ctx)
    yield
    if ctx.is_main:
        barrier(ctx)


# ----------------------------------------------------------------------------------------------------------
# Full tensors for checkpoints and exports, and back


def full_state(tensors: Mapping[str, torch.Tensor], ctx: Context) -> dict[str, torch.Tensor]:
    """Full tensors: under FSDP2 each DTensor is gathered (a collective) onto rank 0's CPU, and the other ranks
    get {}; under the other strategies the tensors as they are."""
    if not ctx.sharded:
        return dict(tensors)
    from torch.distributed.tensor import DTensor

    out = {}
    for name, t in tensors.items():
        full = t.full_tensor() if isinstance(t, DTensor) else t
        if ctx.is_main:
            out[name] = full.detach().cpu()
    return out


def copy_full_(target: torch.Tensor, value: torch.Tensor) -> None:
    """target.copy_(value) for a full `value`; a sharded DTensor target takes its own shard of it (every rank holds
    the whole value: no communication)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(target, DTensor):
        value = value.to(device=target.device, dtype=target.dtype)
        value = distribute_tensor(value, target.device_mesh, target.placements, src_data_rank=None)
    target.copy_(value)


def shard_like(full: Mapping[str, torch.Tensor], like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`full` with each tensor whose counterpart in `like` is a DTensor of its shape sharded the same way (others,
    and tensors of another shape, as they are, for the caller's checks to report)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    out = dict(full)
    for name, value in full.items():
        ref = like.get(name)
        if isinstance(ref, DTensor) and tuple(value.shape) == tuple(ref.shape):
            value = value.to(device=ref.device, dtype=ref.dtype)
            out[name] = distribute_tensor(value, ref.device_mesh, ref.placements, src_data_rank=None)
    return out


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, names: list[str], ctx: Context) -> dict:
    """optimizer.state_dict() with full tensors, keyed by parameter index as on one process (`names`: the
    parameters' names in the optimizer's order). Under FSDP2 a collective whose result only rank 0 gets."""
    if not ctx.sharded:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    by_name = get_optimizer_state_dict(model, optimizer, options=options)  # {"state": {name: ...}, ...}
    if not ctx.is_main:
        return {}
    index = {name: i for i, name in enumerate(names)}
    return {
        "state": {index[name]: state for name, state in by_name["state"].items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in by_name["param_groups"]],
    }


def load_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, sd: dict, names: list[str], ctx: Context
) -> None:
    """The inverse of `optimizer_state` (every rank passes the full state; under FSDP2 each keeps its shards)."""
    if not ctx.sharded:
        optimizer.load_state_dict(sd)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    by_name = {
        "state": {names[i]: state for i, state in sd["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def reshard(model: nn.Module) -> None:
    """FSDP2: free every gathered weight (the root keeps its own after a forward that no backward followed), so that
    the next forward gathers the current shards again. A no-op for unsharded models."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
