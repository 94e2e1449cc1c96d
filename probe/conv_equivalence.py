"""Theorem 1 of Cordonnier, Loukas & Jaggi (ICLR 2020) as code: a convolution as self-attention.

Cordonnier et al. (2020, arXiv:1911.03584) prove that a multi-head self-attention (MHSA) layer
with ``K*K`` heads of dimension ``D_h >= D_out`` and the *quadratic relative positional encoding*
can compute any ``K x K`` convolution (Theorem 1). The construction (Lemma 1, Lemma 2, Eq. 9):

* every head ``h`` ignores the content (``W_qry = W_key = 0``) and scores the key at relative
  offset ``delta = p_key - p_query`` (in patches / pixels of the feature map) by
  ``-alpha_h * ||delta - Delta_h||^2`` (the paper's ``v^T r_delta`` up to a constant that the
  softmax cancels), so as ``alpha_h -> inf`` its attention becomes one-hot on the key at
  ``p_query + Delta_h``;
* the centres ``Delta_h`` enumerate the ``K*K`` offsets of the kernel;
* the per-head value/output product ``W_val^(h) W_out^(h)`` equals the kernel slice at that
  offset, and the output bias equals the convolution bias. Here ``W_val^(h)`` is the slice
  (``D_h = D_out``) and ``W_out^(h)`` the identity, as in the proof of Lemma 1.

Border behaviour (what Theorem 1 does not cover). An MHSA layer has "same" output size, but its
softmax renormalises over the keys that *exist*. A head whose target ``p_query + Delta_h`` lies
outside the grid therefore puts its mass on the existing keys nearest to the target; for the
isotropic quadratic score on a rectangular grid the nearest existing key is the coordinate-wise
clamp of the target. Hence, as ``alpha -> inf``:

* ``border="renormalise"`` (a plain MHSA layer, the default; what a ViT computes) converges to
  ``Conv2d`` with ``padding_mode="replicate"`` everywhere, and agrees with the zero-padded
  ``Conv2d`` only in the interior (queries at least ``dilation*(K//2)`` from every edge);
  on the outer ring it differs by ``O(|W| |x|)``, not by a small amount.
* ``border="zero_pad"`` follows the paper's remedy (Sec. 3, "Padding"): pad the feature map with
  zero tokens, run the MHSA on the padded grid and crop; it converges to the zero-padded
  ``Conv2d`` everywhere. Its attention is then over the padded grid.

In both modes the remaining error comes from the finite ``alpha``: a head leaks a fraction
``1 - 1/Z`` of its mass, ``Z = sum_k exp(-alpha ||delta_k - Delta_h||^2)``, about ``4 exp(-alpha)``
in the interior (four keys at distance 1). :func:`equivalence_errors` measures it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .capture import CaptureRule, Emit, Restore, register_rule, rules
from .errors import ProbeError
from .geometry import TokenGeometry

__all__ = [
    "QuadraticMHSA",
    "QuadraticMHSARule",
    "attention_from_conv",
    "conv_kernel_offsets",
    "conv_equivalent_vit",
    "equivalence_errors",
]

BORDERS = ("renormalise", "zero_pad")


class QuadraticMHSA(nn.Module):
    """Multi-head self-attention with the quadratic relative positional encoding only.

    Head ``h`` gives key ``k`` of query ``q`` the attention score
    ``-alpha_h * ||(p_k - p_q) - Delta_h||^2`` (positions in patches, ``(row, col)``), i.e. the
    quadratic encoding of Cordonnier et al. (2020), Eq. 9, with ``W_qry = W_key = 0``. The
    attention probabilities are its softmax over the patch keys; they do not depend on the input.
    The output is ``proj(concat_h A_h value_h(x))`` with ``value`` a bias-free linear map to
    ``num_heads * head_dim`` and ``proj`` a linear map to ``out_channels``.

    Args:
        in_channels: channels ``C_in`` of the input.
        out_channels: channels ``C_out`` of the output.
        delta: head centres, float tensor ``(H, 2)`` of ``(row, col)`` offsets in patches.
        alpha: head sharpness in 1/patch^2, a float or a tensor ``(H,)``; ``alpha >= 0``
            (``alpha = 0`` is uniform attention over the patch keys).
        head_dim: ``D_h``; default ``out_channels`` (Theorem 1 needs ``D_h >= D_out``).
        num_prefix_tokens: prefix tokens (class token, ...) in token-sequence inputs. Patch
            queries give them probability 0; prefix queries attend uniformly to all tokens.
        grid: patch grid ``(rows, cols)`` of token-sequence inputs; default: inferred as a square.
        border: ``"renormalise"`` (softmax over the existing keys; a plain MHSA layer) or
            ``"zero_pad"`` (pad the grid with ``pad`` zero tokens per side, attend, crop).
        pad: zero tokens per side for ``border="zero_pad"``; default ``ceil(max |Delta|)``.
        bias: whether ``proj`` has a bias.

    Attributes:
        attn_drop: identity module called on the attention probabilities ``(B, H, T, T)`` in every
            forward pass (the hook point timm's ``Attention`` uses; a forward hook on it captures
            the probabilities).
        store_attention: when True, each forward pass keeps ``last_attention`` ``(B, H, T, T)``.
        fused_attn: always False (the probabilities are materialised).

    Input/output: a feature map ``(B, C_in, rows, cols)`` -> ``(B, C_out, rows, cols)``, or a
    token sequence ``(B, T, C_in)`` with ``T = num_prefix_tokens + rows*cols`` (row-major patches)
    -> ``(B, T, C_out)``. ``T x T`` attention costs ``O(H T^2)`` memory.

    Raises:
        ProbeError: on inconsistent shapes, negative ``alpha``, an unknown border mode, or an
            input whose channels or token count do not fit.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        delta: torch.Tensor | Sequence[Sequence[float]],
        alpha: float | torch.Tensor | Sequence[float] = 30.0,
        *,
        head_dim: int | None = None,
        num_prefix_tokens: int = 0,
        grid: tuple[int, int] | None = None,
        border: str = "renormalise",
        pad: int | None = None,
        bias: bool = True,
    ) -> None:
        super().__init__()
        delta_t = torch.as_tensor(delta, dtype=torch.float32)
        if delta_t.dim() != 2 or delta_t.shape[1] != 2 or delta_t.shape[0] < 1:
            raise ProbeError(f"delta must have shape (heads, 2), got {tuple(delta_t.shape)}")
        num_heads = int(delta_t.shape[0])
        alpha_t = torch.as_tensor(alpha, dtype=torch.float32)
        if alpha_t.dim() == 0:
            alpha_t = alpha_t.expand(num_heads).clone()
        if alpha_t.shape != (num_heads,):
            raise ProbeError(
                f"alpha must be a number or have shape ({num_heads},), got {tuple(alpha_t.shape)}"
            )
        if not torch.isfinite(alpha_t).all() or (alpha_t < 0).any():
            raise ProbeError("alpha must be finite and >= 0 (0 = uniform attention)")
        if border not in BORDERS:
            raise ProbeError(f"border must be one of {BORDERS}, got {border!r}")
        if in_channels < 1 or out_channels < 1:
            raise ProbeError("in_channels and out_channels must be >= 1")
        if num_prefix_tokens < 0:
            raise ProbeError(f"num_prefix_tokens must be >= 0, got {num_prefix_tokens}")
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.num_heads = num_heads
        self.head_dim = int(head_dim or out_channels)
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.grid = None if grid is None else (int(grid[0]), int(grid[1]))
        self.border = border
        self.pad = int(math.ceil(float(delta_t.abs().max()))) if pad is None else int(pad)
        self.delta = nn.Parameter(delta_t)
        self.alpha = nn.Parameter(alpha_t)
        self.value = nn.Linear(in_channels, num_heads * self.head_dim, bias=False)
        self.proj = nn.Linear(num_heads * self.head_dim, out_channels, bias=bias)
        self.attn_drop = nn.Identity()
        self.fused_attn = False
        self.store_attention = False
        self.last_attention: torch.Tensor | None = None

    #: Centre spread (patches) and sharpness (1/patch^2) of :meth:`reset_parameters`.
    INIT_DELTA_STD = 1.0
    INIT_ALPHA = 0.1

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random initialisation: ``Delta ~ N(0, 1)`` patches per axis, ``alpha = 0.1`` per
        patch^2 (90 % of the mass within 4.8 patches: untrained and non-local), ``value`` and
        ``proj`` with ``nn.Linear``'s default init. probe's convention for the "same
        architecture at random initialisation" null; uses the global torch RNG."""
        self.delta.normal_(0.0, self.INIT_DELTA_STD)
        self.alpha.fill_(self.INIT_ALPHA)
        self.value.reset_parameters()
        self.proj.reset_parameters()

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, heads={self.num_heads}, "
            f"head_dim={self.head_dim}, border={self.border!r}, "
            f"num_prefix_tokens={self.num_prefix_tokens}"
        )

    def attention_probabilities(
        self, grid: tuple[int, int], num_prefix_tokens: int = 0
    ) -> torch.Tensor:
        """Attention probabilities of the heads on a patch grid (input-independent).

        Args:
            grid: ``(rows, cols)`` of the grid the attention runs on.
            num_prefix_tokens: prefix tokens placed before the patches.

        Returns:
            tensor ``(H, T, T)``, ``T = num_prefix_tokens + rows*cols``, dtype of the parameters;
            rows sum to one; patch rows put zero mass on prefix keys; prefix rows are uniform.
        """
        geo = TokenGeometry(0, grid)
        off = geo.offsets().to(self.delta.device, self.delta.dtype)  # (P, P, 2): p_k - p_q
        diff = off[None] - self.delta[:, None, None, :]  # (H, P, P, 2)
        logits = -self.alpha[:, None, None] * diff.pow(2).sum(-1)
        patch = logits.softmax(-1)
        if num_prefix_tokens == 0:
            return patch
        h, p = patch.shape[0], patch.shape[1]
        t = num_prefix_tokens + p
        attn = patch.new_zeros(h, t, t)
        attn[:, :num_prefix_tokens, :] = 1.0 / t
        attn[:, num_prefix_tokens:, num_prefix_tokens:] = patch
        return attn

    def _resolve_grid(self, n_patches: int, grid: tuple[int, int] | None) -> tuple[int, int]:
        g = grid or self.grid
        if g is None:
            side = math.isqrt(n_patches)
            if side * side != n_patches:
                raise ProbeError(
                    f"{n_patches} patch tokens do not form a square grid; pass grid=(rows, cols)"
                )
            g = (side, side)
        if g[0] * g[1] != n_patches:
            raise ProbeError(
                f"grid {g[0]}x{g[1]} does not match {n_patches} patch tokens "
                f"({self.num_prefix_tokens} prefix tokens expected)"
            )
        return (int(g[0]), int(g[1]))

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        *,
        grid: tuple[int, int] | None = None,
        return_attention: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Apply the layer.

        Args:
            x: ``(B, C_in, rows, cols)`` feature map or ``(B, T, C_in)`` token sequence.
            attn_mask, is_causal: accepted for drop-in use inside timm blocks; must be unset.
            grid: patch grid of a token sequence (overrides the one given at construction).
            return_attention: also return the attention probabilities ``(B, H, T', T')``
                (``T'`` counts the zero tokens of ``border="zero_pad"``).

        Returns:
            the output, ``(B, C_out, rows, cols)`` or ``(B, T, C_out)``; with
            ``return_attention`` a tuple ``(output, attention)``.

        Raises:
            ProbeError: on a wrong rank, channel count or token count, or an attention mask.
        """
        if attn_mask is not None or is_causal:
            raise ProbeError("QuadraticMHSA takes no attention mask (its attention is positional)")
        if x.dim() == 4:
            b, c, rows, cols = x.shape
            seq = x.flatten(2).transpose(1, 2)
            n_pre, g = 0, (rows, cols)
        elif x.dim() == 3:
            b, n, c = x.shape
            n_pre = self.num_prefix_tokens
            if n <= n_pre:
                raise ProbeError(f"token sequence of length {n} has no patch tokens")
            seq = x
            g = self._resolve_grid(n - n_pre, grid)
        else:
            raise ProbeError(
                f"expected (B, C, rows, cols) or (B, tokens, C), got shape {tuple(x.shape)}"
            )
        if c != self.in_channels:
            raise ProbeError(f"input has {c} channels, the layer expects {self.in_channels}")

        pre, patches = seq[:, :n_pre], seq[:, n_pre:]
        run_grid = g
        if self.border == "zero_pad" and self.pad > 0:
            p = self.pad
            fmap = patches.transpose(1, 2).reshape(b, c, g[0], g[1])
            fmap = F.pad(fmap, (p, p, p, p))
            run_grid = (g[0] + 2 * p, g[1] + 2 * p)
            patches = fmap.flatten(2).transpose(1, 2)
        tokens = torch.cat([pre, patches], dim=1)
        t = tokens.shape[1]

        attn = self.attention_probabilities(run_grid, n_pre).to(tokens.dtype)
        attn = self.attn_drop(attn.unsqueeze(0).expand(b, -1, -1, -1))
        if self.store_attention:
            self.last_attention = attn.detach()
        v = self.value(tokens).reshape(b, t, self.num_heads, self.head_dim)
        out = torch.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, t, -1)
        out = self.proj(out)

        if run_grid != g:
            p = self.pad
            o_pre = out[:, :n_pre]
            o_pat = out[:, n_pre:].reshape(b, run_grid[0], run_grid[1], -1)
            o_pat = o_pat[:, p : p + g[0], p : p + g[1]].reshape(b, g[0] * g[1], -1)
            out = torch.cat([o_pre, o_pat], dim=1)
        if x.dim() == 4:
            out = out.transpose(1, 2).reshape(b, self.out_channels, g[0], g[1])
        return (out, attn) if return_attention else out


class QuadraticMHSARule(CaptureRule):
    """Capture rule for :class:`QuadraticMHSA`: a forward hook on its ``attn_drop`` receives the
    attention probabilities ``(B, H, T, T)``. Registered (first) when this module is imported."""

    name = "quadratic-mhsa"

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, QuadraticMHSA)

    def install(self, module: nn.Module, emit: Emit) -> Restore:
        handle = module.attn_drop.register_forward_hook(lambda m, inp, out: emit(out))
        return handle.remove


if not any(isinstance(r, QuadraticMHSARule) for r in rules()):
    register_rule(QuadraticMHSARule())


def conv_kernel_offsets(conv: nn.Conv2d) -> torch.Tensor:
    """Offsets ``(row, col)`` in pixels that each kernel tap of a 'same' ``Conv2d`` reads.

    For stride 1, ``nn.Conv2d`` (a cross-correlation) computes
    ``y[:, i, j] = b + sum_{u,v} W[:, :, u, v] x[:, i + d*u - p_r, j + d*v - p_c]`` with dilation
    ``d`` and leading padding ``(p_r, p_c)``; tap ``(u, v)`` reads offset
    ``(d*u - p_r, d*v - p_c)``.

    Returns:
        float tensor ``(K_r*K_c, 2)``, taps in row-major ``(u, v)`` order.

    Raises:
        ProbeError: if the convolution is not a stride-1, 'same'-size 2-D convolution.
    """
    if not isinstance(conv, nn.Conv2d):
        raise ProbeError(f"expected an nn.Conv2d, got {type(conv).__name__}")
    if tuple(conv.stride) != (1, 1):
        raise ProbeError(f"Theorem 1 needs stride 1, the convolution has stride {conv.stride}")
    kr, kc = conv.kernel_size
    dr, dc = conv.dilation
    if conv.padding == "same":
        pr, pc = (dr * (kr - 1)) // 2, (dc * (kc - 1)) // 2
    elif isinstance(conv.padding, tuple) and conv.padding == (dr * (kr - 1) // 2, dc * (kc - 1) // 2) \
            and dr * (kr - 1) % 2 == 0 and dc * (kc - 1) % 2 == 0:
        pr, pc = conv.padding
    else:
        raise ProbeError(
            f"the convolution must keep the size (padding='same' or dilation*(K-1)/2), "
            f"got padding={conv.padding} for kernel {conv.kernel_size}"
        )
    u, v = torch.meshgrid(torch.arange(kr), torch.arange(kc), indexing="ij")
    return torch.stack([dr * u.reshape(-1) - pr, dc * v.reshape(-1) - pc], dim=1).float()


def attention_from_conv(
    conv: nn.Conv2d,
    alpha: float = 30.0,
    *,
    border: str = "renormalise",
    num_prefix_tokens: int = 0,
    grid: tuple[int, int] | None = None,
) -> QuadraticMHSA:
    """The MHSA layer of Theorem 1 (Cordonnier et al. 2020) that computes ``conv``.

    One head per kernel tap (``K_r*K_c`` heads), centred on the tap's offset
    (:func:`conv_kernel_offsets`) with sharpness ``alpha``; head ``h``'s value projection is the
    kernel slice ``W[:, :, u, v]`` (``D_h = C_out``, grouped convolutions expanded to block-
    diagonal slices), the output projection sums the heads (identity blocks) and adds the bias.

    Args:
        conv: a stride-1 ``nn.Conv2d`` whose output has the input's size (``padding='same'`` or
            ``dilation*(K-1)/2``), any ``groups``.
        alpha: sharpness in 1/pixel^2 (large: the error decays like ``4 exp(-alpha)``; 30 gives
            ~1e-12 relative leakage).
        border: ``"renormalise"`` (plain MHSA; converges to the *replicate*-padded convolution) or
            ``"zero_pad"`` (the paper's pad-and-crop; converges to the zero-padded one). See the
            module docstring.
        num_prefix_tokens, grid: for token-sequence inputs, see :class:`QuadraticMHSA`.

    Returns:
        a :class:`QuadraticMHSA` with the dtype and device of ``conv.weight``.

    Raises:
        ProbeError: if ``conv`` is not a stride-1 'same' ``Conv2d`` or ``alpha < 0``.
    """
    offsets = conv_kernel_offsets(conv)
    kr, kc = conv.kernel_size
    w = conv.weight.detach()
    c_out, c_in_g = w.shape[:2]
    g = conv.groups
    c_in = c_in_g * g
    full = w.new_zeros(c_out, c_in, kr, kc)
    og = c_out // g
    for i in range(g):
        full[i * og : (i + 1) * og, i * c_in_g : (i + 1) * c_in_g] = w[i * og : (i + 1) * og]
    layer = QuadraticMHSA(
        c_in,
        c_out,
        offsets,
        alpha,
        head_dim=c_out,
        num_prefix_tokens=num_prefix_tokens,
        grid=grid,
        border=border,
        pad=int(offsets.abs().max()),
        bias=True,
    ).to(device=w.device, dtype=w.dtype)
    slices = full.permute(2, 3, 0, 1).reshape(kr * kc, c_out, c_in)  # (H, C_out, C_in)
    eye = torch.eye(c_out, dtype=w.dtype, device=w.device)
    with torch.no_grad():
        layer.value.weight.copy_(slices.reshape(kr * kc * c_out, c_in))
        layer.proj.weight.copy_(eye.repeat(1, kr * kc))
        layer.proj.bias.copy_(conv.bias.detach() if conv.bias is not None else 0.0)
    return layer


@torch.no_grad()
def equivalence_errors(
    conv: nn.Conv2d,
    alphas: Sequence[float] = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0),
    *,
    size: tuple[int, int] = (12, 12),
    batch: int = 2,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
):
    """Max absolute error between ``conv`` and its Theorem-1 attention layer, by region and alpha.

    Draws ``x ~ N(0, 1)`` of shape ``(batch, C_in, *size)`` and compares, for each ``alpha`` and
    border mode, the attention output with ``F.conv2d`` under zero and replicate padding, over
    the interior (queries whose kernel window lies inside the map) and the border ring.

    Returns:
        ``pandas.DataFrame`` with columns ``alpha``, ``border`` (mode of the attention layer),
        ``reference`` (``"zeros"``/``"replicate"`` padding of the convolution), ``region``
        (``"interior"``/``"border"``), ``max_abs_error``, ``max_abs_output`` (scale of the
        reference).

    Raises:
        ProbeError: as :func:`attention_from_conv`, or if ``size`` has no interior.
    """
    import pandas as pd

    offsets = conv_kernel_offsets(conv)
    mr, mc = (int(v) for v in offsets.abs().max(0).values)
    rows, cols = size
    if rows <= 2 * mr or cols <= 2 * mc:
        raise ProbeError(f"size {size} has no interior for a kernel reaching {mr},{mc} pixels")
    conv = conv.to(dtype)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, conv.in_channels, rows, cols, generator=gen, dtype=dtype)
    refs = {}
    for mode in ("zeros", "replicate"):
        pr, pc = (int(o) for o in (-offsets.min(0).values))
        qr, qc = (int(o) for o in offsets.max(0).values)
        xp = F.pad(x, (pc, qc, pr, qr), mode="constant" if mode == "zeros" else "replicate")
        refs[mode] = F.conv2d(xp, conv.weight, conv.bias, dilation=conv.dilation,
                              groups=conv.groups)
    interior = torch.zeros(rows, cols, dtype=torch.bool)
    interior[mr : rows - mr, mc : cols - mc] = True
    records = []
    for alpha in alphas:
        for border in BORDERS:
            y = attention_from_conv(conv, float(alpha), border=border)(x)
            for mode, ref in refs.items():
                err = (y - ref).abs().amax(dim=(0, 1))
                for region, mask in (("interior", interior), ("border", ~interior)):
                    records.append(
                        dict(
                            alpha=float(alpha),
                            border=border,
                            reference=mode,
                            region=region,
                            max_abs_error=float(err[mask].max()),
                            max_abs_output=float(ref.abs().amax(dim=(0, 1))[mask].max()),
                        )
                    )
    return pd.DataFrame.from_records(records)


def conv_equivalent_vit(
    depth: int = 6,
    conv_layers: int = 3,
    *,
    img_size: int = 64,
    patch_size: int = 8,
    embed_dim: int = 48,
    num_heads: int = 3,
    kernel_size: int = 3,
    alpha: float = 30.0,
    late: str = "uniform",
    num_classes: int = 10,
    seed: int = 0,
) -> nn.Module:
    """A small timm ViT whose first blocks' attention are Theorem-1 equivalents of convolutions.

    A ``timm`` ``VisionTransformer`` (patch embedding, class token, ``depth`` pre-norm blocks)
    in which the attention of blocks ``0 .. conv_layers-1`` is replaced by
    :func:`attention_from_conv` of a random ``kernel_size x kernel_size`` 'same' ``Conv2d``
    (``embed_dim -> embed_dim``, ``kernel_size^2`` heads centred on the kernel offsets, sharpness
    ``alpha``, renormalising border, class token with zero attention from patch queries). The
    later blocks are non-local: ``late="uniform"`` uses :class:`QuadraticMHSA` with
    ``alpha = 0`` (uniform attention over the patch keys, ``num_heads`` heads), ``late="random"``
    keeps timm's randomly initialised dot-product attention (near-uniform at init).

    It is the planted ground truth of the conv-likeness test (:mod:`probe.analyses.convlike`):
    layers ``< conv_layers`` are conv-like, the others non-local. All attention modules call
    ``attn_drop`` on their probabilities ``(B, H, T, T)``, ``T = 1 + (img_size/patch_size)^2``.
    The model also carries ``planted = {"conv_layers": [...], "kernel_size": K, "alpha": alpha}``
    and a timm-style ``pretrained_cfg`` (input size, ImageNet mean/std) for probe's eval
    transform; :class:`QuadraticMHSARule` lets ``probe.analyze`` capture it, and
    :meth:`QuadraticMHSA.reset_parameters` gives the random-initialisation null.

    Args:
        depth: number of blocks; conv_layers: how many leading blocks are conv equivalents.
        img_size, patch_size: square input size and patch size in pixels.
        embed_dim, num_heads: width and heads of the non-conv blocks (``embed_dim`` divisible by
            ``num_heads``); kernel_size: odd kernel size of the planted convolutions.
        alpha: sharpness of the planted heads (1/patch^2); late: ``"uniform"`` or ``"random"``.
        num_classes: classifier outputs; seed: seed of all random weights (global RNG untouched).

    Returns:
        the model in eval mode.

    Raises:
        ProbeError: on inconsistent sizes or an unknown ``late`` mode.
    """
    from timm.models.vision_transformer import VisionTransformer

    if not 0 <= conv_layers <= depth:
        raise ProbeError(f"conv_layers must be in [0, depth={depth}], got {conv_layers}")
    if late not in ("uniform", "random"):
        raise ProbeError(f"late must be 'uniform' or 'random', got {late!r}")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ProbeError(f"kernel_size must be odd and >= 1, got {kernel_size}")
    if img_size % patch_size or embed_dim % num_heads:
        raise ProbeError("img_size must be a multiple of patch_size, embed_dim of num_heads")
    side = img_size // patch_size
    grid = (side, side)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = VisionTransformer(
            img_size=img_size,
            patch_size=patch_size,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            num_classes=num_classes,
            class_token=True,
            global_pool="token",
        )
        for i in range(depth):
            if i < conv_layers:
                conv = nn.Conv2d(embed_dim, embed_dim, kernel_size, padding="same")
                attn = attention_from_conv(
                    conv, alpha, border="renormalise", num_prefix_tokens=1, grid=grid
                )
            elif late == "uniform":
                attn = QuadraticMHSA(
                    embed_dim,
                    embed_dim,
                    torch.zeros(num_heads, 2),
                    0.0,
                    head_dim=embed_dim // num_heads,
                    num_prefix_tokens=1,
                    grid=grid,
                )
            else:
                continue
            model.blocks[i].attn = attn
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    model.pretrained_cfg = {
        "input_size": (3, img_size, img_size),
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "interpolation": "bicubic",
        "crop_pct": 1.0,
        "num_classes": num_classes,
    }
    model.planted = {
        "conv_layers": list(range(conv_layers)),
        "kernel_size": kernel_size,
        "alpha": float(alpha),
    }
    return model.eval()
