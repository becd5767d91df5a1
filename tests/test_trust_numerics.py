"""Wrong output with exit code 0 (issue 10, section 3): broken weights and negative-only images.

Non-finite values at any stage end with an error naming the stage; a 32-bit image with only
negative values is refused instead of becoming black.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import resclip
from resclip.cli import main
from resclip.preprocess import load_image
from resclip.protocol import ensure_finite

FAST = ["--device", "cpu", "--set", "rcs_layers=(1,2)", "--set", "short_side=64", "--set", "slide_crop=0",
        "--set", "sfr_first_pass_pamr_steps=0"]


@pytest.fixture(scope="module")
def scaled_ckpt(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint with every visual weight multiplied by 1e30 (all values still finite)."""
    sd = torch.load(tiny_ckpt, weights_only=True)
    scaled = {k: v * 1e30 if k.startswith("visual.") and v.is_floating_point() else v for k, v in sd.items()}
    assert all(torch.isfinite(v).all() for v in scaled.values() if v.is_floating_point())
    path = tmp_path_factory.mktemp("scaled") / "scaled.pt"
    torch.save(scaled, path)
    return path


def test_ensure_finite_names_the_stage():
    ok = torch.ones(3)
    assert ensure_finite(ok, "x") is ok
    with pytest.raises(ValueError, match=r"^non-finite values in the stage name \(NaN/inf\): .*pretrained="):
        ensure_finite(torch.tensor([1.0, float("nan")]), "the stage name")
    with pytest.raises(ValueError, match=r"^non-finite values in s \(NaN/inf\): because$"):
        ensure_finite(torch.tensor([float("inf")]), "s", "because")


def test_scaled_weights_raise_from_the_api(scaled_ckpt: Path):
    seg = resclip.create_segmenter(
        pretrained=str(scaled_ckpt), sfr=False, rcs_layers=(2, 3), short_side=64, slide_crop=0,
        text_cache=False,
    )
    image = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    emb = np.random.default_rng(1).normal(size=(3, 32)).astype(np.float32)
    with pytest.raises(ValueError) as err:
        seg.predict(image, ["cat", "dog", "sky"], embeddings=emb)
    message = str(err.value)
    assert message.startswith("non-finite values in the image encoder's patch logits (NaN/inf)")
    assert "checkpoint" in message and "pretrained=" in message and "\n" not in message


def test_scaled_weights_fail_the_segment_command(scaled_ckpt: Path, tmp_path: Path, capsys, monkeypatch):
    monkeypatch.setenv("RESCLIP_CACHE", str(tmp_path / "cache"))
    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "out"
    rc = main(["segment", str(image), "--classes", "cat; dog", "--out", str(out), "--pretrained",
               str(scaled_ckpt), "--no-sfr", *FAST])
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("resclip: error:")]
    assert rc == 2, captured.err
    assert len(errors) == 1, captured.err
    assert "non-finite values in the image encoder's patch logits" in errors[0]
    assert "Traceback" not in captured.err
    assert not out.exists() or not any(out.iterdir())


def test_negative_only_float_image_is_refused(tmp_path: Path):
    negative = Image.fromarray(np.full((8, 10), -3.5, dtype=np.float32), mode="F")
    expected = r"^image \(mode F\) has only negative pixel values \(largest -3\.5\)"
    with pytest.raises(ValueError, match=expected):
        load_image(negative)
    path = tmp_path / "negative.tiff"
    Image.fromarray(np.arange(-80, 0, dtype=np.int32).reshape(8, 10), mode="I").save(path)
    with pytest.raises(ValueError, match=r"\(mode I\) has only negative pixel values \(largest -1\)"):
        load_image(path)


def test_zero_and_mixed_float_images_still_load():
    black = load_image(Image.fromarray(np.zeros((4, 5), dtype=np.float32), mode="F"))
    assert black.shape == (4, 5, 3) and not black.any()
    mixed = load_image(Image.fromarray(np.array([[-1.0, 0.0, 2.0]], dtype=np.float32), mode="F"))
    assert mixed[0, :, 0].tolist() == [0, 0, 255]
