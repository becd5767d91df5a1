"""`resclip demo`: serve the web demo (optional extra ``resclip[demo]``, Gradio).

The model is loaded before the server starts (a missing checkpoint fails here, on one line) and
kept for every request; only the small last-block engine is built per request.
"""

from __future__ import annotations

import argparse

from .common import UserError, add_model_arguments, parse_overrides

NAME = "demo"
HELP = "serve the web demo (needs the optional 'demo' extra: pip install 'resclip[demo]')"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``resclip demo``."""
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: 127.0.0.1; 0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    add_model_arguments(parser, default_preset="default")


def run(args: argparse.Namespace) -> int:
    """Load the model and serve until interrupted."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UserError("the web demo needs Gradio: pip install 'resclip[demo]'") from None
    from ..demo import DemoSettings, launch
    from .segment import cli_warnings

    if not 0 < args.port < 65536:
        raise UserError(f"--port must be in 1..65535, got {args.port}")
    pretrained = None if str(args.pretrained).lower() == "none" else args.pretrained
    settings = DemoSettings(
        model=args.model, pretrained=pretrained, device=args.device, precision=args.precision,
        preset=args.preset, fidelity=args.fidelity, window_batch=args.window_batch,
        overrides=tuple(sorted(parse_overrides(args.overrides).items())), method=args.method,
        rcs=args.rcs, sfr=args.sfr,
    )
    print(f"loading the model, then serving on http://{args.host}:{args.port} (Ctrl+C stops)", flush=True)
    with cli_warnings():
        launch(settings, args.host, args.port)
    return 0
