"""The benchmark's naive baseline computes the same statistics as probe's reducer, and the
harness's ratio arithmetic is right (bench/run.py, bench/variants.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from probe.analyses.reducers import FEATURES, LayerReducer
from probe.geometry import TokenGeometry

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("g", [TokenGeometry(1, (4, 4), (16.0, 16.0)), TokenGeometry(0, (3, 5), (8.0, 8.0))],
                         ids=["cls-4x4", "none-3x5"])
def test_naive_baseline_computes_what_the_reducer_computes(g):
    variants = _load("variants")
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(n, 2, g.num_tokens, g.num_tokens, generator=gen) * 3).softmax(-1) for n in (3, 2)]
    red = LayerReducer(0, g, n_bootstrap=0)
    for b in batches:
        red.update(b)
    st = red.result()
    naive = variants.naive_metrics({"layer": [b.numpy() for b in batches]}, g.num_prefix_tokens, g.grid,
                                   g.pixels_per_token[0])["layer"]
    for i, name in enumerate(FEATURES):
        np.testing.assert_allclose(naive["mean"][:, i], st.feature(name).numpy(), rtol=1e-5, atol=1e-6,
                                   err_msg=name)
        np.testing.assert_allclose(naive["se"][:, i], st.feature_se(name).numpy(), rtol=1e-3, atol=1e-6,
                                   err_msg=name)
    np.testing.assert_allclose(naive["mean_attn"], st.mean_attn.numpy(), atol=1e-6)
    assert naive["boot"].shape == (100, 2, len(FEATURES))


def test_ratios_fixed_cost_and_break_even():
    run = _load("run")
    rows = [
        {"model": "m", "batch_size": 8, "variant": v, "num_images": 100, "median_s": t, "images_per_s": 100 / t}
        for v, t in (("a", 1.0), ("b", 2.0), ("s", 2.2), ("c", 4.2), ("d", 8.0))
    ]
    (r,) = run.ratios(rows)
    assert r["c/b"] == pytest.approx(2.0 / 4.2, abs=1e-3)
    assert r["c/d"] == pytest.approx(8.0 / 4.2, abs=1e-3)
    assert r["s/b"] == pytest.approx(2.0 / 2.2, abs=1e-3)
    assert r["fixed_s"] == pytest.approx(2.0)
    # c/b(n) = n*0.02 / (2 + n*0.022) reaches 0.8 at n = 2 / (0.02/0.8 - 0.022) = 666.7
    assert r["break_even_images"] == 667
    assert r["c_over_b_at_n"]["1024"] == pytest.approx(1024 * 0.02 / (2 + 1024 * 0.022), abs=1e-3)


def test_best_ratios_use_the_fastest_repeat():
    run = _load("run")
    rows = [
        {"model": "m", "batch_size": 8, "variant": v, "num_images": 100, "min_s": t, "median_s": 2 * t}
        for v, t in (("a", 1.0), ("b", 2.0), ("s", 2.5), ("c", 4.0), ("d", 8.0))
    ]
    (r,) = run.best_ratios(rows)
    assert r["c/a"] == pytest.approx(0.25) and r["c/b"] == pytest.approx(0.5)
    assert r["c/d"] == pytest.approx(2.0) and r["s/b"] == pytest.approx(0.8) and r["s/d"] == pytest.approx(3.2)


def test_memory_summary_and_flatness_target():
    run = _load("run")
    rows = [{"model": "m", "variant": v, "num_images": n, "peak_rss_mb": mb, "images_per_s": 1.0}
            for v, n, mb in (("c", 64, 1000.0), ("c", 1024, 1050.0), ("d", 64, 1000.0), ("d", 1024, 8000.0))]
    mem = run.memory_summary(rows)
    by = {m["variant"]: m for m in mem}
    assert by["c"]["growth"] == pytest.approx(0.05) and by["d"]["mb_per_image"] == pytest.approx(7000 / 960, abs=1e-3)
    checks = run.check_targets([], mem, [], "cpu")
    assert [c["pass"] for c in checks] == [True]
    rows[1]["peak_rss_mb"] = 1200.0
    assert [c["pass"] for c in run.check_targets([], run.memory_summary(rows), [], "cpu")] == [False]
