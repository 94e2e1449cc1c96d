"""The GPU training recipe (probe.cordonnier.train_cuda) run eagerly on the CPU: it trains, its
schedule is the CPU recipe's, its augmentation is a crop-and-flip of the right image, and the
recorded Δ/α are the model's own parameters."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from probe.cordonnier.train import TrainConfig, lr_factors as cpu_lr_factors
from probe.cordonnier.train_cuda import CudaTrainConfig, epoch_batches, lr_factors, train_cuda


def test_schedule_is_the_cpu_recipes():
    cfg = TrainConfig(warmup=0.05, position_lr_mult=20.0, position_schedule="cosine")
    for step in (0, 3, 50, 499, 999):
        assert lr_factors(step, 1000, 0.05, 20.0, "cosine") == cpu_lr_factors(step, 1000, cfg)
    assert lr_factors(999, 1000, 0.05, 1.0, "cosine")[1] < 1e-4  # decays to 0
    assert lr_factors(999, 1000, 0.05, 20.0, "constant")[1] == 20.0


def test_epoch_batches_crop_and_flip_the_right_image():
    x = torch.arange(5 * 3 * 8 * 8, dtype=torch.float32).reshape(5, 3, 8, 8)
    g = torch.Generator().manual_seed(0)
    out, perm = epoch_batches(x, g, pad=2)
    assert sorted(perm.tolist()) == list(range(5))
    for i in range(5):
        src = F.pad(x[perm[i]], (2, 2, 2, 2))
        # oracle: some crop offset and flip reproduces the output exactly
        found = any(torch.equal(out[i], c if not f else c.flip(-1))
                    for r in range(5) for col in range(5) for f in (False, True)
                    for c in [src[:, r:r + 8, col:col + 8]])
        assert found


def test_train_cuda_on_the_cpu_trains_and_records_its_own_positions():
    rng = np.random.default_rng(0)
    y = torch.as_tensor(rng.integers(0, 2, 200))
    x = torch.as_tensor(rng.integers(0, 60, (200, 32, 32, 3)), dtype=torch.uint8)
    x[y == 1] += 120  # a learnable difference
    cfg = CudaTrainConfig(dim=18, depth=2, num_heads=9, mlp_dim=18, values="projected", dropout=0.0, epochs=4,
                          batch_size=20, lr=0.05, position_lr_mult=5.0, amp=False, track_every=5)
    model, summary, rows, track = train_cuda(cfg, (x, y), (x[:60], y[:60]), device="cpu", log=lambda _: None)
    assert summary["epochs_run"] == 4 and summary["steps"] == 40
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert summary["test_accuracy"] > 0.6
    steps = sorted({r["step"] for r in track})
    assert steps == list(range(0, 41, 5))
    last = [r for r in track if r["step"] == 40]
    assert len(last) == 2 * 9
    for r in last:
        attn = model.blocks[r["layer"]].attn
        assert np.allclose([r["delta_row"], r["delta_col"]], attn.delta[r["head"]].numpy())
        assert np.isclose(r["alpha"], float(attn.alpha[r["head"]]))


def test_paper_head_form_is_captured_and_fitted():
    """values="input" (every head mixes the full-width input, Cordonnier et al.'s form) with hidden
    dropout: the proj takes H·dim channels, and probe's fits recover the planted Δ."""
    import probe
    from probe.analyses.convlike import kernel_lattice
    from probe.cordonnier import CordonnierViT

    torch.manual_seed(0)
    m = CordonnierViT(dim=12, depth=1, num_heads=9, mlp_dim=12, values="input", dropout=0.1).eval()
    assert m.blocks[0].attn.proj.in_features == 9 * 12
    with torch.no_grad():
        m.blocks[0].attn.centers.copy_(torch.as_tensor(kernel_lattice(3), dtype=torch.float32))
        m.blocks[0].attn.alpha_raw.fill_(3.0)
    res = probe.analyze(m, torch.randn(2, 3, 32, 32), attribution="none", null_seeds=0, progress=False)
    h = res.heads.sort_values("head")
    assert np.allclose(h[["delta_row", "delta_col"]].to_numpy(), kernel_lattice(3), atol=1e-3)
    assert res.layers.conv_verdict.iloc[0] == "conv-like"
