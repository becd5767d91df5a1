"""Web demo (optional extra ``resclip[demo]``, Gradio): upload an image, type class names, pick the
base attention and the RCS / SFR switches, see the overlay and its legend.

The CLIP model loads once per :class:`DemoSettings` (cached); each request only builds the small
last-block engine for the chosen method. :func:`segment_image` is the whole request handler as a
plain function (no Gradio needed), so it is tested without a server; :func:`build_app` wraps it in
a Gradio page and :func:`launch` serves it (``resclip demo``).

Serving it to others (the limits are :class:`DemoSettings` fields, ``resclip demo`` flags):

* uploads above ``max_upload_mb`` (default 20 MB) are refused by Gradio and again by the handler;
* images above ``max_pixels`` (default 40 megapixels) are refused from the file header, before
  anything is decoded, so a small file that expands to gigabytes (a decompression bomb) costs nothing;
* more than ``max_classes`` class names (default 200, synonyms included) are refused;
* requests run ``concurrency`` at a time (default 1, Gradio's queue); the others wait in line.
  Each running request holds the image, its mask, scores and overlay in memory (several GB near the
  pixel cap: a 100-megapixel image took 6.7 GB before the cap), so raise it only with the memory
  to match;
* each visitor session keeps at most its current upload and its current overlay on the server: the
  previous ones are deleted by the next request, the rest when the page is closed, anything left
  over after an hour, and everything when the server stops;
* messages shown to visitors are one sentence and never name a server path; unexpected errors are
  logged on the server and shown as a generic message.
"""

from __future__ import annotations

import functools
import html
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
from PIL import Image, UnidentifiedImageError

from . import viz
from .commands.common import UserError
from .commands.compare import Variant, has_scores, segmenter_variant
from .commands.segment import check_class_lengths, class_lines, segment_array, validate_classes
from .factory import create_segmenter
from .methods import list_methods
from .palettes import PALETTES
from .preprocess import ImageInput, load_image
from .presets import CLASS_FILES
from .segmenter import Segmenter
from .text import read_class_file

GRADIO_HINT = "the web demo needs Gradio: pip install 'resclip[demo]'"
EXAMPLE_CLASSES = "cat; sofa; sky, clouds; floor; wall"
CLASS_LISTS = {
    "PASCAL VOC (21)": "voc21",
    "PASCAL Context (60)": "context60",
    "COCO-Object (81)": "coco_object",
    "COCO-Stuff (171)": "coco_stuff",
    "ADE20K (150)": "ade20k",
    "Cityscapes (19)": "cityscapes",
}
MEBIBYTE = 1 << 20
# Gradio's sweep of files that no session cleaned up (API clients that never close a page):
# every 10 minutes, files older than an hour are deleted.
CACHE_SWEEP = (600, 3600)
LOG = logging.getLogger(__name__)


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
        overlay: ``(H, W', 3)`` uint8, the overlay at the image size with the legend to its right.
        mask: ``(H, W)`` int64 class indices.
        legend: one row per class present: ``name``, ``color`` (``"#rrggbb"``), ``share`` (0..1).
        legend_html: the legend as an HTML table.
        status: one line: method, modules, preset, image size and time taken.
    """

    overlay: np.ndarray
    mask: np.ndarray
    legend: list[dict[str, Any]]
    legend_html: str
    status: str


@functools.lru_cache(maxsize=2)
def load_base(settings: DemoSettings) -> Segmenter:
    """The shared segmenter (CLIP weights, tokenizer, RCS and SFR settings), loaded once per settings."""
    return create_segmenter(
        method="naclip", rcs=True, sfr=True, preset=settings.preset, model=settings.model,
        pretrained=settings.pretrained, device=settings.device, precision=settings.precision,
        fidelity=cast(Any, settings.fidelity), window_batch=settings.window_batch, **dict(settings.overrides),
    )


def class_list(name: str) -> str:
    """A shipped benchmark class list (a key of :data:`CLASS_LISTS`) as one ``;``-separated string."""
    path = Path(__file__).parent / "data" / "class_names" / CLASS_FILES[CLASS_LISTS[name]]
    return "; ".join(line.strip() for line in read_class_file(path))


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


def check_classes(lines: list[str], settings: DemoSettings) -> None:
    """Refuse more than ``settings.max_classes`` class names (synonyms included).

    Raises:
        ValueError: one sentence for the visitor.
    """
    names = sum(len(line.split(",")) for line in lines if line.strip())
    if names > settings.max_classes:
        extra = " (synonyms count as names)" if names > len(lines) else ""
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
    palette: str = "voc",
) -> DemoResult:
    """Segment one uploaded image: the demo's request handler as a pure function.

    The limits of ``settings`` are checked first, from the class text and the image file's header,
    before the image is decoded or the model runs.

    Args:
        image: a path, PIL image or ``(H, W, 3)`` uint8 array (any mode; EXIF orientation applied).
        classes: ``"cat; sofa; sky, clouds"`` (``;`` or newlines between classes).
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
    if sfr and not has_scores(method):
        raise ValueError(f"{method} has no attention scores for SFR to refine: switch SFR off")
    text = str(classes or "")
    if any("\ud800" <= ch <= "\udfff" for ch in text):
        raise ValueError("The class names hold characters that are not valid text; retype them.")
    try:
        lines = class_lines(text, None)[0]
        check_classes(lines, settings)
        spec = validate_classes(lines, "class")
        check_image(image, settings)
        rgb = load_image(image)
    except (UserError, ValueError, OSError) as err:
        message = str(err)
        if isinstance(image, (str, os.PathLike)):
            message = _hide_path(message, os.fspath(image))
        raise ValueError(message) from err
    base = load_base(settings)
    try:
        check_class_lengths(base.tokenizer, spec)
    except UserError as err:
        raise ValueError(str(err)) from err
    seg = segmenter_variant(base, Variant(method, method, bool(rcs), bool(sfr)))
    spec, emb = seg.encode_classes(cast(Any, spec))
    mask = segment_array(seg, rgb, spec, emb)
    counts = viz.pixel_counts(mask, spec.num_classes)
    colours = viz.colorize(np.arange(spec.num_classes).reshape(1, -1), palette)[0]
    rows = [
        {"name": spec.names[i], "color": "#{:02x}{:02x}{:02x}".format(*viz.rgb(colours[i])),
         "share": float(counts[i] / mask.size)}
        for i in np.flatnonzero(counts).tolist()
    ]
    picture = np.asarray(viz.overlay_with_legend(rgb, mask, spec.names, float(alpha), palette))
    modules = " + ".join(["RCS"] * bool(rcs) + ["SFR"] * bool(sfr)) or "no modules"
    status = (f"{method} + {modules}, preset {seg.config.preset}, {rgb.shape[1]}x{rgb.shape[0]} px, "
              f"{time.perf_counter() - start:.1f} s")
    return DemoResult(picture, mask, rows, _legend_html(rows), status)


class SessionFiles:
    """The demo's files on the server, per visitor session: the current upload and overlay only.

    Each request calls :meth:`hold` with the files its page now shows; the files the session held
    before and no session holds any more are deleted. :meth:`end` (the page was closed) deletes the
    rest. Uploads are shared between sessions when two visitors send the same bytes (Gradio names
    them by content), so a file is deleted only once no session holds it.
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self._lock = threading.Lock()
        self._held: dict[str, dict[str, Path]] = {}

    def new_output(self) -> Path:
        """A fresh file name for an overlay (in the folder Gradio serves files from)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        return self.folder / f"resclip-overlay-{uuid.uuid4().hex}.png"

    def held(self, session: str) -> dict[str, Path]:
        """The files ``session`` holds, by role (``"upload"``, ``"output"``)."""
        with self._lock:
            return dict(self._held.get(session, {}))

    def hold(self, session: str, files: dict[str, Path]) -> None:
        """Make ``files`` the session's files; delete the ones it no longer holds.

        Files outside :attr:`folder` are not tracked (and so never deleted).
        """
        mine = {role: path for role, path in files.items() if self._inside(path)}  # never touch others
        with self._lock:
            before = set(self._held.get(session, {}).values())
            self._held[session] = mine
            self._release(before - set(mine.values()))

    def end(self, session: str | None) -> None:
        """Forget a session and delete its files."""
        with self._lock:
            self._release(set(self._held.pop(session or "", {}).values()))

    def _inside(self, path: Path) -> bool:
        try:
            full, folder = path.resolve(), self.folder.resolve()
        except OSError:
            return False
        return full != folder and full.is_relative_to(folder)

    def _release(self, paths: Iterable[Path]) -> None:
        kept = {p for files in self._held.values() for p in files.values()}
        for path in set(paths) - kept:
            try:
                path.unlink(missing_ok=True)
                if path.parent != self.folder:  # Gradio keeps each upload in a folder of its own
                    path.parent.rmdir()
            except OSError:  # a folder not empty, or a file already gone: Gradio's sweep does the rest
                pass


def _upload_path(image: Any) -> str | None:
    """The server path of the image component's raw value (Gradio ``FileData``), if any."""
    if isinstance(image, dict):
        path = image.get("path")
        return str(path) if path else None
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image)
    return None


def handle_request(files: SessionFiles, session: str | None, image: Any, classes: str, method: str,
                   rcs: bool, sfr: bool, alpha: float, palette: str, *,
                   settings: DemoSettings) -> tuple[str, str, str]:
    """The page's request: :func:`segment_image`, then the overlay saved as a PNG for the browser.

    Args:
        files: the sessions' files; the upload and the new overlay replace the session's previous ones.
        session: the visitor's session id (``None``: a one-off request, whose files are left to
            Gradio's hourly sweep).
        image: the image component's raw value (a ``FileData`` dict with the upload's ``path``).

    Returns:
        The overlay PNG's path, the legend HTML and the status line.

    Raises:
        ValueError: one line for the visitor, without server paths.
    """
    upload = _upload_path(image)
    previous = files.held(session) if session else {}
    result: dict[str, Path] = {"upload": Path(upload)} if upload else {}
    try:
        try:
            res = segment_image(upload, classes, method, bool(rcs), bool(sfr), float(alpha),
                                settings=settings, palette=palette)
        except ValueError:
            raise
        except Exception as err:
            LOG.exception("the demo failed on a request")
            raise ValueError("Something went wrong while segmenting this image; please try again.") from err
        out = files.new_output()
        try:
            Image.fromarray(res.overlay).save(out, format="PNG", compress_level=3)
        except (OSError, ValueError) as err:
            out.unlink(missing_ok=True)
            LOG.exception("the demo could not save an overlay")
            raise ValueError("The result could not be saved on the server; please try again later.") from err
        result["output"] = out
        return str(out), res.legend_html, res.status
    finally:
        if "output" not in result and "output" in previous:
            result["output"] = previous["output"]  # the page still shows the last overlay
        if session:
            files.hold(session, result)


def build_app(settings: DemoSettings) -> Any:
    """The Gradio ``Blocks`` page around :func:`segment_image` (not launched).

    Raises:
        RuntimeError: Gradio is not installed.
    """
    try:
        import gradio as gr
    except ImportError as err:
        raise RuntimeError(GRADIO_HINT) from err

    files: SessionFiles | None = None  # set below, in Gradio's cache folder

    def handler(image: Any, classes: str, method: str, rcs: bool, sfr: bool, alpha: float,
                palette: str, request: gr.Request) -> tuple[Any, ...]:
        assert files is not None
        try:
            return handle_request(files, request.session_hash, image, classes, method, rcs, sfr, alpha,
                                  palette, settings=settings)
        except ValueError as err:
            raise gr.Error(str(err), print_exception=False) from err

    def end_session(request: gr.Request) -> None:
        if files is not None:
            files.end(request.session_hash)

    # Gradio passes the request to a parameter annotated gr.Request; with postponed annotations it
    # would have to resolve the string "gr.Request" in this module, where Gradio is not imported
    handler.__annotations__["request"] = end_session.__annotations__["request"] = gr.Request

    with gr.Blocks(title="ResCLIP demo", analytics_enabled=False, delete_cache=CACHE_SWEEP) as app:
        gr.Markdown("## ResCLIP: training-free open-vocabulary segmentation with CLIP\n"
                    "Upload an image, list the classes to look for (`;` between classes, `,` between "
                    "synonyms), then press **Segment**. Every pixel gets one of your classes.")
        with gr.Row():
            with gr.Column():
                # the handler gets the upload's path (preprocess=False below): Gradio neither decodes it
                # nor opens it; the limits are checked from the header first
                image = gr.Image(label="Image", type="filepath", image_mode=None,
                                 sources=["upload", "clipboard"], elem_id="input-image")
                classes = gr.Textbox(label="Class names", value=EXAMPLE_CLASSES, lines=2,
                                     placeholder="cat; sofa; sky, clouds", elem_id="classes")
                preset = gr.Dropdown(["(type your own)", *CLASS_LISTS], value="(type your own)",
                                     label="or start from a benchmark's classes", elem_id="class-list")
                with gr.Row():
                    method = gr.Dropdown(list_methods(), value=settings.method, label="Base attention",
                                         elem_id="method")
                    rcs = gr.Checkbox(value=settings.rcs, label="RCS", elem_id="rcs")
                    sfr = gr.Checkbox(value=settings.sfr, label="SFR", elem_id="sfr")
                with gr.Row():
                    alpha = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Overlay opacity",
                                      elem_id="alpha")
                    palette = gr.Radio(list(PALETTES), value="voc", label="Colours", elem_id="palette")
                button = gr.Button("Segment", variant="primary", elem_id="segment-button")
            with gr.Column():
                overlay = gr.Image(label="Overlay", type="filepath", format="png", interactive=False,
                                   elem_id="overlay")
                legend = gr.HTML(elem_id="legend")
                status = gr.Markdown(elem_id="status")
        preset.change(lambda name: class_list(name) if name in CLASS_LISTS else gr.skip(), preset, classes)
        files = SessionFiles(overlay.GRADIO_CACHE)
        button.click(handler, [image, classes, method, rcs, sfr, alpha, palette], [overlay, legend, status],
                     preprocess=False)
        app.unload(end_session)
    return app


def launch(settings: DemoSettings, host: str = "127.0.0.1", port: int = 7860) -> None:
    """Load the model, then serve the page until interrupted.

    ``settings.concurrency`` requests run at a time (Gradio's queue); uploads above
    ``settings.max_upload_mb`` are refused by Gradio before they reach the handler.
    """
    app = build_app(settings)
    load_base(settings)
    import gradio as gr

    theme = gr.themes.Default(font=("ui-sans-serif", "system-ui", "sans-serif"),
                              font_mono=("ui-monospace", "monospace"))
    app.queue(default_concurrency_limit=settings.concurrency).launch(
        server_name=host, server_port=port, show_error=False, theme=theme,
        max_file_size=settings.max_upload_bytes,
    )
