"""`resclip list methods|presets`: what can be chosen."""

from __future__ import annotations

import argparse

from ..methods import get_method, list_methods
from ..presets import get_preset, list_presets

NAME = "list"
HELP = "list the methods or presets"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("what", choices=["methods", "presets"])


def run(args: argparse.Namespace) -> int:
    if args.what == "methods":
        for name in list_methods():
            print(f"{name:10s} {get_method(name).description}")
    else:
        for name in list_presets():
            print(f"{name:24s} {get_preset(name).description}")
    return 0
