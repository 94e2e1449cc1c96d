"""probe.compare / probe compare: relative depth, image-side units, bootstrap SEs, differences,
figures (their drawn data), ordering, output folder and bad inputs."""

from __future__ import annotations

import json
import math
import re
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import probe
from probe.analyses.reducers import FEATURES
from probe.errors import ProbeError

from conftest import tiny_vit

SMALL = {"input_size": (3, 32, 32)}
RUN = dict(data_overrides=SMALL, n_bootstrap=12, null_seeds=0, attribution="none")


def _images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(1)
    return [Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """Model a: 3 blocks on a 4x4 grid (8 px patches), all layers; model b: 4 blocks on an 8x8 grid
    (4 px patches), layers 1-3 only. Both on a 32x32 input, saved to folders 'a' and 'b'."""
    root = tmp_path_factory.mktemp("cmp")
    torch.manual_seed(0)
    a = probe.analyze(tiny_vit(), _images(5), **RUN)
    torch.manual_seed(1)
    b = probe.analyze(tiny_vit(patch_size=4, depth=4), _images(5), layers="1-3", **RUN)
    a.save(root / "a")
    b.save(root / "b")
    return root, a, b


def _boot_se(st, feature):
    """Independent NumPy path: SD over Poisson replicates of the head-mean replicate (replicates
    with all weights 0 have no mean: left out)."""
    i = FEATURES.index(feature)
    bs, bw = st.boot_sum.numpy(), st.boot_weight.numpy()
    ok = bw > 0
    return float(np.std([bs[r, :, i].mean() / bw[r] for r in np.flatnonzero(ok)], ddof=1))


def test_relative_depth_and_image_side_units(two):
    root, a, b = two
    c = probe.compare([root / "a", root / "b"])
    assert c.labels == ["a", "b"] and c.reference == "a"
    la = c.layers[c.layers.model == "a"]
    lb = c.layers[c.layers.model == "b"]
    # relative depth = layer / (L - 1) with L the model's attention layers, not the analysed ones
    assert la.relative_depth.tolist() == [0.0, 0.5, 1.0]
    assert lb.layer.tolist() == [1, 2, 3] and np.allclose(lb.relative_depth, [1 / 3, 2 / 3, 1.0], rtol=0, atol=1e-15)
    assert (c.layers.image_side_px == 32.0).all()  # 4 x 8 px and 8 x 4 px
    assert lb.grid.unique().tolist() == ["8x8"] and la.grid.unique().tolist() == ["4x4"]
    for label, r in (("a", a), ("b", b)):
        t = c.layers[c.layers.model == label].set_index("layer")
        np.testing.assert_allclose(t.mean_distance_px, r.layers.set_index("layer").mean_distance_px, rtol=1e-15)
        np.testing.assert_allclose(t.mean_distance_side, t.mean_distance_px / 32.0, rtol=1e-15)
        np.testing.assert_allclose(t.uniform_distance_side, r.layers.set_index("layer").uniform_distance_px / 32, rtol=1e-15)
        np.testing.assert_allclose(t.entropy_norm, t.entropy_nats / np.log(r.geometry.num_tokens), rtol=1e-14)
        for layer, st in r.stats.items():
            assert t.loc[layer, "mean_distance_px_se"] == pytest.approx(_boot_se(st, "mean_distance_px"), rel=1e-12)
            assert t.loc[layer, "entropy_nats_se"] == pytest.approx(_boot_se(st, "entropy_nats"), rel=1e-12)
            assert t.loc[layer, "mean_distance_side_se"] == pytest.approx(_boot_se(st, "mean_distance_px") / 32, rel=1e-12)
            h = r.heads[r.heads.layer == layer]
            assert t.loc[layer, "frac_local"] == pytest.approx(h.conv_local.mean())
            # median r90 over the heads with a centre: fitted (not non-local) and on the grid's offsets
            rows, cols = st.geometry.grid
            hc = h[(h.quad_status != "non_local") & (h.delta_row.abs() <= rows - 1) & (h.delta_col.abs() <= cols - 1)]
            r90 = hc.r90_empirical_patches.median()
            assert t.loc[layer, "r90_median_patches"] == pytest.approx(r90, nan_ok=True)
            px = math.sqrt(np.prod(st.geometry.pixels_per_token))
            assert t.loc[layer, "r90_median_side"] == pytest.approx(r90 * px / 32, nan_ok=True)
            assert t.loc[layer, "conv_verdict"] == r.layers.set_index("layer").loc[layer, "conv_verdict"]


def test_differences_pair_nearest_relative_depth_with_independent_se(two):
    root, _, _ = two
    c = probe.compare([root / "a", root / "b"])
    d = c.differences
    # b's layers at depth 1/3, 2/3, 1 pair with a's layers at 0.5 (nearest to both 1/3 and 2/3) and 1
    assert d.layer.tolist() == [1, 2, 3] and d.reference_layer.tolist() == [1, 1, 2]
    A = c.layers[c.layers.model == "a"].set_index("layer")
    B = c.layers[c.layers.model == "b"].set_index("layer")
    for _, row in d.iterrows():
        x, y = B.loc[row.layer], A.loc[row.reference_layer]
        for q in ("mean_distance_side", "mean_distance_px", "entropy_nats", "entropy_norm"):
            assert row[f"{q}_diff"] == x[q] - y[q]
            se = math.sqrt(x[f"{q}_se"] ** 2 + y[f"{q}_se"] ** 2)
            assert row[f"{q}_diff_se"] == pytest.approx(se, rel=1e-15)
            assert row[f"{q}_z"] == pytest.approx((x[q] - y[q]) / se, rel=1e-12)
        assert row.frac_local_diff == x.frac_local - y.frac_local
    # reversed order: the reference changes, the differences change sign for the pairs that match both ways
    r = probe.compare([root / "b", root / "a"]).differences
    assert r.reference.unique().tolist() == ["b"] and r.reference_layer.tolist() == [1, 1, 3]
    assert r.loc[r.layer == 2, "entropy_nats_diff"].item() == -d.loc[d.layer == 3, "entropy_nats_diff"].item()


def test_figures_draw_the_tables(two):
    from probe.report.compare import delta_panels_figure, depth_figure, locality_figure

    root, _, _ = two
    c = probe.compare([root / "a", root / "b"])
    fig = depth_figure(c.layers, c.heads, c.labels, "mean_distance_side", "y", "t", reference="uniform_distance_side")
    ax = fig.axes[0]
    for label in c.labels:
        t = c.layers[c.layers.model == label]
        (line,) = [l for l in ax.lines if l.get_label() == label]
        assert np.array_equal(line.get_xdata(), t.relative_depth.to_numpy())
        assert np.array_equal(line.get_ydata(), t.mean_distance_side.to_numpy())
        (uni,) = [l for l in ax.lines if l.get_label() == f"_uniform {label}"]
        assert np.array_equal(uni.get_ydata(), t.uniform_distance_side.to_numpy())
    loc = locality_figure(c.layers, c.labels)
    (fl,) = [l for l in loc.axes[0].lines if l.get_label() == "b"]
    assert np.array_equal(fl.get_ydata(), c.layers[c.layers.model == "b"].frac_local.to_numpy())
    panels = delta_panels_figure(c.heads, c.layers, c.labels, n_early=2)
    assert len([a for a in panels.axes if a.get_visible() and a.collections]) == 4  # 2 models x 2 early layers
    h = c.heads[(c.heads.model == "a") & (c.heads.layer == 0)]
    drawn = np.concatenate([coll.get_offsets() for ax in panels.axes for coll in ax.collections
                            if coll.get_label().startswith("a layer 0 ")])
    finite = h[np.isfinite(h.delta_row)]
    expect = np.stack([finite.delta_col, finite.delta_row], 1)
    assert sorted(map(tuple, drawn)) == sorted(map(tuple, expect))


def test_report_folder(two, tmp_path):
    root, _, _ = two
    c = probe.compare([root / "a", root / "b"])
    path = c.write_report(tmp_path / "cmp")
    assert path.name == "compare.html"
    html = path.read_text()
    assert html.count("src=\"data:image/png;base64,") >= 5  # distance, entropy, locality, conv, delta
    assert not re.search(r"(src|href)=\"https?:", html)  # self-contained
    assert "Differences to a" in html and "Conv verdicts side by side" in html
    back = pd.read_csv(tmp_path / "cmp" / "compare_layers.csv")
    np.testing.assert_array_equal(back.mean_distance_side, c.layers.mean_distance_side)
    marker = json.loads((tmp_path / "cmp" / ".probe-output.json").read_text())
    assert set(marker["files"]) == {"compare.html", "compare_layers.csv", "compare_differences.csv"}
    c.write_report(tmp_path / "cmp")  # an earlier comparison may be replaced
    with pytest.raises(ProbeError, match="compared result folder"):
        c.write_report(root / "a")


def test_ordering_by_name_and_by_metadata(two, tmp_path):
    root, a, b = two
    for name, step, res in (("ckpt10", 1000, a), ("ckpt2", 200, b), ("ckpt9", 900, a)):
        res.meta["step"] = step
        res.meta["weights"] = f"runs/x/step-{step}.safetensors"
        res.save(tmp_path / name)
    dirs = [tmp_path / n for n in ("ckpt10", "ckpt2", "ckpt9")]
    assert probe.compare(dirs).labels == ["ckpt10", "ckpt2", "ckpt9"]  # as given
    assert probe.compare(dirs, order="name").labels == ["ckpt2", "ckpt9", "ckpt10"]
    assert probe.compare(dirs, order="step").labels == ["ckpt2", "ckpt9", "ckpt10"]  # numbers: 200 < 900 < 1000
    assert probe.compare(dirs, order="weights").labels == ["ckpt2", "ckpt9", "ckpt10"]  # natural: step-200 < step-1000
    assert probe.compare(dirs, order="versions.probe").labels[0] in {"ckpt10", "ckpt2", "ckpt9"}
    with pytest.raises(ProbeError, match="no such metadata key"):
        probe.compare(dirs, order="epoch")


def test_in_memory_results_and_labels(two):
    _, a, b = two
    c = probe.compare([a, b])
    assert c.labels == ["VisionTransformer (1)", "VisionTransformer (2)"] and c.sources == ["in memory"] * 2
    assert probe.compare([a, b], labels=["vit", "small-patch"]).labels == ["vit", "small-patch"]
    with pytest.raises(ProbeError, match="labels must be distinct"):
        probe.compare([a, b], labels=["x", "x"])
    with pytest.raises(ProbeError, match="2 results; give one per result"):
        probe.compare([a, b], labels=["x"])


def test_bad_inputs(two, tmp_path):
    root, a, _ = two
    with pytest.raises(ProbeError, match="at least two results, got 1"):
        probe.compare([root / "a"])
    with pytest.raises(ProbeError, match="list of at least two"):
        probe.compare(str(root / "a"))
    with pytest.raises(ProbeError, match="does not exist"):
        probe.compare([root / "a", tmp_path / "missing"])
    (tmp_path / "plain").mkdir()
    with pytest.raises(ProbeError, match="not a saved probe result"):
        probe.compare([root / "a", tmp_path / "plain"])
    with pytest.raises(ProbeError, match="result folders or AnalysisResult"):
        probe.compare([a, 3])


def test_cli(two, tmp_path):
    from typer.testing import CliRunner

    from probe.cli import app

    root, _, _ = two
    run = CliRunner().invoke
    res = run(app, ["compare", str(root / "a"), str(root / "b"), "--out", str(tmp_path / "o"), "--order", "name"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "o" / "compare.html").is_file()
    for args, pattern in (([str(root / "a")], "at least two results"),
                          ([str(root / "a"), str(tmp_path / "nope")], "does not exist"),
                          ([str(root / "a"), str(root / "b"), "--order", "epoch"], "no such metadata key"),
                          ([str(root / "a"), str(root / "b"), "--out", str(root / "b")], "compared result folder")):
        res = run(app, ["compare", *args, "--out", str(tmp_path / "x")] if "--out" not in args else ["compare", *args])
        assert res.exit_code == 2, res.output
        lines = [l for l in res.output.splitlines() if l.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and re.search(pattern, lines[0]), res.output
    assert not (tmp_path / "x").exists()
    shutil.rmtree(tmp_path / "o")


def test_cli_labels_name_the_results_and_the_notebook_view_has_figures(two, tmp_path):
    from typer.testing import CliRunner

    from probe.cli import app

    root, _, _ = two
    run = CliRunner().invoke(app, ["compare", str(root / "a"), str(root / "a"), "--labels", "seed 0, seed 1",
                                   "--out", str(tmp_path / "cmp")])
    assert run.exit_code == 0, run.output
    back = pd.read_csv(tmp_path / "cmp" / "compare_layers.csv")
    assert list(dict.fromkeys(back.model)) == ["seed 0", "seed 1"]
    bad = CliRunner().invoke(app, ["compare", str(root / "a"), str(root / "b"), "--labels", "x,y,z",
                                   "--out", str(tmp_path / "cmp2")])
    assert bad.exit_code == 2 and "--labels 'x,y,z' must give 2" in " ".join(bad.output.split())
    assert not (tmp_path / "cmp2").exists()
    html = probe.compare([root / "a", root / "b"])._repr_html_()
    assert html.count("<img src='data:image/png;base64,") == 2 and "<table" in html
