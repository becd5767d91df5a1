"""Loading a checkpoint never runs code from it, and bad checkpoints get one clear line.

The malicious archives below are real TorchScript archives whose ``__setstate__`` reads a file,
writes another, or loops forever when ``torch.jit.load`` runs them; each test first shows the
attack works with ``torch.jit.load`` (in a child process), then that resclip loads the same file
with no side effect.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from resclip.checkpoints import read_checkpoint
from resclip.clip import LoadedClip, load_clip
from resclip.scriptarchive import read_script_weights

GOLDEN_CKPT = Path(__file__).parent / "data" / "golden" / "tiny_clip_b16_fp16.pt"


@pytest.fixture(scope="module")
def golden_state() -> dict[str, torch.Tensor]:
    return torch.load(GOLDEN_CKPT, weights_only=True)


@pytest.fixture(scope="module")
def golden_clip() -> LoadedClip:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return load_clip(pretrained=str(GOLDEN_CKPT))


class _Holder(nn.Module):
    """An archive laid out like OpenAI's: the CLIP's children and parameters at the top level."""

    def __init__(self, clip: nn.Module, payload: nn.Module | None = None) -> None:
        super().__init__()
        for name, child in clip.named_children():
            self.add_module(name, child)
        for name, param in clip.named_parameters(recurse=False):
            self.register_parameter(name, param)
        self.register_buffer("input_resolution", torch.tensor(224))
        self.not_a_buffer = torch.zeros(3)  # a plain tensor attribute: not part of the state dict
        if payload is not None:
            self.payload = payload

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class _Thief(nn.Module):
    """On loading, copies ``size`` bytes of ``src`` into ``dst`` (torch.from_file, shared mapping)."""

    def __init__(self, src: str, dst: str, size: int) -> None:
        super().__init__()
        self.src, self.dst, self.size = src, dst, size

    @torch.jit.export
    def __getstate__(self) -> tuple[str, str, int, bool]:
        return (self.src, self.dst, self.size, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, str, int, bool]) -> None:
        self.src, self.dst, self.size, self.training = state
        secret = torch.from_file(self.src, False, self.size, dtype=torch.uint8)
        out = torch.from_file(self.dst, True, self.size, dtype=torch.uint8)
        out.copy_(secret)
        self.size = int(out.sum().item()) // 1000000 + self.size  # keeps the copy alive in the graph

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class _Spinner(nn.Module):
    """On loading, never returns."""

    def __init__(self) -> None:
        super().__init__()
        self.turns = 1

    @torch.jit.export
    def __getstate__(self) -> tuple[int, bool]:
        return (self.turns, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[int, bool]) -> None:
        self.turns, self.training = state
        while self.turns > 0:
            self.turns = self.turns + 1
            if self.turns > 1000:
                self.turns = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _save_script(module: nn.Module, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(module), str(path))
    return path


def _run_jit_load(path: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    code = f"import torch; torch.jit.load({str(path)!r}); print('loaded')"
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, check=False
    )


def _load_child(path: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    code = textwrap.dedent(f"""
        import warnings
        warnings.simplefilter("ignore")
        from resclip.clip import load_clip
        loaded = load_clip(pretrained={str(path)!r})
        print("layers", loaded.info.num_layers)
    """)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, check=False
    )


def test_reader_matches_jit_state_dict(golden_clip: LoadedClip, tmp_path: Path) -> None:
    path = _save_script(_Holder(golden_clip.model), tmp_path / "benign.pt")
    ours = read_script_weights(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = torch.jit.load(str(path)).state_dict()
    assert sorted(ours) == sorted(theirs)
    assert "not_a_buffer" not in ours and "input_resolution" in ours
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype and torch.equal(ours[key], value), key


def test_malicious_archive_reads_and_writes_nothing(golden_clip: LoadedClip, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"private key material 0123456789")
    stolen = tmp_path / "stolen.bin"
    size = len(secret.read_bytes())
    thief = _Thief(str(secret), str(stolen), size)
    path = _save_script(_Holder(golden_clip.model, thief), tmp_path / "ViT-B-16.pt")

    # the archive really is an attack: torch.jit.load copies the secret
    stolen.write_bytes(b"\0" * size)
    assert _run_jit_load(path, timeout=120).stdout.strip() == "loaded"
    assert stolen.read_bytes() == secret.read_bytes()

    stolen.write_bytes(b"\0" * size)
    before = sorted(p.name for p in tmp_path.iterdir())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        loaded = load_clip(pretrained=str(path))
    assert stolen.read_bytes() == b"\0" * size  # nothing was written
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    for key, value in golden_clip.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key


@pytest.mark.slow
def test_hanging_archive_does_not_hang(golden_clip: LoadedClip, tmp_path: Path) -> None:
    path = _save_script(_Holder(golden_clip.model, _Spinner()), tmp_path / "spin.pt")
    with pytest.raises(subprocess.TimeoutExpired):  # torch.jit.load runs the loop
        _run_jit_load(path, timeout=5)
    done = _load_child(path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["layers", "12"]


class _Payload:
    def __init__(self, call: object, arg: str) -> None:
        self.call, self.arg = call, arg

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (self.call, (self.arg,))


@pytest.mark.parametrize("kind", ["system", "eval"])
def test_pickle_with_code_is_refused(tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "ran"
    if kind == "system":
        payload = _Payload(os.system, f"touch {marker}")
    else:
        payload = _Payload(eval, f"open({str(marker)!r}, 'w')")
    path = tmp_path / "evil.pt"
    torch.save({"visual.proj": torch.zeros(2, 2), "x": payload}, path)
    with pytest.raises(ValueError) as info:
        load_clip(pretrained=str(path))
    message = str(info.value)
    assert message.startswith(f"refusing to read pretrained={str(path)!r}: besides tensors it holds Python")
    assert ("(posix.system)" if kind == "system" else "(eval)") in message
    assert "weights_only=False" not in message and "\n" not in message
    assert not marker.exists()


def test_garbage_is_not_blamed_on_objects(tmp_path: Path) -> None:
    path = tmp_path / "garbage.pt"
    path.write_bytes(bytes(range(256)) * 16)
    expected = r"\(UnpicklingError: not a file torch\.save wrote\)\. The file"
    with pytest.raises(ValueError, match=expected) as info:
        read_checkpoint(path)
    assert "weights_only" not in str(info.value)


@pytest.mark.parametrize(
    ("archive_edit", "message"),
    [
        ("global", r"refers to posix\.system, which a weights file never needs"),
        ("truncate", r"storage '\d+' holds \d+ bytes, its record says \d+"),
    ],
)
def test_edited_archives_are_refused(
    golden_clip: LoadedClip, tmp_path: Path, archive_edit: str, message: str
) -> None:
    import zipfile

    path = _save_script(_Holder(golden_clip.model), tmp_path / "ok.pt")
    edited = tmp_path / "edited.pt"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(edited, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if archive_edit == "global" and info.filename.endswith("/data.pkl"):
                data = b"\x80\x02cposix\nsystem\nX\x04\x00\x00\x00true\x85R."
            if archive_edit == "truncate" and "/data/" in info.filename and info.file_size > 64:
                data = data[: len(data) // 2]
            dst.writestr(info, data)
    with pytest.raises(ValueError, match=message) as info:
        load_clip(pretrained=str(edited))
    assert str(info.value).startswith(f"refusing to read pretrained={str(edited)!r}")


def test_missing_last_block_is_reported(golden_state: dict[str, torch.Tensor], tmp_path: Path) -> None:
    """A ViT-B/16-shaped file without its last visual block loads, with a warning naming the cut."""
    import open_clip

    full = open_clip.create_model("ViT-B-16").state_dict()
    cut = {k: v.half() for k, v in full.items() if not k.startswith("visual.transformer.resblocks.11.")}
    path = tmp_path / "cut.pt"
    torch.save(cut, path)
    with pytest.warns(UserWarning) as record:
        loaded = load_clip(pretrained=str(path))
    texts = [str(w.message) for w in record if "looks like" in str(w.message)]
    assert texts == [
        f"pretrained={str(path)!r} looks like ViT-B-16 but has 11 visual blocks where ViT-B-16 has 12: the "
        "file may be truncated or edited. It was loaded as a custom ViT (vit-w768-l11-p16-i224); pass "
        "model='ViT-B-16' to require the full architecture."
    ]
    assert loaded.info.num_layers == 11
    with pytest.raises(ValueError, match=r"does not fit model='ViT-B-16'.*missing keys"):
        load_clip("ViT-B-16", pretrained=str(path))


def test_unknown_architecture_is_said(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match=r"matches no known open_clip architecture; it was loaded as a"):
        load_clip(pretrained=str(GOLDEN_CKPT))


def _bad_state(golden_state: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    state = {k: v.clone() for k, v in golden_state.items()}
    if kind == "int":
        return {k: (v * 100).to(torch.int8) if v.is_floating_point() else v for k, v in state.items()}
    if kind == "sparse":
        state["visual.proj"] = state["visual.proj"].float().to_sparse()
        return state
    return {k: torch.zeros_like(v) if v.is_floating_point() else v for k, v in state.items()}


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("int", r"stores \d+ weights as integers \(int8; e\.g\. .*quantised or converted checkpoints"),
        ("sparse", r"holds 1 sparse tensors \(e\.g\. \['visual\.proj'\]\).*to_dense\(\)"),
        ("zero", r"holds only zeros in all \d+ weight tensors: it is empty or was zeroed"),
    ],
)
def test_unusable_weights_get_one_line(
    golden_state: dict[str, torch.Tensor], tmp_path: Path, kind: str, message: str
) -> None:
    path = tmp_path / f"{kind}.pt"
    torch.save(_bad_state(golden_state, kind), path)
    with pytest.raises(ValueError, match=message) as info:
        load_clip(pretrained=str(path))
    assert "\n" not in str(info.value) and len(str(info.value)) < 400


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "weights.pt"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match=r"is not a regular file \(a FIFO, socket or device\)"):
        load_clip(pretrained=str(fifo))
