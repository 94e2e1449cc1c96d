"""Attention sinks and register artifacts (Darcet, Oquab, Mairal & Bojanowski 2024, "Vision
Transformers Need Registers", ICLR): high-norm patch tokens that the model repurposes as global
storage, and the attention that queries put on them.

Per layer (the block that holds the attention module; see :func:`block_of`):

* **Output-token norms** — the L2 norm ``||x_t||`` of every token of the block's output, over the
  channels, as a histogram of ``log10`` norms with fixed bins (:data:`LOG10_EDGES`; values outside
  land in the under/overflow counts), separately for patch tokens and prefix tokens (class,
  distillation, registers), plus the mean norm of each prefix token.
* **Outlier patch tokens** — a scale-free rule instead of Darcet et al.'s fixed "norm > 150" (which
  fits DINOv2 ViT-g only): per image, the modified z-score of Iglewicz & Hoaglin (1993) on the log
  norms of the ``P`` patch tokens, ``z_t = (ln||x_t|| - median) / (1.4826 · MAD)`` with
  ``MAD = median |ln||x|| - median|`` (1.4826 makes ``MAD`` estimate the standard deviation of a
  normal sample; where ``MAD = 0``, 1.2533 times the mean absolute deviation is used instead, and
  no token is an outlier if that is 0 too). A patch token is an outlier when
  ``z_t > z_threshold`` (default :data:`Z_THRESHOLD` = 3.5, their recommended cut-off). Working on
  logs makes the rule invariant to a rescaling of the features and treats "10x the typical norm"
  alike in every layer and model; a median and MAD over the image's own tokens tolerate up to
  half of them being outliers. Reported: the fraction of patch tokens that are outliers, and the
  per-position outlier frequency on the patch grid (outliers at a position / images).
* **Attention on sinks, per head** — for the layer's attention probabilities ``A``: the mass the
  patch queries put on outlier patch keys, ``(1/P) sum_q sum_{k outlier} A[q, k]``, and on prefix
  keys, ``(1/P) sum_q sum_{k < prefix} A[q, k]``, averaged over images; the keys of layer ``l``
  are the tokens **entering** its block, so the outliers for this mass are found (same rule) on the
  block's input. Beside it the outlier fraction among the keys (the mass a uniform head would
  put on them).

Everything is accumulated in fixed-size sums and counts (:class:`SinkReducer`): memory independent
of the number of images. The statistics part is tensor-only; the model side is :func:`block_of`
(which module's output to read), :func:`tokens_from_output` and :class:`SinkHooks`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..errors import ProbeError
from ..geometry import TokenGeometry

#: Default cut-off of the modified z-score (Iglewicz & Hoaglin 1993).
Z_THRESHOLD = 3.5
#: 1 / Phi^-1(3/4): makes the MAD a consistent estimate of a normal standard deviation.
MAD_SCALE = 1.4826
#: sqrt(pi / 2): the same for the mean absolute deviation (the fallback where MAD = 0).
MEANAD_SCALE = 1.2533
#: Bin edges of the norm histograms, in log10(norm): 0.01 .. 10^4 in steps of 0.05 dex.
LOG10_EDGES = np.round(np.arange(-2.0, 4.0 + 1e-9, 0.05), 10)


# ----------------------------------------------------------------------------- tensor-only part


def robust_z(norms: torch.Tensor) -> torch.Tensor:
    """Modified z-score of the log norms along the last axis.

    Args:
        norms: ``(..., N)`` positive token norms (zeros are clamped to the smallest float).

    Returns:
        float64 ``(..., N)``: ``(ln n - median) / (1.4826 MAD)``, with the mean-absolute-deviation
        fallback where ``MAD = 0``, and 0 where both are 0.
    """
    ln = norms.double().clamp_min(torch.finfo(torch.float64).tiny).log()
    med = ln.quantile(0.5, dim=-1, keepdim=True)  # the interpolated median (even N: mean of the middle two)
    dev = (ln - med).abs()
    mad = dev.quantile(0.5, dim=-1, keepdim=True) * MAD_SCALE
    mean_ad = dev.mean(-1, keepdim=True) * MEANAD_SCALE
    scale = torch.where(mad > 0, mad, mean_ad)
    return torch.where(scale > 0, (ln - med) / scale.clamp_min(1e-300), torch.zeros_like(ln))


def outlier_mask(tokens: torch.Tensor, geometry: TokenGeometry, z_threshold: float = Z_THRESHOLD) -> torch.Tensor:
    """High-norm outliers among the patch tokens of each image.

    Args:
        tokens: ``(batch, T, C)`` token features, ``T = geometry.num_tokens``.
        geometry: token geometry (the first ``num_prefix_tokens`` are never outliers).
        z_threshold: cut-off of :func:`robust_z` on the patch tokens' norms.

    Returns:
        bool ``(batch, P)``, row-major over the patch grid.

    Raises:
        ProbeError: on a shape that does not fit the geometry.
    """
    _check_tokens(tokens, geometry)
    norms = tokens[:, geometry.num_prefix_tokens:].double().norm(dim=-1)
    return robust_z(norms) > z_threshold


def _check_tokens(tokens: torch.Tensor, geometry: TokenGeometry) -> None:
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3:
        shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ProbeError(f"expected token features (batch, tokens, channels), got {shape}")
    geometry.check_tokens(tokens.shape[1], where="block output")


@dataclass(frozen=True)
class SinkStats:
    """Accumulated sink statistics of one layer.

    Attributes:
        layer: layer index; geometry: its token geometry; z_threshold: the outlier cut-off.
        n_images: images whose block output was read.
        edges: float64 ``(bins + 1,)`` bin edges in log10(norm) (:data:`LOG10_EDGES`).
        patch_hist, prefix_hist: int64 ``(bins + 2,)`` counts of patch / prefix output-token
            norms: underflow, the bins, overflow.
        prefix_norm_mean: float64 ``(num_prefix_tokens,)``, mean output norm of each prefix token.
        patch_norm_median_mean: mean over images of the median patch-token norm.
        n_outliers: outlier patch tokens (block output), over all images.
        outlier_norm_mean: mean norm of the outliers (NaN without any).
        position_counts: int64 ``(rows, cols)``, outliers per patch position over the images.
        n_attn_images: images whose attention was read.
        mass_outliers, mass_prefix: float64 ``(heads,)``, mean over images of the patch queries'
            attention mass on outlier patch keys (found on the block input) / on prefix keys.
        key_outlier_fraction: mean over images of the outlier fraction among the patch keys.
    """

    layer: int
    geometry: TokenGeometry
    z_threshold: float
    n_images: int
    edges: np.ndarray
    patch_hist: np.ndarray
    prefix_hist: np.ndarray
    prefix_norm_mean: np.ndarray
    patch_norm_median_mean: float
    n_outliers: int
    outlier_norm_mean: float
    position_counts: np.ndarray
    n_attn_images: int
    mass_outliers: np.ndarray
    mass_prefix: np.ndarray
    key_outlier_fraction: float

    @property
    def outlier_fraction(self) -> float:
        """Fraction of the block output's patch tokens that are outliers (over all images)."""
        return self.n_outliers / max(1, self.n_images * self.geometry.num_patches)

    @property
    def position_frequency(self) -> np.ndarray:
        """float64 ``(rows, cols)``: fraction of images in which each patch position is an outlier."""
        return self.position_counts / max(1, self.n_images)

    def layer_row(self) -> dict:
        """One row of the layers table (``sink_*`` columns)."""
        return {
            "layer": self.layer,
            "sink_outlier_fraction": self.outlier_fraction,
            "sink_outlier_norm_ratio": self.outlier_norm_mean / self.patch_norm_median_mean
            if self.n_outliers and self.patch_norm_median_mean > 0 else float("nan"),
            "sink_max_position_frequency": float(self.position_frequency.max()),
            "sink_prefix_norm_mean": float(self.prefix_norm_mean.mean()) if self.prefix_norm_mean.size else float("nan"),
        }

    def heads_frame(self) -> pd.DataFrame:
        """Heads-table rows: ``layer, head, sink_mass_outliers, sink_mass_prefix,
        sink_key_outlier_fraction``."""
        h = len(self.mass_outliers)
        return pd.DataFrame({"layer": self.layer, "head": np.arange(h), "sink_mass_outliers": self.mass_outliers,
                             "sink_mass_prefix": self.mass_prefix,
                             "sink_key_outlier_fraction": self.key_outlier_fraction})


class SinkReducer:
    """Streaming accumulator of :class:`SinkStats` for one layer (tensor-only).

    Feed :meth:`update_tokens` with the block's output tokens and :meth:`update_attention` with
    the layer's attention and the outlier mask of the block's *input* (:func:`outlier_mask`).

    Args:
        layer: layer index; geometry: the layer's token geometry.
        z_threshold: outlier cut-off (> 0).

    Raises:
        ProbeError: for a non-positive ``z_threshold``.
    """

    def __init__(self, layer: int, geometry: TokenGeometry, z_threshold: float = Z_THRESHOLD) -> None:
        if not z_threshold > 0:
            raise ProbeError(f"z_threshold must be > 0, got {z_threshold}")
        self.layer, self.geometry, self.z_threshold = layer, geometry, float(z_threshold)
        nb = len(LOG10_EDGES) - 1
        self._edges = torch.tensor(LOG10_EDGES, dtype=torch.float64)
        self.n_images = 0
        self.patch_hist = torch.zeros(nb + 2, dtype=torch.int64)
        self.prefix_hist = torch.zeros(nb + 2, dtype=torch.int64)
        self.prefix_norm_sum = torch.zeros(geometry.num_prefix_tokens, dtype=torch.float64)
        self.median_sum = 0.0
        self.n_outliers = 0
        self.outlier_norm_sum = 0.0
        self.position_counts = torch.zeros(geometry.num_patches, dtype=torch.int64)
        self.n_attn_images = 0
        self.mass_outliers: torch.Tensor | None = None
        self.mass_prefix: torch.Tensor | None = None
        self.key_fraction_sum = 0.0

    def _hist(self, norms: torch.Tensor) -> torch.Tensor:
        """Counts of ``log10(norms)`` (any shape) in under/bins/over order."""
        v = norms.reshape(-1).double().clamp_min(1e-300).log10().cpu()
        idx = torch.bucketize(v, self._edges, right=True)  # 0 = under, len(edges) = over
        idx = torch.where(v == self._edges[-1], torch.full_like(idx, len(self._edges) - 1), idx)
        return torch.bincount(idx, minlength=len(self._edges) + 1)

    @torch.no_grad()
    def update_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Accumulate one batch of block-output tokens ``(batch, T, C)``.

        Returns:
            bool ``(batch, P)``: the outlier mask of this batch.

        Raises:
            ProbeError: on a shape that does not fit the geometry.
        """
        _check_tokens(tokens, self.geometry)
        n = self.geometry.num_prefix_tokens
        norms = tokens.double().norm(dim=-1)  # (B, T)
        patch, prefix = norms[:, n:], norms[:, :n]
        mask = robust_z(patch) > self.z_threshold
        self.patch_hist += self._hist(patch)
        if n:
            self.prefix_hist += self._hist(prefix)
            self.prefix_norm_sum += prefix.sum(0).cpu()
        self.median_sum += float(patch.quantile(0.5, dim=-1).sum())
        self.n_outliers += int(mask.sum())
        self.outlier_norm_sum += float(patch[mask].sum())
        self.position_counts += mask.sum(0).cpu()
        self.n_images += tokens.shape[0]
        return mask

    @torch.no_grad()
    def update_attention(self, attn: torch.Tensor, key_outliers: torch.Tensor) -> None:
        """Accumulate the attention mass on outlier and prefix keys.

        Args:
            attn: attention probabilities ``(batch, heads, T, T)``.
            key_outliers: bool ``(batch, P)``, outliers among the patch tokens the layer attends
                over (its block's input).

        Raises:
            ProbeError: on shapes that do not fit the geometry or each other.
        """
        g = self.geometry
        if not isinstance(attn, torch.Tensor) or attn.dim() != 4 or attn.shape[-1] != attn.shape[-2]:
            raise ProbeError(f"layer {self.layer}: expected attention (batch, heads, tokens, tokens)")
        g.check_tokens(attn.shape[-1], where=f"layer {self.layer} attention")
        if key_outliers.shape != (attn.shape[0], g.num_patches):
            raise ProbeError(f"layer {self.layer}: outlier mask of shape {tuple(key_outliers.shape)} does not fit "
                             f"{attn.shape[0]} images of {g.num_patches} patches")
        n = g.num_prefix_tokens
        rows = attn[:, :, n:, :].double()  # patch queries
        w = key_outliers.to(rows.dtype)[:, None, None, :]  # (B, 1, 1, P)
        on_outliers = (rows[..., n:] * w).sum(-1).mean(-1)  # (B, H)
        on_prefix = rows[..., :n].sum(-1).mean(-1)
        if self.mass_outliers is None:
            self.mass_outliers = torch.zeros(attn.shape[1], dtype=torch.float64)
            self.mass_prefix = torch.zeros(attn.shape[1], dtype=torch.float64)
        elif self.mass_outliers.shape[0] != attn.shape[1]:
            raise ProbeError(f"layer {self.layer}: head count changed")
        self.mass_outliers += on_outliers.sum(0).cpu()
        self.mass_prefix += on_prefix.sum(0).cpu()
        self.key_fraction_sum += float(key_outliers.double().mean(-1).sum())
        self.n_attn_images += attn.shape[0]

    def result(self) -> SinkStats:
        """The statistics.

        Raises:
            ProbeError: if no block output was accumulated.
        """
        if self.n_images == 0:
            raise ProbeError(f"layer {self.layer}: no block output was accumulated for the sink statistics")
        na = max(1, self.n_attn_images)
        heads = 0 if self.mass_outliers is None else len(self.mass_outliers)
        mo = (self.mass_outliers / na).numpy() if heads else np.zeros(0)
        mp = (self.mass_prefix / na).numpy() if heads else np.zeros(0)
        return SinkStats(
            layer=self.layer, geometry=self.geometry, z_threshold=self.z_threshold, n_images=self.n_images,
            edges=LOG10_EDGES.copy(), patch_hist=self.patch_hist.numpy().copy(),
            prefix_hist=self.prefix_hist.numpy().copy(),
            prefix_norm_mean=(self.prefix_norm_sum / self.n_images).numpy(),
            patch_norm_median_mean=self.median_sum / self.n_images, n_outliers=self.n_outliers,
            outlier_norm_mean=self.outlier_norm_sum / self.n_outliers if self.n_outliers else float("nan"),
            position_counts=self.position_counts.reshape(self.geometry.grid).numpy().copy(),
            n_attn_images=self.n_attn_images, mass_outliers=mo, mass_prefix=mp,
            key_outlier_fraction=self.key_fraction_sum / na if self.n_attn_images else float("nan"),
        )


def sinks_frames(stats: dict[int, SinkStats]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(heads rows, layers rows)`` of ``{layer: SinkStats}``, sorted by layer."""
    if not stats:
        raise ProbeError("no layer has sink statistics to tabulate")
    keys = sorted(stats)
    heads = pd.concat([stats[k].heads_frame() for k in keys], ignore_index=True)
    layers = pd.DataFrame([stats[k].layer_row() for k in keys])
    return heads, layers


# ----------------------------------------------------------------------------- model side

_INDEXED = re.compile(r"(^|_)\d+$")


def block_of(model: nn.Module, layer) -> tuple[str, nn.Module]:
    """The block whose output holds the tokens of an attention layer.

    Rule: the attention module itself when its qualified name ends in an index (a Swin block, which
    the Swin capture rule hooks directly), else its nearest ancestor whose last name segment is an
    index of a ``ModuleList``/``Sequential`` (``3``) or ends in one (``encoder_layer_3``):
    ``blocks.3.attn -> blocks.3`` (timm), ``vit.encoder.layer.3.attention -> vit.encoder.layer.3``
    (Hugging Face), ``encoder.layers.encoder_layer_3.self_attention -> ...encoder_layer_3``
    (torchvision), ``blocks.3.attn:sdpa -> blocks.3`` (functional fallback).

    Args:
        model: the model; layer: an :class:`~probe.capture.AttentionLayer`.

    Returns:
        ``(qualified name, module)``.

    Raises:
        ProbeError: if no such module exists (pass the blocks to :class:`SinkHooks` explicitly).
    """
    modules = dict(model.named_modules())
    name = layer.name.split(":")[0]
    parts = name.split(".") if name else []
    for end in range(len(parts), 0, -1):
        cand = ".".join(parts[:end])
        if _INDEXED.search(parts[end - 1]) and cand in modules:
            return cand, modules[cand]
    raise ProbeError(
        f"layer {layer.index} ({layer.name}): no enclosing block with an indexed name was found to read the "
        "output tokens from; pass blocks={layer: module} to the sink analysis"
    )


def tokens_from_output(out: Any, geometry: TokenGeometry, batch: int) -> torch.Tensor:
    """A block's output as ``(batch, T, C)`` tokens.

    Accepts a tensor (or the first element of a tuple/list, or ``.last_hidden_state``) of shape
    ``(B, T, C)``, ``(B, H, W, C)`` (Swin, ``H W = T``) or sequence-first ``(T, B, C)``.

    Raises:
        ProbeError: if no layout fits ``T = geometry.num_tokens`` and ``B = batch``.
    """
    if isinstance(out, (tuple, list)) and out:
        out = out[0]
    if not isinstance(out, torch.Tensor):
        out = getattr(out, "last_hidden_state", None)
    t = geometry.num_tokens
    if isinstance(out, torch.Tensor):
        if out.dim() == 3 and out.shape[0] == batch and out.shape[1] == t:
            return out
        if out.dim() == 4 and out.shape[0] == batch and out.shape[1] * out.shape[2] == t:
            return out.reshape(batch, t, out.shape[-1])
        if out.dim() == 3 and out.shape[0] == t and out.shape[1] == batch:
            return out.transpose(0, 1)
    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    raise ProbeError(f"block output {shape} is not ({batch} images, {t} tokens, channels); pass the blocks "
                     "whose output holds the layer's tokens explicitly (blocks={layer: module})")


class SinkHooks:
    """Context manager that feeds :class:`SinkReducer` s from a model's blocks during forward passes.

    Installs on each layer's block (:func:`block_of`, or ``blocks``) a forward pre-hook (the input
    tokens -> the key outlier mask of that layer) and a forward hook (the output tokens ->
    :meth:`SinkReducer.update_tokens`). The layer's attention must be passed to
    :meth:`attention` (e.g. from the sink of :class:`~probe.capture.AttentionCapture`), so it can
    share the pipeline's forward pass. Hooks are removed on exit.

    Args:
        model: the model; layers: :class:`~probe.capture.AttentionLayer` list.
        reducers: ``{layer index: SinkReducer}``.
        blocks: optional ``{layer index: module}`` overriding :func:`block_of`.
    """

    def __init__(self, model: nn.Module, layers, reducers: dict[int, SinkReducer],
                 blocks: dict[int, nn.Module] | None = None) -> None:
        self.reducers = reducers
        self.blocks = {l.index: (blocks or {}).get(l.index) or block_of(model, l)[1] for l in layers}
        self._masks: dict[int, list[torch.Tensor]] = {}
        self._handles: list = []

    def _pre(self, index: int) -> Callable:
        def hook(mod, args, kwargs):
            x = args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
            r = self.reducers[index]
            toks = _input_tokens(x, r.geometry)
            self._masks.setdefault(index, []).append(outlier_mask(toks.detach(), r.geometry, r.z_threshold))
        return hook

    def _post(self, index: int) -> Callable:
        def hook(mod, args, kwargs, out):
            r = self.reducers[index]
            x = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
            r.update_tokens(tokens_from_output(out, r.geometry, _batch_of(x, r.geometry)).detach())
        return hook

    def attention(self, index: int, attn: torch.Tensor) -> None:
        """Account one emitted attention tensor of layer ``index`` (chunks of images in order)."""
        masks = self._masks.get(index)
        if not masks:
            raise ProbeError(f"layer {index}: attention arrived before its block's input was seen")
        mask = masks[0]
        b = attn.shape[0]
        self.reducers[index].update_attention(attn.detach(), mask[:b])
        rest = mask[b:]
        if rest.shape[0]:
            masks[0] = rest
        else:
            masks.pop(0)

    def __enter__(self) -> "SinkHooks":
        for index, block in self.blocks.items():
            self._handles.append(block.register_forward_pre_hook(self._pre(index), with_kwargs=True))
            self._handles.append(block.register_forward_hook(self._post(index), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        while self._handles:
            self._handles.pop().remove()
        self._masks.clear()


def _batch_of(x: torch.Tensor, geometry: TokenGeometry) -> int:
    if x.dim() == 3 and x.shape[0] == geometry.num_tokens and x.shape[1] != geometry.num_tokens:
        return x.shape[1]  # sequence-first
    return x.shape[0]


def _input_tokens(x: torch.Tensor, geometry: TokenGeometry) -> torch.Tensor:
    return tokens_from_output(x, geometry, _batch_of(x, geometry))


def compute_sinks(model: nn.Module, images: torch.Tensor, layers=None,
                  geometries: dict[int, TokenGeometry] | None = None, z_threshold: float = Z_THRESHOLD,
                  batch_size: int = 8, blocks: dict[int, nn.Module] | None = None) -> dict[int, SinkStats]:
    """Sink statistics of ``model`` on ``images`` (one forward pass per batch, no gradients).

    Args:
        model: a model whose attention :mod:`probe.capture` recognises.
        images: float ``(N, C, H, W)`` transformed for the model.
        layers: :class:`~probe.capture.AttentionLayer` list (default all).
        geometries: ``{layer index: TokenGeometry}`` (default inferred).
        z_threshold: outlier cut-off of the modified z-score.
        batch_size: images per forward pass.
        blocks: optional ``{layer index: module}`` whose outputs hold the tokens.

    Returns:
        ``{layer index: SinkStats}``.

    Raises:
        ProbeError: for bad arguments, a model without captured attention, or blocks whose input or
            output is not the layer's tokens.
    """
    from ..capture import AttentionCapture, find_attention_layers, infer_geometries

    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[0] < 1 or not images.is_floating_point():
        raise ProbeError("images must be a float tensor (N, C, H, W) with N >= 1, transformed for the model")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ProbeError(f"batch_size must be a positive integer, got {batch_size!r}")
    shape = tuple(int(v) for v in images.shape[1:])
    layers = find_attention_layers(model, shape) if layers is None else list(layers)
    if not layers:
        raise ProbeError("the model has no attention layer that probe can capture")
    if geometries is None or any(l.index not in geometries for l in layers):
        geometries = infer_geometries(model, layers, shape)
    reducers = {l.index: SinkReducer(l.index, geometries[l.index], z_threshold) for l in layers}
    p = next(iter(model.parameters()), None)
    device = p.device if p is not None else images.device
    was_training = model.training
    model.eval()
    try:
        with SinkHooks(model, layers, reducers, blocks) as hooks, \
                AttentionCapture(layers, hooks.attention) as cap, torch.no_grad():
            for s in range(0, images.shape[0], batch_size):
                model(images[s:s + batch_size].to(device))
            cap.check_all_captured(type(model).__name__)
    finally:
        model.train(was_training)
    return {k: r.result() for k, r in reducers.items()}


# ----------------------------------------------------------------------------- registry adapter

from .base import Analysis, ReportInput, option, register_analysis  # noqa: E402


@dataclass(frozen=True)
class SinkOptions:
    """Options of :class:`SinksAnalysis`."""

    images: int = option(32, help="block outputs and attention read on the first N analysed images")
    z_threshold: float = option(Z_THRESHOLD, help="outlier cut-off of the modified z-score of log norms")

    def __post_init__(self) -> None:
        if isinstance(self.images, bool) or not isinstance(self.images, int) or self.images < 1:
            raise ProbeError(f"sinks.images must be a positive integer, got {self.images!r}")
        if not self.z_threshold > 0:
            raise ProbeError(f"sinks.z_threshold must be > 0, got {self.z_threshold}")


@register_analysis
class SinksAnalysis(Analysis):
    """Attention sinks and register artifacts (Darcet et al. 2024) of the analysed layers, on the
    first N analysed images (one extra forward pass, no gradients). ``result.extras["sinks"]``:
    ``{"stats": {layer: SinkStats}, "z_threshold": float}`` (numpy only)."""

    name = "sinks"
    title = "attention sinks and registers"
    consumes = ("model",)
    Options = SinkOptions
    head_columns = ("sink_mass_outliers", "sink_mass_prefix", "sink_key_outlier_fraction")
    layer_columns = ("sink_outlier_fraction", "sink_outlier_norm_ratio", "sink_max_position_frequency",
                     "sink_prefix_norm_mean")
    report_order = 55

    def images_needed(self) -> int:
        return self.options.images

    def run(self, ctx) -> None:
        from ..capture import find_attention_layers

        x = ctx.images[: self.options.images]
        found = {l.index: l for l in find_attention_layers(ctx.net, tuple(int(v) for v in x.shape[1:]))}
        layers = [found[i] for i in ctx.layers]
        with ctx.stage("sinks", total=1) as stage:
            stats = compute_sinks(ctx.net, x, layers=layers, geometries=ctx.geometries,
                                  z_threshold=self.options.z_threshold, batch_size=ctx.settings.batch_size)
            stage.advance()
        heads, layer_rows = sinks_frames(stats)
        ctx.add_head_columns(heads)
        ctx.add_layer_columns(layer_rows)
        ctx.result.extras[self.name] = {"stats": stats, "z_threshold": self.options.z_threshold,
                                        "n_images": int(x.shape[0])}

    @classmethod
    def section(cls, report: ReportInput):
        from ..report.plots import to_data_uri
        from ..report.plots_extra import outlier_positions, sink_norms_figure

        stats: dict[int, SinkStats] = (report.value or {}).get("stats") or {}
        if not stats:
            return None
        hist = sink_norms_figure(stats)
        worst = max(stats, key=lambda k: (stats[k].outlier_fraction, k))
        photo = report.extras.get("example_image")
        pos = outlier_positions(stats[worst].position_frequency, photo,
                                title=f"layer {worst}: outlier frequency per position")
        z = report.value.get("z_threshold", Z_THRESHOLD)
        return {"title": "Attention sinks and register artifacts",
                "html": f"<p>Output-token norms per layer (Darcet et al. 2024). A patch token is an outlier "
                        f"when the modified z-score of its log norm among the image's patch tokens exceeds "
                        f"{z:g} (median / 1.4826 MAD, Iglewicz &amp; Hoaglin 1993), on the first "
                        f"{report.value.get('n_images', '?')} images. Per head, the attention mass on outlier "
                        "and prefix keys is in heads.csv (<code>sink_mass_outliers</code>, "
                        "<code>sink_mass_prefix</code>).</p>"
                        f'<img src="{to_data_uri(hist, dpi=90)}" alt="norm histograms">'
                        f'<img src="{to_data_uri(pos, dpi=90)}" alt="outlier positions">'}
