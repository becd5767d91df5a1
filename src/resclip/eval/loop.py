"""The evaluation itself: score every image of a benchmark, resuming saved progress, over ranks."""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist
from tqdm import tqdm

from ..classes import ClassSpec, read_class_file
from ..datasets import (
    DatasetError,
    DatasetNotFoundError,
    DatasetSpec,
    LoadedSample,
    Sample,
    class_file_path,
    get_dataset_spec,
    list_samples,
    save_prediction,
)
from ..metrics import ConfusionMatrix, SegMetrics, compute_metrics, sparse_confusion
from ..regions import RegionsError, check_folder, unused_message
from ..segmenter import Segmenter
from .distributed import DistInfo, all_reduce, current_dist
from .results import EvalResult
from .store import Entry, ProgressStore, default_state_dir, plan_resume, state_key
from .workers import image_loader, sigterm_as_interrupt

__all__ = ["benchmark_class_lines", "evaluate", "segment_mask"]


def benchmark_class_lines(
    spec: DatasetSpec, class_file: str | os.PathLike[str] | None = None
) -> tuple[list[str], str]:
    """Class lines for ``spec`` (the shipped file unless ``class_file``), checked against its class count,
    and the file they came from."""
    path = Path(class_file) if class_file is not None else class_file_path(spec)
    lines = read_class_file(path)
    if len(lines) != spec.num_classes:
        raise DatasetError(
            f"class file {str(path)!r} has {len(lines)} lines but {spec.name} has {spec.num_classes} classes "
            "(one line per class, synonyms separated by commas)"
        )
    return lines, str(path)


def segment_mask(seg: Segmenter, rgb: np.ndarray, classes: ClassSpec, text: torch.Tensor,
                 regions: np.ndarray | None = None) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB -> ``(H, W)`` class indices at the image's size, with precomputed query
    embeddings (``seg.predict(...).mask``; probabilities are never built); ``regions``: the image's
    ``(H, W)`` instance map for a segmenter that reads one.

    Raises:
        ValueError: the image is too thin to segment; ``regions`` not of the image's size.
    """
    return seg.predict(rgb, classes, embeddings=text, regions=regions).mask  # type: ignore[arg-type]


def _say(msg: str, dist: DistInfo) -> None:
    if dist.rank == 0:
        print(msg, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class _Scorer:
    """One image -> its sparse confusion counts and predicted mask."""

    seg: Segmenter
    spec: DatasetSpec
    classes: ClassSpec
    text: torch.Tensor

    def __call__(self, item: LoadedSample) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray]:
        if item.error is not None or item.image is None or item.label is None:
            raise DatasetError(item.error or f"could not read {item.sample.image}")
        try:
            mask = segment_mask(self.seg, item.image, self.classes, self.text, item.regions)
        except RegionsError as err:  # a map of another size than its image
            raise DatasetError(f"{item.sample.stem}: {err}") from None
        return sparse_confusion(mask, item.label, self.spec.num_classes), mask


def evaluate(
    seg: Segmenter,
    dataset: str,
    root: str | os.PathLike[str],
    *,
    limit: int | None = None,
    class_file: str | os.PathLike[str] | None = None,
    workers: int = 2,
    save_predictions: str | os.PathLike[str] | None = None,
    state_dir: str | os.PathLike[str] | None = None,
    resume: bool = True,
    save_every: int = 50,
    progress: bool = True,
    release_text_tower: bool = False,
    regions_dir: str | os.PathLike[str] | None = None,
) -> EvalResult:
    """Score a segmenter on a benchmark exactly as the papers do (dataset-level mIoU).

    Under ``torchrun`` (process group initialised, see :func:`init_distributed`) every process scores
    ``images[rank::world]`` of the remaining images and the confusion matrices are summed; all ranks
    return the same result.

    Args:
        seg: the segmenter (its preset should be the dataset's, e.g. ``"voc21"``).
        dataset: benchmark name (:func:`resclip.datasets.list_datasets`).
        root: its MMSegmentation folder.
        limit: score only the first ``limit`` images.
        class_file: class names (default: the shipped file of the benchmark).
        workers: image-decoding processes (0 = decode in this process); they exit when this process dies.
        save_predictions: folder for one ``<image stem>.png`` per image in the dataset's label convention.
        state_dir: where progress is kept (default :func:`default_state_dir`); if it cannot be written,
            a warning says so and nothing is saved.
        resume: reuse saved progress of the same key (False: recompute everything). Saved images whose
            files changed, or whose prediction PNG is missing or not the one written, are scored again.
        save_every: save progress every this many images (and on interruption).
        progress: show a progress bar (rank 0 only).
        release_text_tower: free ``seg``'s text tower once the classes are encoded (the commands do:
            their segmenter serves one dataset); keep False to use ``seg`` with other class lists.
        regions_dir: a folder of instance maps, one ``<image stem>.npz`` (CorrCLIP's pre-generated
            masks: key ``instance_mask``), ``.npy`` or ``.png`` per image at its original size
            (:func:`resclip.regions.read`), for a segmenter that reads regions
            (CorrCLIP, ``region_vote``) instead of making them with SAM 2.

    Returns:
        An :class:`EvalResult` (``confusion`` is ``(C, C)`` int64, rows = ground truth).

    Raises:
        DatasetError: an unreadable image, label or instance map, or no labelled pixel in any scored
            image (the mIoU would not be a number).
        DatasetNotFoundError: an image without its instance map in ``regions_dir``.
        ValueError: ``regions_dir`` for a segmenter that reads no regions.
        OutputError: a prediction PNG could not be written (the message names it).
    """
    started = time.time()
    spec = get_dataset_spec(dataset)
    samples = list_samples(spec, root, limit)
    if regions_dir is not None:
        regions_dir = check_regions_dir(seg, samples, regions_dir)
    lines, cls_path = benchmark_class_lines(spec, class_file)
    classes, text = _encode(seg, lines, shipped=class_file is None)
    if release_text_tower:
        seg.release_text_tower()
    dist = current_dist()
    key = state_key(seg, spec, root, lines, regions_dir)
    meta = {"dataset": spec.name, "root": str(root), "config": seg.config.to_dict()}
    store = ProgressStore(Path(state_dir) if state_dir else default_state_dir(), key, meta)
    store.check_writable()
    pred_dir = Path(save_predictions) if save_predictions is not None else None
    todo, sources, prior = _plan(samples, store, resume, pred_dir, spec, dist, regions_dir)
    mine = [(samples[i], sources[i]) for i in todo[dist.rank :: dist.world_size]]
    show = progress and dist.rank == 0
    new = _run_images(_Scorer(seg, spec, classes, text), mine, store, pred_dir, workers, save_every, show,
                      regions_dir)
    local = ConfusionMatrix(spec.num_classes)
    for entry in new.values():
        local.add_sparse(entry.flat, entry.counts)
    mine_counts = local.stacked()
    stacked = prior.stacked() + (all_reduce(mine_counts, seg.device) if dist.world_size > 1 else mine_counts)
    total, unassigned = stacked[:, :-1], stacked[:, -1]
    _finish(store, dist)
    return EvalResult(
        dataset=spec,
        root=str(root),
        class_names=["background", *classes.names[1:]] if spec.background else list(classes.names),
        class_file=cls_path,
        confusion=total,
        metrics=_metrics(total, unassigned, spec, root, len(samples)),
        num_images=len(samples),
        reused_images=len(samples) - len(todo),
        config=seg.config.to_dict(),
        device=str(seg.device),
        world_size=dist.world_size,
        limit=limit,
        elapsed_s=time.time() - started,
        state_key=key,
        unassigned=unassigned,
        extra={"regions": str(regions_dir)} if regions_dir is not None else {},
    )


def check_regions_dir(seg: Segmenter, samples: list[Sample], regions_dir: str | os.PathLike[str]) -> Path:
    """The resolved folder, refused before any work when ``seg`` reads no regions or when images have
    no instance map there.

    Raises:
        ValueError: a segmenter without regions; DatasetNotFoundError: the folder or a file is missing.
    """
    if not seg.reads_regions:
        raise ValueError(unused_message(seg.config.method, regions_dir))
    try:
        return check_folder(regions_dir, [s.stem for s in samples])
    except RegionsError as err:
        raise DatasetNotFoundError(str(err)) from None


def _encode(seg: Segmenter, lines: list[str], shipped: bool) -> tuple[ClassSpec, torch.Tensor]:
    with warnings.catch_warnings():
        if shipped:  # the reference files repeat a few synonyms (e.g. "bed"): known, harmless
            warnings.filterwarnings("ignore", message="synonyms .* appear in several classes")
        return seg.encode_classes(lines)


def _metrics(total: np.ndarray, unassigned: np.ndarray, spec: DatasetSpec, root: str | os.PathLike[str],
             images: int) -> SegMetrics:
    metrics = compute_metrics(total, unassigned)
    if not math.isfinite(metrics.miou):
        raise DatasetError(
            f"{spec.name} at {str(root)!r}: the {images} scored image(s) have no labelled pixel "
            f"(every annotation pixel is the ignore value), so the mIoU is not a number"
        )
    return metrics


def _plan(
    samples: list[Sample],
    store: ProgressStore,
    resume: bool,
    pred_dir: Path | None,
    spec: DatasetSpec,
    dist: DistInfo,
    regions_dir: str | os.PathLike[str] | None = None,
) -> tuple[list[int], list[str], ConfusionMatrix]:
    """The indices left to score (decided by rank 0, shared with every rank), every sample's source
    identity, and the summed counts of the images reused; says what it found on stderr."""
    done = _load_done(store, resume, dist)
    plan = plan_resume(samples, done, pred_dir, spec.num_classes, regions_dir) if dist.rank == 0 else None
    if dist.world_size > 1:  # rank 0 decides, so that every rank works on the same list
        shared: list[Any] = [plan]
        tdist.broadcast_object_list(shared, src=0)
        plan = shared[0]
    assert plan is not None
    todo, sources, why = plan
    prior = ConfusionMatrix(spec.num_classes)
    pending = set(todo)
    for i, s in enumerate(samples):
        if i not in pending:
            prior.add_sparse(done[s.id].flat, done[s.id].counts)
    reused = len(samples) - len(todo)
    where = f"progress kept in {store.directory} (key {store.key})"
    if why:
        _say(f"{spec.name}: scoring again {why}", dist)
    if reused:
        _say(f"{spec.name}: {reused} of {len(samples)} images done earlier, resuming; {where}", dist)
    else:
        others = store.others() if resume else []
        note = f" (starting fresh: {len(others)} saved run(s) there have other settings)" if others else ""
        _say(f"{spec.name}: {len(samples)} images; {where}{note}", dist)
    return todo, sources, prior


def _load_done(store: ProgressStore, resume: bool, dist: DistInfo) -> dict[str, Entry]:
    """Saved entries (or none, clearing old ones, without ``resume``); all ranks read before any writes."""
    done: dict[str, Entry] = {}
    if resume:
        done, _ = store.load()
    elif dist.rank == 0:
        store.clear()
    if dist.world_size > 1:
        tdist.barrier()
    return done


def _finish(store: ProgressStore, dist: DistInfo) -> None:
    """Rank 0 folds every part file into one, once all ranks have saved theirs."""
    if dist.world_size > 1:
        tdist.barrier()
    if dist.rank == 0:
        store.consolidate()
    if dist.world_size > 1:
        tdist.barrier()


def _run_images(
    score: _Scorer,
    samples: list[tuple[Sample, str]],
    store: ProgressStore,
    pred_dir: Path | None,
    workers: int,
    save_every: int,
    show: bool,
    regions_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Entry]:
    """Score ``samples`` (with their :func:`sample_source`; decoded by ``workers`` loader processes);
    returns their entries, saved to ``store`` every ``save_every`` images and when anything interrupts
    the loop."""
    new: dict[str, Entry] = {}
    if not samples:
        return new
    spec = score.spec
    source = {s.id: src for s, src in samples}
    loader = image_loader([s for s, _ in samples], spec, workers, regions_dir)
    running = ConfusionMatrix(spec.num_classes)
    saved = 0
    bar = tqdm(
        total=len(samples), unit="img", desc=spec.name, disable=not show, dynamic_ncols=True, file=sys.stderr
    )
    try:
        with sigterm_as_interrupt():
            for item in loader:
                (flat, counts), mask = score(item)
                digest = ""
                if pred_dir is not None:
                    digest = save_prediction(mask, pred_dir / f"{item.sample.stem}.png", spec)
                new[item.sample.id] = Entry(flat, counts, source[item.sample.id], digest)
                running.add_sparse(flat, counts)
                bar.update(1)
                if len(new) % 10 == 0 or len(new) == len(samples):
                    bar.set_postfix_str(f"mIoU {running.compute().miou * 100:.2f}", refresh=False)
                if len(new) - saved >= save_every:
                    store.save_part(new)
                    saved = len(new)
    finally:
        bar.close()
        if len(new) > saved:
            store.save_part(new)
        if len(new) < len(samples):
            _say_interrupted(len(new), store.enabled)
    return new


def _say_interrupted(new: int, saved: bool) -> None:
    done_now = f"{new} new images"
    msg = (
        f"progress saved ({done_now}); rerun the same command to resume"
        if saved
        else f"progress not saved ({done_now}): the state folder cannot be written"
    )
    print(f"resclip: {msg}", file=sys.stderr, flush=True)
