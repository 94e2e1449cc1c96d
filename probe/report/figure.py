"""The figure class of every probe figure: a :class:`matplotlib.figure.Figure` that displays
itself in Jupyter / IPython with no pyplot state.

A plain ``Figure`` made with the object-oriented API shows only as ``<Figure size 700x400 with 1
Axes>`` in a fresh kernel: IPython's image formatter for figures is registered only once pyplot
or ``%matplotlib inline`` has run. :class:`Figure` adds ``_repr_png_`` (IPython's rich display
protocol), drawn with the Agg canvas into memory, so ``probe.plot.distance_vs_depth(result)``
displays inline as the last line of a cell without touching the user's matplotlib backend,
rcParams or pyplot figure list. Where IPython has a formatter registered for matplotlib figures
(pyplot's inline backend), that one is used instead, so a figure shows once.

Source: IPython's display protocol (``_repr_png_``), matplotlib's "Embedding in a web
application server" example (Agg canvas without pyplot).
"""

from __future__ import annotations

import io

from matplotlib.figure import Figure as _MplFigure

__all__ = ["Figure"]


class Figure(_MplFigure):
    """:class:`matplotlib.figure.Figure` with a PNG representation for notebooks (same API)."""

    def _repr_png_(self) -> bytes:
        """The figure as PNG bytes (Agg, the figure's own dpi, tight bounding box)."""
        buf = io.BytesIO()
        self.savefig(buf, format="png", bbox_inches="tight")
        return buf.getvalue()
