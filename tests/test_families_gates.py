"""Head attribution in every captured family: gates at 1 change nothing (bit for bit), and a
planted one-head model puts all importance on that head under IG and ablation.

Oracle of the planted test (independent of the gates): weight surgery zeroes the output-projection
columns (``W_O^h``) of every head but one, so no other head can change the logits and their
attribution must be exactly 0, while the planted head's is not. A gate applied to the wrong slice,
the wrong head order or not at all fails it.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import family_models as fm
from probe.attribution import HeadGates, attribute_heads, gateable_modules, unsupported_reason
from probe.capture import find_attention_layers
from probe.data import eval_transform
from planted_heads import assert_all_importance_on, zero_heads_except

#: factory -> how the family is gated (for the report)
FAMILIES = [
    "deit_distilled", "dinov2_reg", "hybrid", "convit", "cait", "swin", "swinv2", "beit", "eva02", "eva_clip",
    "torchvision_vit", "encoder_vit", "encoder_vit_bf", "sdpa_vit", "handwritten_vit", "perhead_vit",
    "fused3d_vit", "unfold_mean_vit",
]


def build(factory: str) -> nn.Module:
    torch.manual_seed(0)
    model = getattr(fm, factory)().eval()
    with torch.no_grad():  # timm's 0.02 init barely moves the logits; make every head matter
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
            elif name.endswith("weight") and not p.any():  # Swin v2's zero-initialised post-norms
                p.fill_(1.0)
            elif "gamma" in name.rsplit(".", 1)[-1]:  # layer scale (DINOv2, CaiT) initialised at 1e-5
                p.fill_(1.0)
    return model


def input_shape(model: nn.Module) -> tuple[int, int, int]:
    cfg = {"input_size": (3, 32, 32)} if not getattr(model, "pretrained_cfg", None) else None
    return tuple(int(v) for v in eval_transform(model, cfg)[1]["input_size"])


def batch(model: nn.Module, n: int = 3) -> torch.Tensor:
    return torch.randn(n, *input_shape(model), generator=torch.Generator().manual_seed(1))


def out_projection(layer) -> tuple[nn.Linear | None, str]:
    """The Linear whose input columns are the heads' outputs (or CaiT's pre-mixing heads)."""
    mod = layer.module
    if layer.rule.name == "timm-cait-talking-heads":
        return mod.proj_w, "cait"
    if layer.rule.name == "timm-swin-windows":
        return mod.attn.proj, "cols"
    for name in ("proj", "o_proj", "out_proj", "out"):
        lin = getattr(mod, name, None)
        if isinstance(lin, nn.Linear):
            return lin, "cols"
    return None, ""


def plant(model: nn.Module, keep: tuple[int, int], shape) -> None:
    """Zero W_O^h of every head except ``keep = (layer, head)``."""
    layers = find_attention_layers(model, shape)
    with torch.no_grad():
        for layer in layers:
            lin, how = out_projection(layer)
            assert lin is not None, layer.name
            h = layer.rule.num_heads(layer.module) if layer.rule.name != "timm-cait-talking-heads" \
                else layer.module.num_heads
            zero_heads_except(lin, h, layer.index, keep)


@pytest.fixture(autouse=True)
def _no_fastpath():
    """nn.MultiheadAttention's fused eval fast path is a different kernel: the reference
    logits are those of the module's ordinary path, which the gates keep."""
    old = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    yield
    torch.backends.mha.set_fastpath_enabled(old)


@pytest.mark.parametrize("factory", FAMILIES)
def test_every_layer_is_gateable_and_gates_at_one_are_bit_identical(factory):
    model = build(factory)
    x = batch(model)
    layers = find_attention_layers(model, input_shape(model))
    assert [n for n, _ in gateable_modules(model)] == [l.name for l in layers]
    hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    assert unsupported_reason(model, {l.index: l.name for l in layers}) is None
    with torch.no_grad():
        ref = model(x)
        with HeadGates(model, {l.index: l.name for l in layers}) as gates:
            assert gates.num_features == sum(l.rule.num_heads(l.module) for l in layers)
            passthrough = model(x)
            gates.set(torch.ones(gates.num_features))
            ones = model(x)
            gates.set(torch.ones(x.shape[0], gates.num_features))
            ones_batch = model(x)
            gates.set(torch.zeros(gates.num_features))
            zeros = model(x)
        after = model(x)
    assert torch.equal(passthrough, ref)
    assert torch.equal(ones, ref)
    assert torch.equal(ones_batch, ref)
    assert torch.equal(after, ref)
    assert (zeros - ref).abs().max() > 1e-4  # the gates do act
    assert all("forward" not in vars(m) for m in model.modules())  # wrapped forwards restored
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()) == hooks


@pytest.mark.parametrize("factory", FAMILIES)
def test_planted_head_gets_all_importance(factory):
    model = build(factory)
    shape = input_shape(model)
    layers = find_attention_layers(model, shape)
    keep = (layers[-1].index, 1)
    plant(model, keep, shape)
    x = batch(model, 2)
    att = attribute_heads(model, x, methods=("ig", "ablation"), layers={l.index: l.name for l in layers},
                          n_steps=8)
    assert_all_importance_on(att, keep, factory, relative=True)


def test_gate_zero_equals_zeroing_the_heads_projection_columns_mha():
    """nn.MultiheadAttention: gating a head off equals the weight surgery on out_proj."""
    model = build("encoder_vit_bf")
    x = batch(model)
    layers = find_attention_layers(model, input_shape(model))
    surgery = build("encoder_vit_bf")
    with torch.no_grad():
        mha = find_attention_layers(surgery, input_shape(surgery))[1].module
        d = mha.embed_dim // mha.num_heads
        mha.out_proj.weight[:, 2 * d:3 * d] = 0.0
        want = surgery(x)
        with HeadGates(model, {l.index: l.name for l in layers}) as gates:
            g = torch.ones(gates.num_features)
            g[gates.features.index((1, 2))] = 0.0
            gates.set(g)
            got = model(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
