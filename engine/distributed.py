"""Several processes under torchrun: the process group, rank helpers, this rank's share of a batch or a list of
questions and the results gathered back in order, gradient sums, FSDP2 wrapping, and writes by rank 0 alone.

One process (no torchrun) is the default and every helper is then the identity, so single-process results stay
bit-identical. Under torchrun each rank holds the whole model (replicated) and the trainable gradients are summed
with one all-reduce per update, which is exact; on CUDA, or with MEDKO_FSDP=1, the model is sharded instead with
FSDP2 (fully_shard per decoder layer, then the root, the frozen base included). A base loaded under FSDP2 waits on
the meta device (engine.shard_load) until its first use, where materialize() shards it and each rank reads only its
own rows of every weight.

Imports engine.errors.
"""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, Callable, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from engine.errors import MedkoError, log

T = TypeVar("T")
TIMEOUT = timedelta(minutes=10)  # a rank that waits longer than this on the others fails instead of hanging
NO_NF4 = ("--quantize 4bit does not run with FSDP2 under torchrun, which cannot shard NF4 weights; drop --quantize "
          "and let --nproc spread the bf16 base over the GPUs (27B: 2 x 80, 4 x 40 or 8 x 24 GB by the plan)")


class Relayed(MedkoError):
    """A MedkoError raised on rank 0 and raised again on the other ranks, which need not print it a second time."""


def init() -> bool:
    """Joins the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT in the
    environment): NCCL on CUDA, gloo on CPU. Returns whether this process is one of several; without torchrun it
    does nothing. Ranks other than 0 log warnings only, so each line appears once."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2 or dist.is_initialized():
        return active()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    if rank() != 0:
        log.setLevel("WARNING")
    return True


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def share(items: Sequence[T], part: tuple[int, int] | None = None) -> list[T]:
    """This rank's contiguous share of items (`part` = (rank, world) overrides the process group): rank r of N
    takes items[len*r//N : len*(r+1)//N], so the shares in rank order are the items in their order."""
    r, n = part or (rank(), world())
    return list(items[len(items) * r // n:len(items) * (r + 1) // n])


def gather(local: list[T]) -> list[T]:
    """Every rank's share (see share()) gathered on every rank, in rank order: the original order."""
    if not active():
        return local
    parts: list[Any] = [None] * world()
    dist.all_gather_object(parts, local)
    return [item for part in parts for item in part]


def sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def split_work(fn: Callable[[Sequence[T]], Sequence[Any]], items: Sequence[T], model: nn.Module) -> list[Any]:
    """fn over this rank's share of items, the results gathered in the original order. A sharded model needs the
    same forward passes on every rank (each one gathers weights from all), so it runs the whole list everywhere.
    One process gets items as they are: rows read from a file as they are used (engine.rows) stay on disk."""
    materialize(model)
    if not active() or sharded(model):
        return list(fn(items))
    part = share(items)
    return gather(list(fn(part)) if part else [])


def global_sum(value: float) -> float:
    """The sum of `value` over the ranks (in float64; ints stay ints)."""
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    total = t.item()
    return int(total) if isinstance(value, int) else total


def global_min(value: int) -> int:
    """The least of `value` over the ranks: what every rank can do, where all must do the same."""
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def global_weight(count: int, items: int) -> float:
    """A mean's weight on this rank: a loss that is a mean over this rank's `items` and is scaled by `count`
    (targets of the micro-batch) in one process becomes, scaled by this weight, its rank's part of the mean over
    all ranks' items times all ranks' count, so the ranks' gradients sum to the one-process gradient."""
    if not active():
        return count
    totals = torch.tensor([count, items], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(totals)
    return float(totals[0]) * items / max(float(totals[1]), 1.0)


def global_mean(values: torch.Tensor, count: int) -> torch.Tensor:
    """Means over this rank's `count` items made means over every rank's items, in one all-reduce; as they are in
    one process."""
    if not active():
        return values
    flat = values.detach().double().flatten()
    both = torch.cat([flat * count, flat.new_tensor([count])]).to(_comm_device())
    dist.all_reduce(both)
    return (both[:-1] / both[-1].clamp(min=1)).to(values.device, values.dtype).view_as(values)


def gather_metrics(extras: dict[str, list[float]]) -> dict[str, list[float]]:
    """Per-micro-batch metric values of every rank, concatenated by key (a key some ranks lack is kept)."""
    if not active():
        return extras
    parts: list[Any] = [None] * world()
    dist.all_gather_object(parts, extras)
    merged: dict[str, list[float]] = {}
    for part in parts:
        for key, values in part.items():
            merged.setdefault(key, []).extend(values)
    return merged


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def broadcast_parameters(params: Sequence[nn.Parameter]) -> None:
    """Rank 0's values of replicated parameters on every rank (seeded alike, this only guards against drift)."""
    if active():
        with torch.no_grad():
            for p in params:
                dist.broadcast(p.data, src=0)


def sum_gradients(params: Sequence[nn.Parameter]) -> None:
    """Replicated training: each rank's gradients (of its share, divided by the global target count) summed over
    the ranks in one all-reduce per dtype; a parameter no rank gave a gradient keeps none, as in one process."""
    if not active():
        return
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=_comm_device())
    dist.all_reduce(has)
    used = [p for p, h in zip(params, has.tolist()) if h]
    for dtype in {p.dtype for p in used}:
        group = [p for p in used if p.dtype == dtype]
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in group])
        dist.all_reduce(flat)
        at = 0
        for p in group:
            p.grad = flat[at:at + p.numel()].view_as(p).clone()
            at += p.numel()


def wants_fsdp() -> bool:
    return active() and (dist.get_backend() == "nccl" or os.environ.get("MEDKO_FSDP") == "1")


def wrap(model: nn.Module) -> nn.Module:
    """FSDP2 (untested on GPUs; MEDKO_FSDP=1 runs it on CPU): fully_shard on each decoder layer, then on the root,
    the frozen base included, so each GPU holds 1/N of the weights between uses. Gradients are summed, not
    averaged, because every rank's loss is already divided by the global target count. The model object stays
    the one the stage holds, so the teacher pass (teacher_mode) uses the same sharded modules."""
    if not wants_fsdp() or sharded(model):
        return model
    if any(getattr(p, "quant_state", None) is not None for p in model.parameters()):
        raise MedkoError(NO_NF4)
    from torch.distributed.fsdp import fully_shard

    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)
    for module in [*model.layers, model]:  # each FSDP module reduces its own parameters
        module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)  # a plain SUM: gloo has no PREMUL_SUM
    # FSDP2's default keeps a layer's all-gather buffer in forward until the next layer's all-gather, to overlap
    # that copy-out with the next collective: a third layer whole. Unsharding as an async op frees the buffer as
    # soon as it is copied into the layer's parameters, so a rank holds at most two layers whole (the buffer and
    # the parameters, for the copy; then one), at the cost of that overlap on a GPU.
    model._set_unshard_async_op(True)
    log.info("FSDP2: %d decoder layers and the root sharded over %d ranks", len(model.layers), world())
    return model


def materialize(model: nn.Module) -> nn.Module:
    """A model whose base waits on the meta device (engine.shard_load, under FSDP2) sharded and read, each rank its
    own rows; any other model as it is. Every first use of a model calls it (split_work, the trainer), so surgery,
    which a sharded model no longer takes, comes before."""
    pending = getattr(model, "pending_load", None)
    if pending is None:
        return model
    wrap(model)
    pending.fill(model)
    model.pending_load = None
    return model


def _rows_per_rank(t: torch.Tensor) -> int:
    """torch.chunk's rows per rank of dim 0 across t's mesh: the first ranks hold this many, the last may hold fewer."""
    return -(-t.shape[0] // t.device_mesh.size())


def local_rows(t: torch.Tensor) -> tuple[int, int]:
    """The rows [start, stop) of dim 0 that this rank holds of an FSDP2-sharded parameter or state: torch.chunk's
    split, which fully_shard uses (the last ranks may hold fewer rows, or none)."""
    n, chunk = t.shape[0], _rows_per_rank(t)
    start = min(t.device_mesh.get_local_rank() * chunk, n)
    stop = min(start + chunk, n)
    if t.to_local().shape[0] != stop - start:
        raise MedkoError(f"FSDP2 gave this rank {t.to_local().shape[0]} rows of a {n}-row tensor where torch.chunk "
                         f"gives {stop - start}; this torch shards differently, use the torch of requirements.txt")
    return start, stop


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded (DTensor) parameter or state, gathered on every rank; others as they are."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def on_main_whole(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors whole, on the CPU, on rank 0 alone (what rank 0 writes; the others get {}): a sharded one is
    gathered into rank 0 one tensor at a time, so no other rank ever holds more of it than its own shard."""
    out = {}
    for name, t in tensors.items():
        whole = _gathered_on_main(t.detach()) if hasattr(t, "device_mesh") else t.detach()
        if is_main():
            out[name] = whole.cpu().contiguous()
    return out


def _gathered_on_main(t: torch.Tensor) -> torch.Tensor | None:
    """A DTensor sharded on dim 0 (torch.chunk's rows per rank) whole on rank 0, None elsewhere: every rank sends
    its rows padded to the first rank's count, rank 0 concatenates them and drops the padding."""
    local = t.to_local()
    n, ranks, chunk = t.shape[0], t.device_mesh.size(), _rows_per_rank(t)
    padded = local.new_zeros((chunk, *t.shape[1:]))
    padded[:local.shape[0]] = local
    group = t.device_mesh.get_group()
    parts = [torch.empty_like(padded) for _ in range(ranks)] if is_main() else None
    dist.gather(padded, parts, group_dst=0, group=group)
    return torch.cat(parts)[:n] if is_main() else None


def local_like(target: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """`full` (a tensor, or a safetensors slice) laid out like `target`: this rank's shard when target is a DTensor,
    else the whole. Only the shard's rows are read, so a memory-mapped `full` costs this rank its shard alone."""
    if hasattr(target, "device_mesh"):
        from torch.distributed.tensor import DTensor

        start, stop = local_rows(target)
        rows = full[start:stop].to(target.to_local().device, target.dtype, copy=True)
        return DTensor.from_local(rows, target.device_mesh, target.placements, run_check=False, shape=target.shape,
                                  stride=target.stride())
    return full if torch.is_tensor(full) else full[:]


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """optimizer.state_dict() with sharded states gathered into rank 0 (on_main_whole): the file one process would
    write, whole on rank 0; the other ranks' copy lacks the tensors and is not written."""
    state = optimizer.state_dict()
    state["state"] = {i: {**s, **on_main_whole({k: v for k, v in s.items() if torch.is_tensor(v)})}
                      for i, s in state["state"].items()}
    return state


def shard_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
    """A one-process optimizer state laid out like this optimizer's (sharded) parameters; scalars (AdamW's step)
    copied, so that none refers to a memory-mapped file after the load."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state["state"] = {i: {k: (local_like(params[int(i)], v) if v.ndim else v.clone()) if torch.is_tensor(v) else v
                          for k, v in s.items()} for i, s in state["state"].items()}
    return state


def on_main(fn: Callable[..., T], *args: Any) -> T | None:
    """fn(*args) on rank 0 alone (the writes: checkpoints, metrics, meta.json, reports); every rank waits for it,
    and a MedkoError it raises is raised on every rank, so all of them stop with the same sentence. Returns fn's
    result on rank 0 and None elsewhere."""
    if not active():
        return fn(*args)
    result, failure, box = None, None, [None]
    if is_main():
        try:
            result = fn(*args)
        except MedkoError as err:
            failure, box = err, [str(err)]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise failure or Relayed(box[0])
    return result
