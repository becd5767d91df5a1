"""Issue 14 usability: --set type checks and suggestions, method="resclip" in the API, a warning for
half precision on the CPU, resuming `segment`, `reproduce` merging runs with different --rows."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

import resclip
from resclip.cli import main
from resclip.commands.common import parse_overrides
from resclip.commands.reproduce import Cell, merge_previous
from resclip.factory import apply_overrides
from resclip.paper_tables import get_table
from resclip.presets import get_preset

pytestmark = pytest.mark.usefixtures("text_cache_env")

BIRD = Path(__file__).parent / "data" / "benchmarks" / "VOCdevkit" / "VOC2012" / "JPEGImages" / "crop_114.jpg"


def cli(capsys, *argv: object) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return rc, out, err


# ------------------------------------------------------------------------------------------ --set


@pytest.mark.parametrize("item, fragments", [
    ("lambda_rcs=abc", ["lambda_rcs", "number", "'abc'"]),
    ('lambda_rcs="x"', ["lambda_rcs", "number", "'x'"]),
    ("short_side=1.5", ["short_side", "integer"]),
    ("sfr_path=straight", ["sfr_path", "'line' or 'connected'"]),
    ("rcs_layers=(1, 'a')", ["rcs_layers", "integers"]),
    ("lambda_rsc=0.3", ["did you mean lambda_rcs?"]),
])
def test_set_bad_values_name_the_key(item, fragments):
    with pytest.raises(Exception) as info:
        parse_overrides([item])
    assert "not supported between" not in str(info.value)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_set_good_values_pass():
    out = parse_overrides(["lambda_rcs=1", "rcs_layers=7", "area_thd=None", "prob_thd=0.2"])
    assert out == {"lambda_rcs": 1, "rcs_layers": 7, "area_thd": None, "prob_thd": 0.2}
    preset = apply_overrides(get_preset("default"), out)
    assert preset.rcs.lam == 1.0 and isinstance(preset.rcs.lam, float) and preset.rcs.layers == (7,)


def test_api_overrides_are_type_checked():
    with pytest.raises(TypeError, match="lambda_rcs"):
        resclip.create_segmenter(pretrained=None, lambda_rcs="x")
    with pytest.raises(TypeError, match="did you mean tau_sfr"):
        resclip.create_segmenter(pretrained=None, tau_sfg=1.0)


def test_cli_set_error_is_one_line(capsys):
    rc, _, err = cli(capsys, "segment", BIRD, "--classes", "a; b", "--out", "unused", "--pretrained", "none",
                     "--set", "lambda_rcs=abc")
    assert rc == 2 and "lambda_rcs" in err and "'<='" not in err


# ------------------------------------------------------------------------- method names, precision


def test_method_resclip_in_the_api(tiny_ckpt):
    seg = resclip.create_segmenter(method="resclip", pretrained=str(tiny_ckpt), rcs_layers=(1, 2))
    assert seg.config.method == "naclip" and seg.config.rcs is not None and seg.config.sfr is not None
    with pytest.raises(ValueError, match="resclip"):
        resclip.create_segmenter(method="resclip", sfr=False, pretrained=str(tiny_ckpt))


def test_fp16_on_cpu_warns(tmp_path, capsys, model):
    _, _, err = cli(capsys, "segment", BIRD, "--classes", "bird; background", "--out", tmp_path,
                    "--precision", "fp16", *model)
    assert "resclip: warning: --precision fp16 on the CPU is slower" in err


def test_segment_help_names_no_missing_flag(capsys):
    with pytest.raises(SystemExit):
        main(["segment", "--help"])
    out = capsys.readouterr().out
    assert "--max-megapixels" not in out and "Resuming" in out


# ------------------------------------------------------------------------------------ segment resume


def test_segment_resumes_an_interrupted_run(tmp_path, capsys, model, monkeypatch):
    images = tmp_path / "in"
    images.mkdir()
    for name in ("a", "b", "c"):
        (images / f"{name}.jpg").write_bytes(BIRD.read_bytes())
    out = tmp_path / "out"
    args = ["segment", images, "--classes", "bird; background", "--out", out, *model]
    assert cli(capsys, *args)[0] == 0
    done = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    for suffix in ("_mask.png", "_overlay.png", ".json"):  # "interrupted" before c
        (out / f"c{suffix}").unlink()

    import resclip.commands.segment as segment

    seen: list[str] = []
    real = segment.write_outputs
    monkeypatch.setattr(segment, "write_outputs",
                        lambda job, *a: (seen.append(job.image.name), real(job, *a)))
    rc, stdout, _ = cli(capsys, *args)
    assert rc == 0 and "skipped 2 images" in stdout and seen == ["c.jpg"]
    assert all(done[p.name] == p.stat().st_mtime_ns for p in out.iterdir() if not p.name.startswith("c"))
    (out / "b.json").write_text("{")  # not a finished image: refused without --overwrite
    rc, _, err = cli(capsys, *args)
    assert rc == 2 and "b_mask.png" in err and "--overwrite" in err
    seen.clear()
    assert cli(capsys, *args, "--overwrite")[0] == 0 and seen == ["a.jpg", "b.jpg", "c.jpg"]


# ---------------------------------------------------------------------------------- reproduce merge


def test_reproduce_merges_runs_with_different_rows(tmp_path, capsys):
    from resclip.commands.reproduce import summary_json

    table = get_table("3")
    args = argparse.Namespace(limit=1, overrides=[], output=str(tmp_path / "t3.json"))
    out = Path(args.output)
    first = [r for r in table.rows if r.label.endswith("+RCS +SFR")]
    out.write_text(summary_json(table, first, [[Cell(50.0, 86.0)]], args))
    second = [table.rows[0]]
    rows, grid = merge_previous(out, table, second, [[Cell(40.0, 79.7)]], args)
    assert [r.label for r in rows] == [table.rows[0].label, first[0].label]
    assert [g[0].ours for g in grid] == [40.0, 50.0]
    # another --limit: the earlier run is replaced, with a warning
    other = argparse.Namespace(limit=None, overrides=[], output=args.output)
    rows, _ = merge_previous(out, table, second, [[Cell(40.0, 79.7)]], other)
    assert len(rows) == 1 and "replacing" in capsys.readouterr().err
    assert json.loads(out.read_text())["table"] == "3"




def test_method_fields_in_multi_method_commands_are_checked(tmp_path, capsys):
    """compare refuses a field of a method it does not run (a typo would silently do nothing); sweep
    names --grid in a grid value's type error. Both before any model loads."""
    img = Path(__file__).parent / "data" / "benchmarks" / "VOCdevkit" / "VOC2012" / "JPEGImages"
    img = img / "crop_000.jpg"
    argv = ["compare", str(img), "--classes", "cat; dog", "--methods", "naclip,sclip", "--set",
            "proxyclip_beta=2", "--out", str(tmp_path / "f.png"), "--pretrained", "/nonexistent.pt"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("resclip: error: --set proxyclip_beta is a field of proxyclip, which --methods does "
                       "not run (naclip, sclip); add it to --methods or drop the setting")
    from resclip.commands.common import UserError
    from resclip.commands.sweep import build_grid

    args = argparse.Namespace(lambda_rcs=None, lambda_sfr=None, rcs_layers=None,
                              grid=["proxyclip_beta=1.0,x"])
    with pytest.raises(UserError, match=r"^--grid setting proxyclip_beta: expected a number, got 'x'$"):
        build_grid(args)
