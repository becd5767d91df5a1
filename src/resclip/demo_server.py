"""The demo's page and server: Gradio around :func:`resclip.demo.segment_image`, and the files each
visitor session keeps on the server (see :mod:`resclip.demo` for the limits)."""

from __future__ import annotations

import html
import os
import shutil
import threading
import uuid
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any

from PIL import Image

from . import demo
from .demo import (
    CLASS_LISTS,
    EXAMPLE_CLASSES,
    GRADIO_HINT,
    LOG,
    DemoSettings,
    class_list,
    example_inputs,
    load_base,
    method_choices,
    sfr_allowed,
    weights_notice,
)
from .palettes import PALETTES

# Gradio's sweep of files that no session cleaned up (API clients that never close a page):
# every 10 minutes, files older than an hour are deleted.
CACHE_SWEEP = (600, 3600)
#: The files a request leaves for its visitor (besides the upload), by role.
OUTPUTS = ("overlay", "mask", "json")

#: The page's style: a visible banner for :func:`resclip.demo.weights_notice`, the legend beside the
#: picture, and nothing wider than a phone's screen (columns stack below 640 px).
CSS = """
.resclip-notice {background: #fff3cd; color: #664d03; border: 2px solid #e0a800; border-radius: 6px;
  padding: 0.6em 0.9em; font-weight: 600;}
.resclip-legend {border-collapse: collapse; max-width: 100%;}
.resclip-legend td, .resclip-legend th {padding: 0.15em 0.6em; text-align: left; white-space: nowrap;}
.resclip-legend td:nth-child(2) {white-space: normal; overflow-wrap: anywhere;}
#legend, #status {overflow-wrap: anywhere;}
.gradio-container {max-width: 100% !important;}
#downloads {flex-wrap: wrap;}
@media (max-width: 640px) {
  .gradio-container {padding-left: 6px !important; padding-right: 6px !important;}
  #examples table {table-layout: fixed; width: 100%;}
  #examples td, #examples th {white-space: normal !important; word-break: break-word;}
}
"""


class SessionFiles:
    """The demo's files on the server, per visitor session: the current upload and results only.

    Each request calls :meth:`hold` with the files its page now shows (the upload, the overlay, the
    mask PNG and the JSON); the files the session held before and no session holds any more are
    deleted. :meth:`end` (the page was closed) deletes the rest. Uploads are shared between sessions
    when two visitors send the same bytes (Gradio names them by content), so a file is deleted only
    once no session holds it; the files in ``keep`` (the page's example photos, which Gradio serves
    from the same folder) are never deleted.
    """

    def __init__(self, folder: str | os.PathLike[str], keep: Collection[str | os.PathLike[str]] = ()) -> None:
        self.folder = Path(folder)
        self.keep = keep  # read at each release: Gradio fills its set as the page is built
        self._lock = threading.Lock()
        self._held: dict[str, dict[str, Path]] = {}

    def new_outputs(self, stem: str) -> dict[str, Path]:
        """Fresh file names for one request's results, in a folder of their own (in the folder Gradio
        serves files from): ``<stem>_overlay.png``, ``<stem>_mask.png``, ``<stem>.json``."""
        folder = self.folder / f"resclip-{uuid.uuid4().hex}"
        folder.mkdir(parents=True)
        return {"overlay": folder / f"{stem}_overlay.png", "mask": folder / f"{stem}_mask.png",
                "json": folder / f"{stem}.json"}

    def held(self, session: str) -> dict[str, Path]:
        """The files ``session`` holds, by role (``"upload"``, ``"overlay"``, ``"mask"``, ``"json"``)."""
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
        kept = {Path(os.path.abspath(p)) for files in self._held.values() for p in files.values()}
        kept |= {Path(os.path.abspath(p)) for p in list(self.keep)}
        folder = Path(os.path.abspath(self.folder))
        for path in {Path(os.path.abspath(p)) for p in paths} - kept:
            try:
                path.unlink(missing_ok=True)
                if path.parent != folder:  # each upload, and each request's results, in a folder of its own
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


def _save_outputs(res: demo.DemoResult, paths: dict[str, Path]) -> None:
    """Write the overlay, the mask PNG and the JSON of one result: all or none."""
    try:
        Image.fromarray(res.overlay).save(paths["overlay"], format="PNG", compress_level=3)
        paths["mask"].write_bytes(res.mask_png)
        paths["json"].write_text(res.json_text, encoding="utf-8", errors="backslashreplace")
    except (OSError, ValueError):
        shutil.rmtree(paths["overlay"].parent, ignore_errors=True)
        raise


def handle_request(files: SessionFiles, session: str | None, image: Any, classes: str, method: str,
                   rcs: bool, sfr: bool, alpha: float, palette: str, *,
                   settings: DemoSettings) -> tuple[str, str, str, str, str]:
    """The page's request: :func:`resclip.demo.segment_image`, then its files saved for the page.

    Args:
        files: the sessions' files; the upload and the new results replace the session's previous ones.
        session: the visitor's session id (``None``: a one-off request, whose files are left to
            Gradio's hourly sweep).
        image: the image component's raw value (a ``FileData`` dict with the upload's ``path``).

    Returns:
        The overlay PNG's path, the legend HTML, the status line, the mask PNG's path and the JSON's
        path (the last two are the page's downloads: what ``resclip segment`` writes).

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
        try:
            out = files.new_outputs(res.stem)
            _save_outputs(res, out)
        except (OSError, ValueError) as err:
            LOG.exception("the demo could not save a result")
            raise ValueError("The result could not be saved on the server; please try again later.") from err
        result.update(out)
        status = res.status + "".join(f"\n\nwarning: {w}" for w in res.warnings)
        return str(out["overlay"]), res.legend_html, status, str(out["mask"]), str(out["json"])
    finally:
        if not any(role in result for role in OUTPUTS):  # the page still shows the last results
            result.update({role: previous[role] for role in OUTPUTS if role in previous})
        if session:
            files.hold(session, result)


def sfr_update(method: str) -> Any:
    """The SFR box for ``method``: usable where SFR can run, otherwise switched off and disabled.

    Raises:
        RuntimeError: Gradio is not installed.
    """
    try:
        import gradio as gr
    except ImportError as err:
        raise RuntimeError(GRADIO_HINT) from err
    if sfr_allowed(method):
        return gr.update(interactive=True)
    return gr.update(interactive=False, value=False)


def notice_html(notice: str | None) -> str:
    """The page's banner for :func:`resclip.demo.weights_notice` (empty when there is none)."""
    if not notice:
        return ""
    return f'<div class="resclip-notice" role="alert">&#9888; {html.escape(notice)}</div>'


def build_app(settings: DemoSettings) -> Any:
    """The Gradio ``Blocks`` page around :func:`resclip.demo.segment_image` (not launched).

    The model is loaded here (once per settings) when the weights are not plainly random, to tell
    whether the page needs the :func:`resclip.demo.weights_notice` banner.

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
    sfr_ok = sfr_allowed(settings.method)
    notice = weights_notice(settings)

    with gr.Blocks(title="ResCLIP demo", analytics_enabled=False, delete_cache=CACHE_SWEEP) as app:
        gr.Markdown("## ResCLIP: training-free open-vocabulary segmentation with CLIP\n"
                    "Upload an image or pick an example, list the classes to look for (`;` between "
                    "classes, `,` between synonyms), then press **Segment**. Every pixel gets one of "
                    "your classes.")
        if notice:
            gr.HTML(notice_html(notice), elem_id="weights-notice")
        with gr.Row(equal_height=False):
            with gr.Column(min_width=300):
                # the handler gets the upload's path (preprocess=False below): Gradio neither decodes it
                # nor opens it; the limits are checked from the header first
                image = gr.Image(label="Image", type="filepath", image_mode=None,
                                 sources=["upload", "clipboard"], elem_id="input-image")
                classes = gr.Textbox(label="Class names", value=EXAMPLE_CLASSES, lines=2,
                                     placeholder="cat; sofa; sky, clouds", elem_id="classes")
                preset = gr.Dropdown(["(type your own)", *CLASS_LISTS], value="(type your own)",
                                     label="or start from a benchmark's classes", elem_id="class-list")
                with gr.Row():
                    method = gr.Dropdown(method_choices(), value=settings.method, label="Base attention",
                                         elem_id="method", min_width=160)
                    rcs = gr.Checkbox(value=settings.rcs, label="RCS", elem_id="rcs", min_width=80)
                    sfr = gr.Checkbox(value=settings.sfr and sfr_ok, label="SFR", elem_id="sfr",
                                      interactive=sfr_ok, min_width=80)
                with gr.Row():
                    alpha = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Overlay opacity",
                                      elem_id="alpha", min_width=160)
                    palette = gr.Radio(list(PALETTES), value="classes", label="Colours", elem_id="palette",
                                       min_width=160)
                button = gr.Button("Segment", variant="primary", elem_id="segment-button")
            with gr.Column(min_width=300):
                overlay = gr.Image(label="Overlay", type="filepath", format="png", interactive=False,
                                   elem_id="overlay")
                legend = gr.HTML(elem_id="legend")
                status = gr.Markdown(elem_id="status")
                with gr.Row(elem_id="downloads"):
                    mask_file = gr.DownloadButton("Download mask (PNG)", interactive=False,
                                                  elem_id="download-mask", min_width=160)
                    json_file = gr.DownloadButton("Download JSON", interactive=False, elem_id="download-json",
                                                  min_width=160)
        # below both columns: on a phone the result comes right after the Segment button
        gr.Examples(example_inputs(), inputs=[image, classes], label="Examples (click one, then Segment)",
                    elem_id="examples")
        preset.change(lambda name: class_list(name) if name in CLASS_LISTS else gr.skip(), preset, classes)
        method.change(sfr_update, method, sfr)
        files = SessionFiles(overlay.GRADIO_CACHE, keep=image.keep_in_cache)
        downloads = [mask_file, json_file]
        button.click(handler, [image, classes, method, rcs, sfr, alpha, palette],
                     [overlay, legend, status, *downloads], preprocess=False).success(
            lambda: (gr.update(interactive=True),) * 2, None, downloads, api_visibility="private")
        app.unload(end_session)
    return app


def launch(settings: DemoSettings, host: str = "127.0.0.1", port: int = 7860, share: bool = False) -> None:
    """Load the model, then serve the page until interrupted.

    ``settings.concurrency`` requests run at a time (Gradio's queue); uploads above
    ``settings.max_upload_mb`` are refused by Gradio before they reach the handler. ``share`` asks
    Gradio for a temporary public link (the server itself still listens on ``host`` only).
    """
    load_base(settings)
    app = build_app(settings)
    import gradio as gr

    theme = gr.themes.Default(font=("ui-sans-serif", "system-ui", "sans-serif"),
                              font_mono=("ui-monospace", "monospace"))
    app.queue(default_concurrency_limit=settings.concurrency).launch(
        server_name=host, server_port=port, show_error=False, theme=theme, css=CSS,
        max_file_size=settings.max_upload_bytes, share=share,
    )
