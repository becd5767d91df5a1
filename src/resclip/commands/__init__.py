"""Sub-commands of the ``resclip`` command line; each module has NAME, HELP, add_arguments, run."""

from __future__ import annotations

import importlib
from types import ModuleType

# module names under resclip.commands, in the order `resclip --help` lists them
_MODULES = ("segment", "compare", "attention", "eval_cmd", "reproduce", "sweep", "demo_cmd", "list_cmd")


def load_commands() -> list[ModuleType]:
    """Import every available command module (missing optional ones are skipped)."""
    found = []
    for name in _MODULES:
        try:
            found.append(importlib.import_module(f"{__name__}.{name}"))
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
    return found
