"""`resclip reproduce --table 1|2|3|4|A1|A2|sc_clip|sfp|pearl|cliper`: rerun a paper table (ResCLIP's, or
another method's main results), ours vs. printed, per cell."""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..dataset_specs import get_dataset_spec, list_datasets, root_names
from ..fileio import atomic_write_text
from ..paper_tables import BACKBONES, TABLES, Column, PaperTable, Row, get_table, table_ids
from .common import (
    UserError,
    add_data_arguments,
    add_runtime_arguments,
    check_run_args,
    evaluation_options,
    parse_aux_pretrained,
    parse_overrides,
)

if TYPE_CHECKING:  # torch-importing modules load when used, so --help answers at once
    from ..eval import DistInfo

NAME = "reproduce"
HELP = "rerun a table of the paper and print our numbers beside the paper's"

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--table", required=True, help=f"paper table: {', '.join(table_ids())}")
    parser.add_argument(
        "--data-root",
        default=None,
        help=f"folder holding the MMSegmentation folders ({', '.join(root_names())})",
    )
    for ds in list_datasets():
        parser.add_argument(
            f"--root-{ds.replace('_', '-')}",
            dest=f"root_{ds}",
            default=None,
            metavar="DIR",
            help=f"{ds} folder (overrides --data-root)",
        )
    parser.add_argument(
        "--weights",
        action="append",
        default=[],
        metavar="BACKBONE=FILE",
        help=f"local checkpoint for a backbone ({', '.join(BACKBONES)}); default: the open_clip tag",
    )
    parser.add_argument(
        "--rows",
        action="append",
        default=[],
        metavar="TEXT",
        help="run only rows whose label contains TEXT (case-insensitive; repeatable)",
    )
    parser.add_argument(
        "--output",
        default=None,
        help="summary JSON (default: reproduce-table<ID>.json; a .md "
        "goes next to it, per-run results in <name>_runs/)",
    )
    parser.add_argument(
        "--regions-root",
        default=None,
        metavar="DIR",
        help="CorrCLIP's pre-generated masks (region_masks.zip unpacked: voc/, context/, coco/, city/, "
        "ade/), for the rows that report them (--table corrclip, SAM2_32)",
    )
    parser.add_argument("--dry-run", action="store_true", help="show what would run and what is skipped")
    add_runtime_arguments(
        parser.add_argument_group("model"),
        set_help="override a setting in every row (quick checks only: changes the protocol)",
    )
    add_data_arguments(parser)


def resolve_roots(
    args: argparse.Namespace, needed: set[str], verbose: bool
) -> dict[str, tuple[Path | None, str]]:
    """Per benchmark: its folder and '' if usable, else None and a short reason (details on stderr)."""
    from ..datasets import list_samples

    out: dict[str, tuple[Path | None, str]] = {}
    for ds in list_datasets():
        flag = f"--root-{ds.replace('_', '-')}"
        explicit = getattr(args, f"root_{ds}", None)
        candidates = [Path(explicit)] if explicit else []
        if not explicit and args.data_root:
            candidates = [Path(args.data_root) / sub for sub in get_dataset_spec(ds).root_candidates]
        if not candidates:
            out[ds] = (None, f"no {ds} data (give --data-root or {flag})")
            continue
        detail = ""
        for cand in candidates:
            try:
                list_samples(get_dataset_spec(ds), cand, args.limit)
                out[ds] = (cand, "")
                break
            except (FileNotFoundError, ValueError) as err:
                detail = detail or str(err)
        else:
            out[ds] = (None, f"no {ds} data (give {flag} or see the message above)")
            if verbose and ds in needed:
                print(f"resclip: {ds} skipped: {detail}", file=sys.stderr)
    return out


def parse_weights(items: list[str]) -> dict[str, str]:
    """``BACKBONE=FILE`` items -> dict, each file's architecture checked against its label.

    A file whose tensor shapes are another known architecture than the label's (an L/14 label on a
    ViT-B/16 file) is refused, since its numbers would be printed as that backbone's; a file of no
    known architecture (a custom or reduced model) is accepted with a warning.
    """
    from ..clip import checkpoint_architecture

    out = {}
    for item in items:
        key, sep, path = item.partition("=")
        key = key.strip()
        if not sep or key not in BACKBONES:
            raise UserError(
                f"--weights expects BACKBONE=FILE with BACKBONE one of {', '.join(BACKBONES)}, got {item!r}"
            )
        if not Path(path).expanduser().is_file():
            raise UserError(f"--weights {key}: no such file {path!r}")
        try:
            found = checkpoint_architecture(path)
        except ValueError as err:
            raise UserError(f"--weights {key}: {err}") from err
        expected = BACKBONES[key][0]
        if found is None:
            print(f"resclip: warning: --weights {key}={path}: its shapes match no known architecture; "
                  f"its results are labelled {key} ({expected}) as you asked", file=sys.stderr)
        elif found != expected:
            labels = [b for b, (arch, _) in BACKBONES.items() if arch == found]
            hint = f"label it {labels[0]}" if labels else "give a file of that architecture"
            raise UserError(f"--weights {key}={path} holds a {found} checkpoint, not {expected}; "
                            f"give the {key} file or {hint}")
        out[key] = path
    return out


@dataclass
class Cell:
    """One table cell: our number (None if not run), the paper's, and why it was not run."""

    ours: float | None
    paper: float | None
    note: str = ""

    @property
    def diff(self) -> float | None:
        return None if self.ours is None or self.paper is None else self.ours - self.paper

    def text(self) -> str:
        paper = "-" if self.paper is None else f"{self.paper:g}"
        if self.ours is None:
            return f"– / {paper}"
        diff = "" if self.diff is None else f" ({self.diff:+.2f})"
        return f"{self.ours:.2f} / {paper}{diff}"


class Runner:
    """Evaluates (row, backbone, dataset) settings once each, remembering unavailable data and weights."""

    def __init__(
        self,
        args: argparse.Namespace,
        roots: dict[str, tuple[Path | None, str]],
        weights: dict[str, str],
        runs_dir: Path,
        info: DistInfo,
    ) -> None:
        self.args, self.roots, self.weights, self.runs_dir, self.info = args, roots, weights, runs_dir, info
        self.overrides = parse_overrides(args.overrides)
        self.memo: dict[tuple[Any, ...], tuple[float | None, str]] = {}
        self.bad_backbones: dict[str, str] = {}
        self.ran = 0

    def miou(self, row: Row, backbone: str, ds: str) -> tuple[float | None, str]:
        """Our mIoU (percent) of ``row`` on ``ds`` with ``backbone``, or None and the reason."""
        root, why = self.roots[ds]
        if root is None:
            return None, why
        if backbone not in BACKBONES:
            return None, f"backbone {backbone} not available in resclip"
        if backbone in self.bad_backbones:
            return None, self.bad_backbones[backbone]
        if row.regions:
            maps, why = self.regions_dir(ds)
            if maps is None:
                return None, why
        key = (row.method, row.rcs, row.sfr, row.family, row.rcs_layers, row.regions, backbone, ds)
        if key not in self.memo:
            self.memo[key] = (
                (None, "would run (dry run)") if self.args.dry_run else self._run(row, backbone, ds, root)
            )
        return self.memo[key]

    def regions_dir(self, ds: str) -> tuple[Path | None, str]:
        """The release's pre-generated instance maps of ``ds`` under ``--regions-root``, or None and why."""
        from ..corrclip import RELEASE_REGION_FOLDERS

        if self.args.regions_root is None:
            return None, ("needs the release's pre-generated masks: give --regions-root DIR "
                          "(CorrCLIP's region_masks.zip unpacked)")
        from ..datasets import get_dataset_spec, list_samples
        from ..regions import missing

        folder = Path(self.args.regions_root).expanduser() / RELEASE_REGION_FOLDERS[ds]
        if not folder.is_dir():
            return None, f"no instance maps for {ds} at {str(folder)!r}"
        root = self.roots[ds][0]
        if root is not None:  # a partly unpacked folder is this row's reason, not the table's end
            stems = [s.stem for s in list_samples(get_dataset_spec(ds), root, self.args.limit)]
            lacking = missing(folder, stems)
            if lacking:
                return None, (f"{len(lacking)} of {len(stems)} {ds} images have no instance map in "
                              f"{str(folder)!r} (first: {lacking[0]!r})")
        return folder, ""

    def _run(self, row: Row, backbone: str, ds: str, root: Path) -> tuple[float | None, str]:
        from ..eval import evaluate, write_results
        from ..factory import create_segmenter, method_field_owner

        arch, tag = BACKBONES[backbone]
        model, pretrained = (None, self.weights[backbone]) if backbone in self.weights else (arch, tag)
        # another method's own fields (--set proxyclip_beta=...) apply to that method's rows only
        overrides = {k: v for k, v in self.overrides.items()
                     if (owner := method_field_owner(k)) is None or owner[0] == row.method}
        if row.rcs_layers is not None:
            overrides["rcs_layers"] = row.rcs_layers
        assert row.method is not None
        options = evaluation_options(self.args, self.args.output)
        if row.regions:  # the given maps replace the method's own mask generator
            overrides[f"{row.method}_masks"] = "given"
            options["regions_dir"] = self.regions_dir(ds)[0]
        try:
            seg = create_segmenter(
                method=row.method,
                rcs=row.rcs,
                sfr=row.sfr,
                preset=row.preset(ds),
                model=model,
                pretrained=pretrained,
                device=self.args.device,
                precision=self.args.precision,
                window_batch=self.args.window_batch,
                aux_pretrained=parse_aux_pretrained(self.args.aux_pretrained),
                **overrides,
            )
        except (RuntimeError, OSError) as err:
            self.bad_backbones[backbone] = f"weights {backbone} ({arch}, {pretrained}) unavailable: {err}"
            return None, self.bad_backbones[backbone]
        except (ValueError, TypeError) as err:
            return None, f"cannot build this setting: {err}"
        result = evaluate(seg, ds, root, **options)
        if self.info.rank == 0:
            slug = re.sub(r"[^A-Za-z0-9_.+-]+", "_", f"{row.label}_{backbone}_{ds}")
            result.extra["paper_row"] = row.label
            write_results(result, self.runs_dir / f"{slug}.json")
        self.ran += 1
        return result.miou, ""


def fill_table(table: PaperTable, rows: list[Row], runner: Runner) -> list[list[Cell]]:
    """Evaluate every cell of ``rows`` (skipping what cannot run)."""
    grid = []
    for row in rows:
        cells = []
        for j, col in enumerate(table.columns):
            cells.append(_cell(row, col, row.paper[j], runner))
        grid.append(cells)
    return grid


def _cell(row: Row, col: Column, paper: float | None, runner: Runner) -> Cell:
    if row.method is None:
        return Cell(None, paper, row.not_run or "not implemented in resclip (trained or other method)")
    missing = [runner.roots[ds][1] for ds in col.datasets if runner.roots[ds][0] is None]
    if missing:  # never spend time on part of an average that cannot be completed
        return Cell(None, paper, missing[0])
    values = []
    for ds in col.datasets:
        value, why = runner.miou(row, col.backbone or row.backbone, ds)
        if value is None:
            return Cell(None, paper, why)
        values.append(value)
    return Cell(sum(values) / len(values), paper)


def markdown(table: PaperTable, rows: list[Row], grid: list[list[Cell]], limit: int | None) -> str:
    """The table as Markdown: ``ours / paper (difference)`` per cell, then the reasons for skipped cells."""
    head = ["method", "enc"] + [c.label for c in table.columns]
    lines = [
        f"## Table {table.id}: {table.title}",
        "",
        "Each cell: ours / paper (ours - paper)."
        + (f" Only the first {limit} images per dataset (not comparable to the paper)." if limit else ""),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for row, cells in zip(rows, grid, strict=True):
        lines.append(f"| {row.label} | {row.backbone} | " + " | ".join(c.text() for c in cells) + " |")
    notes = []
    for row, cells in zip(rows, grid, strict=True):
        reasons = sorted({c.note for c in cells if c.note})
        notes += [f"* {row.label} ({row.backbone}): {r}" for r in reasons]
    if notes:
        lines += ["", "Not run:", *notes]
    return "\n".join(lines) + "\n"


def summary_json(table: PaperTable, rows: list[Row], grid: list[list[Cell]], args: argparse.Namespace) -> str:
    """Machine-readable summary."""

    def num(x: float | None) -> float | None:
        return None if x is None or math.isnan(x) else round(x, 4)

    from ..eval import software_versions

    data = {
        "table": table.id,
        "title": table.title,
        "columns": [c.label for c in table.columns],
        "limit": args.limit,
        "rows": [
            {
                "label": r.label,
                "backbone": r.backbone,
                "method": r.method,
                "rcs": r.rcs,
                "sfr": r.sfr,
                "preset_family": r.family,
                "rcs_layers": r.rcs_layers,
                "cells": {
                    col.label: {"ours": num(c.ours), "paper": c.paper, "diff": num(c.diff), "note": c.note}
                    for col, c in zip(table.columns, cells, strict=True)
                },
            }
            for r, cells in zip(rows, grid, strict=True)
        ],
        "overrides": args.overrides,
        "versions": software_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return json.dumps(data, indent=1) + "\n"


def run(args: argparse.Namespace) -> int:
    from ..clip import resolve_device
    from ..eval import distributed

    try:
        table = get_table(args.table)
    except ValueError as err:
        raise UserError(str(err)) from err
    check_run_args(args)
    weights = parse_weights(args.weights)
    rows = [r for r in table.rows if not args.rows or any(t.lower() in r.label.lower() for t in args.rows)]
    if not rows:
        raise UserError(
            f"--rows {args.rows} matches no row of table {table.id}: {', '.join(r.label for r in table.rows)}"
        )
    args.output = args.output or (f"reproduce-table{table.id}.json" if table.id in TABLES
                                  else f"reproduce-{table.id}.json")
    out = Path(args.output)
    runs_dir = out.with_name(out.stem + "_runs")
    with distributed(args.device) as (info, args.device):
        if not args.dry_run:
            resolve_device(args.device)
        needed = {ds for col in table.columns for ds in col.datasets}
        runner = Runner(args, resolve_roots(args, needed, info.rank == 0), weights, runs_dir, info)
        grid = fill_table(table, rows, runner)
        if info.rank == 0:
            _write_summary(table, rows, grid, args, runs_dir)
    if not args.dry_run and runner.ran == 0:
        print("resclip: nothing could run (see 'Not run' above)", file=sys.stderr)
        return 1
    return 0


def _write_summary(
    table: PaperTable, rows: list[Row], grid: list[list[Cell]], args: argparse.Namespace, runs_dir: Path
) -> None:
    """Print the table; unless --dry-run, write its JSON summary and Markdown next to --output.

    Rows of an earlier run in the same --output (same table, --limit and --set) that this run did
    not redo are kept, so runs with different --rows add up to one table.
    """
    if not args.dry_run:
        rows, grid = merge_previous(Path(args.output), table, rows, grid, args)
    text = markdown(table, rows, grid, args.limit)
    print(text)
    if not args.dry_run:
        out = Path(args.output)
        atomic_write_text(out, summary_json(table, rows, grid, args))
        atomic_write_text(out.with_suffix(".md"), text)
        print(f"wrote {out}, {out.with_suffix('.md')} (per-run results in {runs_dir})")


def merge_previous(
    out: Path, table: PaperTable, rows: list[Row], grid: list[list[Cell]], args: argparse.Namespace
) -> tuple[list[Row], list[list[Cell]]]:
    """``rows`` and ``grid`` plus the rows of the summary already at ``out`` that this run did not
    redo, in the paper table's order. A summary of another table, ``--limit`` or ``--set`` is
    replaced (with a warning), an unreadable one too."""
    try:
        old = json.loads(out.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return rows, grid
    except (OSError, ValueError) as err:
        print(f"resclip: warning: {str(out)!r} is not a readable summary ({err}); replacing it",
              file=sys.stderr)
        return rows, grid
    if not isinstance(old, dict) or not isinstance(old.get("rows"), list):
        print(f"resclip: warning: {str(out)!r} is not a reproduce summary; replacing it", file=sys.stderr)
        return rows, grid
    same = {"table": table.id, "limit": args.limit, "overrides": list(args.overrides)}
    differ = [k for k, v in same.items() if old.get(k) != v]
    if differ:
        print(f"resclip: warning: {str(out)!r} holds a run with another {', '.join(differ)}; "
              "replacing it (give another --output to keep both)", file=sys.stderr)
        return rows, grid
    done = {(r.label, r.backbone): (r, cells) for r, cells in zip(rows, grid, strict=True)}
    previous: dict[tuple[str, str], list[Cell]] = {}
    for item in old["rows"]:
        if not isinstance(item, dict) or not isinstance(item.get("cells"), dict):
            continue
        cells = []
        for col in table.columns:
            c = item["cells"].get(col.label) or {}
            cells.append(Cell(c.get("ours"), c.get("paper"), c.get("note") or ""))
        previous[(str(item.get("label")), str(item.get("backbone")))] = cells
    merged_rows, merged_grid = [], []
    for row in table.rows:
        key = (row.label, row.backbone)
        if key in done:
            merged_rows.append(done[key][0])
            merged_grid.append(done[key][1])
        elif key in previous:
            merged_rows.append(row)
            merged_grid.append(previous[key])
    kept = len(merged_rows) - len(done)
    if kept:
        print(f"kept {kept} row{'s' if kept != 1 else ''} of the earlier run in {out}", file=sys.stderr)
    return merged_rows, merged_grid
