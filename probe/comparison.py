"""Comparing analyses: several models (ViT vs DeiT vs DINO, Raghu et al. 2021; contrastive vs
masked pre-training, Park et al. 2023) or one model at several training checkpoints.

:func:`compare` takes saved results (folders of ``probe analyze`` / :meth:`AnalysisResult.save`)
or in-memory :class:`~probe.result.AnalysisResult` objects and puts them on common axes:

* **relative depth** of a layer: ``layer / (L − 1)`` with ``L`` the model's number of attention
  layers (``meta["num_attention_layers"]``): 0 the first block, 1 the last (0 when ``L = 1``), so
  models of different depths share one axis;
* **image side**: ``sqrt(H · W)`` of the model input in pixels, ``H = rows · pixels_per_token[0]``
  and ``W = cols · pixels_per_token[1]`` of the layer's token geometry (the side for a square
  input); mean attention distances divided by it compare across patch sizes and grids.

Per (model, layer) it reports the head-averaged mean attention distance (pixels and fraction of
the image side) and entropy (nats, and divided by ``ln(number of keys)``) with **bootstrap
standard errors** from the reducers' Poisson-bootstrap replicates (the SD over replicates of the
head-averaged replicate mean), the locality of the heads (fraction of local heads — the conv
test's ``conv_local``: 90 % of a head's measured attention within ``r_local`` patches of its
centre — and the median measured radius ``r90`` over the heads that have a centre, see
:func:`has_centre`: a non-local head's radius around an off-grid centre says nothing), and the
conv test's verdict. Differences to the
reference (the first result after ordering) pair each layer with the reference layer at the
nearest relative depth; their standard error ``sqrt(se_a² + se_b²)`` treats the two estimates as
independent (conservative when both runs saw the same images, which correlates them positively).

This module computes tables only; :mod:`probe.report.compare` draws and renders them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from .errors import ProbeError

#: Quantities whose differences are reported with a standard error.
DIFF_WITH_SE = ("mean_distance_px", "mean_distance_side", "entropy_nats", "entropy_norm")
#: Quantities whose differences are reported without one (no bootstrap replicates kept).
DIFF_WITHOUT_SE = ("frac_local", "r90_median_patches", "r90_median_side")
#: Locality radius (patches) used when a result has fits but no conv test (ConvLikeConfig's default).
DEFAULT_R_LOCAL = 2.0


@dataclass
class Comparison:
    """Several analyses on common axes (see the module docstring).

    Attributes:
        labels: one name per result, in order (folder names, or model names for in-memory results).
        sources: where each result came from (its folder, or ``"in memory"``).
        results: the :class:`~probe.result.AnalysisResult` objects, in order.
        layers: one row per (model, layer): ``model, layer, num_layers, relative_depth, heads,
            image_side_px, grid, mean_distance_px (+ _se), mean_distance_side (+ _se),
            uniform_distance_side, entropy_nats (+ _se), entropy_norm (+ _se),
            uniform_entropy_nats, frac_local, r_local_patches, r90_median_patches (over the heads
            with a centre, :func:`has_centre`; NaN when none has one), r90_median_side, conv_verdict, conv_n_taps, conv_score, conv_verdict_stability,
            conv_kernel_size`` (conv columns NaN / empty without a conv test).
        heads: one row per (model, layer, head): ``model, layer, head, relative_depth,
            mean_distance_side, entropy_nats`` and, with fits, ``delta_row, delta_col`` (patches;
            NaN for a head without a centre, :func:`has_centre`), ``r50_patches``, ``local``.
        differences: one row per (model other than the reference, layer): ``model, reference,
            layer, reference_layer, relative_depth, reference_relative_depth`` and for each
            quantity ``q`` of :data:`DIFF_WITH_SE` ``q_diff`` (model − reference), ``q_diff_se``,
            ``q_z``; for :data:`DIFF_WITHOUT_SE` ``q_diff``.
        order: how the results were ordered (``None``: as given).
    """

    labels: list[str]
    sources: list[str]
    results: list[Any]
    layers: pd.DataFrame
    heads: pd.DataFrame
    differences: pd.DataFrame
    order: str | None = None

    @property
    def reference(self) -> str:
        """Label of the reference result (the first)."""
        return self.labels[0]

    def models_table(self) -> pd.DataFrame:
        """One row per result: label, source, model, weights, images, layers, grid, date."""
        rows = []
        for label, src, r in zip(self.labels, self.sources, self.results):
            m = r.meta
            g = r.geometry
            rows.append({"model": label, "source": src, "architecture": m.get("model"), "weights": m.get("weights"),
                         "images": m.get("images"), "num_images": m.get("num_images"),
                         "layers": f"{len(r.stats)} of {m.get('num_attention_layers', len(r.stats))}",
                         "grid": f"{g.grid[0]}×{g.grid[1]}", "prefix_tokens": g.num_prefix_tokens,
                         "date": m.get("date")})
        return pd.DataFrame(rows)

    def to_html(self) -> str:
        """The comparison report as one self-contained HTML string (figures embedded)."""
        from .report.compare import render_comparison

        return render_comparison(self)

    def write_report(self, out_dir: str | Path) -> Path:
        """Write ``compare.html``, ``compare_layers.csv`` and ``compare_differences.csv`` to
        ``out_dir`` as one set (:func:`probe.result.write_output_set`).

        Returns:
            the path of ``compare.html``.

        Raises:
            ProbeError: as :func:`probe.result.check_output_dir`.
        """
        from .result import check_output_dir, write_output_set

        out = check_output_dir(out_dir)
        check_out_not_input(out, [s for s in self.sources if s != "in memory"])
        files = {
            "compare.html": self.to_html(),
            "compare_layers.csv": self.layers.to_csv(index=False),
            "compare_differences.csv": self.differences.to_csv(index=False),
        }
        write_output_set(out, files)
        return out / "compare.html"

    def _repr_html_(self) -> str:
        """Notebook view: the models table and the distance and locality figures against
        relative depth (the full report: :meth:`to_html` / :meth:`write_report`)."""
        import html

        from .report.compare import comparison_figures
        from .report.plots import to_data_uri

        images = "".join(f"<img src='{to_data_uri(f, dpi=80)}' alt='{name}' style='max-width:100%'>"
                         for name, f in comparison_figures(self, ("distance", "locality")).items())
        return (f"<div><b>probe Comparison</b> of {len(self.labels)} results "
                f"({html.escape(', '.join(self.labels))}; reference {html.escape(self.reference)})"
                f"{self.models_table().to_html(index=False, border=0)}{images}</div>")


def relative_depth(layer: int, num_layers: int) -> float:
    """``layer / (num_layers − 1)``: 0 for the first attention layer, 1 for the last (0 if one layer)."""
    return float(layer) / (num_layers - 1) if num_layers > 1 else 0.0


def image_side_px(geometry) -> float:
    """``sqrt(H · W)`` of the input covered by the patch grid, pixels (the side of a square input)."""
    rows, cols = geometry.grid
    pr, pc = geometry.pixels_per_token
    return math.sqrt(rows * pr * cols * pc)


def bootstrap_se_of_head_mean(stats, feature: str) -> float:
    """Bootstrap standard error of a feature's mean over the heads of one layer.

    The Poisson-bootstrap replicate ``r`` of the head mean is
    ``mean_h boot_sum[r, h, f] / boot_weight[r]`` (:class:`~probe.analyses.reducers.LayerStats`);
    the SE is their standard deviation (``ddof=1``) over replicates. A replicate whose Poisson
    weights are all 0 (probability ``e^-n`` for ``n`` images) has no mean and is left out; NaN
    with fewer than two replicates left.
    """
    from .analyses.reducers import FEATURES

    i = FEATURES.index(feature)
    w = stats.boot_weight
    keep = w > 0
    if int(keep.sum()) < 2:
        return float("nan")
    reps = (stats.boot_sum[keep][:, :, i] / w[keep][:, None]).mean(1)
    return float(reps.std(unbiased=True))


def _layer_rows(label: str, result) -> tuple[list[dict], list[dict]]:
    meta = result.meta
    n_layers = int(meta.get("num_attention_layers") or (max(result.stats) + 1))
    heads, ltab = result.heads, result.layers.set_index("layer") if "layer" in result.layers else None
    cl = result.extras.get("convlike")
    r_local = float(cl.config.r_local) if cl is not None else DEFAULT_R_LOCAL
    rows, head_rows = [], []
    for layer in sorted(result.stats):
        st = result.stats[layer]
        g = st.geometry
        side = image_side_px(g)
        px_per_patch = math.sqrt(g.pixels_per_token[0] * g.pixels_per_token[1])
        ln_keys = math.log(g.num_tokens)
        h = heads[heads["layer"] == layer]
        rel = relative_depth(layer, n_layers)
        md, ent = float(h["mean_distance_px"].mean()), float(h["entropy_nats"].mean())
        md_se, ent_se = bootstrap_se_of_head_mean(st, "mean_distance_px"), bootstrap_se_of_head_mean(st, "entropy_nats")
        if "conv_local" in h:
            local = h["conv_local"].astype(bool).to_numpy()
        elif "r90_empirical_patches" in h:
            local = (h["r90_empirical_patches"] <= r_local).to_numpy()
        else:
            local = None
        centred = has_centre(h, g.grid)
        r90 = (float(h.loc[centred, "r90_empirical_patches"].median()) if "r90_empirical_patches" in h and centred.any()
               else float("nan"))
        row = {
            "model": label, "layer": int(layer), "num_layers": n_layers, "relative_depth": rel,
            "heads": int(len(h)), "image_side_px": side, "grid": f"{g.grid[0]}x{g.grid[1]}",
            "mean_distance_px": md, "mean_distance_px_se": md_se,
            "mean_distance_side": md / side, "mean_distance_side_se": md_se / side,
            "uniform_distance_side": g.uniform_mean_distance_pixels / side,
            "entropy_nats": ent, "entropy_nats_se": ent_se,
            "entropy_norm": ent / ln_keys if ln_keys > 0 else float("nan"),
            "entropy_norm_se": ent_se / ln_keys if ln_keys > 0 else float("nan"),
            "uniform_entropy_nats": ln_keys,
            "frac_local": float(np.mean(local)) if local is not None and len(local) else float("nan"),
            "r_local_patches": r_local if local is not None else float("nan"),
            "r90_median_patches": r90, "r90_median_side": r90 * px_per_patch / side,
        }
        for col, default in (("conv_verdict", ""), ("conv_n_taps", np.nan), ("conv_score", np.nan),
                             ("conv_verdict_stability", np.nan), ("conv_kernel_size", np.nan),
                             ("conv_dilation", np.nan)):
            v = ltab.loc[layer, col] if ltab is not None and col in ltab and layer in ltab.index else default
            row[col] = default if (isinstance(v, float) and math.isnan(v) and isinstance(default, str)) else v
        rows.append(row)
        for _, hr in h.iterrows():
            d = {"model": label, "layer": int(layer), "head": int(hr["head"]), "relative_depth": rel,
                 "mean_distance_side": float(hr["mean_distance_px"]) / side, "entropy_nats": float(hr["entropy_nats"])}
            if "delta_row" in h:
                keep = bool(centred[h.index.get_loc(hr.name)])  # a head without a centre is not drawn
                d.update(delta_row=float(hr["delta_row"]) if keep else float("nan"),
                         delta_col=float(hr["delta_col"]) if keep else float("nan"),
                         r50_patches=float(hr.get("r50_patches", np.nan)))
            if local is not None:
                d["local"] = bool(hr["conv_local"]) if "conv_local" in h else bool(hr["r90_empirical_patches"] <= r_local)
            head_rows.append(d)
    return rows, head_rows


def has_centre(heads: pd.DataFrame, grid: tuple[int, int]) -> np.ndarray:
    """Per head (rows of ``heads``, one layer), whether its fitted centre Δ means something: the
    Gaussian fit is not ``non_local`` (α 0 or wider than half the grid) and Δ lies within the
    grid's extent of offsets (``|Δ_row| <= rows − 1``, ``|Δ_col| <= cols − 1`` patches), where
    some query could attend to it. Without fits (no Δ columns) every head counts.

    Returns:
        bool array ``(len(heads),)``.
    """
    ok = np.ones(len(heads), dtype=bool)
    if "quad_status" in heads:
        ok &= (heads["quad_status"] != "non_local").to_numpy()
    if "delta_row" in heads and "delta_col" in heads:
        dr, dc = heads["delta_row"].to_numpy(float), heads["delta_col"].to_numpy(float)
        ok &= np.isfinite(dr) & np.isfinite(dc) & (np.abs(dr) <= grid[0] - 1) & (np.abs(dc) <= grid[1] - 1)
    return ok


def differences(layers: pd.DataFrame, labels: list[str]) -> pd.DataFrame:
    """Each model's per-layer values minus the reference's (``labels[0]``) at the nearest relative
    depth (ties: the shallower reference layer); see :class:`Comparison` for the columns."""
    ref_label = labels[0]
    ref = layers[layers["model"] == ref_label].sort_values("relative_depth").reset_index(drop=True)
    out = []
    for label in labels[1:]:
        for _, row in layers[layers["model"] == label].iterrows():
            dist = np.abs(ref["relative_depth"].to_numpy() - row["relative_depth"])
            j = int(np.flatnonzero(dist <= dist.min() + 1e-9)[0])  # ties (up to rounding): the shallower
            r = ref.iloc[j]
            d = {"model": label, "reference": ref_label, "layer": int(row["layer"]),
                 "reference_layer": int(r["layer"]), "relative_depth": row["relative_depth"],
                 "reference_relative_depth": r["relative_depth"]}
            for q in DIFF_WITH_SE:
                diff = float(row[q] - r[q])
                se = math.sqrt(row[f"{q}_se"] ** 2 + r[f"{q}_se"] ** 2)
                d[f"{q}_diff"], d[f"{q}_diff_se"] = diff, se
                d[f"{q}_z"] = diff / se if se > 0 else float("nan")
            for q in DIFF_WITHOUT_SE:
                d[f"{q}_diff"] = float(row[q] - r[q])
            out.append(d)
    cols = ["model", "reference", "layer", "reference_layer", "relative_depth", "reference_relative_depth"]
    cols += [f"{q}_{s}" for q in DIFF_WITH_SE for s in ("diff", "diff_se", "z")] + [f"{q}_diff" for q in DIFF_WITHOUT_SE]
    return pd.DataFrame(out, columns=cols)


def natural_key(text: str) -> tuple:
    """Sort key that orders the numbers inside a string numerically (``ckpt2 < ckpt10``)."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p.lower()) for p in re.split(r"(\d+)", str(text)) if p)


def _meta_value(meta: dict, key: str) -> Any:
    v: Any = meta
    for part in key.split("."):
        if not isinstance(v, dict) or part not in v:
            raise KeyError(key)
        v = v[part]
    return v


def _ordered(items: list[tuple[str, str, Any]], order: str | None) -> list[tuple[str, str, Any]]:
    if order is None:
        return items
    if not isinstance(order, str) or not order.strip():
        raise ProbeError(f"--order must be 'name' or a metadata key (e.g. weights, seed), got {order!r}")
    if order == "name":
        return sorted(items, key=lambda it: natural_key(it[0]))
    values, missing = [], []
    for label, _, r in items:
        try:
            values.append(_meta_value(r.meta, order))
        except KeyError:
            missing.append(label)
    if missing:
        keys = sorted(set.intersection(*[set(r.meta) for _, _, r in items]))
        raise ProbeError(f"--order {order!r}: no such metadata key in {', '.join(missing)}; use 'name' or one of "
                         f"{', '.join(keys[:12])}{', ...' if len(keys) > 12 else ''} (dotted for nested keys)")
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    keyed = [(v if numeric else natural_key(str(v)), i) for i, v in enumerate(values)]
    return [items[i] for _, i in sorted(keyed)]


def _unique_labels(paths: list[Path]) -> list[str]:
    labels = [p.name or str(p) for p in paths]
    if len(set(labels)) < len(labels):
        labels = ["/".join(p.resolve().parts[-2:]) for p in paths]
    if len(set(labels)) < len(labels):
        labels = [f"{l} #{i}" for i, l in enumerate(labels)]
    return labels


def compare(results: Sequence[Any], *, labels: Sequence[str] | None = None, order: str | None = None) -> Comparison:
    """Put several analyses on common axes (module docstring).

    Args:
        results: at least two saved-result folders (str / Path, see :func:`probe.load`) or
            :class:`~probe.result.AnalysisResult` objects, mixed freely.
        labels: one name per result (default: folder names; for in-memory results the model
            name, numbered when repeated).
        order: ``None`` (as given), ``"name"`` (labels in natural order: ``ckpt2`` before
            ``ckpt10``) or a metadata key (dotted for nested ones, e.g. ``"seed"``,
            ``"weights"``, ``"versions.timm"``): numbers in numeric order, text in natural
            order — e.g. checkpoint files ``step-500.safetensors`` < ``step-2000.safetensors``.
            The first result after ordering is the reference of the differences.

    Returns:
        a :class:`Comparison` (``write_report(dir)`` writes ``compare.html``).

    Raises:
        ProbeError: fewer than two results; a folder that is missing or not a saved probe
            result (as :func:`probe.load`); labels of the wrong number or repeated; an
            ``order`` key that a result lacks.
    """
    from .result import AnalysisResult
    from .saved import load

    if isinstance(results, (str, Path, AnalysisResult)) or not isinstance(results, Sequence):
        raise ProbeError("compare needs a list of at least two result folders or AnalysisResult objects")
    results = list(results)
    if len(results) < 2:
        raise ProbeError(f"compare needs at least two results, got {len(results)}"
                         + (f" ({results[0]})" if results else "") + "; pass two or more output folders")
    loaded, sources, paths = [], [], []
    for r in results:
        if isinstance(r, AnalysisResult):
            loaded.append(r)
            sources.append("in memory")
            paths.append(None)
        elif isinstance(r, (str, Path)) and not isinstance(r, bool):
            loaded.append(load(r))
            sources.append(str(r))
            paths.append(Path(r))
        else:
            raise ProbeError(f"compare takes result folders or AnalysisResult objects, got {type(r).__name__}")
    for r, src in zip(loaded, sources):
        if not r.stats or "mean_distance_px" not in r.heads:
            raise ProbeError(f"the result from {src} has no per-layer statistics; compare needs full analyses")
    if labels is None:
        names = _unique_labels([p for p in paths if p is not None])
        it = iter(names)
        auto, seen = [], {}
        for p, r in zip(paths, loaded):
            if p is not None:
                auto.append(next(it))
            else:
                base = str(r.meta.get("model", "result"))
                seen[base] = seen.get(base, 0) + 1
                auto.append(base)
        counts = {l: auto.count(l) for l in auto}
        k: dict[str, int] = {}
        labels_list = []
        for l in auto:
            if counts[l] > 1:
                k[l] = k.get(l, 0) + 1
                labels_list.append(f"{l} ({k[l]})")
            else:
                labels_list.append(l)
    else:
        labels_list = [str(l) for l in labels]
        if len(labels_list) != len(loaded):
            raise ProbeError(f"compare got {len(labels_list)} labels for {len(loaded)} results; give one per result")
        if len(set(labels_list)) != len(labels_list):
            raise ProbeError(f"compare labels must be distinct, got {labels_list}")
    items = _ordered(list(zip(labels_list, sources, loaded)), order)
    rows, head_rows = [], []
    for label, _, r in items:
        lr, hr = _layer_rows(label, r)
        rows += lr
        head_rows += hr
    layers = pd.DataFrame(rows)
    lab = [it[0] for it in items]
    return Comparison(labels=lab, sources=[it[1] for it in items], results=[it[2] for it in items],
                      layers=layers, heads=pd.DataFrame(head_rows), differences=differences(layers, lab),
                      order=order)


from .preflight import check_out_not_input, default_out_dir  # noqa: E402,F401  (light: the CLI checks first)
