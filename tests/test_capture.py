"""Captured attention equals softmax(q k^T * scale) recomputed from the block's own qkv weights."""

from __future__ import annotations

import pytest
import torch

from probe.capture import AttentionCapture, find_attention_layers, infer_geometry, parse_layers
from probe.errors import CaptureError, ProbeError

from conftest import tiny_vit


def explicit_attention(attn_module, x):
    """softmax(q k^T / sqrt(d)) from the module's qkv Linear, written out."""
    B, N, C = x.shape
    H = attn_module.num_heads
    W, b = attn_module.qkv.weight, attn_module.qkv.bias
    qkv = x @ W.T + (b if b is not None else 0)
    q, k, _ = qkv.reshape(B, N, 3, H, -1).permute(2, 0, 3, 1, 4)
    d = q.shape[-1]
    return torch.softmax(q @ k.transpose(-1, -2) / d ** 0.5, dim=-1)


def capture_with_inputs(model, layer_ids, x):
    layers = [find_attention_layers(model)[i] for i in layer_ids]
    got, inputs, handles = {}, {}, []
    for l in layers:
        handles.append(l.module.register_forward_pre_hook(
            lambda m, args, i=l.index: inputs.__setitem__(i, args[0].detach())))
    cap = AttentionCapture(layers, lambda i, a: got.__setitem__(i, a.clone()))
    with cap, torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return got, inputs, layers


@pytest.mark.parametrize("kw,prefix", [({}, 1), ({"class_token": False, "global_pool": "avg"}, 0),
                                       ({"reg_tokens": 2}, 3)])
def test_timm_capture_matches_explicit_math(kw, prefix):
    model = tiny_vit(**kw)
    x = torch.randn(2, 3, 32, 32)
    got, inputs, layers = capture_with_inputs(model, [0, 1, 2], x)
    for l in layers:
        expect = explicit_attention(l.module, inputs[l.index])
        assert got[l.index].shape == (2, 3, 16 + prefix, 16 + prefix)
        torch.testing.assert_close(got[l.index], expect, rtol=1e-5, atol=1e-6)
    g = infer_geometry(model, layers[0], (3, 32, 32))
    assert (g.num_prefix_tokens, g.grid, g.pixels_per_token) == (prefix, (4, 4), (8.0, 8.0))


def test_deit_tiny_real_weights_capture_matches_explicit_math(deit_weights):
    import timm
    from safetensors.torch import load_file

    model = timm.create_model("deit_tiny_patch16_224")
    model.load_state_dict(load_file(str(deit_weights)))
    model.eval()
    x = torch.randn(1, 3, 224, 224)
    got, inputs, layers = capture_with_inputs(model, [0, 5, 11], x)
    for l in layers:
        torch.testing.assert_close(got[l.index], explicit_attention(l.module, inputs[l.index]),
                                   rtol=1e-5, atol=1e-6)


def test_capture_restores_fused_attention_and_output():
    model = tiny_vit()
    before = [m.fused_attn for m in (b.attn for b in model.blocks)]
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    layers = find_attention_layers(model)
    with AttentionCapture(layers, lambda i, a: None):
        assert all(not b.attn.fused_attn for b in model.blocks)
        with torch.no_grad():
            inside = model(x)
    assert [b.attn.fused_attn for b in model.blocks] == before
    assert not any(m._forward_hooks for m in model.modules())
    torch.testing.assert_close(inside, ref, rtol=1e-5, atol=1e-5)


def test_capture_restores_after_exception():
    model = tiny_vit()
    before = [b.attn.fused_attn for b in model.blocks]

    def boom(i, a):
        raise RuntimeError("sink failed")

    with pytest.raises(RuntimeError):
        with AttentionCapture(find_attention_layers(model), boom), torch.no_grad():
            model(torch.randn(1, 3, 32, 32))
    assert [b.attn.fused_attn for b in model.blocks] == before
    assert not any(m._forward_hooks for m in model.modules())


def test_silent_layer_is_an_error():
    model = tiny_vit()
    layers = find_attention_layers(model)

    model.blocks[2].attn.forward = lambda x, *a, **k: x  # this layer no longer computes attention
    cap = AttentionCapture(layers, lambda i, a: None)
    with cap, torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    with pytest.raises(CaptureError, match="layer.*2.*yielded no attention"):
        cap.check_all_captured("tiny")


@pytest.mark.parametrize("spec,expect", [("all", [0, 1, 2, 3]), ("0-2", [0, 1, 2]), ("0,2", [0, 2]),
                                         ("-1", [3]), ("1-2,0", [0, 1, 2]), ([3, 1], [1, 3])])
def test_parse_layers(spec, expect):
    assert parse_layers(spec, 4) == expect


@pytest.mark.parametrize("spec,msg", [("0-12", "out of range.*12 attention layers"), ("a-b", "malformed"),
                                      ("3-1", "malformed"), ("12", "out of range"), ("", "malformed")])
def test_parse_layers_errors(spec, msg):
    with pytest.raises(ProbeError, match=msg):
        parse_layers(spec, 12)


def test_grid_that_does_not_match_tokens_is_refused():
    model = tiny_vit()
    layer = find_attention_layers(model)[0]
    with pytest.raises(ProbeError, match="17 tokens.*--grid"):
        infer_geometry(model, layer, (3, 32, 32), num_prefix_tokens=1, grid=(5, 5))
