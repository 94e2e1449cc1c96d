"""Hugging Face Swin (v1 and v2): window attention mapped back to image positions (rule
``hf-swin-windows``, probe/families/hf_swin.py) — random weights from tiny configs, no downloads.

Oracle: the window attentions ``transformers`` computes itself under eager attention — those it
returns with ``output_attentions=True`` (its output recorder: the last block of every stage) and,
for every block, the ``(output, weights)`` of its attention module — scattered into the stage's
full ``(H W, H W)`` grid by index arithmetic written here (window ``w`` = row-major window index,
token ``i`` = row-major inside the window; rolled coordinates ``(w // nW_cols · M + i // M,
w % nW_cols · M + i % M)``; the block rolled the grid by ``-S``, so rolled row ``r`` is image row
``(r + S) mod H``), independent of probe's ``window_positions``. The v1 model is built with SDPA, so
the test also checks that capture forces eager attention per layer and restores the setting.
Geometry: the stage grids 16x16 and 8x8 at 2 and 4 px per token, no prefix token. Attribution:
gates at 1 are bit-identical and a planted one-head model gets all the importance.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import probe  # noqa: E402
from probe.attribution import HeadGates, attribute_heads  # noqa: E402
from probe.capture import AttentionCapture, find_attention_layers, infer_geometries  # noqa: E402
from probe.errors import CaptureError  # noqa: E402
from probe.models import resolve_model  # noqa: E402

from test_hf_families import set_attn  # noqa: E402
from planted_heads import assert_all_importance_on, zero_heads_except  # noqa: E402

TINY = dict(image_size=32, patch_size=2, num_channels=3, embed_dim=16, depths=[2, 2], num_heads=[2, 4],
            window_size=4, num_labels=5)
GRIDS = [(16, 16), (16, 16), (8, 8), (8, 8)]  # per block: 32 px / 2 px patches, then merged 2x2
WINDOW = 4


def build(version: int = 1, sdpa: bool = True):
    """A tiny random HF Swin classifier (v1: built with SDPA attention); weights ~ N(0, 0.3) so the
    attention inside a window is far from uniform (the relative position bias tables too)."""
    torch.manual_seed(0)
    if version == 1:
        cfg = transformers.SwinConfig(**TINY)
        if sdpa:
            cfg._attn_implementation = "sdpa"
        net = transformers.SwinForImageClassification(cfg)
    else:
        net = transformers.Swinv2ForImageClassification(transformers.Swinv2Config(**TINY))
    with torch.no_grad():
        for _, p in net.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return net.eval()


def images(n: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def scatter(win: torch.Tensor, grid: tuple[int, int], m: int, s: int) -> torch.Tensor:
    """``(B·nW, heads, m², m²)`` window attention -> float64 ``(B, heads, H W, H W)`` by explicit
    index arithmetic (see the module docstring)."""
    hh, ww = grid
    ncols = ww // m
    nw = (hh // m) * ncols
    b = win.shape[0] // nw
    dense = torch.zeros(b, win.shape[1], hh * ww, hh * ww, dtype=torch.float64)
    for w in range(nw):
        pos = []
        for i in range(m * m):
            r = (w // ncols) * m + i // m  # row, col in the rolled grid
            c = (w % ncols) * m + i % m
            pos.append(((r + s) % hh) * ww + (c + s) % ww)
        p = torch.tensor(pos)
        for img in range(b):
            dense[img, :, p[:, None], p[None, :]] = win[img * nw + w].double()
    return dense


def hf_window_attentions(net, layers, x):
    """Run ``net`` eagerly with ``output_attentions=True``; per layer (block) the window attention
    its attention module returned, the grid it was called with and its window / shift then."""
    set_attn(net, "eager")
    rec: dict[int, dict] = {}
    hooks = []
    for l in layers:
        def pre(mod, args, kwargs, i=l.index):
            rec.setdefault(i, {})["grid"] = tuple(int(v) for v in args[1])

        def post(mod, args, out, i=l.index, block=l.module):
            rec[i].update(win=out[1].detach().clone(), window=int(block.window_size), shift=int(block.shift_size))

        hooks += [l.module.register_forward_pre_hook(pre, with_kwargs=True),
                  l.module.attention.register_forward_hook(post)]
    try:
        with torch.no_grad():
            out = net(x, output_attentions=True)
    finally:
        for h in hooks:
            h.remove()
    # transformers' own output: one map per stage (its last block) or, in releases that return
    # them all, one per block — either way it must be what the blocks computed
    returned = list(out.attentions)
    last = [1, 3] if len(returned) == 2 else list(range(len(layers)))
    assert len(returned) == len(last)
    for i, a in zip(last, returned):
        assert torch.equal(a, rec[i]["win"])
    return rec, out.logits


def capture(net, layers, x):
    got: dict[int, torch.Tensor] = {}
    with AttentionCapture(layers, lambda i, a: got.__setitem__(i, a.clone())), torch.no_grad():
        if getattr(layers[0].module.attention, "config", None) is not None:  # v1: eager while installed
            assert all(l.module.attention.config._attn_implementation == "eager" for l in layers)
        net(x)
    return got


@pytest.mark.parametrize("version", [1, 2])
def test_capture_equals_hf_window_attentions_on_the_image_grid(version):
    net = resolve_model(build(version)).model
    x = images()
    layers = find_attention_layers(net, (3, 32, 32))
    assert [l.rule.name for l in layers] == ["hf-swin-windows"] * 4
    got = capture(net, layers, x)
    if version == 1:  # SDPA before and after capture: eager only while installed
        assert all(l.module.attention.config._attn_implementation == "sdpa" for l in layers)
    rec, _ = hf_window_attentions(net, layers, x)
    assert [rec[l.index]["grid"] for l in layers] == GRIDS
    assert [(rec[l.index]["window"], rec[l.index]["shift"]) for l in layers] == [(4, 0), (4, 2)] * 2
    for l in layers:
        r = rec[l.index]
        want = scatter(r["win"], r["grid"], r["window"], r["shift"])
        a = got[l.index]
        tokens = r["grid"][0] * r["grid"][1]
        assert a.shape == want.shape == (2, net.config.num_heads[l.index // 2], tokens, tokens)
        err = (a.double() - want).abs().max()
        assert err < 1e-5, (version, l.name, float(err))
        torch.testing.assert_close(a.double().sum(-1), torch.ones(a.shape[:-1], dtype=torch.float64),
                                   atol=1e-5, rtol=0)
        assert ((a > 0).sum(-1) <= WINDOW ** 2).all()  # each query sees its window only
        assert (r["win"] - r["win"].mean(-1, keepdim=True)).abs().max() > 1e-3  # not uniform
    geoms = infer_geometries(net, layers, (3, 32, 32))
    assert [(g.num_prefix_tokens, g.grid, g.pixels_per_token) for g in geoms.values()] == [
        (0, (16, 16), (2.0, 2.0))] * 2 + [(0, (8, 8), (4.0, 4.0))] * 2


def test_clamped_window_is_captured_as_computed():
    """A 16 px input gives a 4x4 second stage, equal to the window: transformers drops the shift of
    its shifted block (and keeps it dropped); capture follows what the model computed."""
    net = resolve_model(build(1)).model
    layers = find_attention_layers(net)
    assert int(layers[3].module.shift_size) == 2
    x = images(size=16)
    got = capture(net, layers, x)
    assert int(layers[3].module.shift_size) == 0
    rec, _ = hf_window_attentions(net, layers, x)
    assert [rec[l.index]["grid"] for l in layers] == [(8, 8), (8, 8), (4, 4), (4, 4)]
    for l in layers:
        r = rec[l.index]
        torch.testing.assert_close(got[l.index].double(), scatter(r["win"], r["grid"], r["window"], r["shift"]),
                                   atol=1e-5, rtol=0)


@pytest.mark.parametrize("size,match", [
    (24, r"6x6 token grid and 4x4 windows pads its windows.*--input-size"),
    (8, r"2x2 token grid: transformers clamps its 4x4 window to 2x2.*--input-size"),
])
def test_padded_or_shrunk_windows_are_refused(size, match):
    net = resolve_model(build(1)).model
    layers = find_attention_layers(net)
    with pytest.raises(CaptureError, match="SwinForImageClassification: .*" + match):
        infer_geometries(net, layers, (3, size, size))
    assert net.config._attn_implementation == "sdpa"  # restored after the refusal too


def _out_proj(layer) -> torch.nn.Linear:
    attn = layer.module.attention
    return attn.o_proj if hasattr(attn, "o_proj") else attn.output.dense


@pytest.mark.parametrize("version", [1, 2])
def test_attribution_gates(version):
    net = resolve_model(build(version)).model
    x = images()
    layers = find_attention_layers(net)
    names = {l.index: l.name for l in layers}
    with torch.no_grad():
        ref = net(x).logits
        with HeadGates(net, names) as gates:
            assert gates.num_features == 2 + 2 + 4 + 4
            gates.set(torch.ones(gates.num_features))
            assert torch.equal(net(x).logits, ref)
            gates.set(torch.zeros(gates.num_features))
            assert (net(x).logits - ref).abs().max() > 1e-4  # the gates act
        assert torch.equal(net(x).logits, ref)  # removed
    # planted: only head 1 of the last layer reaches the logits
    keep = (layers[-1].index, 1)
    for l in layers:
        zero_heads_except(_out_proj(l), net.config.num_heads[l.index // 2], l.index, keep)
    att = attribute_heads(net, x, methods=("ig", "ablation"), layers=names, n_steps=8)
    assert_all_importance_on(att, keep, version)


def test_analyze_end_to_end_on_a_tensor():
    """``probe.analyze`` on the in-memory SDPA model and a tensor batch: per-layer geometry, the
    rule named in the metadata, and the mean attention equal to the scattered HF windows."""
    net = build(1)
    x = images(3)
    result = probe.analyze(net, x, fits=False, conv_test=False, attribution="none", n_bootstrap=4)
    assert net.config._attn_implementation == "sdpa"
    assert result.meta["capture_rule"] == ["hf-swin-windows"]
    assert [(s.geometry.grid, s.geometry.pixels_per_token, s.geometry.num_prefix_tokens)
            for _, s in sorted(result.stats.items())] == [((16, 16), (2.0, 2.0), 0)] * 2 + [((8, 8), (4.0, 4.0), 0)] * 2
    assert len(result.heads) == 2 + 2 + 4 + 4
    layers = find_attention_layers(net)
    rec, _ = hf_window_attentions(net, layers, x)
    for l in layers:
        r = rec[l.index]
        want = scatter(r["win"], r["grid"], r["window"], r["shift"]).mean(0)
        torch.testing.assert_close(result.stats[l.index].mean_attn.double(), want, atol=1e-5, rtol=0)
