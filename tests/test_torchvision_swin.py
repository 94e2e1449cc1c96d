"""torchvision Swin v1 and v2: window attention mapped back to image positions (rule
``torchvision-swin-windows``, probe/families/torchvision_swin.py) — small random
``torchvision.models.swin_transformer.SwinTransformer`` models, no downloads.

Oracle (independent of the rule and of torchvision's ``shifted_window_attention``): each block's
input ``(B, H, W, C)`` is recorded by a plain forward pre-hook; in float64 the test recomputes every
window's probabilities from the module's weights by the paper's definitions — v1 (Liu et al. 2021,
Eq. 4): ``softmax(q k^T / sqrt(d) + B)`` with ``B`` read from ``relative_position_bias_table`` at
``(dy + M - 1)(2M - 1) + dx + M - 1``; v2 (Liu et al. 2022, Eq. 2-4): ``softmax(cos(q, k) ·
exp(min(logit_scale, log 100)) + 16 sigmoid(cpb_mlp(log-spaced offsets)))`` with the key bias of
``qkv`` zero — plus -100 between tokens of a shifted window that wrapped around from opposite image
borders, and scatters it by explicit loops (rolled row ``r`` of window row ``wr`` is image row
``(wr M + r + S) mod H``). The shift is 0 along an axis where the window covers the grid.
The 32x64 input gives stage grids 8x16 (shift 2 along both axes) and 4x8 (window 4 covers the 4
rows: shift 0 along H, 2 along W).
"""

from __future__ import annotations

import math

import pytest
import torch

tv_swin = pytest.importorskip("torchvision.models.swin_transformer")

import probe  # noqa: E402
from probe.attribution import HeadGates, attribute_heads  # noqa: E402
from probe.capture import AttentionCapture, find_attention_layers, infer_geometries  # noqa: E402
from probe.errors import CaptureError  # noqa: E402
from planted_heads import assert_all_importance_on, zero_heads_except  # noqa: E402

M = 4
HEADS = [2, 4]
SIZE = (32, 64)
GRIDS = [(8, 16), (8, 16), (4, 8), (4, 8)]


def build(version: int = 1) -> torch.nn.Module:
    """A tiny random torchvision Swin (patch 4, dims 16/32, 2 + 2 blocks, 4x4 windows); weights
    ~ N(0, 0.3) so the attention inside a window is far from uniform."""
    torch.manual_seed(0)
    extra = {} if version == 1 else dict(block=tv_swin.SwinTransformerBlockV2, downsample_layer=tv_swin.PatchMergingV2)
    net = tv_swin.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=HEADS,
                                  window_size=[M, M], num_classes=5, **extra)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.dim() > 1 and "logit_scale" not in name:
                p.normal_(0, 0.3)
    return net.eval()


def images(n: int = 2, size: tuple[int, int] = SIZE) -> torch.Tensor:
    return torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(1))


def block_inputs(net, layers, x) -> dict[int, torch.Tensor]:
    """Each attention module's input (B, H, W, C), by plain pre-hooks (no rule installed)."""
    rec: dict[int, torch.Tensor] = {}
    hooks = [l.module.register_forward_pre_hook(lambda m, a, i=l.index: rec.__setitem__(i, a[0].detach().clone()))
             for l in layers]
    try:
        with torch.no_grad():
            net(x)
    finally:
        for h in hooks:
            h.remove()
    return rec


def bias_v1(mod, dy: int, dx: int) -> torch.Tensor:
    return mod.relative_position_bias_table[(dy + M - 1) * (2 * M - 1) + dx + M - 1].double()


def bias_v2(mod, dy: int, dx: int) -> torch.Tensor:
    def coord(d: int) -> float:
        t = 8.0 * d / (M - 1)
        return math.copysign(math.log2(abs(t) + 1.0) / 3.0, t) if t else 0.0

    inp = torch.tensor([coord(dy), coord(dx)], dtype=torch.float64)
    l1, l2 = mod.cpb_mlp[0], mod.cpb_mlp[2]
    hidden = torch.relu(inp @ l1.weight.double().T + l1.bias.double())
    return 16 * torch.sigmoid(hidden @ l2.weight.double().T)


@torch.no_grad()
def oracle(mod, x: torch.Tensor, v2: bool) -> torch.Tensor:
    """Float64 ``(B, heads, H W, H W)`` attention of one torchvision Swin attention module."""
    b, hh, ww, c = x.shape
    heads = mod.num_heads
    d = c // heads
    shift = [0 if M >= g else int(s) for g, s in zip((hh, ww), mod.shift_size)]
    w_qkv, b_qkv = mod.qkv.weight.double(), mod.qkv.bias.double().clone()
    if v2:
        b_qkv[c:2 * c] = 0.0  # Swin v2: no key bias
    bias = {}
    for dy in range(-(M - 1), M):
        for dx in range(-(M - 1), M):
            bias[dy, dx] = (bias_v2 if v2 else bias_v1)(mod, dy, dx)
    dense = torch.zeros(b, heads, hh * ww, hh * ww, dtype=torch.float64)
    xd = x.double()
    for wr in range(hh // M):
        for wc in range(ww // M):
            toks = []  # (image row, image col, wrapped rows?, wrapped cols?, row, col in window)
            for r in range(M):
                for cc in range(M):
                    rr, rc = wr * M + r + shift[0], wc * M + cc + shift[1]
                    toks.append((rr % hh, rc % ww, rr >= hh, rc >= ww, r, cc))
            feats = torch.stack([xd[:, t[0], t[1]] for t in toks], 1)  # (B, n, C)
            qkv = feats @ w_qkv.T + b_qkv
            q, k = qkv[..., :c], qkv[..., c:2 * c]
            for h in range(heads):
                qh, kh = q[..., h * d:(h + 1) * d], k[..., h * d:(h + 1) * d]
                if v2:
                    scale = math.exp(min(float(mod.logit_scale[h].detach()), math.log(100.0)))
                    logits = (torch.nn.functional.normalize(qh, dim=-1)
                              @ torch.nn.functional.normalize(kh, dim=-1).transpose(1, 2)) * scale
                else:
                    logits = qh @ kh.transpose(1, 2) / math.sqrt(d)
                for i, ti in enumerate(toks):
                    for j, tj in enumerate(toks):
                        logits[:, i, j] += bias[ti[4] - tj[4], ti[5] - tj[5]][h]
                        if ti[2] != tj[2] or ti[3] != tj[3]:
                            logits[:, i, j] += -100.0
                p = logits.softmax(-1)
                for i, ti in enumerate(toks):
                    for j, tj in enumerate(toks):
                        dense[:, h, ti[0] * ww + ti[1], tj[0] * ww + tj[1]] = p[:, i, j]
    return dense


def capture(net, layers, x) -> dict[int, torch.Tensor]:
    got: dict[int, torch.Tensor] = {}
    with AttentionCapture(layers, lambda i, a: got.__setitem__(i, a.clone())), torch.no_grad():
        net(x)
    return got


@pytest.mark.parametrize("version", [1, 2])
def test_capture_equals_explicit_window_attention_on_the_image_grid(version):
    net = build(version)
    x = images()
    layers = find_attention_layers(net, (3, *SIZE))
    assert [l.rule.name for l in layers] == ["torchvision-swin-windows"] * 4
    with torch.no_grad():
        ref = net(x)
    got = capture(net, layers, x)
    with torch.no_grad():
        assert torch.equal(net(x), ref)
    assert all("forward" not in vars(m) for m in net.modules())  # wrapped forward removed
    inputs = block_inputs(net, layers, x)
    assert [tuple(inputs[l.index].shape[1:3]) for l in layers] == GRIDS
    assert [list(l.module.shift_size) for l in layers] == [[0, 0], [2, 2]] * 2  # stage 2: H shift dropped
    for l in layers:
        want = oracle(l.module, inputs[l.index], version == 2)
        a = got[l.index]
        tokens = GRIDS[l.index][0] * GRIDS[l.index][1]
        assert a.shape == want.shape == (2, HEADS[l.index // 2], tokens, tokens)
        err = (a.double() - want).abs().max()
        assert err < 1e-5, (version, l.name, float(err))
        torch.testing.assert_close(a.double().sum(-1), torch.ones(a.shape[:-1], dtype=torch.float64),
                                   atol=1e-5, rtol=0)
        assert ((a > 0).sum(-1) <= M * M).all()  # each query sees its window only
        assert (want - want.mean(-1, keepdim=True)).abs().max() > 1e-3  # not uniform
    geoms = infer_geometries(net, layers, (3, *SIZE))
    assert [(g.num_prefix_tokens, g.grid, g.pixels_per_token) for g in geoms.values()] == [
        (0, (8, 16), (4.0, 4.0))] * 2 + [(0, (4, 8), (8.0, 8.0))] * 2


def test_capture_logits_bit_identical_to_plain_model():
    """The same weights in a second model that never had the rule installed give the same logits."""
    net, plain = build(2), build(2)
    x = images()
    layers = find_attention_layers(net, (3, *SIZE))
    logits = {}
    with AttentionCapture(layers, lambda i, a: None), torch.no_grad():
        logits["captured"] = net(x)
    with torch.no_grad():
        logits["plain"] = plain(x)
    assert torch.equal(logits["captured"], logits["plain"])


def test_padded_windows_are_refused():
    net = build(1)
    layers = find_attention_layers(net, (3, 24, 24))
    with pytest.raises(CaptureError, match=r"6x6 token grid and 4x4 windows pads its windows.*--input-size"):
        infer_geometries(net, layers, (3, 24, 24))
    assert all("forward" not in vars(m) for m in net.modules())


def test_swin_t_factory_refused_where_its_last_stage_is_padded():
    """swin_t at 112 px: stage grids 28, 14, 7 and 4 (PatchMerging pads 7 to 8): the last stage's
    4x4 grid is padded to the 7x7 window."""
    net = tv_swin.swin_t(weights=None).eval()
    layers = find_attention_layers(net, (3, 112, 112))
    assert len(layers) == 12 and {l.rule.name for l in layers} == {"torchvision-swin-windows"}
    with pytest.raises(CaptureError, match=r"4x4 token grid and 7x7 windows pads its windows.*--input-size"):
        infer_geometries(net, layers[-2:], (3, 112, 112))


@pytest.mark.parametrize("version", [1, 2])
def test_attribution_gates(version):
    net = build(version)
    x = images()
    layers = find_attention_layers(net, (3, *SIZE))
    names = {l.index: l.name for l in layers}
    with torch.no_grad():
        ref = net(x)
        with HeadGates(net, names) as gates:
            assert gates.num_features == 2 + 2 + 4 + 4
            assert torch.equal(net(x), ref)
            gates.set(torch.ones(gates.num_features))
            assert torch.equal(net(x), ref)
            gates.set(torch.ones(x.shape[0], gates.num_features))
            assert torch.equal(net(x), ref)
            gates.set(torch.zeros(gates.num_features))
            assert (net(x) - ref).abs().max() > 1e-4  # the gates act
        assert torch.equal(net(x), ref)  # removed
    assert all("forward" not in vars(m) for m in net.modules())
    # planted: only head 1 of the last layer reaches the logits (weight surgery on proj's columns)
    keep = (layers[-1].index, 1)
    for l in layers:
        zero_heads_except(l.module.proj, HEADS[l.index // 2], l.index, keep)
    att = attribute_heads(net, x, methods=("ig", "ablation"), layers=names, n_steps=8)
    assert_all_importance_on(att, keep, version)


def test_capture_and_gate_installed_together_restore_in_any_order():
    net = build(1)
    layers = find_attention_layers(net, (3, *SIZE))
    rule, mod = layers[1].rule, layers[1].module
    seen = []
    undo_capture = rule.install(mod, seen.append)
    undo_gate = rule.install_gate(mod, 2, lambda: torch.tensor([[1.0, 0.0]]))
    with torch.no_grad():
        net(images())
    assert len(seen) == 1 and seen[0].shape == (2, 2, 128, 128)
    torch.testing.assert_close(seen[0].sum(-1), torch.ones(2, 2, 128))  # captured before the gate
    undo_capture()
    assert "forward" in vars(mod)
    undo_gate()
    assert "forward" not in vars(mod)


def test_analyze_end_to_end_on_a_tensor():
    net = build(1)
    x = images(3)
    result = probe.analyze(net, x, fits=False, conv_test=False, attribution="none", n_bootstrap=4,
                           data_overrides={"input_size": (3, *SIZE)})
    assert result.meta["capture_rule"] == ["torchvision-swin-windows"]
    assert [(s.geometry.grid, s.geometry.pixels_per_token, s.geometry.num_prefix_tokens)
            for _, s in sorted(result.stats.items())] == [((8, 16), (4.0, 4.0), 0)] * 2 + [((4, 8), (8.0, 8.0), 0)] * 2
    assert len(result.heads) == 2 + 2 + 4 + 4
    layers = find_attention_layers(net, (3, *SIZE))
    inputs = block_inputs(net, layers, x)
    for l in layers:
        want = oracle(l.module, inputs[l.index], False).mean(0)
        torch.testing.assert_close(result.stats[l.index].mean_attn.double(), want, atol=1e-5, rtol=0)
