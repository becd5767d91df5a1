"""Registered base attentions (one file each)."""

from . import clearclip, clip, maskclip, naclip, sclip  # noqa: F401  (registration)
from .base import BaseAttention, get_method, list_methods, register_method

__all__ = ["BaseAttention", "get_method", "list_methods", "register_method"]
