"""Per-benchmark presets: the released ResCLIP settings, each baseline repository's own
protocol, and the paper's printed settings.

Names: ``<dataset>`` (= ``resclip/<dataset>``), ``sclip/<dataset>``, ``naclip/<dataset>``,
``clearclip/<dataset>``, ``sc_clip/<dataset>``, ``sfp/<dataset>``, ``pearl/<dataset>``,
``cliper/<dataset>``, ``proxyclip/<dataset>``, ``trident/<dataset>``, ``corrclip/<dataset>``,
``paper/<dataset>``, and ``default`` for everyday photos.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, NamedTuple

from .cliper_protocol import CLIPerProtocol
from .dataset_specs import DATASETS as _SPECS
from .protocol import Protocol
from .rcs import RCSConfig
from .sfr import SFRConfig
from .tlp import TLPConfig
from .trident import TRIDENT_DATASETS, SAMRefineConfig, TridentProtocol

Fidelity = Literal["official", "paper"]

# the eight benchmarks and their class-name files, as resclip.dataset_specs describes them
DATASETS = tuple(_SPECS)
CLASS_FILES = {name: spec.class_file for name, spec in _SPECS.items()}


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
        class_file: a shipped class-name file (``data/class_names/``) that replaces the
            dataset's own for this repository's protocol, or None.
        method_options: ``(method, ((field, value), ...))`` pairs: settings of a method's own
            fields that this repository's config changes per dataset (PEARL's ``alpha_kk``); they
            apply when the segmenter runs that method (see :meth:`method_settings`).
    """

    name: str
    protocol: Protocol
    rcs: RCSConfig
    sfr: SFRConfig
    dataset: str | None
    fidelity: Fidelity
    description: str
    trunk_attention: str = "fused"
    class_file: str | None = None
    method_options: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()

    def method_settings(self, method: str) -> dict[str, Any]:
        """The field settings this preset gives ``method`` (empty for the others)."""
        return {k: v for name, pairs in self.method_options if name == method for k, v in pairs}

    def settings_lines(self) -> list[str]:
        """What this preset sets, one ``group: field=value ...`` line per group (protocol, RCS, SFR,
        TLP, method options, class file), for ``resclip list presets --verbose``."""

        def fields(obj: Any, skip: tuple[str, ...] = ()) -> str:
            return " ".join(f"{f.name}={getattr(obj, f.name)!r}" for f in dataclasses.fields(obj)
                            if f.name not in skip)

        if self.protocol.cliper is not None:  # CLIPer's own pipeline: no windows, RCS or SFR
            lines = [f"cliper pipeline: {fields(self.protocol.cliper)}"]
        else:
            lines = [f"protocol: {fields(self.protocol, ('tlp', 'cliper'))}"]
            if self.protocol.trident is None:  # Trident's pipeline has no per-window RCS / SFR
                lines += [f"rcs (when on): {fields(self.rcs)}", f"sfr (when on): {fields(self.sfr)}"]
        if self.protocol.tlp is not None:
            lines.append(f"tlp: {fields(self.protocol.tlp)}")
        for method, pairs in self.method_options:
            lines.append(f"{method}: " + " ".join(f"{k}={v!r}" for k, v in pairs))
        lines.append(f"fidelity={self.fidelity} trunk_attention={self.trunk_attention} "
                     f"dataset={self.dataset} class_file={self.class_file}")
        return lines

    def class_file_path(self) -> Path | None:
        """The shipped class file this preset names, or None (use the dataset's own)."""
        if self.class_file is None:
            return None
        return Path(__file__).parent / "data" / "class_names" / self.class_file


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
    tlp = preset.protocol.tlp
    refine = preset.protocol.sam_refine
    if refine is not None and fidelity in ("official", "paper"):  # Trident's mask prompt
        preset = replace(preset, protocol=replace(preset.protocol, sam_refine=refine.for_fidelity(fidelity)))
    if fidelity == "paper":
        if tlp is not None:  # TLP's text coupling: the paper's quadratic form
            preset = replace(preset, protocol=replace(preset.protocol, tlp=replace(tlp, coupling="matrix")))
        return replace(preset, rcs=paper_rcs(preset.rcs.lam), sfr=paper_sfr(preset.sfr.lam), fidelity="paper")
    if fidelity == "official":
        if tlp is not None:
            preset = replace(preset, protocol=replace(preset.protocol, tlp=replace(tlp, coupling="diagonal")))
        ref = _resclip(preset.dataset) if preset.dataset else PRESETS["default"]
        return replace(preset, rcs=ref.rcs, sfr=ref.sfr, fidelity="official")
    raise ValueError(f"fidelity must be 'official' or 'paper', got {fidelity!r}")


class Released(NamedTuple):
    """One dataset's settings in the released ResCLIP configs (``configs/cfg_<dataset>.py``)."""

    short_side: int  # resize: short side in pixels
    slide_crop: int  # sliding window size; 0 = whole image
    prob_thd: float  # background threshold on class probabilities
    temp_thd: float  # SFR first-pass confidence threshold ("AdaThr")
    lambda_rcs: float
    tau_sfr: float
    lambda_sfr: float


_RELEASED = {
    "voc21": Released(short_side=336, slide_crop=0, prob_thd=0.1, temp_thd=0.50,
                      lambda_rcs=0.3, tau_sfr=2.2, lambda_sfr=0.7),
    "context60": Released(short_side=336, slide_crop=224, prob_thd=0.1, temp_thd=0.30,
                          lambda_rcs=0.3, tau_sfr=1.8, lambda_sfr=0.7),
    "coco_object": Released(short_side=336, slide_crop=224, prob_thd=0.1, temp_thd=0.11,
                            lambda_rcs=0.4, tau_sfr=1.8, lambda_sfr=0.7),
    "voc20": Released(short_side=336, slide_crop=0, prob_thd=0.0, temp_thd=0.10,
                      lambda_rcs=0.6, tau_sfr=2.1, lambda_sfr=0.6),
    "cityscapes": Released(short_side=560, slide_crop=224, prob_thd=0.0, temp_thd=0.10,
                           lambda_rcs=0.2, tau_sfr=2.1, lambda_sfr=0.6),
    "context59": Released(short_side=336, slide_crop=224, prob_thd=0.0, temp_thd=0.25,
                          lambda_rcs=0.4, tau_sfr=1.8, lambda_sfr=0.7),
    "ade20k": Released(short_side=336, slide_crop=224, prob_thd=0.0, temp_thd=0.25,
                       lambda_rcs=0.3, tau_sfr=2.1, lambda_sfr=0.7),
    "coco_stuff": Released(short_side=336, slide_crop=224, prob_thd=0.0, temp_thd=0.11,
                           lambda_rcs=0.4, tau_sfr=1.8, lambda_sfr=0.7),
}

_BACKGROUND = ("voc21", "context60", "coco_object")


def _resclip(ds: str) -> Preset:
    r = _RELEASED[ds]
    return Preset(
        name=ds,
        protocol=Protocol(
            short_side=r.short_side, slide_crop=r.slide_crop, slide_stride=112, prob_thd=r.prob_thd
        ),
        rcs=RCSConfig(lam=r.lambda_rcs, tau=2.0, layers=(6, 7, 8, 9)),
        sfr=official_sfr(r.lambda_sfr, r.tau_sfr, r.temp_thd),
        dataset=ds,
        fidelity="official",
        description=f"released ResCLIP config for {ds}",
        trunk_attention="explicit",
    )


def _repository(ds: str, family: str, protocol: Protocol, title: str) -> Preset:
    """A baseline repository's own protocol for ``ds`` (ResCLIP's module settings, fused trunk)."""
    return replace(_resclip(ds), name=f"{family}/{ds}", protocol=protocol, trunk_attention="fused",
                   description=f"{title} repository protocol for {ds}")


def _naclip(ds: str) -> Preset:
    proto = replace(_resclip(ds).protocol, pamr_steps=10)
    return replace(_repository(ds, "naclip", proto, "NACLIP"),
                   description=f"NACLIP repository protocol for {ds} (PAMR on the output)")


def _sclip(ds: str) -> Preset:
    proto = Protocol(
        short_side={"coco_stuff": 448, "cityscapes": 560}.get(ds, 336),
        slide_crop=224,
        slide_stride=112,
        logit_scale={"voc21": 65.0, "context60": 50.0, "coco_object": 50.0}.get(ds, 40.0),
        prob_thd=0.1 if ds in _BACKGROUND else 0.0,
        area_thd=0.1 if ds == "voc21" else None,
    )
    return _repository(ds, "sclip", proto, "SCLIP")


def _clearclip(ds: str) -> Preset:
    crop, stride = (224, 224) if ds == "cityscapes" else (448, 224)
    prob = {"voc21": 0.5, "context60": 0.15, "coco_object": 0.4}.get(ds, 0.0)
    proto = Protocol(short_side=448, slide_crop=crop, slide_stride=stride, logit_scale=50.0, prob_thd=prob)
    return _repository(ds, "clearclip", proto, "ClearCLIP")


class RepoProtocol(NamedTuple):
    """One dataset's post-processing in a baseline repository's config (slide 224/112, no PAMR)."""

    logit_scale: float
    prob_thd: float
    area_thd: float | None = None
    short_side: int = 336


# SC-CLIP release (SuleBai/SC-CLIP @0417ba9), configs/cfg_<dataset>.py
_SC_CLIP = {
    "voc21": RepoProtocol(logit_scale=50.0, prob_thd=0.15, area_thd=0.1),
    "context60": RepoProtocol(logit_scale=40.0, prob_thd=0.15),
    "coco_object": RepoProtocol(logit_scale=55.0, prob_thd=0.35),
    "voc20": RepoProtocol(logit_scale=40.0, prob_thd=0.0),
    "cityscapes": RepoProtocol(logit_scale=40.0, prob_thd=0.0, short_side=560),
    "context59": RepoProtocol(logit_scale=40.0, prob_thd=0.0),
    "ade20k": RepoProtocol(logit_scale=40.0, prob_thd=0.0),
    "coco_stuff": RepoProtocol(logit_scale=40.0, prob_thd=0.0),
}


def _from_table(table: dict[str, RepoProtocol], family: str, title: str) -> Callable[[str], Preset]:
    def make(ds: str) -> Preset:
        r = table[ds]
        proto = Protocol(short_side=r.short_side, slide_crop=224, slide_stride=112,
                         logit_scale=r.logit_scale, prob_thd=r.prob_thd, area_thd=r.area_thd)
        return _repository(ds, family, proto, title)

    return make


# SFP release (Kimsure/SFP @2804f5b, SFP_ICCV/configs/cfg_<dataset>.py)
_SFP = {
    **_SC_CLIP,
    "ade20k": RepoProtocol(logit_scale=40.0, prob_thd=0.0, short_side=384),
}


# SFP's voc21 / voc20 / city_scapes class files spell the person class "people"
_SFP_CLASS_FILES = {ds: f"sfp_{CLASS_FILES[ds]}" for ds in ("voc21", "voc20", "cityscapes")}


def _sfp_variant(make: Callable[[str], Preset]) -> Callable[[str], Preset]:
    """SFP forms every trunk attention map explicitly (its release hooks each block's map) and
    ships its own class files for three datasets."""
    return lambda ds: replace(make(ds), trunk_attention="explicit", class_file=_SFP_CLASS_FILES.get(ds))


_sc_clip = _from_table(_SC_CLIP, "sc_clip", "SC-CLIP")
_sfp = _sfp_variant(_from_table(_SFP, "sfp", "SFP"))


class PearlRelease(NamedTuple):
    """One dataset's settings in the PEARL release (``configs/cfg_<dataset>.py``; logit scale 40,
    slide stride 112 and TLP on everywhere)."""

    prob_thd: float = 0.0
    slide_crop: int = 224  # 0 = whole image
    short_side: int = 336
    alpha_kk: float = 0.08  # the k-k term's weight in the Procrustes-aligned attention
    tlp_grid: int = 80  # TLP's coarse grid, cells per side


# PEARL release (PGSmall/PEARL @c26062b), configs/cfg_<dataset>.py; class files as ours
_PEARL = {
    "voc21": PearlRelease(prob_thd=0.1, slide_crop=0),
    "context60": PearlRelease(prob_thd=0.1),
    "coco_object": PearlRelease(prob_thd=0.1),
    "voc20": PearlRelease(slide_crop=0),
    "cityscapes": PearlRelease(short_side=560, alpha_kk=0.3, tlp_grid=224),
    "context59": PearlRelease(),
    "ade20k": PearlRelease(alpha_kk=0.3),
    "coco_stuff": PearlRelease(),
}


def _pearl(ds: str) -> Preset:
    r = _PEARL[ds]
    proto = Protocol(short_side=r.short_side, slide_crop=r.slide_crop, slide_stride=112,
                     logit_scale=40.0, prob_thd=r.prob_thd, tlp=TLPConfig(grid=r.tlp_grid))
    return replace(_repository(ds, "pearl", proto, "PEARL"),
                   method_options=(("pearl", (("alpha_kk", r.alpha_kk),)),),
                   description=f"PEARL repository protocol for {ds} (TLP on the output)")


class CliperRelease(NamedTuple):
    """One dataset's settings in the CLIPer release (``scripts/config/vit-{b-16,l-14}/ovs_<dataset>.yaml``;
    every config attends layers -4 / -6)."""

    logit_scale: float
    attention_thr: float
    score_thr: float
    bkg_thr: float
    slide_crop: int = 0  # 0 = whole image only
    short_side: int = 336
    normalise: bool = False
    templates: str = "cliper"  # the release's car_template.txt; "openai" = the 80 ImageNet ones
    select_layer: int = -1  # the layer whose attention maps are kept (the method's select_layer)


# CLIPer release (linsun449/cliper.code @c05fa41), the ViT-B/16 configs
_CLIPER = {
    "voc21": CliperRelease(100.0, 0.1, 0.7, 0.6, slide_crop=336, normalise=True),
    "context60": CliperRelease(100.0, 0.2, 0.45, 0.45, slide_crop=224),
    "coco_object": CliperRelease(50.0, 0.2, 0.3, 0.3, slide_crop=224, templates="openai"),
    "voc20": CliperRelease(100.0, 0.1, 0.0, 0.001),
    "cityscapes": CliperRelease(100.0, 0.35, 0.0, 0.0001, short_side=560, templates="openai"),
    "context59": CliperRelease(100.0, 0.2, 0.3, 0.3, slide_crop=224),
    "ade20k": CliperRelease(100.0, 0.2, 0.3, 0.3),
    "coco_stuff": CliperRelease(50.0, 0.2, 0.1, 0.1),
}


# the same release's ViT-L/14 configs (scripts/config/vit-l-14/ovs_<dataset>.yaml): whole image only,
# other thresholds and templates, the second-to-last layer selected on five of them
_CLIPER_L14 = {
    "voc21": CliperRelease(50.0, 0.1, 0.5, 0.4, normalise=True, select_layer=-2),
    "context60": CliperRelease(50.0, 0.2, 0.3, 0.3, templates="openai", select_layer=-2),
    "coco_object": CliperRelease(50.0, 0.1, 0.5, 0.5, templates="openai", select_layer=-2),
    "voc20": CliperRelease(70.0, 0.2, 0.1, 0.0001),
    "cityscapes": CliperRelease(100.0, 0.35, 0.0, 0.0001, short_side=448),
    "context59": CliperRelease(100.0, 0.2, 0.45, 0.45, select_layer=-2),
    "ade20k": CliperRelease(50.0, 0.2, 0.2, 0.2, templates="openai"),
    "coco_stuff": CliperRelease(50.0, 0.2, 0.2, 0.2, templates="openai", select_layer=-2),
}


def _background_line(ds: str) -> tuple[str, ...]:
    """The synonyms of class 0 in ``ds``'s shipped class file."""
    path = Path(__file__).parent / "data" / "class_names" / CLASS_FILES[ds]
    first = path.read_text(encoding="utf-8").splitlines()[0]
    return tuple(w.strip() for w in first.split(",") if w.strip())


def _cliper(ds: str, table: dict[str, CliperRelease] = _CLIPER, family: str = "cliper",
            backbone: str = "ViT-B/16") -> Preset:
    r = table[ds]
    background = ds in _BACKGROUND
    # VOC-20 is the release's VOC run with background ignored: VOC's background words, pixels left
    # to them are misses; the other datasets without background query the word "background"
    words = _background_line("voc21") if ds == "voc20" else ("background",)
    cliper = CLIPerProtocol(short_side=r.short_side, slide_crop=r.slide_crop, slide_stride=112,
                            logit_scale=r.logit_scale, attention_thr=r.attention_thr, score_thr=r.score_thr,
                            bkg_thr=r.bkg_thr, normalise=r.normalise, background=background,
                            background_words=() if background else words, templates=r.templates)
    proto = Protocol(short_side=r.short_side, slide_crop=0, cliper=cliper)
    layer = (("cliper", (("select_layer", r.select_layer),)),) if r.select_layer != -1 else ()
    return replace(_repository(ds, family, proto, "CLIPer"), method_options=layer,
                   description=f"CLIPer repository pipeline for {ds}, {backbone} config (resizing, passes, "
                   "thresholds)")


def _cliper_l14(ds: str) -> Preset:
    return _cliper(ds, _CLIPER_L14, "cliper_l14", "ViT-L/14")


# ProxyCLIP's class files (shared by Trident; ClearCLIP's lineage): VOC's person / tvmonitor as one
# name each, COCO-Object's shorter background line; the other datasets' files equal resclip's
_PROXYCLIP_CLASS_FILES = {ds: f"proxyclip_{CLASS_FILES[ds]}" for ds in ("voc21", "voc20", "coco_object")}


class WindowRelease(NamedTuple):
    """One dataset's window protocol in the ProxyCLIP / CorrCLIP releases (``configs/cfg_<dataset>.py``:
    keep-ratio resize to ``(2048, short_side)``, windows padded to multiples of 56, logit scale 40)."""

    short_side: int = 336
    slide_crop: int = 336
    slide_stride: int = 112
    prob_thd: float = 0.0


# ProxyCLIP release (mc-lan/ProxyCLIP @e7b767f); CorrCLIP's CorrCLIPv1 (zdk258/CorrCLIP @103bc18) has the
# same table
_PROXYCLIP = {
    "voc21": WindowRelease(prob_thd=0.2),
    "context60": WindowRelease(prob_thd=0.15),
    "coco_object": WindowRelease(prob_thd=0.25),
    "voc20": WindowRelease(),
    "cityscapes": WindowRelease(short_side=448, slide_crop=224),
    "context59": WindowRelease(),
    "ade20k": WindowRelease(short_side=448),
    "coco_stuff": WindowRelease(),
}


def _window_release(ds: str, family: str, title: str, trunk: str, **protocol: Any) -> Preset:
    r = _PROXYCLIP[ds]
    proto = Protocol(short_side=r.short_side, slide_crop=r.slide_crop, slide_stride=r.slide_stride,
                     logit_scale=40.0, prob_thd=r.prob_thd, window_multiple=56, **protocol)
    return replace(_repository(ds, family, proto, title), trunk_attention=trunk)


def _proxyclip(ds: str) -> Preset:
    return replace(_window_release(ds, "proxyclip", "ProxyCLIP", "fused"),
                   class_file=_PROXYCLIP_CLASS_FILES.get(ds),
                   description=f"ProxyCLIP repository protocol for {ds} (DINO proxy attention)")


def _corrclip(ds: str) -> Preset:
    # CorrCLIP's class files spell the person class "people" (and COCO-Object's background line differs)
    return replace(_window_release(ds, "corrclip", "CorrCLIP", "explicit", region_vote=True),
                   class_file=f"corrclip_{CLASS_FILES[ds]}",
                   description=f"CorrCLIP repository protocol for {ds} (DINO, SAM 2 regions, vote)")


def _trident(ds: str) -> Preset:
    r = TRIDENT_DATASETS[ds]
    refine = SAMRefineConfig(coarse_thresh=r.coarse_thresh, minimal_area=225, mask_coeff=0.005,
                             iou_thresh=0.8)
    proto = Protocol(short_side=r.short_side, slide_crop=336, slide_stride=r.slide_stride, logit_scale=40.0,
                     prob_thd=r.prob_thd, trident=TridentProtocol(split_halves=r.split_halves),
                     sam_refine=refine)
    return replace(_repository(ds, "trident", proto, "Trident"), class_file=_PROXYCLIP_CLASS_FILES.get(ds),
                   method_options=(("trident", (("cos_fac", r.cos_fac),
                                                ("refine_neg_cos", r.refine_neg_cos))),),
                   description=f"Trident repository pipeline for {ds} (sub-images, DINO, SAM, refinement)")


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
        for make in (_resclip, _naclip, _sclip, _clearclip, _sc_clip, _sfp, _pearl, _cliper, _cliper_l14,
                     _proxyclip, _trident, _corrclip, _paper):
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
            "'<family>/<dataset>' with family one of resclip, sclip, naclip, clearclip, paper, sc_clip, sfp, "
            "pearl, cliper, cliper_l14, proxyclip, trident, corrclip"
        )
    return PRESETS[key]
