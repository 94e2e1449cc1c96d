"""Streaming statistics against analytic oracles and explicit math."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from probe.analyses.reducers import LayerReducer
from probe.geometry import TokenGeometry
from probe.tables import heads_frame


def _stats(attn, geometry, batches=1):
    red = LayerReducer(0, geometry, n_bootstrap=8)
    for chunk in torch.tensor_split(attn, batches):
        red.update(chunk)
    return red.result()


def test_uniform_attention_on_14x14_grid():
    g = TokenGeometry(0, (14, 14), (16, 16))
    attn = torch.full((2, 3, 196, 196), 1 / 196)
    st = _stats(attn, g)
    assert st.feature("mean_distance_patches") == pytest.approx([7.2808] * 3, abs=1e-4)
    assert st.feature("mean_distance_px") == pytest.approx([7.2808 * 16] * 3, abs=2e-3)
    assert st.feature("entropy_nats") == pytest.approx([math.log(196)] * 3, rel=1e-6)
    assert st.feature("prefix_mass") == pytest.approx([0.0] * 3, abs=1e-7)
    assert g.uniform_mean_distance_patches == pytest.approx(7.2808, abs=1e-4)


def test_uniform_with_class_token_renormalises_patch_keys():
    g = TokenGeometry(1, (14, 14), (16, 16))
    attn = torch.full((1, 2, 197, 197), 1 / 197)
    st = _stats(attn, g)
    assert st.feature("mean_distance_patches") == pytest.approx([7.2808] * 2, abs=1e-4)
    assert st.feature("entropy_nats") == pytest.approx([math.log(197)] * 2, rel=1e-6)
    assert st.feature("prefix_mass") == pytest.approx([1 / 197] * 2, rel=1e-5)
    frame = heads_frame([st])
    assert frame["entropy_norm"].to_numpy() == pytest.approx([1.0, 1.0], rel=1e-6)


@pytest.mark.parametrize("offset,grid,ppt", [((3, 4), (14, 14), (16, 16)), ((1, 0), (6, 9), (8, 12))])
def test_one_hot_attention_at_known_offset(offset, grid, ppt):
    """Each patch query puts all its mass on the key at +-offset (sign chosen to stay on the grid)."""
    g = TokenGeometry(1, grid, ppt)
    rows, cols = grid
    P = rows * cols
    attn = torch.zeros(1, 1, P + 1, P + 1)
    attn[0, 0, 0, 0] = 1.0
    for q in range(P):
        r, c = divmod(q, cols)
        dr = offset[0] if r + offset[0] < rows else -offset[0]
        dc = offset[1] if c + offset[1] < cols else -offset[1]
        attn[0, 0, 1 + q, 1 + (r + dr) * cols + (c + dc)] = 1.0
    st = _stats(attn, g)
    length = math.hypot(*offset)
    px = math.hypot(offset[0] * ppt[0], offset[1] * ppt[1])
    assert st.feature("mean_distance_patches").item() == pytest.approx(length, rel=1e-6)
    assert st.feature("mean_distance_px").item() == pytest.approx(px, rel=1e-6)
    assert st.feature("entropy_nats").item() == pytest.approx(0.0, abs=1e-6)


def _random_attention(b, h, t, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, h, t, t, generator=gen) * 3
    return logits.softmax(-1)


def _explicit(attn: np.ndarray, g: TokenGeometry):
    """Definitions of the issue written out with NumPy loops over queries."""
    n_pre = g.num_prefix_tokens
    pos = g.patch_positions().numpy()
    ppt = np.array(g.pixels_per_token)
    B, H, T, _ = attn.shape
    out = {k: np.zeros(H) for k in ("dist_p", "dist_px", "ent", "prefix")}
    for h in range(H):
        vals = {k: [] for k in out}
        for b in range(B):
            for q in range(g.num_patches):
                row = attn[b, h, n_pre + q]
                pk = row[n_pre:] / row[n_pre:].sum()
                d = pos - pos[q]
                vals["dist_p"].append((pk * np.sqrt((d ** 2).sum(1))).sum())
                vals["dist_px"].append((pk * np.sqrt(((d * ppt) ** 2).sum(1))).sum())
                vals["ent"].append(-(row * np.log(row)).sum())
                vals["prefix"].append(row[:n_pre].sum())
        for k in out:
            out[k][h] = np.mean(vals[k])
    return out


def test_streaming_equals_all_at_once_and_explicit_math():
    g = TokenGeometry(2, (5, 7), (14.0, 10.0))
    attn = _random_attention(7, 3, g.num_tokens)
    whole = _stats(attn, g, batches=1)
    streamed = _stats(attn, g, batches=4)
    torch.testing.assert_close(streamed.attn_sum, whole.attn_sum, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(streamed.feat_sum, whole.feat_sum, rtol=1e-6, atol=1e-9)
    ref = _explicit(attn.double().numpy(), g)
    np.testing.assert_allclose(whole.feature("mean_distance_patches"), ref["dist_p"], rtol=1e-5)
    np.testing.assert_allclose(whole.feature("mean_distance_px"), ref["dist_px"], rtol=1e-5)
    np.testing.assert_allclose(whole.feature("entropy_nats"), ref["ent"], rtol=1e-5)
    np.testing.assert_allclose(whole.feature("prefix_mass"), ref["prefix"], rtol=1e-5)
    # the mean map's rows are probability distributions over patch keys
    np.testing.assert_allclose(whole.mean_attn.sum(-1).numpy(), 1.0, rtol=1e-6)


def test_phi_statistics_match_explicit_offsets():
    g = TokenGeometry(1, (4, 6))
    attn = _random_attention(3, 2, g.num_tokens, seed=1)
    st = _stats(attn, g)
    off = g.offsets().numpy()
    a = attn.double().numpy()[:, :, 1:, 1:]
    a = a / a.sum(-1, keepdims=True)
    dr, dc = off[..., 0], off[..., 1]
    feats = [dr, dc, dr * dr, dc * dc, dr * dc]
    expect = np.stack([(a * f).sum(-1).mean(-1).mean(0) for f in feats], -1)
    np.testing.assert_allclose(st.phi_mean.numpy(), expect, rtol=1e-5, atol=1e-7)


def test_standard_error_and_bootstrap():
    g = TokenGeometry(1, (4, 4))
    attn = _random_attention(20, 2, g.num_tokens, seed=3)
    st = _stats(attn, g, batches=5)
    per_image = [_stats(attn[i:i + 1], g).feature("entropy_nats") for i in range(20)]
    per_image = torch.stack(per_image)
    expect_se = per_image.std(0, unbiased=True) / math.sqrt(20)
    torch.testing.assert_close(st.feature_se("entropy_nats"), expect_se, rtol=1e-5, atol=1e-9)
    assert st.phi_bootstrap.shape == (8, 2, 5)
    assert torch.isfinite(st.phi_bootstrap).all()


def test_shape_mismatch_is_a_clear_error():
    from probe.errors import ProbeError

    g = TokenGeometry(1, (14, 14))
    red = LayerReducer(3, g)
    with pytest.raises(ProbeError, match="197"):
        red.update(torch.rand(1, 3, 50, 50).softmax(-1))
