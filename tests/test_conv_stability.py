"""Issue 4 on real input: DeiT-Tiny's per-layer conv-test numbers are stable when the image set
changes (two disjoint sets of ImageNet photos), within the reported uncertainty."""

from __future__ import annotations

import numpy as np
import pytest

import probe

from conftest import DEIT_WEIGHTS, IMAGENET, need


@pytest.mark.slow
def test_deit_tiny_conv_test_is_stable_across_image_sets():
    weights, folder = need(DEIT_WEIGHTS), need(IMAGENET)
    photos = sorted(folder.glob("*.JPEG"))
    rng = np.random.default_rng(7)
    order = rng.permutation(len(photos))
    sets = [[photos[i] for i in order[:32]], [photos[i] for i in order[32:64]]]
    runs = [probe.analyze("deit_tiny", s, weights=weights, attribution="none", null_seeds=2,
                          null_images=4) for s in sets]
    a, b = (r.layers.set_index("layer") for r in runs)
    assert list(a.index) == list(range(12))
    # the verdict of every layer is the same on both image sets
    assert (a.conv_verdict == b.conv_verdict).all(), (a.conv_verdict, b.conv_verdict)
    # scores agree within their reported uncertainty (4 combined standard errors, plus a
    # small floor for layers whose score is exactly 0 with SE 0)
    se = np.sqrt(a.conv_score_se.fillna(0) ** 2 + b.conv_score_se.fillna(0) ** 2)
    assert (np.abs(a.conv_score - b.conv_score) <= 4 * se + 0.05).all(), (a.conv_score, b.conv_score, se)
    # and so do the per-head centres of the local heads, within their bootstrap SEs
    ha, hb = (r.heads.set_index(["layer", "head"]) for r in runs)
    local = ha.conv_local & hb.conv_local
    assert local.any()
    for col in ("delta_row", "delta_col"):
        se = np.sqrt(ha[f"{col}_se"] ** 2 + hb[f"{col}_se"] ** 2)[local]
        assert (np.abs(ha[col] - hb[col])[local] <= 4 * se + 0.05).all()
