"""`resclip sweep`: mIoU over a grid of lambda_rcs, lambda_sfr, RCS layers (paper Fig. 6, Table 4)..."""

from __future__ import annotations

import argparse
import ast
import io
import itertools
import sys
from pathlib import Path
from typing import Any

from ..dataset_specs import get_dataset_spec, list_datasets
from ..fileio import atomic_write, atomic_write_text
from .common import (
    UserError,
    add_data_arguments,
    add_model_arguments,
    check_run_args,
    evaluation_options,
    parse_overrides,
    segmenter_from_args,
)
from .eval_cmd import DATASET_DEFAULT

NAME = "sweep"
HELP = "evaluate a grid of lambda_rcs / lambda_sfr / RCS layers (writes a CSV and a plot)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True, help=f"benchmark: {', '.join(list_datasets())}")
    parser.add_argument("--root", required=True, help="the dataset's MMSegmentation folder")
    parser.add_argument(
        "--lambda-rcs", default=None, metavar="V,V,...", help="lambda_rcs values, e.g. 0.1,0.3,0.5"
    )
    parser.add_argument(
        "--lambda-sfr", default=None, metavar="V,V,...", help="lambda_sfr values, e.g. 0.5,0.7"
    )
    parser.add_argument(
        "--rcs-layers", default=None, metavar="L,L,...", help="RCS layer ranges (1-based), e.g. 6-9,1-9,2+4+6"
    )
    parser.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V,V,...",
        help="sweep any other setting, e.g. --grid tau_sfr=1.8,2.1 (repeatable)",
    )
    parser.add_argument(
        "--output", default=None, help="CSV (default: sweep-<dataset>.csv); the plot goes next to it as .png"
    )
    add_model_arguments(parser, default_preset=DATASET_DEFAULT)
    add_data_arguments(parser)


def parse_layer_range(text: str) -> tuple[int, ...]:
    """``"6-9"`` -> (6, 7, 8, 9); ``"2+4+6"`` -> (2, 4, 6); ``"5"`` -> (5,)."""
    try:
        if "-" in text:
            lo, hi = (int(x) for x in text.split("-", 1))
            if hi < lo:
                raise ValueError
            return tuple(range(lo, hi + 1))
        return tuple(int(x) for x in text.split("+"))
    except ValueError as err:
        raise UserError(f"--rcs-layers: {text!r} is not a layer range such as 6-9 or 2+4+6") from err


def _values(text: str, what: str) -> list[Any]:
    out: list[Any] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            raise UserError(f"{what}: empty value in {text!r}")
        try:
            out.append(ast.literal_eval(item))
        except (ValueError, SyntaxError):
            out.append(item)
    return out


def build_grid(args: argparse.Namespace) -> tuple[list[str], list[dict[str, Any]]]:
    """The swept keys and every grid point (a dict of overrides)."""
    axes: dict[str, list[Any]] = {}
    if args.lambda_rcs:
        axes["lambda_rcs"] = _values(args.lambda_rcs, "--lambda-rcs")
    if args.lambda_sfr:
        axes["lambda_sfr"] = _values(args.lambda_sfr, "--lambda-sfr")
    if args.rcs_layers:
        axes["rcs_layers"] = [parse_layer_range(t.strip()) for t in args.rcs_layers.split(",")]
    for item in args.grid:
        key, sep, raw = item.partition("=")
        if not sep:
            raise UserError(f"--grid expects KEY=V,V,..., got {item!r}")
        key = key.strip().replace("-", "_")
        axes[key] = _values(raw, f"--grid {key}")
        try:  # the key and each value's type
            parse_overrides([f"{key}={value}" for value in axes[key]])
        except UserError as err:
            raise UserError(str(err).replace("--set", "--grid", 1)) from None
    if not axes:
        raise UserError("nothing to sweep: give --lambda-rcs, --lambda-sfr, --rcs-layers or --grid")
    keys = list(axes)
    return keys, [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*axes.values())]


def _fmt(value: Any) -> str:
    if isinstance(value, tuple):
        return (
            f"{value[0]}-{value[-1]}"
            if value == tuple(range(value[0], value[-1] + 1))
            else "+".join(map(str, value))
        )
    return str(value)


def write_plot(keys: list[str], rows: list[dict[str, Any]], path: Path, title: str) -> bool:
    """Plot mIoU against the first swept key, one line per value of the others; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    x_key, rest = keys[0], keys[1:]
    fig, ax = plt.subplots(figsize=(6, 4))
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(", ".join(f"{k}={_fmt(r[k])}" for k in rest), []).append(r)
    for label, items in groups.items():
        xs = [_fmt(r[x_key]) for r in items]
        ax.plot(xs, [r["miou"] for r in items], marker="o", label=label or None)
    ax.set_xlabel(x_key)
    ax.set_ylabel("mIoU (%)")
    ax.set_title(title)
    if rest:
        ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=120, format="png")
    plt.close(fig)
    atomic_write(path, buffer.getvalue())
    return True


def run(args: argparse.Namespace) -> int:
    from ..datasets import list_samples  # torch-importing modules load here, so --help answers at once
    from ..eval import distributed, evaluate

    spec = get_dataset_spec(args.dataset)
    check_run_args(args)
    keys, points = build_grid(args)
    list_samples(spec, args.root, args.limit)  # fail on missing data before loading a model
    if args.preset == DATASET_DEFAULT:
        args.preset = spec.default_preset
    if args.rcs is False and {"lambda_rcs", "rcs_layers"} & set(keys):
        print(
            "resclip: warning: RCS is off (--no-rcs); lambda_rcs / rcs_layers change nothing", file=sys.stderr
        )
    if args.sfr is False and "lambda_sfr" in keys:
        print("resclip: warning: SFR is off (--no-sfr); lambda_sfr changes nothing", file=sys.stderr)
    out = Path(args.output or f"sweep-{spec.name}.csv")
    base = parse_overrides(args.overrides)
    rows: list[dict[str, Any]] = []
    with distributed(args.device) as (info, args.device):
        for i, point in enumerate(points, 1):
            if info.rank == 0:
                print(
                    f"[{i}/{len(points)}] " + ", ".join(f"{k}={_fmt(v)}" for k, v in point.items()),
                    file=sys.stderr,
                )
            try:
                seg = segmenter_from_args(args, overrides={**base, **point})
            except (ValueError, TypeError) as err:
                raise UserError(f"grid point {point}: {err}") from err
            result = evaluate(seg, spec.name, args.root, **evaluation_options(args, str(out)))
            m = result.metrics
            rows.append(
                {
                    **point,
                    "miou": result.miou,
                    "aacc": m.aacc * 100,
                    "macc": m.macc * 100,
                    "num_images": result.num_images,
                }
            )
            if info.rank == 0:
                _write_csv(keys, rows, out)
    if info.rank == 0:
        _report(keys, rows, out, f"{spec.title}: {args.method} (preset {args.preset})")
    return 0


def _write_csv(keys: list[str], rows: list[dict[str, Any]], out: Path) -> None:
    lines = [",".join([*keys, "miou", "aacc", "macc", "num_images"])]
    for r in rows:
        vals = [_fmt(r[k]) for k in keys] + [f"{r['miou']:.4f}", f"{r['aacc']:.4f}", f"{r['macc']:.4f}"]
        lines.append(",".join([*vals, str(r["num_images"])]))
    atomic_write_text(out, "\n".join(lines) + "\n")


def _report(keys: list[str], rows: list[dict[str, Any]], out: Path, title: str) -> None:
    width = max(len(k) for k in keys) + 2
    print("  ".join(f"{k:>{width}}" for k in [*keys, "mIoU"]))
    for r in rows:
        print("  ".join([*(f"{_fmt(r[k]):>{width}}" for k in keys), f"{r['miou']:>{width}.2f}"]))
    best = max(rows, key=lambda r: r["miou"])
    print("best: " + ", ".join(f"{k}={_fmt(best[k])}" for k in keys) + f" -> mIoU {best['miou']:.2f}")
    plot = out.with_suffix(".png")
    if write_plot(keys, rows, plot, title):
        print(f"wrote {out}, {plot}")
    else:
        print(f"wrote {out}; matplotlib is not installed, so no plot (pip install matplotlib)")
