"""Function against geometry: do the heads the model relies on have a particular geometry?

Pure table analysis (no model): the Spearman rank correlation, over heads, between a head
importance column (from :mod:`probe.attribution`) and a head geometry column (mean attention
distance, entropy, conv-likeness ...), within layer groups (early / middle / late thirds of the
analysed layers, and all layers), with a confidence interval, plus a plain-language reading.

Confidence intervals (``ci=``):

* ``"fisher"`` (default): Fisher's ``z = atanh(rho)`` with the Spearman standard error of
  Bonett & Wright (2000, Psychometrika 65:23-28), ``se = sqrt((1 + rho^2 / 2) / (n - 3))``;
  the interval is ``tanh(z -/+ z_{1-alpha/2} * se)``. Needs ``n >= 4`` heads.
* ``"bootstrap"``: :func:`scipy.stats.bootstrap` over heads (paired resampling, BCa); NaN
  when every resample gives the same rho (e.g. a perfect rank agreement).

Both treat heads as exchangeable samples. Heads of one layer share their input, and several
correlations are computed at once, so the intervals are optimistic; the reading says so.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from ..errors import ProbeError

#: Importance columns looked for by default, with their plain-language names.
IMPORTANCE_LABELS: dict[str, str] = {
    "importance_ig": "integrated-gradients importance",
    "importance_ablation": "ablation importance",
}
#: Geometry columns looked for by default (those present are used), with plain-language names.
#: Conv-likeness per head comes from the conv test (:mod:`probe.analyses.convlike`):
#: ``r90_empirical_patches`` (radius holding 90 % of the attention around the fitted centre;
#: small = local) and ``conv_local`` (the test's local / not local, as 1 / 0).
GEOMETRY_LABELS: dict[str, str] = {
    "mean_distance_px": "mean attention distance",
    "entropy_nats": "attention entropy",
    "r90_empirical_patches": "90%-mass radius",
    "conv_local": "locality in the conv test",
}
#: How the reading names the heads at the high end of each geometry column.
GEOMETRY_HIGH: dict[str, str] = {
    "mean_distance_px": "heads that attend farther",
    "entropy_nats": "heads with more spread-out attention (higher entropy)",
    "r90_empirical_patches": "less local heads (larger 90%-mass radius)",
    "conv_local": "heads the conv test calls local",
}
GROUPS: tuple[str, ...] = ("early", "middle", "late", "all")


def layer_groups(layers: Sequence[int]) -> dict[str, list[int]]:
    """Split the analysed layers into early / middle / late thirds, plus ``all``.

    The sorted distinct layers are cut into three contiguous parts as equal as possible
    (:func:`numpy.array_split`; with 12 layers: 0-3, 4-7, 8-11). Parts that would be empty
    (fewer than 3 layers) are left out.

    Returns:
        ``{group name: [layer, ...]}`` in the order of :data:`GROUPS`.
    """
    ls = sorted({int(x) for x in layers})
    out = {
        name: [int(x) for x in part]
        for name, part in zip(GROUPS[:3], np.array_split(np.array(ls, dtype=int), 3))
        if len(part)
    }
    out["all"] = ls
    return out


#: scipy >= 1.15 names the bootstrap's generator ``rng``, older versions ``random_state``.
_SEED_ARG = "rng" if "rng" in inspect.signature(stats.bootstrap).parameters else "random_state"


def _rank_pearson(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    """Spearman's rho as the Pearson correlation of average ranks (vectorised along ``axis``)."""
    rx = stats.rankdata(x, axis=axis)
    ry = stats.rankdata(y, axis=axis)
    rx = rx - rx.mean(axis=axis, keepdims=True)
    ry = ry - ry.mean(axis=axis, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (rx * ry).sum(axis) / np.sqrt((rx * rx).sum(axis) * (ry * ry).sum(axis))


def spearman_ci(
    x: Sequence[float],
    y: Sequence[float],
    ci: str = "fisher",
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Spearman's rank correlation of paired samples with a confidence interval.

    Args:
        x, y: paired values, same length ``n``.
        ci: ``"fisher"`` (Bonett & Wright 2000 standard error, needs ``n >= 4``) or
            ``"bootstrap"`` (BCa, :func:`scipy.stats.bootstrap`, paired, ``n_resamples``).
        confidence: coverage of the interval, in (0, 1).
        seed: seed of the bootstrap.

    Returns:
        ``(rho, low, high)``; ``rho`` from :func:`scipy.stats.spearmanr`. NaN where undefined
        (a constant column, ``n < 3``; the Fisher interval for ``n < 4``).

    Raises:
        ProbeError: on an unknown ``ci``, a bad ``confidence`` or unequal lengths.
    """
    if ci not in ("fisher", "bootstrap"):
        raise ProbeError(f"unknown confidence-interval method {ci!r}; use 'fisher' or 'bootstrap'")
    if not 0 < confidence < 1:
        raise ProbeError(f"confidence must be in (0, 1), got {confidence}")
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ProbeError(f"x and y must be 1-D of equal length, got {x.shape} and {y.shape}")
    n = len(x)
    nan = float("nan")
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return nan, nan, nan
    rho = float(stats.spearmanr(x, y).statistic)
    if ci == "fisher":
        if n < 4:
            return rho, nan, nan
        r = min(max(rho, -1.0), 1.0)
        se = math.sqrt((1.0 + r * r / 2.0) / (n - 3))
        zc = float(stats.norm.ppf(0.5 + confidence / 2))
        with np.errstate(divide="ignore"):
            z = float(np.arctanh(r))
        return rho, float(np.tanh(z - zc * se)), float(np.tanh(z + zc * se))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = stats.bootstrap(
            (x, y),
            _rank_pearson,
            paired=True,
            vectorized=True,
            confidence_level=confidence,
            n_resamples=n_resamples,
            method="BCa",
            **{_SEED_ARG: np.random.default_rng(seed)},
        )
    return rho, float(res.confidence_interval.low), float(res.confidence_interval.high)


def importance_geometry_correlation(
    heads: pd.DataFrame,
    importance: Sequence[str] | None = None,
    geometry: Sequence[str] | None = None,
    ci: str = "fisher",
    confidence: float = 0.95,
    absolute: bool = False,
    n_resamples: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """Spearman correlation over heads of importance with geometry, per layer group.

    Args:
        heads: heads table with ``layer`` and the named columns, one row per (layer, head).
            Rows with NaN in either column of a pair are left out of that pair.
        importance: importance columns (default: those of :data:`IMPORTANCE_LABELS` present).
        geometry: geometry columns (default: those of :data:`GEOMETRY_LABELS` present, e.g.
            ``mean_distance_px`` in pixels, ``entropy_nats`` in nats).
        ci, confidence, n_resamples, seed: see :func:`spearman_ci`.
        absolute: correlate ``|importance|`` (how much a head matters either way) instead of
            the signed importance (positive = the head raises the target logit).

    Returns:
        DataFrame, one row per (importance, geometry, group): ``importance``, ``geometry``,
        ``group`` (early/middle/late/all, :func:`layer_groups`), ``layers`` (e.g. ``"0-3"``),
        ``n_heads``, ``rho``, ``ci_low``, ``ci_high``, ``ci_method``, ``confidence``.

    Raises:
        ProbeError: if ``layer`` or a named column is missing, or none is found by default.
    """
    if "layer" not in heads.columns:
        raise ProbeError("heads table lacks the 'layer' column")
    if importance is None:
        importance = [c for c in IMPORTANCE_LABELS if c in heads.columns]
    if geometry is None:
        geometry = [c for c in GEOMETRY_LABELS if c in heads.columns]
    missing = [c for c in [*importance, *geometry] if c not in heads.columns]
    if missing or not importance or not geometry:
        raise ProbeError(
            f"heads table lacks column(s) {missing or 'importance_* / geometry'}; run the "
            "attribution (--attribution ig|ablation) and the attention statistics first"
        )
    groups = layer_groups(heads["layer"].dropna().astype(int))
    rows = []
    for imp in importance:
        for geo in geometry:
            for g, layers in groups.items():
                d = heads[heads["layer"].isin(layers)][[imp, geo]].dropna()
                y = d[imp].to_numpy(float)
                if absolute:
                    y = np.abs(y)
                rho, lo, hi = spearman_ci(d[geo].to_numpy(float), y, ci, confidence, n_resamples, seed)
                span = f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else f"{layers[0]}"
                rows.append((imp, geo, g, span, len(d), rho, lo, hi, ci, confidence))
    return pd.DataFrame(
        rows,
        columns=[
            "importance", "geometry", "group", "layers", "n_heads",
            "rho", "ci_low", "ci_high", "ci_method", "confidence",
        ],
    )


def _strength(rho: float) -> str:
    a = abs(rho)
    return "weak" if a < 0.3 else "moderate" if a < 0.5 else "strong"


def _fmt(v: float) -> str:
    return f"{v:.2f}".replace("-", "\u2212")


def reading(corr: pd.DataFrame) -> list[str]:
    """Plain-language reading of :func:`importance_geometry_correlation` output.

    Per (importance, geometry) pair one sentence about all layers, then one per layer group
    whose interval excludes 0; a closing caveat. Wording: an interval that contains 0 is read as
    "no clear evidence of a monotone relation", never as "no relation"; one that excludes 0 as
    a weak (``|rho| < 0.3``), moderate (``< 0.5``) or strong tendency.

    Returns:
        list of sentences (str).
    """
    out: list[str] = []
    for (imp, geo), d in corr.groupby(["importance", "geometry"], sort=False):
        il = IMPORTANCE_LABELS.get(imp, imp)
        gl = GEOMETRY_LABELS.get(geo, geo)
        d = pd.concat([d[d["group"] == "all"], d[d["group"] != "all"]])
        for _, r in d.iterrows():
            if r["group"] != "all" and not (r["ci_low"] > 0 or r["ci_high"] < 0):
                continue
            where = "across all heads" if r["group"] == "all" else f"in the {r['group']} layers ({r['layers']})"
            if np.isnan(r["rho"]):
                out.append(f"{il.capitalize()} vs {gl} {where}: not estimable (n = {r['n_heads']} heads or a constant column).")
                continue
            nums = f"\u03c1 = {_fmt(r['rho'])}"
            if np.isnan(r["ci_low"]):
                nums += f", no interval, n = {r['n_heads']} heads"
            else:
                nums += (
                    f", {r['confidence']:.0%} CI {_fmt(r['ci_low'])} to {_fmt(r['ci_high'])}, "
                    f"n = {r['n_heads']} heads"
                )
            if r["ci_low"] > 0 or r["ci_high"] < 0:
                direction = "more" if r["rho"] > 0 else "less"
                high = GEOMETRY_HIGH.get(geo, f"heads with a larger {gl}")
                out.append(
                    f"{where.capitalize()}, {high} tend to have {direction} "
                    f"{il} ({_strength(r['rho'])} {'positive' if r['rho'] > 0 else 'negative'} "
                    f"rank correlation, {nums})."
                )
            else:
                out.append(
                    f"{where.capitalize()}, no clear evidence of a monotone relation between "
                    f"{gl} and {il} ({nums})."
                )
    if out:
        out.append(
            "Caveat: heads of a layer share their input and several correlations are read at "
            "once, so an interval that only just excludes 0 is weak evidence; a correlation "
            "says which geometry goes with importance, not that the geometry causes it."
        )
    return out
