"""SAM / SAM 2 loading (resclip.sam) and the shared tiny auxiliary fixtures of tests/data/golden/aux/.

The fixtures are random checkpoints in the releases' real formats (facebookresearch DINO hub files, Meta's
segment-anything and sam2 files); dino_hub_reference.npz holds outputs of facebookresearch's hub DINO
code on them (see tests/data/README.md)."""

from __future__ import annotations

import contextlib
import copy
import sys
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from parity import hub_pattern
from resclip.dino import hub_pos_embed, load_dino
from resclip.sam import (
    SAM2_LAYOUTS,
    SamModel,
    build_sam,
    build_sam2,
    image_digest,
    load_sam,
    load_sam2,
    sam2_architecture,
    sam_architecture,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:FutureWarning")  # sam2's transforms

AUX = Path(__file__).parent / "data" / "golden" / "aux"
SAM2_IMAGE = (80, 60, 1)  # (h, w, seed) of the photo both SAM 2 encoder tests use (encoded once)
SAM_FILE = AUX / "sam_vit_tiny_fp16.pth"
SAM2_FILE = AUX / "sam2_hiera_tiny_fp16.pt"
SAM2_YAML = AUX / "sam2_hiera_tiny.yaml"
DINO_KEYS = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight",
             "norm.bias"} | {f"blocks.{i}.{m}.{p}" for i in range(2) for m in
                             ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
                             for p in ("weight", "bias")}


def _photo(h: int = 96, w: int = 128, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


def _state(path: Path) -> dict[str, torch.Tensor]:
    obj = torch.load(path, weights_only=True)
    return dict(obj.get("model", obj))


@pytest.fixture(scope="module")
def sam() -> SamModel:
    pytest.importorskip("segment_anything")
    return load_sam(SAM_FILE)


@pytest.fixture(scope="module")
def sam2() -> SamModel:
    pytest.importorskip("sam2")
    return load_sam(SAM2_FILE)


# ------------------------------------------------------------------------------- the fixtures


@pytest.mark.parametrize("name", ["dino_vitb8_tiny_fp16.pth", "dino_vitb16_tiny_fp16.pth",
                                  "sam_vit_tiny_fp16.pth", "sam2_hiera_tiny_fp16.pt"])
def test_fixtures_are_small_fp16_tensor_files(name: str):
    path = AUX / name
    assert path.stat().st_size < 1_400_000
    state = _state(path)
    assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())
    assert all(bool(torch.isfinite(v).all()) for v in state.values())


@pytest.mark.parametrize("patch", [8, 16])
def test_dino_fixtures_have_the_hub_layout(patch: int):
    state = _state(AUX / f"dino_vitb{patch}_tiny_fp16.pth")
    assert set(state) == DINO_KEYS
    assert tuple(state["pos_embed"].shape) == (1, (224 // patch) ** 2 + 1, 128)
    assert tuple(state["patch_embed.proj.weight"].shape) == (128, 3, patch, patch)
    net = load_dino(AUX / f"dino_vitb{patch}_tiny_fp16.pth")
    assert net.dino_info == {"width": 128, "patch": patch, "depth": 2, "heads": 2, "mlp_ratio": 4.0,
                             "image": 224, "dinov2": False, "registers": 0, "swiglu": False}


@pytest.fixture(scope="module")
def dinos() -> dict[tuple[int, str], torch.nn.Module]:
    """The tiny DINO fixtures loaded with each position-embedding mode, by (patch, mode)."""
    return {(p, m): load_dino(AUX / f"dino_vitb{p}_tiny_fp16.pth", pos_embed=m) for p in (8, 16)
            for m in ("hub", "timm")}


@pytest.mark.parametrize("case", ["p8_224x224", "p8_336x336", "p8_224x336", "p16_224x224", "p16_336x336",
                                  "p16_224x336", "p16_448x224"])
def test_dino_hub_pos_embed_matches_the_hub_code(case: str, dinos: dict[tuple[int, str], torch.nn.Module]):
    """load_dino(pos_embed="hub") reproduces facebookresearch's hub ViT: its interpolated position
    embeddings and last-layer tokens at 224 and at other sizes; timm's own resize differs off 224."""
    with np.load(AUX / "dino_hub_reference.npz") as ref:
        index, pos_ref, tokens_ref = (ref[f"{case}/{k}"] for k in ("index", "pos", "tokens"))
    patch, size = case[1:].split("_")
    h, w = (int(v) for v in size.split("x"))
    hub, plain = dinos[int(patch), "hub"], dinos[int(patch), "timm"]
    assert (hub.pos_embed_mode, plain.pos_embed_mode) == ("hub", "timm")
    pos = hub_pos_embed(hub.pos_embed, (h // int(patch), w // int(patch)))[0, index]
    np.testing.assert_allclose(pos.numpy(), pos_ref, atol=1e-6, rtol=0)
    x = hub_pattern(h, w)
    with torch.no_grad():
        tokens = hub.forward_features(x)[0, index]
        timm_tokens = plain.forward_features(x)[0, index]
    np.testing.assert_allclose(tokens.numpy(), tokens_ref, atol=1e-5, rtol=0)
    gap = float((timm_tokens - tokens).abs().max())
    assert gap < 1e-5 if (h, w) == (224, 224) else gap > 1e-2


def test_dino_pos_embed_option_is_checked():
    with pytest.raises(ValueError, match=r"^pos_embed='bicubic' is not one of \('timm', 'hub'\)$"):
        load_dino(AUX / "dino_vitb16_tiny_fp16.pth", pos_embed="bicubic")


# -------------------------------------------------------------------------------- architecture


def test_sam_architecture_of_the_tiny_fixture():
    arch = sam_architecture(_state(SAM_FILE))
    assert (arch.name, arch.embed_dim, arch.depth, arch.num_heads, arch.global_attn_indexes, arch.window_size,
            arch.img_size, arch.patch_size, arch.mlp_ratio, arch.out_chans) == (
        None, 32, 2, 2, (1,), 14, 1024, 16, 4.0, 32)
    assert (arch.prompt_embed_dim, arch.mask_in_chans, arch.decoder_depth, arch.decoder_mlp_dim,
            arch.decoder_heads, arch.attention_downsample_rate, arch.iou_head_depth, arch.iou_head_hidden_dim,
            arch.num_multimask_outputs) == (32, 16, 2, 64, 8, 2, 3, 32, 3)


@pytest.mark.parametrize("name", ["vit_b", "vit_l", "vit_h"])
def test_sam_release_sizes_are_recognised_and_rebuilt(name: str):
    """Meta's own builders on the meta device: the size is named and our build has the same tensors."""
    pytest.importorskip("segment_anything")
    from segment_anything import sam_model_registry

    with torch.device("meta"):
        meta = sam_model_registry[name]().state_dict()
        arch = sam_architecture(meta)
        ours = build_sam(arch).state_dict()
    assert arch.name == name
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in meta.items()}


def test_sam2_architecture_of_the_tiny_fixture():
    arch = sam2_architecture(_state(SAM2_FILE))
    assert (arch.name, arch.version, arch.layout, arch.embed_dim, arch.stages,
            arch.window_pos_embed_bkg_spatial_size, arch.first_window, arch.hidden_dim,
            arch.backbone_channel_list, arch.mem_dim, arch.memory_layers, arch.memory_feedforward,
            arch.memory_kv_dim, arch.mem_in_dim, arch.mask_downsampler_dim, arch.fuser_dim, arch.fuser_layers,
            arch.num_maskmem) == (None, "2.0", "t", 8, (1, 2, 7, 2), (7, 7), 8, 16, (64, 32, 16, 8), 8, 2, 32,
                                  8, 16, 16, 16, 2, 7)
    assert arch.config_name == "configs/sam2/sam2_hiera_t.yaml"


_QUICK = ("sam2/sam2_hiera_l.yaml", "sam2.1/sam2.1_hiera_t.yaml")  # the rest are slow tests


@pytest.mark.parametrize("config", [pytest.param(c, marks=() if c in _QUICK else pytest.mark.slow) for c in
                                    (f"{v}/{v}_hiera_{n}.yaml" for v in ("sam2", "sam2.1")
                                     for n in SAM2_LAYOUTS.values())])
def test_sam2_release_sizes_are_recognised_and_rebuilt(config: str, monkeypatch: pytest.MonkeyPatch):
    """Each sam2 package config built on the meta device: layout, version and size are read back and
    our build from the shapes has the same tensors."""
    sam2 = pytest.importorskip("sam2")
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    linspace = torch.linspace  # Hiera reads drop-path rates with .item(): keep that tensor on the CPU
    monkeypatch.setattr(torch, "linspace", lambda *a, **k: linspace(*a, **{**k, "device": "cpu"}))
    cfg = OmegaConf.load(Path(sam2.__file__).parent / "configs" / config)
    with torch.device("meta"):
        meta = instantiate(cfg.model, _recursive_=True).state_dict()
        arch = sam2_architecture(meta)
        ours = build_sam2(arch).state_dict()
    size = config.split("_hiera_")[1].removesuffix(".yaml")
    assert (arch.name, arch.version) == (f"hiera_{size}", "2.1" if config.startswith("sam2.1") else "2.0")
    assert arch.config_name == f"configs/{config}"
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in meta.items()}


# ------------------------------------------------------------------- loading and the encoders


def _meta_sam() -> torch.nn.Module:
    """The tiny SAM built by hand with Meta's classes and the sizes of /tmp/aux_fixtures.md."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    net = Sam(image_encoder=ImageEncoderViT(depth=2, embed_dim=32, img_size=1024, mlp_ratio=4,
                                            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=2,
                                            patch_size=16, qkv_bias=True, use_rel_pos=True,
                                            global_attn_indexes=(1,), window_size=14, out_chans=32),
              prompt_encoder=PromptEncoder(embed_dim=32, image_embedding_size=(64, 64),
                                           input_image_size=(1024, 1024), mask_in_chans=16),
              mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(
                  depth=2, embedding_dim=32, mlp_dim=64, num_heads=8), transformer_dim=32, iou_head_depth=3,
                  iou_head_hidden_dim=32),
              pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])
    net.load_state_dict({k: v.float() for k, v in _state(SAM_FILE).items()}, strict=True)
    return net.eval()


def test_sam_embedding_equals_metas_model_built_by_hand(sam: SamModel):
    from segment_anything import SamPredictor

    image = _photo()
    meta = SamPredictor(_meta_sam())
    meta.set_image(image)
    emb = sam.image_embedding(image)
    assert sam.kind == "sam" and sam.dtype == torch.float32
    assert (emb.original_size, emb.input_size, emb.high_res_feats) == ((96, 128), (768, 1024), ())
    assert tuple(emb.image_embed.shape) == (1, 32, 64, 64)
    torch.testing.assert_close(emb.image_embed, meta.features, atol=0, rtol=0)


def test_sam2_embedding_equals_the_package_built_from_the_yaml(sam2: SamModel):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    cfg = OmegaConf.load(SAM2_YAML)
    net = instantiate(cfg.model, _recursive_=True)
    net.load_state_dict(_state(SAM2_FILE), strict=True)
    meta = SAM2ImagePredictor(net.float().eval())
    image = _photo(*SAM2_IMAGE)
    meta.set_image(image)
    emb = sam2.image_embedding(image)
    assert sam2.kind == "sam2" and type(sam2.model).__name__ == "SAM2Base"
    assert (emb.original_size, emb.input_size) == ((80, 60), (1024, 1024))
    assert [tuple(t.shape) for t in (emb.image_embed, *emb.high_res_feats)] == [
        (1, 16, 64, 64), (1, 2, 256, 256), (1, 4, 128, 128)]
    torch.testing.assert_close(emb.image_embed, meta._features["image_embed"], atol=0, rtol=0)
    for ours, theirs in zip(emb.high_res_feats, meta._features["high_res_feats"], strict=True):
        torch.testing.assert_close(ours, theirs, atol=0, rtol=0)
    # the same model through an explicit config
    same = load_sam(SAM2_FILE, config=SAM2_YAML)
    assert same.model.state_dict().keys() == sam2.model.state_dict().keys()
    assert all(torch.equal(v, sam2.model.state_dict()[k]) for k, v in same.model.state_dict().items())


def _count_encoder_calls(model: SamModel, monkeypatch: pytest.MonkeyPatch, fake: bool = False) -> list[int]:
    """Count the image encoder's runs (``fake``: a cheap stand-in returning zeros of the right shape)."""
    calls = [0]
    encoder = model.model.image_encoder
    forward = encoder.forward

    def counted(x: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        if fake:
            side = x.shape[-1] // 16
            return x.new_zeros(x.shape[0], model.arch.out_chans, side, side)  # type: ignore[union-attr]
        return forward(x)

    monkeypatch.setattr(encoder, "forward", counted)
    return calls


def test_sam_embedding_cache_encodes_each_image_once(monkeypatch: pytest.MonkeyPatch):
    pytest.importorskip("segment_anything")
    model = load_sam(SAM_FILE, cache_size=2)
    calls = _count_encoder_calls(model, monkeypatch, fake=True)
    a, b, c = _photo(seed=1), _photo(seed=2), _photo(seed=3)
    first = model.image_embedding(a)
    assert model.image_embedding(a.copy()) is first  # same content, another array
    assert model.image_embedding(torch.from_numpy(a)).image_embed is first.image_embed
    assert calls[0] == 1
    # a predictor and its prompts reuse the cached embedding
    predictor = model.predictor()
    predictor.set_image(a)
    masks, scores, _ = predictor.predict(point_coords=np.array([[40.0, 30.0]]), point_labels=np.array([1]))
    assert masks.shape == (3, 96, 128) and scores.shape == (3,)
    assert predictor.features is first.image_embed and calls[0] == 1
    predictor.set_image(np.ascontiguousarray(a[:, :, ::-1]), image_format="BGR")
    assert predictor.features is first.image_embed and calls[0] == 1
    model.image_embedding(b)
    model.image_embedding(c)  # cache_size 2: a is dropped
    assert calls[0] == 3 and model.encodings == 3
    assert model.image_embedding(a) is not first and calls[0] == 4
    model.clear_cache()
    model.image_embedding(c)
    assert calls[0] == 5
    assert image_digest(a) != image_digest(a[:, :, ::-1]) != image_digest(a.reshape(128, 96, 3))


def test_sam2_mask_generator_shares_the_cached_embedding(sam2: SamModel, monkeypatch: pytest.MonkeyPatch):
    image = _photo(*SAM2_IMAGE)
    emb = sam2.image_embedding(image)  # encoded here or by the test above
    calls = _count_encoder_calls(sam2, monkeypatch)
    gen = sam2.mask_generator(points_per_side=2, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                              multimask_output=False)
    masks = gen.generate(image)
    assert calls[0] == 0 and sam2.image_embedding(image) is emb
    assert masks and all(m["segmentation"].shape == (80, 60) for m in masks)


def test_sam_wrapper_copies_and_moves_without_stale_embeddings(sam: SamModel):
    twin = copy.deepcopy(sam)
    assert twin.kind == "sam" and twin.encodings == 0 and twin.model is not sam.model
    assert sam.arch.name is None and (sam.device, sam.dtype) == (torch.device("cpu"), torch.float32)
    twin._cache["x"] = sam.image_embedding(_photo(16, 16))
    twin.double()
    assert twin.dtype == torch.float64 and not twin._cache
    assert isinstance(twin.autocast(), contextlib.nullcontext)
    assert isinstance(twin.half().autocast(), torch.autocast)


# ------------------------------------------------------------------------------------- errors


def test_missing_packages_give_one_line(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "segment_anything", None)
    monkeypatch.setitem(sys.modules, "sam2", None)
    with pytest.raises(ImportError) as err:
        load_sam(SAM_FILE)
    assert str(err.value) == ('loading a SAM checkpoint needs the segment-anything package: '
                              'pip install "resclip[sam]"')
    with pytest.raises(ImportError) as err:
        load_sam(SAM2_FILE)
    assert str(err.value) == 'loading a SAM 2 checkpoint needs the sam2 package: pip install "resclip[sam]"'


class _Evil:
    def __reduce__(self) -> tuple[Any, ...]:
        return (print, ("this must never run",))


def test_bad_files_give_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    pytest.importorskip("segment_anything")
    with pytest.raises(FileNotFoundError, match="SAM checkpoint not found"):
        load_sam(tmp_path / "nope.pth")
    dino = AUX / "dino_vitb16_tiny_fp16.pth"
    with pytest.raises(ValueError, match=r"is not a SAM or SAM 2 checkpoint \(no image_encoder") as err:
        load_sam(dino)
    assert "\n" not in str(err.value) and str(dino) in str(err.value)
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"^could not read the SAM checkpoint .*notes\.pth' \(Unpickling"):
        load_sam(text)
    evil = tmp_path / "evil.pth"
    torch.save({"image_encoder.x": _Evil()}, evil)
    with pytest.raises(ValueError, match=r"^refusing to read the SAM checkpoint .*evil\.pth.*Python objects "
                                         r"\(print\), and unpickling those could run code"):
        load_sam(evil)
    assert "must never run" not in capsys.readouterr().out
    listed = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], listed)
    with pytest.raises(ValueError, match=r"holds a list, not a state dict"):
        load_sam(listed)
    broken = _state(SAM_FILE)
    broken["mask_decoder.extra.weight"] = torch.zeros(2)
    del broken["image_encoder.neck.1.bias"]
    path = tmp_path / "broken.pth"
    torch.save(broken, path)
    with pytest.raises(ValueError, match=r"does not fit the sam architecture read from it \(missing "
                                         r"\['image_encoder.neck.1.bias'\]; unexpected \['mask_decoder"):
        load_sam(path)
    with pytest.raises(ValueError, match="config= applies to SAM 2 checkpoints only"):
        load_sam(SAM_FILE, config=SAM2_YAML)
    with pytest.raises(ValueError, match=r"is a SAM \(v1\) checkpoint, not SAM 2; use load_sam"):
        load_sam2(SAM_FILE)


def test_sam2_configs_and_layouts_are_checked(tmp_path: Path):
    pytest.importorskip("sam2")
    foreign = tmp_path / "foreign.yaml"
    foreign.write_text(SAM2_YAML.read_text().replace("sam2.modeling.sam2_base.SAM2Base", "os.system", 1))
    with pytest.raises(ValueError, match=r"builds 'os.system'; only sam2\.\* classes are allowed"):
        load_sam(SAM2_FILE, config=foreign)
    odd = {k: v for k, v in _state(SAM2_FILE).items() if not k.startswith("image_encoder.trunk.blocks.11.")}
    with pytest.raises(ValueError, match=r"blocks per stage \[1, 2, 7, 1\] matches no sam2 package config"):
        sam2_architecture(odd)
    path = tmp_path / "odd.pt"
    torch.save({"model": odd}, path)
    with pytest.raises(ValueError, match=r"^SAM checkpoint .*odd\.pt.*: SAM 2 Hiera with blocks per stage"):
        load_sam(path)


def test_bad_images_give_one_line(sam: SamModel):
    with pytest.raises(ValueError, match=r"^SAM takes an \(H, W, 3\) uint8 RGB image, got \(4, 4\) uint8"):
        sam.image_embedding(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match=r"got \(4, 4, 3\) float32"):
        sam.image_embedding(np.zeros((4, 4, 3), np.float32))


def test_load_aux_gives_one_shared_sam():
    aux = pytest.importorskip("resclip.auxiliary")
    pytest.importorskip("segment_anything")
    aux.clear_aux_cache()
    try:
        first = aux.load_aux("sam", SAM_FILE)
        assert aux.load_aux("sam", str(SAM_FILE)) is first
        assert isinstance(first, SamModel) and first.aux_kind == "sam"
        assert len(aux.aux_digest(first)) == 64
    finally:
        aux.clear_aux_cache()
