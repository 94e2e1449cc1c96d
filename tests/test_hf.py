"""Hugging Face transformers ViT, DeiT, DINOv2 and DINOv2 with registers.

Oracles: attention probabilities recomputed by explicit math, softmax(q k^T / sqrt(d_head)), from
each attention module's own query/key weights applied to its own input (read by a forward
pre-hook); the prefix-token counts of the papers (ViT 1, DeiT 2 = class + distillation, DINOv2 1,
DINOv2 with registers 1 + R); the HF image processors' own output for the input transform; and,
on real weights, timm's independent implementation of the same network.

Models are tiny random ones written with ``save_pretrained`` (no downloads).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from PIL import Image  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

import probe  # noqa: E402
from probe.capture import AttentionCapture, find_attention_layers  # noqa: E402
from probe.cli import app  # noqa: E402
from probe.data import eval_transform  # noqa: E402
from probe.errors import ProbeError  # noqa: E402
from probe.families.hf import HFEagerAttentionRule  # noqa: E402
from probe.geometry import TokenGeometry  # noqa: E402
from probe.models import resolve_model  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"

SMALL = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=64, initializer_range=0.3)
REGISTERS = 3

#: family -> (config class, model class, extra config, prefix tokens from the papers)
FAMILIES = {
    "vit": ("ViTConfig", "ViTForImageClassification", {}, 1),
    "deit": ("DeiTConfig", "DeiTForImageClassificationWithTeacher", {}, 2),
    "dinov2": ("Dinov2Config", "Dinov2ForImageClassification", {}, 1),
    "dinov2_reg": ("Dinov2WithRegistersConfig", "Dinov2WithRegistersForImageClassification",
                   {"num_register_tokens": REGISTERS}, 1 + REGISTERS),
}


def build(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    cfg_name, model_name, extra, _ = FAMILIES[family]
    config = getattr(transformers, cfg_name)(**{**SMALL, **extra, **overrides})
    torch.manual_seed(seed)
    return getattr(transformers, model_name)(config).eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """One ``save_pretrained`` folder per family (config.json + model.safetensors)."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for i, family in enumerate(FAMILIES):
        out[family] = root / family
        build(family, seed=i).save_pretrained(out[family])
    return out


def _photo(rng: np.random.Generator, h: int, w: int) -> Image.Image:
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(xx / 5.0), np.cos(yy / 7.0), np.sin((xx + yy) / 9.0)], -1)
    arr = 127 + 100 * base + rng.normal(0, 20, (h, w, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Three generated photos of different sizes, as PNG files."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(40, 48), (64, 64), (50, 36)]):
        _photo(rng, h, w).save(root / f"img{i}.png")
    return root


def explicit_attention(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d_head)) in float64 from the module's q_proj / k_proj weights.

    Args:
        x: the module's input hidden states (B, T, D). Returns (B, H, T, T).
    """
    heads = module.config.num_attention_heads
    b, t, _ = x.shape
    x = x.double()

    def project(lin):
        y = x @ lin.weight.double().T + (lin.bias.double() if lin.bias is not None else 0.0)
        return y.view(b, t, heads, -1).permute(0, 2, 1, 3)

    q, k = project(module.q_proj), project(module.k_proj)
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)


class InputRecorder:
    """Forward pre-hooks keeping the last input of each attention module."""

    def __init__(self, model: torch.nn.Module):
        self.layers = [l for l in find_attention_layers(model) if isinstance(l.rule, HFEagerAttentionRule)]
        self.inputs: dict[int, torch.Tensor] = {}
        self.handles = [l.module.register_forward_pre_hook(self._hook(l.index), with_kwargs=True)
                        for l in self.layers]

    def _hook(self, index):
        def hook(mod, args, kwargs):
            self.inputs[index] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def reduce_explicit(attn: torch.Tensor, prefix: int) -> torch.Tensor:
    """Mean over images of the patch-query rows' patch-key part renormalised to 1 -> (H, P, P)."""
    patch = attn[:, :, prefix:, prefix:]
    return (patch / patch.sum(-1, keepdim=True)).mean(0)


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_capture_equals_explicit_math_and_geometry(folders, images, family):
    prefix = FAMILIES[family][3]
    rm = resolve_model(f"hf:{folders[family]}")
    net = rm.model
    assert net.config._attn_implementation == "eager"
    assert net.num_prefix_tokens == prefix
    assert rm.weights.startswith("local folder")

    # direct capture on one batch from the pipeline's own transform
    tf, cfg = eval_transform(net)
    batch = torch.stack([tf(Image.open(p).convert("RGB")) for p in sorted(images.glob("*.png"))])
    layers = find_attention_layers(net)
    assert [l.rule.name for l in layers] == ["hf-eager-attention"] * SMALL["num_hidden_layers"]
    got: dict[int, torch.Tensor] = {}
    rec = InputRecorder(net)
    try:
        with AttentionCapture(layers, lambda i, a: got.__setitem__(i, a.clone())), torch.no_grad():
            net(batch)
    finally:
        rec.remove()
    tokens = prefix + (32 // 8) ** 2
    for l in layers:
        assert got[l.index].shape == (3, SMALL["num_attention_heads"], tokens, tokens)
        want = explicit_attention(l.module, rec.inputs[l.index])
        torch.testing.assert_close(got[l.index].double(), want, atol=1e-5, rtol=0)

    # the whole pipeline: geometry and the reducer's mean attention against explicit math
    rec = InputRecorder(net)
    try:
        result = probe.analyze(rm, images, n_bootstrap=5)
    finally:
        rec.remove()
    assert result.geometry == TokenGeometry(prefix, (4, 4), (8.0, 8.0))
    assert result.meta["capture_rule"] == ["hf-eager-attention"]
    assert len(result.heads) == SMALL["num_hidden_layers"] * SMALL["num_attention_heads"]
    for l in layers:
        want = reduce_explicit(explicit_attention(l.module, rec.inputs[l.index]), prefix)
        torch.testing.assert_close(result.stats[l.index].mean_attn.double(), want, atol=1e-5, rtol=0)
    # attention is not trivially uniform with these weights, so the comparison can fail
    assert result.heads["entropy_norm"].min() < 0.95


def test_registers_counted_not_guessed(tmp_path):
    """DINOv2 with 5 registers on a 2x2 grid has 10 tokens: guessing would split them as
    1 prefix + 3x3 patches; the model's own embeddings say 6 + 2x2."""
    net = build("dinov2_reg", num_register_tokens=5, image_size=16)
    net.save_pretrained(tmp_path / "reg5")
    result = probe.analyze(f"hf:{tmp_path / 'reg5'}", [_photo(np.random.default_rng(1), 20, 20)],
                           n_bootstrap=2)
    assert result.geometry == TokenGeometry(6, (2, 2), (8.0, 8.0))
    assert result.stats[0].mean_attn.shape == (SMALL["num_attention_heads"], 4, 4)


def test_sdpa_model_in_memory_is_captured_and_restored(images):
    """A model built with SDPA returns no attention weights; capture forces eager and restores."""
    net = build("deit")
    net.config._attn_implementation = "sdpa"
    layer = find_attention_layers(net)[0]
    outs = []
    h = layer.module.register_forward_hook(lambda m, i, o: outs.append(o[1]))
    with torch.no_grad():
        net(torch.zeros(1, 3, 32, 32))
    h.remove()
    assert outs == [None]  # the failure mode the rule exists for

    rec = InputRecorder(net)
    try:
        result = probe.analyze(net, images, n_bootstrap=2)
    finally:
        rec.remove()
    assert net.config._attn_implementation == "sdpa"
    assert result.geometry.num_prefix_tokens == 2
    want = reduce_explicit(explicit_attention(layer.module, rec.inputs[0]), 2)
    torch.testing.assert_close(result.stats[0].mean_attn.double(), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_cli_and_library_give_identical_tables(folders, images, tmp_path, family):
    res = CliRunner().invoke(app, ["analyze", "--model", f"hf:{folders[family]}", "--images", str(images),
                                   "--out", str(tmp_path / "cli"), "--layers", "0-1", "--seed", "3"])
    assert res.exit_code == 0, res.output
    lib = probe.analyze(f"hf:{folders[family]}", str(images), layers="0-1", seed=3)
    lib.write_report(tmp_path / "lib")
    for name in ("heads.csv", "layers.csv"):
        cli_text = (tmp_path / "cli" / name).read_text()
        assert cli_text == (tmp_path / "lib" / name).read_text()
    assert len(cli_text.splitlines()) > 1


def test_folder_without_prefix_is_recognised(folders):
    rm = resolve_model(str(folders["vit"]))
    assert rm.name == f"hf:{folders['vit']}"
    assert type(rm.model).__name__ == "ViTForImageClassification"


@pytest.mark.parametrize("family,size,grid", [("vit", 48, (6, 6)), ("deit", 48, (6, 6)), ("dinov2", 40, (5, 5))])
def test_other_input_size_interpolates_position_embeddings(folders, images, family, size, grid):
    rm = resolve_model(f"hf:{folders[family]}")
    rec = InputRecorder(rm.model)
    try:
        result = probe.analyze(rm, images, data_overrides={"input_size": (3, size, size)}, n_bootstrap=2)
    finally:
        rec.remove()
    prefix = FAMILIES[family][3]
    assert result.geometry == TokenGeometry(prefix, grid, (8.0, 8.0))
    layer = rec.layers[1]
    want = reduce_explicit(explicit_attention(layer.module, rec.inputs[1]), prefix)
    torch.testing.assert_close(result.stats[1].mean_attn.double(), want, atol=1e-5, rtol=0)


PROCESSORS = {
    # DeiT: squash-resize to 40x40, center crop 32 (crop_pct 0.8), bicubic
    "deit": ({"image_processor_type": "DeiTImageProcessor", "do_resize": True, "size": {"height": 40, "width": 40},
              "resample": 3, "do_center_crop": True, "crop_size": {"height": 32, "width": 32},
              "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
              "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]},
             {"input_size": (3, 32, 32), "crop_pct": 0.8, "crop_mode": "squash", "interpolation": "bicubic"}),
    # ViT: squash-resize to 32x32, no crop, bilinear, 0.5 normalisation
    "vit": ({"image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": 32, "width": 32},
             "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
             "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]},
            {"input_size": (3, 32, 32), "crop_pct": 1.0, "crop_mode": "squash", "interpolation": "bilinear"}),
    # DINOv2: shortest edge to 40, center crop 32 (crop_pct 0.8), bicubic
    "dinov2": ({"image_processor_type": "BitImageProcessor", "do_resize": True, "size": {"shortest_edge": 40},
                "resample": 3, "do_center_crop": True, "crop_size": {"height": 32, "width": 32},
                "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]},
               {"input_size": (3, 32, 32), "crop_pct": 0.8, "crop_mode": "center", "interpolation": "bicubic"}),
}


@pytest.mark.parametrize("family", list(PROCESSORS))
def test_input_transform_matches_the_image_processor(tmp_path, family):
    proc_cfg, expected = PROCESSORS[family]
    folder = tmp_path / family
    build(family).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(proc_cfg))
    rm = resolve_model(f"hf:{folder}")
    tf, cfg = eval_transform(rm.model)
    for key, value in expected.items():
        assert cfg[key] == pytest.approx(value), key
    assert tuple(cfg["mean"]) == pytest.approx(proc_cfg["image_mean"])
    # 100x80 -> shortest edge 40 gives 50x40, an even margin: both center crops agree
    img = _photo(np.random.default_rng(2), 80, 100)
    try:
        proc = transformers.AutoImageProcessor.from_pretrained(folder, backend="pil")
    except (TypeError, ValueError, ImportError) as e:  # older transformers: no PIL backend switch
        pytest.skip(f"no PIL image processor backend: {e}")
    want = proc(img, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(tf(img), want, atol=1e-5, rtol=0)


def test_folder_without_processor_uses_config_size_and_family_normalisation(folders):
    cfg = resolve_model(f"hf:{folders['dinov2']}").pretrained_cfg
    assert cfg["input_size"] == (3, 32, 32)
    assert cfg["mean"] == pytest.approx((0.485, 0.456, 0.406))
    assert resolve_model(f"hf:{folders['vit']}").pretrained_cfg["mean"] == pytest.approx((0.5, 0.5, 0.5))


def test_unreachable_model_id_fails_clearly(monkeypatch, tmp_path):
    monkeypatch.setattr("probe.model_sources.checkpoint.hub_reachable", lambda *a, **k: False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ProbeError) as err:
        resolve_model("hf:probe-tests/no-such-vit")
    msg = str(err.value)
    assert "not reachable" in msg and "hf:DIR" in msg and "\n" not in msg
    res = CliRunner().invoke(app, ["analyze", "--model", "hf:probe-tests/no-such-vit", "--out", str(tmp_path)])
    assert res.exit_code == 2
    assert "hf:DIR" in " ".join(res.output.split())


def test_bad_folders_fail_clearly(tmp_path, folders):
    with pytest.raises(ProbeError, match="not a folder"):
        resolve_model(f"hf:{tmp_path / 'missing'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ProbeError, match="no config.json"):
        resolve_model(f"hf:{tmp_path / 'empty'}")
    # config only: no weights unless --random-init is explicit
    cfg_only = tmp_path / "cfg_only"
    build("vit").config.save_pretrained(cfg_only)
    with pytest.raises(ProbeError, match="random-init"):
        resolve_model(f"hf:{cfg_only}")
    a = resolve_model(f"hf:{cfg_only}", random_init=True, seed=5)
    b = resolve_model(f"hf:{cfg_only}", random_init=True, seed=5)
    assert a.weights == "random init (seed 5)"
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))
    # a checkpoint missing backbone tensors is refused, not silently re-initialised
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    build("vit").save_pretrained(broken)
    sd = load_file(broken / "model.safetensors")
    kept = {k: v for k, v in sd.items() if not re.search(r"layers?\.1\.attention", k)}
    assert len(kept) < len(sd)  # key names differ between transformers releases
    save_file(kept, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ProbeError, match="do not cover"):
        resolve_model(f"hf:{broken}")
    # an unsupported transformers family is named
    convnext = tmp_path / "convnext"  # no attention at all (Swin is supported: tests/test_hf_swin.py)
    transformers.ConvNextForImageClassification(transformers.ConvNextConfig(
        hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=2)).save_pretrained(convnext)
    with pytest.raises(ProbeError, match="convnext"):
        resolve_model(f"hf:{convnext}")
    with pytest.raises(ProbeError, match="exclude"):
        resolve_model(f"hf:{folders['vit']}", weights=convnext / "model.safetensors", random_init=True)


# ---------------------------------------------------------------------------------------------


def _timm_deit_to_hf_vit(sd: dict[str, torch.Tensor], hf: torch.nn.Module) -> None:
    """Copy timm DeiT-Tiny weights into a transformers ViTForImageClassification."""
    vit = hf.vit
    with torch.no_grad():
        vit.embeddings.cls_token.copy_(sd["cls_token"])
        vit.embeddings.position_embeddings.copy_(sd["pos_embed"])
        vit.embeddings.patch_embeddings.projection.weight.copy_(sd["patch_embed.proj.weight"])
        vit.embeddings.patch_embeddings.projection.bias.copy_(sd["patch_embed.proj.bias"])
        for i, layer in enumerate(vit.layers):
            p = f"blocks.{i}."
            qw, kw, vw = sd[p + "attn.qkv.weight"].chunk(3)
            qb, kb, vb = sd[p + "attn.qkv.bias"].chunk(3)
            att = layer.attention
            for lin, w, b in ((att.q_proj, qw, qb), (att.k_proj, kw, kb), (att.v_proj, vw, vb),
                              (att.o_proj, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])):
                lin.weight.copy_(w)
                lin.bias.copy_(b)
            for dst, src in ((layer.layernorm_before, "norm1"), (layer.layernorm_after, "norm2"),
                             (layer.mlp.fc1, "mlp.fc1"), (layer.mlp.fc2, "mlp.fc2")):
                dst.weight.copy_(sd[p + src + ".weight"])
                dst.bias.copy_(sd[p + src + ".bias"])
        vit.layernorm.weight.copy_(sd["norm.weight"])
        vit.layernorm.bias.copy_(sd["norm.bias"])
        hf.classifier.weight.copy_(sd["head.weight"])
        hf.classifier.bias.copy_(sd["head.bias"])


@pytest.mark.slow
def test_real_deit_tiny_weights_match_timm(tmp_path):
    """The same DeiT-Tiny weights in timm and in transformers' ViT give the same attention
    probabilities, tables and logits (two independent implementations)."""
    weights = SHARED / "weights" / "deit_tiny_patch16_224.safetensors"
    photos = sorted((SHARED / "imagenet-sample").glob("*.JPEG"))[:4]
    if not weights.is_file() or not photos:
        pytest.skip(f"shared data not found under {SHARED}")
    import timm
    from safetensors.torch import load_file

    sd = load_file(weights)
    config = transformers.ViTConfig(image_size=224, patch_size=16, hidden_size=192, num_hidden_layers=12,
                                    num_attention_heads=3, intermediate_size=768, layer_norm_eps=1e-6,
                                    num_labels=1000, qkv_bias=True)
    hf = transformers.ViTForImageClassification(config).eval()
    if not hasattr(hf.vit, "layers") or not hasattr(hf.vit.layers[0].attention, "q_proj"):
        pytest.skip("this transformers ViT has another module layout than the conversion expects")
    _timm_deit_to_hf_vit(sd, hf)
    hf.save_pretrained(tmp_path / "deit_tiny_hf")
    rm = resolve_model(f"hf:{tmp_path / 'deit_tiny_hf'}")
    tnet = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    tnet.load_state_dict(sd, strict=True)

    tf, _ = eval_transform(tnet)
    x = torch.stack([tf(Image.open(p).convert("RGB")) for p in photos])
    maps = {}
    for key, net in (("timm", tnet), ("hf", rm.model)):
        got = {}
        with AttentionCapture(find_attention_layers(net), lambda i, a: got.__setitem__(i, a.clone())), \
                torch.no_grad():
            out = net(x)
        maps[key] = (got, out if isinstance(out, torch.Tensor) else out.logits)
    assert len(maps["hf"][0]) == len(maps["timm"][0]) == 12
    for i in range(12):
        torch.testing.assert_close(maps["hf"][0][i], maps["timm"][0][i], atol=1e-5, rtol=0)
    torch.testing.assert_close(maps["hf"][1], maps["timm"][1], atol=1e-3, rtol=1e-4)

    overrides = {k: v for k, v in tnet.pretrained_cfg.items() if k in ("mean", "std", "crop_pct", "interpolation")}
    a = probe.analyze(rm, photos, layers="0,5,11", data_overrides=overrides, n_bootstrap=5)
    b = probe.analyze("deit_tiny", photos, weights=weights, layers="0,5,11", n_bootstrap=5)
    assert a.geometry == b.geometry == TokenGeometry(1, (14, 14), (16.0, 16.0))
    for col in ("mean_distance_px", "entropy_nats", "prefix_mass"):
        np.testing.assert_allclose(a.heads[col], b.heads[col], atol=1e-4, rtol=0)


def test_crop_pct_gives_back_the_resize_size():
    """timm resizes to floor(crop / crop_pct); for every crop <= resize < 600 that is the
    processor's resize size again (plain crop / resize is off by one for thousands of pairs)."""
    from probe.families.hf import _crop_pct

    pairs = [(c, r) for r in range(2, 600) for c in range(1, r + 1)]
    assert all(math.floor(c / _crop_pct(c, r)) == r for c, r in pairs)
    assert any(math.floor(c / (c / r)) != r for c, r in pairs)  # the case being guarded


def test_probe_works_without_transformers(tmp_path):
    """With transformers unimportable, probe still imports and an hf: model names the extra."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import probe\n"
        "from probe.models import resolve_model\n"
        "try:\n"
        "    resolve_model('hf:org/model')\n"
        "except probe.ProbeError as e:\n"
        "    print('ERR', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert out.returncode == 0, out.stderr
    assert "ERR" in out.stdout and "probe[hf]" in out.stdout


def test_dinov2_reference_configuration_geometry(tmp_path, images):
    """The released DINOv2-with-registers layout: position embeddings for 518 px (37x37 patches of
    14 px), 4 registers, processor resizing the shortest edge to 256 and cropping 224 -> the
    model interpolates to a 16x16 grid of 14 px tokens after 1 + 4 prefix tokens."""
    folder = tmp_path / "dinov2_reg_ref"
    build("dinov2_reg", image_size=518, patch_size=14, num_register_tokens=4, num_hidden_layers=1).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "BitImageProcessor", "do_resize": True, "size": {"shortest_edge": 256},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": 224, "width": 224},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}))
    result = probe.analyze(f"hf:{folder}", images, n_bootstrap=2)
    assert result.meta["data_config"]["input_size"] == [3, 224, 224]
    assert result.meta["data_config"]["crop_pct"] == pytest.approx(0.875)
    assert result.geometry == TokenGeometry(5, (16, 16), (14.0, 14.0))
