"""`resclip segment` under a full disk and with bytes that are not UTF-8 (issue 10, section 5)."""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
from pathlib import Path
from typing import Any

import pytest

from conftest import CLI_FAST
from resclip.cli import main

BENCH = Path(__file__).parent / "data" / "benchmarks"
BIRD = BENCH / "VOCdevkit" / "VOC2012" / "JPEGImages" / "crop_114.jpg"
OTHER = BENCH / "coco_stuff164k" / "images" / "val2017" / "000000007977.jpg"
CLASSES = "bird; water, lake; sky"
FAST = CLI_FAST


pytestmark = pytest.mark.usefixtures("text_cache_env")


class _FullFile:
    """A file opened for writing on a full disk: every write fails with ENOSPC."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle

    def write(self, data: Any) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __enter__(self) -> _FullFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)


@pytest.fixture
def full_disk_for(monkeypatch: pytest.MonkeyPatch):
    """Make writes to files whose name holds a given fragment fail as on a full disk."""
    fragments: list[str] = []
    real_open = builtins.open

    def fake_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        handle = real_open(file, mode, *args, **kwargs)
        if "w" in mode and isinstance(file, (str, os.PathLike)) and any(
                f in os.path.basename(os.fspath(file)) for f in fragments):
            return _FullFile(handle)
        return handle

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)
    return fragments


def _run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return rc, err


def test_full_disk_leaves_no_partial_outputs_and_goes_on(tmp_path, capsys, model, full_disk_for):
    out = tmp_path / "out"
    full_disk_for.append("crop_114_overlay.png")
    rc, err = _run(capsys, "segment", BIRD, OTHER, "--classes", CLASSES, "--out", out, "--quiet", *model)
    assert rc == 2
    assert err.splitlines() == [
        f"resclip: error: {str(BIRD)!r}: could not write {str(out / 'crop_114_overlay.png')!r}: "
        "No space left on device; skipped",
        f"resclip: error: 1 of 2 images failed ({BIRD}); the other 1 were written to {str(out)!r}",
    ]
    # the bird left nothing (no mask without its overlay and JSON, no temporary file); the other is whole
    assert sorted(p.name for p in out.iterdir()) == ["000000007977.json", "000000007977_mask.png",
                                                     "000000007977_overlay.png"]


def test_full_disk_on_a_single_image(tmp_path, capsys, model, full_disk_for):
    out = tmp_path / "out"
    full_disk_for.append("crop_114.json")
    rc, err = _run(capsys, "segment", BIRD, "--classes", CLASSES, "--out", out, *model)
    assert rc == 2
    assert err.splitlines() == [
        f"resclip: error: {str(BIRD)!r}: could not write {str(out / 'crop_114.json')!r}: "
        "No space left on device"
    ]
    assert list(out.iterdir()) == []


def test_invalid_utf8_in_classes_is_one_clear_error(tmp_path, capsys, model):
    classes = os.fsdecode(b"caf\xff; sky")  # what Python makes of a Latin-1 argument in a UTF-8 locale
    rc, err = _run(capsys, "segment", BIRD, "--classes", classes, "--out", tmp_path / "o", *model)
    assert rc == 2
    assert err.splitlines() == [
        "resclip: error: class 1 ('caf\\udcff') holds a character that is not valid text (the byte 0xff): "
        "the names must be UTF-8 (e.g. a UTF-8 terminal, LANG=C.UTF-8, or a UTF-8 class file); retype them"
    ]
    assert not (tmp_path / "o").exists()


def test_image_name_that_is_not_utf8_is_kept_in_the_json(tmp_path, capsys, model):
    image = tmp_path / os.fsdecode(b"ph\xefoto.jpg")
    image.write_bytes(BIRD.read_bytes())
    rc, err = _run(capsys, "segment", image, "--classes", CLASSES, "--out", tmp_path / "o", "--quiet", *model)
    assert rc == 0, err
    record = json.loads((tmp_path / "o" / os.fsdecode(b"ph\xefoto.json")).read_bytes())
    assert os.fsencode(record["image"]) == os.fsencode(str(image))
    assert os.fsencode(record["mask"]) == b"ph\xefoto_mask.png"
