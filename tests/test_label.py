"""`resclip label` / `resclip.label` (issue 15): sources, Parquet rows, masks, resuming, refusing
other settings, hostile images, killing a run mid-way. One process here; torchrun and Ray in
test_label_distributed.py."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pa = pytest.importorskip("pyarrow", reason="needs the 'label' extra: pip install 'resclip[label]'")
pq = pytest.importorskip("pyarrow.parquet", reason="needs the 'label' extra")

from resclip.commands import label as label_cmd  # noqa: E402
from resclip.labelling import LabelSummary, SourceOptions, label, list_shards  # noqa: E402
from resclip.labelling.writer import DONE, RECORD, mask_name  # noqa: E402
from resclip.results import rle_encode  # noqa: E402

CLASSES = "cat; dog; sky, clouds"
FAST_SETTINGS = {"rcs_layers": (1, 2), "short_side": 64, "slide_crop": 0, "sfr_first_pass_pamr_steps": 0}
FAST = ["--device", "cpu", "--set", "rcs_layers=(1,2)", "--set", "short_side=64", "--set", "slide_crop=0",
        "--set", "sfr_first_pass_pamr_steps=0", "--quiet"]


pytestmark = pytest.mark.usefixtures("text_cache")


def _photo(seed: int, h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), dtype=np.uint8)
    img[:, : w // 2] = (200, 40, 40)
    img[:, w // 2:] = (30, 90, 220)
    return np.clip(img + rng.normal(0, 20, img.shape), 0, 255).astype(np.uint8)


def _encoded(seed: int, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_photo(seed, 30 + seed, 40 + 2 * seed)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five images, two in a sub-folder, PNG and JPEG."""
    root = tmp_path_factory.mktemp("photos")
    (root / "sub").mkdir()
    for i in range(5):
        name = f"{'sub/' if i % 2 else ''}im{i}.{'jpg' if i % 3 == 0 else 'png'}"
        (root / name).write_bytes(_encoded(i, "JPEG" if name.endswith("jpg") else "PNG"))
    return root


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two good images, a truncated JPEG, a 1x1 image, a CMYK JPEG and a text file named .png."""
    root = tmp_path_factory.mktemp("hostile")
    (root / "a_good.png").write_bytes(_encoded(1))
    (root / "b_truncated.jpg").write_bytes(_encoded(2, "JPEG")[:300])
    Image.fromarray(np.full((1, 1, 3), 128, np.uint8)).save(root / "c_1x1.png")
    Image.new("CMYK", (40, 30), (10, 200, 30, 0)).save(root / "d_cmyk.jpg")
    (root / "e_not_an_image.png").write_text("hello")
    (root / "f_good.jpg").write_bytes(_encoded(3, "JPEG"))
    return root


def _rows(out: Path) -> list[dict]:
    rows: list[dict] = []
    for part in sorted(out.glob("part-*.parquet")):
        rows += pq.read_table(part).to_pylist()
    return rows


def _files(out: Path) -> dict[str, bytes]:
    """Every output file (Parquet, manifests, masks, run record) by relative path."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _cli(source: str | Path, out: Path, ckpt: Path, *extra: str) -> int:
    return label_cmd.main([str(source), "--classes", CLASSES, "--out", str(out), "--pretrained", str(ckpt),
                           *FAST, *extra])


# ------------------------------------------------------------------------------------------ sources


def test_shards_of_a_folder_are_stable_and_sorted(folder: Path):
    shards = list_shards(folder, SourceOptions(shard_size=2))
    assert [s.name for s in shards] == ["part-00000", "part-00001", "part-00002"]
    ids = [i for s in shards for i in s.ids]
    assert ids == sorted(ids) and ids[0] == "im0.jpg" and "sub/im1.png" in ids
    assert list_shards(str(folder / "**" / "*.png"), SourceOptions(shard_size=10))[0].ids == (
        "im2.png", "im4.png", "sub/im1.png")


def test_missing_source_and_bad_column_are_one_line_errors(tmp_path: Path, tiny64: Path, capsys):
    assert _cli(tmp_path / "nothing", tmp_path / "o", tiny64) == 2
    err = capsys.readouterr().err
    assert err.startswith("resclip: error: source not found") and err.count("\n") == 1
    pq.write_table(pa.table({"x": [1]}), tmp_path / "t.parquet")
    assert _cli(tmp_path / "t.parquet", tmp_path / "o", tiny64) == 2
    err = capsys.readouterr().err
    assert "no image path or image bytes column" in err and "--path-column" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_folder_rows_masks_and_metadata(folder: Path, tmp_path: Path, tiny64: Path):
    out = tmp_path / "out"
    summary = label(folder, CLASSES, out, pretrained=str(tiny64), device="cpu", shard_size=2,
                    save_masks=True, progress=False, **FAST_SETTINGS)
    assert isinstance(summary, LabelSummary)
    assert (summary.images, summary.failures, summary.shards, summary.new_images) == (5, (), 3, 5)
    rows = _rows(out)
    assert [r["id"] for r in rows] == ["im0.jpg", "im2.png", "im4.png", "sub/im1.png", "sub/im3.jpg"]
    for row in rows:
        assert row["status"] == "ok" and row["error"] is None
        with Image.open(out / row["mask"]) as png:
            assert png.mode == "P" and png.size == (row["width"], row["height"])
            mask = np.asarray(png)
        assert row["mask"] == mask_name(row["id"])
        assert sum(row["pixels"]) == row["width"] * row["height"] and sum(row["share"]) == pytest.approx(1)
        assert row["rle"] == [rle_encode(mask == c)["counts"] for c in range(3)]
        assert row["pixels"] == np.bincount(mask.ravel(), minlength=3).tolist()
    meta = json.loads(pq.read_schema(out / "part-00000.parquet").metadata[b"resclip"])
    assert meta["classes"]["names"] == ["cat", "dog", "sky"] and meta["classes"]["queries"][-1] == "clouds"
    assert meta["settings"]["method"] == "naclip" and len(meta["visual_digest"]) == 64
    assert meta["text_fingerprint"] and meta["output"] == {"save_masks": True, "palette": "classes"}
    assert meta == json.loads((out / RECORD).read_text())
    manifest = json.loads((out / DONE / "part-00001.json").read_text())
    assert manifest["rows"] == 2 and manifest["failures"] == [] and len(manifest["sha256"]) == 64


def test_text_file_source_and_a_missing_path(folder: Path, tmp_path: Path, tiny64: Path, capsys):
    listing = tmp_path / "list.txt"
    listing.write_text(f"# two images and a missing one\n{folder / 'im0.jpg'}\n\nmissing.png\n"
                       f"{folder / 'sub' / 'im1.png'}\n")
    out = tmp_path / "out"
    assert _cli(listing, out, tiny64, "--workers", "0") == 0
    rows = _rows(out)
    assert [r["id"] for r in rows] == [str(folder / "im0.jpg"), "missing.png",
                                       str(folder / "sub" / "im1.png")]
    assert [r["status"] for r in rows] == ["ok", "failed", "ok"]
    assert "image file not found" in rows[1]["error"] and rows[1]["pixels"] == []


def test_webdataset_and_parquet_sources_match_the_folder(folder: Path, tmp_path: Path, tiny64: Path):
    pytest.importorskip("webdataset", reason="needs the 'label' extra")
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    keys = [p.relative_to(folder).as_posix().rsplit(".", 1)[0] for p in files]
    # two tar shards, WebDataset layout (<key>.<ext> members), plus a sample without an image
    for n, chunk in enumerate((range(0, 3), range(3, 5))):
        with tarfile.open(tmp_path / f"shard-{n:04d}.tar", "w") as tar:
            for i in chunk:
                for ext, data in ((files[i].suffix[1:], files[i].read_bytes()), ("cls", b"1")):
                    info = tarfile.TarInfo(f"{keys[i]}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
            if n == 1:
                info = tarfile.TarInfo("orphan.txt")
                info.size = 2
                tar.addfile(info, io.BytesIO(b"hi"))
    assert _cli(str(tmp_path / "shard-{0000..0001}.tar"), tmp_path / "wds", tiny64) == 0
    wds = _rows(tmp_path / "wds")
    assert [r["id"] for r in wds] == [*keys, "orphan"]
    assert wds[-1]["status"] == "failed" and "holds no image (found: txt)" in wds[-1]["error"]
    # Parquet: the encoded bytes with a key column, and paths relative to the Parquet file
    pq.write_table(pa.table({"key": keys, "image": [p.read_bytes() for p in files]}), tmp_path / "b.parquet",
                   row_group_size=2)
    assert _cli(tmp_path / "b.parquet", tmp_path / "pb", tiny64, "--shard-size", "3") == 0
    (tmp_path / "pp").mkdir()
    pq.write_table(pa.table({"path": [os.path.relpath(p, tmp_path / "pp") for p in files]}),
                   tmp_path / "pp" / "paths.parquet")
    assert _cli(tmp_path / "pp", tmp_path / "ppo", tiny64) == 0
    assert _cli(folder, tmp_path / "dir", tiny64) == 0
    drop = ("id", "mask")
    ref = [{k: v for k, v in r.items() if k not in drop} for r in _rows(tmp_path / "dir")]
    for out in ("pb", "ppo"):
        assert [{k: v for k, v in r.items() if k not in drop} for r in _rows(tmp_path / out)] == ref
    assert [{k: v for k, v in r.items() if k not in drop} for r in wds[:-1]] == ref
    assert [r["id"] for r in _rows(tmp_path / "pb")] == keys
    assert len(list((tmp_path / "pb").glob("part-*.parquet"))) == 2


def test_hostile_files_are_failures_and_the_job_finishes(hostile: Path, tmp_path: Path, tiny64: Path,
                                                         capsys):
    assert _cli(hostile, tmp_path / "out", tiny64, "--save-masks") == 0
    rows = {r["id"]: r for r in _rows(tmp_path / "out")}
    failed = {k: r["error"] for k, r in rows.items() if r["status"] == "failed"}
    assert set(failed) == {"b_truncated.jpg", "e_not_an_image.png"}
    assert "could not read image" in failed["b_truncated.jpg"]
    assert "could not read image" in failed["e_not_an_image.png"]
    # a 1x1 image is scaled up like any other and a CMYK one converted: both labelled
    assert (rows["c_1x1.png"]["width"], rows["c_1x1.png"]["height"]) == (1, 1)
    assert rows["d_cmyk.jpg"]["status"] == "ok" and rows["d_cmyk.jpg"]["width"] == 40
    assert not (tmp_path / "out" / "masks" / "b_truncated.jpg.png").exists()
    manifest = json.loads((tmp_path / "out" / DONE / "part-00000.json").read_text())
    assert [f[0] for f in manifest["failures"]] == ["b_truncated.jpg", "e_not_an_image.png"]


def test_summary_lists_failures(hostile: Path, tmp_path: Path, tiny64: Path, capsys):
    argv = [str(hostile), "--classes", CLASSES, "--out", str(tmp_path / "o"), "--pretrained", str(tiny64),
            *[a for a in FAST if a != "--quiet"], "--shard-size", "4"]
    assert label_cmd.main(argv) == 0
    printed = capsys.readouterr()
    assert "labelled 4 of 6 images in 2 shards" in printed.out and "images/s" in printed.out
    assert "2 failed:" in printed.err and "b_truncated.jpg: could not read image" in printed.err


# ------------------------------------------------------------------------------------------ resuming


def test_rerun_skips_finished_shards_and_redoes_broken_ones(folder: Path, tmp_path: Path, tiny64: Path):
    out = tmp_path / "out"
    assert _cli(folder, out, tiny64, "--shard-size", "2", "--save-masks") == 0
    before = _files(out)
    summary = label(folder, CLASSES, out, pretrained=str(tiny64), device="cpu", shard_size=2,
                    save_masks=True, progress=False, **FAST_SETTINGS)
    assert (summary.skipped_shards, summary.new_images, summary.images) == (3, 0, 5)
    # a shard whose worker died after its Parquet but before its manifest, and a half-written one
    (out / DONE / "part-00001.json").unlink()
    (out / "part-00002.parquet").write_bytes(b"PAR1 half")
    summary = label(folder, CLASSES, out, pretrained=str(tiny64), device="cpu", shard_size=2,
                    save_masks=True, progress=False, **FAST_SETTINGS)
    assert (summary.skipped_shards, summary.new_images) == (1, 3)
    assert _files(out) == before


def test_other_settings_in_the_same_out_folder_are_refused(folder: Path, tmp_path: Path, tiny64: Path,
                                                           capsys):
    out = tmp_path / "out"
    assert _cli(folder, out, tiny64, "--shard-size", "3") == 0
    before = _files(out)
    for extra in (["--classes", "cat; dog"], ["--set", "short_side=96"], ["--shard-size", "2"],
                  ["--save-masks"]):
        argv = [str(folder), "--classes", CLASSES, "--out", str(out), "--pretrained", str(tiny64), *FAST,
                "--shard-size", "3", *extra]
        assert label_cmd.main(argv) == 2
        err = capsys.readouterr().err
        err = "".join(ln for ln in err.splitlines(keepends=True) if "resclip: warning:" not in ln)
        assert err.startswith(f"resclip: error: '{out}' holds labels made with other ")
        assert err.count("\n") == 1
        assert "use another --out folder" in err
    assert _files(out) == before


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_files(folder: Path, tmp_path: Path, tiny64: Path, text_cache: Path):
    env = {**os.environ, "RESCLIP_CACHE": str(text_cache), "HF_HUB_OFFLINE": "1"}
    argv = [sys.executable, "-m", "resclip.commands.label", str(folder), "--classes", CLASSES,
            "--pretrained", str(tiny64), *FAST, "--shard-size", "1", "--save-masks"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*argv, "--out", str(killed)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not (killed / DONE / "part-00000.json").exists():
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "no shard finished in 240 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    done_before = len(list((killed / DONE).glob("*.json")))
    assert done_before >= 1
    rerun = subprocess.run([*argv, "--out", str(killed)], env=env, capture_output=True, timeout=300,
                           check=False)
    assert rerun.returncode == 0, rerun.stderr.decode()[-2000:]
    assert _cli(folder, tmp_path / "once", tiny64, "--shard-size", "1", "--save-masks") == 0
    left = {k for k in _files(killed) if "/." in k or k.startswith(".")}
    assert not left, left  # no temporary files
    assert _files(killed) == _files(tmp_path / "once")


# ----------------------------------------------------------------------------------------- the command


def test_help_imports_no_torch():
    code = ("import contextlib, io, sys\nimport resclip.commands.label as m\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try:\n        m.main(['--help'])\n    except SystemExit:\n        pass\n"
            "print(' '.join(k for k in ('torch', 'open_clip', 'pyarrow', 'ray') if k in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == []


def test_missing_extra_is_one_line(folder: Path, tmp_path: Path, tiny64: Path, capsys,
                                   monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import fails as if not installed
    assert _cli(folder, tmp_path / "o", tiny64) == 2
    err = capsys.readouterr().err
    assert err == "resclip: error: the 'pyarrow' package is missing: pip install 'resclip[label]'\n"
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", pq)
    monkeypatch.setitem(sys.modules, "ray.data", None)
    assert _cli(folder, tmp_path / "o", tiny64, "--engine", "ray") == 2
    assert "pip install 'resclip[ray]'" in capsys.readouterr().err


def test_command_module_shape():
    assert label_cmd.NAME == "label" and label_cmd.HELP and callable(label_cmd.run)
    from resclip.commands import COMMANDS

    for info in COMMANDS:  # once the lead adds the entry, it must match the module
        if info.name == "label":
            assert (info.module, info.help) == ("label", label_cmd.HELP)


@pytest.mark.parametrize(("extra", "message"), [
    (["--shard-size", "0"], "--shard-size must be >= 1"),
    (["--workers", "-1"], "--workers must be >= 0"),
    (["--address", "auto"], "--address is for --engine ray"),
])
def test_argument_errors(folder: Path, tmp_path: Path, tiny64: Path, extra: list[str], message: str, capsys):
    assert _cli(folder, tmp_path / "o", tiny64, *extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("resclip: error: ") and message in err and err.count("\n") == 1


def test_resclip_label_is_the_function(tmp_path: Path):
    import resclip

    assert resclip.label is label
    with pytest.raises(FileNotFoundError, match="source not found"):
        resclip.label(tmp_path / "nothing", CLASSES, tmp_path / "out", pretrained=None)
    assert not (tmp_path / "out").exists()


def test_through_resclip_cli_with_the_command_listed(folder: Path, tmp_path: Path, tiny64: Path, capsys,
                                                    monkeypatch: pytest.MonkeyPatch):
    """What `resclip label` does once the lead adds the COMMANDS entry (simulated here)."""
    import resclip.cli
    from resclip.commands import CommandInfo

    if not any(c.name == "label" for c in resclip.cli.COMMANDS):
        monkeypatch.setattr(resclip.cli, "COMMANDS",
                            (*resclip.cli.COMMANDS, CommandInfo("label", "label", label_cmd.HELP)))
    with pytest.raises(SystemExit) as done:
        resclip.cli.main(["label", "--help"])
    assert done.value.code == 0 and "--engine {local,ray}" in capsys.readouterr().out
    out = tmp_path / "out"
    argv = ["label", str(folder), "--classes", CLASSES, "--out", str(out), "--pretrained", str(tiny64), *FAST,
            "--summary", str(tmp_path / "s.json")]
    assert resclip.cli.main(argv) == 0
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["images"] == 5 and summary["failures"] == [] and summary["images_per_second"] > 0


def test_random_weights_are_refused_across_processes(folder: Path, tmp_path: Path, monkeypatch):
    """pretrained=None builds different weights in every worker: refused for Ray and torchrun."""
    with pytest.raises(ValueError, match=r"random weights \(pretrained=None\) differ in every process"):
        label(folder, CLASSES, tmp_path / "r", pretrained=None, engine="ray")
    monkeypatch.setenv("WORLD_SIZE", "2")
    import importlib

    dist = importlib.import_module("resclip.eval.distributed")  # the module, not eval's function

    class Two:
        rank, world_size = 0, 2

    @contextlib.contextmanager
    def two_ranks(device: str):
        yield Two(), "cpu"

    monkeypatch.setattr(dist, "distributed", two_ranks)
    with pytest.raises(ValueError, match=r"save one model with torch\.save"):
        label(folder, CLASSES, tmp_path / "t", pretrained=None)
    assert not (tmp_path / "r").exists() and not (tmp_path / "t").exists()


def test_an_image_listed_twice_is_refused(folder: Path, tmp_path: Path):
    listing = tmp_path / "list.txt"
    first, other = folder / "im0.jpg", folder / "sub" / "im1.png"
    listing.write_text(f"{first}\n# a comment\n{other}\n{first}\n")
    with pytest.raises(ValueError, match=r"names '.*im0\.jpg' twice \(entries 1 and 3\).*remove the repeat"):
        list_shards(listing)
    with pytest.raises(ValueError, match="twice"):
        label([str(folder / "im0.jpg")] * 2, CLASSES, tmp_path / "o", pretrained=None)
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------ regions
def test_instance_maps_from_a_folder(folder: Path, tmp_path: Path, golden_ckpt_b16: Path, tiny64: Path):
    """``regions=`` / ``--regions``: CorrCLIP labels each image with its own map (by id, or by the id
    without its image suffix, in sub-folders too), needs no SAM 2, records the folder; an image
    without a map is a failed row naming it; a method that reads no regions is refused before any work."""
    import resclip
    from resclip.regions import read

    aux = {"dino": str(Path(__file__).parent / "data" / "golden" / "aux" / "dino_vitb16_tiny_fp16.pth")}
    maps = tmp_path / "maps"
    (maps / "sub").mkdir(parents=True)
    ids = ["im0.jpg", "im2.png", "im4.png", "sub/im1.png", "sub/im3.jpg"]
    for n, image_id in enumerate(ids[:-1]):
        with Image.open(folder / image_id) as img:
            w, h = img.size
        m = np.zeros((h, w), np.int32)
        m[:, w // 3:] = 1 + n
        name = image_id if n % 2 else image_id.rsplit(".", 1)[0]  # both namings are found
        np.savez(maps / f"{name}.npz", instance_mask=m)
    settings = {"short_side": 64, "slide_crop": 0, "rcs": False, "sfr": False}
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="custom ViT"):  # no SAM 2: regions= makes corrclip read the maps
        summary = label(folder, CLASSES, out, method="corrclip", preset="corrclip/voc21",
                        pretrained=str(golden_ckpt_b16), device="cpu", save_masks=True, progress=False,
                        aux_pretrained=aux, regions=maps, **settings)
    assert summary.images == 5 and [f[0] for f in summary.failures] == ["sub/im3.jpg"]
    assert "no instance map for 'sub/im3.jpg'" in summary.failures[0][1]
    record = json.loads((out / RECORD).read_text())
    assert record["output"]["regions"] == str(maps)
    assert record["settings"]["method_fields"] == [["masks", "given"]]
    with pytest.warns(UserWarning, match="custom ViT"):
        seg = resclip.create_segmenter("corrclip", preset="corrclip/voc21", pretrained=str(golden_ckpt_b16),
                                       device="cpu", aux_pretrained=aux, text_cache=False,
                                       corrclip_masks="given", **settings)
    for image_id in ids[:-1]:
        found = next(maps.glob(f"{image_id.rsplit('.', 1)[0]}*.npz"))
        rgb = np.asarray(Image.open(folder / image_id).convert("RGB"))
        want = seg.predict(rgb, CLASSES, regions=read(found)).mask
        np.testing.assert_array_equal(np.asarray(Image.open(out / mask_name(image_id))), want)
    with pytest.raises(ValueError, match=r"^instance maps from .* would not be used: method 'naclip' "):
        label(folder, CLASSES, tmp_path / "other", pretrained=str(tiny64), device="cpu", progress=False,
              regions=maps, **FAST_SETTINGS)
    assert not (tmp_path / "other").exists()
