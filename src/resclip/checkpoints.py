"""Read CLIP checkpoint files and fit them to an open_clip model.

Supported: ``torch.save``'d state dicts in OpenAI or open_clip layout (possibly nested under
``"state_dict"`` or with ``"module."`` prefixes), ``.safetensors`` files and OpenAI's TorchScript
archives. A ViT's dimensions are read from the tensor shapes, so files need no architecture name.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import open_clip
import torch
from torch import nn

# Keys of OpenAI's original (JIT) checkpoints that are not weights; their presence marks an OpenAI file.
_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")
_OPENAI_REQUIRED_KEYS = (
    "visual.conv1.weight",
    "visual.class_embedding",
    "visual.positional_embedding",
    "visual.proj",
    "token_embedding.weight",
    "positional_embedding",
    "ln_final.weight",
    "text_projection",
)
_PLAIN_VISION_KEYS = {"image_size", "layers", "width", "head_width", "patch_size", "mlp_ratio"}
_PLAIN_TEXT_KEYS = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """Read a state dict from any supported file.

    Returns:
        The state dict (unnested, without ``module.`` prefixes and OpenAI's non-weight entries) and whether
        the file is marked as an original OpenAI checkpoint (a TorchScript archive, or OpenAI's extra keys).
    """
    obj: Any
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        else:
            obj = _torch_load(path)
    except Exception as exc:
        raise ValueError(
            f"could not read checkpoint pretrained={str(path)!r} ({_brief(exc)}). The file "
            "may be truncated or corrupt; expected a torch.save'd state dict, a .safetensors file or an "
            "OpenAI .pt."
        ) from exc
    jit = isinstance(obj, torch.jit.ScriptModule)
    if jit:
        obj = obj.state_dict()
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(
            f"pretrained={str(path)!r} is not a CLIP checkpoint: expected a state dict (a mapping of names "
            f"to tensors), got {type(obj).__name__}. Only ViT CLIP checkpoints are supported."
        )
    state = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    marked = jit or any(key in state for key in _OPENAI_EXTRA_KEYS)
    for key in _OPENAI_EXTRA_KEYS:
        state.pop(key, None)
    broken = [k for k, v in state.items() if v.is_floating_point() and not _all_finite(v)]
    if broken:
        raise ValueError(
            f"pretrained={str(path)!r} is corrupt: {len(broken)} tensors hold NaN or infinite values, e.g. "
            f"{broken[:3]}"
        )
    return state, marked


def _all_finite(tensor: torch.Tensor, block: int = 1 << 22) -> bool:
    """``torch.isfinite(tensor).all()``, a block at a time (its temporaries are 5 bytes an element)."""
    flat = tensor.reshape(-1)
    return all(bool(torch.isfinite(flat[i : i + block]).all()) for i in range(0, flat.numel(), block))


def _torch_load(path: Path) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*TorchScript archive.*")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as load_error:
        # OpenAI's original .pt files are TorchScript archives, which weights_only loading refuses.
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                return torch.jit.load(str(path), map_location="cpu")
        except Exception:
            raise load_error from None


def _brief(exc: BaseException, limit: int = 200) -> str:
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    return f"{type(exc).__name__}: {text[:limit]}"


def check_vit_clip(state: Mapping[str, torch.Tensor], path: Path) -> None:
    name = str(path)
    if not any(k.startswith("visual.") for k in state):
        sample = sorted(state)[:5]
        raise ValueError(
            f"pretrained={name!r} is not a CLIP checkpoint (no 'visual.*' weights; keys start with "
            f"{sample}). Only ViT CLIP checkpoints (OpenAI or open_clip format) are supported."
        )
    if any(k.startswith(("visual.layer1.", "visual.trunk.", "visual.attnpool.")) for k in state) or (
        "visual.conv1.weight" not in state
    ):
        raise ValueError(
            f"pretrained={name!r} holds a CLIP with a ResNet or timm vision tower; only ViT CLIP checkpoints "
            "(OpenAI or open_clip format, with visual.conv1 and visual.transformer) are supported."
        )


def load_strict(
    net: nn.Module, state: dict[str, torch.Tensor], path: Path, arch: str, inferred: bool
) -> None:
    if not hasattr(net, "positional_embedding") and "positional_embedding" in state:
        state = open_clip.model.convert_to_custom_text_state_dict(state)
    scale = getattr(net, "logit_scale", None)
    if isinstance(scale, torch.Tensor) and "logit_scale" in state and state["logit_scale"].numel() == 1:
        state["logit_scale"] = state["logit_scale"].reshape(scale.shape)
    problems = _state_diff(net.state_dict(), state)
    if problems:
        if inferred:
            hint = (
                "its layout is not a plain ViT CLIP that can be inferred; name the architecture with model="
            )
        else:
            hint = "the checkpoint is of another architecture; omit model= to infer it from the file"
        raise ValueError(f"pretrained={str(path)!r} does not fit model={arch!r}: {hint} ({problems})")
    # the model was built on the meta device: adopt the checkpoint's tensors instead of copying them
    net.load_state_dict(state, strict=True, assign=True)
    _restore_causal_masks(net)


def _restore_causal_masks(net: nn.Module) -> None:
    """Rebuild the non-persistent buffers a checkpoint lacks: open_clip's text ``attn_mask`` (causal)."""
    for module in net.modules():
        for name, buf in list(module._buffers.items()):
            if buf is None or not buf.is_meta:
                continue
            if name != "attn_mask" or buf.dim() != 2 or buf.shape[0] != buf.shape[1]:
                where = f"{name!r} {tuple(buf.shape)} of {type(module).__name__}"
                raise RuntimeError(f"cannot rebuild buffer {where}")
            module._buffers[name] = torch.full(tuple(buf.shape), float("-inf")).triu_(1)


def _state_diff(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> str:
    """Summarise how a state dict differs from a model's, or return '' if it fits."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(given[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in given and given[k].shape != v.shape
    ]
    parts = []
    for label, items in (
        ("shape mismatches", shapes),
        ("missing keys", missing),
        ("unexpected keys", unexpected),
    ):
        if items:
            parts.append(f"{len(items)} {label}, e.g. {'; '.join(items[:3])}")
    return ". ".join(parts)


def _layer_count(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for k in state if (m := pattern.match(k))})


def build_inferred(state: Mapping[str, torch.Tensor], path: Path, quick_gelu: bool) -> tuple[nn.Module, str]:
    """Build on the meta device (no storage, filled by :func:`load_strict`) a CLIP whose dimensions
    are read from an OpenAI-layout state dict."""
    missing = [k for k in _OPENAI_REQUIRED_KEYS if k not in state]
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
    text_width = int(state["ln_final.weight"].shape[0])
    shape = {
        "embed_dim": int(state["text_projection"].shape[1]),
        "v_width": width,
        "v_layers": _layer_count(state, "visual.transformer.resblocks."),
        "patch": patch,
        "image": grid * patch,
        "v_mlp": int(state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
        "ctx": int(state["positional_embedding"].shape[0]),
        "vocab": int(state["token_embedding.weight"].shape[0]),
        "t_width": text_width,
        "t_layers": _layer_count(state, "transformer.resblocks."),
        "t_mlp": int(state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
    }
    match, v_heads, t_heads = _match_registered(shape)
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
    name = match or f"vit-w{width}-l{shape['v_layers']}-p{patch}-i{shape['image']}"
    return net, f"inferred-{name}"


def _mlp_ratio(hidden: int, width: int) -> float:
    """A ratio for which open_clip's ``int(width * mlp_ratio)`` gives back ``hidden`` despite rounding."""
    return (hidden + 0.5) / width


def _match_registered(shape: Mapping[str, int]) -> tuple[str | None, int | None, int | None]:
    """Find plain open_clip configs with these tensor shapes; heads cannot be read from shapes alone.

    Returns:
        (shortest matching name, vision heads, text heads); heads are None when nothing matches or the
        matches disagree.
    """
    found: list[tuple[str, int, int]] = []
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
            candidate = {
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
        if candidate == dict(shape):
            found.append((name, v.width // v.head_width, t.heads))
    if not found:
        return None, None, None
    found.sort(key=lambda item: (len(item[0]), item[0]))
    heads = {(v_heads, t_heads) for _, v_heads, t_heads in found}
    if len(heads) != 1:
        return found[0][0], None, None
    v_heads, t_heads = heads.pop()
    return found[0][0], v_heads, t_heads
