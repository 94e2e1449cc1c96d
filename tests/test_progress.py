"""Progress of a run (probe.progress): every named stage reported, the original
progress(done, total) form, progress=False silent, bars on request."""

from __future__ import annotations

import pytest
import torch

import probe
from probe.errors import ProbeError
from probe.progress import STAGES, CallbackProgress, ProgressReporter, Stage, make_progress

from conftest import tiny_vit

# 4 images in batches of 2; null (a) on every layer (2 copies x 2 images); IG on 2 images
RUN = dict(batch_size=2, n_bootstrap=5, null_layers="all", null_seeds=2, null_images=2, attribution="ig", attribution_images=2,
           ig_steps=2, data_overrides={"input_size": (3, 32, 32)})


def _x(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_a_recorder_sees_every_stage_with_its_counts():
    calls: list[tuple[str, int, int | None]] = []
    probe.analyze(tiny_vit(), _x(), progress=lambda stage, done, total: calls.append((stage, done, total)), **RUN)
    names = list(dict.fromkeys(s for s, _, _ in calls))
    assert names == list(STAGES)  # all of them, in run order
    last = {s: (d, t) for s, d, t in calls}
    assert last["capture"] == (4, 4)
    assert last["quadratic fits"] == (3, 3)  # one per layer
    assert last["conv-test null"] == (4, 4)  # 2 copies x 2 images
    d, t = last["attribution"]
    assert d == t and t > 0
    for stage in STAGES:  # counts never go down and never pass the total
        seq = [(d, t) for s, d, t in calls if s == stage]
        assert all(a[0] <= b[0] for a, b in zip(seq, seq[1:])), stage
        assert all(t is None or d <= t for d, t in seq), stage
    capture = [d for s, d, _ in calls if s == "capture"]
    assert capture[-3:] == [2, 4, 4]  # after each batch, then the close


def test_the_original_two_argument_callable_sees_images_only():
    calls = []
    probe.analyze(tiny_vit(), _x(), progress=lambda done, total: calls.append((done, total)), **RUN)
    assert calls == [(2, 4), (4, 4)]


def test_a_reporter_object_gets_every_stage():
    class Recorder(ProgressReporter):
        def __init__(self):
            self.stages: list[Stage] = []

        def stage(self, name, total=None):
            self.stages.append(Stage(name, total))
            return self.stages[-1]

    rec = Recorder()
    probe.analyze(tiny_vit(), _x(), progress=rec, **{**RUN, "attribution": "none", "conv_test": False})
    assert [s.name for s in rec.stages] == ["capture", "quadratic fits"]
    assert all(s.closed and s.done == s.total for s in rec.stages)


def test_progress_false_prints_nothing_and_true_draws_bars(capfd):
    kw = {**RUN, "null_seeds": 0, "attribution": "none"}
    probe.analyze(tiny_vit(), _x(), progress=False, **kw)
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    probe.analyze(tiny_vit(), _x(), progress=None, **kw)  # default: not a terminal here -> silent
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    probe.analyze(tiny_vit(), _x(), progress=True, **kw)
    out, err = capfd.readouterr()
    assert "capture" in err and "quadratic fits" in err and "conv test" in err


def test_bad_progress_values_are_refused_before_any_work():
    for bad in ("yes", 3, lambda: None):
        with pytest.raises(ProbeError, match="progress"):
            probe.analyze(tiny_vit(), "/nonexistent", progress=bad)
    rep, owned = make_progress(CallbackProgress(print))
    assert isinstance(rep, CallbackProgress) and not owned


def test_in_a_notebook_the_default_is_widgets_or_plain_text_lines(monkeypatch, capfd):
    import probe.progress as pp

    monkeypatch.setattr(pp, "in_notebook", lambda: True)
    monkeypatch.setattr(pp, "_widgets_work", lambda: True)
    rep, owned = make_progress(None)
    assert isinstance(rep, pp.TqdmProgress) and owned
    assert isinstance(make_progress(False)[0], pp.NullProgress)  # False still wins
    # without ipywidgets: plain lines, even for stages that overlap (tqdm's text bars would move
    # the cursor with escape codes, which a notebook cell prints as they are)
    monkeypatch.setattr(pp, "_widgets_work", lambda: False)
    rep, owned = make_progress(True)
    assert isinstance(rep, pp.TextProgress) and owned
    with rep.stage("conv test", 2) as outer:
        with rep.stage("conv-test null", 3) as inner:
            inner.advance(3)
        outer.advance(2)
    err = capfd.readouterr().err
    assert "\x1b" not in err and "\r" not in err
    lines = err.splitlines()
    assert lines[0] == "conv test: started, 2 to do" and lines[1] == "conv-test null: started, 3 to do"
    assert lines[2].startswith("conv-test null: 3/3 done in ") and lines[3].startswith("conv test: 2/2 done in ")
