"""The optimised streaming reducer against a straightforward float64 reference.

The reference below is the definition written out with explicit loops over images, heads and patch
queries (Dosovitskiy et al. 2021 Fig. 7 for the mean attention distance; entropy in nats; the
quadratic-encoding statistics of Cordonnier et al. 2020 Eq. 9): no shared code with
:mod:`probe.analyses.reducers` beyond the geometry's positions.
"""

from __future__ import annotations

import math

import pytest
import torch

from probe.analyses.reducers import FEATURES, LayerReducer
from probe.geometry import TokenGeometry


def reference_features(attn: torch.Tensor, g: TokenGeometry) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image features ``(B, H, 9)`` (order of FEATURES) and sum over images of ``A'`` ``(H, P, P)``."""
    a = attn.double()
    b, h, t, _ = a.shape
    pre, cols = g.num_prefix_tokens, g.grid[1]
    py, px = g.pixels_per_token
    P = g.num_patches
    feats = torch.zeros(b, h, len(FEATURES), dtype=torch.float64)
    attn_sum = torch.zeros(h, P, P, dtype=torch.float64)
    for i in range(b):
        for j in range(h):
            acc = [0.0] * len(FEATURES)
            for q in range(P):
                row = a[i, j, pre + q]
                patch = row[pre:]
                a_prime = patch / patch.sum()
                attn_sum[j, q] += a_prime
                rq, cq = divmod(q, cols)
                ent = -sum(float(v) * math.log(float(v)) for v in row if v > 0)
                acc[2] += ent
                acc[3] += float(row[:pre].sum())
                for k in range(P):
                    w = float(a_prime[k])
                    rk, ck = divmod(k, cols)
                    dr, dc = rk - rq, ck - cq
                    acc[0] += w * math.hypot(dr, dc)
                    acc[1] += w * math.hypot(dr * py, dc * px)
                    acc[4] += w * dr
                    acc[5] += w * dc
                    acc[6] += w * dr * dr
                    acc[7] += w * dc * dc
                    acc[8] += w * dr * dc
            feats[i, j] = torch.tensor(acc) / P
    return feats, attn_sum


def random_attention(b: int, h: int, t: int, seed: int, zeros: bool = True) -> torch.Tensor:
    """Softmax rows of varied sharpness; some rows one-hot (exact zeros) when ``zeros``."""
    gen = torch.Generator().manual_seed(seed)
    temp = torch.rand(b, h, t, 1, generator=gen) * 6
    a = (torch.randn(b, h, t, t, generator=gen) * temp).softmax(-1)
    if zeros:
        a[0, 0, -1] = 0.0
        a[0, 0, -1, -1] = 1.0
        a[-1, -1, -2] = 0.0
        a[-1, -1, -2, 0] = 1.0  # all mass on the first token (a prefix token when there is one)
        if a.shape[-1] > 3:
            a[-1, -1, -2, 0] = 0.5
            a[-1, -1, -2, -1] = 0.5
    return a


GEOMETRIES = [
    TokenGeometry(1, (4, 4), (16.0, 16.0)),  # class token, square grid
    TokenGeometry(0, (3, 5), (8.0, 8.0)),  # no prefix token, non-square grid
    TokenGeometry(5, (4, 3), (14.0, 7.0)),  # class + 4 registers, anisotropic pixels
]


@pytest.mark.parametrize("g", GEOMETRIES, ids=lambda g: f"pre{g.num_prefix_tokens}-{g.grid[0]}x{g.grid[1]}")
def test_reducer_matches_reference_over_batches(g):
    batches = [random_attention(3, 2, g.num_tokens, seed=1), random_attention(2, 2, g.num_tokens, seed=2, zeros=False),
               random_attention(1, 2, g.num_tokens, seed=3)]
    red = LayerReducer(0, g, n_bootstrap=16, seed=5)
    for attn in batches:
        red.update(attn)
    st = red.result()
    per_image, attn_sum = zip(*(reference_features(x, g) for x in batches))
    f = torch.cat(per_image)  # (N, H, 9)
    assert st.n_images == f.shape[0]
    torch.testing.assert_close(st.attn_sum, sum(attn_sum), atol=1e-5, rtol=0)
    torch.testing.assert_close(st.feat_sum, f.sum(0), atol=2e-5, rtol=1e-6)
    torch.testing.assert_close(st.feat_sumsq, f.pow(2).sum(0), atol=1e-4, rtol=1e-6)
    for name in FEATURES:
        i = FEATURES.index(name)
        torch.testing.assert_close(st.feature(name), f[..., i].mean(0), atol=1e-5, rtol=1e-6)
        torch.testing.assert_close(st.feature_se(name), f[..., i].std(0) / math.sqrt(f.shape[0]),
                                   atol=1e-5, rtol=1e-4)
    # each bootstrap replicate is a weighted mean of the per-image features: inside their range
    reps = st.boot_sum / st.boot_weight.clamp_min(1e-12)[:, None, None]
    used = st.boot_weight > 0
    lo, hi = f.min(0).values, f.max(0).values
    assert used.any()
    assert (reps[used] >= lo - 1e-6).all() and (reps[used] <= hi + 1e-6).all()


def test_bootstrap_of_identical_images_is_exact():
    g = GEOMETRIES[0]
    one = random_attention(1, 3, g.num_tokens, seed=7)
    red = LayerReducer(2, g, n_bootstrap=32, seed=0)
    for _ in range(4):
        red.update(one.expand(3, -1, -1, -1).contiguous())
    st = red.result()
    f, _ = reference_features(one, g)
    used = st.boot_weight > 0
    reps = st.boot_sum[used] / st.boot_weight[used][:, None, None]
    torch.testing.assert_close(reps, f[0].expand_as(reps), atol=1e-5, rtol=1e-6)
    assert st.boot_weight.sum() > 0


def test_entropy_of_one_hot_and_uniform_rows():
    g = TokenGeometry(1, (3, 3), (16.0, 16.0))
    t = g.num_tokens
    one_hot = torch.zeros(1, 1, t, t)
    one_hot[..., torch.arange(t), (torch.arange(t) + 1) % t] = 1.0
    uniform = torch.full((1, 1, t, t), 1.0 / t)
    red = LayerReducer(0, g, n_bootstrap=0)
    red.update(torch.cat([one_hot, uniform]))
    st = red.result()
    f = st.feat_sum[0, FEATURES.index("entropy_nats")]
    assert torch.isfinite(st.feat_sum).all()
    assert f.item() == pytest.approx(0.0 + math.log(t), rel=1e-6)  # 0 nats + ln(T) nats


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes_equal_float32_of_the_same_values(dtype):
    g = GEOMETRIES[2]
    attn = random_attention(2, 2, g.num_tokens, seed=11, zeros=False).to(dtype)
    a, b = LayerReducer(0, g, n_bootstrap=4), LayerReducer(0, g, n_bootstrap=4)
    a.update(attn)
    b.update(attn.float())
    sa, sb = a.result(), b.result()
    for k in ("attn_sum", "feat_sum", "feat_sumsq", "boot_sum", "boot_weight"):
        torch.testing.assert_close(getattr(sa, k), getattr(sb, k), atol=0, rtol=0)


def test_one_hot_offset_is_exact_under_any_thread_count():
    """A one-hot head at offset (3, 4) has mean distance exactly 5 patches whatever BLAS does."""
    g = TokenGeometry(1, (14, 14), (16.0, 16.0))
    P = g.num_patches
    attn = torch.zeros(1, 1, P + 1, P + 1)
    attn[0, 0, 0, 0] = 1.0
    for q in range(P):
        r, c = divmod(q, 14)
        dr = 3 if r + 3 < 14 else -3
        dc = 4 if c + 4 < 14 else -4
        attn[0, 0, 1 + q, 1 + (r + dr) * 14 + (c + dc)] = 1.0
    old = torch.get_num_threads()
    try:
        for threads in (1, old):
            torch.set_num_threads(threads)
            red = LayerReducer(0, g, n_bootstrap=0)
            red.update(attn)
            assert red.result().feature("mean_distance_patches").item() == pytest.approx(5.0, rel=1e-7)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("chunk_images", [1, 2])
def test_chunked_reduction_equals_whole_batch(monkeypatch, chunk_images):
    import probe.analyses.reducers as reducers

    g = GEOMETRIES[2]
    attn = random_attention(5, 2, g.num_tokens, seed=13)
    whole = LayerReducer(1, g, n_bootstrap=8, seed=2)
    whole.update(attn)
    monkeypatch.setattr(reducers, "CHUNK_ELEMENTS", chunk_images * attn[0].numel())
    chunked = LayerReducer(1, g, n_bootstrap=8, seed=2)
    chunked.update(attn)
    a, b = whole.result(), chunked.result()
    for k in ("attn_sum", "feat_sum", "feat_sumsq", "boot_sum", "boot_weight"):
        torch.testing.assert_close(getattr(b, k), getattr(a, k), atol=1e-6, rtol=1e-6)  # float32 rounding
    ref, _ = reference_features(attn, g)
    torch.testing.assert_close(b.feat_sum, ref.sum(0), atol=2e-5, rtol=1e-6)


def _run(batches, g, **kw):
    red = LayerReducer(3, g, n_bootstrap=12, seed=4, **kw)
    for x in batches:
        red.update(x)
    return red.result()


@pytest.mark.parametrize("flush", [1, 2, 256])
def test_bootstrap_does_not_depend_on_the_batch_split(monkeypatch, flush):
    import probe.analyses.reducers as reducers

    monkeypatch.setattr(reducers, "FLUSH_IMAGES", flush)
    g = GEOMETRIES[0]
    attn = random_attention(6, 2, g.num_tokens, seed=21)
    whole = _run([attn], g)
    split = _run([attn[:1], attn[1:4], attn[4:]], g)
    for k in ("attn_sum", "feat_sum", "feat_sumsq", "boot_sum", "boot_weight"):
        torch.testing.assert_close(getattr(split, k), getattr(whole, k), atol=1e-6, rtol=1e-6)
    ref, _ = reference_features(attn, g)
    torch.testing.assert_close(split.feat_sum, ref.sum(0), atol=2e-5, rtol=1e-6)
    assert split.boot_weight.sum() > 0


def test_result_midway_then_more_batches():
    g = GEOMETRIES[1]
    x, y = random_attention(2, 2, g.num_tokens, seed=31), random_attention(3, 2, g.num_tokens, seed=32)
    red = LayerReducer(0, g, n_bootstrap=6, seed=1)
    red.update(x)
    first = red.result()
    red.update(y)
    both = red.result()
    ref_x, _ = reference_features(x, g)
    ref_y, _ = reference_features(y, g)
    assert first.n_images == 2 and both.n_images == 5
    torch.testing.assert_close(first.feat_sum, ref_x.sum(0), atol=2e-5, rtol=1e-6)
    torch.testing.assert_close(both.feat_sum, ref_x.sum(0) + ref_y.sum(0), atol=2e-5, rtol=1e-6)
    assert (both.boot_weight >= first.boot_weight).all()
