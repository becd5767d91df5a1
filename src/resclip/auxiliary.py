"""Auxiliary models: the second backbones some methods read next to CLIP (issue 13).

A method names the kinds it needs (:attr:`resclip.methods.BaseAttention.aux_models`); the user gives
one source per kind (``create_segmenter(..., aux_pretrained={"dino": PATH})``, on the command line
``--aux-pretrained dino=PATH``); :func:`load_aux` loads each once per process and device / precision,
so segmenters, method variants (``with_method``) and ``resclip compare`` share one copy.

Kinds (:data:`AUX_KINDS`):

* ``"dino"``: a DINO or DINOv2 ViT (:func:`resclip.dino.load_dino`: a hub ``.pth``, a training
  checkpoint, a timm file, or a hub / timm name);
* ``"sam"``: SAM's image encoder (:func:`resclip.sam.load_sam`, where that module is installed);
* ``"mae"``: an MAE ViT encoder from its pre-training checkpoint (:func:`resclip.dino.load_mae`).

The DINO forward of the releases (``get_intermediate_layers(x)[0]`` of facebookresearch's hub code:
positional embedding resized bicubically with the ``+0.1`` scale factor, every block, the final
LayerNorm) is :func:`dino_tokens`, ProxyCLIP's SAM features :func:`sam_tokens`; :func:`imagenet_input`
re-normalises CLIP-normalised windows with ImageNet statistics, as they do.
"""

from __future__ import annotations

import importlib
import math
import os
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .attention import interpolate_pos_embed

__all__ = [
    "AUX_KINDS",
    "aux_digest",
    "aux_patch_size",
    "check_aux_sources",
    "clear_aux_cache",
    "dino_tokens",
    "imagenet_input",
    "load_aux",
    "mae_tokens",
    "missing_aux_message",
    "sam_tokens",
]

#: kind -> (module, loader function, pip extra); the module is imported only when the kind is loaded
AUX_KINDS: dict[str, tuple[str, str, str]] = {
    "dino": ("resclip.dino", "load_dino", "dino"),
    "sam": ("resclip.sam", "load_sam", "sam"),
    "mae": ("resclip.dino", "load_mae", "dino"),
}
#: loader keywords per kind: one loaded model serves every method, so it is loaded as the releases
#: run it (DINO: the torch.hub code's position-embedding resize)
_LOADER_OPTIONS: dict[str, dict[str, Any]] = {"dino": {"pos_embed": "hub"}}

# CLIP's and ImageNet's normalisation statistics (images in [0, 1])
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_cache: dict[tuple[Any, ...], Any] = {}
_lock = threading.Lock()


def check_aux_sources(sources: Mapping[str, Any]) -> dict[str, str]:
    """``{kind: source}`` with each kind checked and each source as text.

    Raises:
        ValueError: an unknown kind (the message lists the known ones) or an empty source.
    """
    out: dict[str, str] = {}
    for kind, source in sources.items():
        key = str(kind).strip().lower()
        if key not in AUX_KINDS:
            raise ValueError(f"unknown auxiliary model kind {kind!r}; known kinds: {', '.join(AUX_KINDS)}")
        text = os.fspath(source) if isinstance(source, (str, os.PathLike)) else None
        if not text:
            raise ValueError(f"aux_pretrained[{key!r}] must be a checkpoint path or a model name, "
                             f"got {source!r}")
        out[key] = text
    return out


def missing_aux_message(method: str, kind: str) -> str:
    """The one-line error for a method run without the auxiliary model ``kind`` it reads."""
    return (f"method {method!r} needs a {kind} model: pass aux_pretrained={{{kind!r}: PATH}} to "
            f"create_segmenter (command line: --aux-pretrained {kind}=PATH)")


def _loader(kind: str) -> Callable[..., Any]:
    module_name, function, extra = AUX_KINDS[kind]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name == module_name:  # the loader itself is not part of this installation
            raise ValueError(f"auxiliary models of kind {kind!r} are not supported by this version of "
                             "resclip") from None
        raise ImportError(f"the {kind} model needs the package {err.name!r}: pip install 'resclip[{extra}]'"
                          ) from None
    loader: Callable[..., Any] = getattr(module, function)
    return loader


def _source_key(source: str) -> tuple[Any, ...]:
    """A local file by its resolved path and identity (a replaced file is loaded again), a name as is."""
    path = Path(source).expanduser()
    if path.is_file():
        st = path.stat()
        return ("file", str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    return ("name", source)


def load_aux(kind: str, source: str | os.PathLike[str], device: str | torch.device = "cpu",
             precision: str = "fp32") -> Any:
    """The auxiliary model ``kind`` from ``source``, loaded once per process for each device and
    precision (later calls return the same object; it is shared, never modify it).

    Args:
        kind: one of :data:`AUX_KINDS`.
        source: a local checkpoint or a model name the kind's loader takes.
        device, precision: as for :func:`resclip.create_segmenter`.

    Raises:
        ValueError: unknown kind, or a bad checkpoint (the loader's one-line message).
        ImportError: a package the kind needs is missing (the message names ``resclip[<kind>]``).
        FileNotFoundError: a path that does not exist.
    """
    from .clip import resolve_device, resolve_precision

    (key, text), = check_aux_sources({kind: source}).items()
    dtype = resolve_precision(precision)
    target = resolve_device(device)
    cache_key = (key, _source_key(text), str(target), dtype)
    with _lock:  # one load per key, even when several threads ask at once
        model = _cache.get(cache_key)
        if model is None:
            try:
                model = _loader(key)(text, device=target, precision=precision, **_LOADER_OPTIONS.get(key, {}))
            except ImportError as err:
                if "resclip[" in str(err):
                    raise
                extra = AUX_KINDS[key][2]
                raise ImportError(f"the {key} model needs a missing package ({err}): "
                                  f"pip install 'resclip[{extra}]'") from None
            model.aux_kind = key
            _cache[cache_key] = model
    return model


def clear_aux_cache() -> None:
    """Forget every loaded auxiliary model (segmenters that hold one keep it)."""
    with _lock:
        _cache.clear()


def aux_digest(model: Any) -> str:
    """sha256 of a loaded auxiliary model's weights (:func:`resclip.digest.module_digest` of the module,
    or of its ``.model`` for a wrapper), computed once per model object."""
    from .digest import module_digest

    with _lock:
        digest = getattr(model, "aux_digest", None)
        if digest is None:
            module = model if isinstance(model, torch.nn.Module) else model.model
            digest = module_digest(module)
            model.aux_digest = digest
    return str(digest)


def aux_patch_size(model: Any) -> int:
    """Patch size of a ViT auxiliary model (DINO: the stride of its patch embedding)."""
    return int(model.patch_embed.proj.weight.shape[-1])


def imagenet_input(crops: torch.Tensor) -> torch.Tensor:
    """CLIP-normalised ``(B, 3, H, W)`` windows re-normalised with ImageNet statistics.

    The same two steps and roundings as the releases: ``x * std_clip + mean_clip``, then
    ``(x - mean_in) / std_in``, per channel (float32).
    """
    x = crops.float()
    shape = (1, 3, 1, 1)

    def stat(values: tuple[float, ...]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=x.device).view(shape)

    return x.mul(stat(CLIP_STD)).add_(stat(CLIP_MEAN)).sub_(stat(IMAGENET_MEAN)).div_(stat(IMAGENET_STD))


def _explicit_block(block: Any, x: torch.Tensor, budget: int = 1 << 26) -> torch.Tensor:
    """One timm ViT block with its attention formed as the hub DINO code forms it:
    ``softmax((q @ k^T) * scale) @ v``, bit-identical to the hub.

    The maps are formed a group of heads at a time (at most ``budget`` elements, at least one head),
    each group holding at least two ``(N, N)`` products: a single one runs as a plain matrix product,
    whose rounding differs from the batched product the hub code runs.
    """
    attn = block.attn
    y = block.norm1(x)
    b, n, c = y.shape
    heads = attn.num_heads
    qkv = attn.qkv(y).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    size = max(1 if b > 1 else 2, budget // max(1, b * n * n))
    out = torch.empty_like(v)
    for start in range(0, heads, size):
        hs = slice(start, min(heads, start + size))
        scores = ((q[:, hs] @ k[:, hs].transpose(-2, -1)) * attn.scale).softmax(dim=-1)
        out[:, hs] = scores @ v[:, hs]
    x = x + block.ls1(attn.proj(out.transpose(1, 2).reshape(b, n, c)))
    return x + block.ls2(block.mlp(block.norm2(x)))


def dino_tokens(
    model: Any, images: torch.Tensor, explicit: bool = False
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Last-block patch tokens of a DINO / DINOv2 ViT, as ``get_intermediate_layers(images)[0]`` of
    facebookresearch's hub code computes them (after the final norm; class and register tokens
    dropped).

    The position embeddings are resized to the ``(H // p, W // p)`` grid (trailing pixels that do
    not fill a patch are dropped, as there) the way the hub models do it:

    * without register tokens (DINO, DINOv2 ``dinov2_vit*14``): bicubic with the scale factor
      ``(n + 0.1) / side`` (:func:`resclip.attention.interpolate_pos_embed`);
    * with register tokens (``dinov2_vit*14_reg``, built with ``interpolate_offset=0`` and
      ``interpolate_antialias=True``): antialiased bicubic to the grid's size, the class token
      carrying its own position (timm's layout, see :func:`resclip.dino.load_dino`); the registers
      follow the class token and get no position.

    Args:
        model: a DINO / DINOv2 ViT from :func:`resclip.dino.load_dino`.
        images: ``(B, 3, H, W)`` ImageNet-normalised images.
        explicit: form every attention map explicitly, as the DINO (v1) hub code (its tokens bit for
            bit; about 4x slower on a CPU); False runs the model's own blocks (fused attention, ~1e-6
            apart). DINOv2's hub code runs fused attention itself: its blocks always run fused.

    Returns:
        ``(B, h*w, C)`` tokens in the model's dtype, and the grid ``(h, w)``.
    """
    x, (h, w) = _patch_tokens(model, images)
    b = x.shape[0]
    cls = model.cls_token.to(x.dtype).expand(b, -1, -1)
    registers = getattr(model, "reg_token", None)
    if registers is None:
        pos = interpolate_pos_embed(model.pos_embed[0], h, w).to(x.dtype)
        x = torch.cat([cls, x], dim=1) + pos
        first = 1
    else:
        # the hub's dinov2_vit*14_reg models resize with antialiasing to the grid's size
        x = x + _resize_positions(model.pos_embed, (h, w), antialias=True).to(x.dtype)
        x = torch.cat([cls, registers.to(x.dtype).expand(b, -1, -1), x], dim=1)
        first = 1 + registers.shape[1]
    explicit = explicit and isinstance(model.blocks[0].ls1, torch.nn.Identity)  # DINO v1 only
    for block in model.blocks:
        x = _explicit_block(block, x) if explicit else block(x)
    return model.norm(x)[:, first:], (h, w)


def _patch_tokens(model: Any, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """``(B, h*w, C)`` patch embeddings of a timm ViT (its convolution, no positions yet) and the grid
    ``(h, w)`` (trailing pixels that do not fill a patch are dropped, as the convolution does)."""
    proj = model.patch_embed.proj
    x = F.conv2d(images.to(proj.weight.dtype), proj.weight, proj.bias, stride=proj.stride)
    h, w = x.shape[-2:]
    return x.flatten(2).transpose(1, 2), (int(h), int(w))


def _resize_positions(patch_pos: torch.Tensor, size: tuple[int, int], antialias: bool) -> torch.Tensor:
    """``(1, side*side, C)`` patch positions (no class position) resized to ``(1, h*w, C)`` by bicubic
    to ``size`` in float32, with or without antialiasing as the model's own code does; the same
    tensor on its own square grid."""
    side = math.isqrt(patch_pos.shape[1])
    h, w = size
    if (h, w) == (side, side):
        return patch_pos
    planes = patch_pos.float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
    planes = F.interpolate(planes, size=(h, w), mode="bicubic", align_corners=False, antialias=antialias)
    return planes.permute(0, 2, 3, 1).reshape(1, h * w, -1)


def mae_tokens(model: Any, images: torch.Tensor, side: int | None) -> tuple[torch.Tensor, tuple[int, int]]:
    """MAE encoder patch tokens as ProxyCLIP's release takes them: the windows resized bilinearly
    (``align_corners=False``) to ``side x side`` whatever their shape, the position embeddings resized
    from the training grid to the token grid by plain bicubic to that size (MAE's
    ``interpolate_pos_embed``, float32; the class position kept), every block, then the final
    LayerNorm on the patch tokens.

    Args:
        model: an MAE encoder from :func:`resclip.dino.load_mae`.
        images: ``(B, 3, H, W)`` ImageNet-normalised windows.
        side: the square input MAE sees (the release's ``slide_crop``); None: the windows as they are.

    Returns:
        ``(B, h*w, C)`` tokens in the model's dtype and the grid ``(h, w)`` (``side // p`` squared).
    """
    if side is not None and tuple(images.shape[-2:]) != (side, side):
        images = F.interpolate(images, size=(side, side), mode="bilinear", align_corners=False)
    x, (h, w) = _patch_tokens(model, images)
    pos = model.pos_embed  # MAE's interpolate_pos_embed: plain bicubic to the size, class position kept
    patch_pos = _resize_positions(pos[:, 1:], (h, w), antialias=False)
    pos = torch.cat([pos[:, :1].to(x.dtype), patch_pos.to(x.dtype)], dim=1)
    x = torch.cat([model.cls_token.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1) + pos
    for block in model.blocks:
        x = block(x)
    return model.norm(x[:, 1:]), (h, w)


SAM_INPUT = 1024  # the side SAM's image encoder is built for


def sam_tokens(model: Any, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """SAM (v1) image-encoder features as ProxyCLIP's release takes them: the windows resized
    bilinearly (``align_corners=False``) to 1024 x 1024 whatever their shape, through the image
    encoder, neck included (no padding, no SAM pixel normalisation: the ImageNet statistics are SAM's).

    Args:
        model: a :class:`resclip.sam.SamModel` of kind ``"sam"`` (:func:`resclip.sam.load_sam`).
        images: ``(B, 3, H, W)`` ImageNet-normalised images.

    Returns:
        ``(B, 64*64, C)`` float32 features (``C`` the encoder's output channels) and the grid ``(64, 64)``.

    Raises:
        ValueError: a SAM 2 model (ProxyCLIP's release reads SAM v1's encoder).
    """
    if getattr(model, "kind", "sam") != "sam":
        raise ValueError("ProxyCLIP's SAM features come from a SAM (v1) image encoder (sam_vit_b); this "
                         f"is a {model.kind} checkpoint")
    x = F.interpolate(images.float(), size=(SAM_INPUT, SAM_INPUT), mode="bilinear", align_corners=False)
    with model.autocast():
        feats = model.model.image_encoder(x)  # float32 in, autocast to fp16 / bf16 weights
    return feats.float().flatten(2).transpose(1, 2), (int(feats.shape[-2]), int(feats.shape[-1]))
