"""Published-definition modes of the mean attention distance against explicit math."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from probe.analyses.distance_modes import (
    COLUMNS, DistanceModesReducer, distance_modes_per_image, modes_frame, renormalised_from_stats,
)
from probe.analyses.reducers import LayerReducer
from probe.errors import ProbeError
from probe.geometry import TokenGeometry


def _random_attn(b, h, t, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, t, t, generator=g).mul(2).softmax(-1)


def _loops(attn, geom):
    """The three definitions written out with Python loops over queries and keys."""
    n, (rows, cols) = geom.num_prefix_tokens, geom.grid
    pr, pc = geom.pixels_per_token
    b, h = attn.shape[:2]
    out = np.zeros((b, h, 3))
    p = rows * cols
    for i in range(b):
        for j in range(h):
            acc = [0.0, 0.0, 0.0]
            for q in range(p):
                mass = sum(float(attn[i, j, n + q, n + k]) for k in range(p))
                for k in range(p):
                    a = float(attn[i, j, n + q, n + k])
                    dr, dc = k // cols - q // cols, k % cols - q % cols
                    dpx = math.hypot(dr * pr, dc * pc)
                    dpa = math.hypot(dr, dc)
                    acc[0] += a / mass * dpx
                    acc[1] += a * dpx
                    acc[2] += a * dpa
            out[i, j] = [v / p for v in acc]
    return out


def test_modes_match_explicit_loops_on_random_attention():
    geom = TokenGeometry(2, (2, 3), (16.0, 8.0))
    attn = _random_attn(3, 2, geom.num_tokens)
    got = distance_modes_per_image(attn, geom).numpy()
    np.testing.assert_allclose(got, _loops(attn, geom), rtol=1e-6, atol=1e-9)


def _sayakpaul(patch_size, attention_weights, num_cls_tokens):
    """sayakpaul/probing-vits ``compute_mean_attention_dist``, transcribed (square grids only)."""
    w = attention_weights[..., num_cls_tokens:, num_cls_tokens:]
    num_patches = w.shape[-1]
    length = int(np.sqrt(num_patches))
    dm = np.zeros((num_patches, num_patches))
    for i in range(num_patches):
        for j in range(num_patches):
            if i == j:
                continue
            xi, yi = int(i / length), i % length
            xj, yj = int(j / length), j % length
            dm[i, j] = patch_size * np.linalg.norm([xi - xj, yi - yj])
    return np.mean(np.sum(w * dm.reshape(1, 1, *dm.shape), axis=-1), axis=-1)


def test_unnormalised_mode_reproduces_probing_vits():
    geom = TokenGeometry(1, (3, 3), (16.0, 16.0))
    attn = _random_attn(4, 3, geom.num_tokens, seed=1)
    ref = _sayakpaul(16, attn.numpy().astype(np.float64), 1)  # (batch, heads)
    got = distance_modes_per_image(attn, geom)[..., 1].numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-6)


def test_planted_head_with_prefix_mass():
    """Each patch query puts 0.5 on the class token and 0.5 on a key 1 patch to its right
    (wrapping to the left neighbour at the last column): renormalised reads 1 patch, the
    unnormalised and ConViT modes read half of it."""
    geom = TokenGeometry(1, (3, 4), (10.0, 10.0))
    t, cols = geom.num_tokens, 4
    a = torch.zeros(1, 1, t, t)
    a[0, 0, 0, 0] = 1.0
    for q in range(geom.num_patches):
        k = q + 1 if q % cols < cols - 1 else q - 1
        a[0, 0, 1 + q, 0] = 0.5
        a[0, 0, 1 + q, 1 + k] = 0.5
    v = distance_modes_per_image(a, geom)[0, 0].tolist()
    assert v == pytest.approx([10.0, 5.0, 0.5])


def test_without_prefix_tokens_modes_agree_up_to_units():
    geom = TokenGeometry(0, (4, 4), (14.0, 14.0))
    v = distance_modes_per_image(_random_attn(2, 2, 16, seed=2), geom)
    torch.testing.assert_close(v[..., 0], v[..., 1])
    torch.testing.assert_close(v[..., 2] * 14.0, v[..., 1])


def test_uniform_attention_gives_the_vit_reference_line():
    geom = TokenGeometry(0, (14, 14), (16.0, 16.0))
    a = torch.full((1, 1, 196, 196), 1 / 196)
    v = distance_modes_per_image(a, geom)[0, 0]
    assert float(v[2]) == pytest.approx(7.2808, abs=1e-4)  # ViT Fig. 7 reference, in patches
    assert float(v[0]) == pytest.approx(geom.uniform_mean_distance_pixels)


def test_reducer_streams_and_agrees_with_probes_default():
    geom = TokenGeometry(1, (3, 3), (16.0, 16.0))
    attn = _random_attn(7, 3, geom.num_tokens, seed=3)
    whole, split = DistanceModesReducer(0, geom), DistanceModesReducer(0, geom)
    whole.update(attn)
    for part in attn.split([2, 1, 4]):
        split.update(part)
    a, b = whole.result(), split.result()
    np.testing.assert_allclose(a.mean, b.mean, rtol=1e-12)
    np.testing.assert_allclose(a.se, b.se, rtol=1e-9)
    per_image = distance_modes_per_image(attn, geom).numpy()
    np.testing.assert_allclose(a.mean, per_image.mean(0), rtol=1e-12)
    np.testing.assert_allclose(a.se, per_image.std(0, ddof=1) / math.sqrt(7), rtol=1e-9)
    red = LayerReducer(0, geom, n_bootstrap=0)  # the pipeline's reducer, an independent code path
    red.update(attn)
    np.testing.assert_allclose(renormalised_from_stats(red.result()), a.mean[:, 0], rtol=1e-5)
    frame = modes_frame({0: a})
    assert list(frame["head"]) == [0, 1, 2]
    assert set(COLUMNS.values()) <= set(frame.columns)


def test_bad_input():
    geom = TokenGeometry(1, (2, 2))
    with pytest.raises(ProbeError, match="tokens"):
        distance_modes_per_image(torch.rand(1, 1, 4, 4), geom)
    with pytest.raises(ProbeError, match="batch, heads"):
        distance_modes_per_image(torch.rand(1, 5, 5), geom)
    with pytest.raises(ProbeError, match="no attention"):
        DistanceModesReducer(0, geom).result()


def test_registered_analysis_and_figure():
    import pandas as pd
    from matplotlib.figure import Figure

    import probe
    from conftest import tiny_vit
    from probe.report.plots_extra import distance_modes_figure

    r = probe.analyze(tiny_vit(depth=2), torch.randn(3, 3, 32, 32), analyses=["distance_modes"], fits=False,
                      conv_test=False, attribution="none", progress=False, n_bootstrap=0,
                      data_overrides={"input_size": (3, 32, 32)})
    # the renormalised mode is probe's own mean attention distance
    np.testing.assert_allclose(r.heads["mean_distance_renorm_px"], r.heads["mean_distance_px"], rtol=1e-5)
    # per query the unnormalised sum is the renormalised one times the patch mass m_q <= 1
    assert (r.heads["mean_distance_unnorm_px"] <= r.heads["mean_distance_renorm_px"] + 1e-9).all()
    assert isinstance(distance_modes_figure(r.heads), Figure)
    with pytest.raises(ProbeError, match="lacks"):
        distance_modes_figure(pd.DataFrame({"layer": [0]}))
