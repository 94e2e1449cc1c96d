"""The result of an analysis: tables, per-layer statistics, metadata, and report writing."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .analyses.reducers import LayerStats
from .geometry import TokenGeometry


@dataclass
class AnalysisResult:
    """Everything ``probe.analyze`` measured.

    Attributes:
        heads: one row per (layer, head); columns documented in :mod:`probe.tables`.
        layers: one row per analysed layer.
        stats: ``{layer: LayerStats}``, the streaming sums (tensors) behind the tables.
        geometry: the token geometry the attention was read with.
        meta: what was analysed (model, weights source, images, versions, seed, run time, ...).
        extras: further analyses' tables and values, keyed by analysis name.
    """

    heads: pd.DataFrame
    layers: pd.DataFrame
    stats: dict[int, LayerStats]
    geometry: TokenGeometry
    meta: dict[str, Any]
    extras: dict[str, Any] = field(default_factory=dict)

    def center_maps(self, query: int | None = None) -> dict[int, np.ndarray]:
        """Mean attention map of one patch query per layer.

        Args:
            query: patch index (row-major); default the central patch.

        Returns:
            ``{layer: array (heads, rows, cols)}`` of renormalised patch attention.
        """
        return {l: s.center_map(query).numpy() for l, s in self.stats.items()}

    def write_report(self, out_dir: str | Path, query: int | None = None) -> Path:
        """Write ``report.html``, ``heads.csv``, ``layers.csv`` and ``images.txt`` to ``out_dir``.

        Everything is rendered in memory first and each file is written atomically
        (temporary file + rename), so a failure never leaves a half-written report.

        Returns:
            The path of ``report.html``.
        """
        from .report.render import render_report

        out = Path(out_dir)
        grids = {s.geometry.grid for s in self.stats.values()}
        if query is None and len(grids) > 1:  # layers on different grids (Swin stages): own centres
            maps = self.center_maps(None)
            query_rc: Any = {l: divmod(s.geometry.center_patch, s.geometry.grid[1]) for l, s in self.stats.items()}
        else:
            q = self.geometry.center_patch if query is None else query
            maps, query_rc = self.center_maps(q), divmod(q, self.geometry.grid[1])
        html = render_report(
            heads=self.heads,
            layers=self.layers,
            meta=self.meta,
            center_maps=maps,
            query_rc=query_rc,
            extras=self.extras,
        )
        files = {
            "heads.csv": self.heads.to_csv(index=False),
            "layers.csv": self.layers.to_csv(index=False),
            "images.txt": "\n".join(self.meta.get("image_names", [])) + "\n",
            "report.html": html,
        }
        out.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            atomic_write_text(out / name, text)
        return out / "report.html"


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
