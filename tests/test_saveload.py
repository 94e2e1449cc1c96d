"""Saved results (probe.saved): AnalysisResult.save / write_report -> probe.load round trip, the
format's version check, damaged and foreign folders, and AnalysisResult.rerun without the model."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import probe
from probe.analyses.convlike import ConvLikeConfig, convlike_test
from probe.errors import ProbeError
from probe.saved import FORMAT, RESULT_FILE, STATS_FILE

from conftest import tiny_vit

SMALL = {"input_size": (3, 32, 32)}
STAT_FIELDS = ("attn_sum", "feat_sum", "feat_sumsq", "boot_sum", "boot_weight")


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def analysed():
    """A full run of a tiny random ViT: fits, conv test with null (a) on every layer, attribution."""
    torch.manual_seed(0)
    return probe.analyze(tiny_vit(), _images(6), data_overrides=SMALL, n_bootstrap=20, null_seeds=2,
                         null_images=2, null_layers="all", attribution="ig", attribution_images=2, ig_steps=2)


@pytest.fixture(scope="module")
def saved(analysed, tmp_path_factory):
    out = tmp_path_factory.mktemp("saved") / "run"
    np.random.seed(0)  # the per-head strip plots jitter with NumPy's global generator
    analysed.write_report(out)
    return out


def _assert_same_convlike(a, b):
    pd.testing.assert_frame_equal(a.layers, b.layers, check_exact=True)
    pd.testing.assert_frame_equal(a.heads, b.heads, check_exact=True)
    assert a.config == b.config and a.deepest_conv_layer == b.deepest_conv_layer
    for name in ("null_scores", "random_init_scores"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
    assert a.replicates.keys() == b.replicates.keys()
    for k in a.replicates:
        assert all(np.array_equal(a.replicates[k][f], b.replicates[k][f]) for f in a.replicates[k])


def test_round_trip_tables_statistics_metadata_extras(analysed, saved):
    loaded = probe.load(saved)
    pd.testing.assert_frame_equal(analysed.heads, loaded.heads, check_exact=True)
    pd.testing.assert_frame_equal(analysed.layers, loaded.layers, check_exact=True)
    assert loaded.geometry == analysed.geometry
    assert list(loaded.stats) == list(analysed.stats)
    for layer, st in analysed.stats.items():
        got = loaded.stats[layer]
        assert got.n_images == st.n_images and got.geometry == st.geometry
        for f in STAT_FIELDS:
            a, b = getattr(st, f), getattr(got, f)
            assert a.dtype == b.dtype == torch.float64 and torch.equal(a, b), f
    assert loaded.meta == analysed.meta
    assert loaded.meta["layer_names"].keys() == analysed.meta["layer_names"].keys()  # int keys kept
    assert set(loaded.extras) == set(analysed.extras)
    _assert_same_convlike(analysed.extras["convlike"], loaded.extras["convlike"])
    for layer, fit in analysed.extras["quadratic"].items():
        other = loaded.extras["quadratic"][layer]
        for f in dataclasses.fields(fit):
            x, y = getattr(fit, f.name), getattr(other, f.name)
            assert (np.array_equal(x, y, equal_nan=x.dtype.kind == "f") if isinstance(x, np.ndarray) else x == y), f.name
    att_a, att_b = analysed.extras["attribution"], loaded.extras["attribution"]
    for m, check in att_a["checks"].items():
        c2 = att_b["checks"][m]
        assert c2.top_heads == check.top_heads and np.array_equal(c2.random_drops, check.random_drops)
    assert att_b["info"] == att_a["info"]


def test_loaded_result_rerenders_the_same_report(saved, tmp_path):
    loaded = probe.load(saved)
    np.random.seed(0)
    loaded.write_report(tmp_path / "again")
    first = (saved / "report.html").read_text()
    again = (tmp_path / "again" / "report.html").read_text()
    assert again == first
    # and the re-written folder is the same saved result, file by file (the safetensors header's
    # key order is not fixed: the statistics are compared as tensors above)
    for name in ("heads.csv", "layers.csv", RESULT_FILE):
        assert (tmp_path / "again" / name).read_bytes() == (saved / name).read_bytes(), name


def test_folder_is_readable_without_probe(saved):
    """The format is plain files: standard JSON (no NaN literals), CSV tables, gzip-compressed
    safetensors."""
    import gzip

    from safetensors.torch import load

    doc = json.loads((saved / RESULT_FILE).read_text(), parse_constant=lambda c: pytest.fail(f"non-standard {c}"))
    assert doc["format"] == FORMAT and doc["kind"] == "probe.AnalysisResult"
    heads = pd.read_csv(saved / "heads.csv")
    assert len(heads) == 9 and {"layer", "head", "mean_distance_px"} <= set(heads.columns)
    t = load(gzip.decompress((saved / STATS_FILE).read_bytes()))
    assert t["layer0.attn_sum"].shape == (3, 16, 16)  # 3 heads, 4x4 grid
    marker = json.loads((saved / ".probe-output.json").read_text())
    assert {RESULT_FILE, STATS_FILE, "report.html", "heads.csv"} <= set(marker["files"])


def test_odd_values_round_trip(tmp_path):
    """Table and extras values the CSV/JSON encodings must not bend: NaN in text columns, the
    strings 'NA' / 'nan' / '', ±inf, -0.0, subnormals, bools, int keys, tuples, '$' keys."""
    g = probe.TokenGeometry(1, (2, 2), (8.0, 8.0))
    from probe.analyses.reducers import LayerStats

    gen = torch.Generator().manual_seed(3)
    st = LayerStats(0, g, 5, torch.rand(2, 4, 4, dtype=torch.float64, generator=gen),
                    torch.rand(2, 9, dtype=torch.float64, generator=gen), torch.rand(2, 9, dtype=torch.float64, generator=gen),
                    torch.rand(4, 2, 9, dtype=torch.float64, generator=gen), torch.rand(4, dtype=torch.float64, generator=gen))
    heads = pd.DataFrame({
        "layer": [0, 0, 0, 0, 0, 0], "head": [0, 1, 2, 3, 4, 5],
        "x": [1 / 3, np.nan, np.inf, -np.inf, 5e-324, -0.0],
        "s": pd.array(["NA", "", "nan", None, "None", "ok"], dtype="str"),
        "o": pd.Series([None, "a", 3, 2.5, True, "x"], dtype=object),
        "b": [True, False, True, False, True, False],
    })
    layers = pd.DataFrame({"layer": [0], "v": [np.float32(0.1)]}).astype({"v": "float32"})
    extras = {"misc": {"t": (1, 2.5, "x"), 3: np.array([np.nan, 1.0]), "$k": [np.inf, -0.0],
                       "arr": np.array(["ok", "non_local"]), "u8": np.arange(6, dtype=np.uint8).reshape(2, 3),
                       "frame": heads.set_index("head")}}
    r = probe.AnalysisResult(heads=heads, layers=layers, stats={0: st}, geometry=g,
                             meta={"a": {1: "one"}, "nan": float("nan"), "when": "now"}, extras=extras)
    r.save(tmp_path / "odd")
    back = probe.load(tmp_path / "odd")
    pd.testing.assert_frame_equal(back.heads, heads, check_exact=True)
    pd.testing.assert_frame_equal(back.layers, layers, check_exact=True)
    m = back.extras["misc"]
    assert m["t"] == (1, 2.5, "x") and np.array_equal(m[3], extras["misc"][3], equal_nan=True)
    assert m["$k"][0] == np.inf and np.signbit(m["$k"][1])
    assert m["arr"].dtype == extras["misc"]["arr"].dtype and list(m["arr"]) == ["ok", "non_local"]
    assert m["u8"].dtype == np.uint8 and np.array_equal(m["u8"], extras["misc"]["u8"])
    pd.testing.assert_frame_equal(m["frame"], extras["misc"]["frame"], check_exact=True)
    assert back.meta["a"] == {1: "one"} and np.isnan(back.meta["nan"])
    assert np.signbit(back.heads["x"].iloc[5])
    for f in STAT_FIELDS:
        assert torch.equal(getattr(back.stats[0], f), getattr(st, f))


def test_unstorable_extras_are_skipped_with_a_warning_and_never_pickled(tmp_path, analysed):
    r = dataclasses.replace(analysed, extras={**analysed.extras, "custom": object()})
    with pytest.warns(UserWarning, match=r"extras\['custom'\] is not stored"):
        r.save(tmp_path / "s")
    doc = json.loads((tmp_path / "s" / RESULT_FILE).read_text())
    assert doc["extras_skipped"] == ["custom"]
    assert "custom" not in probe.load(tmp_path / "s").extras
    bad = dataclasses.replace(analysed, meta={**analysed.meta, "obj": object()})
    with pytest.raises(ProbeError, match="metadata holds"):
        bad.save(tmp_path / "t")


def _copy(saved, tmp_path):
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(saved, dst)
    return dst


@pytest.mark.parametrize("fmt, pattern", [
    (FORMAT + 1, rf"format {FORMAT + 1} .*reads format 1, 2: upgrade probe"),
    (0, r"format 0 .*probe version that wrote it"),
    ("1", r"format '1'"),
])
def test_other_format_versions_fail_clearly(saved, tmp_path, fmt, pattern):
    d = _copy(saved, tmp_path)
    doc = json.loads((d / RESULT_FILE).read_text())
    doc["format"] = fmt
    (d / RESULT_FILE).write_text(json.dumps(doc))
    with pytest.raises(ProbeError, match=pattern):
        probe.load(d)


def test_missing_and_foreign_folders_fail_clearly(saved, tmp_path):
    with pytest.raises(ProbeError, match="does not exist"):
        probe.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ProbeError, match="holds no result.json.*not a saved probe result"):
        probe.load(tmp_path / "empty")
    old = tmp_path / "old-report"  # a report folder of a probe from before saved results
    old.mkdir()
    (old / "heads.csv").write_text("layer,head\n0,0\n")
    with pytest.raises(ProbeError, match="before saved results"):
        probe.load(old)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / RESULT_FILE).write_text('{"format": 1}')
    with pytest.raises(ProbeError, match="not a probe result file"):
        probe.load(tmp_path / "foreign")
    d = _copy(saved, tmp_path)
    (d / STATS_FILE).unlink()
    with pytest.raises(ProbeError, match="lacks stats.safetensors"):
        probe.load(d)
    d2 = tmp_path / "damaged"
    import shutil

    shutil.copytree(saved, d2)
    (d2 / STATS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(ProbeError, match="damaged"):
        probe.load(d2)
    d3 = tmp_path / "edited"
    shutil.copytree(saved, d3)
    (d3 / "heads.csv").write_text("layer,head\n0,0\n")
    with pytest.raises(ProbeError, match="does not match result.json"):
        probe.load(d3)
    with pytest.raises(ProbeError, match="folder path"):
        probe.load(3)


def test_rerun_with_the_saved_null_reproduces_the_run(analysed, saved):
    """Fits and conv test re-run from the saved statistics alone (no model) equal the original
    run when null (a)'s saved scores are applied (the test's draws are seeded by its config)."""
    loaded = probe.load(saved)
    again = loaded.rerun(random_init_scores=loaded.extras["convlike"].random_init_scores)
    pd.testing.assert_frame_equal(again.heads[list(analysed.heads.columns)], analysed.heads, check_exact=True)
    pd.testing.assert_frame_equal(again.layers[list(analysed.layers.columns)], analysed.layers, check_exact=True)
    _assert_same_convlike(again.extras["convlike"], analysed.extras["convlike"])
    for k in ("conv_null_status", "conv_null_layers", "conv_null_seeds", "conv_null_images"):
        assert again.meta[k] == analysed.meta[k], k
    assert loaded.heads.equals(probe.load(saved).heads)  # the loaded result itself is unchanged


def test_rerun_with_other_settings_says_null_a_needs_the_model(saved, tmp_path):
    loaded = probe.load(saved)
    cfg = ConvLikeConfig(r_local=3.0, n_null=199, seed=5)
    again = loaded.rerun(conv_config=cfg, anisotropic=True)
    assert again.meta["conv_null_status"] == "needs the model" and again.meta["rerun"]["anisotropic"]
    # an independent path: the conv test of the re-fitted heads, without null (a)
    from probe.steps import layer_fits

    grids = {l: tuple(st.geometry.grid) for l, st in again.stats.items()}
    direct = convlike_test(layer_fits(again.heads, grids), config=cfg)
    pd.testing.assert_frame_equal(again.extras["convlike"].layers, direct.layers, check_exact=True)
    assert again.extras["convlike"].random_init_scores == {}
    assert {"aniso_delta_row", "importance_ig"} <= set(again.heads.columns)
    assert np.array_equal(again.heads["importance_ig"], loaded.heads["importance_ig"])
    np.random.seed(0)
    again.write_report(tmp_path / "rerun")
    text = (tmp_path / "rerun" / "report.html").read_text()
    assert re.search(r"re-run on saved\s+statistics", text) and "needs forward passes" in text
    assert probe.load(tmp_path / "rerun").meta["rerun"]["conv_config"]["r_local"] == 3.0


def test_cli_output_folder_loads(tmp_path):
    from typer.testing import CliRunner

    from probe.cli import app

    for i, im in enumerate(_images(3)):
        im.save(tmp_path / f"im{i}.png")
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["analyze", "--model", "vit_tiny", "--random-init", "--layers", "0",
                                   "--images", str(tmp_path), "--no-conv-test", "--attribution", "none",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    loaded = probe.load(out)
    pd.testing.assert_frame_equal(loaded.heads, pd.read_csv(out / "heads.csv"), check_exact=True)
    assert loaded.meta["command"].startswith("probe ") and loaded.meta["num_images"] == 3  # sys.argv of pytest here
    assert loaded.stats[0].n_images == 3


def test_format_1_folders_with_uncompressed_statistics_still_load(saved, tmp_path):
    """Format 1 wrote ``stats.safetensors`` uncompressed; format 2 gzips it: both load bit-equal."""
    import gzip

    d = _copy(saved, tmp_path)
    doc = json.loads((d / RESULT_FILE).read_text())
    (d / "stats.safetensors").write_bytes(gzip.decompress((d / STATS_FILE).read_bytes()))
    (d / STATS_FILE).unlink()
    doc["format"], doc["files"]["stats"] = 1, "stats.safetensors"
    (d / RESULT_FILE).write_text(json.dumps(doc))
    old, new = probe.load(d), probe.load(saved)
    for layer in new.stats:
        for field in ("attn_sum", "feat_sum", "feat_sumsq", "boot_sum", "boot_weight"):
            assert torch.equal(getattr(old.stats[layer], field), getattr(new.stats[layer], field))
