"""SAM and SAM 2 through Meta's packages: the mask source of the methods that pair CLIP with Segment
Anything (issue 13).

:func:`load_sam` reads a local checkpoint in either release format and tells them apart by their keys:

* SAM (v1), package ``segment-anything``: the plain state dict of ``sam_vit_{b,h,l}_*.pth``
  (``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*``);
* SAM 2 / 2.1, package ``sam2``: ``{"model": state_dict}`` of ``sam2_hiera_*.pt`` /
  ``sam2.1_hiera_*.pt`` (``image_encoder.trunk.*``, ``sam_mask_decoder.*``, memory modules).

Files are read as tensors only (``torch.load(weights_only=True)``), never by running code. The
architecture is read from the tensor shapes (:func:`sam_architecture`, :func:`sam2_architecture`):
for SAM the encoder width, depth, heads (from the relative-position tables), window and global
blocks, the decoder sizes; for SAM 2 the Hiera width and blocks per stage, the neck / memory widths,
while what shapes cannot tell (Hiera heads, global-attention blocks, windows; the model flags) comes
from the ``sam2`` package's own config of the same layout (hiera t / s / b+ / l, SAM 2.0 or 2.1), or
from ``config=`` (a yaml in the ``sam2`` config format) for other layouts. Modules are built from
the packages' classes and loaded strictly.

The result, :class:`SamModel`, holds Meta's model (``.model``), encodes an image once
(:meth:`SamModel.image_embedding`, an LRU keyed by the image's content digest, shared by every
predictor and mask generator it hands out) and gives Meta's predictor / automatic mask generator
wired to that cache.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os
import re
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .checkpoints import _brief, read_weights_file
from .clip import resolve_device, resolve_precision

__all__ = [
    "SAM2_LAYOUTS",
    "SAM_SIZES",
    "Sam2Arch",
    "SamArch",
    "SamEmbedding",
    "SamModel",
    "build_sam",
    "build_sam2",
    "image_digest",
    "load_sam",
    "load_sam2",
    "sam2_architecture",
    "sam_architecture",
]

_PIP = 'pip install "resclip[sam]"'
_PACKAGES = {"sam": ("segment_anything", "segment-anything"), "sam2": ("sam2", "sam2")}
_NESTS = ("model", "state_dict")

#: SAM (v1) release encoders: name -> (width, depth, heads, global-attention blocks)
SAM_SIZES: dict[str, tuple[int, int, int, tuple[int, ...]]] = {
    "vit_b": (768, 12, 12, (2, 5, 8, 11)),
    "vit_l": (1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": (1280, 32, 16, (7, 15, 23, 31)),
}
#: SAM 2 Hiera layouts (blocks per stage) -> the size name of the ``sam2`` package configs
SAM2_LAYOUTS: dict[tuple[int, ...], str] = {(1, 2, 7, 2): "t", (1, 2, 11, 2): "s", (2, 3, 16, 3): "b+",
                                            (2, 6, 36, 4): "l"}
_SAM2_WIDTHS = {"t": 96, "s": 96, "b+": 112, "l": 144}
_DECODER_HEADS = 8  # SAM's two-way transformer: 8 heads in every release (not visible in the shapes)


# ----------------------------------------------------------------------------------------- reading


@contextlib.contextmanager
def _quiet_sam2() -> Iterator[None]:
    """sam2's transforms call ``torch.jit.script``, which this torch deprecates with a warning on
    every predictor a user never asked about: silenced here, nothing else."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.* is deprecated")
        yield


def _import(kind: str) -> Any:
    """Meta's package for ``kind`` ("sam" / "sam2").

    Raises:
        ImportError: one line naming the package and the pip extra.
    """
    module, dist = _PACKAGES[kind]
    what = "SAM" if kind == "sam" else "SAM 2"
    try:
        return __import__(module)
    except ImportError:
        raise ImportError(f"loading a {what} checkpoint needs the {dist} package: {_PIP}") from None


def _read(path: Path) -> Mapping[str, Any]:
    """A SAM / SAM 2 checkpoint's content (see :func:`resclip.checkpoints.read_weights_file`)."""
    return read_weights_file(path, "SAM", "Meta's sam_vit_*.pth or sam2*_hiera_*.pt")


def _state_and_kind(obj: Mapping[str, Any], path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors of a SAM / SAM 2 checkpoint (unnested, without ``module.``) and its kind."""
    for key in _NESTS:
        inner = obj.get(key)
        if isinstance(inner, Mapping) and inner:
            obj = inner
            break
    state = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    if any(k.startswith("image_encoder.trunk.") for k in state) and any(k.startswith("sam_mask_decoder.")
                                                                         for k in state):
        return state, "sam2"
    if any(k.startswith("image_encoder.blocks.") for k in state) and any(k.startswith("mask_decoder.")
                                                                          for k in state):
        return state, "sam"
    sample = sorted(state)[:4]
    raise ValueError(f"{str(path)!r} is not a SAM or SAM 2 checkpoint (no image_encoder.* with "
                     f"mask_decoder.* or sam_mask_decoder.* weights; keys start with {sample}); expected "
                     "Meta's sam_vit_*.pth or sam2*_hiera_*.pt")


def _count(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    """How many numbered children ``prefix.N.`` the state dict has."""
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    found = {int(m.group(1)) for k in state if (m := pattern.match(k))}
    return 1 + max(found) if found else 0


def _shape(state: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in state:
        raise ValueError(f"a SAM state dict needs {key!r}, which is missing")
    return tuple(int(n) for n in state[key].shape)


# -------------------------------------------------------------------------------------- SAM (v1)


@dataclass(frozen=True)
class SamArch:
    """SAM (v1) dimensions, read from a state dict by :func:`sam_architecture`."""

    name: str | None  #: "vit_b" / "vit_l" / "vit_h", None for other sizes
    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    window_size: int
    img_size: int
    patch_size: int
    mlp_ratio: float
    qkv_bias: bool
    use_rel_pos: bool
    out_chans: int
    prompt_embed_dim: int
    mask_in_chans: int
    decoder_depth: int
    decoder_mlp_dim: int
    decoder_heads: int
    attention_downsample_rate: int
    iou_head_depth: int
    iou_head_hidden_dim: int
    num_multimask_outputs: int


def sam_architecture(state: Mapping[str, torch.Tensor]) -> SamArch:
    """SAM (v1) dimensions from a state dict's shapes.

    Heads come from the relative-position tables ``(2 * size - 1, head_dim)``; a block whose table
    spans the whole token grid attends globally, the others use the window of their table. The mask
    decoder's heads are not visible in the shapes: 8, as in every release.

    Raises:
        ValueError: a tensor the architecture needs is missing (one line naming it).
    """
    width, _, patch, _ = _shape(state, "image_encoder.patch_embed.proj.weight")
    _, grid, grid_w, _ = _shape(state, "image_encoder.pos_embed")
    if grid != grid_w:
        raise ValueError(f"SAM image encoder with a non-square position grid {grid}x{grid_w} is not "
                         "supported")
    depth = _count(state, "image_encoder.blocks")
    rel = [state.get(f"image_encoder.blocks.{i}.attn.rel_pos_h") for i in range(depth)]
    use_rel_pos = all(t is not None for t in rel)
    if use_rel_pos:
        sizes = [(int(t.shape[0]) + 1) // 2 for t in rel if t is not None]
        head_dim = int(rel[0].shape[1]) if rel[0] is not None else width
        heads = width // head_dim
        global_blocks = tuple(i for i, s in enumerate(sizes) if s == grid)
        windows = {s for s in sizes if s != grid}
        if len(windows) > 1:
            raise ValueError(f"SAM image encoder with several window sizes {sorted(windows)} is not "
                             "supported")
        window = windows.pop() if windows else 0
    else:  # no tables: the release layout by width
        known = {w: (h, g) for w, _, h, g in SAM_SIZES.values()}
        if width not in known:
            raise ValueError(f"SAM image encoder of width {width} without relative positions: its heads and "
                             "global blocks cannot be read from the shapes")
        heads, global_blocks = known[width]
        window = 14
    name = next((n for n, spec in SAM_SIZES.items() if spec == (width, depth, heads, global_blocks)), None)
    tokens = _shape(state, "mask_decoder.mask_tokens.weight")[0]
    dim = _shape(state, "mask_decoder.iou_token.weight")[1]
    cross = _shape(state, "mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj.weight")[0]
    return SamArch(
        name=name, embed_dim=width, depth=depth, num_heads=heads, global_attn_indexes=global_blocks,
        window_size=window, img_size=grid * patch, patch_size=patch,
        mlp_ratio=_shape(state, "image_encoder.blocks.0.mlp.lin1.weight")[0] / width,
        qkv_bias="image_encoder.blocks.0.attn.qkv.bias" in state, use_rel_pos=use_rel_pos,
        out_chans=_shape(state, "image_encoder.neck.0.weight")[0],
        prompt_embed_dim=_shape(state, "prompt_encoder.not_a_point_embed.weight")[1],
        mask_in_chans=_shape(state, "prompt_encoder.mask_downscaling.3.weight")[0],
        decoder_depth=_count(state, "mask_decoder.transformer.layers"),
        decoder_mlp_dim=_shape(state, "mask_decoder.transformer.layers.0.mlp.lin1.weight")[0],
        decoder_heads=_DECODER_HEADS, attention_downsample_rate=max(1, dim // max(cross, 1)),
        iou_head_depth=_count(state, "mask_decoder.iou_prediction_head.layers"),
        iou_head_hidden_dim=_shape(state, "mask_decoder.iou_prediction_head.layers.0.weight")[0],
        num_multimask_outputs=tokens - 1,
    )


def build_sam(arch: SamArch) -> nn.Module:
    """An empty ``segment_anything`` ``Sam`` with these dimensions (Meta's classes, eval mode).

    Raises:
        ImportError: ``segment-anything`` is not installed.
    """
    _import("sam")
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    grid = arch.img_size // arch.patch_size
    encoder = ImageEncoderViT(
        img_size=arch.img_size, patch_size=arch.patch_size, embed_dim=arch.embed_dim, depth=arch.depth,
        num_heads=arch.num_heads, mlp_ratio=arch.mlp_ratio, out_chans=arch.out_chans, qkv_bias=arch.qkv_bias,
        norm_layer=partial(nn.LayerNorm, eps=1e-6), use_rel_pos=arch.use_rel_pos,
        window_size=arch.window_size, global_attn_indexes=arch.global_attn_indexes)
    prompt = PromptEncoder(embed_dim=arch.prompt_embed_dim, image_embedding_size=(grid, grid),
                           input_image_size=(arch.img_size, arch.img_size), mask_in_chans=arch.mask_in_chans)
    transformer = TwoWayTransformer(depth=arch.decoder_depth, embedding_dim=arch.prompt_embed_dim,
                                    num_heads=arch.decoder_heads, mlp_dim=arch.decoder_mlp_dim,
                                    attention_downsample_rate=arch.attention_downsample_rate)
    decoder = MaskDecoder(transformer_dim=arch.prompt_embed_dim, transformer=transformer,
                          num_multimask_outputs=arch.num_multimask_outputs,
                          iou_head_depth=arch.iou_head_depth, iou_head_hidden_dim=arch.iou_head_hidden_dim)
    # ImageNet statistics in 0..255, as Meta's builders set them
    return Sam(image_encoder=encoder, prompt_encoder=prompt, mask_decoder=decoder,
               pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375]).eval()


# ----------------------------------------------------------------------------------------- SAM 2


@dataclass(frozen=True)
class Sam2Arch:
    """SAM 2 dimensions, read from a state dict by :func:`sam2_architecture`."""

    name: str | None  #: "hiera_t" / "hiera_s" / "hiera_b+" / "hiera_l" for the release widths, else None
    version: str  #: "2.0" or "2.1" (2.1 adds the spatial no-object embedding and the pointer projection)
    layout: str  #: the package config of the same block layout: "t", "s", "b+" or "l"
    embed_dim: int
    stages: tuple[int, ...]
    window_pos_embed_bkg_spatial_size: tuple[int, int]
    first_window: int
    hidden_dim: int
    backbone_channel_list: tuple[int, ...]
    mem_dim: int
    memory_layers: int
    memory_feedforward: int
    memory_kv_dim: int
    mem_in_dim: int
    mask_downsampler_dim: int
    fuser_dim: int
    fuser_layers: int
    num_maskmem: int

    @property
    def config_name(self) -> str:
        """The ``sam2`` package config of this layout and version (relative to ``sam2/``)."""
        if self.version == "2.1":
            return f"configs/sam2.1/sam2.1_hiera_{self.layout}.yaml"
        return f"configs/sam2/sam2_hiera_{self.layout}.yaml"


def sam2_architecture(state: Mapping[str, torch.Tensor]) -> Sam2Arch:
    """SAM 2 dimensions from a state dict's shapes.

    Hiera's stages start at the blocks that change the width (those with a ``proj``); the block layout
    picks the package config (:data:`SAM2_LAYOUTS`) that supplies what the shapes do not show.

    Raises:
        ValueError: a tensor the architecture needs is missing, or a block layout no package config
            has (pass ``config=`` to :func:`load_sam`).
    """
    trunk = "image_encoder.trunk"
    width = _shape(state, f"{trunk}.patch_embed.proj.weight")[0]
    depth = _count(state, f"{trunk}.blocks")
    starts = [0] + [i for i in range(1, depth) if f"{trunk}.blocks.{i}.proj.weight" in state]
    stages = tuple(b - a for a, b in zip(starts, [*starts[1:], depth], strict=True))
    layout = SAM2_LAYOUTS.get(stages)
    if layout is None:
        raise ValueError(f"SAM 2 Hiera with blocks per stage {list(stages)} matches no sam2 package config "
                         f"(known: {[list(s) for s in SAM2_LAYOUTS]}); pass config= a yaml for it")
    bkg = _shape(state, f"{trunk}.pos_embed")[2:]
    hidden = _shape(state, "image_encoder.neck.convs.0.conv.weight")[0]
    channels = tuple(_shape(state, f"image_encoder.neck.convs.{i}.conv.weight")[1]
                     for i in range(_count(state, "image_encoder.neck.convs")))
    version = "2.1" if "no_obj_embed_spatial" in state or "obj_ptr_tpos_proj.weight" in state else "2.0"
    down = "memory_encoder.mask_downsampler.encoder"
    last_conv = max(int(m.group(1)) for k, v in state.items()
                    if (m := re.match(re.escape(down) + r"\.(\d+)\.weight$", k)) and v.dim() == 4)
    name = f"hiera_{layout}" if width == _SAM2_WIDTHS[layout] and hidden == 256 else None
    return Sam2Arch(
        name=name, version=version, layout=layout, embed_dim=width, stages=stages,
        window_pos_embed_bkg_spatial_size=(bkg[0], bkg[1]),
        first_window=_shape(state, f"{trunk}.pos_embed_window")[2], hidden_dim=hidden,
        backbone_channel_list=channels, mem_dim=_shape(state, "memory_encoder.out_proj.weight")[0],
        memory_layers=_count(state, "memory_attention.layers"),
        memory_feedforward=_shape(state, "memory_attention.layers.0.linear1.weight")[0],
        memory_kv_dim=_shape(state, "memory_attention.layers.0.cross_attn_image.k_proj.weight")[1],
        mem_in_dim=_shape(state, "memory_encoder.pix_feat_proj.weight")[0],
        mask_downsampler_dim=_shape(state, f"{down}.{last_conv}.weight")[0],
        fuser_dim=_shape(state, "memory_encoder.fuser.layers.0.dwconv.weight")[0],
        fuser_layers=_count(state, "memory_encoder.fuser.layers"),
        num_maskmem=_shape(state, "maskmem_tpos_enc")[0],
    )


def _sam2_config(arch: Sam2Arch) -> Any:
    """The package config of ``arch``'s layout with the sizes of ``arch`` (an OmegaConf node)."""
    sam2 = _import("sam2")
    from omegaconf import OmegaConf

    path = Path(sam2.__file__).parent / arch.config_name
    if not path.is_file():
        raise ValueError(f"the installed sam2 package has no {arch.config_name}; reinstall it ({_PIP})")
    cfg = OmegaConf.load(path)
    model = cfg.model
    trunk, neck = model.image_encoder.trunk, model.image_encoder.neck
    trunk.embed_dim = arch.embed_dim
    trunk.window_pos_embed_bkg_spatial_size = list(arch.window_pos_embed_bkg_spatial_size)
    window_spec = list(trunk.get("window_spec", (8, 4, 14, 7)))
    if window_spec[0] != arch.first_window:
        raise ValueError(f"SAM 2 Hiera with a first-stage window of {arch.first_window} does not fit the "
                         f"package config {arch.config_name} (window {window_spec[0]}); pass config=")
    neck.d_model = arch.hidden_dim
    neck.position_encoding.num_pos_feats = arch.hidden_dim
    neck.backbone_channel_list = list(arch.backbone_channel_list)
    att = model.memory_attention
    att.d_model = att.layer.d_model = arch.hidden_dim
    att.num_layers = arch.memory_layers
    att.layer.dim_feedforward = arch.memory_feedforward
    att.layer.self_attention.embedding_dim = arch.hidden_dim
    att.layer.cross_attention.embedding_dim = arch.hidden_dim
    att.layer.cross_attention.kv_in_dim = arch.memory_kv_dim
    enc = model.memory_encoder
    enc.out_dim = arch.mem_dim
    enc.in_dim = arch.mem_in_dim
    enc.position_encoding.num_pos_feats = arch.mem_dim
    enc.mask_downsampler.embed_dim = arch.mask_downsampler_dim
    enc.fuser.layer.dim = arch.fuser_dim
    enc.fuser.num_layers = arch.fuser_layers
    model.num_maskmem = arch.num_maskmem
    return cfg


def _check_targets(node: Any, where: str) -> None:
    """Refuse a config that would build anything but the ``sam2`` package's classes."""
    from omegaconf import DictConfig, ListConfig

    if isinstance(node, DictConfig):
        target = node.get("_target_")
        if target is not None and not str(target).startswith("sam2."):
            raise ValueError(f"{where} builds {target!r}; only sam2.* classes are allowed in a SAM 2 config")
        for value in node.values():
            _check_targets(value, where)
    elif isinstance(node, ListConfig):
        for value in node:
            _check_targets(value, where)


def build_sam2(arch: Sam2Arch | None = None, *, config: str | os.PathLike[str] | None = None) -> nn.Module:
    """An empty ``sam2`` ``SAM2Base`` for ``arch`` (from the package config of its layout) or from a yaml
    ``config`` in the sam2 config format (its ``model:`` node), eval mode.

    Raises:
        ImportError: ``sam2`` is not installed.
        ValueError: neither argument, or a config naming classes outside ``sam2``.
    """
    _import("sam2")
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    if config is not None:
        where = os.fspath(config)
        try:
            cfg = OmegaConf.load(where)
        except Exception as exc:
            raise ValueError(f"could not read the SAM 2 config {where!r} ({_brief(exc)})") from None
        if "model" not in cfg:
            raise ValueError(f"the SAM 2 config {where!r} has no 'model:' node; expected a sam2 package yaml")
    elif arch is not None:
        cfg, where = _sam2_config(arch), arch.config_name
    else:
        raise ValueError("build_sam2 needs an architecture or a config")
    OmegaConf.resolve(cfg)
    _check_targets(cfg.model, where)
    net: nn.Module = instantiate(cfg.model, _recursive_=True)
    return net.eval()


# --------------------------------------------------------------------------------------- wrapper


@dataclass(frozen=True)
class SamEmbedding:
    """One image encoded by SAM / SAM 2 (tensors on the model's device; shared, treat as read-only).

    Attributes:
        image_embed: ``(1, C, 64, 64)`` image embedding (SAM: the encoder's neck output; SAM 2: the
            lowest-resolution FPN level with the no-memory embedding added, as Meta's predictor keeps it).
        high_res_feats: SAM 2's finer levels ``(1, C/8, 256, 256)``, ``(1, C/4, 128, 128)``; empty for SAM.
        original_size: the image's ``(H, W)``.
        input_size: the resized image's ``(h, w)`` before padding (SAM: long side 1024; SAM 2: 1024x1024).
    """

    image_embed: torch.Tensor
    high_res_feats: tuple[torch.Tensor, ...]
    original_size: tuple[int, int]
    input_size: tuple[int, int]


def image_digest(rgb: np.ndarray) -> str:
    """sha256 of an image's shape, dtype and pixels (the embedding cache's key)."""
    data = np.ascontiguousarray(rgb)
    h = hashlib.sha256(f"{data.shape}|{data.dtype}".encode())
    h.update(data.tobytes())
    return h.hexdigest()


def _as_rgb(image: Any) -> np.ndarray:
    """An ``(H, W, 3)`` uint8 array from a numpy array, a uint8 torch tensor or a PIL image.

    Raises:
        ValueError: anything else (one line naming the shape / dtype).
    """
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    elif not isinstance(image, np.ndarray) and hasattr(image, "convert"):  # PIL
        image = np.asarray(image.convert("RGB"))
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        desc = (f"{tuple(image.shape)} {image.dtype}" if isinstance(image, np.ndarray)
                else type(image).__name__)
        raise ValueError(f"SAM takes an (H, W, 3) uint8 RGB image, got {desc}; convert it with "
                         "np.asarray(pil_image.convert('RGB'))")
    if min(image.shape[:2]) < 1:
        raise ValueError(f"SAM got an empty image of shape {tuple(image.shape)}")
    return image


class SamModel(nn.Module):
    """A loaded SAM / SAM 2 with one cached encoding per image (see the module doc).

    Attributes:
        kind: ``"sam"`` or ``"sam2"``.
        model: Meta's ``Sam`` / ``SAM2Base`` (eval mode, gradients off).
        arch: the :class:`SamArch` / :class:`Sam2Arch` read from the file.
        cache_size: how many image embeddings are kept (least recently used dropped first).
        encodings: how many times the image encoder ran (cache misses).
    """

    def __init__(self, kind: str, model: nn.Module, arch: SamArch | Sam2Arch, *, cache_size: int = 4) -> None:
        super().__init__()
        self.kind = kind
        self.model = model
        self.arch = arch
        self.cache_size = cache_size
        self.encodings = 0
        self._cache: OrderedDict[str, SamEmbedding] = OrderedDict()
        self._lock = threading.RLock()
        self._encoder: Any = None

    def __deepcopy__(self, memo: dict[int, Any]) -> SamModel:
        """A copy with its own (empty) cache and lock (locks cannot be copied)."""
        twin = SamModel(self.kind, copy.deepcopy(self.model, memo), self.arch, cache_size=self.cache_size)
        return twin.train(self.training)

    def _apply(self, fn: Any, recurse: bool = True) -> SamModel:
        """``to`` / ``half`` / ...: cached embeddings would keep the old device and dtype, so they go."""
        self.clear_cache()
        return super()._apply(fn, recurse)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Autocast to the model's dtype for fp16 / bf16 weights (Meta's code feeds float32 inputs), else
        nothing: wrap calls of Meta's predictors with it (this class's own methods already do)."""
        if self.dtype not in (torch.float16, torch.bfloat16):
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def clear_cache(self) -> None:
        """Forget every cached image embedding."""
        with self._lock:
            self._cache.clear()

    def image_embedding(self, image: Any) -> SamEmbedding:
        """The encoding of an RGB image, computed once per distinct image content (LRU cache).

        Args:
            image: ``(H, W, 3)`` uint8 RGB (numpy array, torch tensor or PIL image).

        Raises:
            ValueError: not an ``(H, W, 3)`` uint8 image.
        """
        rgb = _as_rgb(image)
        key = image_digest(rgb)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
            emb = self._encode(rgb)
            self.encodings += 1
            self._cache[key] = emb
            while len(self._cache) > max(self.cache_size, 0):
                self._cache.popitem(last=False)
            return emb

    def _encode(self, rgb: np.ndarray) -> SamEmbedding:
        """Meta's own ``set_image`` on a private predictor; its features are taken and it is reset."""
        if self._encoder is None:
            self._encoder = self._plain_predictor()
        enc = self._encoder
        with torch.no_grad(), self.autocast():
            enc.set_image(rgb)
        if self.kind == "sam":
            out = SamEmbedding(enc.features, (), tuple(enc.original_size), tuple(enc.input_size))
            enc.reset_image()
            return out
        size = int(getattr(self.model, "image_size", 1024))
        feats = enc._features
        out = SamEmbedding(feats["image_embed"], tuple(feats["high_res_feats"]), tuple(enc._orig_hw[0]),
                           (size, size))
        enc.reset_predictor()
        return out

    def _plain_predictor(self) -> Any:
        if self.kind == "sam":
            from segment_anything import SamPredictor

            return SamPredictor(self.model)
        from sam2.sam2_image_predictor import SAM2ImagePredictor

        with _quiet_sam2():
            return SAM2ImagePredictor(self.model)

    def predictor(self, **kwargs: Any) -> Any:
        """Meta's ``SamPredictor`` / ``SAM2ImagePredictor`` (``kwargs`` go to the latter) whose
        ``set_image`` takes the embedding from :meth:`image_embedding` (no second encoding)."""
        return _predictor_class(self.kind)(self, **kwargs)

    def mask_generator(self, **kwargs: Any) -> Any:
        """Meta's ``SamAutomaticMaskGenerator`` / ``SAM2AutomaticMaskGenerator`` built with ``kwargs``,
        its predictor replaced by :meth:`predictor` (same settings) and ``generate`` run under
        :meth:`autocast`."""
        if self.kind == "sam":
            from segment_anything import SamAutomaticMaskGenerator

            gen = SamAutomaticMaskGenerator(self.model, **kwargs)
            gen.predictor = self.predictor()
        else:
            from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

            with _quiet_sam2():
                gen = SAM2AutomaticMaskGenerator(self.model, **kwargs)
                area = kwargs.get("min_mask_region_area", 0)
                gen.predictor = self.predictor(max_hole_area=area, max_sprinkle_area=area)
        plain = gen.generate

        def generate(image: np.ndarray) -> list[dict[str, Any]]:
            with torch.no_grad(), self.autocast():
                return plain(image)

        gen.generate = generate
        return gen

    def forward(self, image: Any) -> SamEmbedding:
        """:meth:`image_embedding`."""
        return self.image_embedding(image)


_PREDICTORS: dict[str, type] = {}


def _predictor_class(kind: str) -> type:
    """The cache-aware subclass of Meta's predictor for ``kind`` (made on first use)."""
    made = _PREDICTORS.get(kind)
    if made is not None:
        return made
    if kind == "sam":
        from segment_anything import SamPredictor

        class CachedSamPredictor(SamPredictor):
            """``SamPredictor`` whose ``set_image`` reads :meth:`SamModel.image_embedding`."""

            def __init__(self, owner: SamModel) -> None:
                super().__init__(owner.model)
                self.owner = owner

            def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
                if image_format not in ("RGB", "BGR"):
                    raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
                rgb = _as_rgb(image)
                emb = self.owner.image_embedding(rgb if image_format == "RGB" else rgb[..., ::-1])
                self.reset_image()
                self.original_size, self.input_size = emb.original_size, emb.input_size
                self.features = emb.image_embed
                self.is_image_set = True

        made = CachedSamPredictor
    else:
        from sam2.sam2_image_predictor import SAM2ImagePredictor

        class CachedSam2Predictor(SAM2ImagePredictor):
            """``SAM2ImagePredictor`` whose ``set_image`` reads :meth:`SamModel.image_embedding`."""

            def __init__(self, owner: SamModel, **kwargs: Any) -> None:
                super().__init__(owner.model, **kwargs)
                self.owner = owner

            def set_image(self, image: Any) -> None:
                emb = self.owner.image_embedding(image)
                self.reset_predictor()
                self._orig_hw = [emb.original_size]
                self._features = {"image_embed": emb.image_embed, "high_res_feats": list(emb.high_res_feats)}
                self._is_image_set = True

        made = CachedSam2Predictor
    _PREDICTORS[kind] = made
    return made


# ---------------------------------------------------------------------------------------- loading


def _mismatch(net: nn.Module, state: Mapping[str, torch.Tensor]) -> str:
    """The first missing / unexpected / differently shaped tensors, for a one-line message."""
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in sorted(set(own) & set(state))
              if tuple(own[k].shape) != tuple(state[k].shape)]
    parts = [f"{label} {items[:3]}" for label, items in (("missing", missing), ("unexpected", unexpected),
                                                         ("shapes", shapes)) if items]
    return "; ".join(parts)


def load_sam(source: str | os.PathLike[str], *, device: str | torch.device = "cpu", precision: str = "fp32",
             config: str | os.PathLike[str] | None = None, cache_size: int = 4) -> SamModel:
    """SAM or SAM 2 from a local checkpoint, told apart by its keys (see the module doc).

    Args:
        source: Meta's ``sam_vit_*.pth`` (SAM) or ``sam2*_hiera_*.pt`` (SAM 2 / 2.1), or a file with
            the same tensors (``.safetensors``, nested under ``model`` / ``state_dict``).
        device, precision: where and in which dtype the weights live (``"fp32"``, ``"fp16"``, ``"bf16"``;
            below fp32 Meta's code runs under autocast, as the releases do on CUDA; on the CPU the
            weights stay fp32, which Meta's code needs there).
        config: SAM 2 only: a yaml in the ``sam2`` config format for a layout no package config has.
        cache_size: image embeddings kept by :meth:`SamModel.image_embedding`.

    Returns:
        A :class:`SamModel` in eval mode with gradients off.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a SAM / SAM 2 checkpoint, code in the file, or tensors that do not fit the
            architecture read from them (one line naming the file and the problem).
        ImportError: the package the checkpoint needs is missing (``pip install "resclip[sam]"``).
    """
    dtype = resolve_precision(precision)
    target = resolve_device(device)
    if target.type == "cpu":
        # Meta's code feeds float32 inputs to the weights (the releases run fp16 under CUDA autocast);
        # on the CPU its layer norms / mask post-processing do not run in fp16 / bf16, so SAM stays fp32
        dtype = torch.float32
    text = os.fspath(source)
    path = Path(text).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"SAM checkpoint not found: {text!r}")
    state, kind = _state_and_kind(_read(path), path)
    _import(kind)
    arch: SamArch | Sam2Arch
    try:
        if kind == "sam":
            if config is not None:
                raise ValueError("config= applies to SAM 2 checkpoints only")
            arch = sam_architecture(state)
            net = build_sam(arch)
        else:
            arch = sam2_architecture(state)
            net = build_sam2(arch if config is None else None, config=config)
    except ValueError as err:
        raise ValueError(f"SAM checkpoint {text!r}: {err}") from None
    problem = _mismatch(net, state)
    if problem:
        raise ValueError(f"SAM checkpoint {text!r} does not fit the {kind} architecture read from it "
                         f"({problem})")
    net.load_state_dict(state, strict=True)
    net = net.to(device=target, dtype=dtype).eval()
    net.requires_grad_(False)
    wrapper = SamModel(kind, net, arch, cache_size=cache_size)
    return wrapper.eval()


def load_sam2(source: str | os.PathLike[str], **kwargs: Any) -> SamModel:
    """:func:`load_sam` for a file that must be a SAM 2 / 2.1 checkpoint.

    Raises:
        ValueError: a SAM (v1) checkpoint, or as :func:`load_sam`.
    """
    model = load_sam(source, **kwargs)
    if model.kind != "sam2":
        raise ValueError(f"{os.fspath(source)!r} is a SAM (v1) checkpoint, not SAM 2; use load_sam")
    return model
