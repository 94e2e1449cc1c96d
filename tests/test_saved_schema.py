"""Tampered saved results (issue 22, items 6-7): ``result.json`` is validated against its schema
before use, files are read only inside the folder, and every damaged or edited folder gives one
``ProbeError`` (library) / one ``error:`` line with exit 2 (``probe compare``), never another
exception. Ends with a property-based fuzz of the reader (hypothesis) over JSON documents and
file sets: any input loads as a result or raises ``ProbeError``."""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import probe
from probe.cli import app
from probe.errors import ProbeError

from cli_errors import one_error_line
from probe.saved import RESULT_FILE, STATS_FILE

from conftest import tiny_vit

runner = CliRunner()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A real run's folder (fits and conv test: dataclasses, frames, int keys, string arrays)."""
    torch.manual_seed(0)
    res = probe.analyze(tiny_vit(), torch.rand(4, 3, 32, 32), data_overrides={"input_size": (3, 32, 32)},
                        n_bootstrap=8, null_seeds=0, attribution="none")
    out = tmp_path_factory.mktemp("schema") / "run"
    res.save(out)
    return out


def _copy(saved: Path, dst: Path) -> Path:
    shutil.copytree(saved, dst)
    return dst


def _edit(folder: Path, change) -> Path:
    doc = json.loads((folder / RESULT_FILE).read_text())
    change(doc)
    (folder / RESULT_FILE).write_text(json.dumps(doc))
    return folder


def _set(path: str, value):
    """A change setting ``doc[k1][k2]...`` (keys separated by '/') to ``value``."""
    def change(doc):
        keys = path.split("/")
        for k in keys[:-1]:
            doc = doc[int(k)] if isinstance(doc, list) else doc[k]
        if value is _DELETE:
            del doc[keys[-1]]
        elif isinstance(doc, list):
            doc[int(keys[-1])] = value
        else:
            doc[keys[-1]] = value
    return change


_DELETE = object()

CASES = [
    ("stats-abc", _set("stats", "abc"), "at stats: 'abc' is not of type 'array'"),
    ("no-tables", _set("tables", _DELETE), "'tables' is a required property"),
    ("complex-column", _set("tables/heads/columns/head", "complex128"), "no complex"),
    ("absurd-dtype", _set("tables/layers/columns/layer", "V99999999"), "column type probe writes"),
    ("unknown-field", _set("surprise", 1), "'surprise' was unexpected"),
    ("unknown-tag", _set("meta/x", {"$pickle": "os.system"}), "at meta.x"),
    ("extras-list", _set("extras", [1, 2]), "at extras: [1, 2] is not of type 'object'"),
    ("extras-convlike-int", _set("extras/convlike", 5), "extras['convlike']"),
    ("extras-quadratic-str", _set("extras/quadratic", "abc"), "extras['quadratic']"),
    ("dataclass-unknown-field", _set("extras/convlike/fields/surprise", 1), "unknown fields ['surprise']"),
    ("dataclass-field-type", _set("extras/convlike/fields/deepest_conv_layer", "abc"), "'deepest_conv_layer'"),
    ("foreign-class", _set("extras/convlike/$dataclass", "os:system"), "at extras.convlike"),
    ("parent-path", _set("files/stats", "../other/stats.safetensors"), "plain file name inside the folder"),
    ("absolute-path", _set("files/heads", "/etc/passwd"), "plain file name inside the folder"),
    ("grid-mismatch", _set("stats/0/geometry/grid", [5, 5]), "do not fit its (5, 5) grid"),
    ("n-images-zero", _set("stats/0/n_images", 0), "n_images"),
    ("missing-field", _set("stats/0/fields", ["attn_sum"]), "at stats.0.fields"),
    ("missing-row", _set("tables/heads/missing/head", [10 ** 6]), "rows it does not have"),
    ("layer-twice", lambda d: d["stats"].append(copy.deepcopy(d["stats"][0])), "listed twice"),
    ("string-array-dtype", lambda d: _first_tag(d, "$strarray").__setitem__("dtype", "<U999999999"),
     "NumPy text type"),
    ("meta-not-object", _set("meta", "abc"), "at meta"),
]


def _first_tag(doc, tag):
    stack = [doc]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            if tag in v:
                return v[tag]
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    raise AssertionError(f"no {tag} in the document")



@pytest.mark.parametrize("name, change, needle", CASES, ids=[c[0] for c in CASES])
def test_tampered_documents_give_one_clear_error(saved, tmp_path, name, change, needle):
    d = _edit(_copy(saved, tmp_path / "t"), change)
    with pytest.raises(ProbeError) as e:
        probe.load(d)
    assert needle in str(e.value) and "\n" not in str(e.value)
    line = one_error_line(runner.invoke(app, ["compare", str(saved), str(d), "--out", str(tmp_path / "cmp")]))
    assert needle.split("'")[0][:20] in line
    assert not (tmp_path / "cmp").exists()


@pytest.mark.parametrize("raw, needle", [
    ('{"format": 1, "kind": "probe.AnalysisResult", "meta": ' + "[" * 2000 + "]" * 2000 + "}", "nested more than"),
    ('{"format": 1, "kind": "probe.AnalysisResult", "meta": {"x": ' + "[" * 150 + "]" * 150 + "}}", "nested more than"),
    (None, "NaN, which is not standard JSON"),
    ("1e400", "beyond the range of a float"),
    ("\xff\xfe", "not readable JSON"),
])
def test_non_standard_or_deep_json_is_refused(saved, tmp_path, raw, needle):
    d = _copy(saved, tmp_path / "t")
    text = (d / RESULT_FILE).read_text()
    if raw is None:
        raw = text.replace('"n_images": 4', '"n_images": NaN', 1)
    elif raw == "1e400":
        raw = text.replace("8.0", "1e400", 1)  # the first pixels_per_token
    (d / RESULT_FILE).write_bytes(raw.encode("latin-1") if raw.startswith("\xff") else raw.encode())
    with pytest.raises(ProbeError, match=needle):
        probe.load(d)
    one_error_line(runner.invoke(app, ["compare", str(saved), str(d), "--out", str(tmp_path / "cmp")]))


def test_statistics_of_the_wrong_shape_or_type(saved, tmp_path):
    for i, (key, bad) in enumerate([("attn_sum", lambda t: t[:, :2]), ("boot_sum", lambda t: t[..., :3]),
                                    ("feat_sum", lambda t: t.to(torch.complex64)),
                                    ("boot_weight", lambda t: t.to(torch.int64))]):
        d = _copy(saved, tmp_path / f"s{i}")
        import gzip

        from safetensors.torch import load as st_load, save as st_save

        tensors = st_load(gzip.decompress((d / STATS_FILE).read_bytes()))  # format 2: gzip-compressed
        tensors[f"layer0.{key}"] = bad(tensors[f"layer0.{key}"]).contiguous()
        (d / STATS_FILE).write_bytes(gzip.compress(st_save(tensors)))
        with pytest.raises(ProbeError, match=f"layer 0 statistics do not fit.*{key}"):
            probe.load(d)
        line = one_error_line(runner.invoke(app, ["compare", str(saved), str(d), "--out", str(tmp_path / "cmp")]))
        assert key in line


def test_only_regular_files_inside_the_folder_are_read(saved, tmp_path):
    other = _copy(saved, tmp_path / "other")
    d = _copy(saved, tmp_path / "t")
    (d / STATS_FILE).unlink()
    (d / STATS_FILE).symlink_to(other / STATS_FILE)  # a link escaping the folder
    with pytest.raises(ProbeError, match="is a symbolic link"):
        probe.load(d)
    d2 = _copy(saved, tmp_path / "t2")
    (d2 / "heads.csv").unlink()
    (d2 / "heads.csv").mkdir()
    with pytest.raises(ProbeError, match="not a regular file"):
        probe.load(d2)
    import os

    d3 = _copy(saved, tmp_path / "t3")
    (d3 / "heads.csv").unlink()
    os.mkfifo(d3 / "heads.csv")  # opening must not block
    with pytest.raises(ProbeError, match="not a regular file"):
        probe.load(d3)
    # a link to the folder itself loads (only links inside are refused)
    (tmp_path / "latest").symlink_to(saved)
    assert probe.load(tmp_path / "latest").meta["seed"] == 0


def test_analyze_out_onto_a_folder_with_a_tampered_marker_is_refused(saved, tmp_path):
    d = _copy(saved, tmp_path / "t")
    (d / ".probe-output.json").write_text('{"files": ' + "[" * 5000 + "]" * 5000 + "}")
    line = one_error_line(runner.invoke(app, ["analyze", "--out", str(d), "--attribution", "none"]))
    assert "did not write" in line
    assert sorted(p.name for p in d.iterdir()) == sorted(p.name for p in saved.iterdir())


# ---- property-based fuzz of the reader ------------------------------------------------------

_KEYS = st.sampled_from(["$float", "$tuple", "$int_keys", "$dict", "$tensor", "$ndarray", "$strarray",
                         "$objarray", "$frame", "$dataclass", "$path", "fields", "dtype", "shape", "values",
                         "columns", "index", "range", "name", "data", "layer", "grid", "0", "t0"]) | st.text(max_size=4)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-10 ** 20, 10 ** 20) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6) | st.sampled_from(["nan", "inf", "float64", "complex128", "<U4", "object", "t0",
                                               "probe.geometry:TokenGeometry", "heads.csv", "../x", "/etc/passwd"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_KEYS, inner, max_size=3),
    max_leaves=8)


@st.composite
def _mutated(draw, doc):
    """``doc`` with 1-3 of its values replaced by arbitrary JSON, or deleted."""
    doc = copy.deepcopy(doc)
    for _ in range(draw(st.integers(1, 3))):
        parent, key = None, None
        node = doc
        while isinstance(node, (dict, list)) and node and draw(st.integers(0, 3)) > 0:
            keys = list(node) if isinstance(node, dict) else list(range(len(node)))
            parent, key = node, draw(st.sampled_from(keys))
            node = node[key]
        if parent is None:
            continue
        if isinstance(parent, dict) and draw(st.booleans()):
            del parent[key]
        else:
            parent[key] = draw(_JSON)
    return doc


def _load_or_probe_error(folder: Path) -> None:
    try:
        r = probe.load(folder)
    except ProbeError as e:
        assert "\n" not in str(e)
        return
    assert isinstance(r, probe.AnalysisResult)


@pytest.fixture(scope="module")
def base_doc(saved):
    return json.loads((saved / RESULT_FILE).read_text())


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_documents_load_or_raise_probe_error(saved, base_doc, data):
    doc = data.draw(_mutated(base_doc))
    with tempfile.TemporaryDirectory() as tmp:
        d = _copy(saved, Path(tmp) / "f")
        (d / RESULT_FILE).write_text(json.dumps(doc))
        _load_or_probe_error(d)


_FILES = ["result.json", "heads.csv", "layers.csv", STATS_FILE, "extras.safetensors"]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(changes=st.dictionaries(st.sampled_from(_FILES), st.one_of(
    st.just("delete"), st.just("empty"), st.just("dir"), st.integers(0, 4000),  # truncate at
    st.binary(max_size=64), st.tuples(st.integers(0, 4000), st.binary(min_size=1, max_size=4))), max_size=3))
def test_fuzz_file_sets_load_or_raise_probe_error(saved, changes):
    with tempfile.TemporaryDirectory() as tmp:
        d = _copy(saved, Path(tmp) / "f")
        for name, how in changes.items():
            p = d / name
            raw = p.read_bytes() if p.exists() else b""
            if p.exists():
                p.unlink()
            if how == "delete":
                continue
            if how == "dir":
                p.mkdir()
            elif how == "empty":
                p.write_bytes(b"")
            elif isinstance(how, int):
                p.write_bytes(raw[:how])
            elif isinstance(how, tuple):  # overwrite a few bytes in the middle
                at = min(how[0], len(raw))
                p.write_bytes(raw[:at] + how[1] + raw[at + len(how[1]):])
            else:
                p.write_bytes(how)
        _load_or_probe_error(d)
