"""Fits and tests on the streaming statistics: each step takes an
:class:`~probe.result.AnalysisResult`, adds columns to its tables and an entry to its extras.

Steps see statistics and tables only — never a model. (The random-init null of the conv test
needs re-running the model; :func:`probe.pipeline.analyze` computes those scores and passes them.)
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .analyses.convlike import ConvLikeConfig, ConvLikeResult, LayerFit, convlike_score, convlike_test
from .analyses.quadratic import empirical_mass_radius, fit_layer_stats, max_disk_mass
from .result import AnalysisResult

#: Attention mass of the measured locality radius ``r90_empirical_patches`` (90 %).
R90_MASS = 0.9


def add_quadratic_fits(result: AnalysisResult, anisotropic: bool = False) -> None:
    """Fit Δ and α of every head (Cordonnier et al. 2020, Eq. 9) and add the columns.

    Adds the columns of :meth:`probe.analyses.quadratic.QuadraticFit.to_frame` and
    ``r90_empirical_patches`` (:func:`~probe.analyses.quadratic.empirical_mass_radius` around
    the fitted Δ, or around the query for a head without a finite Δ) to ``result.heads``;
    ``result.extras["quadratic"] = {layer: QuadraticFit}``.
    """
    fits, frames = {}, []
    for layer, st in result.stats.items():
        fit = fit_layer_stats(st, anisotropic=anisotropic)
        frame = fit.to_frame()
        frame["r90_empirical_patches"] = empirical_mass_radius(st.mean_attn, st.geometry, fit.delta, R90_MASS)
        fits[layer] = fit
        frames.append(frame)
    quad = pd.concat(frames, ignore_index=True)
    result.heads = result.heads.merge(quad, on=["layer", "head"], how="left")
    result.extras["quadratic"] = fits


def layer_fits(heads: pd.DataFrame) -> dict[int, LayerFit]:
    """Per-layer inputs of the conv test from a heads table with quadratic-fit columns.

    Locality uses the measured ``r90_empirical_patches``; a head without a finite centre
    (``α = 0``) is placed at the query and, having a large radius, is non-local. The radius's
    standard error is carried over from α's bootstrap standard error by the delta method for a
    radius scaling as ``α^(-1/2)``: ``se(r90) = r90 · se(α) / (2α)``, so the verdict's stability
    reflects the uncertainty of locality as well as of the centres.
    """
    out = {}
    for layer, g in heads.groupby("layer", sort=True):
        delta = g[["delta_row", "delta_col"]].to_numpy(dtype=np.float64)
        finite = np.isfinite(delta).all(1)
        se = g[["delta_row_se", "delta_col_se"]].to_numpy(dtype=np.float64)
        r90 = g["r90_empirical_patches"].to_numpy(dtype=np.float64)
        r90_se = None
        if "alpha_se" in g and "alpha" in g:
            a, ase = g["alpha"].to_numpy(dtype=np.float64), g["alpha_se"].to_numpy(dtype=np.float64)
            with np.errstate(divide="ignore", invalid="ignore"):
                rs = r90 * ase / (2 * a)
            r90_se = np.where(np.isfinite(rs), rs, 0.0)
        out[int(layer)] = LayerFit(
            delta=np.where(finite[:, None], delta, 0.0),
            r90=r90,
            delta_se=np.where(np.isfinite(se), se, 0.0),
            r90_se=r90_se,
        )
    return out


def _score(delta: np.ndarray, r90: np.ndarray, config: ConvLikeConfig) -> float:
    """Score of one layer; a head without a finite centre is placed at the query."""
    delta = np.where(np.isfinite(delta), delta, 0.0)
    return convlike_score(delta, r90=r90, kernel_size=config.kernel_size, r_local=config.r_local,
                          mass=config.mass, tolerance=config.tolerance, calibration=config.calibration,
                          separation=config.tap_separation, window=config.tap_window)


def layer_scores(heads: pd.DataFrame, config: ConvLikeConfig) -> dict[int, float]:
    """:func:`~probe.analyses.convlike.convlike_score` of every layer of a heads table."""
    return {layer: _score(f.delta, f.r90, config) for layer, f in layer_fits(heads).items()}


def stats_layer_scores(stats, config: ConvLikeConfig) -> dict[int, float]:
    """:func:`layer_scores` straight from the streaming statistics, fitting only where needed.

    Same scores as fitting every head (:func:`add_quadratic_fits`, no bootstrap) then
    :func:`layer_scores`: a layer in which no head can hold :data:`R90_MASS` of its attention
    within ``config.r_local`` of *any* centre (:func:`~probe.analyses.quadratic.max_disk_mass`)
    has no local head, so its score is 0 whatever the fitted Δ; only the other layers are
    fitted. Used for the random-init null, whose heads are almost never local.

    Args:
        stats: ``{layer: LayerStats}``.
        config: the conv-likeness thresholds.

    Returns:
        ``{layer: score}`` (sorted by layer).
    """
    out = {}
    for layer, st in sorted(stats.items()):
        mean_attn = st.mean_attn
        bound = max_disk_mass(mean_attn, st.geometry, config.r_local)
        total = mean_attn.sum(-1).mean(-1).numpy()  # (heads,), 1 up to rounding
        if not np.any(bound >= R90_MASS * total - 1e-9):
            out[int(layer)] = 0.0
            continue
        fit = fit_layer_stats(st, bootstrap=False)
        r90 = empirical_mass_radius(mean_attn, st.geometry, fit.delta, R90_MASS)
        out[int(layer)] = _score(fit.delta, r90, config)
    return out


def trial_conv_test(result: AnalysisResult, config: ConvLikeConfig) -> ConvLikeResult:
    """The conv-likeness test of the layers of ``result`` without the random-init null (a).

    Null (a) only adds the requirement that a layer's score exceed every random-init score, so
    the layers of ``conv_like_layers`` here are the only ones whose verdict it can change. Pass
    the result to :func:`add_conv_test` with the null (a) scores. Needs
    :func:`add_quadratic_fits` first.
    """
    return convlike_test(layer_fits(result.heads), config=config)


def add_conv_test(result: AnalysisResult, config: ConvLikeConfig,
                  random_init_scores: dict[int, list[float]] | None = None,
                  trial: ConvLikeResult | None = None) -> None:
    """Test per layer whether the heads act like a K x K convolution (Cordonnier et al. 2020,
    Theorem 1) against the lattice-free null and, when given, the random-init null.

    Needs :func:`add_quadratic_fits` first. Adds the per-head ``conv_*`` columns to
    ``result.heads``, the per-layer ``conv_*`` columns to ``result.layers`` and
    ``result.extras["convlike"]`` (a :class:`~probe.analyses.convlike.ConvLikeResult`).
    ``trial``, the :func:`trial_conv_test` of the same result and config, is completed with the
    random-init scores instead of running the test (and its null draws) again.
    """
    if trial is None:
        cl = convlike_test(layer_fits(result.heads), random_init=random_init_scores or None, config=config)
    else:
        cl = trial.with_random_init(random_init_scores or None)
    result.heads = result.heads.merge(cl.heads.drop(columns=["conv_radius"], errors="ignore"),
                                      on=["layer", "head"], how="left")
    result.layers = result.layers.merge(cl.layers, on="layer", how="left")
    result.extras["convlike"] = cl
