"""torch.distributed set-up for torchrun (NCCL on GPUs, gloo on the CPU) and the reductions
training needs. Without torchrun's environment everything runs as one process."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, List

import numpy as np
import torch
import torch.distributed as dist


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
    from EPDSegmentationLib.inference import select_device

    if not launched_by_torchrun():
        dev, reason = select_device(device)
        if dev.type == "mps":  # training is tested on CUDA and the CPU only
            dev, reason = torch.device("cpu"), "CPU (MPS is not used for training)"
        return Context(0, 1, 0, dev, reason, "")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    if device == "cuda" and not use_cuda:
        raise RuntimeError("--device cuda requested, but CUDA is not available")
    if use_cuda:
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPU(s)")
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


def broadcast_object(ctx: Context, obj: Any) -> Any:
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ctx: Context) -> None:
    if ctx.distributed:
        dist.barrier()
