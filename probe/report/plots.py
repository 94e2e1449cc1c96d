"""Figures of the report (matplotlib/seaborn), returned as self-contained PNG data URIs."""

from __future__ import annotations

import base64
import io

import numpy as np
import pandas as pd
import seaborn as sns
from .figure import Figure


def to_data_uri(fig: Figure, dpi: int = 110) -> str:
    """Encode a figure as a ``data:image/png;base64,...`` URI (figures are
    :class:`matplotlib.figure.Figure` objects, never pyplot state: nothing to close)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _per_head_vs_depth(heads: pd.DataFrame, column: str, ylabel: str, title: str,
                       refs: pd.DataFrame, ref_column: str, ref_label: str) -> Figure:
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    sns.stripplot(data=heads, x="layer", y=column, hue="head", palette="tab10", jitter=0.15,
                  size=6, ax=ax, native_scale=True)
    ax.plot(refs["layer"], refs[ref_column], "k--", lw=1, label=ref_label)
    ax.set_xlabel("layer (network depth)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    # outside the axes: a legend never covers a head's point
    ax.legend(title="head", fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.grid(alpha=0.3)
    return fig


def distance_figure(heads: pd.DataFrame, layers: pd.DataFrame) -> Figure:
    """Mean attention distance (px) per head against depth with the uniform reference (ViT Fig. 7)."""
    return _per_head_vs_depth(
        heads, "mean_distance_px", "mean attention distance (pixels)",
        "Mean attention distance per head", layers, "uniform_distance_px", "uniform attention")


def entropy_figure(heads: pd.DataFrame, layers: pd.DataFrame) -> Figure:
    """Attention entropy (nats) per head against depth with ``ln(num_keys)`` as reference."""
    return _per_head_vs_depth(
        heads, "entropy_nats", "attention entropy (nats)", "Attention entropy per head",
        layers, "uniform_entropy_nats", "uniform attention (ln #keys)")


def distance_vs_depth(heads: pd.DataFrame, layers: pd.DataFrame) -> str:
    """:func:`distance_figure` as a PNG data URI (for the report)."""
    return to_data_uri(distance_figure(heads, layers))


def entropy_vs_depth(heads: pd.DataFrame, layers: pd.DataFrame) -> str:
    """:func:`entropy_figure` as a PNG data URI (for the report)."""
    return to_data_uri(entropy_figure(heads, layers))


def attention_maps(center_maps: dict[int, np.ndarray], query_rc: tuple[int, int]) -> str:
    """:func:`attention_maps_figure` as a PNG data URI (for the report)."""
    return to_data_uri(attention_maps_figure(center_maps, query_rc), dpi=90)


def attention_maps_figure(center_maps: dict[int, np.ndarray], query_rc: tuple[int, int]) -> Figure:
    """Grid of mean attention maps of one query: a row per layer, a column per head.

    Every row (layer) shares one colour scale, from 0 to the largest value of its heads, with a
    colour bar, so a near-uniform head looks flat next to a peaked one.

    Args:
        center_maps: ``{layer: array (heads, rows, cols)}``.
        query_rc: ``(row, col)`` of the query patch, marked with a cross; or ``{layer: (row, col)}``
            when the layers' grids differ.
    """
    layers = sorted(center_maps)
    n_heads = max(m.shape[0] for m in center_maps.values())
    fig = Figure(figsize=(1.6 * n_heads + 1.0, 1.6 * len(layers) + 0.4), layout="constrained")
    axes = fig.subplots(len(layers), n_heads, squeeze=False)
    for i, layer in enumerate(layers):
        maps = center_maps[layer]
        for h in range(n_heads):
            ax = axes[i, h]
            ax.set_xticks([])
            ax.set_yticks([])
            if h >= maps.shape[0]:
                ax.axis("off")
                continue
            ax.imshow(maps[h], cmap="viridis", interpolation="nearest", vmin=0.0,
                           vmax=float(np.max(maps)) or 1.0)
            rc = query_rc[layer] if isinstance(query_rc, dict) else query_rc
            ax.plot(rc[1], rc[0], "r+", ms=6, mew=1.2)
            if i == 0:
                ax.set_title(f"head {h}", fontsize=8)
            if h == 0:
                ax.set_ylabel(f"layer {layer}", fontsize=8)
        row_axes = [a for a in axes[i] if a.get_visible() and a.images]
        if row_axes:
            cb = fig.colorbar(row_axes[-1].images[0], ax=list(axes[i]), fraction=0.02, pad=0.01)
            cb.ax.tick_params(labelsize=6)
    fig.suptitle("Mean attention of the query patch (red +) over the patch grid; one colour scale per layer",
                 fontsize=9)
    return fig
