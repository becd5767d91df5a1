"""Sub-commands of the ``resclip`` command line; each module has NAME, HELP, add_arguments, run.

``resclip --help`` must answer without torch: the command names and one-line helps are listed
here, and a command's module (and whatever it imports) is loaded only when that command is used.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import NamedTuple


class CommandInfo(NamedTuple):
    """A sub-command as ``resclip --help`` lists it (kept equal to the module's NAME and HELP by a test)."""

    name: str
    module: str
    help: str


# in the order `resclip --help` lists them
COMMANDS = (
    CommandInfo("segment", "segment",
                "segment images with your own class names; writes a mask PNG, an overlay and a JSON "
                "per image"),
    CommandInfo("compare", "compare",
                "segment images with several methods and save the masks side by side (paper Fig. 5)"),
    CommandInfo("attention", "attention",
                "show the attention of one image patch across layers and methods (paper Fig. 1 / Fig. 3)"),
    CommandInfo("label", "label",
                "label a whole image collection (folder, list, WebDataset tars, Parquet) into sharded "
                "Parquet files"),
    CommandInfo("eval", "eval_cmd", "evaluate on a benchmark (mIoU as the papers compute it)"),
    CommandInfo("reproduce", "reproduce",
                "rerun a table of the paper and print our numbers beside the paper's"),
    CommandInfo("sweep", "sweep",
                "evaluate a grid of lambda_rcs / lambda_sfr / RCS layers (writes a CSV and a plot)"),
    CommandInfo("demo", "demo_cmd",
                "serve the web demo (needs the optional 'demo' extra: pip install 'resclip[demo]')"),
    CommandInfo("list", "list_cmd", "list the methods or presets"),
)


def load_command(info: CommandInfo) -> ModuleType:
    """Import one command's module (this is where torch and open_clip may get imported)."""
    return importlib.import_module(f"{__name__}.{info.module}")


def load_commands() -> list[ModuleType]:
    """Import every available command module (missing optional ones are skipped)."""
    found = []
    for info in COMMANDS:
        try:
            found.append(load_command(info))
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{info.module}":
                raise
    return found
