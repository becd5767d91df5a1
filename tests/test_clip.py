"""Tests for resclip.clip: loading CLIP models by name, tag and local checkpoint (tiny random models only)."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import open_clip
import pytest
import torch
from torch import nn

import resclip.clip
from resclip.clip import (
    ClipInfo,
    LoadedClip,
    _resolve_model_name,
    load_clip,
    resolve_device,
    resolve_precision,
)

DATA = Path(__file__).parent / "data" / "golden"
GOLDEN_CKPT = DATA / "tiny_clip_b16_fp16.pt"
TINY = "resclip-test-clip-tiny"  # QuickGELU, vision heads of width 32 (not inferable as width // 64)
TINY_GELU = "resclip-test-clip-tiny-gelu"
TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module", autouse=True)
def tiny_configs(tmp_path_factory: pytest.TempPathFactory) -> None:
    folder = tmp_path_factory.mktemp("open_clip_configs")
    (folder / f"{TINY}.json").write_text(json.dumps({**TINY_CFG, "quick_gelu": True}))
    (folder / f"{TINY_GELU}.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(folder)


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make accidental downloads fail fast (huggingface_hub reads HF_HUB_OFFLINE when imported)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _random(name: str = TINY) -> LoadedClip:
    with pytest.warns(UserWarning, match="RANDOM weights"):
        return load_clip(name, pretrained=None)


@pytest.fixture(scope="module")
def tiny() -> LoadedClip:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return load_clip(TINY, pretrained=None)


def _images(size: int = 32) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


def _assert_same_model(a: Any, b: Any, image_size: int = 32) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    # non-persistent buffers too (files lack them: loaders build the model without storage, then
    # rebuild them), and nothing left on the meta device
    ba, bb = dict(a.named_buffers()), dict(b.named_buffers())
    assert ba.keys() == bb.keys()
    for key in ba:
        assert torch.equal(ba[key], bb[key]), key
    assert not any(t.is_meta for t in [*a.parameters(), *a.buffers()])
    with torch.no_grad():
        assert torch.equal(a.encode_image(_images(image_size)), b.encode_image(_images(image_size)))
        tokens = open_clip.get_tokenizer(TINY)(["a photo of a cat", "sky"])
        ta, tb = a.encode_text(tokens), b.encode_text(tokens)
        assert torch.equal(ta, tb), (ta - tb).abs().max()


def _uses_quick_gelu(model: nn.Module) -> bool:
    return any(isinstance(m, open_clip.transformer.QuickGELU) for m in model.modules())


# ---------------------------------------------------------------------------------------------- basics


def test_random_weights_warn_and_build() -> None:
    loaded = _random()
    assert loaded.info == ClipInfo(
        arch=TINY,
        pretrained=None,
        quick_gelu=True,
        patch_size=16,
        image_size=32,
        num_layers=2,
        width=64,
        heads=2,
        embed_dim=32,
    )
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    tokens = loaded.tokenizer(["a cat", "a dog"])
    assert tokens.shape == (2, 77) and tokens.dtype == torch.int64
    with torch.no_grad():
        assert cast(Any, loaded.model).encode_image(_images()).shape == (2, 32)


def test_random_weights_follow_the_config_activation() -> None:
    assert _random(TINY_GELU).info.quick_gelu is False
    with pytest.warns(UserWarning, match="RANDOM"):
        assert load_clip(TINY_GELU, None, quick_gelu=True).info.quick_gelu is True


@pytest.mark.parametrize(("precision", "dtype"), [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_precision_casts_every_parameter(precision: str, dtype: torch.dtype) -> None:
    with pytest.warns(UserWarning, match="RANDOM"):
        loaded = load_clip(TINY, None, precision=precision, device="cpu")
    assert {p.dtype for p in loaded.model.parameters()} == {dtype}


def test_resolve_precision_and_device() -> None:
    assert resolve_precision("fp32") is torch.float32
    assert resolve_precision("bf16") is torch.bfloat16
    with pytest.raises(ValueError, match=r"precision='fp8'.*\['bf16', 'fp16', 'fp32'\]"):
        resolve_precision("fp8")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device("auto").type in {"cpu", "cuda", "mps"}
    with pytest.raises(ValueError, match="device='gpu0'"):
        resolve_device("gpu0")


def test_openai_spellings_resolve() -> None:
    assert _resolve_model_name("ViT-B/16") == "ViT-B-16"
    assert _resolve_model_name("ViT-L/14@336px") == "ViT-L-14-336"
    assert _resolve_model_name(TINY) == TINY


def test_unknown_model_name() -> None:
    with pytest.raises(ValueError, match=r"model='ViT-B-61'.*ViT-B-16.*open_clip.list_models\(\)"):
        load_clip("ViT-B-61", None)


def test_resnet_architecture_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"model='RN50'.*only ViT CLIP"):
        load_clip("RN50", None)


# ------------------------------------------------------------------------------------- local files


def test_openai_state_dict_loads_without_architecture(tiny: LoadedClip, tmp_path: Path) -> None:
    path = tmp_path / "tiny_openai.pt"
    torch.save(tiny.model.state_dict(), path)
    loaded = load_clip(pretrained=str(path))
    _assert_same_model(loaded.model, tiny.model)
    # heads cannot be read from shapes; the registered config with the same shapes supplies them
    assert loaded.info == ClipInfo(f"inferred-{TINY}", str(path), True, 16, 32, 2, 64, 2, 32)


def test_inference_from_shapes_alone(tmp_path: Path) -> None:
    torch.manual_seed(3)
    vision = {"image_size": 48, "layers": 1, "width": 128, "patch_size": 16}
    text = {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1}
    original = (
        open_clip.CLIP(40, vision_cfg=vision, text_cfg=text, quick_gelu=True).eval().requires_grad_(False)
    )
    path = tmp_path / "unregistered.pt"
    torch.save(original.state_dict(), path)
    loaded = load_clip(pretrained=str(path))
    _assert_same_model(loaded.model, original, image_size=48)
    assert loaded.info == ClipInfo("inferred-vit-w128-l1-p16-i48", str(path), True, 16, 48, 1, 128, 2, 40)


def test_open_clip_layout_nested_with_module_prefix(tiny: LoadedClip, tmp_path: Path) -> None:
    path = tmp_path / "epoch_1.pt"
    state = {f"module.{k}": v for k, v in tiny.model.state_dict().items()}
    torch.save({"epoch": 1, "state_dict": state}, path)
    for model in (None, TINY):
        loaded = load_clip(model, pretrained=str(path))
        _assert_same_model(loaded.model, tiny.model)


def test_safetensors(tiny: LoadedClip, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.model.state_dict().items()}, str(path))
    loaded = load_clip(pretrained=str(path))
    _assert_same_model(loaded.model, tiny.model)


def test_torchscript_archive(tiny: LoadedClip, tmp_path: Path) -> None:
    class Holder(nn.Module):  # an archive whose state dict has OpenAI's keys, like OpenAI's .pt files
        def __init__(self, clip: nn.Module) -> None:
            super().__init__()
            for name, child in clip.named_children():
                self.add_module(name, child)
            for name, param in clip.named_parameters(recurse=False):
                self.register_parameter(name, param)
            self.register_buffer("input_resolution", torch.tensor(32))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    path = tmp_path / "ViT-tiny.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(Holder(tiny.model)), str(path))
    loaded = load_clip(pretrained=str(path))
    _assert_same_model(loaded.model, tiny.model)
    # an original OpenAI archive is known to use QuickGELU: no warning even for a GELU config
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert load_clip(TINY_GELU, pretrained=str(path)).info.quick_gelu


def test_quick_gelu_defaults_and_override(tiny: LoadedClip, tmp_path: Path) -> None:
    path = tmp_path / "tiny.pt"
    torch.save(tiny.model.state_dict(), path)
    assert _uses_quick_gelu(load_clip(pretrained=str(path)).model)
    gelu = load_clip(pretrained=str(path), quick_gelu=False)
    assert gelu.info.quick_gelu is False and not _uses_quick_gelu(gelu.model)
    # a named GELU architecture with a plain state-dict file: QuickGELU is assumed, loudly
    with pytest.warns(UserWarning, match="assuming OpenAI weights"):
        assert load_clip(TINY_GELU, pretrained=str(path)).info.quick_gelu is True
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert load_clip(TINY_GELU, pretrained=str(path), quick_gelu=False).info.quick_gelu is False


def test_golden_checkpoint_fp16_values(tmp_path: Path) -> None:
    loaded = load_clip(pretrained=str(GOLDEN_CKPT), precision="fp32")
    info = loaded.info
    assert (info.width, info.heads, info.num_layers, info.patch_size) == (128, 2, 12, 16)
    assert (info.image_size, info.embed_dim, info.quick_gelu) == (224, 64, True)
    assert info.arch.startswith("inferred-")
    stored = torch.load(GOLDEN_CKPT, weights_only=True)
    state = loaded.model.state_dict()
    assert {t.dtype for t in stored.values() if t.is_floating_point()} == {torch.float16}
    for key, value in stored.items():
        assert state[key].dtype == torch.float32
        assert torch.equal(state[key], value.float()), key


def test_architecture_mismatch(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match=r"tiny_clip_b16_fp16\.pt.*model='resclip-test-clip-tiny'.*another architecture"
    ):
        load_clip(TINY, pretrained=str(GOLDEN_CKPT))


def test_missing_file(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope" / "ViT-B-16.pt")
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        load_clip(pretrained=missing)
    with pytest.raises(FileNotFoundError, match="is a directory"):
        load_clip(pretrained=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"weights\.safetensors"):
        load_clip("ViT-B-16", pretrained="weights.safetensors")


def test_corrupt_files(tiny: LoadedClip, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(4096))
    with pytest.raises(ValueError, match=r"could not read checkpoint.*garbage\.pt"):
        load_clip(pretrained=str(garbage))
    truncated = tmp_path / "truncated.pt"
    torch.save(tiny.model.state_dict(), truncated)
    truncated.write_bytes(truncated.read_bytes()[:5000])
    with pytest.raises(ValueError, match="could not read checkpoint"):
        load_clip(pretrained=str(truncated))
    bad_safetensors = tmp_path / "bad.safetensors"
    bad_safetensors.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(ValueError, match="could not read checkpoint"):
        load_clip(pretrained=str(bad_safetensors))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"conv1.weight": torch.zeros(8, 3, 3, 3), "fc.weight": torch.zeros(10, 8)}, "not a CLIP checkpoint"),
        (
            {
                "visual.conv1.weight": torch.zeros(8, 3, 3, 3),
                "visual.layer1.0.conv1.weight": torch.zeros(8, 8, 1, 1),
            },
            "ResNet",
        ),
        ([torch.zeros(3)], "not a CLIP checkpoint"),
    ],
)
def test_not_a_vit_clip(tmp_path: Path, content: object, message: str) -> None:
    path = tmp_path / "other.pth"
    torch.save(content, path)
    with pytest.raises(ValueError, match=f"{message}.*only ViT CLIP|{message}.*Only ViT CLIP"):
        load_clip(pretrained=str(path))


# ------------------------------------------------------------------------------------------- tags


def test_unknown_tag() -> None:
    with pytest.raises(ValueError, match=r"pretrained='laion9b'.*list_pretrained_tags_by_model.*'openai'"):
        load_clip("ViT-B-16", pretrained="laion9b")


def test_tag_not_cached_offline(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError) as info:
        load_clip("ViT-B-16", pretrained="openai", cache_dir=str(tmp_path))
    message = str(info.value)
    assert "could not download" in message and str(tmp_path) in message
    assert "pretrained='/path/to/ViT-B-16.pt'" in message and ".safetensors" in message


@pytest.fixture
def fake_tags(
    tiny: LoadedClip, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Callable[[BaseException | None], None]:
    """Give the tiny architectures an 'openai' (QuickGELU) and a 'laion' tag served from a local file."""
    path = tmp_path / "downloaded.bin"
    torch.save(tiny.model.state_dict(), path)
    tags = {"openai": {"hf_hub": "x/y/", "quick_gelu": True}, "laion": {"hf_hub": "x/z/"}}
    monkeypatch.setattr(open_clip, "list_pretrained_tags_by_model", lambda arch: list(tags))
    monkeypatch.setattr(open_clip, "get_pretrained_cfg", lambda arch, tag: tags.get(tag, {}))

    monkeypatch.setattr(resclip.clip, "hub_unreachable", lambda: None)  # the fake hub answers

    def serve(error: BaseException | None = None) -> None:
        def download(cfg: dict[str, object], cache_dir: str | None = None) -> str:
            if error is not None:
                raise error
            return str(path)

        monkeypatch.setattr(open_clip, "download_pretrained", download)

    return serve


def test_tag_activation_follows_the_tag_table(tiny: LoadedClip, fake_tags: Callable[..., None]) -> None:
    fake_tags()
    openai = load_clip(TINY_GELU, pretrained="openai")
    assert openai.info.quick_gelu is True and openai.info.pretrained == "openai"
    _assert_same_model(openai.model, tiny.model)
    assert load_clip(TINY_GELU, pretrained="laion").info.quick_gelu is False
    with pytest.warns(UserWarning, match="differs from how"):
        load_clip(TINY_GELU, pretrained="openai", quick_gelu=False)


def _no_download(monkeypatch: pytest.MonkeyPatch) -> None:
    def download(cfg: dict[str, object], cache_dir: str | None = None) -> str:
        raise AssertionError("the hub was asked although it cannot answer")

    monkeypatch.setattr(open_clip, "download_pretrained", download)


def test_unreachable_hub_fails_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline, a tag that is not cached fails without open_clip's minute of retries."""
    _no_download(monkeypatch)
    with pytest.raises(RuntimeError, match=r"HF_HUB_OFFLINE is set.*pretrained='/path/to/ViT-B-16.pt'"):
        load_clip("ViT-B-16", pretrained="openai", cache_dir=str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE")
    for key in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example:8443")
    asked = []

    def refuse(address: tuple[str, int], timeout: float) -> None:
        asked.append((address, timeout))
        raise OSError(111, "Connection refused")

    monkeypatch.setattr(resclip.clip.socket, "create_connection", refuse)
    with pytest.raises(RuntimeError, match=r"cannot reach https://hub.example:8443 \(Connection refused\)"):
        load_clip("ViT-B-16", pretrained="openai", cache_dir=str(tmp_path))
    assert asked == [(("hub.example", 8443), 3.0)]


def test_cached_tag_loads_without_the_network(
    tiny: LoadedClip, fake_tags: Callable[..., None], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tag already in the Hugging Face cache is read from it even when the hub is unreachable."""
    snapshot = tmp_path / "hub" / "models--x--y" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    torch.save(tiny.model.state_dict(), snapshot / "open_clip_pytorch_model.bin")
    (tmp_path / "hub" / "models--x--y" / "refs").mkdir()
    (tmp_path / "hub" / "models--x--y" / "refs" / "main").write_text("abc123")
    cfg = open_clip.get_pretrained_cfg(TINY_GELU, "openai")
    found = resclip.clip.cached_weights(cfg, str(tmp_path / "hub"))
    assert found == str(snapshot / "open_clip_pytorch_model.bin")
    assert resclip.clip.cached_weights(cfg, str(tmp_path)) is None
    _no_download(monkeypatch)
    monkeypatch.setattr(resclip.clip, "hub_unreachable", lambda: "HF_HUB_OFFLINE is set")
    loaded = load_clip(TINY_GELU, pretrained="openai", cache_dir=str(tmp_path / "hub"))
    _assert_same_model(loaded.model, tiny.model)


def test_download_errors_become_runtime_errors(fake_tags: Callable[..., None]) -> None:
    fake_tags(ConnectionError("no route to host"))
    with pytest.raises(
        RuntimeError, match=r"no route to host.*pretrained='/path/to/resclip-test-clip-tiny-gelu\.pt'"
    ):
        load_clip(TINY_GELU, pretrained="laion")
