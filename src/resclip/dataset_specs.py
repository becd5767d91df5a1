"""The eight benchmarks as data: one :class:`DatasetSpec` each, the only place their facts are written.

Everything else that names a benchmark's folder, class file, background class or display name reads it
here: the readers (:mod:`resclip.datasets`), ``resclip reproduce``, the paper's tables and the demo.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "DATASETS",
    "DatasetError",
    "DatasetNotFoundError",
    "DatasetSpec",
    "class_file_path",
    "get_dataset_spec",
    "list_datasets",
    "root_names",
]


class DatasetError(ValueError):
    """Wrong dataset content: label values, sizes, unreadable files, unknown names."""


class DatasetNotFoundError(FileNotFoundError):
    """A dataset folder or file is missing."""


@dataclass(frozen=True)
class DatasetSpec:
    """One benchmark: where its files are and how its labels are read.

    Attributes:
        name: dataset key (``"voc21"``...), also its default preset.
        title: the name the papers print (``"VOC21"``).
        num_classes: classes scored by the metric (incl. background where there is one).
        class_file: shipped class-name file (``resclip/data/class_names``).
        reduce_zero_label: label 0 is ignored and the other labels shift down by one.
        root_name: the folder MMSegmentation configs name as ``data_root``.
        root_aliases: other places of that folder below a data folder (``ade/ADEChallengeData2016``).
        img_dir: image folder below the root.
        ann_dir: label folder below the root.
        img_suffix: image file ending.
        seg_suffix: label file ending replacing ``img_suffix``.
        split: split file below the root listing image ids, or None (every image in ``img_dir``).
        background: class 0 is a background class.
        palette: ``"voc"`` to save predictions as palette PNGs with the VOC palette, None for grey.
        family: the benchmark's full name, shared by its variants (``"PASCAL VOC"`` for VOC21 and VOC20).
    """

    name: str
    title: str
    num_classes: int
    class_file: str
    reduce_zero_label: bool
    root_name: str
    img_dir: str
    ann_dir: str
    img_suffix: str
    seg_suffix: str
    split: str | None = None
    background: bool = False
    palette: str | None = None
    root_aliases: tuple[str, ...] = ()
    family: str = ""

    @property
    def root_candidates(self) -> tuple[str, ...]:
        """Where the dataset's folder may be below a data folder: ``root_name``, then the aliases."""
        return (self.root_name, *self.root_aliases)

    @property
    def default_preset(self) -> str:
        """The preset holding the released ResCLIP settings for this dataset."""
        return self.name

    def layout(self) -> str:
        """One line describing the expected folder layout."""
        split = f", split file {self.split}" if self.split else ""
        return (
            f"{self.name} expects --root = the MMSegmentation folder {self.root_name}/ with images "
            f"{self.img_dir}/**/*{self.img_suffix} and labels {self.ann_dir}/**/*{self.seg_suffix}{split}"
        )


# the folder layouts shared by several benchmarks
_VOC: dict[str, Any] = {
    "root_name": "VOCdevkit/VOC2012", "img_dir": "JPEGImages", "ann_dir": "SegmentationClass",
    "split": "ImageSets/Segmentation/val.txt", "palette": "voc", "family": "PASCAL VOC",
}
_CONTEXT: dict[str, Any] = {
    "root_name": "VOCdevkit/VOC2010", "img_dir": "JPEGImages", "ann_dir": "SegmentationClassContext",
    "split": "ImageSets/SegmentationContext/val.txt", "family": "PASCAL Context",
}
_COCO: dict[str, Any] = {
    "root_name": "coco_stuff164k", "img_dir": "images/val2017", "ann_dir": "annotations/val2017",
    "reduce_zero_label": False, "img_suffix": ".jpg",
}
_JPG_PNG: dict[str, Any] = {"img_suffix": ".jpg", "seg_suffix": ".png"}

#: The eight benchmarks; their order is the order of the paper's table columns within each group.
DATASETS: dict[str, DatasetSpec] = {
    s.name: s
    for s in (
        DatasetSpec("voc21", "VOC21", 21, "voc21.txt", reduce_zero_label=False, background=True, **_VOC,
                    **_JPG_PNG),
        DatasetSpec("voc20", "VOC20", 20, "voc20.txt", reduce_zero_label=True, **_VOC, **_JPG_PNG),
        DatasetSpec("context60", "Context60", 60, "context60.txt", reduce_zero_label=False, background=True,
                    **_CONTEXT, **_JPG_PNG),
        DatasetSpec("context59", "Context59", 59, "context59.txt", reduce_zero_label=True, **_CONTEXT,
                    **_JPG_PNG),
        DatasetSpec("coco_object", "COCO-Object", 81, "coco_object.txt", seg_suffix="_instanceTrainIds.png",
                    background=True, family="COCO-Object", **_COCO),
        DatasetSpec("coco_stuff", "COCO-Stuff", 171, "coco_stuff.txt", seg_suffix="_labelTrainIds.png",
                    family="COCO-Stuff", **_COCO),
        DatasetSpec("cityscapes", "Cityscapes", 19, "city_scapes.txt", reduce_zero_label=False,
                    root_name="cityscapes", img_dir="leftImg8bit/val", ann_dir="gtFine/val",
                    img_suffix="_leftImg8bit.png", seg_suffix="_gtFine_labelTrainIds.png",
                    family="Cityscapes"),
        DatasetSpec("ade20k", "ADE20K", 150, "ade20k.txt", reduce_zero_label=True,
                    root_name="ADEChallengeData2016", root_aliases=("ade/ADEChallengeData2016",),
                    img_dir="images/validation", ann_dir="annotations/validation", family="ADE20K",
                    **_JPG_PNG),
    )
}

_ALIASES = {
    "coco_stuff164k": "coco_stuff",
    "city_scapes": "cityscapes",
    "ade": "ade20k",
    "coco_obj": "coco_object",
}


def list_datasets() -> list[str]:
    """Names of the eight benchmarks."""
    return list(DATASETS)


def root_names() -> list[str]:
    """The MMSegmentation folder names of the benchmarks, each once (``VOCdevkit/VOC2012``, ...)."""
    return list(dict.fromkeys(spec.root_name for spec in DATASETS.values()))


def get_dataset_spec(name: str) -> DatasetSpec:
    """Look up a benchmark by name (a few MMSeg spellings such as ``coco_stuff164k`` are accepted).

    Raises:
        DatasetError: unknown name; the message lists the valid ones.
    """
    key = str(name).strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}")
    return DATASETS[key]


def class_file_path(spec: DatasetSpec) -> Path:
    """Path of the shipped class-name file of ``spec``."""
    return Path(__file__).parent / "data" / "class_names" / spec.class_file
