"""Attention sinks and register artifacts (Darcet et al. 2024) on a planted model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tiny_vit
from probe.analyses.sinks import (
    LOG10_EDGES, SinkReducer, block_of, compute_sinks, outlier_mask, robust_z, sinks_frames,
    tokens_from_output,
)
from probe.capture import AttentionCapture, find_attention_layers
from probe.errors import ProbeError
from probe.geometry import TokenGeometry

POS = (1, 2)  # planted high-norm patch position on the 4x4 grid


def planted_vit():
    """tiny timm ViT (1 class token, 4x4 grid, 3 blocks) whose block 0 output gets a token 30x its
    norm at patch position POS (row 1, col 2) in every image."""
    model = tiny_vit()
    token = 1 + POS[0] * 4 + POS[1]

    def plant(mod, args, out):
        out = out.clone()
        out[:, token] = out[:, token] * 30.0
        return out

    model.blocks[0].register_forward_hook(plant)
    return model


def test_robust_z_is_the_modified_z_score_of_log_norms():
    g = torch.Generator().manual_seed(0)
    norms = torch.rand(3, 20, generator=g, dtype=torch.float64) + 0.5
    ln = np.log(norms.numpy())
    med = np.median(ln, axis=1, keepdims=True)
    mad = np.median(np.abs(ln - med), axis=1, keepdims=True)
    np.testing.assert_allclose(robust_z(norms).numpy(), (ln - med) / (1.4826 * mad), rtol=1e-12)
    # scale-free: multiplying every norm by 1000 changes nothing
    torch.testing.assert_close(robust_z(norms * 1000), robust_z(norms))
    # MAD = 0 falls back on the mean absolute deviation; all equal -> no outliers
    flat = torch.ones(1, 10, dtype=torch.float64)
    flat[0, 3] = 100.0
    z = robust_z(flat)
    assert float(z[0, 3]) > 3.5 and float(z[0, 0]) == 0.0
    assert (robust_z(torch.ones(1, 5)) == 0).all()


def test_planted_high_norm_token_is_found_and_its_attention_measured():
    model = planted_vit()
    imgs = torch.randn(5, 3, 32, 32)
    stats = compute_sinks(model, imgs, batch_size=2)
    s0, s1 = stats[0], stats[1]
    # block 0's output: exactly one outlier per image, at POS
    assert s0.n_images == 5 and s0.n_outliers == 5
    expect = np.zeros((4, 4), dtype=np.int64)
    expect[POS] = 5
    np.testing.assert_array_equal(s0.position_counts, expect)
    assert s0.outlier_fraction == pytest.approx(1 / 16)
    assert s0.patch_hist.sum() == 5 * 16 and s0.prefix_hist.sum() == 5
    # the planted norm falls in its histogram bin
    with torch.no_grad():
        out0 = {}
        h = model.blocks[0].register_forward_hook(lambda m, a, o: out0.setdefault("x", o))
        model(imgs[:1])
        h.remove()
    n = float(out0["x"][0, 1 + POS[0] * 4 + POS[1]].norm())
    assert s0.patch_hist[1 + np.searchsorted(LOG10_EDGES, np.log10(n), side="right") - 1] >= 1
    assert s0.outlier_norm_mean > 10 * s0.patch_norm_median_mean
    # layer 1 attends over block 1's input = block 0's output: mass on the outlier key by hand
    layers = find_attention_layers(model)
    seen = []
    with AttentionCapture([layers[1]], lambda i, a: seen.append(a.double())), torch.no_grad():
        model(imgs)
    a = seen[0]
    key = 1 + POS[0] * 4 + POS[1]
    np.testing.assert_allclose(s1.mass_outliers, a[:, :, 1:, key].mean(-1).mean(0).numpy(), rtol=1e-6)
    np.testing.assert_allclose(s1.mass_prefix, a[:, :, 1:, 0].mean(-1).mean(0).numpy(), rtol=1e-6)
    assert s1.key_outlier_fraction == pytest.approx(1 / 16)
    # layer 0 attends over the unplanted embedding: (almost surely) no outlier keys there
    assert s0.key_outlier_fraction < 1 / 16
    heads, layer_rows = sinks_frames(stats)
    assert list(heads.columns[:2]) == ["layer", "head"] and len(heads) == 9
    assert layer_rows.loc[layer_rows.layer == 0, "sink_outlier_fraction"].item() == pytest.approx(1 / 16)


def test_streaming_does_not_depend_on_batches():
    model = planted_vit()
    imgs = torch.randn(4, 3, 32, 32)
    a, b = compute_sinks(model, imgs, batch_size=4), compute_sinks(model, imgs, batch_size=1)
    for k in a:
        np.testing.assert_array_equal(a[k].patch_hist, b[k].patch_hist)
        np.testing.assert_array_equal(a[k].position_counts, b[k].position_counts)
        # float32 attention of other batch shapes: equal to float32 rounding, not bit for bit
        np.testing.assert_allclose(a[k].mass_outliers, b[k].mass_outliers, rtol=1e-5)
        np.testing.assert_allclose(a[k].prefix_norm_mean, b[k].prefix_norm_mean, rtol=1e-5)


def test_reducer_on_planted_tensors():
    geom = TokenGeometry(1, (2, 3))
    tokens = torch.ones(2, 7, 4)
    tokens[:, 1:] += 0.01 * torch.arange(6.0)[None, :, None]  # small spread
    tokens[0, 1 + 4] *= 100.0  # image 0: outlier at patch 4
    r = SinkReducer(3, geom)
    mask = r.update_tokens(tokens)
    assert mask.tolist() == [[False] * 4 + [True, False], [False] * 6]
    attn = torch.full((2, 1, 7, 7), 1 / 7)
    r.update_attention(attn, mask)
    s = r.result()
    assert s.mass_outliers == pytest.approx([0.5 / 7])  # one key of 1/7 in one of two images
    assert s.mass_prefix == pytest.approx([1 / 7])
    assert s.prefix_norm_mean == pytest.approx([2.0])
    assert s.position_frequency[1, 1] == 0.5
    assert (outlier_mask(tokens * 1e3, geom) == mask).all()


def test_block_of_and_token_layouts():
    model = tiny_vit()
    layers = find_attention_layers(model)
    assert block_of(model, layers[2])[0] == "blocks.2"
    import family_models as fm

    swin = fm.swin()
    sl = find_attention_layers(swin)
    assert block_of(swin, sl[0])[1] is sl[0].module  # Swin: the rule hooks the block itself
    tv = fm.torchvision_vit()
    name = block_of(tv, find_attention_layers(tv)[0])[0]
    assert name.endswith("encoder_layer_0")
    g = TokenGeometry(0, (2, 2))
    x = torch.randn(3, 4, 5)
    assert tokens_from_output(x, g, 3) is x
    torch.testing.assert_close(tokens_from_output(x.transpose(0, 1), g, 3), x)  # sequence-first
    torch.testing.assert_close(tokens_from_output(x.reshape(3, 2, 2, 5), g, 3), x)  # Swin (B, H, W, C)
    with pytest.raises(ProbeError, match="not"):
        tokens_from_output(torch.randn(3, 7, 5), g, 3)


def test_other_families_run():
    import family_models as fm

    for model, size in ((fm.swin(), 64), (fm.dinov2_reg(), 56), (fm.convit(), 64), (fm.encoder_vit(), 32)):
        stats = compute_sinks(model.eval(), torch.randn(2, 3, size, size))
        for s in stats.values():
            assert s.patch_hist.sum() == 2 * s.geometry.num_patches
            assert s.mass_outliers.shape == (s.mass_prefix.shape[0],) and s.n_attn_images == 2
    reg = compute_sinks(fm.dinov2_reg().eval(), torch.randn(1, 3, 56, 56))
    assert reg[0].prefix_norm_mean.shape == (5,)  # class + 4 registers


def test_bad_input():
    with pytest.raises(ProbeError, match="z_threshold"):
        SinkReducer(0, TokenGeometry(0, (2, 2)), z_threshold=0)
    with pytest.raises(ProbeError, match="no block output"):
        SinkReducer(0, TokenGeometry(0, (2, 2))).result()
    with pytest.raises(ProbeError, match="float tensor"):
        compute_sinks(tiny_vit(), torch.zeros(3, 32, 32))
    r = SinkReducer(0, TokenGeometry(0, (2, 2)))
    with pytest.raises(ProbeError, match="mask"):
        r.update_attention(torch.rand(1, 1, 4, 4), torch.zeros(2, 4, dtype=torch.bool))


def test_registered_analysis_and_figures():
    from matplotlib.figure import Figure

    import probe
    from probe.report.plots_extra import norm_histograms, outlier_positions

    r = probe.analyze(planted_vit(), torch.randn(4, 3, 32, 32), analyses=["sinks"], fits=False, conv_test=False,
                      attribution="none", progress=False, n_bootstrap=0, data_overrides={"input_size": (3, 32, 32)})
    assert r.layers.loc[r.layers.layer == 0, "sink_outlier_fraction"].item() == pytest.approx(1 / 16)
    assert {"sink_mass_outliers", "sink_mass_prefix"} <= set(r.heads.columns)
    stats = r.extras["sinks"]["stats"]
    fig = norm_histograms(stats[0].edges, {k: s.patch_hist for k, s in stats.items()},
                          {k: s.prefix_hist for k, s in stats.items()})
    assert isinstance(fig, Figure)
    assert isinstance(outlier_positions(stats[0].position_frequency, r.extras.get("example_image")), Figure)
    with pytest.raises(ProbeError, match="counts"):
        norm_histograms(stats[0].edges, {0: np.zeros(3)})
    with pytest.raises(ProbeError, match="rows, cols"):
        outlier_positions(np.zeros(4))
