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

from .cliper_protocol import CLIPER_TEMPLATES
from .cliper_protocol import resized_shape as cliper_shape
from .engine import DenseEngine
from .fullres import DEFAULT_BUDGET, FixedMaps, FullResolution, WindowLogits, upsample_window
from .preprocess import (
    ImageInput,
    load_image,
    normalise,
    rescale_size,
    resize_image,
    window_coords,
    window_padding,
)
from .protocol import QUERY_BLOCK, Protocol, ensure_finite
from .rcs import RCSConfig
from .sfr import SFRConfig
from .text import TEMPLATES, ClassSpec, EmbeddingCache, check_embeddings, parse_classes, query_embeddings


def logits_size(boxes: Sequence[tuple[int, int, int, int]]) -> tuple[int, int]:
    """The pixel size ``(Hc, Wc)`` of a batch of equally sized windows."""
    y1, x1, y2, x2 = boxes[0]
    return y2 - y1, x2 - x1


def refined_scores(scores: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """``(C, H, W)`` scores of a SAM refinement where a SAM mask covers the pixel, the coarse class
    probabilities elsewhere (the refinement leaves 0 there)."""
    return torch.where(scores.sum(dim=0, keepdim=True) > 0, scores, probs)


def window_maps(items: Sequence[tuple[torch.Tensor, tuple[int, int, int, int]]],
                pad: tuple[int, int, int, int]) -> torch.Tensor:
    """``(B, Hc', Wc')`` the windows' crops of their images' resized instance maps, padded like the
    windows (:func:`resclip.corrclip.window_regions`); ``items``: ``(map, box)`` per window."""
    from .corrclip import window_regions

    return torch.stack([window_regions(m, box, pad) for m, box in items])


def pad_windows(crops: torch.Tensor, pad: tuple[int, int, int, int]) -> torch.Tensor:
    """``(B, 3, Hc, Wc)`` windows zero-padded by ``pad`` = ``(left, right, top, bottom)``
    (:func:`resclip.preprocess.window_padding`); the windows themselves when there is none."""
    return F.pad(crops, pad) if any(pad) else crops


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
        image: the ``(H, W, 3)`` uint8 RGB image that was segmented (for :meth:`overlay`), or None.
        classes: the parsed classes (synonyms included), or None.
        settings: the segmenter's settings (``SegmenterConfig.to_dict()``), recorded by :meth:`save`.
    """

    def __init__(
        self, mask: np.ndarray, class_names: list[str], logits: np.ndarray | None,
        full: FullResolution | FixedMaps,
        *, image: np.ndarray | None = None, classes: ClassSpec | None = None,
        settings: dict[str, Any] | None = None,
    ):
        self.mask = mask
        self.class_names = class_names
        self._logits = logits
        self.full = full
        self.image = image
        self.classes = classes
        self.settings = settings
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

    # ---- other forms of the result (resclip.results)
    def class_masks(self) -> np.ndarray:
        """``(C, H, W)`` boolean mask of each class."""
        from .results import class_masks

        return class_masks(self.mask, len(self.class_names))

    def rle(self) -> list[dict[str, Any]]:
        """Each class's mask as COCO compressed RLE (``{"size": [H, W], "counts": str}``), as
        ``pycocotools.mask.encode`` writes it."""
        from .results import rle_encode

        return [rle_encode(self.mask == i) for i in range(len(self.class_names))]

    def confidence(self) -> np.ndarray:
        """``(H, W)`` float32 probability of each pixel's class (computed band by band)."""
        from .results import confidence

        return confidence(self.full)

    def with_unknown(self, threshold: float) -> np.ndarray:
        """The mask with label ``C`` ("unknown") where the class probability is below ``threshold``."""
        from .results import with_unknown

        return with_unknown(self.mask, self.confidence(), threshold, len(self.class_names))

    def overlay(self, alpha: float = 0.5, palette: str = "classes", legend: bool = True) -> Any:
        """The image with the class colours blended over it (a PIL image), with a legend of the
        classes present to its right unless ``legend=False``.

        Raises:
            ValueError: the result does not hold its image (made without :meth:`Segmenter.predict`).
        """
        from PIL import Image

        from . import viz
        from .palettes import class_palette

        if self.image is None:
            raise ValueError("this result does not hold its image; pass it to resclip.viz.overlay instead")
        colours = class_palette(self.class_names, palette)
        if legend:
            return viz.overlay_with_legend(self.image, self.mask, self.class_names, alpha, colours)
        return Image.fromarray(viz.overlay(self.image, self.mask, alpha, colours))

    def save(self, folder: str | Any, stem: str = "image", *, palette: str = "classes", alpha: float = 0.5,
             rle: bool = False, unknown: float | None = None, save_probs: bool = False) -> list[Any]:
        """Write ``<stem>_mask.png``, ``<stem>_overlay.png`` and ``<stem>.json`` (and
        ``<stem>_probs.npz`` with ``save_probs``) into ``folder`` (created if missing), exactly as
        ``resclip segment`` writes them (:func:`resclip.results.output_files`), all or none.

        Returns:
            The paths written.

        Raises:
            resclip.fileio.OutputError: a file could not be written (none is left behind).
        """
        from pathlib import Path

        from .fileio import atomic_write_all
        from .results import OutputOptions, output_files

        out = Path(folder).expanduser()
        out.mkdir(parents=True, exist_ok=True)
        opts = OutputOptions(palette=palette, alpha=alpha, rle=rle, unknown=unknown, save_probs=save_probs)
        files = output_files(self, out, stem, opts)
        atomic_write_all(files)
        return [path for path, _ in files]

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
    aux: tuple[tuple[str, str], ...] = ()  # (kind, source) of the auxiliary models, sorted
    method_fields: tuple[tuple[str, Any], ...] = ()  # the method's own fields set by the caller, sorted

    def __post_init__(self) -> None:
        # a protocol with its own image pipeline: (method it needs, what it is, what RCS / SFR lack there)
        pipeline = (("trident", "Trident's whole-image pipeline", "per-window attention")
                    if self.protocol.trident is not None else
                    ("cliper", "CLIPer's own all-layer pipeline", "last block")
                    if self.protocol.cliper is not None else None)
        if pipeline is None:
            return
        method, what, lacking = pipeline
        if self.method != method:
            raise ValueError(f"preset {self.preset!r} runs {what}, which needs method={method!r}; for "
                             f"{self.method} use a window preset (default, voc21, sclip/<dataset>...)")
        if self.rcs is not None or self.sfr is not None:
            raise ValueError(
                f"preset {self.preset!r} runs {what}, where RCS and SFR have no {lacking} to act on: use "
                f"rcs=False, sfr=False (--no-rcs --no-sfr), or {method} under a window preset (e.g. "
                "preset='default') to combine it with them")

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
        self._background: dict[tuple[str, ...], torch.Tensor] = {}  # CLIPer's background words

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
                self.model, self.tokenizer, spec, fingerprint=self.fingerprint, cache=self.text_cache,
                templates=self.templates,
            )
            ensure_finite(
                emb,
                "the text encoder's query embeddings",
                "the checkpoint's text weights are probably broken (e.g. scaled out of range); check the "
                "file given as pretrained=",
            )
        return spec, emb.to(self.device, torch.float32)

    @property
    def templates(self) -> tuple[str, ...]:
        """The prompt templates of the text queries (the 80 ImageNet ones unless the protocol says)."""
        cliper = self.protocol.cliper
        return CLIPER_TEMPLATES if cliper is not None and cliper.templates == "cliper" else TEMPLATES

    def release_text_tower(self) -> None:
        """Free the CLIP text tower: the visual tower is all that prediction needs.

        The text tower is about a quarter of a CLIP ViT's weights (ViT-L/14: 123 M parameters,
        470 MiB in fp32). Afterwards a class list must come with ``embeddings=`` or have all its
        queries in the text cache (lists encoded before the release are there unless the
        segmenter was created with ``text_cache=False``); otherwise :meth:`encode_classes` raises.
        ``resclip segment``, ``eval``, ``reproduce`` and ``sweep`` release it once their classes
        are encoded.
        """
        cliper = self.protocol.cliper
        if cliper is not None and not cliper.background and self.model is not None:
            self.background_embeddings(cliper.background_words)  # CLIPer's pipeline needs them later
        self.model = None
        gc.collect()
        _trim_heap()

    @property
    def text_tower_released(self) -> bool:
        """True after :meth:`release_text_tower`."""
        return self.model is None

    # ------------------------------------------------------------------ image
    @property
    def reads_regions(self) -> bool:
        """True when :meth:`predict` uses an instance map (``regions=``): the method reads regions
        (CorrCLIP) or the protocol votes with them (``region_vote``)."""
        return bool(self.engine.method.uses_regions or self.protocol.region_vote)

    def check_size(self, size: tuple[int, int]) -> None:
        """Reject an image that stays thinner than one patch after resizing.

        Raises:
            ValueError: naming the image size, the resized size and the patch size.
        """
        h, w = size
        patch = self.engine.patch
        if self.protocol.cliper is not None:
            nh, nw = cliper_shape(h, w, self.protocol.cliper.short_side, patch)
            if min(nh, nw) < patch:
                raise ValueError(
                    f"image is {w}x{h} pixels: too thin to segment (CLIPer resizes it to {nw}x{nh}, under "
                    f"one {patch}-pixel patch); crop or pad it to a less extreme aspect ratio")
            return
        nh, nw = rescale_size(h, w, self.protocol.short_side, self.protocol.long_side)
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

    def image_logits(self, x: torch.Tensor, text: torch.Tensor, query_to_class: torch.Tensor,
                     regions: torch.Tensor | None = None) -> torch.Tensor:
        """Window-averaged query logits at the resized resolution.

        Args:
            x: ``(1, 3, h1, w1)`` normalised image.
            text: ``(Q, D)`` query embeddings.
            query_to_class: ``(Q,)`` int64.
            regions: ``(h1, w1)`` int64 instance map of the resized image, for a method that reads
                one (``uses_regions``: CorrCLIP), else None.

        Returns:
            ``(Q, h1, w1)`` float32.
        """
        maps = None if regions is None else [regions]
        return self.batch_image_logits([x], text, query_to_class, self.window_batch, regions=maps)[0]

    def batch_image_logits(
        self, xs: Sequence[torch.Tensor], text: torch.Tensor, query_to_class: torch.Tensor,
        window_batch: int, regions: Sequence[torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """:meth:`image_logits` of several images, their equally sized windows batched together
        (``window_batch`` per engine call; windows of one image stay in their order); ``regions``:
        one resized instance map per image (see :meth:`image_logits`), or None.

        Returns:
            One ``(Q, h1, w1)`` float32 map per image of ``xs`` (each ``(1, 3, h1, w1)``).
        """
        p = self.protocol
        accs = [torch.zeros(text.shape[0], x.shape[-2], x.shape[-1], device=x.device) for x in xs]
        counts = [torch.zeros(1, x.shape[-2], x.shape[-1], device=x.device) for x in xs]
        by_size: dict[tuple[int, int], list[tuple[int, tuple[int, int, int, int]]]] = {}
        for i, x in enumerate(xs):
            for box in window_coords(x.shape[-2], x.shape[-1], p.slide_crop, p.slide_stride):
                by_size.setdefault((box[2] - box[0], box[3] - box[1]), []).append((i, box))
        for size, items in by_size.items():
            pad = window_padding(*size, p.window_multiple)
            for start in range(0, len(items), window_batch):
                chunk = items[start : start + window_batch]
                crops = torch.cat([xs[i][:, :, y1:y2, x1:x2] for i, (y1, x1, y2, x2) in chunk])
                maps = None if regions is None else window_maps([(regions[i], box) for i, box in chunk], pad)
                logits = self.engine.window_logits(pad_windows(crops, pad), text, query_to_class,
                                                   regions=maps)
                logits = ensure_finite(logits, "the image encoder's patch logits")
                up = upsample_window(logits, size, pad)
                for (i, (y1, x1, y2, x2)), win in zip(chunk, up, strict=True):
                    accs[i][:, y1:y2, x1:x2] += win
                    counts[i][:, y1:y2, x1:x2] += 1
        return [ensure_finite(acc.div_(count), "the sliding-window averaged logits")
                for acc, count in zip(accs, counts, strict=True)]

    def _windows(
        self, x: torch.Tensor, text: torch.Tensor, query_to_class: torch.Tensor,
        regions: torch.Tensor | None = None,
    ) -> Iterator[tuple[list[tuple[int, int, int, int]], torch.Tensor]]:
        """``(boxes, (B, Q, h, w) patch logits)`` of every batch of sliding windows, in order."""
        _, _, h1, w1 = x.shape
        p = self.protocol
        boxes = window_coords(h1, w1, p.slide_crop, p.slide_stride)
        pad = window_padding(*logits_size(boxes), p.window_multiple)
        for start in range(0, len(boxes), self.window_batch):
            chunk = boxes[start : start + self.window_batch]
            crops = torch.cat([x[:, :, y1:y2, x1:x2] for y1, x1, y2, x2 in chunk])
            maps = None if regions is None else window_maps([(regions, box) for box in chunk], pad)
            logits = self.engine.window_logits(pad_windows(crops, pad), text, query_to_class, regions=maps)
            yield chunk, ensure_finite(logits, "the image encoder's patch logits")

    def window_logits(
        self, x: torch.Tensor, text: torch.Tensor, query_to_class: torch.Tensor,
        regions: torch.Tensor | None = None,
    ) -> WindowLogits:
        """The windows' patch logits, from which :class:`WindowLogits` rebuilds any rows of
        :meth:`image_logits` for any queries (memory: the patch grids, not the resized map)."""
        _, _, h1, w1 = x.shape
        p = self.protocol
        pad = window_padding(*logits_size(window_coords(h1, w1, p.slide_crop, p.slide_stride)),
                             p.window_multiple)
        return WindowLogits(h1, w1, list(self._windows(x, text, query_to_class, regions)), pad=pad)

    @torch.inference_mode()
    def predict(
        self,
        image: ImageInput,
        classes: Sequence[str] | str,
        embeddings: torch.Tensor | np.ndarray | None = None,
        regions: torch.Tensor | np.ndarray | None = None,
    ) -> SegResult:
        """Segment one image by the given class names.

        Args:
            image: a path, a PIL image or an ``(H, W, 3)`` uint8 RGB array.
            classes: class lines (synonyms separated by ``", "``), e.g.
                ``["sky, wall, tree", "cat", "person, man, woman"]``; class 0 is the background
                class when the protocol's ``prob_thd`` is used.
            embeddings: optional precomputed ``(Q, D)`` query embeddings.
            regions: an ``(H, W)`` integer instance map of the image (class-agnostic regions, e.g.
                from your own mask generator) for a method that reads one (CorrCLIP) or the
                protocol's ``region_vote``; None: made with the auxiliary SAM 2 when needed.

        Returns:
            A :class:`SegResult` at the original image size.

        Raises:
            ValueError: ``regions`` for a segmenter that reads none (:attr:`reads_regions`), or not of
                the image's size.
        """
        if regions is not None and not self.reads_regions:
            from .regions import RegionsError, unused_message

            raise RegionsError(unused_message(self.config.method))
        rgb = load_image(image)
        self.check_size(rgb.shape[:2])
        spec, text = self.encode_classes(classes, embeddings)
        if self.protocol.cliper is not None:
            return self._cliper_result(rgb, spec, text)
        if self.protocol.trident is not None:
            return self._trident_result(rgb, spec, text)
        q2c = torch.tensor(spec.query_to_class, dtype=torch.int64, device=self.device)
        x = self.resized_input(rgb)
        inst = self.instance_map(rgb, regions)
        small = self._resized_regions(inst, x)
        if text.shape[0] > QUERY_BLOCK and text.shape[0] * x.shape[-2] * x.shape[-1] > self.logits_budget:
            # many classes: keep the windows' patch logits, process the queries in groups
            if self.protocol.tlp is not None:
                raise ValueError(
                    f"tlp couples all {text.shape[0]} queries over the whole image, but they exceed the "
                    "memory budget for the whole logit map (classes would be processed in groups); use fewer "
                    "classes, a smaller short_side or tlp=None"
                )
            full = self.full_resolution(self.window_logits(x, text, q2c, small), x, q2c, rgb.shape[:2])
            return self._result(rgb, spec, full, None, inst)
        logits = self.image_logits(x, text, q2c, small)
        full = self.full_resolution(logits, x, q2c, rgb.shape[:2], text)
        return self._result(rgb, spec, full, logits, inst)

    def instance_map(self, rgb: np.ndarray, regions: torch.Tensor | np.ndarray | None = None
                     ) -> torch.Tensor | None:
        """The ``(H, W)`` int64 instance map of an image when the method reads one (CorrCLIP) or the
        protocol votes (``region_vote``): ``regions`` if given, else the method's own (SAM 2 with its
        generator settings), else SAM 2's automatic masks with CorrCLIP's settings; None otherwise.

        Raises:
            ValueError: ``regions`` not of the image's size; no ``sam`` auxiliary model to make them.
        """
        method = self.engine.method
        if not self.reads_regions:
            return None
        h, w = rgb.shape[:2]
        if regions is not None:
            inst = torch.as_tensor(np.asarray(regions) if not isinstance(regions, torch.Tensor) else regions)
            if inst.dim() != 2 or tuple(inst.shape) != (h, w) or inst.is_floating_point():
                from .regions import RegionsError

                raise RegionsError(f"regions must be an (H, W) = ({h}, {w}) integer instance map of the "
                                   f"image, got {tuple(inst.shape)} {inst.dtype}")
            return inst.long()
        if method.uses_regions:
            return method.image_regions(rgb, self.engine.aux)
        sam = self.engine.aux.get("sam")
        if sam is None:
            raise ValueError("region_vote needs each image's regions: pass regions= to predict, or a SAM 2 "
                             "model (aux_pretrained={'sam': PATH}, --aux-pretrained sam=PATH)")
        from .corrclip import MaskGeneratorConfig, generate_instance_map, sam2_mask_generator

        config = MaskGeneratorConfig().for_fidelity(self.config.fidelity)
        return generate_instance_map(sam2_mask_generator(sam, config), rgb, config.paint_order)

    def _resized_regions(self, inst: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
        """The instance map at the resized image's size (nearest) for a method that reads it."""
        if inst is None or not self.engine.method.uses_regions:
            return None
        from .corrclip import resize_instance_map

        return resize_instance_map(inst, (x.shape[-2], x.shape[-1])).to(x.device)

    def background_embeddings(self, words: Sequence[str]) -> torch.Tensor:
        """``(N, D)`` float32 embeddings of CLIPer's background ``words`` (encoded once per segmenter,
        and before :meth:`release_text_tower` frees the text tower)."""
        key = tuple(words)
        if key not in self._background:
            spec = parse_classes([", ".join(words)])
            emb = query_embeddings(self.model, self.tokenizer, spec, fingerprint=self.fingerprint,
                                   cache=self.text_cache, templates=self.templates)
            self._background[key] = emb.to(self.device, torch.float32)
        return self._background[key]

    def _cliper_result(self, rgb: np.ndarray, spec: ClassSpec, text: torch.Tensor) -> SegResult:
        """One image through CLIPer's own pipeline (``protocol.cliper``), in this segmenter's classes."""
        from .cliper_protocol import predict as cliper_predict

        cp = self.protocol.cliper
        assert cp is not None
        q2c = torch.tensor(spec.query_to_class, dtype=torch.int64, device=self.device)
        if cp.background:  # class 0's synonyms are the background words
            if spec.num_classes < 2:
                raise ValueError(
                    f"preset {self.config.preset!r} reads class 0 as CLIPer's background words and needs at "
                    "least one more class; add the classes to find after it")
            fg_rows = q2c > 0
            fg, bg, fg_to_class = text[fg_rows], text[~fg_rows], q2c[fg_rows] - 1
        else:
            fg, fg_to_class, bg = text, q2c, self.background_embeddings(cp.background_words)
        num_fg = int(fg_to_class.max()) + 1
        synonyms = fg_to_class if fg.shape[0] != num_fg else None
        out = cliper_predict(self.engine.visual, self.engine.method, rgb, fg, bg, cp,  # type: ignore[arg-type]
                             fg_to_class=synonyms)
        labels = torch.from_numpy(out.labels)
        cam = out.cam.float()
        if cam.shape[0] == num_fg + 1:  # the release's (1 - max)^2 background competes
            background, cam = cam[:1], cam[1:]
        else:  # thresholded maps: background where every kept map is 0
            background = (labels == 0).to(cam)[None]
        seg = out.patch.seg.float()
        if cp.background:
            scores = torch.cat([background, cam])
            patch_maps = torch.cat([torch.zeros_like(seg[:1]), seg])
        else:  # no background class: a pixel left to the background gets none (255)
            labels = torch.where(labels == 0, 255, labels - 1)
            scores, patch_maps = cam, seg
        full = FixedMaps(scores, labels, patch_maps)
        return SegResult(mask=full.mask(), class_names=list(spec.names), logits=patch_maps.cpu().numpy(),
                         full=full, image=rgb, classes=spec, settings=self.config.to_dict())

    def _trident_result(self, rgb: np.ndarray, spec: ClassSpec, text: torch.Tensor) -> SegResult:
        """One image through Trident's whole-image pipeline (``protocol.trident``), SAM refinement
        included when ``protocol.sam_refine`` is set."""
        from .trident import predict as trident_predict

        p = self.protocol
        q2c = torch.tensor(spec.query_to_class, dtype=torch.int64, device=self.device)
        aux = self.engine.aux
        method: Any = self.engine.method  # a Trident (SegmenterConfig checks it)
        out = trident_predict(self.engine.visual, aux["dino"], aux["sam"], method, self.resized_input(rgb),
                              rgb, text, q2c, crop=p.slide_crop, stride=p.slide_stride,
                              logit_scale=p.logit_scale, prob_thd=p.prob_thd, protocol=p.trident,
                              refine=p.sam_refine, explicit=self.engine.explicit)
        full = FixedMaps(refined_scores(out.scores, out.probs), out.labels, out.patch_logits)
        return SegResult(mask=full.mask(), class_names=list(spec.names),
                         logits=out.patch_logits.cpu().numpy(), full=full, image=rgb, classes=spec,
                         settings=self.config.to_dict())

    def _sam_refined(self, rgb: np.ndarray, full: FullResolution) -> FixedMaps:
        """``protocol.sam_refine`` after a window protocol: the final mask and class probabilities
        refined with SAM prompts (the whole ``(C, H, W)`` map at once)."""
        from .trident import TridentProtocol, encode_sam, sam_refine, sam_source

        config = self.protocol.sam_refine
        assert config is not None
        sam = self.engine.aux.get("sam")
        if sam is None:
            raise ValueError("sam_refine refines masks with SAM: pass aux_pretrained={'sam': PATH} "
                             "(--aux-pretrained sam=PATH), or sam_refine=None")
        probs = full.class_prob_rows(0, full.size[0]).float()
        mask = torch.from_numpy(full.mask().astype(np.int64)).to(probs.device)
        image = encode_sam(sam, sam_source(rgb, TridentProtocol().sam_stride))
        labels, scores = sam_refine(mask, probs, sam, image, config)
        return FixedMaps(refined_scores(scores, probs), labels, full.resized_logits())

    def _result(self, rgb: np.ndarray, spec: ClassSpec, full: FullResolution,
                logits: torch.Tensor | None, inst: torch.Tensor | None = None) -> SegResult:
        """The :class:`SegResult` of one image (``logits`` None: rebuilt from ``full`` on access), after
        the protocol's SAM refinement and region vote (``inst``: the image's instance map)."""
        final: FullResolution | FixedMaps = full
        if self.protocol.sam_refine is not None:
            final = self._sam_refined(rgb, full)
        mask = final.mask()
        if self.protocol.region_vote:
            from .corrclip import vote

            assert inst is not None  # made by instance_map() when region_vote is on
            mask = vote(torch.from_numpy(mask.astype(np.int64)), inst.cpu()).numpy().astype(mask.dtype)
        return SegResult(mask=mask, class_names=list(spec.names),
                         logits=None if logits is None else logits.cpu().numpy(), full=final, image=rgb,
                         classes=spec, settings=self.config.to_dict())

    @torch.inference_mode()
    def predict_batch(
        self,
        images: Sequence[ImageInput],
        classes: Sequence[str] | str,
        embeddings: torch.Tensor | np.ndarray | None = None,
        regions: Sequence[torch.Tensor | np.ndarray] | None = None,
    ) -> list[SegResult]:
        """Segment several images by the same class names: the classes are parsed and encoded
        once, and equally sized sliding windows of different images go through the network in
        the same batches (``window_batch`` windows per call), which keeps a GPU busy with many
        small images. The results equal one :meth:`predict` per image up to float rounding of
        the batched products (and exactly where a window keeps its batch).

        Args:
            images: paths, PIL images, uint8 numpy arrays or torch tensors (``(H, W, 3)``,
                ``(3, H, W)``, RGBA composited on white, grayscale), in any mix.
            classes: as for :meth:`predict`.
            embeddings: optional precomputed ``(Q, D)`` query embeddings.
            regions: one ``(H, W)`` instance map per image, as :meth:`predict`'s ``regions``.

        Raises:
            ValueError: naming the index of the first image that cannot be segmented; ``regions``
                not one per image, or given to a segmenter that reads none.
        """
        if regions is not None:
            from .regions import RegionsError, unused_message

            if not self.reads_regions:
                raise RegionsError(unused_message(self.config.method))
            if len(regions) != len(images):
                raise RegionsError(f"regions= holds {len(regions)} maps for {len(images)} images; give one "
                                   "per image")
        spec, text = self.encode_classes(classes, embeddings)
        if self.protocol.cliper is not None or self.protocol.trident is not None:  # one image at a time
            return [self.predict(image, spec, embeddings=text) for image in images]  # type: ignore[arg-type]
        rgbs, xs = [], []
        for i, image in enumerate(images):
            try:
                rgb = load_image(image)
                self.check_size(rgb.shape[:2])
            except (ValueError, TypeError, FileNotFoundError) as err:
                raise type(err)(f"images[{i}]: {err}") from err
            rgbs.append(rgb)
            xs.append(self.resized_input(rgb))
        grouped = text.shape[0] > QUERY_BLOCK and any(
            text.shape[0] * x.shape[-2] * x.shape[-1] > self.logits_budget for x in xs)
        given: list[Any] = list(regions) if regions is not None else [None] * len(rgbs)
        if grouped:  # many classes: one image at a time, queries in groups (see predict)
            return [self.predict(rgb, spec, embeddings=text, regions=m)  # type: ignore[arg-type]
                    for rgb, m in zip(rgbs, given, strict=True)]
        q2c = torch.tensor(spec.query_to_class, dtype=torch.int64, device=self.device)
        insts = []
        for i, (rgb, m) in enumerate(zip(rgbs, given, strict=True)):
            try:
                insts.append(self.instance_map(rgb, m))
            except ValueError as err:
                raise type(err)(f"images[{i}]: {err}") from None
        small = [self._resized_regions(inst, x) for inst, x in zip(insts, xs, strict=True)]
        maps = None if any(m is None for m in small) else small
        all_logits = self.batch_image_logits(xs, text, q2c, window_batch=self.window_batch,
                                             regions=maps)  # type: ignore[arg-type]
        return [self._result(rgb, spec, self.full_resolution(logits, x, q2c, rgb.shape[:2], text), logits,
                             inst) for rgb, x, logits, inst in zip(rgbs, xs, all_logits, insts, strict=True)]

    def full_resolution(
        self,
        logits: torch.Tensor | WindowLogits,
        x: torch.Tensor,
        query_to_class: torch.Tensor,
        size: tuple[int, int],
        text: torch.Tensor | None = None,
    ) -> FullResolution:
        """Band-wise upsampling (+ PAMR and TLP if the protocol asks) and post-processing of ``logits``.

        Args:
            logits: ``(Q, h1, w1)`` window-averaged logits, or the :class:`WindowLogits` to rebuild
                them from; x: ``(1, 3, h1, w1)`` the resized input.
            size: the original ``(H, W)``.
            text: ``(Q, D)`` query embeddings (TLP's query affinity); needed only with ``protocol.tlp``.
        """
        refine = self.protocol.pamr_steps > 0 or self.protocol.tlp is not None
        return FullResolution(
            logits.float() if isinstance(logits, torch.Tensor) else logits,
            x if refine else None,
            query_to_class,
            self.protocol,
            size,
            budget=self.band_budget,
            text=text if self.protocol.tlp is not None else None,
        )

    # ------------------------------------------------------------------ variants
    def with_method(self, method: str, *, rcs: bool | None = None, sfr: bool | None = None,
                    fields: dict[str, Any] | None = None) -> Segmenter:
        """This segmenter with another base method or module choice (and that method's own
        ``fields``), sharing its CLIP weights and text cache (see :func:`resclip.factory.with_method`),
        e.g. ``seg.with_method("sclip", sfr=False)``."""
        from .factory import with_method  # the factory builds engines; it imports this module

        return with_method(self, method, rcs=rcs, sfr=sfr, fields=fields)
