"""Infer a ViT CLIP's architecture from the tensor shapes of an OpenAI-layout state dict."""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import open_clip
import torch
from torch import nn

from .checkpoints import OPENAI_REQUIRED_KEYS

_PLAIN_VISION_KEYS = {"image_size", "layers", "width", "head_width", "patch_size", "mlp_ratio"}
_PLAIN_TEXT_KEYS = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}


def _layer_count(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for k in state if (m := pattern.match(k))})


def build_inferred(
    state: Mapping[str, torch.Tensor],
    path: Path,
    quick_gelu: bool,
    heads: tuple[int, int] | None = None,
) -> tuple[nn.Module, str]:
    """Build on the meta device (no storage, filled by :func:`load_strict`) a CLIP whose dimensions
    are read from an OpenAI-layout state dict.

    Args:
        state: OpenAI-layout state dict.
        path: the checkpoint, for messages.
        quick_gelu: build QuickGELU MLPs (else GELU).
        heads: (vision heads, text heads) when known from elsewhere (a transformers config.json); None
            takes them from the registered open_clip architecture with these shapes, else width // 64.

    Returns:
        The model and its label ``"inferred-<name>"``.

    Raises:
        ValueError: the heads cannot be inferred, or do not divide the widths.
    """
    shape = _shape_summary(state, path)
    width, text_width, patch = shape["v_width"], shape["t_width"], shape["patch"]
    match, v_heads, t_heads = _match_registered(shape)
    if heads is not None:
        v_heads, t_heads = heads
        if v_heads <= 0 or t_heads <= 0 or width % v_heads or text_width % t_heads:
            raise ValueError(
                f"pretrained={str(path)!r}: {v_heads} vision / {t_heads} text attention heads do not divide "
                f"the widths {width} / {text_width}; the config does not match the weights"
            )
    name = match or f"vit-w{width}-l{shape['v_layers']}-p{patch}-i{shape['image']}"
    if match is None:
        warnings.warn(_unknown_architecture_warning(shape, path, name), UserWarning, stacklevel=4)
    if v_heads is None or t_heads is None:
        if width % 64 or text_width % 64:
            raise ValueError(
                f"pretrained={str(path)!r}: cannot infer the number of attention heads (vision width "
                f"{width}, text width {text_width} are not multiples of 64); name the "
                "architecture with model="
            )
        v_heads, t_heads = width // 64, text_width // 64
    vision_cfg = {
        "image_size": shape["image"],
        "layers": shape["v_layers"],
        "width": width,
        "head_width": width // v_heads,
        "patch_size": patch,
        "mlp_ratio": _mlp_ratio(shape["v_mlp"], width),
    }
    text_cfg = {
        "context_length": shape["ctx"],
        "vocab_size": shape["vocab"],
        "width": text_width,
        "heads": t_heads,
        "layers": shape["t_layers"],
        "mlp_ratio": _mlp_ratio(shape["t_mlp"], text_width),
    }
    with torch.device("meta"):
        net = open_clip.CLIP(
            shape["embed_dim"], vision_cfg=vision_cfg, text_cfg=text_cfg, quick_gelu=quick_gelu
        )
    return net, f"inferred-{name}"


def registered_architecture(state: Mapping[str, torch.Tensor], path: Path) -> str | None:
    """The open_clip name whose tensor shapes an OpenAI-layout state dict has, or None (custom)."""
    return _match_registered(_shape_summary(state, path))[0]


def _shape_summary(state: Mapping[str, torch.Tensor], path: Path) -> dict[str, int]:
    """The dimensions that decide an architecture, read from an OpenAI-layout state dict."""
    missing = [k for k in OPENAI_REQUIRED_KEYS if k not in state]
    if missing:
        raise ValueError(
            f"pretrained={str(path)!r}: cannot infer the architecture (missing {missing}); this is not an "
            "OpenAI-layout ViT CLIP. Name the architecture with model=, e.g. model='ViT-B-16'."
        )
    conv = state["visual.conv1.weight"]
    width, patch = int(conv.shape[0]), int(conv.shape[-1])
    n_pos = int(state["visual.positional_embedding"].shape[0])
    grid = math.isqrt(n_pos - 1)
    if grid * grid + 1 != n_pos:
        raise ValueError(
            f"pretrained={str(path)!r}: visual.positional_embedding has {n_pos} rows, not 1 + a square"
        )
    return {
        "embed_dim": int(state["text_projection"].shape[1]),
        "v_width": width,
        "v_layers": _layer_count(state, "visual.transformer.resblocks."),
        "patch": patch,
        "image": grid * patch,
        "v_mlp": int(state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
        "ctx": int(state["positional_embedding"].shape[0]),
        "vocab": int(state["token_embedding.weight"].shape[0]),
        "t_width": int(state["ln_final.weight"].shape[0]),
        "t_layers": _layer_count(state, "transformer.resblocks."),
        "t_mlp": int(state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
    }


def _mlp_ratio(hidden: int, width: int) -> float:
    """A ratio for which open_clip's ``int(width * mlp_ratio)`` gives back ``hidden`` despite rounding."""
    return (hidden + 0.5) / width


def _registered_shapes() -> tuple[tuple[str, tuple[tuple[str, int], ...], int, int], ...]:
    """(name, tensor-shape summary, vision heads, text heads) of every plain open_clip ViT config."""
    found = []
    for name in open_clip.list_models():
        cfg = open_clip.get_model_config(name) or {}
        vision, text = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
        plain = (
            set(cfg) <= {"embed_dim", "quick_gelu", "vision_cfg", "text_cfg"}
            and set(vision) <= _PLAIN_VISION_KEYS
            and set(text) <= _PLAIN_TEXT_KEYS
        )
        if not plain:
            continue
        try:
            v = open_clip.CLIPVisionCfg(**vision)
            t = open_clip.CLIPTextCfg(**text)
            shape = {
                "embed_dim": int(cfg["embed_dim"]),
                "v_width": v.width,
                "v_layers": v.layers,
                "patch": v.patch_size,
                "image": v.image_size,
                "v_mlp": int(v.width * v.mlp_ratio),
                "ctx": t.context_length,
                "vocab": t.vocab_size,
                "t_width": t.width,
                "t_layers": t.layers,
                "t_mlp": int(t.width * t.mlp_ratio),
            }
        except (TypeError, KeyError, ValueError):
            continue
        found.append((name, tuple(sorted(shape.items())), v.width // v.head_width, t.heads))
    found.sort(key=lambda item: (len(item[0]), item[0]))
    return tuple(found)


def _match_registered(shape: Mapping[str, int]) -> tuple[str | None, int | None, int | None]:
    """Find plain open_clip configs with these tensor shapes; heads cannot be read from shapes alone.

    Returns:
        (shortest matching name, vision heads, text heads); heads are None when nothing matches or the
        matches disagree.
    """
    key = tuple(sorted(shape.items()))
    found = [(name, v, t) for name, summary, v, t in _registered_shapes() if summary == key]
    if not found:
        return None, None, None
    heads = {(v_heads, t_heads) for _, v_heads, t_heads in found}
    if len(heads) != 1:
        return found[0][0], None, None
    v_heads, t_heads = heads.pop()
    return found[0][0], v_heads, t_heads


_LABELS = {"v_layers": "visual blocks", "t_layers": "text blocks"}


def _unknown_architecture_warning(shape: Mapping[str, int], path: Path, label: str) -> str:
    """Say that a file's shapes match no known architecture, naming a known one it nearly matches."""
    for name, summary, _, _ in _registered_shapes():
        known = dict(summary)
        differ = [k for k in known if known[k] != shape[k]]
        if differ and set(differ) <= set(_LABELS):
            counts = ", ".join(f"{shape[k]} {_LABELS[k]} where {name} has {known[k]}" for k in differ)
            return (
                f"pretrained={str(path)!r} looks like {name} but has {counts}: the file may be truncated "
                f"or edited. It was loaded as a custom ViT ({label}); pass model={name!r} to require "
                "the full architecture."
            )
    return (
        f"pretrained={str(path)!r} matches no known open_clip architecture; it was loaded as a custom ViT "
        f"({label}, {shape['v_layers']} visual and {shape['t_layers']} text blocks). Pass model= to "
        "require a specific architecture."
    )
