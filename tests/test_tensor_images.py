"""Pre-transformed image tensors as analysis input (TensorImages), and the single forward pass per
batch of ``probe.analyze`` (the geometry is read off the first captured batch)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import probe
from probe.data import TensorImages, eval_transform
from probe.errors import ProbeError

from conftest import tiny_vit

SMALL = {"input_size": (3, 32, 32)}
FAST = dict(data_overrides=SMALL, fits=False, conv_test=False, attribution="none", n_bootstrap=4)


def test_batches_cycle_through_the_pool_in_order():
    pool = torch.arange(3, dtype=torch.float32).view(3, 1, 1, 1).expand(3, 1, 2, 2).contiguous()
    src = TensorImages(pool, num_images=7)
    got = list(src.batches(3))
    assert len(src) == 7 and [b.shape[0] for b, _ in got] == [3, 3, 1]
    values = torch.cat([b[:, 0, 0, 0] for b, _ in got]).tolist()
    assert values == [0, 1, 2, 0, 1, 2, 0]
    assert sum((n for _, n in got), []) == [f"image_{i}" for i in (0, 1, 2, 0, 1, 2, 0)]
    # each batch is a new tensor: writing to it leaves the pool unchanged
    got[0][0].zero_()
    assert pool[1, 0, 0, 0] == 1


@pytest.mark.parametrize("bad", [torch.zeros(3, 32, 32), torch.zeros(0, 3, 4, 4),
                                 torch.zeros(2, 3, 4, 4, dtype=torch.int64), [1, 2]])
def test_bad_pool_is_a_probe_error(bad):
    with pytest.raises(ProbeError, match="float \\(N, C, H, W\\)"):
        TensorImages(bad)


def test_bad_counts_are_probe_errors():
    with pytest.raises(ProbeError, match="--num-images"):
        TensorImages(torch.zeros(2, 3, 4, 4), num_images=0)
    with pytest.raises(ProbeError, match="--batch-size"):
        next(TensorImages(torch.zeros(2, 3, 4, 4)).batches(0))


def _photos(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40 + 3 * i, 48, 3), dtype=np.uint8)) for i in range(n)]


def test_tensor_input_equals_image_input_through_the_same_transform():
    model = tiny_vit()
    photos = _photos(5)
    tf, _ = eval_transform(model, SMALL)
    tensor = torch.stack([tf(p) for p in photos])
    from_images = probe.analyze(model, photos, batch_size=2, **FAST)
    from_tensor = probe.analyze(model, tensor, batch_size=2, **FAST)
    from_stream = probe.analyze(model, TensorImages(tensor), batch_size=3, **FAST)
    assert from_tensor.meta["num_images"] == from_stream.meta["num_images"] == 5
    pd.testing.assert_frame_equal(from_images.heads, from_tensor.heads)
    pd.testing.assert_frame_equal(from_images.heads, from_stream.heads, atol=1e-5, rtol=1e-5)  # float32 rounding of another batch split


def test_num_images_takes_the_first_images_of_a_tensor():
    model = tiny_vit()
    tensor = torch.randn(6, 3, 32, 32)
    first = probe.analyze(model, tensor, num_images=2, **FAST)
    direct = probe.analyze(model, tensor[:2], **FAST)
    assert first.meta["num_images"] == 2
    pd.testing.assert_frame_equal(first.heads, direct.heads)


def test_tensor_of_the_wrong_size_is_a_probe_error():
    with pytest.raises(ProbeError, match=r"\(3, 48, 48\) images.*takes \(3, 32, 32\)"):
        probe.analyze(tiny_vit(), torch.randn(2, 3, 48, 48), **FAST)


def test_one_forward_pass_per_batch_after_one_dry_run():
    """One forward per batch, plus a single one-image dry run that reads each layer's geometry and
    refuses attention probe cannot map (windowed, non-square, rows not summing to one)."""
    model = tiny_vit()
    calls = []
    handle = model.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    try:
        result = probe.analyze(model, torch.randn(5, 3, 32, 32), batch_size=2, **FAST)
    finally:
        handle.remove()
    assert calls == [1, 2, 2, 1]
    assert result.geometry == probe.TokenGeometry(1, (4, 4), (8.0, 8.0))


def test_geometry_mismatch_found_on_the_first_batch_is_a_probe_error():
    with pytest.raises(ProbeError, match="17 tokens.*--grid"):
        probe.analyze(tiny_vit(), torch.randn(2, 3, 32, 32), grid=(5, 5), **FAST)
