"""Hugging Face ``transformers`` vision families added after a sweep of the installed zoo: ViT-MSN,
I-JEPA, DINOv3 ViT, AIMv2 / MetaCLIP 2 / MLCD vision towers, DPT's ViT backbone, Data2Vec-Vision
(rule ``hf-data2vec-vision``), Donut's Swin encoder (rule ``hf-swin-windows``) — and the families
probe refuses, with their reasons — random weights from tiny configs, no downloads.

Oracle: ``transformers``' own eager attention returned by ``output_attentions=True`` (its output
recorder, an independent code path from probe's hooks), for a model captured while built with SDPA
(capture must force eager and restore SDPA). Data2Vec-Vision picks its self-attention class when
built, so the oracle is a second model built eager with the same weights. Donut's window attention
is checked by the explicit scatter of tests/test_hf_swin.py. Geometry: the prefix tokens of each
family (class token, registers, CLIP's class embedding, none) and the 4 x 4 patch grid.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import probe  # noqa: E402
from probe.attribution import HeadGates  # noqa: E402
from probe.capture import AttentionCapture, find_attention_layers, infer_geometries  # noqa: E402
from probe.errors import ProbeError  # noqa: E402
from probe.families.hf import REFUSED_FAMILIES, data_config_from_processor  # noqa: E402
from probe.models import resolve_model  # noqa: E402

from test_hf_families import check_against, check_capture_equals_eager, check_geometry  # noqa: E402

V = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
         intermediate_size=64)


def _need(*names):
    missing = [n for n in names if not hasattr(transformers, n)]
    if missing:
        pytest.skip(f"transformers {transformers.__version__} has no {', '.join(missing)}")
    return [getattr(transformers, n) for n in names]


def _vit_msn():
    m, c = _need("ViTMSNForImageClassification", "ViTMSNConfig")
    return m(c(**V, num_labels=5))


def _ijepa():
    m, c = _need("IJepaForImageClassification", "IJepaConfig")
    return m(c(**V, num_labels=5))


def _dinov3():
    m, c = _need("DINOv3ViTModel", "DINOv3ViTConfig")
    return m(c(**V, num_register_tokens=2))


def _aimv2():
    m, c = _need("Aimv2VisionModel", "Aimv2VisionConfig")
    return m(c(**V))


def _metaclip2():
    m, c = _need("MetaClip2VisionModel", "MetaClip2VisionConfig")
    return m(c(**V))


def _mlcd():
    m, c = _need("MLCDVisionModel", "MLCDVisionConfig")
    return m(c(**V))


def _dpt():
    m, c = _need("DPTModel", "DPTConfig")
    return m(c(**V, neck_hidden_sizes=[8, 8], fusion_hidden_size=8, backbone_out_indices=[0, 1],
               reassemble_factors=[1, 1]))


#: family -> (builder, prefix tokens)
FAMILIES = {
    "vit_msn": (_vit_msn, 1),
    "ijepa": (_ijepa, 0),
    "dinov3_vit": (_dinov3, 3),  # class + 2 registers
    "aimv2": (_aimv2, 0),
    "metaclip_2": (_metaclip2, 1),
    "mlcd": (_mlcd, 1),
    "dpt": (_dpt, 1),
}


def _spread(net):
    """Weights ~ N(0, 0.3) so the attention is far from uniform."""
    with torch.no_grad():
        for _, p in net.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return net.eval()


def build(family: str):
    torch.manual_seed(0)
    return _spread(FAMILIES[family][0]())


def images(n=2, size=32):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def capture(net, layers, x):
    got: dict[int, torch.Tensor] = {}
    with AttentionCapture(layers, lambda i, a: got.__setitem__(i, a.clone())), torch.no_grad():
        net(x)
    return got


def check_gates(net, layers, x, ref):
    """Head gates at 1 leave the logits ``ref`` bit-identical; zeroing the 4 heads of the last
    layer changes them (call under ``torch.no_grad()``)."""
    with HeadGates(net, {l.index: l.name for l in layers}) as gates:
        gates.set(torch.ones(gates.num_features))
        assert torch.equal(net(x).logits, ref)
        g = torch.ones(gates.num_features)
        g[-4:] = 0.0
        gates.set(g)
        assert (net(x).logits - ref).abs().max() > 1e-4


@pytest.mark.parametrize("family", list(FAMILIES))
def test_capture_equals_hf_eager_attentions_and_geometry(family):
    check_capture_equals_eager(resolve_model(build(family)).model, images(), FAMILIES[family][1], family)


@pytest.mark.parametrize("family", ["vit_msn", "ijepa"])
def test_head_gates_on_classifiers(family):
    """Gates at 1 leave the logits bit-identical; zeroing the heads of the last layer changes them."""
    net = resolve_model(build(family)).model
    layers = find_attention_layers(net)
    x = images()
    with torch.no_grad():
        check_gates(net, layers, x, net(x).logits)


def _data2vec(impl: str, shared: bool):
    cfg = transformers.Data2VecVisionConfig(**V, use_relative_position_bias=not shared,
                                            use_shared_relative_position_bias=shared, num_labels=5)
    cfg._attn_implementation = impl
    torch.manual_seed(0)
    net = transformers.Data2VecVisionForImageClassification(cfg)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
            elif "lambda" in name:  # layer scale (0.1)
                p.fill_(1.0)
    return net.eval()


@pytest.mark.parametrize("shared", [False, True], ids=["layer-bias", "shared-bias"])
def test_data2vec_vision_sdpa_model_equals_eager_copy(shared):
    """Captured from the SDPA-built model (the rule switches its self-attention class to eager while
    installed); oracle: the eager-built copy's ``output_attentions``, relative bias included."""
    _need("Data2VecVisionForImageClassification")
    sdpa = _data2vec("sdpa", shared)
    eager = _data2vec("eager", shared)
    eager.load_state_dict(sdpa.state_dict())
    net = resolve_model(sdpa).model
    layers = find_attention_layers(net, (3, 32, 32))
    assert [l.rule.name for l in layers] == ["hf-data2vec-vision"] * 2
    sdpa_cls = type(layers[0].module.attention)
    assert "Sdpa" in sdpa_cls.__name__
    x = images()
    got = capture(net, layers, x)
    assert all(type(l.module.attention) is sdpa_cls for l in layers)  # class restored
    with torch.no_grad():
        out = eager(x, output_attentions=True)
        ref = net(x).logits
    check_against(got, out.attentions, layers, 1, "data2vec")
    check_geometry(net, layers, 1)
    torch.testing.assert_close(ref, out.logits, atol=1e-5, rtol=0)
    # head gates on output.dense: all ones change nothing; zeroing every head of the last layer does
    with torch.no_grad():
        check_gates(net, layers, x, ref)


def test_data2vec_vision_relative_bias_is_in_the_probabilities():
    _need("Data2VecVisionForImageClassification")
    net = resolve_model(_data2vec("eager", False)).model
    layers = find_attention_layers(net)
    x = images()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "relative_position_bias_table" in name:
                p.normal_(0, 1.0)
    with_bias = capture(net, layers, x)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "relative_position_bias_table" in name:
                p.zero_()
    assert (capture(net, layers, x)[0] - with_bias[0]).abs().max() > 1e-2


def test_donut_swin_windows_on_the_image_grid():
    """Donut's Swin encoder goes through the Swin window rule; oracle: the explicit scatter of the
    window attentions transformers computed (tests/test_hf_swin.py)."""
    m, c = _need("DonutSwinForImageClassification", "DonutSwinConfig")
    from test_hf_swin import TINY, hf_window_attentions, scatter

    torch.manual_seed(0)
    net = resolve_model(_spread(m(c(**TINY)))).model
    x = images()
    layers = find_attention_layers(net, (3, 32, 32))
    assert [l.rule.name for l in layers] == ["hf-swin-windows"] * 4
    got = capture(net, layers, x)
    rec, _ = hf_window_attentions(net, layers, x)
    for l in layers:
        r = rec[l.index]
        want = scatter(r["win"], r["grid"], r["window"], r["shift"])
        err = (got[l.index].double() - want).abs().max()
        assert err < 1e-5, (l.name, float(err))
    geoms = infer_geometries(net, layers, (3, 32, 32))
    assert [(g.num_prefix_tokens, g.grid) for g in geoms.values()] == [(0, (16, 16))] * 2 + [(0, (8, 8))] * 2


def test_analyze_through_a_saved_folder():
    """``hf:FOLDER`` loads the folder's weights (not a random init): the captured attention of the
    folder model equals the in-memory model's."""
    net = build("ijepa")
    x = images()
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        net.save_pretrained(tmp)
        loaded = resolve_model(f"hf:{tmp}")
        assert "local folder" in loaded.weights
        a = capture(loaded.model, find_attention_layers(loaded.model), x)
        b = capture(resolve_model(net).model, find_attention_layers(net), x)
        assert all(torch.equal(a[i], b[i]) for i in b)
        r = probe.analyze(f"hf:{tmp}", x, progress=False, conv_test=False, fits=False, n_bootstrap=0,
                          attribution="none")
    assert len(r.heads) == 2 * 4


def test_model_saved_without_pooler_loads(tmp_path):
    """A ``ViTModel(add_pooling_layer=False)`` folder loads into ``ViTModel`` (which builds a
    pooler): the pooler is a head, not backbone."""
    torch.manual_seed(0)
    transformers.ViTModel(transformers.ViTConfig(**V), add_pooling_layer=False).save_pretrained(tmp_path)
    r = resolve_model(f"hf:{tmp_path}")
    assert "pooler" in r.weights  # reported as random head


def test_dinov3_checkpoint_missing_embeddings_is_refused(tmp_path):
    """DINOv3ViTModel's ``base_model`` is its encoder (``model``); the embeddings beside it are
    backbone too: a checkpoint without them is refused, not completed with random tensors."""
    from safetensors.torch import load_file, save_file

    build("dinov3_vit").save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    kept = {k: v for k, v in sd.items() if not k.startswith("embeddings.patch_embeddings")}
    assert len(kept) < len(sd)
    save_file(kept, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ProbeError, match="do not cover"):
        resolve_model(f"hf:{tmp_path}")


def test_clip_vision_tower_gets_clip_normalisation():
    """``clip_vision_model`` (CLIPVisionModel) is the CLIP family: CLIP's mean/std without a
    preprocessor config, not the 0.5 fallback."""
    cfg = transformers.CLIPVisionConfig(**V)
    assert cfg.model_type == "clip_vision_model"
    assert data_config_from_processor(cfg, None)["mean"] == (0.48145466, 0.4578275, 0.40821073)


def _cfg(name, **kw):
    return lambda: getattr(transformers, name)(**kw)


#: model_type -> config builder (saved without weights: the refusal must come before loading them)
REFUSED = {
    "yolos": _cfg("YolosConfig", **{**V, "image_size": [32, 32]}, num_detection_tokens=3),
    "levit": _cfg("LevitConfig"),
    "pvt": _cfg("PvtConfig"),
    "pvt_v2": _cfg("PvtV2Config"),
    "segformer": _cfg("SegformerConfig"),
    "mobilevit": _cfg("MobileViTConfig"),
    "mobilevitv2": _cfg("MobileViTV2Config"),
    "hiera": _cfg("HieraConfig"),
    "cvt": _cfg("CvtConfig"),
    "vitdet": _cfg("VitDetConfig"),
    "siglip2_vision_model": _cfg("Siglip2VisionConfig"),
    "swiftformer": _cfg("SwiftFormerConfig"),
    "focalnet": _cfg("FocalNetConfig"),
    "poolformer": _cfg("PoolFormerConfig"),
    "imagegpt": _cfg("ImageGPTConfig"),
}

#: model_type -> a phrase its refusal must contain (what the family does)
WHY = {
    "yolos": "AFTER the patch tokens", "levit": "Subsample", "pvt": "spatial-reduction",
    "pvt_v2": "spatial-reduction", "segformer": "sr_ratio", "mobilevit": "unfolds",
    "mobilevitv2": "separable linear", "hiera": "mask units", "cvt": "stride_kv", "vitdet": "window",
    "siglip2_vision_model": "pre-patchified", "swiftformer": "additive", "focalnet": "modulation",
    "poolformer": "pooling", "imagegpt": "causally",
}


@pytest.mark.parametrize("model_type", list(REFUSED))
def test_refused_family_is_named_with_its_reason_before_loading(model_type, tmp_path):
    try:
        cfg = REFUSED[model_type]()
    except AttributeError:
        pytest.skip(f"transformers {transformers.__version__} has no config for {model_type}")
    assert cfg.model_type == model_type
    cfg.save_pretrained(tmp_path)  # config only: a "no weights" error would mean work started
    with pytest.raises(ProbeError) as err:
        resolve_model(f"hf:{tmp_path}")
    msg = str(err.value)
    assert f"{model_type!r} is not supported" in msg and WHY[model_type] in msg, msg
    assert "model.safetensors" not in msg


@pytest.mark.parametrize("build_refused", [
    lambda: transformers.YolosModel(transformers.YolosConfig(**{**V, "image_size": [32, 32]}, num_detection_tokens=3)),
    lambda: transformers.SegformerForImageClassification(transformers.SegformerConfig(
        depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32], patch_sizes=[7, 3], strides=[4, 2],
        num_attention_heads=[1, 2], mlp_ratios=[2, 2], num_encoder_blocks=2, decoder_hidden_size=16)),
], ids=["yolos", "segformer"])
def test_refused_instance_is_named(build_refused):
    net = build_refused()
    with pytest.raises(ProbeError, match="is not supported"):
        probe.analyze(net, images(), progress=False, conv_test=False, fits=False, n_bootstrap=0, attribution="none")


def test_every_refusal_names_a_reason():
    assert all(len(why) > 30 for why in REFUSED_FAMILIES.values())
