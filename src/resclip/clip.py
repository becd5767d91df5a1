"""Load a ViT CLIP model through open_clip: by name and tag, from a local checkpoint, or randomly initialised.

The returned model is a plain open_clip ``CLIP`` whose vision tower is open_clip's ``VisionTransformer``
(``conv1``, ``class_embedding``, ``positional_embedding``, ``ln_pre``, ``transformer.resblocks[i]`` with an
``nn.MultiheadAttention``, ``ln_post``, ``proj``); the segmentation methods reuse its weights unchanged.

Local files need no architecture name: the dimensions of an OpenAI / open_clip state dict are read from the
tensor shapes. OpenAI weights need QuickGELU, which a bare file cannot tell; see :func:`load_clip`.
"""

from __future__ import annotations

import contextlib
import difflib
import math
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.transformer import QuickGELU, VisionTransformer
from torch import nn

from .checkpoints import check_vit_clip, load_strict, read_checkpoint
from .infer_arch import build_inferred

__all__ = ["ClipInfo", "LoadedClip", "load_clip", "resolve_device", "resolve_precision"]

_PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
_DEFAULT_MODEL = "ViT-B-16"


@dataclass(frozen=True)
class ClipInfo:
    """What was loaded, read back from the built model.

    Attributes:
        arch: open_clip model name (``"ViT-B-16"``), or ``"inferred-<name>"`` when the architecture was
            inferred from a checkpoint (``<name>`` is the matching open_clip config, or a
            ``vit-w<width>-l<layers>-p<patch>-i<image>`` description when none matches).
        pretrained: the open_clip tag, the checkpoint path, or ``None`` for random weights.
        quick_gelu: whether the MLPs use QuickGELU (``x * sigmoid(1.702 x)``) rather than GELU.
        patch_size: vision patch size P in pixels.
        image_size: native input size in pixels (the positional embedding covers ``image_size // P``
            patches per side).
        num_layers: number of vision transformer blocks L.
        width: vision residual width.
        heads: vision attention heads.
        embed_dim: dimension D of the joint image-text embedding.
    """

    arch: str
    pretrained: str | None
    quick_gelu: bool
    patch_size: int
    image_size: int
    num_layers: int
    width: int
    heads: int
    embed_dim: int


@dataclass
class LoadedClip:
    """A loaded CLIP model with its tokenizer.

    Attributes:
        model: open_clip ``CLIP`` in eval mode with ``requires_grad`` off on every parameter.
        tokenizer: maps a list of n strings to an int64 tensor of token ids, shape (n, context_length).
        info: the dimensions and origin of the model.
    """

    model: nn.Module
    tokenizer: Callable[[list[str]], torch.Tensor]
    info: ClipInfo


def resolve_precision(precision: str) -> torch.dtype:
    """Map a precision name to a dtype.

    Args:
        precision: ``"fp32"``, ``"fp16"`` or ``"bf16"``.

    Returns:
        The corresponding floating dtype.

    Raises:
        ValueError: for any other value.
    """
    if isinstance(precision, str) and precision.lower() in _PRECISIONS:
        return _PRECISIONS[precision.lower()]
    raise ValueError(f"precision={precision!r} is not supported; use one of {sorted(_PRECISIONS)}")


def resolve_device(device: str | torch.device) -> torch.device:
    """Turn a device spec into a ``torch.device``.

    Args:
        device: a ``torch.device``, a device string (``"cpu"``, ``"cuda:1"``, ...) or ``"auto"``, which picks
            CUDA if available, else MPS if available, else the CPU.

    Returns:
        The device.

    Raises:
        ValueError: if the string is not a valid device.
    """
    if isinstance(device, torch.device):
        return device
    if not isinstance(device, str):
        raise ValueError(
            f"device={device!r} must be a string such as 'cpu', 'cuda', 'auto' or a torch.device"
        )
    if device.strip().lower() == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        return torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(
            f"device={device!r} is not a valid device; use 'cpu', 'cuda', 'cuda:0' or 'auto'"
        ) from exc


def load_clip(
    model: str | None = None,
    pretrained: str | None = "openai",
    *,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    quick_gelu: bool | None = None,
    cache_dir: str | None = None,
) -> LoadedClip:
    """Load a ViT CLIP model and its tokenizer.

    The MLP activation, when ``quick_gelu`` is None, comes from open_clip's tag table for a tag
    (``"openai"``: QuickGELU, LAION tags: GELU) and from the architecture's config for random weights. A
    local file does not record it, so QuickGELU (what OpenAI weights need) is used; if ``model`` names an
    architecture whose config says GELU and the file is not recognisably an original OpenAI checkpoint
    (TorchScript archive, or OpenAI's ``input_resolution`` keys), a ``UserWarning`` says so. Pass
    ``quick_gelu=False`` for LAION / DataComp files. ``info.quick_gelu`` records the choice.

    Args:
        model: open_clip model name (``"ViT-B-16"``, anything in ``open_clip.list_models()``) or an OpenAI
            spelling (``"ViT-B/16"``, ``"ViT-L/14@336px"``). None means ``"ViT-B-16"``, or, when
            ``pretrained`` is a file, the architecture inferred from the file's tensor shapes.
        pretrained: an open_clip tag (``"openai"``, ``"laion2b_s34b_b88k"``, ...), the path of a checkpoint
            (OpenAI or open_clip state dict saved with ``torch.save``, possibly nested under
            ``"state_dict"`` or with ``"module."`` prefixes; ``.safetensors``; an OpenAI TorchScript
            archive), or None for random weights (tests and speed measurements only).
        device: target device, or ``"auto"`` (see :func:`resolve_device`).
        precision: ``"fp32"``, ``"fp16"`` or ``"bf16"``; every floating parameter and buffer is cast.
        quick_gelu: force QuickGELU (True) or GELU (False); None picks as described above.
        cache_dir: download cache for tags (default: the Hugging Face cache, ``HF_HUB_CACHE``).

    Returns:
        The model (eval mode, gradients off, on ``device`` in ``precision``), tokenizer and info.

    Raises:
        FileNotFoundError: ``pretrained`` looks like a path but does not exist.
        ValueError: unknown model name or tag, unreadable or non-CLIP checkpoint, a checkpoint of another
            architecture than ``model``, or an unsupported (non-ViT) architecture.
        RuntimeError: the weights of a tag could not be downloaded or found in the cache.
    """
    dtype = resolve_precision(precision)
    target = resolve_device(device)
    arch = _resolve_model_name(model) if model is not None else None
    path = _checkpoint_path(pretrained, arch)

    if path is not None:
        net, arch_label = _load_file(path, arch, quick_gelu, openai_spelling=_is_openai_spelling(model))
    else:
        arch = arch or _DEFAULT_MODEL
        arch_label = arch
        if pretrained is None:
            default_qg = bool(_model_config(arch).get("quick_gelu", False))
            net = _build_named(arch, default_qg if quick_gelu is None else quick_gelu)
            warnings.warn(
                f"load_clip(model={arch!r}, pretrained=None) built a CLIP with RANDOM weights: its "
                "outputs are meaningless. Use this only for tests and speed measurements.",
                UserWarning,
                stacklevel=2,
            )
        else:
            net = _load_tag(arch, pretrained, quick_gelu, cache_dir)

    net = net.to(device=target, dtype=dtype).eval()
    net.requires_grad_(False)
    tokenizer = _make_tokenizer(arch_label, net)
    return LoadedClip(model=net, tokenizer=tokenizer, info=_info(net, arch_label, pretrained))


# --------------------------------------------------------------------------------------------------------
# names, tags and paths


def _is_openai_spelling(model: str | None) -> bool:
    return model is not None and "/" in model


def _resolve_model_name(model: str) -> str:
    if not isinstance(model, str) or not model.strip():
        raise ValueError(f"model={model!r} must be an open_clip model name such as 'ViT-B-16'")
    if model.startswith(("hf-hub:", "local-dir:")):
        raise ValueError(
            f"model={model!r}: 'hf-hub:' / 'local-dir:' names are not supported; pass the architecture name "
            "as model= and the weights file as pretrained='/path/to/open_clip_model.safetensors'"
        )
    name = model.strip()
    name = re.sub(r"@(\d+)px$", r"-\1", name).replace("/", "-")
    available = open_clip.list_models()
    if name in available:
        return name
    close = difflib.get_close_matches(name, available, n=5, cutoff=0.6)
    examples = close or ["ViT-B-16", "ViT-B-32", "ViT-L-14", "ViT-L-14-336"]
    raise ValueError(
        f"model={model!r} is not a known open_clip architecture. Did you mean one of {examples}? "
        "See open_clip.list_models() for all names (OpenAI spellings such as 'ViT-B/16' work too)."
    )


def _looks_like_path(value: str) -> bool:
    seps = [os.sep] + ([os.altsep] if os.altsep else [])
    return (
        value.startswith("~") or any(s in value for s in seps) or value.lower().endswith(_CHECKPOINT_SUFFIXES)
    )


def _checkpoint_path(pretrained: str | None, arch: str | None) -> Path | None:
    """Return the checkpoint path if ``pretrained`` names a file, None if it is a tag or None."""
    if pretrained is None:
        return None
    if not isinstance(pretrained, (str, os.PathLike)):
        raise ValueError(f"pretrained={pretrained!r} must be an open_clip tag, a file path or None")
    text = os.fspath(pretrained)
    if text.lower() in open_clip.list_pretrained_tags_by_model(arch or _DEFAULT_MODEL):
        return None
    path = Path(text).expanduser()
    if path.is_file():
        return path
    if path.exists() and not path.is_dir():
        raise ValueError(
            f"pretrained={text!r} is not a regular file (a FIFO, socket or device): reading it could block "
            "forever. Pass the path of a checkpoint file."
        )
    if path.is_dir():
        raise FileNotFoundError(
            f"pretrained={text!r} is a directory; pass the checkpoint file inside it "
            "(e.g. open_clip_model.safetensors or ViT-B-16.pt)"
        )
    if _looks_like_path(text):
        raise FileNotFoundError(
            f"pretrained={text!r}: no such checkpoint file. Pass the path of an existing OpenAI .pt or "
            "open_clip .bin/.safetensors file, or an open_clip tag such as 'openai'."
        )
    return None


def _model_config(arch: str) -> dict[str, Any]:
    cfg = open_clip.get_model_config(arch)
    if cfg is None:  # pragma: no cover - arch was validated against list_models()
        raise ValueError(f"model={arch!r}: open_clip has no config for it; see open_clip.list_models()")
    return dict(cfg)


# --------------------------------------------------------------------------------------------------------
# building


def _build_named(arch: str, quick_gelu: bool, meta: bool = False) -> nn.Module:
    """Build ``arch`` with random fp32 weights on the CPU, checking it is a supported ViT CLIP.

    ``meta=True`` builds it without storage, for :func:`load_strict` to fill with a checkpoint's
    tensors (no second copy of the weights, no random initialisation).
    """
    cfg = _check_config(arch)
    cfg["quick_gelu"] = quick_gelu
    net: nn.Module
    with torch.device("meta") if meta else contextlib.nullcontext():
        net = open_clip.CustomTextCLIP(**cfg) if cfg.pop("custom_text", False) else open_clip.CLIP(**cfg)
    _check_supported(net, arch)
    return net


def _check_config(arch: str) -> dict[str, Any]:
    """Return a copy of the config of ``arch`` after checking it describes a ViT CLIP."""
    cfg = _model_config(arch)
    vision, text = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    if "timm_model_name" in vision or isinstance(vision.get("layers"), (list, tuple)):
        raise ValueError(
            f"model={arch!r} has a timm or ResNet vision tower; only ViT CLIP models with open_clip's own "
            "VisionTransformer are supported (e.g. 'ViT-B-16', 'ViT-L-14')"
        )
    if "hf_model_name" in text or "multimodal_cfg" in cfg:
        raise ValueError(f"model={arch!r} uses a Hugging Face text tower or is a CoCa model; not supported")
    return cfg


def _check_supported(net: nn.Module, arch: str) -> None:
    visual = getattr(net, "visual", None)
    ok = (
        isinstance(visual, VisionTransformer)
        and visual.attn_pool is None
        and visual.proj is not None
        and all(isinstance(block.attn, nn.MultiheadAttention) for block in visual.transformer.resblocks)
    )
    if not ok:
        raise ValueError(
            f"model={arch!r} is not a plain ViT CLIP (open_clip VisionTransformer with "
            "nn.MultiheadAttention, token pooling and a projection); only such models are supported "
            "(e.g. 'ViT-B-16', 'ViT-L-14')"
        )


def _load_tag(arch: str, tag: str, quick_gelu: bool | None, cache_dir: str | None) -> nn.Module:
    tags = open_clip.list_pretrained_tags_by_model(arch)
    tag_cfg = open_clip.get_pretrained_cfg(arch, tag) if isinstance(tag, str) else {}
    if not tag_cfg:
        raise ValueError(
            f"pretrained={tag!r} is neither an existing file nor a known open_clip tag for model={arch!r}. "
            f"Tags for {arch} (open_clip.list_pretrained_tags_by_model({arch!r})): {tags}"
        )
    tag_qg = bool(tag_cfg.get("quick_gelu", False) or _model_config(arch).get("quick_gelu", False))
    use_qg = tag_qg if quick_gelu is None else quick_gelu
    if use_qg != tag_qg:
        warnings.warn(
            f"quick_gelu={quick_gelu} differs from how the {arch}/{tag} weights were trained "
            f"(quick_gelu={tag_qg}); features will be degraded",
            UserWarning,
            stacklevel=3,
        )
    _check_config(arch)  # unsupported models fail before downloading
    try:
        file = open_clip.download_pretrained(tag_cfg, cache_dir=cache_dir)
        if not file:
            raise RuntimeError("open_clip returned no file")
    except Exception as exc:  # any hub / network / cache error
        raise RuntimeError(_download_error(arch, tag, cache_dir, exc)) from exc
    net = _build_named(arch, use_qg, meta=True)
    state, _ = read_checkpoint(Path(file))
    check_vit_clip(state, Path(file))
    load_strict(net, state, Path(file), arch, inferred=False)
    return net


def _download_error(arch: str, tag: str, cache_dir: str | None, exc: BaseException) -> str:
    if cache_dir is None:
        try:
            from huggingface_hub import constants

            where = f"HF_HUB_CACHE={constants.HF_HUB_CACHE}"
        except Exception:  # pragma: no cover - huggingface_hub is an open_clip dependency
            where = "the Hugging Face cache (HF_HUB_CACHE)"
    else:
        where = f"cache_dir={cache_dir!r}"
    offline = (
        " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true"} else ""
    )
    return (
        f"could not download the weights of model={arch!r}, pretrained={tag!r}, nor find them in {where}"
        f"{offline}: {type(exc).__name__}: {exc}. On a machine without network access, copy a checkpoint "
        f"there and pass its path, e.g. pretrained='/path/to/{arch}.pt' (an OpenAI .pt) or an open_clip "
        ".bin/.safetensors file; or point cache_dir / HF_HUB_CACHE at a cache that holds it."
    )


# --------------------------------------------------------------------------------------------------------
# local checkpoints


def _load_file(
    path: Path, arch: str | None, quick_gelu: bool | None, openai_spelling: bool
) -> tuple[nn.Module, str]:
    state, openai_marked = read_checkpoint(path)
    check_vit_clip(state, path)
    if arch is None:
        use_qg = True if quick_gelu is None else quick_gelu
        net, label = build_inferred(state, path, use_qg)
        load_strict(net, state, path, label, inferred=True)
        return net, label
    cfg_qg = bool(_model_config(arch).get("quick_gelu", False))
    use_qg = True if quick_gelu is None else quick_gelu
    net = _build_named(arch, use_qg, meta=True)
    load_strict(net, state, path, arch, inferred=False)
    if quick_gelu is None and not cfg_qg and not openai_marked and not openai_spelling:
        warnings.warn(
            f"load_clip(model={arch!r}, pretrained={str(path)!r}): a checkpoint file does not say which "
            "activation it was trained with; assuming OpenAI weights (QuickGELU). Pass quick_gelu=False for "
            "LAION / DataComp weights, or quick_gelu=True to silence this warning.",
            UserWarning,
            stacklevel=3,
        )
    return net, arch


# --------------------------------------------------------------------------------------------------------
# tokenizer and info


def _make_tokenizer(arch_label: str, net: nn.Module) -> Callable[[list[str]], torch.Tensor]:
    context_length = int(getattr(net, "context_length", 77))
    if arch_label.startswith("inferred-"):
        return open_clip.SimpleTokenizer(context_length=context_length)
    tokenizer: Callable[[list[str]], torch.Tensor] = open_clip.get_tokenizer(
        arch_label, context_length=context_length
    )
    return tokenizer


def _info(net: nn.Module, arch: str, pretrained: str | None) -> ClipInfo:
    visual = net.visual
    assert isinstance(visual, VisionTransformer)
    conv = visual.conv1
    patch = int(conv.kernel_size[0])
    grid = math.isqrt(int(visual.positional_embedding.shape[0]) - 1)
    blocks = visual.transformer.resblocks
    return ClipInfo(
        arch=arch,
        pretrained=None if pretrained is None else os.fspath(pretrained),
        quick_gelu=any(isinstance(m, QuickGELU) for m in visual.modules()),
        patch_size=patch,
        image_size=grid * patch,
        num_layers=len(blocks),
        width=int(conv.out_channels),
        heads=int(blocks[0].attn.num_heads),
        embed_dim=int(visual.proj.shape[1]),
    )
