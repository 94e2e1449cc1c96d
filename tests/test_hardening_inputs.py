"""Model specs, weights, images and Ctrl-C (issue 22, items 10-13): each bad input one clear
error before any work (CLI: one ``error:`` line, exit 2; library: ``ProbeError``), odd image
names kept one per line, thousands of unreadable files summarised in one warning."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import probe
from probe.cli import app
from probe.errors import ProbeError

from cli_errors import one_error_line

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
ENV = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
runner = CliRunner()
SMALL = ["--input-size", "3,32,32", "--attribution", "none", "--no-conv-test", "--num-images", "2"]



def _user_file(folder: Path, name: str, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(TESTS)!r})
        from conftest import tiny_vit
    """) + textwrap.dedent(body))
    return path


def test_a_user_file_named_like_a_module_never_replaces_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    real_json = sys.modules["json"]
    _user_file(tmp_path / "models", "json.py", "def build():\n    return tiny_vit()\n")
    res = runner.invoke(app, ["analyze", "--model", "models/json.py:build", "--random-init", "--out", "run", *SMALL])
    assert res.exit_code == 0, res.output
    assert sys.modules["json"] is real_json and json.loads("[1]") == [1]
    assert probe.load(tmp_path / "run").meta["num_images"] == 2


@pytest.mark.parametrize("body, needle", [
    ("def build():\n    sys.exit(0)\n", "called sys.exit(0)"),
    ("def build():\n    with torch.device('meta'):\n        return tiny_vit()\n", "meta device"),
])
def test_bad_factories_are_refused_before_any_work(tmp_path, monkeypatch, body, needle):
    monkeypatch.chdir(tmp_path)
    _user_file(tmp_path / "models", "net.py", body)
    line = one_error_line(runner.invoke(app, ["analyze", "--model", "models/net.py:build", "--random-init",
                                          "--out", "run", *SMALL]))
    assert needle in line and not (tmp_path / "run").exists()


def test_nan_weights_name_the_weights_not_the_capture_rule(tmp_path):
    from safetensors.torch import save_file

    from probe.cordonnier import build

    sd = build().state_dict()
    name = next(k for k, v in sd.items() if v.is_floating_point() and v.numel() > 1)
    sd = {k: v.clone().contiguous() for k, v in sd.items()}
    sd[name].view(-1)[1] = float("inf")
    save_file(sd, tmp_path / "w.safetensors")
    line = one_error_line(runner.invoke(app, ["analyze", "--model", "probe.cordonnier:build", "--weights",
                                          str(tmp_path / "w.safetensors"), "--out", str(tmp_path / "run"),
                                          "--attribution", "none", "--num-images", "2"]))
    assert "NaN or infinite" in line and name in line and "w.safetensors" in line and "rule" not in line
    model = build()
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(ProbeError, match="NaN or infinite"):
        probe.analyze(model, torch.rand(2, 3, 32, 32), attribution="none")


def test_weights_a_text_file_says_so(tmp_path):
    (tmp_path / "w.pth").write_text("hello, not a checkpoint\n")
    line = one_error_line(runner.invoke(app, ["analyze", "--model", "probe.cordonnier:build", "--weights",
                                          str(tmp_path / "w.pth"), "--out", str(tmp_path / "run"),
                                          "--attribution", "none"]))
    assert "is not a checkpoint (it is a text file" in line


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.2, 1.0])
def test_ctrl_c_early_says_interrupted(tmp_path, delay):
    """Ctrl-C at moments of the first seconds (typer's option parsing, the command's imports, model
    loading), counted from the moment the command line's ``typer`` is imported (``-X importtime``
    says when; before that Python itself is still starting ``-m probe``)."""
    import threading

    proc = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "probe", "analyze", "--out",
                             str(tmp_path / "run"), "--attribution", "none"], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    lines, loaded = [], threading.Event()

    def drain():  # keep reading: a full pipe would stall the child
        for line in proc.stderr:
            lines.append(line.rstrip())
            if re.search(r"\|\s+typer$", line.rstrip()):
                loaded.set()
        loaded.set()

    reader = threading.Thread(target=drain)
    reader.start()
    assert loaded.wait(60)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    reader.join(30)
    said = [l for l in lines if l.strip() and not l.startswith("import time:")]
    # 130, or killed by SIGINT (-2), which a shell also reports as 130: Python ends that way when the
    # interrupt passed through C code running Python (an import), even after the command's own exit
    assert proc.returncode in (130, -signal.SIGINT) and said[-1:] == ["interrupted"], said[-5:]
    assert not (tmp_path / "run").exists()


def _photos(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for n in names:
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / n, format="PNG")


def test_newlines_in_image_names_keep_one_line_per_image(tmp_path):
    names = ["a\nb.png", "c\rd.png", "e\\f.png", "plain.png"]
    _photos(tmp_path / "imgs", names)
    res = runner.invoke(app, ["analyze", "--images", str(tmp_path / "imgs"), "--out", str(tmp_path / "run"),
                              "--attribution", "none", "--no-conv-test"])
    assert res.exit_code == 0, res.output
    lines = (tmp_path / "run" / "images.txt").read_text().split("\n")
    assert lines[-1] == "" and len(lines) - 1 == len(names)
    unescaped = [l.replace("\\\\", "\0").replace("\\n", "\n").replace("\\r", "\r").replace("\0", "\\")
                 for l in lines[:-1]]
    assert sorted(Path(u).name for u in unescaped) == sorted(names)


def test_images_a_fifo_or_a_device_says_what_it_is(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    for path, needle in ((tmp_path / "pipe.png", "named pipe (FIFO)"), (Path("/dev/zero"), "is a device")):
        line = one_error_line(runner.invoke(app, ["analyze", "--images", str(path), "--out", str(tmp_path / "run"),
                                              "--attribution", "none"]))
        assert needle in line
    with pytest.raises(ProbeError, match="named pipe"):
        probe.analyze(None, str(tmp_path / "pipe.png"), attribution="none")


def test_many_unreadable_files_give_one_warning_line(tmp_path):
    folder = tmp_path / "imgs"
    _photos(folder, [f"p{i}.png" for i in range(3)])
    for i in range(300):
        (folder / f"e{i:04d}.png").write_bytes(b"")
    res = runner.invoke(app, ["analyze", "--images", str(folder), "--num-images", "3", "--out", str(tmp_path / "run"),
                              "--attribution", "none", "--no-conv-test"])
    assert res.exit_code == 0, res.output
    warned = [l for l in res.output.splitlines() if l.startswith("warning:")]
    assert len(warned) == 1 and re.search(r"\(and [0-9]+ more unreadable files", warned[0]), res.output
    r = probe.load(tmp_path / "run")
    assert r.meta["num_images"] == 3 and sorted(Path(n).name for n in r.meta["image_names"]) == \
        ["p0.png", "p1.png", "p2.png"]
