"""Instance maps read from a folder: CorrCLIP's pre-generated masks, or anyone's own regions.

An instance map is an ``(H, W)`` integer label map of an image at its original size (pixels with one
label form one region, see :mod:`resclip.corrclip`). The commands ``segment``, ``eval`` and ``label``
take ``--regions DIR`` (one file per image, named by the image's stem or labelling id); this module
owns the folder rules they share:

* :func:`resolve_dir` turns the folder into an absolute path (``~`` expanded) or refuses it;
* :func:`find` / :func:`load` look up ``<name>.npz`` (CorrCLIP's ``region_masks.zip`` layout: an
  ``instance_mask`` array), ``<name>.npy`` or ``<name>.png``, never outside the folder; for labelling
  ids, which keep the image's suffix, ``photo.jpg`` also matches ``photo.npz``;
* :func:`read` / :func:`decode` read one file, never running code from it (arrays with
  ``allow_pickle=False``, refused from their header when they hold objects, are not 2-D integers or
  declare more labels than an image can have);
* :func:`check_folder` refuses, before any model loads, a folder that lacks some images' maps;
* :func:`identity` names a map's file and content, for records that must change when the map does.

Every refusal is a :class:`RegionsError` (a ``ValueError``) with a one-line message naming the file
or folder and the fix.
"""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "NPZ_KEY",
    "SUFFIXES",
    "RegionsError",
    "check_folder",
    "decode",
    "find",
    "identity",
    "load",
    "load_with_identity",
    "missing",
    "read",
    "resolve_dir",
    "unused_message",
]

#: instance-map files, in the order :func:`find` looks for them
SUFFIXES = (".npz", ".npy", ".png")
#: the array name in CorrCLIP's pre-generated mask files (``<image stem>.npz``)
NPZ_KEY = "instance_mask"
_FIX = "; give an (H, W) integer label map as .npz (key instance_mask), .npy or a 1-channel PNG"
_PNG_MODES = ("L", "P", "I", "I;16", "I;16B", "I;16L")
#: image suffixes a labelling id may keep (``photo.jpg`` finds ``photo.npz`` with ``strip_image_suffix``)
IMAGE_SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".ppm", ".tif", ".tiff", ".webp")
#: the most labels a map may declare: PIL's decompression-bomb limit for images, twice
MAX_PIXELS = 2 * 89_478_485


class RegionsError(ValueError):
    """A missing or unreadable instance map, or a folder that cannot serve one (one line)."""


def unused_message(method: str, folder: str | os.PathLike[str] | None = None) -> str:
    """The refusal of instance maps (from ``folder``, else ``predict(regions=)``) given to a segmenter
    that reads none."""
    given = f"instance maps from {os.fspath(folder)!r}" if folder is not None else "regions="
    return (f"{given} would not be used: method {method!r} reads no regions; use corrclip or "
            "--set region_vote=True")


def resolve_dir(folder: str | os.PathLike[str]) -> Path:
    """``folder`` as an absolute path, ``~`` expanded.

    Raises:
        RegionsError: it is not a folder.
    """
    path = Path(folder).expanduser().resolve()
    if not path.is_dir():
        raise RegionsError(f"instance-map folder {os.fspath(folder)!r} does not exist")
    return path


def find(folder: str | os.PathLike[str], name: str, strip_image_suffix: bool = False) -> Path | None:
    """The map of ``name`` in ``folder`` (``<name>.npz``, ``.npy`` or ``.png``, the first that exists),
    or None. ``strip_image_suffix`` (labelling ids, which keep the image's suffix): also
    ``<name without .jpg / .png ...>.npz``. A name that would lead outside ``folder`` finds nothing."""
    root = Path(folder).resolve()
    stem, suffix = os.path.splitext(name)
    names = (name, stem) if strip_image_suffix and suffix.lower() in IMAGE_SUFFIXES else (name,)
    for candidate in names:
        for ext in SUFFIXES:
            path = Path(folder) / f"{candidate}{ext}"
            if path.is_file() and path.resolve().is_relative_to(root):
                return path
    return None


def load(folder: str | os.PathLike[str], name: str, strip_image_suffix: bool = False) -> np.ndarray:
    """The ``(H, W)`` instance map of ``name`` in ``folder`` (:func:`find`, :func:`read`).

    Raises:
        RegionsError: no file for ``name``, or an unreadable one.
    """
    return load_with_identity(folder, name, strip_image_suffix)[0]


def load_with_identity(folder: str | os.PathLike[str], name: str,
                       strip_image_suffix: bool = False) -> tuple[np.ndarray, str]:
    """:func:`load` and the :func:`identity` of the very bytes it decoded (the file is read once).

    Raises:
        RegionsError: no file for ``name``, or an unreadable one.
    """
    path = find(folder, name, strip_image_suffix)
    if path is None:
        raise RegionsError(f"no instance map for {name!r} in {os.fspath(folder)!r} (expected <name>.npz, "
                           ".npy or .png)")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise RegionsError(f"instance map {str(path)!r} cannot be read ({err}){_FIX}") from None
    return decode(data, str(path)), f"{path.name} {hashlib.sha256(data).hexdigest()}"


def missing(folder: str | os.PathLike[str], names: Sequence[str]) -> list[str]:
    """The names without a map in ``folder``."""
    return [name for name in names if find(folder, name) is None]


def check_folder(folder: str | os.PathLike[str], names: Sequence[str]) -> Path:
    """The resolved folder, once every name has a map there.

    Raises:
        RegionsError: no such folder, or images without a map (how many, and the first).
    """
    path = resolve_dir(folder)
    lacking = missing(path, names)
    if lacking:
        raise RegionsError(f"{len(lacking)} of {len(names)} images have no instance map in "
                           f"{os.fspath(folder)!r} (first: {lacking[0]!r}; expected <image stem>.npz, .npy "
                           "or .png)")
    return path


def identity(folder: str | os.PathLike[str], name: str, strip_image_suffix: bool = False) -> str:
    """``"<file name> <sha256>"`` of ``name``'s map ("" when there is none)."""
    path = find(folder, name, strip_image_suffix)
    if path is None:
        return ""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return f"{path.name} {digest.hexdigest()}"


def _check_npy_header(handle: Any) -> None:
    """Refuse an ``.npy`` stream (at its start) from its header alone, before any array is allocated:
    an object dtype (pickles), not two dimensions, not integers, or more labels than an image can have.
    numpy parses headers with ``ast.literal_eval``: nothing in them runs."""
    from numpy.lib import format as npformat

    try:
        version = npformat.read_magic(handle)
        reader = npformat.read_array_header_1_0 if version == (1, 0) else npformat.read_array_header_2_0
        shape, _, dtype = reader(handle)
    except ValueError as err:  # numpy refuses headers it would have to evaluate
        raise RegionsError(f"has a malformed .npy header ({' '.join(str(err).split())})") from None
    if dtype.hasobject:
        raise RegionsError("holds pickled objects, which are never loaded")
    if len(shape) != 2 or not (np.issubdtype(dtype, np.integer) or dtype == np.bool_):
        raise RegionsError(f"is a {dtype} array of shape {tuple(shape)}, not an (H, W) integer map")
    if int(np.prod(shape, dtype=np.float64)) > MAX_PIXELS:
        raise RegionsError(f"declares {shape[0]} x {shape[1]} labels, more than any image resclip reads "
                           f"({MAX_PIXELS} pixels)")


def read(path: str | os.PathLike[str]) -> np.ndarray:
    """An ``(H, W)`` integer instance map from a file (:func:`decode` of its bytes)."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise RegionsError(f"instance map {os.fspath(path)!r} cannot be read ({err}){_FIX}") from None
    return decode(data, os.fspath(path))


def decode(data: bytes, where: str) -> np.ndarray:
    """An ``(H, W)`` integer instance map from a file's bytes, never running code from them.

    Formats (by ``where``'s suffix): CorrCLIP's pre-generated masks (``.npz`` with an
    ``instance_mask`` array, as its ``region_masks.zip`` holds them), any ``.npz`` with a single array,
    a ``.npy`` array, or a single-channel PNG (8- or 16-bit: the pixel values are the labels). Arrays
    are read with ``allow_pickle=False`` after their header was checked (:func:`_check_npy_header`).

    Returns:
        The labels as int8 / uint8 / int16 / int32 / int64 as stored (booleans as uint8, wider unsigned
        types as int64: types every torch reads).

    Raises:
        RegionsError: one line naming ``where`` and what is wrong (not 2-D, not integers, a pickled
            object, several arrays without ``instance_mask``, too large, unreadable or corrupt).
    """
    from PIL import Image

    lower = where.lower()
    try:
        if lower.endswith(".png"):
            with Image.open(io.BytesIO(data)) as img:
                if img.mode not in _PNG_MODES:
                    raise RegionsError(f"is a {img.mode} image, not one channel of labels")
                labels = np.asarray(img)
        elif lower.endswith(".npz"):
            if not zipfile.is_zipfile(io.BytesIO(data)):
                raise RegionsError("is not a .npz (zip) archive")
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                names = [n.removesuffix(".npy") for n in archive.namelist() if n.endswith(".npy")]
                if NPZ_KEY not in names and len(names) != 1:
                    raise RegionsError(f"holds {len(names)} arrays and no {NPZ_KEY!r}")
                member = f"{NPZ_KEY if NPZ_KEY in names else names[0]}.npy"
                with archive.open(member) as handle:
                    _check_npy_header(handle)
                with archive.open(member) as handle:
                    labels = np.load(io.BytesIO(handle.read()), allow_pickle=False)
        else:
            if data[:6] != b"\x93NUMPY":
                raise RegionsError("is not a .npy array file")
            _check_npy_header(io.BytesIO(data))
            labels = np.load(io.BytesIO(data), allow_pickle=False)
    except RegionsError as err:
        raise RegionsError(f"instance map {where!r} {err}{_FIX}") from None
    except (ValueError, OSError, EOFError, SyntaxError, MemoryError, zipfile.BadZipFile, zlib.error,
            Image.DecompressionBombError) as err:  # truncated arrays, corrupt archives and images
        raise RegionsError(f"instance map {where!r} cannot be read ({type(err).__name__}: "
                           f"{' '.join(str(err).split())}){_FIX}") from None
    labels = np.asarray(labels)
    if labels.ndim != 2 or not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_):
        raise RegionsError(f"instance map {where!r} is a {labels.dtype} array of shape {labels.shape}, "
                           f"not an (H, W) integer map{_FIX}")
    if labels.dtype == np.bool_:
        return labels.astype(np.uint8)
    if labels.dtype.kind == "u" and labels.dtype.itemsize > 1:
        return labels.astype(np.int64)
    return np.ascontiguousarray(labels)
