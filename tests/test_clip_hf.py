"""Loading CLIP models in Hugging Face layouts: open_clip ``hf-hub:`` repos and ``transformers``
CLIPModel folders / ``hf:`` repos (tiny random models; transformers itself is not needed, see
tests/data/hf_clip_tiny/README.md)."""

from __future__ import annotations

import json
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import resclip
from resclip import hf_convert
from resclip.clip import LoadedClip, load_clip

HF_TINY = Path(__file__).parent / "data" / "hf_clip_tiny"
VARIANTS = ("quick_gelu", "gelu")
# vision heads of width 32 and text heads of width 16: not inferable as width // 64
OC_CFG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 3, "width": 128, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 1},
}
# heads of width 64 (inferable from a checkpoint's shapes), and shapes no other test registers
E2E_CFG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 128, "head_width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2},
}


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may reach the network: huggingface_hub reads HF_HUB_OFFLINE when imported."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def oc_model() -> nn.Module:
    """A random tiny open_clip CLIP with full vocabulary (so resclip's tokenizer can feed it)."""
    torch.manual_seed(0)
    return open_clip.CLIP(**OC_CFG, quick_gelu=True).eval()


def _load(*args: Any, **kwargs: Any) -> LoadedClip:
    """load_clip, without the 'custom ViT' warning every tiny model triggers."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*loaded as a custom ViT")
        return load_clip(*args, **kwargs)


def _features(loaded: LoadedClip, variant: str) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    with np.load(HF_TINY / variant / "reference.npz") as f:
        ref = {k: f[k] for k in f.files}
    with torch.no_grad():
        image = loaded.model.encode_image(torch.from_numpy(ref["pixel_values"])).numpy()
        text = loaded.model.encode_text(torch.from_numpy(ref["input_ids"])).numpy()
    return image, text, ref


def _assert_parity(loaded: LoadedClip, variant: str) -> None:
    image, text, ref = _features(loaded, variant)
    np.testing.assert_allclose(image, ref["image_features"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(text, ref["text_features"], rtol=0, atol=1e-5)


def _to_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of hf_convert.convert_state_dict, written independently: OpenAI → transformers names."""
    out: dict[str, torch.Tensor] = {}
    simple = {
        "visual.class_embedding": "vision_model.embeddings.class_embedding",
        "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
        "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
        "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
        "positional_embedding": "text_model.embeddings.position_embedding.weight",
        "logit_scale": "logit_scale",
    }
    norms = {
        "visual.ln_pre": "vision_model.pre_layrnorm",
        "visual.ln_post": "vision_model.post_layernorm",
        "ln_final": "text_model.final_layer_norm",
    }
    inner = {
        "attn.out_proj": "self_attn.out_proj",
        "ln_1": "layer_norm1",
        "ln_2": "layer_norm2",
        "mlp.c_fc": "mlp.fc1",
        "mlp.c_proj": "mlp.fc2",
    }
    for key, t in state.items():
        if key in simple:
            out[simple[key]] = t
        elif key in ("visual.proj", "text_projection"):
            out["visual_projection.weight" if key == "visual.proj" else "text_projection.weight"] = t.t()
        elif key.rsplit(".", 1)[0] in norms:
            base, kind = key.rsplit(".", 1)
            out[f"{norms[base]}.{kind}"] = t
        else:
            tower, rest = key.split("transformer.resblocks.")
            block, name = rest.split(".", 1)
            prefix = f"{'vision_model' if tower == 'visual.' else 'text_model'}.encoder.layers.{block}."
            if name.startswith("attn.in_proj_"):
                kind = name.rsplit("_", 1)[1]
                for letter, part in zip("qkv", t.chunk(3, dim=0), strict=True):
                    out[f"{prefix}self_attn.{letter}_proj.{kind}"] = part
            else:
                base, kind = name.rsplit(".", 1)
                out[f"{prefix}{inner[base]}.{kind}"] = t
    # older transformers saved these buffers; the converter must drop them
    out["text_model.embeddings.position_ids"] = torch.arange(int(state["positional_embedding"].shape[0]))[
        None
    ]
    return {k: v.contiguous() for k, v in out.items()}


def _save_transformers(
    model: nn.Module, folder: Path, heads: tuple[int, int] = (4, 4), act: str = "quick_gelu", **cfg: Any
) -> Path:
    """Write ``model`` as a transformers CLIPModel folder: config.json + model.safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "model_type": "clip",
        "architectures": ["CLIPModel"],
        "text_config": {"num_attention_heads": heads[1], "hidden_act": act},
        "vision_config": {"num_attention_heads": heads[0], "hidden_act": act},
        **cfg,
    }
    (folder / "config.json").write_text(json.dumps(config))
    save_file(
        _to_transformers(dict(model.state_dict())), folder / "model.safetensors", metadata={"format": "pt"}
    )
    return folder


def _fake_cache(root: Path, repo: str, files: dict[str, Path]) -> Path:
    """A Hugging Face hub cache holding ``files`` (name → source file) of ``repo`` at revision abc123."""
    base = root / f"models--{repo.replace('/', '--')}"
    snapshot = base / "snapshots" / "abc123"
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, source in files.items():
        shutil.copyfile(source, snapshot / name)
    (base / "refs").mkdir(exist_ok=True)
    (base / "refs" / "main").write_text("abc123")
    return snapshot


def _assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    assert not any(t.is_meta for t in [*a.parameters(), *a.buffers()])


def _one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------------- transformers CLIPModel


@pytest.mark.parametrize("variant", VARIANTS)
def test_transformers_folder_matches_transformers_features(variant: str) -> None:
    """The committed folders were saved by transformers; its features of fixed inputs are the reference."""
    folder = HF_TINY / variant
    config = json.loads((folder / "config.json").read_text())
    with pytest.warns(UserWarning, match="matches no known open_clip architecture"):
        loaded = load_clip(pretrained=str(folder))
    _assert_parity(loaded, variant)
    info = loaded.info
    assert info.quick_gelu is (variant == "quick_gelu")
    assert info.heads == config["vision_config"]["num_attention_heads"]
    assert (
        loaded.model.transformer.resblocks[0].attn.num_heads == config["text_config"]["num_attention_heads"]
    )
    assert info.arch.startswith("inferred-") and info.pretrained == str(folder)
    assert (info.width, info.num_layers, info.patch_size, info.image_size, info.embed_dim) == (
        32,
        2,
        8,
        32,
        24,
    )
    assert loaded.tokenizer(["a cat"]).shape == (1, config["text_config"]["max_position_embeddings"])


def test_parity_is_sensitive_to_the_activation() -> None:
    """Overriding the activation warns and visibly changes the features (the parity test can fail)."""
    with pytest.warns(UserWarning, match="differs from how"):
        loaded = _load(pretrained=str(HF_TINY / "quick_gelu"), quick_gelu=False)
    image, text, ref = _features(loaded, "quick_gelu")
    assert np.abs(image - ref["image_features"]).max() > 1e-3
    assert np.abs(text - ref["text_features"]).max() > 1e-3


def test_heads_come_from_the_config(tmp_path: Path) -> None:
    folder = tmp_path / "heads"
    shutil.copytree(HF_TINY / "gelu", folder)
    config = json.loads((folder / "config.json").read_text())
    config["vision_config"]["num_attention_heads"] = 2  # 4 in the reference
    (folder / "config.json").write_text(json.dumps(config))
    image, _, ref = _features(_load(pretrained=str(folder)), "gelu")
    assert np.abs(image - ref["image_features"]).max() > 1e-3


def test_pytorch_bin_and_sharded_folders(tmp_path: Path) -> None:
    weights = load_file(HF_TINY / "quick_gelu" / "model.safetensors")
    config = HF_TINY / "quick_gelu" / "config.json"
    pickled = tmp_path / "bin"
    pickled.mkdir()
    shutil.copy(config, pickled)
    torch.save(weights, pickled / "pytorch_model.bin")
    _assert_parity(_load(pretrained=str(pickled)), "quick_gelu")

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(config, sharded)
    names = sorted(weights)
    half = len(names) // 2
    shards = {
        "model-00001-of-00002.safetensors": names[:half],
        "model-00002-of-00002.safetensors": names[half:],
    }
    weight_map = {}
    for file, keys in shards.items():
        save_file({k: weights[k] for k in keys}, sharded / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, file))
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    _assert_parity(_load(pretrained=str(sharded)), "quick_gelu")
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"shard model-00002-of-00002.safetensors is missing") as exc:
        _load(pretrained=str(sharded))
    _one_line(exc)


def test_conversion_round_trip(oc_model: nn.Module) -> None:
    state = dict(oc_model.state_dict())
    hf = _to_transformers(state)
    assert "vision_model.encoder.layers.2.self_attn.q_proj.weight" in hf
    back = hf_convert.convert_state_dict(hf, "test")
    assert back.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(back[key], value), key


def test_transformers_folder_with_a_named_architecture(
    oc_model: nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """model= names the architecture; the config's heads must agree with it."""
    folder = tmp_path / "named"
    # registered for this test only, so that other tests' shape matching never sees it
    monkeypatch.setitem(
        open_clip.factory._MODEL_CONFIGS, "resclip-test-hf-tiny", {**OC_CFG, "quick_gelu": True}
    )
    _save_transformers(oc_model, folder, heads=(4, 4))
    loaded = load_clip("resclip-test-hf-tiny", pretrained=str(folder))
    assert loaded.info.arch == "resclip-test-hf-tiny"
    _assert_same_weights(loaded.model, oc_model)
    _save_transformers(oc_model, folder, heads=(2, 4))
    with pytest.raises(ValueError, match=r"config.json gives 2 vision / 4 text.*omit model=") as exc:
        load_clip("resclip-test-hf-tiny", pretrained=str(folder))
    _one_line(exc)


def test_transformers_repo_from_the_hub_cache(tmp_path: Path) -> None:
    """'hf:<org>/<name>' reads config.json and the weights from the hub cache, offline."""
    src = HF_TINY / "gelu"
    cache = tmp_path / "hub"
    _fake_cache(cache, "org/clip-tiny", {n: src / n for n in ("config.json", "model.safetensors")})
    loaded = _load(pretrained="hf:org/clip-tiny", cache_dir=str(cache))
    _assert_parity(loaded, "gelu")
    assert loaded.info.pretrained == "hf:org/clip-tiny"
    also = _load("hf:org/clip-tiny", cache_dir=str(cache))  # model= works as well
    _assert_same_weights(also.model, loaded.model)

    started = time.perf_counter()
    with pytest.raises(RuntimeError, match=r"HF_HUB_OFFLINE is set.*pretrained='/path/to/folder'") as exc:
        load_clip(pretrained="hf:org/not-cached", cache_dir=str(cache))
    assert time.perf_counter() - started < 5
    assert str(cache) in _one_line(exc)


def test_unreachable_hub_fails_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resclip.clip, "hub_unreachable", lambda: "cannot reach https://huggingface.co (x)")

    def download(*args: object, **kwargs: object) -> None:
        raise AssertionError("must not try to download")

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    for name in ("hf-hub:org/model", "hf:org/model"):
        with pytest.raises(RuntimeError, match=r"could not download.*cannot reach") as exc:
            load_clip(pretrained=name, cache_dir=str(tmp_path))
        _one_line(exc)


def test_config_defaults_are_those_of_transformers() -> None:
    """transformers (v4) leaves default values out of config.json: CLIPVisionConfig / CLIPTextConfig's."""
    assert hf_convert.spec_from_config({"model_type": "clip"}, "x") == hf_convert.HfClipSpec(True, 12, 8)
    legacy = {  # the *_config_dict spelling of old saves
        "model_type": "clip",
        "text_config": None,
        "text_config_dict": {"num_attention_heads": 16, "hidden_act": "gelu"},
        "vision_config_dict": {"hidden_act": "gelu"},
    }
    assert hf_convert.spec_from_config(legacy, "x") == hf_convert.HfClipSpec(False, 12, 16)


def _fake_hub(monkeypatch: pytest.MonkeyPatch, files: dict[str, Path]) -> list[tuple[str, str | None]]:
    """A reachable hub serving ``files`` (name → source) of any repo into the cache; returns the calls."""
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    calls: list[tuple[str, str | None]] = []

    def download(repo_id: str, filename: str, *, cache_dir: str, revision: str | None = None) -> str:
        calls.append((filename, revision))
        if filename not in files:
            raise EntryNotFoundError(f"404 Client Error: {filename} not found in {repo_id}")
        return str(_fake_cache(Path(cache_dir), repo_id, {filename: files[filename]}) / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(resclip.clip, "hub_unreachable", lambda: None)
    return calls


def test_transformers_repo_is_downloaded_with_its_shards(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    weights = load_file(HF_TINY / "gelu" / "model.safetensors")
    names = sorted(weights)
    shard_files = {
        "model-00001-of-00002.safetensors": names[:10],
        "model-00002-of-00002.safetensors": names[10:],
    }
    src = tmp_path / "src"
    src.mkdir()
    weight_map = {}
    for file, keys in shard_files.items():
        save_file({k: weights[k] for k in keys}, src / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, file))
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    served = {p.name: p for p in src.iterdir()} | {"config.json": HF_TINY / "gelu" / "config.json"}
    calls = _fake_hub(monkeypatch, served)
    cache = tmp_path / "hub"
    _assert_parity(_load(pretrained="hf:org/sharded", cache_dir=str(cache)), "gelu")
    assert calls == [
        ("config.json", None),
        ("model.safetensors", "abc123"),  # 404: the next name is tried, at the config's revision
        ("model.safetensors.index.json", "abc123"),
        ("model-00001-of-00002.safetensors", "abc123"),
        ("model-00002-of-00002.safetensors", "abc123"),
    ]
    calls.clear()
    _load(pretrained="hf:org/sharded", cache_dir=str(cache))
    assert calls == []  # now read from the cache


def test_hf_hub_repo_is_downloaded(
    oc_model: nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _open_clip_folder(oc_model, tmp_path / "src", dict(OC_CFG), "open_clip_pytorch_model.bin")
    calls = _fake_hub(monkeypatch, {p.name: p for p in folder.iterdir()})
    loaded = load_clip("hf-hub:org/oc-bin", cache_dir=str(tmp_path / "hub"))
    _assert_same_weights(loaded.model, oc_model)
    assert [name for name, _ in calls] == [
        "open_clip_config.json",
        "open_clip_model.safetensors",
        "open_clip_pytorch_model.safetensors",
        "open_clip_pytorch_model.bin",
    ]
    _fake_hub(monkeypatch, {"config.json": HF_TINY / "gelu" / "config.json"})
    with pytest.raises(ValueError, match=r"transformers model; load it as pretrained='hf:org/tf'") as exc:
        load_clip("hf-hub:org/tf", cache_dir=str(tmp_path / "hub"))
    _one_line(exc)


# ---------------------------------------------------------------------------------- open_clip hf-hub:


def _open_clip_folder(
    model: nn.Module, folder: Path, cfg: dict[str, Any], weights: str, **extra: Any
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "model_cfg": cfg,
        "preprocess_cfg": {
            "mean": list(open_clip.OPENAI_DATASET_MEAN),
            "std": list(open_clip.OPENAI_DATASET_STD),
        },
        **extra,
    }
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if weights.endswith(".safetensors"):
        save_file(state, folder / weights, metadata={"format": "pt"})
    else:
        torch.save(state, folder / weights)
    return folder


@pytest.mark.parametrize("weights", ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"])
def test_hf_hub_repo_from_the_cache(oc_model: nn.Module, tmp_path: Path, weights: str) -> None:
    cfg = {**OC_CFG, "quick_gelu": True}
    folder = _open_clip_folder(oc_model, tmp_path / "src", cfg, weights)
    cache = tmp_path / "hub"
    _fake_cache(cache, "org/oc-tiny", {n: folder / n for n in ("open_clip_config.json", weights)})
    for kwargs in ({"model": "hf-hub:org/oc-tiny"}, {"pretrained": "hf-hub:org/oc-tiny"}):
        loaded = load_clip(**kwargs, cache_dir=str(cache))  # type: ignore[arg-type]
        _assert_same_weights(loaded.model, oc_model)
        assert loaded.info.arch == "hf-hub:org/oc-tiny" and loaded.info.pretrained == "hf-hub:org/oc-tiny"
        assert loaded.info.quick_gelu and loaded.info.heads == 4
        tokens = loaded.tokenizer(["a photo of a cat"])
        assert torch.equal(tokens, open_clip.SimpleTokenizer(context_length=77)(["a photo of a cat"]))
        with torch.no_grad():
            assert torch.equal(loaded.model.encode_text(tokens), oc_model.encode_text(tokens))


def test_hf_hub_activation_follows_the_config(oc_model: nn.Module, tmp_path: Path) -> None:
    folder = _open_clip_folder(oc_model, tmp_path / "gelu", dict(OC_CFG), "open_clip_model.safetensors")
    loaded = load_clip(pretrained=str(folder))  # a local folder in open_clip's layout
    assert not loaded.info.quick_gelu and loaded.info.arch == f"local-dir:{folder}"
    assert load_clip(f"local-dir:{folder}").info.arch == f"local-dir:{folder}"
    with pytest.warns(UserWarning, match="differs from how"):
        assert load_clip(pretrained=str(folder), quick_gelu=True).info.quick_gelu


def test_hf_hub_other_normalisation_warns(oc_model: nn.Module, tmp_path: Path) -> None:
    folder = _open_clip_folder(
        oc_model,
        tmp_path / "norm",
        dict(OC_CFG),
        "open_clip_model.safetensors",
        preprocess_cfg={"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
    )
    with pytest.warns(UserWarning, match=r"normalised with mean=\[0.5, 0.5, 0.5\]"):
        load_clip(pretrained=str(folder))


def test_hf_hub_source_conflicts_with_another_pretrained() -> None:
    with pytest.raises(ValueError, match="names both the architecture and the weights") as exc:
        load_clip("hf-hub:org/oc-tiny", pretrained="laion2b_s34b_b88k")
    _one_line(exc)
    with pytest.raises(ValueError, match="is not a Hugging Face repo id") as exc:
        load_clip(pretrained="hf-hub:")
    _one_line(exc)


def test_the_wrong_prefix_names_the_right_one(oc_model: nn.Module, tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    src = HF_TINY / "gelu"
    _fake_cache(cache, "org/hf-only", {n: src / n for n in ("config.json", "model.safetensors")})
    with pytest.raises(
        ValueError, match=r"it is a transformers model; load it as pretrained='hf:org/hf-only'"
    ):
        load_clip("hf-hub:org/hf-only", cache_dir=str(cache))
    folder = _open_clip_folder(oc_model, tmp_path / "oc", dict(OC_CFG), "open_clip_model.safetensors")
    _fake_cache(
        cache,
        "org/oc-only",
        {n: folder / n for n in ("open_clip_config.json", "open_clip_model.safetensors")},
    )
    with pytest.raises(
        ValueError, match=r"it is an open_clip model; load it as pretrained='hf-hub:org/oc-only'"
    ):
        load_clip(pretrained="hf:org/oc-only", cache_dir=str(cache))


# ---------------------------------------------------------------------------------- unsupported formats


def _edited_folder(tmp_path: Path, edit: dict[str, Any], vision: dict[str, Any] | None = None) -> Path:
    folder = tmp_path / "edited"
    shutil.copytree(HF_TINY / "gelu", folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(edit)
    config["vision_config"].update(vision or {})
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    ("edit", "vision", "message"),
    [
        ({"model_type": "siglip"}, None, r"transformers 'siglip' model, which is not supported; only CLIP"),
        ({"model_type": "clip_vision_model"}, None, r"lone CLIP vision tower.*pass the full CLIPModel"),
        ({}, {"hidden_act": "gelu_new"}, r"hidden_act='gelu_new'.*only \['gelu', 'quick_gelu'\]"),
        ({}, {"hidden_act": "quick_gelu"}, r"'quick_gelu' in the vision tower but 'gelu' in the text tower"),
        ({}, {"layer_norm_eps": 1e-6}, r"layer_norm_eps=1e-06 differs from open_clip's 1e-05"),
    ],
)
def test_unsupported_transformers_configs(
    tmp_path: Path, edit: dict[str, Any], vision: dict[str, Any] | None, message: str
) -> None:
    with pytest.raises(ValueError, match=message) as exc:
        load_clip(pretrained=str(_edited_folder(tmp_path, edit, vision)))
    _one_line(exc)


def test_transformers_folder_without_pytorch_weights(tmp_path: Path) -> None:
    folder = _edited_folder(tmp_path, {})
    (folder / "model.safetensors").rename(folder / "tf_model.h5")
    with pytest.raises(ValueError, match=r"holds no PyTorch weights.*from_tf=True") as exc:
        load_clip(pretrained=str(folder))
    _one_line(exc)


def test_transformers_folder_of_another_head(tmp_path: Path) -> None:
    folder = _edited_folder(tmp_path, {})
    weights = load_file(folder / "model.safetensors")
    weights["classifier.weight"] = torch.ones(10, 32)
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(
        ValueError, match=r"tensors a transformers CLIPModel does not have.*classifier.weight"
    ) as e:
        load_clip(pretrained=str(folder))
    _one_line(e)


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({**OC_CFG, "vision_cfg": {"timm_model_name": "vit_base_patch16_siglip_224"}}, "timm or ResNet"),
        (
            {**OC_CFG, "text_cfg": {**OC_CFG["text_cfg"], "hf_tokenizer_name": "timm/ViT-B-16-SigLIP"}},
            "uses the Hugging Face tokenizer",
        ),
        ({**OC_CFG, "text_cfg": {"hf_model_name": "roberta-base"}}, "Hugging Face text tower"),
    ],
)
def test_unsupported_open_clip_configs(
    oc_model: nn.Module, tmp_path: Path, cfg: dict[str, Any], message: str
) -> None:
    folder = _open_clip_folder(oc_model, tmp_path / "oc", cfg, "open_clip_model.safetensors")
    with pytest.raises(ValueError, match=message) as exc:
        load_clip(pretrained=str(folder))
    _one_line(exc)


def test_open_clip_config_that_does_not_fit_its_weights(oc_model: nn.Module, tmp_path: Path) -> None:
    cfg = {**OC_CFG, "vision_cfg": {**OC_CFG["vision_cfg"], "layers": 2}}
    folder = _open_clip_folder(oc_model, tmp_path / "oc", cfg, "open_clip_model.safetensors")
    with pytest.raises(
        ValueError, match=r"weights do not fit its own open_clip_config\.json.*unexpected keys"
    ) as e:
        load_clip(pretrained=str(folder))
    _one_line(e)


def test_folder_without_a_config_says_what_it_needs(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"without config.json.*open_clip_config.json") as exc:
        load_clip(pretrained=str(tmp_path))
    _one_line(exc)
    with pytest.raises(FileNotFoundError, match=r"no open_clip_config.json") as exc:
        load_clip(f"local-dir:{tmp_path}")
    _one_line(exc)


# ---------------------------------------------------------------------------------------- end to end


def test_segmenter_from_a_transformers_folder(tmp_path: Path) -> None:
    """create_segmenter(pretrained=<transformers folder>) predicts as the same weights in OpenAI layout."""
    torch.manual_seed(1)
    model = open_clip.CLIP(**E2E_CFG, quick_gelu=True).eval()
    folder = _save_transformers(model, tmp_path / "hf", heads=(2, 1))
    ckpt = tmp_path / "same.pt"
    torch.save(model.state_dict(), ckpt)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (48, 80, 3), dtype=np.uint8)
    classes = ["sky", "cat", "grass"]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*loaded as a custom ViT")
        from_hf = resclip.create_segmenter(pretrained=str(folder), rcs_layers=(1, 2), text_cache=False)
        from_pt = resclip.create_segmenter(pretrained=str(ckpt), rcs_layers=(1, 2), text_cache=False)
    got, want = from_hf.predict(image, classes), from_pt.predict(image, classes)
    assert got.mask.shape == (48, 80)
    np.testing.assert_array_equal(got.mask, want.mask)
    np.testing.assert_allclose(got.logits, want.logits, rtol=0, atol=1e-5)
