"""Render the self-contained HTML report from results with a jinja2 template."""

from __future__ import annotations

import html
from typing import Any

import numpy as np
import pandas as pd
from jinja2 import Environment, PackageLoader, select_autoescape

from . import plots
from .heads_table import heads_table_html
from .query_maps import query_maps_html


def _env() -> Environment:
    env = Environment(loader=PackageLoader("probe.report", "templates"),
                      autoescape=select_autoescape(["html", "j2"]))
    env.filters["fmt"] = _fmt
    return env


def _fmt(v: Any, digits: int = 3) -> str:
    if isinstance(v, (float, np.floating)):
        if np.isnan(v):
            return "–"
        if np.isinf(v):
            return "∞" if v > 0 else "−∞"
        if abs(v) >= 1e4 or (0 < abs(v) < 1e-3):
            from .heads_table import _sig

            return _sig(v, digits)
        return f"{v:.{digits}f}"
    return html.escape(str(v))


def table_html(frame: pd.DataFrame, digits: int = 3) -> str:
    """A DataFrame as an HTML table (numbers rounded to ``digits`` decimals), in a box that
    scrolls sideways when the table is wider than the page (class ``scroll-x``)."""
    table = frame.to_html(index=False, float_format=lambda x: _fmt(x, digits), border=0,
                          classes="tbl", na_rep="–")
    return f"<div class='scroll-x'>{table}</div>"


def render_report(
    heads: pd.DataFrame,
    layers: pd.DataFrame,
    meta: dict[str, Any],
    center_maps: dict[int, np.ndarray],
    query_rc: tuple[int, int],
    extras: dict[str, Any] | None = None,
    mean_attn: dict[int, np.ndarray] | None = None,
    grids: dict[int, tuple[int, int]] | None = None,
    photo: np.ndarray | None = None,
) -> str:
    """The report as one HTML string with all plots embedded (no network access when opened).

    Args:
        heads: per-(layer, head) table.
        layers: per-layer table.
        meta: run description (model, weights, images, versions, seed, run time, ...).
        center_maps: ``{layer: array (heads, rows, cols)}`` mean attention of the query patch.
        query_rc: ``(row, col)`` of that query patch.
        extras: optional sections' data, keyed by analysis name.
        mean_attn, grids, photo: ``{layer: (heads, P, P)}`` mean patch attention, ``{layer: (rows,
            cols)}`` and an optional ``(H, W, 3)`` uint8 example photo, for the interactive query
            maps (:mod:`probe.report.query_maps`); omitted when ``mean_attn`` is None.
    """
    extras = extras or {}
    layer_cols = ["layer", "heads", "mean_distance_px", "min_distance_px", "max_distance_px",
                  "uniform_distance_px", "entropy_nats", "uniform_entropy_nats", "prefix_mass"]
    figures = {
        "distance": plots.distance_vs_depth(heads, layers),
        "entropy": plots.entropy_vs_depth(heads, layers),
        "maps": plots.attention_maps(center_maps, query_rc),
    }
    from .sections import build_sections

    from .findings import findings

    sections = build_sections(heads, meta, extras, layers) + list(extras.get("sections") or [])
    return _env().get_template("report.html.j2").render(
        meta=meta,
        figures=figures,
        layer_table=table_html(layers[[c for c in layer_cols if c in layers]]),
        heads_table=heads_table_html(heads),
        query_rc=query_rc,
        sections=sections,
        findings=findings(heads, layers, meta, extras),
        query_maps=(query_maps_html(mean_attn, grids, photo, None if isinstance(query_rc, dict) else query_rc)
                    if mean_attn else ""),
    )
