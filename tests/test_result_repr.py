"""Notebook-facing behaviour: a short repr, an HTML repr with the per-layer table, `--version`."""

from __future__ import annotations

import torch
from typer.testing import CliRunner

import probe
from probe.cli import app


def test_short_repr_and_html_repr():
    res = probe.analyze(None, torch.randn(2, 3, 32, 32), attribution="none")
    text = repr(res)
    assert text.startswith("AnalysisResult(model='cordonnier'") and len(text) < 400
    page = res._repr_html_()
    assert "<table" in page and page.count("<tr") == len(res.layers) + 1
    assert "conv_verdict" in page and len(page) < 10_000


def test_version_flag():
    out = CliRunner().invoke(app, ["--version"])
    assert out.exit_code == 0 and out.output.strip() == f"probe {probe.__version__}"
