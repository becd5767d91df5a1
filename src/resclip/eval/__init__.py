"""Benchmark evaluation: dataset-level mIoU, resumable, sharded over ``torchrun`` processes.

One concern per module: :mod:`~resclip.eval.loop` (the evaluation), :mod:`~resclip.eval.store` (saved
progress and when it is reused), :mod:`~resclip.eval.results` (what is returned and written),
:mod:`~resclip.eval.distributed` (``torchrun``) and :mod:`~resclip.eval.workers` (loader processes).

Progress is kept as per-image confusion counts (sparse), saved atomically every few images and on
Ctrl-C/SIGTERM, in a state folder keyed by a hash of everything that decides the numbers: the full
protocol, the sha256 of the visual and of the text tower's weights (:mod:`resclip.digest`), dataset,
root, class lines and device type. Each image's counts are saved with the identity of its files (image:
size and modification time; annotation: size and sha256 of its content), the sha256 of its saved
prediction PNG, and a checksum of all of these.

Rerunning the same command skips the images already done and gives the identical matrix (integer sums).
An image is scored again when its image or annotation changed, when its prediction PNG (with
``save_predictions``) is missing or differs from the one written, or when its saved entry fails its
checksum (a warning says so). A different protocol, checkpoint or class list has a different key and
starts fresh. A different ``--limit`` reuses whichever images are already done. If the state folder
cannot be written, the evaluation warns and runs without saving progress.
"""

from __future__ import annotations

from .distributed import DistInfo, close_distributed, current_dist, distributed, init_distributed
from .loop import benchmark_class_lines, evaluate, segment_mask
from .results import EvalResult, software_versions, write_results
from .store import Entry, ProgressStore, default_state_dir, sample_source, state_key

__all__ = [
    "DistInfo",
    "Entry",
    "EvalResult",
    "ProgressStore",
    "benchmark_class_lines",
    "close_distributed",
    "current_dist",
    "default_state_dir",
    "distributed",
    "evaluate",
    "init_distributed",
    "sample_source",
    "segment_mask",
    "software_versions",
    "state_key",
    "write_results",
]
