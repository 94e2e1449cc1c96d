"""Normalised mutual information between query and key positions, per head.

Park et al. 2023 ("What do self-supervised vision transformers learn?", ICLR, Sec. 2 and the
``calculate_nmi`` function of naver-ai/cl-vs-mim's ``self_attention_analysis.ipynb``) read a head's
attention over the ``P`` patch tokens as a joint distribution of a query position ``q`` and a key
position ``k``:

* ``p(q) = 1/P`` (uniform query prior), ``p(k | q) = A[q, k]`` (the class/prefix rows and columns
  dropped, rows renormalised over patch keys), so ``p(q, k) = A[q, k] / P`` and
  ``p(k) = (1/P) sum_q A[q, k]``;
* ``I(q; k) = sum_{q,k} p(q, k) ln(A[q, k] / p(k))`` in nats;
* ``NMI = I(q; k) / sqrt(H(q) H(k))`` with ``H(q) = ln P`` and ``H(k) = -sum_k p(k) ln p(k)``
  (the geometric-mean normalisation of Park et al.'s code).

NMI is 1 for a head whose key is a one-to-one function of the query (a permutation: each query
attends to its own key) and 0 for a head whose key distribution is the same from every query
(uniform attention, or every query on the same key — "attention collapse"). It is scale-free: it
does not depend on distances, only on how much the attended keys depend on the query.

Two estimators, both streaming:

* :func:`nmi_from_mean_attention` — the NMI of the **mean attention over images** (``p(k | q)``
  = the mean over images of ``A'``), read from the ``attn_sum`` the reducers already keep
  (:attr:`probe.analyses.reducers.LayerStats.mean_attn`). What the heads table reports.
* :class:`NmiReducer` — the **per-image NMI averaged over images**, exactly Park et al.'s code
  (which adds ``1e-8`` to every entry before renormalising, then averages the per-image NMI over
  the batch). Since mutual information is convex in ``p(k | q)``, averaging the attention first
  gives a lower value whenever heads attend to image-dependent keys; the two agree when the
  attention does not depend on the image. Use it to reproduce Park et al.'s Fig. 4 numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ..errors import ProbeError
from ..geometry import TokenGeometry
from .reducers import ImageMoments, MomentsReducer

#: Park et al.'s smoothing: added to every patch-to-patch entry before renormalising.
PARK_EPS = 1e-8

#: Heads-table columns.
COLUMN = "nmi"
COLUMN_PER_IMAGE = "nmi_per_image"


def nmi_from_conditional(cond: torch.Tensor) -> torch.Tensor:
    """NMI of the joint ``p(q, k) = cond[..., q, k] / Q`` with a uniform query prior.

    Args:
        cond: ``(..., Q, K)`` non-negative, each row a distribution over keys (rows are
            renormalised to sum to one; an all-zero row is an error).

    Returns:
        float64 ``(...)``: ``I(q; k) / sqrt(H(q) H(k))``, in ``[0, 1]``; 0 where ``H(k) = 0`` (all
        queries on one key) or ``Q = 1``.

    Raises:
        ProbeError: for a negative entry, a non-finite entry or a row without mass.
    """
    if cond.dim() < 2:
        raise ProbeError(f"expected a conditional distribution (..., queries, keys), got shape {tuple(cond.shape)}")
    c = cond.double()
    if not torch.isfinite(c).all() or (c < 0).any():
        raise ProbeError("attention for the NMI must be finite and non-negative")
    rows = c.sum(-1, keepdim=True)
    if (rows <= 0).any():
        raise ProbeError("attention for the NMI has a query row without mass on the patch keys")
    c = c / rows
    q = c.shape[-2]
    pk = c.mean(-2)  # (..., K): p(k) = (1/Q) sum_q p(k|q)
    # I = (1/Q) sum_{q,k} c ln(c / p(k)); 0 ln 0 = 0
    ratio = torch.where(c > 0, c / pk.unsqueeze(-2).clamp_min(1e-300), torch.ones_like(c))
    mi = (torch.special.xlogy(c, ratio)).sum((-1, -2)) / q
    hk = -torch.special.xlogy(pk, pk).sum(-1)
    hq = math.log(q)
    denom = torch.sqrt(hk * hq)
    nmi = torch.where(denom > 0, mi / denom.clamp_min(1e-300), torch.zeros_like(mi))
    return nmi.clamp(0.0, 1.0)


def nmi_from_mean_attention(mean_attn: torch.Tensor) -> np.ndarray:
    """Per-head NMI of the mean patch-to-patch attention.

    Args:
        mean_attn: ``(heads, P, P)``, e.g. :attr:`~probe.analyses.reducers.LayerStats.mean_attn`
            (mean over images of the renormalised patch-key attention ``A'``).

    Returns:
        float64 ``(heads,)``, dimensionless, in ``[0, 1]``.

    Raises:
        ProbeError: as :func:`nmi_from_conditional`, or for a non-square matrix.
    """
    if mean_attn.dim() != 3 or mean_attn.shape[-1] != mean_attn.shape[-2]:
        raise ProbeError(f"expected mean attention (heads, P, P), got shape {tuple(mean_attn.shape)}")
    return nmi_from_conditional(mean_attn).cpu().numpy()


def nmi_from_stats(stats) -> pd.DataFrame:
    """Heads-table rows ``layer, head, nmi`` from a :class:`~probe.analyses.reducers.LayerStats`."""
    v = nmi_from_mean_attention(stats.mean_attn)
    return pd.DataFrame({"layer": stats.layer, "head": np.arange(len(v)), COLUMN: v})


def nmi_per_image(attn: torch.Tensor, geometry: TokenGeometry, eps: float = PARK_EPS) -> torch.Tensor:
    """Park et al.'s per-image NMI.

    Args:
        attn: attention probabilities ``(batch, heads, T, T)``, ``T = geometry.num_tokens``.
        geometry: token geometry (prefix rows and columns are dropped).
        eps: added to every patch-to-patch entry before the rows are renormalised (Park et al.
            use ``1e-8``; 0 disables it).

    Returns:
        float64 ``(batch, heads)``.

    Raises:
        ProbeError: on a shape that does not fit the geometry, or a negative ``eps``.
    """
    if not isinstance(attn, torch.Tensor) or attn.dim() != 4 or attn.shape[-1] != attn.shape[-2]:
        raise ProbeError(f"expected attention probabilities (batch, heads, tokens, tokens), got "
                         f"{tuple(attn.shape) if isinstance(attn, torch.Tensor) else type(attn).__name__}")
    geometry.check_tokens(attn.shape[-1])
    if not eps >= 0:
        raise ProbeError(f"eps must be >= 0, got {eps}")
    n = geometry.num_prefix_tokens
    patch = attn[:, :, n:, n:].double() + eps
    return nmi_from_conditional(patch)


@dataclass(frozen=True)
class NmiPerImage:
    """Mean over images of the per-image NMI of one layer.

    Attributes:
        layer: layer index.
        n_images: images accumulated.
        mean: float64 ``(heads,)``.
        se: float64 ``(heads,)``, standard error over images (NaN for one image).
    """

    layer: int
    n_images: int
    mean: np.ndarray
    se: np.ndarray

    def to_frame(self) -> pd.DataFrame:
        """Heads-table rows ``layer, head, nmi_per_image, nmi_per_image_se``."""
        return pd.DataFrame({"layer": self.layer, "head": np.arange(len(self.mean)),
                             COLUMN_PER_IMAGE: self.mean, COLUMN_PER_IMAGE + "_se": self.se})


class NmiReducer(MomentsReducer):
    """Streaming mean of Park et al.'s per-image NMI (:func:`nmi_per_image`) for one layer.

    Keeps a per-head sum and sum of squares: memory independent of the number of images.
    """

    def __init__(self, layer: int, geometry: TokenGeometry, eps: float = PARK_EPS) -> None:
        self.layer, self.geometry, self.eps = layer, geometry, eps
        self._moments = ImageMoments(layer, "the NMI")


    @torch.no_grad()
    def update(self, attn: torch.Tensor) -> None:
        """Accumulate one batch ``(batch, heads, T, T)`` (in chunks of images).

        Raises:
            ProbeError: as :func:`nmi_per_image`, or on a changed head count.
        """
        step = max(1, (1 << 22) // max(1, attn[0].numel()))
        for i in range(0, attn.shape[0], step):
            self._moments.add(nmi_per_image(attn[i:i + step], self.geometry, self.eps))

    def result(self) -> NmiPerImage:
        """The mean and standard error over images.

        Raises:
            ProbeError: if nothing was accumulated.
        """
        mean, se = self._moments.mean_se()
        return NmiPerImage(self.layer, self.n_images, mean, se)


# ----------------------------------------------------------------------------- registry adapter

from .base import Analysis, ReportInput, register_analysis  # noqa: E402  (light: no torch import)


@register_analysis
class NmiAnalysis(Analysis):
    """Per-head NMI between query and key positions (Park et al. 2023): of the mean attention
    (from the core's streaming statistics) and Park et al.'s per-image mean (streamed)."""

    name = "nmi"
    title = "query-key normalised mutual information"
    consumes = ("attention", "stats")
    head_columns = (COLUMN, COLUMN_PER_IMAGE, COLUMN_PER_IMAGE + "_se")
    report_order = 45

    def reducer(self, layer, geometry, ctx):
        return NmiReducer(layer, geometry)

    def run(self, ctx) -> None:
        ctx.add_head_columns(pd.concat([nmi_from_stats(ctx.stats[l]) for l in sorted(ctx.stats)],
                                       ignore_index=True))
        per = ctx.reduced[self.name]
        ctx.add_head_columns(pd.concat([per[l].to_frame() for l in sorted(per)], ignore_index=True))
        ctx.result.extras[self.name] = {"eps_per_image": PARK_EPS}

    @classmethod
    def section(cls, report: ReportInput):
        from ..report.plots import to_data_uri
        from ..report.plots_extra import nmi_by_layer

        if COLUMN not in report.heads:
            return None
        uri = to_data_uri(nmi_by_layer(report.heads))
        return {"title": "Normalised mutual information between query and key positions",
                "html": "<p>NMI = I(q; k) / sqrt(H(q) H(k)) with a uniform query prior and p(k|q) the "
                        "patch-to-patch attention (Park et al. 2023). High: the attended keys depend on "
                        "the query; low: every query attends to the same keys (attention collapse). "
                        "<code>nmi</code>: of the mean attention over images; <code>nmi_per_image</code>: "
                        "the mean of the per-image NMI, as Park et al. compute it.</p>"
                        f'<img src="{uri}" alt="NMI per layer">'}
