"""Figures of an analysis for notebooks and scripts: every function takes an
:class:`~probe.result.AnalysisResult` and returns a :class:`matplotlib.figure.Figure` (the
object-oriented API: no pyplot state is touched, so figures show inline in Jupyter and can be
saved with ``fig.savefig(...)``). The HTML report draws the same figures.

::

    import probe, probe.plot
    result = probe.analyze()                       # the embedded model
    probe.plot.distance_vs_depth(result)           # ViT Fig. 7: mean attention distance per head
    probe.plot.centres(result, layer=0)            # Cordonnier Fig. 4: Δ and α of one layer
"""

from __future__ import annotations

from matplotlib.figure import Figure

from .errors import ProbeError

__all__ = ["distance_vs_depth", "entropy_vs_depth", "centres", "conv_scores", "attention_maps",
           "attribution_scatter", "distance_modes", "nmi", "rollout", "sink_norms", "sink_positions"]


def _result(result):
    from .result import AnalysisResult

    if not isinstance(result, AnalysisResult):
        raise ProbeError(f"expected an AnalysisResult (from probe.analyze), got {type(result).__name__}")
    return result


def distance_vs_depth(result) -> Figure:
    """Mean attention distance (pixels) of every head against layer, with the uniform-attention
    reference (Dosovitskiy et al. 2021, Fig. 7)."""
    from .report.plots import distance_figure

    r = _result(result)
    return distance_figure(r.heads, r.layers)


def entropy_vs_depth(result) -> Figure:
    """Attention entropy (nats) of every head against layer, with ``ln(#keys)`` (Zhai et al. 2023)."""
    from .report.plots import entropy_figure

    r = _result(result)
    return entropy_figure(r.heads, r.layers)


def centres(result, layer: int | None = None) -> Figure:
    """Fitted centres Δ and 50 %/90 % circles of α of one layer's heads (Cordonnier et al. 2020,
    Fig. 4); default the first analysed layer.

    Raises:
        ProbeError: without the quadratic fits (``fits=False``) or for a layer not analysed.
    """
    from .report.plots_quadratic import plot_quadratic_layer

    r = _result(result)
    if "delta_row" not in r.heads:
        raise ProbeError("this result has no Δ/α fits; run probe.analyze(..., fits=True)")
    layers = sorted(r.stats)
    layer = layers[0] if layer is None else layer
    if layer not in r.stats:
        raise ProbeError(f"layer {layer} was not analysed; analysed layers: {layers}")
    return plot_quadratic_layer(r.heads[r.heads.layer == layer], r.stats[layer].geometry)


def conv_scores(result) -> Figure:
    """The conv test's score and verdict per layer (:mod:`probe.analyses.convlike`).

    Raises:
        ProbeError: if the conv test did not run.
    """
    from .report.plots_convlike import plot_convlike

    r = _result(result)
    if "convlike" not in r.extras:
        raise ProbeError("this result has no conv test; run probe.analyze(..., conv_test=True)")
    return plot_convlike(r.extras["convlike"])


def attention_maps(result, query: tuple[int, int] | None = None) -> Figure:
    """Mean attention map of one query patch ``(row, col)`` (default the central patch) for every
    layer and head, one colour scale per layer."""
    from .report.plots import attention_maps_figure

    r = _result(result)
    g = r.geometry
    if query is None:
        q = g.center_patch
    else:
        from .pipeline import _check_query

        q = _check_query(tuple(query), g)
    return attention_maps_figure(r.center_maps(q), divmod(q, g.grid[1]))


def attribution_scatter(result, x: str = "mean_distance_px") -> Figure:
    """Head importance (captum attribution) against a geometry column, one panel per method.

    Raises:
        ProbeError: if no attribution was run.
    """
    from .report.plots_attribution import importance_scatter

    r = _result(result)
    cols = [c for c in ("importance_ig", "importance_ablation") if c in r.heads]
    if not cols:
        raise ProbeError("this result has no head attribution; run probe.analyze(..., attribution='ig')")
    return importance_scatter(r.heads, x, cols)


def _extra(r, name: str, what: str):
    if name not in r.extras:
        raise ProbeError(f"this result has no {what}; run probe.analyze(..., analyses=[{name!r}])")
    return r.extras[name]


def distance_modes(result) -> Figure:
    """Mean attention distance per head in the published definitions: renormalised over patch
    keys (probe's default, Park et al. 2023) against not renormalised (sayakpaul/probing-vits)
    (:mod:`probe.analyses.distance_modes`).

    Raises:
        ProbeError: if the ``distance_modes`` analysis did not run.
    """
    from .report.plots_extra import distance_modes_figure

    r = _result(result)
    _extra(r, "distance_modes", "distance modes")
    return distance_modes_figure(r.heads)


def nmi(result) -> Figure:
    """Normalised mutual information between query and key positions per head against depth
    (Park et al. 2023, Fig. 4; :mod:`probe.analyses.nmi`).

    Raises:
        ProbeError: if the ``nmi`` analysis did not run.
    """
    from .report.plots_extra import nmi_by_layer

    r = _result(result)
    if "nmi" not in r.heads:
        raise ProbeError("this result has no NMI; run probe.analyze(..., analyses=['nmi'])")
    return nmi_by_layer(r.heads)


def rollout(result) -> Figure:
    """Per-image attention rollout (Abnar & Zuidema 2020) or relevance (Chefer et al. 2021) maps
    over the photos, each scaled to its maximum (:mod:`probe.analyses.rollout`).

    Raises:
        ProbeError: if the ``rollout`` analysis did not run.
    """
    from pathlib import Path

    from .report.plots_extra import rollout_figure

    r = _result(result)
    _extra(r, "rollout", "rollout maps")
    info = r.extras.get("rollout_info") or {}
    maps = info.get("result")
    titles = [Path(str(n)).name for n in info.get("names") or []] or None
    return rollout_figure(r.extras["rollout"], info.get("photos"), titles=titles,
                          method=getattr(maps, "method", "rollout"))


def sink_norms(result) -> Figure:
    """Output-token norm histograms per layer with the outlier fraction (Darcet et al. 2024;
    :mod:`probe.analyses.sinks`).

    Raises:
        ProbeError: if the ``sinks`` analysis did not run.
    """
    from .report.plots_extra import sink_norms_figure

    r = _result(result)
    return sink_norms_figure(_extra(r, "sinks", "attention-sink statistics")["stats"])


def sink_positions(result, layer: int | None = None) -> Figure:
    """Fraction of images in which each patch position holds a high-norm outlier token, over the
    first photo (:mod:`probe.analyses.sinks`); default the layer with the most outliers.

    Raises:
        ProbeError: if the ``sinks`` analysis did not run, or for a layer it did not read.
    """
    from .report.plots_extra import outlier_positions

    r = _result(result)
    stats = _extra(r, "sinks", "attention-sink statistics")["stats"]
    if layer is None:
        layer = max(stats, key=lambda k: (stats[k].outlier_fraction, k))
    if layer not in stats:
        raise ProbeError(f"the sinks analysis read layers {sorted(stats)}, not layer {layer}")
    return outlier_positions(stats[layer].position_frequency, r.extras.get("example_image"),
                             title=f"layer {layer}: outlier frequency per position")
