"""Cryptographic digests of model weights and files: what keys the text cache and saved evaluation progress.

A *weights digest* is the sha256 of every tensor of a module, in name order: its name, dtype, shape and
raw bytes, fed to the hash a block at a time (no copy of the model is made; tensors on an accelerator are
copied to the host one block at a time). Two sets of weights share a digest only if they are bit-identical.
The visual and the text tower get separate digests (:func:`tower_digests`), so text embeddings depend on
the text tower alone.

Digesting a ViT-L/14 reads about 1.7 GB; for a checkpoint file the result is therefore remembered, keyed
by the file's identity (resolved path, size, mtime, ctime, inode and device) plus how it was loaded, in
this process and in ``<cache root>/digests.json``. Replacing the file in place, even keeping its size and
modification time, changes its ctime and so its key.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .fileio import OutputError, atomic_write_text, cache_root

__all__ = [
    "bytes_digest",
    "file_digest",
    "file_identity",
    "module_digest",
    "tensor_digest",
    "tower_digests",
    "weights_digests",
]

DIGEST_VERSION = 1
_BLOCK = 1 << 24  # bytes hashed per update (16 MiB)
_MEMO_FILE = "digests.json"
_MEMO_LIMIT = 256  # entries kept in the memo file (oldest dropped first)
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_memo: dict[str, tuple[str, str]] = {}
_memo_lock = threading.Lock()


def bytes_digest(data: bytes | memoryview) -> str:
    """sha256 hex digest of ``data``."""
    return hashlib.sha256(data).hexdigest()


def file_digest(path: str | os.PathLike[str]) -> str:
    """sha256 hex digest of a file's content, read a block at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _update(h: Any, tensor: torch.Tensor) -> None:
    flat = tensor.detach().reshape(-1)  # a view for the (usual) contiguous tensor
    if not flat.is_contiguous():
        flat = flat.contiguous()
    if flat.numel() == 0:
        return
    raw = flat.view(torch.uint8)
    for start in range(0, raw.numel(), _BLOCK):
        block = raw[start : start + _BLOCK]
        if block.device.type != "cpu":
            block = block.cpu()
        h.update(block.numpy().data)  # zero-copy for host tensors


def tensor_digest(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over ``(name, dtype, shape, bytes)`` of every tensor, in name order (64 hex characters)."""
    h = hashlib.sha256(f"resclip-weights-v{DIGEST_VERSION}\n".encode())
    for name, tensor in sorted(named, key=lambda item: item[0]):
        head = json.dumps([name, str(tensor.dtype), list(tensor.shape)], ensure_ascii=True)
        h.update(head.encode() + b"\n")
        _update(h, tensor)
    return h.hexdigest()


def module_digest(module: nn.Module) -> str:
    """:func:`tensor_digest` of a module's ``state_dict`` (parameters and persistent buffers)."""
    return tensor_digest(module.state_dict().items())


def tower_digests(model: nn.Module) -> tuple[str, str]:
    """Digests of a CLIP's visual tower (``model.visual``, names relative to it) and of everything else.

    The visual one equals :func:`module_digest` of ``model.visual``, so it can be recomputed from a
    segmenter's engine alone.
    """
    state = model.state_dict()
    visual = [(name[len("visual.") :], t) for name, t in state.items() if name.startswith("visual.")]
    text = [(name, t) for name, t in state.items() if not name.startswith("visual.")]
    return tensor_digest(visual), tensor_digest(text)


def file_identity(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What identifies a file's content without reading it: resolved path, size, times, inode, device."""
    resolved = Path(path).expanduser().resolve()
    st = os.stat(resolved)
    return {
        "path": str(resolved),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
        "inode": st.st_ino,
        "device": st.st_dev,
    }


def _memo_path() -> Path:
    return cache_root() / _MEMO_FILE


def _read_memo() -> dict[str, Any]:
    try:
        data = json.loads(_memo_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _valid(value: Any) -> tuple[str, str] | None:
    if (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(v, str) and _HEX64.match(v) for v in value)
    ):
        return value[0], value[1]
    return None


def weights_digests(
    model: nn.Module, source: dict[str, Any] | None = None, variant: str = ""
) -> tuple[str, str]:
    """``(visual, text)`` digests of ``model``, remembered per checkpoint file when ``source`` is given.

    Args:
        model: the loaded CLIP.
        source: :func:`file_identity` of the checkpoint it was loaded from, taken before loading and
            unchanged after (None: weights not from a local file, or the file changed while loading;
            the digests are then computed and not remembered).
        variant: how the file was loaded (architecture, precision...), part of the memo key.
    """
    if source is None:
        return tower_digests(model)
    key = bytes_digest(json.dumps([DIGEST_VERSION, source, variant], sort_keys=True).encode())
    with _memo_lock:
        hit = _memo.get(key)
    if hit is None:
        hit = _valid(_read_memo().get(key))
    if hit is None:
        hit = tower_digests(model)
        memo = _read_memo()
        memo.pop(key, None)
        memo[key] = list(hit)
        for old in list(memo)[: max(0, len(memo) - _MEMO_LIMIT)]:
            del memo[old]
        with contextlib.suppress(OutputError):  # only a speed-up: the next run digests the file again
            atomic_write_text(_memo_path(), json.dumps(memo, indent=0) + "\n")
    with _memo_lock:
        _memo[key] = hit
    return hit
