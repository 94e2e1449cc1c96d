"""Tests of the importance-geometry correlation (probe.analyses.function_geometry)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from probe.analyses.function_geometry import (
    importance_geometry_correlation,
    layer_groups,
    reading,
    spearman_ci,
)
from probe.errors import ProbeError


def test_fisher_interval_matches_published_example():
    # Worked example of ci.spear in Bonett's statpsych R package (Bonett & Wright 2000):
    # estimate 0.8699639, 95% CI 0.5840951 to 0.9638297.
    y = [21, 4, 9, 12, 35, 18, 10, 22, 24, 1, 6, 8, 13, 16, 19]
    x = [67, 28, 30, 28, 52, 40, 25, 37, 44, 10, 14, 20, 28, 40, 51]
    rho, lo, hi = spearman_ci(x, y, ci="fisher")
    assert rho == pytest.approx(0.8699639, abs=1e-7)
    assert lo == pytest.approx(0.5840951, abs=1e-6)
    assert hi == pytest.approx(0.9638297, abs=1e-6)


@pytest.mark.parametrize("ci,sims", [("fisher", 1000), ("bootstrap", 200)])
def test_interval_covers_the_population_spearman_rho(ci, sims):
    # Bivariate normal with Pearson r = 0.5: population Spearman rho = (6/pi) asin(r/2)
    # (Pearson 1907). 36 heads as in DeiT-Tiny.
    r, n = 0.5, 36
    rho_pop = 6 / math.pi * math.asin(r / 2)
    rng = np.random.default_rng(0)
    cov = [[1, r], [r, 1]]
    hits = 0
    for i in range(sims):
        x, y = rng.multivariate_normal([0, 0], cov, size=n).T
        _, lo, hi = spearman_ci(x, y, ci=ci, n_resamples=500, seed=i)
        hits += lo <= rho_pop <= hi
    cover = hits / sims
    # Nominal 0.95; the binomial sd is 0.007 (1000 sims) / 0.015 (200 sims).
    assert 0.90 <= cover <= 0.99, cover


def test_rho_matches_pearson_of_ranks_with_ties():
    x = [1, 2, 2, 3, 5, 5, 5, 8, 9, 1]
    y = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
    rho, _, _ = spearman_ci(x, y)
    rx, ry = stats.rankdata(x), stats.rankdata(y)
    assert rho == pytest.approx(np.corrcoef(rx, ry)[0, 1], abs=1e-12)


def test_degenerate_inputs_give_nan_not_errors():
    assert all(math.isnan(v) for v in spearman_ci([1, 1, 1, 1, 1], [1, 2, 3, 4, 5]))
    rho, lo, hi = spearman_ci([1, 2, 3], [1, 3, 2])
    assert rho == pytest.approx(0.5) and math.isnan(lo) and math.isnan(hi)
    rho, lo, hi = spearman_ci([1, 2, 3, 4, 5], [2, 4, 6, 8, 10])
    assert rho == pytest.approx(1.0) and hi == pytest.approx(1.0) and lo > 0.99
    with pytest.raises(ProbeError, match="confidence-interval"):
        spearman_ci([1, 2], [1, 2], ci="jackknife")
    with pytest.raises(ProbeError, match="equal length"):
        spearman_ci([1, 2, 3], [1, 2])


def test_layer_groups_are_contiguous_thirds():
    g = layer_groups(range(12))
    assert g == {"early": [0, 1, 2, 3], "middle": [4, 5, 6, 7], "late": [8, 9, 10, 11], "all": list(range(12))}
    assert layer_groups([7, 2, 2]) == {"early": [2], "middle": [7], "all": [2, 7]}


def planted_heads(seed: int = 0) -> pd.DataFrame:
    """12 layers x 3 heads; importance rises with distance early, falls late, is noise middle."""
    rng = np.random.default_rng(seed)
    layer = np.repeat(np.arange(12), 3)
    dist = rng.uniform(10, 100, size=36)
    imp = np.where(layer < 4, dist / 50, np.where(layer >= 8, -dist / 50, rng.normal(size=36)))
    return pd.DataFrame(
        {
            "layer": layer,
            "head": np.tile(np.arange(3), 12),
            "mean_distance_px": dist,
            "entropy_nats": rng.normal(size=36),
            "importance_ablation": imp,
        }
    )


def test_per_group_correlations_recover_the_planted_signs():
    heads = planted_heads()
    c = importance_geometry_correlation(heads).set_index(["geometry", "group"])
    assert set(c["importance"]) == {"importance_ablation"}
    d = c.loc["mean_distance_px"]
    assert d.loc["early", "rho"] == pytest.approx(1.0)
    assert d.loc["late", "rho"] == pytest.approx(-1.0)
    assert d.loc["early", "layers"] == "0-3" and d.loc["early", "n_heads"] == 12
    assert d.loc["middle", "ci_low"] < d.loc["middle", "rho"] < d.loc["middle", "ci_high"]
    # "all" pools the 36 heads: compare with scipy directly on the whole table.
    want = stats.spearmanr(heads["mean_distance_px"], heads["importance_ablation"]).statistic
    assert d.loc["all", "rho"] == pytest.approx(want)
    assert d.loc["all", "n_heads"] == 36
    # |importance| rises with distance in both the early and the late layers.
    a = importance_geometry_correlation(heads, absolute=True).set_index(["geometry", "group"])
    assert a.loc[("mean_distance_px", "late"), "rho"] == pytest.approx(1.0)


def test_boolean_conv_local_column_is_used_as_zero_one():
    heads = planted_heads()
    heads["conv_local"] = heads["importance_ablation"] > heads["importance_ablation"].median()
    c = importance_geometry_correlation(heads).set_index(["geometry", "group"])
    want = stats.spearmanr(heads["conv_local"].astype(float), heads["importance_ablation"]).statistic
    assert c.loc[("conv_local", "all"), "rho"] == pytest.approx(want)
    assert want > 0.8
    assert any("heads the conv test calls local tend to have more" in t for t in reading(c.reset_index()))


def test_nan_rows_are_dropped_and_missing_columns_raise():
    heads = planted_heads()
    heads.loc[:4, "importance_ablation"] = np.nan
    c = importance_geometry_correlation(heads, geometry=["mean_distance_px"])
    assert c.set_index("group").loc["all", "n_heads"] == 31
    with pytest.raises(ProbeError, match="lacks column"):
        importance_geometry_correlation(heads, geometry=["r90_empirical_patches"])
    with pytest.raises(ProbeError, match="lacks column"):
        importance_geometry_correlation(heads.drop(columns="importance_ablation"))


def test_reading_words_follow_the_intervals():
    heads = planted_heads()
    text = reading(importance_geometry_correlation(heads))
    joined = " ".join(text)
    # Entropy is pure noise: its sentence about all heads must not claim a relation.
    ent = [s for s in text if "entropy" in s]
    assert len(ent) >= 1 and ent[0].startswith("Across all heads, no clear evidence")
    assert text[0].startswith("Across all heads") and "distance" in text[0]
    # Early layers: strong positive; late: strong negative.
    early = [s for s in text if "early layers" in s and "attend farther" in s]
    late = [s for s in text if "late layers" in s and "attend farther" in s]
    assert len(early) == 1 and "tend to have more" in early[0] and "strong positive" in early[0]
    assert len(late) == 1 and "tend to have less" in late[0] and "strong negative" in late[0]
    assert "middle layers" not in joined
    assert text[-1].startswith("Caveat")
    assert reading(importance_geometry_correlation(heads).iloc[:0]) == []
