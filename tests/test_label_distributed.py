"""`resclip label` under torchrun (2 processes, gloo) and Ray Data (2 CPU actors) writes the same bytes as
one process: Parquet files, manifests, run record and mask PNGs (issue 15)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("pyarrow", reason="needs the 'label' extra: pip install 'resclip[label]'")

from resclip.commands import COMMANDS
from resclip.commands import label as label_cmd

CLASSES = "cat; dog; sky, clouds"
FAST = ["--device", "cpu", "--set", "rcs_layers=(1,2)", "--set", "short_side=64", "--set", "slide_crop=0",
        "--set", "sfr_first_pass_pamr_steps=0", "--quiet", "--shard-size", "2", "--save-masks"]


pytestmark = pytest.mark.usefixtures("text_cache")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Seven images of several sizes (one truncated) in two folders: 4 shards of 2."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "sub").mkdir()
    rng = np.random.default_rng(5)
    for i in range(7):
        img = np.clip(rng.normal(120, 60, (30 + 3 * i, 50 - 2 * i, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG" if i % 2 else "JPEG")
        data = buf.getvalue()[:200] if i == 4 else buf.getvalue()
        (root / f"{'sub/' if i > 3 else ''}im{i}.{'png' if i % 2 else 'jpg'}").write_bytes(data)
    return root


@pytest.fixture(scope="module")
def one_process(corpus: Path, tiny64: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("one") / "out"
    assert label_cmd.main([str(corpus), "--classes", CLASSES, "--out", str(out), "--pretrained", str(tiny64),
                           *FAST]) == 0
    return _files(out)


def _files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _entry() -> list[str]:
    """`resclip.cli label` once the command table lists it, else the command module alone."""
    listed = any(c.name == "label" for c in COMMANDS)
    return ["resclip.cli", "label"] if listed else ["resclip.commands.label"]


@pytest.mark.slow
def test_torchrun_two_processes_write_the_same_bytes(corpus: Path, tiny64: Path, tmp_path: Path,
                                                     text_cache: Path, one_process: dict[str, bytes]):
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun not installed")
    env = {**os.environ, "RESCLIP_CACHE": str(text_cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "out"
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", *_entry(), str(corpus),
           "--classes", CLASSES, "--out", str(out), "--pretrained", str(tiny64), *FAST]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = _files(out)
    assert sorted(files) == sorted(one_process) and "part-00003.parquet" in files
    assert files == one_process
    # rerun: every shard is finished, nothing is rewritten
    before = {p: (out / p).stat().st_mtime_ns for p in files}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p: (out / p).stat().st_mtime_ns for p in files if p != "_label.json"} == {
        p: t for p, t in before.items() if p != "_label.json"}


@pytest.mark.slow
def test_ray_two_cpu_actors_write_the_same_bytes(corpus: Path, tiny64: Path, tmp_path: Path,
                                                 one_process: dict[str, bytes]):
    ray = pytest.importorskip("ray", reason="needs the 'ray' extra: pip install 'resclip[ray]'")
    pytest.importorskip("ray.data", reason="needs the 'ray' extra: pip install 'resclip[ray]'")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        out = tmp_path / "out"
        argv = [str(corpus), "--classes", CLASSES, "--out", str(out), "--pretrained", str(tiny64), *FAST,
                "--engine", "ray", "--num-actors", "2", "--workers", "1"]
        assert label_cmd.main(argv) == 0
        assert _files(out) == one_process
        from resclip.labelling import label

        summary = label(corpus, CLASSES, out, pretrained=str(tiny64), device="cpu", shard_size=2,
                        save_masks=True, progress=False, engine="ray", rcs_layers=(1, 2), short_side=64,
                        slide_crop=0, sfr_first_pass_pamr_steps=0)
        assert (summary.skipped_shards, summary.new_images, summary.images) == (4, 0, 7)
        assert [f[0] for f in summary.failures] == ["sub/im4.jpg"]
    finally:
        ray.shutdown()
