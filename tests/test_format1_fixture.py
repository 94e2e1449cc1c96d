"""A saved result of format 1, written by probe before issue 21 (`tests/fixtures/format1-result`:
the planted Theorem-1 ViT, 3 layers, 3 random images, the withdrawn "taps" conv test), still
loads, re-renders, compares and re-runs its conv test with the current grid test."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import probe

FIXTURE = Path(__file__).parent / "fixtures" / "format1-result"


@pytest.fixture()
def folder(tmp_path):
    d = tmp_path / "format1"
    shutil.copytree(FIXTURE, d)
    return d


def test_format1_folder_loads_rerenders_compares_and_reruns(folder, tmp_path):
    assert json.loads((folder / "result.json").read_text())["format"] == 1
    r = probe.load(folder)
    assert r.layers.conv_verdict.tolist() == ["conv-like", "non-local", "non-local"]  # as saved
    cl = r.extras["convlike"]
    assert cl.config.legacy and "earlier version of the conv test" in cl.summary()
    r.write_report(tmp_path / "again")
    html = (tmp_path / "again" / "report.html").read_text()
    assert "earlier version of the conv test" in html
    cmp = probe.compare([folder, tmp_path / "again"])
    cmp.write_report(tmp_path / "cmp")
    assert (tmp_path / "cmp" / "compare.html").is_file()
    new = r.rerun()
    assert new.extras["convlike"].config.calibration == "grid"
    assert new.layers.conv_verdict.tolist() == ["conv-like", "non-local", "non-local"]
    assert "conv_dilation" in new.layers
