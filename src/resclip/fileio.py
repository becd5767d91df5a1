"""Files written so that a reader never sees half of one: the only place resclip writes outputs.

Every output goes to a hidden temporary file beside its destination, is flushed to disk, then
renamed over the destination (a rename within one folder is atomic). A failure removes the
temporary file and raises :class:`OutputError` naming the destination, so a full disk or a
read-only folder never leaves a ``.tmp`` file or a half-written output behind.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Sequence
from pathlib import Path


class OutputError(OSError):
    """An output file could not be written; the message names it and the cause."""


def cache_root() -> Path:
    """resclip's cache folder: ``$RESCLIP_CACHE``, else ``$XDG_CACHE_HOME/resclip`` or
    ``~/.cache/resclip``."""
    root = os.environ.get("RESCLIP_CACHE")
    if root:
        return Path(root).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "resclip"


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def _remove(path: Path) -> None:
    """Delete a temporary file if it is there (never raises: e.g. ENOTDIR when the folder is a file)."""
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)


def _describe(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


def _write_temp(path: Path, data: bytes) -> Path:
    """Write ``data`` to a fresh temporary file beside ``path`` and return it (removed on failure)."""
    tmp = _temp_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        _remove(tmp)
        raise OutputError(f"could not write {str(path)!r}: {_describe(exc)}") from exc
    return tmp


def atomic_write(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename).

    Raises:
        OutputError: naming ``path``; no temporary file is left behind and ``path`` is unchanged.
    """
    atomic_write_all([(path, data)])


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """UTF-8 text version of :func:`atomic_write`."""
    atomic_write(path, text.encode("utf-8"))


def atomic_write_all(items: Sequence[tuple[str | os.PathLike[str], bytes]]) -> None:
    """Write several files all-or-nothing: either every destination gets its new content or none does.

    All temporary files are written first (where a full disk fails) and no destination is touched
    until every one of them is complete; then they are renamed. Should a rename fail (rare: the
    folder changed under us), the destinations already renamed in this group are removed.

    Raises:
        OutputError: naming the file that failed.
    """
    temps: list[tuple[Path, Path]] = []
    try:
        for path, data in items:
            out = Path(path)
            temps.append((_write_temp(out, data), out))
    except OutputError:
        for tmp, _ in temps:
            _remove(tmp)
        raise
    done: list[Path] = []
    for tmp, out in temps:
        try:
            os.replace(tmp, out)
        except OSError as exc:
            for left, _ in temps:
                _remove(left)
            for written in done:
                _remove(written)
            raise OutputError(f"could not write {str(out)!r}: {_describe(exc)}") from exc
        done.append(out)
