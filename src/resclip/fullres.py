"""Full-resolution outputs computed band by band from the low-resolution logits.

The network sees a resized image (short side ~336), but masks and probabilities live at the
original size. A ``(C, H, W)`` float map of a 20,000 x 20,000 photo with 150 classes is 240 GB,
so nothing of that size is ever built: the mask is computed in bands of rows, and the
probabilities only when asked for (whole, or one band at a time).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from .pamr import pamr
from .protocol import (
    Protocol,
    area_keep,
    class_probabilities,
    labels_from_logits,
    renormalise,
    threshold_argmax,
)
from .upsample import bilinear_rows, bilinear_rows_exact, row_bands

DEFAULT_BUDGET = 1 << 22  # elements of the largest (Q, rows, W) band (16 MiB in float32)


def mask_dtype(num_classes: int) -> np.dtype:
    """Smallest unsigned integer type holding ``num_classes`` labels (uint8 up to 256 classes)."""
    if num_classes <= 256:
        return np.dtype(np.uint8)
    if num_classes <= 65536:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


class FullResolution:
    """Upsampling, optional PAMR and post-processing of one image's logits, one band at a time.

    Args:
        logits: ``(Q, h1, w1)`` float32 window-averaged query logits at the resized size.
        guide: ``(1, 3, h1, w1)`` the normalised resized image (PAMR guide), or None.
        query_to_class: ``(Q,)`` int64.
        protocol: post-processing settings (logit scale, thresholds, PAMR).
        size: original ``(H, W)``.
        budget: the most elements of one ``(Q, rows, W)`` band.
    """

    def __init__(
        self,
        logits: torch.Tensor,
        guide: torch.Tensor | None,
        query_to_class: torch.Tensor,
        protocol: Protocol,
        size: tuple[int, int],
        budget: int = DEFAULT_BUDGET,
    ) -> None:
        self.logits = logits
        self.guide = guide[0] if guide is not None else None
        self.query_to_class = query_to_class
        self.protocol = protocol
        self.size = size
        self.num_classes = int(query_to_class.max()) + 1
        self.halo = protocol.pamr_steps * max(protocol.pamr_dilations) if protocol.pamr_steps > 0 else 0
        rows_budget = max(budget, (4 * self.halo + 1) * logits.shape[0] * size[1])
        self.bands = row_bands(size[0], size[1], logits.shape[0], rows_budget)
        self._keep: torch.Tensor | None = None

    def logit_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start..stop-1`` of the full-resolution logits ``(Q, R, W)``, after PAMR if asked.

        PAMR is run on the band plus ``steps * max(dilation)`` rows on each side, which is exactly
        how far its result depends on its input, so the band equals the whole-image result.
        """
        if not self.halo or self.guide is None:
            return bilinear_rows(self.logits, self.size, start, stop)
        lo, hi = max(0, start - self.halo), min(self.size[0], stop + self.halo)
        band = bilinear_rows(self.logits, self.size, lo, hi)
        guide = bilinear_rows_exact(self.guide, self.size, lo, hi)
        p = self.protocol
        refined = pamr(guide[None], band[None], p.pamr_steps, p.pamr_dilations)[0]
        return refined[:, start - lo : stop - lo]

    def _raw_class_probs(self, start: int, stop: int) -> torch.Tensor:
        return class_probabilities(
            self.logit_rows(start, stop), self.query_to_class, self.protocol.logit_scale
        )

    def keep(self) -> torch.Tensor:
        """``(C,)`` 1/0 weights of SCLIP's area filter (all ones when it is off)."""
        if self._keep is None:
            if self.protocol.area_thd is None:
                self._keep = torch.ones(self.num_classes, device=self.logits.device)
            else:
                area = torch.zeros(self.num_classes, dtype=torch.int64, device=self.logits.device)
                for start, stop in self.bands:
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
        for start, stop in self.bands:
            yield start, stop, self.class_prob_rows(start, stop)

    def mask(self) -> np.ndarray:
        """``(H, W)`` class indices (dtype from :func:`mask_dtype`)."""
        out = np.empty(self.size, dtype=mask_dtype(self.num_classes))
        p = self.protocol
        q2c = self.query_to_class.to(self.logits.device)
        for start, stop in self.bands:
            if p.area_thd is None:
                labels = labels_from_logits(self.logit_rows(start, stop), q2c, p.logit_scale, p.prob_thd)
            else:
                labels = threshold_argmax(self.class_prob_rows(start, stop), p.prob_thd)
            out[start:stop] = labels.cpu().numpy()
        return out

    def probs(self) -> np.ndarray:
        """``(C, H, W)`` float32 class probabilities renormalised over classes."""
        out = np.empty((self.num_classes, *self.size), dtype=np.float32)
        for start, stop, probs in self.iter_bands():
            out[:, start:stop] = renormalise(probs).cpu().numpy()
        return out

    def logits_full(self) -> np.ndarray:
        """``(Q, H, W)`` float32 full-resolution logits (after PAMR if the protocol uses it)."""
        out = np.empty((self.logits.shape[0], *self.size), dtype=np.float32)
        for start, stop in self.bands:
            out[:, start:stop] = self.logit_rows(start, stop).cpu().numpy()
        return out
