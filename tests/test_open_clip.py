"""OpenCLIP image towers (``--model open_clip:ARCH``): per-head probabilities equal the explicit
attention math from each block's ``in_proj`` weights, the geometry is 1 class token + the conv1
grid, head gates at 1 are bit-identical and a planted head gets all the importance, weights load
from whole-model or tower state dicts, the data config reproduces OpenCLIP's own transform, and
a pretrained tag fails offline naming --weights / --random-init.

The model is a tiny OpenCLIP config registered with ``open_clip.add_model_config`` (2 blocks,
width 48, 3 heads of 16, 8 px patches on 32 px images: 1 + 4x4 tokens).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

open_clip = pytest.importorskip("open_clip")

import probe  # noqa: E402
from probe.attribution import HeadGates, attribute_heads  # noqa: E402
from probe.capture import AttentionCapture, find_attention_layers, infer_geometries  # noqa: E402
from probe.errors import ProbeError  # noqa: E402
from probe.models import resolve_model  # noqa: E402
from planted_heads import assert_all_importance_on  # noqa: E402

ARCH = "probe-test-tiny-vit"
SPEC = f"open_clip:{ARCH}"
TINY = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 48, "patch_size": 8, "head_width": 16, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module", autouse=True)
def tiny_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("open_clip_cfg") / f"{ARCH}.json"
    path.write_text(json.dumps(TINY))
    open_clip.add_model_config(path)
    wide = dict(TINY, vision_cfg=dict(TINY["vision_cfg"], width=64))
    path2 = path.with_name(f"{ARCH}-wide.json")
    path2.write_text(json.dumps(wide))
    open_clip.add_model_config(path2)
    return path


@pytest.fixture(autouse=True)
def _no_fastpath():
    """MHA's fused eval fast path is another kernel; references use the ordinary path."""
    old = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    yield
    torch.backends.mha.set_fastpath_enabled(old)


def tower(seed: int = 0, spread: float = 0.3):
    """The tiny tower, with weights spread to N(0, spread) so every head's attention is far from
    uniform and every head reaches the embedding."""
    r = resolve_model(SPEC, random_init=True, seed=seed)
    with torch.no_grad():
        for name, p in r.model.named_parameters():
            if p.dim() > 1 or name in ("class_embedding", "positional_embedding"):
                p.normal_(0, spread)
    return r


def images(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_resolves_the_visual_tower_with_its_data_config():
    r = resolve_model(SPEC, random_init=True, seed=3)
    assert r.name == SPEC and r.weights == "random init (seed 3)"
    assert type(r.model).__name__ == "VisionTransformer" and not r.model.training
    assert r.pretrained_cfg == {"input_size": (3, 32, 32), "mean": open_clip.OPENAI_DATASET_MEAN,
                                "std": open_clip.OPENAI_DATASET_STD, "interpolation": "bicubic",
                                "crop_pct": 1.0, "crop_mode": "center"}
    assert r.model.pretrained_cfg == r.pretrained_cfg
    assert r.model(images(2)).shape == (2, TINY["embed_dim"])  # the image embedding
    a, b = r.random_init(4), r.random_init(4)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.conv1.weight, r.random_init(5).conv1.weight)


def test_per_head_probabilities_equal_the_in_proj_math():
    """Oracle: each block's input, its ln_1 applied by hand, q and k from ``attn.in_proj_weight``,
    ``softmax(q k^T / sqrt(d_head))`` per head — not the head average MHA returns by default."""
    net = tower().model
    x = images()
    blocks = list(net.transformer.resblocks)
    block_in: dict[int, torch.Tensor] = {}
    hooks = [b.register_forward_pre_hook(lambda m, a, i=i: block_in.setdefault(i, a[0].detach().clone()))
             for i, b in enumerate(blocks)]
    layers = find_attention_layers(net, (3, 32, 32))
    assert [l.name for l in layers] == [f"transformer.resblocks.{i}.attn" for i in range(2)]
    assert {l.rule.name for l in layers} == {"torch-multihead-attention"}
    got: dict[int, torch.Tensor] = {}
    try:
        with AttentionCapture(layers, lambda i, a: got.setdefault(i, a.clone())), torch.no_grad():
            net(x)
    finally:
        for h in hooks:
            h.remove()
    heads, width = 3, 48
    d = width // heads
    for i, block in enumerate(blocks):
        ln = block.ln_1
        h = F.layer_norm(block_in[i], (width,), ln.weight, ln.bias, ln.eps)  # (B, T, C), batch first
        w, bias = block.attn.in_proj_weight, block.attn.in_proj_bias
        q = (h @ w[:width].T + bias[:width]).view(3, 17, heads, d).transpose(1, 2)
        k = (h @ w[width:2 * width].T + bias[width:2 * width]).view(3, 17, heads, d).transpose(1, 2)
        want = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
        assert got[i].shape == (3, heads, 17, 17)
        torch.testing.assert_close(got[i], want, atol=1e-5, rtol=0)
        spread = (want - want.mean(dim=1, keepdim=True)).abs().max()
        assert spread > 1e-2  # heads differ: a head average would fail the comparison above


def test_geometry_is_one_class_token_and_the_conv1_grid():
    net = tower().model
    layers = find_attention_layers(net, (3, 32, 32))
    geoms = infer_geometries(net, layers, (3, 32, 32))
    for g in geoms.values():
        assert (g.num_prefix_tokens, g.grid, g.pixels_per_token) == (1, (4, 4), (8.0, 8.0))
    assert net.num_prefix_tokens == 1 and net.grid_size == (4, 4)


def test_gates_at_one_are_bit_identical():
    net = tower().model
    x = images()
    layers = find_attention_layers(net, (3, 32, 32))
    with torch.no_grad():
        ref = net(x)
        with HeadGates(net, {l.index: l.name for l in layers}) as gates:
            assert gates.num_features == 2 * 3
            passthrough = net(x)
            gates.set(torch.ones(gates.num_features))
            ones = net(x)
            gates.set(torch.zeros(gates.num_features))
            zeros = net(x)
        after = net(x)
    assert torch.equal(passthrough, ref) and torch.equal(ones, ref) and torch.equal(after, ref)
    assert (zeros - ref).abs().max() > 1e-4


def test_planted_head_gets_all_the_importance():
    """Weight surgery zeroes the out_proj columns of every head but (layer 1, head 1): only that
    head can move the embedding, so the others' IG and ablation importance must be 0."""
    from test_families_gates import plant

    net = tower().model
    keep = (1, 1)
    plant(net, keep, (3, 32, 32))
    layers = find_attention_layers(net, (3, 32, 32))
    att = attribute_heads(net, images(2), methods=("ig", "ablation"), layers={l.index: l.name for l in layers},
                          n_steps=8)
    assert_all_importance_on(att, keep, "open_clip", relative=True)


def test_weights_from_whole_model_or_tower_state_dicts(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(11)
    clip = open_clip.create_model(ARCH)
    full = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(full))
    r = resolve_model(SPEC, weights=full)
    assert r.weights == f"{full} (visual tower)"
    ref = clip.visual.state_dict()
    assert r.model.state_dict().keys() == ref.keys()
    assert all(torch.equal(r.model.state_dict()[k], v) for k, v in ref.items())
    only = tmp_path / "visual.pth"
    torch.save(clip.visual.state_dict(), only)
    r = resolve_model(SPEC, weights=only)
    assert r.weights == str(only)
    assert all(torch.equal(r.model.state_dict()[k], v) for k, v in ref.items())
    wide = open_clip.create_model(f"{ARCH}-wide")
    bad = tmp_path / "wide.pth"
    torch.save(wide.state_dict(), bad)
    with pytest.raises(ProbeError, match=rf"do not match the architecture '{SPEC}'.*shape mismatch"):
        resolve_model(SPEC, weights=bad)


@pytest.mark.parametrize("mode,crop_mode", [("shortest", "center"), ("squash", "squash")])
def test_data_config_reproduces_open_clip_transform(mode, crop_mode):
    """Oracle: OpenCLIP's own eval ``image_transform`` on a non-square PIL image."""
    from PIL import Image

    from probe.data import eval_transform
    from probe.model_sources.open_clip import data_config_from_preprocess

    pp = {"size": 32, "mean": (0.4, 0.5, 0.6), "std": (0.2, 0.25, 0.3), "interpolation": "bicubic", "resize_mode": mode}
    cfg = data_config_from_preprocess(pp)
    assert cfg["crop_mode"] == crop_mode and cfg["input_size"] == (3, 32, 32)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 70, 3), dtype=np.uint8))
    want = open_clip.image_transform(32, is_train=False, mean=pp["mean"], std=pp["std"], resize_mode=mode,
                                     interpolation="bicubic")(img)
    net = torch.nn.Identity()
    net.pretrained_cfg = cfg
    got = eval_transform(net)[0](img)
    assert got.shape == want.shape == (3, 32, 32)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert data_config_from_preprocess(dict(pp, resize_mode="longest"))["crop_mode"] == "border"


def test_analyze_end_to_end(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    res = probe.analyze(SPEC, str(tmp_path), random_init=True, batch_size=2, n_bootstrap=0, null_seeds=0,
                        fits=False, conv_test=False, progress=False)
    assert res.meta["model"] == SPEC and res.meta["num_images"] == 2
    assert res.meta["layer_names"] == {0: "transformer.resblocks.0.attn", 1: "transformer.resblocks.1.attn"}
    assert len(res.heads) == 2 * 3


def test_tag_offline_names_weights_and_random_init(monkeypatch, tmp_path):
    from probe.model_sources import checkpoint

    monkeypatch.setattr(checkpoint, "hub_reachable", lambda *a, **k: False)
    monkeypatch.setattr(checkpoint, "cached_hub_file", lambda *a, **k: None)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.cache/clip download
    with pytest.raises(ProbeError, match=r"ViT-B-32:laion2b_s34b_b79k need huggingface\.co, which is not reachable"
                                         r".*--weights FILE.*--random-init") as err:
        resolve_model("open_clip:ViT-B-32:laion2b_s34b_b79k")
    assert "\n" not in str(err.value)
    with pytest.raises(ProbeError, match=r"without weights.*open_clip:ViT-B-32:TAG.*--weights FILE.*--random-init"):
        resolve_model("open_clip:ViT-B-32")
    with pytest.raises(ProbeError, match="hf-hub:/local-dir: schemas are not supported"):
        resolve_model("open_clip:hf-hub:laion/x", random_init=True)


def test_resnet_tower_is_refused():
    with pytest.raises(ProbeError, match="ResNet image tower.*open_clip:ViT-B-32"):
        resolve_model("open_clip:RN50", random_init=True)
