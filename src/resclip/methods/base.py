"""The contract every base attention implements, and the method registry.

A base attention decides how the last ViT block forms its attention: a list of pre-softmax
score terms (each softmaxed separately and summed), an optional additive bias applied to every
term, and whether the block keeps its residual and MLP. RCS and SFR work on these pieces only,
so they plug into any registered method.

Most methods are plain data: which token pairs they score (``"qk"`` = ``q k^T / sqrt(d)``, ``"kk"``,
``"qq"``). A method with a score bias (NACLIP) subclasses :class:`BaseAttention`; so does one whose
score terms are another function of ``q, k`` (PEARL's Procrustes-aligned scores override
:meth:`BaseAttention.score_terms`), and RCS and SFR still act on its terms. A method is
registered once, by its instance, under its own ``name``.

A method that is more than "a different last-block attention" composes up to three optional
stages, each a small override (the defaults are exactly the plain path):

* a trunk request, :meth:`BaseAttention.trunk_blocks` / :meth:`BaseAttention.trunk_attentions`:
  which block outputs and attention maps the trunk keeps;
* a last stage, :meth:`BaseAttention.last_stage` (with ``replaces_last_block = True``): it turns
  the trunk's outputs into projected patch tokens instead of the standard last block. It gets a
  :class:`StageContext` whose ``mix_scores`` / ``mix_attention`` apply SFR and RCS where the method
  forms its attention, so both modules compose with it without knowing it;
* logit refinement stays the protocol's (PAMR, TLP, thresholds), shared by every method; a preset
  may set a method's own fields per dataset (``Preset.method_options``, e.g. PEARL's ``alpha_kk``).

A method may read auxiliary models next to CLIP (a vision foundation model such as DINO or SAM): it
names their kinds in :attr:`BaseAttention.aux_models` (or :meth:`BaseAttention.required_aux` when a
field chooses them); the engine refuses to run it without them and hands them, loaded once per process
by :func:`resclip.auxiliary.load_aux`, to its last stage as ``StageContext.aux`` together with the window
images (``StageContext.crops``). Such a stage may put its tokens on a grid of its own
(``StageContext.out_grid``, see :meth:`BaseAttention.out_patch`); RCS and SFR, which mix attention on
the CLIP grid, compose with it only where the two grids coincide.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..attention import scaled_scores


@dataclass(frozen=True)
class BaseAttention:
    """A training-free last-block attention.

    Attributes:
        name: registry name.
        keep_residual: keep ``x + attn`` and the MLP of the last block (vanilla CLIP, SCLIP);
            otherwise the block output is ``out_proj(A v)`` alone.
        pairs: the score terms, one per entry: ``"qk"`` is ``softmax(q k^T / sqrt(d))``, ``"kk"``
            ``softmax(k k^T / sqrt(d))`` and so on; the softmaxed terms are summed. Empty: identity
            attention (every token keeps its own value).
        description: one line for ``resclip list``.
        title: the name as its paper spells it (``"SC-CLIP"``), for figures and tables; default
            ``name``.
    """

    name: str
    keep_residual: bool
    pairs: tuple[str, ...] = ()
    description: str = ""
    title: str = ""

    def __post_init__(self) -> None:
        if not self.title:
            object.__setattr__(self, "title", self.name)
        bad = [p for p in self.pairs if len(p) != 2 or set(p) - {"q", "k"}]
        if bad:
            raise ValueError(f"method {self.name!r}: score pairs must be 'qk', 'qq', 'kk' or 'kq', got {bad}")

    @property
    def has_scores(self) -> bool:
        """Whether the method has pre-softmax scores (SFR edits them; identity attention has none)."""
        return bool(self.pairs)

    def score_terms(self, q: torch.Tensor, k: torch.Tensor) -> list[torch.Tensor]:
        """Pre-softmax score terms, each a new ``(B, H, T, T)`` float32 tensor (the engine adds
        biases to it in place); empty = identity attention."""
        side = {"q": q, "k": k}
        return [scaled_scores(side[pair[0]], side[pair[1]]) for pair in self.pairs]

    def score_bias(self, h: int, w: int, device: torch.device) -> torch.Tensor | None:
        """An additive ``(T, T)`` bias for every score term, or None."""
        return None

    # ---- optional stages (the defaults are the plain path) ----
    replaces_last_block = False  # True: :meth:`last_stage` replaces the standard last block
    uses_regions = False  # True: the stage reads the image's instance map (:meth:`image_regions`)
    #: kinds of auxiliary models the last stage reads from ``StageContext.aux`` (``("dino",)``); see
    #: :data:`resclip.auxiliary.AUX_KINDS`
    aux_models: ClassVar[tuple[str, ...]] = ()

    def required_aux(self) -> tuple[str, ...]:
        """The auxiliary model kinds this instance reads (default :attr:`aux_models`; a method whose
        field chooses its model, e.g. ProxyCLIP's ``vfm``, overrides it)."""
        return self.aux_models

    def out_patch(self, clip_patch: int, aux: Mapping[str, Any]) -> int | None:
        """Pixel stride of the last stage's output grid for a CLIP with patch ``clip_patch`` and the
        loaded auxiliary models ``aux``: ``clip_patch`` (the CLIP grid, the default), another stride,
        or None for a grid of fixed size whatever the window (e.g. SAM's 64 x 64)."""
        return clip_patch

    def trunk_blocks(self, num_blocks: int) -> tuple[int, ...]:
        """0-based indices (< ``num_blocks - 1``) of the trunk blocks whose outputs the method reads."""
        return ()

    def trunk_attentions(self, num_blocks: int) -> tuple[int, ...]:
        """0-based indices (< ``num_blocks - 1``) of the trunk blocks whose attention maps it reads."""
        return ()

    def last_stage(self, ctx: StageContext) -> torch.Tensor:
        """Projected patch tokens ``(B, h*w, D)`` (no CLS) from the trunk; only when
        ``replaces_last_block``."""
        raise NotImplementedError(f"method {self.name!r} uses the standard last block")

    def image_regions(self, rgb: Any, aux: Mapping[str, Any]) -> torch.Tensor:
        """``(H, W)`` int64 instance map of an ``(H, W, 3)`` uint8 image (only with ``uses_regions``)."""
        raise NotImplementedError(f"method {self.name!r} reads no instance map")

    def for_fidelity(self, fidelity: str) -> BaseAttention:
        """This method with its release-vs-paper switches set for ``fidelity`` (default: itself)."""
        return self

    def for_protocol(self, protocol: Any) -> BaseAttention:
        """This method with the fields it derives from the inference protocol (a
        :class:`resclip.protocol.Protocol`) filled in, e.g. ProxyCLIP's MAE input side from the window
        crop (default: itself)."""
        return self


@dataclass
class StageContext:
    """What a method's last stage receives from the engine.

    Attributes:
        visual: the CLIP visual tower (parameters read by name, see :mod:`resclip.vit`).
        trunk: the trunk's output, with the blocks the method asked for.
        mix_scores: applies SFR to one pre-softmax ``(B, h, N, N)`` score term over patch tokens
            (identity without SFR); ``heads`` selects the heads the term belongs to.
        mix_attention: applies RCS to a post-softmax ``(B, h, N, N)`` patch attention (identity
            without RCS), same ``heads`` argument; a ``(B, 1, N, N)`` map shared by every head is
            expanded to the heads when RCS mixes it.
        trace: a dict the stage fills with its named intermediates, or None.
        crops: ``(B, 3, Hc, Wc)`` the window images, CLIP-normalised (what the trunk saw).
        regions: ``(B, Hc, Wc)`` int64 the windows' crops of the image's instance map (a method with
            ``uses_regions``: CorrCLIP's SAM 2 masks), or None.
        aux: the loaded auxiliary models by kind (``{"dino": model}``), those the method declared.
        out_grid: the ``(h', w')`` grid of the stage's output tokens when it is not the CLIP grid
            (the stage sets it); None = the trunk's grid.
        memo: scratch shared by the passes of one engine call (SFR's first pass and the final
            pass see the same windows), e.g. auxiliary features computed once.
        explicit: the engine's ``trunk_attention == "explicit"``: form attention maps (also an
            auxiliary model's) explicitly, as the released code, rather than with fused kernels.
    """

    visual: Any
    trunk: Any
    mix_scores: Callable[[torch.Tensor, slice], torch.Tensor]
    mix_attention: Callable[[torch.Tensor, slice], torch.Tensor]
    trace: dict[str, torch.Tensor] | None = None
    crops: torch.Tensor | None = None
    aux: Mapping[str, Any] = field(default_factory=dict)
    out_grid: tuple[int, int] | None = None
    memo: dict[str, Any] = field(default_factory=dict)
    explicit: bool = False
    regions: torch.Tensor | None = None


_REGISTRY: dict[str, BaseAttention] = {}


def register_method(method: BaseAttention) -> BaseAttention:
    """Register ``method`` under ``method.name`` (lower case, unique) and return it.

    Raises:
        ValueError: the name is taken or not lower case.
    """
    if method.name != method.name.strip().lower():
        raise ValueError(f"method names are lower case without spaces, got {method.name!r}")
    if method.name in _REGISTRY:
        raise ValueError(f"method {method.name!r} is registered twice")
    _REGISTRY[method.name] = method
    return method


def list_methods() -> list[str]:
    """Names of the registered base attentions, sorted."""
    return sorted(_REGISTRY)


def get_method(name: str) -> BaseAttention:
    """The registered base attention ``name`` (immutable, shared).

    Raises:
        ValueError: unknown name; the message lists the valid ones.
    """
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(list_methods())}")
    return _REGISTRY[key]
