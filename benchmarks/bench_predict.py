#!/usr/bin/env python
"""Time and measure the memory of ``Segmenter.predict`` for every method, with and without RCS / SFR.

Every configuration runs in a fresh child process (this script with ``--child``), so that its peak
memory is its own; the parent only plans, collects and reports. Speed does not depend on weight
values, so the models are real-size (ViT-B/16, ViT-L/14) with random weights, and the text encoder is
left out: every query gets a precomputed random unit embedding.

Per configuration: median / min / max seconds per ``predict`` over ``--repeat`` runs after ``--warmup``
runs, the peak RSS and the peak over the RSS right after model creation, and page faults per image.
Ratios are measured side by side inside one child, with the runs interleaved (A B B A ...), so that a
drift of the machine's load cancels:

* ResCLIP (RCS + SFR; RCS alone for a method without attention scores) over its own baseline,
* batched windows (``window_batch`` 8) over one window at a time (sliding-window workload),
* the share of ``predict`` time spent in SFR (timed by wrapping the engine's SFR steps, and by the
  difference between the RCS and RCS + SFR rows).

Examples::

    python benchmarks/bench_predict.py --quick
    python benchmarks/bench_predict.py --models "ViT-B-16,ViT-L-14@voc21/naclip" --repeat 3
    python benchmarks/bench_predict.py --device cuda --precision fp16 --throughput 1000 --no-table
    python benchmarks/bench_predict.py --quick \
        --malloc-env "MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=1073741824"
"""

from __future__ import annotations

import argparse
import ast
import datetime as dt
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SCHEMA = 1

ALL_METHODS = ("clearclip", "clip", "maskclip", "naclip", "sclip", "sc_clip", "sfp")
# Methods measured under their own repository's presets (``METHOD/WORKLOAD``, e.g. ``sc_clip/voc21``:
# that release's protocol, sliding windows for every dataset, and its class file where it ships one).
OWN_PRESET_METHODS = frozenset({"sc_clip", "sfp"})
# Methods whose last block has no attention scores (identity attention): SFR cannot apply to them.
SFR_UNSUPPORTED = frozenset({"maskclip"})
VARIANTS: dict[str, tuple[bool, bool]] = {
    "base": (False, False),
    "rcs": (True, False),
    "sfr": (False, True),
    "rcs+sfr": (True, True),
}
ENV_KEYS = re.compile(r"^(MALLOC_\w*|LD_PRELOAD|GLIBC_TUNABLES|OMP_NUM_THREADS|MKL_NUM_THREADS|PYTORCH_\w*)$")
TEXT_NOTE = (
    "text encoder excluded: every query gets a precomputed random unit embedding (seeded), "
    "passed as predict(..., embeddings=...)"
)

LEGEND = {
    "median_s/min_s/max_s": "wall seconds per predict over --repeat runs after --warmup runs",
    "cpu_s_median": "process CPU seconds (user + system, all threads) per predict",
    "stall": "median fraction of a run's wall time during which some task waited for a CPU (Linux PSI); "
    "above ~0.05 the machine was contended by other processes",
    "peak_rss_mib": "absolute peak RSS of the child (ru_maxrss), model creation included",
    "predict_peak_rss_mib": "peak RSS during the predict runs (high-water mark reset after model creation)",
    "predict_peak_over_model_mib": "predict_peak_rss_mib minus the RSS right after model creation",
    "minor_faults_per_image": "minor page faults per predict (memory given back to the OS, faulted in again)",
    "ratio": "time ratio of medians of interleaved runs (A B B A ...) in one process",
    "ratio_of_min": "time ratio of the minima of the same runs (less sensitive to load from other processes)",
}


@dataclass(frozen=True)
class Workload:
    """One benchmark workload: a preset (protocol + RCS/SFR settings) and its class file."""

    name: str
    preset: str
    class_file: str
    description: str


WORKLOADS: dict[str, Workload] = {
    "voc21": Workload("voc21", "voc21", "voc21.txt", "VOC21 protocol: whole image, short side 336"),
    "context60": Workload(
        "context60", "context60", "context60.txt", "Context60 protocol: short side 336, sliding 224/112"
    ),
    "ade20k": Workload("ade20k", "ade20k", "ade20k.txt", "ADE20K protocol: short side 336, sliding 224/112"),
}


# ============================================================================== synthetic image


def synthetic_image(
    height: int, width: int, seed: int = 0, out: np.ndarray | None = None, regions: int = 16
) -> np.ndarray:
    """A deterministic natural-looking RGB image: warped smooth regions, shading, texture and noise.

    Generated in bands of 64 rows (each band's noise has its own seed), so a huge image needs only
    the output array plus a few band-sized temporaries, and any size is reproducible.

    Args:
        height, width: size in pixels.
        seed: all randomness derives from it.
        out: optional ``(height, width, 3)`` uint8 array to fill (else one is allocated).
        regions: number of smooth regions.

    Returns:
        ``(height, width, 3)`` uint8.
    """
    if out is None:
        out = np.empty((height, width, 3), dtype=np.uint8)
    if out.shape != (height, width, 3) or out.dtype != np.uint8:
        raise ValueError(f"out must be a ({height}, {width}, 3) uint8 array, got {out.shape} {out.dtype}")
    rng = np.random.default_rng(seed)
    centres = rng.random((regions, 2)).astype(np.float32)
    base = rng.uniform(30, 225, (regions, 3)).astype(np.float32)
    grad = rng.uniform(-60, 60, (regions, 2, 3)).astype(np.float32)
    texture = rng.uniform(0, 10, regions).astype(np.float32)
    phase = rng.random(6).astype(np.float32) * np.float32(2 * math.pi)
    two_pi = np.float32(2 * math.pi)
    xx = ((np.arange(width, dtype=np.float32) + 0.5) / width)[None, :]
    band = 64
    for block, y0 in enumerate(range(0, height, band)):
        y1 = min(height, y0 + band)
        yy = ((np.arange(y0, y1, dtype=np.float32) + 0.5) / height)[:, None]
        wy = (
            yy
            + 0.04 * np.sin(two_pi * 3 * xx + phase[0])
            + 0.03 * np.sin(two_pi * (5 * yy + 2 * xx) + phase[1])
        )
        wx = (
            xx
            + 0.04 * np.sin(two_pi * 4 * yy + phase[2])
            + 0.03 * np.sin(two_pi * (3 * xx - 2 * yy) + phase[3])
        )
        best = np.full(wy.shape, np.inf, dtype=np.float32)
        label = np.zeros(wy.shape, dtype=np.int16)
        for k in range(regions):
            d = (wy - centres[k, 0]) ** 2 + (wx - centres[k, 1]) ** 2
            closer = d < best
            best = np.where(closer, d, best)
            label[closer] = k
        dy = (wy - centres[label, 0])[..., None]
        dx = (wx - centres[label, 1])[..., None]
        rgb = base[label] + dy * grad[label, 0] + dx * grad[label, 1]
        shade = 18 * np.sin(two_pi * (1.3 * xx + 0.7 * yy) + phase[4])
        tex = texture[label] * np.sin(two_pi * 40 * wx + phase[5]) * np.sin(two_pi * 37 * wy)
        rgb += (shade + tex)[..., None]
        noise = np.random.default_rng([seed, block]).standard_normal(rgb.shape, dtype=np.float32)
        rgb += 4.0 * noise
        np.clip(rgb + 0.5, 0, 255, out=rgb)
        out[y0:y1] = rgb.astype(np.uint8)
    return out


# ============================================================================== process measurements


def current_rss_bytes() -> int:
    """Resident set size now (Linux ``/proc/self/statm``; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def maxrss_bytes() -> int:
    """``ru_maxrss`` of this process in bytes (kB on Linux, bytes on macOS)."""
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(value) if sys.platform == "darwin" else int(value) * 1024


def reset_peak_rss() -> bool:
    """Reset the peak-RSS high-water mark (Linux ``clear_refs`` 5; it also resets ``ru_maxrss``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def page_faults() -> tuple[int, int]:
    """(minor, major) page faults of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return int(usage.ru_minflt), int(usage.ru_majflt)


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far (all threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return float(usage.ru_utime + usage.ru_stime)


def cpu_pressure() -> dict[str, float] | None:
    """Linux PSI ``some`` CPU pressure (percent of time runnable tasks waited for a CPU), if available."""
    try:
        first = Path("/proc/pressure/cpu").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    return {k: float(v) for k, v in (item.split("=") for item in first[1:]) if k.startswith("avg")}


def psi_stall_us() -> int | None:
    """Cumulative microseconds during which some runnable task waited for a CPU (Linux PSI), if available."""
    try:
        first = Path("/proc/pressure/cpu").read_text().splitlines()[0]
        return int(first.rsplit("total=", 1)[1])
    except (OSError, IndexError, ValueError):
        return None


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs from ``/proc/stat``."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, IndexError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


def busy_fraction(seconds: float = 0.5) -> float | None:
    """Fraction of all CPUs busy during the next ``seconds`` (None where ``/proc/stat`` is missing)."""
    a = _cpu_times()
    time.sleep(seconds)
    b = _cpu_times()
    if a is None or b is None or b[1] <= a[1]:
        return None
    return (b[0] - a[0]) / (b[1] - a[1])


def wait_quiet(threshold: float | None, max_wait: float) -> float:
    """Sleep until the CPUs are mostly idle (busy fraction below ``threshold``); returns seconds waited.

    Called while this process does nothing, so the busy CPUs are other processes' load.
    """
    if threshold is None or max_wait <= 0:
        return 0.0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < max_wait:
        frac = busy_fraction(0.5)
        if frac is None or frac < threshold:
            break
    return time.perf_counter() - t0


def mib(n: float) -> float:
    return round(n / 2**20, 1)


def summary(times: Sequence[float], stalls: Sequence[float | None] = ()) -> dict[str, Any]:
    """Median / min / max of run times; ``stall`` is the median CPU-stall fraction during the runs."""
    known = [x for x in stalls if x is not None]
    return {
        "times_s": [round(t, 4) for t in times],
        "median_s": round(statistics.median(times), 4),
        "min_s": round(min(times), 4),
        "max_s": round(max(times), 4),
        "stall": round(statistics.median(known), 3) if known else None,
    }


# ============================================================================== environment


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError):
        pass
    return None


def machine_info() -> dict[str, Any]:
    """The host as far as it matters for timings (no torch import: the parent stays light)."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    libc = " ".join(platform.libc_ver()).strip()
    return {
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "mem_total_gib": mem_total_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "libc": libc,
    }


def machine_slug(device: str) -> str:
    cpu = re.sub(r"\(.*?\)|processor|cpu|\d+-core", " ", cpu_model().lower())
    cpu = "-".join(re.findall(r"[a-z0-9]+", cpu)[:3]) or "cpu"
    return f"{cpu}-{os.cpu_count()}c" + ("" if device == "cpu" else f"-{device.split(':')[0]}")


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in ("torch", "open_clip_torch", "numpy", "opencv-python-headless", "resclip"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def relevant_env(env: dict[str, str] | os._Environ[str]) -> dict[str, str]:
    """Allocator and threading variables of an environment."""
    return {k: v for k, v in sorted(env.items()) if ENV_KEYS.match(k)}


def parse_env_assignments(text: str) -> dict[str, str]:
    """``"A=1 B=2"`` -> ``{"A": "1", "B": "2"}``."""
    out: dict[str, str] = {}
    for item in shlex.split(text):
        name, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_]\w*", name):
            raise argparse.ArgumentTypeError(f"--malloc-env: expected NAME=VALUE items, got {item!r}")
        out[name] = value
    return out


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


@dataclass
class Measured:
    """One call measured by :func:`measure_call` (bytes and seconds; stall None without Linux PSI)."""

    wall_s: float
    cpu_s: float
    stall: float | None
    peak_before: int  # ru_maxrss before the call (the process's peak so far)
    peak: int  # ru_maxrss after it (since the reset when ``reset_ok``)
    reset_ok: bool
    minor_faults: int
    major_faults: int
    load_before: list[float] | None


def measure_call(fn: Callable[[], Any], sync: Callable[[], None] | None = None) -> tuple[Any, Measured]:
    """Run ``fn`` once with the peak-RSS mark reset first, measuring wall and CPU seconds, the share
    of the wall time spent waiting for a CPU, page faults and the peak RSS (``sync`` waits for a GPU)."""
    peak_before = maxrss_bytes()
    reset_ok = reset_peak_rss()
    faults0, c0, p0 = page_faults(), cpu_seconds(), psi_stall_us()
    load_before = load_average()
    t0 = time.perf_counter()
    out = fn()
    if sync is not None:
        sync()
    wall = time.perf_counter() - t0
    p1, cpu_s, faults1 = psi_stall_us(), cpu_seconds() - c0, page_faults()
    stall = round((p1 - p0) / 1e6 / wall, 3) if p0 is not None and p1 is not None else None
    return out, Measured(wall, cpu_s, stall, peak_before, maxrss_bytes(), reset_ok,
                         faults1[0] - faults0[0], faults1[1] - faults0[1], load_before)


def peak_memory(m: Measured) -> dict[str, Any]:
    """The peak-RSS fields (MiB) of one measured ``predict`` that every benchmark report holds."""
    return {
        "peak_before_predict_mib": mib(m.peak_before),
        "peak_rss_mib": mib(max(m.peak_before, m.peak)),
        "predict_peak_rss_mib": mib(m.peak),
        "peak_reset_before_predict": m.reset_ok,
        "minor_faults": m.minor_faults,
        "major_faults": m.major_faults,
    }


def report_header(benchmark: str, schema: int, started: dt.datetime,
                  argv: list[str] | None) -> dict[str, Any]:
    """The fields every benchmark report opens with: what ran, when, on which machine and packages."""
    return {
        "schema": schema,
        "benchmark": benchmark,
        "date": started.isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]) if argv is None else shlex.join(argv),
        "machine": machine_info(),
        "packages": package_versions(),
    }


# ============================================================================== child side


def _sync(device: str) -> Callable[[], None]:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.synchronize
    return lambda: None


def _class_file(name: str) -> Path:
    import resclip

    return Path(resclip.__file__).parent / "data" / "class_names" / name


def _random_embeddings(num_queries: int, dim: int, seed: int) -> Any:
    import torch

    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(num_queries, dim, generator=g)
    return emb / emb.norm(dim=-1, keepdim=True)


def _register_configs(paths: Sequence[str]) -> None:
    import open_clip

    for p in paths:
        open_clip.add_model_config(p)


def _make_segmenter(spec: dict[str, Any], rcs: bool, sfr: bool, window_batch: int | None = None) -> Any:
    import torch

    import resclip

    overrides: dict[str, Any] = dict(spec.get("overrides") or {})
    if spec.get("rcs_layers"):
        overrides["rcs_layers"] = tuple(spec["rcs_layers"])
    torch.manual_seed(spec["seed"])
    return resclip.create_segmenter(
        spec["method"],
        rcs=rcs,
        sfr=sfr,
        preset=spec["preset"],
        model=spec["model"],
        pretrained=spec.get("pretrained"),
        device=spec["device"],
        precision=spec["precision"],
        window_batch=window_batch or spec["window_batch"],
        text_cache=False,
        trunk_attention=spec.get("trunk_attention"),
        **overrides,
    )


def _mask_digest(mask: np.ndarray) -> str:
    import hashlib

    return hashlib.sha1(np.ascontiguousarray(mask).tobytes()).hexdigest()[:16]


class RunClock:
    """Times runs (synchronised on CUDA), records the CPU-stall fraction during each, and can wait
    before each run until the machine is quiet (``threshold`` of the stall fraction, ``max_wait`` s)."""

    def __init__(
        self, sync: Callable[[], None], threshold: float | None = None, max_wait: float = 0.0
    ) -> None:
        self.sync = sync
        self.threshold = threshold
        self.max_wait = max_wait
        self.waited_s = 0.0

    def run(self, fn: Callable[[], Any]) -> tuple[float, float | None, Any]:
        """Returns (seconds, stall fraction during the run or None, result)."""
        self.waited_s += wait_quiet(self.threshold, self.max_wait)
        self.sync()
        p0 = psi_stall_us()
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        seconds = time.perf_counter() - t0
        p1 = psi_stall_us()
        stall = (p1 - p0) / 1e6 / seconds if p0 is not None and p1 is not None and seconds > 0 else None
        return seconds, stall, out

    def interleaved(
        self, runs: dict[str, Callable[[], Any]], repeat: int, warmup: dict[str, int]
    ) -> dict[str, Any]:
        """Time several callables side by side: warm-up runs, then ``repeat`` rounds in A B / B A order.

        Returns:
            ``{name: summary}`` plus ``"digests"``: the digest of each name's last mask.
        """
        names = list(runs)
        for name in names:
            for _ in range(warmup.get(name, 0)):
                runs[name]()
        times: dict[str, list[float]] = {n: [] for n in names}
        stalls: dict[str, list[float | None]] = {n: [] for n in names}
        digests: dict[str, str] = {}
        for r in range(repeat):
            for name in names if r % 2 == 0 else names[::-1]:
                t, stall, res = self.run(runs[name])
                times[name].append(t)
                stalls[name].append(stall)
                digests[name] = _mask_digest(res.mask)
        out: dict[str, Any] = {n: summary(times[n], stalls[n]) for n in names}
        out["digests"] = digests
        return out


def _ratio(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
    return {
        "ratio": round(a["median_s"] / b["median_s"], 4),
        "ratio_of_min": round(a["min_s"] / b["min_s"], 4),
    }


class _SFRClock:
    """Times the SFR steps of ``DenseEngine.window_logits`` by wrapping the functions it calls.

    SFR adds to a window batch: a first last-block pass (attention, block output, projection, patch
    logits: the first call of each inside a ``window_logits`` call), the first-pass pixel labels
    (upsampling, PAMR, softmax, argmax), the patch label map, and the refinement scores (path check,
    distance decay, smoothing, normalisation). The mix into the second pass's scores is not counted.
    """

    FIRST_PASS = ("attend", "last_block_output", "project_tokens", "patch_logits")

    def __init__(self, sync: Callable[[], None], sfr_on: bool) -> None:
        self.sync = sync
        self.sfr_on = sfr_on
        self.total: dict[str, float] = {}
        self.first: dict[str, float] = {}
        self._seen: set[str] = set()

    def _add(self, table: dict[str, float], name: str, seconds: float) -> None:
        table[name] = table.get(name, 0.0) + seconds

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if name == "window_logits":
                self._seen = set()
            self.sync()
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            self.sync()
            seconds = time.perf_counter() - t0
            self._add(self.total, name, seconds)
            if name in self.FIRST_PASS and name not in self._seen:
                self._seen.add(name)
                if self.sfr_on:
                    self._add(self.first, name, seconds)
            return out

        return timed

    @contextmanager
    def installed(self, seg: Any) -> Iterator[None]:
        import resclip.engine as engine_mod
        import resclip.sfr as sfr_mod

        patches: list[tuple[Any, str]] = [
            (engine_mod, n)
            for n in (
                "encode_trunk",
                "last_block_output",
                "project_tokens",
                "patch_logits",
                "pixel_labels",
                "patch_mode",
                "refinement_scores",
            )
        ]
        patches += [
            (sfr_mod, n)
            for n in ("pamr_affinity", "pamr_propagate", "valid_path_line", "valid_path_connected")
        ]
        saved = [(obj, n, getattr(obj, n)) for obj, n in patches]
        engine = seg.engine
        try:
            for obj, n, fn in saved:
                setattr(obj, n, self.wrap(n, fn))
            engine.attend = self.wrap("attend", engine.attend)
            engine.window_logits = self.wrap("window_logits", engine.window_logits)
            yield
        finally:
            for obj, n, fn in saved:
                setattr(obj, n, fn)
            del engine.attend
            del engine.window_logits

    def report(self, predict_s: float) -> dict[str, Any]:
        t = self.total
        first_pass = sum(self.first.values())
        pamr_s = t.get("pamr_affinity", 0.0) + t.get("pamr_propagate", 0.0)
        path_s = t.get("valid_path_line", 0.0) + t.get("valid_path_connected", 0.0)
        labels_s = t.get("pixel_labels", 0.0)
        label_map_s = t.get("patch_mode", 0.0)
        scores_s = t.get("refinement_scores", 0.0)
        sfr_total = first_pass + labels_s + label_map_s + scores_s
        parts = {
            "first_pass_s": first_pass,
            "pamr_s": pamr_s,
            "pixel_labels_other_s": labels_s - pamr_s,
            "label_map_s": label_map_s,
            "path_check_s": path_s,
            "scores_other_s": scores_s - path_s,
        }
        return {
            "predict_s": round(predict_s, 4),
            "window_logits_s": round(t.get("window_logits", 0.0), 4),
            "trunk_s": round(t.get("encode_trunk", 0.0), 4),
            "outside_windows_s": round(predict_s - t.get("window_logits", 0.0), 4),
            "sfr_total_s": round(sfr_total, 4),
            "sfr_parts_s": {k: round(v, 4) for k, v in parts.items()},
            "sfr_share": round(sfr_total / predict_s, 4) if predict_s > 0 else None,
            "note": "one instrumented predict (synchronised timers around the engine's SFR steps); "
            "sfr_total = first last-block pass + pixel labels (incl. PAMR) + label map + refinement "
            "scores (incl. path check)",
        }


def _child_versions() -> dict[str, Any]:
    import open_clip
    import torch

    return {
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
        "torch_parallel_info": torch.__config__.parallel_info().splitlines()[:6],
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "env": relevant_env(os.environ),
    }


def _setup_child(spec: dict[str, Any]) -> None:
    import warnings

    import torch

    warnings.filterwarnings("ignore", message=".*RANDOM weights.*")
    if spec["threads"] > 0:
        torch.set_num_threads(spec["threads"])
    _register_configs(spec.get("model_configs") or [])


def child_predict(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one configuration (runs inside the fresh child process)."""
    import torch

    from resclip.preprocess import resize_image, window_coords
    from resclip.text import parse_classes, read_class_file

    _setup_child(spec)
    sync = _sync(spec["device"])
    clock = RunClock(sync, spec.get("quiet_threshold"), spec.get("quiet_max_wait", 0.0))
    cuda = spec["device"].startswith("cuda")
    h, w = spec["image_size"]
    image = synthetic_image(h, w, spec["seed"])
    lines = read_class_file(_class_file(spec["class_file"]))
    classes = parse_classes(lines)
    rss_before_model = current_rss_bytes()
    t0 = time.perf_counter()
    try:
        seg = _make_segmenter(spec, spec["rcs"], spec["sfr"])
    except ValueError as exc:
        return {"status": "unsupported", "reason": str(exc)}
    if spec.get("release_text"):
        seg.release_text_tower()
    create_s = time.perf_counter() - t0
    emb = _random_embeddings(classes.num_queries, seg.embed_dim, spec["seed"])
    sync()
    rss_after_model = current_rss_bytes()
    creation_peak = maxrss_bytes()
    reset_ok = reset_peak_rss()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        cuda_base = torch.cuda.memory_allocated()
    faults0 = page_faults()

    def run() -> Any:
        return seg.predict(image, lines, embeddings=emb)

    for _ in range(spec["warmup"]):
        run()
    times: list[float] = []
    stalls: list[float | None] = []
    cpu: list[float] = []
    result = None
    load_before = load_average()
    for _ in range(spec["repeat"]):
        c0 = cpu_seconds()
        t, stall, result = clock.run(run)
        cpu.append(cpu_seconds() - c0)
        times.append(t)
        stalls.append(stall)
    faults1 = page_faults()
    runs = spec["warmup"] + spec["repeat"]
    predict_peak = maxrss_bytes()
    assert result is not None
    p = seg.protocol
    resized = resize_image(image, p.short_side, p.long_side)
    out: dict[str, Any] = {
        "status": "ok",
        **summary(times, stalls),
        "cpu_s_median": round(statistics.median(cpu), 4),
        "model_create_s": round(create_s, 3),
        "windows": len(window_coords(resized.shape[0], resized.shape[1], p.slide_crop, p.slide_stride)),
        "resized_hw": list(resized.shape[:2]),
        "num_queries": classes.num_queries,
        "num_classes": classes.num_classes,
        "mask_shape": list(result.mask.shape),
        "mask_dtype": str(result.mask.dtype),
        "mask_digest": _mask_digest(result.mask),
        "trunk_attention": "explicit" if seg.engine.explicit else "fused",
        "text_tower": "released" if seg.text_tower_released else "kept",
        "config": seg.config.to_dict(),
        "memory": {
            "rss_before_model_mib": mib(rss_before_model),
            "rss_after_model_mib": mib(rss_after_model),
            "model_creation_peak_mib": mib(creation_peak),
            "peak_rss_mib": mib(max(creation_peak, predict_peak)),
            "predict_peak_rss_mib": mib(predict_peak),
            "predict_peak_over_model_mib": mib(predict_peak - rss_after_model),
            "peak_reset_after_model": reset_ok,
            "minor_faults_per_image": round((faults1[0] - faults0[0]) / max(1, runs)),
            "major_faults_per_image": round((faults1[1] - faults0[1]) / max(1, runs)),
        },
        "versions": _child_versions(),
        "load": {"before": load_before, "after": load_average(), "cpu_pressure": cpu_pressure()},
    }
    if cuda:
        out["memory"]["cuda_peak_allocated_mib"] = mib(torch.cuda.max_memory_allocated())
        out["memory"]["cuda_peak_over_model_mib"] = mib(torch.cuda.max_memory_allocated() - cuda_base)
    if spec.get("profile_sfr") and seg.config.sfr is not None:
        sfr_clock = _SFRClock(sync, sfr_on=True)
        with sfr_clock.installed(seg):
            t, stall, _ = clock.run(run)
        out["sfr_profile"] = {**sfr_clock.report(t), "stall": None if stall is None else round(stall, 3)}
    if spec.get("pair_with_base"):
        base = _make_segmenter(spec, False, False)
        pair = clock.interleaved(
            {"resclip": run, "base": lambda: base.predict(image, lines, embeddings=emb)},
            spec["repeat"],
            {"base": spec["warmup"]},
        )
        del pair["digests"]
        out["pair_with_base"] = {**pair, **_ratio(pair["resclip"], pair["base"])}
        del base
    if spec.get("batch_compare") and out["windows"] > 1:

        def one_at_a_time() -> Any:
            seg.window_batch = 1
            try:
                return seg.predict(image, lines, embeddings=emb)
            finally:
                seg.window_batch = spec["window_batch"]

        both = clock.interleaved(
            {"batched": run, "single": one_at_a_time}, spec["repeat"], {"single": spec["warmup"]}
        )
        digests = both.pop("digests")
        out["batch_compare"] = {
            "window_batch": spec["window_batch"],
            **both,
            **_ratio(both["batched"], both["single"]),
            "identical_masks": digests["batched"] == digests["single"],
        }
    out["quiet_wait_s"] = round(clock.waited_s, 1)
    return out


def child_throughput(spec: dict[str, Any]) -> dict[str, Any]:
    """Images per second of ResCLIP over a synthetic set (runs inside the fresh child process)."""
    import torch

    from resclip.text import parse_classes, read_class_file

    _setup_child(spec)
    sync = _sync(spec["device"])
    n = spec["throughput"]
    h, w = spec["image_size"]
    pool = [synthetic_image(h, w, spec["seed"] + i) for i in range(min(n, spec["pool"]))]
    lines = read_class_file(_class_file(spec["class_file"]))
    classes = parse_classes(lines)
    seg = _make_segmenter(spec, True, True)
    emb = _random_embeddings(classes.num_queries, seg.embed_dim, spec["seed"])
    rss_after_model = current_rss_bytes()
    reset_ok = reset_peak_rss()
    if spec["device"].startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for i in range(spec["warmup_images"]):
        seg.predict(pool[i % len(pool)], lines, embeddings=emb)
    sync()
    p0 = psi_stall_us()
    t0 = time.perf_counter()
    for i in range(n):
        res = seg.predict(pool[i % len(pool)], lines, embeddings=emb)
        assert res.mask.shape == (h, w)
    sync()
    total = time.perf_counter() - t0
    p1 = psi_stall_us()
    out: dict[str, Any] = {
        "status": "ok",
        "images": n,
        "distinct_images": len(pool),
        "warmup_images": spec["warmup_images"],
        "total_s": round(total, 3),
        "images_per_s": round(n / total, 3),
        "seconds_per_image": round(total / n, 4),
        "stall": round((p1 - p0) / 1e6 / total, 3) if p0 is not None and p1 is not None else None,
        "config": seg.config.to_dict(),
        "memory": {
            "rss_after_model_mib": mib(rss_after_model),
            "predict_peak_rss_mib": mib(maxrss_bytes()),
            "peak_reset_after_model": reset_ok,
        },
        "versions": _child_versions(),
        "note": "in-memory uint8 images (no decoding), one predict per image, masks copied to the host; "
        + TEXT_NOTE,
    }
    if spec["device"].startswith("cuda"):
        out["memory"]["cuda_peak_allocated_mib"] = mib(torch.cuda.max_memory_allocated())
    return out


def measure_in_child(
    measure: Callable[[dict[str, Any]], dict[str, Any]], spec_json: str, out_path: str
) -> int:
    """Run ``measure(spec)`` in a child process and write its result (or the error) as JSON."""
    spec = json.loads(spec_json)
    try:
        result = measure(spec)
    except Exception as exc:  # reported to the parent, which keeps going
        result = {
            "status": "error",
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc(),
        }
    Path(out_path).write_text(json.dumps(result))
    return 0 if result["status"] in ("ok", "unsupported") else 1


def child_main(spec_json: str, out_path: str) -> int:
    return measure_in_child(
        lambda spec: child_throughput(spec) if spec["kind"] == "throughput" else child_predict(spec),
        spec_json,
        out_path,
    )


# ============================================================================== parent side


def contention(res: dict[str, Any]) -> float | None:
    """The worst CPU-stall fraction among a child's timed blocks (None when unknown)."""
    stalls = [res.get("stall")]
    for block, names in (("pair_with_base", ("resclip", "base")), ("batch_compare", ("batched", "single"))):
        stalls += [res.get(block, {}).get(n, {}).get("stall") for n in names]
    known = [x for x in stalls if x is not None]
    return max(known) if known else None


def source_state() -> dict[str, Any]:
    """Git commit of the checkout and a digest of the installed ``resclip`` sources (to detect edits)."""
    import hashlib

    spec = importlib.util.find_spec("resclip")
    root = Path(spec.origin).parent if spec and spec.origin else None
    digest = hashlib.sha256()
    if root is not None:
        for f in sorted(root.rglob("*.py")):
            digest.update(f.relative_to(root).as_posix().encode())
            digest.update(f.read_bytes())
    out: dict[str, Any] = {
        "resclip_path": str(root) if root else None,
        "resclip_sources_sha256": digest.hexdigest()[:16],
    }
    try:
        git = ["git", "-C", str(HERE.parent)]
        out["git_commit"] = subprocess.run(
            [*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        status = subprocess.run(
            [*git, "status", "--porcelain", "src"], capture_output=True, text=True, timeout=10
        )
        out["src_modified"] = [line[3:] for line in status.stdout.splitlines()]
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def run_child(
    spec: dict[str, Any], env: dict[str, str], timeout: float, script: str | Path | None = None
) -> dict[str, Any]:
    """Run one configuration in a fresh interpreter (``script --child SPEC OUT``) and return its result."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        path = Path(script or __file__).resolve()
        cmd = [sys.executable, str(path), "--child", json.dumps(spec), str(out)]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"status": "error", "error": f"timed out after {timeout:.0f} s"}
        wall = time.perf_counter() - t0
        if not out.exists():
            tail = (proc.stderr or proc.stdout)[-2000:]
            return {"status": "error", "error": f"child exited with {proc.returncode}", "stderr": tail}
        result: dict[str, Any] = json.loads(out.read_text())
        result["child_wall_s"] = round(wall, 2)
        return result


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["short_side=224", "rcs_layers=(1,2)"]`` -> ``{"short_side": 224, "rcs_layers": (1, 2)}``."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"--set: expected KEY=VALUE, got {item!r}")
        try:
            value = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            value = raw.strip()
        out[key.strip()] = list(value) if isinstance(value, tuple) else value
    return out


def parse_size(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*[x,]\s*(\d+)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"expected HxW, e.g. 375x500, got {text!r}")
    return int(m.group(1)), int(m.group(2))


def split_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


@dataclass(frozen=True)
class ModelPlan:
    """A model and the workloads / methods it runs (``NAME@w1+w2/m1+m2``)."""

    name: str
    workloads: tuple[str, ...] | None
    methods: tuple[str, ...] | None


def parse_models(text: str) -> list[ModelPlan]:
    plans = []
    for item in split_list(text):
        name, _, scope = item.partition("@")
        workloads = methods = None
        if scope:
            w_part, _, m_part = scope.partition("/")
            workloads = tuple(w for w in w_part.split("+") if w) or None
            methods = tuple(m for m in m_part.split("+") if m) or None
        plans.append(ModelPlan(name.strip(), workloads, methods))
    return plans


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Each configuration runs in its own child process; see the module docstring.",
    )
    ap.add_argument(
        "--models",
        default=None,
        help="comma-separated open_clip names (default ViT-B-16,ViT-L-14); NAME@WORKLOADS/METHODS "
        "restricts one model, e.g. ViT-L-14@voc21/naclip ('+' separates several); 'infer' takes the "
        "architecture from --pretrained",
    )
    ap.add_argument("--methods", default=None, help=f"comma-separated (default all: {','.join(ALL_METHODS)})")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="subset of base,rcs,sfr,rcs+sfr")
    ap.add_argument("--workloads", default="voc21,context60", help=f"of {','.join(WORKLOADS)}")
    ap.add_argument("--repeat", type=int, default=None, help="timed runs per configuration (default 3)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads in each child (0: torch default)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"))
    ap.add_argument("--quick", action="store_true", help="ViT-B-16 only, naclip only, repeat 1")
    ap.add_argument(
        "--throughput",
        type=int,
        default=0,
        metavar="N",
        help="also time ResCLIP (naclip, RCS+SFR, VOC21 protocol: short side 336) over N synthetic images",
    )
    ap.add_argument("--no-table", action="store_true", help="skip the per-configuration table")
    ap.add_argument("--no-pairs", action="store_true", help="skip the interleaved ratio measurements")
    ap.add_argument("--no-batch-compare", action="store_true", help="skip batched vs one window at a time")
    ap.add_argument("--no-profile", action="store_true", help="skip the instrumented SFR-share run")
    ap.add_argument(
        "--malloc-env",
        default="",
        help='allocator settings for the children, e.g. "MALLOC_MMAP_THRESHOLD_=1073741824 '
        'MALLOC_TRIM_THRESHOLD_=1073741824" (recorded in the output)',
    )
    ap.add_argument(
        "--pretrained", default=None, help="open_clip tag or local file (default: random weights)"
    )
    ap.add_argument(
        "--model-config", action="append", default=[], help="open_clip config file/dir to register"
    )
    ap.add_argument("--rcs-layers", default=None, help="override RCS layers, e.g. 1,2 (for tiny test models)")
    ap.add_argument(
        "--trunk-attention", default=None, choices=("explicit", "fused"), help="default: preset's"
    )
    ap.add_argument("--window-batch", type=int, default=8, help="windows per forward pass (default 8)")
    ap.add_argument(
        "--release-text",
        action="store_true",
        help="free the text tower after model creation (Segmenter.release_text_tower(), as `resclip segment` "
        "does); the measured predict never uses it (embeddings are given)",
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="protocol / RCS / SFR override for every workload (create_segmenter keyword), e.g. "
        "short_side=224; changes the workloads: for smoke tests",
    )
    ap.add_argument("--image-size", type=parse_size, default=(375, 500), help="HxW (default 375x500)")
    ap.add_argument(
        "--quiet-threshold",
        type=float,
        default=None,
        metavar="FRACTION",
        help="before each timed run, wait until the fraction of busy CPUs (other processes' load, from "
        "/proc/stat) is below this, e.g. 0.25 (default: do not wait)",
    )
    ap.add_argument("--quiet-max-wait", type=float, default=30.0, help="seconds to wait at most per run")
    ap.add_argument(
        "--retry-stall",
        type=float,
        default=None,
        metavar="FRACTION",
        help="measure a configuration again (up to --retries times) when its worst CPU-stall fraction "
        "exceeds this, e.g. 0.3; the least contended attempt is kept (default: no retry)",
    )
    ap.add_argument("--retries", type=int, default=1, help="extra attempts for --retry-stall (default 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per child process")
    ap.add_argument(
        "--output", default=None, help="JSON path (default benchmarks/results/<date>_<machine>.json)"
    )
    ap.add_argument("--child", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    return ap


def resolve_args(args: argparse.Namespace) -> None:
    if args.models is None:
        args.models = "ViT-B-16" if args.quick else "ViT-B-16,ViT-L-14"
    if args.methods is None:
        args.methods = "naclip" if args.quick else ",".join(ALL_METHODS)
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    if args.repeat < 1 or args.warmup < 0:
        raise SystemExit("--repeat must be >= 1 and --warmup >= 0")
    for w in split_list(args.workloads):
        if w not in WORKLOADS:
            raise SystemExit(f"unknown workload {w!r}; valid: {', '.join(WORKLOADS)}")
    for v in split_list(args.variants):
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}; valid: {', '.join(VARIANTS)}")


def workload_preset(method: str, wl: Workload) -> tuple[str, str]:
    """(preset, class file) of a method on a workload: the workload's, or the method's own preset."""
    if method not in OWN_PRESET_METHODS:
        return wl.preset, wl.class_file
    from resclip.presets import get_preset

    name = f"{method}/{wl.preset}"
    return name, get_preset(name).class_file or wl.class_file


def resclip_variant(method: str) -> str:
    """The ResCLIP configuration of a base method: RCS + SFR, or RCS alone without attention scores."""
    return "rcs" if method in SFR_UNSUPPORTED else "rcs+sfr"


def plan_specs(args: argparse.Namespace) -> list[dict[str, Any]]:
    specs = []
    rcs_layers = [int(x) for x in split_list(args.rcs_layers)] if args.rcs_layers else None
    for plan in parse_models(args.models):
        workloads = [w for w in split_list(args.workloads) if plan.workloads is None or w in plan.workloads]
        methods = [m for m in split_list(args.methods) if plan.methods is None or m in plan.methods]
        for wl_name in workloads:
            wl = WORKLOADS[wl_name]
            for method in methods:
                for variant in split_list(args.variants):
                    if method in SFR_UNSUPPORTED and VARIANTS[variant][1]:
                        continue
                    rcs, sfr = VARIANTS[variant]
                    is_resclip = variant == resclip_variant(method)
                    preset, class_file = workload_preset(method, wl)
                    specs.append(
                        {
                            "kind": "predict",
                            "model": None if plan.name == "infer" else plan.name,
                            "model_label": plan.name,
                            "pretrained": args.pretrained,
                            "model_configs": [str(Path(p).resolve()) for p in args.model_config],
                            "workload": wl_name,
                            "preset": preset,
                            "class_file": class_file,
                            "method": method,
                            "variant": variant,
                            "rcs": rcs,
                            "sfr": sfr,
                            "resclip": is_resclip,
                            "image_size": list(args.image_size),
                            "threads": args.threads,
                            "device": args.device,
                            "precision": args.precision,
                            "window_batch": args.window_batch,
                            "trunk_attention": args.trunk_attention,
                            "release_text": args.release_text,
                            "rcs_layers": rcs_layers,
                            "overrides": parse_overrides(args.set),
                            "quiet_threshold": args.quiet_threshold,
                            "quiet_max_wait": args.quiet_max_wait,
                            "warmup": args.warmup,
                            "repeat": args.repeat,
                            "seed": args.seed,
                            "profile_sfr": sfr and not args.no_profile,
                            "pair_with_base": is_resclip and not args.no_pairs,
                            "batch_compare": is_resclip and not (args.no_pairs or args.no_batch_compare),
                        }
                    )
    return specs


def throughput_spec(args: argparse.Namespace) -> dict[str, Any]:
    plan = parse_models(args.models)[0]
    return {
        "kind": "throughput",
        "model": None if plan.name == "infer" else plan.name,
        "model_label": plan.name,
        "pretrained": args.pretrained,
        "model_configs": [str(Path(p).resolve()) for p in args.model_config],
        "workload": "voc21",
        "preset": "voc21",
        "class_file": "voc21.txt",
        "method": "naclip",
        "image_size": list(args.image_size),
        "threads": args.threads,
        "device": args.device,
        "precision": args.precision,
        "window_batch": args.window_batch,
        "trunk_attention": args.trunk_attention,
        "rcs_layers": [int(x) for x in split_list(args.rcs_layers)] if args.rcs_layers else None,
        "overrides": parse_overrides(args.set),
        "seed": args.seed,
        "throughput": args.throughput,
        "pool": 32,
        "warmup_images": max(1, min(3, args.throughput)),
    }


# ------------------------------------------------------------------ ratios and tables


def _key(r: dict[str, Any]) -> tuple[str, str, str]:
    return r["model"], r["workload"], r["method"]


def _max_stall(block: dict[str, Any], names: Sequence[str]) -> float | None:
    known = [block[n]["stall"] for n in names if n in block and block[n].get("stall") is not None]
    return max(known) if known else None


def compute_ratios(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    ok = [r for r in rows if r.get("status") == "ok"]
    by = {(*_key(r), r["variant"]): r for r in ok}
    over_base, batched, share = [], [], []
    for r in ok:
        if not r["resclip"]:
            continue
        model, workload, method = _key(r)
        base = by.get((model, workload, method, "base"))
        entry: dict[str, Any] = {
            "model": model,
            "workload": workload,
            "method": method,
            "resclip_variant": r["variant"],
            "ratio_interleaved": r.get("pair_with_base", {}).get("ratio"),
            "ratio_separate_runs": round(r["median_s"] / base["median_s"], 4) if base else None,
            "ratio_of_min_interleaved": r.get("pair_with_base", {}).get("ratio_of_min"),
            "resclip_median_s": r.get("pair_with_base", {}).get("resclip", {}).get("median_s"),
            "base_median_s": r.get("pair_with_base", {}).get("base", {}).get("median_s"),
            "stall": _max_stall(r.get("pair_with_base", {}), ("resclip", "base")),
        }
        over_base.append(entry)
        if "batch_compare" in r:
            bc = r["batch_compare"]
            batched.append(
                {
                    "model": model,
                    "workload": workload,
                    "method": method,
                    "variant": r["variant"],
                    "windows": r["windows"],
                    "window_batch": bc["window_batch"],
                    "batched_median_s": bc["batched"]["median_s"],
                    "one_at_a_time_median_s": bc["single"]["median_s"],
                    "ratio": bc["ratio"],
                    "ratio_of_min": bc["ratio_of_min"],
                    "identical_masks": bc["identical_masks"],
                    "stall": _max_stall(bc, ("batched", "single")),
                }
            )
    for r in ok:
        if not r["sfr"]:
            continue
        model, workload, method = _key(r)
        without = by.get((model, workload, method, "rcs" if r["rcs"] else "base"))
        prof = r.get("sfr_profile") or {}
        share.append(
            {
                "model": model,
                "workload": workload,
                "method": method,
                "variant": r["variant"],
                "share_profiled": prof.get("sfr_share"),
                "sfr_parts_s": prof.get("sfr_parts_s"),
                "profiled_predict_s": prof.get("predict_s"),
                "share_by_difference": round(1 - without["median_s"] / r["median_s"], 4) if without else None,
                "difference_against": without["variant"] if without else None,
            }
        )
    return {"resclip_over_baseline": over_base, "batched_over_one_at_a_time": batched, "sfr_share": share}


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| model | workload | method | RCS | SFR | windows | median s | min s | max s | CPU s | stall "
        "| x base | peak RSS MiB | predict peak - model MiB | faults/img |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    medians = {(*_key(r), r["variant"]): r["median_s"] for r in rows if r.get("status") == "ok"}
    for r in rows:
        model, workload, method = _key(r)
        if r.get("status") != "ok":
            lines.append(
                f"| {model} | {workload} | {method} | {_yes(r['rcs'])} | {_yes(r['sfr'])} | "
                f"{r.get('status')}: {str(r.get('error') or r.get('reason', ''))[:60]} |||||||||"
            )
            continue
        base = medians.get((model, workload, method, "base"))
        mem = r["memory"]
        lines.append(
            f"| {model} | {workload} | {method} | {_yes(r['rcs'])} | {_yes(r['sfr'])} | {r['windows']} "
            f"| {r['median_s']:.3f} | {r['min_s']:.3f} | {r['max_s']:.3f} | {r['cpu_s_median']:.2f} "
            f"| {_fmt(r.get('stall'), 2)} "
            f"| {_fmt(r['median_s'] / base if base else None, 2)} | {mem['peak_rss_mib']:.0f} "
            f"| {mem['predict_peak_over_model_mib']:.0f} | {mem['minor_faults_per_image']} |"
        )
    return "\n".join(lines)


def markdown_ratios(ratios: dict[str, list[dict[str, Any]]]) -> str:
    out = [
        "ResCLIP over its own baseline (time ratio of medians and of minima over interleaved runs in one "
        "process; ratio of the table's medians from separate processes):",
        "",
        "| model | workload | method | ResCLIP = | ResCLIP s | base s | interleaved | of minima "
        "| separate runs | stall |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in ratios["resclip_over_baseline"]:
        out.append(
            f"| {e['model']} | {e['workload']} | {e['method']} | {e['resclip_variant']} "
            f"| {_fmt(e['resclip_median_s'])} | {_fmt(e['base_median_s'])} "
            f"| {_fmt(e['ratio_interleaved'], 2)} | {_fmt(e['ratio_of_min_interleaved'], 2)} "
            f"| {_fmt(e['ratio_separate_runs'], 2)} | {_fmt(e['stall'], 2)} |"
        )
    out += [
        "",
        "Batched windows over one window at a time (time ratio, interleaved runs):",
        "",
        "| model | workload | method | windows | batch | batched s | one-at-a-time s | ratio | of minima "
        "| same mask | stall |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in ratios["batched_over_one_at_a_time"]:
        out.append(
            f"| {e['model']} | {e['workload']} | {e['method']} ({e['variant']}) | {e['windows']} "
            f"| {e['window_batch']} | {e['batched_median_s']:.3f} | {e['one_at_a_time_median_s']:.3f} "
            f"| {e['ratio']:.2f} | {e['ratio_of_min']:.2f} | {'yes' if e['identical_masks'] else 'no'} "
            f"| {_fmt(e['stall'], 2)} |"
        )
    out += [
        "",
        "Share of predict time in SFR (profiled: first last-block pass + pixel labels incl. PAMR + label "
        "map + refinement scores incl. path check; by difference: 1 - t(without SFR) / t(with SFR)):",
        "",
        "| model | workload | method | variant | profiled | PAMR s | path check s | first pass s "
        "| by difference |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for e in ratios["sfr_share"]:
        parts = e["sfr_parts_s"] or {}
        out.append(
            f"| {e['model']} | {e['workload']} | {e['method']} | {e['variant']} "
            f"| {_fmt(e['share_profiled'], 2)} | {_fmt(parts.get('pamr_s'))} "
            f"| {_fmt(parts.get('path_check_s'))} "
            f"| {_fmt(parts.get('first_pass_s'))} | {_fmt(e['share_by_difference'], 2)} |"
        )
    return "\n".join(out)


def markdown_throughput(t: dict[str, Any]) -> str:
    if t.get("status") != "ok":
        return f"Throughput: {t.get('status')}: {t.get('error')}"
    return (
        f"Throughput ({t['model']}, naclip RCS+SFR, VOC21 protocol, {t['device']} {t['precision']}): "
        f"{t['images_per_s']:.2f} images/s, {t['images']} images in {t['total_s']:.1f} s "
        f"({t['distinct_images']} distinct synthetic images, {t['warmup_images']} warm-up)"
    )


def child_env(malloc: dict[str, str], threads: int) -> dict[str, str]:
    """The children's environment: ours plus the allocator settings, the thread count (unless
    already set) and offline model hubs."""
    env = dict(os.environ)
    env.update(malloc)
    if threads > 0:
        env.setdefault("OMP_NUM_THREADS", str(threads))
        env.setdefault("MKL_NUM_THREADS", str(threads))
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def default_output(args: argparse.Namespace, date: str) -> Path:
    tag = "_quick" if args.quick else ""
    return RESULTS / f"bench_predict_{date}_{machine_slug(args.device)}{tag}.json"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.child:
        return child_main(*args.child)
    resolve_args(args)
    malloc = parse_env_assignments(args.malloc_env)
    env = child_env(malloc, args.threads)
    started = dt.datetime.now(dt.timezone.utc)
    load_start = load_average()
    pressure_start = cpu_pressure()
    header: dict[str, Any] = {
        **report_header("bench_predict", SCHEMA, started, argv),
        "allocator": {
            "parent_env": relevant_env(os.environ),
            "malloc_env_applied": malloc,
            "child_env": relevant_env(env),
            "note": "glibc malloc unless LD_PRELOAD says otherwise; MALLOC_* variables change when large "
            "freed blocks go back to the OS (and are faulted in again: see faults/img)",
        },
        "settings": {
            k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items() if k != "child"
        },
        "python_executable": sys.executable,
        "source": source_state(),
        "text_encoder": TEXT_NOTE,
        "legend": LEGEND,
        "image": {
            "size_hw": list(args.image_size),
            "kind": f"synthetic_image(seed={args.seed}): warped smooth regions, shading, texture, noise",
        },
        "workloads": {k: WORKLOADS[k].description for k in split_list(args.workloads)},
    }
    rows: list[dict[str, Any]] = []
    specs = [] if args.no_table else plan_specs(args)
    for i, spec in enumerate(specs, 1):
        label = f"{spec['model_label']} {spec['workload']} {spec['method']} {spec['variant']}"
        print(f"[{i}/{len(specs)}] {label} ...", file=sys.stderr, flush=True)
        res = run_child(spec, env, args.timeout)
        attempts = [contention(res)]
        while args.retry_stall is not None and len(attempts) <= args.retries:
            if attempts[-1] is None or min(a for a in attempts if a is not None) <= args.retry_stall:
                break
            print(f"    contended (stall {attempts[-1]:.2f}): measuring again", file=sys.stderr, flush=True)
            again = run_child(spec, env, args.timeout)
            attempts.append(contention(again))
            if again.get("status") == "ok" and (attempts[-1] or 0.0) < (contention(res) or 0.0):
                res = again
        res["contention"] = contention(res)
        if len(attempts) > 1:
            res["attempt_contention"] = attempts
        row = {
            "model": spec["model_label"],
            "workload": spec["workload"],
            "method": spec["method"],
            "preset": spec["preset"],
            "class_file": spec["class_file"],
            "variant": spec["variant"],
            "rcs": spec["rcs"],
            "sfr": spec["sfr"],
            "resclip": spec["resclip"],
            **res,
        }
        rows.append(row)
        if res.get("status") == "ok":
            print(
                f"    median {res['median_s']:.3f} s, peak {res['memory']['peak_rss_mib']:.0f} MiB",
                file=sys.stderr,
            )
        else:
            print(f"    {res.get('status')}: {res.get('error') or res.get('reason')}", file=sys.stderr)
    report = dict(header)
    report["results"] = rows
    report["ratios"] = compute_ratios(rows)
    if rows:
        versions = next((r["versions"] for r in rows if "versions" in r), None)
        report["child_runtime"] = versions
    if args.throughput > 0:
        print(f"[throughput] {args.throughput} images ...", file=sys.stderr, flush=True)
        tp = run_child(throughput_spec(args), env, args.timeout)
        tp.update(model=parse_models(args.models)[0].name, device=args.device, precision=args.precision)
        report["throughput"] = tp
        report.setdefault("child_runtime", tp.get("versions"))
    report["load"] = {
        "load_average_start": load_start,
        "load_average_end": load_average(),
        "cpu_pressure_start": pressure_start,
        "cpu_pressure_end": cpu_pressure(),
        "note": "the machine may be shared: per-configuration load is in each result's 'load'; "
        "ratios come from interleaved runs in one process",
    }
    end_state = source_state()
    report["source_changed_during_run"] = end_state.get("resclip_sources_sha256") != header["source"].get(
        "resclip_sources_sha256"
    )
    report["elapsed_s"] = round((dt.datetime.now(dt.timezone.utc) - started).total_seconds(), 1)
    text = []
    if rows:
        text += [markdown_table(rows), "", markdown_ratios(report["ratios"])]
    if "throughput" in report:
        text += ["", markdown_throughput(report["throughput"])]
    if args.device.startswith("cuda") is False:
        text += ["", "GPU figures: not measured in this run (--device cpu)."]
    report["markdown"] = "\n".join(text)
    out = Path(args.output) if args.output else default_output(args, started.strftime("%Y-%m-%d"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(report["markdown"])
    print(f"\nwrote {out}", file=sys.stderr)
    failed = [r for r in rows if r.get("status") == "error"]
    if failed or report.get("throughput", {}).get("status") == "error":
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
