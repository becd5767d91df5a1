"""Web demo (optional extra ``resclip[demo]``, Gradio): upload an image, type class names, pick the
base attention and the RCS / SFR switches, see the overlay and its legend.

The CLIP model loads once per :class:`DemoSettings` (cached); each request only builds the small
last-block engine for the chosen method. :func:`segment_image` is the whole request handler as a
plain function (no Gradio needed), so it is tested without a server; :func:`build_app` wraps it in
a Gradio page and :func:`launch` serves it (``resclip demo``).
"""

from __future__ import annotations

import functools
import html
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

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


@dataclass(frozen=True)
class DemoSettings:
    """What the server loads once: the CLIP model and the inference preset.

    Attributes:
        model, pretrained, device, precision, preset, fidelity, window_batch: as in
            :func:`resclip.create_segmenter`.
        overrides: ``(key, value)`` setting overrides (``--set``).
        method, rcs, sfr: the page's initial choices.
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

    Args:
        image: a path, PIL image or ``(H, W, 3)`` uint8 array (any mode; EXIF orientation applied).
        classes: ``"cat; sofa; sky, clouds"`` (``;`` or newlines between classes).
        method: base attention; ``rcs`` / ``sfr`` switch the ResCLIP modules.
        alpha: overlay colour weight.
        settings: the server's model settings (the model is loaded once per settings).

    Raises:
        ValueError: a one-line message for the user (no image, bad class names, SFR on MaskCLIP...).
    """
    start = time.perf_counter()
    if image is None:
        raise ValueError("upload an image first")
    if method not in list_methods():
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(list_methods())}")
    if sfr and not has_scores(method):
        raise ValueError(f"{method} has no attention scores for SFR to refine: switch SFR off")
    try:
        spec = validate_classes(class_lines(str(classes or ""), None)[0], "class")
        rgb = load_image(image)
        base = load_base(settings)
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


def build_app(settings: DemoSettings) -> Any:
    """The Gradio ``Blocks`` page around :func:`segment_image` (not launched).

    Raises:
        RuntimeError: Gradio is not installed.
    """
    try:
        import gradio as gr
    except ImportError as err:
        raise RuntimeError(GRADIO_HINT) from err

    def handler(image: Any, classes: str, method: str, rcs: bool, sfr: bool, alpha: float,
                palette: str) -> tuple[Any, ...]:
        try:
            res = segment_image(image, classes, method, rcs, sfr, alpha, settings=settings, palette=palette)
        except (ValueError, RuntimeError, OSError) as err:
            raise gr.Error(str(err), print_exception=False) from err
        return res.overlay, res.legend_html, res.status

    with gr.Blocks(title="ResCLIP demo", analytics_enabled=False) as app:
        gr.Markdown("## ResCLIP: training-free open-vocabulary segmentation with CLIP\n"
                    "Upload an image, list the classes to look for (`;` between classes, `,` between "
                    "synonyms), then press **Segment**. Every pixel gets one of your classes.")
        with gr.Row():
            with gr.Column():
                image = gr.Image(label="Image", type="pil", image_mode=None, sources=["upload", "clipboard"],
                                 elem_id="input-image")
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
                overlay = gr.Image(label="Overlay", type="numpy", format="png", interactive=False,
                                   elem_id="overlay")
                legend = gr.HTML(elem_id="legend")
                status = gr.Markdown(elem_id="status")
        preset.change(lambda name: class_list(name) if name in CLASS_LISTS else gr.skip(), preset, classes)
        button.click(handler, [image, classes, method, rcs, sfr, alpha, palette], [overlay, legend, status])
    return app


def launch(settings: DemoSettings, host: str = "127.0.0.1", port: int = 7860) -> None:
    """Load the model, then serve the page until interrupted."""
    app = build_app(settings)
    load_base(settings)
    import gradio as gr

    theme = gr.themes.Default(font=("ui-sans-serif", "system-ui", "sans-serif"),
                              font_mono=("ui-monospace", "monospace"))
    app.queue().launch(server_name=host, server_port=port, show_error=True, theme=theme)
