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


def test_saved_types_are_stable_tags_and_survive_a_class_move(folder, tmp_path, monkeypatch):
    """New saves name probe's dataclasses by stable tags; a folder naming a class by an old
    module:qualname loads through the alias table, also after the class "moved" (its path in the
    tag table changed)."""
    import importlib

    from probe import saved

    r = probe.load(folder)
    r.save(tmp_path / "new")
    text = (tmp_path / "new" / "result.json").read_text()
    assert '"$dataclass": "ConvLikeResult"' in text and "probe.analyses.convlike:ConvLikeResult" not in text
    assert probe.load(tmp_path / "new").extras["convlike"].config.legacy
    # every tag names a dataclass of this probe
    for tag, path in saved.SAVED_TYPES.items():
        mod, _, qual = path.partition(":")
        assert hasattr(importlib.import_module(mod), qual), tag
    # simulate moving TokenGeometry: the tag table points elsewhere, old names go through aliases
    monkeypatch.setitem(saved.SAVED_TYPES, "TokenGeometry", "probe.geometry:TokenGeometry")
    monkeypatch.setitem(saved.SAVED_TYPE_ALIASES, "probe.old_place:TokenGeometry", "TokenGeometry")
    doc = (folder / "result.json").read_text().replace("probe.geometry:TokenGeometry", "probe.old_place:TokenGeometry")
    (folder / "result.json").write_text(doc)
    assert probe.load(folder).geometry.grid == (6, 6)
    with pytest.raises(probe.ProbeError, match="unknown to this probe"):
        (folder / "result.json").write_text(doc.replace('"probe.old_place:TokenGeometry"', '"NoSuchType"'))
        probe.load(folder)


def test_register_saved_type_checks_its_arguments():
    import dataclasses

    from probe.saved import SAVED_TYPES, _type_tag, register_saved_type

    @dataclasses.dataclass
    class Mine:
        x: int = 0

    with pytest.raises(probe.ProbeError):
        register_saved_type("bad:tag", Mine)
    with pytest.raises(probe.ProbeError):
        register_saved_type("Mine", object)
    with pytest.raises(probe.ProbeError, match="already names"):
        register_saved_type("TokenGeometry", Mine)
    register_saved_type("tests.Mine", Mine)
    try:
        assert _type_tag(Mine) == "tests.Mine"
    finally:
        SAVED_TYPES.pop("tests.Mine", None)
