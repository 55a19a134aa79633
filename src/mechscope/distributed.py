"""Data-parallel runs on PyTorch's own distributed engine (`torch.distributed`).

Attribution scores, evaluations, patching sweeps and dictionary training are sums or means over
examples or tokens, so each process ("rank") can take a shard of the data and the partial sums can be
added up across ranks with an all-reduce. Launch with `torchrun --nproc-per-node N -m mechscope ...`,
or call the library from Python after `torch.distributed.init_process_group`.

`active()` is True when a process group is initialised, or when torchrun's variables (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) are set: then `setup()` initialises one (gloo on
the CPU, NCCL with CUDA, each rank on cuda:LOCAL_RANK). Without either, every helper here is a no-op
(rank 0 of 1) and the library runs exactly as in one process; so they are inside `alone()`, where one
rank works by itself (a command that is not data-parallel, run on rank 0 under torchrun).

A failure on one rank must not leave the others waiting in a collective: the work between two
collectives runs inside `together(...)`, which catches an exception, then all-reduces a failure flag;
if any rank failed, every rank raises (the failing rank its own exception, the others a `RankFailed`
carrying the failing rank's message).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import timedelta

import torch

from .devices import HOST
from .errors import MechscopeError

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
SHARDING = ("contiguous", "strided")
_alone = False  # inside `alone()`: this process works as if it were the only one


class RankFailed(MechscopeError):
    """Another rank of a data-parallel run failed; the message names it and gives its error."""


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() else None


def launched() -> bool:
    """Whether torchrun's variables are in the environment (WORLD_SIZE > 1 or not)."""
    return all(os.environ.get(v) for v in TORCHRUN_VARS)


def initialised() -> bool:
    dist = _dist()
    return dist is not None and dist.is_initialized()


def active() -> bool:
    """Whether this process is one rank of a data-parallel run (a process group exists or torchrun
    launched it, and no `alone()` block is running). The single-process path checks only this."""
    return not _alone and (initialised() or launched())


@contextmanager
def alone():
    """Run a block as the only process, with no collectives: rank 0 of 1, no sharding, progress shown.
    For the work that one rank does by itself under torchrun (a command that is not data-parallel, run
    on rank 0 while the other ranks do nothing)."""
    global _alone
    before, _alone = _alone, True
    try:
        yield
    finally:
        _alone = before


def setup(timeout_s: float = 1800.0) -> bool:
    """Initialise the default process group from torchrun's environment when there is none: NCCL when
    CUDA is available (this rank on cuda:LOCAL_RANK), gloo otherwise. Returns whether a group exists."""
    if _alone:
        return False
    if initialised():
        return True
    if not launched():
        return False
    dist = _dist()
    if dist is None:
        raise MechscopeError("torchrun launched this process, but this PyTorch has no torch.distributed")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return True


def rank() -> int:
    return _dist().get_rank() if setup() else 0


def world_size() -> int:
    return _dist().get_world_size() if setup() else 1


def is_main() -> bool:
    """Rank 0 (or the only process): the one that shows progress and writes files."""
    return rank() == 0


def local_device() -> torch.device:
    """This rank's device: cuda:LOCAL_RANK with CUDA under torchrun, cuda with CUDA otherwise, else the host."""
    if not torch.cuda.is_available():
        return HOST
    if launched():
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device("cuda", torch.cuda.current_device())


def _comm_device() -> torch.device:
    """Where collectives take their tensors: the current CUDA device for NCCL, the host for gloo."""
    if _dist().get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return HOST


def shard(n: int, how: str = "contiguous", rank_: int | None = None, world: int | None = None) -> list[int]:
    """The indices of `n` examples this rank takes: `contiguous` (rank r gets one block, the blocks in
    rank order cover 0..n-1) or `strided` (r, r + world, ...). Every index belongs to exactly one rank;
    sizes differ by at most one. In one process: all of range(n)."""
    if how not in SHARDING:
        raise MechscopeError(f"unknown sharding '{how}'; choose one of {', '.join(SHARDING)}")
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    if how == "strided":
        return list(range(r, n, w))
    return list(range(r * n // w, (r + 1) * n // w))


def shard_size(n: int, how: str = "contiguous") -> int:
    """How many of `n` examples this rank takes; MechscopeError when some rank would get none."""
    if not active():
        return n
    w = world_size()
    if n < w:
        raise MechscopeError(f"{n} examples cannot be shared among {w} ranks: give at least one example per rank")
    return len(shard(n, how))


def batches(dataset, batch_size: int, how: str = "contiguous"):
    """(indices into the whole dataset, Batch) over this rank's shard of `dataset`, `batch_size`
    examples at a time: `dataset.batches(batch_size)` itself in one process."""
    if not active():
        yield from dataset.batches(batch_size)
        return
    from .errors import check_count

    batch_size = check_count("batch_size", batch_size)
    shard_size(len(dataset), how)
    mine = shard(len(dataset), how)
    for start in range(0, len(mine), batch_size):
        idx = mine[start:start + batch_size]
        yield idx, dataset.batch(idx)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of `tensor` over all ranks, on `tensor`'s device and dtype (the tensor itself in one
    process). The input is not modified. The buffer sent is contiguous: a collective adds up the
    ranks' storage element by element, so ranks holding the same shape with different strides (a
    transposed tensor on one, a padded copy on another) would otherwise add mismatched elements."""
    if not active() or world_size() == 1:
        return tensor
    buf = tensor.detach().to(_comm_device(), copy=True, memory_format=torch.contiguous_format)
    _dist().all_reduce(buf)
    return buf.to(tensor.device)


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """The elementwise maximum of `tensor` over all ranks."""
    if not active() or world_size() == 1:
        return tensor
    dist = _dist()
    buf = tensor.detach().to(_comm_device(), copy=True, memory_format=torch.contiguous_format)
    dist.all_reduce(buf, op=dist.ReduceOp.MAX)
    return buf.to(tensor.device)


def sum_numbers(*values: float) -> list[float]:
    """Python numbers (counts, sums) summed over ranks, in float64."""
    if not active() or world_size() == 1:
        return [float(v) for v in values]
    return all_reduce_sum(torch.tensor(values, dtype=torch.float64, device=HOST)).tolist()


def gather_objects(obj) -> list:
    """`obj` from every rank, in rank order (a list of one in one process)."""
    if not active() or world_size() == 1:
        return [obj]
    out = [None] * world_size()
    _dist().all_gather_object(out, obj)
    return out


def all_gather_cat(tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Each rank's `tensor` (same shape but for `dim`) concatenated along `dim` in rank order: with
    contiguous sharding, the order of the whole dataset."""
    if not active() or world_size() == 1:
        return tensor
    parts = gather_objects(tensor.detach().to(HOST))
    return torch.cat(parts, dim).to(tensor.device)


def barrier() -> None:
    if active() and world_size() > 1:
        _dist().barrier()


def check_together(error: BaseException | None) -> None:
    """Collective: raise on every rank if any rank passes an error. The failing rank re-raises its own
    exception; the others raise RankFailed with the lowest failing rank's message."""
    if not active() or world_size() == 1:
        if error is not None:
            raise error
        return
    flag = all_reduce_sum(torch.tensor([0 if error is None else 1], dtype=torch.int64, device=HOST))
    if int(flag) == 0:
        return
    text = None if error is None else f"{type(error).__name__}: {error}"
    messages = gather_objects(text)
    if error is not None:
        raise error
    first = next(r for r, m in enumerate(messages) if m is not None)
    raise RankFailed(f"rank {first} of {len(messages)} failed: {messages[first]}")


@contextmanager
def together():
    """Run a block of per-rank work (no collectives inside) so that a failure on any rank stops all
    ranks at the end of the block, with that rank's error (see `check_together`)."""
    if not active() or world_size() == 1:
        yield
        return
    try:
        yield
    except BaseException as e:  # noqa: BLE001 - re-raised by check_together on this rank
        check_together(e)
    else:
        check_together(None)


def progress_enabled(progress: bool) -> bool:
    """Progress bars on rank 0 only."""
    return progress and (not active() or is_main())


__all__ = [
    "RankFailed", "SHARDING", "active", "alone", "all_gather_cat", "all_reduce_max", "all_reduce_sum", "barrier",
    "check_together", "gather_objects", "is_main", "launched", "local_device", "progress_enabled", "rank",
    "setup", "shard", "shard_size", "batches", "sum_numbers", "together", "world_size",
]
