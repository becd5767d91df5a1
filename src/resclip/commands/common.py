"""What the commands share: model and run options, warnings as one line each, evaluation options."""

from __future__ import annotations

import argparse
import ast
import contextlib
import sys
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from ..fileio import atomic_write
from .list_cmd import METHOD_NAMES

if TYPE_CHECKING:  # the CLI parser is built without torch: heavy modules are imported when used
    from ..segmenter import Segmenter

METHOD_ALIAS = "resclip"  # = naclip + RCS + SFR (resclip.factory.METHOD_ALIAS)


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit code 2."""


def add_model_arguments(parser: argparse.ArgumentParser, *, default_preset: str = "default") -> None:
    """Add --method, --rcs/--no-rcs, --sfr/--no-sfr, --preset, --model, --pretrained, --device,
    --precision, --fidelity and repeated --set KEY=VALUE."""
    g = parser.add_argument_group("model and method")
    g.add_argument(
        "--method",
        default="naclip",
        choices=[*METHOD_NAMES, METHOD_ALIAS],
        help="base attention (default: naclip); 'resclip' is naclip with RCS and SFR",
    )
    g.add_argument(
        "--rcs", action=argparse.BooleanOptionalAction, default=None,
        help="apply RCS (default: on wherever it can act; off for a preset with its own image pipeline)"
    )
    g.add_argument(
        "--sfr", action=argparse.BooleanOptionalAction, default=None,
        help="apply SFR (default: on wherever it can act, as --rcs; off for MaskCLIP)"
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
    g.add_argument(
        "--fidelity",
        default=None,
        choices=["official", "paper"],
        help="released-code or paper equations (default: the preset's)",
    )
    add_runtime_arguments(g)


SET_HELP = "override a setting, e.g. --set prob_thd=0.2 --set lambda_rcs=0.5 (repeatable)"


def add_runtime_arguments(group: Any, set_help: str = SET_HELP) -> None:
    """Add --device, --precision, --window-batch, repeated --set KEY=VALUE and repeated
    --aux-pretrained KIND=SOURCE to an argument group."""
    group.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps or auto (default: auto)")
    group.add_argument(
        "--precision", default="fp32", choices=["fp32", "fp16", "bf16"], help="(default: fp32)"
    )
    group.add_argument(
        "--window-batch", type=int, default=8, help="sliding windows per forward pass (default: 8)"
    )
    group.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=set_help
    )
    group.add_argument(
        "--aux-pretrained",
        dest="aux_pretrained",
        action="append",
        default=[],
        metavar="KIND=SOURCE",
        help="an auxiliary model for the methods that read one (kinds: dino, sam, mae), e.g. "
        "--aux-pretrained dino=dino_vitb8_pretrain.pth for proxyclip (repeatable)",
    )


def parse_aux_pretrained(items: list[str]) -> dict[str, str]:
    """``KIND=SOURCE`` strings (``--aux-pretrained``) as ``{kind: source}``.

    Raises:
        UserError: not ``KIND=SOURCE``, an unknown kind, or a kind given twice.
    """
    from ..auxiliary import AUX_KINDS

    out: dict[str, str] = {}
    for item in items:
        kind, sep, source = item.partition("=")
        kind, source = kind.strip().lower(), source.strip()
        if not sep or not kind or not source:
            raise UserError(f"--aux-pretrained expects KIND=SOURCE (e.g. dino=PATH), got {item!r}")
        if kind not in AUX_KINDS:
            raise UserError(f"--aux-pretrained: unknown kind {kind!r}; known kinds: {', '.join(AUX_KINDS)}")
        if kind in out:
            raise UserError(f"--aux-pretrained {kind}= is given twice")
        out[kind] = source
    return out


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Parse ``KEY=VALUE`` strings; values are Python literals (numbers, tuples, None) or strings."""
    from ..factory import apply_overrides, split_method_overrides, unknown_setting_message, valid_overrides
    from ..presets import get_preset

    out: dict[str, Any] = {}
    valid = set(valid_overrides())
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise UserError(f"--set expects KEY=VALUE, got {item!r}")
        if key not in valid:
            raise UserError(f"--set {unknown_setting_message(key)}")
        try:
            out[key] = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            out[key] = raw.strip()
    try:  # check every value's type now, with its key named, before any model is loaded
        settings, _ = split_method_overrides(out)
        apply_overrides(get_preset("default"), settings)
    except TypeError as err:
        raise UserError(f"--set {err}") from err
    except ValueError:
        pass  # a combination the chosen preset may accept: create_segmenter checks it
    return out


def segmenter_from_args(args: argparse.Namespace, overrides: dict[str, Any] | None = None) -> Segmenter:
    """Build the segmenter described by :func:`add_model_arguments` options.

    Args:
        overrides: settings that replace ``--set`` ones (e.g. one point of a sweep).
    """
    from ..clip import resolve_device
    from ..factory import create_segmenter

    pretrained = None if str(args.pretrained).lower() == "none" else args.pretrained
    warn_precision(resolve_device(args.device).type, args.precision)
    rcs, sfr = args.rcs, args.sfr
    if args.method == METHOD_ALIAS and (rcs is False or sfr is False):
        raise UserError("--method resclip is naclip with RCS and SFR; "
                        "use --method naclip with --no-rcs / --no-sfr instead")
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
        aux_pretrained=parse_aux_pretrained(args.aux_pretrained),
        **{**parse_overrides(args.overrides), **(overrides or {})},
    )


def warn_precision(device_type: str, precision: str) -> None:
    """Warn that fp16 / bf16 on the CPU is slower than fp32 (about 3x for fp16), not faster."""
    if device_type == "cpu" and precision != "fp32":
        warnings.warn(
            f"--precision {precision} on the CPU is slower than fp32 (fp16 about 3x), not faster; "
            "half precision pays off on a GPU only",
            stacklevel=2,
        )


@contextlib.contextmanager
def cli_warnings(stream: TextIO | None = None) -> Iterator[None]:
    """Show Python warnings as one ``resclip: warning: ...`` line each (no file/line noise)."""

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
             file: TextIO | None = None, line: str | None = None) -> None:
        print(f"resclip: warning: {message}", file=stream or sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


# ------------------------------------------------------------------ evaluation runs (eval, sweep, reproduce)


def add_regions_argument(parser: argparse.ArgumentParser, key: str = "image stem") -> None:
    """--regions DIR: each image's instance map from a folder (CorrCLIP's pre-generated masks), named
    by ``key`` (the image file's stem, or the labelling id)."""
    parser.add_argument(
        "--regions", default=None, metavar="DIR",
        help=f"instance maps, one <{key}>.npz (key instance_mask, as CorrCLIP's pre-generated "
        "region_masks), .npy or 1-channel .png per image at its size, for a method that reads regions "
        "(corrclip, region_vote); corrclip then needs no SAM 2 (its <method>_masks becomes 'given')",
    )


def regions_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """With --regions, a method that makes its own instance maps (a ``masks`` field: CorrCLIP) reads
    the given ones instead, unless --set names that field."""
    from ..factory import given_regions_settings

    if not getattr(args, "regions", None):
        return {}
    return given_regions_settings(args.method, parse_overrides(args.overrides))


def check_regions(args: argparse.Namespace, names: list[str] | None = None) -> None:
    """Before any model loads: refuse --regions for a method that reads no regions, a missing folder
    or (with ``names``) images without a map; ``args.regions`` becomes the resolved folder.

    Raises:
        UserError: one line naming the problem and the fix.
    """
    from ..factory import reads_regions
    from ..regions import RegionsError, check_folder, resolve_dir, unused_message

    if not getattr(args, "regions", None):
        return
    settings = {**parse_overrides(args.overrides), **regions_overrides(args)}
    try:
        reads = reads_regions(args.method, args.preset, args.fidelity, **settings)
    except (ValueError, TypeError):
        reads = True  # a bad setting: create_segmenter names it in its own words
    if not reads:
        raise UserError(unused_message(args.method, args.regions))
    try:
        folder = check_folder(args.regions, names) if names is not None else resolve_dir(args.regions)
        args.regions = str(folder)
    except RegionsError as err:
        raise UserError(str(err)) from None


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """--limit, --workers, --state-dir, --fresh, --save-every, --no-progress."""
    g = parser.add_argument_group("run")
    g.add_argument("--limit", type=int, default=None, metavar="N", help="score only the first N images")
    g.add_argument("--workers", type=int, default=2, help="image-decoding worker processes (default: 2)")
    g.add_argument(
        "--state-dir",
        default=None,
        help="where progress is kept for resuming (default: "
        "<output folder>/.resclip-state, or <cache folder>/eval without --output)",
    )
    g.add_argument("--fresh", action="store_true", help="ignore and replace saved progress")
    g.add_argument("--save-every", type=int, default=50, metavar="N", help="save progress every N images")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def check_run_args(args: argparse.Namespace) -> None:
    """Reject bad --limit / --workers / --save-every values."""
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be >= 1, got {args.limit}")
    if args.workers < 0:
        raise UserError(f"--workers must be >= 0, got {args.workers}")
    if args.save_every < 1:
        raise UserError(f"--save-every must be >= 1, got {args.save_every}")


def state_dir_for(args: argparse.Namespace, output: str | None) -> str | None:
    """--state-dir, else ``<output folder>/.resclip-state``, else None (the cache folder)."""
    if args.state_dir:
        return str(args.state_dir)
    if output:
        return str(Path(output).expanduser().resolve().parent / ".resclip-state")
    return None


def evaluation_options(args: argparse.Namespace, output: str | None) -> dict[str, Any]:
    """The keyword arguments of :func:`resclip.eval.evaluate` set by :func:`add_data_arguments`
    options (and ``--class-file`` / ``--save-predictions`` where the command has them).

    Args:
        output: the command's results file; progress is kept next to it unless --state-dir.
    """
    return {
        "limit": args.limit,
        "class_file": getattr(args, "class_file", None),
        "workers": args.workers,
        "save_predictions": getattr(args, "save_predictions", None),
        "state_dir": state_dir_for(args, output),
        "resume": not args.fresh,
        "save_every": args.save_every,
        "progress": args.progress,
        "release_text_tower": True,  # a command's segmenter serves one class list
        "regions_dir": getattr(args, "regions", None),
    }


def check_writable(folder: str | Path, what: str) -> None:
    """Fail before any work if ``folder`` (created if needed) cannot take a new file.

    Raises:
        UserError: naming the folder and the reason.
    """
    probe = Path(folder).expanduser() / f".resclip-probe-{uuid.uuid4().hex[:8]}"
    try:
        atomic_write(probe, b"")
        probe.unlink()
    except OSError as err:
        raise UserError(f"cannot write the {what} in {str(probe.parent)!r}: {err}") from err
