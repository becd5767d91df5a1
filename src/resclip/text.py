"""Class names, prompt templates and query (text) embeddings, with an on-disk embedding cache.

A *class* is one line of a class-name file; it may list several synonyms separated by commas, and every
synonym is a *query* with its own text embedding. Pixel probabilities are later merged over the queries of a
class (max), so ``ClassSpec.query_to_class`` maps each query to its class.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import threading
import warnings
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from .digest import tensor_digest
from .fileio import OutputError, atomic_write, cache_root

__all__ = [
    "TEMPLATES",
    "ClassSpec",
    "EmbeddingCache",
    "check_embeddings",
    "encode_queries",
    "parse_classes",
    "query_embeddings",
    "read_class_file",
    "text_fingerprint",
]

#: The 80 OpenAI ImageNet prompt templates (``"a bad photo of a {}."``, ...), as shipped by open_clip.
TEMPLATES: tuple[str, ...] = tuple(template("{}") for template in open_clip.OPENAI_IMAGENET_TEMPLATES)

Tokenizer = Callable[[list[str]], torch.Tensor]


@dataclass(frozen=True)
class ClassSpec:
    """Classes and their queries (synonyms).

    Attributes:
        names: one display name per class (its first synonym), length C.
        queries: every synonym of every class, class by class, length Q >= C.
        query_to_class: the class index of each query, length Q.
    """

    names: tuple[str, ...]
    queries: tuple[str, ...]
    query_to_class: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.queries) != len(self.query_to_class):
            raise ValueError("ClassSpec: queries and query_to_class must have the same length")
        if sorted(set(self.query_to_class)) != list(range(len(self.names))):
            raise ValueError("ClassSpec: query_to_class must use every class index 0..C-1")

    @property
    def num_classes(self) -> int:
        """Number of classes C."""
        return len(self.names)

    @property
    def num_queries(self) -> int:
        """Number of queries Q (all synonyms)."""
        return len(self.queries)


def parse_classes(classes: Sequence[str] | str | ClassSpec | np.ndarray) -> ClassSpec:
    """Parse class lines into classes and queries.

    Each class line holds one or more synonyms separated by commas, e.g. ``"person, man, woman"``;
    whitespace around each synonym is stripped. This equals the reference's split on ``", "`` for its
    class files (a trailing space there only changes the text before the prompt's period, which the CLIP
    tokenizer splits off anyway). A single string holds several classes separated by ``";"`` or newlines:
    ``"cat; sofa; sky, clouds"``.

    Duplicate class lines are kept (so class indices match the input) but trigger a ``UserWarning``, as
    does a synonym that appears in several classes.

    Args:
        classes: a sequence (or 1-D array) of class lines, one string of ``";"``/newline-separated
            classes, or a :class:`ClassSpec` (returned unchanged).

    Returns:
        The parsed classes.

    Raises:
        ValueError: no classes, an item that is not a string, or an empty class or synonym.

    Example:
        >>> spec = parse_classes(["sky, clouds", "cat"])
        >>> spec.queries, spec.query_to_class
        (('sky', 'clouds', 'cat'), (0, 0, 1))
    """
    if isinstance(classes, ClassSpec):
        return classes
    if isinstance(classes, str):
        lines = re.split(r"[;\n]", classes)
        while lines and not lines[-1].strip():
            lines.pop()
    elif isinstance(classes, (Sequence, np.ndarray)) and not isinstance(classes, bytes):
        lines = list(classes)
    else:
        raise ValueError(
            f"classes must be a list of class names or a ';'-separated string, got {type(classes).__name__}"
        )
    if not lines:
        raise ValueError("classes is empty: give at least one class name")
    names: list[str] = []
    queries: list[str] = []
    query_to_class: list[int] = []
    for index, line in enumerate(lines):
        if not isinstance(line, str):
            raise ValueError(f"classes[{index}] must be a string, got {type(line).__name__}: {line!r}")
        if not line.strip():
            raise ValueError(f"classes[{index}] is empty or whitespace only")
        synonyms = [part.strip() for part in line.split(",")]
        for position, synonym in enumerate(synonyms):
            if not synonym:
                raise ValueError(
                    f"classes[{index}] = {line!r} has an empty synonym at position {position} "
                    "(synonyms are separated by commas)"
                )
        names.append(synonyms[0])
        queries.extend(synonyms)
        query_to_class.extend([index] * len(synonyms))
    _warn_duplicates(lines, queries, query_to_class)
    return ClassSpec(tuple(names), tuple(queries), tuple(query_to_class))


def _same_text(name: str) -> str:
    """What CLIP's tokenizer sees: case and runs of whitespace do not matter."""
    return " ".join(name.split()).lower()


def _warn_duplicates(lines: Sequence[str], queries: Sequence[str], query_to_class: Sequence[int]) -> None:
    keys = [tuple(_same_text(part) for part in line.split(",")) for line in lines]
    repeated = [", ".join(key) for key, count in Counter(keys).items() if count > 1]
    if repeated:
        warnings.warn(
            f"duplicate class lines {repeated}: they are kept as separate classes with identical embeddings",
            UserWarning,
            stacklevel=3,
        )
        return
    owners: dict[str, set[int]] = {}
    for query, cls in zip(queries, query_to_class, strict=True):
        owners.setdefault(_same_text(query), set()).add(cls)
    shared = sorted(query for query, classes in owners.items() if len(classes) > 1)
    if shared:
        warnings.warn(f"synonyms {shared} appear in several classes", UserWarning, stacklevel=3)


def read_class_file(path: str | os.PathLike[str]) -> list[str]:
    """Read a class-name file: one class per line, synonyms separated by commas.

    Args:
        path: a UTF-8 text file (a byte-order mark is ignored; ``\\r\\n`` line ends are accepted).

    Returns:
        The lines, without line ends; trailing empty lines are dropped, other lines are kept as they are
        (empty ones then fail in :func:`parse_classes`, which also strips the synonyms).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not valid UTF-8.
    """
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"class file {os.fspath(path)!r} is not valid UTF-8 (byte {exc.start}); save it as UTF-8"
        ) from exc
    lines = [line.rstrip("\r") for line in text.split("\n")]
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


# --------------------------------------------------------------------------------------------------------
# encoding


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@torch.no_grad()
def encode_queries(
    model: nn.Module,
    tokenizer: Tokenizer,
    queries: Sequence[str],
    templates: Sequence[str] = TEMPLATES,
    *,
    batch_size: int = 256,
) -> torch.Tensor:
    """Embed each query as the normalised mean of its normalised prompt embeddings.

    For query q and templates t_1..t_T: ``e_q = normalise(mean_i normalise(encode_text(t_i.format(q))))``.
    A query too long for the text encoder's context in some prompt triggers a ``UserWarning``.

    Args:
        model: an open_clip CLIP (anything with ``encode_text``), in its own device and dtype.
        tokenizer: open_clip tokenizer of the model.
        queries: the Q query strings.
        templates: T format strings, each containing ``"{}"``.
        batch_size: prompts per ``encode_text`` call.

    Returns:
        (Q, D) float32 tensor on the model's device, rows of unit norm.

    Raises:
        ValueError: empty queries or templates, a template without ``"{}"``, or batch_size < 1.
    """
    embeddings, truncated = _encode(model, tokenizer, queries, templates, batch_size)
    _warn_truncated(truncated, stacklevel=3)
    return embeddings


def _encode(
    model: nn.Module, tokenizer: Tokenizer, queries: Sequence[str], templates: Sequence[str], batch_size: int
) -> tuple[torch.Tensor, dict[str, int]]:
    """:func:`encode_queries` without the warning: also returns ``{query: context length}`` for every
    query that was truncated in some prompt."""
    queries = list(queries)
    templates = list(templates)
    if not queries:
        raise ValueError("queries is empty")
    if not templates or any(not isinstance(t, str) or "{}" not in t for t in templates):
        raise ValueError("templates must be a non-empty list of strings that each contain '{}'")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    device = _model_device(model)
    prompts = [template.replace("{}", query) for query in queries for template in templates]
    encode_text = cast(Any, model).encode_text
    chunks = []
    truncated: dict[str, int] = {}
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        tokens = tokenizer(batch)
        for i in _truncated_rows(tokenizer, batch, tokens):
            truncated[queries[(start + i) // len(templates)]] = int(tokens.shape[-1])
        features = encode_text(tokens.to(device)).float()
        chunks.append(F.normalize(features, dim=-1))
    per_prompt = torch.cat(chunks).view(len(queries), len(templates), -1)
    return F.normalize(per_prompt.mean(dim=1), dim=-1), truncated


def _warn_truncated(truncated: dict[str, int], stacklevel: int) -> None:
    if truncated:
        warnings.warn(
            f"queries {sorted(truncated)} are longer than the text encoder's context of "
            f"{max(truncated.values())} tokens in some prompts and were truncated; shorten them",
            UserWarning,
            stacklevel=stacklevel + 1,
        )


def _truncated_rows(tokenizer: Tokenizer, prompts: Sequence[str], tokens: torch.Tensor) -> list[int]:
    """Rows whose prompt did not fit the context (the tokenizer silently truncates them)."""
    full = (tokens[:, -1] != 0).nonzero().flatten().tolist()  # rows with no padding left
    encode = getattr(tokenizer, "encode", None)
    if encode is None:
        return full
    context = tokens.shape[-1]
    return [row for row in full if len(encode(prompts[row])) + 2 > context]  # + start and end tokens


def text_fingerprint(model: nn.Module) -> str:
    """The sha256 of a CLIP's text tower, to key :class:`EmbeddingCache` entries.

    Digests the name, dtype, shape and every byte of each tensor outside ``visual.`` (a block at a time,
    see :mod:`resclip.digest`): two checkpoints share it only if their text towers are bit-identical.

    Args:
        model: an open_clip CLIP.

    Returns:
        A 64-character hex string.
    """
    return tensor_digest((n, t) for n, t in model.state_dict().items() if not n.startswith("visual."))


def _text_dim(model: nn.Module | None) -> int | None:
    """The embedding dimension D of a CLIP's text output, when it can be read off its projection."""
    proj = getattr(model, "text_projection", None) if model is not None else None
    if isinstance(proj, torch.Tensor) and proj.ndim == 2:
        return int(proj.shape[1])
    if isinstance(proj, nn.Linear):
        return int(proj.out_features)
    return None


# --------------------------------------------------------------------------------------------------------
# cache


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
    batch_size: int = 256,
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
    expected = dim if dim is not None else _text_dim(model)
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
    device = _model_device(model) if model is not None else torch.device("cpu")
    if missing:
        assert model is not None
        computed, long = _encode(model, tokenizer, missing, templates, batch_size)
        truncated.update(long)
        for query, row in zip(missing, computed, strict=True):
            found[query] = row
            if cache is not None:
                cache.put(fingerprint, query, templates, row, truncated=long.get(query, 0))
    _warn_truncated(truncated, stacklevel=2)
    return torch.stack([found[query].to(device) for query in spec.queries])


def check_embeddings(emb: torch.Tensor | np.ndarray, spec: ClassSpec, dim: int) -> torch.Tensor:
    """Validate user-supplied query embeddings.

    Args:
        emb: (Q, D) array, one row per query (synonym) in ``spec.queries`` order.
        spec: the classes.
        dim: the model's embedding dimension D.

    Returns:
        A float32 copy with L2-normalised rows, on ``emb``'s device.

    Raises:
        ValueError: not a float tensor/array, wrong shape, non-finite values or an all-zero row.
    """
    expected = (spec.num_queries, dim)
    if isinstance(emb, np.ndarray):
        if not (np.issubdtype(emb.dtype, np.number) or emb.dtype == np.bool_):
            raise ValueError(f"embeddings must be a float array of shape {expected}, got dtype {emb.dtype}")
        emb = torch.from_numpy(np.ascontiguousarray(emb))
    if not isinstance(emb, torch.Tensor):
        raise ValueError(
            f"embeddings must be a torch.Tensor or numpy array of shape {expected}, got {type(emb)}"
        )
    if not emb.is_floating_point():
        raise ValueError(f"embeddings must be floating point, got dtype {emb.dtype}")
    if tuple(emb.shape) != expected:
        hint = ""
        if emb.ndim == 2 and emb.shape[0] == spec.num_classes != spec.num_queries:
            hint = f" (one row per class was given; {spec.num_queries} queries need one row per synonym)"
        raise ValueError(
            f"embeddings must have shape (num_queries, dim) = {expected}, got {tuple(emb.shape)}{hint}"
        )
    emb = emb.detach().float()
    if not bool(torch.isfinite(emb).all()):
        raise ValueError("embeddings contain NaN or infinite values")
    norms = emb.norm(dim=-1)
    if bool((norms == 0).any()):
        rows = (norms == 0).nonzero().flatten().tolist()
        raise ValueError(f"embeddings rows {rows} are all zero and cannot be normalised")
    return emb / norms[:, None]
