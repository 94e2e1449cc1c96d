"""Hugging Face vision transformers beyond ViT/DeiT/DINOv2: CLIP and SigLIP vision towers, BEiT
(relative position bias), ViT-MAE (encoder unmasked), DINOv2 with registers — random weights from
tiny configs, no downloads.

Oracle: ``transformers``' own eager attention returned by ``output_attentions=True`` (an
independent code path: the model's output recorder, not probe's hook), for a model that was built
with SDPA — so the test also checks that capture forces eager attention per layer and restores the
setting afterwards. Geometry: the prefix tokens of each family (CLIP 1 class embedding, SigLIP 0,
BEiT 1, MAE 1, DINOv2-reg 1 + registers). Attribution: gates at 1 are bit-identical and a planted
one-head model gets all the importance.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from probe.attribution import HeadGates, attribute_heads  # noqa: E402
from probe.capture import AttentionCapture, find_attention_layers, infer_geometries  # noqa: E402
from probe.models import resolve_model  # noqa: E402
from planted_heads import assert_all_importance_on, zero_heads_except  # noqa: E402

VISION = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=64)


def _clip():
    cfg = transformers.CLIPConfig(vision_config=VISION, text_config=dict(hidden_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=32), num_labels=5)
    return transformers.CLIPForImageClassification(cfg)


def _siglip():
    cfg = transformers.SiglipConfig(vision_config=VISION, text_config=dict(hidden_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=32), num_labels=5)
    return transformers.SiglipForImageClassification(cfg)


def _beit():
    return transformers.BeitForImageClassification(transformers.BeitConfig(
        **VISION, use_relative_position_bias=True, use_mean_pooling=True, num_labels=5))


def _mae():
    return transformers.ViTMAEModel(transformers.ViTMAEConfig(**VISION))


def _dinov2_reg():
    return transformers.Dinov2WithRegistersForImageClassification(transformers.Dinov2WithRegistersConfig(
        **VISION, num_register_tokens=2, num_labels=5))


#: family -> (builder, prefix tokens, has a classifier)
FAMILIES = {
    "clip": (_clip, 1, True),
    "siglip": (_siglip, 0, True),
    "beit": (_beit, 1, True),
    "vit_mae": (_mae, 1, False),
    "dinov2_reg": (_dinov2_reg, 3, True),
}


def set_attn(model, impl: str) -> None:
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None:
            cfg._attn_implementation = impl


def build(family: str):
    torch.manual_seed(0)
    net = FAMILIES[family][0]().eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
            elif "lambda" in name:  # BEiT's layer scale (0.1)
                p.fill_(1.0)
    return net


def images(n=2):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def check_against(got, want, layers, prefix, tag):
    """Captured ``got[layer]`` equal HF's eager ``want[layer]`` (2 images, 4 heads, ``prefix`` + 16
    tokens) to 1e-5, rows sum to 1, and the attention is not uniform (the oracle can fail)."""
    assert len(want) == len(layers) == 2
    tokens = prefix + 16
    for l in layers:
        a, w = got[l.index], want[l.index]
        assert a.shape == w.shape == (2, 4, tokens, tokens), (tag, l.name)
        err = (a - w).abs().max()
        assert err < 1e-5, (tag, l.name, float(err))
        torch.testing.assert_close(a.sum(-1), torch.ones(a.shape[:-1]), atol=1e-5, rtol=0)
    assert (want[0][0] - want[0][0].mean(-1, keepdim=True)).abs().max() > 1e-3  # not uniform


def check_geometry(net, layers, prefix):
    """``prefix`` prefix tokens counted from the embeddings, a 4x4 grid of 8 px on 32 px inputs."""
    assert net.num_prefix_tokens == prefix  # counted from the embeddings, not searched for
    geoms = infer_geometries(net, layers, (3, 32, 32))
    assert {(g.num_prefix_tokens, g.grid, g.pixels_per_token) for g in geoms.values()} == {
        (prefix, (4, 4), (8.0, 8.0))}


def check_capture_equals_eager(net, x, prefix, tag):
    """The oracle of the HF families: a model built with SDPA, captured (eager forced on every
    layer while installed, SDPA restored after), against its own eager ``output_attentions``."""
    set_attn(net, "sdpa")
    layers = find_attention_layers(net, (3, 32, 32))
    assert [l.rule.name for l in layers] == ["hf-eager-attention"] * 2
    got: dict[int, torch.Tensor] = {}
    with AttentionCapture(layers, lambda i, a: got.__setitem__(i, a.clone())), torch.no_grad():
        assert all(l.module.config._attn_implementation == "eager" for l in layers)
        net(x)
    assert all(l.module.config._attn_implementation == "sdpa" for l in layers)  # restored
    set_attn(net, "eager")
    with torch.no_grad():
        want = net(x, output_attentions=True).attentions
    check_against(got, want, layers, prefix, tag)
    check_geometry(net, layers, prefix)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_capture_equals_hf_eager_attentions_and_geometry(family):
    check_capture_equals_eager(resolve_model(build(family)).model, images(), FAMILIES[family][1], family)


def test_beit_relative_bias_is_in_the_probabilities():
    """Zeroing BEiT's relative position bias tables changes the captured probabilities."""
    net = resolve_model(build("beit")).model
    layers = find_attention_layers(net)
    x = images()

    def run():
        out = {}
        with AttentionCapture(layers, lambda i, a: out.__setitem__(i, a.clone())), torch.no_grad():
            net(x)
        return out

    with torch.no_grad():
        for name, p in net.named_parameters():
            if "relative_position_bias_table" in name:
                p.normal_(0, 1.0)
    with_bias = run()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "relative_position_bias_table" in name:
                p.zero_()
    assert (run()[0] - with_bias[0]).abs().max() > 1e-2


def test_mae_encoder_keeps_every_patch_in_order():
    net = resolve_model(build("vit_mae")).model
    assert net.config.mask_ratio == 0.0
    with torch.no_grad():
        a = net(images()).last_hidden_state
        b = net(images()).last_hidden_state
    assert a.shape[1] == 17 and torch.equal(a, b)  # no random masking or shuffling


@pytest.mark.parametrize("family", [f for f, v in FAMILIES.items() if v[2]])
def test_attribution_gates(family):
    net = resolve_model(build(family)).model
    x = images()
    layers = find_attention_layers(net)
    names = {l.index: l.name for l in layers}
    with torch.no_grad():
        ref = net(x).logits
        with HeadGates(net, names) as gates:
            gates.set(torch.ones(gates.num_features))
            assert torch.equal(net(x).logits, ref)
    # planted: only head 1 of the last layer reaches the logits
    keep = (layers[-1].index, 1)
    for l in layers:
        zero_heads_except(getattr(l.module, "o_proj", None) or l.module.out_proj, 4, l.index, keep)
    att = attribute_heads(net, x, methods=("ig", "ablation"), layers=names, n_steps=8)
    assert_all_importance_on(att, keep, family)


def test_attribution_on_an_encoder_is_skipped_with_the_reason():
    """ViT-MAE's encoder returns tokens, not class scores: attribution is skipped (not a crash
    after the capture pass), the rest of the analysis is there."""
    import probe

    r = probe.analyze(build("vit_mae"), images(3), attribution="ig", attribution_images=2, progress=False,
                      conv_test=False, fits=False, n_bootstrap=0)
    assert "not (batch, classes) logits" in r.meta["attribution_skipped"]
    assert "attribution" in r.meta["analyses_skipped"] and "importance_ig" not in r.heads
    assert len(r.heads) == 2 * 4
