"""Prompt templates and query (text) embeddings: the encoding half of :mod:`resclip.text`.

Every query is embedded as the normalised mean of its normalised prompt embeddings over the 80 OpenAI
ImageNet templates (as the papers do).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any, cast

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .classes import ClassListWarning, ClassSpec
from .digest import tensor_digest

__all__ = ["TEMPLATES", "Tokenizer", "check_embeddings", "encode_queries", "text_fingerprint"]

#: The 80 OpenAI ImageNet prompt templates (``"a bad photo of a {}."``, ...), as shipped by open_clip.
TEMPLATES: tuple[str, ...] = tuple(template("{}") for template in open_clip.OPENAI_IMAGENET_TEMPLATES)

Tokenizer = Callable[[list[str]], torch.Tensor]


def model_device(model: nn.Module) -> torch.device:
    """The device of a model's first parameter (CPU for a model without parameters)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")




@torch.no_grad()
def encode_queries(
    model: nn.Module,
    tokenizer: Tokenizer,
    queries: Sequence[str],
    templates: Sequence[str] = TEMPLATES,
    *,
    batch_size: int = 64,
    progress: bool | None = None,
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
        progress: a progress bar on stderr (prompts encoded, rate, time left); None: when stderr is
            a terminal (see :func:`encode_with_truncation`).

    Returns:
        (Q, D) float32 tensor on the model's device, rows of unit norm.

    Raises:
        ValueError: empty queries or templates, a template without ``"{}"``, or batch_size < 1.
    """
    embeddings, truncated = encode_with_truncation(model, tokenizer, queries, templates, batch_size,
                                                   progress=progress)
    warn_truncated(truncated, stacklevel=3)
    return embeddings


def encode_with_truncation(
    model: nn.Module, tokenizer: Tokenizer, queries: Sequence[str], templates: Sequence[str], batch_size: int,
    *, progress: bool | None = None,
) -> tuple[torch.Tensor, dict[str, int]]:
    """:func:`encode_queries` without the warning: also returns ``{query: context length}`` for every
    query that was truncated in some prompt.

    Encoding is the slow first step on a CPU (80 prompts per name through the text tower), so it
    reports progress in prompts: a bar when ``progress`` is True, or None and stderr is a terminal;
    with None and stderr not a terminal (logs, pipes), one status line when there is more than one
    batch."""
    queries = list(queries)
    templates = list(templates)
    if not queries:
        raise ValueError("queries is empty")
    if not templates or any(not isinstance(t, str) or "{}" not in t for t in templates):
        raise ValueError("templates must be a non-empty list of strings that each contain '{}'")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    device = model_device(model)
    prompts = [template.replace("{}", query) for query in queries for template in templates]
    encode_text = cast(Any, model).encode_text
    chunks = []
    truncated: dict[str, int] = {}
    what = f"encoding {len(queries)} class name{'s' if len(queries) != 1 else ''}"
    show = sys.stderr.isatty() if progress is None else progress
    if progress is None and not show and len(prompts) > batch_size:
        print(f"resclip: {what} ({len(prompts)} prompts)...", file=sys.stderr, flush=True)
    # every batch is shown (a batch takes about a second on a CPU): no rate limit on the refresh
    with tqdm(total=len(prompts), desc=what, unit="prompt", disable=not show, file=sys.stderr,
              leave=False, mininterval=0.0, miniters=1) as bar:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            tokens = tokenizer(batch)
            for i in _truncated_rows(tokenizer, batch, tokens):
                truncated[queries[(start + i) // len(templates)]] = int(tokens.shape[-1])
            features = encode_text(tokens.to(device)).float()
            chunks.append(F.normalize(features, dim=-1))
            bar.update(len(batch))
    per_prompt = torch.cat(chunks).view(len(queries), len(templates), -1)
    return F.normalize(per_prompt.mean(dim=1), dim=-1), truncated


def warn_truncated(truncated: dict[str, int], stacklevel: int) -> None:
    if truncated:
        warnings.warn(
            f"queries {sorted(truncated)} are longer than the text encoder's context of "
            f"{max(truncated.values())} tokens in some prompts and were truncated; shorten them",
            ClassListWarning,
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


def text_dim(model: nn.Module | None) -> int | None:
    """The embedding dimension D of a CLIP's text output, when it can be read off its projection."""
    proj = getattr(model, "text_projection", None) if model is not None else None
    if isinstance(proj, torch.Tensor) and proj.ndim == 2:
        return int(proj.shape[1])
    if isinstance(proj, nn.Linear):
        return int(proj.out_features)
    return None


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
