"""Benchmark evaluation: dataset-level mIoU, resumable, sharded over ``torchrun`` processes.

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

import contextlib
import ctypes
import functools
import hashlib
import io
import json
import math
import multiprocessing
import os
import platform
import signal
import sys
import threading
import time
import uuid
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as tdist
from tqdm import tqdm

from .datasets import (
    BenchmarkImages,
    DatasetError,
    DatasetSpec,
    LoadedSample,
    Sample,
    class_file_path,
    get_dataset_spec,
    identity_collate,
    list_samples,
    save_prediction,
)
from .digest import bytes_digest, file_digest, module_digest
from .fileio import OutputError, atomic_write, atomic_write_all, atomic_write_text, cache_root
from .metrics import ConfusionMatrix, SegMetrics, compute_metrics, markdown_table, percent, sparse_confusion
from .segmenter import Segmenter
from .text import read_class_file, text_fingerprint

__all__ = [
    "DistInfo",
    "Entry",
    "EvalResult",
    "ProgressStore",
    "atomic_write_text",  # re-exported from resclip.fileio for the commands
    "class_lines",
    "close_distributed",
    "current_dist",
    "default_state_dir",
    "evaluate",
    "init_distributed",
    "predict_mask",
    "sample_source",
    "software_versions",
    "state_key",
    "write_results",
]

STATE_VERSION = 2


class Entry(NamedTuple):
    """The saved result of one image.

    Attributes:
        flat: ``(K,)`` int64 flat confusion indices ``gt * C + pred``.
        counts: ``(K,)`` int64 pixel counts.
        source: :func:`sample_source` of the image when it was scored ("" = unknown: never reused).
        prediction: sha256 of the prediction PNG written for it ("" = none).
    """

    flat: np.ndarray
    counts: np.ndarray
    source: str = ""
    prediction: str = ""


# ------------------------------------------------------------------------------------------ distributed
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


def _all_reduce(matrix: np.ndarray, device: torch.device) -> np.ndarray:
    t = torch.from_numpy(matrix).to(device if tdist.get_backend() == "nccl" else "cpu")
    tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t.cpu().numpy()


# ------------------------------------------------------------------------------------------ files
def default_state_dir() -> Path:
    """``<cache root>/eval``: ``$RESCLIP_CACHE/eval``, else ``$XDG_CACHE_HOME/resclip/eval`` or
    ``~/.cache/resclip/eval`` (:func:`resclip.fileio.cache_root`)."""
    return cache_root() / "eval"


def sample_source(sample: Sample) -> str:
    """The identity of an image's files: image size and mtime, annotation size and content sha256.

    Saved next to the image's counts; a resumed evaluation scores the image again when it differs.
    A file that cannot be read gives ``""`` (which matches nothing).
    """
    try:
        image = os.stat(sample.image)
        label = os.stat(sample.label)
        content = file_digest(sample.label)
    except OSError:
        return ""
    return f"image {image.st_size} {image.st_mtime_ns}; annotation {label.st_size} {content}"


def software_versions() -> dict[str, str | None]:
    """Versions of everything that can change the numbers."""
    import open_clip
    import PIL

    from . import __version__

    return {
        "resclip": __version__,
        "torch": torch.__version__,
        "open_clip": getattr(open_clip, "__version__", None),
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
    }


# ------------------------------------------------------------------------------------------ progress state
def _entry_check(image_id: str, entry: Entry) -> str:
    """Checksum of one saved entry (its id, file identities, prediction digest and counts)."""
    head = json.dumps([image_id, entry.source, entry.prediction]).encode() + b"\n"
    flat = np.ascontiguousarray(entry.flat, dtype="<i8").tobytes()
    counts = np.ascontiguousarray(entry.counts, dtype="<i8").tobytes()
    return bytes_digest(head + flat + b"|" + counts)[:32]


class ProgressStore:
    """Per-image confusion counts of one evaluation key, in ``<dir>/<key>.npz`` plus part files.

    Each process writes its own ``<key>.part-<uuid>.npz`` (never overwriting another's); loading merges
    them all; :meth:`consolidate` folds them into ``<key>.npz``. Every entry carries a checksum; entries
    that fail it are dropped with a warning (and their images scored again). If the folder cannot be
    written (see :meth:`check_writable`), saving is switched off with one warning: the evaluation
    goes on, it just cannot be resumed.
    """

    def __init__(self, directory: Path, key: str, meta: dict[str, Any]) -> None:
        self.directory = directory
        self.key = key
        self.meta = meta
        self.part = directory / f"{key}.part-{uuid.uuid4().hex}.npz"
        self.enabled = True

    @property
    def main(self) -> Path:
        return self.directory / f"{self.key}.npz"

    def _files(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        found = self.directory.glob(f"{self.key}*.npz")
        return sorted(p for p in found if p == self.main or p.name.startswith(f"{self.key}.part-"))

    def _disable(self, why: str) -> None:
        if self.enabled:
            self.enabled = False
            warnings.warn(
                f"cannot save evaluation progress in {str(self.directory)!r} ({why}); "
                "the evaluation goes on but cannot be resumed (choose another folder with --state-dir)",
                UserWarning,
                stacklevel=3,
            )

    def check_writable(self) -> bool:
        """Try writing (and removing) a small file in the folder; on failure switch saving off (warned)."""
        probe = self.directory / f".{self.key}.probe-{uuid.uuid4().hex[:8]}"
        try:
            atomic_write(probe, b"")
            probe.unlink()
        except OSError as exc:
            self._disable(str(exc))
        return self.enabled

    def load(self) -> tuple[dict[str, Entry], list[Path]]:
        """All saved entries of this key, and the files they came from (unreadable files and entries that
        fail their checksum are warned about and left out)."""
        entries: dict[str, Entry] = {}
        used = []
        for path in self._files():
            try:
                good, bad = self._read(path)
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
                warnings.warn(f"ignoring unreadable evaluation state {str(path)!r}: {err}", stacklevel=2)
                continue
            if bad:
                warnings.warn(
                    f"ignoring {bad} damaged entr{'y' if bad == 1 else 'ies'} (checksum mismatch) in "
                    f"evaluation state {str(path)!r}; those images are scored again",
                    stacklevel=2,
                )
            entries.update(good)
            used.append(path)
        return entries, used

    def _read(self, path: Path) -> tuple[dict[str, Entry], int]:
        with np.load(path, allow_pickle=False) as f:
            if str(f["key"]) != self.key:
                raise ValueError("key mismatch")
            ids, offsets, flat, counts = f["ids"], f["offsets"], f["flat"], f["counts"]
            sources, predictions, checks = f["sources"], f["predictions"], f["checks"]
        n = len(ids)
        if not (len(offsets) == n + 1 and len(sources) == len(predictions) == len(checks) == n):
            raise ValueError("inconsistent array lengths")
        if (
            len(flat) != len(counts)
            or offsets[0] != 0
            or offsets[-1] != len(flat)
            or np.any(np.diff(offsets) < 0)
        ):
            raise ValueError("inconsistent offsets")
        good: dict[str, Entry] = {}
        bad = 0
        for i in range(n):
            a, b = int(offsets[i]), int(offsets[i + 1])
            entry = Entry(flat[a:b], counts[a:b], str(sources[i]), str(predictions[i]))
            if _entry_check(str(ids[i]), entry) == str(checks[i]):
                good[str(ids[i])] = entry
            else:
                bad += 1
        return good, bad

    def write(self, path: Path, entries: dict[str, Entry] | dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
        """Atomically write ``entries`` to ``path`` (raises :class:`~resclip.fileio.OutputError`)."""
        ids = list(entries)
        items = [Entry(*entries[i]) for i in ids]
        offsets = np.concatenate([[0], np.cumsum([len(e.flat) for e in items])]).astype(np.int64)
        empty = np.zeros(0, np.int64)
        buf = io.BytesIO()
        np.savez(
            buf,
            key=np.array(self.key),
            meta=np.array(json.dumps(self.meta, default=str)),
            ids=np.array(ids, dtype=str),
            offsets=offsets,
            flat=np.concatenate([e.flat for e in items]).astype(np.int64) if ids else empty,
            counts=np.concatenate([e.counts for e in items]).astype(np.int64) if ids else empty,
            sources=np.array([e.source for e in items], dtype=str),
            predictions=np.array([e.prediction for e in items], dtype=str),
            checks=np.array([_entry_check(i, e) for i, e in zip(ids, items, strict=True)], dtype=str),
        )
        atomic_write(path, buf.getvalue())

    def save_part(self, entries: dict[str, Entry]) -> None:
        """Save this process's new entries (replaces its previous part file); a failure to write is
        warned about once and switches saving off."""
        if entries and self.enabled:
            try:
                self.write(self.part, entries)
            except OutputError as exc:
                self._disable(str(exc))

    def others(self) -> list[str]:
        """Keys of saved states of the same dataset with other settings (protocol, weights, data, classes)."""
        prefix = self.key.rsplit("-", 1)[0] + "-"
        if not self.directory.is_dir():
            return []
        keys = {p.name.split(".")[0] for p in self.directory.glob(f"{prefix}*.npz")}
        return sorted(keys - {self.key})

    def clear(self) -> None:
        """Delete every saved file of this key."""
        for path in self._files():
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)

    def consolidate(self) -> None:
        """Merge every file of this key into ``<key>.npz`` and remove the part files."""
        if not self.enabled:
            return
        entries, used = self.load()
        if entries:
            try:
                self.write(self.main, entries)
            except OutputError as exc:
                self._disable(str(exc))
                return
        for path in used:
            if path != self.main:
                with contextlib.suppress(OSError):
                    path.unlink(missing_ok=True)


def state_key(seg: Segmenter, spec: DatasetSpec, root: str | os.PathLike[str], lines: list[str]) -> str:
    """Hash of everything that decides an image's confusion counts (except the image's files, whose
    identity is saved per image): protocol, both towers' weight digests, dataset, root, classes, device."""
    text = seg.fingerprint or (text_fingerprint(seg.model) if seg.model is not None else "")
    payload = {
        "version": STATE_VERSION,
        "config": seg.config.to_dict(),
        "text_weights": text,
        "visual_weights": seg.visual_digest or module_digest(seg.engine.visual),
        "dataset": spec.name,
        "root": str(Path(root).expanduser().resolve()),
        "classes": lines,
        "device": seg.device.type,
    }
    blob = json.dumps(payload, sort_keys=True, default=str)
    return f"{spec.name}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


# ------------------------------------------------------------------------------------------ results
@dataclass
class EvalResult:
    """Outcome of one evaluation.

    Attributes:
        dataset: the benchmark.
        root: its folder.
        class_names: display name per class.
        class_file: class-name file used.
        confusion: ``(C, C)`` int64 dataset-level confusion matrix (rows: ground truth).
        metrics: scores derived from it.
        num_images: images scored.
        reused_images: images whose counts came from saved progress.
        config: the segmenter's full protocol (``seg.config.to_dict()``).
        device: device the model ran on.
        world_size: processes that shared the work.
        limit: ``--limit`` (None = all images).
        elapsed_s: wall time of this run.
        state_key: key of the saved progress.
    """

    dataset: DatasetSpec
    root: str
    class_names: list[str]
    class_file: str
    confusion: np.ndarray
    metrics: SegMetrics
    num_images: int
    reused_images: int
    config: dict[str, Any]
    device: str
    world_size: int
    limit: int | None
    elapsed_s: float
    state_key: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def miou(self) -> float:
        """mIoU in percent (unrounded)."""
        return self.metrics.miou * 100.0

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON results (percentages rounded to 2 decimals as mmseg reports them; null = absent)."""
        m = self.metrics
        return {
            "dataset": self.dataset.name,
            "dataset_title": self.dataset.title,
            "root": self.root,
            "num_images": self.num_images,
            "num_classes": len(self.class_names),
            "limit": self.limit,
            "miou": percent(m.miou),
            "pixel_accuracy": percent(m.aacc),
            "mean_accuracy": percent(m.macc),
            "per_class_iou": {n: percent(v) for n, v in zip(self.class_names, m.iou, strict=True)},
            "per_class_accuracy": {n: percent(v) for n, v in zip(self.class_names, m.acc, strict=True)},
            "num_pixels": m.num_pixels,
            "method": self.config.get("method"),
            "rcs": self.config.get("rcs") is not None,
            "sfr": self.config.get("sfr") is not None,
            "preset": self.config.get("preset"),
            "model": self.config.get("model"),
            "pretrained": self.config.get("pretrained"),
            "precision": self.config.get("precision"),
            "protocol": self.config,
            "class_file": self.class_file,
            "reduce_zero_label": self.dataset.reduce_zero_label,
            "device": self.device,
            "world_size": self.world_size,
            "versions": software_versions(),
            "elapsed_s": round(self.elapsed_s, 2),
            "reused_images": self.reused_images,
            "state_key": self.state_key,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **self.extra,
            "confusion_matrix": self.confusion.tolist(),
        }


def _sibling(path: Path, suffix: str) -> Path:
    return path.with_suffix(suffix) if path.suffix == ".json" else path.with_name(path.name + suffix)


def write_results(result: EvalResult, path: str | os.PathLike[str]) -> list[Path]:
    """Write ``results.json`` plus ``results.md`` and ``results.csv`` next to it (all or none of them).

    Raises:
        OutputError: naming the file that could not be written (no temporary file is left behind).
    """
    out = Path(path)
    data = result.to_dict()
    c = result.config
    head = (
        f"# {result.dataset.title}: mIoU {data['miou']}\n\n"
        f"method {c.get('method')}, RCS {'on' if data['rcs'] else 'off'}, "
        f"SFR {'on' if data['sfr'] else 'off'}, "
        f"preset {c.get('preset')}, model {c.get('model')} ({c.get('pretrained')}), {c.get('precision')}; "
        f"{result.num_images} images of {result.root}\n\n"
    )
    md = head + markdown_table(result.metrics, result.class_names)
    m = result.metrics
    rows = ["class,iou,acc"] + [
        f"{_csv(n)},{_num(i)},{_num(a)}" for n, i, a in zip(result.class_names, m.iou, m.acc, strict=True)
    ]
    rows += [f"mIoU,{_num(m.miou)},", f"aAcc,,{_num(m.aacc)}", f"mAcc,,{_num(m.macc)}"]
    files = [
        (out, json.dumps(data, indent=1) + "\n"),
        (_sibling(out, ".md"), md),
        (_sibling(out, ".csv"), "\n".join(rows) + "\n"),
    ]
    atomic_write_all([(p, text.encode("utf-8")) for p, text in files])
    return [p for p, _ in files]


def _csv(name: str) -> str:
    return f'"{name}"' if "," in name or '"' in name else name


def _num(x: float) -> str:
    return "" if math.isnan(x) else f"{x * 100:.4f}"


# ------------------------------------------------------------------------------------------ evaluation
def class_lines(spec: DatasetSpec, class_file: str | os.PathLike[str] | None = None) -> tuple[list[str], str]:
    """Class lines for ``spec`` (the shipped file unless ``class_file``), checked against its class count."""
    path = Path(class_file) if class_file is not None else class_file_path(spec)
    lines = read_class_file(path)
    if len(lines) != spec.num_classes:
        raise DatasetError(
            f"class file {str(path)!r} has {len(lines)} lines but {spec.name} has {spec.num_classes} classes "
            "(one line per class, synonyms separated by commas)"
        )
    return lines, str(path)


def predict_mask(seg: Segmenter, rgb: np.ndarray, classes: list[str], text: torch.Tensor) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB -> ``(H, W)`` class indices (``seg.predict(...).mask``; probabilities are
    never built)."""
    return seg.predict(rgb, classes, embeddings=text).mask


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
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


def _say(msg: str, dist: DistInfo) -> None:
    if dist.rank == 0:
        print(msg, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class _Scorer:
    """One image -> its sparse confusion counts and predicted mask."""

    seg: Segmenter
    spec: DatasetSpec
    lines: list[str]
    text: torch.Tensor

    def __call__(self, item: LoadedSample) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray]:
        if item.error is not None or item.image is None or item.label is None:
            raise DatasetError(item.error or f"could not read {item.sample.image}")
        mask = predict_mask(self.seg, item.image, self.lines, self.text)
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

    Returns:
        An :class:`EvalResult` (``confusion`` is ``(C, C)`` int64, rows = ground truth).

    Raises:
        DatasetError: an unreadable image or label, or no labelled pixel in any scored image (the
            mIoU would not be a number).
        OutputError: a prediction PNG could not be written (the message names it).
    """
    started = time.time()
    spec = get_dataset_spec(dataset)
    samples = list_samples(spec, root, limit)
    lines, cls_path = class_lines(spec, class_file)
    dist = current_dist()
    with warnings.catch_warnings():
        if class_file is None:  # the reference files repeat a few synonyms (e.g. "bed"): known, harmless
            warnings.filterwarnings("ignore", message="synonyms .* appear in several classes")
        cspec, text = seg.encode_classes(lines)
    if release_text_tower:
        seg.release_text_tower()
    names = ["background", *cspec.names[1:]] if spec.background else list(cspec.names)
    key = state_key(seg, spec, root, lines)
    meta = {"dataset": spec.name, "root": str(root), "config": seg.config.to_dict()}
    store = ProgressStore(Path(state_dir) if state_dir else default_state_dir(), key, meta)
    store.check_writable()
    done = _load_done(store, resume, dist)
    pred_dir = Path(save_predictions) if save_predictions is not None else None
    plan = _plan(samples, done, pred_dir, spec.num_classes) if dist.rank == 0 else None
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
    where = f"progress kept in {store.directory} (key {key})"
    if why:
        _say(f"{spec.name}: scoring again {why}", dist)
    if reused:
        _say(f"{spec.name}: {reused} of {len(samples)} images done earlier, resuming; {where}", dist)
    else:
        others = store.others() if resume else []
        note = f" (starting fresh: {len(others)} saved run(s) there have other settings)" if others else ""
        _say(f"{spec.name}: {len(samples)} images; {where}{note}", dist)
    mine = [(samples[i], sources[i]) for i in todo[dist.rank :: dist.world_size]]
    new = _run_images(
        _Scorer(seg, spec, lines, text),
        mine,
        store,
        pred_dir,
        workers,
        save_every,
        progress and dist.rank == 0,
    )
    local = ConfusionMatrix(spec.num_classes)
    for entry in new.values():
        local.add_sparse(entry.flat, entry.counts)
    total = prior.matrix + (_all_reduce(local.matrix, seg.device) if dist.world_size > 1 else local.matrix)
    _finish(store, dist)
    metrics = compute_metrics(total)
    if not math.isfinite(metrics.miou):
        raise DatasetError(
            f"{spec.name} at {str(root)!r}: the {len(samples)} scored image(s) have no labelled pixel "
            f"(every annotation pixel is the ignore value), so the mIoU is not a number"
        )
    return EvalResult(
        dataset=spec,
        root=str(root),
        class_names=names,
        class_file=cls_path,
        confusion=total,
        metrics=metrics,
        num_images=len(samples),
        reused_images=reused,
        config=seg.config.to_dict(),
        device=str(seg.device),
        world_size=dist.world_size,
        limit=limit,
        elapsed_s=time.time() - started,
        state_key=key,
    )


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


def _valid_counts(entry: Entry, num_classes: int) -> bool:
    flat, counts = entry.flat, entry.counts
    if len(flat) != len(counts):
        return False
    return not len(flat) or bool(flat.min() >= 0 and flat.max() < num_classes**2 and counts.min() >= 0)


def _prediction_matches(path: Path, digest: str) -> bool:
    """The PNG at ``path`` is byte for byte the one whose sha256 was saved."""
    if not digest:
        return False
    try:
        return file_digest(path) == digest
    except OSError:
        return False


def _plan(
    samples: list[Sample], done: dict[str, Entry], pred_dir: Path | None, num_classes: int
) -> tuple[list[int], list[str], str]:
    """Indices to score, every sample's :func:`sample_source`, and why saved images are scored again.

    A saved image is reused only if its files have the saved identity and, with ``pred_dir``, its
    prediction PNG is the one written (a missing, truncated or replaced PNG is recomputed).
    """
    todo: list[int] = []
    sources = [sample_source(s) for s in samples]
    changed = damaged = 0
    for i, s in enumerate(samples):
        entry = done.get(s.id)
        if entry is None:
            todo.append(i)
        elif not sources[i] or entry.source != sources[i] or not _valid_counts(entry, num_classes):
            todo.append(i)
            changed += 1
        elif pred_dir is not None and not _prediction_matches(pred_dir / f"{s.stem}.png", entry.prediction):
            todo.append(i)
            damaged += (pred_dir / f"{s.stem}.png").exists()
    reasons = []
    if changed:
        reasons.append(f"{changed} image(s) whose image or annotation changed since they were scored")
    if damaged:
        reasons.append(f"{damaged} image(s) whose saved prediction PNG is not the one written")
    return todo, sources, "; ".join(reasons)


def _finish(store: ProgressStore, dist: DistInfo) -> None:
    """Rank 0 folds every part file into one, once all ranks have saved theirs."""
    if dist.world_size > 1:
        tdist.barrier()
    if dist.rank == 0:
        store.consolidate()
    if dist.world_size > 1:
        tdist.barrier()


# ------------------------------------------------------------------------------------------ loader workers
_PR_SET_PDEATHSIG = 1


def _exit_with_parent(parent: int, worker_id: int) -> None:
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


def _run_images(
    score: _Scorer,
    samples: list[tuple[Sample, str]],
    store: ProgressStore,
    pred_dir: Path | None,
    workers: int,
    save_every: int,
    show: bool,
) -> dict[str, Entry]:
    """Score ``samples`` (with their :func:`sample_source`; decoded by ``workers`` loader processes);
    returns their entries, saved to ``store`` every ``save_every`` images and when anything interrupts
    the loop."""
    new: dict[str, Entry] = {}
    if not samples:
        return new
    spec = score.spec
    source = {s.id: src for s, src in samples}
    loader = torch.utils.data.DataLoader(
        BenchmarkImages([s for s, _ in samples], spec),
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        collate_fn=identity_collate,  # type: ignore[arg-type]
        prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=functools.partial(_exit_with_parent, os.getpid()) if workers > 0 else None,
    )
    running = ConfusionMatrix(spec.num_classes)
    saved = 0
    bar = tqdm(
        total=len(samples), unit="img", desc=spec.name, disable=not show, dynamic_ncols=True, file=sys.stderr
    )
    try:
        with _sigterm_as_interrupt():
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
            done_now = f"{len(new)} new images"
            msg = (
                f"progress saved ({done_now}); rerun the same command to resume"
                if store.enabled
                else f"progress not saved ({done_now}): the state folder cannot be written"
            )
            print(f"resclip: {msg}", file=sys.stderr, flush=True)
    return new
