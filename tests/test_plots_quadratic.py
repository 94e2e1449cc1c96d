"""Report figure and table of the quadratic-encoding fits."""

from __future__ import annotations

import io
import math

import numpy as np
import pandas as pd
import pytest
from matplotlib.patches import Circle, Rectangle

from probe.analyses import quadratic as Q
from probe.errors import ProbeError
from probe.geometry import TokenGeometry
from probe.report.plots_quadratic import head_color, plot_quadratic_layer, quadratic_table

GEOM = TokenGeometry(1, (14, 14), (16, 16))


def _frame() -> pd.DataFrame:
    """Layer 2 with an ok head, a capped head, a uniform (non-local) head, a failed head."""
    p = GEOM.num_patches
    attn = Q.quadratic_attention([[0.5, -1.5], [0.0, 1.0], [0.0, 0.0]], [0.8, 400.0, 0.0], GEOM)
    attn = attn.numpy()
    attn[1] = (attn[1] == attn[1].max(-1, keepdims=True))
    attn[2] = 1.0 / p
    off = GEOM.offsets().numpy()
    feats = np.stack([off[..., 0], off[..., 1], off[..., 0] ** 2, off[..., 1] ** 2,
                      off[..., 0] * off[..., 1]], -1)
    phi = np.einsum("hqk,qkf->hf", attn, feats) / p
    frame = Q.fit_quadratic(phi, GEOM, mean_attn=attn, layer=2).to_frame()
    extra = frame.iloc[[0]].copy()
    extra["head"] = 3
    extra["delta_row"], extra["delta_col"] = -2.0, 3.0
    extra["quad_status"], extra["quad_converged"] = "not_converged", False
    return pd.concat([frame, extra], ignore_index=True)


def test_figure_draws_centres_circles_and_query():
    frame = _frame()
    assert list(frame["quad_status"]) == ["ok", "alpha_capped", "non_local", "not_converged"]
    fig = plot_quadratic_layer(frame, GEOM)
    ax = fig.axes[0]
    circles = [p for p in ax.patches if isinstance(p, Circle)]
    # two circles (50 %, 90 %) for each of the two local heads, centred on Δ, with the
    # continuous-Gaussian radii
    assert len(circles) == 4
    for h in (0, 1):
        row = frame.iloc[h]
        mine = [c for c in circles if np.allclose(c.get_edgecolor(), head_color(h))]
        assert sorted(c.radius for c in mine) == pytest.approx(
            [math.sqrt(math.log(2) / row["alpha"]), math.sqrt(math.log(10) / row["alpha"])])
        assert all(c.center == pytest.approx((row["delta_col"], row["delta_row"])) for c in mine)
        assert {c.get_linestyle() for c in mine} == {"-", ":"}
    # a dot at (Δ_col, Δ_row) for ok/capped heads, a cross for the failed one
    dots = {(round(x, 6), round(y, 6)) for ln in ax.lines if ln.get_marker() == "o"
            for x, y in zip(ln.get_xdata(), ln.get_ydata())}
    assert dots == {(round(frame.loc[h, "delta_col"], 6), round(frame.loc[h, "delta_row"], 6))
                    for h in (0, 1)}
    crosses = [ln for ln in ax.lines if ln.get_marker() == "x"]
    assert len(crosses) == 1 and (crosses[0].get_xdata()[0], crosses[0].get_ydata()[0]) == (3.0, -2.0)
    # the query patch is the unit square around δ = 0, rows grow downwards
    (query,) = [p for p in ax.patches if isinstance(p, Rectangle)]
    assert query.get_xy() == (-0.5, -0.5) and query.get_width() == 1 and query.get_height() == 1
    assert ax.get_ylim()[0] > ax.get_ylim()[1]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("head 2: non-local" in t for t in legend)
    assert any("head 1" in t and "cap" in t for t in legend)
    assert any("head 3: fit not converged" in t for t in legend)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    assert buf.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Layer 2" in ax.get_title()


def test_table_rows_formatting():
    frame = _frame()
    frame.loc[0, "delta_row_se"] = 0.0123
    table = quadratic_table(frame)
    assert list(table.columns) == ["head", "Δ row", "Δ col", "α", "σ", "r50", "r90", "LL gain",
                                   "KL explained", "status"]
    assert list(table["head"]) == [0, 1, 2, 3]
    assert table.loc[0, "Δ row"] == "0.5 ± 0.012"
    assert table.loc[0, "α"] == "0.8"
    assert table.loc[2, "Δ row"] == "—" and table.loc[2, "σ"] == "∞"
    assert table.loc[2, "status"] == "non local"
    assert table.loc[1, "status"] == "alpha capped"


def test_plot_input_errors():
    frame = _frame()
    with pytest.raises(ProbeError, match="lacks the quadratic-fit columns"):
        plot_quadratic_layer(frame.drop(columns=["alpha"]), GEOM)
    two = pd.concat([frame, frame.assign(layer=3)])
    with pytest.raises(ProbeError, match="select one"):
        plot_quadratic_layer(two, GEOM)
    with pytest.raises(ProbeError, match="DataFrame"):
        quadratic_table({"head": [0]})
