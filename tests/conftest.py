"""Shared fixtures: the golden checkpoint and arrays, tiny random models."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

DATA = Path(__file__).parent / "data"
GOLDEN = DATA / "golden"
BENCH = DATA / "benchmarks"

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def golden() -> dict[str, np.ndarray]:
    """All golden arrays of both files, keyed as in the manifest."""
    out: dict[str, np.ndarray] = {}
    for name in ("golden_resclip.npz", "golden_baselines.npz"):
        with np.load(GOLDEN / name, allow_pickle=False) as f:
            out.update({k: f[k] for k in f.files})
    return out


@pytest.fixture(scope="session")
def manifest() -> dict:
    return json.loads((GOLDEN / "manifest.json").read_text())


@pytest.fixture(scope="session")
def golden_ckpt_b16() -> Path:
    return GOLDEN / "tiny_clip_b16_fp16.pt"


@pytest.fixture(scope="session")
def golden_ckpt_b32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The B/32 golden variant: the B/16 file updated with the delta, saved in OpenAI layout."""
    sd = torch.load(GOLDEN / "tiny_clip_b16_fp16.pt", weights_only=True)
    sd.update(torch.load(GOLDEN / "tiny_clip_b32_delta_fp16.pt", weights_only=True))
    path = tmp_path_factory.mktemp("b32") / "tiny_clip_b32.pt"
    torch.save(sd, path)
    return path


def _build_golden_model(path: Path) -> torch.nn.Module:
    sd = {k: v.float() for k, v in torch.load(path, weights_only=True).items()}
    return open_clip.model.build_model_from_openai_state_dict(sd, quick_gelu=True).float().eval()


@pytest.fixture(scope="session")
def golden_ckpts(golden_ckpt_b16: Path, golden_ckpt_b32: Path) -> dict[str, Path]:
    """The golden checkpoints by kind, as the golden sets name them."""
    return {"b16": golden_ckpt_b16, "b32": golden_ckpt_b32}


@pytest.fixture(scope="session")
def golden_models(golden_ckpt_b16: Path, golden_ckpt_b32: Path) -> dict[str, torch.nn.Module]:
    return {"b16": _build_golden_model(golden_ckpt_b16), "b32": _build_golden_model(golden_ckpt_b32)}


TINY_CFG = {
    "embed_dim": 32,
    "quick_gelu": True,
    # widths are multiples of 64 so that the architecture is inferable from a checkpoint's shapes alone
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 128, "head_width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1},
}


@pytest.fixture(scope="session")
def tiny_arch(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Register a tiny random ViT CLIP with open_clip and return its name."""
    d = tmp_path_factory.mktemp("cfg")
    (d / "resclip-test-tiny.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(d)
    return "resclip-test-tiny"


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_arch: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny checkpoint in OpenAI state-dict layout (architecture inferable from shapes)."""
    torch.manual_seed(0)
    model = open_clip.create_model(tiny_arch, pretrained=None)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def tiny64(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random CLIP checkpoint whose architecture can be inferred from the file alone (any process)."""
    path = tmp_path_factory.getbasetemp() / "tiny64.pt"
    if not path.exists():
        torch.manual_seed(0)
        model = open_clip.CLIP(
            embed_dim=32,
            quick_gelu=True,
            vision_cfg={"image_size": 64, "layers": 4, "width": 64, "head_width": 64, "patch_size": 16},
            text_cfg={"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1},
        )
        torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def small_voc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first VOC fixtures shrunk to 96x80 (same layout, palette and values), for speed."""
    root = tmp_path_factory.mktemp("small") / "VOCdevkit" / "VOC2012"
    ids = (BENCH / "VOCdevkit" / "VOC2012" / "ImageSets/Segmentation/val.txt").read_text().split()[:3]
    for sub, ext, how in (
        ("JPEGImages", ".jpg", Image.Resampling.BILINEAR),
        ("SegmentationClass", ".png", Image.Resampling.NEAREST),
    ):
        (root / sub).mkdir(parents=True)
        for i in ids:
            with Image.open(BENCH / "VOCdevkit" / "VOC2012" / sub / f"{i}{ext}") as img:
                img.resize((96, 80), how).save(root / sub / f"{i}{ext}")
    (root / "ImageSets/Segmentation").mkdir(parents=True)
    (root / "ImageSets/Segmentation/val.txt").write_text("\n".join(ids) + "\n")
    return root


# quick settings for the 4-block tiny model: RCS on its blocks 1-2, one window, no PAMR
CLI_FAST = ["--device", "cpu", "--set", "rcs_layers=(1,2)", "--set", "short_side=128",
            "--set", "slide_crop=0", "--set", "sfr_first_pass_pamr_steps=0"]
DEMO_FAST = (
    ("rcs_layers", (1, 2)), ("sfr_first_pass_pamr_steps", 0), ("short_side", 128), ("slide_crop", 0)
)


@pytest.fixture(scope="module")
def text_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``$RESCLIP_CACHE`` pointed at one session-wide text cache for a whole test module (modules
    that run commands use it with ``pytestmark = pytest.mark.usefixtures("text_cache")``)."""
    cache = tmp_path_factory.getbasetemp() / "resclip-cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RESCLIP_CACHE", str(cache))
        yield cache


@pytest.fixture
def text_cache_env(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """One text-embedding cache for the whole session, through ``$RESCLIP_CACHE``."""
    cache = tmp_path_factory.getbasetemp() / "resclip-cache"
    monkeypatch.setenv("RESCLIP_CACHE", str(cache))
    return cache


@pytest.fixture
def model(tiny_ckpt: Path) -> list[str]:
    """Command-line options loading the tiny checkpoint with the quick settings."""
    return ["--pretrained", str(tiny_ckpt), *CLI_FAST]


@pytest.fixture
def settings(tiny_ckpt: Path) -> object:
    """Demo settings with the tiny checkpoint and the quick settings."""
    from resclip import demo

    return demo.DemoSettings(pretrained=str(tiny_ckpt), device="cpu", overrides=DEMO_FAST)


@pytest.fixture(scope="session")
def photo() -> np.ndarray:
    """A small two-colour noisy photo (60 x 90) for runs that only need some image."""
    rng = np.random.default_rng(1)
    img = np.zeros((60, 90, 3), dtype=np.uint8)
    img[:, :45] = (200, 40, 40)
    img[:, 45:] = (30, 90, 220)
    return np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
