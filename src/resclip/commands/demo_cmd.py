"""`resclip demo`: serve the web demo (optional extra ``resclip[demo]``, Gradio).

The model is loaded before the server starts (a missing checkpoint fails here, on one line) and
kept for every request; only the small last-block engine is built per request.

The server listens on 127.0.0.1 unless ``--host`` says otherwise; ``--share`` asks Gradio for a
temporary public link to it (the page is then reachable by anyone with the link). Before sharing it,
size its limits:
``--max-upload-mb`` (default 20), ``--max-pixels`` (default 40,000,000: larger images are refused
from their header, never decoded), ``--max-classes`` (default 200, synonyms included) and
``--concurrency`` (default 1: requests run one at a time, the others wait in Gradio's queue; each
running request may take several GB near the pixel cap).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from .common import METHOD_ALIAS, UserError, add_model_arguments, parse_aux_pretrained, parse_overrides

NAME = "demo"
HELP = "serve the web demo (needs the optional 'demo' extra: pip install 'resclip[demo]')"

LIMITS_NOTE = """\
Limits: visitors get a one-sentence message when an upload is larger than --max-upload-mb, an image
has more pixels than --max-pixels (checked from the file header: the image is refused, never
decoded), or they list more than --max-classes class names (synonyms count). Requests are handled
--concurrency at a time in Gradio's queue; the others wait their turn. Memory grows with the
pixels of each running request (several GB near the default cap), so raise --concurrency or
--max-pixels only with the memory to match. Each session keeps only its current upload and overlay
on disk; the rest is deleted when it is replaced, when the page is closed, after an hour, or when
the server stops."""


def _positive(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``resclip demo``."""
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: 127.0.0.1; 0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    parser.add_argument("--share", action="store_true",
                        help="also serve the page through a temporary public Gradio link (*.gradio.live): "
                        "anyone with the link can use it, within the limits below")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = LIMITS_NOTE
    g = parser.add_argument_group("limits (what one visitor may ask of the server)")
    g.add_argument("--max-upload-mb", type=_positive(float), default=20.0, metavar="MB",
                   help="largest upload in MB (default: 20)")
    g.add_argument("--max-pixels", type=_positive(int), default=40_000_000, metavar="N",
                   help="largest image, width x height; larger ones are refused before decoding "
                   "(default: 40000000)")
    g.add_argument("--max-classes", type=_positive(int), default=200, metavar="N",
                   help="most class names per request, synonyms included (default: 200)")
    g.add_argument("--concurrency", type=_positive(int), default=1, metavar="N",
                   help="requests processed at the same time; the others wait in the queue (default: 1)")
    add_model_arguments(parser, default_preset="default")


def run(args: argparse.Namespace) -> int:
    """Load the model and serve until interrupted."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UserError("the web demo needs Gradio: pip install 'resclip[demo]'") from None
    from ..demo import DemoSettings, launch
    from .common import cli_warnings

    if not 0 < args.port < 65536:
        raise UserError(f"--port must be in 1..65535, got {args.port}")
    pretrained = None if str(args.pretrained).lower() == "none" else args.pretrained
    settings = DemoSettings(
        model=args.model, pretrained=pretrained, device=args.device, precision=args.precision,
        preset=args.preset, fidelity=args.fidelity, window_batch=args.window_batch,
        overrides=tuple(sorted(parse_overrides(args.overrides).items())),
        aux_pretrained=tuple(sorted(parse_aux_pretrained(args.aux_pretrained).items())),
        method="naclip" if args.method == METHOD_ALIAS else args.method,  # 'resclip': naclip + RCS + SFR
        rcs=args.rcs is not False, sfr=args.sfr is not False, max_upload_mb=args.max_upload_mb,
        max_pixels=args.max_pixels,
        max_classes=args.max_classes, concurrency=args.concurrency,
    )
    where = f"http://{args.host}:{args.port}" + (" and a public Gradio link" if args.share else "")
    hint = "" if args.share else "; --share adds a temporary public link"
    print(f"loading the model, then serving on {where} (Ctrl+C stops{hint})", flush=True)
    with cli_warnings():
        launch(settings, args.host, args.port, share=bool(args.share))
    return 0
