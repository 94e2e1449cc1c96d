"""Report sections of the fits and tests: HTML fragments built from tables and result objects."""

from __future__ import annotations

import html
from typing import Any

import numpy as np
import pandas as pd

from ..geometry import TokenGeometry
from . import plots
from .plots_convlike import plot_convlike
from .plots_quadratic import plot_quadratic_layer, quadratic_table, view_halfwidth


def _table(frame: pd.DataFrame) -> str:
    from .render import table_html

    return table_html(frame)


def quadratic_section(heads: pd.DataFrame, meta: dict[str, Any]) -> dict[str, str]:
    """Cordonnier-style figure and table of Δ, α and fit quality for each analysed layer."""
    g = meta["geometry"]
    geometry = TokenGeometry(g["num_prefix_tokens"], tuple(g["grid"]), tuple(g["pixels_per_token"]))
    parts = [
        "<p class='note'>Each head is fitted by maximum likelihood with the quadratic positional "
        "encoding of Cordonnier et al. (2020, Eq. 9): p(k|q) ∝ exp(−α‖δ − Δ‖²), δ = key − query "
        "position in patches, normalised over the keys that exist for each query; the data are the "
        "renormalised patch attention of every patch query and image. Δ is where the head looks "
        "relative to the query, α (per patch²) how sharply; circles hold 50 % (solid) and 90 % "
        "(dotted) of the fitted Gaussian's mass. ± values are bootstrap standard errors over images. "
        "<i>LL gain</i>: log-likelihood per query over uniform attention (nats); <i>KL explained</i>: "
        "1 − KL(mean attention ‖ fit)/KL(mean attention ‖ uniform). <i>r90 measured</i>: radius around Δ "
        "holding 90 % of the head's actual attention (no Gaussian assumed). Status <i>non local</i>: "
        "α = 0 or a Gaussian wider than half the grid — a valid fit of a global head.</p>"
    ]
    # one axis range for every layer's figure, so that centres compare across depth
    half = view_halfwidth(heads, geometry)
    global_run: list[int] = []

    def flush() -> None:
        if global_run:
            which = (f"Layer {global_run[0]}" if len(global_run) == 1 else
                     f"Layers {', '.join(str(l) for l in global_run)}" if len(global_run) == 2 else
                     f"Layers {global_run[0]}–{global_run[-1]}")
            parts.append(f"<p class='nonlocal'><b>{which}</b>: every head non-local (α = 0 or a Gaussian "
                         "wider than half the grid): no centre to draw; their α and fit quality are in the "
                         "all-heads table.</p>")
            global_run.clear()

    for layer, frame in heads.groupby("layer", sort=True):
        if (frame["quad_status"] == "non_local").all():
            if global_run and global_run[-1] != int(layer) - 1:
                flush()
            global_run.append(int(layer))
            continue
        flush()
        fig = plots.to_data_uri(plot_quadratic_layer(frame, geometry, halfwidth=half))
        table = quadratic_table(frame)
        if "r90_empirical_patches" in frame:
            table["r90 measured"] = [f"{v:.2f}" for v in frame["r90_empirical_patches"]]
        parts.append(f"<h3>Layer {int(layer)}</h3><img alt='quadratic fits of layer {int(layer)}' "
                     f"src='{fig}'>{_table(table)}")
    flush()
    return {"title": "Where each head looks: quadratic-encoding centre Δ and sharpness α",
            "html": "\n".join(parts)}


def convlike_section(cl: Any, meta: dict[str, Any]) -> dict[str, str]:
    """The convolution claim, the verdict per layer with its numbers, and the figure."""
    c = cl.config
    t = cl.layers
    cols = {
        "layer": "layer", "conv_verdict": "verdict", "conv_dilation": "dilation",
        "conv_verdict_stability": "verdict stability", "conv_like_fraction": "conv-like in replicates",
        "conv_score": "grid score S", "conv_score_lo": "S 2.5 %", "conv_score_hi": "S 97.5 %",
        "conv_n_local": "local heads", "conv_num_heads": "heads", "conv_n_covered": "kernel offsets covered",
        "conv_kernel_size": "K", "conv_n_taps": "distinct taps", "conv_null_q99": "null 99 %",
        "conv_effect_size": "effect size", "conv_p_value": "p", "conv_random_init_max": "random-init max S",
    }
    shown = t[[k for k in cols if k in t.columns]].rename(columns=cols)
    seeds = meta.get("conv_null_seeds", 0)
    on = meta.get("conv_null_layers") or []
    where = (f"layer{'s' if len(on) != 1 else ''} {', '.join(str(l) for l in on)}, the ones conv-like "
             "without it (it can only veto "
             "that verdict; --null-layers all runs it everywhere)"
             if meta.get("conv_null_layers_rule") == "candidates" else "every analysed layer")
    if seeds:
        null_a = (f"(a) the same architecture at random initialisation, {seeds} seeds on "
                  f"{meta.get('conv_null_images', 0)} of the images, fitted the same way, on {where} (a "
                  "layer where no head can be local around any centre scores 0 without a fit)")
    elif meta.get("conv_null_status") == "not needed":
        null_a = ("(a) the random-initialisation null was not needed: no layer is conv-like without it, "
                  "and it can only veto that verdict (--null-layers all runs it everywhere)")
    elif meta.get("conv_null_status") == "needs the model":
        null_a = ("(a) the random-initialisation null was not applied: this test was re-run on saved "
                  "statistics (AnalysisResult.rerun) and null (a) needs forward passes of random-init copies "
                  "of the model — run probe analyze again to apply it")
    else:
        null_a = ("(a) random-initialisation null not run (the analysed weights are a random "
                  "initialisation themselves, or it was switched off)")
    text = (
        "<p><b>Claim</b> (Cordonnier, Loukas &amp; Jaggi 2020, Theorem 1 and Fig. 4): in early layers the "
        "heads jointly act like a K×K convolution — each head local and centred on a distinct offset "
        "of the K×K kernel grid around the query — and this fades with depth.</p>"
        f"<p><b>Verdict.</b> {html.escape(cl.summary())}</p>"
        "<p class='note'><b>Statistics.</b> A head is local when 90 % of its measured attention (over the "
        "queries whose target lies on the patch grid) lies within "
        f"{c.r_local:g} patches of its centre Δ. <i>Grid score</i> at dilation d: the local heads matched "
        "one-to-one to the K×K lattice of pixel offsets d·{−(K−1)/2, …, (K−1)/2}² around the query "
        f"(scipy's linear_sum_assignment), S = (1/min(H, K²)) Σ exp(−dist²/2τ²), τ = {c.tolerance:g} patch. "
        f"<i>Null</i>: the same number of local heads with centres uniform in the kernel's window and at least "
        f"as far apart as the layer's own ({c.n_null} draws); p is Bonferroni over the dilations "
        f"{', '.join(map(str, c.dilations))} whose kernel fits the grid, and each layer is its own test (no "
        f"correction across layers, so a verdict does not depend on which layers were analysed); {null_a}. "
        f"<b>Conv-like</b>: p &lt; {c.level:g}, S ≥ {c.min_score:g} and above every random-init score. "
        "<b>Non-local</b>: fewer than half the heads local; otherwise <b>local but not grid</b>. "
        "<i>Distinct taps</i> (descriptive): local heads at distinct offsets near the query — random local "
        "scatter has many, so it is not evidence of a grid. "
        f"<b>Stability</b>: the fraction of uncertainty replicates (the bootstrap standard errors of Δ and α) "
        f"whose verdict is the same; a verdict below {c.min_stability:.0%} that involves conv-like is "
        "reported as <b>borderline</b>; when the attention does not depend on the image the verdict is "
        "deterministic and no stability is shown. Size and power: bench/RESULTS-convtest.md.</p>"
    )
    fig = plots.to_data_uri(plot_convlike(cl))
    return {"title": "Do early layers act like convolutions?",
            "html": text + f"<img alt='conv-likeness against depth' src='{fig}'>" + _table(shown)}


def build_sections(heads: pd.DataFrame, meta: dict[str, Any], extras: dict[str, Any],
                   layers: pd.DataFrame | None = None) -> list[dict[str, str]]:
    """The sections of the registered analyses (:mod:`probe.analyses.base`) whose results are in
    ``extras``, in ``report_order``, then one for each analysis skipped with a reason (other
    than attribution, which the run description shows).

    Each section is ``analysis.section(ReportInput(heads, layers, meta, extras,
    value=extras[name]))``; an analysis whose ``section`` returns ``None`` adds nothing.
    """
    from ..analyses.base import ReportInput, analyses

    layers = layers if layers is not None else pd.DataFrame()
    out = []
    present = [cls for name, cls in analyses().items() if name in extras]
    for cls in sorted(present, key=lambda c: c.report_order):  # stable: registry order breaks ties
        sec = cls.section(ReportInput(heads, layers, meta, extras, value=extras[cls.name]))
        if sec is not None:
            out.append(sec)
    reg = analyses()
    for name, reason in (meta.get("analyses_skipped") or {}).items():
        if name == "attribution" and meta.get("attribution_skipped"):
            continue
        title = getattr(reg.get(name), "title", "") or name
        out.append({"title": f"{title[:1].upper() + title[1:]}: skipped",
                    "html": f"<p class='warn'>Not run: {html.escape(str(reason))}</p>"})
    return out
