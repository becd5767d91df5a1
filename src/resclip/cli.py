"""``resclip`` command line: a thin dispatcher over :mod:`resclip.commands`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .commands import load_commands
from .commands.common import UserError, cli_warnings


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every available sub-command."""
    parser = argparse.ArgumentParser(
        prog="resclip",
        description="Training-free open-vocabulary segmentation with CLIP (ResCLIP and its baselines).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for mod in load_commands():
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 1 failure, 2 bad input, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    try:
        with cli_warnings():  # every library warning is one "resclip: warning: ..." line on stderr
            return int(args._run(args))
    except KeyboardInterrupt:
        print("resclip: interrupted", file=sys.stderr)
        return 130
    except (UserError, ValueError, TypeError, FileNotFoundError, RuntimeError, OSError) as err:
        print(f"resclip: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
