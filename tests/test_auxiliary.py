"""The auxiliary-model contract (issue 13): ``resclip.auxiliary`` loading and sharing, the DINO forward of the
releases, what the engine hands a last stage (``StageContext.aux / crops / out_grid / memo``), the
composition and missing-model errors, and ``--aux-pretrained``."""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import types
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch

import resclip
from parity import GOLDEN, hub_pattern
from resclip import auxiliary as aux
from resclip.cli import main
from resclip.commands.common import UserError, parse_aux_pretrained
from resclip.engine import DenseEngine, WindowTrace
from resclip.methods import BaseAttention, StageContext
from resclip.rcs import RCSConfig
from resclip.sfr import SFRConfig
from resclip.vit import project_tokens

AUX = GOLDEN / "aux"
DINO8 = AUX / "dino_vitb8_tiny_fp16.pth"
DINO16 = AUX / "dino_vitb16_tiny_fp16.pth"


# ---------------------------------------------------------------- loading and sharing
def test_sources_are_checked():
    assert aux.check_aux_sources({"DINO": DINO8}) == {"dino": str(DINO8)}
    with pytest.raises(ValueError,
                       match=r"^unknown auxiliary model kind 'clip'; known kinds: dino, sam, mae$"):
        aux.check_aux_sources({"clip": "x.pt"})
    with pytest.raises(ValueError, match=r"aux_pretrained\['dino'\] must be a checkpoint path or a model"):
        aux.check_aux_sources({"dino": ""})


def test_one_model_per_source_device_and_precision(tmp_path):
    a = aux.load_aux("dino", DINO8)
    assert aux.load_aux("dino", str(DINO8), device="cpu", precision="fp32") is a
    assert a.aux_kind == "dino" and a.pos_embed_mode == "hub" and not a.training
    half = aux.load_aux("dino", DINO8, precision="fp16")
    assert half is not a and half.pos_embed.dtype == torch.float16
    copy = tmp_path / "dino.pth"
    shutil.copy(DINO8, copy)
    first = aux.load_aux("dino", copy)
    assert first is not a and aux.load_aux("dino", copy) is first
    stat = copy.stat()
    os.utime(copy, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the file changed: loaded again
    assert aux.load_aux("dino", copy) is not first
    aux.clear_aux_cache()
    assert aux.load_aux("dino", DINO8) is not a


def test_loader_errors(monkeypatch, tmp_path):
    with pytest.raises(FileNotFoundError, match="DINO checkpoint not found"):
        aux.load_aux("dino", tmp_path / "missing.pth")
    monkeypatch.setitem(aux.AUX_KINDS, "sam", ("resclip._no_such_loader", "load", "sam"))
    with pytest.raises(ValueError, match=r"^auxiliary models of kind 'sam' are not supported by this"):
        aux.load_aux("sam", DINO8)
    fake = types.ModuleType("resclip_fake_aux_loader")

    def load(source: str, device: Any, precision: str) -> None:
        raise ModuleNotFoundError("No module named 'timm'", name="timm")

    fake.load = load  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "resclip_fake_aux_loader", fake)
    monkeypatch.setitem(aux.AUX_KINDS, "sam", ("resclip_fake_aux_loader", "load", "sam"))
    with pytest.raises(ImportError, match=r"pip install 'resclip\[sam\]'"):
        aux.load_aux("sam", DINO8)


def test_digest_is_computed_once():
    model = aux.load_aux("dino", DINO8)
    digest = aux.aux_digest(model)
    assert len(digest) == 64 and aux.aux_digest(model) == digest == model.aux_digest
    assert aux.aux_digest(aux.load_aux("dino", DINO16)) != digest


# ---------------------------------------------------------------- the releases' DINO forward
def test_imagenet_input_is_the_releases_two_steps():
    x = torch.randn(2, 3, 5, 7)
    want = x.clone()
    for t in want:  # UnNormalize (CLIP statistics), then Normalize (ImageNet statistics), per channel
        stats = zip(aux.CLIP_MEAN, aux.CLIP_STD, aux.IMAGENET_MEAN, aux.IMAGENET_STD, strict=True)
        for c, (m, s, m2, s2) in zip(t, stats, strict=True):
            c.mul_(s).add_(m).sub_(m2).div_(s2)
    assert torch.equal(aux.imagenet_input(x), want)


@pytest.mark.parametrize("case", ["p8_224x224", "p8_336x336", "p8_224x336", "p16_336x336", "p16_448x224"])
def test_dino_tokens_are_the_hub_codes(case):
    ref = np.load(AUX / "dino_hub_reference.npz")
    patch, size = case[1:].split("_")
    h, w = (int(v) for v in size.split("x"))
    model = aux.load_aux("dino", DINO8 if patch == "8" else DINO16)
    idx = ref[f"{case}/index"]
    patches = idx > 0  # the reference's rows count the class token (row 0)
    for explicit, atol in ((True, 1e-6), (False, 1e-5)):
        tokens, grid = aux.dino_tokens(model, hub_pattern(h, w), explicit=explicit)
        assert grid == (h // int(patch), w // int(patch))
        np.testing.assert_allclose(tokens[0, idx[patches] - 1].numpy(), ref[f"{case}/tokens"][patches],
                                   atol=atol, rtol=0)


def test_dino_tokens_drop_trailing_pixels_as_the_hub_conv():
    model = aux.load_aux("dino", DINO8)
    x = torch.randn(1, 3, 45, 37)
    tokens, grid = aux.dino_tokens(model, x)
    same, _ = aux.dino_tokens(model, x[:, :, :40, :32])
    assert grid == (5, 4) and torch.equal(tokens, same)


def test_register_models_load_as_the_hub_runs_them():
    """A DINOv2-with-registers hub file through load_aux (its hub position resize is timm's own): the
    tokens are the hub's (tests/test_dino.py has the recorded comparison) and the model is shared."""
    v2reg = AUX / "dinov2_reg_tiny_fp16.pth"
    model = aux.load_aux("dino", v2reg)
    assert model.pos_embed_mode == "hub" and model.reg_token.shape == (1, 4, 128)
    assert aux.load_aux("dino", v2reg) is model
    x = torch.randn(1, 3, 70, 98)
    tokens, grid = aux.dino_tokens(model, x)
    assert grid == (5, 7) and torch.equal(tokens, model.forward_features(x)[:, 5:])


# ---------------------------------------------------------------- the engine's side of the contract
@dataclasses.dataclass(frozen=True)
class _Probe(BaseAttention):
    """A last stage that records what it is given and puts its tokens on a 2 x 3 grid."""

    stride: int | None = 16
    replaces_last_block = True
    aux_models: ClassVar[tuple[str, ...]] = ("dino",)

    def out_patch(self, clip_patch: int, aux: Mapping[str, Any]) -> int | None:
        return self.stride

    def last_stage(self, ctx: StageContext) -> torch.Tensor:
        ctx.memo["calls"] = ctx.memo.get("calls", 0) + 1
        seen = ctx.aux["dino"].seen
        seen.append({"crops": ctx.crops, "explicit": ctx.explicit, "calls": ctx.memo["calls"],
                     "kinds": sorted(ctx.aux)})
        ctx.out_grid = (2, 3)
        b = ctx.trunk.x.shape[0]
        tokens = ctx.trunk.x[:, 1:7] + torch.arange(6.0).view(1, 6, 1)
        return project_tokens(ctx.visual, tokens).expand(b, -1, -1)


@pytest.fixture(scope="module")
def visual(tiny_ckpt):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return resclip.clip.load_clip(None, str(tiny_ckpt)).model.visual


def test_stage_gets_crops_aux_memo_and_sets_its_grid(visual):
    model = types.SimpleNamespace(seen=[])
    probe = _Probe("probe", keep_residual=False, pairs=("qk",))
    crops = torch.randn(2, 3, 64, 80)
    text = torch.nn.functional.normalize(torch.randn(5, 32), dim=-1)
    sfr = SFRConfig(lam=0.5, first_pass_pamr_steps=0)
    engine = DenseEngine(visual, probe, sfr=sfr, aux={"dino": model, "sam": object()},
                         trunk_attention="explicit")
    trace = WindowTrace()
    logits = engine.window_logits(crops, text, torch.arange(5), trace)
    assert logits.shape == (2, 5, 2, 3) and trace.grid == (2, 3)
    first, final = model.seen  # SFR's first pass and the final pass share one memo
    assert first["calls"] == 1 and final["calls"] == 2 and first["explicit"] is True
    assert first["crops"] is crops and first["kinds"] == ["dino", "sam"]
    fused = DenseEngine(visual, probe, aux={"dino": model}, trunk_attention="fused")
    fused.window_logits(crops, text, torch.arange(5))
    assert model.seen[-1]["explicit"] is False


def test_missing_aux_model_and_grid_checks(visual):
    probe = _Probe("probe", keep_residual=False, pairs=("qk",))
    with pytest.raises(ValueError, match=r"^method 'probe' needs a dino model: pass aux_pretrained=\{'dino'"):
        DenseEngine(visual, probe)
    rcs = RCSConfig(lam=0.5, tau=1.0, layers=(2, 3))
    DenseEngine(visual, probe, rcs=rcs, aux={"dino": None})  # the stage's grid is the CLIP's (16 px)
    for stride, grid in ((8, "a 8-pixel grid"), (None, "a fixed grid")):
        other = dataclasses.replace(probe, stride=stride)
        with pytest.raises(ValueError, match=rf"^probe forms its attention on {grid}, RCS and SFR mix the "):
            DenseEngine(visual, other, rcs=rcs, aux={"dino": None})
        with pytest.raises(ValueError, match=rf"^probe forms its attention on {grid}"):
            DenseEngine(visual, other, sfr=SFRConfig(), aux={"dino": None})
        DenseEngine(visual, other, aux={"dino": None})  # without RCS / SFR any grid is fine


def test_factory_checks_aux_before_loading_clip(tmp_path):
    missing = str(tmp_path / "no_clip.pt")  # never read: the aux problems are found first
    with pytest.raises(ValueError, match=r"^unknown auxiliary model kind 'vfm'"):
        resclip.create_segmenter("naclip", pretrained=missing, aux_pretrained={"vfm": "x"})
    with pytest.raises(ValueError, match=r"^method 'proxyclip' needs a dino model"):
        resclip.create_segmenter("proxyclip", rcs=False, sfr=False, pretrained=missing)


# ---------------------------------------------------------------- the command line
def test_parse_aux_pretrained():
    assert parse_aux_pretrained([]) == {}
    assert parse_aux_pretrained(["DINO = a.pth", "sam=b=c.pth"]) == {"dino": "a.pth", "sam": "b=c.pth"}
    for bad, msg in (("dino", "expects KIND=SOURCE"), ("dino=", "expects KIND=SOURCE"),
                     ("clip=x", "unknown kind 'clip'; known kinds: dino, sam, mae")):
        with pytest.raises(UserError, match=msg):
            parse_aux_pretrained([bad])
    with pytest.raises(UserError, match="given twice"):
        parse_aux_pretrained(["dino=a", "dino=b"])


@pytest.mark.parametrize("command", ["segment", "eval", "compare", "attention", "sweep", "reproduce"])
def test_every_model_command_takes_the_option(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    assert "--aux-pretrained KIND=SOURCE" in out
    assert all(kind in out for kind in aux.AUX_KINDS)


def test_kinds_in_the_help_follow_the_registry():
    source = (Path(resclip.__file__).parent / "commands" / "common.py").read_text(encoding="utf-8")
    assert f"(kinds: {', '.join(aux.AUX_KINDS)})" in source


FIXTURES = GOLDEN / "aux"
AUX_BY_METHOD = {
    "proxyclip": {"dino": FIXTURES / "dino_vitb8_tiny_fp16.pth"},
    "proxyclip_mae": {"mae": FIXTURES / "mae_tiny_fp16.pth"},
    "trident": {"dino": FIXTURES / "dino_vitb16_tiny_fp16.pth", "sam": FIXTURES / "sam_vit_tiny_fp16.pth"},
    "corrclip": {"dino": FIXTURES / "dino_vitb8_tiny_fp16.pth", "sam": FIXTURES / "sam2_hiera_tiny_fp16.pt"},
}


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("method", list(AUX_BY_METHOD))
def test_second_model_methods_run_in_low_precision(golden_ckpt_b16, photo, method, precision):
    """Each method with a second model, under its own preset, in bf16 / fp16: finite probabilities
    that sum to 1 (SAM's encoder stays fp32 on a CPU, see resclip.sam)."""
    import warnings

    import numpy as np

    import resclip

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*custom ViT")
        family = method.split("_")[0]  # proxyclip_mae runs under proxyclip/<dataset>
        seg = resclip.create_segmenter(method, preset=f"{family}/voc21", pretrained=str(golden_ckpt_b16),
                                       aux_pretrained=AUX_BY_METHOD[method], precision=precision,
                                       text_cache=False, short_side=224)
    emb = np.random.default_rng(0).normal(size=(3, 64)).astype(np.float32)
    res = seg.predict(photo, ["background", "cat", "tree"], embeddings=emb)
    assert res.mask.shape == photo.shape[:2] and np.isfinite(res.probs).all()
    np.testing.assert_allclose(res.probs.sum(axis=0), 1.0, atol=1e-3)
