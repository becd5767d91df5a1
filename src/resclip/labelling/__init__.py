"""Labelling at scale: segment millions of images with one class list into sharded Parquet.

Use :func:`resclip.label` (= :func:`label` here), or ``resclip label SOURCE --classes ... --out DIR``.
One process, ``torchrun`` and Ray Data write byte-identical files; a job resumes at shard
granularity. Sources: :mod:`resclip.labelling.sources`; output layout and columns:
:mod:`resclip.labelling.writer`; engines: :mod:`resclip.labelling.run` and
:mod:`resclip.labelling.ray_engine`. pyarrow and webdataset come with ``pip install 'resclip[label]'``,
Ray with ``pip install 'resclip[ray]'``.
"""

from __future__ import annotations

from .run import LabelOptions, LabelSummary, ModelSpec, label, run_label
from .sources import MissingExtra, SourceOptions, list_shards

__all__ = ["LabelOptions", "LabelSummary", "MissingExtra", "ModelSpec", "SourceOptions", "label",
           "list_shards", "run_label"]

