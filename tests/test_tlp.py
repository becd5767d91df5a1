"""TLP (resclip.tlp) by hand on small grids, and as a protocol stage with a method other than PEARL."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import resclip
from resclip.fullres import FullResolution
from resclip.protocol import Protocol
from resclip.tlp import (
    TLPConfig,
    conjugate_gradient,
    data_weight,
    edge_weights,
    grey,
    laplacian,
    pooling_factors,
    query_affinity,
    text_agreement,
    tlp_refine,
)


def _dense_laplacian(a_h: torch.Tensor, a_v: torch.Tensor) -> torch.Tensor:
    """The ``(h*w, h*w)`` graph Laplacian of one grid, entry by entry."""
    h, w = a_v.shape[-2] + 1, a_h.shape[-1] + 1
    lap = torch.zeros(h * w, h * w, dtype=torch.float64)
    for r in range(h):
        for c in range(w):
            for (r2, c2), a in (((r, c + 1), a_h[r, c] if c + 1 < w else None),
                                ((r + 1, c), a_v[r, c] if r + 1 < h else None)):
                if a is None:
                    continue
                i, j = r * w + c, r2 * w + c2
                lap[i, i] += a
                lap[j, j] += a
                lap[i, j] -= a
                lap[j, i] -= a
    return lap


@pytest.fixture
def grid() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    image = torch.randn(1, 3, 6, 7)
    logits = torch.randn(1, 4, 6, 7) * 0.1 + 0.2
    text = torch.randn(4, 16)
    return image, logits, text


def test_laplacian_is_the_dense_graph_laplacian(grid):
    image, logits, text = grid
    cfg = TLPConfig()
    probs = torch.softmax(logits, dim=1)
    a_h, a_v = edge_weights(grey(image), probs, query_affinity(text, cfg), cfg)
    assert a_h.shape == (1, 1, 6, 6) and a_v.shape == (1, 1, 5, 7)
    assert float(a_h.min()) >= 0 and float(a_h.max()) <= 1
    lap = _dense_laplacian(a_h[0, 0].double(), a_v[0, 0].double())
    want = (lap @ logits[0].double().reshape(4, -1).T).T.reshape(1, 4, 6, 7)
    torch.testing.assert_close(laplacian(logits, a_h, a_v).double(), want, atol=1e-6, rtol=0)


def test_refinement_solves_the_linear_system(grid):
    """Enough CG steps reach the exact solution of (D_w + tau L) F = D_w Z (no pooling: grid >= size)."""
    image, logits, text = grid
    cfg = TLPConfig(grid=100, cg_steps=200, smoothness=0.7)
    g = query_affinity(text, cfg)
    probs = torch.softmax(logits, dim=1)
    weight = data_weight(probs, g, cfg)[0, 0].double().reshape(-1)
    a_h, a_v = edge_weights(grey(image), probs, g, cfg)
    system = torch.diag(weight) + cfg.smoothness * _dense_laplacian(a_h[0, 0].double(), a_v[0, 0].double())
    rhs = (weight[:, None] * logits[0].double().reshape(4, -1).T)
    exact = torch.linalg.solve(system, rhs).T.reshape(1, 4, 6, 7)
    torch.testing.assert_close(tlp_refine(image, logits, g, cfg).double(), exact, atol=1e-5, rtol=0)


def test_conjugate_gradient_on_a_small_spd_system():
    torch.manual_seed(1)
    a = torch.randn(5, 5, dtype=torch.float64)
    spd = a @ a.T + 5 * torch.eye(5, dtype=torch.float64)
    b = torch.randn(2, 5, dtype=torch.float64)
    x = conjugate_gradient(lambda v: v @ spd, b, torch.zeros_like(b), 10)
    torch.testing.assert_close(x, torch.linalg.solve(spd, b.T).T, atol=1e-8, rtol=0)


def test_couplings_and_affinity(grid):
    _, logits, text = grid
    g = query_affinity(text, TLPConfig())
    torch.testing.assert_close(g.sum(1), torch.ones(4), atol=1e-5, rtol=0)
    assert bool((torch.diagonal(g) > 0.7).all())  # the self weight dominates
    p = torch.softmax(logits, dim=1)
    diag = text_agreement(p, g, "diagonal")
    want = (torch.diagonal(g).view(1, 4, 1, 1) * p * p).sum(1, keepdim=True).clamp(0, 1)
    torch.testing.assert_close(diag, want)
    full = text_agreement(p, g, "matrix")
    by_hand = torch.einsum("bqij,qr,brij->bij", p, g, p)[:, None].clamp(0, 1)
    torch.testing.assert_close(full, by_hand)
    assert float((full - diag).abs().max()) > 1e-4


def test_pooling_factors_follow_pythons_round():
    assert pooling_factors(375, 500, 80) == (5, 6)
    assert pooling_factors(224, 224, 224) == (1, 1)
    assert pooling_factors(40, 200, 80) == (1, 2)  # round(0.5) == 0 -> at least 1; round(2.5) == 2
    assert pooling_factors(360, 360, 80) == (4, 4)  # round(4.5) == 4 (banker's rounding, as the release)


def test_bad_settings_and_shapes_are_one_line_errors(grid):
    image, logits, text = grid
    with pytest.raises(ValueError, match="coupling"):
        TLPConfig(coupling="full")
    with pytest.raises(ValueError, match="grid"):
        TLPConfig(grid=0)
    with pytest.raises(ValueError, match="do not match"):
        tlp_refine(image[..., :5, :], logits, query_affinity(text, TLPConfig()), TLPConfig())
    with pytest.raises(TypeError, match="tlp must be"):
        Protocol(tlp="on")  # type: ignore[arg-type]
    proto = Protocol(tlp=TLPConfig())
    q2c = torch.arange(4)
    with pytest.raises(ValueError, match="pass guide and text"):
        FullResolution(logits[0], None, q2c, proto, (6, 7))


def test_fullres_band_outputs_equal_the_whole_refinement(grid):
    image, logits, text = grid
    cfg = TLPConfig(grid=3)
    proto = Protocol(tlp=cfg, logit_scale=10.0)
    q2c = torch.tensor([0, 1, 1, 2])
    full = FullResolution(logits[0], image, q2c, proto, (12, 14), budget=64, text=text)
    whole = full.tlp_logits()
    up = torch.nn.functional.interpolate(logits, size=(12, 14), mode="bilinear", align_corners=False)
    guide = torch.nn.functional.interpolate(image, size=(12, 14), mode="bilinear", align_corners=False)
    torch.testing.assert_close(whole, tlp_refine(guide, up, query_affinity(text, cfg), cfg)[0])
    np.testing.assert_array_equal(full.logits_full(), whole.numpy())
    assert full.mask().shape == (12, 14) and np.isfinite(full.probs()).all()


SMALL = {"short_side": 96, "slide_crop": 64, "slide_stride": 32}


def test_tlp_with_another_method(tiny_ckpt, photo):
    """TLP is a protocol stage: NACLIP (+ RCS, SFR and PAMR) with TLP runs and differs from without."""
    classes = ["sky, wall", "cat", "person, man", "tree"]

    def seg(**kw):
        return resclip.create_segmenter(method="naclip", preset="naclip/ade20k", pretrained=str(tiny_ckpt),
                                        text_cache=False, rcs_layers=(2, 3), **SMALL, **kw)

    plain = seg().predict(photo, classes)
    with_tlp = seg(tlp=TLPConfig()).predict(photo, classes)
    np.testing.assert_array_equal(plain.logits, with_tlp.logits)  # TLP acts after the window logits
    assert np.abs(plain.full.logits_full() - with_tlp.full.logits_full()).max() > 1e-4
    np.testing.assert_allclose(with_tlp.probs.sum(0), 1.0, atol=1e-5)
    assert with_tlp.mask.shape == photo.shape[:2]
    assert seg(tlp=TLPConfig()).config.to_dict()["protocol"]["tlp"]["grid"] == 80


def test_tlp_refuses_grouped_classes(tiny_ckpt, photo):
    seg = resclip.create_segmenter(method="naclip", preset="naclip/ade20k", pretrained=str(tiny_ckpt),
                                   text_cache=False, rcs=False, sfr=False, tlp=TLPConfig(), **SMALL)
    seg.logits_budget = 1  # force the class-group path
    classes = [f"class {i}" for i in range(70)]
    with pytest.raises(ValueError, match="tlp couples all 70 queries"):
        seg.predict(photo, classes)
