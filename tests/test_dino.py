"""DINO / DINOv2 backbones through timm from the checkpoint formats people have (groundwork for the
foundation-model methods): facebookresearch hub state dicts, training checkpoints, safetensors;
architecture read from the shapes; features equal to the model the file was saved from."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from resclip.dino import HUB_NAMES, dino_architecture, load_dino


def _tiny(v2: bool, registers: int = 0) -> VisionTransformer:
    torch.manual_seed(1 + int(v2) + registers)
    extra = {"init_values": 1e-5, "reg_tokens": registers} if v2 else {}
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
def test_hub_files_load_with_the_same_features(tmp_path: Path, v2: bool, registers: int):
    net = _tiny(v2, registers)
    path = tmp_path / "dino.pth"
    torch.save(_hub_layout(net), path)
    loaded = load_dino(path)
    assert loaded.dino_info == {"width": 64, "patch": 8, "depth": 2, "heads": 1, "mlp_ratio": 4.0,
                                "image": 32, "dinov2": v2, "registers": registers}
    x = torch.randn(2, 3, 48, 40)  # any multiple of the patch
    torch.testing.assert_close(loaded.forward_features(x), net.forward_features(x), rtol=0, atol=0)
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training


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
                               **{f"blocks.{i}.mlp.fc1.weight": torch.zeros(3072, 768) for i in range(12)}})
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
