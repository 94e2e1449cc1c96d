"""Report section "Which heads matter": head attribution set against head geometry."""

from __future__ import annotations

import html
from typing import Any

import numpy as np
import pandas as pd

from ..analyses.function_geometry import GEOMETRY_LABELS, IMPORTANCE_LABELS
from . import plots
from .plots_attribution import ablation_check_plot, importance_scatter

_METHOD_NAMES = {"ig": "integrated gradients", "ablation": "single-head ablation"}


def attribution_section(heads: pd.DataFrame, attribution: dict[str, Any]) -> dict[str, str]:
    """HTML of the attribution section.

    Args:
        heads: heads table with ``importance_*`` columns (and geometry columns).
        attribution: ``result.extras["attribution"]`` as written by
            :func:`probe.attribution.add_head_attribution`.

    Returns:
        ``{"title": ..., "html": ...}`` with figures embedded as data URIs.
    """
    from .render import table_html

    info = attribution["info"]
    checks = attribution.get("checks") or {}
    methods = [m for m in ("ig", "ablation") if f"importance_{m}" in heads]
    esc = html.escape
    parts = [
        "<p class='note'>Each head's output (its slice of the concatenated head outputs, before "
        "the attention output projection) is multiplied by a gate; gate 1 is the model as "
        "trained, gate 0 removes that head's contribution (Michel et al. 2019). The attributed "
        f"quantity is the <b>{esc(info['target_quantity'])}</b>; target: "
        f"<b>{esc(info['target'])}</b>; {info['n_images']} images. "
    ]
    if "ig" in methods:
        parts.append(
            f"<b>Integrated gradients</b> (Sundararajan et al. 2017, captum): from the baseline "
            f"{esc(info['ig_baseline'])}, {info['ig_n_steps']} Gauss-Legendre steps; per image the "
            "head attributions sum to the logit with all heads on minus all heads off "
            f"(mean {info['ig_logit_all_on']:.2f} vs {info['ig_logit_all_off']:.2f}; largest "
            f"quadrature error {info['ig_max_abs_convergence_delta']:.3f}). "
        )
    if "ablation" in methods:
        parts.append(
            "<b>Ablation</b> (captum FeatureAblation): logit with all heads minus logit with "
            "only that head's gate set to 0. "
        )
    parts.append(
        "Importance is the mean over images in logit units (± bars: standard error over "
        "images); positive = the head raises the target logit. The two methods answer "
        "different questions: ablation asks what is lost when one head is removed and all "
        "others stay, integrated gradients shares the whole effect of the attention heads "
        "along the path from all heads off to all on.</p>"
    )
    if "mean_distance_px" in heads and methods:
        fig = plots.to_data_uri(importance_scatter(heads, "mean_distance_px", [f"importance_{m}" for m in methods]))
        parts.append(f"<img alt='importance against mean attention distance' src='{fig}'>")

    corr = attribution.get("correlation")
    if corr is not None and len(corr):
        shown = corr.assign(
            importance=corr["importance"].map(lambda c: IMPORTANCE_LABELS.get(c, c)),
            geometry=corr["geometry"].map(lambda c: GEOMETRY_LABELS.get(c, c)),
        )[["importance", "geometry", "group", "layers", "n_heads", "rho", "ci_low", "ci_high"]]
        conf = float(corr["confidence"].iloc[0])
        method = corr["ci_method"].iloc[0]
        ci_text = ("Fisher z with the Bonett-Wright (2000) standard error"
                   if method == "fisher" else "BCa bootstrap over heads")
        parts.append(
            f"<h3>Importance against geometry</h3><p class='note'>Spearman rank correlation over "
            f"heads, per layer group (early / middle / late thirds of the analysed layers, and "
            f"all); {conf:.0%} intervals: {ci_text}.</p>"
        )
        parts.append(table_html(shown.rename(columns={"n_heads": "heads", "rho": "ρ",
                                                      "ci_low": "CI low", "ci_high": "CI high"})))
        reading = attribution.get("reading") or []
        if reading:
            parts.append("<ul>" + "".join(f"<li>{esc(s)}</li>" for s in reading) + "</ul>")

    if checks:
        k = attribution.get("k")
        parts.append(
            f"<h3>Does the ranking find heads that matter?</h3><p class='note'>The {k} heads a "
            f"method ranks most important are switched off together and compared with "
            f"{len(next(iter(checks.values())).random_drops)} random sets of {k} heads (drawn "
            "uniformly from all gated heads; the same sets for every ranking). Logit drop: mean over images of the target logit "
            "before minus after; top-1 agreement: images whose predicted class is unchanged."
            + (" Checked on the same images the ranking was computed on (in-sample)."
               if attribution.get("in_sample") else "")
            + "</p>"
        )
        rows = []
        for m, c in checks.items():
            rd = np.asarray(c.random_drops, dtype=float)
            row = {"ranking": _METHOD_NAMES.get(m, m), "k": c.k,
                   "top-k logit drop": c.top_drop,
                   "random logit drop (mean)": float(rd.mean()),
                   "random logit drop (max)": float(rd.max()),
                   "top-k top-1 agreement": c.top_agreement,
                   "random top-1 agreement (mean)": float(np.mean(c.random_agreement))}
            if c.accuracy is not None:
                row.update({"accuracy": c.accuracy, "top-k accuracy": c.top_accuracy,
                            "random accuracy (mean)": float(np.mean(c.random_accuracy))})
            rows.append(row)
        summary = pd.DataFrame(rows)
        parts.append(table_html(summary))
        parts.append("<ul>" + "".join(
            f"<li><b>{esc(_METHOD_NAMES.get(m, m))}</b>: {esc(c.summary())} "
            f"Top heads: {esc(', '.join(f'L{l}H{h}' for l, h in c.top_heads))}.</li>"
            for m, c in checks.items()) + "</ul>")
        fig = plots.to_data_uri(ablation_check_plot({_METHOD_NAMES.get(m, m): c for m, c in checks.items()}))
        parts.append(f"<img alt='logit drop, top-k vs random heads' src='{fig}'>")
    secs = ", ".join(f"{m} {info[f'seconds_{m}']:.0f} s" for m in methods if f"seconds_{m}" in info)
    if "seconds_check" in info:
        secs += f", ablation check {info['seconds_check']:.0f} s"
    parts.append(f"<p class='note'>Run time: {esc(secs)}.</p>")
    return {"title": "Which heads matter: head attribution against head geometry",
            "html": "\n".join(parts)}
