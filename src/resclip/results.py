"""What a segmentation gives back, in the forms other tools read: per-class binary masks, COCO
run-length encodings, colour overlays, compressed probabilities and an optional "unknown" label.

COCO RLE (as ``pycocotools.mask.encode`` writes it): the mask is read column by column (Fortran
order); ``counts`` are the lengths of alternating runs of 0s and 1s, starting with 0s, stored as
the compact ASCII string of the COCO API (6 bits per character, each count but the first two as
the difference with the count two places before it).
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .classes import ClassSpec
    from .fullres import FixedMaps, FullResolution
    from .segmenter import SegResult

__all__ = [
    "OutputOptions",
    "class_masks",
    "confidence",
    "json_text",
    "output_files",
    "probs_bytes",
    "result_record",
    "rle_area",
    "rle_decode",
    "rle_encode",
    "with_unknown",
]


def rle_encode(binary: np.ndarray) -> dict[str, Any]:
    """COCO compressed RLE of a ``(H, W)`` boolean mask: ``{"size": [H, W], "counts": str}``.

    Raises:
        ValueError: not a 2-D array.
    """
    if binary.ndim != 2:
        raise ValueError(f"a mask to encode must be 2-D (H, W), got shape {binary.shape}")
    flat = np.asarray(binary, dtype=bool).ravel(order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    edges = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(edges).tolist()
    if flat.size and flat[0]:
        counts = [0, *counts]  # runs start with 0s
    if not flat.size:
        counts = []
    return {"size": [int(binary.shape[0]), int(binary.shape[1])], "counts": _counts_string(counts)}


def _counts_string(counts: Sequence[int]) -> str:
    """The COCO API's ASCII form of run lengths (``rleToString``)."""
    out: list[str] = []
    for i, count in enumerate(counts):
        x = int(count) - (int(counts[i - 2]) if i > 2 else 0)
        more = True
        while more:
            c = x & 0x1F
            x >>= 5  # arithmetic shift: negative differences end at -1
            more = x != -1 if c & 0x10 else x != 0
            out.append(chr((c | 0x20 if more else c) + 48))
    return "".join(out)


def _counts_from_string(text: str) -> list[int]:
    """Run lengths back from the COCO ASCII form (``rleFrString``)."""
    counts: list[int] = []
    p = 0
    while p < len(text):
        x = k = 0
        more = True
        while more:
            c = ord(text[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def rle_decode(rle: dict[str, Any]) -> np.ndarray:
    """The ``(H, W)`` boolean mask of a COCO RLE (compressed string or a list of counts).

    Raises:
        ValueError: counts that do not add up to ``H * W``.
    """
    h, w = (int(v) for v in rle["size"])
    raw = rle["counts"]
    counts = _counts_from_string(raw) if isinstance(raw, str) else [int(c) for c in raw]
    if sum(counts) != h * w or any(c < 0 for c in counts):
        raise ValueError(f"RLE counts add up to {sum(counts)}, not {h}x{w} = {h * w} pixels")
    values = np.zeros(len(counts), dtype=bool)
    values[1::2] = True
    return np.repeat(values, counts).reshape((w, h)).T.copy()


def rle_area(rle: dict[str, Any]) -> int:
    """Pixels set in a COCO RLE, without decoding it."""
    raw = rle["counts"]
    counts = _counts_from_string(raw) if isinstance(raw, str) else list(raw)
    return int(sum(counts[1::2]))


def class_masks(mask: np.ndarray, num_classes: int) -> np.ndarray:
    """``(C, H, W)`` boolean masks, one per class, of a ``(H, W)`` class-index mask."""
    return mask[None] == np.arange(num_classes, dtype=mask.dtype).reshape(-1, 1, 1)


def with_unknown(mask: np.ndarray, confidence: np.ndarray, threshold: float, unknown: int) -> np.ndarray:
    """``mask`` with the label ``unknown`` where the winning class's probability is below
    ``threshold``; the dtype widens if ``unknown`` does not fit.

    Args:
        mask: ``(H, W)`` class indices.
        confidence: ``(H, W)`` probability of each pixel's class (see ``SegResult.confidence``).
        threshold: in (0, 1].
        unknown: the label to write (the number of classes, so it follows the last class).

    Raises:
        ValueError: a threshold outside (0, 1] or shapes that differ.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"the unknown threshold must be in (0, 1], got {threshold}")
    if confidence.shape != mask.shape:
        raise ValueError(f"confidence {confidence.shape} and mask {mask.shape} differ in shape")
    dtype = mask.dtype if unknown <= np.iinfo(mask.dtype).max else np.uint16
    out = mask.astype(dtype, copy=True)
    out[confidence < threshold] = unknown
    return out


def probs_bytes(probs: np.ndarray, names: Sequence[str]) -> bytes:
    """A compressed ``.npz`` of ``(C, H, W)`` class probabilities stored as float16 (``probs``) and
    the class names (``names``): about 4x smaller than float32 before compression, exact to 5e-4."""
    buf = io.BytesIO()
    np.savez_compressed(buf, probs=probs.astype(np.float16), names=np.asarray(list(names)))
    return buf.getvalue()


def confidence(full: FullResolution | FixedMaps) -> np.ndarray:
    """``(H, W)`` float32 probability of each pixel's most probable class (class probabilities
    renormalised over classes, band by band: never the whole ``(C, H, W)`` map at once)."""
    from .protocol import renormalise

    out = np.empty(full.size, dtype=np.float32)
    for start, stop, probs in full.iter_bands():
        out[start:stop] = renormalise(probs).amax(dim=0).cpu().numpy()
    return out


# ------------------------------------------------------------------------------ per-image record
@dataclass(frozen=True)
class OutputOptions:
    """How results are written (recorded in each JSON, so a resumed run checks them).

    Attributes:
        palette: colour palette name (:data:`resclip.palettes.PALETTES`).
        alpha: overlay colour weight.
        rle: each class's mask as COCO RLE in the JSON.
        unknown: pixels whose class probability is below this get the extra label ``unknown``.
        save_probs: write ``<stem>_probs.npz`` (float16 class probabilities).
    """

    palette: str = "classes"
    alpha: float = 0.5
    rle: bool = False
    unknown: float | None = None
    save_probs: bool = False

    def record(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "palette": self.palette, "format": "rle" if self.rle else "png",
                "unknown_below": self.unknown, "save_probs": self.save_probs}


def result_record(image: Path | str, mask: np.ndarray, spec: ClassSpec, settings: dict[str, Any],
                  palette: str, alpha: float, files: dict[str, str], *,
                  output: dict[str, Any] | None = None, rle: bool = False) -> dict[str, Any]:
    """The JSON record of one segmented image (``settings``: the segmenter's
    ``config.to_dict()``; ``output``: the output options recorded, default palette and alpha;
    ``rle``: each class's mask as COCO RLE under ``"rle"``)."""
    from . import __version__, viz
    from .palettes import class_palette

    counts = viz.pixel_counts(mask, spec.num_classes)
    total = max(int(counts.sum()), 1)
    colours = class_palette(spec.names, palette)
    classes = []
    for index, name in enumerate(spec.names):
        synonyms = [q for q, c in zip(spec.queries, spec.query_to_class, strict=True) if c == index]
        classes.append({
            "index": index,
            "name": name,
            "synonyms": synonyms,
            "color": [int(v) for v in colours[index]],
            "pixels": int(counts[index]),
            "share": round(float(counts[index]) / total, 6),
            **({"rle": rle_encode(mask == index)} if rle else {}),
        })
    return {
        "image": str(image),
        "width": int(mask.shape[1]),
        "height": int(mask.shape[0]),
        **files,
        "mask_format": "palette" if spec.num_classes <= 256 else "uint16",
        "classes": classes,
        "present": [spec.names[i] for i in np.flatnonzero(counts)],
        "settings": settings,
        "output": output if output is not None else {"alpha": alpha, "palette": palette},
        "resclip_version": __version__,
    }


def json_text(record: dict[str, Any]) -> str:
    """Indented JSON with lists of plain values kept on one line (``"color": [0, 128, 0]``)."""

    def flat(match: re.Match[str]) -> str:
        return re.sub(r"\n\s*", "", match.group(0).replace(",\n", ", \n"))

    return re.sub(r"\[[^\[\]{}]*\]", flat, json.dumps(record, indent=2, ensure_ascii=False))


def output_files(result: SegResult, folder: Path, stem: str, opts: OutputOptions,
                 image: str | Path | None = None, regions: str | None = None) -> list[tuple[Path, bytes]]:
    """The files ``resclip segment`` writes for one result, as ``(path, bytes)`` pairs, for one
    all-or-nothing :func:`resclip.fileio.atomic_write_all`: ``<stem>_mask.png`` (palette PNG of
    class indices), ``<stem>_overlay.png`` (the image with colours and a legend), ``<stem>.json``
    (:func:`result_record`, naming ``image``, default ``stem``) and, with ``opts.save_probs``,
    ``<stem>_probs.npz``. With ``opts.unknown``, pixels whose class probability is below it get the
    label ``C`` (one past the last class), named ``unknown`` in the legend and the JSON. ``regions``:
    the identity of the instance map the image was segmented with (:func:`resclip.regions.identity`),
    recorded in the JSON as ``"regions"``.

    Raises:
        ValueError: the result does not hold its image (made without ``Segmenter.predict``).
    """
    from PIL import Image

    from . import viz
    from .classes import ClassSpec, parse_classes
    from .palettes import class_palette

    if result.image is None:
        raise ValueError("this result does not hold its image, so its overlay cannot be drawn")
    spec = result.classes or parse_classes(list(result.class_names))
    mask, shown = result.mask, spec
    if opts.unknown is not None:
        mask = with_unknown(mask, confidence(result.full), opts.unknown, spec.num_classes)
        c = spec.num_classes
        shown = ClassSpec((*spec.names, "unknown"), (*spec.queries, "unknown"), (*spec.query_to_class, c))
    colours = class_palette(shown.names, opts.palette)
    mask_png, overlay_png = io.BytesIO(), io.BytesIO()
    viz.mask_image(mask, shown.num_classes, colours).save(mask_png, format="PNG")
    overlay: Image.Image = viz.overlay_with_legend(result.image, mask, shown.names, opts.alpha, colours)
    overlay.convert("RGB").save(overlay_png, format="PNG")
    paths = {k: folder / f"{stem}{suffix}" for k, suffix in
             (("mask", "_mask.png"), ("overlay", "_overlay.png"), ("json", ".json"), ("probs", "_probs.npz"))}
    files = {"mask": paths["mask"].name, "overlay": paths["overlay"].name}
    if opts.save_probs:
        files["probs"] = paths["probs"].name
    record = result_record(stem if image is None else image, mask, shown, result.settings or {}, opts.palette,
                           opts.alpha, files, output=opts.record(), rle=opts.rle)
    if regions is not None:
        record["regions"] = regions
    # a file name that is not UTF-8 (a lone surrogate from the file system) is kept as a JSON \uXXXX escape
    text = (json_text(record) + "\n").encode("utf-8", errors="backslashreplace")
    out = [(paths["mask"], mask_png.getvalue()), (paths["overlay"], overlay_png.getvalue()),
           (paths["json"], text)]
    if opts.save_probs:
        out.append((paths["probs"], probs_bytes(result.probs, spec.names)))
    return out
