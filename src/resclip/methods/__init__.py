"""Registered base attentions (one file each)."""

from . import (  # noqa: F401  (registration)
    clearclip,
    clip,
    cliper,
    corrclip,
    maskclip,
    naclip,
    pearl,
    proxyclip,
    sc_clip,
    sclip,
    sfp,
    trident,
)
from .base import BaseAttention, StageContext, get_method, list_methods, register_method

__all__ = ["BaseAttention", "StageContext", "get_method", "list_methods", "register_method"]
