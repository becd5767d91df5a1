"""``create_segmenter``: one call from names to a ready segmenter."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import torch

from .clip import _checkpoint_path, _resolve_model_name, load_clip, resolve_device, resolve_precision
from .digest import file_identity, weights_digests
from .engine import DenseEngine
from .methods import get_method
from .presets import Fidelity, Preset, get_preset, to_fidelity
from .protocol import Protocol
from .rcs import RCSConfig
from .segmenter import Segmenter, SegmenterConfig
from .sfr import SFRConfig
from .text import EmbeddingCache

_ALIASES = {
    "lambda_rcs": ("rcs", "lam"),
    "tau_rcs": ("rcs", "tau"),
    "rcs_layers": ("rcs", "layers"),
    "lambda_sfr": ("sfr", "lam"),
    "tau_sfr": ("sfr", "tau"),
    "temp_thd": ("sfr", "confidence_thd"),
}


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def valid_overrides() -> list[str]:
    """Keyword overrides accepted by :func:`create_segmenter`."""
    names = set(_field_names(Protocol)) | set(_ALIASES)
    names |= {f"rcs_{n}" for n in _field_names(RCSConfig)} | {f"sfr_{n}" for n in _field_names(SFRConfig)}
    return sorted(names)


def apply_overrides(preset: Preset, overrides: dict[str, Any]) -> Preset:
    """Return ``preset`` with protocol / RCS / SFR fields replaced by ``overrides``.

    Keys: any :class:`Protocol` field (``short_side``, ``slide_crop``, ``prob_thd``, ...), the
    aliases ``lambda_rcs, tau_rcs, rcs_layers, lambda_sfr, tau_sfr, temp_thd``, or
    ``rcs_<field>`` / ``sfr_<field>`` for any RCS/SFR config field.

    Raises:
        TypeError: unknown key (the message lists the valid ones).
    """
    groups: dict[str, dict[str, Any]] = {"protocol": {}, "rcs": {}, "sfr": {}}
    for key, value in overrides.items():
        if key in _ALIASES:
            group, name = _ALIASES[key]
        elif key in _field_names(Protocol):
            group, name = "protocol", key
        elif key.startswith("rcs_") and key[4:] in _field_names(RCSConfig):
            group, name = "rcs", key[4:]
        elif key.startswith("sfr_") and key[4:] in _field_names(SFRConfig):
            group, name = "sfr", key[4:]
        else:
            raise TypeError(f"unknown setting {key!r}; valid settings: {', '.join(valid_overrides())}")
        if name == "layers":
            value = tuple(value)
        groups[group][name] = value
    return dataclasses.replace(
        preset,
        protocol=dataclasses.replace(preset.protocol, **groups["protocol"]),
        rcs=dataclasses.replace(preset.rcs, **groups["rcs"]),
        sfr=dataclasses.replace(preset.sfr, **groups["sfr"]),
    )


def build_engine(visual: Any, config: SegmenterConfig) -> DenseEngine:
    """The dense engine ``config`` describes, over a CLIP visual tower (the one place engines are built).

    Raises:
        ValueError: SFR on a method without attention scores, RCS layers outside the model.
    """
    method = get_method(config.method).for_fidelity(config.fidelity)
    return DenseEngine(visual, method, config.rcs, config.sfr, config.trunk_attention)


def with_method(
    base: Segmenter, method: str, *, rcs: bool | None = None, sfr: bool | None = None
) -> Segmenter:
    """A segmenter for another base method or module choice, sharing ``base``'s CLIP weights,
    tokenizer, text cache, protocol and every other setting.

    Cheap: only the last-block engine is new. RCS / SFR settings come from ``base.config``, so
    ``base`` must have been built with the modules the variant turns on.

    Args:
        base: the segmenter to share.
        method: base attention, one of :func:`resclip.list_methods`.
        rcs, sfr: turn the module on or off; None keeps ``base``'s choice.

    Raises:
        ValueError: unknown method; a module ``base`` was built without; SFR on a method without
            attention scores.
    """
    name = get_method(method).name
    modules: dict[str, Any] = {}
    for module, wanted in (("rcs", rcs), ("sfr", sfr)):
        settings = getattr(base.config, module)
        if wanted and settings is None:
            raise ValueError(f"{name}+{module}: the shared segmenter was built without {module.upper()} "
                             f"settings; create it with {module}=True")
        modules[module] = settings if wanted or wanted is None else None
    config = dataclasses.replace(base.config, method=name, **modules)
    variant = copy.copy(base)  # everything else is shared or carried over unchanged
    variant.engine = build_engine(base.engine.visual, config)
    variant.config = config
    return variant


def create_segmenter(
    method: str = "naclip",
    rcs: bool = True,
    sfr: bool = True,
    preset: str = "default",
    model: str | None = None,
    pretrained: str | None = "openai",
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    fidelity: Fidelity | None = None,
    window_batch: int = 8,
    text_cache: EmbeddingCache | bool = True,
    trunk_attention: str | None = None,
    **overrides: Any,
) -> Segmenter:
    """Build a segmenter.

    Args:
        method: base attention of the last block, one of :func:`resclip.list_methods`.
        rcs: apply RCS (residual cross-correlation self-attention).
        sfr: apply SFR (semantic feedback refinement).
        preset: inference settings, one of :func:`resclip.list_presets` (``"voc21"``,
            ``"sclip/ade20k"``, ``"paper/context60"``, ``"default"``...).
        model: open_clip architecture (``"ViT-B-16"``, ``"ViT-L/14"``...); None infers it from a
            local checkpoint, else ViT-B-16.
        pretrained: an open_clip tag (``"openai"``, ``"laion2b_s34b_b88k"``...), a local checkpoint
            path, or None for random weights (tests and speed measurements only).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"`` or ``"auto"``.
        precision: ``"fp32"``, ``"fp16"`` or ``"bf16"``.
        fidelity: ``"official"`` (released code) or ``"paper"`` (printed equations); default: the
            preset's.
        window_batch: sliding windows processed per forward pass.
        text_cache: an :class:`EmbeddingCache`, True for the default on-disk cache, False for none.
        trunk_attention: ``"explicit"`` (the released ResCLIP code's arithmetic) or ``"fused"``
            (the baseline repositories' and faster); default: the preset's.
        **overrides: protocol and module settings, see :func:`apply_overrides`.

    Example:
        >>> seg = create_segmenter("naclip", preset="voc21", pretrained="/path/ViT-B-16.pt")  # doctest: +SKIP
        >>> seg.predict("cat.jpg", ["background", "cat"]).mask.shape  # doctest: +SKIP
    """
    base = get_method(method)
    chosen = get_preset(preset)
    if fidelity is not None:
        chosen = to_fidelity(chosen, fidelity)
    chosen = apply_overrides(chosen, overrides)
    dev = resolve_device(device)
    resolve_precision(precision)
    checkpoint = _local_checkpoint(model, pretrained)
    before = file_identity(checkpoint) if checkpoint is not None else None
    loaded = load_clip(model, pretrained, device=dev, precision=precision)
    # remembered per file only if the file did not change while it was being read
    same = before is not None and checkpoint is not None and file_identity(checkpoint) == before
    variant = f"{loaded.info.arch}|{precision}"
    visual_digest, text_digest = weights_digests(loaded.model, before if same else None, variant)
    config = SegmenterConfig(
        method=base.name,
        rcs=chosen.rcs if rcs else None,
        sfr=chosen.sfr if sfr else None,
        protocol=chosen.protocol,
        preset=chosen.name,
        fidelity=chosen.fidelity,
        model=loaded.info.arch,
        pretrained=loaded.info.pretrained,
        precision=precision,
        trunk_attention=trunk_attention or chosen.trunk_attention,
    )
    engine = build_engine(loaded.model.visual, config)
    # not `text_cache or None`: an empty EmbeddingCache has len() == 0 and would be dropped
    cache = EmbeddingCache() if text_cache is True else (None if text_cache is False else text_cache)
    if pretrained is None:
        cache = None  # random weights: nothing worth keeping
    # the text tower's full sha256 (and how it runs): keys the text-embedding cache
    quick = "quickgelu" if loaded.info.quick_gelu else "gelu"
    fingerprint = f"{loaded.info.arch}|{precision}|{quick}|{text_digest}"
    return Segmenter(
        engine,
        loaded.model,
        loaded.tokenizer,
        config,
        dev,
        window_batch=window_batch,
        text_cache=cache,
        fingerprint=fingerprint,
        visual_digest=visual_digest,
    )


def _local_checkpoint(model: str | None, pretrained: str | None) -> Path | None:
    """The checkpoint file ``load_clip`` will read, or None (a tag, random weights, or a bad name that
    ``load_clip`` reports itself)."""
    try:
        return _checkpoint_path(pretrained, _resolve_model_name(model) if model is not None else None)
    except (ValueError, OSError):
        return None
