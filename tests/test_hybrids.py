"""timm's convolution-attention hybrids (:mod:`probe.families.timm_hybrids`): MaxViT block and grid
attention, CoAtNet, BoTNet, HaloNet, and the refusal of Lambda networks.

Oracle of every capture test: the probabilities recomputed in float64 from the module's own weights
on the input it received — q and k from its projection (per-head channel slices written out), the
relative position bias looked up per (query, key) pair from its table (or MLP, or 1-D relative
embeddings) by the index arithmetic of the papers, the softmax per window (MaxViT), per image
(CoAtNet, BoTNet) or per query block over block + halo (HaloNet) — and scattered to the stage grid
by explicit loops over image positions, compared per head to 1e-5 (float32 products of O(1)).
Gates: a gate of 0 on one head equals the model with that head's value projection zeroed (weight
surgery, independent of the gate), a gate of ones changes nothing bit for bit.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import timm
from torch import nn

import probe
from probe.capture import AttentionCapture, find_attention_layers, infer_geometries
from probe.errors import CaptureError

from family_models import capture_with_inputs
from planted_heads import gated_output

TOL = 1e-5
QUIET = dict(progress=False, conv_test=False, fits=False, n_bootstrap=0, attribution="none")


# --------------------------------------------------------------------------- shared oracle pieces
def randomize_positions(model: nn.Module) -> None:
    """The relative position tables start near zero (std 0.02): make them matter."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "relative_position_bias_table" in name or name.endswith(("height_rel", "width_rel")):
                p.normal_(0, 1.0)
            elif ".rel_pos.mlp." in name:
                p.normal_(0, 0.5)


def rel_bias(rel_pos: nn.Module | None, heads: int, size: tuple[int, int]) -> torch.Tensor:
    """Relative position bias ``(heads, N, N)`` of a ``size = (Mh, Mw)`` window, float64, looked up
    pair by pair: timm ``RelPosBias`` (Swin table, index ``(dy + Mh-1)(2Mw-1) + dx + Mw-1`` with
    ``d = query - key``), ``RelPosBiasTf`` (``table[h, key_y - query_y + Mh-1, key_x - query_x + Mw-1]``),
    ``RelPosMlp`` in its ``cr`` mode (the MLP at ``sign(d) ln(1 + |d|)``)."""
    mh, mw = size
    coords = [(i, j) for i in range(mh) for j in range(mw)]
    n = len(coords)
    out = torch.zeros(heads, n, n, dtype=torch.float64)
    if rel_pos is None:
        return out
    kind = type(rel_pos).__name__
    if kind == "RelPosMlp":
        assert rel_pos.mode == "cr"
        f = lambda d: math.copysign(math.log1p(abs(d)), d)  # noqa: E731
        pairs = torch.tensor([[f(qy - ky), f(qx - kx)] for qy, qx in coords for ky, kx in coords], dtype=torch.float64)
        mlp = copy.deepcopy(rel_pos.mlp).double().eval()
        with torch.no_grad():
            return mlp(pairs).reshape(n, n, heads).permute(2, 0, 1)
    table = rel_pos.relative_position_bias_table.detach().double()
    for a, (qy, qx) in enumerate(coords):
        for b, (ky, kx) in enumerate(coords):
            if kind == "RelPosBias":
                out[:, a, b] = table[(qy - ky + mh - 1) * (2 * mw - 1) + (qx - kx + mw - 1)]
            elif kind == "RelPosBiasTf":
                out[:, a, b] = table[:, ky - qy + mh - 1, kx - qx + mw - 1]
            else:
                raise AssertionError(kind)
    return out


def qkv_heads(out: torch.Tensor, heads: int, dh: int, head_first: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, k)`` of shape ``(B, heads, T, dh)`` from the fused projection ``out`` ``(B, T, 3·heads·dh)``:
    head-first channels ``[q_h | k_h | v_h]`` per head, else ``[q_0..q_H | k_0..k_H | v_0..v_H]``."""
    q = torch.stack([out[..., h * 3 * dh: h * 3 * dh + dh] if head_first else out[..., h * dh:(h + 1) * dh]
                     for h in range(heads)], 1)
    k = torch.stack([out[..., h * 3 * dh + dh: h * 3 * dh + 2 * dh] if head_first
                     else out[..., (heads + h) * dh:(heads + h + 1) * dh] for h in range(heads)], 1)
    return q, k


def value_rows(kind: str, module: nn.Module, head: int) -> slice:
    """Output channels of the value projection of ``head`` (for the gate oracle)."""
    if kind == "maxxvit":
        dh, heads = module.dim_head, module.num_heads
        return slice(head * 3 * dh + 2 * dh, (head + 1) * 3 * dh) if module.head_first \
            else slice((2 * heads + head) * dh, (2 * heads + head + 1) * dh)
    if kind == "bot":
        start = 2 * module.dim_out_qk + head * module.dim_head_v  # qkv channels [q | k | v], v head-major
        return slice(start, start + module.dim_head_v)
    width = module.dim_head_qk + module.dim_head_v  # halo: kv channels [k_h | v_h] per head
    return slice(head * width + module.dim_head_qk, (head + 1) * width)


def weight_of(conv_or_linear: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A 1x1 convolution or linear layer as ``(W (out, in), bias)`` in float64."""
    w = conv_or_linear.weight.detach().double()
    b = None if conv_or_linear.bias is None else conv_or_linear.bias.detach().double()
    return w.reshape(w.shape[0], -1), b


def project(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """``x (..., C_in) @ W^T + b`` in float64."""
    w, b = weight_of(layer)
    y = x @ w.T
    return y if b is None else y + b


def capture(model: nn.Module, x: torch.Tensor, layers) -> dict[int, torch.Tensor]:
    got: dict[int, list] = {l.index: [] for l in layers}
    with AttentionCapture(layers, lambda i, a: got[i].append(a.clone())), torch.no_grad():
        model(x)
    return {i: torch.cat(v) for i, v in got.items()}


def check_gates(model: nn.Module, layer, x: torch.Tensor, kind: str, attn_of_head) -> None:
    """Gate ones: output bit-identical; gate 0 on the last head = that head's value rows zeroed.
    ``attn_of_head(module, head) -> (attention module owning the value projection, its head)``."""
    heads = layer.rule.num_heads(layer.module)
    assert layer.rule.can_gate(layer.module) and heads >= 2
    with torch.no_grad():
        plain = model(x)
    ablated = copy.deepcopy(model)
    owner, head = attn_of_head(dict(ablated.named_modules())[layer.name], heads - 1)
    proj = owner.kv if kind == "halo" else owner.qkv
    rows = value_rows(kind, owner, head)
    with torch.no_grad():
        proj.weight[rows] = 0
        if proj.bias is not None:
            proj.bias[rows] = 0
        want = ablated(x)
    off = torch.ones(1, heads)
    off[0, -1] = 0
    for gate, expected, tol in ((torch.ones(1, heads), plain, 0.0), (off, want, 1e-5)):
        torch.testing.assert_close(gated_output(model, layer, x, gate), expected, atol=tol, rtol=tol)
    assert (plain - want).abs().max() > 1e-3 * plain.abs().max()  # the head matters
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain, atol=0, rtol=0)  # gate removed


# --------------------------------------------------------------------------- MaxViT
def maxvit(name: str, size=(64, 64), **kwargs) -> nn.Module:
    """A MaxViT of two stages (16x16 and 8x8 tokens at 64 px), 4x4 block windows, 2x2 grid windows
    unless ``kwargs`` say otherwise; relative position tables randomised."""
    torch.manual_seed(0)
    kw = dict(img_size=size, embed_dim=(64, 64), depths=(1, 1), transformer_window_size=4, transformer_grid_size=2,
              transformer_dim_head=32)
    kw.update(kwargs)
    model = timm.create_model(name, pretrained=False, num_classes=5, **kw).eval()
    randomize_positions(model)
    return model


def maxvit_windows(kind: str, grid: tuple[int, int], size: tuple[int, int]) -> list[list[tuple[int, int]]]:
    """Image positions ``(row, col)`` of each window's tokens (row-major windows and tokens): block
    windows ``(a·Mh + i, b·Mw + j)``; grid windows ``(i·H/Gh + a, j·W/Gw + b)`` (MaxViT Sec. 3.2)."""
    (h, w), (mh, mw) = grid, size
    if kind == "window":
        return [[(a * mh + i, b * mw + j) for i in range(mh) for j in range(mw)]
                for a in range(h // mh) for b in range(w // mw)]
    sh, sw = h // mh, w // mw
    return [[(i * sh + a, j * sw + b) for i in range(mh) for j in range(mw)] for a in range(sh) for b in range(sw)]


def maxvit_oracle(part: nn.Module, feat: torch.Tensor) -> torch.Tensor:
    """The layer's dense attention ``(B, heads, HW, HW)`` (heads of a parallel layer: block, then
    grid) from the partition module's input ``feat``, in float64."""
    m64 = copy.deepcopy(part).double().eval()
    nchw = type(part).__name__ == "PartitionAttention2d"
    with torch.no_grad():
        x = m64.norm1(feat.double())
    if nchw:
        x = x.permute(0, 2, 3, 1)
    b, h, w, _ = x.shape
    if type(part).__name__ == "ParallelPartitionAttention":
        parts = [(m64.attn_block, "window"), (m64.attn_grid, "grid")]
    else:
        parts = [(m64.attn, "window" if m64.partition_block else "grid")]
    size = tuple(part.partition_size)
    maps = []
    for attn, kind in parts:
        heads, dh = attn.num_heads, attn.dim_head
        bias = rel_bias(attn.rel_pos, heads, size)
        dense = torch.zeros(b, heads, h * w, h * w, dtype=torch.float64)
        for pos in maxvit_windows(kind, (h, w), size):
            tokens = torch.stack([x[:, r, c] for r, c in pos], 1)  # (B, N, C)
            with torch.no_grad():
                q, k = qkv_heads(project(tokens, attn.qkv), heads, dh, attn.head_first)
            probs = ((q * dh ** -0.5) @ k.transpose(-1, -2) + bias).softmax(-1)
            for i, (r1, c1) in enumerate(pos):
                for j, (r2, c2) in enumerate(pos):
                    dense[:, :, r1 * w + c1, r2 * w + c2] = probs[:, :, i, j]
        maps.append(dense)
    return torch.cat(maps, 1)


MAXVITS = [
    ("maxvit_rmlp_pico_rw_256", {}, (64, 64)),  # RelPosMlp, head-first qkv
    ("maxvit_tiny_tf_224", {}, (64, 96)),  # RelPosBiasTf, qkv not head-first; non-square grid
    ("maxvit_nano_rw_256", {"transformer_use_nchw_attn": True}, (64, 64)),  # RelPosBias, PartitionAttention2d
    ("maxvit_tiny_pm_256", {"transformer_grid_size": 4}, (64, 64)),  # parallel block + grid attention, one layer
]


@pytest.mark.parametrize("name,kwargs,size", MAXVITS, ids=[m[0] for m in MAXVITS])
def test_maxvit_block_and_grid_attention_match_explicit_math(name, kwargs, size):
    model = maxvit(name, size, **kwargs)
    x = torch.rand(2, 3, *size)
    layers, got, inputs = capture_with_inputs(model, x, input_of=lambda part: part.norm1)
    assert layers and all(l.rule.name == "timm-maxvit-partition" for l in layers)
    grids = [(size[0] // 4, size[1] // 4), (size[0] // 8, size[1] // 8)]
    parallel = name == "maxvit_tiny_pm_256"
    kinds = set()
    for layer in layers:
        stage = int(layer.name.split(".")[1])
        rows, cols = grids[stage]
        attn = got[layer.index]
        heads = layer.rule.num_heads(layer.module)
        assert attn.shape == (2, heads, rows * cols, rows * cols)
        torch.testing.assert_close(attn.sum(-1), torch.ones(2, heads, rows * cols), atol=TOL, rtol=0)
        want = maxvit_oracle(layer.module, inputs[layer.index])
        torch.testing.assert_close(attn.double(), want, atol=TOL, rtol=0)
        kinds.add("parallel" if parallel else ("window" if layer.module.partition_block else "grid"))
        if not parallel and not layer.module.partition_block:  # grid windows: tokens H/2 apart, not neighbours
            assert bool((attn[:, :, 0, 1] == 0).all()) and bool((attn[:, :, 0, rows // 2 * cols + cols // 2] > 0).all())
    assert kinds == ({"parallel"} if parallel else {"window", "grid"})
    geoms = infer_geometries(model, layers, (3, *size))
    assert {(g.num_prefix_tokens, tuple(g.grid), tuple(g.pixels_per_token)) for g in geoms.values()} == \
        {(0, grids[0], (4.0, 4.0)), (0, grids[1], (8.0, 8.0))}
    attns = [a for l in layers for a in ((l.module.attn_block, l.module.attn_grid) if parallel else (l.module.attn,))]
    assert all(a.fused_attn == timm.layers.use_fused_attn() for a in attns)  # restored


@pytest.mark.parametrize("name,kwargs", [("maxvit_tiny_tf_224", {}),
                                         ("maxvit_nano_rw_256", {"transformer_use_nchw_attn": True}),
                                         ("maxvit_tiny_pm_256", {"transformer_grid_size": 4})],
                         ids=["cl", "nchw", "parallel"])
def test_maxvit_head_gates(name, kwargs):
    model = maxvit(name, **kwargs)
    layer = find_attention_layers(model, (3, 64, 64))[0]

    def owner(part, head):
        if type(part).__name__ == "ParallelPartitionAttention":
            nb = part.attn_block.num_heads
            return (part.attn_block, head) if head < nb else (part.attn_grid, head - nb)
        return part.attn, head

    check_gates(model, layer, torch.rand(2, 3, 64, 64), "maxxvit", owner)


@pytest.mark.slow
def test_maxvit_analyze_runs_with_attribution():
    model = maxvit("maxvit_rmlp_pico_rw_256")
    res = probe.analyze(model, torch.rand(2, 3, 64, 64), data_overrides={"input_size": (3, 64, 64)},
                        **dict(QUIET, attribution="ig", attribution_images=2, ig_steps=2))
    assert sorted(res.stats) == [0, 1, 2, 3]
    assert "attribution_skipped" not in res.meta
    assert res.heads["importance_ig"].notna().all() and len(res.heads) == 4 * 2  # 4 layers of 2 heads


# --------------------------------------------------------------------------- CoAtNet
def coatnet(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, img_size=128, embed_dim=(16, 32, 64, 64), depths=(1, 1, 1, 1),
                              num_classes=5).eval()
    randomize_positions(model)
    return model


def coatnet_oracle(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d) + bias)`` over the whole ``(H, W)`` map of ``Attention2d``'s input."""
    b, _, h, w = x.shape
    tokens = x.double().flatten(2).transpose(1, 2)  # (B, HW, C), row-major
    with torch.no_grad():
        q, k = qkv_heads(project(tokens, attn.qkv), attn.num_heads, attn.dim_head, attn.head_first)
    bias = rel_bias(attn.rel_pos, attn.num_heads, (h, w))
    return ((q * attn.dim_head ** -0.5) @ k.transpose(-1, -2) + bias).softmax(-1)


@pytest.mark.parametrize("name", ["coatnet_nano_rw_224", "coatnet_rmlp_nano_rw_224"])
def test_coatnet_matches_explicit_math(name):
    model = coatnet(name)
    x = torch.rand(2, 3, 128, 128)
    layers, got, inputs = capture_with_inputs(model, x)
    assert [l.rule.name for l in layers] == ["timm-coatnet-attention"] * 2
    assert [type(l.module.rel_pos).__name__ for l in layers] == \
        ["RelPosMlp" if "rmlp" in name else "RelPosBias"] * 2
    for layer, side in zip(layers, (8, 4)):
        attn = got[layer.index]
        assert attn.shape == (2, layer.module.num_heads, side * side, side * side)
        torch.testing.assert_close(attn.double(), coatnet_oracle(layer.module, inputs[layer.index]), atol=TOL, rtol=0)
    geoms = infer_geometries(model, layers, (3, 128, 128))
    assert [(g.num_prefix_tokens, tuple(g.grid), tuple(g.pixels_per_token)) for g in geoms.values()] == \
        [(0, (8, 8), (16.0, 16.0)), (0, (4, 4), (32.0, 32.0))]


def test_coatnet_head_gates():
    model = coatnet("coatnet_nano_rw_224")
    layer = find_attention_layers(model, (3, 128, 128))[1]  # 2 heads
    check_gates(model, layer, torch.rand(2, 3, 128, 128), "maxxvit", lambda attn, head: (attn, head))


# --------------------------------------------------------------------------- BoTNet and HaloNet
def rel_logit(q: torch.Tensor, table: torch.Tensor, index: int) -> torch.Tensor:
    """``q · table[index]`` for ``q (..., d)`` (one axis of the 2-D relative logits)."""
    return q @ table.detach().double()[index]


def botnet_oracle(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """BoTNet (Srinivas et al. 2021, Fig. 4): ``softmax(q k^T·s + q·r_h[ky - qy + H-1] + q·r_w[kx - qx + W-1])``
    per head, q/k/v the head's slices of the ``[q | k | v]`` channels of ``qkv``."""
    b, _, h, w = x.shape
    heads, d, qk = mod.num_heads, mod.dim_head_qk, mod.dim_out_qk
    with torch.no_grad():
        out = project(x.double().flatten(2).transpose(1, 2), mod.qkv)  # (B, HW, C)
    q = torch.stack([out[..., i * d:(i + 1) * d] for i in range(heads)], 1)  # (B, heads, HW, d)
    k = torch.stack([out[..., qk + i * d: qk + (i + 1) * d] for i in range(heads)], 1)
    pos = [(r, c) for r in range(h) for c in range(w)]
    logits = torch.zeros(b, heads, h * w, h * w, dtype=torch.float64)
    for a, (qy, qx) in enumerate(pos):
        for j, (ky, kx) in enumerate(pos):
            rel = rel_logit(q[:, :, a], mod.pos_embed.height_rel, ky - qy + h - 1) + \
                rel_logit(q[:, :, a], mod.pos_embed.width_rel, kx - qx + w - 1)
            dot = (q[:, :, a] * k[:, :, j]).sum(-1)
            logits[:, :, a, j] = (dot + rel) * mod.scale if mod.scale_pos_embed else dot * mod.scale + rel
    return logits.softmax(-1)


def botnet() -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("botnet26t_256", pretrained=False, img_size=128, num_classes=5).eval()
    randomize_positions(model)
    with torch.no_grad():  # timm zero-initialises each block's last norm: let the attention reach the logits
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(1.0)
    return model


def test_botnet_matches_explicit_math_and_keeps_the_output():
    model = botnet()
    x = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        plain = model(x)
    layers, got, inputs = capture_with_inputs(model, x)
    assert [l.rule.name for l in layers] == ["timm-botnet-attention"] * 3
    for layer in layers:
        want = botnet_oracle(layer.module, inputs[layer.index])
        assert got[layer.index].shape == want.shape
        torch.testing.assert_close(got[layer.index].double(), want, atol=TOL, rtol=0)
    with AttentionCapture(layers, lambda i, a: None), torch.no_grad():
        torch.testing.assert_close(model(x), plain, atol=0, rtol=0)  # read while it runs: bit-identical
    geoms = infer_geometries(model, layers, (3, 128, 128))
    assert [(g.num_prefix_tokens, tuple(g.grid)) for g in geoms.values()] == [(0, (8, 8)), (0, (8, 8)), (0, (4, 4))]


def test_botnet_head_gates():
    model = botnet()
    layer = find_attention_layers(model, (3, 128, 128))[-1]
    check_gates(model, layer, torch.rand(2, 3, 128, 128), "bot", lambda attn, head: (attn, head))


class TinyHaloNet(nn.Module):
    """A conv stem (4 px stride) and one timm ``HaloAttn`` over its feature map, mean-pooled."""

    def __init__(self, **halo):
        super().__init__()
        from timm.layers.halo_attn import HaloAttn

        self.stem = nn.Conv2d(3, 16, 4, 4)
        self.attn = HaloAttn(16, **halo)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(self.stem(x)).mean((-2, -1)))


def halo_oracle(mod: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """HaloNet by explicit loops over image positions: the query at ``(r, c)`` in block
    ``(r // b, c // b)`` attends to the keys ``(bi·b - h + u, bj·b - h + v)``, ``u, v < b + 2h``; a key
    outside the image is the zero vector (timm pads the key map with zeros, unmasked). Logit:
    ``q·k·s + q·r_h[u - i + win-1] + q·r_w[v - j + win-1]`` (``i, j`` the query's place in its block).

    Returns:
        ``(dense (B, heads, HW, HW) renormalised over the keys inside the image, padded mass
        (B, heads, HW))``.
    """
    bsz, _, h, w = x.shape
    heads, dq, dv, blk, halo = mod.num_heads, mod.dim_head_qk, mod.dim_head_v, mod.block_size, mod.halo_size
    win = blk + 2 * halo
    with torch.no_grad():
        qmap = project(x.double().permute(0, 2, 3, 1), mod.q)  # (B, H, W, heads·dq)
        kvmap = project(x.double().permute(0, 2, 3, 1), mod.kv)  # (B, H, W, heads·(dq + dv))
    dense = torch.zeros(bsz, heads, h * w, h * w, dtype=torch.float64)
    padded = torch.zeros(bsz, heads, h * w, dtype=torch.float64)
    for r in range(h):
        for c in range(w):
            bi, i, bj, j = r // blk, r % blk, c // blk, c % blk
            q = torch.stack([qmap[:, r, c, e * dq:(e + 1) * dq] for e in range(heads)], 1)  # (B, heads, dq)
            logits, where = [], []
            for u in range(win):
                for v in range(win):
                    kr, kc = bi * blk - halo + u, bj * blk - halo + v
                    inside = 0 <= kr < h and 0 <= kc < w
                    k = torch.stack([kvmap[:, kr, kc, e * (dq + dv): e * (dq + dv) + dq] for e in range(heads)], 1) \
                        if inside else torch.zeros_like(q)
                    rel = rel_logit(q, mod.pos_embed.height_rel, u - i + win - 1) + \
                        rel_logit(q, mod.pos_embed.width_rel, v - j + win - 1)
                    dot = (q * k).sum(-1)
                    logits.append((dot + rel) * mod.scale if mod.scale_pos_embed else dot * mod.scale + rel)
                    where.append(kr * w + kc if inside else None)
            p = torch.stack(logits, -1).softmax(-1)  # over block + halo, padding included
            real = torch.tensor([t is not None for t in where])
            padded[:, :, r * w + c] = p[..., ~real].sum(-1)
            p = p / p[..., real].sum(-1, keepdim=True)
            for t, pos in enumerate(where):
                if pos is not None:
                    dense[:, :, r * w + c, pos] = p[..., t]
    return dense, padded


HALOS = [
    (dict(num_heads=2, block_size=4, halo_size=1, qkv_bias=True), (32, 32)),
    (dict(num_heads=2, block_size=4, halo_size=2, dim_head=4, qk_ratio=0.5, scale_pos_embed=True), (32, 48)),
    # stride 2 with avg_down: full-resolution attention, pooled afterwards
    (dict(num_heads=2, block_size=3, halo_size=1, stride=2, avg_down=True), (24, 36)),
]


@pytest.mark.parametrize("halo,size", HALOS, ids=["bias", "scaled-pos-nonsquare", "avg-down"])
def test_halonet_matches_explicit_math(halo, size):
    torch.manual_seed(0)
    model = TinyHaloNet(**halo).eval()
    randomize_positions(model)
    x = torch.rand(2, 3, *size)
    with torch.no_grad():
        plain = model(x)
    layers, got, inputs = capture_with_inputs(model, x)
    assert [(l.name, l.rule.name) for l in layers] == [("attn", "timm-halonet-attention")]
    rows, cols = size[0] // 4, size[1] // 4
    attn = got[0]
    assert attn.shape == (2, 2, rows * cols, rows * cols)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 2, rows * cols), atol=TOL, rtol=0)
    want, padded = halo_oracle(model.attn, inputs[0])
    torch.testing.assert_close(attn.double(), want, atol=TOL, rtol=0)
    assert float(padded[:, :, 0].min()) > 1e-3  # the corner query did put mass on padding (dropped)
    bh = model.attn.block_size
    far = (bh + model.attn.halo_size) * cols + bh + model.attn.halo_size  # beyond the corner block's halo
    assert bool((attn[:, :, 0, far] == 0).all())
    with AttentionCapture(layers, lambda i, a: None), torch.no_grad():
        torch.testing.assert_close(model(x), plain, atol=0, rtol=0)
    geom = infer_geometries(model, layers, (3, *size))[0]
    assert (geom.num_prefix_tokens, tuple(geom.grid), tuple(geom.pixels_per_token)) == (0, (rows, cols), (4.0, 4.0))


def test_halonet_head_gates():
    torch.manual_seed(0)
    model = TinyHaloNet(num_heads=2, block_size=4, halo_size=1).eval()
    layer = find_attention_layers(model, (3, 32, 32))[0]
    check_gates(model, layer, torch.rand(2, 3, 32, 32), "halo", lambda attn, head: (attn, head))


def test_halonet_strided_queries_refused():
    torch.manual_seed(0)
    model = TinyHaloNet(num_heads=2, block_size=4, halo_size=1, stride=2).eval()
    with pytest.raises(CaptureError, match="queries on a strided subgrid.*--layers"):
        probe.analyze(model, torch.rand(1, 3, 32, 32), data_overrides={"input_size": (3, 32, 32)}, **QUIET)


@pytest.mark.slow
def test_halonet26t_layers_found_and_captured():
    """timm's halonet26t at 256 px (it said "no attention was found"): three halo layers; the
    stride-2 one is refused by name; the 8x8 last stage (one block, every halo key padding) matches
    the oracle."""
    torch.manual_seed(0)
    model = timm.create_model("halonet26t", pretrained=False).eval()
    layers = find_attention_layers(model, (3, 256, 256))
    assert [l.rule.name for l in layers] == ["timm-halonet-attention"] * 3
    x = torch.rand(1, 3, 256, 256)
    with pytest.raises(CaptureError, match="strided subgrid"):
        probe.analyze(model, x, layers=[1], **QUIET)
    last = layers[2]
    inputs: list[torch.Tensor] = []
    hook = last.module.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach().clone()))
    try:
        got = capture(model, x, [last])[last.index]
    finally:
        hook.remove()
    assert got.shape == (1, 8, 64, 64)
    want, padded = halo_oracle(last.module, inputs[0])
    torch.testing.assert_close(got.double(), want, atol=TOL, rtol=0)
    assert float(padded.min()) > 0  # every query of the single block also weighted padding


# --------------------------------------------------------------------------- Lambda networks
def test_lambda_layers_refused_by_name():
    torch.manual_seed(0)
    model = timm.create_model("lambda_resnet26t", pretrained=False).eval()
    layers = find_attention_layers(model, (3, 128, 128))
    assert layers and {l.rule.name for l in layers} == {"timm-lambda (refused)"}
    with pytest.raises(CaptureError, match="lambda layers have no attention map"):
        probe.analyze(model, torch.rand(1, 3, 128, 128), data_overrides={"input_size": (3, 128, 128)}, **QUIET)


# --------------------------------------------------------------------------- dense maps in pieces
@pytest.mark.parametrize("family", ["maxvit-parallel", "halonet"])
def test_dense_maps_in_pieces_are_the_whole_map(family, monkeypatch):
    """With at most one image per emitted piece (windows.DENSE_CHUNK_BYTES), the pieces arrive in
    image order and concatenate to the map emitted at once."""
    import probe.families.windows as windows

    if family == "halonet":
        torch.manual_seed(0)
        model, size = TinyHaloNet(num_heads=2, block_size=4, halo_size=1).eval(), (32, 32)
    else:
        model, size = maxvit("maxvit_tiny_pm_256", transformer_grid_size=4), (64, 64)
    x = torch.rand(3, 3, *size)
    layers = find_attention_layers(model, (3, *size))
    whole = capture(model, x, layers)
    pieces: dict[int, list] = {l.index: [] for l in layers}
    monkeypatch.setattr(windows, "DENSE_CHUNK_BYTES", 1)
    with AttentionCapture(layers, lambda i, a: pieces[i].append(a.clone())), torch.no_grad():
        model(x)
    for layer in layers:
        assert [p.shape[0] for p in pieces[layer.index]] == [1, 1, 1]
        torch.testing.assert_close(torch.cat(pieces[layer.index]), whole[layer.index], atol=0, rtol=0)
