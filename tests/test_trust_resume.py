"""A resumed `resclip eval` never presents stale or damaged saved results as fresh (issue 10, §2 and §5)."""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from resclip.cli import main

BENCH = Path(__file__).parent / "data" / "benchmarks"
VOC = BENCH / "VOCdevkit" / "VOC2012"
FAST = ["--set", "short_side=64", "--set", "rcs_layers=(2,3)", "--device", "cpu", "--no-progress"]
RUN = ["--limit", "3", "--no-sfr", "--workers", "0"]


pytestmark = pytest.mark.usefixtures("text_cache")


@pytest.fixture
def root(small_voc: Path, tmp_path: Path) -> Path:
    """A private copy of the small dataset (tests edit it)."""
    dst = tmp_path / "data" / "VOC2012"
    shutil.copytree(small_voc, dst)
    return dst


def _eval(ckpt: Path, data: Path, out: Path, *extra: str) -> int:
    argv = ["eval", "--dataset", "voc21", "--root", str(data), "--pretrained", str(ckpt), *FAST, *RUN]
    return main([*argv, "--output", str(out), *extra])


def _warned(err: str, pattern: str) -> None:
    """The CLI printed a warning matching ``pattern`` as one ``resclip: warning: ...`` line."""
    assert any(re.match(rf"resclip: warning: .*{pattern}", line) for line in err.splitlines()), err


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a["confusion_matrix"] == b["confusion_matrix"] and a["miou"] == b["miou"]


def _temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp") or ".tmp." in p.name]


def test_edited_annotation_is_scored_again(tiny64: Path, root: Path, tmp_path: Path, capsys) -> None:
    assert _eval(tiny64, root, tmp_path / "a" / "r.json") == 0
    label = root / "SegmentationClass" / "crop_001.png"
    before = os.stat(label)
    with Image.open(label) as img:
        arr, palette = np.asarray(img).copy(), img.getpalette()
    arr[:40] = 15  # a person where there was something else
    edited = Image.fromarray(arr, mode="P")
    edited.putpalette(palette or [])
    edited.save(label)
    os.utime(label, ns=(before.st_atime_ns, before.st_mtime_ns))  # the content hash still tells
    capsys.readouterr()
    assert _eval(tiny64, root, tmp_path / "a" / "r2.json") == 0
    assert "scoring again 1 image(s) whose image or annotation changed" in capsys.readouterr().err
    assert _eval(tiny64, root, tmp_path / "fresh" / "r.json", "--fresh") == 0
    old, resumed, fresh = (_json(tmp_path / p) for p in ("a/r.json", "a/r2.json", "fresh/r.json"))
    assert resumed["reused_images"] == 2 and _same(resumed, fresh) and not _same(old, fresh)


def test_image_replaced_is_scored_again(tiny64: Path, root: Path, tmp_path: Path) -> None:
    assert _eval(tiny64, root, tmp_path / "a" / "r.json") == 0
    image = root / "JPEGImages" / "crop_008.jpg"
    with Image.open(image) as img:
        Image.fromarray(255 - np.asarray(img)).save(image, quality=95)
    assert _eval(tiny64, root, tmp_path / "a" / "r2.json") == 0
    assert _eval(tiny64, root, tmp_path / "fresh" / "r.json", "--fresh") == 0
    resumed, fresh = _json(tmp_path / "a" / "r2.json"), _json(tmp_path / "fresh" / "r.json")
    assert resumed["reused_images"] == 2 and _same(resumed, fresh)


def test_checkpoint_replaced_in_place_starts_over(tiny64: Path, root: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "model.pt"
    state = torch.load(tiny64, weights_only=True)
    torch.save(state, ckpt)
    assert _eval(ckpt, root, tmp_path / "a" / "r.json") == 0
    before = os.stat(ckpt)
    state["visual.transformer.resblocks.3.attn.in_proj_weight"] *= 1.5  # the text tower is unchanged
    torch.save(state, ckpt)
    os.utime(ckpt, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(ckpt).st_size == before.st_size
    assert _eval(ckpt, root, tmp_path / "a" / "r2.json") == 0
    other = tmp_path / "other.pt"
    torch.save(state, other)
    assert _eval(other, root, tmp_path / "fresh" / "r.json") == 0
    old, resumed, fresh = (_json(tmp_path / p) for p in ("a/r.json", "a/r2.json", "fresh/r.json"))
    assert resumed["reused_images"] == 0 and _same(resumed, fresh) and not _same(old, fresh)


def test_truncated_prediction_png_is_rewritten(tiny64: Path, root: Path, tmp_path: Path, capsys) -> None:
    preds = tmp_path / "pred"
    assert _eval(tiny64, root, tmp_path / "r.json", "--save-predictions", str(preds)) == 0
    png = preds / "crop_001.png"
    original = png.read_bytes()
    png.write_bytes(original[: len(original) // 2])
    capsys.readouterr()
    assert _eval(tiny64, root, tmp_path / "r2.json", "--save-predictions", str(preds)) == 0
    assert "1 image(s) whose saved prediction PNG is not the one written" in capsys.readouterr().err
    assert png.read_bytes() == original
    assert _json(tmp_path / "r2.json")["reused_images"] == 2
    assert _same(_json(tmp_path / "r.json"), _json(tmp_path / "r2.json"))


def test_zeroed_counts_in_the_state_are_rejected(
    tiny64: Path, root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _eval(tiny64, root, tmp_path / "r.json") == 0
    (state,) = (tmp_path / ".resclip-state").glob("voc21-*.npz")
    with np.load(state, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["counts"] = np.zeros_like(arrays["counts"])
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    state.write_bytes(buf.getvalue())
    capsys.readouterr()
    assert _eval(tiny64, root, tmp_path / "r2.json") == 0
    _warned(capsys.readouterr().err, r"ignoring 3 damaged entries \(checksum mismatch\)")
    again = _json(tmp_path / "r2.json")
    assert again["reused_images"] == 0 and isinstance(again["miou"], float)
    assert _same(_json(tmp_path / "r.json"), again)


def test_no_labelled_pixel_is_an_error_not_a_null_miou(
    tiny64: Path, root: Path, tmp_path: Path, capsys
) -> None:
    for label in (root / "SegmentationClass").iterdir():
        with Image.open(label) as img:
            blank = Image.new("P", img.size, 255)
            blank.putpalette(img.getpalette() or [])
        blank.save(label)
    assert _eval(tiny64, root, tmp_path / "r.json") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("resclip: error: voc21 at ") and "no labelled pixel" in err
    assert err.endswith("so the mIoU is not a number") and not (tmp_path / "r.json").exists()


def test_unwritable_state_folder_still_gives_results(
    tiny64: Path, root: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    monkeypatch.setenv("RESCLIP_CACHE", str(blocker))  # no text cache, no default state folder
    argv = ["eval", "--dataset", "voc21", "--root", str(root), "--pretrained", str(tiny64), *FAST, *RUN]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "VOC21: mIoU" in out
    _warned(err, r"cannot save evaluation progress in .*blocker/eval.*cannot be resumed")
    assert _eval(tiny64, root, tmp_path / "out" / "r.json", "--state-dir", str(blocker / "state")) == 0
    _warned(capsys.readouterr().err, "cannot save evaluation progress")
    monkeypatch.setenv("RESCLIP_CACHE", str(tmp_path / "cache"))
    assert _eval(tiny64, root, tmp_path / "ok" / "r.json") == 0
    assert _same(_json(tmp_path / "out" / "r.json"), _json(tmp_path / "ok" / "r.json"))


class _FullDisk(io.FileIO):
    def write(self, data: Any) -> int:
        if len(memoryview(data)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return 0


def _fill(monkeypatch: pytest.MonkeyPatch, full: Path) -> None:
    """Writes of any byte below ``full`` fail as on a full disk (the files get created, empty)."""
    real = builtins.open

    def fake(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if isinstance(file, (str, os.PathLike)) and str(file).startswith(str(full)) and "r" not in mode:
            return _FullDisk(os.fspath(file), "w")
        return real(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake)


def test_full_disk_when_saving_predictions(
    tiny64: Path, root: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    full = tmp_path / "full"
    _fill(monkeypatch, full)
    assert _eval(tiny64, root, full / "r.json", "--save-predictions", str(full / "pred")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    png = full / "pred" / "crop_000.png"
    assert err == f"resclip: error: could not write {str(png)!r}: No space left on device"
    assert _temporaries(tmp_path) == [] and not (full / "r.json").exists()


def test_full_disk_when_writing_results(
    tiny64: Path, root: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    full = tmp_path / "full"
    _fill(monkeypatch, full)
    state = tmp_path / "state"
    assert _eval(tiny64, root, full / "r.json", "--state-dir", str(state)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"resclip: error: could not write {str(full / 'r.json')!r}: No space left on device"
    assert _temporaries(tmp_path) == [] and not (full / "r.json").exists()
    monkeypatch.undo()
    monkeypatch.setenv("RESCLIP_CACHE", str(tmp_path / "cache"))
    assert _eval(tiny64, root, tmp_path / "r.json", "--state-dir", str(state)) == 0
    assert _json(tmp_path / "r.json")["reused_images"] == 3  # the work was kept


SCRIPT = """
import sys, time
import resclip, resclip.eval.loop as ev
seg = resclip.create_segmenter(
    preset="voc21", pretrained=sys.argv[1], sfr=False, short_side=64, rcs_layers=(2, 3)
)
def stuck(*args):
    print("scoring", flush=True)
    time.sleep(600)
ev.segment_mask = stuck
ev.evaluate(seg, "voc21", sys.argv[2], limit=8, workers=2, state_dir=sys.argv[3], progress=False)
"""


def test_loader_workers_die_with_a_killed_eval(tiny64: Path, tmp_path: Path, text_cache: Path) -> None:
    psutil = pytest.importorskip("psutil")
    script = tmp_path / "stuck_eval.py"
    script.write_text(textwrap.dedent(SCRIPT))
    env = {**os.environ, "RESCLIP_CACHE": str(text_cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(script), str(tiny64), str(VOC), str(tmp_path / "state")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "scoring"
        workers = psutil.Process(proc.pid).children(recursive=True)
        assert len(workers) == 2
        time.sleep(1.0)  # the workers fill the (unread) result queue with full-size images
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 3.0

        def alive() -> list[int]:
            out = []
            for w in workers:
                try:
                    if w.status() != psutil.STATUS_ZOMBIE:
                        out.append(w.pid)
                except psutil.NoSuchProcess:
                    pass
            return out

        while alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        left = alive()
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        assert left == [], f"loader workers {left} outlived the killed evaluation"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
