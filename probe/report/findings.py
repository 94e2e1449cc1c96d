"""Plain-language findings for the top of the report, generated from the results tables.

Rules (each sentence names its numbers; nothing here reads tensors):

* **global / local layers**: a layer whose mean attention distance is at least 85 % of the
  uniform-attention distance is called *global*; runs of consecutive layers with the same
  character are merged ("Layers 0–1: ...").
* **conv test**: each conv-like layer with its kernel, dilation and the local heads within half a
  patch of the kernel's pixel offsets (± bootstrap SE), the grid test's p-value and the verdict's
  stability (or "exact" when the attention does not depend on the image); borderline and "local
  but not grid" layers named as such; the model-level verdict last.
* **depth trend**: the Spearman rank correlation of mean attention distance with layer index,
  in words (:func:`depth_trend`), with the layers' lowest and highest values.

"Local" has two meanings in probe, named apart here: a *local head* (conv test) holds 90 % of its
measured attention within the locality radius of its centre; the Gaussian fit's status
``non_local`` means the fitted α is 0 or the Gaussian is wider than half the grid.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd


def _span(layers: list[int]) -> str:
    if len(layers) == 1:
        return f"Layer {layers[0]}"
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"Layers {layers[0]}–{layers[-1]}"
    return "Layers " + ", ".join(map(str, layers[:-1])) + f" and {layers[-1]}"


def _num(v: float, digits: int = 1) -> str:
    return "—" if v is None or not np.isfinite(v) else f"{v:.{digits}f}"


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


#: |Spearman ρ| from which the depth trend is called steady / a tendency; below: no monotone trend.
STEADY_RHO, TREND_RHO = 0.8, 0.5


def depth_trend(layers: pd.DataFrame, column: str = "mean_distance_px") -> str:
    """One sentence on how ``column`` (mean attention distance, px) changes with depth, from the
    Spearman rank correlation ρ between layer index and value over the analysed layers (at
    least 3; else ""): |ρ| = 1 "at every layer", |ρ| >= :data:`STEADY_RHO` "steadily",
    |ρ| >= :data:`TREND_RHO` "tends to ..., not monotonically", else "no monotone trend"; with
    the first, last, lowest and highest layer's values, so a profile such as 5.5 → 8.9 → 4.7 →
    6.0 → 7.4 → 7.3 px is not summarised by its ends alone."""
    from scipy.stats import spearmanr

    t = layers.sort_values("layer")
    if len(t) < 3 or column not in t:
        return ""
    v, ls = t[column].to_numpy(float), t["layer"].astype(int).to_numpy()
    if not np.isfinite(v).all():
        return ""
    ends = f"from {_num(v[0])} px (layer {ls[0]}) to {_num(v[-1])} px (layer {ls[-1]})"
    span = (f"lowest {_num(v.min())} px (layer {ls[int(np.argmin(v))]}), highest {_num(v.max())} px "
            f"(layer {ls[int(np.argmax(v))]})")
    if np.ptp(v) <= 1e-9 * max(1.0, float(np.abs(v).max())):
        return f"Mean attention distance is the same at every analysed layer ({_num(v[0])} px)."
    rho = float(spearmanr(ls, v).statistic)
    stat = f"Spearman ρ = {rho:.2f} over {len(v)} layers"
    word = "grows" if rho > 0 else "shrinks"
    if abs(rho) >= 1 - 1e-12:
        return f"Mean attention distance {word} at every layer ({stat}), {ends}."
    if abs(rho) >= STEADY_RHO:
        return f"Mean attention distance {word} steadily with depth ({stat}), {ends}."
    if abs(rho) >= TREND_RHO:
        return f"Mean attention distance tends to {word[:-1]} with depth, not monotonically ({stat}; {span})."
    return f"Mean attention distance shows no monotone trend with depth ({stat}; {span}, {ends})."


def findings(heads: pd.DataFrame, layers: pd.DataFrame, meta: dict[str, Any], extras: dict[str, Any]) -> list[str]:
    """Sentences summarising the results (module docstring), most important first."""
    out: list[str] = []
    if layers is None or not len(layers):
        return out
    t = layers.sort_values("layer")
    ratio = t.mean_distance_px / t.uniform_distance_px
    kind = np.where(ratio >= 0.85, "global", "mixed")
    groups: list[tuple[str, list[int]]] = []
    for layer, k in zip(t.layer.astype(int), kind):
        if groups and groups[-1][0] == k and groups[-1][1][-1] == layer - 1:
            groups[-1][1].append(layer)
        else:
            groups.append((k, [layer]))
    for k, ls in groups:
        sub = t[t.layer.isin(ls)]
        uni = float(sub.uniform_distance_px.mean())
        if k == "global":
            out.append(f"{_span(ls)}: heads are global — mean attention distance {_num(sub.mean_distance_px.min())}–"
                       f"{_num(sub.mean_distance_px.max())} px, close to uniform attention ({_num(uni)} px).")
        else:
            lo, hi = float(sub.min_distance_px.min()), float(sub.max_distance_px.max())
            out.append(f"{_span(ls)}: heads range from {_num(lo)} px to {_num(hi)} px mean attention distance "
                       f"(uniform attention: {_num(uni)} px), a mix of local and wider heads.")
    cl = extras.get("convlike")
    if cl is not None:
        ct = cl.layers.set_index("layer")
        ch = cl.heads
        k = int(ct.conv_kernel_size.iloc[0]) if len(ct) else 3
        for layer in cl.conv_like_layers:
            row = ct.loc[layer]
            k = int(row.conv_kernel_size)
            h = heads[(heads.layer == layer)]
            on = ch[(ch.layer == layer) & (ch.conv_lattice_distance < 0.5)] if "conv_lattice_distance" in ch \
                else ch.iloc[:0]
            offs = []
            for _, r in h[h["head"].isin(on["head"])].iterrows():
                se = max(float(r.get("delta_row_se", np.nan)), float(r.get("delta_col_se", np.nan)))
                pm = f" ± {_num(se, 2)}" if np.isfinite(se) and se > 0.005 else ""
                offs.append(f"head {int(r['head'])} at ({_num(r.delta_row)}, {_num(r.delta_col)}){pm}")
            stab = row.get("conv_verdict_stability", np.nan)
            if bool(row.get("conv_deterministic", False)):
                stab_txt = "; the attention does not depend on the image, so this is exact, not a sample estimate"
            elif np.isfinite(stab):
                stab_txt = f"; the verdict holds in {stab:.0%} of the bootstrap replicates"
            else:
                stab_txt = ""
            d = int(row.get("conv_dilation", 1) or 1)
            dil = f" at dilation {d}" if d > 1 else ""
            out.append(f"Layer {layer} acts like a {k}×{k} convolution{dil}: {len(on)} local heads within half a "
                       f"patch of distinct pixel offsets of the kernel — {_and(offs) if offs else 'see the table'} "
                       f"(offsets in patches, row and column; grid test p = {row.conv_p_value:.2g}){stab_txt}.")
        border = [int(l) for l in ct.index[ct.conv_verdict == "borderline"]]
        if border:
            frac = ", ".join(f"layer {l}: {ct.loc[l, 'conv_like_fraction']:.0%}" for l in border)
            out.append(f"{_span(border)}: borderline — whether conv-like depends on the sample of images "
                       f"(conv-like in {frac} of the bootstrap replicates).")
        loc = [int(l) for l in ct.index[ct.conv_verdict == "local but not grid"]]
        if loc:
            out.append(f"{_span(loc)}: local heads, but the grid test does not find them on the kernel's pixel "
                       "offsets (their centres are not closer to the grid than random local centres at the 1 % "
                       "level, or cover too few of its offsets), so no convolution is claimed.")
        if cl.deepest_conv_layer is None:
            out.append("The convolution claim of Cordonnier et al. (2020) does not hold from the first analysed layer.")
        elif cl.deepest_conv_layer == int(ct.index[0]):
            out.append(f"The convolution claim holds for the first analysed layer ({cl.deepest_conv_layer}) only.")
        else:
            out.append(f"The convolution claim holds for every analysed layer from {int(ct.index[0])} to "
                       f"{cl.deepest_conv_layer}.")
    trend = depth_trend(t)
    if trend:
        out.append(trend)
    if str(meta.get("weights", "")).startswith("random init"):
        out.append("These are untrained (random-init) weights: the findings describe the architecture, not a trained model.")
    return out
