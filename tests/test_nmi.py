"""Normalised mutual information between query and key positions (Park et al. 2023)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import entropy

from probe.analyses.nmi import (
    NmiReducer, nmi_from_conditional, nmi_from_mean_attention, nmi_from_stats, nmi_per_image,
)
from probe.analyses.reducers import LayerReducer
from probe.errors import ProbeError
from probe.geometry import TokenGeometry


def test_uniform_attention_has_zero_nmi():
    assert nmi_from_mean_attention(torch.full((2, 9, 9), 1 / 9)) == pytest.approx([0.0, 0.0], abs=1e-12)


def test_collapse_onto_one_key_has_zero_nmi():
    a = torch.zeros(1, 6, 6)
    a[0, :, 2] = 1.0
    assert nmi_from_mean_attention(a) == pytest.approx([0.0], abs=1e-12)


def test_permutation_attention_has_nmi_one():
    perm = torch.randperm(12)
    a = torch.eye(12)[perm][None]
    assert nmi_from_mean_attention(a) == pytest.approx([1.0], abs=1e-12)


def test_explicit_math_against_entropies():
    """I(q;k) = H(q) + H(k) - H(q,k) with scipy's entropies, NMI = I / sqrt(H(q) H(k))."""
    g = torch.Generator().manual_seed(0)
    cond = torch.rand(3, 5, 7, generator=g, dtype=torch.float64) ** 3
    cond = cond / cond.sum(-1, keepdim=True)
    got = nmi_from_conditional(cond).numpy()
    for h in range(3):
        joint = cond[h].numpy() / 5
        hq, hk, hqk = entropy(joint.sum(1)), entropy(joint.sum(0)), entropy(joint.ravel())
        assert got[h] == pytest.approx((hq + hk - hqk) / math.sqrt(hq * hk), rel=1e-10)


def _park(attn):
    """naver-ai/cl-vs-mim ``calculate_nmi`` and its preprocessing, transcribed without einops."""
    attn = attn[:, :, 1:, 1:] + 1e-8
    attn = attn / attn.sum(dim=-1, keepdim=True)
    b, h, q, k = attn.shape
    pq = torch.softmax(torch.ones(b, h, q, dtype=attn.dtype), dim=-1)
    pk = (attn * pq[..., None]).sum(-2)
    mi = (attn * pq[..., None] * torch.log(attn / pk[:, :, None, :])).sum((-1, -2))
    eq = -(pq * torch.log(pq)).sum(-1)
    ek = -(pk * torch.log(pk)).sum(-1)
    return mi / torch.sqrt(eq * ek)


def test_per_image_nmi_reproduces_park_et_al_code():
    geom = TokenGeometry(1, (3, 3))
    g = torch.Generator().manual_seed(1)
    attn = (torch.randn(4, 2, 10, 10, generator=g) * 3).softmax(-1).double()
    torch.testing.assert_close(nmi_per_image(attn, geom), _park(attn), rtol=1e-10, atol=1e-12)


def test_per_image_mean_exceeds_nmi_of_mean_attention():
    """Two images whose heads attend along different permutations: each image's NMI is 1 (up to
    Park's 1e-8 smoothing), the NMI of their mean attention is lower (MI is convex in p(k|q))."""
    geom = TokenGeometry(0, (2, 4))
    p1, p2 = torch.eye(8), torch.eye(8)[torch.tensor([1, 0, 3, 2, 5, 4, 7, 6])]
    attn = torch.stack([p1, p2])[:, None]  # (2 images, 1 head, 8, 8)
    red = NmiReducer(0, geom)
    red.update(attn)
    per = red.result()
    assert per.mean == pytest.approx([1.0], abs=1e-5)
    mean_nmi = nmi_from_mean_attention(attn.mean(0))[0]
    # mean attention: each query puts 1/2 on two keys -> I = ln 8 - ln 2, H(k) = ln 8
    assert mean_nmi == pytest.approx((math.log(8) - math.log(2)) / math.log(8), rel=1e-12)
    assert mean_nmi < per.mean[0]


def test_nmi_from_the_pipeline_reducers_stats():
    geom = TokenGeometry(1, (3, 3))
    g = torch.Generator().manual_seed(2)
    attn = (torch.randn(5, 3, 10, 10, generator=g) * 2).softmax(-1)
    red = LayerReducer(4, geom, n_bootstrap=0)
    red.update(attn)
    frame = nmi_from_stats(red.result())
    patch = attn[:, :, 1:, 1:].double()
    by_hand = (patch / patch.sum(-1, keepdim=True)).mean(0)
    np.testing.assert_allclose(frame["nmi"], nmi_from_mean_attention(by_hand), rtol=1e-5)
    assert list(frame["layer"]) == [4, 4, 4]


def test_reducer_streams():
    geom = TokenGeometry(1, (2, 2))
    attn = torch.rand(6, 2, 5, 5).softmax(-1)
    a, b = NmiReducer(0, geom), NmiReducer(0, geom)
    a.update(attn)
    b.update(attn[:1]), b.update(attn[1:])
    np.testing.assert_allclose(a.result().mean, b.result().mean, rtol=1e-12)
    np.testing.assert_allclose(a.result().mean, nmi_per_image(attn, geom).mean(0).numpy(), rtol=1e-12)


def test_bad_input():
    with pytest.raises(ProbeError, match="heads, P, P"):
        nmi_from_mean_attention(torch.rand(4, 4))
    with pytest.raises(ProbeError, match="without mass"):
        nmi_from_mean_attention(torch.zeros(1, 3, 3))
    with pytest.raises(ProbeError, match="non-negative"):
        nmi_from_mean_attention(-torch.ones(1, 3, 3))
    with pytest.raises(ProbeError, match="tokens"):
        nmi_per_image(torch.rand(1, 1, 4, 4), TokenGeometry(1, (2, 2)))
    with pytest.raises(ProbeError, match="no attention"):
        NmiReducer(0, TokenGeometry(0, (2, 2))).result()


def test_registered_analysis_and_figure():
    import pandas as pd
    from matplotlib.figure import Figure

    import probe
    from conftest import tiny_vit
    from probe.report.plots_extra import nmi_by_layer

    model = tiny_vit(depth=2)
    x = torch.randn(3, 3, 32, 32)
    r = probe.analyze(model, x, analyses=["nmi"], fits=False, conv_test=False, attribution="none",
                      progress=False, n_bootstrap=0, data_overrides={"input_size": (3, 32, 32)})
    assert "nmi" in r.meta["analyses"]
    for layer, st in r.stats.items():  # the column is the NMI of the run's own mean attention
        np.testing.assert_allclose(r.heads.loc[r.heads.layer == layer, "nmi"], nmi_from_mean_attention(st.mean_attn))
    assert r.heads["nmi_per_image"].between(0, 1).all()
    assert isinstance(nmi_by_layer(r.heads), Figure)
    with pytest.raises(ProbeError, match="nmi"):
        nmi_by_layer(pd.DataFrame({"layer": [0], "head": [0]}))
