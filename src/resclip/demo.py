"""Web demo (optional extra ``resclip[demo]``, Gradio): upload an image (or click one of the shipped
examples), type class names, pick the base attention and the RCS / SFR switches, see the overlay and
its legend, download the mask PNG and the JSON record (the same as ``resclip segment`` writes).

The CLIP model loads once per :class:`DemoSettings` (cached); each request only builds the small
last-block engine for the chosen method. :func:`segment_image` is the whole request handler as a
plain function (no Gradio needed), so it is tested without a server; ``build_app`` wraps it in a
Gradio page and ``launch`` serves it (``resclip demo``); both live in :mod:`resclip.demo_server` and
are reachable here.

Serving it to others (the limits are :class:`DemoSettings` fields, ``resclip demo`` flags):

* uploads above ``max_upload_mb`` (default 20 MB) are refused by Gradio and again by the handler;
* images above ``max_pixels`` (default 40 megapixels) are refused from the file header, before
  anything is decoded, so a small file that expands to gigabytes (a decompression bomb) costs nothing;
* more than ``max_classes`` class names (default 200, synonyms included) are refused;
* requests run ``concurrency`` at a time (default 1, Gradio's queue); the others wait in line.
  Each running request holds the image, its mask, scores and overlay in memory (several GB near the
  pixel cap: a 100-megapixel image took 6.7 GB before the cap), so raise it only with the memory
  to match;
* each visitor session keeps at most its current upload and its current results (overlay, mask PNG,
  JSON) on the server: the previous ones are deleted by the next request, the rest when the page is
  closed, anything left over after an hour, and everything when the server stops (the example photos
  stay);
* messages shown to visitors are one sentence, never name a server path or a command-line flag;
  unexpected errors are logged on the server and shown as a generic message; the JSON download names
  the upload and the checkpoint by file name only;
* a model that is not a released CLIP (random weights, or a checkpoint matching no known
  architecture) is announced by a banner on the page (:func:`weights_notice`).
"""

from __future__ import annotations

import contextlib
import functools
import html
import io
import logging
import os
import re
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
from PIL import Image, UnidentifiedImageError

from . import viz
from .classes import ClassListWarning, ClassSpec, load_classes, read_class_file
from .datasets import DATASETS, class_file_path, get_dataset_spec
from .eval.loop import segment_mask as segment_array
from .factory import create_segmenter, fields_for, method_field_owner
from .methods import get_method, list_methods
from .palettes import class_palette
from .preprocess import ImageInput, load_image
from .segmenter import Segmenter

GRADIO_HINT = "the web demo needs Gradio: pip install 'resclip[demo]'"
EXAMPLE_CLASSES = "cat; sofa; sky, clouds; floor; wall"
#: The example photos shipped in the package (``resclip/data/examples``, origin and licences in its
#: README) and the class list each is offered with.
EXAMPLES_DIR = Path(__file__).parent / "data" / "examples"
EXAMPLES: tuple[tuple[str, str], ...] = (
    ("cat.jpg", "cat; wall; sofa, cushion"),
    ("coffee.jpg", "coffee cup, cup; saucer, plate; spoon; table"),
    ("rocket.jpg", "rocket; launch tower; sky; ground"),
)
RANDOM_WEIGHTS_NOTICE = ("This demo runs on RANDOM weights (no pretrained CLIP was loaded): its "
                         "segmentations are meaningless. It only shows how the page works.")
CUSTOM_WEIGHTS_NOTICE = ("This demo runs a checkpoint that matches no released CLIP model (a test or "
                         "custom model): its segmentations may be meaningless.")


def _class_lists() -> dict[str, str]:
    """One shipped class list per benchmark family (the first variant: the one with background)."""
    first: dict[str, str] = {}
    for spec in DATASETS.values():
        first.setdefault(spec.family, spec.name)
    return {f"{family} ({DATASETS[name].num_classes})": name for family, name in first.items()}


#: The benchmark class lists the page offers, by label (``"PASCAL VOC (21)"``) -> dataset name.
CLASS_LISTS = _class_lists()
MEBIBYTE = 1 << 20
LOG = logging.getLogger(__name__)
_SERVER = ("SessionFiles", "build_app", "handle_request", "launch")  # in resclip.demo_server


def __getattr__(name: str) -> Any:
    """The page and its server (:mod:`resclip.demo_server`), loaded when first asked for."""
    if name in _SERVER:
        from . import demo_server

        return getattr(demo_server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class DemoSettings:
    """What the server loads once: the CLIP model and the inference preset.

    Attributes:
        model, pretrained, device, precision, preset, fidelity, window_batch: as in
            :func:`resclip.create_segmenter`.
        overrides: ``(key, value)`` setting overrides (``--set``).
        method, rcs, sfr: the page's initial choices.
        max_upload_mb: largest upload, in MB (2**20 bytes).
        max_pixels: largest image, width x height; larger ones are refused before decoding.
        max_classes: most class names per request, synonyms included.
        concurrency: requests processed at the same time (Gradio's queue); the others wait.
    """

    model: str | None = None
    pretrained: str | None = "openai"
    device: str = "auto"
    precision: str = "fp32"
    preset: str = "default"
    fidelity: str | None = None
    window_batch: int = 8
    overrides: tuple[tuple[str, Any], ...] = field(default=())
    aux_pretrained: tuple[tuple[str, str], ...] = field(default=())  # (kind, source), e.g. DINO for ProxyCLIP
    method: str = "naclip"
    rcs: bool = True
    sfr: bool = True
    max_upload_mb: float = 20.0
    max_pixels: int = 40_000_000
    max_classes: int = 200
    concurrency: int = 1

    def __post_init__(self) -> None:
        for name in ("max_upload_mb", "max_pixels", "max_classes", "concurrency"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")

    @property
    def max_upload_bytes(self) -> int:
        """:attr:`max_upload_mb` in bytes."""
        return int(self.max_upload_mb * MEBIBYTE)


@dataclass
class DemoResult:
    """Output of one request.

    Attributes:
        overlay: ``(H, W, 3)`` uint8, the class colours over the image, at the image size (no legend
            baked in: the page shows :attr:`legend_html` beside it).
        mask: ``(H, W)`` int64 class indices.
        legend: one row per class present: ``name``, ``color`` (``"#rrggbb"``), ``share`` (0..1).
        legend_html: the legend as an HTML table.
        status: one line: method, modules, preset, image size and time taken.
        warnings: the class-list warnings of :mod:`resclip.classes` (``"cat,dog"`` is one class, a
            single class, duplicates, names too long), one line each.
        record: the JSON record ``resclip segment`` writes for an image (classes, colours, pixel
            counts, settings), naming the upload and the checkpoint by file name only.
        mask_png: the mask as ``resclip segment`` writes it (palette PNG of class indices), encoded.
        stem: a file-name stem for the downloads (``"<stem>_mask.png"``, ``"<stem>.json"``).
    """

    overlay: np.ndarray
    mask: np.ndarray
    legend: list[dict[str, Any]]
    legend_html: str
    status: str
    warnings: list[str] = field(default_factory=list)
    record: dict[str, Any] = field(default_factory=dict)
    mask_png: bytes = b""
    stem: str = "image"

    @property
    def json_text(self) -> str:
        """:attr:`record` as ``resclip segment`` writes it (indented, one line per short list)."""
        from .results import json_text

        return json_text(self.record) + "\n"


def example_inputs() -> list[list[str]]:
    """The page's examples: ``[image path, class list]`` per shipped photo that is present."""
    return [[str(EXAMPLES_DIR / name), classes] for name, classes in EXAMPLES
            if (EXAMPLES_DIR / name).is_file()]


def sfr_allowed(method: str) -> bool:
    """Whether SFR can run on ``method`` (it refines attention scores; MaskCLIP has none)."""
    return method in list_methods() and get_method(method).has_scores


def method_choices() -> list[tuple[str, str]]:
    """The base attentions for the page's menu: ``(paper spelling, name)``, every registered method."""
    return [(get_method(name).title, name) for name in list_methods()]


def weights_notice(settings: DemoSettings) -> str | None:
    """The banner the page shows when its model is not a released CLIP, else None.

    Random weights (``pretrained=None``) are known without loading anything; otherwise the model is
    loaded (once, :func:`load_base`) and a checkpoint whose tensor shapes match no registered
    open_clip architecture (``"inferred-vit-w..."``: a test or custom model) is announced too.
    """
    if settings.pretrained is None or str(settings.pretrained).lower() in ("none", "random"):
        return RANDOM_WEIGHTS_NOTICE
    arch = load_base(settings).config.model
    if arch.startswith("inferred-"):
        import open_clip

        if arch.removeprefix("inferred-") not in open_clip.list_models():
            return CUSTOM_WEIGHTS_NOTICE
    return None


@functools.lru_cache(maxsize=2)
def load_base(settings: DemoSettings) -> Segmenter:
    """The shared segmenter (CLIP weights, tokenizer, RCS and SFR settings), loaded once per settings;
    the methods' own ``<method>_<field>`` settings are applied per method (:func:`method_segmenter`)."""
    shared = {k: v for k, v in settings.overrides if method_field_owner(k) is None}
    return create_segmenter(
        method="naclip", rcs=True, sfr=True, preset=settings.preset, model=settings.model,
        pretrained=settings.pretrained, device=settings.device, precision=settings.precision,
        fidelity=cast(Any, settings.fidelity), window_batch=settings.window_batch,
        aux_pretrained=dict(settings.aux_pretrained), **shared,
    )


def method_segmenter(settings: DemoSettings, method: str, rcs: bool, sfr: bool) -> Segmenter:
    """The shared segmenter for ``method`` with its own fields from ``settings.overrides``."""
    fields = fields_for(dict(settings.overrides), get_method(method).name)
    return load_base(settings).with_method(method, rcs=rcs, sfr=sfr, fields=fields)


def class_list(name: str) -> str:
    """A shipped benchmark class list (a key of :data:`CLASS_LISTS`) as one ``;``-separated string."""
    path = class_file_path(get_dataset_spec(CLASS_LISTS[name]))
    return "; ".join(line.strip() for line in read_class_file(path))


def _file_stem(image: ImageInput) -> str:
    """A safe file-name stem for the downloads, from the upload's own name (``"image"`` otherwise)."""
    name = os.path.basename(os.fspath(image)) if isinstance(image, (str, os.PathLike)) else ""
    stem = re.sub(r"[^\w.-]+", "_", os.path.splitext(name)[0]).strip("._")[:80]
    return stem or "image"


def _public(value: Any) -> Any:
    """``value`` with every server path reduced to its file name (``"local-dir:/srv/m"`` ->
    ``"local-dir:m"``)."""
    if isinstance(value, dict):
        return {k: _public(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_public(v) for v in value]
    if isinstance(value, str):
        match = re.match(r"^([a-z][a-z-]*:)?(.*)$", value, re.S)
        prefix, rest = (match.group(1) or "", match.group(2)) if match else ("", value)
        if rest and (os.path.isabs(rest) or rest.startswith("~") or os.path.exists(rest)):
            return prefix + (os.path.basename(rest.rstrip("/\\")) or rest)
    return value


def result_files(image_name: str, mask: np.ndarray, spec: ClassSpec, seg: Segmenter, palette: str,
                 alpha: float, stem: str) -> tuple[dict[str, Any], bytes]:
    """The JSON record and the mask PNG of one result, as ``resclip segment`` writes them.

    The record is :func:`resclip.results.result_record` with the files named
    ``<stem>_mask.png`` / ``<stem>_overlay.png`` and every server path in its settings (the
    checkpoint) reduced to its file name.
    """
    from .results import OutputOptions, result_record

    colours = class_palette(spec.names, palette)
    buffer = io.BytesIO()
    viz.mask_image(mask, spec.num_classes, colours).save(buffer, format="PNG")
    record = result_record(image_name, mask, spec, seg.config.to_dict(), palette, alpha,
                           {"mask": f"{stem}_mask.png", "overlay": f"{stem}_overlay.png"},
                           output=OutputOptions(palette=palette, alpha=alpha).record())
    record["settings"] = _public(record.get("settings", {}))
    return record, buffer.getvalue()


def _legend_html(rows: list[dict[str, Any]]) -> str:
    cells = "".join(
        f'<tr><td><span style="display:inline-block;width:1em;height:1em;background:{r["color"]};'
        f'border:1px solid #888"></span></td><td>{html.escape(r["name"])}</td>'
        f'<td style="text-align:right">{100 * r["share"]:.1f}%</td></tr>'
        for r in rows
    )
    return f'<table class="resclip-legend"><tr><th></th><th>class</th><th>pixels</th></tr>{cells}</table>'


def _megapixels(pixels: int) -> str:
    return f"{pixels / 1e6:g} megapixel{'s' if pixels != 1_000_000 else ''}"


def _mb(size: float) -> str:
    return f"{size / MEBIBYTE:.1f}".removesuffix(".0") + " MB"


def _hide_path(message: str, path: str) -> str:
    """``message`` with the server path of an upload replaced by the file's own name."""
    name = os.path.basename(path)
    return message.replace(repr(path), repr(name)).replace(path, name)


_WARNINGS = threading.Lock()  # Python's warning filters are process-wide


@contextlib.contextmanager
def _class_notes(notes: list[str]) -> Iterator[None]:
    """Collect the block's class-list warnings into ``notes`` for the visitor; log the others."""
    with _WARNINGS, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        if issubclass(w.category, ClassListWarning):
            notes.append(str(w.message))
        else:
            LOG.warning("%s", w.message)


def check_classes(spec: ClassSpec, settings: DemoSettings) -> None:
    """Refuse more than ``settings.max_classes`` class names (synonyms included).

    Raises:
        ValueError: one sentence for the visitor.
    """
    names = spec.num_queries
    if names > settings.max_classes:
        extra = " (synonyms count as names)" if names > spec.num_classes else ""
        raise ValueError(f"You listed {names} class names; this demo accepts up to {settings.max_classes}"
                         f"{extra}.")


def check_image(image: ImageInput, settings: DemoSettings) -> None:
    """Refuse an image above the demo's limits without decoding it (a file is read up to its header).

    Raises:
        ValueError: one sentence for the visitor (file too large, too many pixels, not an image);
            no server path.
    """
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        try:
            size = os.path.getsize(path)
        except OSError:
            raise ValueError("The uploaded image is no longer on the server; upload it again.") from None
        if size > settings.max_upload_bytes:
            raise ValueError(f"The file is {_mb(size)}; this demo accepts files up to "
                             f"{_mb(settings.max_upload_bytes)}.")
        try:
            with Image.open(path) as img:  # reads the header only
                width, height = img.size
        except Image.DecompressionBombError:
            raise ValueError(f"The image is too large; this demo accepts up to "
                             f"{_megapixels(settings.max_pixels)}.") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
            raise ValueError("The file is not an image this demo can read; upload a JPEG, PNG, TIFF, BMP "
                             "or WebP image.") from None
    elif isinstance(image, Image.Image):
        width, height = image.size
    elif isinstance(image, np.ndarray) and image.ndim >= 2:
        height, width = image.shape[:2]
    else:
        return
    if width * height > settings.max_pixels:
        raise ValueError(f"The image is {width} x {height} pixels; this demo accepts up to "
                         f"{_megapixels(settings.max_pixels)}.")


def segment_image(
    image: ImageInput | None,
    classes: str,
    method: str = "naclip",
    rcs: bool = True,
    sfr: bool = True,
    alpha: float = 0.5,
    *,
    settings: DemoSettings,
    palette: str = "classes",
) -> DemoResult:
    """Segment one uploaded image: the demo's request handler as a pure function.

    The limits of ``settings`` are checked first, from the class text and the image file's header,
    before the image is decoded or the model runs.

    Args:
        image: a path, PIL image or ``(H, W, 3)`` uint8 array (any mode; EXIF orientation applied).
        classes: ``"cat; sofa; sky, clouds"``: the rule of :mod:`resclip.classes` (``;`` or new lines
            between classes, ``,`` between synonyms); its warnings are returned in ``warnings``.
        method: base attention; ``rcs`` / ``sfr`` switch the ResCLIP modules.
        alpha: overlay colour weight.
        settings: the server's model settings and limits (the model is loaded once per settings).

    Raises:
        ValueError: a one-line message for the user (no image, bad class names, SFR on MaskCLIP, an
            image or class list above the limits...), never naming a server path.
    """
    start = time.perf_counter()
    if image is None:
        raise ValueError("upload an image first")
    if method not in list_methods():
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(list_methods())}")
    if sfr and not sfr_allowed(method):
        raise ValueError(f"{get_method(method).title} has no attention scores for SFR to refine: switch SFR "
                         "off")
    notes: list[str] = []
    try:
        with _class_notes(notes):
            spec = load_classes(str(classes or ""))
        check_classes(spec, settings)
        check_image(image, settings)
        rgb = load_image(image)
    except (ValueError, OSError) as err:
        message = str(err)
        if isinstance(image, (str, os.PathLike)):
            message = _hide_path(message, os.fspath(image))
        raise ValueError(message) from err
    seg = method_segmenter(settings, method, bool(rcs), bool(sfr))
    with _class_notes(notes):
        spec, emb = seg.encode_classes(cast(Any, spec))
    mask = segment_array(seg, rgb, spec, emb)
    counts = viz.pixel_counts(mask, spec.num_classes)
    colours = class_palette(spec.names, palette)
    rows = [
        {"name": spec.names[i], "color": "#{:02x}{:02x}{:02x}".format(*viz.rgb(colours[i])),
         "share": float(counts[i] / mask.size)}
        for i in np.flatnonzero(counts).tolist()
    ]
    picture = np.asarray(viz.overlay(rgb, mask, float(alpha), colours))
    stem = _file_stem(image)
    name = os.path.basename(os.fspath(image)) if isinstance(image, (str, os.PathLike)) else "upload"
    record, mask_png = result_files(name, mask, spec, seg, palette, float(alpha), stem)
    modules = " + ".join(["RCS"] * bool(rcs) + ["SFR"] * bool(sfr)) or "no modules"
    status = (f"{method} + {modules}, preset {seg.config.preset}, {rgb.shape[1]}x{rgb.shape[0]} px, "
              f"{time.perf_counter() - start:.1f} s")
    return DemoResult(picture, mask, rows, _legend_html(rows), status, list(dict.fromkeys(notes)), record,
                      mask_png, stem)
