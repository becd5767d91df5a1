"""Build the self-contained test data in ``tests/data`` from the shared golden vectors and fixtures.

The test suite must run on a fresh clone without the ``../shared`` folder, so this script copies what
the tests need into ``tests/data``, in a compact form:

* ``golden/tiny_clip_b16_fp16.pt`` and ``golden/tiny_clip_b32_delta_fp16.pt``: the random CLIP
  checkpoints with every floating tensor stored as float16. Every source value is exactly
  representable in float16; the script checks that the float16 -> float32 round trip reproduces the
  source bit for bit, and refuses to write anything otherwise.
* ``golden/open_clip_tiny-clip-b{16,32}.json``: copied byte for byte.
* ``golden/golden_resclip.npz`` and ``golden/golden_baselines.npz``: the same keys, dtypes and values
  as the source, except that the full (18, 224, 224) ``W0__naclip_resclip__sfr_first_pass_probs`` is
  replaced by 4096 sampled pixels (``..._samples`` (18, 4096) and the flat pixel indices ``..._idx``).
  The zip members carry a fixed timestamp, so a rebuild gives byte-identical files.
* ``golden/manifest.json``: the source manifest as compact JSON, without the per-array ``desc`` text,
  with the entries of the trimmed array replaced by those of the new keys.
* ``benchmarks/``: the real benchmark samples, copied unchanged, with the fixtures README (the dataset
  attribution) as ``benchmarks/README.md``.

The script is idempotent: a file whose content is already correct is not rewritten.

Usage::

    python tools/build_test_data.py [--shared ../shared] [--out tests/data]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent

CHECKPOINTS = {
    "tiny_clip_b16.pt": "tiny_clip_b16_fp16.pt",
    "tiny_clip_b32_delta.pt": "tiny_clip_b32_delta_fp16.pt",
}
VERBATIM_GOLDEN = ("open_clip_tiny-clip-b16.json", "open_clip_tiny-clip-b32.json")
RESCLIP_NPZ = "golden_resclip.npz"
BASELINES_NPZ = "golden_baselines.npz"

PROBS_NPZ = RESCLIP_NPZ
PROBS_KEY = "W0__naclip_resclip__sfr_first_pass_probs"
PROBS_SAMPLES_KEY = f"{PROBS_KEY}_samples"
PROBS_IDX_KEY = f"{PROBS_KEY}_idx"
PROBS_N_SAMPLES = 4096
PROBS_SEED = 0

ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)
FILE_MODE = 0o644


# --------------------------------------------------------------------------------------------------
# small helpers


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_if_changed(path: Path, data: bytes) -> bool:
    """Write ``data`` to ``path`` unless the file already holds exactly these bytes."""
    if path.is_file() and path.read_bytes() == data:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.chmod(FILE_MODE)
    tmp.replace(path)
    return True


def copy_if_changed(src: Path, dst: Path) -> bool:
    return write_if_changed(dst, src.read_bytes())


def report(path: Path, changed: bool) -> None:
    state = "written" if changed else "unchanged"
    print(f"  {state:9s} {path} ({path.stat().st_size:,} B)")


# --------------------------------------------------------------------------------------------------
# checkpoints


def to_fp16_lossless(state: Mapping[str, Any], name: str) -> dict[str, torch.Tensor]:
    """Cast the floating tensors of ``state`` to float16, checking that nothing is lost."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name}: {key} is a {type(value).__name__}, expected a tensor")
        if value.is_floating_point():
            half = value.detach().to(torch.float16).contiguous().clone()
            back = half.to(value.dtype)
            if not torch.equal(back, value):
                raise ValueError(f"{name}: {key} is not exactly representable in float16")
            if value.dtype == torch.float32 and not torch.equal(
                back.view(torch.int32), value.contiguous().view(torch.int32)
            ):
                raise ValueError(f"{name}: {key} float16 round trip is not bitwise exact")
            out[key] = half
        else:
            out[key] = value.detach().contiguous().clone()
    return out


def same_state(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> bool:
    if list(a) != list(b):
        return False
    return all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def check_round_trip(
    stored: Mapping[str, torch.Tensor], source: Mapping[str, torch.Tensor], name: str
) -> None:
    """Check that the stored (float16) state dict, cast back, equals the source exactly."""
    if list(stored) != list(source):
        raise ValueError(f"{name}: keys differ from the source")
    for key, ref in source.items():
        got = stored[key]
        if ref.is_floating_point():
            if got.dtype != torch.float16:
                raise ValueError(f"{name}: {key} is stored as {got.dtype}, expected float16")
            got = got.to(ref.dtype)
        elif got.dtype != ref.dtype:
            raise ValueError(f"{name}: {key} dtype changed ({ref.dtype} -> {got.dtype})")
        if got.shape != ref.shape or not torch.equal(got, ref):
            raise ValueError(f"{name}: {key} does not round-trip to the source")


def convert_checkpoint(src: Path, dst: Path) -> bool:
    source = torch.load(src, map_location="cpu", weights_only=True)
    if not isinstance(source, dict):
        raise TypeError(f"{src}: expected a state dict, got {type(source).__name__}")
    half = to_fp16_lossless(source, src.name)
    changed = False
    existing: Any = None
    if dst.is_file():
        try:
            existing = torch.load(dst, map_location="cpu", weights_only=True)
        except Exception:  # a broken or foreign file is simply rebuilt
            existing = None
    if not (isinstance(existing, dict) and same_state(existing, half)):
        buf = io.BytesIO()
        torch.save(half, buf)
        changed = write_if_changed(dst, buf.getvalue())
    check_round_trip(torch.load(dst, map_location="cpu", weights_only=True), source, dst.name)
    return changed


# --------------------------------------------------------------------------------------------------
# npz files


def npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """Serialise like ``np.savez_compressed``, but with fixed zip timestamps (reproducible bytes)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for key, arr in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=ZIP_DATE_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = FILE_MODE << 16
            with zf.open(info, "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, arr, allow_pickle=False)
    return buf.getvalue()


def load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def probs_sample_indices(height: int, width: int) -> np.ndarray:
    rng = np.random.default_rng(PROBS_SEED)
    idx = rng.choice(height * width, PROBS_N_SAMPLES, replace=False)
    return np.sort(idx).astype(np.int64)


def trim_arrays(name: str, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Return the arrays to store: everything, except the full SFR probs map, which is sampled."""
    out: dict[str, np.ndarray] = {}
    for key, arr in arrays.items():
        if name == PROBS_NPZ and key == PROBS_KEY:
            if arr.ndim != 3 or arr.dtype != np.float32:
                raise ValueError(f"{key}: unexpected {arr.shape} {arr.dtype}")
            idx = probs_sample_indices(arr.shape[1], arr.shape[2])
            out[PROBS_SAMPLES_KEY] = np.ascontiguousarray(arr.reshape(arr.shape[0], -1)[:, idx])
            out[PROBS_IDX_KEY] = idx
        else:
            out[key] = arr
    if name == PROBS_NPZ and PROBS_SAMPLES_KEY not in out:
        raise KeyError(f"{name}: {PROBS_KEY} not found")
    return out


def same_array(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def verify_npz(path: Path, source: Mapping[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
    """Reload the written npz and check it against the source, bit for bit."""
    stored = load_npz(path)
    expected = set(source) - ({PROBS_KEY} if name == PROBS_NPZ else set())
    if name == PROBS_NPZ:
        expected |= {PROBS_SAMPLES_KEY, PROBS_IDX_KEY}
    if set(stored) != expected:
        raise ValueError(f"{path}: keys differ from the expected set")
    for key, arr in source.items():
        if key == PROBS_KEY and name == PROBS_NPZ:
            idx = stored[PROBS_IDX_KEY]
            samples = stored[PROBS_SAMPLES_KEY]
            full = arr.reshape(arr.shape[0], -1)
            if not same_array(samples, np.ascontiguousarray(full[:, idx])):
                raise ValueError(f"{path}: {PROBS_SAMPLES_KEY} differs from the source")
            if not (np.all(np.diff(idx) > 0) and idx[0] >= 0 and idx[-1] < full.shape[1]):
                raise ValueError(f"{path}: {PROBS_IDX_KEY} is not a sorted set of valid indices")
        elif not same_array(stored[key], arr):
            raise ValueError(f"{path}: {key} differs from the source")
    return stored


def build_npz(src: Path, dst: Path) -> tuple[bool, dict[str, np.ndarray]]:
    source = load_npz(src)
    changed = write_if_changed(dst, npz_bytes(trim_arrays(src.name, source)))
    return changed, verify_npz(dst, source, src.name)


# --------------------------------------------------------------------------------------------------
# manifest


def trimmed_manifest(
    manifest: Mapping[str, Any],
    stored: Mapping[str, Mapping[str, np.ndarray]],
    out_dir: Path,
    checkpoint_sources: Mapping[str, str],
) -> dict[str, Any]:
    out: dict[str, Any] = {k: v for k, v in manifest.items() if k != "files"}
    out["test_data"] = {
        "what": "Compact copy of the golden vectors for the test suite, built by tools/build_test_data.py.",
        "checkpoints": {
            dst: {
                "source": src,
                "source_sha256": checkpoint_sources[src],
                "dtype": "float16 (every floating tensor; fp16 -> fp32 round trip equals the source exactly)",
            }
            for src, dst in CHECKPOINTS.items()
        },
        "trimmed": {
            PROBS_KEY: (
                f"replaced by {PROBS_SAMPLES_KEY} (Q, {PROBS_N_SAMPLES}) = full.reshape(Q, H*W)[:, idx] and "
                f"{PROBS_IDX_KEY} = sort(np.random.default_rng({PROBS_SEED}).choice(H*W, "
                f"{PROBS_N_SAMPLES}, replace=False))"
            ),
        },
        "dropped_fields": "the per-array 'desc' text (see the source manifest / README for it)",
    }
    files: dict[str, Any] = {}
    for npz_name, entry in manifest["files"].items():
        arrays_out: dict[str, Any] = {}
        for key, meta in entry["arrays"].items():
            kept = {k: v for k, v in meta.items() if k != "desc"}
            if npz_name == PROBS_NPZ and key == PROBS_KEY:
                config = {k: v for k, v in kept.items() if k not in ("shape", "dtype")}
                for new_key in (PROBS_SAMPLES_KEY, PROBS_IDX_KEY):
                    arr = stored[npz_name][new_key]
                    desc = (
                        f"{key} (full shape {meta['shape']}) at the flat pixel indices {PROBS_IDX_KEY}"
                        if new_key == PROBS_SAMPLES_KEY
                        else f"sorted flat indices into H*W (row-major) of the samples in {PROBS_SAMPLES_KEY}"
                    )
                    arrays_out[new_key] = {
                        "shape": list(arr.shape),
                        "dtype": str(arr.dtype),
                        "desc": desc,
                        "sampled_from": key,
                        "full_shape": meta["shape"],
                        "sample_seed": PROBS_SEED,
                        **config,
                    }
            else:
                arrays_out[key] = kept
        for key, arr in stored[npz_name].items():
            meta = arrays_out.get(key)
            if meta is None or meta["shape"] != list(arr.shape) or meta["dtype"] != str(arr.dtype):
                raise ValueError(f"manifest entry of {npz_name}:{key} does not match the stored array")
        if set(arrays_out) != set(stored[npz_name]):
            raise ValueError(f"manifest of {npz_name} lists arrays that are not stored")
        files[npz_name] = {
            "sha256": sha256_bytes((out_dir / npz_name).read_bytes()),
            "source_sha256": entry.get("sha256"),
            "arrays": arrays_out,
        }
    out["files"] = files
    return out


# --------------------------------------------------------------------------------------------------
# benchmark fixtures


def sync_tree(src: Path, dst: Path, keep: set[Path]) -> int:
    """Make ``dst`` a copy of ``src`` (files outside ``keep`` that ``src`` lacks are removed)."""
    files = {p.relative_to(src) for p in src.rglob("*") if p.is_file()}
    clash = files & keep
    if clash:
        raise ValueError(f"{src}: would overwrite {sorted(map(str, clash))}")
    changed = sum(copy_if_changed(src / rel, dst / rel) for rel in sorted(files))
    if dst.is_dir():
        for path in sorted(dst.rglob("*"), reverse=True):
            rel = path.relative_to(dst)
            if path.is_file() and rel not in files and rel not in keep:
                path.unlink()
                changed += 1
            elif path.is_dir() and not any(path.iterdir()):
                path.rmdir()
    return changed


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# --------------------------------------------------------------------------------------------------


def build(shared: Path, out: Path) -> None:
    golden_src = shared / "golden"
    fixtures_src = shared / "fixtures"
    golden_dst = out / "golden"
    bench_dst = out / "benchmarks"
    manifest = json.loads((golden_src / "manifest.json").read_text(encoding="utf-8"))

    print(f"golden -> {golden_dst}")
    checkpoint_sources: dict[str, str] = {}
    for src_name, dst_name in CHECKPOINTS.items():
        src = golden_src / src_name
        checkpoint_sources[src_name] = sha256_bytes(src.read_bytes())
        expected = manifest.get("checkpoints", {}).get(src_name, {}).get("sha256")
        if expected and expected != checkpoint_sources[src_name]:
            raise ValueError(f"{src}: sha256 differs from the manifest")
        report(golden_dst / dst_name, convert_checkpoint(src, golden_dst / dst_name))
    for name in VERBATIM_GOLDEN:
        report(golden_dst / name, copy_if_changed(golden_src / name, golden_dst / name))

    stored: dict[str, dict[str, np.ndarray]] = {}
    for name in (RESCLIP_NPZ, BASELINES_NPZ):
        src = golden_src / name
        expected = manifest["files"][name].get("sha256")
        if expected and expected != sha256_bytes(src.read_bytes()):
            raise ValueError(f"{src}: sha256 differs from the manifest")
        changed, stored[name] = build_npz(src, golden_dst / name)
        report(golden_dst / name, changed)

    trimmed = trimmed_manifest(manifest, stored, golden_dst, checkpoint_sources)
    text = json.dumps(trimmed, ensure_ascii=False, separators=(",", ":")) + "\n"
    manifest_dst = golden_dst / "manifest.json"
    report(manifest_dst, write_if_changed(manifest_dst, text.encode("utf-8")))

    print(f"benchmarks -> {bench_dst}")
    readme = Path("README.md")
    n_changed = sync_tree(fixtures_src / "benchmarks", bench_dst, keep={readme})
    n_changed += copy_if_changed(fixtures_src / "README.md", bench_dst / readme)
    print(f"  {n_changed} file(s) written or removed, {dir_size(bench_dst):,} B in total")
    print(f"total size of {out}: {dir_size(out):,} B")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--shared",
        type=Path,
        default=REPO_ROOT.parent / "shared",
        help="the shared folder holding golden/ and fixtures/ (default: ../shared next to the repo root)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO_ROOT / "tests" / "data",
        help="output folder (default: tests/data in the repo root)",
    )
    args = parser.parse_args(argv)
    shared: Path = args.shared.resolve()
    if not (shared / "golden").is_dir() or not (shared / "fixtures").is_dir():
        print(f"error: {shared} has no golden/ and fixtures/ folders", file=sys.stderr)
        return 2
    build(shared, args.out.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
