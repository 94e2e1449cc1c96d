"""Theorem 1 of Cordonnier et al. (2020) as code: conv2d == quadratic-encoding MHSA."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from probe.conv_equivalence import (
    QuadraticMHSA,
    attention_from_conv,
    conv_equivalent_vit,
    conv_kernel_offsets,
    equivalence_errors,
)
from probe.errors import ProbeError

torch.set_num_threads(1)


def _conv(c_in=4, c_out=5, k=3, seed=0, **kw):
    torch.manual_seed(seed)
    return nn.Conv2d(c_in, c_out, k, **kw).double()


def _interior(y, reach):
    return y[..., reach:-reach, reach:-reach]


def test_interior_matches_conv2d_float64():
    conv = _conv(padding=1)
    x = torch.randn(2, 4, 10, 11, dtype=torch.float64)
    y = attention_from_conv(conv, alpha=40.0)(x)
    ref = conv(x)
    assert y.shape == ref.shape == (2, 5, 10, 11)
    assert torch.allclose(_interior(y, 1), _interior(ref, 1), rtol=0, atol=1e-12)


def test_interior_matches_conv2d_float32_1e5():
    torch.manual_seed(1)
    conv = nn.Conv2d(8, 6, 3, padding="same")
    x = torch.randn(3, 8, 9, 9)
    y = attention_from_conv(conv, alpha=30.0)(x)
    assert (_interior(y, 1) - _interior(conv(x), 1)).abs().max() < 1e-5


def test_border_renormalise_is_replicate_padding_and_zero_pad_is_zero_padding():
    conv = _conv(padding=1)
    x = torch.randn(2, 4, 7, 8, dtype=torch.float64)
    ref_zero = conv(x)
    ref_rep = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), conv.weight, conv.bias)
    y_ren = attention_from_conv(conv, alpha=40.0, border="renormalise")(x)
    y_pad = attention_from_conv(conv, alpha=40.0, border="zero_pad")(x)
    # everywhere, including the border ring
    assert torch.allclose(y_ren, ref_rep, rtol=0, atol=1e-12)
    assert torch.allclose(y_pad, ref_zero, rtol=0, atol=1e-12)
    # and the renormalising layer is NOT the zero-padded conv on the border
    border = (y_ren - ref_zero).abs().clone()
    border[..., 1:-1, 1:-1] = 0
    assert border.max() > 0.1


def test_error_decreases_with_alpha_like_exp_minus_alpha():
    conv = _conv(padding=1)
    df = equivalence_errors(conv, alphas=(0.5, 1, 2, 4, 8, 16, 32), size=(9, 9))
    sel = df[(df.border == "renormalise") & (df.reference == "zeros") & (df.region == "interior")]
    err = sel.sort_values("alpha").max_abs_error.to_numpy()
    assert (err[1:] < err[:-1]).all()
    assert err[0] > 1e-2 and err[-1] < 1e-10
    # leading order: a head leaks ~4 exp(-alpha) of its mass, so the error scales as exp(-alpha)
    by_alpha = dict(zip(sel.alpha, sel.max_abs_error))
    assert math.log(by_alpha[16] / by_alpha[8]) == pytest.approx(-8, abs=0.3)
    assert math.log(by_alpha[32] / by_alpha[16]) == pytest.approx(-16, abs=0.3)
    # border of the renormalising layer converges to replicate padding
    rep = df[(df.border == "renormalise") & (df.reference == "replicate") & (df.region == "border")]
    assert rep.sort_values("alpha").max_abs_error.iloc[-1] < 1e-10


def test_attention_is_one_hot_on_kernel_offsets():
    conv = _conv(padding=1)
    layer = attention_from_conv(conv, alpha=30.0)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    _, attn = layer(x, return_attention=True)
    assert attn.shape == (2, 9, 36, 36)
    assert torch.allclose(attn.sum(-1), torch.ones(2, 9, 36, dtype=torch.float64))
    offs = conv_kernel_offsets(conv)
    assert sorted(map(tuple, offs.tolist())) == [(r, c) for r in (-1, 0, 1) for c in (-1, 0, 1)]
    q = 2 * 6 + 3  # interior query (2, 3)
    for h, (dr, dc) in enumerate(offs.tolist()):
        k = int((2 + dr) * 6 + (3 + dc))
        assert attn[0, h, q].argmax().item() == k
        assert attn[0, h, q, k].item() > 1 - 1e-12


def test_dilation_nonsquare_and_groups():
    torch.manual_seed(3)
    conv = nn.Conv2d(4, 6, (3, 5), padding="same", dilation=(2, 1), groups=2).double()
    x = torch.randn(1, 4, 11, 12, dtype=torch.float64)
    y = attention_from_conv(conv, alpha=40.0, border="zero_pad")(x)
    assert torch.allclose(y, conv(x), rtol=0, atol=1e-12)
    assert attention_from_conv(conv).num_heads == 15


def test_token_mode_with_prefix_matches_feature_map_mode():
    conv = _conv(c_in=6, c_out=6, padding=1)
    fmap_layer = attention_from_conv(conv, alpha=30.0)
    tok_layer = attention_from_conv(conv, alpha=30.0, num_prefix_tokens=1, grid=(5, 7))
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64)
    cls = torch.randn(2, 1, 6, dtype=torch.float64)
    tokens = torch.cat([cls, x.flatten(2).transpose(1, 2)], dim=1)
    y_tok, attn = tok_layer(tokens, return_attention=True)
    y_map = fmap_layer(x)
    assert torch.allclose(y_tok[:, 1:].transpose(1, 2).reshape(2, 6, 5, 7), y_map, atol=1e-12)
    assert attn.shape == (2, 9, 36, 36)
    assert attn[:, :, 1:, 0].abs().max() == 0  # patch queries give the class token nothing
    assert torch.allclose(attn[:, :, 0], torch.full_like(attn[:, :, 0], 1 / 36))


def test_alpha_zero_is_uniform_attention():
    layer = QuadraticMHSA(3, 3, torch.zeros(2, 2), 0.0).double()
    a = layer.attention_probabilities((4, 5))
    assert torch.allclose(a, torch.full_like(a, 1 / 20))


def test_bad_inputs_raise_probe_error():
    with pytest.raises(ProbeError):
        attention_from_conv(nn.Conv2d(2, 2, 3, stride=2, padding=1))
    with pytest.raises(ProbeError):
        attention_from_conv(nn.Conv2d(2, 2, 3, padding=0))
    with pytest.raises(ProbeError):
        attention_from_conv(nn.Linear(2, 2))
    layer = attention_from_conv(nn.Conv2d(2, 2, 3, padding=1))
    with pytest.raises(ProbeError):
        layer(torch.randn(1, 3, 5, 5))
    with pytest.raises(ProbeError):
        layer(torch.randn(1, 7, 2))  # 7 tokens: no square grid
    with pytest.raises(ProbeError):
        QuadraticMHSA(2, 2, torch.zeros(3, 2), alpha=-1.0)


def test_conv_equivalent_vit_planted_attention():
    model = conv_equivalent_vit(depth=4, conv_layers=2, img_size=32, patch_size=4, embed_dim=24)
    captured = {}
    for i, blk in enumerate(model.blocks):
        blk.attn.attn_drop.register_forward_hook(
            lambda m, inp, out, i=i: captured.__setitem__(i, out.detach())
        )
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (2, 10)
    assert model.planted["conv_layers"] == [0, 1]
    assert captured[0].shape == (2, 9, 65, 65) and captured[3].shape == (2, 3, 65, 65)
    # early layers: one-hot on the 3x3 offsets for an interior query; late: uniform over patches
    q = 1 + 3 * 8 + 4
    for h in range(9):
        assert captured[1][0, h, q].max() > 1 - 1e-6
    late = captured[2][0, :, 1:, 1:]
    assert torch.allclose(late, torch.full_like(late, 1 / 64))


def test_conv_equivalent_vit_block_attention_equals_conv():
    torch.manual_seed(0)
    model = conv_equivalent_vit(depth=2, conv_layers=1, img_size=32, patch_size=4, embed_dim=12,
                                num_heads=3)
    attn = model.blocks[0].attn
    # recover the conv from the layer and check the layer computes it on patch tokens
    w = attn.value.weight.detach().reshape(3, 3, 12, 12).permute(2, 3, 0, 1)
    conv = nn.Conv2d(12, 12, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(w)
        conv.bias.copy_(attn.proj.bias)
    tokens = torch.randn(2, 65, 12)
    with torch.no_grad():
        y = attn(tokens)[:, 1:].transpose(1, 2).reshape(2, 12, 8, 8)
        ref = conv(tokens[:, 1:].transpose(1, 2).reshape(2, 12, 8, 8))
    assert (y - ref)[..., 1:-1, 1:-1].abs().max() < 1e-5


def test_reset_parameters_gives_untrained_non_local_heads():
    layer = attention_from_conv(_conv(padding=1), alpha=30.0)
    torch.manual_seed(0)
    layer.reset_parameters()
    assert torch.all(layer.alpha == QuadraticMHSA.INIT_ALPHA)
    offs = conv_kernel_offsets(_conv(padding=1)).double()
    assert not torch.allclose(layer.delta, offs)
    assert 0.5 < layer.delta.std().item() < 1.5
    # alpha = 0.1: the head's best key holds little mass on a 9x9 grid
    a = layer.attention_probabilities((9, 9))
    assert a.max() < 0.2
