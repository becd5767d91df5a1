#!/usr/bin/env python
"""Peak memory and time of ``predict`` on huge images (issue 5: a 20,000 x 20,000 photo, 150 classes).

Each size runs in a fresh child process (this script with ``--child``): it builds a smooth synthetic
``H x W`` uint8 RGB image in row bands (no extra full-size copy), creates a real-size model with
random weights (speed and memory do not depend on weight values), and segments the image once by
the 150 ADE20K classes with precomputed random unit embeddings (the text encoder is left out). It
reports the peak RSS (``ru_maxrss``), the peak over the RSS before ``predict`` (image + model), the
wall time, and the mask's size. With several sizes it fits time and peak memory linearly in the
pixel count and extrapolates to 20,000 x 20,000.

Examples::

    python benchmarks/bench_memory.py                        # the 20k x 20k case (long on CPU)
    python benchmarks/bench_memory.py --sizes 4000x3000      # sanity size
    python benchmarks/bench_memory.py --sizes 5000x5000,8000x8000
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_predict import (  # the benchmarks folder is not a package: sys.path above
    RESULTS,
    TEXT_NOTE,
    child_env,
    cpu_pressure,
    current_rss_bytes,
    load_average,
    machine_slug,
    measure_call,
    measure_in_child,
    mib,
    parse_env_assignments,
    parse_overrides,
    parse_size,
    peak_memory,
    relevant_env,
    report_header,
    run_child,
    source_state,
    split_list,
    synthetic_image,
)

SCHEMA = 1
TARGET = (20000, 20000)


# ============================================================================== child side


def child_memory(spec: dict[str, Any]) -> dict[str, Any]:
    """Segment one huge synthetic image once and measure it (runs inside the fresh child process)."""
    import warnings

    import open_clip
    import torch

    import resclip
    from resclip.text import parse_classes, read_class_file

    warnings.filterwarnings("ignore", message=".*RANDOM weights.*")
    if spec["threads"] > 0:
        torch.set_num_threads(spec["threads"])
    for p in spec.get("model_configs") or []:
        open_clip.add_model_config(p)
    h, w = spec["size"]
    rss_start = current_rss_bytes()
    t0 = time.perf_counter()
    image = synthetic_image(h, w, spec["seed"])
    image_s = time.perf_counter() - t0
    rss_after_image = current_rss_bytes()
    class_path = Path(spec["classes"])
    if not class_path.is_file():
        class_path = Path(resclip.__file__).parent / "data" / "class_names" / spec["classes"]
    lines = read_class_file(class_path)
    classes = parse_classes(lines)
    overrides: dict[str, Any] = dict(spec.get("overrides") or {})
    if spec.get("rcs_layers"):
        overrides["rcs_layers"] = tuple(spec["rcs_layers"])
    torch.manual_seed(spec["seed"])
    seg = resclip.create_segmenter(
        spec["method"],
        rcs=spec["rcs"],
        sfr=spec["sfr"],
        preset=spec["preset"],
        model=spec["model"],
        pretrained=spec.get("pretrained"),
        device=spec["device"],
        precision=spec["precision"],
        window_batch=spec["window_batch"],
        text_cache=False,
        **overrides,
    )
    g = torch.Generator().manual_seed(spec["seed"])
    emb = torch.randn(classes.num_queries, seg.embed_dim, generator=g)
    emb = emb / emb.norm(dim=-1, keepdim=True)
    parts: dict[str, float] = {}
    image_logits = seg.image_logits

    def timed_image_logits(*a: Any, **k: Any) -> Any:
        t = time.perf_counter()
        out = image_logits(*a, **k)
        parts["windows_s"] = parts.get("windows_s", 0.0) + time.perf_counter() - t
        return out

    seg.image_logits = timed_image_logits
    rss_before_predict = current_rss_bytes()
    sync = torch.cuda.synchronize if spec["device"].startswith("cuda") else None
    result, m = measure_call(lambda: seg.predict(image, lines, embeddings=emb), sync)
    predict_s, predict_peak = m.wall_s, m.peak
    mask = result.mask
    out: dict[str, Any] = {
        "status": "ok",
        "size_hw": [h, w],
        "megapixels": round(h * w / 1e6, 2),
        "predict_s": round(predict_s, 2),
        "predict_cpu_s": round(m.cpu_s, 2),
        "stall": m.stall,
        "windows_s": round(parts.get("windows_s", 0.0), 2),
        "full_resolution_s": round(predict_s - parts.get("windows_s", 0.0), 2),
        "image_build_s": round(image_s, 2),
        "num_queries": classes.num_queries,
        "num_classes": classes.num_classes,
        "mask": {
            "shape": list(mask.shape),
            "dtype": str(mask.dtype),
            "mib": mib(mask.nbytes),
            "max_label": int(mask.max()),
            "labels_present": int(np.unique(mask[:: max(1, h // 512), :: max(1, w // 512)]).size),
        },
        "band_budget_elements": seg.band_budget,
        "memory": {
            "rss_start_mib": mib(rss_start),
            "image_mib": mib(image.nbytes),
            "rss_after_image_mib": mib(rss_after_image),
            "rss_before_predict_mib": mib(rss_before_predict),
            **peak_memory(m),
            "predict_peak_over_before_mib": mib(predict_peak - rss_before_predict),
        },
        "config": seg.config.to_dict(),
        "torch_num_threads": torch.get_num_threads(),
        "env": relevant_env(os.environ),
        "load": {"before": m.load_before, "after": load_average(), "cpu_pressure": cpu_pressure()},
    }
    if spec["device"].startswith("cuda"):
        out["memory"]["cuda_peak_allocated_mib"] = mib(torch.cuda.max_memory_allocated())
    return out


def child_main(spec_json: str, out_path: str) -> int:
    return measure_in_child(child_memory, spec_json, out_path)


# ============================================================================== parent side


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float] | None:
    """Least-squares ``y = a + b x``; None with fewer than two distinct x."""
    if len(set(xs)) < 2:
        return None
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def scaling(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Time and peak memory against megapixels, and their extrapolation to 20k x 20k."""
    ok = [r for r in rows if r.get("status") == "ok"]
    mp = [r["megapixels"] for r in ok]
    fits = {
        "predict_s": linear_fit(mp, [r["predict_s"] for r in ok]),
        "peak_rss_mib": linear_fit(mp, [r["memory"]["predict_peak_rss_mib"] for r in ok]),
        "predict_peak_over_before_mib": linear_fit(
            mp, [r["memory"]["predict_peak_over_before_mib"] for r in ok]
        ),
    }
    if all(f is None for f in fits.values()):
        return None
    target_mp = TARGET[0] * TARGET[1] / 1e6
    out: dict[str, Any] = {"model": "y = a + b * megapixels, least squares over the measured sizes"}
    for name, fit in fits.items():
        if fit is None:
            continue
        a, b = fit
        out[name] = {
            "a": round(a, 3),
            "b_per_megapixel": round(b, 4),
            "extrapolated_20000x20000": round(a + b * target_mp, 1),
        }
    return out


def _stall(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def markdown(rows: list[dict[str, Any]], fit: dict[str, Any] | None) -> str:
    head = (
        "| size | MP | predict s | windows s | full-res s | CPU s | stall | peak RSS MiB "
        "| peak - (image + model) MiB | image MiB | mask | faults |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        size = "x".join(str(x) for x in r.get("size_hw", r.get("size", [])))
        if r.get("status") != "ok":
            lines.append(f"| {size} | {r.get('status')}: {str(r.get('error'))[:80]} |||||||||||")
            continue
        m, k = r["memory"], r["mask"]
        lines.append(
            f"| {size} | {r['megapixels']:.1f} | {r['predict_s']:.1f} | {r['windows_s']:.1f} "
            f"| {r['full_resolution_s']:.1f} | {r['predict_cpu_s']:.1f} | {_stall(r.get('stall'))} "
            f"| {m['peak_rss_mib']:.0f} | {m['predict_peak_over_before_mib']:.0f} | {m['image_mib']:.0f} "
            f"| {'x'.join(map(str, k['shape']))} {k['dtype']} ({k['mib']:.0f} MiB) | {m['minor_faults']} |"
        )
    if fit:
        lines.append("")
        for name in ("predict_s", "peak_rss_mib", "predict_peak_over_before_mib"):
            if name in fit:
                f = fit[name]
                lines.append(
                    f"* {name}: {f['a']} + {f['b_per_megapixel']} per megapixel; "
                    f"extrapolated to 20000x20000: {f['extrapolated_20000x20000']}"
                )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--sizes", "--size", default="20000x20000", help="comma-separated HxW (default 20000x20000)"
    )
    ap.add_argument("--model", default="ViT-B-16", help="open_clip name; 'infer' takes it from --pretrained")
    ap.add_argument("--pretrained", default=None, help="tag or local file (default: random weights)")
    ap.add_argument("--model-config", action="append", default=[], help="open_clip config to register")
    ap.add_argument("--preset", default="ade20k")
    ap.add_argument("--classes", default="ade20k.txt", help="class file (package name or path)")
    ap.add_argument("--method", default="naclip")
    ap.add_argument("--no-rcs", action="store_true")
    ap.add_argument("--no-sfr", action="store_true")
    ap.add_argument("--rcs-layers", default=None, help="override RCS layers, e.g. 1,2 (tiny test models)")
    ap.add_argument("--window-batch", type=int, default=8)
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="create_segmenter override"
    )
    ap.add_argument("--threads", type=int, default=2, help="torch threads (0: torch default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"))
    ap.add_argument("--malloc-env", default="", help='allocator settings for the children, "NAME=VALUE ..."')
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=7200, help="seconds per child process")
    ap.add_argument("--output", default=None, help="JSON path (default benchmarks/results/...)")
    ap.add_argument("--child", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.child:
        return child_main(*args.child)
    sizes = [parse_size(s) for s in split_list(args.sizes)]
    malloc = parse_env_assignments(args.malloc_env)
    env = child_env(malloc, args.threads)
    started = dt.datetime.now(dt.timezone.utc)
    rows: list[dict[str, Any]] = []
    for h, w in sizes:
        spec = {
            "size": [h, w],
            "model": None if args.model == "infer" else args.model,
            "pretrained": args.pretrained,
            "model_configs": [str(Path(p).resolve()) for p in args.model_config],
            "preset": args.preset,
            "classes": args.classes,
            "method": args.method,
            "rcs": not args.no_rcs,
            "sfr": not args.no_sfr,
            "rcs_layers": [int(x) for x in split_list(args.rcs_layers)] if args.rcs_layers else None,
            "window_batch": args.window_batch,
            "overrides": parse_overrides(args.set),
            "threads": args.threads,
            "device": args.device,
            "precision": args.precision,
            "seed": args.seed,
        }
        print(f"[{h}x{w}] ...", file=sys.stderr, flush=True)
        res = run_child(spec, env, args.timeout, script=__file__)
        res.setdefault("size_hw", [h, w])
        rows.append(res)
        if res.get("status") == "ok":
            print(
                f"    {res['predict_s']:.1f} s, peak {res['memory']['peak_rss_mib']:.0f} MiB", file=sys.stderr
            )
        else:
            print(f"    {res.get('status')}: {res.get('error')}", file=sys.stderr)
    fit = scaling(rows)
    report: dict[str, Any] = {
        **report_header("bench_memory", SCHEMA, started, argv),
        "source": source_state(),
        "allocator": {
            "parent_env": relevant_env(os.environ),
            "malloc_env_applied": malloc,
            "child_env": relevant_env(env),
        },
        "settings": {k: v for k, v in vars(args).items() if k != "child"},
        "text_encoder": TEXT_NOTE,
        "image": "synthetic_image(seed): warped smooth regions, shading, texture, noise; 64-row bands",
        "results": rows,
        "scaling": fit,
        "elapsed_s": round((dt.datetime.now(dt.timezone.utc) - started).total_seconds(), 1),
    }
    report["markdown"] = markdown(rows, fit)
    if args.output:
        out = Path(args.output)
    else:
        tag = "_".join(f"{h}x{w}" for h, w in sizes)
        out = RESULTS / f"bench_memory_{started:%Y-%m-%d}_{machine_slug(args.device)}_{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(report["markdown"])
    print(f"\nwrote {out}", file=sys.stderr)
    return 0 if all(r.get("status") == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
