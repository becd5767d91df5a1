"""The command line answers without importing torch / open_clip (issue 14): --help, list, argument
errors, --version and ``python -m resclip``. No timing assertions: what is imported is checked."""

from __future__ import annotations

import subprocess
import sys

import pytest

from resclip import __version__
from resclip.commands import COMMANDS, load_command
from resclip.commands.list_cmd import METHODS, PRESETS, live_lists

HEAVY = ("torch", "open_clip", "torchvision")


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                          timeout=120)


def _heavy_after(code: str) -> list[str]:
    done = _run(code + "\nimport sys\nprint(' '.join(m for m in " + repr(HEAVY) + " if m in sys.modules))")
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_building_the_parser_imports_no_torch():
    assert _heavy_after("import resclip.cli\nresclip.cli.build_parser()") == []


@pytest.mark.parametrize("argv", [
    ["--help"], ["--version"], ["list", "methods"], ["list", "presets"],
    *[[info.name, "--help"] for info in COMMANDS],
    ["segment", "x.jpg"],  # argument error: --out and --classes missing
    ["list", "nothing"],
])
def test_commands_that_need_no_model_import_no_torch(argv):
    code = ("import contextlib, io, resclip.cli\n"
            "with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
            "    try:\n"
            f"        resclip.cli.main({argv!r})\n"
            "    except SystemExit:\n"
            "        pass")
    assert _heavy_after(code) == []


def test_version_and_python_m():
    done = subprocess.run([sys.executable, "-m", "resclip", "--version"], capture_output=True, text=True,
                          check=False, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == f"resclip {__version__}"
    done = subprocess.run([sys.executable, "-m", "resclip", "list", "methods"], capture_output=True,
                          text=True, check=False, timeout=120)
    assert done.returncode == 0 and "naclip" in done.stdout


def test_command_table_matches_the_modules():
    for info in COMMANDS:
        mod = load_command(info)
        assert (info.name, info.help) == (mod.NAME, mod.HELP)


def test_list_snapshot_matches_the_registries():
    """`resclip list` prints a snapshot; regenerate it with `python -m resclip.commands.list_cmd`."""
    assert live_lists() == (METHODS, PRESETS)


def test_lazy_package_attributes():
    import resclip

    assert resclip.create_segmenter.__name__ == "create_segmenter"
    assert set(resclip.__all__) <= set(dir(resclip))
    with pytest.raises(AttributeError):
        _ = resclip.no_such_name  # type: ignore[attr-defined]


def test_full_parser_has_every_command():
    from resclip.cli import build_parser

    args = build_parser(full=True).parse_args(["list", "methods"])
    assert args.what == "methods" and callable(args._run)
