"""DINO / DINOv2 backbones through timm from the checkpoint formats people have (groundwork for the
foundation-model methods): facebookresearch hub state dicts, training checkpoints, safetensors;
architecture read from the shapes; features equal to the model the file was saved from."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from resclip.auxiliary import dino_tokens
from resclip.dino import HUB_NAMES, dino_architecture, load_dino

AUX = Path(__file__).parent / "data" / "golden" / "aux"


def _tiny(v2: bool, registers: int = 0) -> VisionTransformer:
    torch.manual_seed(1 + int(v2) + registers)
    extra: dict = {"init_values": 1e-5} if v2 else {}
    if registers:  # timm's DINOv2-with-registers layout: the class token holds its own position
        extra.update(reg_tokens=registers, no_embed_class=True)
    net = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=1, num_classes=0,
                            dynamic_img_size=True, **extra)
    return net.eval()


def _hub_layout(net: VisionTransformer) -> dict[str, torch.Tensor]:
    """The state dict as facebookresearch's hub files hold it (DINOv2: mask_token, register_tokens)."""
    state = {k.replace("reg_token", "register_tokens"): v.clone() for k, v in net.state_dict().items()}
    if "blocks.0.ls1.gamma" in state:
        state["mask_token"] = torch.zeros(1, 64)
    return state


@pytest.mark.parametrize(("v2", "registers"), [(False, 0), (True, 0), (True, 4)])
def test_timm_layout_files_load_with_the_same_features(tmp_path: Path, v2: bool, registers: int):
    """Files in timm's own layout (DINO v1 hub files are that layout too) give the saved model's features."""
    net = _tiny(v2, registers)
    path = tmp_path / "dino.pth"
    torch.save(_hub_layout(net) if not registers else net.state_dict(), path)
    loaded = load_dino(path)
    assert loaded.dino_info == {"width": 64, "patch": 8, "depth": 2, "heads": 1, "mlp_ratio": 4.0,
                                "image": 32, "dinov2": v2, "registers": registers, "swiglu": False}
    x = torch.randn(2, 3, 48, 40)  # any multiple of the patch
    torch.testing.assert_close(loaded.forward_features(x), net.forward_features(x), rtol=0, atol=0)
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training


V2_FILES = {"v2": "dinov2_tiny_fp16.pth", "v2reg": "dinov2_reg_tiny_fp16.pth",
            "v2swiglu": "dinov2_swiglu_tiny_fp16.pth"}
V2_SIZES = {"224x224": 1, "336x336": 2, "280x336": 3, "168x168": 4, "126x182": 5}


@pytest.mark.parametrize("name", list(V2_FILES))
def test_dinov2_hub_files_match_the_hub_code(name: str):
    """DINOv2 state dicts as facebookresearch/dinov2's hub code saves them (plain, with 4 register
    tokens, with the SwiGLU FFN of ViT-g): ``dino_tokens`` equals the hub's
    ``get_intermediate_layers(x)[0]`` bit for bit at the training size, square, non-square and
    non-multiple inputs (the two position resizes: offset 0.1 without registers, antialiased size with
    them); the class token equals ``x_norm_clstoken``. Recorded by running the hub code
    (tests/data/README.md)."""
    ref = np.load(AUX / "dinov2_hub_reference.npz")
    net = load_dino(AUX / V2_FILES[name])
    info = net.dino_info
    assert (info["dinov2"], info["registers"], info["swiglu"], info["patch"], info["image"]) == (
        True, 4 if name == "v2reg" else 0, name == "v2swiglu", 14, 224)
    for size, seed in V2_SIZES.items():
        h, w = map(int, size.split("x"))
        x = np.random.default_rng(seed).standard_normal((1, 3, h, w)).astype(np.float16).astype(np.float32)
        assert hashlib.sha256(x.tobytes()).digest() == ref[f"input__{size}__sha256"].tobytes()
        tokens, grid = dino_tokens(net, torch.from_numpy(x))
        key = f"{name}__{size}"
        assert grid == (h // 14, w // 14)
        np.testing.assert_array_equal(tokens[0, ref[f"{key}__patch_idx"]].numpy(),
                                      ref[f"{key}__patch_tokens_rows"])
        np.testing.assert_allclose(tokens[0].mean(0).numpy(), ref[f"{key}__patch_tokens_mean"].reshape(-1),
                                   rtol=0, atol=1e-6)
        if name == "v2reg":  # timm's own forward resizes the registers model's positions the same way
            feats = net.forward_features(torch.from_numpy(x))
            np.testing.assert_array_equal(feats[0, 5:][ref[f"{key}__patch_idx"]].numpy(),
                                          ref[f"{key}__patch_tokens_rows"])
            np.testing.assert_array_equal(feats[0, 0].numpy(), ref[f"{key}__cls"].reshape(-1))


def test_training_checkpoints_and_safetensors(tmp_path: Path):
    from safetensors.torch import save_file

    net = _tiny(False)
    wrapped = {"teacher": {f"module.backbone.{k}": v for k, v in net.state_dict().items()}
               | {"module.head.mlp.0.weight": torch.zeros(3, 64)}, "epoch": 100}
    torch.save(wrapped, tmp_path / "checkpoint.pth")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp_path / "model.safetensors")
    x = torch.randn(1, 3, 32, 32)
    for name in ("checkpoint.pth", "model.safetensors"):
        torch.testing.assert_close(load_dino(tmp_path / name).forward_features(x), net.forward_features(x))
    half = load_dino(tmp_path / "model.safetensors", precision="bf16")
    assert next(half.parameters()).dtype == torch.bfloat16


def test_standard_sizes_map_to_timm_names():
    from resclip.dino import _timm_name

    base8 = dino_architecture({"patch_embed.proj.weight": torch.zeros(768, 3, 8, 8),
                               "pos_embed": torch.zeros(1, 785, 768),
                               **{f"blocks.{i}.mlp.fc1.weight": torch.zeros(3072, 768) for i in range(12)},
                               "blocks.0.mlp.fc2.weight": torch.zeros(768, 3072)})
    assert base8["image"] == 224 and _timm_name(base8) == "vit_base_patch8_224"
    assert HUB_NAMES["dinov2_vitb14"] == "vit_base_patch14_dinov2.lvd142m"


def test_bad_inputs_give_one_line(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="DINO checkpoint not found"):
        load_dino(tmp_path / "none.pth")
    torch.save({"model": torch.nn.Linear(2, 2)}, tmp_path / "pickled.pth")
    with pytest.raises(ValueError, match="could run code"):
        load_dino(tmp_path / "pickled.pth")
    torch.save({"visual.conv1.weight": torch.zeros(2, 2)}, tmp_path / "clip.pth")
    with pytest.raises(ValueError, match="not a DINO / DINOv2 ViT state dict"):
        load_dino(tmp_path / "clip.pth")
    state = _hub_layout(_tiny(False))
    del state["blocks.1.attn.proj.weight"]
    torch.save(state, tmp_path / "cut.pth")
    with pytest.raises(ValueError, match=r"does not fit a ViT of width 64, depth 2, patch 8: missing"):
        load_dino(tmp_path / "cut.pth")
    with pytest.raises(RuntimeError, match=r"Offline, download the backbone's \.pth once"):
        load_dino("dino_vitb8")  # HF_HUB_OFFLINE in the tests: nothing is cached
