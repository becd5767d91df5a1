"""Read the weights of a TorchScript archive (OpenAI's original CLIP ``.pt`` files) without running it.

``torch.jit.load`` executes the archive: its ``code/`` folder is compiled and any ``__setstate__``
it defines runs while loading, so a crafted file can read, write or hang. This reader only
unpickles ``data.pkl`` with an allow-list (module objects become inert records, tensors are
rebuilt from the raw ``data/`` entries), and reads the ``__parameters__`` / ``__buffers__``
declarations of ``code/`` as literal text. Nothing from the file is executed or imported.

Layout of an archive (a zip file with one top folder)::

    <top>/data.pkl     the pickled module tree: GLOBAL '__torch__.<module> <Class>', NEWOBJ,
                       BUILD {attribute: value}
    <top>/data/<key>   raw little-endian bytes of one storage
    <top>/code/...py   TorchScript source, with ``__parameters__ = [...]`` per class
    <top>/byteorder    ``little`` (absent in old archives)
"""

from __future__ import annotations

import ast
import io
import pickle
import re
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch

# data.pkl of a ViT-L/14 archive is a few hundred kB; anything far larger is not a CLIP checkpoint
_MAX_PICKLE_BYTES = 64 << 20

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class ArchiveError(ValueError):
    """The archive is not a TorchScript weights archive this reader accepts."""


def is_torchscript_archive(path: Path) -> bool:
    """True when ``path`` is a zip file with a ``<top>/code/`` folder (what ``torch.jit.save`` writes)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


@dataclass
class _ScriptObject:
    """An inert stand-in for one scripted module: its class name and the attributes pickled with it."""

    qualname: str
    state: dict[str, Any] = field(default_factory=dict)

    def __setstate__(self, state: Any) -> None:  # called by pickle's BUILD; stores, never runs anything
        self.state = dict(state) if isinstance(state, dict) else {}


@dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype


def _object_class(qualname: str) -> Any:
    def make(*_args: Any) -> _ScriptObject:
        return _ScriptObject(qualname)

    # pickle's NEWOBJ calls cls.__new__(cls, *args): a class whose __new__ returns the record
    return type("ScriptObject", (), {"__new__": staticmethod(lambda _cls, *a: make(*a))})


def _rebuild_tensor(
    storage: torch.Tensor, offset: int, size: tuple[int, ...], stride: tuple[int, ...], *_: Any
) -> torch.Tensor:
    if not isinstance(storage, torch.Tensor) or not all(
        isinstance(v, int) and v >= 0 for v in (offset, *size, *stride)
    ):
        raise ArchiveError("a tensor record has a malformed size, stride or offset")
    try:
        return storage.as_strided(tuple(size), tuple(stride), offset)
    except RuntimeError as exc:
        raise ArchiveError(f"a tensor record points outside its storage ({exc})") from exc


def _identity(value: Any, *_: Any) -> Any:
    return value


class _WeightsUnpickler(pickle.Unpickler):
    """Unpickles ``data.pkl`` with an allow-list; storages are read from the archive's ``data/`` entries."""

    _ALLOWED: dict[tuple[str, str], Any] = {  # noqa: RUF012 - read-only table
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("collections", "OrderedDict"): OrderedDict,
        ("torch.jit._pickle", "restore_type_tag"): _identity,
        ("torch.jit._pickle", "build_intlist"): list,
        ("torch.jit._pickle", "build_doublelist"): list,
        ("torch.jit._pickle", "build_boollist"): list,
        ("torch.jit._pickle", "build_tensorlist"): list,
    }

    def __init__(self, data: bytes, archive: zipfile.ZipFile, top: str) -> None:
        super().__init__(io.BytesIO(data))
        self.archive = archive
        self.top = top
        self.storages: dict[str, torch.Tensor] = {}
        self.classes: set[str] = set()

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            self.classes.add(f"{module}.{name}")
            return _object_class(f"{module}.{name}")
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        allowed = self._ALLOWED.get((module, name))
        if allowed is None:
            raise ArchiveError(f"it refers to {module}.{name}, which a weights file never needs")
        return allowed

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise ArchiveError("it holds a storage record of an unknown kind")
        _, kind, key, _location, numel = pid
        if not isinstance(kind, _StorageType) or not isinstance(key, str) or not isinstance(numel, int):
            raise ArchiveError("it holds a malformed storage record")
        if key not in self.storages:
            self.storages[key] = self._read_storage(key, kind.dtype, numel)
        return self.storages[key]

    def _read_storage(self, key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
        name = f"{self.top}/data/{key}"
        try:
            info = self.archive.getinfo(name)
        except KeyError:
            raise ArchiveError(f"storage {key!r} is missing from the archive") from None
        nbytes = numel * torch.empty(0, dtype=dtype).element_size()
        if info.file_size != nbytes:
            raise ArchiveError(
                f"storage {key!r} holds {info.file_size} bytes, its record says {nbytes}: "
                "truncated or edited"
            )
        if nbytes == 0:
            return torch.empty(0, dtype=dtype)
        buffer = bytearray(nbytes)
        view = memoryview(buffer)
        with self.archive.open(info) as handle:
            reader = cast(io.BufferedIOBase, handle)
            filled = 0
            while filled < nbytes:
                got = reader.readinto(view[filled:])
                if not got:
                    raise ArchiveError(f"storage {key!r} ends early: the file is truncated")
                filled += got
        return torch.frombuffer(buffer, dtype=dtype)


_DECL = re.compile(r"^\s+(__parameters__|__buffers__)\s*=\s*(\[.*\])\s*$")
_CLASS = re.compile(r"^class\s+(\w+)\s*\(")


def _declared_tensors(archive: zipfile.ZipFile, top: str, qualname: str) -> set[str] | None:
    """The parameter and buffer names that ``code/`` declares for one class, read as literals.

    None when the declaration cannot be found (then every tensor attribute is taken).
    """
    module, _, cls = qualname.rpartition(".")
    try:
        text = archive.read(f"{top}/code/{module.replace('.', '/')}.py").decode("utf-8")
    except (KeyError, UnicodeDecodeError):
        return None
    names: set[str] = set()
    inside = found = False
    for line in text.splitlines():
        head = _CLASS.match(line)
        if head:
            inside = head.group(1) == cls
            continue
        decl = _DECL.match(line) if inside else None
        if decl:
            try:
                values = ast.literal_eval(decl.group(2))
            except (ValueError, SyntaxError):
                return None
            names.update(str(v) for v in values)
            found = True
    return names if found else None


def _flatten(obj: _ScriptObject, archive: zipfile.ZipFile, top: str) -> dict[str, torch.Tensor]:
    """``state_dict()`` of the scripted module tree: declared parameters and buffers, dotted names."""
    out: dict[str, torch.Tensor] = {}
    declared: dict[str, set[str] | None] = {}
    stack: list[tuple[str, _ScriptObject, int]] = [("", obj, 0)]
    while stack:
        prefix, node, depth = stack.pop()
        if depth > 64:
            raise ArchiveError("its module tree is nested more than 64 levels deep")
        if node.qualname not in declared:
            declared[node.qualname] = _declared_tensors(archive, top, node.qualname)
        keep = declared[node.qualname]
        for name, value in node.state.items():
            if isinstance(value, _ScriptObject):
                stack.append((f"{prefix}{name}.", value, depth + 1))
            elif isinstance(value, torch.Tensor) and (keep is None or name in keep):
                out[f"{prefix}{name}"] = value
    return out


def read_script_weights(path: Path) -> dict[str, torch.Tensor]:
    """The parameters and buffers of a TorchScript archive, as ``torch.jit.load(path).state_dict()`` gives.

    Raises:
        ArchiveError: the archive is malformed, big-endian, or refers to anything but module records,
            tensors and plain containers.
    """
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise ArchiveError("it has no single <folder>/data.pkl entry")
        top = pickles[0].split("/")[0]
        order = f"{top}/byteorder"
        if order in archive.namelist() and archive.read(order).strip() not in (b"little", b""):
            raise ArchiveError("its tensors are stored big-endian")
        info = archive.getinfo(pickles[0])
        if info.file_size > _MAX_PICKLE_BYTES:
            raise ArchiveError(f"its data.pkl is {info.file_size} bytes, too large for a weights record")
        unpickler = _WeightsUnpickler(archive.read(info), archive, top)
        try:
            root = unpickler.load()
        except ArchiveError:
            raise
        except Exception as exc:
            raise ArchiveError(f"its data.pkl cannot be read ({type(exc).__name__}: {exc})") from exc
        if not isinstance(root, _ScriptObject):
            raise ArchiveError("its data.pkl does not hold a scripted module")
        return _flatten(root, archive, top)
