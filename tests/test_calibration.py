"""The calibrated conv test (issue 11) on the models of the README's verdict table: the shipped
attention-only model against an oracle computed from its own Δ and α, random-init copies, the
planted Theorem-1 ViT, and (slow, ../shared) DeiT-Tiny on two disjoint photo sets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import probe
from probe.analyses.convlike import ConvLikeConfig, default_kernel_size, distinct_taps
from probe.analyses.quadratic import empirical_mass_radius
from probe.conv_equivalence import conv_equivalent_vit
from probe.geometry import TokenGeometry

from conftest import DEIT_WEIGHTS, IMAGENET, need
from test_cordonnier import explicit_quadratic

CALIBRATIONS = ("taps", "lattice")


def _verdicts(res) -> list[str]:
    return res.layers.sort_values("layer").conv_verdict.tolist()


@pytest.mark.parametrize("calibration", CALIBRATIONS)
def test_planted_theorem1_vit_conv_layers_pass_uniform_layers_do_not(calibration):
    model = conv_equivalent_vit(depth=5, conv_layers=2)
    res = probe.analyze(model, torch.randn(4, 3, 64, 64), attribution="none", null_seeds=0,
                        conv_config=ConvLikeConfig(calibration=calibration))
    assert _verdicts(res) == ["conv-like"] * 2 + ["non-local"] * 3
    assert res.extras["convlike"].deepest_conv_layer == 1


@pytest.mark.parametrize("calibration", CALIBRATIONS)
def test_random_init_copies_of_the_shipped_architecture_never_pass(calibration):
    for seed in (1, 2, 3):
        res = probe.analyze(None, torch.randn(4, 3, 32, 32), random_init=True, seed=seed, attribution="none",
                            conv_config=ConvLikeConfig(calibration=calibration))
        assert "conv-like" not in _verdicts(res) and "borderline" not in _verdicts(res)


def test_shipped_model_taps_verdicts_match_an_oracle_from_its_own_parameters():
    """Expected verdicts from the checkpoint's Δ, α alone: the analytic attention of each head
    (explicit softmax over the 16x16 grid), its measured 90 % radius, distinct taps of the true
    centres; the model's heads are position-only, so the images do not matter."""
    model = probe.cordonnier.pretrained()
    cfg = ConvLikeConfig()
    geom = TokenGeometry(0, (16, 16), (2.0, 2.0))
    expected = []
    for blk in model.blocks:
        a = blk.attn
        delta, alpha = a.delta.double().numpy(), a.alpha.double().numpy()
        attn = explicit_quadratic(delta, alpha, 16, 16)
        r90 = empirical_mass_radius(attn, geom, delta, 0.9)
        local = r90 <= cfg.r_local
        k = default_kernel_size(len(alpha))
        score, _, _ = distinct_taps(delta, local, k, separation=cfg.tap_separation, window=cfg.window(k))
        if local.sum() < np.ceil(cfg.min_local_fraction * len(alpha)):
            expected.append("non-local")
        else:
            expected.append("conv-like" if score >= cfg.min_score else "local but not grid")
    res = probe.analyze(model, torch.randn(8, 3, 32, 32), attribution="none", null_layers="all")
    got = _verdicts(res)
    # null (a) can only veto conv-like; the shipped model's random-init copies are non-local
    assert got == expected, (got, expected)
    assert (res.layers.conv_random_init_max.fillna(0) == 0).all()


@pytest.mark.slow
def test_deit_tiny_taps_verdicts_are_stable_and_global_layers_never_pass():
    weights, folder = need(DEIT_WEIGHTS), need(IMAGENET)
    photos = sorted(folder.glob("*.JPEG"))
    order = np.random.default_rng(7).permutation(len(photos))
    sets = [[photos[i] for i in order[:64]], [photos[i] for i in order[64:128]]]
    runs = [probe.analyze("deit_tiny", s, weights=weights, attribution="none", null_seeds=2)
            for s in sets]
    va, vb = (_verdicts(r) for r in runs)
    assert va == vb, (va, vb)
    for r in runs:
        t = r.layers.set_index("layer")
        # layers whose heads are global (mean distance within 15 % of uniform) are never conv-like
        glob_layers = t.index[t.mean_distance_px > 0.85 * t.uniform_distance_px]
        assert len(glob_layers) >= 4
        assert (t.loc[glob_layers, "conv_verdict"] == "non-local").all()
        assert (t.conv_verdict_stability.dropna() >= 0.8).all()
        assert r.extras["convlike"].deepest_conv_layer is None  # layers 0-1 are not local
