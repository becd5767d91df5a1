"""Instance maps read from a folder: CorrCLIP's pre-generated masks, or anyone's own regions.

An instance map is an ``(H, W)`` integer label map of an image at its original size (pixels with one
label form one region, see :mod:`resclip.corrclip`). The commands ``segment``, ``eval`` and ``label``
take ``--regions DIR`` (one file per image, named by the image's stem or labelling id); this module
owns the folder rules they share:

* :func:`resolve_dir` turns the folder into an absolute path (``~`` expanded) or refuses it;
* :func:`find` / :func:`load` look up ``<name>.npz`` (CorrCLIP's ``region_masks.zip`` layout: an
  ``instance_mask`` array), ``<name>.npy`` or ``<name>.png``; a name that keeps its image suffix
  (``photo.jpg``, a labelling id) also matches ``photo.npz``;
* :func:`read` reads one file, never running code from it (arrays with ``allow_pickle=False``,
  object arrays refused from their header);
* :func:`check_folder` refuses, before any model loads, a folder that lacks some images' maps;
* :func:`identity` names a map's file and content, for records that must change when the map does.

Every refusal is a :class:`RegionsError` (a ``ValueError``) with a one-line message naming the file
or folder and the fix.
"""

from __future__ import annotations

import hashlib
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
    "find",
    "identity",
    "load",
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


def find(folder: str | os.PathLike[str], name: str) -> Path | None:
    """The map of ``name`` in ``folder`` (``<name>.npz``, ``.npy`` or ``.png``, the first that exists;
    then the same without ``name``'s own suffix), or None."""
    stem, suffix = os.path.splitext(name)
    for candidate in (name, stem) if suffix else (name,):
        for ext in SUFFIXES:
            path = Path(folder) / f"{candidate}{ext}"
            if path.is_file():
                return path
    return None


def load(folder: str | os.PathLike[str], name: str) -> np.ndarray:
    """The ``(H, W)`` instance map of ``name`` in ``folder`` (:func:`find`, :func:`read`).

    Raises:
        RegionsError: no file for ``name``, or an unreadable one.
    """
    path = find(folder, name)
    if path is None:
        raise RegionsError(f"no instance map for {name!r} in {os.fspath(folder)!r} (expected <name>.npz, "
                           ".npy or .png)")
    return read(path)


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


def identity(folder: str | os.PathLike[str], name: str) -> str:
    """``"<file name> <sha256>"`` of ``name``'s map ("" when there is none)."""
    path = find(folder, name)
    if path is None:
        return ""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return f"{path.name} {digest.hexdigest()}"


def _npy_has_objects(handle: Any) -> bool:
    """Whether an ``.npy`` stream (at its start) declares an object dtype, read from its header only
    (numpy parses headers with ``ast.literal_eval``: nothing in them runs)."""
    from numpy.lib import format as npformat

    version = npformat.read_magic(handle)
    reader = npformat.read_array_header_1_0 if version == (1, 0) else npformat.read_array_header_2_0
    try:
        _, _, dtype = reader(handle)
    except ValueError as err:  # numpy refuses headers it would have to evaluate
        raise RegionsError(f"has a malformed .npy header ({err})") from None
    return bool(dtype.hasobject)


def read(path: str | os.PathLike[str]) -> np.ndarray:
    """An ``(H, W)`` integer instance map from a file, never running code from it.

    Formats: CorrCLIP's pre-generated masks (``.npz`` with an ``instance_mask`` array, as its
    ``region_masks.zip`` holds them), any ``.npz`` with a single array, a ``.npy`` array, or a
    single-channel PNG (8- or 16-bit: the pixel values are the labels). Arrays are read with
    ``allow_pickle=False``; an object array is refused from its header.

    Returns:
        The labels in their stored integer dtype (booleans as uint8); the segmenter widens them.

    Raises:
        RegionsError: one line naming the file and what is wrong with it (not 2-D, not integers, a
            pickled object, several arrays without ``instance_mask``, unreadable or corrupt).
    """
    from PIL import Image

    where = os.fspath(path)
    lower = where.lower()
    try:
        if lower.endswith(".png"):
            with Image.open(where) as img:
                if img.mode not in _PNG_MODES:
                    raise RegionsError(f"is a {img.mode} image, not one channel of labels")
                labels = np.asarray(img)
        elif lower.endswith(".npz"):
            if not zipfile.is_zipfile(where):
                raise RegionsError("is not a .npz (zip) archive")
            with zipfile.ZipFile(where) as archive:
                members = [n for n in archive.namelist() if n.endswith(".npy")]
                for member in members:
                    with archive.open(member) as handle:
                        if _npy_has_objects(handle):
                            raise RegionsError("holds pickled objects, which are never loaded")
            with np.load(where, allow_pickle=False) as data:
                names = list(data.files)
                if NPZ_KEY not in names and len(names) != 1:
                    raise RegionsError(f"holds {len(names)} arrays and no {NPZ_KEY!r}")
                labels = data[NPZ_KEY if NPZ_KEY in names else names[0]]
        else:
            with open(where, "rb") as handle:
                if handle.read(6) != b"\x93NUMPY":
                    raise RegionsError("is not a .npy array file")
                handle.seek(0)
                if _npy_has_objects(handle):
                    raise RegionsError("holds pickled objects, which are never loaded")
            labels = np.load(where, allow_pickle=False)
    except RegionsError as err:
        raise RegionsError(f"instance map {where!r} {err}{_FIX}") from None
    except (ValueError, OSError, EOFError, SyntaxError, zipfile.BadZipFile, zlib.error,
            Image.DecompressionBombError) as err:  # truncated arrays, corrupt archives and images
        raise RegionsError(f"instance map {where!r} cannot be read ({type(err).__name__}: "
                           f"{' '.join(str(err).split())}){_FIX}") from None
    labels = np.asarray(labels)
    if labels.ndim != 2 or not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_):
        raise RegionsError(f"instance map {where!r} is a {labels.dtype} array of shape {labels.shape}, "
                           f"not an (H, W) integer map{_FIX}")
    return labels.astype(np.uint8) if labels.dtype == np.bool_ else np.ascontiguousarray(labels)

