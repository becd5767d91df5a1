"""Load a ViT CLIP model through open_clip: by name and tag, from a local checkpoint, or randomly initialised.

The returned model is a plain open_clip ``CLIP`` whose vision tower is open_clip's ``VisionTransformer``
(``conv1``, ``class_embedding``, ``positional_embedding``, ``ln_pre``, ``transformer.resblocks[i]`` with an
``nn.MultiheadAttention``, ``ln_post``, ``proj``); the segmentation methods reuse its weights unchanged.

Local files need no architecture name: the dimensions of an OpenAI / open_clip state dict are read from the
tensor shapes. OpenAI weights need QuickGELU, which a bare file cannot tell; see :func:`load_clip`.

Hugging Face layouts load too, with their own config: open_clip hub repos (``"hf-hub:org/name"``, or a
folder / ``"local-dir:"`` with ``open_clip_config.json``) and ``transformers`` CLIP models (a folder saved by
``CLIPModel.save_pretrained``, or ``"hf:org/name"``), converted by :mod:`resclip.hf_convert` without
importing transformers. Weights are only ever read by :func:`resclip.checkpoints.read_checkpoint`.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import math
import os
import re
import socket
import urllib.parse
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.transformer import QuickGELU, VisionTransformer
from torch import nn

from . import hf_convert
from .checkpoints import check_vit_clip, load_strict, read_checkpoint
from .infer_arch import build_inferred, registered_architecture

__all__ = ["ClipInfo", "LoadedClip", "load_clip", "resolve_device", "resolve_precision"]

_PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
_DEFAULT_MODEL = "ViT-B-16"
# model sources: where both the architecture and the weights come from (see load_clip)
_HF_HUB, _LOCAL_DIR, _HF_TRANSFORMERS = "hf-hub:", "local-dir:", "hf:"
_OPEN_CLIP_CONFIG = "open_clip_config.json"
_OPEN_CLIP_WEIGHTS = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
)
_HUB_EXAMPLES = {
    "open_clip": "laion/CLIP-ViT-B-16-laion2B-s34B-b88K",
    "transformers": "openai/clip-vit-base-patch16",
}
_HUB_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


@dataclass(frozen=True)
class ClipInfo:
    """What was loaded, read back from the built model.

    Attributes:
        arch: open_clip model name (``"ViT-B-16"``), or ``"inferred-<name>"`` when the architecture was
            inferred from a checkpoint or a transformers folder (``<name>`` is the matching open_clip config,
            or a ``vit-w<width>-l<layers>-p<patch>-i<image>`` description when none matches), or the
            ``"hf-hub:org/name"`` / ``"local-dir:/path"`` whose ``open_clip_config.json`` was built.
        pretrained: the open_clip tag, the checkpoint path, the model source (``"hf-hub:..."``,
            ``"hf:..."``, ``"local-dir:..."`` or a folder path, as given), or ``None`` for random weights.
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

    Model sources carry their own configuration, which decides the architecture, the activation and the
    tokenizer (open_clip's CLIP tokenizer with the config's context length):

    * ``"hf-hub:org/name"`` (as open_clip spells it), as ``model=`` (``pretrained`` left at its default or
      None) or as ``pretrained=``: ``open_clip_config.json`` (``model_cfg``; ``preprocess_cfg`` is only
      checked: resclip normalises with OpenAI's statistics and warns when the model was trained with
      others) and ``open_clip_model.safetensors``, else ``open_clip_pytorch_model.bin``. ``"local-dir:/path"``
      or ``pretrained="/path"`` read the same files from a folder.
    * ``"hf:org/name"`` or ``pretrained="/path"`` to a folder written by transformers'
      ``CLIPModel.save_pretrained``: ``config.json`` (``model_type`` ``"clip"``; its heads and
      ``hidden_act`` are used) and ``model.safetensors`` / ``pytorch_model.bin`` (sharded ones too),
      renamed to OpenAI layout by :func:`resclip.hf_convert.convert_state_dict`, the rest of the
      architecture read from the shapes. transformers need not be installed.

    Hub repos are read from the Hugging Face cache first; when it lacks them they are downloaded (config
    and weights only), or, when the hub is unreachable or ``HF_HUB_OFFLINE`` is set, a ``RuntimeError``
    says so at once.

    Args:
        model: open_clip model name (``"ViT-B-16"``, anything in ``open_clip.list_models()``), an OpenAI
            spelling (``"ViT-B/16"``, ``"ViT-L/14@336px"``), or a model source (``"hf-hub:org/name"``,
            ``"hf:org/name"``, ``"local-dir:/path"``). None means ``"ViT-B-16"``, or, when ``pretrained`` is
            a file or source, the architecture it holds. With a named architecture and a source as
            ``pretrained``, the source's weights must fit that architecture.
        pretrained: an open_clip tag (``"openai"``, ``"laion2b_s34b_b88k"``, ...), the path of a checkpoint
            (OpenAI or open_clip state dict saved with ``torch.save``, possibly nested under
            ``"state_dict"`` or with ``"module."`` prefixes; ``.safetensors``; an OpenAI TorchScript
            archive), a model source (see above: a repo id with its prefix, or a folder holding
            ``open_clip_config.json`` or a transformers ``config.json``), or None for random weights
            (tests and speed measurements only).
        device: target device, or ``"auto"`` (see :func:`resolve_device`).
        precision: ``"fp32"``, ``"fp16"`` or ``"bf16"``; every floating parameter and buffer is cast.
        quick_gelu: force QuickGELU (True) or GELU (False); None picks as described above.
        cache_dir: Hugging Face hub cache for tags and hub repos (default: ``HF_HUB_CACHE``).

    Returns:
        The model (eval mode, gradients off, on ``device`` in ``precision``), tokenizer and info.

    Raises:
        FileNotFoundError: ``pretrained`` looks like a path but does not exist, or a folder lacks its
            config or a weight shard.
        ValueError: unknown model name or tag, unreadable or non-CLIP checkpoint, a checkpoint of another
            architecture than ``model``, an unsupported (non-ViT) architecture, or an unsupported Hugging
            Face format (a transformers ``model_type`` other than ``"clip"``, another activation, a
            Hugging Face tokenizer or text tower...).
        RuntimeError: the weights of a tag or hub repo could not be downloaded or found in the cache.
    """
    dtype = resolve_precision(precision)
    target = resolve_device(device)
    source = _model_source(model, pretrained)
    tokenizer: Callable[[list[str]], torch.Tensor] | None = None
    if source is not None:
        arch = _resolve_model_name(model) if model is not None and model != source.text else None
        net, arch_label, tokenizer = _load_source(source, arch, quick_gelu, cache_dir)
        pretrained = source.text
    else:
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
    if tokenizer is None:
        tokenizer = _make_tokenizer(arch_label, net)
    return LoadedClip(model=net, tokenizer=tokenizer, info=_info(net, arch_label, pretrained))


# --------------------------------------------------------------------------------------------------------
# names, tags and paths


def _is_openai_spelling(model: str | None) -> bool:
    return model is not None and "/" in model


def _resolve_model_name(model: str) -> str:
    if not isinstance(model, str) or not model.strip():
        raise ValueError(f"model={model!r} must be an open_clip model name such as 'ViT-B-16'")
    if model.startswith((_HF_HUB, _LOCAL_DIR, _HF_TRANSFORMERS)):
        raise ValueError(
            f"model={model!r} names a model source (architecture and weights), not an architecture; "
            "pass it to load_clip as model= with the default pretrained, or as pretrained= alone"
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
            f"pretrained={text!r} is a directory without config.json (transformers CLIP) or "
            f"{_OPEN_CLIP_CONFIG} (open_clip); pass the checkpoint file inside it "
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
    _check_cfg(cfg, f"model={arch!r}")
    return cfg


def _check_cfg(cfg: dict[str, Any], what: str) -> None:
    """Reject an open_clip model config that is not a plain ViT CLIP; ``what`` names it in the message."""
    vision, text = cfg.get("vision_cfg") or {}, cfg.get("text_cfg") or {}
    if not isinstance(vision, dict) or not isinstance(text, dict):
        raise ValueError(
            f"{what}: its model config has no vision_cfg / text_cfg dicts; it is not a CLIP config"
        )
    if "timm_model_name" in vision or isinstance(vision.get("layers"), (list, tuple)):
        raise ValueError(
            f"{what} has a timm or ResNet vision tower; only ViT CLIP models with open_clip's own "
            "VisionTransformer are supported (e.g. 'ViT-B-16', 'ViT-L-14')"
        )
    if "hf_model_name" in text or "multimodal_cfg" in cfg:
        raise ValueError(f"{what} uses a Hugging Face text tower or is a CoCa model; not supported")


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
    file = cached_weights(tag_cfg, cache_dir)
    if file is None:
        unreachable = hub_unreachable()
        if unreachable:  # fail in seconds instead of a minute of retries
            raise RuntimeError(_download_error(arch, tag, cache_dir, ConnectionError(unreachable)))
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


def cached_weights(tag_cfg: dict[str, Any], cache_dir: str | None = None) -> str | None:
    """The local file of an open_clip tag's Hugging Face weights if the hub cache already holds it
    (the ``.safetensors`` variant first, as open_clip prefers it), without touching the network."""
    hub = str(tag_cfg.get("hf_hub", ""))
    if not hub:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub is an open_clip dependency
        return None
    repo, filename = os.path.split(hub)
    filename = filename or "open_clip_pytorch_model.bin"
    stem = filename.rsplit(".", 1)[0]
    candidates = [f"{stem}.safetensors", filename]
    if filename == "open_clip_pytorch_model.bin":
        candidates.insert(0, "open_clip_model.safetensors")
    for name in dict.fromkeys(candidates):
        found = try_to_load_from_cache(repo, name, cache_dir=cache_dir)
        if isinstance(found, str) and os.path.isfile(found):
            return found
    return None


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face hub cannot be reached (``HF_HUB_OFFLINE``, no name resolution, no
    connection within ``timeout`` seconds), or None if it answers or a proxy decides."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}:
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # the proxy may reach what this machine cannot
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urllib.parse.urlsplit(endpoint)
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as err:
        return f"cannot reach {endpoint} ({err.strerror or err})"


def _cache_where(cache_dir: str | None) -> str:
    """Name the Hugging Face cache that was searched, for messages."""
    if cache_dir is None:
        try:
            from huggingface_hub import constants

            return f"HF_HUB_CACHE={constants.HF_HUB_CACHE}"
        except Exception:  # pragma: no cover - huggingface_hub is an open_clip dependency
            return "the Hugging Face cache (HF_HUB_CACHE)"
    return f"cache_dir={cache_dir!r}"


def _offline_note() -> str:
    return " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true"} else ""


def _download_error(arch: str, tag: str, cache_dir: str | None, exc: BaseException) -> str:
    where, offline = _cache_where(cache_dir), _offline_note()
    return (
        f"could not download the weights of model={arch!r}, pretrained={tag!r}, nor find them in {where}"
        f"{offline}: {type(exc).__name__}: {exc}. On a machine without network access, copy a checkpoint "
        f"there and pass its path, e.g. pretrained='/path/to/{arch}.pt' (an OpenAI .pt) or an open_clip "
        ".bin/.safetensors file; or point cache_dir / HF_HUB_CACHE at a cache that holds it."
    )


# --------------------------------------------------------------------------------------------------------
# model sources: Hugging Face hub repos and saved folders (open_clip or transformers layout)


@dataclass(frozen=True)
class _Source:
    """Where a model's architecture and weights both come from.

    Attributes:
        text: the caller's spelling (``"hf-hub:org/name"``, ``"hf:org/name"``, ``"local-dir:/path"`` or a
            folder path), recorded as ``info.pretrained``.
        kind: ``"open_clip"`` (``open_clip_config.json`` + open_clip weights) or ``"transformers"``
            (``config.json`` + a transformers ``CLIPModel``'s weights).
        repo: the Hugging Face repo id, or None for a local folder.
        folder: the local folder, or None for a repo (resolved through the hub cache).
    """

    text: str
    kind: str
    repo: str | None
    folder: Path | None


def _model_source(model: str | None, pretrained: str | None) -> _Source | None:
    """The model source named by ``model`` (``hf-hub:`` / ``hf:`` / ``local-dir:``) or by ``pretrained``
    (those, or a folder holding ``open_clip_config.json`` or ``config.json``); None for names, tags, files.
    """
    if isinstance(model, str):
        found = _parse_source(model, "model")
        if found is not None:
            if pretrained not in (None, "openai", model):
                raise ValueError(
                    f"model={model!r} names both the architecture and the weights, so "
                    f"pretrained={pretrained!r} cannot apply; omit pretrained=, or pass "
                    f"pretrained={model!r} with an architecture as model="
                )
            return found
    if isinstance(pretrained, (str, os.PathLike)):
        return _parse_source(os.fspath(pretrained), "pretrained")
    return None


def _parse_source(text: str, arg: str) -> _Source | None:
    for prefix, kind in ((_HF_HUB, "open_clip"), (_HF_TRANSFORMERS, "transformers")):
        if text.startswith(prefix):
            repo = text[len(prefix) :].strip()
            if not _HUB_REPO.match(repo):
                example = _HUB_EXAMPLES[kind]
                raise ValueError(
                    f"{arg}={text!r}: {repo!r} is not a Hugging Face repo id; spell it "
                    f"'{prefix}<org>/<name>', e.g. '{prefix}{example}'"
                )
            return _Source(text, kind, repo, None)
    if text.startswith(_LOCAL_DIR):
        folder = Path(text[len(_LOCAL_DIR) :]).expanduser()
        if not (folder / _OPEN_CLIP_CONFIG).is_file():
            raise FileNotFoundError(
                f"{arg}={text!r}: no {_OPEN_CLIP_CONFIG} in {str(folder)!r}; 'local-dir:' takes a folder "
                "written by open_clip (open_clip_config.json + open_clip_model.safetensors)"
            )
        return _Source(text, "open_clip", None, folder)
    is_tag = not _looks_like_path(text) and text.lower() in {tag for _, tag in open_clip.list_pretrained()}
    if arg == "pretrained" and not is_tag:  # a tag wins over a same-named folder, as over a file
        folder = Path(text).expanduser()
        if folder.is_dir():
            if (folder / _OPEN_CLIP_CONFIG).is_file():
                return _Source(text, "open_clip", None, folder)
            if (folder / hf_convert.HF_CONFIG).is_file():
                return _Source(text, "transformers", None, folder)
    return None


def _load_source(
    source: _Source, arch: str | None, quick_gelu: bool | None, cache_dir: str | None
) -> tuple[nn.Module, str, Callable[[list[str]], torch.Tensor]]:
    """Load a model source: (model on the CPU, architecture label, tokenizer)."""
    folder = source.folder if source.folder is not None else _hub_snapshot(source, cache_dir)
    if source.kind == "open_clip":
        return _load_open_clip_folder(folder, source.text, arch, quick_gelu)
    return _load_transformers_folder(folder, source.text, arch, quick_gelu)


def _read_json(path: Path, where: str) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(
            f"pretrained={where!r}: cannot read {path.name} ({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(value, dict):
        raise ValueError(f"pretrained={where!r}: {path.name} is not a JSON object")
    return value


def _activation_override(quick_gelu: bool | None, trained_qg: bool, where: str) -> bool:
    """The activation to build: the config's unless ``quick_gelu`` overrides it (with a warning)."""
    if quick_gelu is None or quick_gelu == trained_qg:
        return trained_qg
    warnings.warn(
        f"quick_gelu={quick_gelu} differs from how {where} was trained (quick_gelu={trained_qg}); "
        "features will be degraded",
        UserWarning,
        stacklevel=5,
    )
    return quick_gelu


def _check_normalisation(mean: Any, std: Any, where: str) -> None:
    """Warn when a model was trained with other image statistics than the OpenAI ones resclip uses."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    def differs(value: Any, ref: tuple[float, ...]) -> bool:
        if value is None:
            return False
        try:
            values = [float(v) for v in value]
        except (TypeError, ValueError):
            return True
        return len(values) != len(ref) or any(abs(a - b) > 1e-4 for a, b in zip(values, ref, strict=True))

    if differs(mean, OPENAI_DATASET_MEAN) or differs(std, OPENAI_DATASET_STD):
        warnings.warn(
            f"{where} was trained on images normalised with mean={mean}, std={std}, but resclip normalises "
            f"with OpenAI's CLIP statistics (mean={OPENAI_DATASET_MEAN}); its features may be degraded",
            UserWarning,
            stacklevel=5,
        )


def _load_open_clip_folder(
    folder: Path, where: str, arch: str | None, quick_gelu: bool | None
) -> tuple[nn.Module, str, Callable[[list[str]], torch.Tensor]]:
    """Load a folder in open_clip's hub layout: ``open_clip_config.json`` (``model_cfg``, optional
    ``preprocess_cfg``) and ``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``."""
    config = _read_json(folder / _OPEN_CLIP_CONFIG, where)
    model_cfg = config.get("model_cfg")
    if not isinstance(model_cfg, dict):
        raise ValueError(
            f"pretrained={where!r}: {_OPEN_CLIP_CONFIG} has no 'model_cfg' object, so it was not written by "
            "open_clip; re-export the model with open_clip.push_to_hf_hub / save it again"
        )
    cfg = dict(model_cfg)
    what = f"pretrained={where!r}"
    _check_cfg(cfg, what)
    text_cfg = cfg.get("text_cfg") or {}
    if text_cfg.get("hf_tokenizer_name"):
        raise ValueError(
            f"{what} uses the Hugging Face tokenizer {text_cfg['hf_tokenizer_name']!r}; only models with "
            "open_clip's CLIP tokenizer are supported"
        )
    weights = next((folder / n for n in _OPEN_CLIP_WEIGHTS if (folder / n).is_file()), None)
    if weights is None:
        raise FileNotFoundError(
            f"{what}: {str(folder)!r} holds {_OPEN_CLIP_CONFIG} but no weights "
            f"({' or '.join(_OPEN_CLIP_WEIGHTS)}); download the whole model folder"
        )
    use_qg = _activation_override(quick_gelu, bool(cfg.get("quick_gelu", False)), where)
    preprocess = config.get("preprocess_cfg")
    if isinstance(preprocess, dict):
        _check_normalisation(preprocess.get("mean"), preprocess.get("std"), where)
    state, _ = read_checkpoint(weights)
    check_vit_clip(state, weights)
    if arch is not None:
        net, label = _build_named(arch, use_qg, meta=True), arch
    else:
        label = where if where.startswith((_HF_HUB, _LOCAL_DIR)) else f"{_LOCAL_DIR}{where}"
        net = _build_from_config(cfg, use_qg, label)
    try:
        load_strict(net, state, weights, label, inferred=False)
    except ValueError as exc:
        if arch is not None:
            raise
        raise ValueError(
            f"{what}: its weights do not fit its own {_OPEN_CLIP_CONFIG}, so the folder is inconsistent; "
            f"download or export it again ({exc})"
        ) from None
    context_length = int(getattr(net, "context_length", text_cfg.get("context_length", 77)))
    kwargs = text_cfg.get("tokenizer_kwargs") or {}
    tokenizer: Callable[[list[str]], torch.Tensor] = open_clip.SimpleTokenizer(
        context_length=context_length, **kwargs
    )
    return net, label, tokenizer


def _build_from_config(cfg: dict[str, Any], quick_gelu: bool, label: str) -> nn.Module:
    """Build an open_clip model config (``open_clip_config.json``'s ``model_cfg``) on the meta device."""
    cfg = dict(cfg)
    cfg["quick_gelu"] = quick_gelu
    custom = bool(cfg.pop("custom_text", False))
    try:
        with torch.device("meta"):
            net = open_clip.CustomTextCLIP(**cfg) if custom else open_clip.CLIP(**cfg)
    except (TypeError, ValueError, KeyError) as exc:
        raise ValueError(
            f"pretrained={label!r}: open_clip cannot build its model_cfg ({type(exc).__name__}: {exc}); only "
            "plain ViT CLIP configs are supported"
        ) from None
    _check_supported(net, label)
    return net


def _load_transformers_folder(
    folder: Path, where: str, arch: str | None, quick_gelu: bool | None
) -> tuple[nn.Module, str, Callable[[list[str]], torch.Tensor]]:
    """Load a transformers ``CLIPModel`` folder (``config.json`` + ``model.safetensors`` /
    ``pytorch_model.bin``, possibly sharded), converted to OpenAI layout by :mod:`resclip.hf_convert`."""
    config = hf_convert.read_config(folder, where)
    spec = hf_convert.spec_from_config(config, where)
    listing = {n: folder / n for n in hf_convert.WEIGHT_NAMES if (folder / n).is_file()}
    _, files = hf_convert.weight_files(listing, where)
    hf_state: dict[str, torch.Tensor] = {}
    for name in files:
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(
                f"pretrained={where!r}: the shard {name} is missing; download the whole model"
            )
        hf_state.update(read_checkpoint(path)[0])
    state = hf_convert.convert_state_dict(hf_state, where)
    del hf_state
    label_path = Path(where)
    check_vit_clip(state, label_path)
    use_qg = _activation_override(quick_gelu, spec.quick_gelu, where)
    preprocessor = folder / "preprocessor_config.json"
    if preprocessor.is_file():
        pre = _read_json(preprocessor, where)
        _check_normalisation(pre.get("image_mean"), pre.get("image_std"), where)
    if arch is not None:
        net = _build_named(arch, use_qg, meta=True)
        heads = (_heads(net.visual), _heads(net))
        if heads != (spec.vision_heads, spec.text_heads):
            raise ValueError(
                f"pretrained={where!r}: config.json gives {spec.vision_heads} vision / {spec.text_heads} "
                f"text attention heads but model={arch!r} has {heads[0]} / {heads[1]}; omit model= to take "
                "the architecture from the folder"
            )
        load_strict(net, state, label_path, arch, inferred=False)
        return net, arch, _make_tokenizer(arch, net)
    net, label = build_inferred(state, label_path, use_qg, heads=(spec.vision_heads, spec.text_heads))
    load_strict(net, state, label_path, label, inferred=True)
    return net, label, _make_tokenizer(label, net)


def _heads(tower: Any) -> int:
    """Attention heads of an open_clip transformer tower (its first block's)."""
    return int(tower.transformer.resblocks[0].attn.num_heads)


def _cached_file(repo: str, filename: str, cache_dir: str | None, revision: str | None = None) -> Path | None:
    """The file of a hub repo if the Hugging Face cache holds it, without touching the network."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub is an open_clip dependency
        return None
    found = try_to_load_from_cache(repo, filename, cache_dir=cache_dir, revision=revision)
    return Path(found) if isinstance(found, str) and os.path.isfile(found) else None


def _source_files(source: _Source) -> tuple[str, tuple[str, ...], str, str]:
    """(config file, weight files in order of preference, the other format's config, its prefix)."""
    if source.kind == "open_clip":
        return _OPEN_CLIP_CONFIG, _OPEN_CLIP_WEIGHTS, hf_convert.HF_CONFIG, _HF_TRANSFORMERS
    return hf_convert.HF_CONFIG, hf_convert.WEIGHT_NAMES, _OPEN_CLIP_CONFIG, _HF_HUB


def _cached_snapshot(source: _Source, cache_dir: str | None) -> Path | None:
    """The hub-cache snapshot folder holding a repo's config and weights (every shard), or None."""
    assert source.repo is not None
    config_name, weight_names, _, _ = _source_files(source)
    config = _cached_file(source.repo, config_name, cache_dir)
    if config is None:
        return None
    folder = config.parent
    if source.kind == "open_clip":
        found = cached_weights({"hf_hub": f"{source.repo}/"}, cache_dir)
        return folder if found is not None and Path(found).parent == folder else None
    listing = {n: folder / n for n in weight_names if (folder / n).is_file()}
    if not listing:
        return None
    try:
        _, files = hf_convert.weight_files(listing, source.text)
    except ValueError:
        return None
    return folder if all((folder / f).is_file() for f in files) else None


def _hub_snapshot(source: _Source, cache_dir: str | None) -> Path:
    """The local snapshot folder of a hub repo: from the cache, else downloaded (config and weights only).

    Raises:
        ValueError: the repo is of the other format (no such config, the other one present) or has no
            weights.
        RuntimeError: the hub is unreachable and the cache lacks the files, or the download failed.
    """
    assert source.repo is not None
    repo = source.repo
    config_name, weight_names, other_config, other_prefix = _source_files(source)
    folder = _cached_snapshot(source, cache_dir)
    if folder is not None:
        return folder
    wrong_format = ValueError(
        f"pretrained={source.text!r} has no {config_name} but a {other_config}: it is "
        f"{'a transformers' if source.kind == 'open_clip' else 'an open_clip'} model; load it as "
        f"pretrained='{other_prefix}{repo}'"
    )
    unreachable = hub_unreachable()
    if unreachable:  # fail in seconds instead of a minute of retries
        if _cached_file(repo, config_name, cache_dir) is None and _cached_file(repo, other_config, cache_dir):
            raise wrong_format
        raise RuntimeError(_hub_error(source, cache_dir, ConnectionError(unreachable)))
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            config = Path(hf_hub_download(repo, config_name, cache_dir=cache_dir))
        except EntryNotFoundError:
            try:
                hf_hub_download(repo, other_config, cache_dir=cache_dir)
            except EntryNotFoundError:
                raise ValueError(
                    f"pretrained={source.text!r} has neither {config_name} nor {other_config}: it is not a "
                    "CLIP model resclip can load"
                ) from None
            raise wrong_format from None
        folder, revision = config.parent, config.parent.name  # the snapshot's commit: same files
        for name in weight_names:
            try:
                path = Path(hf_hub_download(repo, name, cache_dir=cache_dir, revision=revision))
            except EntryNotFoundError:
                continue
            if name.endswith(".index.json"):
                for shard in hf_convert.weight_files({name: path}, source.text)[1]:
                    hf_hub_download(repo, shard, cache_dir=cache_dir, revision=revision)
            return folder
    except (ValueError, FileNotFoundError):
        raise
    except Exception as exc:  # any hub / network / cache error
        raise RuntimeError(_hub_error(source, cache_dir, exc)) from exc
    raise ValueError(
        f"pretrained={source.text!r} has {config_name} but no weights ({' or '.join(weight_names)}); "
        "it cannot be loaded"
    )


def _hub_error(source: _Source, cache_dir: str | None, exc: BaseException) -> str:
    config_name, weight_names, _, _ = _source_files(source)
    return (
        f"could not download {source.text!r} nor find it in {_cache_where(cache_dir)}{_offline_note()}: "
        f"{type(exc).__name__}: {exc}. On a machine without network access, copy the model folder "
        f"({config_name} + {weight_names[0]}) there and pass its path, e.g. pretrained='/path/to/folder'; or "
        "point cache_dir / HF_HUB_CACHE at a cache that holds it."
    )


# --------------------------------------------------------------------------------------------------------
# local checkpoints


def checkpoint_architecture(pretrained: str | os.PathLike[str]) -> str | None:
    """The open_clip architecture a local CLIP checkpoint holds, read from its tensor shapes
    (``"ViT-B-16"``...), or None when the shapes match no registered architecture.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a readable ViT CLIP checkpoint.
    """
    path = Path(pretrained).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no such checkpoint file {str(path)!r}")
    state, _ = read_checkpoint(path)
    check_vit_clip(state, path)
    return registered_architecture(state, path)


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
