"""Hugging Face Spaces entry point: the resclip web demo (``python app.py``).

Settings come from the environment: ``RESCLIP_MODEL`` (default ViT-B-16), ``RESCLIP_PRETRAINED``
(default openai), ``RESCLIP_DEVICE`` (default auto), ``RESCLIP_PRESET`` (default default), ``PORT``,
and the limits of ``resclip demo``: ``RESCLIP_MAX_UPLOAD_MB`` (default 20), ``RESCLIP_MAX_PIXELS``
(default 40000000; larger images are refused from their header), ``RESCLIP_MAX_CLASSES`` (default
200, synonyms included) and ``RESCLIP_CONCURRENCY`` (requests run at the same time, default 1).
"""

from __future__ import annotations

import os

from resclip.demo import DemoSettings, launch

SETTINGS = DemoSettings(
    model=os.environ.get("RESCLIP_MODEL", "ViT-B-16"),
    pretrained=os.environ.get("RESCLIP_PRETRAINED", "openai"),
    device=os.environ.get("RESCLIP_DEVICE", "auto"),
    preset=os.environ.get("RESCLIP_PRESET", "default"),
    max_upload_mb=float(os.environ.get("RESCLIP_MAX_UPLOAD_MB", "20")),
    max_pixels=int(os.environ.get("RESCLIP_MAX_PIXELS", "40000000")),
    max_classes=int(os.environ.get("RESCLIP_MAX_CLASSES", "200")),
    concurrency=int(os.environ.get("RESCLIP_CONCURRENCY", "1")),
)

if __name__ == "__main__":
    launch(SETTINGS, host="0.0.0.0", port=int(os.environ.get("PORT", "7860")))
