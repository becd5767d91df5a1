"""Convert a Hugging Face ``transformers`` CLIP checkpoint into OpenAI's state-dict layout.

A folder written by ``CLIPModel.save_pretrained`` (``config.json`` with ``model_type: "clip"`` and
``model.safetensors`` or ``pytorch_model.bin``, possibly sharded) holds the same tensors as an OpenAI
CLIP under other names, with the attention's query, key and value projections stored apart. This module
renames them (pure tensor bookkeeping: no ``transformers`` import, no code from any file is run) so that
:mod:`resclip.infer_arch` can read the architecture from the shapes and open_clip's ``CLIP`` can load
them. The configuration supplies what shapes cannot: the number of attention heads and the activation.

Name mapping (``{i}`` is a block index; ``vision_model.`` → ``visual.``, ``text_model.`` → top level)::

    embeddings.class_embedding                (W,)        → visual.class_embedding
    embeddings.patch_embedding.weight         (W,3,P,P)   → visual.conv1.weight
    embeddings.position_embedding.weight      (N,W)       → visual.positional_embedding / positional_embedding
    embeddings.token_embedding.weight         (V,Wt)      → token_embedding.weight
    pre_layrnorm / post_layernorm / final_layer_norm      → visual.ln_pre / visual.ln_post / ln_final
    encoder.layers.{i}.self_attn.{q,k,v}_proj (W,W),(W,)  → transformer.resblocks.{i}.attn.in_proj_*
                                                            (3W,W),(3W,): q, k, v concatenated
    encoder.layers.{i}.self_attn.out_proj                 → transformer.resblocks.{i}.attn.out_proj
    encoder.layers.{i}.layer_norm1 / layer_norm2          → transformer.resblocks.{i}.ln_1 / ln_2
    encoder.layers.{i}.mlp.fc1 / fc2                      → transformer.resblocks.{i}.mlp.c_fc / c_proj
    visual_projection.weight                  (D,W)       → visual.proj (W,D), transposed
    text_projection.weight                    (D,Wt)      → text_projection (Wt,D), transposed
    logit_scale                               ()          → logit_scale

``*.position_ids`` buffers (saved by older ``transformers`` versions) are dropped.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "HF_CONFIG",
    "WEIGHT_NAMES",
    "HfClipSpec",
    "convert_state_dict",
    "read_config",
    "spec_from_config",
    "weight_files",
]

HF_CONFIG = "config.json"
# transformers' defaults for keys that save_pretrained may leave out of config.json (CLIPVisionConfig /
# CLIPTextConfig); used only for the values tensor shapes cannot tell.
_VISION_DEFAULTS = {"num_attention_heads": 12, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
_TEXT_DEFAULTS = {"num_attention_heads": 8, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
_ACTIVATIONS = {"quick_gelu": True, "gelu": False}  # hidden_act → open_clip quick_gelu flag
_OPEN_CLIP_LN_EPS = 1e-5
# single files first, then sharded ones (an index.json naming the shards), safetensors before pickles
WEIGHT_NAMES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)

_TOWERS = (("vision_model.", "visual."), ("text_model.", ""))
_RENAMES = (
    ("embeddings.class_embedding", "class_embedding"),
    ("embeddings.patch_embedding.weight", "conv1.weight"),
    ("embeddings.position_embedding.weight", "positional_embedding"),
    ("embeddings.token_embedding.weight", "token_embedding.weight"),
    ("pre_layrnorm.", "ln_pre."),
    ("post_layernorm.", "ln_post."),
    ("final_layer_norm.", "ln_final."),
)
_VISION_ONLY = ("class_embedding", "conv1.", "ln_pre.", "ln_post.")
_TEXT_ONLY = ("token_embedding.", "ln_final.")
_BLOCK = re.compile(r"encoder\.layers\.(\d+)\.(.+)$")
_BLOCK_RENAMES = (
    ("self_attn.out_proj.", "attn.out_proj."),
    ("layer_norm1.", "ln_1."),
    ("layer_norm2.", "ln_2."),
    ("mlp.fc1.", "mlp.c_fc."),
    ("mlp.fc2.", "mlp.c_proj."),
)
_QKV = re.compile(r"self_attn\.([qkv])_proj\.(weight|bias)$")


@dataclass(frozen=True)
class HfClipSpec:
    """What a transformers CLIP config says that the tensor shapes do not.

    Attributes:
        quick_gelu: the MLP activation is QuickGELU (``hidden_act: "quick_gelu"``) rather than exact GELU.
        vision_heads: attention heads of the vision tower.
        text_heads: attention heads of the text tower.
    """

    quick_gelu: bool
    vision_heads: int
    text_heads: int


def read_config(folder: Path, where: str) -> dict[str, Any]:
    """Read ``folder/config.json`` as JSON (transformers itself is not needed).

    Args:
        folder: the model folder (a local save or a hub-cache snapshot).
        where: how to name the model in errors.

    Raises:
        ValueError: the file cannot be read or is not a JSON object.
    """
    path = folder / HF_CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(
            f"pretrained={where!r}: cannot read {HF_CONFIG} ({type(exc).__name__}: {exc}); "
            "re-save the model with CLIPModel.save_pretrained"
        ) from None
    if not isinstance(config, dict):
        raise ValueError(f"pretrained={where!r}: {HF_CONFIG} is not a JSON object; re-save the model")
    return config


def spec_from_config(config: Mapping[str, Any], where: str) -> HfClipSpec:
    """Check a transformers config describes a supported CLIP and read its heads and activation.

    Args:
        config: the parsed ``config.json``.
        where: how to name the model in errors (its folder or ``hf:`` repo id).

    Raises:
        ValueError: one line naming the problem and the fix: a ``model_type`` other than ``"clip"``
            (SigLIP, a lone vision or text tower...), an activation open_clip lacks, towers with different
            activations, or a layer-norm epsilon other than open_clip's 1e-5.
    """
    model_type = config.get("model_type")
    if model_type in ("clip_vision_model", "clip_text_model"):
        tower = "vision" if model_type == "clip_vision_model" else "text"
        raise ValueError(
            f"pretrained={where!r} is a lone CLIP {tower} tower (model_type {model_type!r}); resclip needs "
            "both towers: pass the full CLIPModel folder (model_type 'clip')"
        )
    if model_type != "clip":
        raise ValueError(
            f"pretrained={where!r} is a transformers {model_type!r} model, which is not supported; only "
            "CLIP (config.json model_type 'clip', e.g. openai/clip-vit-base-patch16) can be loaded from a "
            "transformers folder. Use an open_clip checkpoint or 'hf-hub:' repo instead."
        )
    vision = {**_VISION_DEFAULTS, **_sub_config(config, "vision")}
    text = {**_TEXT_DEFAULTS, **_sub_config(config, "text")}
    acts = (str(vision["hidden_act"]), str(text["hidden_act"]))
    for act in acts:
        if act not in _ACTIVATIONS:
            raise ValueError(
                f"pretrained={where!r} uses hidden_act={act!r}, which open_clip's CLIP does not have; only "
                f"{sorted(_ACTIVATIONS)} are supported"
            )
    if acts[0] != acts[1]:
        raise ValueError(
            f"pretrained={where!r} uses hidden_act={acts[0]!r} in the vision tower but {acts[1]!r} in the "
            "text tower; open_clip's CLIP uses one activation for both, so it cannot be loaded"
        )
    for tower, cfg in (("vision", vision), ("text", text)):
        eps = float(cfg["layer_norm_eps"])
        if not math.isclose(eps, _OPEN_CLIP_LN_EPS, rel_tol=1e-6):
            raise ValueError(
                f"pretrained={where!r}: the {tower} tower's layer_norm_eps={eps:g} differs from open_clip's "
                f"{_OPEN_CLIP_LN_EPS:g}; such a model is not supported"
            )
    return HfClipSpec(
        quick_gelu=_ACTIVATIONS[acts[0]],
        vision_heads=int(vision["num_attention_heads"]),
        text_heads=int(text["num_attention_heads"]),
    )


def _sub_config(config: Mapping[str, Any], tower: str) -> dict[str, Any]:
    """``vision_config`` / ``text_config`` (or the ``*_config_dict`` spelling of old transformers)."""
    for key in (f"{tower}_config", f"{tower}_config_dict"):
        value = config.get(key)
        if isinstance(value, Mapping):
            return dict(value)
    return {}


def weight_files(listing: Mapping[str, Path], where: str) -> tuple[str, list[str]]:
    """Choose which weight files of a transformers model to read.

    Args:
        listing: the available files among :data:`WEIGHT_NAMES`, name → local path (an index file must be
            present locally for its shards to be named).
        where: how to name the model in errors.

    Returns:
        (the chosen name in :data:`WEIGHT_NAMES`, the names of the files holding the tensors: the name
        itself, or the shards an ``*.index.json`` lists, in order).

    Raises:
        ValueError: none of the names is present, or an index file is malformed.
    """
    for name in WEIGHT_NAMES:
        if name not in listing:
            continue
        if not name.endswith(".index.json"):
            return name, [name]
        try:
            index = json.loads(listing[name].read_text(encoding="utf-8"))
            shards = list(dict.fromkeys(str(v) for v in index["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(
                f"pretrained={where!r}: cannot read the shard index {name} ({type(exc).__name__}); re-save "
                "the model with CLIPModel.save_pretrained"
            ) from None
        if not shards or any("/" in s or "\\" in s or s.startswith(".") for s in shards):
            raise ValueError(f"pretrained={where!r}: the shard index {name} names no usable shard files")
        return name, shards
    raise ValueError(
        f"pretrained={where!r} holds no PyTorch weights ({' or '.join(WEIGHT_NAMES[::2])}); TensorFlow / "
        "Flax files are not read: convert them with transformers "
        "(CLIPModel.from_pretrained(..., from_tf=True).save_pretrained(folder))"
    )


def convert_state_dict(hf_state: Mapping[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """Rename a transformers ``CLIPModel`` state dict into OpenAI's layout (see the module docstring).

    Args:
        hf_state: tensors keyed by transformers names (``vision_model.encoder.layers.0.mlp.fc1.weight``...).
            Query, key and value projections of each block, shapes (W, W) and (W,), are concatenated into
            ``in_proj_weight`` (3W, W) and ``in_proj_bias`` (3W,) in that order; the projections,
            (D, W) in transformers, are transposed to (W, D). Dtypes and devices are kept.
        where: how to name the model in errors.

    Returns:
        A new state dict in OpenAI layout (the tensors are shared with ``hf_state`` where not concatenated
        or transposed).

    Raises:
        ValueError: tensors that a CLIPModel does not have (another head, another model), or a block
            without all of its query, key and value projections.
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    for key, tensor in hf_state.items():
        if key.endswith("position_ids"):
            continue
        if key in ("logit_scale",):
            out[key] = tensor
        elif key in ("visual_projection.weight", "text_projection.weight"):
            name = "visual.proj" if key.startswith("visual") else "text_projection"
            out[name] = tensor.t().contiguous()
        else:
            renamed = _rename_tower_key(key)
            if renamed is None:
                unknown.append(key)
            elif isinstance(renamed, tuple):
                block, letter, kind = renamed
                qkv.setdefault((block, kind), {})[letter] = tensor
            else:
                out[renamed] = tensor
    if unknown:
        raise ValueError(
            f"pretrained={where!r} holds {len(unknown)} tensors a transformers CLIPModel does not have "
            f"(e.g. {unknown[:3]}); only a plain CLIPModel saved with save_pretrained is supported"
        )
    for (block, kind), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(
                f"pretrained={where!r}: {block} lacks the {sorted({'q', 'k', 'v'} - set(parts))} projection "
                f"{kind}; the checkpoint is incomplete, re-save it"
            )
        out[f"{block}attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def _rename_tower_key(key: str) -> str | tuple[str, str, str] | None:
    """The OpenAI name of a tower tensor; (block prefix, q/k/v, weight/bias) for a query, key or value
    projection; None for an unknown key."""
    for hf_prefix, oa_prefix in _TOWERS:
        if not key.startswith(hf_prefix):
            continue
        rest = key[len(hf_prefix) :]
        for old, new in _RENAMES:
            if rest.startswith(old):
                if new.startswith(_VISION_ONLY if not oa_prefix else _TEXT_ONLY):
                    return None  # a vision-only tensor in the text tower or the reverse
                return oa_prefix + new + rest[len(old) :]
        block = _BLOCK.match(rest)
        if block is None:
            return None
        prefix = f"{oa_prefix}transformer.resblocks.{block.group(1)}."
        inner = block.group(2)
        found = _QKV.match(inner)
        if found is not None:
            return prefix, found.group(1), found.group(2)
        for old, new in _BLOCK_RENAMES:
            if inner.startswith(old) and inner[len(old) :] in ("weight", "bias"):
                return prefix + new + inner[len(old) :]
        return None
    return None
