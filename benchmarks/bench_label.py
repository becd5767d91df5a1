#!/usr/bin/env python
"""Images per second of ``resclip label`` on this machine: one process vs torchrun vs Ray Data.

A synthetic set of ``--images`` JPEGs (``bench_predict.synthetic_image``, ``--size``) is labelled
by each mode in a fresh output folder, each in its own child process(es) running the real command:

* ``one``: ``python -m resclip.commands.label`` (all CPUs to torch, ``--workers`` decode/write threads);
* ``torchrun``: ``torchrun --standalone --nproc-per-node P`` (``OMP_NUM_THREADS`` = CPUs / P each);
* ``ray``: ``--engine ray --num-actors P`` on a local Ray (one CPU actor per process slot).

Reported per mode: the labelling rate (``work_seconds``: model loading and text encoding excluded;
for Ray the actors' start is inside it) and the wall time of the whole command. The model is a
real-size architecture with random weights (``--pretrained none``: one random model, seed 0, saved to
a temporary file that every process reads; speed does not depend on weight values);
tests/test_label_distributed.py checks that the modes' outputs are byte-identical.

Examples::

    python benchmarks/bench_label.py --images 300
    python benchmarks/bench_label.py --images 40 --modes one,ray,torchrun \
        --output benchmarks/results/bench_label_2026-12-02_intel-xeon-2c.json --note "shared machine"
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
MODES = ("one", "torchrun", "ray")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def make_images(folder: Path, count: int, width: int, height: int) -> None:
    """``count`` deterministic JPEGs ``img-00000.jpg``... of ``width`` x ``height``."""
    sys.path.insert(0, str(HERE))
    try:
        from bench_predict import synthetic_image
    finally:
        sys.path.remove(str(HERE))
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(synthetic_image(height, width, seed=i)).save(folder / f"img-{i:05d}.jpg", quality=90)


def random_checkpoint(model: str, path: Path) -> Path:
    """A random open_clip ``model`` (seed 0) saved as a state dict: the weights every mode loads
    (random weights built in each process would differ between torchrun ranks or Ray actors)."""
    import open_clip
    import torch

    torch.manual_seed(0)
    torch.save(open_clip.create_model(model).state_dict(), path)
    return path


def run_mode(mode: str, images: Path, out: Path, args: argparse.Namespace, cache: Path) -> dict[str, Any]:
    """Run one mode; returns its summary plus the command's wall time."""
    summary = out.with_suffix(".summary.json")
    cli = [str(images), "--classes", args.classes, "--out", str(out), "--model", args.model,
           "--pretrained", args.pretrained, "--preset", args.preset, "--device", args.device,
           "--shard-size", str(args.shard_size), "--workers", str(args.workers), "--quiet",
           "--summary", str(summary), *[x for kv in args.set for x in ("--set", kv)]]
    env = {**os.environ, "RESCLIP_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    cpus = os.cpu_count() or 1
    if mode == "one":
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        cmd = [sys.executable, "-m", "resclip.commands.label", *cli]
    elif mode == "torchrun":
        torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
        env["OMP_NUM_THREADS"] = str(max(1, cpus // args.procs))
        cmd = [torchrun, "--standalone", "--nproc-per-node", str(args.procs), "-m", "resclip.commands.label",
               *cli]
    else:
        cmd = [sys.executable, "-m", "resclip.commands.label", *cli, "--engine", "ray",
               "--num-actors", str(args.procs)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"mode": mode, "error": (proc.stderr or proc.stdout)[-2000:], "wall_seconds": wall}
    data = json.loads(summary.read_text())
    return {
        "mode": mode,
        "processes": 1 if mode == "one" else args.procs,
        "torch_threads_per_process": env.get("OMP_NUM_THREADS", "all CPUs"),
        "images": data["new_images"],
        "failures": len(data["failures"]),
        "images_per_second": round(data["images_per_second"], 3),
        "work_seconds": round(data["work_seconds"], 2),
        "command_seconds": round(data["seconds"], 2),
        "wall_seconds": round(wall, 2),
        "wall_images_per_second": round(data["new_images"] / wall, 3),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=300, help="synthetic images (default: 300)")
    p.add_argument("--size", default="500x375", help="WxH of each image (default: 500x375, a VOC photo)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    p.add_argument("--procs", type=int, default=2, help="torchrun processes / Ray actors (default: 2)")
    p.add_argument("--model", default="ViT-B-16")
    p.add_argument("--pretrained", default="none", help="'none' (random weights, default) or a checkpoint")
    p.add_argument("--preset", default="default")
    p.add_argument("--classes", default="background; person; cat")
    p.add_argument("--device", default="cpu")
    p.add_argument("--shard-size", type=int, default=10)
    p.add_argument("--workers", type=int, default=2, help="decode/write threads per process (default: 2)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of the one-process mode (default: torch's, all CPUs)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed to the command")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per mode (default: 3600)")
    p.add_argument("--note", default="", help="recorded in the result (e.g. machine load)")
    p.add_argument("--output", default=None, help="write the result JSON here")
    args = p.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        p.error(f"unknown mode {bad[0]!r}; valid: {', '.join(MODES)}")
    if "ray" in modes and importlib.util.find_spec("ray") is None:
        print("bench_label: ray is not installed (pip install 'resclip[ray]'); skipping the ray mode",
              file=sys.stderr)
        modes.remove("ray")
    width, height = (int(v) for v in args.size.lower().split("x"))
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-label-") as tmp:
        root = Path(tmp)
        make_images(root / "images", args.images, width, height)
        if args.pretrained == "none":  # one random model saved once: every process reads the same weights
            args.pretrained = str(random_checkpoint(args.model, root / "random.pt"))
        for mode in modes:
            print(f"bench_label: {mode} ...", file=sys.stderr, flush=True)
            res = run_mode(mode, root / "images", root / f"out-{mode}", args, root / "cache")
            results.append(res)
            print(json.dumps(res), file=sys.stderr, flush=True)
    import torch

    report = {
        "schema": "resclip-bench-label/1",
        "date": dt.date.today().isoformat(),
        "machine": {"cpu": cpu_name(), "logical_cpus": os.cpu_count(), "note": args.note,
                    "python": platform.python_version(), "torch": torch.__version__},
        "workload": {"images": args.images, "size": [width, height], "model": args.model,
                     "pretrained": args.pretrained, "preset": args.preset, "classes": args.classes,
                     "shard_size": args.shard_size, "workers": args.workers, "device": args.device,
                     "threads_one_process": args.threads or "torch default (all CPUs)",
                     "set": args.set},
        "how": "each mode labels the same synthetic JPEGs into a fresh folder with the real command in child "
               "processes; images_per_second = new images / work_seconds (model loading and text encoding "
               "excluded; Ray actors load their models inside work_seconds); wall_images_per_second "
               "counts the whole command (interpreter start, model load, text encoding, Ray start)",
        "results": results,
    }
    text = json.dumps(report, indent=1)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text + "\n")
    print(text)
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
