"""timm families beyond ViT/DeiT/BEiT/EVA/Swin/ConViT/CaiT/XCiT, from a sweep of the timm zoo at
random init (:mod:`probe.families.timm_zoo`): each is either captured correctly (probabilities equal
explicit math, rows sum to one, geometry right) or refused before any work with its reason named.

Without the refusal rules, Hiera's global layers were analysed as if their unrolled tokens were a
row-major grid and EfficientViT-MSRA's windows were read as heads (silently wrong numbers); the
tests below fail if those models are accepted again.
"""

from __future__ import annotations

import pytest
import torch
import timm
from timm.models.vision_transformer_sam import VisionTransformerSAM, get_decomposed_rel_pos_bias

import probe
from probe.capture import AttentionCapture, find_attention_layers, infer_geometries
from probe.errors import CaptureError, ProbeError

from family_models import capture_with_inputs
from planted_heads import gated_output

TOL = 1e-5

QUIET = dict(progress=False, conv_test=False, fits=False, n_bootstrap=0, attribution="none")

# (timm model, create_model kwargs, input H=W, the rule that refuses it, words of the reason)
REFUSED = [
    ("hiera_tiny_224", {}, 224, "timm-hiera", "unrolled into mask-unit order"),
    ("mvitv2_tiny", {}, 224, "timm-mvitv2", "pooling attention"),
    ("efficientvit_m0", {}, 224, "timm-efficientvit-msra", "windows folded into the batch"),
    ("efficientvit_b0", {}, 224, "timm-efficientvit-mit", "ReLU linear attention"),
    ("mobilevitv2_050", {}, 256, "timm-mobilevitv2", "linear attention"),
    ("coat_lite_tiny", {}, 224, "timm-coat", "factorised attention"),
    ("volo_d1_224", {}, 224, "timm-volo-outlook", "no query-key product"),
    ("edgenext_xx_small", {}, 256, "timm-edgenext-xca", "attends across channels"),
    ("davit_tiny", {"depths": (1, 1, 1, 1)}, 224, "timm-davit", "DaViT"),
]


@pytest.mark.parametrize("name,kwargs,size,rule,reason", REFUSED, ids=[r[0] for r in REFUSED])
def test_refused_with_reason(name, kwargs, size, rule, reason):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    layers = find_attention_layers(model, (3, size, size))
    assert layers and any(l.rule.name.startswith(rule) and l.rule.name.endswith("(refused)") for l in layers)
    with pytest.raises(CaptureError, match=reason):
        probe.analyze(model, torch.rand(1, 3, size, size), data_overrides={"input_size": (3, size, size)}, **QUIET)


def _tiny_sam(window: int, global_blocks: tuple[int, ...]) -> VisionTransformerSAM:
    torch.manual_seed(0)
    model = VisionTransformerSAM(img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2, use_rel_pos=True,
                                 window_size=window, global_attn_indexes=global_blocks, neck_chans=16,
                                 num_classes=0).eval()
    with torch.no_grad():  # the relative position tables start at zero: make them matter
        for blk in model.blocks:
            blk.attn.rel_pos_h.normal_(0, 1.0)
            blk.attn.rel_pos_w.normal_(0, 1.0)
    return model


def _sam_oracle(attn: torch.nn.Module, x: torch.Tensor, window: int, grid: tuple[int, int]) -> torch.Tensor:
    """SAM attention by explicit math from the attention module's input ``x`` ``(B·windows, h, w, C)``:
    ``softmax(q k^T / sqrt(d) + rel_pos_bias)`` per window, scattered to the image positions
    ``(window_row·M + i)·W + window_col·M + j`` of the ``H x W`` grid; returns ``(B, heads, HW, HW)``."""
    bw, h, w, c = x.shape
    heads, d = attn.num_heads, c // attn.num_heads
    qkv = attn.qkv(x.reshape(bw, h * w, c)).reshape(bw, h * w, 3, heads, d).permute(2, 0, 3, 1, 4)
    q, k = qkv[0], qkv[1]  # (bw, heads, N, d)
    bias = get_decomposed_rel_pos_bias(q.reshape(bw * heads, h * w, d), attn.rel_pos_h, attn.rel_pos_w, (h, w), (h, w))
    logits = q @ k.transpose(-1, -2) / d ** 0.5 + bias.reshape(bw, heads, h * w, h * w)
    probs = logits.softmax(-1)
    rows, cols = grid
    if window == 0:
        return probs
    per_image = (rows // window) * (cols // window)
    dense = torch.zeros(bw // per_image, heads, rows * cols, rows * cols)
    for s in range(bw):
        b, widx = divmod(s, per_image)
        wr, wc = divmod(widx, cols // window)
        pos = [(wr * window + i) * cols + wc * window + j for i in range(window) for j in range(window)]
        for a, pa in enumerate(pos):
            for bb, pb in enumerate(pos):
                dense[b, :, pa, pb] = probs[s, :, a, bb]
    return dense


@pytest.mark.parametrize("window,global_blocks", [(4, (1,)), (0, ())], ids=["windowed+global", "global"])
def test_samvit_matches_explicit_math(window, global_blocks):
    model = _tiny_sam(window, global_blocks)
    x = torch.rand(2, 3, 64, 64)
    layers, got, inputs = capture_with_inputs(model, x, input_of=lambda block: block.attn)
    assert [l.name for l in layers] == ["blocks.0", "blocks.1"]
    assert all(l.rule.name == "timm-samvit" for l in layers)
    for layer in layers:
        attn = got[layer.index]
        assert attn.shape == (2, 2, 64, 64)
        torch.testing.assert_close(attn.sum(-1), torch.ones(2, 2, 64), atol=TOL, rtol=0)
        win = int(layer.module.window_size)
        with torch.no_grad():
            want = _sam_oracle(layer.module.attn, inputs[layer.index], win, (8, 8))
        torch.testing.assert_close(attn, want, atol=TOL, rtol=0)
        if win:  # tokens in different windows never attend to each other
            assert bool((attn[:, :, 0, 4] == 0).all())  # (0,0) and (0,4) lie in windows 0 and 1
    geoms = infer_geometries(model, layers, (3, 64, 64))
    assert all((g.num_prefix_tokens, tuple(g.grid), tuple(g.pixels_per_token)) == (0, (8, 8), (8.0, 8.0))
               for g in geoms.values())
    # the module is restored: fused attention back on, same output as before capture
    assert all(l.module.attn.fused_attn == timm.layers.use_fused_attn() for l in layers)


def test_samvit_padded_windows_refused():
    model = _tiny_sam(3, ())  # an 8x8 grid with 3x3 windows needs padding
    with pytest.raises(CaptureError, match="pads its windows"):
        probe.analyze(model, torch.rand(1, 3, 64, 64), data_overrides={"input_size": (3, 64, 64)}, **QUIET)


def test_samvit_analyze_runs():
    model = _tiny_sam(4, (1,))
    res = probe.analyze(model, torch.rand(2, 3, 64, 64), data_overrides={"input_size": (3, 64, 64)}, **QUIET)
    assert sorted(res.stats) == [0, 1]
    assert all(tuple(s.geometry.grid) == (8, 8) and s.geometry.num_prefix_tokens == 0 for s in res.stats.values())


def test_csatv2_has_no_prefix_tokens():
    """CSATv2 has no class token: at 224 px its last stage has 3x3 tokens, which must not be read as
    5 prefix tokens and a 2x2 grid; probe refuses the non-tiling grid and names --patch-size."""
    torch.manual_seed(0)
    model = timm.create_model("csatv2", pretrained=False).eval()
    layers = find_attention_layers(model, (3, 224, 224))
    assert layers and all(l.rule.name == "timm-csatv2" for l in layers)
    with pytest.raises(ProbeError, match=r"3x3 patch grid after 0 prefix tokens.*--patch-size"):
        infer_geometries(model, layers, (3, 224, 224))
    geoms = infer_geometries(model, layers, (3, 256, 256))
    assert {(g.num_prefix_tokens, tuple(g.grid), tuple(g.pixels_per_token)) for g in geoms.values()} == \
        {(0, (8, 8), (32.0, 32.0)), (0, (4, 4), (64.0, 64.0))}


def test_swin_dense_maps_in_pieces_keep_image_order(monkeypatch):
    """Swin's dense maps are emitted a few images at a time (windows.DENSE_CHUNK_BYTES); each piece
    must get its own images' indices (this failed with "2 image indices for a batch of 1 images")
    and the statistics must equal those of a run that emits whole batches."""
    import probe.families.windows as windows

    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=112, depths=(1, 1, 1, 1),
                              embed_dim=24, num_heads=(1, 2, 2, 4)).eval()
    x = torch.rand(3, 3, 112, 112)
    opts = dict(QUIET, n_bootstrap=4, data_overrides={"input_size": (3, 112, 112)}, batch_size=3)
    whole = probe.analyze(model, x, **opts)
    monkeypatch.setattr(windows, "DENSE_CHUNK_BYTES", 1)  # one image per piece
    pieces = probe.analyze(model, x, **opts)
    assert sorted(whole.stats) == sorted(pieces.stats) == [0, 1, 2, 3]
    for layer, st in whole.stats.items():
        torch.testing.assert_close(pieces.stats[layer].attn_sum, st.attn_sum)
        torch.testing.assert_close(pieces.stats[layer].boot_sum, st.boot_sum)


def test_swinv2_cr_windows_mapped_to_image_positions():
    """Swin V2 CR: the dense map equals the per-window probabilities at ``attn_drop`` scattered by
    explicit loops to the unshifted image positions ``((row + shift) mod H, (col + shift) mod W)``."""
    torch.manual_seed(0)
    model = timm.create_model("swinv2_cr_tiny_224", pretrained=False, img_size=(64, 64), window_size=8,
                              depths=(2,), num_heads=(2,), embed_dim=16, num_classes=0).eval()
    layers = find_attention_layers(model, (3, 64, 64))
    assert [l.rule.name for l in layers] == ["timm-swinv2-cr-windows"] * 2
    shifts = [tuple(int(v) for v in l.module.shift_size) for l in layers]
    assert shifts == [(0, 0), (4, 4)]
    windows: dict[int, torch.Tensor] = {}
    hooks = [l.module.attn.attn_drop.register_forward_hook(lambda m, i, o, k=l.index: windows.__setitem__(k, o.detach()))
             for l in layers]
    got: dict[int, list] = {}
    x = torch.rand(2, 3, 64, 64)
    try:
        with AttentionCapture(layers, lambda i, a: got.setdefault(i, []).append(a)), torch.no_grad():
            model(x)
    finally:
        for hk in hooks:
            hk.remove()
    size, win = 16, 8
    for layer, (sh, sw) in zip(layers, shifts):
        dense = torch.cat(got[layer.index])
        assert dense.shape == (2, 2, size * size, size * size)
        torch.testing.assert_close(dense.sum(-1), torch.ones(2, 2, size * size), atol=TOL, rtol=0)
        per = windows[layer.index]  # (B·4 windows, heads, 64, 64)
        want = torch.zeros_like(dense)
        for s in range(per.shape[0]):
            b, w = divmod(s, 4)
            wr, wc = divmod(w, 2)
            pos = [((wr * win + i + sh) % size) * size + (wc * win + j + sw) % size
                   for i in range(win) for j in range(win)]
            idx = torch.tensor(pos)
            want[b][:, idx[:, None], idx[None, :]] = per[s]
        torch.testing.assert_close(dense, want, atol=0, rtol=0)
    geoms = infer_geometries(model, layers, (3, 64, 64))
    assert {(g.num_prefix_tokens, tuple(g.grid), tuple(g.pixels_per_token)) for g in geoms.values()} == {(0, (16, 16), (4.0, 4.0))}


def test_twins_lsa_windows_mapped_to_image_positions():
    """Twins-SVT's locally-grouped attention: the dense map equals the ``(B, windows, heads, 49, 49)``
    probabilities at ``attn_drop`` scattered by explicit loops to ``(wr·7 + i)·W + wc·7 + j``; its
    global sub-sampled layers (fewer keys than queries) stay refused."""
    torch.manual_seed(0)
    model = timm.create_model("twins_svt_small", pretrained=False, depths=(2, 2, 2, 2),
                              embed_dims=(8, 16, 32, 64), num_heads=(1, 2, 4, 8), num_classes=0).eval()
    layers = find_attention_layers(model, (3, 224, 224))
    lsa = [l for l in layers if l.rule.name == "timm-twins-lsa"]
    assert [l.name for l in lsa] == ["blocks.0.0.attn", "blocks.1.0.attn", "blocks.2.0.attn", "blocks.3.0.attn"]
    lsa = lsa[:2]  # the 56x56 and 28x28 grids
    raw: dict[int, torch.Tensor] = {}
    hooks = [l.module.attn_drop.register_forward_hook(lambda m, i, o, k=l.index: raw.__setitem__(k, o.detach()))
             for l in lsa]
    got: dict[int, list] = {}
    try:
        with AttentionCapture(lsa, lambda i, a: got.setdefault(i, []).append(a)), torch.no_grad():
            model(torch.rand(2, 3, 224, 224))
    finally:
        for hk in hooks:
            hk.remove()
    for layer, size in zip(lsa, (56, 28)):
        dense = torch.cat(got[layer.index])
        heads = layer.module.num_heads
        assert dense.shape == (2, heads, size * size, size * size)
        torch.testing.assert_close(dense.sum(-1), torch.ones(2, heads, size * size), atol=TOL, rtol=0)
        per = raw[layer.index]  # (B, windows, heads, 49, 49)
        per_row = size // 7
        want = torch.zeros_like(dense)
        for b in range(2):
            for w in range(per.shape[1]):
                wr, wc = divmod(w, per_row)
                idx = torch.tensor([(wr * 7 + i) * size + wc * 7 + j for i in range(7) for j in range(7)])
                want[b][:, idx[:, None], idx[None, :]] = per[b, w]
        torch.testing.assert_close(dense, want, atol=0, rtol=0)
    geoms = infer_geometries(model, lsa, (3, 224, 224))
    assert [(g.num_prefix_tokens, tuple(g.grid), tuple(g.pixels_per_token)) for g in geoms.values()] == \
        [(0, (56, 56), (4.0, 4.0)), (0, (28, 28), (8.0, 8.0))]
    with pytest.raises(CaptureError, match="not spatially reduced, pooled"):
        probe.analyze(model, torch.rand(1, 3, 224, 224), layers=[1], **QUIET)


def _zero_value_head(qkv: torch.nn.Linear, dim: int, head: int, head_dim: int) -> None:
    """Zero the value projection of one head (qkv output laid out (3, heads, head_dim)), so that
    head's output is zero: an independent way to switch a head off."""
    rows = slice(2 * dim + head * head_dim, 2 * dim + (head + 1) * head_dim)
    with torch.no_grad():
        qkv.weight[rows] = 0
        if qkv.bias is not None:
            qkv.bias[rows] = 0


@pytest.mark.parametrize("family", ["samvit", "twins"])
def test_head_gate_equals_zeroed_value_head(family):
    """A gate of 0 on head 1 of one layer gives the output of the same model with that head's value
    projection zeroed; a gate of ones changes nothing."""
    import copy

    if family == "samvit":
        model, size = _tiny_sam(4, (1,)), 64
        layer_name = "blocks.0"
    else:
        torch.manual_seed(0)
        model = timm.create_model("twins_svt_small", pretrained=False, depths=(1, 1, 1, 1), embed_dims=(8, 16, 32, 64),
                                  num_heads=(2, 2, 4, 8), num_classes=0).eval()
        size, layer_name = 224, "blocks.0.0.attn"
    x = torch.rand(2, 3, size, size)
    layer = next(l for l in find_attention_layers(model, (3, size, size)) if l.name == layer_name)
    attn = layer.module.attn if family == "samvit" else layer.module
    heads = int(attn.num_heads)
    assert heads == 2 and layer.rule.can_gate(layer.module)
    with torch.no_grad():
        plain = model(x)
    ablated_model = copy.deepcopy(model)
    ablated_attn = dict(ablated_model.named_modules())[layer_name]
    ablated_attn = ablated_attn.attn if family == "samvit" else ablated_attn
    dim = ablated_attn.qkv.in_features
    _zero_value_head(ablated_attn.qkv, dim, 1, dim // heads)
    with torch.no_grad():
        want = ablated_model(x)
    for gate, expected in ((torch.ones(1, heads), plain), (torch.tensor([[1.0, 0.0]]), want)):
        torch.testing.assert_close(gated_output(model, layer, x, gate), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(plain, want, atol=1e-4)  # the head matters


def test_strided_stage_spacing_by_hand():
    """A stride-2 subsample of a 7x7 grid has 4x4 tokens 2 cells apart (64 px after 32 px), not
    H / 4 = 56 px; exact divisions and equal grids keep H / rows."""
    from probe.capture import strided_spacing
    from probe.geometry import TokenGeometry

    g7, g4 = TokenGeometry(0, (7, 7), (32.0, 32.0)), TokenGeometry(0, (4, 4), (56.0, 56.0))
    assert strided_spacing(g7, g4).pixels_per_token == (64.0, 64.0)
    assert strided_spacing(TokenGeometry(0, (4, 4), (64.0, 64.0)), g4).pixels_per_token == (64.0, 64.0)
    g14, g7b = TokenGeometry(0, (14, 14), (16.0, 16.0)), TokenGeometry(0, (7, 7), (32.0, 32.0))
    assert strided_spacing(g14, g7b) == g7b  # exact division: unchanged
    g9, g3 = TokenGeometry(1, (9, 12), (10.0, 10.0)), TokenGeometry(1, (3, 5), (30.0, 24.0))
    got = strided_spacing(g9, g3)  # rows: exact (9 -> 3); cols: ceil(12 / 2) = 6 != 5, ceil(12 / 3) = 4 != 5
    assert got.pixels_per_token == (30.0, 24.0)


def test_levit_last_stage_spacing_whatever_the_layers_selected():
    """LeViT at 224 px: stages 14x14 (16 px), 7x7 (32 px), 4x4 = ceil(7 / 2) (64 px), also when only
    the last stage is analysed (the chain is read over every attention layer)."""
    import probe

    net = timm.create_model("levit_128s", pretrained=False).eval()
    x = torch.rand(1, 3, 224, 224)
    r = probe.analyze(net, x, layers="-2,-1", progress=False, fits=False, conv_test=False, n_bootstrap=0,
                      attribution="none")
    assert {s.geometry.grid for s in r.stats.values()} == {(4, 4)}
    assert {s.geometry.pixels_per_token for s in r.stats.values()} == {(64.0, 64.0)}
    full = probe.analyze(net, x, progress=False, fits=False, conv_test=False, n_bootstrap=0, attribution="none")
    spacing = {s.geometry.grid: s.geometry.pixels_per_token for s in full.stats.values()}
    assert spacing == {(14, 14): (16.0, 16.0), (7, 7): (32.0, 32.0), (4, 4): (64.0, 64.0)}


def test_a_timm_model_built_at_another_size_is_read_at_that_size():
    """timm.create_model(name, img_size=96) keeps pretrained_cfg's 224 px; its patch embedding
    only takes 96 px, so the eval transform follows the embedding (a dynamic-size model keeps 224)."""
    import probe
    from probe.data import eval_transform

    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=96).eval()
    assert net.pretrained_cfg["input_size"] == (3, 224, 224)
    assert eval_transform(net)[1]["input_size"] == (3, 96, 96)
    assert eval_transform(net, {"input_size": (3, 64, 64)})[1]["input_size"] == (3, 64, 64)  # an override wins
    dyn = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=96, dynamic_img_size=True)
    assert eval_transform(dyn)[1]["input_size"] == (3, 224, 224)
    r = probe.analyze(net, None, num_images=2, layers="0", progress=False, fits=False, conv_test=False,
                      n_bootstrap=0, attribution="none")
    assert r.geometry.grid == (6, 6) and r.geometry.pixels_per_token == (16.0, 16.0)


def test_capture_image_offsets_of_pieces(monkeypatch):
    """AttentionCapture(image_offsets=True): the pieces of one batch arrive with the start of their
    first image (0, 1, 2 for one image per piece), and each forward pass starts again at 0."""
    import probe.families.windows as windows

    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=112, depths=(1, 1, 1, 1),
                              embed_dim=24, num_heads=(1, 2, 2, 4)).eval()
    layers = find_attention_layers(model, (3, 112, 112))
    x = torch.rand(3, 3, 112, 112)
    seen: dict[int, list[tuple[int, int]]] = {}
    monkeypatch.setattr(windows, "DENSE_CHUNK_BYTES", 1)  # one image per piece
    with AttentionCapture(layers, lambda i, a, start: seen.setdefault(i, []).append((start, a.shape[0])),
                          image_offsets=True), torch.no_grad():
        model(x)
        model(x[:2])
    assert seen == {l.index: [(0, 1), (1, 1), (2, 1), (0, 1), (1, 1)] for l in layers}
