"""Saved evaluation progress: per-image confusion counts, checksummed, in part files per process.

Each image's counts are saved with the identity of its files (image: size and modification time;
annotation: size and sha256 of its content), the sha256 of its saved prediction PNG, and a checksum of
all of these, under a key that hashes everything else that decides the numbers (:func:`state_key`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import uuid
import warnings
import zipfile
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ..datasets import DatasetSpec, Sample
from ..digest import bytes_digest, file_digest, module_digest
from ..fileio import OutputError, atomic_write, cache_root
from ..regions import identity
from ..segmenter import Segmenter
from ..textencode import text_fingerprint

__all__ = ["Entry", "ProgressStore", "default_state_dir", "plan_resume", "sample_source", "state_key"]

STATE_VERSION = 3  # 3: ProxyCLIP's MAE side follows the protocol's crop


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


def default_state_dir() -> Path:
    """``<cache root>/eval``: ``$RESCLIP_CACHE/eval``, else ``$XDG_CACHE_HOME/resclip/eval`` or
    ``~/.cache/resclip/eval`` (:func:`resclip.fileio.cache_root`)."""
    return cache_root() / "eval"


def sample_source(sample: Sample, regions_dir: str | os.PathLike[str] | None = None) -> str:
    """The identity of an image's files: image size and mtime, annotation size and content sha256,
    and with ``regions_dir`` its instance map's name and content sha256.

    Saved next to the image's counts; a resumed evaluation scores the image again when it differs.
    A file that cannot be read gives ``""`` (which matches nothing).
    """
    try:
        image = os.stat(sample.image)
        label = os.stat(sample.label)
        content = file_digest(sample.label)
        source = f"image {image.st_size} {image.st_mtime_ns}; annotation {label.st_size} {content}"
        if regions_dir is not None:
            found = identity(regions_dir, sample.stem)
            if not found:
                return ""
            source += f"; regions {found}"
    except OSError:
        return ""
    return source


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


def state_key(seg: Segmenter, spec: DatasetSpec, root: str | os.PathLike[str], lines: list[str],
              regions_dir: str | os.PathLike[str] | None = None) -> str:
    """Hash of everything that decides an image's confusion counts (except the image's files, whose
    identity is saved per image): protocol, both towers' weight digests, dataset, root, classes, device,
    and the instance-map folder when regions are read from one."""
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
    if regions_dir is not None:
        payload["regions"] = str(Path(regions_dir).expanduser().resolve())
    blob = json.dumps(payload, sort_keys=True, default=str)
    return f"{spec.name}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def _valid_counts(entry: Entry, num_classes: int) -> bool:
    flat, counts = entry.flat, entry.counts
    if len(flat) != len(counts):
        return False
    # gt * C + pred, or C * C + gt for a pixel given no class
    return not len(flat) or bool(flat.min() >= 0 and flat.max() < num_classes**2 + num_classes
                                 and counts.min() >= 0)


def _prediction_matches(path: Path, digest: str) -> bool:
    """The PNG at ``path`` is byte for byte the one whose sha256 was saved."""
    if not digest:
        return False
    try:
        return file_digest(path) == digest
    except OSError:
        return False


def plan_resume(
    samples: list[Sample], done: dict[str, Entry], pred_dir: Path | None, num_classes: int,
    regions_dir: str | os.PathLike[str] | None = None,
) -> tuple[list[int], list[str], str]:
    """Indices to score, every sample's :func:`sample_source`, and why saved images are scored again.

    A saved image is reused only if its files (with ``regions_dir``, its instance map too) have the
    saved identity and, with ``pred_dir``, its prediction PNG is the one written (a missing,
    truncated or replaced PNG is recomputed).
    """
    todo: list[int] = []
    sources = [sample_source(s, regions_dir) for s in samples]
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
        files = "image, annotation or instance map" if regions_dir is not None else "image or annotation"
        reasons.append(f"{changed} image(s) whose {files} changed since they were scored")
    if damaged:
        reasons.append(f"{damaged} image(s) whose saved prediction PNG is not the one written")
    return todo, sources, "; ".join(reasons)
