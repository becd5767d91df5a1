"""What an evaluation returns, and its ``results.json`` / ``.md`` / ``.csv`` files."""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..datasets import DatasetSpec
from ..fileio import atomic_write_all
from ..metrics import SegMetrics, markdown_table, percent

__all__ = ["EvalResult", "software_versions", "write_results"]


def software_versions() -> dict[str, str | None]:
    """Versions of everything that can change the numbers."""
    import open_clip
    import PIL

    from .. import __version__

    return {
        "resclip": __version__,
        "torch": torch.__version__,
        "open_clip": getattr(open_clip, "__version__", None),
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
    }


@dataclass
class EvalResult:
    """Outcome of one evaluation.

    Attributes:
        dataset: the benchmark.
        root: its folder.
        class_names: display name per class.
        class_file: class-name file used.
        confusion: ``(C, C)`` int64 dataset-level confusion matrix (rows: ground truth).
        metrics: scores derived from it.
        num_images: images scored.
        reused_images: images whose counts came from saved progress.
        config: the segmenter's full protocol (``seg.config.to_dict()``).
        device: device the model ran on.
        world_size: processes that shared the work.
        limit: ``--limit`` (None = all images).
        elapsed_s: wall time of this run.
        state_key: key of the saved progress.
        unassigned: ``(C,)`` int64 pixels of each true class that got no class (a method that can
            leave pixels unassigned, e.g. CLIPer's pipeline on a dataset without background), or None.
    """

    dataset: DatasetSpec
    root: str
    class_names: list[str]
    class_file: str
    confusion: np.ndarray
    metrics: SegMetrics
    num_images: int
    reused_images: int
    config: dict[str, Any]
    device: str
    world_size: int
    limit: int | None
    elapsed_s: float
    state_key: str
    extra: dict[str, Any] = field(default_factory=dict)
    unassigned: np.ndarray | None = None

    @property
    def miou(self) -> float:
        """mIoU in percent (unrounded)."""
        return self.metrics.miou * 100.0

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON results (percentages rounded to 2 decimals as mmseg reports them; null = absent)."""
        m = self.metrics
        return {
            "dataset": self.dataset.name,
            "dataset_title": self.dataset.title,
            "root": self.root,
            "num_images": self.num_images,
            "num_classes": len(self.class_names),
            "limit": self.limit,
            "miou": percent(m.miou),
            "pixel_accuracy": percent(m.aacc),
            "mean_accuracy": percent(m.macc),
            "per_class_iou": {n: percent(v) for n, v in zip(self.class_names, m.iou, strict=True)},
            "per_class_accuracy": {n: percent(v) for n, v in zip(self.class_names, m.acc, strict=True)},
            "num_pixels": m.num_pixels,
            "method": self.config.get("method"),
            "rcs": self.config.get("rcs") is not None,
            "sfr": self.config.get("sfr") is not None,
            "preset": self.config.get("preset"),
            "model": self.config.get("model"),
            "pretrained": self.config.get("pretrained"),
            "precision": self.config.get("precision"),
            "protocol": self.config,
            "class_file": self.class_file,
            "reduce_zero_label": self.dataset.reduce_zero_label,
            "device": self.device,
            "world_size": self.world_size,
            "versions": software_versions(),
            "elapsed_s": round(self.elapsed_s, 2),
            "reused_images": self.reused_images,
            "state_key": self.state_key,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **self.extra,
            "confusion_matrix": self.confusion.tolist(),
            **({"unassigned_pixels": self.unassigned.tolist()}
               if self.unassigned is not None and self.unassigned.any() else {}),
        }


def _sibling(path: Path, suffix: str) -> Path:
    return path.with_suffix(suffix) if path.suffix == ".json" else path.with_name(path.name + suffix)


def write_results(result: EvalResult, path: str | os.PathLike[str]) -> list[Path]:
    """Write ``results.json`` plus ``results.md`` and ``results.csv`` next to it (all or none of them).

    Raises:
        OutputError: naming the file that could not be written (no temporary file is left behind).
    """
    out = Path(path)
    data = result.to_dict()
    c = result.config
    head = (
        f"# {result.dataset.title}: mIoU {data['miou']}\n\n"
        f"method {c.get('method')}, RCS {'on' if data['rcs'] else 'off'}, "
        f"SFR {'on' if data['sfr'] else 'off'}, "
        f"preset {c.get('preset')}, model {c.get('model')} ({c.get('pretrained')}), {c.get('precision')}; "
        f"{result.num_images} images of {result.root}\n\n"
    )
    md = head + markdown_table(result.metrics, result.class_names)
    m = result.metrics
    rows = ["class,iou,acc"] + [
        f"{_csv(n)},{_num(i)},{_num(a)}" for n, i, a in zip(result.class_names, m.iou, m.acc, strict=True)
    ]
    rows += [f"mIoU,{_num(m.miou)},", f"aAcc,,{_num(m.aacc)}", f"mAcc,,{_num(m.macc)}"]
    files = [
        (out, json.dumps(data, indent=1) + "\n"),
        (_sibling(out, ".md"), md),
        (_sibling(out, ".csv"), "\n".join(rows) + "\n"),
    ]
    atomic_write_all([(p, text.encode("utf-8")) for p, text in files])
    return [p for p, _ in files]


def _csv(name: str) -> str:
    return f'"{name}"' if "," in name or '"' in name else name


def _num(x: float) -> str:
    return "" if math.isnan(x) else f"{x * 100:.4f}"
