"""Results tables: per-head and per-layer pandas DataFrames built from :class:`LayerStats`.

Columns of the heads table (one row per (layer, head)):

* ``mean_distance_px`` / ``mean_distance_patches``: mean attention distance (ViT paper Fig. 7),
  attention over patch keys renormalised, averaged over patch queries and images; ``*_se`` its
  standard error over images.
* ``prefix_mass``: attention mass a patch query gives to prefix tokens (class, distillation,
  registers), averaged likewise.
* ``entropy_nats``: ``-sum_k A[q,k] ln A[q,k]`` over all keys, averaged over patch queries and
  images; ``entropy_norm`` = ``entropy_nats / ln(num_keys)``.

These are the columns of the ``distance_entropy`` analysis (:class:`probe.steps.DistanceEntropy`,
part of every run). Further registered analyses (:mod:`probe.analyses.base`) add theirs, joined on
``(layer, head)`` / ``layer`` in run order: the quadratic fit (``delta_*``, ``alpha``, ...), the
conv test (``conv_*``), and
``importance_ig`` / ``importance_ablation`` (+ ``_se``): mean over images of the head's attribution
to the target logit (predicted class), logit units, positive = the head raises it.
"""

from __future__ import annotations

import math

import pandas as pd

from .analyses.reducers import LayerStats


def heads_frame(stats: list[LayerStats]) -> pd.DataFrame:
    """One row per (layer, head) with the streaming statistics' columns (see module doc)."""
    rows = []
    for st in stats:
        g = st.geometry
        ln_keys = math.log(g.num_tokens)
        cols = {
            "mean_distance_px": st.feature("mean_distance_px"),
            "mean_distance_px_se": st.feature_se("mean_distance_px"),
            "mean_distance_patches": st.feature("mean_distance_patches"),
            "prefix_mass": st.feature("prefix_mass"),
            "entropy_nats": st.feature("entropy_nats"),
            "entropy_nats_se": st.feature_se("entropy_nats"),
        }
        for h in range(st.num_heads):
            row = {"layer": st.layer, "head": h}
            row.update({k: float(v[h]) for k, v in cols.items()})
            row["entropy_norm"] = row["entropy_nats"] / ln_keys if ln_keys > 0 else float("nan")
            rows.append(row)
    order = [
        "layer", "head", "mean_distance_px", "mean_distance_patches", "prefix_mass",
        "entropy_nats", "entropy_norm", "mean_distance_px_se", "entropy_nats_se",
    ]
    return pd.DataFrame(rows, columns=order)


def layers_frame(heads: pd.DataFrame, stats: list[LayerStats]) -> pd.DataFrame:
    """One row per layer: head-averaged and extreme values, and the uniform-attention references.

    Columns: ``layer, heads, mean_distance_px`` (mean over heads), ``min_distance_px``,
    ``max_distance_px``, ``uniform_distance_px`` (uniform attention over patch keys),
    ``entropy_nats`` (mean over heads), ``uniform_entropy_nats`` (``ln num_keys``),
    ``prefix_mass`` (mean over heads).
    """
    ref = {st.layer: st.geometry for st in stats}
    grouped = heads.groupby("layer")
    out = pd.DataFrame(
        {
            "heads": grouped["head"].count(),
            "mean_distance_px": grouped["mean_distance_px"].mean(),
            "min_distance_px": grouped["mean_distance_px"].min(),
            "max_distance_px": grouped["mean_distance_px"].max(),
            "entropy_nats": grouped["entropy_nats"].mean(),
            "prefix_mass": grouped["prefix_mass"].mean(),
        }
    ).reset_index()
    out["uniform_distance_px"] = [ref[l].uniform_mean_distance_pixels for l in out["layer"]]
    out["uniform_entropy_nats"] = [math.log(ref[l].num_tokens) for l in out["layer"]]
    return out
