"""Attention probabilities recomputed by explicit math from a module's own weights.

Each function takes the attention module (or Swin block) and the input it received (grabbed by a
forward pre-hook) and returns float64 probabilities ``(batch, heads, T, T)`` written from the
papers' definitions, independently of the capture code under test.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _d(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().double()


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = t.shape
    return t.reshape(b, n, heads, c // heads).transpose(1, 2)


def timm_vit(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm ``Attention`` / ConViT ``MHSA``: ``softmax(q k^T * head_dim^-0.5)`` (Vaswani et al. Eq. 1)."""
    x = _d(x)
    c = x.shape[-1]
    qkv = F.linear(x, _d(mod.qkv.weight), _d(mod.qkv.bias))
    q, k = _heads(qkv[..., :c], mod.num_heads), _heads(qkv[..., c:2 * c], mod.num_heads)
    scale = (c // mod.num_heads) ** -0.5
    return torch.softmax(q @ k.transpose(-2, -1) * scale, dim=-1)


def cait_talking_heads(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """CaiT talking-heads attention (Touvron et al. 2021): ``softmax`` over keys of the logits
    ``q k^T * scale`` mixed across heads by ``proj_l``."""
    x = _d(x)
    c = x.shape[-1]
    qkv = F.linear(x, _d(mod.qkv.weight), _d(mod.qkv.bias))
    q, k = _heads(qkv[..., :c], mod.num_heads), _heads(qkv[..., c:2 * c], mod.num_heads)
    logits = q @ k.transpose(-2, -1) * (c // mod.num_heads) ** -0.5  # (b, h, n, n)
    mixed = torch.einsum("gh,bhqk->bgqk", _d(mod.proj_l.weight), logits) + _d(mod.proj_l.bias).view(1, -1, 1, 1)
    return torch.softmax(mixed, dim=-1)


def convit_gpsa(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """ConViT gated positional self-attention (d'Ascoli et al. 2021, Eq. 5): content softmax and
    positional softmax over ``r_qk = (dcol, drow, dcol^2 + drow^2)`` mixed by ``sigmoid(gate)``,
    rows renormalised. ``r_qk`` is built here from the square patch grid."""
    x = _d(x)
    b, n, c = x.shape
    h = mod.num_heads
    qk = F.linear(x, _d(mod.qk.weight), _d(mod.qk.bias))
    q, k = _heads(qk[..., :c], h), _heads(qk[..., c:], h)
    content = torch.softmax(q @ k.transpose(-2, -1) * (c // h) ** -0.5, dim=-1)
    side = int(round(math.sqrt(n)))
    rows = torch.arange(n, dtype=torch.float64) // side
    cols = torch.arange(n, dtype=torch.float64) % side
    dcol = cols[None, :] - cols[:, None]
    drow = rows[None, :] - rows[:, None]
    rel = torch.stack([dcol, drow, dcol ** 2 + drow ** 2], dim=-1)  # (n, n, 3)
    pos = F.linear(rel, _d(mod.pos_proj.weight), _d(mod.pos_proj.bias)).permute(2, 0, 1)  # (h, n, n)
    pos = torch.softmax(pos, dim=-1)[None]
    gate = torch.sigmoid(_d(mod.gating_param)).view(1, h, 1, 1)
    mix = (1 - gate) * content + gate * pos
    return mix / mix.sum(-1, keepdim=True)


def multihead(mod: nn.MultiheadAttention, query: torch.Tensor) -> torch.Tensor:
    """``nn.MultiheadAttention`` self-attention per head from ``in_proj_weight`` / ``in_proj_bias``."""
    x = _d(query)
    if not mod.batch_first:
        x = x.transpose(0, 1)
    e = mod.embed_dim
    w, bias = _d(mod.in_proj_weight), _d(mod.in_proj_bias)
    q = F.linear(x, w[:e], None if bias is None else bias[:e])
    k = F.linear(x, w[e:2 * e], None if bias is None else bias[e:2 * e])
    q, k = _heads(q, mod.num_heads), _heads(k, mod.num_heads)
    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(e // mod.num_heads), dim=-1)


def user_sdpa(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``family_models.SdpaAttention``: the definition of SDPA without mask, default scale."""
    x = _d(x)
    c = x.shape[-1]
    qkv = F.linear(x, _d(mod.qkv.weight), _d(mod.qkv.bias))
    q, k = _heads(qkv[..., :c], mod.heads), _heads(qkv[..., c:2 * c], mod.heads)
    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(c // mod.heads), dim=-1)


def user_hand(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``family_models.HandAttention``: ``softmax(q k^T * scale)``."""
    x = _d(x)
    q = _heads(F.linear(x, _d(mod.to_q.weight)), mod.heads)
    k = _heads(F.linear(x, _d(mod.to_k.weight)), mod.heads)
    return torch.softmax(q @ k.transpose(-2, -1) * mod.scale, dim=-1)


def swin_dense(block: nn.Module, x: torch.Tensor, version: int = 1) -> torch.Tensor:
    """Swin (shifted) window attention written over the whole ``H x W`` token grid.

    Token ``p`` sits at shifted coordinates ``s = (p - shift) mod (H, W)``; two tokens attend to each
    other iff ``s // window`` agree. Inside a window the logit is the content term (v1: ``q k^T *
    head_dim^-0.5``, Liu et al. 2021 Eq. 4; v2: cosine similarity times ``exp(min(logit_scale,
    ln 100))``, Liu et al. 2022 Eq. 2) plus the relative position bias ``B[dr + Mh - 1, dc + Mw - 1]``
    (v2: ``16 sigmoid(cpb_mlp(...))``), and ``-100`` between tokens from different regions of the
    cyclic shift. Keys outside the window get probability 0.

    Args:
        block: the timm Swin block; x: its input ``(B, H, W, C)``.

    Returns:
        float64 ``(B, heads, H W, H W)``.
    """
    attn = block.attn
    xin = block.norm1(x) if version == 1 else x
    xd = _d(xin)
    b, hh, ww, c = xd.shape
    t = hh * ww
    mh, mw = (int(v) for v in block.window_size)
    sh, sw = (int(v) for v in block.shift_size)
    heads = attn.num_heads
    seq = xd.reshape(b, t, c)
    if version == 1:
        qkv = F.linear(seq, _d(attn.qkv.weight), _d(attn.qkv.bias))
    else:
        bias = torch.cat([_d(attn.q_bias), _d(attn.k_bias), _d(attn.v_bias)])
        qkv = F.linear(seq, _d(attn.qkv.weight), bias)
    q, k = _heads(qkv[..., :c], heads), _heads(qkv[..., c:2 * c], heads)
    if version == 1:
        logits = q @ k.transpose(-2, -1) * (c // heads) ** -0.5
    else:
        logits = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        logits = logits * torch.clamp(_d(attn.logit_scale), max=math.log(100.0)).exp().view(1, heads, 1, 1)
    r = torch.arange(t) // ww
    col = torch.arange(t) % ww
    sr, sc = (r - sh) % hh, (col - sw) % ww
    win = (sr // mh) * (ww // mw) + sc // mw
    same = win[:, None] == win[None, :]
    ir, ic = sr % mh, sc % mw
    rel = (ir[:, None] - ir[None, :] + mh - 1) * (2 * mw - 1) + (ic[:, None] - ic[None, :] + mw - 1)
    if version == 1:
        table = _d(attn.relative_position_bias_table)  # ((2Mh-1)(2Mw-1), heads)
    else:
        table = 16 * torch.sigmoid(_d(attn.cpb_mlp(attn.relative_coords_table).view(-1, heads)))
    logits = logits + table[rel].permute(2, 0, 1)[None]
    if sh or sw:
        def region(s, n, m, shift):  # the three bands of the cyclic shift along one axis
            if shift == 0:
                return torch.zeros_like(s)
            return (s >= n - m).long() + (s >= n - shift).long()
        lab = region(sr, hh, mh, sh) * 3 + region(sc, ww, mw, sw)
        logits = logits + torch.where(lab[:, None] == lab[None, :], 0.0, -100.0).double()
    logits = logits.masked_fill(~same, float("-inf"))
    return torch.softmax(logits, dim=-1)
