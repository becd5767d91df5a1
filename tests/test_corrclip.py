"""CorrCLIP against its release (golden_corrclip.npz): every stage of single windows (DINO features,
region merging, scope, rebuilt correlations, mask class tokens, the three branches, tokens, logits),
every sliding window and the whole-image outputs of each recorded config family (window average,
full-size logits, probabilities, masks before and after the mask vote); the mask vote on another
method's mask; SAM 2's generator call path; invariants and errors."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from parity import (
    GOLDEN,
    LOGIT,
    TOK,
    VOCLIKE,
    assert_mask_at_stable_pixels,
    golden_segmenter,
    load_golden,
    load_manifest,
    within,
)
from resclip.corrclip import (
    PAD_LABEL,
    MaskGeneratorConfig,
    generate_instance_map,
    instance_map,
    resize_instance_map,
    sam2_mask_generator,
    vote,
    window_padding,
    window_regions,
)
from resclip.dino import load_dino
from resclip.engine import DenseEngine
from resclip.fullres import FullResolution
from resclip.methods import StageContext, get_method
from resclip.methods.corrclip import (
    CorrCLIP,
    dbscan_labels,
    mask_class_tokens,
    merge_regions,
    scope_mask,
    spatial_blocks,
)
from resclip.preprocess import normalise, resize_image, window_coords
from resclip.presets import DATASETS
from resclip.protocol import Protocol
from resclip.rcs import RCSConfig
from resclip.vit import embed_patches, encode_trunk

AUX = GOLDEN / "aux"
Q2C = {"corrlike": [0, 0, 0, 0, *range(1, 15)], "adelike": list(range(8))}
CLASSIFIER = {"corrlike": "classifier__voclike", "adelike": "classifier__adelike"}


@pytest.fixture(scope="module")
def cc() -> dict[str, np.ndarray]:
    return load_golden("golden_corrclip.npz")


@pytest.fixture(scope="module")
def cc_manifest() -> dict[str, Any]:
    return load_manifest("corrclip_manifest.json")


@pytest.fixture(scope="module")
def dino() -> torch.nn.Module:
    return load_dino(AUX / "dino_vitb8_tiny_fp16.pth", pos_embed="hub")


@functools.lru_cache(maxsize=1)
def _method() -> CorrCLIP:
    method = get_method("corrclip")
    assert isinstance(method, CorrCLIP)
    return method


def _instance(cc: dict[str, np.ndarray], maskset: str, img: str) -> torch.Tensor:
    return torch.from_numpy(cc[f"masks__{maskset}__img{img}"].astype(np.int64))


def _resized(golden: dict[str, np.ndarray], img: str, short: int) -> torch.Tensor:
    return normalise(resize_image(golden[f"img{img}__raw_rgb"], short, 2048))


def _window(x: torch.Tensor, regions: torch.Tensor, box: tuple[int, int, int, int], multiple: int = 56
            ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, int, int]]:
    """The release's padded window and its region crop."""
    y1, x1, y2, x2 = box
    pad = window_padding(y2 - y1, x2 - x1, multiple)
    crop = x[:, :, y1:y2, x1:x2]
    return (F.pad(crop, pad) if any(pad) else crop), window_regions(regions, box, pad), pad


def _logits(tokens: torch.Tensor, text: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    return (F.normalize(tokens, dim=-1) @ text.t()).transpose(-1, -2).reshape(tokens.shape[0], -1, *grid)


# ---------------------------------------------------------------- single windows, stage by stage
STAGES = ["W0", "W1", "W2", "W3", "W4", "W5"]


@pytest.mark.parametrize("name", STAGES)
def test_window_stages(golden, cc, cc_manifest, golden_models, dino, name):
    """W0 plain window, W1 no unsegmented pixel (the smallest real mask is 'unsegmented'), W2 B/32,
    W3 padded 336x400 window, W4 no mask at all, W5 a Cityscapes 224 window."""
    spec = cc_manifest["stage_windows"][name]
    family, img, maskset = spec["run"]
    fam = cc_manifest["families"][family]
    box = tuple(int(v) for v in cc[f"full__{family}__img{img}__boxes"][spec["window"]])
    x = _resized(golden, img, fam["short_side"])
    regions = resize_instance_map(_instance(cc, maskset, img), tuple(x.shape[-2:]))
    crop, reg, _ = _window(x, regions, box)
    assert torch.equal(reg, torch.from_numpy(cc[f"{name}__crop_masks"]).long())
    method = _method()
    visual = golden_models[fam["clip"]].visual
    trace: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        tokens, grid = method.window_tokens(visual, crop, dino, reg[None], trace)
    assert list(grid) == cc[f"{name}__grid_dino"].tolist()
    rows = cc[f"{name}__row_idx"]
    feats = trace["dino_features"][0]
    within(feats[rows], cc[f"{name}__dino_feats_rows"], LOGIT, "DINO q+k features")
    # regions: before merging, merged, on the CLIP grid; DBSCAN
    pre = resize_instance_map(reg, grid)
    assert torch.equal(pre, torch.from_numpy(cc[f"{name}__masks_dino_pre"]).long())
    merged, info = merge_regions(pre, feats, method.merge_eps, method.merge_min_samples)
    assert torch.equal(merged, torch.from_numpy(cc[f"{name}__masks_dino_merged"]).long())
    assert torch.equal(trace["regions"][0], merged)
    if f"{name}__dbscan_labels" in cc:
        within(info["dist"], cc[f"{name}__dbscan_dist"], LOGIT, "region distances")
        assert info["clusters"].tolist() == cc[f"{name}__dbscan_labels"].tolist()
    else:
        assert not info
    clip_labels = resize_instance_map(merged, tuple(cc[f"{name}__grid_clip"].tolist()))
    assert torch.equal(clip_labels, torch.from_numpy(cc[f"{name}__masks_clip"]).long())
    # scope and rebuilt correlations
    attn = trace["attn"][0, 0]
    assert (attn > 0).sum(-1).tolist() == cc[f"{name}__attn_allowed_count"].tolist()
    within(attn[rows[::4]], cc[f"{name}__attn_rows"], LOGIT, "attention rows")
    # mask class tokens
    with torch.inference_mode():
        trunk = encode_trunk(visual, crop, keep_blocks=method.trunk_blocks(12))
        x0, _ = embed_patches(visual, crop)
    within(x0[0, :1].expand(cc[f"{name}__mct_in"].shape[0], -1), cc[f"{name}__mct_in"], TOK, "MCT start")
    values, index = torch.unique(clip_labels.reshape(-1), return_inverse=True)
    onehot = index[None] == torch.arange(values.numel())[:, None]
    inputs = [x0[0], *(trunk.blocks[i][0] for i in range(10)), trunk.x[0]]
    with torch.inference_mode():
        mct = mask_class_tokens(visual, inputs, onehot)
    within(mct, cc[f"{name}__mct_final"], TOK, "MCT after the last block")
    tok_rows = cc[f"{name}__tok_idx"]
    within(trunk.x[0][tok_rows], cc[f"{name}__last_in_rows"], TOK, "last block input")
    spatial = torch.stack([trunk.blocks[i][0] for i in spatial_blocks(12)]).mean(0)
    within(spatial[tok_rows], cc[f"{name}__spatial_rows"], TOK, "spatial branch input")
    within(trace["pre_ln_post"][0][:, rows[::4]], cc[f"{name}__ln_post_in_rows"], TOK, "three branches")
    within(tokens[0][rows], cc[f"{name}__tokens_rows"], TOK, "tokens")
    text = torch.from_numpy(golden[CLASSIFIER[fam["classes"]]])
    logits = _logits(tokens, text, grid)[0]
    if f"{name}__patch_logits" in cc:
        within(logits, cc[f"{name}__patch_logits"], LOGIT, "patch logits")


# ---------------------------------------------------------------- whole images
def _runs() -> list[tuple[str, str, str]]:
    man = load_manifest("corrclip_manifest.json")
    return [(r["family"], r["image"], r["maskset"]) for r in man["runs"]]


@pytest.mark.parametrize(("family", "img", "maskset"), _runs())
def test_full_image(golden, cc, cc_manifest, golden_models, dino, family, img, maskset):
    """Every window's patch logits, the window average, the logits at the original size, the class
    probabilities and the masks before and after the vote (at stable pixels)."""
    fam = cc_manifest["families"][family]
    prefix = f"full__{family}__img{img}"
    rgb = golden[f"img{img}__raw_rgb"]
    x = _resized(golden, img, fam["short_side"])
    h1, w1 = x.shape[-2:]
    m0 = _instance(cc, maskset, img)
    regions = resize_instance_map(m0, (h1, w1))
    text = torch.from_numpy(golden[CLASSIFIER[fam["classes"]]])
    q2c = torch.tensor(Q2C[fam["classes"]])
    boxes = window_coords(h1, w1, fam["slide_crop"], fam["slide_stride"])
    assert boxes == [tuple(b) for b in cc[f"{prefix}__boxes"].tolist()]
    acc, count = torch.zeros(text.shape[0], h1, w1), torch.zeros(1, h1, w1)
    visual = golden_models[fam["clip"]].visual
    for i, (y1, x1, y2, x2) in enumerate(boxes):
        crop, reg, (left, _, top, _) = _window(x, regions, (y1, x1, y2, x2))
        with torch.inference_mode():
            tokens, grid = _method().window_tokens(visual, crop, dino, reg[None])
        logits = _logits(tokens, text, grid)
        assert list(grid) == cc[f"{prefix}__win{i}__grid_dino"].tolist()
        idx = cc[f"{prefix}__win{i}__patch_logits_idx"]
        want = cc[f"{prefix}__win{i}__patch_logits_samples"]
        within(logits[0].flatten(1)[:, idx], want, LOGIT, f"window {i}")
        up = F.interpolate(logits, size=crop.shape[-2:], mode="bilinear", align_corners=False)[0]
        acc[:, y1:y2, x1:x2] += up[:, top:top + y2 - y1, left:left + x2 - x1]
        count[:, y1:y2, x1:x2] += 1
    avg = acc / count
    within(avg.flatten(1)[:, cc[f"{prefix}__avg_idx"]], cc[f"{prefix}__avg_logits_samples"], LOGIT, "average")
    protocol = Protocol(short_side=fam["short_side"], slide_crop=fam["slide_crop"],
                        slide_stride=fam["slide_stride"], logit_scale=40.0, prob_thd=fam["prob_thd"])
    full = FullResolution(avg, None, q2c, protocol, rgb.shape[:2])
    idx0 = cc[f"{prefix}__final_idx"]
    within(torch.from_numpy(full.logits_full()).flatten(1)[:, idx0], cc[f"{prefix}__final_logits_samples"],
           LOGIT, "full-size logits")
    probs = full.class_prob_rows(0, rgb.shape[0])
    within(probs.flatten(1)[:, idx0], cc[f"{prefix}__probs_samples"], LOGIT, "probabilities")
    mask = torch.from_numpy(full.mask().astype(np.int64))
    unstable = cc[f"{prefix}__pred_unstable_idx"]
    assert_mask_at_stable_pixels(mask.numpy(), cc[f"{prefix}__pred_prevote"], unstable)
    assert_mask_at_stable_pixels(vote(mask, m0).numpy(), cc[f"{prefix}__pred"], unstable)


# ---------------------------------------------------------------- the mask vote
def _vote_reference(labels: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """The release's loop: every region but the smallest label takes ``torch.mode`` of its labels."""
    out = labels.clone()
    for v in torch.unique(regions)[1:]:
        sel = regions == v
        out[sel] = torch.mode(out[sel])[0]
    return out


def test_vote_on_another_method(golden, cc, golden_ckpts):
    """The vote needs only a mask and an instance map: it corrects SCLIP's mask as the release's loop
    does, every region becomes one label (its majority), unsegmented pixels keep theirs."""
    import resclip

    with pytest.warns(UserWarning, match="custom ViT"):
        seg = resclip.create_segmenter(method="sclip", rcs=False, sfr=False, preset="default",
                                       pretrained=str(golden_ckpts["b16"]), text_cache=False)
    rgb = golden["imgB__raw_rgb"]
    names = ["wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed"]
    res = seg.predict(rgb, names, embeddings=golden["classifier__adelike"])
    mask = torch.from_numpy(res.mask.astype(np.int64))
    regions = _instance(cc, "rects", "B")
    voted = vote(mask, regions)
    assert torch.equal(voted, _vote_reference(mask, regions))
    outside = regions == regions.min()
    assert torch.equal(voted[outside], mask[outside])
    for v in torch.unique(regions)[1:]:
        sel = regions == v
        assert voted[sel].unique().numel() == 1
        assert int(voted[sel][0]) == int(torch.bincount(mask[sel]).argmax())
    assert not torch.equal(voted, mask)


def test_vote_rules():
    labels = torch.tensor([[3, 1, 1, 2], [3, 3, 2, 2]])
    regions = torch.tensor([[5, 7, 7, 9], [5, 5, 9, 9]])
    # 5 is the smallest label: never voted, even though it is a real region; ties -> smallest label
    assert vote(labels, regions).tolist() == [[3, 1, 1, 2], [3, 3, 2, 2]]
    tie = torch.tensor([[4, 2, 2, 4]])
    assert vote(tie, torch.tensor([[0, 1, 1, 1]])).tolist() == [[4, 2, 2, 2]]
    assert vote(tie, torch.tensor([[1, 1, 1, 1]]), skip_min=False).tolist() == [[2, 2, 2, 2]]
    assert vote(tie, torch.tensor([[1, 1, 1, 1]])).tolist() == [[4, 2, 2, 4]]
    rng = torch.Generator().manual_seed(0)
    for _ in range(20):
        lab = torch.randint(0, 6, (17, 23), generator=rng)
        reg = torch.randint(0, 5, (17, 23), generator=rng)
        assert torch.equal(vote(lab, reg), _vote_reference(lab, reg))


def test_vote_errors():
    with pytest.raises(ValueError, match="differ in size"):
        vote(torch.zeros(3, 4, dtype=torch.long), torch.zeros(4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=">= 0"):
        vote(torch.full((2, 2), -1), torch.zeros(2, 2, dtype=torch.long))


# ---------------------------------------------------------------- instance maps and windows
def test_painting_order(cc):
    """The release paints SAM's masks by ascending area (stable), larger ones on top."""
    segs = np.unpackbits(cc["paint__segmentation"], axis=-1)[..., :80].astype(bool)
    painted = instance_map(list(segs), (60, 80), cc["paint__area"].tolist())
    assert torch.equal(painted, torch.from_numpy(cc["paint__instance_map"]).long())
    # descending: the smallest masks stay visible
    down = instance_map(list(segs), (60, 80), order="area_descending")
    smallest = int(np.argmin(cc["paint__area"]))
    assert bool((down[torch.from_numpy(segs[smallest])] == len(segs)).all())

    class Generator:
        def generate(self, rgb: np.ndarray) -> list[dict[str, Any]]:
            return [{"segmentation": s, "area": int(a)} for s, a in zip(segs, cc["paint__area"], strict=True)]

    got = generate_instance_map(Generator(), np.zeros((60, 80, 3), np.uint8))
    assert torch.equal(got, painted)
    with pytest.raises(ValueError, match="mask 0 is"):
        instance_map([np.zeros((5, 5), bool)], (6, 5))
    with pytest.raises(ValueError, match="uint8 RGB"):
        generate_instance_map(Generator(), np.zeros((60, 80), np.uint8))


def test_windows_and_resizing():
    assert window_padding(336, 400, 56) == (24, 24, 0, 0)
    assert window_padding(250, 336, 56) == (0, 0, 15, 15)
    assert window_padding(337, 336, 56) == (0, 0, 27, 28)
    labels = torch.arange(20).view(4, 5)
    crop = window_regions(labels, (1, 1, 3, 4), (1, 2, 0, 1))
    pad = PAD_LABEL
    assert crop.tolist() == [[pad, 6, 7, 8, pad, pad], [pad, 11, 12, 13, pad, pad], [pad] * 6]
    big = torch.randint(0, 30000, (37, 53))
    want = F.interpolate(big[None, None].float(), size=(11, 29), mode="nearest")[0, 0].long()
    assert torch.equal(resize_instance_map(big, (11, 29)), want)
    with pytest.raises(ValueError, match="multiple"):
        window_padding(3, 3, 0)


def test_dbscan_matches_sklearn_semantics():
    """Precomputed DBSCAN: neighbours ``<= eps`` in the matrix's dtype, read row-wise."""
    d = torch.tensor([[0, 0.2, 0.5], [0.2, 0, 0.3], [0.5, 0.3, 0]])
    assert dbscan_labels(d, 0.2, 1).tolist() == [0, 0, 1]  # float32(0.2) <= float32(0.2)
    d = torch.tensor([[0, 0.2000001, 0.5], [0.2000001, 0, 0.3], [0.5, 0.3, 0]])
    assert dbscan_labels(d, 0.2, 1).tolist() == [0, 1, 2]
    asym = torch.tensor([[0, 0.1, 0.5], [0.3, 0, 0.3], [0.5, 0.1, 0]])
    assert dbscan_labels(asym, 0.2, 1).tolist() == [0, 0, 1]
    late = torch.tensor([[0, 0.3, 0.5], [0.3, 0, 0.3], [0.5, 0.1, 0]])
    assert dbscan_labels(late, 0.2, 1).tolist() == [0, 1, 2]
    chain = torch.tensor([[0, .1, .9, .9], [.1, 0, .9, .9], [.9, .9, 0, .9], [.9, .9, .9, 0]])
    assert dbscan_labels(chain, 0.2, 2).tolist() == [0, 0, -1, -1]  # noise without enough neighbours


def test_scope_rules():
    labels = torch.tensor([0, 0, 4, 4, 9])
    sim = torch.tensor([[1.0, .9, .1, .8, .0], [.9, 1.0, .0, .0, .0], [.1, .0, 1.0, .7, .9],
                        [.8, .0, .7, 1.0, .0], [.0, .0, .9, .0, 1.0]])
    mean = float(sim.mean())
    either = scope_mask(labels, sim, "either")
    both = scope_mask(labels, sim, "both")
    assert bool(either[2, 3]) and not bool(either[2, 4])  # same region / different regions
    assert bool(either[0, 3]) == (mean < 0.8) and not bool(both[0, 3])  # unsegmented with a region
    assert bool(both[0, 1]) and bool(either[0, 1])
    assert torch.equal(both, both.t()) and torch.equal(either, either.t())
    with pytest.raises(ValueError, match="unsegmented"):
        scope_mask(labels, sim, "none")


def test_merge_leaves_two_regions_alone():
    labels = torch.tensor([[0, 0], [3, 3]])
    merged, info = merge_regions(labels, F.normalize(torch.randn(4, 8), dim=-1))
    assert torch.equal(merged, labels) and not info


# ---------------------------------------------------------------- method settings
def test_settings_and_errors(golden_models, dino):
    method = _method()
    assert method.required_aux() == ("dino", "sam")
    assert CorrCLIP("x", keep_residual=False, masks="given").required_aux() == ("dino",)
    assert method.out_patch(16, {"dino": dino}) == 8
    assert method.generator.points_per_side == 8
    paper = method.for_fidelity("paper")
    assert isinstance(paper, CorrCLIP) and paper.generator.points_per_side == paper.points_per_side == 32
    assert method.for_fidelity("official") == method
    options = {"points_per_side": 8, "pred_iou_thresh": 0.4, "stability_score_thresh": 0.4,
               "multimask_output": False}
    assert MaskGeneratorConfig().generator_options() == options
    assert spatial_blocks(12) == (5, 6, 7, 8, 9) and spatial_blocks(24) == tuple(range(10, 22))
    assert spatial_blocks(32) == tuple(range(2, 30)) and spatial_blocks(16) == tuple(range(2, 14))
    for bad, match in (({"unsegmented_scope": "x"}, "unsegmented_scope"), ({"masks": "x"}, "masks"),
                       ({"tau": 0.0}, "tau")):
        with pytest.raises(ValueError, match=match):
            CorrCLIP("x", keep_residual=False, **bad)
    with pytest.raises(ValueError, match="paint_order"):
        MaskGeneratorConfig(paint_order="x")
    with pytest.raises(ValueError, match="points_per_side"):
        CorrCLIP("x", keep_residual=False, points_per_side=0)
    with pytest.raises(ValueError, match="at least 5 blocks"):
        spatial_blocks(4)
    visual = golden_models["b16"].visual
    crops = torch.zeros(1, 3, 224, 224)
    with torch.inference_mode():
        trunk = encode_trunk(visual, crops, keep_blocks=method.trunk_blocks(12))

    def same(t: torch.Tensor, heads: slice) -> torch.Tensor:
        return t

    with pytest.raises(ValueError, match="region masks"):
        method.last_stage(StageContext(visual, trunk, same, same, crops=crops, aux={"dino": dino}))
    ctx = StageContext(visual, trunk, same, same, crops=crops, aux={"dino": dino})
    ctx.regions = torch.zeros(1, 112, 112, dtype=torch.long)  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="do not match the windows"):
        method.last_stage(ctx)
    with pytest.raises(ValueError, match="masks='given'"):
        CorrCLIP("x", keep_residual=False, masks="given").image_regions(np.zeros((8, 8, 3), np.uint8), {})
    with pytest.raises(ValueError, match="needs a sam model"):
        method.image_regions(np.zeros((8, 8, 3), np.uint8), {})
    # RCS and SFR mix the CLIP grid: refused with DINO's 8-pixel grid under a 16-pixel CLIP
    with pytest.raises(ValueError, match="8-pixel grid"):
        DenseEngine(visual, method, rcs=RCSConfig(), aux={"dino": dino, "sam": object()})


def test_stage_hooks_compose(golden_models, dino, cc):
    """The stage hands its masked scores to ``mix_scores`` and its attention to ``mix_attention``
    (where SFR and RCS act); with an identity attention the main branch is ``out_proj(v)``."""
    visual = golden_models["b16"].visual
    method = _method()
    crops = normalise(np.ascontiguousarray(np.full((112, 112, 3), 90, np.uint8)))
    regions = torch.zeros(1, 112, 112, dtype=torch.long)
    regions[:, 20:70, 10:90] = 3
    with torch.inference_mode():
        trunk = encode_trunk(visual, crops, keep_blocks=method.trunk_blocks(12))
    seen: list[tuple[int, ...]] = []

    def scores(t: torch.Tensor, heads: slice) -> torch.Tensor:
        seen.append(tuple(t.shape))
        return t

    def identity(t: torch.Tensor, heads: slice) -> torch.Tensor:
        seen.append(tuple(t.shape))
        return torch.eye(t.shape[-1]).expand_as(t)

    trace: dict[str, torch.Tensor] = {}
    ctx = StageContext(visual, trunk, scores, identity, trace, crops=crops, aux={"dino": dino})
    ctx.regions = regions  # type: ignore[attr-defined]
    with torch.inference_mode():
        method.last_stage(ctx)
    assert seen == [(1, 1, 196, 196)] * 2 and ctx.out_grid == (14, 14)
    block = visual.transformer.resblocks[-1]
    width = trunk.x.shape[-1]
    from resclip.attention import layer_norm
    from resclip.methods.proxyclip import resize_values

    with torch.inference_mode():
        v = F.linear(layer_norm(trunk.x, block.ln_1), block.attn.in_proj_weight[2 * width:],
                     block.attn.in_proj_bias[2 * width:])
        main = F.linear(resize_values(v[:, 1:], trunk.grid, (14, 14)), block.attn.out_proj.weight,
                        block.attn.out_proj.bias)
    torch.testing.assert_close(trace["pre_ln_post"][:, 0], main, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- SAM 2's generator
def _tiny_sam2() -> Any:
    pytest.importorskip("sam2")
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(AUX / "sam2_hiera_tiny.yaml")
    OmegaConf.resolve(cfg)
    model = instantiate(cfg.model, _recursive_=True)
    state = torch.load(AUX / "sam2_hiera_tiny_fp16.pt", weights_only=True)["model"]
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model.eval()


@pytest.mark.slow
def test_sam2_generator_call_path(golden, cc):
    """SAM 2's automatic mask generator with the release's settings finds nothing on the random
    model (all-zero map, as recorded); with both thresholds at 0 it keeps one mask, and its map, area,
    scores and box are the release's."""
    model = _tiny_sam2()
    rgb = golden["imgC__raw_rgb"]
    with torch.inference_mode():
        gen = sam2_mask_generator(model, MaskGeneratorConfig())
        assert cc["sam2__release__imgC__num_masks"].item() == 0
        assert torch.equal(generate_instance_map(gen, rgb), torch.zeros(rgb.shape[:2], dtype=torch.long))
        low = sam2_mask_generator(model, MaskGeneratorConfig(pred_iou_thresh=0.0, stability_score_thresh=0.0))
        anns = low.generate(rgb)
    assert len(anns) == cc["sam2__lo__imgC__num_masks"].item() == 1
    seg = np.unpackbits(cc["sam2__lo__imgC__segmentation"], axis=-1)[..., : rgb.shape[1]].astype(bool)
    np.testing.assert_array_equal(anns[0]["segmentation"], seg[0])
    assert anns[0]["area"] == int(cc["sam2__lo__imgC__area"][0])
    within(np.array([anns[0]["predicted_iou"], anns[0]["stability_score"]], np.float32),
           np.array([cc["sam2__lo__imgC__predicted_iou"][0], cc["sam2__lo__imgC__stability_score"][0]]),
           LOGIT, "scores")
    np.testing.assert_allclose(anns[0]["bbox"], cc["sam2__lo__imgC__bbox"][0])
    painted = instance_map([a["segmentation"] for a in anns], rgb.shape[:2], [a["area"] for a in anns])
    assert torch.equal(painted, torch.from_numpy(cc["sam2__lo__imgC__instance_map"]).long())
    assert torch.equal(painted, torch.from_numpy(cc["masks__sam2_lo__imgC"]).long())


# ---------------------------------------------------------------- through create_segmenter / presets
FAST_SEGMENTER_RUNS = {("voc21", "A"), ("pad400", "A")}


def _segmenter_runs() -> list[Any]:
    return [pytest.param(f, i, m, marks=[] if (f, i) in FAST_SEGMENTER_RUNS else [pytest.mark.slow])
            for f, i, m in _runs()]


@pytest.mark.parametrize(("family", "img", "maskset"), _segmenter_runs())
def test_segmenter_runs_the_release(golden, cc, cc_manifest, golden_ckpts, family, img, maskset):
    """`create_segmenter("corrclip", preset="corrclip/<dataset>")` with the recorded instance map
    (``predict(..., regions=)``): windows padded to 56, regions per window, the vote; the final mask
    equals the release's at stable pixels."""
    fam = cc_manifest["families"][family]
    ds = {"city_scapes": "cityscapes"}.get(family, family)
    preset = f"corrclip/{ds}" if ds in DATASETS else "corrclip/voc21"
    aux = {"dino": str(AUX / "dino_vitb8_tiny_fp16.pth"), "sam": str(AUX / "sam2_hiera_tiny_fp16.pt")}
    seg = golden_segmenter("corrclip", golden_ckpts[fam["clip"]], preset=preset, aux_pretrained=aux,
                           trunk_attention="explicit", short_side=fam["short_side"],
                           slide_crop=fam["slide_crop"], slide_stride=fam["slide_stride"],
                           prob_thd=fam["prob_thd"])
    assert seg.protocol.window_multiple == 56 and seg.protocol.region_vote
    q2c = Q2C[fam["classes"]]
    lines = [", ".join(f"q{j}" for j, c in enumerate(q2c) if c == k) for k in range(max(q2c) + 1)]
    out = seg.predict(golden[f"img{img}__raw_rgb"], lines, embeddings=golden[CLASSIFIER[fam["classes"]]],
                      regions=_instance(cc, maskset, img))
    prefix = f"full__{family}__img{img}"
    unstable = cc[f"{prefix}__pred_unstable_idx"]
    assert_mask_at_stable_pixels(out.mask.astype(np.int64), cc[f"{prefix}__pred"], unstable)


def test_segmenter_region_errors_and_vote_on_any_method(golden, cc, golden_ckpts):
    aux = {"dino": str(AUX / "dino_vitb8_tiny_fp16.pth"), "sam": str(AUX / "sam2_hiera_tiny_fp16.pt")}
    seg = golden_segmenter("corrclip", golden_ckpts["b16"], preset="corrclip/voc21", aux_pretrained=aux,
                           short_side=224, slide_crop=224)
    rgb = golden["imgA__raw_rgb"]
    with pytest.raises(ValueError, match=r"^regions must be an \(H, W\) = \(224, 224\) integer instance map"):
        seg.predict(rgb, ["a", "b"], embeddings=torch.randn(2, 64), regions=np.zeros((10, 10), np.int64))
    # the vote after SCLIP: every region of the map takes its majority label
    sclip = golden_segmenter("sclip", golden_ckpts["b16"], preset="sclip/voc21")
    m0 = _instance(cc, "rects", "A")
    plain = sclip.predict(rgb, VOCLIKE, embeddings=golden["classifier__voclike"])
    voted = golden_segmenter("sclip", golden_ckpts["b16"], preset="sclip/voc21", region_vote=True).predict(
        rgb, VOCLIKE, embeddings=golden["classifier__voclike"], regions=m0)
    np.testing.assert_array_equal(voted.mask, vote(torch.from_numpy(plain.mask.astype(np.int64)), m0).numpy())
    assert (voted.mask != plain.mask).any()
    # predict_batch takes one map per image and equals predict image by image
    voter = golden_segmenter("sclip", golden_ckpts["b16"], preset="sclip/voc21", region_vote=True)
    other = np.ascontiguousarray(np.asarray(m0)[::-1])
    emb = golden["classifier__voclike"]
    batch = voter.predict_batch([rgb, rgb], VOCLIKE, embeddings=emb, regions=[m0, other])
    np.testing.assert_array_equal(batch[0].mask, voted.mask)
    one = voter.predict(rgb, VOCLIKE, embeddings=emb, regions=other)
    np.testing.assert_array_equal(batch[1].mask, one.mask)
    assert not np.array_equal(batch[0].mask, batch[1].mask)  # each image voted with its own map
    with pytest.raises(ValueError, match=r"^regions= holds 1 maps for 2 images; give one per image$"):
        voter.predict_batch([rgb, rgb], VOCLIKE, embeddings=golden["classifier__voclike"], regions=[m0])
    with pytest.raises(ValueError, match=r"^images\[1\]: regions must be an \(H, W\)"):
        voter.predict_batch([rgb, rgb], VOCLIKE, embeddings=golden["classifier__voclike"],
                            regions=[m0, np.zeros((3, 3), np.int64)])
    with pytest.raises(ValueError, match=r"^regions= would not be used: method 'sclip' reads no regions"):
        sclip.predict_batch([rgb], VOCLIKE, embeddings=golden["classifier__voclike"], regions=[m0])
    with pytest.raises(ValueError, match="region_vote needs each image's regions: pass regions= to predict"):
        golden_segmenter("sclip", golden_ckpts["b16"], preset="sclip/voc21", region_vote=True).predict(
            rgb, VOCLIKE, embeddings=golden["classifier__voclike"])

