"""The public segmenter: image + words -> mask."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .engine import DenseEngine
from .fullres import DEFAULT_BUDGET, FullResolution, WindowLogits
from .preprocess import ImageInput, load_image, normalise, rescale_size, resize_image, window_coords
from .protocol import QUERY_BLOCK, Protocol, ensure_finite
from .rcs import RCSConfig
from .sfr import SFRConfig
from .text import ClassSpec, EmbeddingCache, check_embeddings, parse_classes, query_embeddings


def logits_size(boxes: Sequence[tuple[int, int, int, int]]) -> tuple[int, int]:
    """The pixel size ``(Hc, Wc)`` of a batch of equally sized windows."""
    y1, x1, y2, x2 = boxes[0]
    return y2 - y1, x2 - x1


def _trim_heap() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise); a no-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class SegResult:
    """Segmentation of one image.

    Attributes:
        mask: ``(H, W)`` class indices at the original image size (uint8 up to 256 classes,
            see :func:`resclip.fullres.mask_dtype`).
        class_names: the ``C`` class names (first synonym of each class line).
        logits: ``(Q, h1, w1)`` float32 query logits at the resized resolution (window average);
            with many classes they are not kept but rebuilt on first access (``Q * h1 * w1 * 4``
            bytes).
        full: the band-wise full-resolution computation (``full.class_prob_rows(a, b)`` gives
            one band of probabilities without building the whole map).
    """

    def __init__(
        self, mask: np.ndarray, class_names: list[str], logits: np.ndarray | None, full: FullResolution
    ):
        self.mask = mask
        self.class_names = class_names
        self._logits = logits
        self.full = full
        self._probs: np.ndarray | None = None
        self._lock = threading.Lock()

    @property
    def logits(self) -> np.ndarray:
        """``(Q, h1, w1)`` float32 window-averaged query logits at the resized resolution."""
        with self._lock:
            if self._logits is None:
                self._logits = self.full.resized_logits().cpu().numpy()
            return self._logits

    @property
    def probs(self) -> np.ndarray:
        """``(C, H, W)`` float32 class probabilities (max over synonyms, renormalised to sum to 1).

        Computed on first access (it is ``C * H * W * 4`` bytes: use ``full.class_prob_rows`` for
        huge images).
        """
        with self._lock:
            if self._probs is None:
                self._probs = self.full.probs()
            return self._probs

    def __repr__(self) -> str:
        return f"SegResult(mask={self.mask.shape}, classes={self.class_names})"


@dataclass(frozen=True)
class SegmenterConfig:
    """Everything that decides a segmenter's output, for results files and reproducibility."""

    method: str
    rcs: RCSConfig | None
    sfr: SFRConfig | None
    protocol: Protocol
    preset: str
    fidelity: str
    model: str
    pretrained: str | None
    precision: str
    trunk_attention: str = "explicit"  # blocks 1..L-1: "explicit" (released ResCLIP) or "fused"

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON view."""
        return dataclasses.asdict(self)


class Segmenter:
    """Segments images with a CLIP model and a training-free dense method.

    Use :func:`resclip.create_segmenter` to build one.

    Attributes:
        logits_budget: the most elements of the ``(Q, h1, w1)`` resized logits built whole; above
            it (many classes), only the windows' patch logits are kept and the queries are
            processed in groups (:class:`resclip.fullres.WindowLogits`), with identical results.
    """

    logits_budget: int = 1 << 26  # 256 MiB of float32

    def __init__(
        self,
        engine: DenseEngine,
        model: torch.nn.Module | None,
        tokenizer: Any,
        config: SegmenterConfig,
        device: torch.device,
        window_batch: int = 8,
        text_cache: EmbeddingCache | None = None,
        fingerprint: str = "",
        band_budget: int = DEFAULT_BUDGET,
        visual_digest: str = "",
    ) -> None:
        if window_batch < 1:
            raise ValueError(f"window_batch must be >= 1, got {window_batch}")
        self.engine = engine
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.protocol = config.protocol
        self.device = device
        self.window_batch = window_batch
        self.text_cache = text_cache
        self.fingerprint = fingerprint
        self.band_budget = band_budget
        self.visual_digest = visual_digest  # sha256 of the visual tower's weights (resclip.digest)

    # ------------------------------------------------------------------ text
    @property
    def embed_dim(self) -> int:
        proj: torch.Tensor = self.engine.visual.proj
        return int(proj.shape[1])

    def encode_classes(
        self, classes: Sequence[str] | str, embeddings: torch.Tensor | np.ndarray | None = None
    ) -> tuple[ClassSpec, torch.Tensor]:
        """Parse class lines and get one embedding per query.

        Args:
            classes: class lines, synonyms separated by ``", "``; or one string with classes
                separated by ``";"`` or newlines.
            embeddings: optional precomputed ``(Q, D)`` query embeddings, in synonym order.

        Returns:
            The parsed :class:`ClassSpec` and ``(Q, D)`` float32 embeddings on the device.
        """
        spec = parse_classes(classes)
        if embeddings is not None:
            emb = check_embeddings(embeddings, spec, self.embed_dim)
        else:
            emb = query_embeddings(
                self.model, self.tokenizer, spec, fingerprint=self.fingerprint, cache=self.text_cache
            )
            ensure_finite(
                emb,
                "the text encoder's query embeddings",
                "the checkpoint's text weights are probably broken (e.g. scaled out of range); check the "
                "file given as pretrained=",
            )
        return spec, emb.to(self.device, torch.float32)

    def release_text_tower(self) -> None:
        """Free the CLIP text tower: the visual tower is all that prediction needs.

        The text tower is about a quarter of a CLIP ViT's weights (ViT-L/14: 123 M parameters,
        470 MiB in fp32). Afterwards a class list must come with ``embeddings=`` or have all its
        queries in the text cache (lists encoded before the release are there unless the
        segmenter was created with ``text_cache=False``); otherwise :meth:`encode_classes` raises.
        ``resclip segment``, ``eval``, ``reproduce`` and ``sweep`` release it once their classes
        are encoded.
        """
        self.model = None
        gc.collect()
        _trim_heap()

    @property
    def text_tower_released(self) -> bool:
        """True after :meth:`release_text_tower`."""
        return self.model is None

    # ------------------------------------------------------------------ image
    def check_size(self, size: tuple[int, int]) -> None:
        """Reject an image that stays thinner than one patch after resizing.

        Raises:
            ValueError: naming the image size, the resized size and the patch size.
        """
        h, w = size
        nh, nw = rescale_size(h, w, self.protocol.short_side, self.protocol.long_side)
        patch = self.engine.patch
        if min(nh, nw) < patch:
            raise ValueError(
                f"image is {w}x{h} pixels: too thin to segment (resized to {nw}x{nh} it is narrower than "
                f"one {patch}-pixel patch); crop or pad it to an aspect ratio below "
                f"{self.protocol.long_side // patch}:1"
            )

    def resized_input(self, rgb: np.ndarray) -> torch.Tensor:
        """``(H, W, 3)`` uint8 -> ``(1, 3, h1, w1)`` normalised float32 on the device."""
        resized = resize_image(rgb, self.protocol.short_side, self.protocol.long_side)
        return normalise(resized).to(self.device)

    def image_logits(self, x: torch.Tensor, text: torch.Tensor, query_to_class: torch.Tensor) -> torch.Tensor:
        """Window-averaged query logits at the resized resolution.

        Args:
            x: ``(1, 3, h1, w1)`` normalised image.
            text: ``(Q, D)`` query embeddings.
            query_to_class: ``(Q,)`` int64.

        Returns:
            ``(Q, h1, w1)`` float32.
        """
        _, _, h1, w1 = x.shape
        acc = torch.zeros(text.shape[0], h1, w1, device=x.device)
        count = torch.zeros(1, h1, w1, device=x.device)
        for chunk, logits in self._windows(x, text, query_to_class):
            up = F.interpolate(logits, size=logits_size(chunk), mode="bilinear", align_corners=False)
            for (y1, x1, y2, x2), win in zip(chunk, up, strict=False):
                acc[:, y1:y2, x1:x2] += win
                count[:, y1:y2, x1:x2] += 1
        return ensure_finite(acc.div_(count), "the sliding-window averaged logits")

    def _windows(
        self, x: torch.Tensor, text: torch.Tensor, query_to_class: torch.Tensor
    ) -> Iterator[tuple[list[tuple[int, int, int, int]], torch.Tensor]]:
        """``(boxes, (B, Q, h, w) patch logits)`` of every batch of sliding windows, in order."""
        _, _, h1, w1 = x.shape
        p = self.protocol
        boxes = window_coords(h1, w1, p.slide_crop, p.slide_stride)
        for start in range(0, len(boxes), self.window_batch):
            chunk = boxes[start : start + self.window_batch]
            crops = torch.cat([x[:, :, y1:y2, x1:x2] for y1, x1, y2, x2 in chunk])
            logits = self.engine.window_logits(crops, text, query_to_class)
            yield chunk, ensure_finite(logits, "the image encoder's patch logits")

    def window_logits(
        self, x: torch.Tensor, text: torch.Tensor, query_to_class: torch.Tensor
    ) -> WindowLogits:
        """The windows' patch logits, from which :class:`WindowLogits` rebuilds any rows of
        :meth:`image_logits` for any queries (memory: the patch grids, not the resized map)."""
        _, _, h1, w1 = x.shape
        return WindowLogits(h1, w1, list(self._windows(x, text, query_to_class)))

    @torch.inference_mode()
    def predict(
        self,
        image: ImageInput,
        classes: Sequence[str] | str,
        embeddings: torch.Tensor | np.ndarray | None = None,
    ) -> SegResult:
        """Segment one image by the given class names.

        Args:
            image: a path, a PIL image or an ``(H, W, 3)`` uint8 RGB array.
            classes: class lines (synonyms separated by ``", "``), e.g.
                ``["sky, wall, tree", "cat", "person, man, woman"]``; class 0 is the background
                class when the protocol's ``prob_thd`` is used.
            embeddings: optional precomputed ``(Q, D)`` query embeddings.

        Returns:
            A :class:`SegResult` at the original image size.
        """
        rgb = load_image(image)
        self.check_size(rgb.shape[:2])
        spec, text = self.encode_classes(classes, embeddings)
        q2c = torch.tensor(spec.query_to_class, dtype=torch.int64, device=self.device)
        x = self.resized_input(rgb)
        if text.shape[0] > QUERY_BLOCK and text.shape[0] * x.shape[-2] * x.shape[-1] > self.logits_budget:
            # many classes: keep the windows' patch logits, process the queries in groups
            full = self.full_resolution(self.window_logits(x, text, q2c), x, q2c, rgb.shape[:2])
            return SegResult(mask=full.mask(), class_names=list(spec.names), logits=None, full=full)
        logits = self.image_logits(x, text, q2c)
        full = self.full_resolution(logits, x, q2c, rgb.shape[:2])
        return SegResult(
            mask=full.mask(), class_names=list(spec.names), logits=logits.cpu().numpy(), full=full
        )

    def full_resolution(
        self,
        logits: torch.Tensor | WindowLogits,
        x: torch.Tensor,
        query_to_class: torch.Tensor,
        size: tuple[int, int],
    ) -> FullResolution:
        """Band-wise upsampling (+ PAMR if the protocol asks) and post-processing of ``logits``.

        Args:
            logits: ``(Q, h1, w1)`` window-averaged logits, or the :class:`WindowLogits` to rebuild
                them from; x: ``(1, 3, h1, w1)`` the resized input.
            size: the original ``(H, W)``.
        """
        return FullResolution(
            logits.float() if isinstance(logits, torch.Tensor) else logits,
            x if self.protocol.pamr_steps > 0 else None,
            query_to_class,
            self.protocol,
            size,
            budget=self.band_budget,
        )

    # ------------------------------------------------------------------ variants
    def with_method(self, method: str, *, rcs: bool | None = None, sfr: bool | None = None) -> Segmenter:
        """This segmenter with another base method or module choice, sharing its CLIP weights and
        text cache (see :func:`resclip.factory.with_method`), e.g. ``seg.with_method("sclip", sfr=False)``."""
        from .factory import with_method  # the factory builds engines; it imports this module

        return with_method(self, method, rcs=rcs, sfr=sfr)
