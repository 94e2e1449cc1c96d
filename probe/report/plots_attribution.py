"""Figures of the head-attribution section: importance against geometry, ablation check.

Every function returns a :class:`matplotlib.figure.Figure` (Agg, nothing shown) that the
report saves; none touches global pyplot state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.cm import ScalarMappable
from matplotlib.colors import BoundaryNorm
from .figure import Figure

from ..analyses.function_geometry import GEOMETRY_LABELS, IMPORTANCE_LABELS
from ..errors import ProbeError


def importance_scatter(
    heads: pd.DataFrame,
    x: str = "mean_distance_px",
    importance: Sequence[str] | None = None,
    cmap: str = "viridis",
) -> Figure:
    """Heads scatter: geometry (x) against importance (y), one point per head, coloured by layer.

    Args:
        heads: heads table with ``layer``, ``x`` and the importance columns; an
            ``<importance>_se`` column, if present, is drawn as vertical error bars (+-1 SE
            over images).
        x: geometry column on the horizontal axis (default mean attention distance in pixels).
        importance: importance columns, one panel each (default: ``importance_ig`` and
            ``importance_ablation`` where present).
        cmap: colour map of the layer index (discrete, one colour per layer).

    Returns:
        Figure with one axes per importance column plus a colour bar labelled "layer".

    Raises:
        ProbeError: if a column is missing.
    """
    if importance is None:
        importance = [c for c in IMPORTANCE_LABELS if c in heads.columns]
    missing = [c for c in ("layer", x, *importance) if c not in heads.columns]
    if missing or not importance:
        raise ProbeError(f"heads table lacks column(s) {missing or 'importance_*'} for the scatter")
    layers = np.sort(heads["layer"].dropna().unique().astype(int))
    bounds = np.append(layers - 0.5, layers[-1] + 0.5)
    norm = BoundaryNorm(bounds, ncolors=256)
    fig = Figure(figsize=(4.2 * len(importance) + 0.8, 3.6), layout="constrained")
    axes = fig.subplots(1, len(importance), squeeze=False)[0]
    for ax, col in zip(axes, importance):
        d = heads[["layer", x, col] + ([f"{col}_se"] if f"{col}_se" in heads else [])].dropna(
            subset=["layer", x, col]
        )
        if f"{col}_se" in d:
            ax.errorbar(d[x], d[col], yerr=d[f"{col}_se"], fmt="none", ecolor="0.8", elinewidth=0.8, zorder=1)
        ax.scatter(d[x], d[col], c=d["layer"], cmap=cmap, norm=norm, s=28, edgecolors="k", linewidths=0.3, zorder=2)
        ax.axhline(0.0, color="0.5", linewidth=0.8, linestyle="--", zorder=0)
        xl = GEOMETRY_LABELS.get(x, x)
        ax.set_xlabel(f"{xl} (px)" if x.endswith("_px") else xl)
        ax.set_ylabel(f"{IMPORTANCE_LABELS.get(col, col)}\n(\u0394 target logit)")
    cb = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=list(axes), ticks=layers)
    cb.set_label("layer")
    return fig


def ablation_check_plot(checks: Mapping[str, object]) -> Figure:
    """Drop of the target logit: ablating the top-k heads of each ranking vs k random heads.

    Args:
        checks: ``{ranking name: AblationCheck}`` (see :func:`probe.attribution.ablation_check`).

    Returns:
        Figure: per ranking, the random draws as grey dots and the top-k drop as a red bar
        marker; y is the mean drop of the target logit (logit units).
    """
    if not checks:
        raise ProbeError("no ablation check to plot; run ablation_check first")
    fig = Figure(figsize=(1.2 + 1.6 * len(checks), 3.4), layout="constrained")
    ax = fig.subplots()
    jitter = np.random.default_rng(0)
    for i, (name, c) in enumerate(checks.items()):
        rd = np.asarray(c.random_drops, dtype=float)
        ax.scatter(i + jitter.uniform(-0.15, 0.15, len(rd)), rd, color="0.55", s=14,
                   label=f"{c.k} random heads" if i == 0 else None, zorder=2)
        ax.hlines(c.top_drop, i - 0.3, i + 0.3, color="tab:red", linewidth=2.5,
                  label=f"top-{c.k} heads" if i == 0 else None, zorder=3)
    ax.axhline(0.0, color="0.5", linewidth=0.8, linestyle="--", zorder=0)
    ax.set_xticks(range(len(checks)), list(checks))
    ax.set_xlim(-0.6, len(checks) - 0.4)
    ax.set_ylabel("drop of target logit")
    ax.legend(frameon=False, fontsize="small")
    return fig
