"""Training on several processes with PyTorch's own DistributedDataParallel, started by torchrun.

`torchrun --nproc_per_node=N -m charstream_cli train ...` sets RANK, WORLD_SIZE and LOCAL_RANK;
without them the run is one process and every call here is a no-op. Each process reads its own
contiguous share of the batch lanes; DDP averages the gradients, so a step equals one step of a
single process on the whole batch (up to the order of floating-point sums). Process 0 logs,
validates and writes checkpoints.

Leaving cleanly. With torch 2.13, importing `torch._dynamo` after `init_process_group` (creating
an optimizer or DDP does) keeps a reference to the gloo process group that
`destroy_process_group` does not drop, so the group's worker threads live on to interpreter
shutdown. A worker that releases the last collective's work there must take the GIL to drop the
tensors' Python objects, which a finalizing interpreter refuses: the thread is unwound inside a
destructor and the process aborts ("terminate called without an active exception", SIGABRT),
at random, more often on a busy CPU, where a worker is descheduled between finishing a
collective and releasing it. `setup` therefore imports `torch._dynamo` before it joins the
group; `destroy_process_group` then destroys the group, whose destructor joins the worker
threads while the interpreter is alive. `teardown` waits at a barrier first, so no process
leaves while process 0 still writes its last checkpoint.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from training.errors import InvalidSetting


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def lanes(self, batch_size: int) -> slice:
        """This process's rows of the (batch_size, ...) lane matrix."""
        share = batch_size // self.world_size
        return slice(self.rank * share, (self.rank + 1) * share)

    def device(self, name: str) -> torch.device:
        """The device this process trains on: cuda:<local rank> when CUDA is asked for or present."""
        use_cuda = name == "cuda" or (name == "auto" and torch.cuda.is_available())
        if use_cuda and not torch.cuda.is_available():
            raise InvalidSetting("device cuda asked for, but no CUDA device is available", ("device",))
        return torch.device("cuda", self.local_rank) if use_cuda else torch.device("cpu")

    # -- collectives: each returns its input unchanged in a single process -----------------------

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every process when `flag` is True on any (so all stop at the same step)."""
        if not self.distributed:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def mean(self, value: float, device: torch.device) -> float:
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return float(t.item()) / self.world_size

    def from_main(self, value: float, device: torch.device) -> float:
        """Process 0's value of a float, on every process."""
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.broadcast(t, src=0)
        return float(t.item())

    def gather_lanes(self, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """Each (layers, lanes/N, hidden) state tensor joined into (layers, lanes, hidden), in rank order."""
        if not self.distributed:
            return state
        joined = []
        for t in state:
            parts = [torch.empty_like(t) for _ in range(self.world_size)]
            dist.all_gather(parts, t.contiguous())
            joined.append(torch.cat(parts, dim=1))
        return tuple(joined)

    def gather_objects(self, obj: Any) -> list[Any]:
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def setup(device_name: str, batch_size: int) -> Ranks:
    """Join the process group torchrun describes in the environment; one process when it describes none."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Ranks()
    ranks = Ranks(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if batch_size % world_size:
        raise InvalidSetting(
            f"batch_size {batch_size} does not split evenly over {world_size} processes", ("batch_size",)
        )
    device = ranks.device(device_name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        importlib.import_module("torch._dynamo")  # before the group exists: see the module docstring
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return ranks


def teardown(ranks: Ranks, finished: bool) -> None:
    """Leave the process group; after a finished run, once every process has got here.

    After a failure there is no barrier: the other processes may never reach it.
    """
    if ranks.distributed and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()
