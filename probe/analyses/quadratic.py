"""Quadratic-encoding fit: the attention centre Δ and sharpness α of every head.

Model (Cordonnier, Loukas & Jaggi, ICLR 2020, Sec. 3, Eq. 9). For a patch query ``q`` and a patch
key ``k`` with relative offset ``δ = p_k − p_q = (δ_row, δ_col)`` in patches,

    p(k | q) = exp(−α ‖δ − Δ‖²) / Σ_{k' in the patch grid} exp(−α ‖δ' − Δ‖²),

where ``Δ = (Δ_row, Δ_col)`` (patches) is where the head looks relative to the query and
``α > 0`` (per patch²) how sharply. Up to a constant the score is ``b·δ − α‖δ‖²`` with
``b = 2αΔ``, i.e. the natural parameters ``θ = (b_row, b_col, −α, −α, 0)`` of an exponential
family on ``φ(δ) = (δ_row, δ_col, δ_row², δ_col², δ_row δ_col)``.

Estimator. Maximum likelihood against the observed attention rows ``A'`` (the patch-key part of
each patch query's row renormalised to one, as for the mean attention distance), over all patch
queries and images::

    LL(θ) = mean_{images, q} Σ_k A'[q,k] log p_θ(k | q)
          = θ · phi_mean − mean_q log Σ_{k in the grid} exp(θ · φ(δ_qk))          (nats / query)

``phi_mean`` (:attr:`probe.analyses.reducers.LayerStats.phi_mean`) is the only data the fit
needs, so it runs on the streaming sums (memory independent of the number of images). The
normalisation runs over the keys that exist for each query, so queries near the border enter
exactly. ``LL`` is concave in θ (a log-partition function is convex); it is maximised with
:func:`scipy.optimize.minimize` (``trust-exact``, analytic gradient ``phi_mean − E_θ[φ]`` and
Hessian ``−mean_q Cov_θ[φ]``). For the isotropic model the partition function factorises over
rows and columns, so each evaluation costs ``O(rows² + cols²)``.

Constraints and flags (:data:`STATUS` values, column ``quad_status``):

* ``α`` is constrained to ``[0, ALPHA_MAX]``. When the unconstrained maximiser lies outside, the
  maximum of the concave ``LL`` over that slab lies on a face ``α = 0`` or ``α = ALPHA_MAX``,
  which is solved exactly (``b`` free) and checked with the KKT sign condition.
* ``"non_local"``: ``α = 0`` (a flat or linearly tilted head; ``Δ`` is undefined and reported as
  NaN) or a Gaussian so wide that its 50 %-mass radius ``r50`` exceeds half the longer side of
  the patch grid. A uniform head is therefore a valid, non-local fit, not a failure.
* ``"alpha_capped"``: the data asks for ``α > ALPHA_MAX`` (attention one-hot on one key to float
  precision: the likelihood has no finite maximiser); ``α`` is held at the cap and ``Δ`` fitted.
* ``"not_converged"``: the projected gradient at the returned point exceeds :data:`GRAD_TOL`
  (or the optimiser failed); the values are reported, never dropped.
* ``"ok"``: an interior, local optimum.

Anisotropic option: ``score = −½(δ − Δ)ᵀ Σ⁻¹ (δ − Δ)`` with a full 2x2 ``Σ`` (patches²), i.e. all
five natural parameters free; fitted unconstrained (same solver, pairwise over queries and keys,
``O(P²)`` per evaluation). ``aniso_status`` is ``"ok"`` when ``Σ⁻¹`` is positive definite,
``"non_local"`` when it is not (no finite centre: flat, tilted or saddle-shaped; Δ, Σ NaN), and
``"not_converged"`` otherwise (including one-hot heads, whose likelihood has no maximiser).

Uncertainty (``*_se``): bootstrap over images. The Poisson-bootstrap replicates of ``phi_mean``
give its sampling covariance; by default it is propagated to (Δ, α) through the derivative of the
maximiser (``se_method="linearized"``, implicit-function theorem + delta method, one Hessian per
head); ``se_method="refit"`` refits every replicate instead (exact bootstrap, ~100x slower).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from scipy.optimize import minimize
from scipy.special import logsumexp, xlogy

from ..errors import ProbeError
from ..geometry import TokenGeometry
from .reducers import LayerReducer, LayerStats

#: Largest α (per patch²) the fit reports. At α = 20 a key one patch from Δ gets e^-20 ≈ 2e-9 of
#: the weight of the key at Δ, below the float32 resolution of the reducer's sums.
ALPHA_MAX: float = 20.0
#: Projected-gradient tolerance of the convergence check, in grid-scaled units (offsets divided
#: by ``max(rows, cols)``, so the gradient entries are O(1) differences of mean offsets).
GRAD_TOL: float = 1e-6
#: A fit is local when its 50 %-mass radius is below this fraction of ``max(rows, cols)``.
LOCAL_R50_FRACTION: float = 0.5
#: ``quad_kl_explained`` is NaN when the attention is this close to uniform (nats): the ratio
#: would only measure rounding noise.
KL_FLOOR: float = 1e-9
#: Values of the status column.
STATUS: tuple[str, ...] = ("ok", "non_local", "alpha_capped", "not_converged")

_MAXITER = 200


# ---------------------------------------------------------------------------------------------
# input helpers


def _as_numpy(x, name: str, ndim: int | None = None, last: int | None = None) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ProbeError(f"{name} must be a numeric array, got {type(x).__name__}") from exc
    if ndim is not None and arr.ndim != ndim:
        raise ProbeError(f"{name} must have {ndim} dimensions, got shape {arr.shape}")
    if last is not None and arr.shape[-1] != last:
        raise ProbeError(f"{name} must have last dimension {last}, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ProbeError(f"{name} contains NaN or infinite values; check the captured attention")
    return arr


def _check_geometry(geometry: TokenGeometry) -> None:
    if not isinstance(geometry, TokenGeometry):
        raise ProbeError(f"geometry must be a probe.geometry.TokenGeometry, got {type(geometry).__name__}")
    rows, cols = geometry.grid
    if rows < 2 or cols < 2:
        raise ProbeError(
            f"the quadratic-encoding fit needs a patch grid of at least 2x2, got {rows}x{cols}"
        )


def _scale(geometry: TokenGeometry) -> float:
    """Length unit of the internal parametrisation: ``max(rows, cols)`` patches."""
    return float(max(geometry.grid))


# ---------------------------------------------------------------------------------------------
# isotropic log-likelihood (separable over rows and columns)


class _IsoProblem:
    """Mean log-likelihood of the isotropic model in grid-scaled units.

    Parameters ``x = (b_row·L, b_col·L, α·L²)``; statistics ``s = (phi_row/L, phi_col/L,
    −(phi_row2 + phi_col2)/L²)`` so that ``LL = x·s − mean_q log Z_q``. Along one axis of
    length ``n`` the keys of query ``i`` sit at offsets ``d = k − i``, ``k = 0..n−1``, and
    ``log Z_q = log Z_row(i) + log Z_col(j)``.
    """

    def __init__(self, geometry: TokenGeometry) -> None:
        self.L = _scale(geometry)
        self.axes = []
        for n in geometry.grid:
            i = np.arange(n, dtype=np.float64)
            d = (i[None, :] - i[:, None]) / self.L
            self.axes.append((d, d * d))
        self._cache_key: bytes | None = None
        self._cache: tuple[float, np.ndarray, np.ndarray] | None = None

    def stats(self, phi: np.ndarray) -> np.ndarray:
        L = self.L
        return np.array([phi[0] / L, phi[1] / L, -(phi[2] + phi[3]) / L**2])

    def evaluate(self, x: np.ndarray, s: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        key = x.tobytes() + s.tobytes()
        if key == self._cache_key:
            return self._cache
        a = x[2]
        val = float(x @ s)
        g = s.copy()
        h = np.zeros((3, 3))
        for k, (d, d2) in enumerate(self.axes):
            score = x[k] * d - a * d2
            top = score.max(axis=1, keepdims=True)
            e = np.exp(score - top)
            z = e.sum(axis=1)
            w = e / z[:, None]
            wd = w * d
            wd2 = w * d2
            m1 = wd.sum(1)
            m2 = wd2.sum(1)
            m3 = (wd2 * d).sum(1)
            m4 = (wd2 * d2).sum(1)
            n = len(z)
            val -= float((np.log(z) + top[:, 0]).sum()) / n
            g[k] -= m1.sum() / n
            g[2] += m2.sum() / n
            h[k, k] -= (m2 - m1 * m1).sum() / n
            c = (m3 - m1 * m2).sum() / n  # Cov(d, d²); the feature of α is −d²
            h[k, 2] += c
            h[2, k] += c
            h[2, 2] -= (m4 - m2 * m2).sum() / n
        self._cache_key, self._cache = key, (val, g, h)
        return val, g, h


def _maximize(fun, x0: np.ndarray, free: np.ndarray) -> np.ndarray:
    """Maximise a concave ``fun(x) -> (value, grad, hess)`` over the coordinates ``free``."""
    x_full = x0.astype(np.float64).copy()
    idx = np.flatnonzero(free)

    def full(z):
        x = x_full.copy()
        x[idx] = z
        return x

    best = [float(fun(x_full)[0]), x_full[idx].copy()]

    def f(z):
        v, g, _ = fun(full(z))
        if np.isfinite(v) and v > best[0]:
            best[0], best[1] = float(v), np.array(z, dtype=np.float64)
        return -v, -g[idx]

    def hess(z):
        return -fun(full(z))[2][np.ix_(idx, idx)]

    with np.errstate(over="ignore", under="ignore", invalid="ignore", divide="ignore"):
        try:
            res = minimize(f, x_full[idx], jac=True, hess=hess, method="trust-exact",
                           options={"gtol": 1e-11, "maxiter": _MAXITER})
            z = res.x
        except (ValueError, np.linalg.LinAlgError, FloatingPointError):
            z = None  # a diverging run; fall back to the best point visited
    if z is None or not np.all(np.isfinite(z)) or not fun(full(z))[0] >= best[0]:
        z = best[1]
    return full(z)


def _fit_iso_one(prob: _IsoProblem, phi: np.ndarray, x0: np.ndarray) -> tuple[np.ndarray, str, float]:
    """Fit one head. Returns scaled ``x``, status among ok/alpha_capped/zero/not_converged, LL."""
    s = prob.stats(phi)
    a_max = ALPHA_MAX * prob.L**2

    def fun(x):
        return prob.evaluate(x, s)

    def kkt(x, face):
        _, g, _ = fun(x)
        if not np.all(np.isfinite(g)):
            return False
        ok = max(abs(g[0]), abs(g[1])) <= GRAD_TOL
        if face is None:
            return ok and abs(g[2]) <= GRAD_TOL
        if face == "zero":
            return ok and g[2] <= GRAD_TOL  # LL would not grow with α > 0
        return ok and g[2] >= -GRAD_TOL  # face "cap": LL would not grow with α < α_max

    x = _maximize(fun, x0, np.ones(3, bool))
    if 0.0 <= x[2] <= a_max and kkt(x, None):
        return x, ("alpha_capped" if x[2] >= a_max else "ok"), fun(x)[0]
    # The maximiser of the concave LL over the slab 0 <= α <= ALPHA_MAX then lies on a face
    # (α = 0 or α = ALPHA_MAX), solved with b free and checked with the KKT sign condition.
    start_b = x[:2] if np.all(np.isfinite(x)) else x0[:2]
    candidates = []
    if 0.0 <= x[2] <= a_max:
        candidates.append((x, "not_converged", fun(x)[0]))
    faces = (("zero", 0.0), ("alpha_capped", a_max))
    if np.all(np.isfinite(x)) and kkt(x, None):
        # x is the unconstrained maximiser of the concave LL: the segment from any point of the
        # slab to x crosses the face on x's side, where the LL is at least as large, so the
        # slab's maximiser lies on that face alone.
        faces = faces[:1] if x[2] < 0.0 else faces[1:]
    for face, a in faces:
        xf = _maximize(fun, np.array([start_b[0], start_b[1], a]), np.array([True, True, False]))
        candidates.append((xf, face if kkt(xf, face) else "not_converged", fun(xf)[0]))
    good = [c for c in candidates if c[1] != "not_converged" and np.isfinite(c[2])]
    pool = good or [c for c in candidates if np.isfinite(c[2])] or candidates
    best = max(pool, key=lambda c: c[2] if np.isfinite(c[2]) else -np.inf)
    return best


def _iso_start(phi: np.ndarray, L: float) -> np.ndarray:
    """Moment-matching start: Δ0 = mean offset, α0 = 1 / (2 · per-axis variance)."""
    var = 0.5 * ((phi[2] - phi[0] ** 2) + (phi[3] - phi[1] ** 2))
    a0 = float(np.clip(0.5 / max(var, 1e-6), 1e-3, ALPHA_MAX / 2))
    return np.array([2 * a0 * phi[0] * L, 2 * a0 * phi[1] * L, a0 * L**2])


# ---------------------------------------------------------------------------------------------
# anisotropic log-likelihood (pairwise over queries and keys)


class _AnisoProblem:
    """Mean log-likelihood of the general model ``score = θ·φ(δ)`` in grid-scaled units.

    ``θ = (b_row·L, b_col·L, q_rr·L², q_cc·L², q_rc·L²)`` with score
    ``b·δ + q_rr δ_row² + q_cc δ_col² + q_rc δ_row δ_col``; statistics ``phi`` scaled alike.
    """

    def __init__(self, geometry: TokenGeometry, chunk: int = 256) -> None:
        self.L = _scale(geometry)
        off = geometry.offsets().numpy() / self.L  # (P, P, 2)
        dr, dc = off[..., 0], off[..., 1]
        self.F = np.stack([dr, dc, dr * dr, dc * dc, dr * dc], axis=-1)  # (P, P, 5)
        self.chunk = chunk
        self._cache_key: bytes | None = None
        self._cache = None

    def stats(self, phi: np.ndarray) -> np.ndarray:
        L = self.L
        return phi / np.array([L, L, L**2, L**2, L**2])

    def evaluate(self, x: np.ndarray, s: np.ndarray):
        key = x.tobytes() + s.tobytes()
        if key == self._cache_key:
            return self._cache
        P = self.F.shape[0]
        val = float(x @ s)
        g = s.copy()
        h = np.zeros((5, 5))
        for start in range(0, P, self.chunk):
            F = self.F[start:start + self.chunk]
            score = F @ x
            lse = logsumexp(score, axis=1, keepdims=True)
            w = np.exp(score - lse)
            m = np.einsum("qk,qkf->qf", w, F)
            mm = np.einsum("qk,qkf,qkg->fg", w, F, F)
            val -= float(lse.sum()) / P
            g -= m.sum(0) / P
            h -= (mm - m.T @ m) / P
        self._cache_key, self._cache = key, (val, g, h)
        return val, g, h


# ---------------------------------------------------------------------------------------------
# public API


@dataclass(frozen=True)
class QuadraticFit:
    """Per-head quadratic-encoding fits of one layer (Cordonnier et al. 2020, Eq. 9).

    All arrays have ``heads`` as first axis. Offsets are ``p_key − p_query`` in patches, rows
    first; pixel versions multiply by ``geometry.pixels_per_token``.

    Attributes:
        geometry: the token geometry the fit used.
        layer: block index, or None when unknown.
        delta: float64 ``(heads, 2)``, the centre ``(Δ_row, Δ_col)`` in patches; NaN where
            ``α = 0`` (no finite centre).
        alpha: float64 ``(heads,)``, the sharpness α in 1/patch², within ``[0, ALPHA_MAX]``.
        b: float64 ``(heads, 2)``, natural parameters ``2αΔ`` in 1/patch (finite also at α = 0).
        status: ``(heads,)`` strings from :data:`STATUS`.
        loglik: float64 ``(heads,)``, maximised mean log-likelihood, nats per patch query.
        ll_gain: float64 ``(heads,)``, ``loglik − log(1/P)``: gain over uniform attention, nats
            per patch query (0 for a uniform head).
        kl_fit: float64 ``(heads,)``, mean over patch queries of ``KL(Ā'[q] ‖ p_fit(·|q))`` with
            ``Ā'`` the image-mean renormalised attention, nats; NaN without ``mean_attn``.
        kl_uniform: float64 ``(heads,)``, same against uniform attention; NaN without it.
        delta_se: float64 ``(heads, 2)``, bootstrap standard error of Δ (patches); NaN without
            replicates.
        alpha_se: float64 ``(heads,)``, bootstrap standard error of α; NaN without replicates.
        n_bootstrap: replicates refitted.
        aniso: dict of per-head arrays of the anisotropic fit (keys ``delta`` (heads, 2),
            ``sigma`` (heads, 2, 2) = Σ in patches², ``ll_gain``, ``status``), empty unless
            requested.
    """

    geometry: TokenGeometry
    layer: int | None
    delta: np.ndarray
    alpha: np.ndarray
    b: np.ndarray
    status: np.ndarray
    loglik: np.ndarray
    ll_gain: np.ndarray
    kl_fit: np.ndarray
    kl_uniform: np.ndarray
    delta_se: np.ndarray
    alpha_se: np.ndarray
    n_bootstrap: int = 0
    aniso: dict = field(default_factory=dict)

    @property
    def num_heads(self) -> int:
        """Number of heads fitted."""
        return int(self.alpha.shape[0])

    @property
    def sigma_patches(self) -> np.ndarray:
        """Gaussian width ``σ = 1/√(2α)`` in patches, ``(heads,)``; inf where α = 0."""
        with np.errstate(divide="ignore"):
            return 1.0 / np.sqrt(2.0 * self.alpha)

    def mass_radius(self, mass: float) -> np.ndarray:
        """Radius around Δ holding ``mass`` of the fitted Gaussian, in patches, ``(heads,)``.

        Uses the continuous isotropic Gaussian of the fit (as the 50 %/90 % circles of
        Cordonnier et al. 2020, Fig. 4): ``‖δ − Δ‖²/σ²`` is χ² with 2 degrees of freedom, so
        ``r = σ √(−2 ln(1 − mass)) = √(−ln(1 − mass)/α)``. It ignores the grid's border.

        Raises:
            ProbeError: unless ``0 < mass < 1``.
        """
        if not 0.0 < mass < 1.0:
            raise ProbeError(f"mass must lie in (0, 1), got {mass}")
        return self.sigma_patches * math.sqrt(-2.0 * math.log1p(-mass))

    @property
    def local(self) -> np.ndarray:
        """Bool ``(heads,)``: status ``ok`` or ``alpha_capped``, i.e. a converged fit with
        ``α > 0`` and ``r50 < LOCAL_R50_FRACTION · max(rows, cols)``."""
        return (self.status == "ok") | (self.status == "alpha_capped")

    def to_frame(self) -> pd.DataFrame:
        """One row per head.

        Columns: ``layer`` (when known), ``head``, ``delta_row``, ``delta_col`` (patches),
        ``delta_row_px``, ``delta_col_px`` (pixels), ``alpha`` (1/patch²), ``sigma_patches``,
        ``r50_patches``, ``r90_patches``, ``b_row``, ``b_col`` (2αΔ, 1/patch),
        ``quad_loglik_nats``, ``quad_ll_gain_nats``, ``quad_kl_fit_nats``,
        ``quad_kl_explained`` (``1 − kl_fit/kl_uniform``: 1 perfect, 0 no better than uniform;
        NaN without ``mean_attn`` or when ``kl_uniform <= KL_FLOOR``),
        ``delta_row_se``, ``delta_col_se``, ``delta_row_px_se``, ``delta_col_px_se``,
        ``alpha_se``, ``quad_local``, ``quad_converged``, ``quad_status``; with the anisotropic
        fit also ``aniso_delta_row``, ``aniso_delta_col``, ``aniso_sigma_rr``,
        ``aniso_sigma_cc``, ``aniso_sigma_rc`` (Σ, patches²), ``aniso_ll_gain_nats``,
        ``aniso_status``.
        """
        py, px = self.geometry.pixels_per_token
        with np.errstate(divide="ignore", invalid="ignore"):
            explained = np.where(self.kl_uniform > KL_FLOOR, 1.0 - self.kl_fit / self.kl_uniform, np.nan)
        cols: dict[str, object] = {}
        if self.layer is not None:
            cols["layer"] = np.full(self.num_heads, int(self.layer))
        cols.update({
            "head": np.arange(self.num_heads),
            "delta_row": self.delta[:, 0],
            "delta_col": self.delta[:, 1],
            "delta_row_px": self.delta[:, 0] * py,
            "delta_col_px": self.delta[:, 1] * px,
            "alpha": self.alpha,
            "sigma_patches": self.sigma_patches,
            "r50_patches": self.mass_radius(0.5),
            "r90_patches": self.mass_radius(0.9),
            "b_row": self.b[:, 0],
            "b_col": self.b[:, 1],
            "quad_loglik_nats": self.loglik,
            "quad_ll_gain_nats": self.ll_gain,
            "quad_kl_fit_nats": self.kl_fit,
            "quad_kl_explained": explained,
            "delta_row_se": self.delta_se[:, 0],
            "delta_col_se": self.delta_se[:, 1],
            "delta_row_px_se": self.delta_se[:, 0] * py,
            "delta_col_px_se": self.delta_se[:, 1] * px,
            "alpha_se": self.alpha_se,
            "quad_local": self.local,
            "quad_converged": self.status != "not_converged",
            "quad_status": self.status.astype(object),
        })
        if self.aniso:
            sig = self.aniso["sigma"]
            cols.update({
                "aniso_delta_row": self.aniso["delta"][:, 0],
                "aniso_delta_col": self.aniso["delta"][:, 1],
                "aniso_sigma_rr": sig[:, 0, 0],
                "aniso_sigma_cc": sig[:, 1, 1],
                "aniso_sigma_rc": sig[:, 0, 1],
                "aniso_ll_gain_nats": self.aniso["ll_gain"],
                "aniso_status": self.aniso["status"].astype(object),
            })
        return pd.DataFrame(cols)


def model_log_attention(b: np.ndarray, alpha: np.ndarray, geometry: TokenGeometry) -> np.ndarray:
    """Log attention of the quadratic encoding in natural parameters.

    Args:
        b: ``(heads, 2)``, ``2αΔ`` in 1/patch (rows, cols).
        alpha: ``(heads,)``, α in 1/patch² (0 allowed: a linear tilt or uniform attention).
        geometry: token geometry; only the patch grid is used.

    Returns:
        float64 ``(heads, P, P)``: ``log p(k | q)`` for patch query ``q`` and patch key ``k``,
        normalised over all ``P`` patch keys (Cordonnier et al. 2020, Eq. 9).

    Raises:
        ProbeError: on shapes that do not match.
    """
    b = _as_numpy(b, "b", ndim=2, last=2)
    alpha = _as_numpy(alpha, "alpha", ndim=1)
    if b.shape[0] != alpha.shape[0]:
        raise ProbeError(f"b has {b.shape[0]} heads but alpha has {alpha.shape[0]}")
    off = geometry.offsets().numpy()
    score = (np.einsum("hc,qkc->hqk", b, off)
             - alpha[:, None, None] * (off**2).sum(-1)[None])
    return score - logsumexp(score, axis=-1, keepdims=True)


def quadratic_attention(delta, alpha, geometry: TokenGeometry) -> torch.Tensor:
    """Attention probabilities of the isotropic quadratic encoding (Cordonnier et al. 2020, Eq. 9).

    ``p(k | q) ∝ exp(−α ‖δ_qk − Δ‖²)`` over the patch keys of the grid, ``δ_qk = p_k − p_q``.

    Args:
        delta: ``(heads, 2)`` centres ``(Δ_row, Δ_col)`` in patches (any real values, also
            beyond the grid).
        alpha: ``(heads,)`` sharpness α ≥ 0 in 1/patch² (0 gives uniform attention).
        geometry: token geometry; only the patch grid is used.

    Returns:
        float64 tensor ``(heads, P, P)``; row ``q`` is the distribution over patch keys of patch
        query ``q`` (row-major patch order), summing to one.

    Raises:
        ProbeError: on mismatched shapes, non-finite values or a negative α.
    """
    delta = _as_numpy(delta, "delta", ndim=2, last=2)
    alpha = _as_numpy(alpha, "alpha", ndim=1)
    if delta.shape[0] != alpha.shape[0]:
        raise ProbeError(f"delta has {delta.shape[0]} heads but alpha has {alpha.shape[0]}")
    if np.any(alpha < 0):
        raise ProbeError(f"alpha must be >= 0, got {alpha.tolist()}")
    b = 2.0 * alpha[:, None] * delta
    return torch.from_numpy(np.exp(model_log_attention(b, alpha, geometry)))


def offset_profile(mean_attn, geometry: TokenGeometry, query_mask=None) -> torch.Tensor:
    """Mean attention per relative offset: the distribution of ``δ = p_k − p_q``.

    ``profile[h, δ] = (1/P) Σ_q A'[h, q, q + δ]`` over the patch queries ``q`` for which key
    ``q + δ`` exists. With rows of ``A'`` summing to one, each head's profile sums to one: it is
    the distribution of the offset to the attended key for a uniformly drawn patch query.

    Args:
        mean_attn: ``(heads, P, P)`` renormalised patch-to-patch attention (e.g.
            :attr:`LayerStats.mean_attn`).
        geometry: token geometry with the ``rows x cols`` patch grid.
        query_mask: optional boolean ``(heads, P)``: only these patch queries enter each head's
            profile (the mean is then over them); a head with no query gets a zero profile.

    Returns:
        float64 tensor ``(heads, 2·rows − 1, 2·cols − 1)``; index ``[h, i, j]`` is offset
        ``(i − (rows − 1), j − (cols − 1))`` patches.

    Raises:
        ProbeError: if the shape does not match the geometry.
    """
    a = _as_numpy(mean_attn, "mean_attn", ndim=3)
    rows, cols = geometry.grid
    P = rows * cols
    if a.shape[1:] != (P, P):
        raise ProbeError(f"mean_attn must have shape (heads, {P}, {P}) for a {rows}x{cols} grid, got {a.shape}")
    off = geometry.offsets().numpy().astype(np.int64)
    flat = (off[..., 0] + rows - 1) * (2 * cols - 1) + (off[..., 1] + cols - 1)  # (P, P)
    out = np.zeros((a.shape[0], (2 * rows - 1) * (2 * cols - 1)))
    qm = np.ones((a.shape[0], P), dtype=bool) if query_mask is None else np.asarray(query_mask, dtype=bool)
    if qm.shape != (a.shape[0], P):
        raise ProbeError(f"query_mask must have shape ({a.shape[0]}, {P}), got {qm.shape}")
    for h in range(a.shape[0]):
        if qm[h].any():
            out[h] = np.bincount(flat[qm[h]].ravel(), weights=a[h][qm[h]].ravel(), minlength=out.shape[1])
            out[h] /= qm[h].sum()
    return torch.from_numpy(out.reshape(a.shape[0], 2 * rows - 1, 2 * cols - 1))


def on_grid_queries(centre, geometry: TokenGeometry, margin: float = 1.0) -> np.ndarray:
    """Patch queries whose target ``q + Δ`` lies on the patch grid, per head.

    A query's target is inside when it is at least ``margin`` patches inside the grid's border
    (so its nearest keys exist on every side); if no query of a head qualifies, the margin is
    dropped (target anywhere on the grid), and if still none, every query is kept (a centre beyond
    the grid for every query). A head without a finite centre keeps every query.

    Args:
        centre: ``(heads, 2)`` centres Δ in patches (NaN allowed).
        geometry: token geometry with the patch grid. margin: patches.

    Returns:
        boolean ``(heads, P)``.
    """
    c = np.asarray(centre, dtype=np.float64).reshape(-1, 2)
    rows, cols = geometry.grid
    qr, qc = np.divmod(np.arange(rows * cols), cols)
    out = np.ones((c.shape[0], rows * cols), dtype=bool)
    for h in range(c.shape[0]):
        if not np.isfinite(c[h]).all():
            continue
        tr, tc = qr + c[h, 0], qc + c[h, 1]
        for m in (margin, 0.0):
            ok = (tr >= m - 1e-9) & (tr <= rows - 1 - m + 1e-9) & (tc >= m - 1e-9) & (tc <= cols - 1 - m + 1e-9)
            if ok.any():
                out[h] = ok
                break
    return out


def _fit_aniso(phi_mean: np.ndarray, geometry: TokenGeometry, x_iso: np.ndarray) -> dict:
    prob = _AnisoProblem(geometry)
    L = prob.L
    H = phi_mean.shape[0]
    delta = np.full((H, 2), np.nan)
    sigma = np.full((H, 2, 2), np.nan)
    ll_gain = np.full(H, np.nan)
    status = np.empty(H, dtype="<U16")
    log_p = math.log(geometry.num_patches)
    for h in range(H):
        s = prob.stats(phi_mean[h])

        def fun(x, s=s):
            return prob.evaluate(x, s)

        br, bc, a = x_iso[h]
        x0 = np.array([br, bc, -a, -a, 0.0]) if np.all(np.isfinite(x_iso[h])) else np.zeros(5)
        x = _maximize(fun, x0, np.ones(5, bool))
        v, g, _ = fun(x)
        ll_gain[h] = v + log_p
        if not (np.all(np.isfinite(g)) and np.abs(g).max() <= GRAD_TOL):
            status[h] = "not_converged"
            continue
        b = x[:2] / L
        qrr, qcc, qrc = x[2:] / L**2
        lam = -np.array([[2 * qrr, qrc], [qrc, 2 * qcc]])  # score = b·δ − ½ δᵀΛδ
        if np.linalg.eigvalsh(lam).min() <= 0:
            status[h] = "non_local"
            continue
        sig = np.linalg.inv(lam)
        sigma[h] = sig
        delta[h] = sig @ b
        status[h] = "ok"
    return {"delta": delta, "sigma": sigma, "ll_gain": ll_gain, "status": status}


def _se_linearized(prob: _IsoProblem, xs: np.ndarray, status: np.ndarray, boot: np.ndarray):
    """Standard errors by propagating the bootstrap covariance of ``phi_mean`` linearly.

    At the maximiser ``s(φ) = E_θ[features]``, so ``dη/dφ = I(η)⁻¹ S`` with ``I`` the Fisher
    information (minus the Hessian of LL) and ``S`` the linear map from ``φ`` to the scaled
    statistics (implicit-function theorem); ``Cov(η) ≈ (I⁻¹S) Cov_boot(φ) (I⁻¹S)ᵀ`` and the
    delta method maps ``η = (b·L, α·L²)`` to ``(Δ, α)``. On the face ``α = ALPHA_MAX`` only ``b``
    is free (``alpha_se`` NaN); at ``α = 0`` Δ is undefined (all NaN).
    """
    H = xs.shape[0]
    L = prob.L
    smat = np.array([[1 / L, 0, 0, 0, 0], [0, 1 / L, 0, 0, 0], [0, 0, -1 / L**2, -1 / L**2, 0]])
    delta_se = np.full((H, 2), np.nan)
    alpha_se = np.full(H, np.nan)
    for h in range(H):
        br, bc, a = xs[h]
        if status[h] in ("not_converged",) or a <= 0:
            continue
        cov_phi = np.cov(boot[:, h, :], rowvar=False)
        info = -prob.evaluate(xs[h], np.zeros(3))[2]  # the Hessian does not depend on the data
        free = [0, 1] if status[h] == "alpha_capped" else [0, 1, 2]
        try:
            jac = np.linalg.solve(info[np.ix_(free, free)], smat[free])
        except np.linalg.LinAlgError:
            continue
        cov_eta = jac @ cov_phi @ jac.T
        # (Δ_row, Δ_col, α) as functions of η = (b_row·L, b_col·L, α·L²)
        g = np.array([[L / (2 * a), 0, -br * L / (2 * a * a)],
                      [0, L / (2 * a), -bc * L / (2 * a * a)],
                      [0, 0, 1 / L**2]])[:, free]
        cov = g @ cov_eta @ g.T
        sd = np.sqrt(np.clip(np.diag(cov), 0, None))
        delta_se[h] = sd[:2]
        if len(free) == 3:
            alpha_se[h] = sd[2]
    return delta_se, alpha_se


def _se_refit(prob: _IsoProblem, xs: np.ndarray, status: np.ndarray, boot: np.ndarray):
    """Standard errors as the standard deviation of refits of every bootstrap replicate.

    Each replicate is fitted warm-started at the point estimate; replicates whose fit fails are
    left out, and Δ uses the replicates with ``α > 0``.
    """
    H = xs.shape[0]
    L = prob.L
    delta_se = np.full((H, 2), np.nan)
    alpha_se = np.full(H, np.nan)
    for h in range(H):
        if status[h] == "not_converged":
            continue
        reps = []
        for r in range(boot.shape[0]):
            x, st, _ = _fit_iso_one(prob, boot[r, h], xs[h])
            if st != "not_converged":
                reps.append(x)
        reps = np.array(reps).reshape(-1, 3)
        if len(reps) < 2:
            continue
        a_r = reps[:, 2] / L**2
        alpha_se[h] = a_r.std(ddof=1)
        pos = a_r > 0
        if pos.sum() >= 2:
            d_r = reps[pos, :2] / L / (2 * a_r[pos, None])
            delta_se[h] = d_r.std(axis=0, ddof=1)
    return delta_se, alpha_se


def fit_quadratic(
    phi_mean,
    geometry: TokenGeometry,
    *,
    phi_bootstrap=None,
    mean_attn=None,
    anisotropic: bool = False,
    layer: int | None = None,
    se_method: str = "linearized",
) -> QuadraticFit:
    """Maximum-likelihood quadratic-encoding centre Δ and sharpness α of every head.

    Fits ``p(k|q) ∝ exp(−α‖δ_qk − Δ‖²)`` (Cordonnier et al. 2020, Sec. 3, Eq. 9) to the observed
    attention through its sufficient statistics; see the module docstring for the estimator,
    constraints, flags and uncertainty.

    Args:
        phi_mean: ``(heads, 5)``, mean over images and patch queries of
            ``Σ_k A'[q,k] φ(δ_qk)``, ``φ = (δ_row, δ_col, δ_row², δ_col², δ_row δ_col)`` in
            patches (:attr:`LayerStats.phi_mean`).
        geometry: token geometry of the attention (the patch grid and pixels per token).
        phi_bootstrap: optional ``(R, heads, 5)`` bootstrap replicates of ``phi_mean`` over
            images (:attr:`LayerStats.phi_bootstrap`); each is refitted for the standard errors.
        mean_attn: optional ``(heads, P, P)`` image-mean renormalised attention
            (:attr:`LayerStats.mean_attn`) for the KL goodness of fit.
        anisotropic: also fit ``score = −½(δ−Δ)ᵀΣ⁻¹(δ−Δ)`` with a full 2x2 Σ (no bootstrap).
        layer: block index recorded in the result.
        se_method: ``"linearized"`` (default): the bootstrap covariance of ``phi_mean``
            propagated through the implicit-function derivative of the maximiser (delta
            method; one Hessian per head). ``"refit"``: the standard deviation of full refits
            of every replicate (slower, exact bootstrap).

    Returns:
        :class:`QuadraticFit`.

    Raises:
        ProbeError: on shapes that disagree with each other or with the geometry, non-finite
            statistics, a patch grid smaller than 2x2, or an unknown ``se_method``.
    """
    _check_geometry(geometry)
    if se_method not in ("linearized", "refit"):
        raise ProbeError(f"se_method must be 'linearized' or 'refit', got {se_method!r}")
    phi = _as_numpy(phi_mean, "phi_mean", ndim=2, last=5)
    H = phi.shape[0]
    prob = _IsoProblem(geometry)
    L = prob.L
    xs = np.zeros((H, 3))
    status = np.empty(H, dtype="<U16")
    loglik = np.zeros(H)
    for h in range(H):
        x, st, v = _fit_iso_one(prob, phi[h], _iso_start(phi[h], L))
        xs[h], status[h], loglik[h] = x, st, v
    alpha = xs[:, 2] / L**2
    b = xs[:, :2] / L
    with np.errstate(divide="ignore", invalid="ignore"):
        delta = np.where(alpha[:, None] > 0, b / (2.0 * alpha[:, None]), np.nan)
    status[status == "zero"] = "non_local"
    with np.errstate(divide="ignore"):
        r50 = np.sqrt(math.log(2.0) / alpha)
    wide = (status == "ok") & (r50 >= LOCAL_R50_FRACTION * L)
    status[wide] = "non_local"
    ll_gain = loglik + math.log(geometry.num_patches)

    kl_fit = np.full(H, np.nan)
    kl_unif = np.full(H, np.nan)
    if mean_attn is not None:
        a = _as_numpy(mean_attn, "mean_attn", ndim=3)
        P = geometry.num_patches
        if a.shape != (H, P, P):
            raise ProbeError(f"mean_attn must have shape ({H}, {P}, {P}), got {a.shape}")
        if np.any(a < 0):
            raise ProbeError("mean_attn has negative entries; pass attention probabilities")
        a = a / np.clip(a.sum(-1, keepdims=True), 1e-300, None)  # float32 sums drift by ~1e-7
        neg_ent = xlogy(a, a).sum(-1).mean(-1)  # (H,)
        kl_unif = np.clip(neg_ent + math.log(P), 0.0, None)
        log_p = model_log_attention(b, alpha, geometry)
        kl_fit = np.clip(neg_ent - (a * log_p).sum(-1).mean(-1), 0.0, None)

    delta_se = np.full((H, 2), np.nan)
    alpha_se = np.full(H, np.nan)
    n_boot = 0
    if phi_bootstrap is not None:
        boot = _as_numpy(phi_bootstrap, "phi_bootstrap", ndim=3, last=5)
        if boot.shape[1] != H:
            raise ProbeError(f"phi_bootstrap has {boot.shape[1]} heads but phi_mean has {H}")
        n_boot = boot.shape[0]
        if n_boot >= 2:
            if se_method == "linearized":
                delta_se, alpha_se = _se_linearized(prob, xs, status, boot)
            else:
                delta_se, alpha_se = _se_refit(prob, xs, status, boot)

    aniso = _fit_aniso(phi, geometry, xs) if anisotropic else {}
    return QuadraticFit(
        geometry=geometry, layer=layer, delta=delta, alpha=alpha, b=b, status=status,
        loglik=loglik, ll_gain=ll_gain, kl_fit=kl_fit, kl_uniform=kl_unif,
        delta_se=delta_se, alpha_se=alpha_se, n_bootstrap=n_boot, aniso=aniso,
    )


def fit_layer_stats(
    stats: LayerStats,
    *,
    bootstrap: bool = True,
    anisotropic: bool = False,
    se_method: str = "linearized",
) -> QuadraticFit:
    """Quadratic-encoding fit of one layer from its streaming statistics.

    The sufficient statistics are recomputed from ``stats.mean_attn`` in float64 as centred
    moments (:func:`centred_phi`) — the same numbers as ``stats.phi_mean`` (mean over images of the
    per-image features) by linearity, without the cancellation that the float32 per-query
    contraction of the streaming features suffers for a sharp head far from the query (a head at
    7 patches with α = 13 lost 2 % of α there). ``stats.mean_attn`` also gives the KL goodness of
    fit; when ``bootstrap`` and at least two images were accumulated, the Poisson-bootstrap
    replicates of ``phi`` with non-zero total weight give the standard errors. See
    :func:`fit_quadratic`.

    Raises:
        ProbeError: as :func:`fit_quadratic`.
    """
    boot = None
    if bootstrap and stats.n_images >= 2 and stats.boot_sum.shape[0] >= 2:
        keep = stats.boot_weight > 0
        boot = stats.phi_bootstrap[keep]
    phi = centred_phi(stats.mean_attn, stats.geometry)
    return fit_quadratic(phi, stats.geometry, phi_bootstrap=boot,
                         mean_attn=stats.mean_attn, anisotropic=anisotropic, layer=stats.layer,
                         se_method=se_method)


def centred_phi(mean_attn, geometry: TokenGeometry) -> np.ndarray:
    """Sufficient statistics ``phi = (E δ_row, E δ_col, E δ_row², E δ_col², E δ_row δ_col)`` per head,
    ``(heads, 5)`` float64, from the mean renormalised attention ``(heads, P, P)``, averaged over
    patch queries (as :attr:`LayerStats.phi_mean`).

    Computed as the mean offset, then the second moments about it, then shifted back to the origin
    in float64, so a sharp head far from the query keeps its variance (the information about α)
    instead of losing it in ``E δ² − (E δ)²`` of two large numbers; every query's row is first
    renormalised to sum to 1 in float64.
    """
    a = _as_numpy(mean_attn, "mean_attn", ndim=3)
    # rows renormalised in float64: a row summing to 1 + 1e-7 (float32 rounding) scales the moments
    # but not the log-partition term of the likelihood, which biases α of a sharp head by percents
    a = a / np.clip(a.sum(-1, keepdims=True), 1e-300, None)
    off = geometry.offsets().numpy().astype(np.float64)  # (P, P, 2): p_k - p_q
    P = a.shape[1]
    out = np.empty((a.shape[0], 5))
    for h in range(a.shape[0]):
        w = a[h] / P
        m = np.einsum("qk,qki->i", w, off)
        d = off - m
        out[h, 0:2] = m
        crr = np.einsum("qk,qk->", w, d[..., 0] * d[..., 0])
        ccc = np.einsum("qk,qk->", w, d[..., 1] * d[..., 1])
        crc = np.einsum("qk,qk->", w, d[..., 0] * d[..., 1])
        # E[d] is 0 only up to rounding, and the mass 1 only up to rounding: keep both terms exactly
        e0, e1 = np.einsum("qk,qki->i", w, d)
        mass = w.sum()
        out[h, 2] = crr + 2 * m[0] * e0 + m[0] ** 2 * mass
        out[h, 3] = ccc + 2 * m[1] * e1 + m[1] ** 2 * mass
        out[h, 4] = crc + m[0] * e1 + m[1] * e0 + m[0] * m[1] * mass
    return out


def fit_quadratic_attention(
    attn,
    geometry: TokenGeometry,
    *,
    layer: int = 0,
    n_bootstrap: int = 100,
    seed: int = 0,
    anisotropic: bool = False,
    se_method: str = "linearized",
) -> QuadraticFit:
    """Quadratic-encoding fit straight from attention probabilities.

    Args:
        attn: attention probabilities ``(batch, heads, tokens, tokens)`` with
            ``tokens = geometry.num_tokens`` (prefix tokens first), or an iterable of such
            batches (streamed through a :class:`LayerReducer`, memory independent of their
            number).
        geometry: token geometry of the attention.
        layer: block index recorded in the result.
        n_bootstrap: Poisson-bootstrap replicates over images for the standard errors.
        seed: seed of the bootstrap weights.
        anisotropic: also fit the full-covariance model.
        se_method: how the bootstrap becomes standard errors (see :func:`fit_quadratic`).

    Returns:
        :class:`QuadraticFit` (see :func:`fit_quadratic`).

    Raises:
        ProbeError: on attention whose shape does not match the geometry, or no batch.
    """
    reducer = LayerReducer(layer, geometry, n_bootstrap=n_bootstrap, seed=seed)
    batches: Iterable = [attn] if isinstance(attn, torch.Tensor) else attn
    for batch in batches:
        if not isinstance(batch, torch.Tensor):
            batch = torch.as_tensor(np.asarray(batch))
        reducer.update(batch)
    return fit_layer_stats(reducer.result(), bootstrap=n_bootstrap >= 2,
                           anisotropic=anisotropic, se_method=se_method)


def empirical_mass_radius(mean_attn, geometry: TokenGeometry, centre=None, mass: float = 0.9,
                          on_grid: bool = False) -> np.ndarray:
    """Model-free locality: the radius around a head's centre holding ``mass`` of its attention.

    With the offset profile ``π(δ)`` of :func:`offset_profile` (the distribution of the offset to
    the attended key for a uniformly drawn patch query), the radius is the smallest
    ``r = ‖δ − c‖`` over grid offsets such that ``Σ_{‖δ − c‖ ≤ r} π(δ) ≥ mass``. Unlike the
    Gaussian radii of :class:`QuadraticFit`, it does not assume the head's profile is Gaussian,
    so a peaked head with a long tail is measured by where its mass actually lies.

    Args:
        mean_attn: ``(heads, P, P)`` renormalised patch attention.
        geometry: token geometry.
        centre: ``(heads, 2)`` centres ``c`` in patches (e.g. the fitted Δ); NaN or None -> the
            query itself ``(0, 0)``.
        mass: fraction of the attention, in ``(0, 1)``.
        on_grid: measure each head over the queries whose target ``q + Δ`` lies on the grid
            (:func:`on_grid_queries`). Queries whose target falls off the grid pile their
            attention onto border keys, spreading the profile: a sharp head (α = 5) at 8 patches
            on a 16x16 grid measures 7 patches over all queries and its own width over these.

    Returns:
        float64 ``(heads,)`` radii in patches.

    Raises:
        ProbeError: unless ``0 < mass < 1``, or on mismatched shapes.
    """
    if not 0.0 < mass < 1.0:
        raise ProbeError(f"mass must lie in (0, 1), got {mass}")
    heads = _as_numpy(mean_attn, "mean_attn", ndim=3).shape[0]
    c = np.zeros((heads, 2)) if centre is None else np.asarray(centre, dtype=np.float64)
    if c.shape != (heads, 2):
        raise ProbeError(f"centre must have shape ({heads}, 2), got {c.shape}")
    mask = on_grid_queries(c, geometry) if on_grid and centre is not None else None
    prof = offset_profile(mean_attn, geometry, mask).numpy()
    rows, cols = geometry.grid
    dr, dc = np.meshgrid(np.arange(-(rows - 1), rows), np.arange(-(cols - 1), cols), indexing="ij")
    c = np.where(np.isfinite(c), c, 0.0)
    out = np.empty(heads)
    for h in range(heads):
        dist = np.hypot(dr - c[h, 0], dc - c[h, 1]).ravel()
        order = np.argsort(dist, kind="stable")
        cum = np.cumsum(prof[h].ravel()[order])
        idx = min(int(np.searchsorted(cum, mass * cum[-1] - 1e-12)), len(order) - 1)
        out[h] = dist[order][idx]
    return out


def max_disk_mass(mean_attn, geometry: TokenGeometry, radius: float) -> np.ndarray:
    """Upper bound, over every centre, of a head's attention mass within ``radius`` of it.

    With the offset profile ``π(δ)`` of :func:`offset_profile`, the mass of the closed disk of
    radius ``r`` around a real centre ``c`` is ``Σ_{‖δ − c‖ ≤ r} π(δ)``. Any such disk lies in the
    disk of radius ``r + √2/2`` around the integer offset ``g`` nearest to ``c``, so the maximum
    over integer ``g`` of the mass within ``r + √2/2`` bounds the mass around every ``c``
    (including centres beyond the grid). A head whose bound is below ``mass`` has
    :func:`empirical_mass_radius` ``> r`` for every centre: it cannot be local whatever its Δ.

    Args:
        mean_attn: ``(heads, P, P)`` renormalised patch attention.
        geometry: token geometry.
        radius: ``r`` in patches (``>= 0``).

    Returns:
        float64 ``(heads,)``: the bound, a fraction of each head's attention in ``[0, 1]``.

    Raises:
        ProbeError: for a negative radius or mismatched shapes.
    """
    from scipy.signal import convolve2d

    if not radius >= 0:
        raise ProbeError(f"radius must be >= 0 patches, got {radius}")
    prof = offset_profile(mean_attn, geometry).numpy()
    reach = radius + math.sqrt(0.5)
    n = int(math.floor(reach))
    u, v = np.meshgrid(np.arange(-n, n + 1), np.arange(-n, n + 1), indexing="ij")
    disk = ((u * u + v * v) <= reach * reach + 1e-9).astype(np.float64)
    return np.array([convolve2d(p, disk, mode="full").max() for p in prof])
