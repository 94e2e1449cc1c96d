"""The comparison report (:func:`probe.compare`): figures on relative depth and one HTML page.

Figures are :class:`matplotlib.figure.Figure` objects (no pyplot state) built from the
:class:`~probe.comparison.Comparison` tables only; every model is one colour, its per-layer line
carries the model's label (``line.get_label()``), so the drawn values can be read back.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
from jinja2 import Environment, PackageLoader, select_autoescape
from .figure import Figure

from .plots import to_data_uri

#: Marker per conv-test verdict (as :mod:`probe.report.plots_convlike`).
_VERDICT_MARKER = {"conv-like": "o", "local but not grid": "s", "non-local": "X", "borderline": "D"}


def _colours(labels: list[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(labels) <= 10 else "viridis"]
    n = max(1, len(labels) - 1)
    return {l: cmap(i if len(labels) <= 10 else i / n) for i, l in enumerate(labels)}


def _depth_axes(ax, ylabel: str, title: str) -> None:
    ax.set_xlabel("relative depth (layer / (L − 1))")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.set_xlim(-0.05, 1.05)
    ax.grid(alpha=0.3)


def depth_figure(layers: pd.DataFrame, heads: pd.DataFrame, labels: list[str], column: str, ylabel: str,
                 title: str, reference: str | None = None, head_column: str | None = None) -> Figure:
    """Per-head points and the head mean per layer (± 1.96 bootstrap SE) of every model against
    relative depth, with each model's ``reference`` column (uniform attention) dashed.

    Args:
        layers, heads: :attr:`Comparison.layers` / :attr:`Comparison.heads`.
        labels: models in order (legend order, colours).
        column: per-layer column drawn as a line (its ``_se`` column gives the error bars).
        reference: per-layer column drawn dashed (e.g. ``uniform_distance_side``).
        head_column: per-head column drawn as points (default ``column``).
    """
    fig = Figure(figsize=(7.5, 4.2), layout="constrained")
    ax = fig.add_subplot()
    col = _colours(labels)
    for label in labels:
        t = layers[layers["model"] == label].sort_values("relative_depth")
        h = heads[heads["model"] == label]
        hc = head_column or column
        if hc in h:
            ax.scatter(h["relative_depth"], h[hc], s=9, alpha=0.35, color=col[label], linewidths=0, label="_heads")
        ax.plot(t["relative_depth"], t[column], "-o", ms=4, lw=1.6, color=col[label], label=label)
        if f"{column}_se" in t:
            se = t[f"{column}_se"].to_numpy()
            ok = np.isfinite(se)
            if ok.any():
                ax.errorbar(t["relative_depth"][ok], t[column][ok], yerr=1.96 * se[ok], fmt="none",
                            ecolor=col[label], elinewidth=1, capsize=2, label="_se")
        if reference and reference in t:
            ax.plot(t["relative_depth"], t[reference], "--", lw=0.9, color=col[label], alpha=0.8,
                    label=f"_uniform {label}")
    _depth_axes(ax, ylabel, title)
    ax.legend(fontsize=7, loc="best", title="model (dashed: uniform attention)", title_fontsize=7)
    return fig


def locality_figure(layers: pd.DataFrame, labels: list[str]) -> Figure:
    """Fraction of local heads and median measured radius ``r90`` (patches) against relative depth."""
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    a1, a2 = fig.subplots(1, 2)
    col = _colours(labels)
    for label in labels:
        t = layers[layers["model"] == label].sort_values("relative_depth")
        a1.plot(t["relative_depth"], t["frac_local"], "-o", ms=4, color=col[label], label=label)
        a2.plot(t["relative_depth"], t["r90_median_patches"], "-o", ms=4, color=col[label], label=label)
    r_local = layers["r_local_patches"].dropna().unique()
    for r in r_local:
        a2.axhline(r, color="0.4", ls=":", lw=1, label=f"r_local = {r:g} patches")
    _depth_axes(a1, "fraction of local heads", "Local heads (90 % of attention within r_local of the centre)")
    a1.set_ylim(-0.03, 1.03)
    _depth_axes(a2, "median r90 (patches)", "Measured radius holding 90 % of the attention")
    a1.legend(fontsize=7)
    a2.legend(fontsize=7)
    return fig


def conv_score_figure(layers: pd.DataFrame, labels: list[str]) -> Figure | None:
    """Conv-likeness score per layer against relative depth, marked by verdict; None without conv tests."""
    if not layers["conv_score"].notna().any():
        return None
    fig = Figure(figsize=(7.5, 3.8), layout="constrained")
    ax = fig.add_subplot()
    col = _colours(labels)
    for label in labels:
        t = layers[(layers["model"] == label) & layers["conv_score"].notna()].sort_values("relative_depth")
        if not len(t):
            continue
        ax.plot(t["relative_depth"], t["conv_score"], "-", lw=1.2, color=col[label], label=label)
        for verdict, marker in _VERDICT_MARKER.items():
            m = (t["conv_verdict"] == verdict).to_numpy()
            if m.any():
                ax.scatter(t["relative_depth"][m], t["conv_score"][m], marker=marker, s=36, color=col[label],
                           zorder=3, label="_v")
    for verdict, marker in _VERDICT_MARKER.items():
        ax.scatter([], [], marker=marker, color="0.3", label=verdict)
    _depth_axes(ax, "conv-likeness score S", "Conv test per layer (Cordonnier et al. 2020); marker = verdict")
    ax.set_ylim(-0.03, 1.05)
    ax.legend(fontsize=7, ncol=2)
    return fig


def delta_panels_figure(heads: pd.DataFrame, layers: pd.DataFrame, labels: list[str], n_early: int = 3) -> Figure | None:
    """Fitted centres Δ of every head in the first ``n_early`` analysed layers: a column per model,
    a row per early layer; filled = local head, hollow = not local, the query at the origin (+),
    the K×K kernel offsets as grey dots; axes in patches (row down). None without fits."""
    if "delta_row" not in heads:
        return None
    firsts = {l: sorted(heads.loc[heads["model"] == l, "layer"].unique())[:n_early] for l in labels}
    n_rows = max((len(v) for v in firsts.values()), default=0)
    if n_rows == 0:
        return None
    fig = Figure(figsize=(2.6 * len(labels) + 0.5, 2.6 * n_rows + 0.4), layout="constrained")
    axes = fig.subplots(n_rows, len(labels), squeeze=False)
    col = _colours(labels)
    for j, label in enumerate(labels):
        lt = layers[layers["model"] == label].set_index("layer")
        for i in range(n_rows):
            ax = axes[i, j]
            if i >= len(firsts[label]):
                ax.axis("off")
                continue
            layer = firsts[label][i]
            h = heads[(heads["model"] == label) & (heads["layer"] == layer)]
            k = lt.loc[layer, "conv_kernel_size"]
            k = int(k) if np.isfinite(k) else 3
            half = (k - 1) / 2
            grid = np.arange(-math.floor(half), math.floor(half) + 1)
            gy, gx = np.meshgrid(grid, grid, indexing="ij")
            ax.scatter(gx.ravel(), gy.ravel(), s=10, color="0.75", zorder=1, label="_lattice")
            ok = np.isfinite(h["delta_row"]) & np.isfinite(h["delta_col"])
            local = h["local"].to_numpy(bool) if "local" in h else np.ones(len(h), bool)
            for is_local in (True, False):
                m = ok.to_numpy() & (local == is_local)
                ax.scatter(h["delta_col"][m], h["delta_row"][m], s=30, zorder=3,
                           facecolors=col[label] if is_local else "none", edgecolors=col[label],
                           label=f"{label} layer {layer} {'local' if is_local else 'not local'}")
            ax.plot(0, 0, "r+", ms=8, mew=1.4, zorder=4, label="_query")
            finite = np.concatenate([h["delta_row"][ok].abs().to_numpy(), h["delta_col"][ok].abs().to_numpy()])
            side = max(int(v) for v in str(lt.loc[layer, "grid"]).split("x"))
            lim = min(max(k / 2 + 0.5, float(finite.max()) + 0.7 if finite.size else 0.0), side - 0.5)
            outside = int((finite.reshape(2, -1).max(0) > lim).sum()) if finite.size else 0
            ax.set_xlim(-lim, lim)
            ax.set_ylim(lim, -lim)  # rows grow downwards, as on the image
            ax.set_aspect("equal")
            ax.grid(alpha=0.25)
            n_inf = int((~ok).sum())
            ax.set_title(f"{label} · layer {int(layer)} (depth {float(lt.loc[layer, 'relative_depth']):.2f})"
                         + (f"\n{n_inf} head(s) without a finite Δ" if n_inf else "")
                         + (f"\n{outside} beyond the grid (not shown)" if outside else ""), fontsize=7)
            ax.tick_params(labelsize=6)
            if j == 0:
                ax.set_ylabel("Δ row (patches)", fontsize=7)
            if i == n_rows - 1:
                ax.set_xlabel("Δ column (patches)", fontsize=7)
    fig.suptitle("Where the heads of the early layers look: fitted centre Δ relative to the query (+)", fontsize=9)
    return fig


def verdict_table(layers: pd.DataFrame, labels: list[str]) -> pd.DataFrame | None:
    """Conv verdicts side by side: a row per layer index, a column per model:
    ``verdict (dilation, S)``; None when no model has a conv test."""
    if not (layers["conv_verdict"].astype(str) != "").any():
        return None
    out = pd.DataFrame({"layer": sorted(layers["layer"].unique())})
    for label in labels:
        t = layers[layers["model"] == label].set_index("layer")
        cells = []
        for l in out["layer"]:
            if l not in t.index or not str(t.loc[l, "conv_verdict"]):
                cells.append("–")
                continue
            r = t.loc[l]
            dil = r.get("conv_dilation", np.nan)
            dil = f"dilation {int(dil)}, " if r["conv_verdict"] == "conv-like" and np.isfinite(dil) and dil > 1 else ""
            cells.append(f"{r['conv_verdict']} ({dil}S {r['conv_score']:.2f}; depth {r['relative_depth']:.2f})")
        out[label] = cells
    return out


_LAYER_COLUMNS = {
    "model": "model", "layer": "layer", "relative_depth": "relative depth", "heads": "heads",
    "grid": "grid", "image_side_px": "image side px", "mean_distance_px": "mean dist px",
    "mean_distance_px_se": "± SE", "mean_distance_side": "mean dist / side", "mean_distance_side_se": "± SE ",
    "entropy_nats": "entropy nats", "entropy_nats_se": "±  SE", "entropy_norm": "entropy / ln keys",
    "frac_local": "local heads", "r90_median_patches": "median r90 patches", "r90_median_side": "median r90 / side",
    "conv_verdict": "conv verdict",
}
_DIFF_COLUMNS = {
    "model": "model", "reference": "reference", "layer": "layer", "reference_layer": "ref. layer",
    "relative_depth": "depth", "reference_relative_depth": "ref. depth",
    "mean_distance_side_diff": "Δ mean dist / side", "mean_distance_side_diff_se": "± SE",
    "mean_distance_side_z": "z", "mean_distance_px_diff": "Δ mean dist px", "mean_distance_px_diff_se": "± SE ",
    "entropy_nats_diff": "Δ entropy nats", "entropy_nats_diff_se": "±  SE", "entropy_nats_z": "z ",
    "entropy_norm_diff": "Δ entropy / ln keys", "frac_local_diff": "Δ local heads",
    "r90_median_patches_diff": "Δ median r90 patches",
}


def comparison_figures(comp, which: tuple[str, ...] = ("distance", "entropy", "locality", "conv", "delta")) -> dict[str, Figure]:
    """The comparison's figures by name (``distance``, ``entropy``, ``locality``, and ``conv`` /
    ``delta`` where the results have them), those in ``which`` only.

    Args:
        comp: a :class:`probe.comparison.Comparison`.
    """
    labels = comp.labels
    makers = {
        "distance": lambda: depth_figure(
            comp.layers, comp.heads, labels, "mean_distance_side", "mean attention distance / image side",
            "Mean attention distance against relative depth (Raghu et al. 2021)",
            reference="uniform_distance_side"),
        "entropy": lambda: depth_figure(
            comp.layers, comp.heads, labels, "entropy_nats", "attention entropy (nats)",
            "Attention entropy against relative depth (Park et al. 2023)", reference="uniform_entropy_nats"),
        "locality": lambda: locality_figure(comp.layers, labels),
        "conv": lambda: conv_score_figure(comp.layers, labels),
        "delta": lambda: delta_panels_figure(comp.heads, comp.layers, labels),
    }
    figures = {name: makers[name]() for name in which}
    return {k: f for k, f in figures.items() if f is not None}


def render_comparison(comp) -> str:
    """The comparison report (one HTML string, figures as PNG data URIs, no network when opened).

    Args:
        comp: a :class:`probe.comparison.Comparison`.
    """
    from .render import _fmt, table_html

    labels = comp.labels
    figures = {k: to_data_uri(f, dpi=90 if k == "delta" else 110) for k, f in comparison_figures(comp).items()}
    verdicts = verdict_table(comp.layers, labels)
    summaries = []
    for label, r in zip(labels, comp.results):
        cl = r.extras.get("convlike")
        if cl is not None:
            summaries.append((label, cl.summary()))
    from .heads_table import mark_deterministic

    lt = mark_deterministic(comp.layers[[c for c in _LAYER_COLUMNS if c in comp.layers]]).rename(columns=_LAYER_COLUMNS)
    dt = mark_deterministic(comp.differences[[c for c in _DIFF_COLUMNS if c in comp.differences]]).rename(
        columns=_DIFF_COLUMNS)
    env = Environment(loader=PackageLoader("probe.report", "templates"), autoescape=select_autoescape(["html", "j2"]))
    env.filters["fmt"] = _fmt
    import time

    return env.get_template("compare.html.j2").render(
        labels=labels, reference=comp.reference, order=comp.order, figures=figures,
        models_table=table_html(comp.models_table()), layers_table=table_html(lt),
        verdict_table=table_html(verdicts) if verdicts is not None else "",
        summaries=summaries, differences_table=table_html(dt) if len(dt) else "",
        same_images=_same_images(comp.results), date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    )


def _same_images(results) -> bool:
    names = [tuple(r.meta.get("image_names") or ()) for r in results]
    return bool(names[0]) and all(n == names[0] for n in names)
