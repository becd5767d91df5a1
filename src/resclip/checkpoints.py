"""Read CLIP checkpoint files and fit them to an open_clip model.

Supported: ``torch.save``'d state dicts in OpenAI or open_clip layout (possibly nested under
``"state_dict"`` or with ``"module."`` prefixes), ``.safetensors`` files and OpenAI's TorchScript
archives (their tensors only: no code from a file is ever run). A ViT's dimensions are read from
the tensor shapes (:mod:`resclip.infer_arch`), so files need no architecture name.
"""

from __future__ import annotations

import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import open_clip
import torch
from torch import nn

from .scriptarchive import ArchiveError, is_torchscript_archive, read_script_weights

# Keys of OpenAI's original (JIT) checkpoints that are not weights; their presence marks an OpenAI file.
_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")
OPENAI_REQUIRED_KEYS = (
    "visual.conv1.weight",
    "visual.class_embedding",
    "visual.positional_embedding",
    "visual.proj",
    "token_embedding.weight",
    "positional_embedding",
    "ln_final.weight",
    "text_projection",
)


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """Read a state dict from any supported file, running nothing from it.

    ``torch.save`` files are read with ``weights_only=True``; TorchScript archives (OpenAI's
    original ``.pt`` files) by :func:`resclip.scriptarchive.read_script_weights`, which never
    executes the archive's code.

    Returns:
        The state dict (unnested, without ``module.`` prefixes and OpenAI's non-weight entries) and whether
        the file is marked as an original OpenAI checkpoint (a TorchScript archive, or OpenAI's extra keys).

    Raises:
        ValueError: one line naming the file and what is wrong with it.
    """
    obj: Any
    jit = False
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        elif is_torchscript_archive(path):
            obj, jit = read_script_weights(path), True
        else:
            obj = _torch_load(path)
    except ArchiveError as exc:
        raise ValueError(
            f"refusing to read pretrained={str(path)!r}: {exc}. It is a TorchScript archive, and resclip "
            "reads only the tensors of one, never its code."
        ) from None
    except pickle.UnpicklingError as exc:
        raise ValueError(_unpickling_message(path, exc)) from None
    except Exception as exc:
        raise ValueError(_unreadable_message(path, _brief(exc))) from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(
            f"pretrained={str(path)!r} is not a CLIP checkpoint: expected a state dict (a mapping of names "
            f"to tensors), got {type(obj).__name__}. Only ViT CLIP checkpoints are supported."
        )
    state = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise ValueError(
            f"pretrained={str(path)!r} holds no tensors, so it is not a CLIP checkpoint; expected a "
            "state dict of a ViT CLIP (OpenAI or open_clip format)."
        )
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    marked = jit or any(key in state for key in _OPENAI_EXTRA_KEYS)
    for key in _OPENAI_EXTRA_KEYS:
        state.pop(key, None)
    return state, marked


def check_values(state: Mapping[str, torch.Tensor], path: Path) -> None:
    """Reject weights that cannot be a trained CLIP: sparse or integer tensors, NaN/inf, all zeros.

    Raises:
        ValueError: naming the file, the problem and example tensor names.
    """
    name = str(path)
    sparse = [k for k, v in state.items() if v.layout != torch.strided]
    if sparse:
        raise ValueError(
            f"pretrained={name!r} holds {len(sparse)} sparse tensors (e.g. {sparse[:3]}); a CLIP checkpoint "
            "stores dense weights: convert them with tensor.to_dense() before saving"
        )
    weights = {k: v for k, v in state.items() if k.endswith(".weight") or k in OPENAI_REQUIRED_KEYS}
    integer = [k for k, v in weights.items() if not v.is_floating_point()]
    if integer:
        kinds = sorted({str(state[k].dtype).replace("torch.", "") for k in integer})
        raise ValueError(
            f"pretrained={name!r} stores {len(integer)} weights as integers ({', '.join(kinds)}; e.g. "
            f"{integer[:3]}): quantised or converted checkpoints are not supported; use the float "
            "(fp32/fp16/bf16) release"
        )
    broken = [k for k, v in state.items() if v.is_floating_point() and not _all_finite(v)]
    if broken:
        raise ValueError(
            f"pretrained={name!r} is corrupt: {len(broken)} tensors hold NaN or infinite values, e.g. "
            f"{broken[:3]}"
        )
    floats = [v for v in weights.values() if v.is_floating_point() and v.numel()]
    if floats and not any(_any_nonzero(v) for v in floats):
        raise ValueError(
            f"pretrained={name!r} holds only zeros in all {len(floats)} weight tensors: it is empty or was "
            "zeroed, not a trained model; check the file"
        )


def _all_finite(tensor: torch.Tensor, block: int = 1 << 22) -> bool:
    """``torch.isfinite(tensor).all()``, a block at a time (its temporaries are 5 bytes an element)."""
    flat = tensor.reshape(-1)
    return all(bool(torch.isfinite(flat[i : i + block]).all()) for i in range(0, flat.numel(), block))


def _any_nonzero(tensor: torch.Tensor, block: int = 1 << 22) -> bool:
    flat = tensor.reshape(-1)
    return any(bool(flat[i : i + block].any()) for i in range(0, flat.numel(), block))


_GLOBAL = re.compile(r"(?:unsupported GLOBAL|Unsupported global: GLOBAL) ([\w.]+)")


def _unreadable_message(path: Path, brief: str) -> str:
    return (
        f"could not read checkpoint pretrained={str(path)!r} ({brief}). The file may be truncated or "
        "corrupt; expected a torch.save'd state dict, a .safetensors file or an OpenAI .pt."
    )


def _unpickling_message(path: Path, exc: pickle.UnpicklingError) -> str:
    """Our words for torch's ``weights_only`` rejection (whose advice to disable it is not passed on)."""
    found = _GLOBAL.search(str(exc))
    if found is None:
        return _unreadable_message(path, "UnpicklingError: not a file torch.save wrote")
    return (
        f"refusing to read pretrained={str(path)!r}: besides tensors it holds Python objects "
        f"({found.group(1)}), and unpickling those could run code. resclip reads weights only: save the "
        "model's state dict (torch.save(model.state_dict(), path)) or a .safetensors file instead."
    )


def _torch_load(path: Path) -> Any:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*TorchScript archive.*")
        warnings.filterwarnings("ignore", message=".*Validating sparse tensor invariants.*")
        return torch.load(path, map_location="cpu", weights_only=True)


def _brief(exc: BaseException, limit: int = 200) -> str:
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    return f"{type(exc).__name__}: {text[:limit]}"


def check_vit_clip(state: Mapping[str, torch.Tensor], path: Path) -> None:
    """Reject anything but a ViT CLIP with usable weights (see :func:`check_values`), in one line."""
    name = str(path)
    if not any(k.startswith("visual.") for k in state):
        sample = sorted(state)[:5]
        raise ValueError(
            f"pretrained={name!r} is not a CLIP checkpoint (no 'visual.*' weights; keys start with "
            f"{sample}). Only ViT CLIP checkpoints (OpenAI or open_clip format) are supported."
        )
    if any(k.startswith(("visual.layer1.", "visual.trunk.", "visual.attnpool.")) for k in state) or (
        "visual.conv1.weight" not in state
    ):
        raise ValueError(
            f"pretrained={name!r} holds a CLIP with a ResNet or timm vision tower; only ViT CLIP checkpoints "
            "(OpenAI or open_clip format, with visual.conv1 and visual.transformer) are supported."
        )
    check_values(state, path)


def load_strict(
    net: nn.Module, state: dict[str, torch.Tensor], path: Path, arch: str, inferred: bool
) -> None:
    if not hasattr(net, "positional_embedding") and "positional_embedding" in state:
        state = open_clip.model.convert_to_custom_text_state_dict(state)
    scale = getattr(net, "logit_scale", None)
    if isinstance(scale, torch.Tensor) and "logit_scale" in state and state["logit_scale"].numel() == 1:
        state["logit_scale"] = state["logit_scale"].reshape(scale.shape)
    problems = _state_diff(net.state_dict(), state)
    if problems:
        if inferred:
            hint = (
                "its layout is not a plain ViT CLIP that can be inferred; name the architecture with model="
            )
        else:
            hint = "the checkpoint is of another architecture; omit model= to infer it from the file"
        raise ValueError(f"pretrained={str(path)!r} does not fit model={arch!r}: {hint} ({problems})")
    # the model was built on the meta device: adopt the checkpoint's tensors instead of copying them
    net.load_state_dict(state, strict=True, assign=True)
    _restore_causal_masks(net)


def _restore_causal_masks(net: nn.Module) -> None:
    """Rebuild the non-persistent buffers a checkpoint lacks: open_clip's text ``attn_mask`` (causal)."""
    for module in net.modules():
        for name, buf in list(module._buffers.items()):
            if buf is None or not buf.is_meta:
                continue
            if name != "attn_mask" or buf.dim() != 2 or buf.shape[0] != buf.shape[1]:
                where = f"{name!r} {tuple(buf.shape)} of {type(module).__name__}"
                raise RuntimeError(f"cannot rebuild buffer {where}")
            module._buffers[name] = torch.full(tuple(buf.shape), float("-inf")).triu_(1)


def _state_diff(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> str:
    """Summarise how a state dict differs from a model's, or return '' if it fits."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(given[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in given and given[k].shape != v.shape
    ]
    parts = []
    for label, items in (
        ("shape mismatches", shapes),
        ("missing keys", missing),
        ("unexpected keys", unexpected),
    ):
        if items:
            parts.append(f"{len(items)} {label}, e.g. {'; '.join(items[:3])}")
    return ". ".join(parts)


def read_weights_file(path: Path, what: str, expected: str = "") -> Mapping[str, Any]:
    """A ``.pth`` / ``.pt`` / ``.bin`` / ``.safetensors`` file of another model's weights (``what``:
    ``"DINO"``, ``"SAM"``), tensors and plain containers only (nothing in it runs).

    Raises:
        ValueError: one line naming the file and what is wrong with it (``expected``: the files that
            would do).
    """
    import pickle

    hint = f"; expected {expected}" if expected else ""
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            obj = _torch_load(path)
    except pickle.UnpicklingError as exc:
        found = _GLOBAL.search(str(exc))
        if found is not None:
            raise ValueError(
                f"refusing to read the {what} checkpoint {str(path)!r}: besides tensors it holds Python "
                f"objects ({found.group(1)}), and unpickling those could run code; resclip reads weights "
                "only: save the model's state dict instead") from None
        raise ValueError(f"could not read the {what} checkpoint {str(path)!r} (UnpicklingError: not a file "
                         f"torch.save wrote){hint}") from None
    except Exception as exc:
        raise ValueError(
            f"could not read the {what} checkpoint {str(path)!r} ({_brief(exc)}){hint}") from None
    if not isinstance(obj, Mapping):
        raise ValueError(f"the {what} checkpoint {str(path)!r} holds a {type(obj).__name__}, not a state dict"
                         f"{hint}")
    return obj
