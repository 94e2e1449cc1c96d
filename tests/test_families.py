"""Capture from each model family: attention equals explicit math, geometry is right, CLI and
library agree, unsupported models are refused with a clear reason.

Models are tiny and randomly initialised (``family_models``); the oracles in ``attention_math``
recompute the probabilities from each module's own weights on the input the module received.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import attention_math as am
import family_models as fm
import probe
from probe.capture import AttentionCapture, find_attention_layers, infer_geometries
from probe.cli import app
from probe.data import eval_transform
from probe.errors import CaptureError, ProbeError

TOL = 1e-5


def build(factory: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return getattr(fm, factory)().eval()


def input_shape(model: torch.nn.Module) -> tuple[int, int, int]:
    return tuple(int(v) for v in eval_transform(model)[1]["input_size"])


def capture_all(model: torch.nn.Module, x: torch.Tensor):
    """Captured attention and each layer module's input, from one forward pass over ``x``."""
    return fm.capture_with_inputs(model, x)


def random_batch(model: torch.nn.Module, n: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, *input_shape(model), generator=g)


# ----------------------------------------------------------------------------------------------
# attention probabilities == explicit math
# ----------------------------------------------------------------------------------------------
ORACLES = {
    "deit_distilled": ["timm_vit", "timm_vit"],
    "dinov2_reg": ["timm_vit", "timm_vit"],
    "vit_nonsquare": ["timm_vit", "timm_vit"],
    "hybrid": ["timm_vit", "timm_vit"],
    "convit": ["convit_gpsa", "convit_gpsa", "timm_vit"],
    "torchvision_vit": ["multihead", "multihead"],
}


@pytest.mark.parametrize("factory", sorted(ORACLES))
def test_captured_attention_equals_explicit_math(factory):
    model = build(factory)
    x = random_batch(model)
    layers, got, inputs = capture_all(model, x)
    assert [l.index for l in layers] == list(range(len(ORACLES[factory])))
    for layer, oracle in zip(layers, ORACLES[factory]):
        want = getattr(am, oracle)(layer.module, inputs[layer.index])
        assert got[layer.index].shape == want.shape
        assert torch.allclose(got[layer.index].double(), want, atol=TOL, rtol=0), (factory, layer.name)


@pytest.mark.parametrize("factory,version", [("swin", 1), ("swinv2", 2)])
def test_swin_windows_mapped_to_image_positions(factory, version):
    """Dense stage attention equals the whole-grid definition of (shifted) window attention, rows
    sum to one, and each query attends to exactly the tokens of its window."""
    model = build(factory)
    x = random_batch(model)
    layers, got, inputs = capture_all(model, x)
    assert [l.rule.name for l in layers] == ["timm-swin-windows"] * 4
    shifts = []
    for layer in layers:
        want = am.swin_dense(layer.module, inputs[layer.index], version)
        a = got[layer.index].double()
        assert a.shape == want.shape
        assert torch.allclose(a, want, atol=TOL, rtol=0), layer.name
        assert torch.allclose(a.sum(-1), torch.ones_like(a.sum(-1)), atol=1e-5)
        area = math.prod(layer.module.window_size)
        assert ((a > 1e-30).sum(-1) <= area).all()
        shifts.append(tuple(layer.module.shift_size))
    assert shifts == [(0, 0), (2, 2), (0, 0), (2, 2)]  # both regular and shifted windows were checked


def test_cait_talking_heads_and_class_attention():
    """Talking-heads layers give softmax(proj_l(q k^T scale)); the class-attention layer (one
    query) is refused with the reason, and selecting the self-attention layers works."""
    model = build("cait")
    x = random_batch(model)
    layers = find_attention_layers(model, input_shape(model))
    assert [(l.name, l.rule.name) for l in layers] == [
        ("blocks.0.attn", "timm-cait-talking-heads"), ("blocks.1.attn", "timm-cait-talking-heads"),
        ("blocks_token_only.0.attn", "timm-attention")]
    _, got, inputs = capture_all(model, x)
    for layer in layers[:2]:
        want = am.cait_talking_heads(layer.module, inputs[layer.index])
        assert torch.allclose(got[layer.index].double(), want, atol=TOL, rtol=0)
    with pytest.raises(CaptureError, match=r"layer 2 \(blocks_token_only.0.attn.*1 queries to 17 keys.*--layers"):
        infer_geometries(model, layers, input_shape(model), model_name="cait")
    g = infer_geometries(model, layers[:2], input_shape(model))
    assert {_as_tuple(v) for v in g.values()} == {(0, (4, 4), (16.0, 16.0))}  # CaiT adds the class token late


def test_refuse_attention_that_is_not_probabilities():
    """Reading CaiT at attn_drop (after the second head mixing) gives rows that do not sum to 1:
    refused instead of analysed."""
    from probe import capture

    model = build("cait")
    rule = next(r for r in capture.rules() if r.name == "timm-cait-talking-heads")
    capture._RULES.remove(rule)
    try:
        layers = find_attention_layers(model, input_shape(model))
        assert layers[0].rule.name == "timm-attention"
        with pytest.raises(CaptureError, match=r"rows that sum to .* not 1"):
            infer_geometries(model, layers[:1], input_shape(model), model_name="cait")
    finally:
        capture.register_rule(rule)


def test_swin_captured_output_is_unchanged():
    model = build("swin")
    x = random_batch(model)
    with torch.no_grad():
        plain = model(x)
    layers = find_attention_layers(model)
    fused = [l.module.attn.fused_attn for l in layers]
    with AttentionCapture(layers, lambda i, a: None), torch.no_grad():
        assert [l.module.attn.fused_attn for l in layers] == [False] * len(layers)
        hooked = model(x)
    assert torch.allclose(plain, hooked, atol=TOL)
    assert [l.module.attn.fused_attn for l in layers] == fused
    assert all(not l.module._forward_pre_hooks and not l.module.attn.attn_drop._forward_hooks for l in layers)


def test_torchvision_weights_are_per_head_and_restored():
    """The wrapper asks for per-head weights (not the head average), leaves the block's output
    unchanged and restores the module and the fast-path flag."""
    model = build("torchvision_vit")
    x = random_batch(model)
    with torch.no_grad():
        plain = model(x)
    layers, got, inputs = capture_all(model, x)
    a = got[0]
    assert a.shape[1] == 4
    assert (a - a.mean(1, keepdim=True)).abs().max() > 1e-3  # heads differ: not averaged
    with AttentionCapture(layers, lambda i, a: None), torch.no_grad():
        assert not torch.backends.mha.get_fastpath_enabled()
        hooked = model(x)
    assert torch.allclose(plain, hooked, atol=TOL)
    assert torch.backends.mha.get_fastpath_enabled()
    assert all("forward" not in vars(l.module) for l in layers)


def test_timm_fused_flag_restored():
    model = build("deit_distilled")
    layers = find_attention_layers(model)
    before = [l.module.fused_attn for l in layers]
    with AttentionCapture(layers, lambda i, a: None):
        assert all(l.module.fused_attn is False for l in layers)
    assert [l.module.fused_attn for l in layers] == before


# ----------------------------------------------------------------------------------------------
# geometry
# ----------------------------------------------------------------------------------------------
def _geoms(model):
    shape = input_shape(model)
    layers = find_attention_layers(model, shape)
    g = infer_geometries(model, layers, shape)
    return shape, layers, g


def _as_tuple(geom):
    return geom.num_prefix_tokens, geom.grid, geom.pixels_per_token


def test_geometry_distilled_and_registers():
    m = build("deit_distilled")
    _, _, g = _geoms(m)
    prefix = 1 + int(m.dist_token is not None)  # class + distillation token
    assert prefix == 2
    assert {_as_tuple(v) for v in g.values()} == {(2, (4, 4), (16.0, 16.0))}
    m = build("dinov2_reg")
    _, _, g = _geoms(m)
    assert m.num_reg_tokens == 4
    assert {_as_tuple(v) for v in g.values()} == {(1 + 4, (4, 4), (14.0, 14.0))}


def test_geometry_non_square_dynamic_size():
    m = build("vit_nonsquare")
    shape, _, g = _geoms(m)
    assert shape == (3, 64, 48)
    assert {_as_tuple(v) for v in g.values()} == {(1, (4, 3), (16.0, 16.0))}


def test_geometry_hybrid_comes_from_cnn_feature_map():
    m = build("hybrid")
    shape, _, g = _geoms(m)
    with torch.no_grad():
        fmap = m.patch_embed.backbone(torch.zeros(1, *shape))
    rows, cols = fmap.shape[-2:]
    assert (rows, cols) == (3, 2)
    assert tuple(m.patch_embed.patch_size) == (1, 1)  # the ViT's own patch size says nothing
    want = (1, (rows, cols), (shape[1] / rows, shape[2] / cols))
    assert {_as_tuple(v) for v in g.values()} == {want}
    assert want[2] == (32.0, 32.0)


def test_geometry_convit_class_token_joins_late():
    m = build("convit")
    _, layers, g = _geoms(m)
    local = m.local_up_to_layer
    assert local == 2
    assert [l.rule.name for l in layers] == ["timm-convit-gpsa"] * local + ["timm-attention"]
    assert [_as_tuple(g[l.index]) for l in layers] == [(0, (4, 4), (16.0, 16.0))] * local + [(1, (4, 4), (16.0, 16.0))]


def test_geometry_swin_stages():
    m = build("swin")
    _, layers, g = _geoms(m)
    assert [_as_tuple(g[l.index]) for l in layers] == [(0, (16, 16), (4.0, 4.0))] * 2 + [(0, (8, 8), (8.0, 8.0))] * 2


def test_geometry_torchvision():
    m = build("torchvision_vit")
    _, _, g = _geoms(m)
    assert {_as_tuple(v) for v in g.values()} == {(1, (4, 4), (8.0, 8.0))}


# ----------------------------------------------------------------------------------------------
# CLI and library give identical numbers
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """Three smooth random RGB photos, 70x60 px."""
    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(3):
        small = rng.integers(0, 256, size=(7, 6, 3), dtype=np.uint8)
        Image.fromarray(small).resize((60, 70), Image.BILINEAR).save(d / f"img{i}.png")
    return d


def run_cli(args):
    result = CliRunner().invoke(app, ["analyze", *args])
    text = result.output + (getattr(result, "stderr", "") if result.stderr_bytes is not None else "")
    return result.exit_code, " ".join(text.split())


FAMILIES = ["deit_distilled", "dinov2_reg", "vit_nonsquare", "convit", "hybrid", "swin", "swinv2", "torchvision_vit"]


@pytest.mark.parametrize("factory", FAMILIES)
def test_cli_and_library_identical(factory, image_dir, tmp_path):
    out = tmp_path / "cli"
    code, text = run_cli(["--model", f"family_models:{factory}", "--random-init", "--images", str(image_dir),
                          "--out", str(out), "--batch-size", "2"])
    assert code == 0, text
    lib = probe.analyze(f"family_models:{factory}", str(image_dir), random_init=True, batch_size=2)
    assert (out / "heads.csv").read_text() == lib.heads.to_csv(index=False)
    assert (out / "report.html").is_file()
    assert lib.meta["num_images"] == 3
    layers = find_attention_layers(build(factory), input_shape(build(factory)))
    heads = [getattr(l.module, "num_heads", None) or l.module.attn.num_heads for l in layers]
    assert len(lib.heads) == sum(heads)
    for index, geom in lib.meta["geometry_per_layer"].items():
        assert lib.stats[index].geometry.num_prefix_tokens == geom["num_prefix_tokens"]


# ----------------------------------------------------------------------------------------------
# refusals
# ----------------------------------------------------------------------------------------------
def test_refuse_model_without_attention(image_dir):
    code, text = run_cli(["--model", "family_models:cnn", "--random-init", "--images", str(image_dir)])
    assert code == 2
    assert "family_models:cnn" in text and "no attention" in text
    assert "timm-attention" in text and "torch-multihead-attention" in text and "functional fallback" in text
    assert "register a capture rule" in text
    with pytest.raises(CaptureError, match="family_models:cnn: no attention"):
        probe.analyze("family_models:cnn", str(image_dir), random_init=True)


def test_refuse_missing_layer(image_dir):
    code, text = run_cli(["--model", "family_models:deit_distilled", "--random-init", "--images", str(image_dir),
                          "--layers", "5"])
    assert code == 2
    assert "family_models:deit_distilled: layer 5 is out of range" in text
    assert "2 attention layers" in text and "--layers" in text


def test_refuse_grid_that_does_not_match(image_dir):
    code, text = run_cli(["--model", "family_models:deit_distilled", "--random-init", "--images", str(image_dir),
                          "--grid", "5x5"])
    assert code == 2
    assert "family_models:deit_distilled" in text and "18 tokens" in text
    assert "grid 5x5 (--grid)" in text and "--prefix-tokens" in text


def test_refuse_prefix_option_that_does_not_match(image_dir):
    with pytest.raises(ProbeError, match=r"3 prefix tokens \(--prefix-tokens\).*--grid"):
        probe.analyze("family_models:torchvision_vit", str(image_dir), random_init=True, prefix_tokens=3)


def test_refuse_channel_attention(image_dir):
    with pytest.raises(CaptureError, match="family_models:xcit.*across channels"):
        probe.analyze("family_models:xcit", str(image_dir), random_init=True, layers="0")


def test_refuse_padded_swin_windows(image_dir):
    with pytest.raises(CaptureError, match="family_models:swin_padded.*pads its windows.*--input-size"):
        probe.analyze("family_models:swin_padded", str(image_dir), random_init=True)


def test_refuse_unmapped_window_attention(image_dir):
    """A windowed timm module no rule maps back is refused by the generic check, not analysed
    as if each window were an image: here Swin with its block rule taken away."""
    from probe import capture

    rule = next(r for r in capture.rules() if r.name == "timm-swin-windows")
    capture._RULES.remove(rule)
    try:
        with pytest.raises(CaptureError, match=r"gave 16 attention maps for one image.*windows.*--layers"):
            probe.analyze("family_models:swin", str(image_dir), random_init=True)
    finally:
        capture.register_rule(rule)
