"""DINO and DINOv2 vision transformers through timm: the second backbone of the methods that pair
CLIP with a vision foundation model (ProxyCLIP, Trident, CorrCLIP; groundwork for issue 13).

Sources :func:`load_dino` takes:

* a local checkpoint in the formats people have: facebookresearch's torch.hub ``.pth`` state dicts
  (DINO ``dino_vitb8_pretrain.pth``..., DINOv2 ``dinov2_vitb14_pretrain.pth``..., also a training
  checkpoint's ``teacher`` / ``student`` entry with its ``module.`` / ``backbone.`` prefixes) and
  timm ``.safetensors`` / ``.bin`` files. The architecture is read from the tensor shapes (patch
  size, width, depth, DINOv2's layer scales and register tokens); files are read as tensors only
  (``torch.load(weights_only=True)`` or safetensors), never by running code;
* a timm name with its weights tag (``"vit_base_patch8_224.dino"``) or a torch.hub name
  (``"dino_vitb8"``, ``"dinov2_vitb14"``), downloaded by timm through the Hugging Face cache when
  online (no torch.hub code is run).

The model is timm's ``VisionTransformer`` with ``dynamic_img_size=True`` (any input size that is a
multiple of the patch), in eval mode with gradients off.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoints import _brief, _torch_load, _unpickling_message
from .clip import resolve_device, resolve_precision

__all__ = ["HUB_NAMES", "DinoInfo", "dino_architecture", "load_dino"]

#: facebookresearch torch.hub names -> timm names with their weights tags
HUB_NAMES = {
    "dino_vits16": "vit_small_patch16_224.dino",
    "dino_vits8": "vit_small_patch8_224.dino",
    "dino_vitb16": "vit_base_patch16_224.dino",
    "dino_vitb8": "vit_base_patch8_224.dino",
    "dinov2_vits14": "vit_small_patch14_dinov2.lvd142m",
    "dinov2_vitb14": "vit_base_patch14_dinov2.lvd142m",
    "dinov2_vitl14": "vit_large_patch14_dinov2.lvd142m",
    "dinov2_vitg14": "vit_giant_patch14_dinov2.lvd142m",
}
_SIZES = {384: "small", 768: "base", 1024: "large", 1536: "giant"}
_NESTS = ("teacher", "student", "model", "state_dict")
_PREFIXES = ("module.", "backbone.")


class DinoInfo(dict[str, Any]):
    """What :func:`dino_architecture` read from a state dict (a dict, for messages and records)."""


def _read(path: Path) -> Mapping[str, Any]:
    """A checkpoint's content, tensors and plain containers only (nothing in it runs).

    Raises:
        ValueError: one line naming the file and what is wrong with it.
    """
    import pickle

    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            obj = _torch_load(path)
    except pickle.UnpicklingError as exc:
        raise ValueError(_unpickling_message(path, exc)) from None
    except Exception as exc:
        raise ValueError(f"could not read the DINO checkpoint {str(path)!r} ({_brief(exc)})") from None
    if not isinstance(obj, Mapping):
        raise ValueError(f"the DINO checkpoint {str(path)!r} holds a {type(obj).__name__}, not a state dict")
    return obj


def _unwrap(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The backbone's tensors of a hub file or a training checkpoint (``teacher`` first)."""
    for key in _NESTS:
        inner = state.get(key)
        if isinstance(inner, Mapping) and inner:
            state = inner
            break
    out: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
        if name.startswith("head.") or name == "mask_token":  # DINO's head, DINOv2's masking token
            continue
        out["reg_token" if name == "register_tokens" else name] = value  # timm's name for registers
    return out


def dino_architecture(state: Mapping[str, torch.Tensor]) -> DinoInfo:
    """The dimensions of a DINO / DINOv2 ViT read from its state dict.

    Raises:
        ValueError: not a ViT backbone state dict (no ``patch_embed.proj.weight`` / ``pos_embed``).
    """
    if "patch_embed.proj.weight" not in state or "pos_embed" not in state:
        raise ValueError("not a DINO / DINOv2 ViT state dict (no patch_embed.proj.weight or pos_embed); "
                         "give the backbone's .pth from torch.hub or a timm checkpoint")
    conv = state["patch_embed.proj.weight"]
    width, patch = int(conv.shape[0]), int(conv.shape[-1])
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    registers = int(state["reg_token"].shape[1]) if "reg_token" in state else 0
    side = math.isqrt(int(state["pos_embed"].shape[1]) - 1)  # the class token has a position too
    mlp = int(state["blocks.0.mlp.fc1.weight"].shape[0])
    v2 = "blocks.0.ls1.gamma" in state  # DINOv2's layer scale
    return DinoInfo(width=width, patch=patch, depth=depth, heads=max(1, width // 64), mlp_ratio=mlp / width,
                    image=side * patch, dinov2=v2, registers=registers)


def _timm_name(info: DinoInfo) -> str | None:
    """The timm model name of a standard DINO / DINOv2 size, or None (a custom size)."""
    size = _SIZES.get(info["width"])
    if size is None:
        return None
    if info["dinov2"]:
        depth = {"small": 12, "base": 12, "large": 24, "giant": 40}[size]
        if info["patch"] != 14 or info["depth"] != depth:
            return None
        return f"vit_{size}_patch14_{'reg4_' if info['registers'] == 4 else ''}dinov2"
    if size not in ("small", "base") or info["depth"] != 12 or info["patch"] not in (8, 16):
        return None
    return f"vit_{size}_patch{info['patch']}_224"


def _build(info: DinoInfo) -> nn.Module:
    """An empty timm ViT with these dimensions (a standard config by name when there is one)."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

    common: dict[str, Any] = {"num_classes": 0, "dynamic_img_size": True}
    name = _timm_name(info)
    if name is not None:
        extra = {"img_size": info["image"]} if info["dinov2"] else {}
        return timm.create_model(name, pretrained=False, **common, **extra)
    v2: dict[str, Any] = {"init_values": 1e-5, "reg_tokens": info["registers"]} if info["dinov2"] else {}
    return VisionTransformer(img_size=info["image"], patch_size=info["patch"], embed_dim=info["width"],
                             depth=info["depth"], num_heads=info["heads"], mlp_ratio=info["mlp_ratio"],
                             **common, **v2)


def load_dino(source: str | os.PathLike[str], *, device: str | torch.device = "cpu",
              precision: str = "fp32") -> nn.Module:
    """A DINO / DINOv2 ViT from a local checkpoint or a timm / torch.hub name (see the module doc).

    Returns:
        timm's ``VisionTransformer`` (no classifier head), eval mode, gradients off, on ``device``
        in ``precision``; ``model.dino_info`` records the dimensions read from the file.

    Raises:
        FileNotFoundError: a path that does not exist.
        ValueError: not a DINO / DINOv2 ViT state dict, or tensors that do not fit the architecture
            read from it (one line naming the first differences).
        RuntimeError: a named model's weights could not be downloaded or found in the cache.
    """
    dtype = resolve_precision(precision)
    target = resolve_device(device)
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.exists() or os.sep in text or text.endswith((".pth", ".pt", ".bin", ".safetensors")):
        if not path.is_file():
            raise FileNotFoundError(f"DINO checkpoint not found: {text!r}")
        backbone = _unwrap(_read(path))
        info = dino_architecture(backbone)
        net = _build(info)
        missing, unexpected = net.load_state_dict(backbone, strict=False)
        if missing or unexpected:
            raise ValueError(f"DINO checkpoint {text!r} does not fit a ViT of width {info['width']}, depth "
                             f"{info['depth']}, patch {info['patch']}: missing {sorted(missing)[:4]}, "
                             f"unexpected {sorted(unexpected)[:4]}")
        net.dino_info = info  # type: ignore[assignment]
    else:
        import timm

        name = HUB_NAMES.get(text, text)
        try:
            net = timm.create_model(name, pretrained=True, num_classes=0, dynamic_img_size=True)
        except Exception as err:  # any hub / network / cache error
            raise RuntimeError(f"could not load DINO {text!r} (timm {name!r}): {type(err).__name__}: {err}. "
                               "Offline, download the backbone's .pth once and pass its path") from err
    net = net.to(device=target, dtype=dtype).eval()
    net.requires_grad_(False)
    return net
