"""The report's "all heads" table: columns grouped by analysis, units in the headers, one number
format per column kind.

``heads.csv`` keeps every column at full precision under its machine name; this module only
decides how the same table reads in the HTML report:

* a two-row header — the group (head, attention distance, entropy, Δ/α fit, conv test,
  attribution, other columns added by analyses) over short labels with units — with the machine
  name of each column as its tooltip (``title``);
* one format per kind of column (pixels 1 decimal, patches 2, nats 3, fractions 3, p-values and
  α with 3 significant digits written as ``6.5·10⁻⁵`` rather than ``6.51e-05``), ``∞`` for
  infinities, ``—`` for missing values;
* the centre Δ (and its SEs, pixels and the lattice point) of a head whose fit is non-local
  shown as ``—``: such a head has no centre, whatever number the optimiser stopped at;
* a standard error that is 0 or float rounding noise next to its value (:func:`negligible_se`:
  the value is the same for every image, as for the embedded model's position-only attention)
  shown as "deterministic" rather than ``6.1·10⁻¹⁴``.

The report knows no tensors: the input is the heads DataFrame.
"""

from __future__ import annotations

import html
import math
from typing import Any, Callable

import numpy as np
import pandas as pd

#: (group title, column prefix or exact names) in display order; the first match wins.
GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("head", ("layer", "head")),
    ("attention distance", ("mean_distance", "r90_empirical")),
    ("entropy and prefix tokens", ("entropy", "prefix_mass")),
    ("quadratic-encoding fit (Cordonnier et al. 2020, Eq. 9)",
     ("delta_", "alpha", "sigma_", "r50_", "r90_patches", "b_row", "b_col", "quad_", "aniso_")),
    ("conv test", ("conv_",)),
    ("head attribution", ("importance_", "ablation_", "attribution_")),
)

#: Exact labels for the columns probe writes (label, unit); others get their machine name.
LABELS: dict[str, tuple[str, str]] = {
    "layer": ("layer", ""), "head": ("head", ""),
    "mean_distance_px": ("distance", "px"), "mean_distance_px_se": ("± SE", "px"),
    "mean_distance_patches": ("distance", "patches"), "r90_empirical_patches": ("r90 measured", "patches"),
    "entropy_nats": ("entropy", "nats"), "entropy_nats_se": ("± SE", "nats"),
    "entropy_norm": ("entropy / ln #keys", ""), "prefix_mass": ("prefix mass", "fraction"),
    "delta_row": ("Δ row", "patches"), "delta_col": ("Δ col", "patches"),
    "delta_row_se": ("± SE", "patches"), "delta_col_se": ("± SE", "patches"),
    "delta_row_px": ("Δ row", "px"), "delta_col_px": ("Δ col", "px"),
    "delta_row_px_se": ("± SE", "px"), "delta_col_px_se": ("± SE", "px"),
    "alpha": ("α", "1/patch²"), "alpha_se": ("± SE", "1/patch²"),
    "sigma_patches": ("σ", "patches"), "r50_patches": ("r50 fit", "patches"), "r90_patches": ("r90 fit", "patches"),
    "b_row": ("tilt b row", "1/patch"), "b_col": ("tilt b col", "1/patch"),
    "quad_loglik_nats": ("log-lik", "nats/query"), "quad_ll_gain_nats": ("LL gain", "nats/query"),
    "quad_kl_fit_nats": ("KL fit", "nats"), "quad_kl_explained": ("KL explained", "fraction"),
    "quad_local": ("local fit", ""), "quad_converged": ("converged", ""), "quad_status": ("status", ""),
    "conv_local": ("local", ""), "conv_tap": ("tap", ""), "conv_lattice_row": ("lattice row", "patches"),
    "conv_lattice_col": ("lattice col", "patches"), "conv_lattice_distance": ("to lattice", "patches"),
    "importance_ig": ("IG importance", "logit"), "importance_ig_se": ("± SE", "logit"),
    "importance_ablation": ("ablation importance", "logit"), "importance_ablation_se": ("± SE", "logit"),
}

#: Columns that describe the centre Δ: shown as "—" for a head whose fit is non-local.
CENTRE_COLUMNS: tuple[str, ...] = (
    "delta_row", "delta_col", "delta_row_se", "delta_col_se", "delta_row_px", "delta_col_px",
    "delta_row_px_se", "delta_col_px_se", "conv_lattice_row", "conv_lattice_col", "conv_lattice_distance",
)

_SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


def _sig(v: float, digits: int = 3) -> str:
    """``digits`` significant digits without e-notation: 6.51e-05 → ``6.51·10⁻⁵``."""
    s = f"{v:.{digits}g}"
    if "e" not in s:
        return s
    mant, exp = s.split("e")
    return f"{mant}·10{str(int(exp)).translate(_SUPERSCRIPT)}"


def _fixed(decimals: int) -> Callable[[float], str]:
    def fmt(v: float) -> str:
        if v != 0 and abs(v) < 0.5 * 10 ** -decimals:
            return _sig(v, 2)  # would print as 0.00: keep its magnitude
        return f"{v:.{decimals}f}"
    return fmt


def column_format(column: str) -> Callable[[float], str]:
    """The number format of a heads-table column, chosen from its unit (see module doc)."""
    if column.endswith("_px") or column.endswith("_px_se"):
        return _fixed(1)
    if "patches" in column or column.startswith("delta_") or column.startswith("conv_lattice"):
        return _fixed(2)
    if "nats" in column or column in ("entropy_norm", "prefix_mass", "quad_kl_explained"):
        return _fixed(3)
    return _sig


#: An SE at most this fraction of its value (plus :data:`SE_FLOOR`) is float rounding, not spread.
SE_NOISE = 1e-6
#: Absolute floor of :data:`SE_NOISE` (values near 0).
SE_FLOOR = 1e-12
#: How a standard error that is 0 or rounding noise is shown: the value is the same for every image.
DETERMINISTIC = "deterministic"


def negligible_se(value: Any, se: Any) -> bool:
    """Whether ``se`` is 0 or float rounding noise next to ``value``: at most
    ``SE_NOISE * |value| + SE_FLOOR`` (a statistic whose per-image values are all equal, e.g. the
    embedded model's position-only attention, has SE 0 computed as ~1e-14, from
    ``(sum x^2 - n mean^2)``). False for a missing or non-finite SE."""
    try:
        v, e = float(value), float(se)
    except (TypeError, ValueError):
        return False
    if not (math.isfinite(e) and math.isfinite(v)):
        return False
    return abs(e) <= SE_NOISE * abs(v) + SE_FLOOR


def mark_deterministic(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``frame`` for display in which every ``X_se`` value that :func:`negligible_se`
    calls noise next to its ``X`` reads :data:`DETERMINISTIC` (other values unchanged)."""
    out = frame.copy()
    for c in frame.columns:
        if c.endswith("_se") and c[:-3] in frame.columns:
            noise = [negligible_se(v, e) for v, e in zip(frame[c[:-3]], frame[c])]
            if any(noise):
                out[c] = [DETERMINISTIC if n else e for n, e in zip(noise, frame[c])]
    return out


def format_value(column: str, v: Any) -> str:
    """One cell as display text: ``—`` missing, ``∞`` infinite, booleans as yes/no."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v)).replace("-", "−")
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if math.isnan(v):
            return "—"
        if math.isinf(v):
            return "∞" if v > 0 else "−∞"
        return column_format(column)(v).replace("-", "−")
    return str(v).replace("_", " ")


def group_of(column: str) -> str:
    """The header group of a column (``"other"`` when no group claims it)."""
    for title, keys in GROUPS:
        if any(column.startswith(k) for k in keys):
            return title
    return "other"


def _non_local(row: pd.Series) -> bool:
    if "quad_status" in row.index and isinstance(row["quad_status"], str):
        return row["quad_status"] == "non_local"
    return False


def display_order(columns: list[str]) -> list[str]:
    """Columns grouped as in :data:`GROUPS` (table order inside a group), each ``X_se`` right
    after its ``X``."""
    order = {t: i for i, (t, _) in enumerate(GROUPS)}
    base = [c for c in columns if not (c.endswith("_se") and c[:-3] in columns)]
    base.sort(key=lambda c: (order.get(group_of(c), len(GROUPS)), columns.index(c)))
    out: list[str] = []
    for c in base:
        out.append(c)
        if c + "_se" in columns:
            out.append(c + "_se")
    return out


def heads_table_html(heads: pd.DataFrame) -> str:
    """The heads DataFrame as a grouped, sortable HTML table (class ``tbl``).

    Columns keep the order of :data:`GROUPS` (and, inside a group, the table's order); the
    first header row spans each group, the second names the column with its unit, and the
    machine name (the ``heads.csv`` header) is the tooltip. Sorting (the report's inline
    script) uses the second header row; every cell carries its raw number in ``data-value`` so
    a formatted ``—``/``∞``/``6.5·10⁻⁵`` sorts by value.
    """
    cols = display_order(list(heads.columns))
    spans: list[tuple[str, int]] = []
    for c in cols:
        g = group_of(c)
        if spans and spans[-1][0] == g:
            spans[-1] = (g, spans[-1][1] + 1)
        else:
            spans.append((g, 1))
    esc = html.escape
    out = ["<table class='tbl heads'><thead><tr class='groups'>"]
    out += [f"<th colspan='{n}' class='group'>{esc(g)}</th>" for g, n in spans]
    out.append("</tr><tr>")
    for c in cols:
        label, unit = LABELS.get(c, (c, ""))
        text = esc(label) + (f"<br><span class='unit'>{esc(unit)}</span>" if unit else "")
        out.append(f"<th title='{esc(c)}' data-column='{esc(c)}'>{text}</th>")
    out.append("</tr></thead><tbody>")
    for _, row in heads[cols].iterrows():
        hide = _non_local(row)
        out.append("<tr>")
        for c in cols:
            v = row[c]
            if hide and c in CENTRE_COLUMNS:
                shown = "—"
            elif c.endswith("_se") and c[:-3] in row.index and negligible_se(row[c[:-3]], v):
                shown = DETERMINISTIC
            else:
                shown = format_value(c, v)
            raw = ""
            if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_)):
                fv = float(v)
                raw = "" if (math.isnan(fv) or (hide and c in CENTRE_COLUMNS)) else repr(fv)
            out.append(f"<td data-value='{raw}'>{esc(shown)}</td>")
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)
