"""resclip: training-free open-vocabulary segmentation with CLIP (ResCLIP, CVPR 2025).

Quick start::

    import resclip
    seg = resclip.create_segmenter(method="naclip", rcs=True, sfr=True, preset="voc21")
    res = seg.predict("photo.jpg", ["sky, wall, tree", "cat", "person, man, woman"])
    res.mask  # (H, W) class indices

The public names are imported on first use (PEP 562), so ``import resclip.cli`` and
``resclip --help`` do not pay for torch and open_clip.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> submodule that defines it
_LAZY = {
    "create_segmenter": "factory",
    "list_methods": "methods",
    "Preset": "presets",
    "get_preset": "presets",
    "list_presets": "presets",
    "Protocol": "protocol",
    "RCSConfig": "rcs",
    "Segmenter": "segmenter",
    "SegmenterConfig": "segmenter",
    "SegResult": "segmenter",
    "SFRConfig": "sfr",
    "label": "labelling",
}

if TYPE_CHECKING:
    from .factory import create_segmenter
    from .labelling import label
    from .methods import list_methods
    from .presets import Preset, get_preset, list_presets
    from .protocol import Protocol
    from .rcs import RCSConfig
    from .segmenter import Segmenter, SegmenterConfig, SegResult
    from .sfr import SFRConfig


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'resclip' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "Preset",
    "Protocol",
    "RCSConfig",
    "SFRConfig",
    "SegResult",
    "Segmenter",
    "SegmenterConfig",
    "__version__",
    "create_segmenter",
    "get_preset",
    "label",
    "list_methods",
    "list_presets",
]
