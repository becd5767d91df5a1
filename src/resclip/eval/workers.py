"""Process hygiene of an evaluation: loader workers die with it, SIGTERM saves progress like Ctrl-C."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import torch

from ..datasets import BenchmarkImages, DatasetSpec, Sample, identity_collate

__all__ = ["exit_with_parent", "image_loader", "sigterm_as_interrupt"]


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM (``kill``, torchrun shutting down) into KeyboardInterrupt so progress gets saved."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


_PR_SET_PDEATHSIG = 1


def exit_with_parent(parent: int, worker_id: int) -> None:
    """``worker_init_fn`` of the image loaders: the worker dies as soon as the evaluating process does
    (even by ``kill -9``), instead of lingering.

    On Linux the kernel kills it (``prctl(PR_SET_PDEATHSIG, SIGKILL)``); everywhere a daemon thread
    waits on the parent's sentinel (or polls the parent pid) and exits the worker.
    """
    del worker_id
    if sys.platform.startswith("linux") and os.getppid() == parent:
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != parent:  # the parent died before the signal was armed
                os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent,), name="resclip-parent-watch", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _watch_parent(parent: int) -> None:
    proc = multiprocessing.parent_process()
    if proc is not None and proc.pid == parent:
        proc.join()  # returns when the parent's sentinel closes: it exited
    else:
        while _alive(parent):
            time.sleep(0.5)
    os._exit(1)


def image_loader(samples: list[Sample], spec: DatasetSpec, workers: int,
                 regions_dir: str | os.PathLike[str] | None = None) -> torch.utils.data.DataLoader:
    """Decode ``samples`` in order (with their instance maps from ``regions_dir``), in ``workers``
    processes (0: in this one) that die with this process."""
    return torch.utils.data.DataLoader(
        BenchmarkImages(samples, spec, regions_dir),
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        collate_fn=identity_collate,  # type: ignore[arg-type]
        prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=functools.partial(exit_with_parent, os.getpid()) if workers > 0 else None,
    )
