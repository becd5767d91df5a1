"""resclip: training-free open-vocabulary segmentation with CLIP (ResCLIP, CVPR 2025).

Quick start::

    import resclip
    seg = resclip.create_segmenter(method="naclip", rcs=True, sfr=True, preset="voc21")
    res = seg.predict("photo.jpg", ["sky, wall, tree", "cat", "person, man, woman"])
    res.mask  # (H, W) class indices
"""

from .factory import create_segmenter
from .methods import list_methods
from .presets import Preset, get_preset, list_presets
from .protocol import Protocol
from .rcs import RCSConfig
from .segmenter import Segmenter, SegmenterConfig, SegResult
from .sfr import SFRConfig

__version__ = "0.1.0"

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
    "list_methods",
    "list_presets",
]
