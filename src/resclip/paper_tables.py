"""The ResCLIP paper's result tables (mIoU %), as data, with each row mapped to a runnable setting.

Transcribed from the paper (CVPR 2025; Tables 1-4 and supplementary A1, A2). A row maps to
``(method, rcs, sfr, backbone, preset family, rcs layers)``; rows of trained or other methods have
``method=None`` and are listed but not run. Baseline rows of Tables 1/2/A1 are copied in the paper from
the baselines' own papers, so they run under the baseline repository's protocol (``sclip/<ds>``,
``clearclip/<ds>``; NACLIP's numbers are its no-PAMR ones = the ResCLIP release protocol); every
+ResCLIP and ablation row runs the released ResCLIP config of the dataset (preset ``<ds>``).

:data:`METHOD_TABLES` holds the main results tables (eight benchmarks, mIoU %) of the other methods
resclip implements, ids ``sc_clip``, ``sfp``, ``pearl``, ``cliper``, ``proxyclip``, ``trident`` and
``corrclip``; each number's source is noted
next to it. :func:`get_table` looks in both dicts.
"""

from __future__ import annotations

from dataclasses import dataclass

from .dataset_specs import DATASETS

# the paper groups the benchmarks by whether class 0 is a background class (Tables 1 and 2)
NO_BG = tuple(name for name, spec in DATASETS.items() if not spec.background)
WITH_BG = tuple(name for name, spec in DATASETS.items() if spec.background)

# backbone label -> (open_clip architecture, weights tag)
BACKBONES: dict[str, tuple[str, str]] = {
    "B/16": ("ViT-B-16", "openai"),
    "B/32": ("ViT-B-32", "openai"),
    "L/14": ("ViT-L-14", "openai"),
    "OpenCLIP B/16": ("ViT-B-16", "laion2b_s34b_b88k"),
    "OpenCLIP H/14": ("ViT-H-14", "laion2b_s32b_b79k"),  # ProxyCLIP's, Trident's and CorrCLIP's H/14
    "MetaCLIP B/16": ("ViT-B-16-quickgelu", "metaclip_fullcc"),  # CorrCLIP's release default
    "MetaCLIP L/14": ("ViT-L-14-quickgelu", "metaclip_fullcc"),
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
        not_run: for a row with ``method=None`` of a method resclip implements, why it is not run.
        regions: the row's numbers come from the release's pre-generated instance maps (CorrCLIP's
            ``region_masks.zip``): it runs with them (``reproduce --regions-root``), never without.
    """

    label: str
    backbone: str  # for Table A1 the columns name the backbone
    paper: tuple[float | None, ...]
    method: str | None = None
    rcs: bool = False
    sfr: bool = False
    family: str = "resclip"
    rcs_layers: tuple[int, ...] | None = None
    not_run: str = ""  # why a row of an implemented method is listed but not run ("" = the default reason)
    regions: bool = False  # runs with the release's pre-generated instance maps (reproduce --regions-root)

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


# ------------------------------------------------------------------ other methods' main tables
# Columns as the papers print them: the background group (VOC21, PC60, Object), then the others
# (VOC20, PC59, Stuff, City, ADE), then the mean over all eight.
ALL_EIGHT = WITH_BG + NO_BG
_EIGHT_NAMES = ("VOC21", "PC60", "Object", "VOC20", "PC59", "Stuff", "City", "ADE")

# printed name -> (method, preset family), for the rows resclip runs; other names -> method None
_RUNNABLE = {
    "CLIP": ("clip", "resclip"),
    "MaskCLIP": ("maskclip", "resclip"),
    "SCLIP": ("sclip", "sclip"),
    "ClearCLIP": ("clearclip", "clearclip"),
    "NACLIP": ("naclip", "resclip"),  # NACLIP's no-PAMR numbers = the ResCLIP release protocol
    "SC-CLIP": ("sc_clip", "sc_clip"),
    "SFP": ("sfp", "sfp"),
    "PEARL": ("pearl", "pearl"),
    "CLIPer": ("cliper", "cliper"),
    "ProxyCLIP": ("proxyclip", "proxyclip"),
    "Trident": ("trident", "trident"),
    "CorrCLIP": ("corrclip", "corrclip"),
}


def _method_rows(spec: _Spec, not_run: dict[str, str] | None = None,
                 regions: tuple[str, ...] = (), families: dict[str, str] | None = None) -> tuple[Row, ...]:
    """Rows from ``(label, backbone, values)``; the label's base name (before ``*`` or a space) picks
    the method and preset family (``families``: backbone -> another family of that method's presets);
    labels in ``not_run`` (label -> why) and unknown names get ``method=None``; labels in ``regions``
    run with pre-generated instance maps."""
    rows = []
    skip = not_run or {}
    for label, bb, values in spec:
        base = label.split(" ")[0].rstrip("*")
        if label in skip or base not in _RUNNABLE:
            rows.append(Row(label, bb, tuple(values), not_run=skip.get(label, "")))
        else:
            method, family = _RUNNABLE[base]
            family = (families or {}).get(bb, family)
            rows.append(Row(label, bb, tuple(values), method, family=family, regions=label in regions))
    return tuple(rows)


# SC-CLIP (Bai et al., arXiv 2411.15869, IEEE TIP 2025), main table, as reprinted by later papers:
# the paper's own table was not reachable from here, so each row says where it was read. Please
# check against arXiv 2411.15869 Table 1 (the means 43.9 / 45.2 are the paper's).
_SC_CLIP: _Spec = [
    # B/16: RF-CLIP (Li et al., AAAI 2026, arXiv 2511.16170, https://arxiv.org/abs/2511.16170),
    # Table 1 "SC-CLIP" row, read from its transcription in the paper notes at en.papernotes.org
    # (AAAI 2026, "Target Refocusing via Attention Redistribution ...", Main Results); the cells
    # average to the 43.9 SC-CLIP states for ViT-B/16.
    ("SC-CLIP", "B/16", [64.6, 36.8, 37.7, 84.3, 40.1, 26.6, 41.0, 20.1, 43.9]),
    # L/14: DSLO (CVPR 2026, arXiv 2604.07723, https://arxiv.org/abs/2604.07723), ViT-L/14 table,
    # "SC-CLIP" row, read from its transcription at en.papernotes.org (CVPR 2026, "Direct
    # Segmentation without Logits Optimization ...", Main Results). That reprint omits Object,
    # VOC20 and PC59: left None (not guessed); Avg 45.2 is the printed mean over all eight.
    ("SC-CLIP", "L/14", [65.0, 36.9, None, None, None, 26.9, 41.3, 21.7, 45.2]),
]

# SFP (Jin et al., ICCV 2025), read from the camera-ready PDF ("Certified by IEEE PDFExpress at July 21,
# 2025") in the first author's homepage repository: https://github.com/Kimsure/Kimsure.github.io,
# images/files/iccv25-sfp.pdf (the release repository has no results table). Table 1 (p. 5) prints the
# columns V21 PC60 Object V20 PC59 Stuff ADE City Avg; reordered here to ours (City before ADE). The
# B/16 cells average to the printed 44.0. Table 4 (p. 6) gives other backbones on V21 and ADE only,
# with the mean of those two as "Avg" (B/32 38.6, L/14 43.4): not an eight-benchmark mean, so left None.
_SFP: _Spec = [
    ("SFP", "B/16", [63.9, 37.2, 37.9, 84.5, 39.9, 26.4, 41.1, 20.8, 44.0]),
    ("SFP", "B/32", [60.1, None, None, None, None, None, None, 17.1, None]),
    ("SFP", "L/14", [64.7, None, None, None, None, None, None, 22.1, None]),
]

# PEARL (Pei et al., CVPR 2026, arXiv 2603.21528), Table 1, block (d) "Training-free + No extra
# data & backbone" (CLIP ViT-B/16), read from the release's copy of the table:
# https://github.com/PGSmall/PEARL/blob/c26062b/assets/results.png (README section 4.1).
# "*" = reproduced by the PEARL authors; "-" = not reported. Blocks (a)-(c) (trained, extra data
# or an extra backbone such as DINO/SAM/BLIP) are left out: resclip runs none of them.
_PEARL: _Spec = [
    ("CLIP", "B/16", [18.6, 7.8, 6.5, 49.1, 11.2, 7.2, 6.7, 3.2, 13.8]),
    ("MaskCLIP", "B/16", [38.3, 23.6, 20.6, 74.9, 26.4, 16.4, 12.6, 9.8, 27.9]),
    ("GEM", "B/16", [46.2, None, None, None, 32.6, 15.7, None, None, None]),
    ("CaR", "B/16", [48.6, 13.6, 15.4, 73.7, 18.4, None, None, 5.4, None]),
    # printed as is: the cells average 37.5, not the printed 32.7 (the paper's own inconsistency)
    ("CLIPtrase", "B/16", [50.9, 29.9, 43.6, 81.0, 33.8, 22.8, 21.3, 16.4, 32.7]),
    ("ClearCLIP", "B/16", [51.8, 32.6, 33.0, 80.9, 35.9, 23.9, 30.0, 16.7, 38.1]),
    ("SCLIP*", "B/16", [59.1, 30.4, 30.5, 80.4, 34.1, 22.4, 32.2, 16.1, 38.2]),
    ("NACLIP*", "B/16", [58.9, 32.2, 33.2, 79.7, 35.2, 23.3, 35.5, 17.4, 39.4]),
    ("SFP*", "B/16", [56.8, 32.3, 32.1, 83.4, 36.0, 24.0, 34.1, 18.1, 39.6]),
    ("PEARL", "B/16", [64.1, 35.1, 37.3, 86.9, 38.6, 26.3, 37.6, 19.4, 43.2]),
]

# CLIPer (Sun et al., ICCV 2025, arXiv 2411.13836), results table of the release README
# (https://github.com/linsun449/cliper.code/blob/c05fa41/ReadMe.md, "Results"; the same numbers are
# in the comments of scripts/config/vit-*/ovs_*.yaml there). The README prints VOC, Context, Object,
# VOC20, Context59, Stuff, ADE, CITY and no mean; reordered here to our columns, Avg None. Its
# values in parentheses (without the diffusion-based fine-grained compensation, FGC) are the
# "w/o FGC" rows; "*" = sliding-window inference. resclip's cliper has no FGC, so the FGC rows
# are listed, not run; the sliding-window rows are listed, not run, since the cliper/<dataset>
# presets hold one window setting per dataset. The runnable rows' means are 41.9 (B/16) and 44.0
# (L/14). (arXiv v1's table had seven benchmarks, no Cityscapes; the README is the ICCV version.)
_CLIPER: _Spec = [
    ("CLIPer", "B/16", [66.4, 37.5, 39.2, 85.5, 41.6, 27.6, 37.0, 21.5, None]),
    ("CLIPer w/o FGC", "B/16", [60.7, 34.7, 36.3, 84.3, 38.4, 25.4, 35.9, 19.8, None]),
    ("CLIPer*", "B/16", [66.5, 38.3, 40.0, 86.0, 42.4, 28.6, 38.7, 22.0, None]),
    ("CLIPer* w/o FGC", "B/16", [62.1, 35.7, 37.5, 85.0, 39.6, 26.4, 38.3, 20.6, None]),
    ("CLIPer", "L/14", [71.6, 39.0, 44.4, 90.3, 44.0, 29.7, 41.6, 24.5, None]),
    ("CLIPer w/o FGC", "L/14", [62.5, 34.8, 40.4, 88.7, 39.6, 26.3, 37.9, 22.1, None]),
    ("CLIPer*", "L/14", [72.2, 39.5, 44.7, 89.8, 44.6, 30.4, 42.5, 25.0, None]),
    ("CLIPer* w/o FGC", "L/14", [64.0, 35.7, 41.4, 89.0, 40.9, 27.1, 39.4, 22.9, None]),
    # the row the cliper/<dataset> presets run: each B/16 config's active window setting (sliding for
    # VOC21, PC60, Object, PC59; whole image for the others), its w/o-FGC number from the same
    # README rows above (= the parenthesised number next to the active line of each yaml); the
    # mean of these eight is 42.5 (computed here, not printed by the release)
    ("CLIPer w/o FGC (configs)", "B/16", [62.1, 35.7, 37.5, 84.3, 39.6, 25.4, 35.9, 19.8, None]),
    # the L/14 configs run the whole image everywhere, so their row is the printed L/14 w/o-FGC row
    # (each yaml's comment: "mIoU 71.6(62.5)" ...); cliper_l14/<dataset> runs it
    ("CLIPer w/o FGC (configs)", "L/14", [62.5, 34.8, 40.4, 88.7, 39.6, 26.3, 37.9, 22.1, None]),
]
# the printed rows are listed, not run: FGC is out of scope, and the presets hold one window
# setting per dataset (the "configs" rows: cliper/<dataset> for B/16, cliper_l14/<dataset> for L/14)
_CLIPER_NOT_RUN = {label: ("CLIPer's diffusion-based fine-grained compensation (FGC) is not in resclip"
                           if "FGC" not in label else
                           "the cliper/<dataset> presets hold each config's one window setting: see the "
                           "(configs) row")
                   for label, _, _ in _CLIPER if not label.endswith("(configs)")}

# ProxyCLIP (Lan et al., ECCV 2024, arXiv 2408.04883). Its own Table 1 was not readable from here; the
# rows are its numbers as the Trident and CorrCLIP authors reprint them in the results tables committed
# to their repositories (YuHengsss/Trident assets/data_result.png, commit 38e9b21; zdk258/CorrCLIP
# images/result.png, commit b54c8a0). The two agree on every cell both print; L/14 is in CorrCLIP's only
# (its cells average 42.94 against the printed 43.0). The release's default proxy is DINO ViT-B/8 (what
# proxyclip/<dataset> runs); which VFM the printed rows used is not stated in those reprints.
_PROXYCLIP: _Spec = [
    ("ProxyCLIP", "B/16", [61.3, 35.3, 37.5, 80.3, 39.1, 26.5, 38.1, 20.2, 42.3]),
    ("ProxyCLIP", "L/14", [60.6, 34.5, 39.2, 83.2, 37.7, 25.6, 40.1, 22.6, 43.0]),
    ("ProxyCLIP", "OpenCLIP H/14", [65.0, 35.4, 38.6, 83.3, 39.6, 26.8, 42.0, 24.2, 44.4]),
]

# Trident (Shi et al., ICCV 2025, arXiv 2411.09219), main results as the release README shows them
# (YuHengsss/Trident assets/data_result.png, commit 38e9b21, three days before arXiv v1; unchanged at
# a93b346). Both rows average to the printed means; the v1 abstract's "44.4 to 48.6" is ProxyCLIP H/14
# to Trident H/14. The release's evaluation command passes --sam_refine: trident/<dataset> refines.
_TRIDENT: _Spec = [
    ("Trident", "B/16", [67.1, 38.6, 41.1, 84.5, 42.2, 28.3, 42.9, 21.9, 45.8]),
    ("Trident", "OpenCLIP H/14", [70.8, 40.1, 42.2, 88.7, 44.3, 28.6, 47.6, 26.7, 48.6]),
]

# CorrCLIP (Zhang et al., ICCV 2025), the release README's "results with different mask generators"
# (zdk258/CorrCLIP CorrCLIPv1/README.md at 103bc18, added in 181ad57 for the ICCV version; printed
# order VOC21 VOC20 PC59 PC60 City ADE Stuff Object, reordered here). "ViT-B" / "ViT-L" are the release's
# MetaCLIP weights (its base config; the README does not say so in the table). SAM2_32 are the masks the
# README says reproduce the paper (its pre-generated region_masks.zip: run them with eval --regions);
# SAM2_8 is the release's on-line generator, which corrclip/<dataset> runs. Mask2Former, EoMT and
# EntitySeg masks are not generated by resclip (give their instance maps with --regions). The arXiv v1
# rows (images/result.png at b54c8a0, an earlier version of the method, CLIP weights not stated) are
# kept for reference: B/16 49.7, L/14 51.0 (the v1 abstract's 51.0), H/14 50.0. Every row's cells
# average to its printed mean (within 0.05).
_CORRCLIP: _Spec = [
    ("CorrCLIP SAM2_32", "MetaCLIP B/16", [74.8, 44.2, 43.7, 88.8, 48.8, 31.6, 49.4, 26.9, 51.0]),
    ("CorrCLIP SAM2_8", "MetaCLIP B/16", [73.9, 43.7, 43.6, 87.6, 48.0, 31.8, 47.9, 26.5, 50.4]),
    ("CorrCLIP Mask2Former", "MetaCLIP B/16", [73.9, 43.7, 46.2, 87.8, 48.2, 33.9, 44.3, 24.6, 50.3]),
    ("CorrCLIP EoMT", "MetaCLIP B/16", [76.0, 45.4, 46.6, 90.6, 50.4, 34.5, 48.0, 26.7, 52.3]),
    ("CorrCLIP EntitySeg", "MetaCLIP B/16", [76.2, 45.7, 44.5, 89.6, 50.7, 32.4, 51.6, 28.6, 52.4]),
    ("CorrCLIP SAM2_32", "MetaCLIP L/14", [76.7, 44.9, 49.4, 91.5, 50.8, 34.0, 51.1, 30.7, 53.6]),
    ("CorrCLIP SAM2_8", "MetaCLIP L/14", [76.2, 44.2, 49.0, 91.2, 49.9, 33.7, 48.9, 29.8, 52.9]),
    ("CorrCLIP Mask2Former", "MetaCLIP L/14", [76.3, 44.6, 52.2, 90.8, 50.2, 35.6, 45.4, 26.9, 52.7]),
    ("CorrCLIP EoMT", "MetaCLIP L/14", [78.0, 46.4, 52.9, 92.2, 52.8, 36.3, 50.2, 30.1, 54.9]),
    ("CorrCLIP EntitySeg", "MetaCLIP L/14", [78.9, 46.8, 51.0, 92.0, 53.0, 34.9, 53.7, 32.6, 55.4]),
    ("CorrCLIP (arXiv v1)", "B/16", [72.5, 42.0, 43.7, 88.7, 46.2, 30.6, 48.3, 25.3, 49.7]),
    ("CorrCLIP (arXiv v1)", "L/14", [73.2, 41.0, 46.0, 90.6, 47.5, 32.0, 49.0, 29.1, 51.0]),
    ("CorrCLIP (arXiv v1)", "OpenCLIP H/14", [74.1, 40.3, 43.6, 91.6, 45.5, 30.6, 47.7, 27.0, 50.0]),
]
# corrclip/<dataset> computes the on-line SAM 2 rows; the SAM2_32 rows run with the release's
# pre-generated masks (reproduce --regions-root: region_masks.zip unpacked)
_CORRCLIP_REGIONS = ("CorrCLIP SAM2_32",)
_CORRCLIP_NOT_RUN = {
    "CorrCLIP Mask2Former": "Mask2Former masks are not generated by resclip: give them with eval "
                            "--regions DIR",
    "CorrCLIP EoMT": "EoMT masks are not generated by resclip: give them with eval --regions DIR",
    "CorrCLIP EntitySeg": "EntitySeg masks are not generated by resclip: give them with eval --regions DIR",
    "CorrCLIP (arXiv v1)": "an earlier version of the method (arXiv v1), not the released code",
}

#: Main results tables of the other implemented methods' papers, by id (lower case).
METHOD_TABLES: dict[str, PaperTable] = {
    "sc_clip": PaperTable(
        "sc_clip",
        "SC-CLIP main results, eight benchmarks (mIoU %; rows as reprinted, see the source notes)",
        _cols(_EIGHT_NAMES, ALL_EIGHT),
        _method_rows(_SC_CLIP),
    ),
    "sfp": PaperTable(
        "sfp",
        "SFP Table 1 (ViT-B/16, eight benchmarks) and Table 4 (other backbones, VOC21 and ADE only), mIoU %",
        _cols(_EIGHT_NAMES, ALL_EIGHT),
        _method_rows(_SFP),
    ),
    "pearl": PaperTable(
        "pearl",
        "PEARL Table 1, training-free methods without extra data or backbone (ViT-B/16, mIoU %)",
        _cols(_EIGHT_NAMES, ALL_EIGHT),
        _method_rows(_PEARL),
    ),
    "cliper": PaperTable(
        "cliper",
        "CLIPer release results, eight benchmarks (mIoU %; no printed mean)",
        _cols(_EIGHT_NAMES, ALL_EIGHT),
        _method_rows(_CLIPER, not_run=_CLIPER_NOT_RUN, families={"L/14": "cliper_l14"}),
    ),
    "proxyclip": PaperTable(
        "proxyclip",
        "ProxyCLIP main results, eight benchmarks (mIoU %; as Trident's and CorrCLIP's tables reprint them)",
        _cols(_EIGHT_NAMES, ALL_EIGHT),
        _method_rows(_PROXYCLIP),
    ),
    "trident": PaperTable(
        "trident",
        "Trident main results, eight benchmarks (mIoU %; the release README's table)",
        _cols(_EIGHT_NAMES, ALL_EIGHT),
        _method_rows(_TRIDENT),
    ),
    "corrclip": PaperTable(
        "corrclip",
        "CorrCLIP results by mask generator (release README, ICCV version) and arXiv v1, mIoU %",
        _cols(_EIGHT_NAMES, ALL_EIGHT),
        _method_rows(_CORRCLIP, not_run=_CORRCLIP_NOT_RUN, regions=_CORRCLIP_REGIONS),
    ),
}

#: Every table :func:`get_table` knows: the ResCLIP paper's, then the other methods'.
ALL_TABLES: dict[str, PaperTable] = {**TABLES, **METHOD_TABLES}


def table_ids() -> list[str]:
    """Ids of every table, for ``--table`` help: ``1, 2, 3, 4, A1, A2, sc_clip, sfp, pearl, cliper,
    proxyclip, trident, corrclip``."""
    return list(ALL_TABLES)


def get_table(table_id: str) -> PaperTable:
    """Look up a table by id, case-insensitively: the ResCLIP paper's ``"1"``, ``"2"``, ``"3"``,
    ``"4"``, ``"A1"``, ``"A2"`` (also ``"table a1"``) or another method's ``"sc_clip"``, ``"sfp"``,
    ``"pearl"``, ``"cliper"``, ``"proxyclip"``, ``"trident"``, ``"corrclip"`` (``-`` may stand for ``_``:
    ``"SC-CLIP"``)."""
    key = str(table_id).strip().upper().removeprefix("TABLE").strip().replace("-", "_")
    for tid, table in ALL_TABLES.items():
        if tid.upper() == key:
            return table
    raise ValueError(f"unknown table {table_id!r}; valid: {', '.join(ALL_TABLES)}")
