"""The contract every base attention implements, and the method registry.

A base attention decides how the last ViT block forms its attention: a list of pre-softmax
score terms (each softmaxed separately and summed), an optional additive bias applied to every
term, and whether the block keeps its residual and MLP. RCS and SFR work on these pieces only,
so they plug into any registered method.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BaseAttention:
    """A training-free last-block attention.

    Attributes:
        name: registry name.
        keep_residual: keep ``x + attn`` and the MLP of the last block (vanilla CLIP, SCLIP);
            otherwise the block output is ``out_proj(A v)`` alone.
        description: one line for ``list_methods``.
    """

    name: str
    keep_residual: bool
    description: str = ""

    def score_terms(self, q: torch.Tensor, k: torch.Tensor) -> list[torch.Tensor]:
        """Pre-softmax score terms, each a new ``(B, H, T, T)`` float32 tensor (the engine adds
        biases to it in place); empty = identity attention."""
        raise NotImplementedError

    def score_bias(self, h: int, w: int, device: torch.device) -> torch.Tensor | None:
        """An additive ``(T, T)`` bias for every score term, or None."""
        return None


_REGISTRY: dict[str, Callable[[], BaseAttention]] = {}


def register_method(name: str) -> Callable[[Callable[[], BaseAttention]], Callable[[], BaseAttention]]:
    """Decorator registering a zero-argument factory under ``name`` (duplicates raise)."""

    def deco(factory: Callable[[], BaseAttention]) -> Callable[[], BaseAttention]:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is registered twice")
        _REGISTRY[name] = factory
        return factory

    return deco


def list_methods() -> list[str]:
    """Names of the registered base attentions, sorted."""
    return sorted(_REGISTRY)


def get_method(name: str) -> BaseAttention:
    """Build the registered base attention ``name``.

    Raises:
        ValueError: unknown name; the message lists the valid ones.
    """
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(list_methods())}")
    return _REGISTRY[key]()
