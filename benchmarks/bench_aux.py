#!/usr/bin/env python
"""Peak memory and time of ``Segmenter.predict`` for the methods that pair CLIP with DINO / SAM / SAM 2.

Methods (each under its own repository's VOC21 preset, RCS / SFR at their defaults):

* ``proxyclip``: CLIP ViT-B/16 + DINO ViT-B/8,
* ``trident``: CLIP ViT-B/16 + DINO ViT-B/16 + SAM ViT-B,
* ``corrclip``: CLIP ViT-B/16 + DINO ViT-B/8 + SAM 2 hiera-L;
* ``proxyclip_dinov2``: ``proxyclip`` with DINOv2 ViT-B/14 with registers (the release's ``dinov2`` proxy);
* ``proxyclip_mae``: CLIP ViT-B/16 + MAE ViT-B/16 (the release's ``mae`` proxy).

Speed and memory do not depend on weight values, so every model is real-size with random weights. The
parent saves the auxiliary models once to temporary files in the formats the loaders read (DINO: the
facebookresearch torch.hub state dict, built as timm ``vit_base_patch{8,16}_224``; DINOv2: the hub layout
of timm's ``vit_base_patch14_reg4_dinov2``; MAE: ``{"model": state_dict}`` of timm's ``vit_base_patch16_224``;
SAM: segment-anything's ``sam_vit_b`` state dict; SAM 2: ``{"model": state_dict}`` of the ``sam2``
package's hiera-L config), then
runs every method in a fresh child process (this script with ``--child``): it loads the auxiliary models
(RSS recorded after each), builds the segmenter (random CLIP, ``pretrained=None``), and segments one
smooth synthetic image once, with precomputed random class embeddings (the text encoder is left out).

Reported per method: the peak RSS (``ru_maxrss``, loading included), the peak during ``predict`` over the
RSS right after the models were loaded, the RSS each model added, and the seconds of the one ``predict``.

Examples::

    python benchmarks/bench_aux.py                              # all three methods, 375x500, 2 threads
    python benchmarks/bench_aux.py --methods proxyclip --size 480x640
    python benchmarks/bench_aux.py --keep-checkpoints /tmp/aux_ckpt   # reuse the saved files next time
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_predict import (  # the benchmarks folder is not a package: sys.path above
    RESULTS,
    TEXT_NOTE,
    _child_versions,
    _class_file,
    _make_segmenter,
    _random_embeddings,
    _setup_child,
    child_env,
    current_rss_bytes,
    load_average,
    machine_slug,
    measure_call,
    measure_in_child,
    mib,
    parse_size,
    peak_memory,
    report_header,
    run_child,
    source_state,
    split_list,
    synthetic_image,
)

SCHEMA = 1


@dataclass(frozen=True)
class AuxMethod:
    """One method under test: its preset and its auxiliary checkpoints (kind -> checkpoint key)."""

    name: str
    preset: str
    aux: tuple[tuple[str, str], ...]
    description: str
    method: str = ""  # the registered method (default: ``name``)


METHODS: dict[str, AuxMethod] = {
    "proxyclip": AuxMethod(
        "proxyclip", "proxyclip/voc21", (("dino", "dino_vitb8"),), "CLIP ViT-B/16 + DINO ViT-B/8"
    ),
    "trident": AuxMethod(
        "trident",
        "trident/voc21",
        (("dino", "dino_vitb16"), ("sam", "sam_vit_b")),
        "CLIP ViT-B/16 + DINO ViT-B/16 + SAM ViT-B",
    ),
    "corrclip": AuxMethod(
        "corrclip",
        "corrclip/voc21",
        (("dino", "dino_vitb8"), ("sam", "sam2_hiera_l")),
        "CLIP ViT-B/16 + DINO ViT-B/8 + SAM 2 hiera-L",
    ),
    "proxyclip_dinov2": AuxMethod(
        "proxyclip_dinov2", "proxyclip/voc21", (("dino", "dinov2_vitb14_reg"),),
        "CLIP ViT-B/16 + DINOv2 ViT-B/14 (4 registers)", method="proxyclip",
    ),
    "proxyclip_mae": AuxMethod(
        "proxyclip_mae", "proxyclip/voc21", (("mae", "mae_vitb16"),), "CLIP ViT-B/16 + MAE ViT-B/16"
    ),
}

#: checkpoint key -> (file name, how it is built)
CHECKPOINTS: dict[str, tuple[str, str]] = {
    "dino_vitb8": ("dino_vitb8_random.pth", "timm vit_base_patch8_224 (num_classes=0), hub state dict"),
    "dino_vitb16": ("dino_vitb16_random.pth", "timm vit_base_patch16_224 (num_classes=0), hub state dict"),
    "sam_vit_b": ("sam_vit_b_random.pth", "segment_anything.build_sam_vit_b(checkpoint=None) state dict"),
    "sam2_hiera_l": ("sam2_hiera_l_random.pt", 'sam2 configs/sam2/sam2_hiera_l.yaml, {"model": state_dict}'),
    "dinov2_vitb14_reg": ("dinov2_vitb14_reg_random.pth",
                          "timm vit_base_patch14_reg4_dinov2 (518) in the hub layout (class position in "
                          "pos_embed)"),
    "mae_vitb16": ("mae_vitb16_random.pth",
                   'timm vit_base_patch16_224 (num_classes=0), {"model": state_dict}'),
}


# ============================================================================== checkpoints


def save_checkpoint(key: str, folder: Path, seed: int = 0) -> dict[str, Any]:
    """Build one real-size auxiliary model with random weights and save it in its loader's format.

    Returns:
        ``{"path", "mib", "parameters", "build_s", "format"}`` (an existing file is reused as is).
    """
    import torch

    name, how = CHECKPOINTS[key]
    path = folder / name
    t0 = time.perf_counter()
    if not path.exists():
        torch.manual_seed(seed)
        state: dict[str, Any]
        if key == "dinov2_vitb14_reg":
            import timm

            net = timm.create_model("vit_base_patch14_reg4_dinov2", pretrained=False, num_classes=0)
            state = dict(net.state_dict())
            state["register_tokens"] = state.pop("reg_token")
            state["pos_embed"] = torch.cat([torch.zeros_like(state["cls_token"]), state["pos_embed"]], dim=1)
            state["mask_token"] = torch.zeros(1, state["cls_token"].shape[-1])
        elif key == "mae_vitb16":
            import timm

            net = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
            state = {"model": net.state_dict()}
        elif key.startswith("dino_"):
            import timm

            patch = key.removeprefix("dino_vitb")
            net = timm.create_model(f"vit_base_patch{patch}_224", pretrained=False, num_classes=0)
            state = net.state_dict()
        elif key == "sam_vit_b":
            from segment_anything import build_sam_vit_b

            state = build_sam_vit_b(checkpoint=None).state_dict()
        elif key == "sam2_hiera_l":
            from sam2.build_sam import build_sam2

            net = build_sam2("configs/sam2/sam2_hiera_l.yaml", ckpt_path=None, device="cpu")
            state = {"model": net.state_dict()}
        else:  # pragma: no cover - CHECKPOINTS and this function go together
            raise ValueError(f"unknown checkpoint {key!r}")
        tmp = path.with_suffix(path.suffix + ".part")
        torch.save(state, tmp)
        tmp.replace(path)
        del state
    tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    tensors = tensors.get("model", tensors)
    params = sum(int(t.numel()) for t in tensors.values())
    return {
        "path": str(path),
        "mib": mib(path.stat().st_size),
        "parameters_m": round(params / 1e6, 2),
        "build_s": round(time.perf_counter() - t0, 1),
        "format": how,
    }


# ============================================================================== child side


def child_aux(spec: dict[str, Any]) -> dict[str, Any]:
    """Load the models of one method, segment one synthetic image once and measure it (child process)."""
    import torch

    from resclip.auxiliary import load_aux
    from resclip.text import parse_classes, read_class_file

    _setup_child(spec)
    h, w = spec["size"]
    image = synthetic_image(h, w, spec["seed"])
    rss_start = current_rss_bytes()
    loads: dict[str, Any] = {}

    def timed_load(name: str, source: str, load: Callable[[], Any]) -> Any:
        before, t0 = current_rss_bytes(), time.perf_counter()
        out = load()
        loads[name] = {"source": source, "load_s": round(time.perf_counter() - t0, 2),
                       "rss_added_mib": mib(current_rss_bytes() - before)}
        return out

    for kind, source in spec["aux_pretrained"].items():  # cached: create_segmenter reuses these models
        timed_load(kind, Path(source).name,
                   partial(load_aux, kind, source, device=spec["device"], precision=spec["precision"]))
    seg = timed_load("clip+segmenter", f"{spec['model']} random (pretrained=None)",
                     lambda: _make_segmenter(spec, rcs=spec["rcs"], sfr=spec["sfr"]))
    lines = read_class_file(_class_file(spec["classes"]))
    classes = parse_classes(lines)
    emb = _random_embeddings(classes.num_queries, seg.embed_dim, spec["seed"])
    rss_models = current_rss_bytes()
    with torch.inference_mode():
        result, m = measure_call(lambda: seg.predict(image, lines, embeddings=emb))
    predict_peak = m.peak
    mask = result.mask
    return {
        "status": "ok",
        "method": spec["method"],
        "preset": spec["preset"],
        "size_hw": [h, w],
        "predict_s": round(m.wall_s, 2),
        "predict_cpu_s": round(m.cpu_s, 2),
        "stall": m.stall,
        "num_queries": classes.num_queries,
        "mask": {"shape": list(mask.shape), "labels_present": len(set(mask.ravel().tolist()))},
        "loads": loads,
        "memory": {
            "rss_start_mib": mib(rss_start),
            "rss_models_mib": mib(rss_models),
            **peak_memory(m),
            "predict_peak_over_models_mib": mib(predict_peak - rss_models),
        },
        "config": seg.config.to_dict(),
        "versions": _child_versions(),
        "load": {"before": m.load_before, "after": load_average()},
    }


def child_main(spec_json: str, out_path: str) -> int:
    return measure_in_child(child_aux, spec_json, out_path)


# ============================================================================== parent side


def markdown(rows: list[dict[str, Any]]) -> str:
    head = (
        "| method | models | size | predict s | CPU s | stall | peak RSS MiB | RSS models MiB "
        "| peak - models MiB | RSS added per model MiB |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        name = r.get("variant", r.get("method", "?"))
        desc = METHODS[name].description if name in METHODS else ""
        if r.get("status") != "ok":
            lines.append(f"| {name} | {desc} | {r.get('status')}: {str(r.get('error'))[:100]} |||||||")
            continue
        m = r["memory"]
        added = ", ".join(f"{k} {v['rss_added_mib']:.0f}" for k, v in r["loads"].items())
        stall = "-" if r.get("stall") is None else f"{r['stall']:.2f}"
        lines.append(
            f"| {name} | {desc} | {'x'.join(map(str, r['size_hw']))} | {r['predict_s']:.1f} "
            f"| {r['predict_cpu_s']:.1f} | {stall} | {m['peak_rss_mib']:.0f} | {m['rss_models_mib']:.0f} "
            f"| {m['predict_peak_over_models_mib']:.0f} | {added} |"
        )
    return "\n".join(lines)


def _subset(methods: str) -> str:
    """``""`` for every method, else ``_<m1>-<m2>`` (a subset run does not replace the full one's file)."""
    names = split_list(methods)
    return "" if names == list(METHODS) else "_" + "-".join(names)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    ap.add_argument("--size", default="375x500", help="HxW of the synthetic image (default 375x500)")
    ap.add_argument("--model", default="ViT-B-16", help="open_clip architecture of the random CLIP")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (0: torch default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"))
    ap.add_argument("--window-batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--keep-checkpoints",
        default=None,
        metavar="DIR",
        help="save (or reuse) the random auxiliary checkpoints here instead of a temporary folder",
    )
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per child process")
    ap.add_argument("--output", default=None, help="JSON path (default benchmarks/results/...)")
    ap.add_argument("--child", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    return ap


def run_methods(args: argparse.Namespace, folder: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Save the checkpoints the chosen methods need into ``folder`` and measure each method in a child."""
    from resclip.presets import get_preset

    names = split_list(args.methods)
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    checkpoints: dict[str, Any] = {}
    for key in dict.fromkeys(k for n in names for _, k in METHODS[n].aux):
        print(f"[checkpoint {key}] ...", file=sys.stderr, flush=True)
        checkpoints[key] = save_checkpoint(key, folder, args.seed)
        print(f"    {checkpoints[key]['mib']:.0f} MiB in {checkpoints[key]['build_s']} s", file=sys.stderr)
    env = child_env({}, args.threads)
    h, w = parse_size(args.size)
    rows: list[dict[str, Any]] = []
    for name in names:
        am = METHODS[name]
        class_file = get_preset(am.preset).class_file or "voc21.txt"
        spec = {
            "method": am.method or name,
            "preset": am.preset,
            "classes": class_file,
            "size": [h, w],
            "model": args.model,
            "pretrained": None,
            "rcs": None,
            "sfr": None,
            "window_batch": args.window_batch,
            "overrides": {},
            "aux_pretrained": {kind: checkpoints[key]["path"] for kind, key in am.aux},
            "threads": args.threads,
            "device": args.device,
            "precision": args.precision,
            "seed": args.seed,
        }
        spec["overrides"]["aux_pretrained"] = spec["aux_pretrained"]
        print(f"[{name}] ...", file=sys.stderr, flush=True)
        res = run_child(spec, env, args.timeout, script=__file__)
        res.setdefault("method", spec["method"])
        res["variant"] = name  # proxyclip_dinov2 runs the method proxyclip
        rows.append(res)
        if res.get("status") == "ok":
            print(
                f"    {res['predict_s']:.1f} s, peak {res['memory']['peak_rss_mib']:.0f} MiB", file=sys.stderr
            )
        else:
            print(f"    {res.get('status')}: {res.get('error')}", file=sys.stderr)
    for c in checkpoints.values():
        c["path"] = Path(c["path"]).name
    return checkpoints, rows


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.child:
        return child_main(*args.child)
    started = dt.datetime.now(dt.timezone.utc)
    if args.keep_checkpoints:
        folder = Path(args.keep_checkpoints)
        folder.mkdir(parents=True, exist_ok=True)
        checkpoints, rows = run_methods(args, folder)
    else:
        with tempfile.TemporaryDirectory(prefix="bench_aux_") as tmp:
            checkpoints, rows = run_methods(args, Path(tmp))
    report: dict[str, Any] = {
        **report_header("bench_aux", SCHEMA, started, argv),
        "source": source_state(),
        "child_env_threads": {k: v for k, v in child_env({}, args.threads).items() if k.endswith("_THREADS")},
        "settings": {k: v for k, v in vars(args).items() if k != "child"},
        "text_encoder": TEXT_NOTE,
        "image": "synthetic_image(seed): warped smooth regions, shading, texture, noise",
        "weights": "random, real size; CLIP from create_segmenter(pretrained=None), auxiliary models from "
        "the checkpoints below (saved once by the parent, loaded by each child)",
        "checkpoints": checkpoints,
        "legend": {
            "peak_rss_mib": "ru_maxrss of the child (model loading included)",
            "rss_models_mib": "RSS after the image, the auxiliary models and the segmenter were built",
            "predict_peak_over_models_mib": "peak RSS during the one predict minus rss_models_mib",
            "rss_added_mib": "RSS added by loading each model, in order (CLIP: create_segmenter with the aux "
            "cached); order-dependent: a later model reuses heap the earlier loads freed",
            "predict_s": "wall seconds of one predict (the first: SAM's embedding cache is cold)",
        },
        "results": rows,
        "elapsed_s": round((dt.datetime.now(dt.timezone.utc) - started).total_seconds(), 1),
    }
    report["markdown"] = markdown(rows)
    out = (
        Path(args.output)
        if args.output
        else RESULTS / f"bench_aux_{started:%Y-%m-%d}_{machine_slug(args.device)}{_subset(args.methods)}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(report["markdown"])
    print(f"\nwrote {out}", file=sys.stderr)
    return 0 if all(r.get("status") == "ok" for r in rows) else 1


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
