"""The conv test (issue 21) on the models of the README's verdict table: the shipped
attention-only model against an oracle computed from its own Δ and α, random-init copies, the
planted Theorem-1 ViT, and (slow, ../shared) DeiT-Tiny on two disjoint photo sets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import probe
from probe.analyses.convlike import ConvLikeConfig, LayerFit, convlike_test
from probe.analyses.quadratic import empirical_mass_radius
from probe.conv_equivalence import conv_equivalent_vit
from probe.geometry import TokenGeometry

from conftest import DEIT_WEIGHTS, IMAGENET, need
from test_cordonnier import explicit_quadratic


def _verdicts(res) -> list[str]:
    return res.layers.sort_values("layer").conv_verdict.tolist()


def test_planted_theorem1_vit_conv_layers_pass_uniform_layers_do_not():
    model = conv_equivalent_vit(depth=5, conv_layers=2)
    res = probe.analyze(model, torch.randn(4, 3, 64, 64), attribution="none", null_seeds=0)
    assert _verdicts(res) == ["conv-like"] * 2 + ["non-local"] * 3
    assert res.extras["convlike"].deepest_conv_layer == 1
    assert (res.layers.sort_values("layer").conv_dilation.iloc[:2] == 1).all()


def test_random_init_copies_of_the_shipped_architecture_never_pass():
    for seed in (1, 2, 3):
        res = probe.analyze(None, torch.randn(4, 3, 32, 32), random_init=True, seed=seed, attribution="none")
        assert "conv-like" not in _verdicts(res)
        assert (res.layers.conv_random_init_max.fillna(0) == 0).all()


def test_shipped_model_verdicts_match_an_oracle_from_its_own_parameters():
    """The pipeline (capture, fits, on-grid radius, test) against the test applied to the model's
    own Δ and α with attention computed by explicit math; position-only attention is the same
    for every image, so the verdicts are deterministic."""
    from probe.cordonnier import pretrained

    model = pretrained()
    cfg = ConvLikeConfig()
    geom = TokenGeometry(0, (16, 16), (2.0, 2.0))
    fits = {}
    for i, blk in enumerate(model.blocks):
        a = blk.attn
        delta, alpha = a.delta.double().numpy(), a.alpha.double().numpy()
        attn = explicit_quadratic(delta, alpha, 16, 16)
        r90 = empirical_mass_radius(attn, geom, delta, 0.9, on_grid=True)
        fits[i] = LayerFit(delta, r90=r90, grid=(16, 16))
    expected = convlike_test(fits, config=cfg).layers.conv_verdict.tolist()
    res = probe.analyze(model, torch.randn(8, 3, 32, 32), attribution="none", null_layers="all")
    assert _verdicts(res) == expected
    assert res.layers.conv_deterministic.all()
    assert "deterministic" in res.extras["convlike"].summary()


@pytest.mark.slow
def test_deit_tiny_verdicts_are_stable_and_global_layers_never_pass():
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


def test_verdicts_do_not_depend_on_layers_through_the_pipeline():
    """The planted Theorem-1 ViT analysed with every layer and with a subset: each shared
    layer's verdict, p-value and score are identical (each layer is its own test)."""
    model = conv_equivalent_vit(depth=5, conv_layers=2)
    x = torch.randn(4, 3, 64, 64)
    full = probe.analyze(model, x, attribution="none", null_seeds=0, progress=False).layers.set_index("layer")
    for layers in ("1", "1-3", "0,4"):
        part = probe.analyze(model, x, layers=layers, attribution="none", null_seeds=0,
                             progress=False).layers.set_index("layer")
        for l in part.index:
            for col in ("conv_verdict", "conv_p_value", "conv_score", "conv_dilation"):
                assert part.loc[l, col] == full.loc[l, col], (layers, l, col)


def test_planted_layers_through_the_public_api():
    """A position-only model with planted Δ, α (α = 5) per layer, analysed by probe.analyze:
    exact grid -> conv-like; dilated grid -> conv-like (dilation 2); random scatter, one shared
    offset, a line and far sharp heads -> not conv-like; far sharp heads are local."""
    from probe.analyses.convlike import kernel_lattice
    from probe.cordonnier import CordonnierViT

    rng = np.random.default_rng(21)
    lat = kernel_lattice(3)
    layers = [
        lat,                                                          # the 3x3 kernel
        2 * lat,                                                      # dilated
        rng.uniform(-2.5, 2.5, (9, 2)),                               # random scatter
        np.tile([[0.0, 1.0]], (9, 1)) + rng.normal(0, 0.05, (9, 2)),  # one shared offset
        np.outer(np.linspace(-2, 2, 9), [0.6, 0.8]),                  # a line
        rng.uniform(5, 7, (9, 2)) * rng.choice([-1, 1], (9, 2)),      # far sharp heads
    ]
    torch.manual_seed(0)
    model = CordonnierViT(dim=18, depth=len(layers), num_heads=9, mlp_dim=18).eval()
    with torch.no_grad():
        for blk, d in zip(model.blocks, layers):
            blk.attn.centers.copy_(torch.as_tensor(d, dtype=torch.float32))
            blk.attn.alpha_raw.fill_(5.0)
    res = probe.analyze(model, torch.randn(2, 3, 32, 32), attribution="none", null_seeds=0, progress=False)
    t = res.layers.set_index("layer")
    assert t.conv_verdict.tolist() == ["conv-like", "conv-like"] + ["local but not grid"] * 4
    assert t.conv_dilation.tolist()[:2] == [1, 2]
    assert t.loc[5, "conv_n_local"] == 9
