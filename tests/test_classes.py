"""The one class-list rule (resclip.classes) through every entry point: the API, `resclip segment` and the
web demo's request handler give the same classes, the same warnings and the same errors."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from resclip import demo
from resclip.classes import ClassListWarning, class_warnings, load_classes, parse_classes
from resclip.cli import main

BIRD = Path(__file__).parent / "data" / "benchmarks" / "VOCdevkit" / "VOC2012" / "JPEGImages" / "crop_114.jpg"
FAST_SETTINGS = (("rcs_layers", (1, 2)), ("sfr_first_pass_pamr_steps", 0), ("short_side", 128),
                 ("slide_crop", 0))
FAST_CLI = [arg for key, value in FAST_SETTINGS for arg in ("--set", f"{key}={value!r}")]
LONG = " ".join(["extraordinarily"] * 90)

# (classes, the warning every entry point gives)
WARNINGS = {
    "comma-without-space": ("cat,dog; sky", "'cat,dog' is one class with the synonyms 'cat' and 'dog'; "
                            "separate classes with ';'"),
    "single-class": ("bird", "only one class ('bird'): every pixel gets this one class; add others, "
                     "e.g. 'background'"),
    "duplicate": ("bird; water; Bird", "duplicate class lines ['bird']: they are kept as separate classes"),
    "over-long": (f"bird; {LONG}", "longer than the text encoder's context of 77 tokens"),
}
# (classes, a fragment of the one-line error every entry point gives)
ERRORS = {
    "empty": ("", "classes is empty: give at least one class name"),
    "empty-class": ("bird;;water", "class 2 is empty or whitespace only"),
    "empty-synonym": ("bird; water, , lake", "class 2 = ' water, , lake' has an empty synonym at position 1"),
    "invalid-text": ("bird; caf\udcff", "class 2 ('caf\\udcff') holds a character that is not valid text "
                     "(the byte 0xff)"),
}


@pytest.fixture(autouse=True)
def _text_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RESCLIP_CACHE", str(tmp_path_factory.getbasetemp() / "resclip-cache"))


def _parse(classes: str) -> tuple[tuple[str, ...], tuple[int, ...], list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spec = load_classes(classes)
    return spec.queries, spec.query_to_class, [str(w.message) for w in caught]


# ------------------------------------------------------------------------------------------------ API
def test_a_comma_separates_synonyms_with_or_without_a_space() -> None:
    tight, spaced = _parse("cat,dog; sky ,clouds"), _parse("cat, dog; sky, clouds")
    assert tight[:2] == spaced[:2] == (("cat", "dog", "sky", "clouds"), (0, 0, 1, 1))
    assert spaced[2] == []
    assert tight[2] == ["'cat,dog' is one class with the synonyms 'cat' and 'dog' (as are 1 more); separate "
                        "classes with ';' and synonyms with ', '"]
    with pytest.warns(ClassListWarning, match=r"'a,b,c' is one class with the synonyms 'a', 'b' and 'c'"):
        parse_classes(["a,b,c", "sky"])  # lists follow the same rule
    assert _parse("Cat,dog")[2] == [  # the complaint of issue 14: one class, said twice
        "'Cat,dog' is one class with the synonyms 'Cat' and 'dog'; separate classes with ';' and synonyms "
        "with ', '",
        "only one class ('Cat'): every pixel gets this one class; add others, e.g. 'background'",
    ]


@pytest.mark.parametrize("name", list(WARNINGS))
def test_api_warnings(name: str) -> None:
    classes, message = WARNINGS[name]
    if name == "over-long":  # only the text encoder knows its context
        assert class_warnings(classes.split("; ")) == []
        return
    with pytest.warns(ClassListWarning, match=message.replace("(", r"\(").replace(")", r"\)")
                      .replace("[", r"\[").replace("]", r"\]")):
        parse_classes(classes)
    assert issubclass(ClassListWarning, UserWarning)


@pytest.mark.parametrize("name", list(ERRORS))
def test_api_errors_are_one_line(name: str) -> None:
    classes, fragment = ERRORS[name]
    with pytest.raises(ValueError) as err:
        load_classes(classes)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_load_classes_from_a_file_or_text(tmp_path: Path) -> None:
    path = tmp_path / "classes.txt"
    path.write_text("bird\nwater, lake\n\n")
    expected = parse_classes(["bird", "water, lake"])
    assert load_classes(path=path) == load_classes("bird; water, lake") == expected
    path.write_text("bird\n\nwater\n")
    with pytest.raises(ValueError, match=rf"class file {str(path)!r} line 2 is empty"):
        load_classes(path=path)
    with pytest.raises(FileNotFoundError, match="class file not found"):
        load_classes(path=tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="either as text"):
        load_classes()
    with pytest.raises(ValueError, match="either as text"):
        load_classes("bird", path)


def test_the_library_indexes_from_zero_without_a_place() -> None:
    with pytest.raises(ValueError, match=r"^classes\[1\] is empty or whitespace only"):
        parse_classes(["bird", " "])


# ------------------------------------------------------------------------------------------------ CLI
def _segment(capsys: pytest.CaptureFixture[str], tiny_ckpt: Path, out: Path, classes: str) -> tuple[int, str]:
    rc = main(["segment", str(BIRD), "--classes", classes, "--out", str(out), "--quiet", "--device", "cpu",
               "--pretrained", str(tiny_ckpt), *FAST_CLI])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


@pytest.mark.parametrize("name", list(WARNINGS))
def test_cli_warnings_are_one_line_each(
    name: str, tiny_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    classes, message = WARNINGS[name]
    rc, err = _segment(capsys, tiny_ckpt, tmp_path / "o", classes)
    assert rc == 0, err
    lines = [line for line in err.splitlines() if message in line]
    assert len(lines) == 1 and lines[0].startswith("resclip: warning: "), err
    assert (tmp_path / "o" / "crop_114_mask.png").is_file()


@pytest.mark.parametrize("name", list(ERRORS))
def test_cli_errors_exit_2_with_one_line(
    name: str, tiny_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    classes, fragment = ERRORS[name]
    rc, err = _segment(capsys, tiny_ckpt, tmp_path / "o", classes)
    assert rc == 2
    assert err.splitlines() == [line for line in err.splitlines() if line.startswith("resclip: error: ")]
    assert len(err.splitlines()) == 1 and fragment in err, err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------ demo
@pytest.fixture
def settings(tiny_ckpt: Path) -> demo.DemoSettings:
    return demo.DemoSettings(pretrained=str(tiny_ckpt), device="cpu", overrides=FAST_SETTINGS)


@pytest.mark.parametrize("name", list(WARNINGS))
def test_demo_returns_the_warnings(name: str, settings: demo.DemoSettings) -> None:
    classes, message = WARNINGS[name]
    res = demo.segment_image(str(BIRD), classes, settings=settings)
    assert [w for w in res.warnings if message in w] == res.warnings and len(res.warnings) == 1, res.warnings


@pytest.mark.parametrize("name", list(ERRORS))
def test_demo_errors(name: str, settings: demo.DemoSettings) -> None:
    classes, fragment = ERRORS[name]
    with pytest.raises(ValueError) as err:
        demo.segment_image(str(BIRD), classes, settings=settings)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_demo_page_shows_the_warnings(settings: demo.DemoSettings, tmp_path: Path) -> None:
    files = demo.SessionFiles(tmp_path / "served")
    status = demo.handle_request(files, "s1", str(BIRD), "cat,dog; sky", "naclip", True, True, 0.5,
                                 "voc", settings=settings)[2]
    assert status.startswith("naclip + RCS + SFR")
    assert status.endswith("\n\nwarning: 'cat,dog' is one class with the synonyms 'cat' and 'dog'; separate "
                           "classes with ';' and synonyms with ', '")
    files.end("s1")
