"""Benchmark readers on the real VOC / ADE20K / COCO fixtures, and every error they raise."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from resclip.datasets import (
    DATASETS,
    BenchmarkImages,
    DatasetError,
    DatasetNotFoundError,
    get_dataset_spec,
    list_datasets,
    list_samples,
    load_pair,
    read_label,
    reduce_zero_label,
    save_prediction,
)
from resclip.eval import benchmark_class_lines
from resclip.palettes import voc_palette

BENCH = Path(__file__).parent / "data" / "benchmarks"
VOC = BENCH / "VOCdevkit" / "VOC2012"
ADE = BENCH / "ADEChallengeData2016"
COCO = BENCH / "coco_stuff164k"


def _raw(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img).copy()


def test_eight_datasets_with_class_files():
    assert list_datasets() == [
        "voc21",
        "voc20",
        "context60",
        "context59",
        "coco_object",
        "coco_stuff",
        "cityscapes",
        "ade20k",
    ]
    for name, spec in DATASETS.items():
        lines, _ = benchmark_class_lines(spec)
        assert len(lines) == spec.num_classes, name
        assert spec.default_preset == name
    assert [s.name for s in DATASETS.values() if s.reduce_zero_label] == ["voc20", "context59", "ade20k"]


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(DatasetError, match="unknown dataset 'voc2012'; valid: voc21, voc20, context60"):
        get_dataset_spec("voc2012")
    assert get_dataset_spec("coco_stuff164k").name == "coco_stuff"
    assert get_dataset_spec("City-Scapes").name == "cityscapes"


def test_voc21_reads_palette_indices_with_background_and_ignore():
    spec = get_dataset_spec("voc21")
    samples = list_samples(spec, VOC)
    assert len(samples) == 14 and samples[0].id == "crop_000" and samples[0].stem == "crop_000"
    seen: set[int] = set()
    for s in samples:
        label = read_label(s.label, spec)
        assert label.dtype == np.uint8
        np.testing.assert_array_equal(label, _raw(s.label))  # palette PNG: indices, no conversion
        seen |= set(np.unique(label).tolist())
    assert 0 in seen and 255 in seen and max(seen - {255}) <= 20
    assert seen - {0, 255} == {1, 2, 3, 5, 6, 7, 10, 13, 14, 15, 17}


def test_voc20_reduce_zero_label_ignores_background():
    spec = get_dataset_spec("voc20")
    for s in list_samples(spec, VOC):
        raw = _raw(s.label).astype(int)
        label = read_label(s.label, spec)
        expected = np.where((raw == 0) | (raw == 255), 255, raw - 1)
        np.testing.assert_array_equal(label, expected)
        assert set(np.unique(label).tolist()) - {255} <= set(range(20))


def test_ade20k_reduce_zero_label():
    spec = get_dataset_spec("ade20k")
    samples = list_samples(spec, ADE)
    assert [s.id for s in samples] == ["ADE_val_00000001", "ADE_val_00000002", "ADE_val_00000003"]
    raw = _raw(samples[2].label).astype(int)
    label = read_label(samples[2].label, spec)
    assert (label[raw == 0] == 255).all()
    np.testing.assert_array_equal(label[raw > 0], raw[raw > 0] - 1)
    assert label.max() == 255 and label[label != 255].max() == 102


def test_coco_stuff_keeps_255_as_ignore():
    spec = get_dataset_spec("coco_stuff")
    samples = list_samples(spec, COCO)
    assert len(samples) == 10 and samples[0].label.name == "000000004495_labelTrainIds.png"
    for s in samples:
        label = read_label(s.label, spec)
        np.testing.assert_array_equal(label, _raw(s.label))
        values = set(np.unique(label).tolist())
        assert 255 in values and max(values - {255}) <= 170


def test_coco_object_has_background_and_80_things():
    spec = get_dataset_spec("coco_object")
    samples = list_samples(spec, COCO)
    assert samples[0].label.name == "000000004495_instanceTrainIds.png"
    values: set[int] = set()
    for s in samples:
        values |= set(np.unique(read_label(s.label, spec)).tolist())
    assert 0 in values and 255 not in values and max(values) <= 80


def test_limit_keeps_split_order():
    spec = get_dataset_spec("voc21")
    assert [s.id for s in list_samples(spec, VOC, limit=3)] == ["crop_000", "crop_001", "crop_008"]
    with pytest.raises(DatasetError, match="limit must be >= 1"):
        list_samples(spec, VOC, limit=0)


def test_load_pair_sizes_and_rgb():
    spec = get_dataset_spec("ade20k")
    rgb, label = load_pair(list_samples(spec, ADE)[0], spec)
    assert rgb.shape == (512, 683, 3) and rgb.dtype == np.uint8 and label.shape == (512, 683)


def test_reduce_zero_label_matches_mmseg():
    out = reduce_zero_label(np.array([[0, 1, 2, 254, 255]], dtype=np.uint8))
    assert out.tolist() == [[255, 0, 1, 253, 255]]


# ---------------------------------------------------------------------------------------------- errors
@pytest.fixture
def voc_copy(tmp_path: Path) -> Path:
    root = tmp_path / "VOCdevkit" / "VOC2012"
    shutil.copytree(VOC, root)
    return root


def test_missing_root(tmp_path: Path):
    with pytest.raises(DatasetNotFoundError, match=r"does not exist; voc21 expects --root = .*VOC2012"):
        list_samples(get_dataset_spec("voc21"), tmp_path / "nope")


def test_missing_folder_names_it_and_suggests_the_root(voc_copy: Path, tmp_path: Path):
    with pytest.raises(DatasetNotFoundError, match=r"JPEGImages' not found.*did you mean --root .*VOC2012"):
        list_samples(get_dataset_spec("voc21"), tmp_path)
    shutil.rmtree(voc_copy / "SegmentationClass")
    with pytest.raises(DatasetNotFoundError, match=r"SegmentationClass' not found; voc21 expects"):
        list_samples(get_dataset_spec("voc21"), voc_copy)


def test_missing_label_is_an_error_not_a_skip(voc_copy: Path):
    (voc_copy / "SegmentationClass" / "crop_001.png").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"missing label for 1 of 14 images.*001.jpg.*001.png"):
        list_samples(get_dataset_spec("voc21"), voc_copy)


def test_split_lists_missing_image(voc_copy: Path):
    (voc_copy / "JPEGImages" / "crop_008.jpg").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"crop_008.jpg' listed in .*val.txt' not found"):
        list_samples(get_dataset_spec("voc20"), voc_copy)
    (voc_copy / "ImageSets" / "Segmentation" / "val.txt").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"split file .*val.txt' not found"):
        list_samples(get_dataset_spec("voc20"), voc_copy)


def test_label_values_outside_class_range(voc_copy: Path):
    path = voc_copy / "SegmentationClass" / "crop_000.png"
    label = _raw(path)
    label[0, :5] = 30
    Image.fromarray(label).save(path)
    with pytest.raises(DatasetError, match=r"000.png' has values \[30\] outside the 21 classes of voc21"):
        read_label(path, get_dataset_spec("voc21"))


def test_ade_value_151_is_outside_after_reduce(tmp_path: Path):
    path = tmp_path / "x.png"
    Image.fromarray(np.array([[0, 150, 151]], dtype=np.uint8)).save(path)
    with pytest.raises(DatasetError, match=r"values \[150\] outside the 150 classes of ade20k.*reduce_zero"):
        read_label(path, get_dataset_spec("ade20k"))


def test_colour_label_is_rejected(tmp_path: Path):
    path = tmp_path / "rgb.png"
    Image.new("RGB", (4, 3), (128, 0, 0)).save(path)
    with pytest.raises(DatasetError, match=r"rgb.png' is a RGB colour image; expected one class index"):
        read_label(path, get_dataset_spec("voc21"))


def test_size_mismatch(voc_copy: Path):
    spec = get_dataset_spec("voc21")
    path = voc_copy / "SegmentationClass" / "crop_000.png"
    Image.fromarray(_raw(path)[:500]).save(path)
    sample = list_samples(spec, voc_copy)[0]
    with pytest.raises(DatasetError, match=r"000.jpg' is 513x513 but its label .*000.png' is 513x500"):
        load_pair(sample, spec)
    item = BenchmarkImages([sample], spec)[0]  # loader workers return the error instead of raising
    assert item.image is None and item.error is not None and "513x500" in item.error


def test_no_images(tmp_path: Path):
    (tmp_path / "images" / "validation").mkdir(parents=True)
    (tmp_path / "annotations" / "validation").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"no images \*.jpg found under"):
        list_samples(get_dataset_spec("ade20k"), tmp_path)


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_cityscapes_layout(tmp_path: Path):
    for city, name in (("lindau", "lindau_000000_000019"), ("frankfurt", "frankfurt_000000_000294")):
        _png(tmp_path / "leftImg8bit/val" / city / f"{name}_leftImg8bit.png", np.zeros((4, 8, 3), np.uint8))
        _png(
            tmp_path / "gtFine" / "val" / city / f"{name}_gtFine_labelTrainIds.png",
            np.full((4, 8), 18, np.uint8),
        )
    spec = get_dataset_spec("cityscapes")
    samples = list_samples(spec, tmp_path)
    assert [s.id for s in samples] == ["frankfurt/frankfurt_000000_000294", "lindau/lindau_000000_000019"]
    assert samples[0].stem == "frankfurt_000000_000294_leftImg8bit"
    rgb, label = load_pair(samples[0], spec)
    assert rgb.shape == (4, 8, 3) and (label == 18).all()
    _png(samples[1].label, np.full((4, 8), 19, np.uint8))
    with pytest.raises(DatasetError, match="outside the 19 classes"):
        load_pair(samples[1], spec)


def test_context_layout(tmp_path: Path):
    _png(tmp_path / "JPEGImages" / "2008_000002.jpg", np.zeros((4, 4, 3), np.uint8))
    _png(tmp_path / "SegmentationClassContext" / "2008_000002.png", np.array([[0, 1, 59, 59]] * 4, np.uint8))
    split = tmp_path / "ImageSets" / "SegmentationContext" / "val.txt"
    split.parent.mkdir(parents=True)
    split.write_text("2008_000002\n")
    c60, c59 = get_dataset_spec("context60"), get_dataset_spec("context59")
    assert read_label(list_samples(c60, tmp_path)[0].label, c60)[0].tolist() == [0, 1, 59, 59]
    assert read_label(list_samples(c59, tmp_path)[0].label, c59)[0].tolist() == [255, 0, 58, 58]


# ---------------------------------------------------------------------------------------------- predictions
def test_voc_palette_is_the_standard_one():
    palette = voc_palette().ravel().tolist()
    assert palette[:9] == [0, 0, 0, 128, 0, 0, 0, 128, 0]
    with Image.open(VOC / "SegmentationClass" / "crop_000.png") as img:
        assert img.getpalette() == palette


@pytest.mark.parametrize(
    ("name", "root", "mode"),
    [("voc21", VOC, "P"), ("voc20", VOC, "P"), ("ade20k", ADE, "L"), ("coco_stuff", COCO, "L")],
)
def test_saved_prediction_has_the_ground_truth_convention(tmp_path: Path, name: str, root: Path, mode: str):
    spec = get_dataset_spec(name)
    sample = list_samples(spec, root, limit=1)[0]
    gt = read_label(sample.label, spec)
    pred = np.where(gt == 255, 0, gt).astype(np.int64)  # a prediction that is right wherever GT counts
    out = tmp_path / f"{sample.stem}.png"
    save_prediction(pred, out, spec)
    with Image.open(out) as img:
        assert img.mode == mode and img.size == Image.open(sample.label).size
    np.testing.assert_array_equal(read_label(out, spec)[gt != 255], gt[gt != 255])
    raw_saved, raw_gt = _raw(out), _raw(sample.label)
    np.testing.assert_array_equal(raw_saved[gt != 255], raw_gt[gt != 255])  # same values as the GT file
