"""Options shared by the commands that build a segmenter."""

from __future__ import annotations

import argparse
import ast
from typing import Any

from ..factory import create_segmenter, valid_overrides
from ..methods import list_methods
from ..segmenter import Segmenter


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit code 2."""


def add_model_arguments(parser: argparse.ArgumentParser, *, default_preset: str = "default") -> None:
    """Add --method, --rcs/--no-rcs, --sfr/--no-sfr, --preset, --model, --pretrained, --device,
    --precision, --fidelity and repeated --set KEY=VALUE."""
    g = parser.add_argument_group("model and method")
    g.add_argument(
        "--method", default="naclip", choices=list_methods(), help="base attention (default: naclip)"
    )
    g.add_argument(
        "--rcs", action=argparse.BooleanOptionalAction, default=True, help="apply RCS (default: on)"
    )
    g.add_argument(
        "--sfr", action=argparse.BooleanOptionalAction, default=True, help="apply SFR (default: on)"
    )
    g.add_argument(
        "--preset",
        default=default_preset,
        help=f"inference preset (default: {default_preset}; see `resclip list presets`)",
    )
    g.add_argument(
        "--model",
        default=None,
        help="open_clip architecture, e.g. ViT-B-16, ViT-L-14 "
        "(default: ViT-B-16, or inferred from a local checkpoint)",
    )
    g.add_argument(
        "--pretrained",
        default="openai",
        help="open_clip tag (openai, laion2b_s34b_b88k, ...), a "
        "local checkpoint file, or 'none' for random weights (default: openai)",
    )
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps or auto (default: auto)")
    g.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"], help="(default: fp32)")
    g.add_argument(
        "--fidelity",
        default=None,
        choices=["official", "paper"],
        help="released-code or paper equations (default: the preset's)",
    )
    g.add_argument(
        "--window-batch", type=int, default=8, help="sliding windows per forward pass (default: 8)"
    )
    g.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting, e.g. --set prob_thd=0.2 --set lambda_rcs=0.5 (repeatable)",
    )


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Parse ``KEY=VALUE`` strings; values are Python literals (numbers, tuples, None) or strings."""
    out: dict[str, Any] = {}
    valid = set(valid_overrides())
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise UserError(f"--set expects KEY=VALUE, got {item!r}")
        if key not in valid:
            raise UserError(f"--set {key}: unknown setting; valid: {', '.join(sorted(valid))}")
        try:
            out[key] = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            out[key] = raw.strip()
    return out


def segmenter_from_args(args: argparse.Namespace, overrides: dict[str, Any] | None = None) -> Segmenter:
    """Build the segmenter described by :func:`add_model_arguments` options.

    Args:
        overrides: settings that replace ``--set`` ones (e.g. one point of a sweep).
    """
    pretrained = None if str(args.pretrained).lower() == "none" else args.pretrained
    return create_segmenter(
        method=args.method,
        rcs=args.rcs,
        sfr=args.sfr,
        preset=args.preset,
        model=args.model,
        pretrained=pretrained,
        device=args.device,
        precision=args.precision,
        fidelity=args.fidelity,
        window_batch=args.window_batch,
        **{**parse_overrides(args.overrides), **(overrides or {})},
    )
