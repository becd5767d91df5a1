"""Per-benchmark presets: the released ResCLIP settings, each baseline repository's own
protocol, and the paper's printed settings.

Names: ``<dataset>`` (= ``resclip/<dataset>``), ``sclip/<dataset>``, ``naclip/<dataset>``,
``clearclip/<dataset>``, ``paper/<dataset>``, and ``default`` for everyday photos.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from .protocol import Protocol
from .rcs import RCSConfig
from .sfr import SFRConfig

Fidelity = Literal["official", "paper"]

DATASETS = ("voc21", "voc20", "context60", "context59", "coco_object", "coco_stuff", "cityscapes", "ade20k")

CLASS_FILES = {
    "voc21": "voc21.txt",
    "voc20": "voc20.txt",
    "context60": "context60.txt",
    "context59": "context59.txt",
    "coco_object": "coco_object.txt",
    "coco_stuff": "coco_stuff.txt",
    "cityscapes": "city_scapes.txt",
    "ade20k": "ade20k.txt",
}


@dataclass(frozen=True)
class Preset:
    """A complete inference setting.

    Attributes:
        name: preset name.
        protocol: resizing, windows and post-processing.
        rcs: RCS hyper-parameters used when RCS is on.
        sfr: SFR hyper-parameters used when SFR is on.
        dataset: benchmark whose class names go with it, if any.
        fidelity: ``"official"`` (released code) or ``"paper"`` (printed equations).
        description: one line.
        trunk_attention: how blocks 1..L-1 compute attention: ``"explicit"`` as the released
            ResCLIP code (it keeps every map), ``"fused"`` as the baseline repositories
            (``nn.MultiheadAttention``); the two differ by float rounding only (~1e-5).
    """

    name: str
    protocol: Protocol
    rcs: RCSConfig
    sfr: SFRConfig
    dataset: str | None
    fidelity: Fidelity
    description: str
    trunk_attention: str = "fused"


def official_sfr(lam: float, tau: float, temp_thd: float) -> SFRConfig:
    """SFR exactly as the released code computes it."""
    return SFRConfig(
        lam=lam,
        tau=tau,
        confidence_thd=temp_thd,
        first_pass_logit_scale=40.0,
        first_pass_pamr_steps=10,
        first_pass_pamr_dilations=(8, 16),
        label_level="query",
        path="line",
        distance_decay=True,
        smoothing_std=5.0,
        normalise=True,
        fp16_scores=True,
        bias_after_mix=True,
    )


def paper_sfr(lam: float = 0.7) -> SFRConfig:
    """SFR as the paper's equations print it (no hidden factors)."""
    return SFRConfig(lam=lam)


def paper_rcs(lam: float = 0.5) -> RCSConfig:
    """RCS as Eq. 6 prints it (tau = 1), layers 6..9."""
    return RCSConfig(lam=lam, tau=1.0, layers=(6, 7, 8, 9))


def to_fidelity(preset: Preset, fidelity: Fidelity) -> Preset:
    """Switch a preset's RCS/SFR switches to another fidelity, keeping its lambdas."""
    if fidelity == preset.fidelity:
        return preset
    if fidelity == "paper":
        return replace(preset, rcs=paper_rcs(preset.rcs.lam), sfr=paper_sfr(preset.sfr.lam), fidelity="paper")
    if fidelity == "official":
        ref = _resclip(preset.dataset) if preset.dataset else PRESETS["default"]
        return replace(preset, rcs=ref.rcs, sfr=ref.sfr, fidelity="official")
    raise ValueError(f"fidelity must be 'official' or 'paper', got {fidelity!r}")


# dataset: (short side, slide crop, prob_thd, temp_thd, lambda_rcs, tau_sfr, lambda_sfr), released configs
_RELEASED = {
    "voc21": (336, 0, 0.1, 0.50, 0.3, 2.2, 0.7),
    "context60": (336, 224, 0.1, 0.30, 0.3, 1.8, 0.7),
    "coco_object": (336, 224, 0.1, 0.11, 0.4, 1.8, 0.7),
    "voc20": (336, 0, 0.0, 0.10, 0.6, 2.1, 0.6),
    "cityscapes": (560, 224, 0.0, 0.10, 0.2, 2.1, 0.6),
    "context59": (336, 224, 0.0, 0.25, 0.4, 1.8, 0.7),
    "ade20k": (336, 224, 0.0, 0.25, 0.3, 2.1, 0.7),
    "coco_stuff": (336, 224, 0.0, 0.11, 0.4, 1.8, 0.7),
}

_BACKGROUND = ("voc21", "context60", "coco_object")


def _resclip(ds: str) -> Preset:
    short, crop, prob, temp, lam_rcs, tau_sfr, lam_sfr = _RELEASED[ds]
    return Preset(
        name=ds,
        protocol=Protocol(short_side=short, slide_crop=crop, slide_stride=112, prob_thd=prob),
        rcs=RCSConfig(lam=lam_rcs, tau=2.0, layers=(6, 7, 8, 9)),
        sfr=official_sfr(lam_sfr, tau_sfr, temp),
        dataset=ds,
        fidelity="official",
        description=f"released ResCLIP config for {ds}",
        trunk_attention="explicit",
    )


def _naclip(ds: str) -> Preset:
    base = _resclip(ds)
    return replace(
        base,
        name=f"naclip/{ds}",
        protocol=replace(base.protocol, pamr_steps=10),
        trunk_attention="fused",
        description=f"NACLIP repository protocol for {ds} (PAMR on the output)",
    )


def _sclip(ds: str) -> Preset:
    base = _resclip(ds)
    logit = {"voc21": 65.0, "context60": 50.0, "coco_object": 50.0}.get(ds, 40.0)
    short = {"coco_stuff": 448, "cityscapes": 560}.get(ds, 336)
    proto = Protocol(
        short_side=short,
        slide_crop=224,
        slide_stride=112,
        logit_scale=logit,
        prob_thd=0.1 if ds in _BACKGROUND else 0.0,
        area_thd=0.1 if ds == "voc21" else None,
    )
    return replace(
        base,
        name=f"sclip/{ds}",
        protocol=proto,
        trunk_attention="fused",
        description=f"SCLIP repository protocol for {ds}",
    )


def _clearclip(ds: str) -> Preset:
    base = _resclip(ds)
    crop, stride = (224, 224) if ds == "cityscapes" else (448, 224)
    prob = {"voc21": 0.5, "context60": 0.15, "coco_object": 0.4}.get(ds, 0.0)
    proto = Protocol(short_side=448, slide_crop=crop, slide_stride=stride, logit_scale=50.0, prob_thd=prob)
    return replace(
        base,
        name=f"clearclip/{ds}",
        protocol=proto,
        trunk_attention="fused",
        description=f"ClearCLIP repository protocol for {ds}",
    )


def _paper(ds: str) -> Preset:
    base = _resclip(ds)
    proto = replace(base.protocol, slide_crop=224, slide_stride=112)
    return replace(
        base,
        name=f"paper/{ds}",
        protocol=proto,
        rcs=paper_rcs(),
        sfr=paper_sfr(),
        fidelity="paper",
        trunk_attention="fused",
        description=f"paper's printed settings for {ds} (slide 224/112, lambda_rcs 0.5, lambda_sfr 0.7)",
    )


def _build() -> dict[str, Preset]:
    table: dict[str, Preset] = {}
    for ds in DATASETS:
        for make in (_resclip, _naclip, _sclip, _clearclip, _paper):
            p = make(ds)
            table[p.name] = p
        table[f"resclip/{ds}"] = replace(table[ds], name=f"resclip/{ds}")
    table["default"] = Preset(
        name="default",
        protocol=Protocol(short_side=336, slide_crop=224, slide_stride=112, prob_thd=0.0),
        rcs=RCSConfig(lam=0.3, tau=2.0),
        sfr=official_sfr(0.7, 2.1, 0.25),
        dataset=None,
        fidelity="official",
        description="everyday photos: released ADE20K settings (sliding windows, no background threshold)",
    )
    return table


PRESETS: dict[str, Preset] = _build()


def list_presets() -> list[str]:
    """Names of all presets, sorted."""
    return sorted(PRESETS)


def get_preset(name: str) -> Preset:
    """Look up a preset by name.

    Raises:
        ValueError: unknown name; the message lists the datasets and prefixes.
    """
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in PRESETS:
        raise ValueError(
            f"unknown preset {name!r}; valid: 'default', a dataset ({', '.join(DATASETS)}), or "
            "'<family>/<dataset>' with family one of resclip, sclip, naclip, clearclip, paper"
        )
    return PRESETS[key]
