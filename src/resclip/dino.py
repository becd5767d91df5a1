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

Position embeddings for an input other than the training size (224): timm resizes them to the
token grid with antialiased bicubic interpolation; facebookresearch's torch.hub DINO code (what the
releases ProxyCLIP, Trident and CorrCLIP run) resizes by a scale factor of ``(grid + 0.1) / side``
with plain bicubic, which gives different values. ``load_dino(..., pos_embed="hub")`` uses the hub's
scheme (:func:`hub_pos_embed`) for release parity; the default ``"timm"`` keeps timm's.
"""

from __future__ import annotations

import math
import os
import re
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .attention import interpolate_pos_embed
from .checkpoints import read_weights_file
from .clip import resolve_device, resolve_precision

__all__ = ["HUB_NAMES", "POS_EMBED_MODES", "DinoInfo", "dino_architecture", "hub_pos_embed", "load_dino",
           "load_mae", "use_hub_pos_embed"]

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
#: how a loaded model resizes its position embeddings to another token grid (see the module doc)
POS_EMBED_MODES = ("timm", "hub")
_SIZES = {384: "small", 768: "base", 1024: "large", 1536: "giant"}
_NESTS = ("teacher", "student", "model", "state_dict")
#: the head counts of the released ViTs whose head width is not 64 (the heads are not in the shapes):
#: ViT-H/14 (MAE's vit_huge_patch14) has 16 heads of 80; every DINO / DINOv2 / MAE S, B, L, g has 64
_HEADS = {1280: 16}
_PREFIXES = ("module.", "backbone.")


class DinoInfo(dict[str, Any]):
    """What :func:`dino_architecture` read from a state dict (a dict, for messages and records)."""


def _read(path: Path) -> Mapping[str, Any]:
    """A DINO checkpoint's content (see :func:`resclip.checkpoints.read_weights_file`)."""
    return read_weights_file(path, "DINO")


def _unwrap(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The backbone's tensors of a hub file or a training checkpoint (``teacher`` first), in timm's
    layout: DINOv2's register tokens become ``reg_token`` with the class token's position folded into
    ``cls_token`` (timm's ``no_embed_class`` layout, the hub's arithmetic: the class token plus its
    position, in float32), and the SwiGLU FFN's ``w12`` / ``w3`` become ``fc1`` / ``fc2``."""
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
        name = re.sub(r"^(blocks\.\d+\.mlp)\.w12\.", r"\1.fc1.", name)  # DINOv2 giant's SwiGLU
        name = re.sub(r"^(blocks\.\d+\.mlp)\.w3\.", r"\1.fc2.", name)
        out["reg_token" if name == "register_tokens" else name] = value  # timm's name for registers
    pos = out.get("pos_embed")
    if "reg_token" in out and "cls_token" in out and pos is not None and _square(pos.shape[1] - 1):
        # a hub file (class position inside pos_embed), not a timm file (patch positions only)
        out["cls_token"] = out["cls_token"].float() + pos[:, :1].float()
        out["pos_embed"] = pos[:, 1:]
    return out


def _square(n: int) -> bool:
    return n > 0 and math.isqrt(n) ** 2 == n


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
    # with registers the positions are the patches' only (timm's layout, see _unwrap)
    side = math.isqrt(int(state["pos_embed"].shape[1]) - (0 if registers else 1))
    mlp = int(state["blocks.0.mlp.fc1.weight"].shape[0])
    swiglu = int(state["blocks.0.mlp.fc2.weight"].shape[1]) * 2 == mlp  # fc1 holds the gate and the value
    v2 = "blocks.0.ls1.gamma" in state  # DINOv2's layer scale
    heads = _HEADS.get(width, max(1, width // 64))
    return DinoInfo(width=width, patch=patch, depth=depth, heads=heads, mlp_ratio=mlp / width,
                    image=side * patch, dinov2=v2, registers=registers, swiglu=swiglu)


def _timm_name(info: DinoInfo) -> str | None:
    """The timm model name of a standard DINO / DINOv2 size, or None (a custom size)."""
    size = _SIZES.get(info["width"])
    if size is None:
        return None
    if info["dinov2"]:
        depth = {"small": 12, "base": 12, "large": 24, "giant": 40}[size]
        if info["patch"] != 14 or info["depth"] != depth or info["swiglu"] != (size == "giant"):
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
    v2: dict[str, Any] = {"init_values": 1e-5} if info["dinov2"] else {}
    if info["registers"]:
        v2.update(reg_tokens=info["registers"], no_embed_class=True)
    if info["swiglu"]:
        from timm.layers import SwiGLUPacked

        v2.update(mlp_layer=SwiGLUPacked, act_layer=nn.SiLU)
    return VisionTransformer(img_size=info["image"], patch_size=info["patch"], embed_dim=info["width"],
                             depth=info["depth"], num_heads=info["heads"], mlp_ratio=info["mlp_ratio"],
                             **common, **v2)


def _build_loaded(tensors: Mapping[str, torch.Tensor], info: DinoInfo, what: str) -> nn.Module:
    """A timm ViT with ``info``'s dimensions holding exactly ``tensors`` (``model.dino_info = info``).

    Raises:
        ValueError: naming ``what``: a tensor of the wrong shape, a missing or an unexpected one.
    """
    net = _build(info)
    dims = f"width {info['width']}, depth {info['depth']}, patch {info['patch']}"
    try:
        missing, unexpected = net.load_state_dict(tensors, strict=False)
    except RuntimeError as err:  # tensors of the wrong shape
        wrong = [line.strip() for line in str(err).splitlines() if "size mismatch" in line]
        raise ValueError(f"{what} does not fit the ViT read from it ({dims}): "
                         f"{wrong[0] if wrong else err}") from None
    if missing or unexpected:
        raise ValueError(f"{what} does not fit a ViT of {dims}: missing {sorted(missing)[:4]}, "
                         f"unexpected {sorted(unexpected)[:4]}")
    net.dino_info = info  # type: ignore[assignment]
    return net


def hub_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Position embeddings resized to a token grid the way facebookresearch's torch.hub DINO does it.

    The patch positions, a ``side x side`` square, are resized by bicubic interpolation
    (``align_corners=False``, no antialiasing) with the scale factors ``(rows + 0.1) / side`` and
    ``(cols + 0.1) / side`` rather than to a target size: the output has ``rows x cols`` positions, but
    the sampling points follow the offset scale, so values differ from timm's size-based resize. The
    square grid is returned unchanged. This is :func:`resclip.attention.interpolate_pos_embed` (float32
    inside, cast back; the hub code interpolates in the weights' dtype: the same in fp32) on a batch of one.

    Args:
        pos_embed: ``(1, 1 + side * side, C)``, the class token's position first.
        grid: the token grid ``(rows, cols)`` of the input (image height and width over the patch).

    Returns:
        ``(1, 1 + rows * cols, C)``.
    """
    return interpolate_pos_embed(pos_embed[0], int(grid[0]), int(grid[1]))[None]


def _hub_pos_embed_tokens(self: Any, x: torch.Tensor) -> torch.Tensor:
    """timm ``VisionTransformer._pos_embed`` with :func:`hub_pos_embed`: ``(B, H, W, C)`` patch tokens ->
    ``(B, 1 + H * W, C)`` tokens with the class token first and positions added."""
    batch, rows, cols, dim = x.shape
    tokens = torch.cat((self.cls_token.expand(batch, -1, -1), x.reshape(batch, rows * cols, dim)), dim=1)
    return self.pos_drop(tokens + hub_pos_embed(self.pos_embed, (rows, cols)))


def use_hub_pos_embed(net: nn.Module) -> nn.Module:
    """Make a timm ViT from :func:`load_dino` resize its position embeddings like the torch.hub code.

    A model with register tokens (``dinov2_vit*14_reg``) already does: the hub builds those with
    ``interpolate_offset=0`` and antialiasing, timm's own resize; it is returned unchanged.

    Raises:
        ValueError: a model without a class token whose position is in ``pos_embed`` (and no registers).
    """
    if getattr(net, "reg_token", None) is not None and getattr(net, "no_embed_class", False):
        net.pos_embed_mode = "hub"  # type: ignore[assignment]
        return net
    if (getattr(net, "cls_token", None) is None or getattr(net, "no_embed_class", True)
            or not getattr(net, "dynamic_img_size", False)):
        raise ValueError("pos_embed='hub' needs a DINO ViT with a class token, loaded by "
                         "resclip.dino.load_dino; use pos_embed='timm' for this model")
    net._pos_embed = types.MethodType(_hub_pos_embed_tokens, net)  # type: ignore[assignment]
    net.pos_embed_mode = "hub"  # type: ignore[assignment]
    return net


def load_dino(source: str | os.PathLike[str], *, device: str | torch.device = "cpu",
              precision: str = "fp32", pos_embed: str = "timm") -> nn.Module:
    """A DINO / DINOv2 ViT from a local checkpoint or a timm / torch.hub name (see the module doc).

    Args:
        pos_embed: ``"timm"`` (timm's resize of the position embeddings) or ``"hub"`` (the torch.hub
            code's: :func:`hub_pos_embed` without registers, timm's own with them), see the module doc.

    Returns:
        timm's ``VisionTransformer`` (no classifier head), eval mode, gradients off, on ``device``
        in ``precision``; ``model.dino_info`` records the dimensions read from the file,
        ``model.pos_embed_mode`` the ``pos_embed`` choice.

    Raises:
        FileNotFoundError: a path that does not exist.
        ValueError: not a DINO / DINOv2 ViT state dict, or tensors that do not fit the architecture
            read from it (one line naming the first differences).
        RuntimeError: a named model's weights could not be downloaded or found in the cache.
    """
    if pos_embed not in POS_EMBED_MODES:
        raise ValueError(f"pos_embed={pos_embed!r} is not one of {POS_EMBED_MODES}")
    dtype = resolve_precision(precision)
    target = resolve_device(device)
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.exists() or os.sep in text or text.endswith((".pth", ".pt", ".bin", ".safetensors")):
        if not path.is_file():
            raise FileNotFoundError(f"DINO checkpoint not found: {text!r}")
        backbone = _unwrap(_read(path))
        info = dino_architecture(backbone)
        net = _build_loaded(backbone, info, f"DINO checkpoint {text!r}")
    else:
        import timm

        name = HUB_NAMES.get(text, text)
        try:
            net = timm.create_model(name, pretrained=True, num_classes=0, dynamic_img_size=True)
        except Exception as err:  # any hub / network / cache error
            raise RuntimeError(f"could not load DINO {text!r} (timm {name!r}): {type(err).__name__}: {err}. "
                               "Offline, download the backbone's .pth once and pass its path") from err
    if pos_embed == "hub":
        use_hub_pos_embed(net)
    else:
        net.pos_embed_mode = "timm"  # type: ignore[assignment]
    net = net.to(device=target, dtype=dtype).eval()
    net.requires_grad_(False)
    return net


#: keys of an MAE pre-training checkpoint that are not the encoder (the decoder and its mask token)
_MAE_EXTRA = ("decoder_", "mask_token")


def load_mae(source: str | os.PathLike[str], *, device: str | torch.device = "cpu",
             precision: str = "fp32") -> nn.Module:
    """An MAE encoder (He et al., facebookresearch/mae) from its pre-training checkpoint, for
    ProxyCLIP's ``vfm="mae"`` proxy (:func:`resclip.auxiliary.mae_tokens`).

    The file is MAE's ``{"model": state_dict}`` (``mae_pretrain_vit_base.pth``...: timm ViT key names,
    the decoder's ``decoder_*`` keys and ``mask_token``, which are dropped; also a bare state dict),
    read as tensors only. The encoder's position embeddings stay at the training grid; the tokens
    function resizes them as MAE's fine-tuning code does.

    Returns:
        timm's ``VisionTransformer`` (no head), eval mode, gradients off, on ``device`` in
        ``precision``; ``model.dino_info`` records the dimensions, ``model.aux_family = "mae"``.

    Raises:
        FileNotFoundError: no such file. ValueError: not a ViT encoder, or tensors that do not fit.
    """
    text = os.fspath(source)
    path = Path(text).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"MAE checkpoint not found: {text!r} (MAE weights are local files, e.g. "
                                "mae_pretrain_vit_base.pth from facebookresearch/mae)")
    state = read_weights_file(path, "MAE")
    inner = state.get("model")
    tensors = {k: v for k, v in (inner if isinstance(inner, Mapping) else state).items()
               if isinstance(v, torch.Tensor) and not k.startswith(_MAE_EXTRA) and not k.startswith("head.")}
    try:
        info = dino_architecture(tensors)
    except ValueError:
        raise ValueError(f"{text!r} is not an MAE ViT encoder checkpoint (no patch_embed.proj.weight or "
                         "pos_embed); give MAE's pre-training .pth") from None
    net = _build_loaded(tensors, info, f"MAE checkpoint {text!r}")
    net.aux_family = "mae"  # type: ignore[assignment]
    net = net.to(device=resolve_device(device), dtype=resolve_precision(precision)).eval()
    net.requires_grad_(False)
    return net
