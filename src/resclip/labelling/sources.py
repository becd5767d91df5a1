"""Where the images of a labelling job come from, cut into shards.

A source is one of:

* a folder (its images, recursively, sorted by relative path) or a quoted glob (``"photos/**/*.jpg"``);
  an image's id is its path relative to the folder (or to the glob's fixed leading folder);
* a text file (``.txt`` / ``.lst``) of image paths, one per line (relative paths are taken from the
  text file's folder; blank lines and lines starting with ``#`` are skipped); the id is the line;
* WebDataset tar shards: a ``.tar`` file or a brace pattern ``"shards/train-{000000..000099}.tar"``;
  the id is the sample's ``__key__`` (as ``webdataset`` groups the members);
* Parquet: a ``.parquet`` file or a folder of them, with a column of image paths or of encoded image
  bytes (also the Hugging Face ``{"bytes", "path"}`` struct; relative paths are taken from the
  Parquet file's folder); the id is the ``id`` / ``key`` / ``__key__`` column, else the path, else
  ``<file>#<row>``.

Image lists (folder, glob, text file, Parquet) are cut into shards of ``shard_size`` images; every
tar is one shard. Shards are numbered in a stable order, so the same source always gives the same
shards: the unit of resuming and of spreading work over processes.
"""

from __future__ import annotations

import glob
import io
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IMAGE_SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".ppm", ".tif", ".tiff", ".webp")
WDS_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "ppm", "gif", "img", "image")
ID_COLUMNS = ("id", "key", "__key__")
PATH_COLUMNS = ("path", "image_path", "file", "filename", "file_name")
BYTES_COLUMNS = ("image", "img", "bytes", "jpg", "png", "image_bytes")

LABEL_EXTRA = "pip install 'resclip[label]'"


class MissingExtra(ImportError):
    """An optional package is missing; the message says what to install."""


def need(module: str, extra: str = LABEL_EXTRA) -> Any:
    """Import ``module`` or raise :class:`MissingExtra` naming the pip command."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingExtra(f"the '{module.split('.')[0]}' package is missing: {extra}") from err


@dataclass(frozen=True)
class Item:
    """One image to label: its stable id, and either a file path or the encoded bytes (or why not)."""

    id: str
    path: str | None = None
    data: bytes | None = None
    error: str | None = None  # the image could not even be read from the source


@dataclass(frozen=True)
class Shard:
    """A slice of the source written as one Parquet file ``part-<index>.parquet``.

    Attributes:
        index: position in the source's shard list (0-based).
        kind: ``"files"`` (``paths`` with ``ids``), ``"wds"`` (``location`` is the tar) or
            ``"parquet"`` (rows ``start:stop`` of the file ``location``).
    """

    index: int
    kind: str
    location: str = ""
    ids: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    start: int = 0
    stop: int = 0
    columns: tuple[str | None, str | None, str | None] = (None, None, None)  # id, path, bytes

    @property
    def name(self) -> str:
        return f"part-{self.index:05d}"

    def describe(self) -> str:
        """What the shard covers, recorded in its manifest."""
        if self.kind == "files":
            return f"{len(self.ids)} files from {self.ids[0]!r}" if self.ids else "no files"
        if self.kind == "parquet":
            return f"{self.location} rows {self.start}:{self.stop}"
        return self.location

    def items(self) -> Iterator[Item]:
        """The shard's images in order (bytes are read here: call it where the decoding happens)."""
        if self.kind == "files":
            for id_, path in zip(self.ids, self.paths, strict=True):
                yield Item(id_, path=path)
        elif self.kind == "wds":
            yield from _tar_items(self.location)
        else:
            yield from _parquet_items(self)


@dataclass(frozen=True)
class SourceOptions:
    """How a source is read.

    Attributes:
        shard_size: images per shard for folders, globs, text files and Parquet (a tar is one shard).
        id_column / path_column / image_column: Parquet columns (default: found by name, see module doc).
    """

    shard_size: int = 1000
    id_column: str | None = None
    path_column: str | None = None
    image_column: str | None = None

    def __post_init__(self) -> None:
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size}")


def _is_tar_pattern(source: str) -> bool:
    return source.endswith(".tar") or (".tar" in source and "{" in source)


def list_shards(source: str | os.PathLike[str] | Sequence[str],
                options: SourceOptions | None = None) -> list[Shard]:
    """Cut a source into shards (cheap: no image is opened; tars and Parquet files are not read).

    Args:
        source: a folder, glob, text file of paths, ``.tar`` / brace pattern, ``.parquet`` file or
            folder of them; or a list of image paths (ids: the paths as given).

    Raises:
        FileNotFoundError: a path that does not exist, a glob or folder without images.
        ValueError: a list or text file that names an image twice.
    """
    opts = options or SourceOptions()
    if not isinstance(source, (str, os.PathLike)):
        paths = [str(p) for p in source]
        return _chunk(paths, paths, opts.shard_size)
    text = os.fspath(source)
    path = Path(text).expanduser()
    if _is_tar_pattern(text):
        return _tar_shards(text)
    if path.suffix == ".parquet" or (path.is_dir() and any(path.glob("*.parquet"))):
        return _parquet_shards(path, opts)
    if path.is_dir():
        found = sorted(p.relative_to(path).as_posix() for p in path.rglob("*")
                       if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise FileNotFoundError(f"folder {text!r} holds no images ({' '.join(IMAGE_SUFFIXES)})")
        return _chunk(found, [str(path / f) for f in found], opts.shard_size)
    if path.is_file() and path.suffix.lower() in (".txt", ".lst", ".list"):
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
        ids = [ln for ln in lines if ln and not ln.startswith("#")]
        if not ids:
            raise FileNotFoundError(f"list {text!r} names no images (one path per line)")
        base = path.parent
        return _chunk(ids, [str(base / i) if not os.path.isabs(i) else i for i in ids], opts.shard_size)
    if path.is_file():
        return _chunk([path.name], [str(path)], opts.shard_size)
    if glob.has_magic(text):
        root = _glob_root(text)
        matched = sorted(Path(p) for p in glob.glob(os.path.expanduser(text), recursive=True)
                         if Path(p).is_file() and Path(p).suffix.lower() in IMAGE_SUFFIXES)
        if not matched:
            raise FileNotFoundError(f"no images match {text!r}")
        ids = [p.relative_to(root).as_posix() for p in matched]
        return _chunk(ids, [str(p) for p in matched], opts.shard_size)
    raise FileNotFoundError(f"source not found: {text!r}; give a folder, a glob, a text file of paths, "
                            ".tar shards or .parquet")


def _glob_root(pattern: str) -> Path:
    parts = Path(os.path.expanduser(pattern)).parts
    fixed = [p for p in (parts[: next(i for i, p in enumerate(parts) if glob.has_magic(p))])]
    return Path(*fixed) if fixed else Path(".")


def _chunk(ids: Sequence[str], paths: Sequence[str], size: int) -> list[Shard]:
    """Image lists cut into shards of ``size``; an id given twice is refused (its rows would be
    counted twice and its mask PNG written twice)."""
    seen: dict[str, int] = {}
    for n, id_ in enumerate(ids):
        if id_ in seen:
            raise ValueError(f"the source names {id_!r} twice (entries {seen[id_] + 1} and {n + 1}); "
                             "image ids must be unique: remove the repeat")
        seen[id_] = n
    return [Shard(i // size, "files", ids=tuple(ids[i:i + size]), paths=tuple(paths[i:i + size]))
            for i in range(0, len(ids), size)]


# ------------------------------------------------------------------------------------------ WebDataset


def _tar_shards(pattern: str) -> list[Shard]:
    if "{" in pattern:
        braceexpand = need("braceexpand").braceexpand
        urls = list(braceexpand(os.path.expanduser(pattern)))
    else:
        urls = [os.path.expanduser(pattern)]
    missing = [u for u in urls if not Path(u).is_file()]
    if missing:
        raise FileNotFoundError(f"tar shard not found: {missing[0]!r}" +
                                (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return [Shard(i, "wds", location=u) for i, u in enumerate(urls)]


def _tar_items(location: str) -> Iterator[Item]:
    """The samples of a WebDataset tar (keys as ``webdataset`` groups them)."""
    tariterators = need("webdataset.tariterators")
    with open(location, "rb") as stream:
        files = ({**f, "__url__": location} for f in tariterators.tar_file_iterator(stream))
        for sample in tariterators.group_by_keys(files):
            key = str(sample["__key__"])
            found = [k for k in WDS_IMAGE_KEYS if k in sample]
            if not found:
                others = ", ".join(sorted(k for k in sample if not k.startswith("__")))
                yield Item(key, error=f"sample {key!r} holds no image (found: {others or 'nothing'})")
            else:
                yield Item(key, data=bytes(sample[found[0]]))


# --------------------------------------------------------------------------------------------- Parquet


def _pick(names: Sequence[str], wanted: str | None, candidates: Sequence[str], what: str) -> str | None:
    if wanted is not None:
        if wanted not in names:
            raise ValueError(f"--{what}-column {wanted!r} is not a column; columns: {', '.join(names)}")
        return wanted
    return next((c for c in candidates if c in names), None)


def _parquet_shards(path: Path, opts: SourceOptions) -> list[Shard]:
    pq = need("pyarrow.parquet")
    files = [path] if path.is_file() else sorted(path.glob("*.parquet"))
    if not files or not files[0].is_file():
        raise FileNotFoundError(f"Parquet source not found: {str(path)!r}")
    shards: list[Shard] = []
    for f in files:
        meta = pq.ParquetFile(f)
        names = list(meta.schema_arrow.names)
        id_col = _pick(names, opts.id_column, ID_COLUMNS, "id")
        path_col = _pick(names, opts.path_column, PATH_COLUMNS, "path")
        bytes_col = _pick(names, opts.image_column, BYTES_COLUMNS, "image")
        if path_col is None and bytes_col is None:
            raise ValueError(f"{str(f)!r} has no image path or image bytes column (columns: "
                             f"{', '.join(names)}); name one with --path-column or --image-column")
        rows = meta.metadata.num_rows
        for start in range(0, rows, opts.shard_size):
            shards.append(Shard(len(shards), "parquet", location=str(f), start=start,
                                stop=min(start + opts.shard_size, rows),
                                columns=(id_col, None if bytes_col else path_col, bytes_col)))
    return shards


def _parquet_items(shard: Shard) -> Iterator[Item]:
    pq = need("pyarrow.parquet")
    pf = pq.ParquetFile(shard.location)
    id_col, path_col, bytes_col = shard.columns
    cols = [c for c in (id_col, path_col, bytes_col) if c]
    # read only the row groups that overlap [start, stop)
    tables, first, offset = [], None, 0
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if offset < shard.stop and offset + n > shard.start:
            first = offset if first is None else first
            tables.append(pf.read_row_group(g, columns=cols))
        offset += n
    if not tables:
        return
    pa = need("pyarrow")
    table = pa.concat_tables(tables).slice(shard.start - (first or 0), shard.stop - shard.start)
    data = table.to_pydict()
    base = Path(shard.location).parent
    for row in range(table.num_rows):
        index = shard.start + row
        value = data[bytes_col][row] if bytes_col else None
        where = data[path_col][row] if path_col else None
        if isinstance(value, dict):  # Hugging Face Image feature: {"bytes": ..., "path": ...}
            where = where or value.get("path")
            value = value.get("bytes")
        id_ = data[id_col][row] if id_col else (where if where else f"{Path(shard.location).name}#{index}")
        id_ = str(id_)
        if value is not None:
            yield Item(id_, data=bytes(value))
        elif where:
            yield Item(id_, path=str(where) if os.path.isabs(str(where)) else str(base / str(where)))
        else:
            yield Item(id_, error=f"row {index} of {shard.location!r} has no image")


def decode(item: Item) -> Any:
    """``(H, W, 3)`` uint8 RGB of an item (EXIF orientation applied, any mode converted).

    Raises:
        ValueError / FileNotFoundError: unreadable, truncated or empty image (the message names it).
    """
    from PIL import Image, UnidentifiedImageError

    from ..preprocess import load_image

    if item.error is not None:
        raise ValueError(item.error)
    if item.path is not None:
        return load_image(item.path)
    assert item.data is not None
    try:
        with Image.open(io.BytesIO(item.data)) as img:
            img.load()
            return load_image(img)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"could not read image {item.id!r} ({err}); expected a readable, complete image "
                         "(JPEG, PNG, TIFF, BMP, WebP...)") from err
