"""Figure of the conv-likeness test: score against depth, trained model versus nulls."""

from __future__ import annotations

import numpy as np
from matplotlib.axes import Axes
from .figure import Figure

from ..errors import ProbeError

#: Marker and colour per verdict of :func:`probe.analyses.convlike.convlike_test`.
VERDICT_STYLE = {
    "conv-like": dict(marker="o", color="#1b7837"),
    "local but not grid": dict(marker="s", color="#e08214"),
    "non-local": dict(marker="X", color="#b2182b"),
}


def plot_convlike(result, ax: Axes | None = None, title: str | None = None) -> Figure:
    """Conv-likeness score per layer: trained model, null (b) band, null (a) points, verdicts.

    Draws, against the layer index: the 5-95 % band and median of the lattice-free null (b)
    (grey); the random-init scores of null (a), one point per seed (blue); the trained model's
    score (black line) with its 95 % interval when available, each layer marked by its verdict
    (:data:`VERDICT_STYLE`); the ``min_score`` threshold (dotted) and the deepest layer up to
    which the claim holds (dashed).

    Args:
        result: a :class:`probe.analyses.convlike.ConvLikeResult`.
        ax: axes to draw on; default a new 6.4 x 3.6 inch figure.
        title: axes title; default a sentence naming the claim.

    Returns:
        the ``matplotlib.figure.Figure`` holding the axes.

    Raises:
        ProbeError: if ``result`` has no layer table.
    """
    table = getattr(result, "layers", None)
    if table is None or len(table) == 0 or "conv_score" not in table:
        raise ProbeError("plot_convlike needs a ConvLikeResult from convlike_test")
    if ax is None:
        fig = Figure(figsize=(6.4, 3.6), layout="constrained")
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    layers = table["layer"].to_numpy()
    score = table["conv_score"].to_numpy()

    nulls = [np.asarray(result.null_scores.get(int(l), [])) for l in layers]
    if all(n.size for n in nulls):
        lo = [np.quantile(n, 0.05) for n in nulls]
        hi = [np.quantile(n, 0.95) for n in nulls]
        med = [np.median(n) for n in nulls]
        ax.fill_between(layers, lo, hi, color="0.8", label="null (b): lattice-free, 5–95 %")
        ax.plot(layers, med, color="0.55", lw=1, label="_null median")

    ri = getattr(result, "random_init_scores", {}) or {}
    first = True
    for l in layers:
        r = np.asarray(ri.get(int(l), []))
        if r.size:
            ax.scatter(np.full(r.size, l) + np.linspace(-0.12, 0.12, r.size), r, s=12,
                       color="#4393c3", alpha=0.8, zorder=3,
                       label="null (a): random init, per seed" if first else "_ri")
            first = False

    if {"conv_score_lo", "conv_score_hi"} <= set(table.columns):
        lo, hi = table["conv_score_lo"].to_numpy(), table["conv_score_hi"].to_numpy()
        ok = np.isfinite(lo) & np.isfinite(hi)
        if ok.any():
            ax.vlines(layers[ok], lo[ok], hi[ok], color="k", lw=1, zorder=4)
    ax.plot(layers, score, color="k", lw=1.2, zorder=4, label="trained model")
    for verdict, style in VERDICT_STYLE.items():
        m = table["conv_verdict"].to_numpy() == verdict
        if m.any():
            ax.scatter(layers[m], score[m], s=42, zorder=5, label=verdict, **style)

    cfg = getattr(result, "config", None)
    if cfg is not None:
        ax.axhline(cfg.min_score, color="0.3", ls=":", lw=1, label=f"min score {cfg.min_score}")
    deepest = getattr(result, "deepest_conv_layer", None)
    if deepest is not None:
        ax.axvline(deepest, color="#1b7837", ls="--", lw=1, label=f"claim holds to layer {deepest}")
    ax.set_xlabel("layer")
    ax.set_ylabel("conv-likeness score")
    ax.set_ylim(-0.03, 1.05)
    ax.set_xticks(layers)
    ax.set_title(title or "Do early layers act like K×K convolutions? (Cordonnier et al. 2020)",
                 fontsize=9)
    ax.legend(fontsize=7, loc="best")
    return fig
