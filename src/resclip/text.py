"""Class names, prompt templates and query (text) embeddings, with an on-disk embedding cache.

One import point for three modules, one concern each: :mod:`resclip.classes` (class lists: parsing and
checks), :mod:`resclip.textencode` (templates and encoding) and :mod:`resclip.textcache` (the embedding
cache). A *class* is one line of a class-name file; it may list several synonyms separated by commas, and
every synonym is a *query* with its own text embedding.
"""

from __future__ import annotations

from .classes import ClassSpec, load_classes, parse_classes, read_class_file
from .textcache import EmbeddingCache, query_embeddings
from .textencode import TEMPLATES, check_embeddings, encode_queries, text_fingerprint

__all__ = [
    "TEMPLATES",
    "ClassSpec",
    "EmbeddingCache",
    "check_embeddings",
    "encode_queries",
    "load_classes",
    "parse_classes",
    "query_embeddings",
    "read_class_file",
    "text_fingerprint",
]
