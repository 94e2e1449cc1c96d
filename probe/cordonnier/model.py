"""Attention-only vision transformers of Cordonnier, Loukas & Jaggi (ICLR 2020).

The architecture of the paper's CIFAR-10 experiments (their code: epfml/attention-cnn, BERT-style
encoder), scaled in width so that it trains on a laptop CPU:

* **Input**: a ``(B, 3, 32, 32)`` image, 2x2 *concatenation pooling* ("space to depth") into a
  16x16 grid of 12-dim tokens (each token covers 2x2 pixels), a linear embedding to ``dim``.
  No class token: the sequence is the 256 patch tokens in row-major order (0 prefix tokens).
* **Blocks** (``depth``, post-norm as BERT): ``x = LN(x + attention(x))``, ``x = LN(x + MLP(x))``.
* **Read-out**: mean over tokens, a linear classifier.

Attention variants (``attention=``):

``"quadratic"`` — position-only, isotropic quadratic encoding (paper Eq. 9 with
    ``Δ_h``, ``α_h``): ``p_h(k|q) = softmax_k(−α_h ‖δ − Δ_h‖²)``, ``δ = p_k − p_q`` in patches
    ``(row, col)``, normalised over the keys that exist (no padding). Because the exponent is a
    sum of a row and a column term, the softmax over the grid is exactly the product of a row
    softmax ``(16 x 16)`` and a column softmax ``(16 x 16)``, so the layer applies two small
    matrices instead of a ``256 x 256`` one; the probabilities do not depend on the image, so
    they are computed once per forward for the whole batch. Each head's ground truth is
    :attr:`QuadraticAttention.delta` ``(H, 2)`` and :attr:`QuadraticAttention.alpha` ``(H,)``.
``"generalized"`` — position-only, ``p_h(k|q) = softmax_k(−(δ − Δ_h)ᵀ Σ_h⁻¹ (δ − Δ_h))`` with
    ``Σ_h⁻¹ = L_h L_hᵀ`` (paper Sec. 4, "generalized quadratic encoding": a full 2x2 matrix).
``"relative"`` — content attention plus a learned relative positional encoding (paper Eq. 8
    with ``u = v = 0``): ``logit(q, k) = (q_qᵀ k_k + q_qᵀ r_{δ}) / √d_head``, one learned vector
    ``r_δ`` per offset ``δ`` and head.

Every variant routes its probabilities ``(B, H, T, T)`` through ``attn_probs`` (an identity)
when :attr:`materialize` is set, which is how :mod:`probe.families.cordonnier` captures them.

The paper used width 400, 9 heads, 6 layers, 300 epochs; the shipped model is narrower (see
``data/README.md``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

#: timm-style data config: 32x32 input (no resize or crop of CIFAR images), CIFAR-10 mean/std.
CIFAR_CFG = {
    "input_size": (3, 32, 32),
    "mean": (0.4914, 0.4822, 0.4465),
    "std": (0.2470, 0.2435, 0.2616),
    "interpolation": "bilinear",
    "crop_pct": 1.0,
    "num_classes": 10,
}

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

ATTENTIONS = ("quadratic", "generalized", "relative")

#: How the position-only heads get their values: ``"projected"`` (a value projection to ``dim``
#: split into ``H`` slices of ``dim / H``, as a ViT) or ``"input"`` (every head mixes the whole
#: ``dim``-wide input and one linear map takes the ``H · dim`` concatenation back to ``dim``: the
#: multi-head form of Cordonnier et al. 2020, Eq. 5, and of their code, 12.1 M parameters at
#: width 400).
VALUES = ("projected", "input")


def _grid_offsets(rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column offsets ``δ = p_k − p_q``: ``(rows, rows)`` and ``(cols, cols)``, ``[q, k]``."""
    r = torch.arange(rows, dtype=torch.float32)
    c = torch.arange(cols, dtype=torch.float32)
    return r[None, :] - r[:, None], c[None, :] - c[:, None]


class _PositionalAttention(nn.Module):
    """Shared parts of the position-only variants: value and output projections.

    Args:
        dim: token width.
        num_heads: heads ``H``; each head mixes a ``dim // H`` slice of the values.
        grid: patch grid ``(rows, cols)``.
    """

    def __init__(self, dim: int, num_heads: int, grid: tuple[int, int], values: str = "projected"):
        super().__init__()
        if values not in VALUES:
            raise ValueError(f"unknown values {values!r}; use one of {', '.join(VALUES)}")
        if values == "projected" and dim % num_heads:
            raise ValueError(f"dim {dim} is not a multiple of num_heads {num_heads}")
        self.dim, self.num_heads, self.grid = dim, num_heads, (int(grid[0]), int(grid[1]))
        self.values = values
        if values == "projected":
            self.head_dim = dim // num_heads
            self.value = nn.Linear(dim, dim)
        else:  # each head mixes the whole input (Cordonnier et al. 2020, Eq. 5 / Theorem 1)
            self.head_dim = dim
            self.value = nn.Identity()
        self.proj = nn.Linear(num_heads * self.head_dim, dim)
        self.attn_probs = nn.Identity()  # capture point: (B, H, T, T) when materialize is set
        self.materialize = False
        dr, dc = _grid_offsets(*self.grid)
        self.register_buffer("offset_rows", dr, persistent=False)
        self.register_buffer("offset_cols", dc, persistent=False)

    def full_probs(self) -> torch.Tensor:
        """Attention probabilities ``(H, T, T)``, ``T = rows·cols``, rows sum to 1."""
        raise NotImplementedError

    def _apply_full(self, v: torch.Tensor) -> torch.Tensor:
        # v: (B, H, T, d)
        b = v.shape[0]
        p = self.full_probs()
        p = self.attn_probs(p.unsqueeze(0).expand(b, -1, -1, -1))
        return p @ v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, dim) -> (B, T, dim)``."""
        b, t, _ = x.shape
        if self.values == "projected":
            v = self.value(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        else:
            v = x.unsqueeze(1).expand(b, self.num_heads, t, self.dim)
        out = self._mix(v)
        return self.proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))

    def _mix(self, v: torch.Tensor) -> torch.Tensor:
        return self._apply_full(v)


class QuadraticAttention(_PositionalAttention):
    """Position-only attention with the isotropic quadratic encoding (Cordonnier et al. Eq. 9).

    ``p_h(k|q) ∝ exp(−α_h ‖δ − Δ_h‖²)``, ``δ = p_k − p_q`` in patches, over the keys of the grid.
    Parameters: ``centers`` ``(H, 2)`` = Δ (row, col) in patches, initialised ``N(0, 2²)`` as in
    the paper; ``alpha_raw`` ``(H,)`` with ``α = |alpha_raw|`` (per patch²), initialised at
    ``alpha_init`` (default 0.1: broad heads, σ = 1/√(2α) = 2.2 patches, 90 % of the mass within
    4.8 patches). A linear parametrisation: with ``α = softplus(raw)`` the step of α scales with
    α² near 0, and in a first 6.5-epoch run with α initialised at 0.02 the heads of layer 0 stayed
    broad (α ≤ 0.17); ``|raw|`` moves α at the learning rate and never sticks at 0.

    Shapes: input/output ``(B, T, dim)`` with ``T = rows·cols`` (no prefix tokens).
    """

    def __init__(self, dim: int, num_heads: int, grid: tuple[int, int], alpha_init: float = 0.1,
                 center_init_std: float = 2.0, values: str = "projected"):
        super().__init__(dim, num_heads, grid, values)
        self.alpha_init, self.center_init_std = float(alpha_init), float(center_init_std)
        self.centers = nn.Parameter(torch.randn(num_heads, 2) * center_init_std)
        self.alpha_raw = nn.Parameter(torch.full((num_heads,), float(alpha_init)))

    def reset_parameters(self) -> None:
        """Re-draw Δ ~ N(0, center_init_std²) and set α = alpha_init (the initialisation), so a
        random-init copy (the conv test's null (a)) has untrained positional parameters."""
        with torch.no_grad():
            self.centers.normal_(0.0, self.center_init_std)
            self.alpha_raw.fill_(self.alpha_init)

    @property
    def delta(self) -> torch.Tensor:
        """Δ of each head, ``(H, 2)`` (row, col) in patches (ground truth for the fits)."""
        return self.centers.detach()

    @property
    def alpha(self) -> torch.Tensor:
        """α of each head, ``(H,)``, per patch² (ground truth for the fits)."""
        return self.alpha_raw.detach().abs()

    def factor_probs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Row and column factors ``(H, rows, rows)``, ``(H, cols, cols)``, ``[h, q, k]``.

        ``p_h((kr, kc) | (qr, qc)) = R_h[qr, kr] · C_h[qc, kc]`` exactly.
        """
        a = self.alpha_raw.abs()[:, None, None]
        lr = -a * (self.offset_rows[None] - self.centers[:, 0, None, None]) ** 2
        lc = -a * (self.offset_cols[None] - self.centers[:, 1, None, None]) ** 2
        return lr.softmax(-1), lc.softmax(-1)

    def full_probs(self) -> torch.Tensor:
        r, c = self.factor_probs()
        h, nr, nc = r.shape[0], self.grid[0], self.grid[1]
        # p[h, (qr,qc), (kr,kc)] = r[h,qr,kr] * c[h,qc,kc]
        return (r[:, :, None, :, None] * c[:, None, :, None, :]).reshape(h, nr * nc, nr * nc)

    def _mix(self, v: torch.Tensor) -> torch.Tensor:
        if self.materialize:
            return self._apply_full(v)
        b, h, t, d = v.shape
        r, c = self.factor_probs()
        vg = v.reshape(b, h, self.grid[0], self.grid[1], d)
        # out[b,h,qr,qc,d] = sum_kr r[h,qr,kr] sum_kc c[h,qc,kc] v[b,h,kr,kc,d]
        y = torch.einsum("hqk,bhrkd->bhrqd", c, vg)
        y = torch.einsum("hqk,bhkcd->bhqcd", r, y)
        return y.reshape(b, h, t, d)


class GeneralizedQuadraticAttention(_PositionalAttention):
    """Position-only attention with a full 2x2 matrix per head (Cordonnier et al. Sec. 4).

    ``p_h(k|q) ∝ exp(−(δ − Δ_h)ᵀ Σ_h⁻¹ (δ − Δ_h))``, ``Σ_h⁻¹ = L_h L_hᵀ``, ``L_h`` lower
    triangular with diagonal ``|diag_raw|``. ``Σ_h⁻¹ = α I`` gives the isotropic form.
    """

    def __init__(self, dim: int, num_heads: int, grid: tuple[int, int], alpha_init: float = 0.1,
                 center_init_std: float = 2.0):
        super().__init__(dim, num_heads, grid)
        self.alpha_init, self.center_init_std = float(alpha_init), float(center_init_std)
        self.centers = nn.Parameter(torch.randn(num_heads, 2) * center_init_std)
        self.diag_raw = nn.Parameter(torch.full((num_heads, 2), math.sqrt(alpha_init)))
        self.lower = nn.Parameter(torch.zeros(num_heads))

    def reset_parameters(self) -> None:
        """Re-draw Δ and reset Σ⁻¹ to ``alpha_init · I`` (the initialisation)."""
        with torch.no_grad():
            self.centers.normal_(0.0, self.center_init_std)
            self.diag_raw.fill_(math.sqrt(self.alpha_init))
            self.lower.zero_()

    @property
    def delta(self) -> torch.Tensor:
        """Δ of each head, ``(H, 2)`` (row, col) in patches."""
        return self.centers.detach()

    def precision(self) -> torch.Tensor:
        """``Σ⁻¹`` of each head, ``(H, 2, 2)`` per patch²."""
        d = self.diag_raw.abs()
        z = torch.zeros_like(self.lower)
        L = torch.stack([torch.stack([d[:, 0], z], -1), torch.stack([self.lower, d[:, 1]], -1)], -2)
        return L @ L.transpose(-1, -2)

    def full_probs(self) -> torch.Tensor:
        nr, nc = self.grid
        dr = self.offset_rows[:, None, :, None].expand(nr, nc, nr, nc).reshape(nr * nc, nr * nc)
        dc = self.offset_cols[None, :, None, :].expand(nr, nc, nr, nc).reshape(nr * nc, nr * nc)
        e = torch.stack([dr, dc], -1)[None] - self.centers[:, None, None, :]  # (H, T, T, 2)
        logits = -torch.einsum("hqki,hij,hqkj->hqk", e, self.precision(), e)
        return logits.softmax(-1)


class RelativeContentAttention(nn.Module):
    """Content attention with a learned relative positional encoding (Cordonnier et al. Eq. 8).

    ``logit_h(q, k) = (W_q x_q)_hᵀ ((W_k x_k)_h + r_{h, δ}) / √d_head``, ``δ = p_k − p_q``, one
    learned ``r`` of ``d_head`` values per head and offset in ``[−(rows−1), rows−1] x
    [−(cols−1), cols−1]``. Shapes: ``(B, T, dim) -> (B, T, dim)``.
    """

    def __init__(self, dim: int, num_heads: int, grid: tuple[int, int]):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not a multiple of num_heads {num_heads}")
        self.dim, self.num_heads, self.grid = dim, num_heads, (int(grid[0]), int(grid[1]))
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        nr, nc = self.grid
        self.rel = nn.Parameter(torch.randn(num_heads, 2 * nr - 1, 2 * nc - 1, self.head_dim) * 0.02)
        self.attn_probs = nn.Identity()
        self.materialize = False
        r = torch.arange(nr).repeat_interleave(nc)
        c = torch.arange(nc).repeat(nr)
        self.register_buffer("rel_index_row", (r[None, :] - r[:, None]) + nr - 1, persistent=False)
        self.register_buffer("rel_index_col", (c[None, :] - c[:, None]) + nc - 1, persistent=False)

    def reset_parameters(self) -> None:
        """Re-draw the relative encodings ``r ~ N(0, 0.02²)`` (the initialisation)."""
        with torch.no_grad():
            self.rel.normal_(0.0, 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        rel = self.rel[:, self.rel_index_row, self.rel_index_col]  # (H, T, T, d)
        logits = (q @ k.transpose(-1, -2) + torch.einsum("bhqd,hqkd->bhqk", q, rel)) / math.sqrt(self.head_dim)
        p = self.attn_probs(logits.softmax(-1))
        out = (p @ v).transpose(1, 2).reshape(b, t, self.dim)
        return self.proj(out)


class Block(nn.Module):
    """Post-norm encoder block (BERT): ``x = LN(x + attn(x)); x = LN(x + MLP(x))``."""

    def __init__(self, dim: int, num_heads: int, grid: tuple[int, int], mlp_dim: int, attention: str,
                 values: str = "projected", dropout: float = 0.0):
        super().__init__()
        if values != "projected" and attention != "quadratic":
            raise ValueError(f"values={values!r} is implemented for quadratic attention only")
        if attention == "quadratic":
            self.attn = QuadraticAttention(dim, num_heads, grid, values=values)
        elif attention == "generalized":
            self.attn = GeneralizedQuadraticAttention(dim, num_heads, grid)
        elif attention == "relative":
            self.attn = RelativeContentAttention(dim, num_heads, grid)
        else:
            raise ValueError(f"unknown attention {attention!r}; use one of {', '.join(ATTENTIONS)}")
        self.norm1 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))
        self.norm2 = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.drop(self.attn(x)))
        return self.norm2(x + self.drop(self.mlp(x)))


class CordonnierViT(nn.Module):
    """The paper's attention-only CIFAR-10 model; ``(B, 3, 32, 32) -> (B, num_classes)`` logits.

    Args:
        dim: width (paper: 400).
        depth: layers (paper: 6).
        num_heads: heads per layer (paper: 9, so a 3x3 kernel can be expressed).
        mlp_dim: hidden width of each block's MLP (paper: 512 for width 400).
        attention: ``"quadratic"``, ``"generalized"`` or ``"relative"`` (module docstring).
        img_size: square input side in pixels; ``pool``: concatenation pooling factor (2: 16x16
            grid of 2x2-pixel tokens for 32x32 images).
        values: ``"projected"`` or ``"input"`` (:data:`VALUES`; the paper's form).
        dropout: dropout on the attention and MLP outputs before each residual sum (BERT's hidden
            dropout; the paper used 0.1); 0 (default) adds no module.
    """

    def __init__(self, dim: int = 72, depth: int = 6, num_heads: int = 9, mlp_dim: int = 144,
                 attention: str = "quadratic", img_size: int = 32, pool: int = 2, num_classes: int = 10,
                 values: str = "projected", dropout: float = 0.0):
        super().__init__()
        if img_size % pool:
            raise ValueError(f"img_size {img_size} is not a multiple of pool {pool}")
        self.pool = pool
        self.grid = (img_size // pool, img_size // pool)
        self.num_prefix_tokens = 0
        self.embed = nn.Linear(3 * pool * pool, dim)
        self.blocks = nn.ModuleList(Block(dim, num_heads, self.grid, mlp_dim, attention, values, dropout)
                                    for _ in range(depth))
        self.head = nn.Linear(dim, num_classes)
        self.pretrained_cfg = dict(CIFAR_CFG, input_size=(3, img_size, img_size), num_classes=num_classes)
        self.config = {"dim": dim, "depth": depth, "num_heads": num_heads, "mlp_dim": mlp_dim,
                       "attention": attention, "img_size": img_size, "pool": pool, "num_classes": num_classes}
        if values != "projected" or dropout:
            self.config.update(values=values, dropout=float(dropout))

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W) -> (B, T, 3·pool²)``: 2x2 concatenation pooling, row-major tokens."""
        return F.pixel_unshuffle(x, self.pool).flatten(2).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(self.tokens(x))
        for blk in self.blocks:
            x = blk(x)
        return self.head(x.mean(1))


def build(**config) -> CordonnierViT:
    """Factory (``--model probe.cordonnier:build``): an untrained :class:`CordonnierViT`."""
    return CordonnierViT(**config)
