"""Registered base attentions (one file each)."""

from . import clearclip, clip, cliper, maskclip, naclip, pearl, sc_clip, sclip, sfp  # noqa: F401  (registration)
from .base import BaseAttention, StageContext, get_method, list_methods, register_method

__all__ = ["BaseAttention", "StageContext", "get_method", "list_methods", "register_method"]
