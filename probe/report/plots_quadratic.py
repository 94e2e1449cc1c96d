"""Report figure and table of the quadratic-encoding fits (Cordonnier et al. 2020, Fig. 4).

:func:`plot_quadratic_layer` draws, for one layer, the query patch at the centre of the relative
patch grid, each head's attention centre Δ as a point in its own colour (``tab10`` by head
index, as in the other figures of the report) and the circles holding 50 % (solid) and 90 %
(dotted) of its fitted Gaussian mass. :func:`quadratic_table` gives the matching table.
Both take the rows of one layer of :meth:`probe.analyses.quadratic.QuadraticFit.to_frame`
(or of the heads table, which carries the same columns).
"""

from __future__ import annotations

import math

import matplotlib
from .figure import Figure
from .heads_table import negligible_se
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.patches import Circle, Rectangle  # noqa: E402

from ..errors import ProbeError  # noqa: E402
from ..geometry import TokenGeometry  # noqa: E402

#: Columns :func:`plot_quadratic_layer` and :func:`quadratic_table` read.
REQUIRED_COLUMNS: tuple[str, ...] = (
    "head", "delta_row", "delta_col", "alpha", "r50_patches", "r90_patches", "quad_status",
)


def head_color(head: int) -> tuple[float, float, float, float]:
    """RGBA colour of a head: ``tab10`` by head index (cycling after 10)."""
    return matplotlib.colormaps["tab10"](int(head) % 10)


def _check(frame: pd.DataFrame) -> pd.DataFrame:
    if not isinstance(frame, pd.DataFrame):
        raise ProbeError(f"expected a pandas DataFrame of quadratic fits, got {type(frame).__name__}")
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise ProbeError(
            f"the frame lacks the quadratic-fit columns {missing}; pass QuadraticFit.to_frame() "
            "or the heads table of a run with the quadratic analysis"
        )
    if "layer" in frame.columns and frame["layer"].nunique() > 1:
        raise ProbeError(
            f"the frame holds layers {sorted(frame['layer'].unique())}; select one, "
            "e.g. heads[heads.layer == 3]"
        )
    return frame.sort_values("head")


def _drawn(row: pd.Series) -> bool:
    """Whether a head gets a centre point: converged or not, as long as Δ is finite and local."""
    return row["quad_status"] in ("ok", "alpha_capped", "not_converged") and bool(
        np.isfinite(row["delta_row"]) and np.isfinite(row["delta_col"]))


def view_halfwidth(frame: pd.DataFrame, geometry: TokenGeometry, max_halfwidth: float | None = None) -> float:
    """Half-width (patches) of the view that shows the query, every drawn centre and its 50 %
    circle — at least ±3 patches, at most ``max_halfwidth`` (default ``max(rows, cols)``),
    rounded up to a patch boundary. ``frame`` may hold several layers: the report passes all of
    them so that every layer's figure has the same axis range."""
    rows, cols = geometry.grid
    need = 3.0
    for _, r in frame.iterrows():
        if _drawn(r):
            r50 = r["r50_patches"] if np.isfinite(r["r50_patches"]) else 0.0
            need = max(need, abs(r["delta_row"]) + r50, abs(r["delta_col"]) + r50)
    cap = float(max_halfwidth) if max_halfwidth is not None else float(max(rows, cols))
    return math.ceil(min(need, cap)) + 0.5


def plot_quadratic_layer(frame: pd.DataFrame, geometry: TokenGeometry, *, title: str | None = None,
                         max_halfwidth: float | None = None, halfwidth: float | None = None) -> Figure:
    """Cordonnier-style figure of the attention centres of one layer's heads.

    Axes are the relative offset ``δ = p_key − p_query`` in patches (columns to the right, rows
    downwards, as in the image); the black square is the query patch at ``δ = 0``, the grey
    lines are patch boundaries of the offsets that exist on the ``rows x cols`` grid. Each local
    head (status ``ok`` or ``alpha_capped``) is a dot at ``(Δ_col, Δ_row)`` with a solid circle
    of radius ``r50_patches`` and a dotted one of radius ``r90_patches`` (continuous-Gaussian
    mass radii); a head whose fit did not converge is a cross (no circles); non-local heads
    (α ≈ 0, no finite centre) are listed in the legend only.

    Args:
        frame: rows of one layer with at least :data:`REQUIRED_COLUMNS` (one per head).
        geometry: token geometry of the model (its grid bounds the offsets).
        title: figure title; default ``"Layer L: quadratic-encoding fits"``.
        max_halfwidth: cap on the half-width of the view in patches; default the largest
            offset on the grid, ``max(rows, cols) − 1``, plus one patch.
        halfwidth: the exact half-width of the view (patches), e.g. :func:`view_halfwidth` of all
            layers so that layers share one axis range; default this layer's own view.

    Returns:
        A matplotlib Figure (Agg backend); the caller saves or closes it.

    Raises:
        ProbeError: if columns are missing or the frame mixes layers.
    """
    frame = _check(frame)
    rows, cols = geometry.grid
    fig = Figure(figsize=(8.0, 5.2))
    ax = fig.subplots()
    half = float(halfwidth) if halfwidth is not None else view_halfwidth(frame, geometry, max_halfwidth)

    # Patch boundaries of the offsets that exist: rows −(rows−1)..rows−1, cols likewise.
    for x in np.arange(-(cols - 1) - 0.5, cols, 1.0):
        if -half <= x <= half:
            ax.axvline(x, color="0.88", lw=0.6, zorder=0)
    for y in np.arange(-(rows - 1) - 0.5, rows, 1.0):
        if -half <= y <= half:
            ax.axhline(y, color="0.88", lw=0.6, zorder=0)
    ax.add_patch(Rectangle((-0.5, -0.5), 1, 1, color="black", zorder=3, label="query patch"))

    for _, r in frame.iterrows():
        h = int(r["head"])
        c = head_color(h)
        status = r["quad_status"]
        if not _drawn(r):
            ax.plot([], [], " ", label=f"head {h}: non-local (α={r['alpha']:.3g})")
            continue
        dr, dc = float(r["delta_row"]), float(r["delta_col"])
        if status == "not_converged":
            ax.plot(dc, dr, "x", color=c, ms=9, mew=2, zorder=5,
                    label=f"head {h}: fit not converged")
            continue
        label = f"head {h}: Δ=({dr:.2f}, {dc:.2f}), α={r['alpha']:.3g}"
        if status == "alpha_capped":
            label += " (α at cap)"
        ax.plot(dc, dr, "o", color=c, ms=7, mec="black", mew=0.5, zorder=5, label=label)
        if np.isfinite(r["r50_patches"]):
            ax.add_patch(Circle((dc, dr), r["r50_patches"], fill=False, ec=c, lw=1.6, ls="-", zorder=4))
        if np.isfinite(r["r90_patches"]):
            ax.add_patch(Circle((dc, dr), r["r90_patches"], fill=False, ec=c, lw=1.2, ls=":", zorder=4))

    ax.set_xlim(-half, half)
    ax.set_ylim(half, -half)  # rows grow downwards, as in the image
    ax.set_aspect("equal")
    ax.set_xlabel("Δ column (patches, key − query)")
    ax.set_ylabel("Δ row (patches, key − query)")
    layer = int(frame["layer"].iloc[0]) if "layer" in frame.columns and len(frame) else None
    ax.set_title(title or (f"Layer {layer}: quadratic-encoding fits" if layer is not None
                           else "Quadratic-encoding fits"))
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0,
              title="solid: 50 % mass, dotted: 90 %", title_fontsize=7)
    fig.tight_layout()
    return fig


def _fmt(v: float, se: float | None = None, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, float) and math.isinf(v):
        return "∞"
    s = f"{v:.{digits}g}"
    if se is not None and np.isfinite(se) and not negligible_se(v, se):  # 0 or rounding noise: no "± 6e-14"
        s += f" ± {se:.2g}"
    return s


def quadratic_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Display table of one layer's fits for the report: one row per head, formatted strings.

    Columns: ``head``, ``Δ row`` and ``Δ col`` (patches, ± bootstrap SE), ``α`` (1/patch²,
    ± SE), ``σ`` (patches), ``r50``, ``r90`` (patches), ``LL gain`` (nats per query over uniform
    attention), ``KL explained`` (``1 − KL_fit/KL_uniform``) and ``status``. Missing values
    and the centre of a non-local head (which has none) print as "—", infinite radii as "∞".

    Raises:
        ProbeError: if columns are missing or the frame mixes layers.
    """
    frame = _check(frame)

    def get(r, col):
        return float(r[col]) if col in r.index and r[col] is not None else float("nan")

    out = []
    for _, r in frame.iterrows():
        centre = r["quad_status"] != "non_local"  # a non-local head has no centre: "—"
        out.append({
            "head": int(r["head"]),
            "Δ row": _fmt(get(r, "delta_row"), get(r, "delta_row_se")) if centre else "—",
            "Δ col": _fmt(get(r, "delta_col"), get(r, "delta_col_se")) if centre else "—",
            "α": _fmt(get(r, "alpha"), get(r, "alpha_se")),
            "σ": _fmt(get(r, "sigma_patches")),
            "r50": _fmt(get(r, "r50_patches")),
            "r90": _fmt(get(r, "r90_patches")),
            "LL gain": _fmt(get(r, "quad_ll_gain_nats")),
            "KL explained": _fmt(get(r, "quad_kl_explained")),
            "status": str(r["quad_status"]).replace("_", " "),
        })
    return pd.DataFrame(out)
