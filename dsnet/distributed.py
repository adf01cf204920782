"""Data-parallel training over several processes with PyTorch's own engine (``torchrun``, ``torch.distributed``).

Contract
--------
A :class:`World` says which process this is: ``World.single()`` (one process, no process group) or
the one :func:`world_from_env` reads from the variables ``torchrun`` sets (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``): ``None`` when none is set, a
:class:`DistributedError` (one line naming what is missing) when only some are. :func:`start`
opens the process group (gloo on CPU, NCCL on CUDA) and :func:`stop` closes it.

The training loops (``dsnet.training``) take a world and use, beyond PyTorch's
``DistributedDataParallel`` (which averages the gradients):

- :func:`shard_loader`: the rank's share of each global batch (``DistributedSampler``, shuffled
  per epoch from one seed, the global batch split evenly: every step the ranks together see the
  batch one process would see with the same seed);
- :func:`mean_across`: a batch mean over every rank's samples (stage II's complexity penalty, not
  linear in the batch mean, reads it to give the one-process gradient);
- :func:`average_buffers`: statistics estimated on each rank's share (batch norm's re-calibration)
  averaged over the ranks;
- :func:`share` / :func:`gather`: a picklable object from rank 0 to all (a checkpoint to resume
  from, costs measured on rank 0), every rank's object to all (RNG states).

Every function is the identity, or a no-op, in a single-process world.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

RENDEZVOUS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(RuntimeError):
    """A distributed launch that cannot work (one line)."""


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @classmethod
    def single(cls) -> World:
        return cls()

    @property
    def main(self) -> bool:
        """Rank 0: the one process that measures, writes results and checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def split_batch(self, global_batch: int) -> int:
        """Each rank's share of ``global_batch`` (it must divide evenly)."""
        if global_batch % self.size:
            raise DistributedError(f"--batch-size {global_batch} (the global batch) is not divisible by the "
                                   f"{self.size} processes: give a multiple of {self.size}")
        return global_batch // self.size


def world_from_env(environ=None) -> World | None:
    """The world ``torchrun`` describes in ``environ`` (default: this process's environment)."""
    environ = os.environ if environ is None else environ
    present = [v for v in RENDEZVOUS if v in environ]
    if not present:
        return None
    missing = [v for v in RENDEZVOUS if v not in environ]
    if missing:
        raise DistributedError(f"incomplete distributed launch: {', '.join(missing)} not set (have "
                               f"{', '.join(present)}); launch with torchrun, which sets all of "
                               + ", ".join(RENDEZVOUS))
    try:
        rank, size, local = (int(environ[v]) for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except ValueError:
        raise DistributedError("RANK, WORLD_SIZE and LOCAL_RANK must be integers") from None
    if not 0 <= rank < size:
        raise DistributedError(f"RANK {rank} is outside WORLD_SIZE {size}")
    return World(rank, size, local)


def start(world: World, device: str = "cpu", timeout_s: float = 6 * 3600) -> None:
    """Open the process group of ``world`` (gloo on CPU, NCCL on CUDA); nothing for one process.
    The timeout is long: the other ranks wait while rank 0 alone measures a LUT (an hour at 224 px
    on a small CPU); a rank that dies ends the job sooner (torchrun stops the others)."""
    if not world.distributed or dist.is_initialized():
        return
    backend = "nccl" if device == "cuda" else "gloo"
    if device == "cuda":
        torch.cuda.set_device(world.local_rank)
    dist.init_process_group(backend, rank=world.rank, world_size=world.size, timeout=timedelta(seconds=timeout_s))


def stop(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def shard_loader(dataset, global_batch: int, world: World, seed: int, num_workers: int = 0,
                 pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """The rank's loader: ``global_batch / world.size`` images a step from a ``DistributedSampler``
    (shuffled from ``seed`` and the epoch: call ``loader.sampler.set_epoch(epoch)``). Rank ``r``
    takes every ``size``-th image of one seeded permutation, so a step's shares make up the images
    one process would take as its batch; incomplete global batches are dropped."""
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world.size, rank=world.rank, shuffle=True,
                                                  seed=seed, drop_last=False)
    return torch.utils.data.DataLoader(dataset, batch_size=world.split_batch(global_batch), sampler=sampler,
                                       drop_last=True, num_workers=num_workers, pin_memory=pin_memory)


def mean_across(value: torch.Tensor, world: World | None) -> torch.Tensor:
    """``value`` (each rank's mean over its equal share, no gradient) averaged over the ranks."""
    if world is None or not world.distributed:
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / world.size


def average_buffers(buffers: list[torch.Tensor], world: World | None) -> None:
    """Average each tensor over the ranks, in place."""
    if world is None or not world.distributed:
        return
    for b in buffers:
        if b.is_floating_point():
            dist.all_reduce(b, op=dist.ReduceOp.SUM)
            b /= world.size


def share(obj, world: World | None):
    """Rank 0's ``obj`` on every rank (others pass anything, e.g. None)."""
    if world is None or not world.distributed:
        return obj
    box = [obj if world.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj, world: World | None) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    if world is None or not world.distributed:
        return [obj]
    out = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def barrier(world: World | None) -> None:
    if world is not None and world.distributed:
        dist.barrier()
