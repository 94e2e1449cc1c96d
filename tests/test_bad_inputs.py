"""Bad input is refused up front with one clear line, and nothing a user had is lost (issue 12).

CLI cases assert: exit status 2, one ``error:`` line (not wrapped), no traceback, and the files
left behind. The output set is checked against a kill injected between its writes and a full
disk (a small tmpfs, where this machine lets the test mount one). Option parsers are fuzzed with
hypothesis: no string crashes them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import probe
from probe.cli import app
from probe.options import parse_floats as _parse_floats, parse_grid as _parse_grid, query_pair as _query_pair
from probe.pipeline import _check_query
from probe.capture import parse_layers
from probe.errors import ProbeError
from probe.geometry import TokenGeometry
from probe.result import MARKER, check_output_dir, write_output_set

runner = CliRunner()


def _one_error(result) -> str:
    text = result.output
    assert result.exit_code == 2, text
    assert "Traceback" not in text
    lines = [l for l in text.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, text
    assert "\x1b[" not in lines[0]  # no ANSI escapes off a terminal
    return lines[0]


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("args, needle", [
    (["--std", "0,0,0"], "--std must be positive"),
    (["--input-size", "3,-224,224"], "--input-size must be three positive integers"),
    (["--attribution-images", "0"], "--attribution-images must be at least 1"),
    (["--patch-size", "nan"], "--patch-size must be a positive"),
    (["--mean", "nan,0,0"], "finite numbers"),
    (["--num-images", "0"], "--num-images must be at least 1"),
    (["--query", "7;7"], "--query '7;7' must be ROW,COL"),
    (["--conv-level", "1.5"], "--conv-level must lie in (0, 1)"),
])
def test_bad_options_are_refused_before_any_work(tmp_path, monkeypatch, args, needle):
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["analyze", *args])
    line = _one_error(res)
    assert needle in line
    assert listing(tmp_path) == []  # no reports/ folder, no file


def test_bad_output_locations(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("afile").write_text("keep me")
    cases = [("afile", "is an existing file"), ("afile/sub", "which is a file"), ("", "is empty"),
             ("/proc/probe-out", "cannot write into")]
    for out, needle in cases:
        line = _one_error(runner.invoke(app, ["analyze", "--out", out]))
        assert needle in line, line
    assert Path("afile").read_text() == "keep me" and listing(tmp_path) == ["afile"]


def test_a_folder_with_the_users_files_is_never_replaced(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    user = tmp_path / "mine"
    user.mkdir()
    (user / "images.txt").write_text("my list")
    (user / "heads.csv").write_text("my table")
    line = _one_error(runner.invoke(app, ["analyze", "--out", "mine", "--attribution", "none"]))
    assert "did not write" in line and "heads.csv" in line
    assert (user / "images.txt").read_text() == "my list" and listing(user) == ["heads.csv", "images.txt"]


def test_an_earlier_probe_output_is_replaced_as_a_whole(tmp_path):
    out = tmp_path / "run"
    write_output_set(out, {"a.txt": "old-a", "b.txt": "old-b"})
    assert listing(out) == [MARKER, "a.txt", "b.txt"]
    write_output_set(out, {"a.txt": "new-a", "c.txt": "new-c"})
    assert listing(out) == [MARKER, "a.txt", "c.txt"]  # b.txt was probe's: gone with its set
    assert (out / "a.txt").read_text() == "new-a"
    assert listing(tmp_path) == ["run"]  # no temporary sibling left


_KILLER = textwrap.dedent("""
    import os, shutil, signal, sys
    import probe.result as r
    mode, n = sys.argv[2], int(sys.argv[3])
    calls = {"n": 0}
    if mode == "fsync":
        real = os.fsync
        def fsync(fd):
            real(fd)
            calls["n"] += 1
            if calls["n"] == n:
                os.kill(os.getpid(), signal.SIGKILL)
        os.fsync = fsync
    else:  # after the swap, while the earlier set is being deleted
        def rmtree(*a, **k):
            os.kill(os.getpid(), signal.SIGKILL)
        shutil.rmtree = rmtree
    r.write_output_set(sys.argv[1], {"a.txt": "new-a", "b.txt": "new-b", "c.txt": "new-c"})
""")


@pytest.mark.parametrize("mode, n, expect", [("fsync", 1, "old"), ("fsync", 2, "old"), ("fsync", 4, "old"),
                                             ("swap", 0, "new")])
def test_a_kill_between_writes_leaves_the_old_or_the_new_set(tmp_path, mode, n, expect):
    out = tmp_path / "run"
    write_output_set(out, {"a.txt": "old-a", "b.txt": "old-b"})
    proc = subprocess.run([sys.executable, "-c", _KILLER, str(out), mode, str(n)], capture_output=True)
    assert proc.returncode == -9
    names = listing(out)
    if expect == "old":
        assert names == [MARKER, "a.txt", "b.txt"] and (out / "a.txt").read_text() == "old-a"
    else:
        assert names == [MARKER, "a.txt", "b.txt", "c.txt"]
        assert [(out / f).read_text() for f in ("a.txt", "b.txt", "c.txt")] == ["new-a", "new-b", "new-c"]
    assert json.loads((out / MARKER).read_text())["files"] == [f for f in names if f != MARKER]
    # the killed run's temporary sibling is cleaned by the next write
    write_output_set(out, {"a.txt": "next"})
    assert listing(tmp_path) == ["run"] and listing(out) == [MARKER, "a.txt"]


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()[:80]})")
    yield mnt
    subprocess.run(["umount", str(mnt)], capture_output=True)


def test_a_full_disk_leaves_the_earlier_set(small_disk):
    out = small_disk / "run"
    write_output_set(out, {"a.txt": "old-a"})
    with pytest.raises(ProbeError, match="nothing there was changed"):
        write_output_set(out, {"a.txt": "x" * 200_000, "b.txt": "y"})
    assert listing(out) == [MARKER, "a.txt"] and (out / "a.txt").read_text() == "old-a"
    assert listing(small_disk) == ["run"]


def test_library_write_report_refuses_a_non_path(tmp_path):
    res = probe.analyze(None, __import__("torch").randn(2, 3, 32, 32), attribution="none", conv_test=False)
    with pytest.raises(ProbeError, match="must be a path"):
        res.write_report(123)
    with pytest.raises(ProbeError, match="is an existing file"):
        (tmp_path / "f").write_text("")
        res.write_report(tmp_path / "f")
    assert check_output_dir(tmp_path / "new") == tmp_path / "new"


@pytest.mark.parametrize("source, needle", [
    ("import sys\nsys.exit(3)\n", "sys.exit(3)"),
    ("def build(:\n", "SyntaxError"),
    ("raise RuntimeError('boom')\n", "boom"),
])
def test_user_modules_failing_at_import(tmp_path, monkeypatch, source, needle):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "usermod_bad.py").write_text(source)
    sys.modules.pop("usermod_bad", None)
    for spec in ("usermod_bad:build", "usermod_bad.py:build"):
        line = _one_error(runner.invoke(app, ["analyze", "--model", spec]))
        assert needle in line and "usermod_bad" in line
    assert listing(tmp_path) == ["usermod_bad.py"]


def test_a_long_error_stays_on_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("afile").write_text("")
    long = "x" * 150
    line = _one_error(runner.invoke(app, ["analyze", "--out", f"afile/{long}"]))
    assert len(line) > 160 and long in line


# -- fuzzing the option parsers: a value or a ProbeError, never anything else ------------------
@settings(max_examples=300, deadline=None)
@given(st.text(max_size=30))
def test_parsers_never_crash(text):
    geom = TokenGeometry(1, (14, 14), (16.0, 16.0))
    for parse in (lambda: _parse_grid(text), lambda: _parse_floats(text, 3, "--mean"),
                  lambda: _query_pair(text), lambda: _check_query(_query_pair(text) or (0, 0), geom),
                  lambda: parse_layers(text, 12, "m")):
        try:
            parse()
        except ProbeError:
            pass


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=1, max_size=4))
def test_float_options_refuse_non_finite(values):
    import math

    text = ",".join(repr(v) for v in values)
    try:
        out = _parse_floats(text, 3, "--std")
    except ProbeError:
        return
    assert out is not None and all(math.isfinite(v) for v in out) and len(out) == 3


# -- the library raises ProbeError with the same messages ------------------------------------
def _tiny_images(n=2):
    import torch

    return torch.randn(n, 3, 32, 32)


@pytest.mark.parametrize("kwargs, needle", [
    ({"model": 3}, "model must be a name"),
    ({"batch_size": "16"}, "batch_size must be an integer"),
    ({"num_images": 2.5}, "num_images must be an integer"),
    ({"layers": ["a"]}, "list of integers"),
    ({"n_bootstrap": -1}, "n_bootstrap must be at least 0"),
    ({"data_overrides": {"input_size": (3, 224)}}, "three positive integers"),
    ({"data_overrides": {"std": (0, 1, 1)}}, "finite and positive"),
    ({"images": [Path("a.jpg"), __import__("PIL.Image").Image.new("RGB", (8, 8))]}, "mixed in one list"),
    ({"images": __import__("torch").zeros(2, 3, 32, 32, dtype=__import__("torch").uint8)}, "float images"),
])
def test_library_bad_arguments(kwargs, needle):
    args = {"model": None, "images": _tiny_images(), "attribution": "none", "conv_test": False, **kwargs}
    model = args.pop("model")
    with pytest.raises(ProbeError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        probe.analyze(model, **args)


def test_library_accepts_natural_inputs():
    import numpy as np
    import torch
    from PIL import Image

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    for images in (img, np.asarray(img), np.stack([np.asarray(img)] * 2), _tiny_images().double()):
        res = probe.analyze(None, images, attribution="none", conv_test=False, fits=False, n_bootstrap=0)
        assert res.meta["num_images"] in (1, 2)


# -- images: one decoding path that never aborts the run -------------------------------------
def test_images_bombs_16bit_exif_refill_and_relative_names(tmp_path):
    import numpy as np
    from PIL import Image

    root = tmp_path / "data"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (32, 32), (40 * i, 0, 0)).save(root / cls / f"{i:04d}.png")
    # a decompression bomb: a PNG header claiming far more pixels than PIL allows
    big = Image.new("1", (15000, 15000))
    big.save(root / "a" / "bomb.png")
    (root / "b" / "broken.jpg").write_bytes(b"not an image")
    # 16-bit grayscale: mid-grey must stay mid-grey, not clip to white
    g16 = np.full((32, 32), 32768, np.uint16)
    Image.fromarray(g16).save(root / "b" / "grey16.png")
    from probe.data import collect_images, decode_image

    assert np.asarray(decode_image(root / "b" / "grey16.png", "L")).mean() == pytest.approx(127.5, abs=1)
    # EXIF orientation 6 (rotate 90° clockwise to view): a 40x20 stored image is shown 20x40
    ex = Image.new("RGB", (40, 20))
    exif = ex.getexif()
    exif[0x0112] = 6
    ex.save(root / "a" / "exif.jpg", exif=exif)
    assert decode_image(root / "a" / "exif.jpg", "RGB").size == (20, 40)
    # --num-images N: N readable images even when some of the drawn ones are unreadable
    for seed in range(6):
        res = probe.analyze(None, root, num_images=7, seed=seed, attribution="none", conv_test=False,
                            fits=False, n_bootstrap=0)
        names = res.meta["image_names"]
        assert res.meta["num_images"] == 7 and len(names) == 7
        assert all("/" in n and not n.startswith("/") for n in names)  # relative to the --images root
        assert all((root / n).is_file() for n in names)
    assert collect_images(root, 7, seed=0).items != collect_images(root, 7, seed=1).items


# -- weights ---------------------------------------------------------------------------------
def test_weights_files_that_cannot_be_analysed(tmp_path):
    import torch
    from safetensors.torch import save_file

    from probe.cordonnier import build
    from probe.models import load_state_dict

    sd = build().state_dict()
    save_file({k: (v * 100).to(torch.int8) for k, v in sd.items()}, str(tmp_path / "q.safetensors"))
    with pytest.raises(ProbeError, match="integer-typed weights"):
        load_state_dict(tmp_path / "q.safetensors")
    save_file(sd, str(tmp_path / "w.SAFETENSORS"))
    assert load_state_dict(tmp_path / "w.SAFETENSORS").keys() == sd.keys()
    torch.save({"epoch": 3, "note": "hi"}, tmp_path / "meta.pth")
    with pytest.raises(ProbeError, match="holds no tensors"):
        load_state_dict(tmp_path / "meta.pth")
    with pytest.raises(ProbeError, match="is a folder"):
        load_state_dict(tmp_path)
    line = _one_error(runner.invoke(app, ["analyze", "--model", "probe.cordonnier:build", "--weights",
                                          str(tmp_path / "q.safetensors")]))
    assert "integer-typed" in line


def test_a_query_outside_the_grid_fails_before_the_images_are_read(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        (tmp_path / "imgs" / f"{i}.jpg").write_bytes(b"never decoded")
    import probe.data

    def boom(*a, **k):
        raise AssertionError("an image was decoded")

    monkeypatch.setattr(probe.data, "decode_image", boom)
    line = _one_error(runner.invoke(app, ["analyze", "--images", "imgs", "--query", "40,3"]))
    assert "inside the 16x16 patch grid" in line
    assert listing(tmp_path) == ["imgs"]
    with pytest.raises(ProbeError, match="patch grid"):
        probe.analyze(None, _tiny_images(), query=(3, 99))


def test_ctrl_c_prints_interrupted_exits_130_and_leaves_no_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    import probe.pipeline

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(probe.pipeline, "analyze", interrupted)
    res = runner.invoke(app, ["analyze", "--out", "run"])
    assert res.exit_code == 130 and "interrupted" in res.output and "Traceback" not in res.output
    assert listing(tmp_path) == []
    # interrupted while the output set is written: the folder is not created, no temporary remains
    import probe.result

    real = probe.result.os.fsync
    calls = {"n": 0}

    def fsync(fd):
        real(fd)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(probe.result.os, "fsync", fsync)
    with pytest.raises(KeyboardInterrupt):
        write_output_set(tmp_path / "run", {"a.txt": "a", "b.txt": "b"})
    assert listing(tmp_path) == []
