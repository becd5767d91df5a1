"""The ResCLIP paper's result tables (mIoU %), as data, with each row mapped to a runnable setting.

Transcribed from the paper (CVPR 2025; Tables 1-4 and supplementary A1, A2). A row maps to
``(method, rcs, sfr, backbone, preset family, rcs layers)``; rows of trained or other methods have
``method=None`` and are listed but not run. Baseline rows of Tables 1/2/A1 are copied in the paper from
the baselines' own papers, so they run under the baseline repository's protocol (``sclip/<ds>``,
``clearclip/<ds>``; NACLIP's numbers are its no-PAMR ones = the ResCLIP release protocol); every
+ResCLIP and ablation row runs the released ResCLIP config of the dataset (preset ``<ds>``).
"""

from __future__ import annotations

from dataclasses import dataclass

from .datasets import DATASETS

# the paper groups the benchmarks by whether class 0 is a background class (Tables 1 and 2)
NO_BG = tuple(name for name, spec in DATASETS.items() if not spec.background)
WITH_BG = tuple(name for name, spec in DATASETS.items() if spec.background)

# backbone label -> (open_clip architecture, weights tag)
BACKBONES: dict[str, tuple[str, str]] = {
    "B/16": ("ViT-B-16", "openai"),
    "B/32": ("ViT-B-32", "openai"),
    "L/14": ("ViT-L-14", "openai"),
    "OpenCLIP B/16": ("ViT-B-16", "laion2b_s34b_b88k"),
}


@dataclass(frozen=True)
class Column:
    """A table column: the mean mIoU over ``datasets`` (one dataset for plain columns).

    Attributes:
        label: header as printed.
        datasets: benchmarks averaged.
        backbone: backbone of this column (Table A1), else the row's.
    """

    label: str
    datasets: tuple[str, ...]
    backbone: str | None = None


@dataclass(frozen=True)
class Row:
    """A table row and how to run it.

    Attributes:
        label: method as printed.
        backbone: key of :data:`BACKBONES` (or a trained model's encoder, e.g. ``"S/16"``).
        paper: the printed numbers, one per column (None = "-").
        method: base attention (:func:`resclip.list_methods`), None if not implemented here.
        rcs: RCS on.
        sfr: SFR on.
        family: preset family (``"resclip"`` = the dataset's released ResCLIP preset, or ``"sclip"``,
            ``"clearclip"``, ``"naclip"``, ``"paper"``).
        rcs_layers: RCS layers (1-based) if not the preset's.
    """

    label: str
    backbone: str  # for Table A1 the columns name the backbone
    paper: tuple[float | None, ...]
    method: str | None = None
    rcs: bool = False
    sfr: bool = False
    family: str = "resclip"
    rcs_layers: tuple[int, ...] | None = None

    def preset(self, dataset: str) -> str:
        """Preset name for ``dataset``."""
        return dataset if self.family == "resclip" else f"{self.family}/{dataset}"


@dataclass(frozen=True)
class PaperTable:
    """One table of the paper."""

    id: str
    title: str
    columns: tuple[Column, ...]
    rows: tuple[Row, ...]


def _cols(names: tuple[str, ...], datasets: tuple[str, ...], avg: str | None = "Avg") -> tuple[Column, ...]:
    cols = [Column(n, (d,)) for n, d in zip(names, datasets, strict=True)]
    return (*cols, Column(avg, datasets)) if avg else tuple(cols)


# printed base name -> (method, preset family of its baseline row)
_FAMILY = {
    "SCLIP": ("sclip", "sclip"),
    "ClearCLIP": ("clearclip", "clearclip"),
    "NACLIP": ("naclip", "resclip"),
}
_NOT_OURS = (
    "GroupViT",
    "CoCu",
    "TCL",
    "ReCo",
    "CLIPSurgery",
    "SegCLIP",
    "OVSegmentor",
    "PGSeg",
    "ViewCo",
    "GEM",
)
_Spec = list[tuple[str, str, list[float | None]]]


def _rows(spec: _Spec, baseline_family: bool = True) -> tuple[Row, ...]:
    """Rows from ``(label, backbone, values)``; "+ResCLIP" applies to the base of the row above."""
    rows: list[Row] = []
    base = ""
    for label, bb, values in spec:
        vals = tuple(values)
        if label == "+ResCLIP":
            method = _FAMILY[base][0]
            rows.append(Row(f"{base}+ResCLIP", bb, vals, method, True, True))
        elif label in _FAMILY:
            base = label
            method, family = _FAMILY[label]
            rows.append(Row(label, bb, vals, method, family=family if baseline_family else "resclip"))
        elif label in ("CLIP", "MaskCLIP", "OpenCLIP"):
            rows.append(Row(label, bb, vals, "maskclip" if label == "MaskCLIP" else "clip"))
        elif label.split(" ")[0] in _NOT_OURS:
            rows.append(Row(label, bb, vals))
        else:  # pragma: no cover - data error
            raise ValueError(f"unmapped row {label!r}")
    return tuple(rows)


_T1: _Spec = [
    ("GroupViT (trained)", "S/16", [79.7, 23.4, 15.3, 11.1, 9.2, 27.7]),
    ("CoCu (trained)", "S/16", [None, None, 13.6, 15.0, 11.1, None]),
    ("TCL (trained)", "B/16", [77.5, 30.3, 19.6, 23.1, 14.9, 33.1]),
    ("CLIP", "B/16", [41.8, 9.2, 4.4, 5.5, 2.1, 12.6]),
    ("MaskCLIP", "B/16", [74.9, 26.4, 16.4, 12.6, 9.8, 28.0]),
    ("ReCo", "B/16", [57.7, 22.3, 14.8, 21.1, 11.2, 25.4]),
    ("CLIPSurgery", "B/16", [None, None, 21.9, 31.4, None, None]),
    ("SCLIP", "B/16", [80.4, 34.2, 22.4, 32.2, 16.1, 37.1]),
    ("+ResCLIP", "B/16", [84.6, 35.8, 23.9, 34.4, 17.6, 39.3]),
    ("ClearCLIP", "B/16", [80.9, 35.9, 23.9, 30.0, 16.7, 37.5]),
    ("+ResCLIP", "B/16", [87.1, 36.4, 24.3, 34.5, 17.8, 40.0]),
    ("NACLIP", "B/16", [79.7, 35.2, 23.3, 35.5, 17.4, 38.2]),
    ("+ResCLIP", "B/16", [86.0, 36.8, 24.7, 35.9, 18.0, 40.3]),
    ("CLIP", "L/14", [15.8, 4.5, 2.4, 2.9, 1.2, 5.4]),
    ("MaskCLIP", "L/14", [30.1, 12.6, 8.9, 10.1, 6.9, 13.7]),
    ("SCLIP", "L/14", [60.3, 20.5, 13.1, 17.0, 7.1, 23.6]),
    ("+ResCLIP", "L/14", [83.9, 30.6, 21.2, 32.2, 15.8, 36.7]),
    ("ClearCLIP", "L/14", [80.0, 29.6, 19.9, 27.9, 15.0, 34.5]),
    ("+ResCLIP", "L/14", [84.2, 33.4, 22.3, 34.1, 17.9, 38.4]),
    ("NACLIP", "L/14", [78.7, 32.1, 21.4, 31.4, 17.3, 36.2]),
    ("+ResCLIP", "L/14", [85.5, 34.5, 23.4, 33.7, 18.2, 39.1]),
]

_T2: _Spec = [
    ("GroupViT", "S/16", [50.4, 18.7, 27.5, 32.2]),
    ("SegCLIP", "S/16", [52.6, 24.7, 26.5, 34.6]),
    ("OVSegmentor", "B/16", [53.8, 20.4, 25.1, 33.1]),
    ("PGSeg", "S/16", [53.2, 23.8, 28.7, 35.2]),
    ("ViewCo", "S/16", [52.4, 23.0, 23.5, 33.0]),
    ("CoCu", "S/16", [40.9, 21.2, 20.3, 27.5]),
    ("TCL", "B/16", [51.2, 24.3, 30.4, 35.3]),
    ("CLIP", "B/16", [16.2, 7.7, 5.5, 9.8]),
    ("MaskCLIP", "B/16", [38.8, 23.6, 20.6, 27.7]),
    ("ReCo", "B/16", [25.1, 19.9, 15.7, 20.2]),
    ("CLIPSurgery", "B/16", [None, 29.3, None, None]),
    ("GEM", "B/16", [46.2, 32.6, None, None]),
    ("SCLIP", "B/16", [59.1, 30.4, 30.5, 40.0]),
    ("+ResCLIP", "B/16", [60.7, 32.9, 34.3, 42.7]),
    ("ClearCLIP", "B/16", [51.8, 32.6, 33.0, 39.1]),
    ("+ResCLIP", "B/16", [59.0, 32.9, 34.0, 42.0]),
    ("NACLIP", "B/16", [58.9, 32.2, 33.2, 41.4]),
    ("+ResCLIP", "B/16", [61.1, 33.5, 35.0, 43.2]),
    ("SCLIP", "L/14", [44.4, 22.3, 24.9, 30.5]),
    ("+ResCLIP", "L/14", [52.8, 28.7, 30.9, 37.4]),
    ("ClearCLIP", "L/14", [48.7, 28.3, 29.7, 35.5]),
    ("+ResCLIP", "L/14", [50.7, 29.8, 31.1, 37.2]),
    ("NACLIP", "L/14", [52.2, 28.7, 29.9, 36.9]),
    ("+ResCLIP", "L/14", [54.1, 30.9, 32.5, 39.2]),
]

_A2: _Spec = [
    ("OpenCLIP", "OpenCLIP B/16", [47.2, 9.0, 5.0, 5.1, 2.9, 13.84]),
    ("SCLIP", "OpenCLIP B/16", [66.6, 31.7, 21.2, 31.4, 18.5, 33.9]),
    ("+ResCLIP", "OpenCLIP B/16", [71.8, 32.9, 21.9, 31.9, 18.8, 35.5]),
    ("ClearCLIP", "OpenCLIP B/16", [81.4, 34.1, 23.1, 31.8, 18.9, 37.9]),
    ("+ResCLIP", "OpenCLIP B/16", [83.3, 34.3, 23.1, 32.3, 19.1, 38.4]),
    ("NACLIP", "OpenCLIP B/16", [76.2, 30.3, 20.3, 32.3, 17.6, 35.3]),
    ("+ResCLIP", "OpenCLIP B/16", [82.5, 33.0, 22.2, 32.9, 19.0, 37.9]),
]

# Table A1: (base, rcs, sfr) -> B/16 (w/o, w/, all), B/32 (...), L/14 (...)
_A1 = [
    ("sclip", False, False, [37.1, 40.0, 38.2, 32.1, 36.2, 33.6, 23.6, 30.5, 26.2]),
    ("sclip", True, False, [38.8, 42.4, 40.2, 34.6, 36.9, 35.4, 36.6, 36.9, 36.7]),
    ("sclip", False, True, [37.9, 42.0, 39.4, 32.2, 36.4, 33.8, 28.9, 30.5, 29.5]),
    ("sclip", True, True, [39.3, 42.7, 40.5, 34.8, 37.1, 35.7, 36.7, 37.4, 37.0]),
    ("clearclip", False, False, [37.5, 39.1, 38.1, 34.8, 35.6, 35.1, 34.5, 35.5, 34.9]),
    ("clearclip", True, False, [39.7, 41.6, 40.4, 35.3, 35.7, 35.4, 38.3, 36.7, 37.7]),
    ("clearclip", False, True, [39.4, 41.7, 40.2, 35.1, 35.8, 35.3, 37.0, 36.2, 36.7]),
    ("clearclip", True, True, [40.0, 42.0, 40.7, 35.5, 35.9, 35.6, 38.4, 37.2, 37.9]),
    ("naclip", False, False, [38.2, 41.4, 39.4, 34.4, 37.0, 35.4, 36.2, 36.9, 36.5]),
    ("naclip", True, False, [39.7, 42.2, 40.6, 35.7, 37.3, 36.3, 38.4, 38.2, 38.3]),
    ("naclip", False, True, [39.3, 42.9, 40.7, 35.7, 37.4, 36.3, 37.4, 38.4, 37.8]),
    ("naclip", True, True, [40.3, 43.2, 41.4, 36.2, 37.5, 36.7, 39.1, 39.2, 39.1]),
]

_NAMES = {"sclip": "SCLIP", "clearclip": "ClearCLIP", "naclip": "NACLIP"}


def _a1_rows() -> tuple[Row, ...]:
    rows = []
    for base, rcs, sfr, values in _A1:
        mods = "+".join(m for m, on in (("RCS", rcs), ("SFR", sfr)) if on) or "baseline"
        family = ("resclip" if base == "naclip" else base) if not (rcs or sfr) else "resclip"
        rows.append(Row(f"{_NAMES[base]} {mods}", "B/16, B/32, L/14", tuple(values), base, rcs, sfr, family))
    return tuple(rows)


def _a1_columns() -> tuple[Column, ...]:
    cols = []
    for bb in ("B/16", "B/32", "L/14"):
        cols += [
            Column(f"{bb} w/o", NO_BG, bb),
            Column(f"{bb} w/", WITH_BG, bb),
            Column(f"{bb} all", NO_BG + WITH_BG, bb),
        ]
    return tuple(cols)


_T4 = [
    ("cumulative 1->1", (1,), 81.1, 34.0),
    ("cumulative 1->3", (1, 2, 3), 82.6, 34.8),
    ("cumulative 1->5", (1, 2, 3, 4, 5), 84.1, 34.8),
    ("cumulative 1->7", (1, 2, 3, 4, 5, 6, 7), 84.8, 34.9),
    ("cumulative 1->9", (1, 2, 3, 4, 5, 6, 7, 8, 9), 85.5, 35.0),
    ("sliding 2->5", (2, 3, 4, 5), 84.2, 34.8),
    ("sliding 4->7", (4, 5, 6, 7), 85.0, 34.7),
    ("sliding 6->9", (6, 7, 8, 9), 86.0, 35.0),
    ("sliding 8->11", (8, 9, 10, 11), 85.8, 34.8),
]

_NO_BG_NAMES = ("VOC20", "C59", "Stuff", "City", "ADE")
_T3 = tuple(
    Row(f"NACLIP{' +RCS' if r else ''}{' +SFR' if s else ''}", "B/16", (v,), "naclip", r, s)
    for r, s, v in ((False, False, 79.7), (True, False, 85.5), (False, True, 81.5), (True, True, 86.0))
)

TABLES: dict[str, PaperTable] = {
    "1": PaperTable("1", "Datasets without background (mIoU %)", _cols(_NO_BG_NAMES, NO_BG), _rows(_T1)),
    "2": PaperTable(
        "2", "Datasets with background (mIoU %)", _cols(("VOC21", "C60", "Object"), WITH_BG), _rows(_T2)
    ),
    "3": PaperTable(
        "3", "Ablation of RCS and SFR (NACLIP, ViT-B/16, VOC20)", (Column("VOC20", ("voc20",)),), _T3
    ),
    "4": PaperTable(
        "4",
        "Layer fusion in RCS (NACLIP+ResCLIP, ViT-B/16)",
        _cols(("VOC20", "Object"), ("voc20", "coco_object"), avg=None),
        tuple(
            Row(label, "B/16", (a, b), "naclip", True, True, rcs_layers=layers) for label, layers, a, b in _T4
        ),
    ),
    "A1": PaperTable(
        "A1", "Module ablation across backbones (averages of mIoU %)", _a1_columns(), _a1_rows()
    ),
    "A2": PaperTable(
        "A2",
        "OpenCLIP ViT-B/16, datasets without background (mIoU %)",
        _cols(_NO_BG_NAMES, NO_BG),
        _rows(_A2, baseline_family=False),
    ),
}


def get_table(table_id: str) -> PaperTable:
    """Look up a table by id (``"1"``, ``"2"``, ``"3"``, ``"4"``, ``"A1"``, ``"A2"``; case-insensitive)."""
    key = str(table_id).strip().upper().removeprefix("TABLE").strip()
    if key not in TABLES:
        raise ValueError(f"unknown table {table_id!r}; valid: {', '.join(TABLES)}")
    return TABLES[key]
