"""Early exit: the forward pass ends after the deepest selected layer once a full pass has shown
that module order is execution order; the statistics are unchanged. And the random-init null
run only where it can change a verdict gives the same verdicts as running it everywhere."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import probe.capture as capture_mod
from probe.models import resolve_model
from probe.pipeline import analyze

from conftest import tiny_vit

torch.set_num_threads(1)
SMALL = {"data_overrides": {"input_size": (3, 32, 32)}}


def _count_calls(module: nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda m, i, o: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_early_exit_skips_later_blocks_and_keeps_statistics(monkeypatch):
    model = tiny_vit(depth=5)
    x = torch.randn(6, 3, 32, 32)
    last, head = _count_calls(model.blocks[4]), _count_calls(model.head)
    fast = analyze(resolve_model(model), x, layers="0-1", batch_size=2, fits=False,
                   conv_test=False, attribution="none", **SMALL)
    assert fast.meta["early_exit"] is True
    # the geometry's dry run and the first of the 3 batches run the whole model (the first batch
    # checks the order); the other two stop before block 2
    assert last[0] == 2 and head[0] == 2
    monkeypatch.setattr(capture_mod.AttentionCapture, "arm_early_exit", lambda self: False)
    full = analyze(resolve_model(model), x, layers="0-1", batch_size=2, fits=False,
                   conv_test=False, attribution="none", **SMALL)
    assert full.meta["early_exit"] is False
    assert last[0] == 2 + 1 + 3 and head[0] == 2 + 1 + 3
    pd.testing.assert_frame_equal(fast.heads, full.heads)
    for layer in (0, 1):
        assert torch.equal(fast.stats[layer].attn_sum, full.stats[layer].attn_sum)


def test_no_early_exit_for_the_last_layer():
    model = tiny_vit(depth=3)
    res = analyze(resolve_model(model), torch.randn(4, 3, 32, 32), layers="1-2", batch_size=2,
                  fits=False, conv_test=False, attribution="none", **SMALL)
    assert res.meta["early_exit"] is False


class _Swapped(nn.Module):
    """Two timm ViTs' blocks registered in the opposite order to the one they run in."""

    def __init__(self):
        super().__init__()
        vit = tiny_vit(depth=2)
        self.patch_embed, self.cls_token, self.pos_embed = vit.patch_embed, vit.cls_token, vit.pos_embed
        self.second = vit.blocks[1]  # registered first, runs second
        self.first = vit.blocks[0]
        self.num_prefix_tokens = 1

    def forward(self, x):
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        return self.second(self.first(x)).mean(1)


def test_early_exit_not_armed_when_module_order_is_not_execution_order():
    model = _Swapped().eval()
    layers = capture_mod.find_attention_layers(model)
    assert [l.module for l in layers] == [model.second.attn, model.first.attn]
    got = []
    cap = capture_mod.AttentionCapture(layers[:1], lambda i, a: got.append(a), stop_before=layers[1].module)
    with cap, torch.no_grad():
        cap.forward(model, torch.randn(2, 3, 32, 32))
        assert cap.arm_early_exit() is False  # layer 1 ran before layer 0 delivered anything
        cap.forward(model, torch.randn(2, 3, 32, 32))
    assert len(got) == 2  # both passes delivered layer 0's attention


def test_random_init_null_on_candidates_gives_the_same_verdicts():
    from PIL import Image

    from probe.conv_equivalence import conv_equivalent_vit

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(2)]
    resolved = resolve_model(conv_equivalent_vit(depth=4, conv_layers=2, embed_dim=24))
    kw = dict(n_bootstrap=0, attribution="none", null_seeds=2, null_images=2)
    lazy = analyze(resolved, images, **kw)
    every = analyze(resolved, images, null_layers="all", **kw)
    assert lazy.meta["conv_null_layers"] == [0, 1]  # the planted conv layers
    assert every.meta["conv_null_layers"] == [0, 1, 2, 3]
    assert lazy.meta["conv_null_status"] == every.meta["conv_null_status"] == "run"
    a, b = lazy.layers.set_index("layer"), every.layers.set_index("layer")
    assert a["conv_verdict"].tolist() == b["conv_verdict"].tolist() == ["conv-like"] * 2 + ["non-local"] * 2
    np.testing.assert_array_equal(a.loc[[0, 1], "conv_random_init_max"], b.loc[[0, 1], "conv_random_init_max"])
    assert a.loc[[2, 3], "conv_random_init_max"].isna().all()
    # a model with no candidate layer runs no random-init copy at all
    plain = analyze(resolve_model(tiny_vit(depth=2)), torch.randn(2, 3, 32, 32), layers="all",
                    n_bootstrap=0, attribution="none", **SMALL)
    assert plain.meta["conv_null_status"] in ("random weights", "not needed")
    with pytest.raises(Exception, match="null-layers"):
        analyze(resolved, images, null_layers="some", **kw)
