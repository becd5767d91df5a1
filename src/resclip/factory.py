"""``create_segmenter``: one call from names to a ready segmenter."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .clip import load_clip, resolve_device, resolve_precision
from .engine import DenseEngine
from .methods import get_method
from .presets import Fidelity, Preset, get_preset, to_fidelity
from .protocol import Protocol
from .rcs import RCSConfig
from .segmenter import Segmenter, SegmenterConfig
from .sfr import SFRConfig
from .text import EmbeddingCache, text_fingerprint

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
    loaded = load_clip(model, pretrained, device=dev, precision=precision)
    visual: Any = loaded.model.visual
    engine = DenseEngine(
        visual,
        base,
        chosen.rcs if rcs else None,
        chosen.sfr if sfr else None,
        trunk_attention=trunk_attention or chosen.trunk_attention,
    )
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
    )
    # not `text_cache or None`: an empty EmbeddingCache has len() == 0 and would be dropped
    cache = EmbeddingCache() if text_cache is True else (None if text_cache is False else text_cache)
    if pretrained is None:
        cache = None  # random weights: nothing worth keeping
    fingerprint = f"{loaded.info.arch}|{text_fingerprint(loaded.model)}|{precision}"
    return Segmenter(
        engine,
        loaded.model,
        loaded.tokenizer,
        config,
        dev,
        window_batch=window_batch,
        text_cache=cache,
        fingerprint=fingerprint,
    )
