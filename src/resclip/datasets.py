"""Readers for the eight benchmarks, in the folder layouts MMSegmentation users already have (the
benchmarks themselves are described in :mod:`resclip.dataset_specs`).

Labels are read exactly as MMSegmentation reads them: Pillow, no conversion (palette PNGs keep their
indices), optional ``reduce_zero_label`` (0 -> 255, others -1, 254 -> 255), 255 = ignore. Every
problem (missing folder or file, label values outside the class range, image/label size mismatch)
raises an error that names the file and the expected layout; nothing is skipped silently.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .dataset_specs import (
    DATASETS,
    DatasetError,
    DatasetNotFoundError,
    DatasetSpec,
    class_file_path,
    get_dataset_spec,
    list_datasets,
    root_names,
)
from .fileio import atomic_write
from .metrics import IGNORE_INDEX
from .palettes import voc_palette
from .preprocess import load_image

__all__ = [  # the benchmark table (resclip.dataset_specs) is re-exported: one import for callers
    "DATASETS",
    "BenchmarkImages",
    "DatasetError",
    "DatasetNotFoundError",
    "DatasetSpec",
    "LoadedSample",
    "Sample",
    "check_label_values",
    "class_file_path",
    "get_dataset_spec",
    "identity_collate",
    "list_datasets",
    "list_samples",
    "load_pair",
    "load_regions",
    "read_label",
    "reduce_zero_label",
    "root_names",
    "save_prediction",
    "to_label_convention",
]


@dataclass(frozen=True)
class Sample:
    """One image/label pair.

    Attributes:
        id: the image path below ``img_dir`` without its suffix (unique within the dataset).
        image: image file.
        label: ground-truth file.
    """

    id: str
    image: Path
    label: Path

    @property
    def stem(self) -> str:
        """The image file's stem (predictions are saved as ``<stem>.png``)."""
        return self.image.name[: -len(self.image.suffix)] if self.image.suffix else self.image.name


def _require_dir(path: Path, spec: DatasetSpec, root: Path) -> None:
    if path.is_dir():
        return
    hint = ""
    for guess in (root / sub for sub in spec.root_candidates):
        if (guess / spec.img_dir).is_dir():
            hint = f"; did you mean --root {guess}?"
            break
    raise DatasetNotFoundError(f"folder {str(path)!r} not found; {spec.layout()}{hint}")


def list_samples(spec: DatasetSpec, root: str | os.PathLike[str], limit: int | None = None) -> list[Sample]:
    """List the validation pairs of a benchmark, in MMSegmentation's order.

    With a split file its order is kept; otherwise images are found recursively and sorted by path.

    Args:
        spec: the benchmark.
        root: its MMSegmentation folder (``VOCdevkit/VOC2012``, ``coco_stuff164k``...).
        limit: keep only the first ``limit`` pairs.

    Raises:
        DatasetNotFoundError: the root, a folder, the split file, a listed image or a label is missing.
        DatasetError: no images found, or ``limit < 1``.
    """
    base = Path(root).expanduser()
    if not base.is_dir():
        raise DatasetNotFoundError(f"dataset root {str(base)!r} does not exist; {spec.layout()}")
    img_dir, ann_dir = base / spec.img_dir, base / spec.ann_dir
    _require_dir(img_dir, spec, base)
    _require_dir(ann_dir, spec, base)
    if spec.split is not None:
        split = base / spec.split
        if not split.is_file():
            raise DatasetNotFoundError(f"split file {str(split)!r} not found; {spec.layout()}")
        ids = [line.strip() for line in split.read_text().splitlines() if line.strip()]
        for i in ids:
            if not (img_dir / f"{i}{spec.img_suffix}").is_file():
                raise DatasetNotFoundError(
                    f"image {str(img_dir / (i + spec.img_suffix))!r} listed in {str(split)!r} not found; "
                    f"{spec.layout()}"
                )
    else:
        found = sorted(p.relative_to(img_dir).as_posix() for p in img_dir.rglob(f"*{spec.img_suffix}"))
        ids = [p[: -len(spec.img_suffix)] for p in found]
    if not ids:
        raise DatasetError(f"no images *{spec.img_suffix} found under {str(img_dir)!r}; {spec.layout()}")
    if limit is not None:
        if limit < 1:
            raise DatasetError(f"limit must be >= 1, got {limit}")
        ids = ids[:limit]
    samples = [Sample(i, img_dir / f"{i}{spec.img_suffix}", ann_dir / f"{i}{spec.seg_suffix}") for i in ids]
    missing = [s for s in samples if not s.label.is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"missing label for {len(missing)} of {len(samples)} images, first: image "
            f"{str(missing[0].image)!r} has no {str(missing[0].label)!r}; {spec.layout()}"
        )
    return samples


def read_label(path: str | os.PathLike[str], spec: DatasetSpec) -> np.ndarray:
    """Read a ground-truth map as the benchmark scores it.

    Args:
        path: label PNG (palette or 8-bit grey; palette indices are used as they are).
        spec: the benchmark (for ``reduce_zero_label`` and the class range).

    Returns:
        ``(H, W)`` uint8 class indices in ``[0, num_classes)``, 255 = ignore.

    Raises:
        DatasetError: unreadable file, colour image, or values outside the class range (not 255).
    """
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            arr = np.asarray(img)
    except (OSError, SyntaxError) as err:
        raise DatasetError(f"could not read label {os.fspath(path)!r}: {err}") from err
    if arr.ndim != 2:
        raise DatasetError(
            f"label {os.fspath(path)!r} is a {mode} colour image; expected one class index per pixel "
            f"(palette or 8-bit grey PNG, as MMSegmentation's converters write); {spec.layout()}"
        )
    if arr.dtype != np.uint8:
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise DatasetError(f"label {os.fspath(path)!r} has values outside 0..255 (mode {mode})")
        arr = arr.astype(np.uint8)
    label = reduce_zero_label(arr) if spec.reduce_zero_label else arr.copy()
    check_label_values(label, spec, path)
    return label


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """MMSegmentation's ``reduce_zero_label``: 0 -> 255, others -1, 254 -> 255. ``(H, W)`` uint8."""
    out = label.astype(np.int16)
    out[out == 0] = 256
    out -= 1
    out[out == 254] = IGNORE_INDEX
    return out.astype(np.uint8)


def check_label_values(label: np.ndarray, spec: DatasetSpec, path: str | os.PathLike[str]) -> None:
    """Raise :class:`DatasetError` if ``label`` holds values other than ``0..num_classes-1`` and 255."""
    counts = np.bincount(label.ravel(), minlength=256)
    counts[IGNORE_INDEX] = 0
    bad = np.flatnonzero(counts[spec.num_classes :]) + spec.num_classes
    if bad.size:
        note = " after reduce_zero_label" if spec.reduce_zero_label else ""
        raise DatasetError(
            f"label {os.fspath(path)!r} has values {bad[:8].tolist()} outside the {spec.num_classes} classes "
            f"of {spec.name} (0..{spec.num_classes - 1}, 255 = ignore){note}; is this the right dataset "
            "and label folder?"
        )


def load_pair(sample: Sample, spec: DatasetSpec) -> tuple[np.ndarray, np.ndarray]:
    """Read one pair: ``(H, W, 3)`` uint8 RGB image and ``(H, W)`` uint8 label.

    Raises:
        DatasetError: unreadable files, bad label values, or image and label of different sizes.
    """
    try:
        rgb = load_image(sample.image)
    except ValueError as err:
        raise DatasetError(str(err)) from err
    label = read_label(sample.label, spec)
    if rgb.shape[:2] != label.shape:
        raise DatasetError(
            f"image {str(sample.image)!r} is {rgb.shape[1]}x{rgb.shape[0]} but its label "
            f"{str(sample.label)!r} is {label.shape[1]}x{label.shape[0]}; labels must have the image's size"
        )
    return rgb, label


@dataclass
class LoadedSample:
    """What a loader worker hands to the model: ``(H, W, 3)`` uint8 RGB image and ``(H, W)`` uint8 label,
    the image's ``(H, W)`` integer instance map when regions are read from a folder, or the error that
    prevented reading them."""

    sample: Sample
    image: np.ndarray | None = None
    label: np.ndarray | None = None
    error: str | None = None
    regions: np.ndarray | None = None


class BenchmarkImages(torch.utils.data.Dataset):
    """Decodes pairs (for a :class:`torch.utils.data.DataLoader` with worker processes).

    Errors are returned, not raised, so the main process can report them in one clear line.
    """

    def __init__(self, samples: Sequence[Sample], spec: DatasetSpec,
                 regions_dir: str | os.PathLike[str] | None = None) -> None:
        self.samples = list(samples)
        self.spec = spec
        self.regions_dir = regions_dir

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> LoadedSample:
        sample = self.samples[i]
        regions = None
        try:
            rgb, label = load_pair(sample, self.spec)
            if self.regions_dir is not None:
                regions = load_regions(sample, self.regions_dir)
        except (DatasetError, DatasetNotFoundError) as err:
            return LoadedSample(sample, error=str(err))
        return LoadedSample(sample, rgb, label, regions=regions)


def load_regions(sample: Sample, regions_dir: str | os.PathLike[str]) -> np.ndarray:
    """``(H, W)`` instance map of ``sample`` from ``regions_dir`` (:func:`resclip.regions.load`).

    Raises:
        DatasetError: no map for the image, or an unreadable one.
    """
    from .regions import RegionsError, load

    try:
        return load(regions_dir, sample.stem)
    except RegionsError as err:
        raise DatasetError(str(err)) from None


def identity_collate(item: LoadedSample) -> LoadedSample:
    """Collate function for ``batch_size=None`` loaders: keep the sample as it is."""
    return item


def to_label_convention(mask: np.ndarray, spec: DatasetSpec) -> np.ndarray:
    """``(H, W)`` predicted class indices -> uint8 values as in the label files (undo reduce_zero_label)."""
    values = mask.astype(np.int64) + (1 if spec.reduce_zero_label else 0)
    if values.size and (values.min() < 0 or values.max() > 254):
        raise ValueError(f"predicted classes out of range for a PNG label: {values.min()}..{values.max()}")
    return values.astype(np.uint8)


def save_prediction(mask: np.ndarray, path: str | os.PathLike[str], spec: DatasetSpec) -> str:
    """Write a prediction PNG holding the same values a ground-truth file would.

    Args:
        mask: ``(H, W)`` predicted class indices in ``[0, num_classes)``.
        path: output ``.png``; written atomically (:func:`resclip.fileio.atomic_write`).
        spec: the benchmark (``+1`` for reduce-zero-label datasets; VOC palette for VOC).

    Returns:
        The sha256 of the PNG written (a resumed evaluation checks the file against it).

    Raises:
        OutputError: naming ``path`` (no temporary file is left behind).
    """
    img = Image.fromarray(to_label_convention(mask, spec))  # 2-D uint8 -> mode "L"
    if spec.palette == "voc":
        img.putpalette(voc_palette().ravel().tolist())  # "L" -> "P", indices unchanged
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    data = buffer.getvalue()
    atomic_write(path, data)
    return hashlib.sha256(data).hexdigest()
