"""``create_segmenter``: one call from names to a ready segmenter."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import numbers
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Union

import torch

from .auxiliary import aux_digest, check_aux_sources, load_aux, missing_aux_message
from .clip import _checkpoint_path, _resolve_model_name, load_clip, resolve_device, resolve_precision
from .digest import bytes_digest, file_identity, weights_digests
from .engine import DenseEngine
from .methods import BaseAttention, get_method, list_methods
from .presets import PRESETS, Fidelity, Preset, get_preset, to_fidelity
from .protocol import Protocol
from .rcs import RCSConfig
from .segmenter import Segmenter, SegmenterConfig
from .sfr import SFRConfig
from .text import EmbeddingCache
from .tlp import TLPConfig
from .trident import SAMRefineConfig
from .vit import patch_size

METHOD_ALIAS = "resclip"  # create_segmenter(method="resclip") = naclip + RCS + SFR, as in `resclip compare`

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


# protocol stages switched on or off by name (``tlp=True``) and set field by field (``tlp_grid=40``)
_STAGES: dict[str, type] = {"tlp": TLPConfig, "sam_refine": SAMRefineConfig}


def _setting_names() -> set[str]:
    """Protocol, RCS / SFR and stage settings (not the methods' own fields)."""
    names = set(_field_names(Protocol)) | set(_ALIASES)
    names |= {f"rcs_{n}" for n in _field_names(RCSConfig)} | {f"sfr_{n}" for n in _field_names(SFRConfig)}
    for stage, cls in _STAGES.items():
        names |= {f"{stage}_{n}" for n in _field_names(cls)}
    return names


def method_fields(method: BaseAttention) -> tuple[str, ...]:
    """A method's own settings: the fields of its dataclass beyond :class:`BaseAttention`'s
    (ProxyCLIP's ``beta``, ``gamma``, ``vfm``...)."""
    common = _field_names(BaseAttention)
    return tuple(f.name for f in dataclasses.fields(method) if f.name not in common)


def _method_key(key: str) -> tuple[str, str] | None:
    """``"<method>_<field>"`` -> ``(method, field)`` for a registered method's own field, else None
    (the longest method name wins: ``proxyclip_sam_beta`` is proxyclip_sam's ``beta``)."""
    for name in sorted(list_methods(), key=len, reverse=True):
        if key.startswith(f"{name}_") and key[len(name) + 1:] in method_fields(get_method(name)):
            return name, key[len(name) + 1:]
    return None


def method_field_owner(key: str) -> tuple[str, str] | None:
    """``(method, field)`` when ``key`` is a method's own setting (``"proxyclip_beta"`` ->
    ``("proxyclip", "beta")``), None for a protocol / module setting or an unknown key."""
    return None if key in _setting_names() else _method_key(key)


def fields_for(overrides: Mapping[str, Any], method: str) -> dict[str, Any]:
    """``{field: value}`` of ``method``'s own settings in ``overrides`` (``<method>_<field>`` keys; the
    other methods' are left out), for commands that run several methods from one ``--set`` list."""
    out = {}
    for key, value in overrides.items():
        owner = method_field_owner(key)
        if owner is not None and owner[0] == method:
            out[owner[1]] = value
    return out


def valid_overrides() -> list[str]:
    """Keyword overrides accepted by :func:`create_segmenter`: protocol, RCS / SFR and stage
    settings, and ``<method>_<field>`` for every registered method's own fields."""
    names = _setting_names()
    for name in list_methods():
        names |= {f"{name}_{field}" for field in method_fields(get_method(name))}
    return sorted(names)


def split_method_overrides(overrides: Mapping[str, Any], method: str | None = None
                           ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Separate the ``<method>_<field>`` keys (a method's own fields, e.g. ``corrclip_masks``) from the
    protocol / module settings, checking each value's type.

    Args:
        method: the method the segmenter runs; its fields are the only ones accepted (None: any).

    Returns:
        ``(settings, fields)``: the other overrides as given, and ``{field: value}`` of ``method``
        (of every method named when ``method`` is None, keyed ``<method>_<field>``).

    Raises:
        TypeError: a value of the wrong type, or another method's field (naming both methods).
    """
    settings: dict[str, Any] = {}
    fields: dict[str, Any] = {}
    protocol_keys = _setting_names()
    for key, value in overrides.items():
        found = None if key in protocol_keys else _method_key(key)
        if found is None:
            settings[key] = value
            continue
        owner, name = found
        if method is not None and owner != method:
            own = ", ".join(method_fields(get_method(method))) or "none"
            raise TypeError(f"setting {key} is a field of method {owner}, not of {method}; use "
                            f"{method}_<field> (its fields: {own})")
        checked = check_override(key, type(get_method(owner)), name, value)
        fields[name if method is not None else key] = checked
    return settings, fields


def unknown_setting_message(key: str) -> str:
    """``unknown setting 'x'; valid settings: ...``, ending with the closest valid name
    ("did you mean ...?") when one is close."""
    valid = valid_overrides()
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else ""
    return f"unknown setting {key!r}; valid settings: {', '.join(valid)}{hint}"


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return " or ".join(repr(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        return "a sequence of integers"
    if typing.get_origin(hint) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    return {int: "an integer", float: "a number", bool: "True or False", str: "text", type(None): "None"}.get(
        hint, str(hint))


def _convert(hint: Any, value: Any) -> tuple[bool, Any]:
    """(ok, value converted to ``hint``): ints are accepted for floats, one int for a tuple of ints."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        return value in typing.get_args(hint), value
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(hint):
            ok, converted = _convert(arg, value)
            if ok:
                return True, converted
        return False, value
    if origin is tuple:
        items = (value,) if isinstance(value, numbers.Integral) and not isinstance(value, bool) else value
        if isinstance(items, (list, tuple)) and all(
            isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in items
        ):
            return True, tuple(int(v) for v in items)
        return False, value
    if hint is type(None):
        return value is None, value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        return ok, int(value) if ok else value
    if hint is float:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if isinstance(hint, type):
        return isinstance(value, hint), value
    return True, value


def check_override(key: str, cls: type, name: str, value: Any) -> Any:
    """``value`` checked against (and converted to) the type of field ``name`` of ``cls``.

    Raises:
        TypeError: naming ``key``, the expected type and the value given.
    """
    hint = typing.get_type_hints(cls)[name]
    ok, converted = _convert(hint, value)
    if not ok:
        raise TypeError(f"setting {key}: expected {_type_name(hint)}, got {value!r}")
    return converted


def apply_overrides(preset: Preset, overrides: dict[str, Any]) -> Preset:
    """Return ``preset`` with protocol / RCS / SFR fields replaced by ``overrides``.

    Keys: any :class:`Protocol` field (``short_side``, ``slide_crop``, ``prob_thd``, ...), the
    aliases ``lambda_rcs, tau_rcs, rcs_layers, lambda_sfr, tau_sfr, temp_thd``, or
    ``rcs_<field>`` / ``sfr_<field>`` for any RCS/SFR config field, ``tlp=True`` / ``False``
    (PEARL's text-aware propagation on or off, any method) and ``tlp_<field>`` for any
    :class:`~resclip.tlp.TLPConfig` field (turns it on); likewise ``sam_refine=True`` / ``False`` and
    ``sam_refine_<field>`` (Trident's SAM refinement, :class:`~resclip.trident.SAMRefineConfig`).

    Raises:
        TypeError: unknown key (the message suggests the closest and lists the valid ones), or a
            value of the wrong type (the message names the key).
    """
    classes: dict[str, type] = {"protocol": Protocol, "rcs": RCSConfig, "sfr": SFRConfig, **_STAGES}
    groups: dict[str, dict[str, Any]] = {name: {} for name in classes}
    switched: dict[str, bool] = {}  # tlp=True / False from the command line (a TLPConfig passes as is)
    for key, value in overrides.items():
        if key in _STAGES and isinstance(value, bool):
            switched[key] = value
            continue
        stage = next((s for s, cls in _STAGES.items()
                      if key.startswith(f"{s}_") and key[len(s) + 1:] in _field_names(cls)), None)
        if stage is not None:
            group, name = stage, key[len(stage) + 1:]
        elif key in _ALIASES:
            group, name = _ALIASES[key]
        elif key in _field_names(Protocol):
            group, name = "protocol", key
        elif key.startswith("rcs_") and key[4:] in _field_names(RCSConfig):
            group, name = "rcs", key[4:]
        elif key.startswith("sfr_") and key[4:] in _field_names(SFRConfig):
            group, name = "sfr", key[4:]
        else:
            raise TypeError(unknown_setting_message(key))
        groups[group][name] = check_override(key, classes[group], name, value)
    protocol = dataclasses.replace(preset.protocol, **groups["protocol"])
    for stage, cls in _STAGES.items():  # stage=True, or a stage_<field>, turns the stage on
        on, fields = switched.get(stage), groups[stage]
        if on is None and not fields:
            continue
        if on is False and fields:
            raise TypeError(f"{stage}=False contradicts {', '.join(f'{stage}_{k}' for k in fields)}")
        base = getattr(protocol, stage) or cls()
        chosen: Any = None if on is False else dataclasses.replace(base, **fields)
        protocol = dataclasses.replace(protocol, **{stage: chosen})
    return dataclasses.replace(
        preset,
        protocol=protocol,
        rcs=dataclasses.replace(preset.rcs, **groups["rcs"]),
        sfr=dataclasses.replace(preset.sfr, **groups["sfr"]),
    )


def configured_method(name: str, fidelity: str, preset: str,
                      fields: tuple[tuple[str, Any], ...] = (),
                      protocol: Protocol | None = None) -> BaseAttention:
    """The registered method ``name`` with its fidelity switches, the fields ``preset`` sets, then
    ``fields`` (the caller's ``<method>_<field>`` settings, :attr:`SegmenterConfig.method_fields`),
    then what it takes from ``protocol`` (:meth:`BaseAttention.for_protocol`).

    Raises:
        ValueError: a field value the method rejects (its message).
    """
    method = get_method(name).for_fidelity(fidelity)
    chosen = PRESETS.get(preset)
    settings = chosen.method_settings(method.name) if chosen is not None else {}
    settings = {**settings, **dict(fields)}
    if settings:  # a method's own fields the preset sets per dataset (e.g. PEARL's alpha_kk)
        method = dataclasses.replace(method, **settings)
    return method.for_protocol(protocol) if protocol is not None else method


def build_engine(visual: Any, config: SegmenterConfig, aux: Mapping[str, Any] | None = None) -> DenseEngine:
    """The dense engine ``config`` describes, over a CLIP visual tower (the one place engines are built).

    Args:
        aux: loaded auxiliary models by kind (:func:`resclip.auxiliary.load_aux`), for methods that read one.

    Raises:
        ValueError: SFR on a method without attention scores, RCS layers outside the model, an
            auxiliary model the method needs missing, RCS / SFR on a last stage with its own grid.
    """
    method = configured_method(config.method, config.fidelity, config.preset, config.method_fields,
                               config.protocol)
    return DenseEngine(visual, method, config.rcs, config.sfr, config.trunk_attention, aux=aux)


def with_method(
    base: Segmenter, method: str, *, rcs: bool | None = None, sfr: bool | None = None,
    fields: Mapping[str, Any] | None = None,
) -> Segmenter:
    """A segmenter for another base method or module choice, sharing ``base``'s CLIP weights,
    tokenizer, text cache, protocol and every other setting.

    Cheap: only the last-block engine is new. RCS / SFR settings come from ``base.config``, so
    ``base`` must have been built with the modules the variant turns on.

    Args:
        base: the segmenter to share.
        method: base attention, one of :func:`resclip.list_methods`.
        rcs, sfr: turn the module on or off; None keeps ``base``'s choice.
        fields: the method's own settings (``{"beta": 1.0}``, as ``<method>_<field>`` keywords of
            :func:`create_segmenter`); None keeps ``base``'s when the method is ``base``'s, else none.

    Raises:
        ValueError: unknown method; a module ``base`` was built without; SFR on a method without
            attention scores; an auxiliary model the method needs that ``base`` was not given.
    """
    name = get_method(method).name
    modules: dict[str, Any] = {}
    for module, wanted in (("rcs", rcs), ("sfr", sfr)):
        settings = getattr(base.config, module)
        if wanted and settings is None:
            raise ValueError(f"{name}+{module}: the shared segmenter was built without {module.upper()} "
                             f"settings; create it with {module}=True")
        modules[module] = settings if wanted or wanted is None else None
    if fields is None:
        own = base.config.method_fields if name == base.config.method else ()  # not another method's
    elif unknown := sorted(set(fields) - set(method_fields(get_method(name)))):
        raise TypeError(f"setting {name}_{unknown[0]}: method {name} has no field {unknown[0]!r} "
                        f"(its fields: {', '.join(method_fields(get_method(name))) or 'none'})")
    else:
        own = tuple(sorted((k, check_override(f"{name}_{k}", type(get_method(name)), k, v))
                           for k, v in fields.items()))
    config = dataclasses.replace(base.config, method=name, method_fields=own, **modules)
    variant = copy.copy(base)  # everything else is shared or carried over unchanged
    variant.engine = build_engine(base.engine.visual, config, aux=base.engine.aux)
    variant.config = config
    return variant


def default_modules(method: BaseAttention, protocol: Protocol, visual: Any, aux: Mapping[str, Any],
                    rcs: bool | None, sfr: bool | None) -> tuple[bool, bool]:
    """Whether RCS and SFR are on: as asked, or for None, on wherever they can act: not under a
    protocol with its own image pipeline (CLIPer's, Trident's), not on a last stage whose attention
    lives on another grid than CLIP's (ProxyCLIP with DINO ViT-B/8), and SFR not on a method
    without attention scores (MaskCLIP). An explicit True that cannot act is refused later, in one line."""
    if rcs is not None and sfr is not None:
        return rcs, sfr
    possible = protocol.cliper is None and protocol.trident is None
    if possible and method.replaces_last_block:
        possible = method.out_patch(patch_size(visual), aux) == patch_size(visual)
    return (possible if rcs is None else rcs), (possible and method.has_scores if sfr is None else sfr)


def create_segmenter(
    method: str = "naclip",
    rcs: bool | None = None,
    sfr: bool | None = None,
    preset: str = "default",
    model: str | None = None,
    pretrained: str | None = "openai",
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    fidelity: Fidelity | None = None,
    window_batch: int = 8,
    text_cache: EmbeddingCache | bool = True,
    trunk_attention: str | None = None,
    aux_pretrained: Mapping[str, str | Path] | None = None,
    **overrides: Any,
) -> Segmenter:
    """Build a segmenter.

    Args:
        method: base attention of the last block, one of :func:`resclip.list_methods`, or
            ``"resclip"``: ResCLIP, i.e. ``"naclip"`` with RCS and SFR (the name ``resclip compare``
            uses; ``rcs=False`` or ``sfr=False`` with it is an error).
        rcs: apply RCS (residual cross-correlation self-attention); None (default): wherever it can
            act (see :func:`default_modules`).
        sfr: apply SFR (semantic feedback refinement); None (default): likewise.
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
        aux_pretrained: auxiliary models by kind, ``{"dino": path_or_name}`` (see :mod:`resclip.auxiliary`),
            for methods that read one (ProxyCLIP: ``"dino"``); each is loaded once per process and
            shared by every segmenter and variant that names it.
        **overrides: protocol and module settings, see :func:`apply_overrides`, and the method's own
            fields as ``<method>_<field>`` (``proxyclip_beta=1.0``, ``corrclip_masks="given"``; see
            :func:`method_fields`).

    Example:
        >>> seg = create_segmenter("naclip", preset="voc21", pretrained="/path/ViT-B-16.pt")  # doctest: +SKIP
        >>> seg.predict("cat.jpg", ["background", "cat"]).mask.shape  # doctest: +SKIP
    """
    if str(method).lower() == METHOD_ALIAS and (rcs is False or sfr is False):
        raise ValueError(f"method={METHOD_ALIAS!r} is naclip with RCS and SFR; "
                         f"for naclip without one of them use method='naclip' with rcs= / sfr=")
    base, chosen, fields, configured = _resolve(method, preset, fidelity, overrides)
    dev = resolve_device(device)
    resolve_precision(precision)
    aux_sources = check_aux_sources(aux_pretrained or {})
    for kind in configured.required_aux():
        if kind not in aux_sources:  # before any model is loaded
            raise ValueError(missing_aux_message(base.name, kind))
    if chosen.protocol.sam_refine is not None and "sam" not in aux_sources:
        raise ValueError("sam_refine refines masks with SAM: pass aux_pretrained={'sam': PATH} "
                         "(--aux-pretrained sam=PATH), or sam_refine=False")
    checkpoint = _local_checkpoint(model, pretrained)
    before = file_identity(checkpoint) if checkpoint is not None else None
    loaded = load_clip(model, pretrained, device=dev, precision=precision)
    # remembered per file only if the file did not change while it was being read
    same = before is not None and checkpoint is not None and file_identity(checkpoint) == before
    variant = f"{loaded.info.arch}|{precision}"
    visual_digest, text_digest = weights_digests(loaded.model, before if same else None, variant)
    aux = {kind: load_aux(kind, src, device=dev, precision=precision) for kind, src in aux_sources.items()}
    if aux:  # the image side's weights include the auxiliary models' (saved progress, labelling records)
        parts = [visual_digest, *(f"{kind}:{aux_digest(model)}" for kind, model in sorted(aux.items()))]
        visual_digest = bytes_digest("|".join(parts).encode())
    use_rcs, use_sfr = default_modules(configured, chosen.protocol, loaded.model.visual, aux, rcs, sfr)
    config = SegmenterConfig(
        method=base.name,
        rcs=chosen.rcs if use_rcs else None,
        sfr=chosen.sfr if use_sfr else None,
        protocol=chosen.protocol,
        preset=chosen.name,
        fidelity=chosen.fidelity,
        model=loaded.info.arch,
        pretrained=loaded.info.pretrained,
        precision=precision,
        trunk_attention=trunk_attention or chosen.trunk_attention,
        aux=tuple(sorted((kind, str(src)) for kind, src in aux_sources.items())),
        method_fields=fields,
    )
    engine = build_engine(loaded.model.visual, config, aux=aux)
    # not `text_cache or None`: an empty EmbeddingCache has len() == 0 and would be dropped
    cache = EmbeddingCache() if text_cache is True else (None if text_cache is False else text_cache)
    if pretrained is None and cache is not None:
        cache = EmbeddingCache(disk=False)  # random weights: kept in memory only, never on disk
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


def _resolve(method: str, preset: str, fidelity: Fidelity | None, overrides: Mapping[str, Any]
             ) -> tuple[BaseAttention, Preset, tuple[tuple[str, Any], ...], BaseAttention]:
    """The registered method, the preset with the fidelity and ``overrides`` applied, the method's
    own fields set by ``overrides`` and the configured method, with no weights loaded."""
    base = get_method("naclip" if str(method).lower() == METHOD_ALIAS else method)
    chosen = get_preset(preset)
    if fidelity is not None:
        chosen = to_fidelity(chosen, fidelity)
    settings, own = split_method_overrides(overrides, base.name)
    chosen = apply_overrides(chosen, settings)
    fields = tuple(sorted(own.items()))
    return base, chosen, fields, configured_method(base.name, chosen.fidelity, chosen.name, fields,
                                                   chosen.protocol)


def given_regions_settings(method: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """With instance maps given by the caller, a method that makes its own (a ``masks`` field:
    CorrCLIP's SAM 2 generator) reads them instead: ``{"<method>_masks": "given"}``, unless
    ``overrides`` already set that field; ``{}`` for the other methods."""
    name = get_method("naclip" if str(method).lower() == METHOD_ALIAS else method).name
    key = f"{name}_masks"
    if "masks" not in method_fields(get_method(name)) or key in overrides:
        return {}
    return {key: "given"}


def reads_regions(method: str, preset: str = "default", fidelity: Fidelity | None = None,
                  **overrides: Any) -> bool:
    """Whether :func:`create_segmenter` with these arguments makes a segmenter that reads instance
    maps (:attr:`resclip.Segmenter.reads_regions`), known without loading any weights.

    Raises:
        ValueError, TypeError: as :func:`create_segmenter` for an unknown method, preset or setting.
    """
    _, chosen, _, configured = _resolve(method, preset, fidelity, overrides)
    return bool(configured.uses_regions or chosen.protocol.region_vote)


def _local_checkpoint(model: str | None, pretrained: str | None) -> Path | None:
    """The checkpoint file ``load_clip`` will read, or None (a tag, random weights, or a bad name that
    ``load_clip`` reports itself)."""
    try:
        return _checkpoint_path(pretrained, _resolve_model_name(model) if model is not None else None)
    except (ValueError, OSError):
        return None
