"""The on-disk cache of query embeddings, and :func:`query_embeddings`, which reads it before encoding."""

from __future__ import annotations

import hashlib
import io
import json
import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .classes import ClassSpec
from .fileio import OutputError, atomic_write, cache_root
from .textencode import TEMPLATES, Tokenizer, encode_with_truncation, model_device, text_dim, warn_truncated

__all__ = ["EmbeddingCache", "query_embeddings"]




def _default_cache_dir() -> Path:
    return cache_root() / "text"


def _checksum(key: str, embedding: torch.Tensor, truncated: int) -> str:
    """sha256 of what an entry holds, stored with it and checked on every read."""
    head = json.dumps([key, str(embedding.dtype), list(embedding.shape), truncated]).encode()
    return hashlib.sha256(head + b"\n" + embedding.contiguous().numpy().tobytes()).hexdigest()


class EmbeddingCache:
    """Thread-safe cache of query embeddings: an in-memory LRU in front of one small file per entry.

    An entry is keyed by the sha256 of (model fingerprint, query, templates), so adding a class reuses the
    other classes' embeddings. Each file also holds the sha256 of its content (key, dtype, shape, values
    and whether the query was truncated); a read checks it and the embedding's shape ``(D,)``, dtype
    (float32) and finiteness, and a file that fails is ignored with a warning, recomputed and overwritten.
    Files are written atomically (:func:`resclip.fileio.atomic_write`), so concurrent processes can share
    a directory. If the directory cannot be written, the cache warns once and keeps working in memory.

    Args:
        directory: cache folder; default ``<cache root>/text`` (:func:`resclip.fileio.cache_root`:
            ``$RESCLIP_CACHE``, else ``$XDG_CACHE_HOME/resclip`` or ``~/.cache/resclip``).
        max_memory_items: entries kept in memory (least recently used are dropped first).
        disk: False keeps the cache in memory only.
    """

    FORMAT = 2

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        *,
        max_memory_items: int = 4096,
        disk: bool = True,
    ) -> None:
        if max_memory_items < 0:
            raise ValueError(f"max_memory_items={max_memory_items} must be >= 0")
        self.directory = Path(directory).expanduser() if directory is not None else _default_cache_dir()
        self.max_memory_items = max_memory_items
        self.disk = disk
        self._memory: OrderedDict[str, tuple[torch.Tensor, int]] = OrderedDict()
        self._lock = threading.RLock()
        self._disk_warned = False

    @staticmethod
    def key(fingerprint: str, query: str, templates: Sequence[str]) -> str:
        """The sha256 hex key of one entry."""
        payload = json.dumps([fingerprint, query, list(templates)], ensure_ascii=False)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def path(self, key: str) -> Path:
        """The file of the entry with this key."""
        return self.directory / f"{key}.pt"

    def __len__(self) -> int:
        return len(self._memory)

    def clear_memory(self) -> None:
        """Drop the in-memory entries (files stay)."""
        with self._lock:
            self._memory.clear()

    def get(
        self, fingerprint: str, query: str, templates: Sequence[str] = TEMPLATES, *, dim: int | None = None
    ) -> torch.Tensor | None:
        """Return the cached (D,) float32 CPU embedding, or None if absent or invalid.

        Args:
            dim: the expected D; an entry of another length is invalid (warned about, as a damaged file).
        """
        hit = self.lookup(fingerprint, query, templates, dim=dim)
        return hit[0] if hit is not None else None

    def lookup(
        self, fingerprint: str, query: str, templates: Sequence[str] = TEMPLATES, *, dim: int | None = None
    ) -> tuple[torch.Tensor, int] | None:
        """Like :meth:`get`, also returning the context length at which the query was truncated in some
        prompt when it was encoded (0: it was not)."""
        key = self.key(fingerprint, query, templates)
        with self._lock:
            if key in self._memory:
                embedding, truncated = self._memory[key]
                if dim is None or embedding.shape == (dim,):
                    self._memory.move_to_end(key)
                    return embedding, truncated
                del self._memory[key]
                warnings.warn(
                    f"ignoring a cached text embedding of {query!r} of length {embedding.shape[0]} "
                    f"(the model's is {dim}); recomputing it",
                    UserWarning,
                    stacklevel=3,
                )
            if not self.disk:
                return None
            hit = self._read(self.path(key), key, fingerprint, query, dim)
            if hit is not None:
                self._remember(key, hit)
            return hit

    def put(
        self,
        fingerprint: str,
        query: str,
        templates: Sequence[str],
        embedding: torch.Tensor,
        *,
        truncated: int = 0,
    ) -> None:
        """Store a (D,) embedding (kept as float32 on the CPU).

        Args:
            truncated: the context length at which the query was truncated in some prompt (0: it was not);
                a later hit repeats the warning.
        """
        if embedding.ndim != 1:
            raise ValueError(f"embedding must be 1-D (D,), got shape {tuple(embedding.shape)}")
        key = self.key(fingerprint, query, templates)
        value = embedding.detach().to("cpu", torch.float32).clone()
        truncated = int(truncated)
        with self._lock:
            self._remember(key, (value, truncated))
            if self.disk:
                entry = {
                    "format": self.FORMAT,
                    "fingerprint": fingerprint,
                    "query": query,
                    "embedding": value,
                    "truncated": truncated,
                    "checksum": _checksum(key, value, truncated),
                }
                self._write(self.path(key), entry)

    def _remember(self, key: str, value: tuple[torch.Tensor, int]) -> None:
        self._memory[key] = value
        self._memory.move_to_end(key)
        while len(self._memory) > self.max_memory_items:
            self._memory.popitem(last=False)

    @staticmethod
    def _read(
        path: Path, key: str, fingerprint: str, query: str, dim: int | None
    ) -> tuple[torch.Tensor, int] | None:
        if not path.is_file():
            return None
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(entry, dict) or entry.get("format") != EmbeddingCache.FORMAT:
                raise ValueError("not an entry of this resclip version")
            embedding, truncated = entry["embedding"], entry["truncated"]
            if entry["fingerprint"] != fingerprint or entry["query"] != query:
                raise ValueError("it belongs to another model or query")
            if (
                not isinstance(embedding, torch.Tensor)
                or embedding.dtype != torch.float32
                or embedding.ndim != 1
            ):
                raise ValueError("the embedding is not a 1-D float32 tensor")
            if dim is not None and embedding.shape[0] != dim:
                raise ValueError(f"the embedding has length {embedding.shape[0]}, the model's is {dim}")
            if not isinstance(truncated, int) or entry["checksum"] != _checksum(key, embedding, truncated):
                raise ValueError("checksum mismatch")
            if not bool(torch.isfinite(embedding).all()):
                raise ValueError("the embedding has NaN or infinite values")
        except Exception as exc:
            warnings.warn(
                f"ignoring unreadable text-embedding cache file {str(path)!r} ({type(exc).__name__}: {exc}); "
                "recomputing it",
                UserWarning,
                stacklevel=5,
            )
            return None
        return embedding, truncated

    def _write(self, path: Path, entry: dict[str, Any]) -> None:
        buffer = io.BytesIO()
        torch.save(entry, buffer)
        try:
            atomic_write(path, buffer.getvalue())
        except OutputError as exc:
            if not self._disk_warned:
                self._disk_warned = True
                warnings.warn(
                    f"cannot write the text-embedding cache in {str(self.directory)!r} ({exc}); "
                    "caching in memory only",
                    UserWarning,
                    stacklevel=4,
                )


def query_embeddings(
    model: nn.Module | None,
    tokenizer: Tokenizer,
    spec: ClassSpec,
    *,
    fingerprint: str,
    cache: EmbeddingCache | None,
    templates: Sequence[str] = TEMPLATES,
    batch_size: int = 64,
    dim: int | None = None,
) -> torch.Tensor:
    """Embeddings of every query of ``spec``, computed with :func:`encode_queries` or taken from ``cache``.

    A cached entry that fails its checks (see :class:`EmbeddingCache`) is recomputed and overwritten. A
    query that does not fit the text encoder's context is warned about whether or not it was cached.

    Args:
        model: an open_clip CLIP, or None when its text tower was released (every query must then be
            in ``cache``).
        tokenizer: its tokenizer.
        spec: the classes.
        fingerprint: identifies the model weights in cache keys (e.g. :func:`text_fingerprint`); two models
            with the same fingerprint must give the same embeddings.
        cache: where to look up and store embeddings, or None to always compute.
        templates: prompt templates.
        batch_size: prompts per ``encode_text`` call.
        dim: the embedding dimension D cached entries must have (default: read off ``model``'s text
            projection; without a model, every cached entry must at least have the same length).

    Returns:
        (Q, D) float32 tensor on the model's device, rows of unit norm, in ``spec.queries`` order.

    Raises:
        ValueError: ``model`` is None and some query is not in ``cache`` (or cached entries disagree in
            length).
    """
    unique = list(dict.fromkeys(spec.queries))
    expected = dim if dim is not None else text_dim(model)
    found: dict[str, torch.Tensor] = {}
    truncated: dict[str, int] = {}
    if cache is not None:
        for query in unique:
            hit = cache.lookup(fingerprint, query, templates, dim=expected)
            if hit is not None:
                found[query] = hit[0]
                if hit[1]:
                    truncated[query] = hit[1]
    lengths = {int(row.shape[0]) for row in found.values()}
    if model is None and len(lengths) > 1:
        raise ValueError(
            f"the cached text embeddings have different lengths {sorted(lengths)} and the text tower was "
            "released, so they cannot be recomputed: create a new segmenter"
        )
    missing = [query for query in unique if query not in found]
    if missing and model is None:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        shown = ", ".join(repr(q) for q in missing[:5]) + more
        raise ValueError(
            f"the text tower was released (Segmenter.release_text_tower()) and the embeddings of {shown} "
            "are not in the text cache: pass embeddings=... (e.g. from encode_classes() before the release) "
            "or create a new segmenter"
        )
    device = model_device(model) if model is not None else torch.device("cpu")
    if missing:
        assert model is not None
        computed, long = encode_with_truncation(model, tokenizer, missing, templates, batch_size)
        truncated.update(long)
        for query, row in zip(missing, computed, strict=True):
            found[query] = row
            if cache is not None:
                cache.put(fingerprint, query, templates, row, truncated=long.get(query, 0))
    warn_truncated(truncated, stacklevel=2)
    return torch.stack([found[query].to(device) for query in spec.queries])
