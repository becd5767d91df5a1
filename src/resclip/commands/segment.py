"""`resclip segment`: segment photos with your own class names.

For every image ``<stem>.<ext>`` three files are written to ``--out``:

* ``<stem>_mask.png``: the class index of every pixel at the image's original size, as a palette
  PNG (VOC bit-pattern colours by default; index ``i`` is the ``i``-th class given). More than 256
  classes give a 16-bit grayscale PNG instead.
* ``<stem>_overlay.png``: the image with the class colours blended over it (``--alpha``), at its
  original size, with a legend of the classes present (and their pixel shares) to its right.
* ``<stem>.json``: the image size, every class with its synonyms, colour, pixel count and share,
  the full segmenter settings and the resclip version. No timestamps: the same input gives the same
  bytes.

Policies (all checked before the model loads, so nothing is written on a bad command line):

* inputs may be files, folders (their images, sorted by name, not recursive) and quoted globs
  (``"photos/**/*.jpg"``); a file named twice is processed once;
* two inputs with the same stem (``a/x.jpg`` and ``b/x.png``) would write the same files: that is an
  error naming both; give them separate ``--out`` folders;
* an image whose outputs are complete (all three files, the JSON naming the same settings) is
  skipped, so an interrupted run resumes; other existing output files are kept unless
  ``--overwrite``; the error names the first one found.

A bad image (unreadable, truncated, too thin) among several is reported on one line, the others are
still written, and the command exits with status 2 at the end. An image's three files are written
all-or-nothing: an output that cannot be written (a full disk, a read-only folder) is named on one
line, none of that image's files is left behind (no temporary files either), and the other images
go on. The model loads once and the class
embeddings are computed once for all images.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from ..fileio import atomic_write_all
from ..palettes import PALETTES
from ..results import OutputOptions
from .common import (
    UserError,
    add_model_arguments,
    add_regions_argument,
    check_regions,
    cli_warnings,
    regions_overrides,
    segmenter_from_args,
)

if TYPE_CHECKING:  # `resclip segment --help` must not import torch: heavy modules load in `run`
    import numpy as np
    import torch

    from ..classes import ClassSpec
    from ..segmenter import Segmenter, SegResult


def segment_array(seg: Segmenter, rgb: np.ndarray, classes: ClassSpec, text: torch.Tensor) -> np.ndarray:
    """:func:`resclip.eval.loop.segment_mask` (compare, attention and the demo use it from here)."""
    from ..eval.loop import segment_mask

    return segment_mask(seg, rgb, classes, text)


NAME = "segment"
HELP = "segment images with your own class names; writes a mask PNG, an overlay and a JSON per image"

IMAGE_SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".ppm", ".tif", ".tiff", ".webp")

DEFAULTS_NOTE = """\
Default method: NACLIP attention with RCS and SFR (= ResCLIP), the paper's strongest combination,
with the 'default' preset: the released ADE20K settings (the most varied scenes among the
benchmarks), i.e. short side resized to 336 px and 224-px sliding windows (stride 112), which suits
any photo size and aspect ratio, and no background threshold: every pixel gets one of your
classes, so add a catch-all such as 'background' or 'other' if parts of the photo match none.

Images: JPEG, PNG, TIFF, BMP, WebP...; 16-bit, CMYK, RGBA (composited on white), palette and
grayscale images are converted to RGB and EXIF orientation is applied, so masks match the photo as
viewers show it. Images smaller than a patch are scaled up like any other; every image is
resized for the network (the preset's 336-px short side, long side at most 2048 px) and the mask
is computed back at the original size in bands of rows, which bounds memory.

Resuming: an image whose three files already exist, with a JSON naming the same settings, classes,
palette and alpha, is skipped (the count is printed), so an interrupted run picks up where it
stopped; --overwrite redoes every image. Files are written all-or-nothing, so a half-written image
is never mistaken for a finished one.

Classes: --classes "cat; sofa; sky, clouds" (';' or newlines between classes, ',' between
synonyms; the first synonym names the class) or --class-file (UTF-8, one class per line). Empty
classes or synonyms are errors; duplicated classes, a comma with no space after it ('cat,dog' is
one class), a single class and names too long for the text encoder are warned about.

Exit status: 0 all images written; 2 bad input (the message says which), also when some of several
images failed (the others are written)."""


# ---------------------------------------------------------------------------------------------- helpers
# (shared with the compare, attention and demo commands)


def check_output(path: Path, overwrite: bool) -> None:
    """Refuse to replace an existing file unless ``overwrite``."""
    if path.exists() and not overwrite:
        raise UserError(f"{str(path)!r} exists; pass --overwrite to replace it (nothing was written)")
    if path.exists() and path.is_dir():
        raise UserError(f"{str(path)!r} is a folder, expected a file name")


def expand_inputs(items: Sequence[str]) -> list[Path]:
    """Files, folders (their images, sorted) and globs -> image paths, in order, without repeats.

    Raises:
        UserError: a path that does not exist, a folder without images, a glob matching none.
    """
    out: list[Path] = []
    seen: set[Path] = set()
    for item in items:
        path = Path(item).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise UserError(f"folder {item!r} holds no images ({' '.join(IMAGE_SUFFIXES)})")
        elif path.is_file():
            found = [path]
        elif glob.has_magic(item):
            found = sorted(Path(p) for p in glob.glob(os.path.expanduser(item), recursive=True)
                           if Path(p).is_file() and Path(p).suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise UserError(f"no images match {item!r}")
        else:
            raise UserError(f"image not found: {item!r}")
        for p in found:
            key = p.resolve()
            if key not in seen:
                seen.add(key)
                out.append(p)
    return out


@dataclass(frozen=True)
class Job:
    """One image and the files it writes (``probs`` only with ``--save-probs``)."""

    image: Path
    mask: Path
    overlay: Path
    json: Path

    @property
    def probs(self) -> Path:
        return self.json.with_name(self.json.stem + "_probs.npz")


def plan_jobs(images: Sequence[Path], out: Path, overwrite: bool) -> list[Job]:
    """Output names for every image: ``<stem>_mask.png``, ``<stem>_overlay.png``, ``<stem>.json``.

    Raises:
        UserError: two images with the same stem (compared case-insensitively, as on macOS and
            Windows file systems), an existing output without ``overwrite``, or ``out`` is a file.
    """
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {str(out)!r} is a file, expected a folder")
    owners: dict[str, Path] = {}
    jobs = []
    for image in images:
        stem = image.stem
        key = stem.casefold()
        if key in owners:
            raise UserError(f"{str(owners[key])!r} and {str(image)!r} would both write {stem}_mask.png: "
                            "rename one or segment them into different --out folders")
        owners[key] = image
        jobs.append(Job(image, out / f"{stem}_mask.png", out / f"{stem}_overlay.png", out / f"{stem}.json"))
    for job in jobs:
        if overwrite or finished_record(job) is not None:
            continue  # a finished image: skipped or refused by `split_finished` once settings are known
        for path in (job.mask, job.overlay, job.json):
            check_output(path, overwrite)
    return jobs


def finished_record(job: Job) -> dict[str, Any] | None:
    """The JSON record of ``job`` if its three files exist and the JSON parses, else None."""
    if not all(p.is_file() for p in (job.mask, job.overlay, job.json)):
        return None
    try:
        record = json.loads(job.json.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def expected_record(spec: ClassSpec, seg: Segmenter, opts: OutputOptions, job: Job,
                    regions_dir: str | None = None) -> dict[str, Any]:
    """What a finished image's JSON must hold for this run (settings, classes, output options and,
    with ``regions_dir``, the identity of the image's instance map)."""
    from ..regions import identity

    classes = [{"name": name, "synonyms": [q for q, c in zip(spec.queries, spec.query_to_class, strict=True)
                                           if c == index]}
               for index, name in enumerate(spec.names)]
    # through JSON, as the record was stored (tuples become lists)
    return json.loads(json.dumps({
        "settings": seg.config.to_dict(),
        "classes": classes,
        "output": opts.record(),
        "mask": job.mask.name,
        "overlay": job.overlay.name,
        # None without --regions: outputs made with given maps are not taken for a run without them
        "regions": identity(regions_dir, job.image.stem) if regions_dir is not None else None,
    }))


def split_finished(jobs: Sequence[Job], spec: ClassSpec, seg: Segmenter, opts: OutputOptions,
                   regions_dir: str | None = None) -> tuple[list[Job], list[Job]]:
    """(jobs to run, jobs already finished with these settings).

    Raises:
        UserError: a job whose files exist but were written with other settings or classes.
    """
    todo, done = [], []
    for job in jobs:
        record = finished_record(job)
        if record is None or (opts.save_probs and not job.probs.is_file()):
            todo.append(job)
            continue
        want = expected_record(spec, seg, opts, job, regions_dir)
        got = {key: record.get(key) for key in want}
        if key_classes := got.get("classes"):
            got["classes"] = [{"name": c.get("name"), "synonyms": c.get("synonyms")}
                              for c in key_classes if isinstance(c, dict)]
        if got != want:
            differ = ", ".join(k for k in want if got.get(k) != want[k])
            raise UserError(f"{str(job.json)!r} exists with other {differ}; pass --overwrite to replace "
                            "it (nothing was written)")
        done.append(job)
    return todo, done


# ------------------------------------------------------------------------------------------- outputs


def write_outputs(job: Job, result: SegResult, opts: OutputOptions, regions: str | None = None) -> None:
    """Write one image's files (:func:`resclip.results.output_files`), all or none.

    Raises:
        resclip.fileio.OutputError: naming the file that could not be written; none of the files is
            left behind (an existing one being replaced keeps its old content).
    """
    from ..results import output_files

    atomic_write_all(output_files(result, job.json.parent, job.json.stem, opts, image=job.image,
                                  regions=regions))


# ------------------------------------------------------------------------------------------- command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``resclip segment``."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = DEFAULTS_NOTE
    parser.add_argument("images", nargs="+", metavar="IMAGE",
                        help="image files, folders (their images, sorted) or quoted globs ('**' recurses)")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--classes", help="class names: 'cat; sofa; sky, clouds' (';' between classes, ',' "
                     "between synonyms)")
    src.add_argument("--class-file", help="UTF-8 text file, one class per line, synonyms separated by ','")
    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing output files (default: skip images already segmented "
                        "with the same settings, refuse other existing files)")
    parser.add_argument("--alpha", type=float, default=0.5,
                        help="colour weight of the overlay, 0..1 (default: 0.5)")
    parser.add_argument("--palette", choices=PALETTES, default="classes",
                        help="colours: classes (default: VOC colours, black only for a class named "
                        "background or ignore), voc (VOC bit palette: class 0 black) or distinct (bright "
                        "colours, many classes)")
    parser.add_argument("--format", choices=("png", "rle"), default="png",
                        help="png: the mask PNG holds the classes (default); rle: also each class's mask "
                        "as COCO run-length encoding in the JSON")
    parser.add_argument("--save-probs", action="store_true",
                        help="also write <stem>_probs.npz: the class probabilities as compressed float16")
    parser.add_argument("--unknown", type=float, default=None, metavar="P",
                        help="label pixels whose class probability is below P (0..1) 'unknown' (an extra "
                        "class after the given ones)")
    parser.add_argument("--workers", type=int, default=1,
                        help="background threads that decode the next images and write finished ones "
                        "while the model runs (default: 1; 0: all in the main thread)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    add_regions_argument(parser)
    add_model_arguments(parser, default_preset="default")


def run(args: argparse.Namespace) -> int:
    """Segment every image; returns 0, or 2 when some images failed."""
    from ..classes import load_classes

    if not 0.0 <= args.alpha <= 1.0:
        raise UserError(f"--alpha must be in [0, 1], got {args.alpha}")
    if args.workers < 0:
        raise UserError(f"--workers must be >= 0, got {args.workers}")
    if args.unknown is not None and not 0.0 < args.unknown <= 1.0:
        raise UserError(f"--unknown must be in (0, 1], got {args.unknown}")
    spec = load_classes(args.classes, args.class_file)
    images = expand_inputs(args.images)
    out = Path(args.out).expanduser()
    jobs = plan_jobs(images, out, args.overwrite)
    check_regions(args, [job.image.stem for job in jobs])  # before the model loads
    seg = segmenter_from_args(args, regions_overrides(args))
    spec, emb = seg.encode_classes(cast(Any, spec))
    seg.release_text_tower()  # the classes are fixed for the run: only the visual tower is needed
    skipped: list[Job] = []
    if not args.overwrite:
        jobs, skipped = split_finished(jobs, spec, seg, output_options(args), args.regions)
    if skipped and not args.quiet:
        n = len(skipped)
        print(f"skipped {n} image{'s' if n != 1 else ''} already segmented with these settings in "
              f"{args.out} (--overwrite redoes them)")
    out.mkdir(parents=True, exist_ok=True)
    return _process(jobs, seg, spec, emb, args)


def output_options(args: argparse.Namespace) -> OutputOptions:
    return OutputOptions(palette=args.palette, alpha=args.alpha, rle=args.format == "rle",
                         unknown=args.unknown, save_probs=args.save_probs)


def _process(jobs: Sequence[Job], seg: Segmenter, spec: ClassSpec, emb: torch.Tensor,
             args: argparse.Namespace) -> int:
    """Segment ``jobs`` in order. With ``--workers N`` > 0, N background threads decode the next
    images and encode and write the finished ones while the model runs (the same bytes as in-line)."""
    from concurrent.futures import Future, ThreadPoolExecutor

    from PIL import Image
    from tqdm import tqdm

    from ..preprocess import load_image
    from ..regions import load_with_identity

    if not jobs:
        return 0
    errors = (ValueError, OSError, RuntimeError, MemoryError, Image.DecompressionBombError)
    failed: list[str] = []

    def fail(job: Job, err: BaseException) -> None:
        message = str(err) if str(job.image) in str(err) else f"{str(job.image)!r}: {err}"
        if len(jobs) == 1:
            raise UserError(message) from err
        failed.append(str(job.image))
        tqdm.write(f"resclip: error: {message}; skipped", file=sys.stderr)

    opts = output_options(args)

    def write(job: Job, result: SegResult, regions: str | None) -> None:
        write_outputs(job, result, opts, regions)

    def read(job: Job) -> tuple[np.ndarray, np.ndarray | None, str | None]:
        """The image, and with --regions its instance map and the map's identity."""
        if not args.regions:
            return load_image(job.image), None, None
        labels, which = load_with_identity(args.regions, job.image.stem)
        return load_image(job.image), labels, which

    bar = tqdm(total=len(jobs), desc="segment", unit="image",
               disable=True if args.quiet or len(jobs) < 2 else None)
    pool = ThreadPoolExecutor(args.workers) if args.workers > 0 else None
    loads: dict[int, Future[tuple[np.ndarray, np.ndarray | None, str | None]]] = {}
    writes: list[tuple[Job, Future[None]]] = []
    try:
        for i, job in enumerate(jobs):
            if pool is not None:  # keep the next images decoding while this one runs
                for ahead in range(i, min(i + args.workers + 1, len(jobs))):
                    if ahead not in loads:
                        loads[ahead] = pool.submit(read, jobs[ahead])
            try:
                with cli_warnings():  # a fresh context per image: its warnings are shown for every image
                    rgb, regions, which = loads.pop(i).result() if pool is not None else read(job)
                    result = seg.predict(rgb, cast(Any, spec), embeddings=emb, regions=regions)
                if pool is not None:
                    writes.append((job, pool.submit(write, job, result, which)))
                else:
                    write(job, result, which)
            except errors as err:
                fail(job, err)
            bar.update(1)
        for job, pending in writes:
            try:
                pending.result()
            except errors as err:
                fail(job, err)
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    done = len(jobs) - len(failed)
    if failed:
        print(f"resclip: error: {len(failed)} of {len(jobs)} images failed ({', '.join(failed)}); "
              f"the other {done} were written to {str(args.out)!r}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(f"wrote {done} image{'s' if done != 1 else ''} to {args.out}")
    return 0
