"""Class names, prompt templates and query (text) embeddings, with an on-disk embedding cache.

A *class* is one line of a class-name file; it may list several synonyms separated by commas, and every
synonym is a *query* with its own text embedding. Pixel probabilities are later merged over the queries of a
class (max), so ``ClassSpec.query_to_class`` maps each query to its class.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
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
    truncated: set[int] = set()
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        tokens = tokenizer(batch)
        truncated.update(start + i for i in _truncated_rows(tokenizer, batch, tokens))
        features = encode_text(tokens.to(device)).float()
        chunks.append(F.normalize(features, dim=-1))
    if truncated:
        long_queries = sorted({queries[i // len(templates)] for i in truncated})
        warnings.warn(
            f"queries {long_queries} are longer than the text encoder's context of {tokens.shape[-1]} tokens "
            "in some prompts and were truncated; shorten them",
            UserWarning,
            stacklevel=2,
        )
    per_prompt = torch.cat(chunks).view(len(queries), len(templates), -1)
    return F.normalize(per_prompt.mean(dim=1), dim=-1)


def _truncated_rows(tokenizer: Tokenizer, prompts: Sequence[str], tokens: torch.Tensor) -> list[int]:
    """Rows whose prompt did not fit the context (the tokenizer silently truncates them)."""
    full = (tokens[:, -1] != 0).nonzero().flatten().tolist()  # rows with no padding left
    encode = getattr(tokenizer, "encode", None)
    if encode is None:
        return full
    context = tokens.shape[-1]
    return [row for row in full if len(encode(prompts[row])) + 2 > context]  # + start and end tokens


def text_fingerprint(model: nn.Module) -> str:
    """A short hash of a CLIP's text tower, to key :class:`EmbeddingCache` entries.

    Hashes the name, shape and dtype of every non-``visual.`` parameter together with a few sampled values
    and its sum, so two checkpoints (or two random initialisations) get different fingerprints.

    Args:
        model: an open_clip CLIP.

    Returns:
        A 16-character hex string.
    """
    digest = hashlib.sha256()
    for name, param in model.state_dict().items():
        if name.startswith("visual.") or not param.is_floating_point():
            continue
        flat = param.detach().flatten()
        sample = flat[:: max(1, flat.numel() // 64)][:64].double().cpu()
        # summed a block at a time: a float64 copy of the token embedding alone would be ~300 MB (L/14)
        total = sum(float(flat[i : i + (1 << 20)].double().sum()) for i in range(0, flat.numel(), 1 << 20))
        digest.update(f"{name}|{tuple(param.shape)}|{param.dtype}|{total:.10e}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------------------------------------
# cache


def _default_cache_dir() -> Path:
    root = os.environ.get("RESCLIP_CACHE")
    if root:
        return Path(root).expanduser() / "text"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(xdg).expanduser() / "resclip" / "text"


class EmbeddingCache:
    """Thread-safe cache of query embeddings: an in-memory LRU in front of one small file per entry.

    An entry is keyed by the sha256 of (model fingerprint, query, templates), so adding a class reuses the
    other classes' embeddings. Files are written atomically (temporary file, then ``os.replace``), so
    concurrent processes can share a directory; an unreadable file is ignored with a warning and
    overwritten. If the directory cannot be written, the cache warns once and keeps working in memory.

    Args:
        directory: cache folder; default ``$RESCLIP_CACHE/text`` or ``~/.cache/resclip/text``.
        max_memory_items: entries kept in memory (least recently used are dropped first).
        disk: False keeps the cache in memory only.
    """

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
        self._memory: OrderedDict[str, torch.Tensor] = OrderedDict()
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

    def get(self, fingerprint: str, query: str, templates: Sequence[str] = TEMPLATES) -> torch.Tensor | None:
        """Return the cached (D,) float32 CPU embedding, or None if absent or unreadable."""
        key = self.key(fingerprint, query, templates)
        with self._lock:
            if key in self._memory:
                self._memory.move_to_end(key)
                return self._memory[key]
            if not self.disk:
                return None
            embedding = self._read(self.path(key), fingerprint, query)
            if embedding is not None:
                self._remember(key, embedding)
            return embedding

    def put(self, fingerprint: str, query: str, templates: Sequence[str], embedding: torch.Tensor) -> None:
        """Store a (D,) embedding (kept as float32 on the CPU)."""
        if embedding.ndim != 1:
            raise ValueError(f"embedding must be 1-D (D,), got shape {tuple(embedding.shape)}")
        key = self.key(fingerprint, query, templates)
        value = embedding.detach().to("cpu", torch.float32).clone()
        with self._lock:
            self._remember(key, value)
            if self.disk:
                self._write(self.path(key), {"fingerprint": fingerprint, "query": query, "embedding": value})

    def _remember(self, key: str, value: torch.Tensor) -> None:
        self._memory[key] = value
        self._memory.move_to_end(key)
        while len(self._memory) > self.max_memory_items:
            self._memory.popitem(last=False)

    @staticmethod
    def _read(path: Path, fingerprint: str, query: str) -> torch.Tensor | None:
        if not path.is_file():
            return None
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
            embedding = entry["embedding"]
            valid = (
                entry["fingerprint"] == fingerprint
                and entry["query"] == query
                and isinstance(embedding, torch.Tensor)
                and embedding.ndim == 1
                and embedding.dtype == torch.float32
                and bool(torch.isfinite(embedding).all())
            )
            if not valid:
                raise ValueError("unexpected content")
        except Exception as exc:
            warnings.warn(
                f"ignoring unreadable text-embedding cache file {str(path)!r} ({type(exc).__name__}: {exc}); "
                "recomputing it",
                UserWarning,
                stacklevel=4,
            )
            return None
        return cast(torch.Tensor, embedding)

    def _write(self, path: Path, entry: dict[str, Any]) -> None:
        tmp: str | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".pt")
            with os.fdopen(fd, "wb") as handle:
                torch.save(entry, handle)
            os.replace(tmp, path)
            tmp = None
        except OSError as exc:
            if not self._disk_warned:
                self._disk_warned = True
                warnings.warn(
                    f"cannot write the text-embedding cache in {str(self.directory)!r} ({exc}); "
                    "caching in memory only",
                    UserWarning,
                    stacklevel=4,
                )
        finally:
            if tmp is not None and os.path.exists(tmp):
                os.remove(tmp)


def query_embeddings(
    model: nn.Module | None,
    tokenizer: Tokenizer,
    spec: ClassSpec,
    *,
    fingerprint: str,
    cache: EmbeddingCache | None,
    templates: Sequence[str] = TEMPLATES,
    batch_size: int = 256,
) -> torch.Tensor:
    """Embeddings of every query of ``spec``, computed with :func:`encode_queries` or taken from ``cache``.

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

    Returns:
        (Q, D) float32 tensor on the model's device, rows of unit norm, in ``spec.queries`` order.

    Raises:
        ValueError: ``model`` is None and some query is not in ``cache``.
    """
    unique = list(dict.fromkeys(spec.queries))
    found: dict[str, torch.Tensor] = {}
    if cache is not None:
        for query in unique:
            hit = cache.get(fingerprint, query, templates)
            if hit is not None:
                found[query] = hit
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
        computed = encode_queries(model, tokenizer, missing, templates, batch_size=batch_size)
        for query, row in zip(missing, computed, strict=True):
            found[query] = row
            if cache is not None:
                cache.put(fingerprint, query, templates, row)
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
