"""probe's attention-only model (Cordonnier et al. 2020): its attention against explicit math,
the fits against the model's own Δ and α (planted ground truth, also on the shipped trained
checkpoint), the tracker against a separate analysis, the recipe's resume, the embedded default."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import probe
from probe.capture import AttentionCapture, find_attention_layers
from probe.cordonnier import WEIGHTS
from probe.cordonnier.model import CordonnierViT, QuadraticAttention
import probe.track
from probe.track import Tracker


def explicit_quadratic(delta: np.ndarray, alpha: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """p_h(k|q) = exp(-α_h ||(p_k - p_q) - Δ_h||²) / Σ_k' (...), by a loop over queries: (H, T, T)."""
    pos = np.array([(r, c) for r in range(rows) for c in range(cols)], dtype=np.float64)
    out = np.zeros((len(alpha), len(pos), len(pos)))
    for h in range(len(alpha)):
        for q in range(len(pos)):
            d = pos - pos[q] - delta[h]
            logit = -alpha[h] * (d ** 2).sum(1)
            e = np.exp(logit - logit.max())
            out[h, q] = e / e.sum()
    return out


def captured(model, x):
    """Attention probabilities of every layer, ``{layer: (B, H, T, T)}``, through probe's capture."""
    layers = find_attention_layers(model, tuple(x.shape[1:]))
    got = {}
    cap = AttentionCapture(layers, lambda i, a: got.__setitem__(i, a.detach().clone()))
    with cap, torch.no_grad():
        cap.forward(model, x)
    return got


def planted(grid_side=8, heads=9, seed=0, attention="quadratic", reach=None):
    torch.manual_seed(seed)
    m = CordonnierViT(dim=18, depth=2, num_heads=heads, mlp_dim=18, attention=attention,
                      img_size=2 * grid_side).eval()
    rng = np.random.default_rng(seed)
    for blk in m.blocks:
        a = blk.attn
        if isinstance(a, QuadraticAttention):
            with torch.no_grad():
                # centres inside and beyond the border (grid side 8: up to ±9 patches), α 0.05-5
                r = grid_side + 1 if reach is None else reach
                a.centers.copy_(torch.from_numpy(rng.uniform(-r, r, (heads, 2))))
                a.alpha_raw.copy_(torch.from_numpy(np.exp(rng.uniform(math.log(0.05), math.log(5), heads))))
    return m


def test_factorised_attention_equals_explicit_softmax():
    m = planted()
    a = m.blocks[0].attn
    full = a.full_probs().detach().double().numpy()
    ref = explicit_quadratic(a.delta.double().numpy(), a.alpha.double().numpy(), *a.grid)
    assert np.abs(full - ref).max() < 1e-5
    # the fast path (row x column factors) gives the same outputs as the materialised matrix
    x = torch.randn(3, 64, 18)  # (B, T = 8x8, dim)
    fast = a(x).detach()
    a.materialize = True
    slow = a(x).detach()
    a.materialize = False
    assert torch.allclose(fast, slow, atol=1e-5)


@pytest.mark.parametrize("attention", ["quadratic", "generalized", "relative"])
def test_capture_matches_explicit_math(attention):
    m = planted(attention=attention)
    x = torch.randn(2, 3, 16, 16)
    got = captured(m, x)
    assert sorted(got) == [0, 1]
    inputs = {}
    hooks = [blk.attn.register_forward_hook(lambda mod, i, o, k=k: inputs.__setitem__(k, i[0]))
             for k, blk in enumerate(m.blocks)]
    with torch.no_grad():
        m(x)
    for h in hooks:
        h.remove()
    for k, blk in enumerate(m.blocks):
        a = blk.attn
        rows, cols = a.grid
        pos = torch.tensor([(r, c) for r in range(rows) for c in range(cols)], dtype=torch.float64)
        off = pos[None, :, :] - pos[:, None, :]  # (T, T, 2): p_k - p_q
        if attention == "quadratic":
            ref = explicit_quadratic(a.delta.double().numpy(), a.alpha.double().numpy(), rows, cols)
            ref = np.broadcast_to(ref, got[k].shape)
        elif attention == "generalized":
            e = off[None] - a.centers.detach().double()[:, None, None, :]
            prec = a.precision().detach().double()
            logit = -torch.einsum("hqki,hij,hqkj->hqk", e, prec, e)
            ref = np.broadcast_to(logit.softmax(-1).numpy(), got[k].shape)
        else:
            xin = inputs[k].detach().double()
            w, b = a.qkv.weight.detach().double(), a.qkv.bias.detach().double()
            qkv = xin @ w.T + b
            d, H = a.head_dim, a.num_heads
            q = qkv[..., :a.dim].unflatten(-1, (H, d)).transpose(1, 2)
            kk = qkv[..., a.dim:2 * a.dim].unflatten(-1, (H, d)).transpose(1, 2)
            T = rows * cols
            ref = np.zeros(got[k].shape)
            for h in range(H):
                for qi in range(T):
                    dr, dc = off[qi, :, 0].long() + rows - 1, off[qi, :, 1].long() + cols - 1
                    r = a.rel.detach().double()[h, dr, dc]  # (T, d)
                    logit = (q[:, h, qi, None, :] * (kk[:, h] + r[None])).sum(-1) / math.sqrt(d)
                    ref[:, h, qi] = logit.softmax(-1).numpy()
        assert np.abs(got[k].double().numpy() - ref).max() < 1e-5, (attention, k)


def test_fits_recover_planted_delta_and_alpha_border_included():
    m = planted(grid_side=8, heads=9, seed=3)
    x = torch.randn(2, 3, 16, 16)
    res = probe.analyze(m, x, attribution="none", conv_test=False, n_bootstrap=0)
    assert res.geometry.num_prefix_tokens == 0 and res.geometry.grid == (8, 8)
    for k, blk in enumerate(m.blocks):
        a = blk.attn
        h = res.heads[res.heads.layer == k].sort_values("head")
        delta = h[["delta_row", "delta_col"]].to_numpy()
        alpha = h["alpha"].to_numpy()
        truth_d, truth_a = a.delta.double().numpy(), a.alpha.double().numpy()
        assert np.abs(delta - truth_d).max() < 1e-3
        assert np.abs(alpha / truth_a - 1).max() < 1e-3


def test_fits_recover_the_shipped_models_own_delta_and_alpha():
    """Planted ground truth on a trained model: the shipped checkpoint's heads are read back."""
    m = probe.cordonnier.pretrained()
    x = torch.randn(2, 3, 32, 32)
    res = probe.analyze(m, x, attribution="none", conv_test=False, n_bootstrap=0)
    checked = 0
    for k, blk in enumerate(m.blocks):
        h = res.heads[res.heads.layer == k].sort_values("head")
        ok = (h.quad_status == "ok").to_numpy()
        truth_a = blk.attn.alpha.double().numpy()
        truth_d = blk.attn.delta.double().numpy()
        rows = np.sort(explicit_quadratic(truth_d, truth_a, 16, 16), axis=2)
        informative = np.median(rows[..., -2] / rows[..., -1], axis=1) >= 1e-4  # see the sharp-head test
        # the fit's α range; a near-uniform head has no centre
        inside = ok & (truth_a > 0.01) & (truth_a < 20) & informative
        d = h[["delta_row", "delta_col"]].to_numpy()[inside]
        assert np.abs(d - blk.attn.delta.double().numpy()[inside]).max() < 1e-3
        assert np.abs(h["alpha"].to_numpy()[inside] / truth_a[inside] - 1).max() < 1e-3
        checked += int(inside.sum())
    assert checked >= 27


def test_tracker_records_equal_a_separate_analysis(tmp_path):
    m = planted(seed=5, reach=3)
    m.train()
    x = torch.randn(4, 3, 16, 16)
    tr = Tracker(x, every=3, out_dir=tmp_path)
    assert tr.step(m, 0) and not tr.step(m, 1)
    assert m.training, "the tracker must give the model back in training mode"
    ref = probe.analyze(m, x, attribution="none", null_seeds=0, n_bootstrap=0, batch_size=4)
    m.train()
    h = tr.heads
    cols = ["delta_row", "delta_col", "alpha", "r90_empirical_patches", "mean_distance_px", "entropy_nats"]
    pd.testing.assert_frame_equal(h[["layer", "head", *cols]].reset_index(drop=True),
                                  ref.heads[["layer", "head", *cols]].reset_index(drop=True))
    assert (tr.layers_table.conv_score.to_numpy() == ref.layers.conv_score.to_numpy()).all()
    on_disk = pd.read_csv(tmp_path / "track_heads.csv")
    assert len(on_disk) == len(h) and set(on_disk.step) == {0}
    # a training step moves the centres; the tracker sees it at the next record
    with torch.no_grad():
        m.blocks[0].attn.centers.add_(0.5)
    tr.step(m, 3)
    h3 = tr.heads[(tr.heads.step == 3) & (tr.heads.layer == 0)]
    h0 = tr.heads[(tr.heads.step == 0) & (tr.heads.layer == 0)]
    truth = m.blocks[0].attn.delta.double().numpy()
    # well-determined centres: sharp, and inside the offsets the 8x8 grid has (|δ| <= 7)
    sharp = (m.blocks[0].attn.alpha.numpy() > 0.2) & (np.abs(truth).max(1) < 7) & (np.abs(truth - 0.5).max(1) < 7)
    assert sharp.sum() >= 4
    assert np.allclose(h3[["delta_row", "delta_col"]].to_numpy()[sharp], truth[sharp], atol=1e-3)
    assert np.allclose(h3.delta_row.to_numpy()[sharp], h0.delta_row.to_numpy()[sharp] + 0.5, atol=1e-3)


def test_tracker_refuses_bad_arguments():
    with pytest.raises(probe.ProbeError, match="float tensor"):
        Tracker(torch.zeros(3, 3, 3))
    with pytest.raises(probe.ProbeError, match="positive integer"):
        Tracker(torch.zeros(1, 3, 8, 8), every=0)


def _tiny_dataset(root, n_per_class=12, classes=("a", "b")):
    rng = np.random.default_rng(0)
    for i, c in enumerate(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        for j in range(n_per_class):
            arr = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
            arr[..., i] = 255  # a class signal
            Image.fromarray(arr).save(root / c / f"{j:04d}.png")


def test_recipe_resume_gives_the_same_weights(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from probe.cordonnier.train import TrainConfig, train

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    _tiny_dataset(tmp_path / "train")
    _tiny_dataset(tmp_path / "test", n_per_class=4)
    kw = dict(train=str(tmp_path / "train"), test=str(tmp_path / "test"), dim=18, depth=2, num_heads=9,
              mlp_dim=18, epochs=3, batch_size=8, track_every=2, track_images=4, checkpoint_every=2,
              snapshot_every=4, log_every=1)
    a = train(TrainConfig(out=str(tmp_path / "a"), **kw))
    assert a["finished"] and a["total_steps"] == 9 and 0 <= a["test_accuracy"] <= 1
    b1 = train(TrainConfig(out=str(tmp_path / "b"), max_steps=5, **kw))
    assert not b1["finished"] and not (tmp_path / "b" / "model.safetensors").exists()
    b2 = train(TrainConfig(out=str(tmp_path / "b"), **kw))
    assert b2["finished"]
    wa, wb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ta = pd.read_csv(tmp_path / "a" / "track_heads.csv")
    tb = pd.read_csv(tmp_path / "b" / "track_heads.csv")
    pd.testing.assert_frame_equal(ta, tb)
    assert sorted(ta.step.unique()) == [0, 2, 4, 6, 8, 9]
    la, lb = pd.read_csv(tmp_path / "a" / "train_log.csv"), pd.read_csv(tmp_path / "b" / "train_log.csv")
    assert (la.train_loss.to_numpy() == lb.train_loss.to_numpy()).all()
    # another run's folder is not silently reused
    with pytest.raises(probe.ProbeError, match="other settings"):
        train(TrainConfig(out=str(tmp_path / "a"), **{**kw, "lr": 0.05}))


def test_recipe_refuses_a_folder_without_classes(tmp_path):
    from probe.cordonnier.train import TrainConfig, train

    (tmp_path / "flat").mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "flat" / "x.png")
    with pytest.raises(probe.ProbeError, match="class sub-folders"):
        train(TrainConfig(train=str(tmp_path / "flat"), test=None, out=str(tmp_path / "o")))


def test_probe_analyze_with_no_arguments_runs_offline(tmp_path):
    """The newcomer's first command: the embedded model on embedded images, no download."""
    assert WEIGHTS.is_file()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_COLOR": "1", "COLUMNS": "200",
           "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}
    proc = subprocess.run([sys.executable, "-m", "probe.cli", "analyze"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    outs = list((tmp_path / "reports").glob("cordonnier-*"))
    assert len(outs) == 1
    out = outs[0]
    heads = pd.read_csv(out / "heads.csv")
    assert len(heads) == 6 * 9
    html = (out / "report.html").read_text()
    assert "embedded" in html and "scikit-learn" in html
    names = (out / "images.txt").read_text().split()
    assert len(names) == 64 and all("@" in n for n in names)


def test_lightning_callback_needs_lightning_or_says_so():
    import importlib.util

    tr = Tracker(torch.zeros(1, 3, 16, 16))
    if importlib.util.find_spec("lightning") or importlib.util.find_spec("pytorch_lightning"):
        cb = probe.track.lightning_callback(tr)
        assert hasattr(cb, "on_train_batch_end")
    else:
        with pytest.raises(probe.ProbeError, match="Lightning is not installed"):
            probe.track.lightning_callback(tr)


def test_training_report_is_one_self_contained_page(tmp_path):
    m = planted(seed=2, reach=3)
    tr = Tracker(torch.randn(2, 3, 16, 16), every=1, out_dir=tmp_path)
    for step in range(3):
        with torch.no_grad():
            m.blocks[0].attn.centers.mul_(0.8)  # centres move towards the query
        tr.step(m, step)
    page = tr.write_report(tmp_path, log=pd.DataFrame({"step": [1, 2], "train_loss": [2.0, 1.5],
                                                        "train_acc": [0.1, 0.3], "lr": [0.1, 0.1]}))
    html = page.read_text()
    assert html.count("data:image/png;base64,") == 3 and "http" not in html.replace("http-equiv", "")
    assert (tmp_path / "track_layers.csv").is_file()
    # the report's tap counts are recomputed from the recorded centres (independent count)
    from probe.track import rescore
    from probe.analyses.convlike import distinct_taps

    lt = rescore(tr.heads, tr.layers_table)
    h = tr.heads[(tr.heads.step == 2) & (tr.heads.layer == 0)]
    n = distinct_taps(h[["delta_row", "delta_col"]].to_numpy(), h.r90_empirical_patches.to_numpy() <= 2, 3)[1]
    assert lt[(lt.step == 2) & (lt.layer == 0)].conv_n_taps.item() == n


def test_fits_recover_sharp_heads_from_float32_attention():
    """α 5-15: most of a query's attention on one key. The moments are taken centred and every
    row renormalised in float64 (probe.analyses.quadratic.centred_phi); from the float32 streaming
    features the sharpest heads were off by percents."""
    torch.manual_seed(0)
    m = CordonnierViT(dim=18, depth=1, num_heads=9, mlp_dim=18, img_size=16).eval()
    rng = np.random.default_rng(9)
    a = m.blocks[0].attn
    with torch.no_grad():
        a.centers.copy_(torch.from_numpy(rng.uniform(-7, 7, (9, 2))))
        a.alpha_raw.copy_(torch.from_numpy(rng.uniform(5, 15, 9)))
    res = probe.analyze(m, torch.randn(2, 3, 16, 16), attribution="none", conv_test=False, n_bootstrap=0)
    h = res.heads.sort_values("head")
    truth_d, truth_a = a.delta.double().numpy(), a.alpha.double().numpy()
    # the data carry Δ and α through the keys next to the peak: keep the heads whose second key
    # holds at least 1e-4 of the peak for a query whose peak is inside the grid (float32 attention)
    attn = explicit_quadratic(truth_d, truth_a, 8, 8)
    informative = []
    for hd in range(9):
        rows = np.sort(attn[hd], axis=1)
        informative.append(np.median(rows[:, -2] / rows[:, -1]) >= 1e-4)
    informative = np.array(informative)
    assert informative.sum() >= 5
    err_d = np.abs(h[["delta_row", "delta_col"]].to_numpy() - truth_d).max(1)
    err_a = np.abs(h.alpha.to_numpy() / truth_a - 1)
    assert err_d[informative].max() < 1e-3 and err_a[informative].max() < 1e-3, (err_d, err_a, informative)


def test_trajectory_verdicts_over_the_last_part_of_training():
    """Records of a planted run: layer 0's heads settle on the 3x3 grid halfway through, layer 1's
    stay scattered; the rescored verdicts and their fraction over the last half say so."""
    from probe.analyses.convlike import kernel_lattice
    from probe.track import rescore, trajectory_verdicts

    rng = np.random.default_rng(0)
    rows = []
    for step in range(0, 1001, 100):
        grid = step >= 500
        for layer in (0, 1):
            d = (kernel_lattice(3) + rng.normal(0, 0.05, (9, 2))) if (layer == 0 and grid) \
                else rng.uniform(-2.5, 2.5, (9, 2))
            for h in range(9):
                rows.append({"step": step, "layer": layer, "head": h, "delta_row": d[h, 0],
                             "delta_col": d[h, 1], "alpha": 8.0})
    heads = pd.DataFrame(rows)
    r = rescore(heads, grid=(16, 16))
    assert set(r.columns) >= {"step", "layer", "conv_verdict", "conv_dilation", "conv_p_value"}
    tv = trajectory_verdicts(r, last=0.5).set_index("layer")
    assert tv.loc[0, "conv_like_fraction"] == 1.0 and tv.loc[0, "records"] == 6
    assert tv.loc[0, "final_verdict"] == "conv-like" and tv.loc[0, "dilation"] == 1
    assert tv.loc[1, "conv_like_fraction"] <= 1 / 6
    early = r[(r.layer == 0) & (r.step < 500)]
    assert (early.conv_verdict != "conv-like").all()
    with pytest.raises(probe.ProbeError):
        trajectory_verdicts(r, last=0)


def test_training_feedback_decoding_cache_and_log(tmp_path, monkeypatch):
    """The total is known before the first step, decoding reports its progress and is cached for
    the next start, --limit-train decodes only those files, and a run stopped between logged
    steps writes a train_log.csv with its header and its last steps' row."""
    from probe.cordonnier.train import LOG_COLUMNS, TrainConfig, load_folder, train

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    _tiny_dataset(tmp_path / "train")
    _tiny_dataset(tmp_path / "test", n_per_class=4)
    kw = dict(train=str(tmp_path / "train"), test=str(tmp_path / "test"), dim=18, depth=2, num_heads=9,
              mlp_dim=18, epochs=2, batch_size=8, track_every=0, log_every=50)
    calls, decoded = [], []
    first = train(TrainConfig(out=str(tmp_path / "a"), max_minutes=0, **kw),
                  lambda step, total, row: calls.append((step, total, row)),
                  lambda role, done, total: decoded.append((role, done, total)))
    assert calls[0] == (0, 6, None)  # 24 images / 8 = 3 steps per epoch, 2 epochs: known at once
    assert decoded[-1] == ("test", 8, 8) and ("train", 24, 24) in decoded
    assert first["steps"] == 1 and not first["finished"]
    log = pd.read_csv(tmp_path / "a" / "train_log.csv")
    assert list(log.columns) == list(LOG_COLUMNS) and log.step.tolist() == [1]
    decoded.clear()
    train(TrainConfig(out=str(tmp_path / "b"), max_steps=1, **kw), None, lambda *a: decoded.append(a))
    assert decoded == []  # both folders came from the cache
    x, y, _ = load_folder(tmp_path / "train", cache=False)
    xc, yc, _ = load_folder(tmp_path / "train")
    assert torch.equal(x, xc) and torch.equal(y, yc)
    few = []
    xl, yl, _ = load_folder(tmp_path / "train", limit=5, progress=lambda d, t: few.append((d, t)))
    assert few == [(5, 5)] and torch.equal(xl, x[:5]) and torch.equal(yl, y[:5])
