"""The training report of :class:`probe.track.Tracker`: attention geometry against training step.

Figures (matplotlib ``Figure`` objects, embedded as PNG; the page needs no network):

* centres per layer (Cordonnier et al. 2020, Fig. 3): each head's Δ over the records as a line
  from the first (small dot) to the last record (large dot, circle of radius
  ``r90_empirical_patches`` where that is at most 2 patches); the query at the origin, the 3x3
  unit-offset block in grey; one axis range for all layers;
* per layer against step: distinct taps (:func:`probe.analyses.convlike.distinct_taps`, descriptive), local
  heads (90 % within 2 patches), mean attention distance (pixels), entropy (nats);
* the conv test over the last half of training (:func:`probe.track.trajectory_verdicts`);
* the training curves (loss, accuracy, learning rates) when a training log is given.

The report sees tables only (no tensors, no model).
"""

from __future__ import annotations

import html
import math
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from jinja2 import Environment, select_autoescape
from .figure import Figure
from matplotlib.patches import Circle

from .plots import to_data_uri

_TEMPLATE = """<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>probe — training report{{ ' — ' ~ title if title }}</title>
<style>body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
img{max-width:100%}table{border-collapse:collapse;font-size:13px}td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:right}
.note{background:#f6f6f6;padding:.6em 1em;border-left:4px solid #888}</style></head><body>
<h1>Attention geometry during training{{ ' — ' ~ title if title }}</h1>
{% if summary %}<p class="note">{{ summary }}</p>{% endif %}
{% if meta %}<table>{% for k, v in meta.items() %}<tr><th style="text-align:left">{{ k }}</th><td style="text-align:left">{{ v }}</td></tr>{% endfor %}</table>{% endif %}
<h2 id="centres">Where each head looks (Δ per layer over training)</h2>
<p>Each line is one head's centre Δ (key − query, patches) from the first record (small dot) to the last
(large dot, with the circle holding 90 % of its measured attention when that radius is ≤ 2 patches). Cross: the query;
grey dots: the unit offsets of a 3×3 kernel. Same axes for every layer.</p>
<img alt="centres per layer" src="{{ figures.centres }}">
<h2 id="per-layer">Per layer against training step</h2>
<img alt="per-layer statistics against step" src="{{ figures.layers }}">
{% if figures.training %}<h2 id="training">Training curves</h2><img alt="training curves" src="{{ figures.training }}">{% endif %}
{% if trajectory_table %}<h2 id="trajectory">Conv test over the last half of training</h2>
<p>Each record's heads judged by the conv test (probe.analyses.convlike); the fraction of the records in the
second half of the run that call the layer conv-like, and the verdict at the last record.</p>
{{ trajectory_table | safe }}{% endif %}
<h2 id="final">Last record, per layer</h2>
{{ final_table | safe }}
</body></html>
"""


def _colour(head: int):
    return matplotlib.colormaps["tab10"](int(head) % 10)


def centres_figure(heads: pd.DataFrame, r_local: float = 2.0, limit: float | None = None) -> Figure:
    """Δ trajectories per layer (one panel per layer); see the module docstring.

    Args:
        heads: the tracker's heads table (``step, layer, head, delta_row, delta_col,
            r90_empirical_patches``).
        r_local: circles are drawn for heads whose last ``r90_empirical_patches <= r_local``.
        limit: half-width of the axes in patches (default: covers the last centres, 2.5–6).
    """
    layers = sorted(heads.layer.unique())
    last_step = heads.step.max()
    last = heads[heads.step == last_step]
    if limit is None:
        d = last[["delta_row", "delta_col"]].abs().to_numpy()
        d = d[np.isfinite(d).all(1)]
        limit = float(np.clip(np.nanmax(d) + 0.8 if d.size else 3.0, 2.5, 6.0))
    ncol = min(3, len(layers))
    nrow = math.ceil(len(layers) / ncol)
    fig = Figure(figsize=(4.0 * ncol, 4.0 * nrow))
    axes = fig.subplots(nrow, ncol, squeeze=False)
    for ax in axes.flat[len(layers):]:
        ax.set_visible(False)
    grid = np.array([(r, c) for r in (-1, 0, 1) for c in (-1, 0, 1)])
    for ax, layer in zip(axes.flat, layers):
        g = heads[heads.layer == layer]
        ax.scatter(grid[:, 1], grid[:, 0], s=30, color="0.8", zorder=1)
        ax.plot([0], [0], "k+", ms=12, mew=2, zorder=5)
        for head, t in g.groupby("head"):
            t = t.sort_values("step")
            r, c = t.delta_row.to_numpy(), t.delta_col.to_numpy()
            ok = np.isfinite(r) & np.isfinite(c)
            if not ok.any():
                continue
            col = _colour(head)
            ax.plot(c[ok], r[ok], "-", color=col, lw=1, alpha=0.7, zorder=2)
            ax.plot(c[ok][0], r[ok][0], "o", color=col, ms=3, zorder=3)
            ax.plot(c[ok][-1], r[ok][-1], "o", color=col, ms=8, mec="k", zorder=4, label=f"head {head}")
            rad = float(t.r90_empirical_patches.to_numpy()[-1])
            if t.step.to_numpy()[-1] == last_step and rad <= r_local:
                ax.add_patch(Circle((c[ok][-1], r[ok][-1]), rad, fill=False, color=col, lw=0.8, alpha=0.6))
        n_loc = int((g[g.step == last_step].r90_empirical_patches <= r_local).sum())
        ax.set_title(f"layer {layer}: {n_loc} of {g['head'].nunique()} heads local at step {last_step}", fontsize=9)
        ax.set_xlim(-limit, limit)
        ax.set_ylim(limit, -limit)  # image convention: row grows downwards
        ax.set_aspect("equal")
        ax.set_xlabel("Δ col (patches)")
        ax.set_ylabel("Δ row (patches)")
        ax.grid(alpha=0.2)
    axes.flat[0].legend(fontsize=6, loc="lower left", ncol=3, framealpha=0.6)
    fig.tight_layout()
    return fig


def layers_figure(layers_table: pd.DataFrame) -> Figure:
    """Conv score, local heads, mean distance and entropy per layer against step."""
    cols = [("conv_n_taps", "distinct taps"), ("conv_n_local", "local heads"),
            ("mean_distance_px", "mean attention distance (px)"), ("entropy_nats", "entropy (nats)")]
    cols = [(c, l) for c, l in cols if c in layers_table]
    fig = Figure(figsize=(4.2 * len(cols), 3.4))
    axes = fig.subplots(1, len(cols), squeeze=False)[0]
    for ax, (c, label) in zip(axes, cols):
        for layer, t in layers_table.groupby("layer"):
            t = t.sort_values("step")
            ax.plot(t.step, t[c], "-o", ms=2, lw=1, label=f"layer {layer}")
        ax.set_xlabel("training step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def training_figure(log: pd.DataFrame) -> Figure:
    """Training loss, accuracy and learning rates against step."""
    fig = Figure(figsize=(12, 3.2))
    a, b, c = fig.subplots(1, 3)
    a.plot(log.step, log.train_loss, lw=1)
    a.set_ylabel("training loss")
    b.plot(log.step, log.train_acc, lw=1)
    b.set_ylabel("training accuracy (augmented batches)")
    for col, lab in (("lr", "weights"), ("position_lr", "Δ, α")):
        if col in log:
            c.plot(log.step, log[col], lw=1, label=lab)
    c.set_ylabel("learning rate")
    c.legend(fontsize=7)
    for ax in (a, b, c):
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def render_training_report(heads: pd.DataFrame, layers_table: pd.DataFrame, log: pd.DataFrame | None = None,
                           meta: dict[str, Any] | None = None, title: str = "", summary: str = "") -> str:
    """The training report as one self-contained HTML string.

    Args:
        heads, layers_table: :attr:`probe.track.Tracker.heads` / ``layers_table``.
        log: optional training log (``step, train_loss, train_acc, lr, position_lr``).
        meta: optional ``{label: value}`` shown at the top (command, seed, accuracy, ...).
        title, summary: page title suffix and an introductory paragraph.
    """
    figures = {"centres": to_data_uri(centres_figure(heads)), "layers": to_data_uri(layers_figure(layers_table)),
               "training": to_data_uri(training_figure(log)) if log is not None and len(log) else None}
    last = layers_table[layers_table.step == layers_table.step.max()]
    trajectory = None
    if "conv_verdict" in layers_table and layers_table["conv_verdict"].notna().any():
        from ..track import trajectory_verdicts

        tv = trajectory_verdicts(layers_table.dropna(subset=["conv_verdict"]), last=0.5)
        trajectory = tv.to_html(index=False, border=0, float_format=lambda x: f"{x:.2f}")
    env = Environment(autoescape=select_autoescape(default_for_string=True))
    return env.from_string(_TEMPLATE).render(
        title=title, summary=summary, meta={k: str(v) for k, v in (meta or {}).items()}, figures=figures,
        final_table=last.to_html(index=False, border=0, float_format=lambda x: f"{x:.3f}", na_rep="–")
        if len(last) else html.escape("no records"), trajectory_table=trajectory)
