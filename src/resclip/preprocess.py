"""Image loading, benchmark-exact resizing, normalisation and sliding windows."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

CLIP_MEAN = (122.771, 116.746, 104.094)
CLIP_STD = (68.501, 66.632, 70.323)

ImageInput = str | os.PathLike | Image.Image | np.ndarray | torch.Tensor

# Largest image (in pixels) read from a file. Pillow's own guard against decompression bombs stops
# at about 179 megapixels, below the 20,000-pixel panoramas users segment; outputs are computed in
# bands, so a gigapixel is affordable. Raise it (or set None) for larger files.
MAX_PIXELS: int | None = 1_000_000_000


def _pil_to_rgb(img: Image.Image, what: str = "image") -> np.ndarray:
    img = ImageOps.exif_transpose(img)
    if img.mode == "La":  # premultiplied alpha: Pillow converts it to LA only
        img = img.convert("LA")
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if not np.isfinite(arr).all():
            raise ValueError(
                f"{what} (mode {img.mode}) contains NaN or inf pixel values; expected finite values"
            )
        top = arr.max() if arr.size else 0.0
        if top < 0:
            raise ValueError(
                f"{what} (mode {img.mode}) has only negative pixel values (largest {top:g}); it would "
                "become all black: expected intensities >= 0 (rescale it, e.g. to 0..1 or 0..255)"
            )
        arr = np.zeros_like(arr) if top <= 0 else arr / top * 255.0
        img = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def load_image(image: ImageInput) -> np.ndarray:
    """Return an ``(H, W, 3)`` uint8 RGB array.

    Accepts a path, a PIL image (any mode: 16-bit, CMYK, palette, grayscale and alpha images are
    converted; alpha is composited on white; EXIF orientation is honoured), or a uint8 numpy array
    or torch tensor: ``(H, W, 3)`` RGB, ``(3, H, W)`` (torch's layout), ``(H, W, 4)`` / ``(4, H, W)``
    RGBA (composited on white) or ``(H, W)`` grayscale.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: not an image, truncated, empty, or an array of the wrong shape or dtype.
    """
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image file not found: {str(path)!r}")
        try:
            _allow_large_images()
            with Image.open(path) as img:
                if MAX_PIXELS is not None and img.width * img.height > MAX_PIXELS:
                    raise Image.DecompressionBombError(
                        f"{img.width}x{img.height} pixels exceeds the limit of {MAX_PIXELS} pixels"
                    )
                img.load()
                return _check_size(_pil_to_rgb(img, repr(str(path))), str(path))
        except Image.DecompressionBombError as err:
            raise ValueError(
                f"image {str(path)!r} is too large to open safely ({err}); to allow it, raise "
                "resclip.preprocess.MAX_PIXELS (or set it to None)"
            ) from err
        except (UnidentifiedImageError, OSError, SyntaxError) as err:
            raise ValueError(
                f"could not read image {str(path)!r} ({err}); expected a readable, complete image file "
                "(JPEG, PNG, TIFF, BMP, WebP...)"
            ) from err
    if isinstance(image, Image.Image):
        try:
            rgb = _pil_to_rgb(image)
        except (OSError, SyntaxError) as err:  # a lazily opened file that turns out truncated or corrupt
            raise ValueError(
                f"could not decode the PIL image ({err}); expected a readable, complete image"
            ) from err
        return _check_size(rgb, "image")
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if isinstance(image, np.ndarray):
        arr = _channels_last(image)
        if arr.ndim == 3 and arr.shape[2] == 4 and arr.dtype == np.uint8:  # RGBA: composited on white
            return _check_size(_pil_to_rgb(Image.fromarray(np.ascontiguousarray(arr), "RGBA")), "image array")
        return _check_size(_array_to_rgb(arr), "image array")
    raise TypeError(
        "image must be a path, a PIL.Image, or a uint8 numpy array / torch tensor (HxWx3, 3xHxW, "
        f"RGBA or grayscale), got {type(image).__name__}"
    )


def _channels_last(arr: np.ndarray) -> np.ndarray:
    """``(C, H, W)`` arrays (C = 1, 3 or 4, as torch stores images) as ``(H, W, C)``; a single
    channel as ``(H, W)``. An array whose last axis has at most 4 entries is taken as channels-last
    (so ``(3, 3, 3)`` is HWC, and a ``(4, 4, 2)`` one is refused rather than read as CHW)."""
    if arr.ndim == 3 and arr.shape[2] > 4 and arr.shape[0] in (1, 3, 4):
        arr = arr.transpose(1, 2, 0)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    return arr


def _allow_large_images() -> None:
    """Let Pillow open files up to :data:`MAX_PIXELS` (it refuses twice its own limit).

    A process-wide side effect, on purpose and only here: the first time resclip opens an image
    file it raises ``PIL.Image.MAX_IMAGE_PIXELS`` (never lowers it; a change would race with other
    threads), since :func:`load_image` applies its own :data:`MAX_PIXELS` check to the header.
    """
    limit = MAX_PIXELS
    current = Image.MAX_IMAGE_PIXELS
    if limit is None:
        Image.MAX_IMAGE_PIXELS = None
    elif current is not None and current * 2 < limit:
        Image.MAX_IMAGE_PIXELS = limit // 2 + 1


def _array_to_rgb(arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"image array must have shape (H, W, 3) (RGB; (3, H, W), RGBA and (H, W) grayscale "
                         f"are taken too), got {arr.shape}")
    if arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.number):
            raise ValueError(f"image array must be uint8 RGB, got dtype {arr.dtype}")
        if not np.isfinite(arr).all():
            raise ValueError("image array contains NaN or inf; expected uint8 RGB values 0..255")
        raise ValueError(
            f"image array must be uint8 RGB (0..255), got dtype {arr.dtype}; "
            "convert with np.clip(x, 0, 255).astype(np.uint8)"
        )
    return np.ascontiguousarray(arr)


def _check_size(arr: np.ndarray, what: str) -> np.ndarray:
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{what} is empty (size {arr.shape[1]}x{arr.shape[0]})")
    return arr


def rescale_size(h: int, w: int, short_side: int, long_cap: int = 2048) -> tuple[int, int]:
    """Size after mmcv's keep-ratio rescale to ``(long_cap, short_side)``.

    ``f = min(long_cap / long, short_side / short)``; new size ``int(x * f + 0.5)``.
    Small images are scaled up.

    Returns:
        ``(new_h, new_w)``, each at least 1.
    """
    f = min(long_cap / max(h, w), short_side / min(h, w))
    return max(1, int(h * f + 0.5)), max(1, int(w * f + 0.5))


def resize_image(rgb: np.ndarray, short_side: int, long_cap: int = 2048) -> np.ndarray:
    """Bilinear resize of a uint8 image exactly as the benchmark pipeline (OpenCV, no antialias)."""
    h, w = rgb.shape[:2]
    nh, nw = rescale_size(h, w, short_side, long_cap)
    if (nh, nw) == (h, w):
        return rgb
    return cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_LINEAR)


def normalise(rgb: np.ndarray) -> torch.Tensor:
    """``(H, W, 3)`` uint8 RGB -> ``(1, 3, H, W)`` float32 with CLIP mean/std (x255)."""
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float()
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return ((x - mean) / std).unsqueeze(0)


def window_padding(h: int, w: int, multiple: int) -> tuple[int, int, int, int]:
    """Centred zero padding ``(left, right, top, bottom)`` that makes an ``h x w`` window a multiple of
    ``multiple`` pixels on both sides (the smaller half left / top); no padding for ``multiple <= 1``
    or a window that already is (ProxyCLIP's and CorrCLIP's releases pad to multiples of 56)."""
    if multiple <= 1:
        return 0, 0, 0, 0
    dw, dh = -w % multiple, -h % multiple
    return dw // 2, dw - dw // 2, dh // 2, dh - dh // 2


def window_coords(h: int, w: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """Sliding-window boxes ``(y1, x1, y2, x2)`` in processing order (row-major).

    ``crop == 0`` means one window over the whole image. The last row/column of windows is
    snapped to the border; an image smaller than the crop is covered by one unpadded window in
    that dimension, so every window has the same size.
    """
    if crop <= 0:
        return [(0, 0, h, w)]
    n_rows = max(h - crop + stride - 1, 0) // stride + 1
    n_cols = max(w - crop + stride - 1, 0) // stride + 1
    boxes = []
    for i in range(n_rows):
        for j in range(n_cols):
            y2 = min(i * stride + crop, h)
            x2 = min(j * stride + crop, w)
            boxes.append((max(y2 - crop, 0), max(x2 - crop, 0), y2, x2))
    return boxes
