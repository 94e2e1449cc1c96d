"""Capture from the families of issue 14: separate per-head modules, 3-D ``(batch·heads, T, T)``
scores, patches from ``Tensor.unfold`` without class token, timm BEiT (relative position bias),
EVA-02 (rotary position embedding) and CLIP towers.

Oracles are written here from the papers' definitions, from each module's own weights on the input
it received (a forward pre-hook), independently of the capture code: the relative-position index of
BEiT (Bao et al. 2022, Sec. 2.2, from the position arithmetic, not the model's buffer) and the
rotation of RoPE (Su et al. 2021, Eq. 34, pairs of channels rotated by the model's angles).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attention_math as am
import family_models as fm
import probe
from probe.capture import find_attention_layers, infer_geometries
from probe.errors import ProbeError

TOL = 1e-5


def build(factory: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = getattr(fm, factory)().eval()
    with torch.no_grad():  # sharpen the attention so that a wrong oracle cannot pass by uniformity
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
            elif "relative_position_bias_table" in name:
                p.normal_(0, 1.0)
    return model


def shape_of(model) -> tuple[int, int, int]:
    return tuple(int(v) for v in model.pretrained_cfg["input_size"])


def capture(model, x):
    """Captured attention, each layer module's first input and its keyword arguments."""
    return fm.capture_with_inputs(model, x, keyword_args=True)


def batch(model, n=2):
    return torch.randn(n, *shape_of(model), generator=torch.Generator().manual_seed(1))


def _geom(g):
    return g.num_prefix_tokens, g.grid, g.pixels_per_token


# ------------------------------------------------------------------ separate heads, 3-D scores
def per_head_math(mod, x):
    """``softmax(q_h k_h^T / sqrt(d))`` of each ``Head`` of a ``PerHeadAttention``, head order."""
    x = x.double()
    out = []
    for head in mod.heads:
        q, k = x @ head.query.weight.double().T, x @ head.key.weight.double().T
        out.append(torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1))
    return torch.stack(out, dim=1)


def test_separate_head_modules_are_one_layer_in_head_order():
    model = build("perhead_vit")
    layers, got, inputs = capture(model, batch(model))
    assert [(l.name, l.rule.name, l.rule.num_heads(l.module)) for l in layers] == [
        (f"blocks.{i}.attn:heads", "functional-fallback (separate per-head modules)", 4) for i in range(2)]
    for l in layers:
        want = per_head_math(l.module, inputs[l.index][0])
        assert got[l.index].shape == want.shape == (2, 4, 17, 17)
        err = (got[l.index].double() - want).abs().max()
        assert err < TOL, (l.name, float(err))
        # heads differ, so a wrong head order would fail
        assert (want[:, 0] - want[:, 1]).abs().max() > 1e-2
    g = infer_geometries(model, layers, shape_of(model))
    assert {_geom(v) for v in g.values()} == {(1, (4, 4), (8.0, 8.0))}


def test_three_d_scores_reshaped_from_four_d():
    model = build("fused3d_vit")
    layers, got, inputs = capture(model, batch(model, 3))
    assert [l.rule.name for l in layers] == ["functional-fallback (softmax over (batch·heads, T, T))"] * 2
    for l in layers:
        want = am.user_hand(l.module, inputs[l.index][0])
        assert got[l.index].shape == want.shape == (3, 4, 17, 17)
        assert (got[l.index].double() - want).abs().max() < TOL
        assert (want[1] - want[0]).abs().max() > 1e-2  # images differ: batch-major order is checked


# ------------------------------------------------------------------ no class token, no conv
@pytest.mark.parametrize("factory", ["unfold_mean_vit", "unfold_token0_vit"])
def test_unfold_patches_without_class_token(factory):
    model = build(factory)
    layers, got, inputs = capture(model, batch(model))
    for l in layers:
        want = am.user_hand(l.module, inputs[l.index][0])
        assert got[l.index].shape == (2, 4, 16, 16)
        assert (got[l.index].double() - want).abs().max() < TOL
    g = infer_geometries(model, layers, shape_of(model))
    assert {_geom(v) for v in g.values()} == {(0, (4, 4), (8.0, 8.0))}


def test_overlapping_unfold_patches_need_the_patch_size():
    """7x7 tokens 4 px apart on a 32 px image: refused (naming the options) rather than put
    32/7 px apart; with --patch-size 4 the geometry is right."""
    model = build("unfold_overlap_vit")
    layers = find_attention_layers(model, shape_of(model))
    with pytest.raises(ProbeError, match=r"49 tokens.*7x7.*4\.571x4\.571 px.*--patch-size.*--grid.*--prefix-tokens"):
        infer_geometries(model, layers, shape_of(model), model_name="unfold_overlap_vit")
    g = infer_geometries(model, layers, shape_of(model), patch_size=4)
    assert {_geom(v) for v in g.values()} == {(0, (7, 7), (4.0, 4.0))}


def test_unfold_model_end_to_end_with_attribution():
    res = probe.analyze(build("unfold_mean_vit"), torch.rand(3, 3, 32, 32), n_bootstrap=0,
                        attribution="ablation", attribution_images=2)
    assert res.geometry.num_prefix_tokens == 0 and res.geometry.grid == (4, 4)
    assert "attribution_skipped" not in res.meta
    assert res.heads["importance_ablation"].notna().all()


# ------------------------------------------------------------------ relative position bias, RoPE
def beit_relative_index(wh: int, ww: int) -> torch.Tensor:
    """BEiT's relative position index for a ``wh x ww`` grid plus the class token (Bao et al.
    2022; Swin's Eq. 4 indexing): patch-to-patch offsets ``(dy + wh - 1) (2 ww - 1) + dx + ww - 1``,
    then class-to-patch, patch-to-class and class-to-class as the last three table rows."""
    n = wh * ww
    rows = torch.arange(n) // ww
    cols = torch.arange(n) % ww
    dy = rows[:, None] - rows[None, :] + wh - 1
    dx = cols[:, None] - cols[None, :] + ww - 1
    size = (2 * wh - 1) * (2 * ww - 1)
    idx = torch.empty(n + 1, n + 1, dtype=torch.long)
    idx[1:, 1:] = dy * (2 * ww - 1) + dx
    idx[0, 1:] = size
    idx[1:, 0] = size + 1
    idx[0, 0] = size + 2
    return idx


def beit_math(mod, x):
    x = x.double()
    b, n, c = x.shape
    h = mod.num_heads
    bias = torch.cat([mod.q_bias, mod.k_bias, mod.v_bias]).double()
    qkv = F.linear(x, mod.qkv.weight.double(), bias)
    q, k = am._heads(qkv[..., :c], h), am._heads(qkv[..., c:2 * c], h)
    wh, ww = mod.window_size
    table = mod.relative_position_bias_table.double()
    rel = table[beit_relative_index(wh, ww)].permute(2, 0, 1)  # (H, N, N)
    return torch.softmax(q @ k.transpose(-2, -1) * (c // h) ** -0.5 + rel, dim=-1)


def test_beit_relative_position_bias_is_in_the_probabilities():
    model = build("beit")
    layers, got, inputs = capture(model, batch(model))
    assert [l.rule.name for l in layers] == ["timm-attention"] * 2
    assert (beit_relative_index(4, 4) == layers[0].module.relative_position_index).all()
    for l in layers:
        want = beit_math(l.module, inputs[l.index][0])
        assert (got[l.index].double() - want).abs().max() < TOL
    # the bias matters: the oracle without it is far from the capture
    mod, x = layers[0].module, inputs[0][0]
    saved = mod.relative_position_bias_table.detach().clone()
    with torch.no_grad():
        mod.relative_position_bias_table.zero_()
    no_bias = beit_math(mod, x)
    with torch.no_grad():
        mod.relative_position_bias_table.copy_(saved)
    assert (got[0].double() - no_bias).abs().max() > 1e-2
    g = infer_geometries(model, layers, shape_of(model))
    assert {_geom(v) for v in g.values()} == {(1, (4, 4), (16.0, 16.0))}


def rotate(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor, half: bool) -> torch.Tensor:
    """RoPE (Su et al. 2021, Eq. 34): channel pairs ``(x_2i, x_2i+1)`` (or ``(x_i, x_i+d/2)`` with
    ``half``) rotated by the angles whose sines and cosines are given per channel."""
    if half:
        x1, x2 = x.chunk(2, dim=-1)
        rot = torch.cat([-x2, x1], dim=-1)
    else:
        rot = torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).reshape(x.shape)
    return x * cos + rot * sin


def eva_math(mod, x, rope):
    x = x.double()
    b, n, c = x.shape
    h = mod.num_heads
    if mod.qkv is not None:
        bias = None if mod.q_bias is None else torch.cat([mod.q_bias, mod.k_bias, mod.v_bias]).double()
        qkv = F.linear(x, mod.qkv.weight.double(), bias)
        q, k = am._heads(qkv[..., :c], h), am._heads(qkv[..., c:2 * c], h)
    else:
        q = am._heads(F.linear(x, mod.q_proj.weight.double(), am._d(mod.q_proj.bias)), h)
        k = am._heads(F.linear(x, mod.k_proj.weight.double(), am._d(mod.k_proj.bias)), h)
    assert isinstance(mod.q_norm, torch.nn.Identity) and isinstance(mod.k_norm, torch.nn.Identity)
    sin, cos = rope.double().tensor_split(2, -1)
    npt = mod.num_prefix_tokens
    half = bool(getattr(mod, "rotate_half", False))
    q = torch.cat([q[:, :, :npt], rotate(q[:, :, npt:], sin, cos, half)], dim=2)
    k = torch.cat([k[:, :, :npt], rotate(k[:, :, npt:], sin, cos, half)], dim=2)
    return torch.softmax(q @ k.transpose(-2, -1) * (c // h) ** -0.5, dim=-1)


def test_eva02_rotary_embedding_is_in_the_probabilities():
    model = build("eva02")
    layers, got, inputs = capture(model, batch(model))
    assert [l.rule.name for l in layers] == ["timm-attention"] * 2
    for l in layers:
        x, kwargs = inputs[l.index]
        rope = kwargs["rope"]
        assert rope is not None and rope.shape[0] == 16  # one angle set per patch token
        want = eva_math(l.module, x, rope)
        assert (got[l.index].double() - want).abs().max() < TOL
        unrotated = eva_math(l.module, x, torch.cat([torch.zeros_like(rope[:, :rope.shape[1] // 2]),
                                                      torch.ones_like(rope[:, rope.shape[1] // 2:])], -1))
        assert (got[l.index].double() - unrotated).abs().max() > 1e-2  # the rotation matters
    g = infer_geometries(model, layers, shape_of(model))
    assert {_geom(v) for v in g.values()} == {(1, (4, 4), (14.0, 14.0))}


def test_timm_clip_tower():
    model = build("eva_clip")
    layers, got, inputs = capture(model, batch(model))
    assert type(model.norm_pre).__name__ == "LayerNorm"  # CLIP's pre-norm: the CLIP layout
    for l in layers:
        assert (got[l.index].double() - am.timm_vit(l.module, inputs[l.index][0])).abs().max() < TOL
    g = infer_geometries(model, layers, shape_of(model))
    assert {_geom(v) for v in g.values()} == {(1, (4, 4), (16.0, 16.0))}
