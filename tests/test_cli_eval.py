"""`resclip eval`, `reproduce` and `sweep` end to end with a tiny random model; torchrun with gloo."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import resclip.eval.loop as ev
from resclip.cli import main
from resclip.commands.sweep import parse_layer_range
from resclip.paper_tables import NO_BG, TABLES, WITH_BG, get_table

BENCH = Path(__file__).parent / "data" / "benchmarks"
VOC = BENCH / "VOCdevkit" / "VOC2012"
FAST = ["--set", "short_side=64", "--set", "rcs_layers=(2,3)", "--device", "cpu", "--no-progress"]


pytestmark = pytest.mark.usefixtures("text_cache")


def _eval(ckpt: Path, *extra: str, root: Path = VOC) -> list[str]:
    return ["eval", "--dataset", "voc21", "--root", str(root), "--pretrained", str(ckpt), *FAST, *extra]


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_eval_end_to_end(tiny64: Path, tmp_path: Path, capsys):
    out = tmp_path / "res" / "voc21.json"
    argv = [
        a
        for a in _eval(tiny64, "--limit", "2", "--output", str(out), "--workers", "2")
        if a != "--no-progress"
    ]
    assert main(argv) == 0
    data = _json(out)
    assert data["dataset"] == "voc21" and data["num_images"] == 2 and data["limit"] == 2
    assert isinstance(data["miou"], float) and 0 <= data["miou"] <= 100
    assert list(data["per_class_iou"])[:2] == ["background", "aeroplane"] and len(data["per_class_iou"]) == 21
    assert data["per_class_iou"]["cat"] is None  # absent from both prediction and ground truth here, or 0.0
    assert {"pixel_accuracy", "mean_accuracy", "confusion_matrix", "num_pixels"} <= set(data)
    proto = data["protocol"]
    assert proto["method"] == "naclip" and proto["preset"] == "voc21" and proto["rcs"]["layers"] == [2, 3]
    assert proto["protocol"]["short_side"] == 64 and proto["sfr"]["tau"] == 2.2
    assert data["model"].startswith("inferred-vit") and data["pretrained"] == str(tiny64)
    assert set(data["versions"]) >= {"resclip", "torch", "open_clip", "numpy", "python"}
    assert np.asarray(data["confusion_matrix"]).sum() == data["num_pixels"]
    assert (out.parent / "voc21.md").is_file() and (out.parent / "voc21.csv").is_file()
    assert list((out.parent / ".resclip-state").glob("voc21-*.npz"))
    printed = capsys.readouterr()
    assert "background" in printed.out and "VOC21: mIoU" in printed.out and "wrote" in printed.out
    assert "2 images; progress kept in" in printed.err and "2/2" in printed.err  # progress bar


def test_eval_interrupted_then_resumed_matches_uninterrupted(
    tiny64: Path, small_voc: Path, tmp_path: Path, monkeypatch, capsys
):
    args = ["--limit", "3", "--no-sfr", "--workers", "0"]
    assert main(_eval(tiny64, *args, "--output", str(tmp_path / "a" / "r.json"), root=small_voc)) == 0
    real, calls = ev.segment_mask, {"n": 0}

    def flaky(*a: object) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a)  # type: ignore[arg-type]

    monkeypatch.setattr(ev, "segment_mask", flaky)
    assert main(_eval(tiny64, *args, "--output", str(tmp_path / "b" / "r.json"), root=small_voc)) == 130
    assert "progress saved (1 new images)" in capsys.readouterr().err
    assert not (tmp_path / "b" / "r.json").exists()
    monkeypatch.setattr(ev, "segment_mask", real)
    assert main(_eval(tiny64, *args, "--output", str(tmp_path / "b" / "r.json"), root=small_voc)) == 0
    assert "1 of 3 images done earlier, resuming" in capsys.readouterr().err
    a, b = _json(tmp_path / "a" / "r.json"), _json(tmp_path / "b" / "r.json")
    assert a["confusion_matrix"] == b["confusion_matrix"] and a["miou"] == b["miou"]
    assert b["reused_images"] == 1


def test_bad_label_mid_run_is_an_error_not_a_skip(tiny64: Path, small_voc: Path, tmp_path: Path, capsys):
    root = tmp_path / "VOC2012"
    shutil.copytree(small_voc, root)
    label = root / "SegmentationClass" / "crop_001.png"
    with Image.open(label) as img:
        arr = np.asarray(img).copy()
    arr[0, 0] = 30
    Image.fromarray(arr).save(label)
    argv = _eval(tiny64, "--no-sfr", "--workers", "2", "--output", str(tmp_path / "r.json"), root=root)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "resclip: error: label" in err and "crop_001.png' has values [30] outside the 21 classes" in err
    assert "progress saved (1 new images)" in err and not (tmp_path / "r.json").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--dataset", "voc", "--root", "."], "unknown dataset 'voc'; valid: voc21, voc20"),
        (["--dataset", "ade20k", "--root", "/nonexistent"], "does not exist; ade20k expects --root"),
        (["--dataset", "voc21", "--root", str(VOC), "--limit", "0"], "--limit must be >= 1"),
        (["--dataset", "voc21", "--root", str(VOC), "--preset", "nope"], "unknown preset 'nope'"),
    ],
)
def test_eval_user_errors(argv: list[str], message: str, capsys):
    assert main(["eval", *argv, "--pretrained", "none"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("resclip: error: ") and message in err and err.count("\n") == 1


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(tiny64: Path, tmp_path: Path, text_cache: Path):
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun not installed")
    args = ["--limit", "3", "--no-sfr", "--workers", "0"]
    assert main(_eval(tiny64, *args, "--output", str(tmp_path / "one.json"))) == 0
    env = {**os.environ, "RESCLIP_CACHE": str(text_cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    more = ["--output", str(tmp_path / "two.json"), "--save-predictions", str(tmp_path / "p")]
    cmd = [
        str(torchrun),
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "resclip.cli",
        *_eval(tiny64, *args, *more),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    one, two = _json(tmp_path / "one.json"), _json(tmp_path / "two.json")
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["confusion_matrix"] == one["confusion_matrix"] and two["miou"] == one["miou"]
    assert proc.stdout.count("VOC21: mIoU") == 1  # only rank 0 reports
    names = sorted(p.name for p in (tmp_path / "p").iterdir())
    assert names == ["crop_000.png", "crop_001.png", "crop_008.png"]  # written by both ranks
    with Image.open(tmp_path / "p" / "crop_001.png") as img:
        assert img.mode == "P" and img.size == (513, 513)


# ------------------------------------------------------------------------------------------ reproduce
def test_reproduce_table3_with_local_weights(tiny64: Path, tmp_path: Path, capsys):
    out = tmp_path / "t3.json"
    argv = [
        "reproduce",
        "--table",
        "3",
        "--data-root",
        str(BENCH),
        "--weights",
        f"B/16={tiny64}",
        "--limit",
        "1",
        "--workers",
        "0",
        "--output",
        str(out),
        *FAST,
    ]
    assert main(argv) == 0
    data = _json(out)
    assert data["table"] == "3" and data["columns"] == ["VOC20"] and len(data["rows"]) == 4
    for row, paper in zip(data["rows"], (79.7, 85.5, 81.5, 86.0), strict=True):
        cell = row["cells"]["VOC20"]
        assert cell["paper"] == paper and cell["ours"] is not None
        assert cell["diff"] == pytest.approx(cell["ours"] - paper, abs=1e-3)
    assert [(r["rcs"], r["sfr"]) for r in data["rows"]] == [
        (False, False),
        (True, False),
        (False, True),
        (True, True),
    ]
    md = out.with_suffix(".md").read_text()
    assert "ours / paper" in md and "| NACLIP +RCS +SFR | B/16 |" in md
    assert len(list((tmp_path / "t3_runs").glob("*.json"))) == 4
    assert "/ 86 (" in capsys.readouterr().out


def test_reproduce_dry_run_lists_skips(tmp_path: Path, capsys):
    assert main(["reproduce", "--table", "1", "--data-root", str(BENCH), "--dry-run", "--limit", "2"]) == 0
    printed = capsys.readouterr()
    out = printed.out
    assert "would run (dry run)" in out and "not implemented in resclip" in out
    assert (
        "no context59 data" in out and "no cityscapes data" in out and "SegmentationClassContext" not in out
    )
    assert "| VOC20 | C59 | Stuff | City | ADE | Avg |" in out and "| – / 86 | – / 36.8 |" in out
    assert "resclip: context59 skipped: dataset root" in printed.err and "voc21 skipped" not in printed.err


def test_reproduce_without_data_or_weights(tmp_path: Path, capsys):
    assert (
        main(
            [
                "reproduce",
                "--table",
                "2",
                "--data-root",
                str(tmp_path),
                "--output",
                str(tmp_path / "x.json"),
                "--device",
                "cpu",
            ]
        )
        == 1
    )
    assert "nothing could run" in capsys.readouterr().err
    argv = [
        "reproduce",
        "--table",
        "3",
        "--data-root",
        str(BENCH),
        "--limit",
        "1",
        "--device",
        "cpu",
        "--output",
        str(tmp_path / "y.json"),
    ]
    assert main(argv) == 1  # weights for B/16 cannot be downloaded offline: skipped with the reason
    assert "weights B/16 (ViT-B-16, openai) unavailable" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--table", "9"], "unknown table '9'"),
        (["--table", "3", "--weights", "B/99=x"], "--weights expects"),
        (["--table", "3", "--rows", "GroupViT"], "matches no row"),
    ],
)
def test_reproduce_user_errors(argv: list[str], message: str, capsys):
    assert main(["reproduce", *argv]) == 2
    assert message in capsys.readouterr().err


def test_paper_tables_are_consistent():
    assert list(TABLES) == ["1", "2", "3", "4", "A1", "A2"] and get_table("table a1").id == "A1"
    for table in TABLES.values():
        for row in table.rows:
            assert len(row.paper) == len(table.columns), (table.id, row.label)
            if table.columns[-1].label == "Avg" and None not in row.paper:
                mean = sum(v for v in row.paper[:-1] if v is not None) / (len(row.paper) - 1)
                assert abs(mean - row.paper[-1]) < 0.07, (table.id, row.label)  # paper rounds per cell
    t1, t2 = get_table("1"), get_table("2")
    assert [c.datasets for c in t1.columns][-1] == NO_BG and t2.columns[-1].datasets == WITH_BG
    ours = {r.label: r for r in t1.rows if r.backbone == "B/16"}
    assert ours["NACLIP+ResCLIP"].paper[0] == 86.0 and ours["NACLIP+ResCLIP"].preset("voc20") == "voc20"
    assert ours["SCLIP"].preset("ade20k") == "sclip/ade20k" and ours["NACLIP"].preset("ade20k") == "ade20k"
    a1 = {r.label: r for r in get_table("A1").rows}
    t2_b16 = {r.label: r for r in t2.rows if r.backbone == "B/16"}
    both = ours["NACLIP+ResCLIP"].paper[:5] + t2_b16["NACLIP+ResCLIP"].paper[:3]
    assert round(sum(v for v in both if v is not None) / 8, 1) == a1["NACLIP RCS+SFR"].paper[2] == 41.4
    assert get_table("4").rows[-2].rcs_layers == (6, 7, 8, 9)


# ------------------------------------------------------------------------------------------ sweep
def _sweep(ckpt: Path, out: Path, *extra: str) -> list[str]:
    return [
        "sweep",
        "--dataset",
        "voc20",
        "--root",
        str(VOC),
        "--pretrained",
        str(ckpt),
        "--limit",
        "1",
        "--workers",
        "0",
        "--no-sfr",
        "--output",
        str(out),
        *FAST,
        *extra,
    ]


def test_sweep_writes_csv_and_plot(tiny64: Path, tmp_path: Path, capsys):
    out = tmp_path / "s.csv"
    assert main(_sweep(tiny64, out, "--lambda-rcs", "0.1,0.5", "--rcs-layers", "1-3,1+3")) == 0
    lines = out.read_text().splitlines()
    assert lines[0] == "lambda_rcs,rcs_layers,miou,aacc,macc,num_images" and len(lines) == 5
    assert lines[1].startswith("0.1,1-3,") and lines[4].startswith("0.5,1+3,") and lines[1].endswith(",1")
    printed = capsys.readouterr().out
    assert "best: lambda_rcs=" in printed
    if importlib.util.find_spec("matplotlib") is not None:  # the optional [viz] extra
        assert out.with_suffix(".png").stat().st_size > 1000
    else:
        assert "matplotlib is not installed" in printed


def test_sweep_without_matplotlib(tiny64: Path, tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "s.csv"
    assert main(_sweep(tiny64, out, "--grid", "prob_thd=0.0,0.5")) == 0
    assert len(out.read_text().splitlines()) == 3 and not out.with_suffix(".png").exists()
    assert "matplotlib is not installed, so no plot" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "nothing to sweep"),
        (["--rcs-layers", "9-6"], "not a layer range"),
        (["--grid", "bogus=1,2"], "unknown setting"),
        (["--lambda-rcs", "0.1,"], "empty value"),
    ],
)
def test_sweep_user_errors(extra: list[str], message: str, tmp_path: Path, capsys):
    assert main(["sweep", "--dataset", "voc20", "--root", str(VOC), "--pretrained", "none", *extra]) == 2
    assert message in capsys.readouterr().err


def test_parse_layer_range():
    assert parse_layer_range("6-9") == (6, 7, 8, 9) and parse_layer_range("2+4") == (2, 4)
    assert parse_layer_range("5") == (5,)


def test_cli_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in ("eval", "reproduce", "sweep"))


def test_reproduce_weights_must_match_their_label(tiny64: Path, tmp_path: Path, monkeypatch, capsys):
    """An L/14 label on a ViT-B/16 file is refused before anything runs; a custom model is warned about."""
    import resclip.clip

    monkeypatch.setattr(resclip.clip, "checkpoint_architecture", lambda path: "ViT-B-16")
    argv = ["reproduce", "--table", "A1", "--dry-run", "--output", str(tmp_path / "a.json")]
    assert main([*argv, "--weights", f"L/14={tiny64}"]) == 2
    err = capsys.readouterr().err
    assert f"--weights L/14={tiny64} holds a ViT-B-16 checkpoint, not ViT-L-14" in err
    assert "label it B/16" in err and err.count("\n") == 1
    assert main([*argv, "--weights", f"B/16={tiny64}"]) == 0  # the right label passes
    monkeypatch.setattr(resclip.clip, "checkpoint_architecture", lambda path: None)
    assert main([*argv, "--weights", f"L/14={tiny64}"]) == 0
    assert "its shapes match no known architecture" in capsys.readouterr().err


def test_checkpoint_architecture_reads_shapes(tiny64: Path, tmp_path: Path, monkeypatch):
    import resclip.infer_arch
    from resclip.clip import checkpoint_architecture

    assert checkpoint_architecture(tiny64) is None  # a custom tiny model
    state = torch.load(tiny64, weights_only=True)
    summary = tuple(sorted(resclip.infer_arch._shape_summary(state, tiny64).items()))
    monkeypatch.setattr(resclip.infer_arch, "_registered_shapes", lambda: (("ViT-Tiny-16", summary, 2, 1),))
    assert checkpoint_architecture(tiny64) == "ViT-Tiny-16"
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        checkpoint_architecture(tmp_path / "none.pt")


# ---------------------------------------------------------------- instance maps from a folder (--regions)
AUX = Path(__file__).parent / "data" / "golden" / "aux"
CORRCLIP = ["--method", "corrclip", "--preset", "corrclip/voc21", "--aux-pretrained",
            f"dino={AUX / 'dino_vitb16_tiny_fp16.pth'}", "--set", "short_side=64", "--set", "prob_thd=0.0",
            "--device", "cpu", "--no-rcs", "--no-sfr",
            "--no-progress"]


def _region_files(root: Path, folder: Path, shift: int = 0) -> dict[str, np.ndarray]:
    """One CorrCLIP-style ``<stem>.npz`` (key instance_mask) per image of ``root``: its own partition
    (bands whose borders move with the image's index, vertical for every other image)."""
    folder.mkdir(parents=True, exist_ok=True)
    maps = {}
    for i, path in enumerate(sorted((root / "JPEGImages").glob("*.jpg"))):
        with Image.open(path) as img:
            w, h = img.size
        m = np.zeros((h, w), np.int32)
        cut = 9 * i + shift + 10
        if i % 2:
            m[:, cut:] = 1
            m[:, 2 * cut:] = 2
        else:
            m[cut:] = 1
            m[2 * cut // 1 + 5:] = 2
        np.savez_compressed(folder / f"{path.stem}.npz", instance_mask=m)
        maps[path.stem] = m
    assert len({m.tobytes() for m in maps.values()}) == len(maps)  # no two images share a map
    return maps


@pytest.mark.slow
def test_eval_reads_instance_maps_from_a_folder(small_voc: Path, golden_ckpt_b16: Path, tmp_path: Path,
                                                 capsys, monkeypatch):
    """`eval --regions DIR` (CorrCLIP's pre-generated-mask mode): no SAM 2 is needed, each image's map
    reaches predict() (the saved predictions are those of predict(regions=map)), a changed map is
    scored again on resume, and another folder is another saved run."""
    import resclip

    maps = _region_files(small_voc, tmp_path / "regions")
    preds = tmp_path / "pred"
    argv = ["eval", "--dataset", "voc21", "--root", str(small_voc), "--pretrained", str(golden_ckpt_b16),
            *CORRCLIP,
            "--regions", str(tmp_path / "regions"), "--save-predictions", str(preds),
            "--state-dir", str(tmp_path / "state"), "--output", str(tmp_path / "r.json")]
    seen: list[np.ndarray] = []
    predict = resclip.Segmenter.predict

    def spy(self, image, classes, embeddings=None, regions=None):  # records the maps predict receives
        seen.append(np.asarray(regions))
        return predict(self, image, classes, embeddings=embeddings, regions=regions)

    with monkeypatch.context() as patch:
        patch.setattr(resclip.Segmenter, "predict", spy)
        assert main(argv) == 0
    first = _json(tmp_path / "r.json")
    assert first["regions"] == str((tmp_path / "regions").resolve())
    assert first["protocol"]["method_fields"] == [["masks", "given"]]
    assert "sam" not in dict(first["protocol"]["aux"])
    with pytest.warns(UserWarning, match="custom ViT"):
        seg = resclip.create_segmenter("corrclip", preset="corrclip/voc21", pretrained=str(golden_ckpt_b16),
                                       device="cpu",
                                       aux_pretrained={"dino": str(AUX / "dino_vitb16_tiny_fp16.pth")},
                                       short_side=64, prob_thd=0.0, corrclip_masks="given", text_cache=False,
                                       rcs=False,
                                       sfr=False)
    from resclip.presets import get_preset

    # the preset's class file, as eval reads it (CorrCLIP's lines spell person "people")
    spec = ev.get_dataset_spec("voc21")
    lines = ev.benchmark_class_lines(spec, get_preset("corrclip/voc21").class_file_path())[0]
    for stem, m in maps.items():
        rgb = np.asarray(Image.open(small_voc / "JPEGImages" / f"{stem}.jpg").convert("RGB"))
        saved = np.asarray(Image.open(preds / f"{stem}.png"))
        np.testing.assert_array_equal(saved, seg.predict(rgb, lines, regions=m).mask)
    # each image received its own map (every map differs), in the dataset's order
    assert [r.tobytes() for r in seen] == [m.tobytes() for m in maps.values()]
    capsys.readouterr()
    changed = next(iter(maps))
    m = maps[changed].copy()
    m[:, : m.shape[1] // 2] = 7
    np.savez_compressed(tmp_path / "regions" / f"{changed}.npz", instance_mask=m)
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "scoring again 1 image(s) whose image, annotation or instance map changed" in err
    _region_files(small_voc, tmp_path / "other", shift=10)  # another folder: another saved run
    argv2 = [a if a != str(tmp_path / "regions") else str(tmp_path / "other") for a in argv]
    assert main([*argv2[:-2], "--output", str(tmp_path / "r2.json"), "--limit", "1"]) == 0
    assert "(starting fresh: 1 saved run(s) there have other settings)" in capsys.readouterr().err


def test_eval_regions_errors(small_voc: Path, golden_ckpt_b16: Path, tmp_path: Path, capsys):
    base = ["eval", "--dataset", "voc21", "--root", str(small_voc), "--pretrained", str(golden_ckpt_b16),
            "--state-dir", str(tmp_path / "state")]
    assert main([*base, *CORRCLIP, "--regions", str(tmp_path / "none")]) == 2
    none = str(tmp_path / "none")
    assert capsys.readouterr().err.strip().endswith(f"instance-map folder {none!r} does not exist")
    maps = _region_files(small_voc, tmp_path / "regions")
    (tmp_path / "regions" / f"{sorted(maps)[1]}.npz").unlink()
    assert main([*base, *CORRCLIP, "--regions", str(tmp_path / "regions")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"resclip: error: 1 of 3 images have no instance map in {str(tmp_path / 'regions')!r} "
                   f"(first: {sorted(maps)[1]!r}; expected <image stem>.npz, .npy or .png)"]
    _region_files(small_voc, tmp_path / "regions")
    assert main([*base, *FAST, "--regions", str(tmp_path / "regions")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"resclip: error: instance maps from {str(tmp_path / 'regions')!r} would not be used: method "
        "'naclip' reads no regions; use corrclip or --set region_vote=True")
    bad = np.zeros((3, 3), np.int32)  # not the image's size
    np.savez(tmp_path / "regions" / f"{sorted(maps)[0]}.npz", instance_mask=bad)
    assert main([*base, *CORRCLIP, "--regions", str(tmp_path / "regions")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"resclip: error: {sorted(maps)[0]}: regions must be an (H, W) = (80, 96) integer "
                           "instance map of the image, got (3, 3)")
