"""Attention rollout (Abnar & Zuidema 2020) and gradient-weighted relevance (Chefer et al. 2021)
against explicit matrix products and an explicit autograd computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tiny_vit
from probe.analyses.rollout import (
    RolloutMaps, compute_rollout, query_map, relevance_matrix, rollout_matrix, token_transition,
)
from probe.errors import ProbeError
from probe.geometry import TokenGeometry


def test_two_layer_rollout_by_hand():
    """Tokens (cls, p0, p1), one head; every number written out."""
    a1 = torch.tensor([[[[0.5, 0.25, 0.25], [0.0, 1.0, 0.0], [0.5, 0.0, 0.5]]]], dtype=torch.float64)
    a2 = torch.tensor([[[[0.0, 1.0, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]]], dtype=torch.float64)
    g = TokenGeometry(1, (1, 2))
    r = rollout_matrix([a1, a2], [g, g])[0]
    # Ã1 = 0.5 A1 + 0.5 I, Ã2 = 0.5 A2 + 0.5 I (rows already sum to one)
    t1 = [[0.75, 0.125, 0.125], [0.0, 1.0, 0.0], [0.25, 0.0, 0.75]]
    t2 = [[0.5, 0.5, 0.0], [0.25, 0.75, 0.0], [0.0, 0.0, 1.0]]
    expect = [[sum(t2[i][m] * t1[m][j] for m in range(3)) for j in range(3)] for i in range(3)]
    torch.testing.assert_close(r, torch.tensor(expect, dtype=torch.float64))
    maps, prefix = query_map(r[None], g, g, "class")
    torch.testing.assert_close(maps[0, 0], torch.tensor([0.5625, 0.0625], dtype=torch.float64))
    assert float(prefix[0]) == pytest.approx(0.375)
    # rows of p0 and p1: 0.25 t1[0] + 0.75 t1[1] = (0.1875, 0.78125, 0.03125) and t1[2]
    maps, prefix = query_map(r[None], g, g, "patches")
    torch.testing.assert_close(maps[0, 0], torch.tensor([0.78125 / 2, (0.03125 + 0.75) / 2], dtype=torch.float64))
    assert float(prefix[0]) == pytest.approx((0.1875 + 0.25) / 2)


def _explicit_forward(model, img):
    """timm ViT forward with the attention written out: softmax(q k^T scale), kept for autograd."""
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(img))))
    attns = []
    for blk in model.blocks:
        h = blk.norm1(x)
        b, n, c = h.shape
        heads = blk.attn.num_heads
        qkv = blk.attn.qkv(h).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        a = (q @ k.transpose(-2, -1) * (c // heads) ** -0.5).softmax(-1)
        if a.requires_grad:
            a.retain_grad()
        attns.append(a)
        x = x + blk.attn.proj((a @ v).transpose(1, 2).reshape(b, n, c))
        x = x + blk.mlp(blk.norm2(x))
    return model.forward_head(model.norm(x)), attns


def test_rollout_of_a_two_layer_vit_by_explicit_products():
    model = tiny_vit(depth=2)
    imgs = torch.randn(3, 3, 32, 32)
    got = compute_rollout(model, imgs, batch_size=2)
    assert got.maps.shape == (3, 4, 4) and got.query == "class" and got.layers == [0, 1]
    with torch.no_grad():
        logits, (a1, a2) = _explicit_forward(model, imgs)
        torch.testing.assert_close(logits, model(imgs), rtol=1e-5, atol=1e-5)
    eye = torch.eye(17)
    r = (0.5 * a2.mean(1) + 0.5 * eye) @ (0.5 * a1.mean(1) + 0.5 * eye)
    np.testing.assert_allclose(got.maps, r[:, 0, 1:].reshape(3, 4, 4).numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got.prefix_mass, r[:, 0, 0].numpy(), rtol=1e-5)
    np.testing.assert_allclose(got.maps.sum((1, 2)) + got.prefix_mass, 1.0, rtol=1e-5)


def test_relevance_matches_explicit_autograd():
    """Chefer's rules 5-6 on gradients from a hand-written forward pass, one image at a time."""
    model = tiny_vit(depth=3)
    imgs = torch.randn(2, 3, 32, 32)
    got = compute_rollout(model, imgs, method="relevance", batch_size=2)
    for i in range(2):
        x = imgs[i:i + 1].clone().requires_grad_(True)
        logits, attns = _explicit_forward(model, x)
        target = int(logits.argmax())
        assert got.targets[i] == target
        model.zero_grad()
        logits[0, target].backward()
        r = torch.eye(17)
        for a in attns:
            cam = (a.grad * a).clamp(min=0).mean(1)[0]
            r = r + cam @ r
        np.testing.assert_allclose(got.maps[i], r[0, 1:].reshape(4, 4).detach().numpy(), rtol=1e-4, atol=1e-6)
    assert all(p.requires_grad for p in model.parameters())  # restored


def test_relevance_with_given_targets_differs_by_class():
    model = tiny_vit(depth=2)
    imgs = torch.randn(2, 3, 32, 32)
    a = compute_rollout(model, imgs, method="relevance", targets=[0, 0])
    b = compute_rollout(model, imgs, method="relevance", targets=[1, 1])
    assert list(a.targets) == [0, 0] and not np.allclose(a.maps, b.maps)


def test_token_transitions():
    fine, coarse = TokenGeometry(0, (4, 4), (4.0, 4.0)), TokenGeometry(0, (2, 2), (8.0, 8.0))
    m = token_transition(fine, coarse)
    assert m.shape == (4, 16)
    expect = torch.zeros(4, 16, dtype=torch.float64)
    for r in range(4):
        for c in range(4):
            expect[(r // 2) * 2 + c // 2, r * 4 + c] = 0.25
    torch.testing.assert_close(m, expect)
    # ConViT: the class token joins after layers without it and carries no image information
    m = token_transition(TokenGeometry(0, (2, 2)), TokenGeometry(1, (2, 2)))
    torch.testing.assert_close(m, torch.cat([torch.zeros(1, 4), torch.eye(4)]).double())
    with pytest.raises(ProbeError, match="prefix tokens"):
        token_transition(TokenGeometry(2, (2, 2)), TokenGeometry(1, (2, 2)))
    with pytest.raises(ProbeError, match="integer blocks"):
        token_transition(TokenGeometry(0, (4, 4)), TokenGeometry(0, (3, 3)))


def test_rollout_across_a_grid_change_by_hand():
    g = torch.Generator().manual_seed(0)
    fine, coarse = TokenGeometry(0, (2, 2)), TokenGeometry(0, (1, 1))
    a1 = torch.rand(1, 2, 4, 4, generator=g, dtype=torch.float64).softmax(-1)
    a2 = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    r = rollout_matrix([a1, a2], [fine, coarse])
    t1 = 0.5 * a1.mean(1)[0] + 0.5 * torch.eye(4, dtype=torch.float64)
    expect = torch.full((1, 4), 0.25, dtype=torch.float64) @ t1  # the one merged token, Ã2 = 1
    torch.testing.assert_close(r[0], expect)


def test_swin_rollout_maps_the_windows_and_refuses_relevance():
    import family_models as fm

    model = fm.swin().eval()
    imgs = torch.randn(2, 3, 64, 64)
    got = compute_rollout(model, imgs)
    assert got.query == "patches" and got.maps.shape == (2, 16, 16) and got.pixels_per_token == (4.0, 4.0)
    np.testing.assert_allclose(got.maps.sum((1, 2)), 1.0, rtol=1e-5)  # row sums carried through the merge
    with pytest.raises(ProbeError, match="copy that the model does not use"):
        compute_rollout(model, imgs, method="relevance")


def test_convit_and_registers():
    import family_models as fm

    conv = compute_rollout(fm.convit().eval(), torch.randn(1, 3, 64, 64))
    # the class token joins at layer 2: its own half of the identity carries no image information
    assert conv.query == "class" and conv.maps.shape == (1, 4, 4) and float(conv.prefix_mass[0]) == 0.0
    assert 0.0 < conv.maps.sum() < 1.0
    reg = compute_rollout(fm.dinov2_reg().eval(), torch.randn(1, 3, 56, 56), method="relevance")
    assert reg.maps.shape == (1, 4, 4) and reg.prefix_mass.shape == (1,)


def test_save_npz(tmp_path):
    got = compute_rollout(tiny_vit(depth=1), torch.randn(2, 3, 32, 32))
    assert isinstance(got, RolloutMaps)
    path = got.save_npz(tmp_path / "rollout.npz")
    data = np.load(path)
    np.testing.assert_array_equal(data["maps"], got.maps)
    assert str(data["method"]) == "rollout" and list(data["grid"]) == [4, 4]


def test_bad_arguments():
    model = tiny_vit(depth=1)
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ProbeError, match="method"):
        compute_rollout(model, x, method="lrp")
    with pytest.raises(ProbeError, match="query"):
        compute_rollout(model, x, query="cls")
    with pytest.raises(ProbeError, match="float tensor"):
        compute_rollout(model, torch.zeros(3, 32, 32))
    with pytest.raises(ProbeError, match="targets"):
        compute_rollout(model, x, method="relevance", targets=[0, 1])
    with pytest.raises(ProbeError, match="residual"):
        rollout_matrix([torch.rand(1, 1, 17, 17)], [TokenGeometry(1, (4, 4))], residual=1.0)
    with pytest.raises(ProbeError, match="no class token"):
        query_map(torch.rand(1, 4, 4), TokenGeometry(0, (2, 2)), TokenGeometry(0, (2, 2)), "class")
    with pytest.raises(ProbeError, match="gradient"):
        relevance_matrix([torch.rand(1, 1, 5, 5)], [None], [TokenGeometry(1, (2, 2))])


def test_registered_analysis_and_figure():
    from matplotlib.figure import Figure

    import probe
    from probe.report.plots_extra import rollout_figure

    x = torch.randn(4, 3, 32, 32)
    r = probe.analyze(tiny_vit(depth=2), x, analyses=["rollout"], analysis_options={"rollout": {"images": 3}},
                      fits=False, conv_test=False, attribution="none", progress=False, n_bootstrap=0,
                      data_overrides={"input_size": (3, 32, 32)})
    assert r.extras["rollout"].shape == (3, 4, 4)
    info = r.extras["rollout_info"]
    assert info["photos"].shape == (3, 32, 32, 3) and info["photos"].dtype == np.uint8
    fig = rollout_figure(r.extras["rollout"], info["photos"], titles=info["names"])
    assert isinstance(fig, Figure) and len(fig.axes) == 3
    with pytest.raises(ProbeError, match="photos"):
        rollout_figure(r.extras["rollout"], info["photos"][:1])
    with pytest.raises(ProbeError, match="rollout"):
        probe.analyze(tiny_vit(depth=1), x, analyses=["rollout"], analysis_options={"rollout": {"method": "lrp"}},
                      data_overrides={"input_size": (3, 32, 32)}, progress=False)


def test_rollout_npz_in_the_output_folder_and_after_load(tmp_path):
    import probe

    x = torch.randn(3, 3, 32, 32)
    r = probe.analyze(tiny_vit(depth=2), x, analyses=["rollout"], analysis_options={"rollout": {"images": 2}},
                      fits=False, conv_test=False, attribution="none", progress=False, n_bootstrap=0,
                      data_overrides={"input_size": (3, 32, 32)})
    r.write_report(tmp_path / "rep")
    data = np.load(tmp_path / "rep" / "rollout.npz")
    np.testing.assert_array_equal(data["maps"], r.extras["rollout"])
    assert data["maps"].shape == (2, 4, 4) and str(data["query"]) == "class"
    np.testing.assert_array_equal(data["layers"], [0, 1])
    loaded = probe.load(tmp_path / "rep")  # the maps survive the saved format and are written again
    loaded.save(tmp_path / "again")
    np.testing.assert_array_equal(np.load(tmp_path / "again" / "rollout.npz")["maps"], data["maps"])
