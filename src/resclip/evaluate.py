"""Compatibility module: the evaluation lives in :mod:`resclip.eval` (one concern per module)."""

from __future__ import annotations

from .eval import *  # noqa: F403
from .eval import __all__ as __all__
