"""Tests of the attribution figures (probe.report.plots_attribution)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PathCollection

from probe.attribution import AblationCheck
from probe.errors import ProbeError
from probe.report.plots_attribution import ablation_check_plot, importance_scatter


def heads_table() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame(
        {
            "layer": np.repeat(np.arange(4), 3),
            "head": np.tile(np.arange(3), 4),
            "mean_distance_px": rng.uniform(10, 100, 12),
            "importance_ig": rng.normal(size=12),
            "importance_ig_se": rng.uniform(0.1, 0.2, 12),
            "importance_ablation": rng.normal(size=12),
        }
    )


def test_scatter_plots_every_head_at_its_values_coloured_by_layer(tmp_path):
    heads = heads_table()
    fig = importance_scatter(heads)
    axes = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(axes) == 2
    for ax, col in zip(axes, ["importance_ig", "importance_ablation"]):
        (pts,) = [c for c in ax.collections if isinstance(c, PathCollection)]
        np.testing.assert_allclose(pts.get_offsets(), heads[["mean_distance_px", col]].to_numpy())
        np.testing.assert_array_equal(pts.get_array(), heads["layer"].to_numpy())
        colours = pts.to_rgba(pts.get_array())
        by_layer = {
            layer: {tuple(np.round(colours[i], 6)) for i in np.flatnonzero(heads["layer"] == layer)}
            for layer in range(4)
        }
        assert all(len(s) == 1 for s in by_layer.values())  # one colour per layer
        assert len(set().union(*by_layer.values())) == 4  # distinct layers, distinct colours
        assert "attention distance (px)" in ax.get_xlabel()
    # Error bars only where an _se column exists.
    assert len(axes[0].collections) == 2 and len(axes[1].collections) == 1
    assert any(ax.get_ylabel() == "layer" for ax in fig.axes)
    fig.savefig(tmp_path / "scatter.png")
    assert (tmp_path / "scatter.png").stat().st_size > 0


def test_scatter_needs_its_columns():
    with pytest.raises(ProbeError, match="lacks"):
        importance_scatter(heads_table(), x="r90_empirical_patches")


def test_ablation_check_plot_shows_top_and_random_drops():
    c = AblationCheck(
        k=3, top_heads=[(0, 0), (1, 1), (2, 2)], target="t", logit=5.0, top_drop=2.0,
        random_drops=np.array([0.1, -0.2, 0.3]), top_agreement=0.5,
        random_agreement=np.array([1.0, 1.0, 0.9]), accuracy=None, top_accuracy=None,
        random_accuracy=None, random_heads=[[(0, 1)]] * 3,
    )
    fig = ablation_check_plot({"IG": c, "ablation": c})
    ax = fig.axes[0]
    dots = [col for col in ax.collections if isinstance(col, PathCollection)]
    assert len(dots) == 2
    np.testing.assert_allclose(dots[0].get_offsets()[:, 1], c.random_drops)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["IG", "ablation"]
    with pytest.raises(ProbeError):
        ablation_check_plot({})
