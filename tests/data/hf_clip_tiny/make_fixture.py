"""Regenerate the tiny transformers CLIP fixtures of tests/test_clip_hf.py (needs ``transformers``).

Run from the repository root in an environment that has transformers (not a resclip dependency)::

    python tests/data/hf_clip_tiny/make_fixture.py

For each activation it writes ``<variant>/config.json`` and ``<variant>/model.safetensors`` (fp16 random
weights, saved by ``CLIPModel.save_pretrained`` then cast) and ``<variant>/reference.npz`` with the inputs
and the fp32 ``get_image_features`` / ``get_text_features`` that transformers computes from the saved folder.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import CLIPConfig, CLIPModel

HERE = Path(__file__).parent
VOCAB, CONTEXT = 256, 16
VARIANTS = {
    # vision width 32 with 2 heads, text width 32 with 4 heads: heads differ from width // 64
    "quick_gelu": {"act": "quick_gelu", "v_heads": 2, "t_heads": 4, "v_mlp": 64, "t_mlp": 64, "seed": 0},
    "gelu": {"act": "gelu", "v_heads": 4, "t_heads": 2, "v_mlp": 96, "t_mlp": 128, "seed": 1},
}


def make(name: str, v: dict) -> None:
    torch.manual_seed(v["seed"])
    config = CLIPConfig(
        text_config={
            "vocab_size": VOCAB,
            "hidden_size": 32,
            "intermediate_size": v["t_mlp"],
            "num_hidden_layers": 2,
            "num_attention_heads": v["t_heads"],
            "max_position_embeddings": CONTEXT,
            "hidden_act": v["act"],
            "bos_token_id": VOCAB - 2,
            "eos_token_id": VOCAB - 1,
            "pad_token_id": 0,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": v["v_mlp"],
            "num_hidden_layers": 2,
            "num_attention_heads": v["v_heads"],
            "image_size": 32,
            "patch_size": 8,
            "hidden_act": v["act"],
        },
        projection_dim=24,
    )
    model = CLIPModel(config).eval()
    with torch.no_grad():
        for key, p in model.state_dict().items():
            if key.endswith("position_ids"):
                continue
            if "norm" in key and key.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif key == "logit_scale":
                p.fill_(math.log(1 / 0.07))
            else:  # large enough that the features depend on every block
                p.copy_(
                    torch.randn_like(p)
                    * (0.3 if p.dim() < 2 else 1 / math.sqrt(p.shape[-1] if p.dim() == 2 else p[0].numel()))
                )
    folder = HERE / name
    model.save_pretrained(folder, safe_serialization=True)
    weights = folder / "model.safetensors"
    save_file(
        {k: t.half().contiguous() for k, t in load_file(weights).items()}, weights, metadata={"format": "pt"}
    )

    reloaded = CLIPModel.from_pretrained(folder, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(123)
    pixels = torch.randn(2, 3, 32, 32, generator=gen)
    ids = torch.zeros(3, CONTEXT, dtype=torch.long)
    for row, length in enumerate((5, 9, CONTEXT - 2)):
        ids[row, 0] = VOCAB - 2
        ids[row, 1 : length + 1] = torch.randint(1, VOCAB - 2, (length,), generator=gen)
        ids[row, length + 1] = VOCAB - 1
    with torch.no_grad():
        image = reloaded.get_image_features(pixel_values=pixels)
        text = reloaded.get_text_features(input_ids=ids)
    image = getattr(image, "pooler_output", image)
    text = getattr(text, "pooler_output", text)
    np.savez(
        folder / "reference.npz",
        pixel_values=pixels.numpy(),
        input_ids=ids.numpy(),
        image_features=image.numpy(),
        text_features=text.numpy(),
        transformers_version=np.array(transformers.__version__),
    )
    for extra in folder.iterdir():
        if extra.name not in {"config.json", "model.safetensors", "reference.npz"}:
            extra.unlink()
    print(name, image.shape, text.shape, sorted(f.name for f in folder.iterdir()))


if __name__ == "__main__":
    for variant, values in VARIANTS.items():
        make(variant, values)
