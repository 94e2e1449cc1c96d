"""Quadratic-encoding fit (Cordonnier et al. 2020, Eq. 9) against planted ground truth, explicit
math, the ConViT initialisation and an independent brute-force fit on real DeiT attention."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from scipy.special import logsumexp
from scipy.stats import chi2

from probe.analyses import quadratic as Q
from probe.analyses.reducers import LayerReducer
from probe.errors import ProbeError
from probe.geometry import TokenGeometry

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


# --------------------------------------------------------------------------------------------
# independent helpers (explicit positions, not TokenGeometry.offsets)


def _offsets(rows: int, cols: int) -> np.ndarray:
    idx = np.arange(rows * cols)
    r, c = idx // cols, idx % cols
    return np.stack([r[None, :] - r[:, None], c[None, :] - c[:, None]], axis=-1).astype(float)


def _planted(delta, alpha, rows, cols) -> np.ndarray:
    """(H, P, P) attention ∝ exp(−α‖δ − Δ‖²) over the keys of the grid, float64."""
    off = _offsets(rows, cols)
    out = []
    for (dr, dc), a in zip(np.asarray(delta, float), np.asarray(alpha, float)):
        s = -a * ((off[..., 0] - dr) ** 2 + (off[..., 1] - dc) ** 2)
        out.append(np.exp(s - logsumexp(s, axis=1, keepdims=True)))
    return np.stack(out)


def _phi(attn: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Sufficient statistics mean_q Σ_k A[q,k] φ(δ_qk), float64, (H, 5)."""
    off = _offsets(rows, cols)
    dr, dc = off[..., 0], off[..., 1]
    feats = np.stack([dr, dc, dr * dr, dc * dc, dr * dc], axis=-1)
    return np.einsum("hqk,qkf->hf", attn, feats) / attn.shape[1]


def _with_prefix(attn: np.ndarray, prefix_mass: float = 0.25) -> torch.Tensor:
    """(1, H, 1+P, 1+P) float32 attention with one class token taking ``prefix_mass``."""
    h, p, _ = attn.shape
    full = torch.zeros(1, h, p + 1, p + 1)
    full[0, :, 1:, 1:] = torch.from_numpy(attn).float() * (1 - prefix_mass)
    full[0, :, 1:, 0] = prefix_mass
    full[0, :, 0, :] = 1.0 / (p + 1)
    return full


def _brute_loglik(attn: np.ndarray, rows: int, cols: int, dr: float, dc: float, a: float) -> float:
    """Mean over images and patch queries of Σ_k A'[q,k] log p(k|q), one explicit loop per query.

    ``attn`` is (images, P, P) for one head.
    """
    total = 0.0
    kr, kc = np.divmod(np.arange(rows * cols), cols)
    for q in range(rows * cols):
        qr, qc = divmod(q, cols)
        s = -a * ((kr - qr - dr) ** 2 + (kc - qc - dc) ** 2)
        top = s.max()
        logp = s - top - math.log(np.exp(s - top).sum())
        total += float((attn[:, q, :] @ logp).sum())
    return total / (attn.shape[0] * rows * cols)


def _beyond(a: float) -> float:
    """How far beyond the last offset a planted centre sits: identifiable in float64 (the
    next key still gets e^(−5−α) of the weight)."""
    return min(2.5 / a, 10.0)


def _planted_heads(rows: int, cols: int, a: float) -> np.ndarray:
    c = _beyond(a)
    return np.array([
        [0.3, -1.2],                               # interior, off-lattice
        [1.0, 0.0],                                # on a lattice point
        [rows - 1 - 0.3, -(cols - 1) + 0.2],       # just inside a corner
        [rows - 1 + c, 0.4],                       # beyond the bottom border
        [-0.5, -(cols - 1) - c],                   # beyond the left border
    ])


GRIDS = [(14, 14), (9, 16), (6, 4)]
ALPHAS = [0.05, 0.3, 1.0, 5.0]


# --------------------------------------------------------------------------------------------
# the model


def test_quadratic_attention_matches_explicit_formula():
    g = TokenGeometry(0, (3, 4))
    delta, alpha = [[0.4, -1.3], [2.5, 3.0]], [0.7, 2.0]
    got = Q.quadratic_attention(delta, alpha, g).numpy()
    for h in range(2):
        for q in range(12):
            qr, qc = divmod(q, 4)
            w = [math.exp(-alpha[h] * ((k // 4 - qr - delta[h][0]) ** 2 + (k % 4 - qc - delta[h][1]) ** 2))
                 for k in range(12)]
            assert got[h, q] == pytest.approx([x / sum(w) for x in w], rel=1e-12)


def test_uniform_alpha_zero_gives_uniform_attention():
    g = TokenGeometry(1, (5, 7))
    got = Q.quadratic_attention([[3.0, -2.0]], [0.0], g)
    assert torch.allclose(got, torch.full((1, 35, 35), 1 / 35, dtype=torch.float64))


# --------------------------------------------------------------------------------------------
# planted ground truth


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("alpha", ALPHAS)
def test_planted_recovery_exact_statistics(grid, alpha):
    rows, cols = grid
    g = TokenGeometry(1, grid, (16.0, 8.0))
    delta = _planted_heads(rows, cols, alpha)
    alphas = np.full(len(delta), alpha)
    attn = _planted(delta, alphas, rows, cols)
    fit = Q.fit_quadratic(_phi(attn, rows, cols), g, mean_attn=attn)
    np.testing.assert_allclose(fit.delta, delta, atol=1e-3, rtol=0)
    np.testing.assert_allclose(fit.alpha, alphas, rtol=1e-3)
    # a planted model is fitted exactly: KL(data ‖ fit) vanishes, the gain equals KL from uniform
    assert np.all(fit.kl_fit < 1e-9)
    np.testing.assert_allclose(fit.ll_gain, fit.kl_uniform - fit.kl_fit, atol=1e-9)
    r50 = math.sqrt(math.log(2) / alpha)
    expected = "ok" if r50 < Q.LOCAL_R50_FRACTION * max(grid) else "non_local"
    assert list(fit.status) == [expected] * len(delta)


@pytest.mark.parametrize("grid", [(14, 14), (9, 16)])
def test_planted_recovery_through_reducer(grid):
    """Through LayerReducer (float32 attention, a class token, several images and batches).

    The reducer accumulates phi in float32 (relative error ~1e-6), which is below 1e-3 in Δ
    except for sharp heads whose centre lies at or beyond the border (there only a few queries
    carry information); those cases are covered with exact statistics above.
    """
    rows, cols = grid
    g = TokenGeometry(1, grid, (16.0, 16.0))
    deltas, alphas = [], []
    for a in ALPHAS:
        heads = _planted_heads(rows, cols, a)
        keep = heads if a == 0.05 else heads[:2]
        deltas.append(keep)
        alphas += [a] * len(keep)
    delta, alphas = np.concatenate(deltas), np.array(alphas)
    full = _with_prefix(_planted(delta, alphas, rows, cols)).expand(4, -1, -1, -1)
    fit = Q.fit_quadratic_attention(torch.split(full, 2), g, n_bootstrap=0)
    np.testing.assert_allclose(fit.delta, delta, atol=1e-3, rtol=0)
    np.testing.assert_allclose(fit.alpha, alphas, rtol=1e-3)
    assert np.all(fit.status == "ok")


# --------------------------------------------------------------------------------------------
# the likelihood


def test_separable_loglik_matches_pairwise_bruteforce_and_finite_differences():
    rows, cols = 5, 7
    g = TokenGeometry(0, (rows, cols))
    attn = _planted([[0.7, -2.1]], [0.4], rows, cols)
    phi = _phi(attn, rows, cols)[0]
    iso, pair = Q._IsoProblem(g), Q._AnisoProblem(g)
    L = iso.L
    rng = np.random.default_rng(1)
    for _ in range(3):
        x = rng.normal(size=3) * np.array([3.0, 3.0, 10.0])  # scaled (b_r L, b_c L, α L²)
        v, gr, h = iso.evaluate(x, iso.stats(phi))
        # the same model in the 5 natural parameters of the pairwise implementation
        m = np.array([[1, 0, 0], [0, 1, 0], [0, 0, -1], [0, 0, -1], [0, 0, 0]], float)
        v5, g5, h5 = pair.evaluate(m @ x, pair.stats(phi))
        assert v == pytest.approx(v5, abs=1e-12)
        np.testing.assert_allclose(gr, m.T @ g5, atol=1e-12)
        np.testing.assert_allclose(h, m.T @ h5 @ m, atol=1e-12)
        # against the explicit per-query log-likelihood of the planted attention
        b, a = x[:2] / L, x[2] / L**2
        if a > 0:
            ll = _brute_loglik(attn, rows, cols, b[0] / (2 * a), b[1] / (2 * a), a)
            assert v == pytest.approx(ll, abs=1e-10)
        # central differences of value and gradient
        eps = 1e-6
        for i in range(3):
            e = np.zeros(3)
            e[i] = eps
            vp, gp, _ = iso.evaluate(x + e, iso.stats(phi))
            vm, gm, _ = iso.evaluate(x - e, iso.stats(phi))
            assert gr[i] == pytest.approx((vp - vm) / (2 * eps), abs=1e-6)
            np.testing.assert_allclose(h[:, i], (gp - gm) / (2 * eps), atol=1e-6)


def test_hessian_is_negative_definite_so_loglik_is_concave():
    g = TokenGeometry(0, (6, 9))
    iso = Q._IsoProblem(g)
    for x in ([0.0, 0.0, 0.0], [5.0, -3.0, 40.0], [-20.0, 1.0, -5.0]):
        _, _, h = iso.evaluate(np.array(x), np.zeros(3))
        assert np.linalg.eigvalsh(h).max() < 0


# --------------------------------------------------------------------------------------------
# boundary cases and flags


def test_uniform_head_is_non_local_not_a_failure():
    rows, cols = 14, 14
    g = TokenGeometry(1, (rows, cols), (16, 16))
    uniform = np.full((1, rows * cols, rows * cols), 1.0 / (rows * cols))
    exact = Q.fit_quadratic(_phi(uniform, rows, cols), g, mean_attn=uniform)
    assert exact.alpha[0] == 0.0 and exact.status[0] == "non_local"
    assert np.all(np.isnan(exact.delta[0])) and np.isinf(exact.sigma_patches[0])
    assert exact.ll_gain[0] == pytest.approx(0.0, abs=1e-12)
    frame = Q.fit_quadratic_attention(_with_prefix(uniform), g).to_frame()
    assert frame.loc[0, "alpha"] < 1e-5
    assert frame.loc[0, "quad_status"] == "non_local"
    assert bool(frame.loc[0, "quad_converged"]) and not bool(frame.loc[0, "quad_local"])


def test_anti_local_head_lands_on_alpha_zero_face():
    """Attention that grows with distance asks for α < 0; the constrained optimum is α = 0."""
    rows, cols = 8, 8
    g = TokenGeometry(0, (rows, cols))
    d2 = (_offsets(rows, cols) ** 2).sum(-1)
    attn = np.exp(0.2 * d2)
    attn = (attn / attn.sum(1, keepdims=True))[None]
    fit = Q.fit_quadratic(_phi(attn, rows, cols), g)
    assert fit.alpha[0] == 0.0 and fit.status[0] == "non_local"
    # no feasible (Δ, α ≥ 0) does better, by the explicit likelihood
    best = fit.loglik[0]
    for a in (1e-3, 1e-2, 0.1):
        for dr, dc in ((0, 0), (3.5, 3.5), (-3.5, 3.5), (10, -10)):
            assert _brute_loglik(attn, rows, cols, dr, dc, a) <= best + 1e-12


def test_one_hot_head_is_capped_and_flagged():
    rows, cols = 10, 12
    g = TokenGeometry(0, (rows, cols))
    sharp = _planted([[0.0, 1.0]], [300.0], rows, cols)
    one_hot = (sharp == sharp.max(-1, keepdims=True)).astype(float)
    fit = Q.fit_quadratic(_phi(one_hot, rows, cols), g, mean_attn=one_hot)
    assert fit.status[0] == "alpha_capped" and fit.alpha[0] == Q.ALPHA_MAX
    assert np.abs(fit.delta[0] - [0.0, 1.0]).max() < 1e-2
    assert fit.local[0]
    model = Q.quadratic_attention(fit.delta, fit.alpha, g).numpy()
    assert np.array_equal(model[0].argmax(-1), one_hot[0].argmax(-1))


def test_non_converged_fit_is_flagged_not_dropped(monkeypatch):
    rows, cols = 14, 14
    g = TokenGeometry(0, (rows, cols))
    delta = np.array([[0.3, -1.2], [rows + 3.0, 0.0], [2.0, 2.0]])
    attn = _planted(delta, [1.0, 0.5, 3.0], rows, cols)
    monkeypatch.setattr(Q, "_MAXITER", 1)
    frame = Q.fit_quadratic(_phi(attn, rows, cols), g).to_frame()
    assert len(frame) == 3
    assert (~frame["quad_converged"]).any()
    bad = frame[~frame["quad_converged"]]
    assert set(bad["quad_status"]) == {"not_converged"}
    # the best point visited is reported (Δ is undefined only where it sits at α = 0)
    assert np.isfinite(bad["alpha"]).all()
    pos = bad[bad["alpha"] > 0]
    assert np.isfinite(pos[["delta_row", "delta_col"]].to_numpy()).all()


# --------------------------------------------------------------------------------------------
# uncertainty


def _varied_stats(n_images: int, seed: int = 0, n_bootstrap: int = 100):
    rows, cols = 12, 12
    g = TokenGeometry(0, (rows, cols), (16, 16))
    rng = np.random.default_rng(seed)
    base_d = np.array([[0.4, -1.1], [2.0, 2.5]])
    base_a = np.array([0.6, 1.5])
    red = LayerReducer(0, g, n_bootstrap=n_bootstrap, seed=seed)
    images = []
    for _ in range(n_images):
        d = base_d + rng.normal(0, 0.3, base_d.shape)
        a = base_a * np.exp(rng.normal(0, 0.25, 2))
        images.append(_planted(d, a, rows, cols))
    red.update(torch.from_numpy(np.stack(images)).float())
    return red.result()


def test_linearized_standard_errors_match_bootstrap_refits():
    stats = _varied_stats(24)
    lin = Q.fit_layer_stats(stats)
    ref = Q.fit_layer_stats(stats, se_method="refit")
    np.testing.assert_allclose(lin.delta, ref.delta)
    assert np.all(lin.delta_se > 0) and np.all(lin.alpha_se > 0)
    np.testing.assert_allclose(lin.delta_se, ref.delta_se, rtol=0.15)
    np.testing.assert_allclose(lin.alpha_se, ref.alpha_se, rtol=0.15)


def test_standard_errors_match_spread_over_independent_datasets():
    """Calibration: the SE of one dataset predicts the spread of Δ, α over independent ones."""
    fits = [Q.fit_layer_stats(_varied_stats(16, seed=s)) for s in range(1, 21)]
    delta = np.stack([f.delta for f in fits])  # (datasets, heads, 2)
    alpha = np.stack([f.alpha for f in fits])
    np.testing.assert_allclose(np.stack([f.delta_se for f in fits]).mean(0), delta.std(0, ddof=1), rtol=0.4)
    np.testing.assert_allclose(np.stack([f.alpha_se for f in fits]).mean(0), alpha.std(0, ddof=1), rtol=0.4)


def test_standard_errors_are_nan_without_replicates():
    stats = _varied_stats(1)
    fit = Q.fit_layer_stats(stats)
    assert fit.n_bootstrap == 0
    assert np.isnan(fit.delta_se).all() and np.isnan(fit.alpha_se).all()
    fit = Q.fit_quadratic(stats.phi_mean, stats.geometry)
    assert np.isnan(fit.alpha_se).all()


# --------------------------------------------------------------------------------------------
# anisotropic model


def test_anisotropic_recovery_of_full_covariance():
    rows, cols = 11, 13
    g = TokenGeometry(0, (rows, cols))
    off = _offsets(rows, cols)
    cases = [  # (Δ, Σ in patches²)
        (np.array([0.6, -1.4]), np.array([[0.8, 0.35], [0.35, 2.0]])),
        (np.array([-2.0, 3.3]), np.array([[3.0, -1.0], [-1.0, 1.2]])),
    ]
    attn = []
    for d, sig in cases:
        lam = np.linalg.inv(sig)
        e = off - d
        s = -0.5 * np.einsum("qki,ij,qkj->qk", e, lam, e)
        attn.append(np.exp(s - logsumexp(s, axis=1, keepdims=True)))
    attn = np.stack(attn)
    fit = Q.fit_quadratic(_phi(attn, rows, cols), g, anisotropic=True)
    frame = fit.to_frame()
    for h, (d, sig) in enumerate(cases):
        assert frame.loc[h, "aniso_status"] == "ok"
        assert frame.loc[h, ["aniso_delta_row", "aniso_delta_col"]].to_numpy(float) == pytest.approx(d, abs=1e-3)
        got = frame.loc[h, ["aniso_sigma_rr", "aniso_sigma_rc", "aniso_sigma_cc"]].to_numpy(float)
        assert got == pytest.approx([sig[0, 0], sig[0, 1], sig[1, 1]], rel=1e-3, abs=1e-4)
    # the anisotropic model nests the isotropic one
    assert np.all(fit.aniso["ll_gain"] >= fit.ll_gain - 1e-9)


def test_anisotropic_fit_of_isotropic_head_is_isotropic():
    rows, cols = 9, 9
    g = TokenGeometry(0, (rows, cols))
    attn = _planted([[1.3, -0.6]], [0.8], rows, cols)
    fit = Q.fit_quadratic(_phi(attn, rows, cols), g, anisotropic=True)
    sig = fit.aniso["sigma"][0]
    np.testing.assert_allclose(sig, np.eye(2) / (2 * 0.8), atol=1e-5)
    np.testing.assert_allclose(fit.aniso["delta"][0], [1.3, -0.6], atol=1e-5)


# --------------------------------------------------------------------------------------------
# offset profile, radii, frame


def test_offset_profile_of_uniform_attention_is_overlap_count():
    rows, cols = 4, 6
    g = TokenGeometry(0, (rows, cols))
    p = rows * cols
    prof = Q.offset_profile(torch.full((2, p, p), 1.0 / p, dtype=torch.float64), g).numpy()
    assert prof.shape == (2, 2 * rows - 1, 2 * cols - 1)
    for i in range(2 * rows - 1):
        for j in range(2 * cols - 1):
            dr, dc = i - (rows - 1), j - (cols - 1)
            assert prof[0, i, j] == pytest.approx((rows - abs(dr)) * (cols - abs(dc)) / p**2, rel=1e-12)
    assert prof.sum((1, 2)) == pytest.approx([1.0, 1.0])


def test_offset_profile_of_sharp_head_peaks_at_delta():
    g = TokenGeometry(0, (7, 7))
    attn = Q.quadratic_attention([[2.0, -1.0]], [8.0], g)
    prof = Q.offset_profile(attn, g).numpy()[0]
    i, j = np.unravel_index(prof.argmax(), prof.shape)
    assert (i - 6, j - 6) == (2, -1)


def test_mass_radius_is_chi2_quantile():
    g = TokenGeometry(0, (14, 14))
    attn = _planted([[0.0, 0.0], [1.0, 1.0]], [0.3, 2.0], 14, 14)
    fit = Q.fit_quadratic(_phi(attn, 14, 14), g)
    for m in (0.5, 0.9):
        r = fit.mass_radius(m)
        # ‖δ − Δ‖²/σ² ~ χ²(2) for the continuous isotropic Gaussian
        np.testing.assert_allclose(chi2(2).cdf((r / fit.sigma_patches) ** 2), m, rtol=1e-12)
    np.testing.assert_allclose(fit.sigma_patches, 1 / np.sqrt(2 * np.array([0.3, 2.0])), rtol=1e-3)
    with pytest.raises(ProbeError, match="mass"):
        fit.mass_radius(1.0)


def test_frame_columns_and_pixel_units():
    g = TokenGeometry(1, (6, 8), (16.0, 8.0))
    attn = _planted([[1.0, -2.0]], [0.7], 6, 8)
    fit = Q.fit_quadratic_attention(_with_prefix(attn).expand(3, -1, -1, -1), g, layer=5,
                                    n_bootstrap=20)
    frame = fit.to_frame()
    assert list(frame.columns) == [
        "layer", "head", "delta_row", "delta_col", "delta_row_px", "delta_col_px", "alpha",
        "sigma_patches", "r50_patches", "r90_patches", "b_row", "b_col", "quad_loglik_nats",
        "quad_ll_gain_nats", "quad_kl_fit_nats", "quad_kl_explained", "delta_row_se",
        "delta_col_se", "delta_row_px_se", "delta_col_px_se", "alpha_se", "quad_local",
        "quad_converged", "quad_status",
    ]
    row = frame.iloc[0]
    assert row["layer"] == 5 and row["head"] == 0
    assert row["delta_row_px"] == pytest.approx(row["delta_row"] * 16.0)
    assert row["delta_col_px"] == pytest.approx(row["delta_col"] * 8.0)
    assert row["b_row"] == pytest.approx(2 * row["alpha"] * row["delta_row"])
    assert row["quad_kl_explained"] == pytest.approx(1.0, abs=1e-6)


# --------------------------------------------------------------------------------------------
# bad input


def test_bad_input_raises_probe_error():
    g = TokenGeometry(0, (4, 4))
    with pytest.raises(ProbeError, match="last dimension 5"):
        Q.fit_quadratic(np.zeros((2, 4)), g)
    with pytest.raises(ProbeError, match="NaN"):
        Q.fit_quadratic(np.full((1, 5), np.nan), g)
    with pytest.raises(ProbeError, match="at least 2x2"):
        Q.fit_quadratic(np.zeros((1, 5)), TokenGeometry(0, (1, 9)))
    with pytest.raises(ProbeError, match="mean_attn must have shape"):
        Q.fit_quadratic(np.zeros((1, 5)), g, mean_attn=np.full((1, 15, 15), 1 / 15))
    with pytest.raises(ProbeError, match="phi_bootstrap has 3 heads"):
        Q.fit_quadratic(np.zeros((1, 5)), g, phi_bootstrap=np.zeros((4, 3, 5)))
    with pytest.raises(ProbeError, match="se_method"):
        Q.fit_quadratic(np.zeros((1, 5)), g, se_method="jackknife")
    with pytest.raises(ProbeError, match="alpha must be >= 0"):
        Q.quadratic_attention([[0.0, 0.0]], [-1.0], g)
    with pytest.raises(ProbeError, match="TokenGeometry"):
        Q.fit_quadratic(np.zeros((1, 5)), (4, 4))
    with pytest.raises(ProbeError, match="tokens"):
        Q.fit_quadratic_attention(torch.full((1, 2, 17, 17), 1 / 17), g)


# --------------------------------------------------------------------------------------------
# ConViT: gated positional self-attention is initialised as an exact quadratic encoding


def _convit_truth(gpsa) -> tuple[np.ndarray, np.ndarray]:
    """Δ, α written in a GPSA's pos_proj by timm's ``local_init``.

    ``rel_indices[..., 0]`` is the column offset, ``[..., 1]`` the row offset, ``[..., 2]``
    ``‖δ‖²`` (timm ``GPSA.get_rel_indices``); the score ``w·r + bias`` is
    ``−α‖δ‖² + 2αΔ·δ`` up to a constant, so ``α = −w[:, 2]``, ``Δ = (w[:, 1], w[:, 0]) / 2α``.
    """
    w = gpsa.pos_proj.weight.detach().double().numpy()
    alpha = -w[:, 2]
    return np.stack([w[:, 1], w[:, 0]], axis=1) / (2 * alpha[:, None]), alpha


@pytest.mark.parametrize("name,strength", [("convit_tiny", 1.0), ("convit_tiny", 0.25),
                                           ("convit_small", 1.0)])
def test_convit_positional_attention_recovers_init(name, strength):
    timm = pytest.importorskip("timm")
    model = timm.create_model(name, pretrained=False, locality_strength=strength).eval()
    gpsa_blocks = [b.attn for b in model.blocks if hasattr(b.attn, "pos_proj")]
    assert len(gpsa_blocks) == model.local_up_to_layer
    g = TokenGeometry(0, (14, 14), (16, 16))  # GPSA layers see patch tokens only
    for layer, gpsa in enumerate(gpsa_blocks[:2]):
        with torch.no_grad():
            rel = gpsa.get_rel_indices(g.num_patches)
            pos = gpsa.pos_proj(rel).permute(0, 3, 1, 2).softmax(-1)  # (1, H, P, P)
        delta, alpha = _convit_truth(gpsa)
        fit = Q.fit_quadratic_attention(pos, g, layer=layer, n_bootstrap=0)
        np.testing.assert_allclose(fit.delta, delta, atol=1e-4)
        np.testing.assert_allclose(fit.alpha, alpha, rtol=1e-4)
        assert np.allclose(alpha, strength) and set(np.abs(delta).ravel()) <= {0.0, 0.5, 1.0}
        assert np.all(fit.status == "ok")


def test_convit_captured_attention_with_open_gate_recovers_init():
    """End to end: hook the attention of a ConViT whose gates pass only positional attention."""
    timm = pytest.importorskip("timm")
    model = timm.create_model("convit_tiny", pretrained=False).eval()
    g = TokenGeometry(0, (14, 14), (16, 16))
    reducers, hooks = {}, []
    for i, blk in enumerate(model.blocks[:2]):
        blk.attn.gating_param.data.fill_(50.0)  # sigmoid(50) == 1 in float32
        reducers[i] = LayerReducer(i, g, n_bootstrap=0)
        hooks.append(blk.attn.attn_drop.register_forward_hook(
            lambda mod, inp, out, i=i: reducers[i].update(out)))
    with torch.no_grad():
        model(torch.randn(2, 3, 224, 224))
    for h in hooks:
        h.remove()
    for i in reducers:
        fit = Q.fit_layer_stats(reducers[i].result())
        delta, alpha = _convit_truth(model.blocks[i].attn)
        np.testing.assert_allclose(fit.delta, delta, atol=1e-4)
        np.testing.assert_allclose(fit.alpha, alpha, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# real input: DeiT-Tiny on ImageNet photos


def _deit_attention(photos, layers):
    timm = pytest.importorskip("timm")
    from PIL import Image
    from safetensors.torch import load_file

    weights = SHARED / "weights" / "deit_tiny_patch16_224.safetensors"
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    model.load_state_dict(load_file(weights), strict=True)
    model.eval()
    cfg = timm.data.resolve_data_config({}, model=model)
    tf = timm.data.create_transform(**cfg)
    x = torch.stack([tf(Image.open(p).convert("RGB")) for p in photos])
    captured, hooks = {}, []
    for i in layers:
        attn = model.blocks[i].attn
        attn.fused_attn = False
        hooks.append(attn.attn_drop.register_forward_hook(
            lambda mod, inp, out, i=i: captured.setdefault(i, out.detach().clone())))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return captured


@pytest.mark.slow
def test_deit_tiny_all_heads_and_bruteforce_agreement():
    photos_dir = SHARED / "imagenet-sample"
    if not (SHARED / "weights" / "deit_tiny_patch16_224.safetensors").exists() or not photos_dir.exists():
        pytest.skip(f"{SHARED} is absent (../shared data is only beside the project in CI and dev checkouts)")
    photos = sorted(photos_dir.glob("*.JPEG"))
    g = TokenGeometry(1, (14, 14), (16, 16))
    torch.manual_seed(0)
    attn = _deit_attention(photos[:8], range(12))
    frames = [Q.fit_quadratic_attention(attn[i], g, layer=i, n_bootstrap=50).to_frame() for i in range(12)]
    import pandas as pd

    heads = pd.concat(frames, ignore_index=True)
    assert len(heads) == 36
    assert set(heads["quad_status"]) <= set(Q.STATUS)
    assert np.isfinite(heads["alpha"]).all() and heads["alpha"].between(0, Q.ALPHA_MAX).all()
    assert heads["quad_ll_gain_nats"].ge(-1e-9).all()  # never worse than uniform (α = 0 is feasible)
    local = heads[heads["quad_status"] == "ok"]
    assert np.isfinite(local[["delta_row", "delta_col", "delta_row_se", "alpha_se"]].to_numpy()).all()
    # early layers hold local heads (Cordonnier et al. 2020; Dosovitskiy et al. 2021, Fig. 7)
    assert (heads[heads["layer"] < 4]["r50_patches"] < 3).any()

    # independent brute force on other photos for the most local head
    best = heads.loc[heads["quad_ll_gain_nats"].idxmax()]
    layer, head = int(best["layer"]), int(best["head"])
    other = _deit_attention(photos[8:10], [layer])[layer]
    fit = Q.fit_quadratic_attention(other, g, layer=layer, n_bootstrap=0)
    a = other[:, head, 1:, 1:].double().numpy()
    a = a / a.sum(-1, keepdims=True)

    def neg_ll(p):
        return -_brute_loglik(a, 14, 14, p[0], p[1], math.exp(p[2]))

    res = minimize(neg_ll, [0.0, 0.0, math.log(0.5)], method="Nelder-Mead",
                   options={"xatol": 1e-7, "fatol": 1e-12, "maxiter": 2000})
    assert res.success
    assert fit.status[head] == "ok"
    np.testing.assert_allclose(fit.delta[head], res.x[:2], atol=1e-3)
    assert fit.alpha[head] == pytest.approx(math.exp(res.x[2]), rel=1e-3)
    assert fit.loglik[head] == pytest.approx(-res.fun, abs=1e-5)  # float32 sums in the reducer
