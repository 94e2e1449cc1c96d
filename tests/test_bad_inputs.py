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
from probe.cli import _parse_floats, _parse_grid, _parse_query, app
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
                  lambda: _parse_query(text, geom), lambda: parse_layers(text, 12, "m")):
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
