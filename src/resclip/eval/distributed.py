"""``torchrun`` plumbing: join the process group, sum across ranks, leave it."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as tdist

__all__ = ["DistInfo", "all_reduce", "close_distributed", "current_dist", "distributed", "init_distributed"]


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in a ``torchrun`` group (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owned: bool = False  # True if we initialised the process group (and must destroy it)


def init_distributed(device: str = "auto") -> tuple[DistInfo, str]:
    """Join the ``torchrun`` group described by the environment (``WORLD_SIZE``, ``RANK``...).

    Args:
        device: the requested device; under several processes ``"auto"``/``"cuda"`` become
            ``cuda:<LOCAL_RANK>``.

    Returns:
        The group info and the device each process should use. Backend: nccl on CUDA, gloo otherwise.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not tdist.is_available():
        return DistInfo(), device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device in ("auto", "cuda") and torch.cuda.is_available():
        device = f"cuda:{local}"
    elif device == "auto":
        device = "cpu"
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(torch.device(device))
    owned = not tdist.is_initialized()
    if owned:
        tdist.init_process_group("nccl" if cuda else "gloo")
    return DistInfo(tdist.get_rank(), tdist.get_world_size(), local, owned), device


def current_dist() -> DistInfo:
    """The group info of an already initialised process group (or a single process)."""
    if tdist.is_available() and tdist.is_initialized():
        return DistInfo(tdist.get_rank(), tdist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return DistInfo()


def close_distributed(info: DistInfo) -> None:
    """Destroy the process group if :func:`init_distributed` created it."""
    if info.owned and tdist.is_initialized():
        tdist.destroy_process_group()


def all_reduce(matrix: np.ndarray, device: torch.device) -> np.ndarray:
    """The element-wise sum of ``matrix`` over every rank (on the GPU under nccl)."""
    t = torch.from_numpy(matrix).to(device if tdist.get_backend() == "nccl" else "cpu")
    tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t.cpu().numpy()


@contextlib.contextmanager
def distributed(device: str = "auto") -> Iterator[tuple[DistInfo, str]]:
    """:func:`init_distributed`, then :func:`close_distributed` however the block ends.

    Yields:
        The group info and the device this process should use.
    """
    info, device = init_distributed(device)
    try:
        yield info, device
    finally:
        close_distributed(info)
