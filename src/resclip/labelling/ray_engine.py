"""Label shards on a Ray cluster with Ray Data: one actor per model replica, a shard per call.

The dataset holds one row per unfinished shard (the pickled :class:`~resclip.labelling.sources.Shard`:
paths or a tar / Parquet slice, never image bytes, so the driver stays light at any scale);
``map_batches`` runs :class:`ShardLabeler`, a callable class that loads the model once per actor
and labels each shard with :func:`resclip.labelling.run.label_shards` (the same code as one process,
hence the same bytes), reading the images where it runs. Actors ask for one GPU each when the
cluster has GPUs, else one CPU each.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Sequence
from typing import Any

from .run import LabelContext, LabelOptions, ModelSpec, label_shards
from .sources import Shard, need

RAY_EXTRA = "pip install 'resclip[ray]'"


def check_ray() -> None:
    """Raise :class:`~resclip.labelling.sources.MissingExtra` (naming the pip command) without Ray Data."""
    need("ray.data", RAY_EXTRA)


class ShardLabeler:
    """Ray Data callable class: builds the segmenter once, then labels one shard per row.

    Args:
        ctx: the job (classes, ``(Q, D)`` embeddings, output folder, run record).
        model: the segmenter to build on this actor.
        device: ``"cuda"`` on a GPU actor, else ``"cpu"``.
        threads: torch threads of this actor (its CPUs); decoding threads: ``workers``.
    """

    def __init__(self, ctx: LabelContext, model: ModelSpec, device: str, threads: int, workers: int) -> None:
        import torch

        torch.set_num_threads(max(1, threads))
        self.ctx = ctx
        self.workers = workers
        self.seg = model.create(device)
        self.seg.release_text_tower()  # the driver's embeddings are used
        self.emb = torch.from_numpy(ctx.embeddings).to(self.seg.device, torch.float32)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        """``{"shard": [pickled Shard, ...]}`` -> ``{"shard", "rows", "failures"}`` per shard."""
        shards = [pickle.loads(bytes(b)) for b in batch["shard"]]
        manifests = label_shards(self.seg, self.ctx, self.emb, shards, self.workers)
        return {"shard": [m["shard"] for m in manifests], "rows": [m["rows"] for m in manifests],
                "failures": [len(m["failures"]) for m in manifests]}


def run_ray(ctx: LabelContext, model: ModelSpec, shards: Sequence[Shard], options: LabelOptions,
            on_shard: Callable[[dict[str, Any]], None] | None = None) -> None:
    """Label ``shards`` with Ray Data actors (a local Ray is started unless one is running or
    ``options.address`` names a cluster).

    Args:
        on_shard: called with ``{"shard", "rows", "failures"}`` as each shard finishes.
    """
    ray = need("ray", RAY_EXTRA)
    data = need("ray.data", RAY_EXTRA)
    if not shards:
        return
    if not ray.is_initialized():
        ray.init(address=options.address, include_dashboard=False, log_to_driver=False,
                 configure_logging=False) if options.address else ray.init(
            include_dashboard=False, log_to_driver=False, configure_logging=False)
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    cpus = max(1, int(resources.get("CPU", 1)))
    actors = options.num_actors or (gpus if gpus else cpus)
    actors = min(actors, len(shards), max(gpus, 1) if gpus else cpus)
    per_actor_cpus = 1 if gpus else max(1, cpus // actors)
    context = data.DataContext.get_current()
    context.enable_progress_bars = False
    # one block per shard and no all-to-all step: every CPU of a small cluster can go to the actors
    ds = data.from_items([{"shard": pickle.dumps(s)} for s in shards], override_num_blocks=len(shards))
    labelled = ds.map_batches(
        ShardLabeler,
        fn_constructor_kwargs={"ctx": ctx, "model": model, "device": "cuda" if gpus else "cpu",
                               "threads": per_actor_cpus, "workers": options.workers},
        batch_size=1,
        compute=data.ActorPoolStrategy(size=actors),
        num_gpus=1 if gpus else 0,
        num_cpus=per_actor_cpus,
    )
    try:
        for row in labelled.iter_rows():
            if on_shard is not None:
                on_shard(row)
    except ray.exceptions.RayError as err:  # an actor's exception, wrapped with Ray's traceback
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        last = lines[-1] if lines else type(err).__name__
        raise RuntimeError(f"a Ray actor failed: {last}; finished shards are kept, rerun the same command "
                           "to resume") from err
