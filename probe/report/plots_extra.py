"""Figures of the rollout, attention-sink, NMI and distance-mode analyses.

Every function takes numpy arrays or DataFrames (never tensors) and returns a
:class:`matplotlib.figure.Figure` (Agg, nothing shown) that the report saves; none touches global
pyplot state.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from .figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from ..errors import ProbeError


def _grid(n: int, ncols: int) -> tuple[int, int]:
    ncols = max(1, min(ncols, n))
    return math.ceil(n / ncols), ncols


def _photo_extent(photo: np.ndarray | None, rows: int, cols: int) -> tuple[float, float, float, float]:
    if photo is None:
        return (-0.5, cols - 0.5, rows - 0.5, -0.5)
    h, w = photo.shape[:2]
    return (0, w, h, 0)


def _check_photos(photos, n: int) -> None:
    if photos is not None and len(photos) != n:
        raise ProbeError(f"got {len(photos)} photos for {n} maps; pass one photo per map or none")


def rollout_figure(
    maps: np.ndarray,
    photos: Sequence[np.ndarray] | None = None,
    titles: Sequence[str] | None = None,
    method: str = "rollout",
    ncols: int = 4,
    alpha: float = 0.55,
    cmap: str = "inferno",
) -> Figure:
    """Per-image rollout or relevance maps over the photos.

    Args:
        maps: ``(images, rows, cols)`` (:attr:`probe.analyses.rollout.RolloutMaps.maps`); each map
            is scaled to its own maximum for display (the values are relative).
        photos: optional images ``(H, W, 3)`` (uint8 or floats in [0, 1]) as the model saw them,
            one per map; the map is stretched over the photo (nearest-patch blocks).
        titles: optional caption per map (e.g. file names).
        method: ``"rollout"`` or ``"relevance"`` (for the title).
        ncols: panels per row; alpha: opacity of the map over a photo; cmap: colour map.

    Returns:
        Figure with one axes per image.

    Raises:
        ProbeError: for a ``maps`` array that is not 3-D or a photo count that does not match.
    """
    maps = np.asarray(maps, dtype=np.float64)
    if maps.ndim != 3 or maps.shape[0] < 1:
        raise ProbeError(f"rollout maps must be (images, rows, cols), got shape {maps.shape}")
    _check_photos(photos, maps.shape[0])
    nr, nc = _grid(maps.shape[0], ncols)
    fig = Figure(figsize=(2.6 * nc, 2.6 * nr + 0.4), layout="constrained")
    axes = fig.subplots(nr, nc, squeeze=False).ravel()
    for i, ax in enumerate(axes):
        ax.set_axis_off()
        if i >= maps.shape[0]:
            continue
        m = maps[i]
        peak = np.nanmax(np.abs(m))
        m = m / peak if peak > 0 else m
        photo = None if photos is None else np.asarray(photos[i])
        extent = _photo_extent(photo, *m.shape)
        if photo is not None:
            ax.imshow(photo, extent=extent)
        ax.imshow(m, cmap=cmap, vmin=0, vmax=1, alpha=alpha if photo is not None else 1.0,
                  extent=extent, interpolation="nearest")
        if titles is not None and i < len(titles):
            ax.set_title(str(titles[i]), fontsize=7)
    label = "attention rollout (Abnar & Zuidema 2020)" if method == "rollout" else \
        "gradient-weighted relevance (Chefer et al. 2021)"
    fig.suptitle(f"{label}; each map scaled to its maximum", fontsize=9)
    return fig


def norm_histograms(
    edges: np.ndarray,
    patch_counts: Mapping[int, np.ndarray],
    prefix_counts: Mapping[int, np.ndarray] | None = None,
    outlier_fraction: Mapping[int, float] | None = None,
    ncols: int = 4,
) -> Figure:
    """Output-token norm histogram per layer (Darcet et al. 2024, Fig. 3 style).

    Args:
        edges: ``(bins + 1,)`` bin edges in log10(norm)
            (:attr:`probe.analyses.sinks.SinkStats.edges`).
        patch_counts: ``{layer: (bins + 2,)}`` counts (underflow, bins, overflow) of patch tokens.
        prefix_counts: same for prefix tokens (class, registers), drawn in a second colour.
        outlier_fraction: ``{layer: fraction}`` of outlier patch tokens, shown in the titles.
        ncols: panels per row.

    Returns:
        Figure, one axes per layer, x = norm (log scale), y = tokens (log scale).

    Raises:
        ProbeError: for counts whose length does not fit the edges, or no layer.
    """
    edges = np.asarray(edges, dtype=np.float64)
    layers = sorted(patch_counts)
    if not layers:
        raise ProbeError("no layer to draw norm histograms for")
    nr, nc = _grid(len(layers), ncols)
    fig = Figure(figsize=(2.9 * nc, 2.2 * nr + 0.3), layout="constrained")
    axes = fig.subplots(nr, nc, squeeze=False).ravel()
    x = 10 ** edges
    # zoom every panel to the bins that hold tokens (the bins are fixed, the data use a few dex)
    used = np.zeros(len(edges) - 1, dtype=bool)
    for counts in list(patch_counts.values()) + list((prefix_counts or {}).values()):
        c = np.asarray(counts)
        if c.shape == (len(edges) + 1,):
            used |= c[1:-1] > 0
            used[0] |= c[0] > 0
            used[-1] |= c[-1] > 0
    idx = np.flatnonzero(used)
    xlim = (x[max(idx[0] - 2, 0)], x[min(idx[-1] + 3, len(x) - 1)]) if idx.size else (x[0], x[-1])
    for ax in axes[len(layers):]:
        ax.set_axis_off()
    for ax, layer in zip(axes, layers):
        for counts, colour, label in ((patch_counts[layer], "C0", "patch"),
                                      ((prefix_counts or {}).get(layer), "C3", "prefix")):
            if counts is None:
                continue
            c = np.asarray(counts, dtype=np.float64)
            if c.shape != (len(edges) + 1,):
                raise ProbeError(f"layer {layer}: {c.shape[0]} counts do not fit {len(edges)} edges "
                                 "(expected underflow, bins, overflow)")
            if c.sum() == 0:
                continue
            inner = c[1:-1].copy()
            inner[0] += c[0]
            inner[-1] += c[-1]
            ax.stairs(inner, x, color=colour, label=label, fill=False)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(*xlim)
        ax.set_ylim(bottom=0.5)
        title = f"layer {layer}"
        if outlier_fraction is not None and layer in outlier_fraction:
            title += f": {100 * outlier_fraction[layer]:.1f} % outliers"
        ax.set_title(title, fontsize=8)
        ax.tick_params(labelsize=7)
        # a zoomed log axis spans about one decade: matplotlib then labels the minor ticks too,
        # which overlap; label the decades and a few plain numbers instead
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    axes[0].legend(fontsize=7)
    fig.supxlabel("output-token norm", fontsize=8)
    fig.supylabel("tokens", fontsize=8)
    return fig


def sink_norms_figure(stats: Mapping[int, Any]) -> Figure:
    """:func:`norm_histograms` of the sinks analysis's per-layer statistics
    (``{layer: probe.analyses.sinks.SinkStats}``): patch and prefix histograms, outlier fractions."""
    if not stats:
        raise ProbeError("no layer to draw norm histograms for")
    return norm_histograms(next(iter(stats.values())).edges, {k: s.patch_hist for k, s in stats.items()},
                           {k: s.prefix_hist for k, s in stats.items() if s.geometry.num_prefix_tokens},
                           {k: s.outlier_fraction for k, s in stats.items()})


def outlier_positions(
    frequency: np.ndarray,
    photo: np.ndarray | None = None,
    title: str | None = None,
    cmap: str = "magma",
) -> Figure:
    """Where high-norm outlier tokens sit: per-position outlier frequency on the patch grid.

    Args:
        frequency: ``(rows, cols)`` fraction of images in which each position is an outlier
            (:attr:`probe.analyses.sinks.SinkStats.position_frequency`).
        photo: optional ``(H, W, 3)`` image to draw the grid over.
        title: axes title (default "outlier frequency").
        cmap: colour map.

    Returns:
        Figure with one axes and a colour bar (0..1).

    Raises:
        ProbeError: for an array that is not 2-D.
    """
    f = np.asarray(frequency, dtype=np.float64)
    if f.ndim != 2:
        raise ProbeError(f"outlier frequency must be (rows, cols), got shape {f.shape}")
    fig = Figure(figsize=(3.6, 3.2), layout="constrained")
    ax = fig.subplots()
    extent = _photo_extent(photo, *f.shape)
    if photo is not None:
        ax.imshow(np.asarray(photo), extent=extent)
    shown = np.ma.masked_where(f <= 0, f) if photo is not None else f  # the photo shows where none sit
    im = ax.imshow(shown, cmap=cmap, vmin=0, vmax=1, alpha=0.75 if photo is not None else 1.0,
                   extent=extent, interpolation="nearest")
    fig.colorbar(im, ax=ax, label="fraction of images")
    ax.set_axis_off()
    ax.set_title(title or "outlier frequency", fontsize=9)
    return fig


def nmi_by_layer(heads: pd.DataFrame, columns: Sequence[str] | None = None) -> Figure:
    """NMI between query and key positions per head against depth (Park et al. 2023, Fig. 4).

    Args:
        heads: table with ``layer``, ``head`` and NMI columns.
        columns: which NMI columns to draw (default those of ``nmi`` and ``nmi_per_image`` present).

    Returns:
        Figure: one point per head and column, the per-layer mean as a line; y in [0, 1].

    Raises:
        ProbeError: if a column is missing.
    """
    if columns is None:
        columns = [c for c in ("nmi", "nmi_per_image") if c in heads.columns]
    missing = [c for c in ("layer", "head", *columns) if c not in heads.columns]
    if missing or not columns:
        raise ProbeError(f"heads table lacks column(s) {missing or ['nmi']} for the NMI plot")
    labels = {"nmi": "NMI of the mean attention", "nmi_per_image": "mean per-image NMI (Park et al.)"}
    fig = Figure(figsize=(4.6, 3.4), layout="constrained")
    ax = fig.subplots()
    for i, col in enumerate(columns):
        d = heads[["layer", col]].dropna()
        jitter = (i - (len(columns) - 1) / 2) * 0.12
        ax.scatter(d["layer"] + jitter, d[col], s=14, color=f"C{i}", alpha=0.7, edgecolors="none")
        m = d.groupby("layer")[col].mean()
        ax.plot(m.index, m.values, color=f"C{i}", marker="o", ms=3, label=labels.get(col, col))
    ax.set_xlabel("layer")
    ax.set_ylabel("normalised mutual information")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    return fig


def distance_modes_figure(heads: pd.DataFrame) -> Figure:
    """Mean attention distance per head and layer in the two pixel modes (renormalised, probe's
    default / Park et al., against unnormalised, sayakpaul/probing-vits): the gap is the mass the
    heads put on prefix tokens.

    Args:
        heads: table with ``layer``, ``mean_distance_renorm_px`` and ``mean_distance_unnorm_px``.

    Returns:
        Figure with one axes, x = layer.

    Raises:
        ProbeError: if a column is missing.
    """
    cols = ["layer", "mean_distance_renorm_px", "mean_distance_unnorm_px"]
    missing = [c for c in cols if c not in heads.columns]
    if missing:
        raise ProbeError(f"heads table lacks column(s) {missing} for the distance-modes plot")
    fig = Figure(figsize=(4.6, 3.4), layout="constrained")
    ax = fig.subplots()
    for i, (col, label) in enumerate(((cols[1], "renormalised (probe, Park et al.)"),
                                      (cols[2], "unnormalised (probing-vits)"))):
        d = heads[["layer", col]].dropna()
        ax.scatter(d["layer"] + (i - 0.5) * 0.15, d[col], s=14, color=f"C{i}", label=label, alpha=0.8)
    ax.set_xlabel("layer")
    ax.set_ylabel("mean attention distance (px)")
    ax.legend(fontsize=7)
    return fig
