"""Findings that match the data (probe.report.findings, heads_table, comparison), from planted
tables: the depth trend is the rank correlation over all layers (a non-monotone profile is not
summarised by its ends), standard errors that are 0 or float noise read "deterministic", the
comparison's median r90 leaves out heads without a centre, and tables scroll sideways."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr

from probe.comparison import has_centre
from probe.report.findings import depth_trend, findings
from probe.report.heads_table import DETERMINISTIC, heads_table_html, mark_deterministic, negligible_se
from probe.report.plots_quadratic import quadratic_table
from probe.report.render import table_html


def _layers(values) -> pd.DataFrame:
    n = len(values)
    return pd.DataFrame({"layer": range(n), "mean_distance_px": values, "uniform_distance_px": [20.0] * n,
                         "min_distance_px": values, "max_distance_px": values})


def test_a_non_monotone_profile_is_not_called_a_trend():
    v = [5.5, 8.9, 4.7, 6.0, 7.4, 7.3]  # the embedded model's profile: first < last, no trend
    text = depth_trend(_layers(v))
    rho = spearmanr(range(6), v).statistic
    assert f"ρ = {rho:.2f}" in text and "no monotone trend" in text and "grows" not in text
    assert "lowest 4.7 px (layer 2)" in text and "highest 8.9 px (layer 1)" in text
    assert any("no monotone trend" in f for f in findings(pd.DataFrame(), _layers(v), {}, {}))


@pytest.mark.parametrize("values, words", [
    ([1, 2, 3, 4, 5], "grows at every layer"),
    ([5, 4, 3, 2, 1], "shrinks at every layer"),
    ([1, 2, 3, 5, 4, 6], "grows steadily"),
    ([1, 3, 2, 5, 4, 4.5], "tends to grow with depth, not monotonically"),
    ([4, 4, 4], "the same at every analysed layer"),
])
def test_depth_trend_words_follow_the_rank_correlation(values, words):
    assert words in depth_trend(_layers(values))
    assert depth_trend(_layers(values[:2])) == ""  # two layers: no trend stated


def test_zero_or_noise_standard_errors_read_deterministic():
    assert negligible_se(-1.05, 6.1e-14) and negligible_se(3.0, 0.0) and negligible_se(0.0, 1e-15)
    assert not negligible_se(-1.05, 0.01) and not negligible_se(1.0, float("nan"))
    heads = pd.DataFrame({"layer": [0, 0], "head": [0, 1], "delta_row": [-1.05, 0.5], "delta_row_se": [6.1e-14, 0.02],
                          "delta_col": [0.0, 1.0], "delta_col_se": [0.0, 0.03], "alpha": [2.0, 1.0],
                          "alpha_se": [0.0, 0.1], "quad_status": ["ok", "ok"]})
    html = heads_table_html(heads)
    cells = re.findall(r"<td data-value='[^']*'>([^<]*)</td>", html)
    assert cells.count("deterministic") == 3  # head 0's three SEs; head 1's are shown
    assert "0.02" in cells and not any("10⁻" in c or "e-1" in c for c in cells)  # shown text; data-value keeps the raw number
    shown = mark_deterministic(heads[["delta_row", "delta_row_se", "alpha", "alpha_se"]])
    assert shown.delta_row_se.tolist() == [DETERMINISTIC, 0.02] and shown.alpha_se.tolist() == [DETERMINISTIC, 0.1]
    assert heads.delta_row_se.tolist() == [6.1e-14, 0.02]  # the frame itself is unchanged
    q = quadratic_table(heads.assign(sigma_patches=1.0, r50_patches=1.0, r90_patches=2.0, quad_ll_gain_nats=0.1,
                                     quad_kl_explained=0.5))
    assert q.loc[0, "Δ row"] == "-1.05" and q.loc[1, "Δ row"] == "0.5 ± 0.02"


def test_the_median_r90_leaves_out_heads_without_a_centre():
    h = pd.DataFrame({"quad_status": ["ok", "ok", "non_local", "ok"], "delta_row": [0.5, -53.4, 0.0, 13.0],
                      "delta_col": [1.0, 96.1, 0.0, -13.0]})
    assert has_centre(h, (14, 14)).tolist() == [True, False, False, True]
    assert has_centre(h[["quad_status"]], (14, 14)).tolist() == [True, True, False, True]


def test_tables_scroll_sideways_inside_the_page():
    wide = pd.DataFrame({f"a rather long column name {i}": [1.0] for i in range(30)})
    html = table_html(wide)
    assert html.startswith("<div class='scroll-x'>") and html.endswith("</div>")
    from importlib.resources import files

    for template in ("report.html.j2", "compare.html.j2"):
        css = (files("probe.report") / "templates" / template).read_text()
        assert re.search(r"\.scroll-x \{ overflow-x: auto;", css)
