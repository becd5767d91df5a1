"""Label a whole source with one class list: the engines (one process, torchrun, Ray) and their
shared shard loop.

Every engine runs the same :func:`label_shards` on its shards, so the outputs are byte-identical
whichever engine (and however many workers) wrote them. In one process, background threads read
and decode the next images and encode (RLE, PNG) and write the finished ones while the model runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from .. import __version__
from ..fileio import atomic_write
from .sources import Item, Shard, SourceOptions, decode, list_shards, need
from .writer import (
    RECORD,
    check_record,
    failed_row,
    finished,
    mask_name,
    ok_row,
    remove_stale_temps,
    write_shard,
)

if TYPE_CHECKING:
    import numpy as np
    import torch

    from ..classes import ClassSpec
    from ..segmenter import Segmenter

ENGINES = ("local", "ray")


@dataclass(frozen=True)
class ModelSpec:
    """The :func:`resclip.create_segmenter` arguments, picklable (Ray actors build their own model).

    Attributes:
        overrides: ``(key, value)`` settings as :func:`resclip.factory.apply_overrides` takes them.
    """

    method: str = "naclip"
    rcs: bool | None = None  # None: wherever it can act (resclip.factory.default_modules)
    sfr: bool | None = None
    preset: str = "default"
    model: str | None = None
    pretrained: str | None = "openai"
    device: str = "auto"
    precision: str = "fp32"
    fidelity: str | None = None
    window_batch: int = 8
    overrides: tuple[tuple[str, Any], ...] = ()
    aux_pretrained: tuple[tuple[str, str], ...] = ()  # (kind, source) of DINO / SAM models

    def create(self, device: str | None = None) -> Segmenter:
        """The segmenter, on ``device`` (default: :attr:`device`)."""
        from ..factory import create_segmenter

        return create_segmenter(
            method=self.method, rcs=self.rcs, sfr=self.sfr, preset=self.preset, model=self.model,
            pretrained=self.pretrained, device=device or self.device, precision=self.precision,
            fidelity=cast(Any, self.fidelity), window_batch=self.window_batch,
            aux_pretrained=dict(self.aux_pretrained), **dict(self.overrides),
        )


@dataclass(frozen=True)
class LabelOptions:
    """How a job runs and what it writes.

    Attributes:
        save_masks: also write ``masks/<id>.png`` (class indices, palette colours).
        palette: palette of the mask PNGs (:data:`resclip.palettes.PALETTES`).
        workers: background threads decoding and writing per process (0: all in line).
        engine: ``"local"`` (one process, or one per rank under ``torchrun``) or ``"ray"``.
        address: Ray cluster address (``"auto"``...); None starts a local Ray.
        num_actors: Ray actors (default: one per GPU, else one per CPU of the cluster).
        progress: show a progress bar.
        regions: a folder of instance maps, ``<image id>.npz`` (CorrCLIP's pre-generated masks, key
            ``instance_mask``), ``.npy`` or ``.png`` per image, for a segmenter that reads regions
            (CorrCLIP, ``region_vote``); an image without one is a failed row naming it. Every
            worker (Ray actors included) reads it, so it must be at the same path on each machine.
    """

    save_masks: bool = False
    palette: str = "classes"
    workers: int = 2
    engine: str = "local"
    address: str | None = None
    num_actors: int | None = None
    progress: bool = True
    source: SourceOptions = field(default_factory=SourceOptions)
    regions: str | None = None

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"unknown engine {self.engine!r}; valid: {', '.join(ENGINES)}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        if self.num_actors is not None and self.num_actors < 1:
            raise ValueError(f"num_actors must be >= 1, got {self.num_actors}")


@dataclass(frozen=True)
class LabelContext:
    """What every worker needs to label a shard (picklable: sent to Ray actors).

    Attributes:
        embeddings: ``(Q, D)`` float32 query embeddings, computed once by the driver.
        record: the run record as JSON text (stored in every Parquet file's metadata).
    """

    out: str
    spec: ClassSpec
    embeddings: np.ndarray
    record: str
    save_masks: bool
    palette: str
    regions: str | None = None  # LabelOptions.regions


@dataclass(frozen=True)
class LabelSummary:
    """The outcome of :func:`label` (counts cover every shard of the source in ``out``).

    Attributes:
        failures: ``(id, reason)`` of every image that could not be labelled.
        new_images: images labelled by this call (the rest were finished before).
        seconds: the whole call (listing, model loading, text encoding, labelling).
        work_seconds: the labelling alone, model loading excluded (Ray: actors start within it).
    """

    out: str
    images: int
    failures: tuple[tuple[str, str], ...]
    shards: int
    skipped_shards: int
    new_images: int
    seconds: float
    work_seconds: float = 0.0
    rank: int = 0

    @property
    def images_per_second(self) -> float:
        """Images labelled per second of labelling (:attr:`work_seconds`, else :attr:`seconds`)."""
        seconds = self.work_seconds or self.seconds
        return self.new_images / seconds if seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON view (with ``images_per_second``)."""
        return {"out": self.out, "images": self.images, "failures": [list(f) for f in self.failures],
                "shards": self.shards, "skipped_shards": self.skipped_shards, "new_images": self.new_images,
                "seconds": self.seconds, "work_seconds": self.work_seconds,
                "images_per_second": self.images_per_second}

    def text(self) -> str:
        """A few lines for people: counts, speed, and the failures with their reasons."""
        ok = self.images - len(self.failures)
        lines = [f"labelled {ok} of {self.images} images in {self.shards} shards to {self.out} "
                 f"({self.new_images} new in {self.seconds:.1f} s, {self.images_per_second:.2f} images/s "
                 f"while labelling"
                 + (f"; {self.skipped_shards} shards were already done" if self.skipped_shards else "")
                 + ")"]
        if self.failures:
            lines.append(f"{len(self.failures)} failed:")
            lines += [f"  {id_}: {reason}" for id_, reason in self.failures[:50]]
            if len(self.failures) > 50:
                lines.append(f"  ... and {len(self.failures) - 50} more (column 'error' of the Parquet)")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------- shard loop

DECODE_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, MemoryError, RuntimeError)


def _errors() -> tuple[type[BaseException], ...]:
    from PIL import Image

    return (*DECODE_ERRORS, Image.DecompressionBombError)


def _reason(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _stream(shards: Sequence[Shard]) -> Iterator[tuple[Shard, Item | None]]:
    """Every item of every shard, then ``(shard, None)`` at each shard's end; a shard that breaks
    mid-way (a truncated tar) yields a failed item naming it and ends there."""
    for shard in shards:
        try:
            yield from ((shard, item) for item in shard.items())
        except Exception as err:  # tarfile / webdataset / pyarrow raise their own types for broken files
            reason = f"could not read the shard: {_reason(err)}"
            yield shard, Item(f"{shard.name}:{shard.describe()}", error=reason)
        yield shard, None


def label_shards(seg: Segmenter, ctx: LabelContext, emb: torch.Tensor, shards: Sequence[Shard],
                 workers: int = 2, on_image: Callable[[], None] | None = None) -> list[dict[str, Any]]:
    """Label ``shards`` in order and write each one's Parquet and manifest.

    A reader thread walks the shards and submits the decoding of each image to ``workers`` threads;
    the model runs on the calling thread; encoding (RLE, PNG) and writing run on the same threads,
    so the model never waits for I/O. ``workers=0`` does everything in line (same bytes).

    Args:
        emb: ``(Q, D)`` query embeddings on the segmenter's device.
        on_image: called once per image when its prediction is done (progress bars).

    Returns:
        The manifests of the shards, in order.
    """
    from ..palettes import class_palette
    from ..viz import mask_image

    out = Path(ctx.out)
    errors = _errors()
    spec = ctx.spec
    colours = class_palette(spec.names, ctx.palette)
    pool = ThreadPoolExecutor(workers, thread_name_prefix="resclip-label") if workers > 0 else None
    writer = ThreadPoolExecutor(1, thread_name_prefix="resclip-label-write") if workers > 0 else None

    def decoded(item: Item) -> tuple[Any, Any]:
        """The image and, with ``ctx.regions``, its instance map (read on the same worker thread)."""
        from ..regions import load

        if ctx.regions is None:
            return decode(item), None
        return decode(item), load(ctx.regions, item.id, strip_image_suffix=True)  # ids keep their suffix

    def encode(image_id: str, mask: np.ndarray) -> dict[str, Any]:
        import io

        name = None
        if ctx.save_masks:
            name = mask_name(image_id)
            png = io.BytesIO()
            mask_image(mask, spec.num_classes, colours).save(png, format="PNG")
            atomic_write(out / name, png.getvalue())
        return ok_row(image_id, mask, spec.num_classes, name)

    def finish(shard: Shard, rows: list[Future[dict[str, Any]]]) -> dict[str, Any]:
        return write_shard(out, shard.name, [r.result() for r in rows], ctx.record, shard.describe())

    def now(value: Any) -> Future[Any]:
        done: Future[Any] = Future()
        done.set_result(value)
        return done

    def submit(fn: Callable[..., Any], *args: Any, on: ThreadPoolExecutor | None = pool) -> Future[Any]:
        if on is None:
            try:
                return now(fn(*args))
            except BaseException as err:
                failed: Future[Any] = Future()
                failed.set_exception(err)
                return failed
        return on.submit(fn, *args)

    # the reader thread keeps up to 2 * workers + 2 images decoding ahead of the model
    ahead: queue.Queue[Any] = queue.Queue(maxsize=2 * workers + 2 if pool else 1)
    stop = threading.Event()
    end = object()

    def read() -> None:
        try:
            for shard, item in _stream(shards):
                if stop.is_set():
                    return
                ahead.put((shard, item, None if item is None else submit(decoded, item)))
        except BaseException as err:  # pragma: no cover - surfaced on the main thread
            ahead.put(err)
        finally:
            ahead.put(end)

    def take() -> Iterator[tuple[Shard, Item | None, Future[Any] | None]]:
        if pool is None:
            for shard, item in _stream(shards):
                yield shard, item, None if item is None else submit(decoded, item)
            return
        reader = threading.Thread(target=read, name="resclip-label-read", daemon=True)
        reader.start()
        while (got := ahead.get()) is not end:
            if isinstance(got, BaseException):
                raise got
            yield got

    manifests: list[Future[dict[str, Any]]] = []
    rows: list[Future[dict[str, Any]]] = []
    try:
        for shard, item, pending in take():
            if item is None or pending is None:  # the shard's end: write it in the background
                manifests.append(submit(finish, shard, rows, on=writer))
                rows = []
                continue
            try:
                rgb, regions = pending.result()
                mask = seg.predict(rgb, cast(Any, spec), embeddings=emb, regions=regions).mask
            except errors as err:
                rows.append(now(failed_row(item.id, _reason(err))))
            else:
                rows.append(submit(encode, item.id, mask))
            if on_image is not None:
                on_image()
        return [m.result() for m in manifests]
    finally:
        stop.set()
        while pool is not None and not ahead.empty():  # unblock the reader
            ahead.get_nowait()
        for ex in (pool, writer):
            if ex is not None:
                ex.shutdown(wait=True, cancel_futures=True)


def _check_regions(model: ModelSpec, options: LabelOptions) -> LabelOptions:
    """``options`` with its regions folder resolved; refused before any model loads when the folder
    is missing or the model reads no regions (:func:`resclip.factory.reads_regions`)."""
    if options.regions is None:
        return options
    from ..factory import reads_regions
    from ..regions import resolve_dir, unused_message

    if not reads_regions(model.method, model.preset, cast(Any, model.fidelity), **dict(model.overrides)):
        raise ValueError(unused_message(model.method, options.regions))
    return replace(options, regions=str(resolve_dir(options.regions)))


def _with_given_regions(model: ModelSpec, options: LabelOptions) -> ModelSpec:
    """With ``options.regions``, a method that makes its own instance maps reads the given ones
    (:func:`resclip.factory.given_regions_settings`: CorrCLIP's ``masks="given"``, no SAM 2 needed)."""
    if options.regions is None:
        return model
    from ..factory import given_regions_settings

    extra = given_regions_settings(model.method, dict(model.overrides))
    return replace(model, overrides=tuple(sorted({**dict(model.overrides), **extra}.items())))


# ------------------------------------------------------------------------------------------- driver


def _record(source: str, shards: Sequence[Shard], options: LabelOptions, seg: Segmenter,
            spec: ClassSpec, emb: np.ndarray) -> dict[str, Any]:
    return json.loads(json.dumps({
        "source": source,
        "shards": len(shards),
        "shard_size": options.source.shard_size,
        "classes": {"names": list(spec.names), "queries": list(spec.queries),
                    "query_to_class": list(spec.query_to_class)},
        "settings": seg.config.to_dict(),
        "visual_digest": seg.visual_digest,
        "text_fingerprint": seg.fingerprint,
        "embeddings_sha256": hashlib.sha256(emb.astype("<f4").tobytes()).hexdigest(),
        "output": {"save_masks": options.save_masks, "palette": options.palette,
                   **({"regions": os.path.abspath(options.regions)} if options.regions else {})},
        "resclip_version": __version__,
    }))


def _source_text(source: str | os.PathLike[str] | Sequence[str]) -> str:
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        return text if "{" in text else os.path.abspath(os.path.expanduser(text))
    return json.dumps([str(s) for s in source])


def _bar(total: int | None, show: bool, desc: str = "label") -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not show, dynamic_ncols=True, smoothing=0.1,
                file=sys.stderr)


def _images_in(shards: Sequence[Shard]) -> int | None:
    if any(s.kind == "wds" for s in shards):
        return None  # a tar's sample count is known only once read
    return sum(len(s.ids) if s.kind == "files" else s.stop - s.start for s in shards)


def run_label(source: str | os.PathLike[str] | Sequence[str], classes: Any, out: str | os.PathLike[str],
              model: ModelSpec, options: LabelOptions) -> LabelSummary:
    """:func:`label` with its settings gathered in frozen configs (the command calls this)."""
    from ..classes import parse_classes

    t0 = time.perf_counter()
    need("pyarrow.parquet")  # the output format: say what to install before any work
    spec = parse_classes(classes)
    shards = list_shards(source, options.source)
    model = _with_given_regions(model, options)
    options = _check_regions(model, options)
    out_dir = Path(out).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {str(out_dir)!r} is a file, expected a folder")
    random_weights = ("random weights (pretrained=None) differ in every process, so the labels of "
                      "different workers would not match: save one model with torch.save(model.state_dict(), "
                      "path) and pass that file as pretrained")
    if options.engine == "ray":
        from .ray_engine import check_ray

        if model.pretrained is None:
            raise ValueError(random_weights)
        check_ray()
        return _run_ray(source, spec, out_dir, shards, model, options, t0)
    from ..eval.distributed import all_reduce, distributed

    with distributed(model.device) as (info, device):
        if info.world_size > 1 and model.pretrained is None:
            raise ValueError(random_weights)
        seg = model.create(device)
        spec, emb = seg.encode_classes(cast(Any, spec))
        seg.release_text_tower()
        record = _record(_source_text(source), shards, options, seg, spec, emb.cpu().numpy())
        check_record(out_dir, record)  # before anything is written
        text = json.dumps(record, sort_keys=True)
        if info.rank == 0:
            remove_stale_temps(out_dir)  # a killed run's half-written files
            atomic_write(out_dir / RECORD, (json.dumps(record, indent=1, sort_keys=True) + "\n").encode())
        if info.world_size > 1:  # no rank writes before rank 0 has cleaned up
            import numpy as np
            import torch

            all_reduce(np.zeros(1, dtype=np.int64), torch.device(device))
        mine = [s for s in shards if s.index % info.world_size == info.rank]
        todo = [s for s in mine if finished(out_dir, s.name) is None]
        ctx = LabelContext(str(out_dir), spec, emb.cpu().numpy(), text, options.save_masks, options.palette,
                           options.regions)
        total = _images_in(todo)
        desc = f"label (rank 0 of {info.world_size})" if info.world_size > 1 else "label"
        bar = _bar(total, options.progress and info.rank == 0 and bool(todo), desc)
        count = [0]
        t1 = time.perf_counter()

        def tick() -> None:
            count[0] += 1
            bar.update(1)

        try:
            label_shards(seg, ctx, emb, todo, options.workers, on_image=tick)
        finally:
            bar.close()
        new, todo_all = count[0], len(todo)
        if info.world_size > 1:  # wait for every rank, and count what they did
            import numpy as np
            import torch

            counts = all_reduce(np.array([new, todo_all], dtype=np.int64), torch.device(device))
            new, todo_all = int(counts[0]), int(counts[1])
        t2 = time.perf_counter()
        return _summary(out_dir, shards, len(shards) - todo_all, new, t2 - t0, t2 - t1, info.rank)


def _summary(out: Path, shards: Sequence[Shard], skipped: int, new: int, seconds: float,
             work_seconds: float, rank: int = 0) -> LabelSummary:
    images, failures = 0, []
    for shard in shards:
        manifest = finished(out, shard.name)
        if manifest is None:
            raise RuntimeError(f"shard {shard.name} of {str(out)!r} was not finished; rerun the same command "
                               "to complete it")
        images += int(manifest["rows"])
        failures += [(str(i), str(r)) for i, r in manifest["failures"]]
    return LabelSummary(str(out), images, tuple(failures), len(shards), skipped, new, seconds, work_seconds,
                        rank)


def _run_ray(source: str | os.PathLike[str] | Sequence[str], spec: ClassSpec, out: Path,
             shards: Sequence[Shard], model: ModelSpec, options: LabelOptions, t0: float) -> LabelSummary:
    from .ray_engine import run_ray

    seg = model.create("cpu" if model.device == "auto" else model.device)  # settings and class embeddings
    spec, emb = seg.encode_classes(cast(Any, spec))
    record = _record(_source_text(source), shards, options, seg, spec, emb.cpu().numpy())
    check_record(out, record)
    remove_stale_temps(out)
    atomic_write(out / RECORD, (json.dumps(record, indent=1, sort_keys=True) + "\n").encode())
    todo = [s for s in shards if finished(out, s.name) is None]
    ctx = LabelContext(str(out), spec, emb.cpu().numpy(), json.dumps(record, sort_keys=True),
                       options.save_masks, options.palette, options.regions)
    del seg
    bar = _bar(_images_in(todo), options.progress and bool(todo))
    count = [0]

    def tick(manifest: dict[str, Any]) -> None:
        count[0] += int(manifest["rows"])
        bar.update(int(manifest["rows"]))

    t1 = time.perf_counter()
    try:
        run_ray(ctx, model, todo, options, on_shard=tick)
    finally:
        bar.close()
    t2 = time.perf_counter()
    return _summary(out, shards, len(shards) - len(todo), count[0], t2 - t0, t2 - t1)


def label(
    source: str | os.PathLike[str] | Sequence[str],
    classes: Any,
    out: str | os.PathLike[str],
    *,
    method: str = "naclip",
    rcs: bool | None = None,
    sfr: bool | None = None,
    preset: str = "default",
    model: str | None = None,
    pretrained: str | None = "openai",
    device: str = "auto",
    precision: str = "fp32",
    fidelity: str | None = None,
    window_batch: int = 8,
    save_masks: bool = False,
    palette: str = "classes",
    shard_size: int = 1000,
    workers: int = 2,
    engine: str = "local",
    address: str | None = None,
    num_actors: int | None = None,
    progress: bool = True,
    id_column: str | None = None,
    path_column: str | None = None,
    image_column: str | None = None,
    aux_pretrained: dict[str, str] | None = None,
    regions: str | os.PathLike[str] | None = None,
    **overrides: Any,
) -> LabelSummary:
    """Segment every image of ``source`` with ``classes`` and write sharded Parquet labels to ``out``.

    Resumable: rerunning the same call skips the shards already finished (their manifest names the
    sha256 of their Parquet file); an ``out`` folder labelled with another source, classes or
    settings is refused. Under ``torchrun`` every rank labels the shards ``i % world_size == rank``;
    with ``engine="ray"`` Ray actors (one model each) label the shards. The files are the same bytes
    whichever way they were made.

    Args:
        source: folder, glob, text file of paths, ``.tar`` (brace pattern) or ``.parquet`` (see
            :mod:`resclip.labelling.sources`), or a list of image paths.
        classes: ``"cat; sofa; sky, clouds"``, a list of class lines or a :class:`resclip.classes.ClassSpec`.
        out: output folder (layout and columns: :mod:`resclip.labelling.writer`).
        method ... window_batch, overrides: as :func:`resclip.create_segmenter` (``pretrained=None``:
            random weights).
        save_masks: also write ``out/masks/<id>.png``.
        shard_size: images per output file (a WebDataset tar is always one shard).
        workers: decoding / writing threads per process.
        engine: ``"local"`` or ``"ray"`` (``address``: a Ray cluster, default a local one).
        aux_pretrained: auxiliary models by kind, as :func:`resclip.create_segmenter`.
        regions: a folder of instance maps, one per image id (:attr:`LabelOptions.regions`).

    Returns:
        A :class:`LabelSummary`; failed images are in it with their reasons (the job goes on).

    Raises:
        ValueError: bad arguments, or ``out`` holds labels made with other settings.
        FileNotFoundError: the source does not exist or holds no images.
        resclip.labelling.sources.MissingExtra: pyarrow / webdataset / ray missing (names the pip command).
    """
    spec = ModelSpec(method, rcs, sfr, preset, model, pretrained, device, precision, fidelity, window_batch,
                     tuple(sorted(overrides.items())),
                     tuple(sorted((k, str(v)) for k, v in (aux_pretrained or {}).items())))
    options = LabelOptions(save_masks, palette, workers, engine, address, num_actors, progress,
                           SourceOptions(shard_size, id_column, path_column, image_column),
                           None if regions is None else os.fspath(regions))
    return run_label(source, classes, out, spec, options)
