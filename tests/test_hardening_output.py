"""The output set under concurrency, odd names and links (issue 22, items 1-5): the stale-temp
cleanup removes only this folder's provably dead temporaries, files added during a write are
never deleted, a reader never sees a mix of two sets, threads share registries and refuse to
share a module, ``--out`` links and ``.`` are decided up front. The races run real processes
whose writes are slowed down (a widened window), each bounded by a fixed count and a timeout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import probe
from probe.cli import app
from probe.errors import ProbeError
from probe.result import MARKER, write_output_set

from cli_errors import one_error_line

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
runner = CliRunner()
SMALL = {"input_size": (3, 32, 32)}


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _temp_name(name: str, pid: int) -> str:
    return f".{name}.probe-tmp-{pid}-{uuid.uuid4().hex}"


def _user_folder(path: Path) -> Path:
    path.mkdir()
    (path / "notes.txt").write_text("mine")
    return path


@pytest.fixture
def live_pid():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def test_glob_characters_and_odd_temp_names_never_delete_other_folders(tmp_path, live_pid):
    write_output_set(tmp_path / "run", {"a.txt": "run"})
    keep = [_user_folder(tmp_path / n) for n in (
        _temp_name("run", live_pid),  # another live run's temporary folder
        ".results.probe-tmp-notes",  # a folder probe never wrote
        ".run.probe-tmp-backup",  # a user's folder with a temp-like name
        f".run.probe-tmp-{_dead_pid()}-notahexid",  # dead pid but the name does not parse
    )]
    write_output_set(tmp_path / "r*", {"a.txt": "star"})
    write_output_set(tmp_path / "[r]un", {"a.txt": "brackets"})
    write_output_set(tmp_path / "run", {"a.txt": "again"})
    for k in keep:
        assert listing(k) == ["notes.txt"], k
    assert (tmp_path / "r*" / "a.txt").read_text() == "star"
    assert (tmp_path / "[r]un" / "a.txt").read_text() == "brackets"
    assert (tmp_path / "run" / "a.txt").read_text() == "again"


def test_only_a_dead_runs_temp_of_this_folder_is_removed(tmp_path):
    write_output_set(tmp_path / "run", {"a.txt": "run"})
    dead = tmp_path / _temp_name("run", _dead_pid())
    dead.mkdir()
    (dead / "a.txt").write_text("half")
    other = tmp_path / _temp_name("other", _dead_pid())  # a dead temp of another output folder
    other.mkdir()
    nested = tmp_path / _temp_name("run", _dead_pid())  # not probe's shape: holds a folder
    (nested / "sub").mkdir(parents=True)
    write_output_set(tmp_path / "run", {"a.txt": "new"})
    assert not dead.exists() and other.exists() and (nested / "sub").exists()


_SLOW_WRITER = textwrap.dedent("""
    import os, sys, time
    import probe.result as r
    real = os.fsync
    def fsync(fd):  # widen the window between the start of the write and the swap
        time.sleep(float(sys.argv[3]))
        real(fd)
    os.fsync = fsync
    from probe.errors import ProbeError
    try:
        r.write_output_set(sys.argv[1], {f"f{i}.txt": sys.argv[2] for i in range(4)})
    except ProbeError as e:
        print("error:", e)
        sys.exit(2)
""")


def _slow_writer(out: Path, tag: str, delay: float = 0.05) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(out), tag, str(delay)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _complete(out: Path, tags: set[str]) -> str:
    names = listing(out)
    assert names == [MARKER, "f0.txt", "f1.txt", "f2.txt", "f3.txt"], names
    values = {(out / n).read_text() for n in names if n != MARKER}
    assert len(values) == 1 and values <= tags, values
    return values.pop()


def test_racing_writers_of_run_and_a_glob_name_keep_both_sets(tmp_path):
    for _ in range(3):
        procs = [_slow_writer(tmp_path / "run", "run"), _slow_writer(tmp_path / "r*", "star"),
                 _slow_writer(tmp_path / "run", "run2")]
        for p in procs:
            p.communicate(timeout=120)
            assert p.returncode == 0
        assert _complete(tmp_path / "run", {"run", "run2"})
        assert _complete(tmp_path / "r*", {"star"}) == "star"
        assert sorted(listing(tmp_path)) == ["r*", "run"]  # no temporary left behind


def test_a_file_added_during_the_write_is_kept_and_the_write_refused(tmp_path):
    out = tmp_path / "run"
    write_output_set(out, {"f0.txt": "old"})
    proc = _slow_writer(out, "new", delay=0.3)
    deadline = time.monotonic() + 60
    while not any(p.name.startswith(".run.probe-tmp-") for p in tmp_path.iterdir()):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.01)
    (out / "user-results.csv").write_text("mine")
    text, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "user-results.csv" in text and "did not write" in text, text
    assert (out / "user-results.csv").read_text() == "mine" and (out / "f0.txt").read_text() == "old"
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("run.probe-new-")]
    assert len(kept) == 1 and str(kept[0]) in " ".join(text.split()) and _complete(kept[0], {"new"}) == "new"


def test_a_file_added_in_the_instant_before_the_swap_puts_the_earlier_set_back(tmp_path, monkeypatch):
    import probe.result as r

    out = tmp_path / "run"
    write_output_set(out, {"f0.txt": "old"})
    real = r._exchange
    calls = []

    def exchange(a, b):
        if not calls:
            (out / "late.csv").write_text("mine")  # after the last check, before the swap
        calls.append(1)
        return real(a, b)

    monkeypatch.setattr(r, "_exchange", exchange)
    with pytest.raises(ProbeError, match=r"late\.csv.*new results are in"):
        write_output_set(out, {"f0.txt": "new"})
    assert listing(out) == [MARKER, "f0.txt", "late.csv"] and (out / "f0.txt").read_text() == "old"
    assert len(calls) == 2  # swapped, found the file, swapped back


def _result(tag: float) -> probe.AnalysisResult:
    """A small saved-result set whose every file carries ``tag``."""
    from probe.analyses.reducers import LayerStats

    g = probe.TokenGeometry(1, (2, 2), (8.0, 8.0))
    st = LayerStats(0, g, 5, torch.full((2, 4, 4), tag, dtype=torch.float64), torch.full((2, 9), tag, dtype=torch.float64),
                    torch.full((2, 9), tag, dtype=torch.float64), torch.full((3, 2, 9), tag, dtype=torch.float64),
                    torch.full((3,), tag, dtype=torch.float64))
    heads = pd.DataFrame({"layer": [0, 0], "head": [0, 1], "x": [tag, tag]})
    layers = pd.DataFrame({"layer": [0], "x": [tag]})
    return probe.AnalysisResult(heads=heads, layers=layers, stats={0: st}, geometry=g, meta={"tag": tag},
                                extras={"arr": np.full(3, tag)})


_SAVER = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[3])
    from test_hardening_output import _result
    a, b = _result(1.0), _result(2.0)
    for i in range(int(sys.argv[2])):
        (a if i % 2 else b).save(sys.argv[1])
""")


def test_load_of_a_folder_being_replaced_returns_one_complete_set(tmp_path, monkeypatch):
    import probe.saved as s

    out = tmp_path / "run"
    _result(1.0).save(out)
    real = s._document

    def slow_document(raw, folder):  # widen the window between result.json and the other files
        time.sleep(0.003)
        return real(raw, folder)

    monkeypatch.setattr(s, "_document", slow_document)
    writer = subprocess.Popen([sys.executable, "-c", _SAVER, str(out), "150", str(Path(__file__).parent)], env=ENV)
    loads, tags = 0, set()
    try:
        while writer.poll() is None and loads < 400:
            r = probe.load(out)
            tag = r.meta["tag"]
            assert set(r.heads["x"]) == {tag} and set(r.layers["x"]) == {tag}
            assert all(torch.all(getattr(r.stats[0], f) == tag) for f in ("attn_sum", "feat_sum", "boot_weight"))
            assert np.all(r.extras["arr"] == tag)
            loads += 1
            tags.add(tag)
    finally:
        writer.wait(timeout=120)
    assert writer.returncode == 0 and loads > 0


def test_threads_on_first_use_share_the_registry(tmp_path):
    code = textwrap.dedent("""
        import threading, torch, probe, sys
        sys.path.insert(0, sys.argv[1])
        from conftest import tiny_vit
        errors = []
        def run():
            try:
                probe.analyze(tiny_vit(), torch.rand(2, 3, 32, 32), conv_test=False, attribution="none")
            except Exception as e:
                errors.append(repr(e))
        ts = [threading.Thread(target=run) for _ in range(3)]
        [t.start() for t in ts]
        [t.join() for t in ts]
        print(errors)
        sys.exit(1 if errors else 0)
    """)
    proc = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent)], env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]


class _SlowViT(torch.nn.Module):
    """A tiny ViT whose forward waits on an event: the first analysis holds the module."""

    def __init__(self, started: threading.Event, go: threading.Event):
        super().__init__()
        from conftest import tiny_vit

        self.vit, self.started, self.go = tiny_vit(), started, go

    def forward(self, x):
        self.started.set()
        self.go.wait(30)
        return self.vit(x)


def test_a_module_already_being_analysed_is_refused_clearly_and_modes_are_restored():
    started, go = threading.Event(), threading.Event()
    model = _SlowViT(started, go)
    model.train()
    model.vit.blocks[0].eval()  # mixed modes come back as they were
    out: dict = {}

    def first():
        try:
            out["first"] = probe.analyze(model, torch.rand(2, 3, 32, 32), conv_test=False, fits=False,
                                         attribution="none", prefix_tokens=1, grid=(4, 4), data_overrides=SMALL)
        except Exception as e:  # pragma: no cover - reported below
            out["first"] = e

    t = threading.Thread(target=first)
    t.start()
    try:
        assert started.wait(60)
        with pytest.raises(ProbeError, match="already being analysed"):
            probe.analyze(model, torch.rand(2, 3, 32, 32), conv_test=False, fits=False, attribution="none",
                          data_overrides=SMALL)
    finally:
        go.set()
        t.join(120)
    assert isinstance(out["first"], probe.AnalysisResult), out["first"]
    assert model.training and model.vit.training and not model.vit.blocks[0].training
    assert model.vit.blocks[1].training
    probe.analyze(model, torch.rand(2, 3, 32, 32), conv_test=False, fits=False, attribution="none",
                  prefix_tokens=1, grid=(4, 4), data_overrides=SMALL)  # free again once the first call returned


def test_threads_writing_the_same_out_all_succeed(tmp_path):
    out, errors = tmp_path / "run", []

    def write(tag):
        try:
            for _ in range(10):
                write_output_set(out, {f"f{i}.txt": tag for i in range(4)})
        except Exception as e:
            errors.append(e)

    ts = [threading.Thread(target=write, args=(t,)) for t in ("a", "b", "c", "d")]
    [t.start() for t in ts]
    [t.join(120) for t in ts]
    assert errors == []
    _complete(out, {"a", "b", "c", "d"})
    assert listing(tmp_path) == ["run"]


def test_out_a_link_to_a_folder_is_written_through(tmp_path):
    target = tmp_path / "target"
    write_output_set(target, {"a.txt": "old"})
    link = tmp_path / "link"
    link.symlink_to(target)
    write_output_set(link, {"a.txt": "new"})
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert (target / "a.txt").read_text() == "new" and listing(tmp_path) == ["link", "target"]


def test_out_a_dangling_link_or_the_current_folder_is_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("dangling").symlink_to(tmp_path / "nowhere")
    for out, needle in (("dangling", "does not exist"), (".", "current folder"), (str(tmp_path), "current folder"),
                        ("..", "current folder")):
        assert needle in one_error_line(runner.invoke(app, ["analyze", "--out", out, "--attribution", "none"]))
    assert listing(tmp_path) == ["dangling"]
