"""resclip.regions: instance maps read from a folder (CorrCLIP's pre-generated masks), safely, with
one-line errors; the folder rules segment, eval and label share."""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from resclip import regions
from resclip.regions import RegionsError

FIX = "give an (H, W) integer label map as .npz (key instance_mask), .npy or a 1-channel PNG"


def test_formats(tmp_path: Path):
    """CorrCLIP's files (``<stem>.npz`` with ``instance_mask``), a one-array npz, a npy and 8 / 16-bit
    PNGs give the same labels in a type every torch reads (stored int16 / int32 kept, booleans as uint8,
    uint16 widened to int64)."""
    labels = (np.arange(35, dtype=np.int64).reshape(5, 7) * 37) % 300  # values above 255 for the 16-bit PNG
    np.savez_compressed(tmp_path / "a.npz", instance_mask=labels.astype(np.int32))
    np.savez(tmp_path / "b.npz", labels.astype(np.int16))
    np.save(tmp_path / "c.npy", labels.astype(np.uint16))
    Image.fromarray(labels.astype(np.uint16)).save(tmp_path / "d.png")
    Image.fromarray((labels % 256).astype(np.uint8)).save(tmp_path / "e.png")
    np.save(tmp_path / "f.npy", labels > 100)
    for name, dtype in (("a.npz", np.int32), ("b.npz", np.int16), ("c.npy", np.int64), ("d.png", np.int64)):
        got = regions.read(tmp_path / name)
        assert got.dtype == dtype, name
        np.testing.assert_array_equal(got, labels, err_msg=name)
    np.testing.assert_array_equal(regions.read(tmp_path / "e.png"), labels % 256)
    flags = regions.read(tmp_path / "f.npy")
    assert flags.dtype == np.uint8 and flags.sum() == (labels > 100).sum()


def test_lookup_identity_and_folder_checks(tmp_path: Path):
    np.save(tmp_path / "a.npy", np.zeros((2, 2), np.int64))
    np.savez(tmp_path / "a.npz", instance_mask=np.ones((2, 2), np.int64))
    (tmp_path / "sub").mkdir()
    np.save(tmp_path / "sub" / "photo.npy", np.full((2, 2), 3, np.int64))
    assert regions.find(tmp_path, "a") == tmp_path / "a.npz"  # .npz first
    # a labelling id keeps its image suffix: the map without it is found (for ids only; a stem with a
    # dot, frame.0001, never falls back to another image's frame.npy)
    assert regions.find(tmp_path, "sub/photo.jpg", strip_image_suffix=True) == tmp_path / "sub" / "photo.npy"
    assert regions.find(tmp_path, "sub/photo.jpg") is None
    np.save(tmp_path / "frame.npy", np.zeros((2, 2), np.int64))
    assert regions.find(tmp_path, "frame.0001") is None and regions.find(tmp_path, "frame.0001", True) is None
    np.save(tmp_path.parent / "outside.npy", np.zeros((2, 2), np.int64))
    assert regions.find(tmp_path, "../outside") is None  # never outside the folder
    assert regions.find(tmp_path, "zzz") is None and regions.identity(tmp_path, "zzz") == ""
    assert regions.load(tmp_path, "sub/photo.jpg", strip_image_suffix=True).max() == 3
    labels, ident = regions.load_with_identity(tmp_path, "a")
    assert labels.max() == 1 and ident == regions.identity(tmp_path, "a")
    name, digest = regions.identity(tmp_path, "a").split()
    assert name == "a.npz" and len(digest) == 64
    np.savez(tmp_path / "a.npz", instance_mask=np.full((2, 2), 2, np.int64))
    assert regions.identity(tmp_path, "a").split()[1] != digest  # the content, not the name
    with pytest.raises(RegionsError, match=r"^no instance map for 'b' in .* \(expected <name>.npz, .npy or "):
        regions.load(tmp_path, "b")
    with pytest.raises(RegionsError, match=r"^1 of 3 images have no instance map in .* \(first: 'b'; "):
        regions.check_folder(tmp_path, ["a", "b", "sub/photo"])
    assert regions.check_folder(tmp_path, ["a"]) == tmp_path.resolve()
    with pytest.raises(RegionsError, match=r"^instance-map folder '.*none' does not exist$"):
        regions.resolve_dir(tmp_path / "none")
    home = Path("~").expanduser()
    assert regions.resolve_dir("~") == home.resolve()
    assert regions.unused_message("naclip", "maps") == (
        "instance maps from 'maps' would not be used: method 'naclip' reads no regions; use corrclip or "
        "--set region_vote=True")


class _Boom:
    def __reduce__(self):
        return (print, ("pickle ran",))


def _bad_files(folder: Path) -> dict[str, str]:
    """Files that must be refused, and the words their one-line error holds."""
    np.save(folder / "obj.npy", np.array([_Boom()], dtype=object), allow_pickle=True)
    np.save(folder / "obj2d.npy", np.array([[_Boom()]], dtype=object), allow_pickle=True)
    np.savez(folder / "obj.npz", instance_mask=np.array([_Boom()], dtype=object))
    (folder / "pick.npy").write_bytes(pickle.dumps(_Boom()))
    np.savez(folder / "two.npz", x=np.zeros((2, 2), np.int64), y=np.zeros((2, 2), np.int64))
    np.save(folder / "float.npy", np.zeros((4, 4), np.float32))
    np.save(folder / "cube.npy", np.zeros((2, 4, 4), np.int64))
    (folder / "bad.npz").write_bytes(b"not a zip")
    Image.new("RGB", (4, 4)).save(folder / "rgb.png")
    full = io.BytesIO()
    np.save(full, np.zeros((64, 64), np.int64))
    (folder / "short.npy").write_bytes(full.getvalue()[:200])  # truncated data
    (folder / "header.npy").write_bytes(b"\x93NUMPY\x01\x00\x10\x00{'descr': nope}\n")
    buf = io.BytesIO()
    np.savez_compressed(buf, instance_mask=np.arange(4096, dtype=np.int64).reshape(64, 64))
    raw = bytearray(buf.getvalue())
    with zipfile.ZipFile(io.BytesIO(bytes(raw))) as z:
        info = z.infolist()[0]
    start = info.header_offset + 30 + len(info.filename) + len(info.extra) + 40
    raw[start:start + 64] = bytes(64)  # corrupt the deflate stream of the member
    (folder / "zlib.npz").write_bytes(bytes(raw))
    (folder / "bomb.png").write_bytes(b"")
    huge = io.BytesIO()
    np.save(huge, np.zeros((2, 2), np.int64))
    header = huge.getvalue().replace(b"(2, 2)", b"(200000, 200000)")  # 2.9e11 bytes if believed
    (folder / "huge.npy").write_bytes(header)
    with zipfile.ZipFile(folder / "huge.npz", "w") as z:
        z.writestr("instance_mask.npy", header)
    return {
        "obj.npy": "holds pickled objects, which are never loaded",
        "obj.npz": "holds pickled objects, which are never loaded",
        "pick.npy": "is not a .npy array file",
        "two.npz": "holds 2 arrays and no 'instance_mask'",
        "float.npy": "is a float32 array of shape (4, 4), not an (H, W) integer map",
        "obj2d.npy": "holds pickled objects",
        "cube.npy": "of shape (2, 4, 4), not an (H, W) integer map",
        "bad.npz": "is not a .npz (zip) archive",
        "rgb.png": "is a RGB image, not one channel of labels",
        "short.npy": "cannot be read (ValueError",
        "header.npy": "has a malformed .npy header",
        "zlib.npz": "cannot be read (",
        "bomb.png": "cannot be read (",
        "huge.npy": "declares 200000 x 200000 labels, more than any image resclip reads",
        "huge.npz": "declares 200000 x 200000 labels",
    }


def test_bad_files_are_refused_in_one_line_without_running_code(tmp_path: Path, capsys):
    for name, words in _bad_files(tmp_path).items():
        with pytest.raises(RegionsError) as err:
            regions.read(tmp_path / name)
        msg = str(err.value)
        assert "\n" not in msg and str(tmp_path / name) in msg and words in msg, (name, msg)
        assert msg.endswith(FIX), (name, msg)
    assert "pickle ran" not in capsys.readouterr().out


def test_decompression_bomb_png_is_one_line(tmp_path: Path, monkeypatch):
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 64 x 64 > 2 x 100: PIL's bomb error
    with pytest.raises(RegionsError, match=r"cannot be read \(DecompressionBombError"):
        regions.read(tmp_path / "big.png")
