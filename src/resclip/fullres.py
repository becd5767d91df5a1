"""Full-resolution outputs computed band by band from the low-resolution logits.

The network sees a resized image (short side ~336), but masks and probabilities live at the
original size. A ``(C, H, W)`` float map of a 20,000 x 20,000 photo with 150 classes is 240 GB,
so nothing of that size is ever built: the mask is computed in bands of rows, and the
probabilities only when asked for (whole, or one band at a time).

Many classes multiply everything by the query count ``Q``: 10,000 classes make the resized
``(Q, h1, w1)`` logits alone 6 GB. Then (see :class:`WindowLogits`) only the windows' patch
logits are kept, and the queries are processed in groups: each group's logits are rebuilt for a
band of rows from the windows with the very same operations, and the groups are combined exactly
(a running max and first argmax; sums over queries in the fixed order of
:func:`resclip.protocol.query_sum`), so the results are bit-identical to the ungrouped path.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .pamr import pamr
from .protocol import (
    QUERY_BLOCK,
    Protocol,
    area_keep,
    class_probabilities,
    ensure_finite,
    labels_from_logits,
    query_sum,
    renormalise,
    threshold_argmax,
)
from .tlp import query_affinity, tlp_refine
from .upsample import bilinear_rows, bilinear_rows_exact, row_bands, source_rows

DEFAULT_BUDGET = 1 << 22  # elements of the largest (Q, rows, W) band (16 MiB in float32)
TLP_MAX_ELEMENTS = 1 << 28  # TLP holds the whole (Q, H, W) map: at most 1 GiB of float32


def mask_dtype(num_classes: int) -> np.dtype:
    """Smallest unsigned integer type holding ``num_classes`` labels (uint8 up to 256 classes)."""
    if num_classes <= 256:
        return np.dtype(np.uint8)
    if num_classes <= 65536:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


Box = tuple[int, int, int, int]

WINDOW_STAGE = "the sliding-window averaged logits"
FULL_STAGE = "the full-resolution logits"
PROBS_STAGE = "the full-resolution class probabilities"


def query_groups(num_queries: int, size: int) -> list[tuple[int, int]]:
    """``(start, stop)`` query groups of ``size`` (a multiple of :data:`QUERY_BLOCK`); a last group
    shorter than 16 queries joins the one before (one-channel slices take other kernels)."""
    groups = [(q, min(num_queries, q + size)) for q in range(0, num_queries, size)]
    if len(groups) > 1 and groups[-1][1] - groups[-1][0] < 16:
        groups[-2:] = [(groups[-2][0], num_queries)]
    return groups


def _power_of_two_factor(grid: Sequence[int], size: tuple[int, int]) -> int:
    """The upsampling factor from a patch ``grid`` to a window ``size`` when it is the same power
    of two along both axes (source positions are then exact: rows can be computed alone), else 0."""
    h, w = int(grid[0]), int(grid[1])
    factor = size[0] // h
    exact = factor > 1 and (factor & (factor - 1)) == 0 and size == (h * factor, w * factor)
    return factor if exact else 0


def _patch_rows(start: int, stop: int, factor: int, height: int) -> tuple[int, int]:
    """Patch rows ``k0..k1-1`` from which window rows ``start..stop-1`` are interpolated, with one
    row of margin each side so that no wanted row meets the crop's border clamping."""
    first = max(0, int((start + 0.5) / factor - 0.5) - 1)
    last = min(height, int((stop - 0.5) / factor - 0.5) + 3)
    return first, last


def upsample_window(logits: torch.Tensor, size: tuple[int, int],
                    pad: tuple[int, int, int, int] = (0, 0, 0, 0)) -> torch.Tensor:
    """``(B, Q, h, w)`` window patch logits -> ``(B, Q, Hc, Wc)`` at the window size ``size``:
    bilinear (``align_corners=False``) to the padded window, then the padding
    ``(left, right, top, bottom)`` cut off."""
    left, right, top, bottom = pad
    hc, wc = size
    up = F.interpolate(logits, size=(hc + top + bottom, wc + left + right), mode="bilinear",
                       align_corners=False)
    return up[..., top : top + hc, left : left + wc] if any(pad) else up


class WindowLogits:
    """Window-averaged query logits at the resized size, rebuilt on demand for some queries and rows.

    Holds the sliding windows' patch logits (``(B, Q, h, w)`` per window batch: about 1/256 of
    the resized map per query with 16-pixel patches) instead of the ``(Q, h1, w1)`` average.
    :meth:`rows` repeats :meth:`resclip.Segmenter.image_logits` for a slice of queries and rows:
    the same upsampling kernel on the same memory layout (every query channel is computed alone),
    the same window order, the same division, hence the same bits.

    Args:
        height, width: the resized size ``(h1, w1)``.
        windows: ``(boxes, logits)`` per window batch, in processing order.
        pad: the padding every window had before the network (``Protocol.window_multiple``).
    """

    def __init__(
        self, height: int, width: int, windows: Sequence[tuple[Sequence[Box], torch.Tensor]],
        pad: tuple[int, int, int, int] = (0, 0, 0, 0),
    ) -> None:
        self.height = height
        self.width = width
        self.pad = pad
        self.windows = list(windows)
        self.num_queries = int(self.windows[0][1].shape[1])
        self.device = self.windows[0][1].device

    def rows(self, q0: int, q1: int, start: int, stop: int) -> torch.Tensor:
        """``(q1 - q0, stop - start, w1)`` float32: queries ``q0..q1-1``, resized rows ``start..stop-1``.

        Bit-identical to the whole map when ``q0`` is a multiple of :data:`QUERY_BLOCK` (the
        upsampling kernel's vector lanes then fall on the same queries) and ``q1 - q0 > 1``.
        """
        acc = torch.zeros(q1 - q0, stop - start, self.width, device=self.device)
        count = torch.zeros(1, stop - start, self.width, device=self.device)
        for boxes, logits in self.windows:
            picked = [i for i, (y1, _, y2, _) in enumerate(boxes) if y1 < stop and y2 > start]
            if not picked:
                continue
            nhwc = logits.is_contiguous(memory_format=torch.channels_last) and not logits.is_contiguous()
            layout = torch.channels_last if nhwc else torch.contiguous_format
            y1, x1, y2, x2 = boxes[picked[0]]
            factor = 0 if any(self.pad) else _power_of_two_factor(logits.shape[-2:], (y2 - y1, x2 - x1))
            if factor:  # only the patch rows that the wanted rows read (same kernel values)
                for i in picked:
                    y1, x1, y2, x2 = boxes[i]
                    a, b = max(start, y1), min(stop, y2)
                    k0, k1 = _patch_rows(a - y1, b - y1, factor, logits.shape[-2])
                    part = logits[i : i + 1, q0:q1, k0:k1].contiguous(memory_format=layout)
                    up = F.interpolate(
                        part,
                        scale_factor=factor,
                        mode="bilinear",
                        align_corners=False,
                        recompute_scale_factor=False,
                    )[0]
                    acc[:, a - start : b - start, x1:x2] += up[:, a - y1 - factor * k0 : b - y1 - factor * k0]
                    count[:, a - start : b - start, x1:x2] += 1
                continue
            part = logits[picked, q0:q1].contiguous(memory_format=layout)
            up = upsample_window(part, (y2 - y1, x2 - x1), self.pad)
            for i, win in zip(picked, up, strict=True):
                y1, x1, y2, x2 = boxes[i]
                a, b = max(start, y1), min(stop, y2)
                acc[:, a - start : b - start, x1:x2] += win[:, a - y1 : b - y1]
                count[:, a - start : b - start, x1:x2] += 1
        return ensure_finite(acc.div_(count), WINDOW_STAGE)

    def full(self) -> torch.Tensor:
        """The whole ``(Q, h1, w1)`` map (``Q * h1 * w1 * 4`` bytes)."""
        return self.rows(0, self.num_queries, 0, self.height)


class FullResolution:
    """Upsampling, optional PAMR and post-processing of one image's logits, one band at a time.

    Args:
        logits: ``(Q, h1, w1)`` float32 window-averaged query logits at the resized size, or a
            :class:`WindowLogits` that rebuilds them a group of queries at a time (many classes).
        guide: ``(1, 3, h1, w1)`` the normalised resized image (PAMR guide), or None.
        query_to_class: ``(Q,)`` int64.
        protocol: post-processing settings (logit scale, thresholds, PAMR).
        size: original ``(H, W)``.
        budget: the most elements of one ``(Q, rows, W)`` band (with :class:`WindowLogits`: of one
            group's band, and of one ``(C, rows, W)`` band of class probabilities; PAMR adds its
            halo of rows either way).
        text: ``(Q, D)`` query embeddings; needed by the protocol's TLP (``protocol.tlp``), which
            refines the whole ``(Q, H, W)`` map at once after the upsampling (and PAMR).

    Raises:
        ValueError: TLP without ``guide`` and ``text``, on grouped queries (:class:`WindowLogits`:
            TLP couples all queries), or on a map above :data:`TLP_MAX_ELEMENTS`.
    """

    def __init__(
        self,
        logits: torch.Tensor | WindowLogits,
        guide: torch.Tensor | None,
        query_to_class: torch.Tensor,
        protocol: Protocol,
        size: tuple[int, int],
        budget: int = DEFAULT_BUDGET,
        text: torch.Tensor | None = None,
    ) -> None:
        self.source: WindowLogits | None = None
        self.logits: torch.Tensor | None = None
        if isinstance(logits, WindowLogits):
            self.source = logits
            self.num_queries = logits.num_queries
            self.resized = (logits.height, logits.width)
            self.device = logits.device
        else:
            self.logits = logits
            self.num_queries = int(logits.shape[0])
            self.resized = (int(logits.shape[1]), int(logits.shape[2]))
            self.device = logits.device
        self.guide = guide[0] if guide is not None else None
        self.query_to_class = query_to_class
        self.protocol = protocol
        self.size = size
        self.num_classes = int(query_to_class.max()) + 1
        self.halo = protocol.pamr_steps * max(protocol.pamr_dilations) if protocol.pamr_steps > 0 else 0
        height, width = size
        q = self.num_queries
        if self.source is None:
            rows_budget = max(budget, (4 * self.halo + 1) * q * width)
            self.bands = row_bands(height, width, q, rows_budget)
            self.groups = [(0, q)]
            self.class_bands = self.logit_bands = self.bands
        else:
            target = min(height, 32) + 2 * self.halo  # rows of one group's band, halo included
            group = QUERY_BLOCK * max(1, budget // (QUERY_BLOCK * width * target))
            self.groups = query_groups(q, group)
            rows = max(1, budget // (group * width) - 2 * self.halo)
            if self.halo:  # the very bands of the ungrouped path (PAMR's rounding follows the band)
                rows = max(budget, (4 * self.halo + 1) * q * width) // (q * width)
            self.bands = [(r, min(height, r + rows)) for r in range(0, height, rows)]
            self.class_bands = row_bands(height, width, self.num_classes, budget)
            self.logit_bands = self.bands if self.halo else row_bands(height, width, q, budget)
        self._keep: torch.Tensor | None = None
        self._guide_band: tuple[int, int, torch.Tensor] | None = None
        self._tlp_affinity: torch.Tensor | None = None
        self._tlp_map: torch.Tensor | None = None
        if protocol.tlp is not None:
            if text is None or self.guide is None:
                raise ValueError(
                    "tlp refines the logits with the image and the query embeddings: pass guide and text"
                )
            if self.source is not None:
                raise ValueError(
                    f"tlp couples all {q} queries over the whole image, so it cannot run class group by "
                    "class group; use fewer classes, a smaller short_side or tlp=None"
                )
            if q * height * width > TLP_MAX_ELEMENTS:
                raise ValueError(
                    f"tlp needs the whole {q}x{height}x{width} logit map at once "
                    f"({q * height * width * 4 / 2**30:.1f} GiB, "
                    f"limit {TLP_MAX_ELEMENTS * 4 / 2**30:.0f} GiB); "
                    "use fewer classes, a smaller image or tlp=None"
                )
            self._tlp_affinity = query_affinity(text, protocol.tlp)

    def logit_rows(self, start: int, stop: int, q0: int = 0, q1: int | None = None) -> torch.Tensor:
        """Rows ``start..stop-1`` of the full-resolution logits ``(Q, R, W)``, after PAMR if asked.

        PAMR is run on the band plus ``steps * max(dilation)`` rows on each side, which is exactly
        how far its result depends on its input, so the band equals the whole-image result.
        ``q0, q1`` restrict it to queries ``q0..q1-1`` (every query channel is computed alone).
        """
        q1 = self.num_queries if q1 is None else q1
        if self._tlp_affinity is not None:
            return self.tlp_logits()[q0:q1, start:stop]
        if self.logits is not None:
            whole = (q0, q1) == (0, self.num_queries)
            return self._refine(self.logits if whole else self.logits[q0:q1], start, stop)
        if (q0, q1) in self.groups or q1 - q0 < 2:
            return self._group_rows(q0, q1, start, stop)
        out = torch.empty(q1 - q0, stop - start, self.size[1], device=self.device)
        for g0, g1 in self.groups:
            a, b = max(q0, g0), min(q1, g1)
            if a < b:
                out[a - q0 : b - q0] = self._group_rows(g0, g1, start, stop)[a - g0 : b - g0]
        return out

    def tlp_logits(self) -> torch.Tensor:
        """``(Q, H, W)`` the whole full-resolution logits after PAMR (if any) and TLP, computed once:
        TLP couples every pixel and every query (see :mod:`resclip.tlp`). The guide is the
        normalised resized image, bilinearly resized to ``(H, W)``."""
        if self._tlp_map is None:
            assert self.logits is not None and self.guide is not None and self._tlp_affinity is not None
            assert self.protocol.tlp is not None
            full = self._refine(self.logits, 0, self.size[0])
            image = F.interpolate(
                self.guide[None].float(), size=self.size, mode="bilinear", align_corners=False
            )
            refined = tlp_refine(image, full[None], self._tlp_affinity, self.protocol.tlp)[0]
            self._tlp_map = ensure_finite(refined, "the TLP-refined logits")
        return self._tlp_map

    def _group_rows(self, q0: int, q1: int, start: int, stop: int) -> torch.Tensor:
        """:meth:`logit_rows` of one query group, its resized rows rebuilt from the windows."""
        assert self.source is not None
        lo, hi = start, stop
        if self.halo:
            lo, hi = max(0, start - self.halo), min(self.size[0], stop + self.halo)
        a, b = source_rows(self.resized[0], self.size[0], lo, hi)
        slab = self.source.rows(q0, q1, a, b)
        return self._refine(slab, start, stop, offset=a)

    def _refine(self, logits: torch.Tensor, start: int, stop: int, offset: int = 0) -> torch.Tensor:
        """Upsampled rows of ``logits`` (resized rows from ``offset`` on), then PAMR with its halo."""
        height = self.resized[0]
        if not self.halo or self.guide is None:
            return bilinear_rows(logits, self.size, start, stop, height, offset)
        lo, hi = max(0, start - self.halo), min(self.size[0], stop + self.halo)
        band = bilinear_rows(logits, self.size, lo, hi, height, offset)
        if self._guide_band is None or self._guide_band[:2] != (lo, hi):
            self._guide_band = (lo, hi, bilinear_rows_exact(self.guide, self.size, lo, hi))
        guide = self._guide_band[2]
        p = self.protocol
        refined = pamr(guide[None], band[None], p.pamr_steps, p.pamr_dilations)[0]
        return refined[:, start - lo : stop - lo]

    def _raw_class_probs(self, start: int, stop: int) -> torch.Tensor:
        scale = self.protocol.logit_scale
        if self.source is None:
            rows = ensure_finite(self.logit_rows(start, stop), FULL_STAGE)
            return ensure_finite(class_probabilities(rows, self.query_to_class, scale), PROBS_STAGE)
        # the softmax of class_probabilities over more than QUERY_BLOCK queries, group by group:
        # the max, then the sum in query_sum's order, then each group's terms over that sum
        top: torch.Tensor | None = None
        for q0, q1 in self.groups:
            rows = ensure_finite(self.logit_rows(start, stop, q0, q1), FULL_STAGE)
            group_top = (scale * rows).max(dim=0).values
            top = group_top if top is None else torch.maximum(top, group_top)
        assert top is not None
        total: torch.Tensor | None = None
        for q0, q1 in self.groups:
            total = query_sum(torch.exp(scale * self.logit_rows(start, stop, q0, q1) - top), total)
        assert total is not None
        q2c = self.query_to_class.to(self.device)
        out = torch.full((self.num_classes, stop - start, self.size[1]), float("-inf"), device=self.device)
        for q0, q1 in self.groups:
            probs = torch.exp(scale * self.logit_rows(start, stop, q0, q1) - top).div_(total)
            index = q2c[q0:q1].view(-1, 1, 1).expand_as(probs)
            out.scatter_reduce_(0, index, probs, reduce="amax", include_self=True)
        return ensure_finite(out, PROBS_STAGE)

    def keep(self) -> torch.Tensor:
        """``(C,)`` 1/0 weights of SCLIP's area filter (all ones when it is off)."""
        if self._keep is None:
            if self.protocol.area_thd is None:
                self._keep = torch.ones(self.num_classes, device=self.device)
            else:
                area = torch.zeros(self.num_classes, dtype=torch.int64, device=self.device)
                for start, stop in self.class_bands:
                    first = self._raw_class_probs(start, stop).argmax(dim=0)
                    area += torch.bincount(first.flatten(), minlength=self.num_classes)
                self._keep = area_keep(area, self.protocol.area_thd)
        return self._keep

    def class_prob_rows(self, start: int, stop: int) -> torch.Tensor:
        """``(C, R, W)`` class probabilities of a band, after the area filter, not renormalised."""
        probs = self._raw_class_probs(start, stop)
        if self.protocol.area_thd is not None:
            probs = probs * self.keep().view(-1, 1, 1)
        return probs

    def iter_bands(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        """Yield ``(start, stop, class_probs)`` for every band."""
        for start, stop in self.class_bands:
            yield start, stop, self.class_prob_rows(start, stop)

    def mask(self) -> np.ndarray:
        """``(H, W)`` class indices (dtype from :func:`mask_dtype`)."""
        out = np.empty(self.size, dtype=mask_dtype(self.num_classes))
        p = self.protocol
        q2c = self.query_to_class.to(self.device)
        if p.area_thd is not None:
            for start, stop in self.class_bands:
                labels = threshold_argmax(self.class_prob_rows(start, stop), p.prob_thd)
                out[start:stop] = labels.cpu().numpy()
        elif self.source is None:
            for start, stop in self.bands:
                rows = ensure_finite(self.logit_rows(start, stop), FULL_STAGE)
                out[start:stop] = labels_from_logits(rows, q2c, p.logit_scale, p.prob_thd).cpu().numpy()
        else:
            for start, stop in self.bands:
                out[start:stop] = self._grouped_labels(start, stop, q2c).cpu().numpy()
        return out

    def _grouped_labels(self, start: int, stop: int, q2c: torch.Tensor) -> torch.Tensor:
        """:func:`labels_from_logits` of a band, one query group at a time: the first query of
        the highest logit (a running max; ties keep the earlier group, as ``max`` keeps the first
        index), then the threshold's sum over queries in :func:`query_sum`'s order."""
        p = self.protocol
        top: torch.Tensor | None = None
        best = torch.zeros(0)
        for q0, q1 in self.groups:
            group_top, query = ensure_finite(self.logit_rows(start, stop, q0, q1), FULL_STAGE).max(dim=0)
            if top is None:
                top, best = group_top, query + q0
            else:
                higher = group_top > top
                top = torch.where(higher, group_top, top)
                best = torch.where(higher, query + q0, best)
        assert top is not None
        labels = q2c[best]
        if p.prob_thd > 0:
            total: torch.Tensor | None = None
            for q0, q1 in self.groups:
                rows = self.logit_rows(start, stop, q0, q1)
                total = query_sum(torch.exp(p.logit_scale * (rows - top)), total)
            assert total is not None
            labels = labels.masked_fill(total.reciprocal() < p.prob_thd, 0)
        return labels

    def probs(self) -> np.ndarray:
        """``(C, H, W)`` float32 class probabilities renormalised over classes."""
        out = np.empty((self.num_classes, *self.size), dtype=np.float32)
        for start, stop, probs in self.iter_bands():
            out[:, start:stop] = renormalise(probs).cpu().numpy()
        return out

    def logits_full(self) -> np.ndarray:
        """``(Q, H, W)`` float32 full-resolution logits (after PAMR if the protocol uses it)."""
        out = np.empty((self.num_queries, *self.size), dtype=np.float32)
        for start, stop in self.logit_bands:
            for q0, q1 in self.groups:
                out[q0:q1, start:stop] = self.logit_rows(start, stop, q0, q1).cpu().numpy()
        return out

    def resized_logits(self) -> torch.Tensor:
        """The ``(Q, h1, w1)`` window-averaged logits (rebuilt whole from a :class:`WindowLogits`)."""
        if self.logits is not None:
            return self.logits
        assert self.source is not None
        return self.source.full()


class FixedMaps:
    """A finished image from a method with its own protocol (CLIPer's): its class scores and
    mask, behind the band interface of :class:`FullResolution` that :class:`resclip.SegResult`
    and :mod:`resclip.results` read.

    Args:
        scores: ``(C, H, W)`` non-negative class scores at the original size (``probs`` divides
            them by their sum over classes where it is positive).
        labels: ``(H, W)`` int64 class indices (255 = no class).
        patch_maps: ``(C, h, w)`` the patch-level maps (what ``SegResult.logits`` returns).
    """

    def __init__(self, scores: torch.Tensor, labels: torch.Tensor, patch_maps: torch.Tensor) -> None:
        self.scores = scores
        self.labels = labels
        self.patch_maps = patch_maps
        self.num_classes = int(scores.shape[0])
        self.size = (int(scores.shape[1]), int(scores.shape[2]))

    def class_prob_rows(self, start: int, stop: int) -> torch.Tensor:
        """``(C, R, W)`` class scores of a band."""
        return self.scores[:, start:stop]

    def iter_bands(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        """One band: the whole image."""
        yield 0, self.size[0], self.scores

    def mask(self) -> np.ndarray:
        """``(H, W)`` class indices (dtype from :func:`mask_dtype`; 255 = no class)."""
        return self.labels.cpu().numpy().astype(mask_dtype(self.num_classes))

    def probs(self) -> np.ndarray:
        """``(C, H, W)`` float32 scores divided by their sum over classes (0 where all are 0)."""
        total = self.scores.sum(dim=0, keepdim=True)
        return torch.where(total > 0, self.scores / total.clamp_min(1e-30), 0.0).cpu().numpy()

    def resized_logits(self) -> torch.Tensor:
        """The ``(C, h, w)`` patch-level maps."""
        return self.patch_maps
