"""``resclip`` command line: a thin dispatcher over :mod:`resclip.commands`.

The parser is built without importing torch or open_clip: the top level lists the commands from
:data:`resclip.commands.COMMANDS`, and a command's own options are added (its module imported) only
when that command appears on the command line. ``resclip --help``, ``resclip list ...`` and argument
errors therefore answer in a fraction of a second.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from . import __version__
from .commands import COMMANDS, CommandInfo, load_command
from .commands.common import UserError, cli_warnings


class _LazySubParsers(argparse._SubParsersAction):  # type: ignore[type-arg,unused-ignore]
    """Sub-parsers whose options are added the first time their command is chosen."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pending: dict[str, CommandInfo] = {}

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        name = values[0] if values else None
        if name in self._pending:
            populate(self._name_parser_map[name], self._pending.pop(name))
        super().__call__(parser, namespace, values, option_string)


def populate(parser: argparse.ArgumentParser, info: CommandInfo) -> None:
    """Import ``info``'s module and add its options to ``parser``."""
    mod = load_command(info)
    mod.add_arguments(parser)
    parser.set_defaults(_run=mod.run)


def build_parser(*, full: bool = False) -> argparse.ArgumentParser:
    """The argument parser with every sub-command.

    Args:
        full: add every command's options now (imports every command module, torch included);
            by default a command's options are added when the command is parsed.
    """
    parser = argparse.ArgumentParser(
        prog="resclip",
        description="Training-free open-vocabulary segmentation with CLIP (ResCLIP and its baselines).",
    )
    parser.add_argument("--version", action="version", version=f"resclip {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", action=_LazySubParsers)
    assert isinstance(sub, _LazySubParsers)
    for info in COMMANDS:
        p = sub.add_parser(info.name, help=info.help, description=info.help)
        if full:
            populate(p, info)
        else:
            sub._pending[info.name] = info
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 1 failure, 2 bad input, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    return run_command(args._run, args)


def run_command(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """``run(args)`` with the command line's conventions: library warnings as one
    ``resclip: warning:`` line each, bad input as one ``resclip: error:`` line and exit code 2,
    Ctrl-C as exit code 130."""
    try:
        with cli_warnings():  # every library warning is one "resclip: warning: ..." line on stderr
            return int(run(args))
    except KeyboardInterrupt:
        print("resclip: interrupted", file=sys.stderr)
        return 130
    except (UserError, ValueError, TypeError, FileNotFoundError, RuntimeError, OSError) as err:
        print(f"resclip: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
