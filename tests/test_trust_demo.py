"""The web demo under load and abuse (issue 10, section 4): upload, pixel and class limits checked
before any decoding, messages without server paths, no files left per request, and the queue's
concurrency as a setting."""

from __future__ import annotations

import socket
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from conftest import DEMO_FAST
from resclip import demo
from resclip.cli import main

BIRD = Path(__file__).parent / "data" / "benchmarks" / "VOCdevkit" / "VOC2012" / "JPEGImages" / "crop_114.jpg"
FAST = DEMO_FAST


pytestmark = pytest.mark.usefixtures("text_cache_env")


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if any image is decoded (a refused image must be judged from its header)."""

    def refuse(self: ImageFile.ImageFile) -> None:
        raise AssertionError(f"decoded a {self.size[0]} x {self.size[1]} image")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_blank_png(path: Path, width: int, height: int) -> Path:
    """A real, complete grayscale PNG of ``width x height`` zero pixels, written without the pixels
    ever being in memory (it compresses to a few hundred KB)."""
    packer = zlib.compressobj(9)
    row = bytes(width + 1)  # filter byte + pixels
    body = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", body)
                     + _png_chunk(b"IEND", b""))
    return path


# ----------------------------------------------------------------------------------------------- limits


def test_upload_above_the_size_limit_is_refused(tiny_ckpt, tmp_path, no_decoding):
    settings = demo.DemoSettings(pretrained=str(tiny_ckpt), device="cpu", overrides=FAST, max_upload_mb=1)
    big = tmp_path / "photo.bmp"
    big.write_bytes(b"BM" + bytes(1_680_052))  # 1.6 MB; the size is refused before the content is read
    with pytest.raises(ValueError) as err:
        demo.segment_image(str(big), "bird; sky", settings=settings)
    assert str(err.value) == "The file is 1.6 MB; this demo accepts files up to 1 MB."


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_ten_thousand_squared_png_is_refused_from_its_header(settings, tmp_path, no_decoding):
    bomb = write_blank_png(tmp_path / "bomb.png", 10_000, 10_000)
    assert bomb.stat().st_size < 1_000_000  # a small file for 100 megapixels
    start = time.perf_counter()
    with pytest.raises(ValueError) as err:
        demo.segment_image(str(bomb), "bird; sky", settings=settings)
    assert time.perf_counter() - start < 2.0
    assert str(err.value) == "The image is 10000 x 10000 pixels; this demo accepts up to 40 megapixels."


def test_pixel_limit_applies_to_pil_images_and_arrays(tiny_ckpt):
    settings = demo.DemoSettings(pretrained=str(tiny_ckpt), device="cpu", max_pixels=1_500_000)
    message = "The image is 1300 x 1200 pixels; this demo accepts up to 1.5 megapixels."
    with pytest.raises(ValueError, match=f"^{message}$"):
        demo.segment_image(Image.new("RGB", (1300, 1200)), "bird", settings=settings)
    with pytest.raises(ValueError, match=f"^{message}$"):
        demo.segment_image(np.zeros((1200, 1300, 3), np.uint8), "bird", settings=settings)


def test_too_many_classes_are_refused_before_the_model_runs(settings, monkeypatch):
    monkeypatch.setattr(demo, "load_base", lambda s: pytest.fail("the model was loaded"))
    many = "; ".join(f"thing {i}" for i in range(1000))
    with pytest.raises(ValueError) as err:
        demo.segment_image(str(BIRD), many, settings=settings)
    assert str(err.value) == "You listed 1000 class names; this demo accepts up to 200."
    synonyms = "; ".join(f"thing {i}, object {i}" for i in range(150))
    with pytest.raises(ValueError) as err:
        demo.segment_image(str(BIRD), synonyms, settings=settings)
    assert str(err.value) == ("You listed 300 class names; this demo accepts up to 200 (synonyms count as "
                              "names).")
    for name in demo.CLASS_LISTS:  # the page's own benchmark lists pass the default limit
        with pytest.raises(pytest.fail.Exception, match="the model was loaded"):
            demo.segment_image(str(BIRD), demo.class_list(name), settings=settings)


@pytest.mark.parametrize("field", ["max_upload_mb", "max_pixels", "max_classes", "concurrency"])
def test_limits_must_be_positive(field):
    with pytest.raises(ValueError, match=f"^{field} must be positive, got 0$"):
        demo.DemoSettings(**{field: 0})


# ------------------------------------------------------------------------------------- no server paths


def test_errors_do_not_show_server_paths(settings, tmp_path):
    uploads = tmp_path / "server" / "uploads" / "0123abcd"
    uploads.mkdir(parents=True)
    truncated = uploads / "holiday.jpg"
    truncated.write_bytes(BIRD.read_bytes()[:3000])
    with pytest.raises(ValueError) as err:
        demo.segment_image(str(truncated), "bird; sky", settings=settings)
    message = str(err.value)
    assert message.startswith("could not read image 'holiday.jpg' (")
    assert str(tmp_path) not in message and "uploads" not in message

    text = uploads / "notes.png"
    text.write_text("not a picture")
    with pytest.raises(ValueError) as err:
        demo.segment_image(str(text), "bird", settings=settings)
    assert str(err.value) == ("The file is not an image this demo can read; upload a JPEG, PNG, TIFF, BMP "
                              "or WebP image.")

    with pytest.raises(ValueError) as err:
        demo.segment_image(str(uploads / "gone.jpg"), "bird", settings=settings)
    assert str(err.value) == "The uploaded image is no longer on the server; upload it again."


def test_invalid_text_in_class_names(settings):
    with pytest.raises(ValueError) as err:
        demo.segment_image(str(BIRD), "bird; caf\udcff", settings=settings)
    assert str(err.value) == (
        "class 2 ('caf\\udcff') holds a character that is not valid text (the byte 0xff): the names must be "
        "UTF-8 (e.g. a UTF-8 terminal, LANG=C.UTF-8, or a UTF-8 class file); retype them"
    )


def test_unexpected_failures_show_a_generic_message(settings, tmp_path, monkeypatch, caplog):
    def boom(*args, **kwargs):
        raise RuntimeError(f"CUDA out of memory in {tmp_path}/secret/model.pt")

    monkeypatch.setattr(demo, "segment_array", boom)
    files = demo.SessionFiles(tmp_path / "cache")
    with pytest.raises(ValueError) as err:
        demo.handle_request(files, "s1", {"path": str(BIRD)}, "bird; sky", "naclip", True, True, 0.5, "voc",
                            settings=settings)
    assert str(err.value) == "Something went wrong while segmenting this image; please try again."
    assert "secret/model.pt" in caplog.text  # the details go to the server log only


# ------------------------------------------------------------------------------------ files per request


def _files(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


def test_each_session_keeps_only_its_current_upload_and_results(settings, tmp_path):
    cache = tmp_path / "cache"
    uploads = []
    for i, size in enumerate([(96, 64), (80, 80)]):
        folder = cache / f"upload{i}"
        folder.mkdir(parents=True)
        uploads.append(folder / f"photo{i}.png")
        Image.open(BIRD).resize(size).save(uploads[-1])
    example = cache / "example0" / "cat.jpg"  # an example photo Gradio serves from the same folder
    example.parent.mkdir()
    Image.open(BIRD).resize((50, 40)).save(example)
    files = demo.SessionFiles(cache, keep={str(example)})

    def request(session: str, upload: Path, classes: str = "bird; <b>sky</b>") -> set[Path]:
        out, legend, _, mask, record = demo.handle_request(
            files, session, {"path": str(upload)}, classes, "naclip", True, True, 0.5, "voc",
            settings=settings)
        assert "&lt;b&gt;sky&lt;/b&gt;" in legend or "sky" not in legend  # class names are escaped
        return {Path(out), Path(mask), Path(record)}

    base = {uploads[0], uploads[1], example}
    first = request("alice", uploads[0])
    assert _files(cache) == base | first
    second = request("alice", uploads[0])  # new classes, same photo: the upload stays, the old results go
    assert _files(cache) == base | second
    with pytest.raises(ValueError, match="class 2 is empty"):
        request("alice", uploads[0], "bird; ; sky")  # a failed request keeps what the page shows
    assert _files(cache) == base | second
    bob = request("bob", uploads[0])  # the same bytes uploaded by someone else: shared
    third = request("alice", uploads[1])  # alice's old results go; bob still holds the shared upload
    assert _files(cache) == base | bob | third
    assert not any(p.parent.exists() for p in second)  # the request's folder went with its files
    files.end("bob")
    assert _files(cache) == {uploads[1], example} | third
    assert not uploads[0].parent.exists()
    files.end("alice")
    assert _files(cache) == {example}
    carol = request("carol", example)  # an example photo is never deleted with a session
    files.end("carol")
    assert _files(cache) == {example} and not any(p.exists() for p in carol)
    outside = tmp_path / "elsewhere.png"  # a path outside the cache folder is never deleted
    Image.open(BIRD).resize((40, 30)).save(outside)
    files.hold("mallory", {"upload": outside})
    files.end("mallory")
    assert outside.is_file()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_served_demo_leaves_no_files_per_request(settings, tmp_path, monkeypatch):
    pytest.importorskip("gradio")
    from gradio_client import Client, handle_file

    cache = tmp_path / "gradio"
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(cache))
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    other = tmp_path / "other.png"
    Image.open(BIRD).resize((90, 70)).save(other)
    app = demo.build_app(settings)
    examples = _files(cache)  # the example photos, copied into Gradio's folder by the page itself
    assert sorted(p.name for p in examples) == sorted(name for name, _ in demo.EXAMPLES)
    port = _free_port()
    app.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                       show_error=False)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=False)
        for image, classes in [(BIRD, "bird; sky"), (BIRD, "bird; water"), (other, "bird; sky")]:
            overlay, _, status, mask, record = client.predict(
                handle_file(str(image)), classes, "naclip", True, True, 0.5, "voc", api_name="/handler")
            assert status.startswith("naclip + RCS + SFR")
        # four files for this session: its current upload, overlay, mask and JSON (not 4 per request)
        assert sorted(p.suffix for p in _files(cache) - examples) == [".json", ".png", ".png", ".png"]
        assert {Path(overlay["path"]), Path(mask["path"]), Path(record["path"])} <= _files(cache)
    finally:
        app.close()
    assert _files(cache) - examples == set()


# --------------------------------------------------------------------------------- launch and the CLI


def test_launch_passes_the_limits_and_concurrency_to_gradio(tiny_ckpt, monkeypatch):
    gr = pytest.importorskip("gradio")
    seen: dict = {}

    def fake_launch(self, **kwargs):
        seen.update(kwargs, concurrency=self._queue.default_concurrency_limit)

    monkeypatch.setattr(gr.Blocks, "launch", fake_launch)
    settings = demo.DemoSettings(pretrained=str(tiny_ckpt), device="cpu", overrides=FAST, max_upload_mb=5,
                                 concurrency=3)
    demo.launch(settings)
    assert seen["server_name"] == "127.0.0.1"
    assert seen["max_file_size"] == 5 * 1024 * 1024
    assert seen["concurrency"] == 3
    assert seen["show_error"] is False  # only our own one-line messages reach the visitor
    assert seen["share"] is False  # no public link unless asked for


def test_demo_command_limit_flags(monkeypatch, capsys):
    pytest.importorskip("gradio")
    got = []
    monkeypatch.setattr(demo, "launch",
                        lambda settings, host, port, share=False: got.append((settings, host, port)))
    rc = main(["demo", "--pretrained", "none", "--max-upload-mb", "2.5", "--max-pixels", "1000000",
               "--max-classes", "30", "--concurrency", "2"])
    assert rc == 0
    settings, host, port = got[0]
    assert (settings.max_upload_mb, settings.max_pixels, settings.max_classes, settings.concurrency) == (
        2.5, 1_000_000, 30, 2)
    assert (host, port) == ("127.0.0.1", 7860)
    got.clear()
    assert main(["demo", "--pretrained", "none"]) == 0
    assert (got[0][0].max_upload_mb, got[0][0].max_pixels, got[0][0].max_classes, got[0][0].concurrency) == (
        20.0, 40_000_000, 200, 1)
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--concurrency", "0"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "resclip demo: error: argument --concurrency: expected a positive number, got '0'")
