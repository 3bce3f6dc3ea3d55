"""torch.distributed set-up for torchrun (NCCL on GPUs, gloo on the CPU) and the reductions
training needs. Without torchrun's environment everything runs as one process."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, List

import numpy as np
import torch
import torch.distributed as dist
from EPDSegmentationLib.core.inference import DeviceError, select_device


@dataclass
class Context:
    """This process's place in the run."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    device_reason: str
    backend: str  # "nccl", "gloo" or "" (single process)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend != ""


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def setup(device: str = "auto") -> Context:
    """Initialise the process group when launched by torchrun and pick this rank's device.

    device: "auto" (a GPU when there is one, else the CPU), "cuda" or "cpu". Under torchrun
    each rank takes cuda:LOCAL_RANK with NCCL, or the CPU with gloo."""
    if not launched_by_torchrun():
        dev, reason = select_device(device)
        if dev.type == "mps":  # training is tested on CUDA and the CPU only
            dev, reason = torch.device("cpu"), "CPU (MPS is not used for training)"
        return Context(0, 1, 0, dev, reason, "")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    if device == "cuda" and not use_cuda:
        raise DeviceError("--device cuda requested, but CUDA is not available")
    if use_cuda:
        if local >= torch.cuda.device_count():
            raise DeviceError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPU(s)")
        torch.cuda.set_device(local)
        dev, backend = torch.device("cuda", local), "nccl"
        reason = f"CUDA GPU {torch.cuda.get_device_name(local)}"
    else:
        dev, backend, reason = torch.device("cpu"), "gloo", "CPU"
    dist.init_process_group(backend=backend)
    return Context(rank, world, local, dev, reason, backend)


def cleanup(ctx: Context) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(ctx: Context, values) -> np.ndarray:
    """Sum a float64 vector over ranks (float64 on the wire, so counts stay exact)."""
    a = np.asarray(values, np.float64)
    if not ctx.distributed:
        return a.copy()
    t = torch.from_numpy(a.copy()).to(ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().numpy()


def all_gather_object(ctx: Context, obj: Any) -> List[Any]:
    if not ctx.distributed:
        return [obj]
    out: List[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: Context) -> None:
    if ctx.distributed:
        dist.barrier()


class RankBatches(torch.utils.data.Sampler):
    """This rank's share of every global batch, so that N ranks see what one process sees.

    Each epoch shuffles the n training slices with the permutation torch's
    DistributedSampler draws (randperm seeded with seed + epoch), cuts it into global batches
    of ``batch_size`` (the last one may be short) and gives rank r the slices r, r + N, ...
    of each. Nothing is padded or repeated (DistributedSampler repeats slices when n does
    not divide by N). ``weights()[j]`` scales rank r's mean loss of batch j by
    n_r * N / n_global, so the gradient average DistributedDataParallel takes is the mean
    over the global batch even when a short last batch splits unevenly. A last batch with
    fewer slices than ranks (some rank would have none) is dropped; ``dropped`` says how
    many slices that left out (always 0 for one process).
    """

    def __init__(self, n: int, batch_size: int, world_size: int = 1, rank: int = 0,
                 seed: int = 0):
        if batch_size % world_size:
            raise ValueError(f"the global batch {batch_size} must divide by the "
                             f"{world_size} ranks")
        self.n, self.batch, self.world, self.rank, self.seed = n, batch_size, world_size, rank, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _global_sizes(self) -> List[int]:
        sizes = [min(self.batch, self.n - j) for j in range(0, self.n, self.batch)]
        return [s for s in sizes if s >= self.world]

    @property
    def dropped(self) -> int:
        return self.n - sum(self._global_sizes())

    def weights(self) -> List[float]:
        """Per batch of this rank: n_r * N / n_global (1.0 for every full batch)."""
        return [len(range(self.rank, s, self.world)) * self.world / s
                for s in self._global_sizes()]

    def __iter__(self):
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        for j, size in zip(range(0, self.n, self.batch), self._global_sizes()):
            yield perm[j:j + size][self.rank::self.world]

    def __len__(self) -> int:
        return len(self._global_sizes())
