"""Exact fast paths of the fixed cost of an analysis (issue 7) against the slow computations
they replace: the lattice-matching null draws, the disk-mass bound, and the random-init null
scored from statistics with fits only where a head can be local."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from probe.analyses.convlike import ConvLikeConfig, _scores_from_masks, kernel_lattice
from probe.analyses.quadratic import max_disk_mass, offset_profile
from probe.errors import ProbeError
from probe.geometry import TokenGeometry

torch.set_num_threads(1)


def _scores_by_assignment(centres, masks, k, tol):
    """One linear_sum_assignment per draw (the definition of the score)."""
    lattice = kernel_lattice(k)
    n_target = min(centres.shape[1], lattice.shape[0])
    out = np.empty(centres.shape[0])
    for i in range(centres.shape[0]):
        d2 = ((centres[i][:, None, :] - lattice[None]) ** 2).sum(-1)
        sim = np.exp(-d2 / (2 * tol**2)) * masks[i][:, None]
        r, c = linear_sum_assignment(sim, maximize=True)
        out[i] = sim[r, c].sum()
    return np.minimum(out / n_target, 1.0)


@pytest.mark.parametrize("heads,k,p_local,tol", [(3, 3, 0.3, 0.25), (6, 3, 0.6, 0.25), (12, 3, 0.9, 0.25),
                                                 (16, 4, 0.7, 0.5), (1, 3, 1.0, 0.25), (4, 2, 0.5, 1.0)])
def test_null_scores_fast_path_equals_assignment(heads, k, p_local, tol):
    rng = np.random.default_rng(heads * 10 + k)
    n = 3000
    centres = rng.uniform(-k / 2, k / 2, (n, heads, 2))
    # a few heads exactly on lattice points and pairs on one point: ties for the best point
    centres[: n // 4, 0] = kernel_lattice(k)[rng.integers(0, k * k, n // 4)]
    if heads > 1:
        centres[: n // 8, 1] = centres[: n // 8, 0]
    masks = (rng.random((n, heads)) < p_local).astype(np.float64)
    fast = _scores_from_masks(centres, masks, k, tol)
    slow = _scores_by_assignment(centres, masks, k, tol)
    np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-12)


def _disk_mass(prof, rows, cols, centre, radius):
    dr, dc = np.meshgrid(np.arange(-(rows - 1), rows), np.arange(-(cols - 1), cols), indexing="ij")
    return prof[np.hypot(dr - centre[0], dc - centre[1]) <= radius].sum()


def test_max_disk_mass_bounds_every_centre():
    rng = np.random.default_rng(0)
    geo = TokenGeometry(1, (5, 7))
    P = 35
    # heads: peaked at random offsets, uniform, and a two-peak head
    logits = rng.normal(size=(3, P, P)) * np.array([6.0, 0.0, 3.0])[:, None, None]
    attn = torch.from_numpy(logits).softmax(-1)
    prof = offset_profile(attn, geo).numpy()
    for radius in (0.0, 0.7, 1.5, 2.0):
        bound = max_disk_mass(attn, geo, radius)
        centres = rng.uniform(-6, 8, (400, 2))  # inside and beyond the offset range
        centres[:50] = np.round(centres[:50])
        centres[50:100] = np.round(centres[50:100] * 2) / 2
        for h in range(3):
            best = max(_disk_mass(prof[h], 5, 7, c, radius) for c in centres)
            assert best <= bound[h] + 1e-12
            # the bound is not vacuous: it is the mass of a real (larger) disk
            assert bound[h] <= 1 + 1e-12
    # a head concentrated on one offset reaches bound 1 at radius 0
    one_hot = torch.zeros(1, P, P)
    for q in range(P):
        one_hot[0, q, q] = 1.0
    assert max_disk_mass(one_hot, geo, 0.0)[0] == pytest.approx(1.0)
    # a uniform head on a large grid holds little mass in any small disk
    big = TokenGeometry(0, (14, 14))
    uniform = torch.full((1, 196, 196), 1 / 196)
    assert max_disk_mass(uniform, big, 2.0)[0] < 0.2
    with pytest.raises(ProbeError, match="radius"):
        max_disk_mass(uniform, big, -1.0)


def test_stats_layer_scores_equal_fitting_every_head():
    """The random-init null scored from statistics (fits only where a head can be local) equals
    fitting every head and scoring the heads table, on a planted conv-like ViT (local layers:
    fitted) and a random-init ViT (no head can be local: skipped)."""
    from PIL import Image

    from probe.conv_equivalence import conv_equivalent_vit
    from probe.models import resolve_model
    from probe.pipeline import analyze
    from probe.steps import add_quadratic_fits, layer_scores, stats_layer_scores

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(2)]
    planted = resolve_model(conv_equivalent_vit(depth=4, conv_layers=2, embed_dim=24))
    random = resolve_model(planted.random_init(7))
    cfg = ConvLikeConfig()
    seen_fitted = seen_skipped = False
    for resolved in (planted, random):
        res = analyze(resolved, images, n_bootstrap=0, fits=False, conv_test=False, attribution="none")
        fast = stats_layer_scores(res.stats, cfg)
        add_quadratic_fits(res)
        slow = layer_scores(res.heads, cfg)
        assert fast.keys() == slow.keys()
        for layer in slow:
            assert fast[layer] == pytest.approx(slow[layer], abs=1e-12)
            st = res.stats[layer]
            can = max_disk_mass(st.mean_attn, st.geometry, cfg.r_local) >= 0.9 - 1e-9
            seen_fitted |= bool(can.any())
            seen_skipped |= not can.any()
    assert seen_fitted and seen_skipped  # both branches were exercised
    assert stats_layer_scores(analyze(planted, images, n_bootstrap=0, fits=False, conv_test=False,
                                      attribution="none").stats, cfg)[0] > 0.5


def test_with_random_init_equals_running_the_test_with_it():
    """Applying null (a) to a finished test redoes only its columns and the verdicts: the same
    tables as running the whole test with it, without drawing null (b) again."""
    import pandas as pd

    from probe.analyses.convlike import LayerFit, convlike_test

    rng = np.random.default_rng(3)
    lattice = kernel_lattice(3)
    fits = {}
    for layer in range(4):
        delta = lattice[rng.permutation(9)[:6]] + rng.normal(0, 0.05, (6, 2))
        r90 = np.where(np.arange(6) < 6 - layer, 1.0, 5.0)  # fewer local heads with depth
        fits[layer] = LayerFit(delta, r90=r90)
    cfg = ConvLikeConfig(n_null=499)
    plain = convlike_test(fits, config=cfg)
    assert plain.conv_like_layers  # some layer is a candidate for null (a) to veto
    for ri in ({0: [0.1, 0.2, 0.15], 1: [0.99, 1.0, 0.98]}, {l: [0.0, 0.1] for l in fits}, None):
        whole = convlike_test(fits, random_init=ri, config=cfg)
        applied = plain.with_random_init(ri)
        pd.testing.assert_frame_equal(applied.layers, whole.layers)
        pd.testing.assert_frame_equal(applied.heads, whole.heads)
        assert applied.deepest_conv_layer == whole.deepest_conv_layer
        assert applied.random_init_scores.keys() == whole.random_init_scores.keys()
    # layer 1 is vetoed by a random-init score above its own
    vetoed = plain.with_random_init({1: [1.0, 1.0]}).layers.set_index("layer")
    if plain.layers.set_index("layer").loc[1, "conv_verdict"] == "conv-like":
        assert vetoed.loc[1, "conv_verdict"] == "local but not grid"
    with pytest.raises(ProbeError, match="not analysed"):
        plain.with_random_init({9: [0.0]})
