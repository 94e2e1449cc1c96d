"""Published-definition modes of the mean attention distance, so that published plots can be
reproduced exactly.

Notation, per head and image: ``P`` patch tokens after ``num_prefix_tokens`` prefix tokens,
``A[q, k]`` the attention probabilities of the layer (rows sum to one over *all* keys, prefix keys
included), ``m_q = sum_{k in patches} A[q, k]`` the mass a patch query ``q`` puts on patch keys,
``A'[q, k] = A[q, k] / m_q`` its renormalised patch-key part and ``d(q, k) = ||p_q - p_k||`` the
Euclidean distance between the patch centres, in patches or in input pixels
(:class:`~probe.geometry.TokenGeometry`). Queries and keys are patch tokens only in every mode.

* ``renormalised`` — probe's default, :data:`probe.analyses.reducers.FEATURES`
  ``mean_distance_*``: ``(1/P) sum_q sum_k A'[q, k] d(q, k)``. Prefix keys are dropped and each
  patch query's row is renormalised, so a head that parks mass on the class token or on registers
  keeps the distance of the rest of its mass (the reading of Park et al. 2023, "What do
  self-supervised vision transformers learn?", ICLR, whose code drops the class token and
  renormalises the patch-to-patch attention).
* ``unnormalised`` — sayakpaul/probing-vits (``compute_mean_attention_dist`` of its notebooks,
  after Raghu et al. 2021): ``(1/P) sum_q sum_k A[q, k] d_px(q, k)`` with the class-token rows and
  columns sliced away but **not** renormalised, distances in pixels (``patch_size * ||Δ||``).
  Equal to ``renormalised`` times the patch mass: a head with patch mass ``m`` reads ``m`` times
  shorter, so heads that attend to prefix tokens look more local.
* ``nonlocality`` — ConViT (d'Ascoli et al. 2021, ICML, Sec. 4, Eq. 8,
  ``D_loc = (1/L) sum_ij A_ij ||δ_ij||``; facebookresearch/convit ``GPSA.get_attention_map``:
  the batch-mean attention contracted with ``||δ||`` in patches and divided by the number of
  patches). The same sum as ``unnormalised`` but in **patches**. ConViT's GPSA layers have no
  class token, so there all three modes agree up to units; for layers with prefix tokens (where
  ConViT's own code does not apply) the patch-to-patch block of ``A`` is used, not renormalised,
  as the sum of Eq. 8 runs over patch pairs.

Each mode is averaged over images (the per-image value is linear in ``A``, so the mean over images
of the per-image values equals the value of the mean attention, as ConViT computes it). The
standard error over images is kept alongside.

:class:`DistanceModesReducer` accumulates per-head sums batch by batch (memory independent of the
number of images); :func:`renormalised_from_stats` reads the default mode from the
:class:`~probe.analyses.reducers.LayerStats` the pipeline keeps (the other modes need each patch
query's patch mass, which the stats do not keep).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ..errors import ProbeError
from ..geometry import TokenGeometry
from .reducers import ImageMoments, MomentsReducer

#: The modes, in column order: ``(name, units, description)``.
MODES: tuple[tuple[str, str, str], ...] = (
    ("renormalised", "px", "patch-key part renormalised (probe default; Park et al. 2023)"),
    ("unnormalised", "px", "patch-key part not renormalised (sayakpaul/probing-vits)"),
    ("nonlocality", "patches", "ConViT nonlocality, d'Ascoli et al. 2021 Eq. 8"),
)

#: Attention entries reduced at once (float64 temporaries stay bounded whatever the batch).
CHUNK_ELEMENTS = 1 << 22

#: Heads-table column of each mode.
COLUMNS: dict[str, str] = {
    "renormalised": "mean_distance_renorm_px",
    "unnormalised": "mean_distance_unnorm_px",
    "nonlocality": "convit_nonlocality_patches",
}


def distance_modes_per_image(attn: torch.Tensor, geometry: TokenGeometry) -> torch.Tensor:
    """The three modes for each image of a batch.

    Args:
        attn: attention probabilities ``(batch, heads, T, T)``, ``T = geometry.num_tokens``.
        geometry: the layer's token geometry.

    Returns:
        float64 ``(batch, heads, 3)``: per image and head, the modes of :data:`MODES` in order
        (pixels, pixels, patches).

    Raises:
        ProbeError: if the shape does not fit the geometry.
    """
    _check(attn, geometry)
    n, p = geometry.num_prefix_tokens, geometry.num_patches
    dev = attn.device
    table = torch.stack([geometry.distances_pixels(), geometry.distances_patches()], -1).to(dev)  # (P, P, 2)
    step = max(1, CHUNK_ELEMENTS // max(1, attn[0].numel()))
    outs = []
    for i in range(0, attn.shape[0], step):
        patch = attn[i:i + step, :, n:, n:].double()  # (b, H, P, P): patch queries, patch keys
        weighted = torch.einsum("bhqk,qkc->bhqc", patch, table)  # (b, H, P, 2): sum_k A d
        mass = patch.sum(-1)  # (b, H, P): m_q
        outs.append(torch.stack([
            (weighted[..., 0] / mass.clamp_min(1e-300)).sum(-1) / p,
            weighted[..., 0].sum(-1) / p,
            weighted[..., 1].sum(-1) / p,
        ], dim=-1))
    return torch.cat(outs)


def _check(attn: torch.Tensor, geometry: TokenGeometry) -> None:
    if not isinstance(attn, torch.Tensor) or attn.dim() != 4 or attn.shape[-1] != attn.shape[-2]:
        shape = tuple(attn.shape) if isinstance(attn, torch.Tensor) else type(attn).__name__
        raise ProbeError(f"expected attention probabilities (batch, heads, tokens, tokens), got {shape}")
    geometry.check_tokens(attn.shape[-1])


@dataclass(frozen=True)
class DistanceModes:
    """Per-head means over images of the three modes of one layer.

    Attributes:
        layer: layer index.
        n_images: images accumulated.
        mean: float64 ``(heads, 3)``, modes of :data:`MODES` in order.
        se: float64 ``(heads, 3)``, standard error over images (NaN for one image).
    """

    layer: int
    n_images: int
    mean: np.ndarray
    se: np.ndarray

    def to_frame(self) -> pd.DataFrame:
        """Heads-table rows: ``layer``, ``head`` and per mode ``<column>`` and ``<column>_se``
        (columns of :data:`COLUMNS`)."""
        cols: dict[str, object] = {"layer": self.layer, "head": np.arange(self.mean.shape[0])}
        for i, (name, _, _) in enumerate(MODES):
            cols[COLUMNS[name]] = self.mean[:, i]
            cols[COLUMNS[name] + "_se"] = self.se[:, i]
        return pd.DataFrame(cols)


class DistanceModesReducer(MomentsReducer):
    """Streaming accumulator of :class:`DistanceModes` for one layer.

    Keeps the per-head sum and sum of squares of the per-image values (``(heads, 3)`` each):
    memory independent of the number of images.

    Args:
        layer: layer index (for labelling).
        geometry: token geometry of the attention it will receive.
    """

    def __init__(self, layer: int, geometry: TokenGeometry) -> None:
        self.layer = layer
        self.geometry = geometry
        self._moments = ImageMoments(layer, "the distance modes")


    @torch.no_grad()
    def update(self, attn: torch.Tensor) -> None:
        """Accumulate one batch of attention probabilities ``(batch, heads, T, T)``.

        Raises:
            ProbeError: on a shape that does not fit the geometry or a changed head count.
        """
        self._moments.add(distance_modes_per_image(attn, self.geometry))

    def result(self) -> DistanceModes:
        """The means and standard errors over images.

        Raises:
            ProbeError: if nothing was accumulated.
        """
        mean, se = self._moments.mean_se()
        return DistanceModes(self.layer, self.n_images, mean, se)


def renormalised_from_stats(stats) -> np.ndarray:
    """The default (``renormalised``) mode from a :class:`~probe.analyses.reducers.LayerStats`.

    Returns:
        float64 ``(heads,)`` in pixels: the reducer's ``mean_distance_px`` feature, the same
        quantity as the first column of :class:`DistanceModes`.
    """
    return stats.feature("mean_distance_px").numpy()


def modes_frame(results: dict[int, DistanceModes]) -> pd.DataFrame:
    """One heads-table frame from ``{layer: DistanceModes}`` (sorted by layer, then head)."""
    if not results:
        raise ProbeError("no layer has distance modes to tabulate")
    return pd.concat([results[k].to_frame() for k in sorted(results)], ignore_index=True)


# ----------------------------------------------------------------------------- registry adapter

from .base import Analysis, ReportInput, register_analysis  # noqa: E402  (light: no torch import)


@register_analysis
class DistanceModesAnalysis(Analysis):
    """The three published definitions of the mean attention distance per head (module doc):
    streamed from every batch's attention, added to the heads table with their standard errors."""

    name = "distance_modes"
    title = "mean attention distance: published definitions"
    consumes = ("attention",)
    head_columns = tuple(c + s for c in COLUMNS.values() for s in ("", "_se"))
    report_order = 40

    def reducer(self, layer, geometry, ctx):
        return DistanceModesReducer(layer, geometry)

    def run(self, ctx) -> None:
        results = ctx.reduced[self.name]
        ctx.add_head_columns(modes_frame(results))
        ctx.result.extras[self.name] = {"modes": [m[0] for m in MODES], "columns": dict(COLUMNS),
                                        "units": {m[0]: m[1] for m in MODES}}

    @classmethod
    def section(cls, report: ReportInput):
        from ..report.plots import to_data_uri
        from ..report.plots_extra import distance_modes_figure

        if COLUMNS["unnormalised"] not in report.heads:
            return None
        uri = to_data_uri(distance_modes_figure(report.heads))
        items = "".join(f"<li><b>{name}</b> ({units}): {desc}</li>" for name, units, desc in MODES)
        return {"title": "Mean attention distance: published definitions",
                "html": f"<ul>{items}</ul><p>Columns {', '.join(COLUMNS.values())} of heads.csv. "
                        "The renormalised and unnormalised modes differ by the patch queries' mass on "
                        "prefix tokens; ConViT's nonlocality is the unnormalised sum in patches.</p>"
                        f'<img src="{uri}" alt="distance modes">'}
