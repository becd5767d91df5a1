"""The demo's page and server: Gradio around :func:`resclip.demo.segment_image`, and the files each
visitor session keeps on the server (see :mod:`resclip.demo` for the limits)."""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from PIL import Image

from . import demo
from .demo import CLASS_LISTS, EXAMPLE_CLASSES, GRADIO_HINT, LOG, DemoSettings, class_list, load_base
from .methods import list_methods
from .palettes import PALETTES

# Gradio's sweep of files that no session cleaned up (API clients that never close a page):
# every 10 minutes, files older than an hour are deleted.
CACHE_SWEEP = (600, 3600)


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
    """The page's request: :func:`resclip.demo.segment_image`, then the overlay saved as a PNG.

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
            res = demo.segment_image(upload, classes, method, bool(rcs), bool(sfr), float(alpha),
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
        return str(out), res.legend_html, res.status + "".join(f"\n\nwarning: {w}" for w in res.warnings)
    finally:
        if "output" not in result and "output" in previous:
            result["output"] = previous["output"]  # the page still shows the last overlay
        if session:
            files.hold(session, result)


def build_app(settings: DemoSettings) -> Any:
    """The Gradio ``Blocks`` page around :func:`resclip.demo.segment_image` (not launched).

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
