"""The outputs of a labelling job: one Parquet file per shard, its manifest, the run record.

Layout of ``out``::

    out/_label.json               the run record: source, classes, settings, model fingerprint
    out/part-00007.parquet        one row per image of shard 7 (same order as the source)
    out/_done/part-00007.json     written after the Parquet: rows, failures, sha256 of the Parquet
    out/masks/<id>.png            with save_masks: the class index of every pixel (palette PNG)

Parquet columns (one row per image):

    id      string           the image's stable id (see :mod:`resclip.labelling.sources`)
    width   int32            image width W (null when the image could not be read)
    height  int32            image height H (null likewise)
    status  string           "ok" or "failed"
    error   string           why it failed (null when ok)
    pixels  list<int64>      (C,) pixels of each class, in class order
    share   list<float64>    (C,) pixels / (W * H)
    rle     list<string>     (C,) COCO compressed RLE counts of each class's mask (size [H, W])
    mask    string           the mask PNG's path relative to ``out`` (null without save_masks)

The Parquet file's key-value metadata ``resclip`` holds the run record as JSON (settings,
classes, ``visual_digest``, text fingerprint), so each file describes itself. Every file is
written atomically (temporary file, fsync, rename), and a shard counts as finished only once its
manifest exists and names the sha256 of the Parquet beside it: a worker killed mid-shard leaves no
manifest, and the shard is redone.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from ..fileio import atomic_write
from .sources import need

RECORD = "_label.json"
DONE = "_done"
MASKS = "masks"
META_KEY = b"resclip"


def mask_name(image_id: str) -> str:
    """``masks/<id>.png`` with ``..``, ``.`` and leading ``/`` dropped (stays inside ``out``)."""
    parts = [p for p in PurePosixPath(image_id.replace("\\", "/")).parts if p not in ("/", "..", ".")]
    return f"{MASKS}/{'/'.join(parts) or '_'}.png"


def ok_row(image_id: str, mask: Any, num_classes: int, mask_file: str | None) -> dict[str, Any]:
    """The row of a segmented image.

    Args:
        mask: ``(H, W)`` integer class indices.
    """
    from ..results import rle_encode
    from ..viz import pixel_counts

    counts = pixel_counts(mask, num_classes)
    total = max(int(mask.size), 1)
    return {
        "id": image_id,
        "width": int(mask.shape[1]),
        "height": int(mask.shape[0]),
        "status": "ok",
        "error": None,
        "pixels": [int(c) for c in counts],
        "share": [float(c) / total for c in counts],
        "rle": [rle_encode(mask == c)["counts"] for c in range(num_classes)],
        "mask": mask_file,
    }


def failed_row(image_id: str, reason: str) -> dict[str, Any]:
    """The row of an image that could not be labelled."""
    return {"id": image_id, "width": None, "height": None, "status": "failed", "error": reason,
            "pixels": [], "share": [], "rle": [], "mask": None}


def shard_bytes(rows: Sequence[dict[str, Any]], record: str) -> bytes:
    """The Parquet file of one shard (deterministic: the same rows give the same bytes).

    Args:
        record: the run record as JSON text, stored in the file's metadata.
    """
    pa = need("pyarrow")
    pq = need("pyarrow.parquet")
    schema = pa.schema([
        ("id", pa.string()), ("width", pa.int32()), ("height", pa.int32()), ("status", pa.string()),
        ("error", pa.string()), ("pixels", pa.list_(pa.int64())), ("share", pa.list_(pa.float64())),
        ("rle", pa.list_(pa.string())), ("mask", pa.string()),
    ], metadata={META_KEY: record.encode("utf-8")})
    table = pa.Table.from_pylist(list(rows), schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def write_shard(out: Path, name: str, rows: Sequence[dict[str, Any]], record: str,
                describe: str) -> dict[str, Any]:
    """Write ``out/<name>.parquet``, then its manifest ``out/_done/<name>.json`` (both atomically).

    Returns:
        The manifest: ``{"shard", "source", "rows", "failures": [[id, reason], ...], "sha256"}``.

    Raises:
        resclip.fileio.OutputError: a file that could not be written (naming it).
    """
    data = shard_bytes(rows, record)
    atomic_write(out / f"{name}.parquet", data)
    manifest = {
        "shard": name,
        "source": describe,
        "rows": len(rows),
        "failures": [[r["id"], r["error"]] for r in rows if r["status"] != "ok"],
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    atomic_write(out / DONE / f"{name}.json", (json.dumps(manifest, indent=1) + "\n").encode("utf-8"))
    return manifest


def finished(out: Path, name: str) -> dict[str, Any] | None:
    """The manifest of a finished shard, or None (missing, unreadable, or the Parquet beside it
    does not have the sha256 it names)."""
    try:
        manifest = json.loads((out / DONE / f"{name}.json").read_text(encoding="utf-8"))
        data = (out / f"{name}.parquet").read_bytes()
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("sha256") != hashlib.sha256(data).hexdigest():
        return None
    return manifest


_TEMP = re.compile(r"^\..+\.\d+\.[0-9a-f]{8}\.tmp$")  # resclip.fileio's temporary names


def remove_stale_temps(out: Path) -> int:
    """Delete the temporary files a killed run left in ``out`` (call before any worker starts).

    Returns:
        How many were removed.
    """
    removed = 0
    if out.is_dir():
        for path in out.rglob(".*.tmp"):
            if _TEMP.match(path.name) and path.is_file():
                path.unlink(missing_ok=True)
                removed += 1
    return removed


COMPARED = ("source", "shards", "classes", "settings", "visual_digest", "text_fingerprint", "output")


def check_record(out: Path, record: dict[str, Any]) -> None:
    """Refuse an ``out`` folder labelled with another source, classes, settings or model.

    Raises:
        ValueError: one line naming what differs and the fix.
    """
    path = out / RECORD
    if not path.exists():
        return
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{str(path)!r} is unreadable ({err}); delete it or use another --out "
                         "folder") from err
    want = json.loads(json.dumps(record))
    differ = [k for k in COMPARED if old.get(k) != want.get(k)]
    if differ:
        raise ValueError(f"{str(out)!r} holds labels made with other {', '.join(differ)}; use another "
                         "--out folder (or delete it) to label with these settings (nothing was written)")
