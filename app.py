"""Hugging Face Spaces entry point: the resclip web demo (``python app.py``).

Settings come from the environment: ``RESCLIP_MODEL`` (default ViT-B-16), ``RESCLIP_PRETRAINED``
(default openai), ``RESCLIP_DEVICE`` (default auto), ``RESCLIP_PRESET`` (default default), ``PORT``.
"""

from __future__ import annotations

import os

from resclip.demo import DemoSettings, launch

SETTINGS = DemoSettings(
    model=os.environ.get("RESCLIP_MODEL", "ViT-B-16"),
    pretrained=os.environ.get("RESCLIP_PRETRAINED", "openai"),
    device=os.environ.get("RESCLIP_DEVICE", "auto"),
    preset=os.environ.get("RESCLIP_PRESET", "default"),
)

if __name__ == "__main__":
    launch(SETTINGS, host="0.0.0.0", port=int(os.environ.get("PORT", "7860")))
