"""Loading, benchmark resize, normalisation and window layout."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from resclip.preprocess import load_image, normalise, rescale_size, resize_image, window_coords


@pytest.mark.parametrize(
    ("size", "want"),
    [
        ((375, 500), (336, 448)),
        ((500, 375), (448, 336)),
        ((1024, 2048), (336, 672)),
        ((100, 5000), (41, 2048)),  # long side capped: f = 2048 / 5000
        ((1, 1), (336, 336)),  # tiny images are scaled up like any other
        ((7, 300), (48, 2048)),  # f = min(2048/300, 336/7) = 6.83; int(7 * 6.83 + 0.5) = 48
    ],
)
def test_rescale_size(size, want):
    assert rescale_size(*size, 336) == want


def test_rescale_cityscapes():
    assert rescale_size(1024, 2048, 560) == (560, 1120)


@pytest.mark.parametrize(("hw", "n"), [((336, 500), 8), ((560, 1120), 36), ((224, 224), 1), ((100, 300), 2)])
def test_window_counts_and_snapping(hw, n):
    boxes = window_coords(*hw, 224, 112)
    assert len(boxes) == n
    sizes = {(y2 - y1, x2 - x1) for y1, x1, y2, x2 in boxes}
    assert sizes == {(min(224, hw[0]), min(224, hw[1]))}
    assert boxes[-1][2:] == hw
    cover = np.zeros(hw, dtype=int)
    for y1, x1, y2, x2 in boxes:
        cover[y1:y2, x1:x2] += 1
    assert cover.min() >= 1


def test_whole_image_window():
    assert window_coords(300, 400, 0, 112) == [(0, 0, 300, 400)]


def test_normalise_values():
    rgb = np.full((2, 2, 3), 255, dtype=np.uint8)
    x = normalise(rgb)
    assert x.shape == (1, 3, 2, 2)
    assert abs(x[0, 0, 0, 0].item() - (255 - 122.771) / 68.501) < 1e-6


def test_resize_identity_when_size_unchanged():
    rgb = np.zeros((336, 448, 3), dtype=np.uint8)
    assert resize_image(rgb, 336) is rgb


def test_load_image_modes(tmp_path):
    rgba = Image.new("RGBA", (4, 3), (10, 20, 30, 0))
    arr = load_image(rgba)
    assert arr.shape == (3, 4, 3) and arr.dtype == np.uint8
    assert arr[0, 0].tolist() == [255, 255, 255]  # transparent -> white background
    gray16 = Image.fromarray(np.array([[0, 65535]], dtype=np.uint16))
    assert load_image(gray16)[0].tolist() == [[0, 0, 0], [255, 255, 255]]
    cmyk = Image.new("CMYK", (2, 2), (0, 0, 0, 0))
    assert load_image(cmyk)[0, 0].tolist() == [255, 255, 255]
    assert load_image(np.zeros((5, 6), dtype=np.uint8)).shape == (5, 6, 3)


def test_exif_orientation_is_honoured(tmp_path):
    img = Image.new("RGB", (4, 2), (0, 0, 0))
    img.putpixel((0, 0), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif, quality=100)
    out = load_image(path)
    assert out.shape == (4, 2, 3)


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_image(tmp_path / "missing.jpg")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="could not read image"):
        load_image(tmp_path / "notes.txt")
    good = tmp_path / "good.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good)
    (tmp_path / "trunc.png").write_bytes(good.read_bytes()[:40])
    with pytest.raises(ValueError, match="could not read image"):
        load_image(tmp_path / "trunc.png")
    with pytest.raises(ValueError, match=r"shape \(H, W, 3\)"):
        load_image(np.zeros((4, 4, 2), dtype=np.uint8))
    with pytest.raises(ValueError, match="NaN or inf"):
        load_image(np.full((4, 4, 3), np.nan))
    with pytest.raises(ValueError, match="must be uint8"):
        load_image(np.zeros((4, 4, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="empty"):
        load_image(np.zeros((0, 4, 3), dtype=np.uint8))
    with pytest.raises(TypeError, match="must be a path"):
        load_image(42)  # type: ignore[arg-type]


def test_window_padding_is_centred_with_the_smaller_half_first():
    from resclip.preprocess import window_padding

    assert window_padding(336, 336, 56) == (0, 0, 0, 0)
    assert window_padding(300, 250, 56) == (15, 15, 18, 18)  # 250 -> 280, 300 -> 336
    assert window_padding(57, 55, 56) == (0, 1, 27, 28)
    assert window_padding(57, 55, 0) == window_padding(57, 55, 1) == (0, 0, 0, 0)
