"""User modules: ``nn.TransformerEncoderLayer`` models (fast path), ``F.scaled_dot_product_attention``
and hand-written softmax attention (functional fallback), given as ``--model module:factory`` with
``--weights``; input transform from ``pretrained_cfg`` or options; grayscale; the real third-party
CIFAR-10 ViT end to end.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

import attention_math as am
import family_models as fm
import probe
from probe.capture import AttentionCapture, find_attention_layers, infer_geometries
from probe.cli import app
from probe.data import collect_images, eval_transform, iter_batches
from probe.errors import ProbeError
from probe.families.functional import explicit_sdpa

TOL = 1e-5
REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
CIFAR_WEIGHTS = SHARED / "custom-vit-cifar10" / "vit_cifar10.pth"
CIFAR_IMAGES = SHARED / "cifar10-test"
CIFAR_MEAN, CIFAR_STD = "0.4914,0.4822,0.4465", "0.2023,0.1994,0.2010"


def build(factory: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return getattr(fm, factory)().eval()


def capture_all(model, x):
    layers = find_attention_layers(model, tuple(x.shape[1:]))
    got = {l.index: [] for l in layers}
    inputs = {}

    def keep(index):
        def hook(mod, args, kwargs):
            inputs.setdefault(index, (list(args) + list(kwargs.values()))[0].detach().clone())
        return hook

    hooks = [l.module.register_forward_pre_hook(keep(l.index), with_kwargs=True) for l in layers]
    try:
        with AttentionCapture(layers, lambda i, a: got[i].append(a.clone())), torch.no_grad():
            out = model(x)
    finally:
        for h in hooks:
            h.remove()
    return layers, {i: torch.cat(v) for i, v in got.items()}, inputs, out


USER = {
    # factory: (input shape, rule name, oracle)
    "encoder_vit": ((3, 32, 32), "torch-multihead-attention", "multihead"),
    "encoder_vit_bf": ((3, 32, 32), "torch-multihead-attention", "multihead"),
    "sdpa_vit": ((3, 32, 32), "functional-fallback (F.scaled_dot_product_attention)", "user_sdpa"),
    "handwritten_vit": ((3, 32, 32), "functional-fallback (softmax)", "user_hand"),
    "gray_vit": ((1, 32, 24), "functional-fallback (softmax)", "user_hand"),
}


@pytest.mark.parametrize("factory", sorted(USER))
def test_user_attention_equals_explicit_math(factory):
    shape, rule, oracle = USER[factory]
    model = build(factory)
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain = model(x)
    layers, got, inputs, hooked = capture_all(model, x)
    assert len(layers) == 2 and {l.rule.name for l in layers} == {rule}
    for layer in layers:
        want = getattr(am, oracle)(layer.module, inputs[layer.index])
        assert got[layer.index].shape == want.shape == (3, 4, want.shape[-1], want.shape[-1])
        assert torch.allclose(got[layer.index].double(), want, atol=TOL, rtol=0), layer.name
    assert torch.allclose(plain, hooked, atol=TOL)  # capture does not change what the model computes
    assert "forward" not in vars(model)


def test_encoder_fast_path_skips_attention_module_unless_captured():
    """Why the fast path must be switched off: in eval/no_grad ``nn.TransformerEncoderLayer``
    never calls its ``self_attn`` — with the capture installed it does, and the flag is restored."""
    model = build("encoder_vit_bf")
    mha = [m for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention)]
    calls = []

    def counting(forward):  # not a hook: hooks alone disable the encoder layer's fast path
        def wrapped(*args, **kwargs):
            calls.append(1)
            return forward(*args, **kwargs)
        return wrapped

    for m in mha:
        m.forward = counting(m.forward)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model(x)
    assert calls == []  # the fused fast path bypassed the attention modules
    layers = find_attention_layers(model)
    got = []
    with AttentionCapture(layers, lambda i, a: got.append(i)), torch.no_grad():
        model(x)
    assert len(calls) == 2 and got == [0, 1]
    assert torch.backends.mha.get_fastpath_enabled()
    assert all(vars(m)["forward"].__name__ == "wrapped" for m in mha)  # the user's own override is back


def test_fallback_only_without_module_rule():
    assert {l.rule.name for l in find_attention_layers(build("encoder_vit"), (3, 32, 32))} == {"torch-multihead-attention"}
    names = [l.name for l in find_attention_layers(build("sdpa_vit"), (3, 32, 32))]
    assert names == ["blocks.0.attn:sdpa", "blocks.1.attn:sdpa"]
    assert find_attention_layers(build("sdpa_vit")) == []  # no input shape: no forward pass, no fallback


@pytest.mark.parametrize("case", ["plain", "bool_mask", "float_mask", "causal", "scale", "gqa"])
def test_explicit_sdpa_matches_torch(case):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, 6, 8, generator=g) for _ in range(3))
    kwargs = {}
    if case == "bool_mask":
        kwargs["attn_mask"] = torch.rand(6, 6, generator=g) > 0.3
        kwargs["attn_mask"].fill_diagonal_(True)
    elif case == "float_mask":
        kwargs["attn_mask"] = torch.randn(2, 1, 6, 6, generator=g)
    elif case == "causal":
        kwargs["is_causal"] = True
    elif case == "scale":
        kwargs["scale"] = 0.3
    elif case == "gqa":
        k, v = k[:, :2], v[:, :2]
        kwargs["enable_gqa"] = True
    out, probs = explicit_sdpa(q, k, v, **kwargs)
    assert torch.allclose(out, F.scaled_dot_product_attention(q, k, v, **kwargs), atol=TOL)
    assert torch.allclose(probs.sum(-1), torch.ones(2, 4, 6), atol=TOL)


# ----------------------------------------------------------------------------------------------
# geometry and input transform
# ----------------------------------------------------------------------------------------------
def test_geometry_inferred_for_user_models():
    geo = {}
    for factory, (shape, _, _) in USER.items():
        model = build(factory)
        layers = find_attention_layers(model, shape)
        geo[factory] = {(g.num_prefix_tokens, g.grid, g.pixels_per_token)
                        for g in infer_geometries(model, layers, shape).values()}
    assert geo["encoder_vit"] == geo["encoder_vit_bf"] == {(1, (4, 4), (8.0, 8.0))}
    assert geo["sdpa_vit"] == {(2, (4, 4), (8.0, 8.0))}  # class + register token found from the count
    assert geo["handwritten_vit"] == {(1, (4, 4), (8.0, 8.0))}
    assert geo["gray_vit"] == {(1, (4, 3), (8.0, 8.0))}  # 32x24 input, non-square grid


def test_input_transform_from_pretrained_cfg_and_options():
    _, cfg = eval_transform(build("gray_vit"))
    assert cfg["input_size"] == (1, 32, 24) and cfg["mean"] == (0.5,) and cfg["std"] == (0.25,)
    assert cfg["interpolation"] == "bilinear" and cfg["crop_pct"] == 1.0
    _, cfg = eval_transform(build("sdpa_vit"), {"input_size": (3, 32, 32), "mean": (0.1, 0.2, 0.3), "std": (1, 2, 3)})
    assert cfg["input_size"] == (3, 32, 32) and cfg["mean"] == (0.1, 0.2, 0.3) and cfg["std"] == (1.0, 2.0, 3.0)
    _, cfg = eval_transform(build("gray_vit"), {"mean": (0.4, 0.4, 0.4)})  # a repeated value fits 1 channel
    assert cfg["mean"] == (0.4,)
    with pytest.raises(ProbeError, match="1 input channel.*--mean"):
        eval_transform(build("gray_vit"), {"mean": (0.485, 0.456, 0.406)})


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(1)
    for i in range(3):
        small = rng.integers(0, 256, size=(5, 4, 3), dtype=np.uint8)
        Image.fromarray(small).resize((40, 50), Image.BILINEAR).save(d / f"p{i}.jpg")
    return d


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A trained-weights stand-in for each user model: its seeded state dict saved to a file
    (safetensors, or a plain torch state_dict for the .pth case)."""
    d = tmp_path_factory.mktemp("weights")
    out = {}
    for i, factory in enumerate(USER):
        torch.manual_seed(100 + i)
        sd = {k: v.contiguous() for k, v in getattr(fm, factory)().state_dict().items()}
        if factory == "encoder_vit":
            path = d / f"{factory}.pth"
            torch.save(sd, path)
        else:
            path = d / f"{factory}.safetensors"
            save_file(sd, str(path))
        out[factory] = path
    return out


OPTIONS = {
    "encoder_vit": [],
    "encoder_vit_bf": [],
    "sdpa_vit": ["--input-size", "3,32,32", "--mean", "0.5,0.5,0.5", "--std", "0.2,0.2,0.2"],
    "handwritten_vit": ["--prefix-tokens", "1", "--grid", "4x4", "--patch-size", "8"],
    "gray_vit": [],
}
LIB_OPTIONS = {
    "encoder_vit": {},
    "encoder_vit_bf": {},
    "sdpa_vit": {"data_overrides": {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.2,) * 3}},
    "handwritten_vit": {"prefix_tokens": 1, "grid": (4, 4), "patch_size": 8},
    "gray_vit": {},
}


def run_cli(args):
    result = CliRunner().invoke(app, ["analyze", *args])
    return result.exit_code, " ".join(result.output.split())


@pytest.mark.parametrize("factory", sorted(USER))
def test_user_model_cli_and_library_identical(factory, image_dir, weights, tmp_path):
    out = tmp_path / "cli"
    code, text = run_cli(["--model", f"family_models:{factory}", "--weights", str(weights[factory]),
                          "--images", str(image_dir), "--out", str(out), *OPTIONS[factory]])
    assert code == 0, text
    lib = probe.analyze(f"family_models:{factory}", str(image_dir), weights=weights[factory], **LIB_OPTIONS[factory])
    assert (out / "heads.csv").read_text() == lib.heads.to_csv(index=False)
    assert lib.meta["weights"] == str(weights[factory])
    assert lib.meta["data_config"]["input_size"][0] == USER[factory][0][0]
    assert len(lib.heads) == 2 * 4


def test_user_model_with_wrong_input_size_is_refused(image_dir, weights):
    with pytest.raises(ProbeError, match=r"TinyViT: the forward pass on a zero image of shape \(1, 3, 224, 224\) failed.*--input-size"):
        probe.analyze("family_models:sdpa_vit", str(image_dir), weights=weights["sdpa_vit"])


# ----------------------------------------------------------------------------------------------
# the real third-party CIFAR-10 ViT
# ----------------------------------------------------------------------------------------------
needs_cifar = pytest.mark.skipif(
    not (CIFAR_WEIGHTS.is_file() and CIFAR_IMAGES.is_dir()),
    reason=f"shared CIFAR-10 data not found at {SHARED} (checkpoint and cifar10-test)",
)


@pytest.fixture()
def repo_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))


@pytest.mark.slow
@needs_cifar
def test_cifar_checkpoint_loads_and_classifies(repo_on_path):
    """The weights loaded right: accuracy on 200 test photos far above chance (README: 71.7 %)."""
    from examples.cifar_vit import CLASSES

    resolved = probe.models.resolve_model("examples.cifar_vit:build", weights=CIFAR_WEIGHTS)
    transform, _ = eval_transform(resolved.model)
    images = collect_images(CIFAR_IMAGES, num_images=200, seed=0)
    correct = total = 0
    with torch.no_grad():
        for batch, names in iter_batches(images, transform, 50):
            labels = torch.tensor([CLASSES.index(Path(n).parent.name) for n in names])
            correct += int((resolved.model(batch).argmax(1) == labels).sum())
            total += len(names)
    assert total == 200
    assert correct / total > 0.60


@pytest.mark.slow
@needs_cifar
def test_cifar_vit_end_to_end(repo_on_path, tmp_path):
    out = tmp_path / "cifar"
    code, text = run_cli(["--model", "examples.cifar_vit:build", "--weights", str(CIFAR_WEIGHTS),
                          "--images", str(CIFAR_IMAGES), "--num-images", "64", "--input-size", "3,32,32",
                          "--mean", CIFAR_MEAN, "--std", CIFAR_STD, "--out", str(out)])
    assert code == 0, text
    heads = (out / "heads.csv").read_text()
    assert (out / "report.html").stat().st_size > 10_000
    lib = probe.analyze("examples.cifar_vit:build", str(CIFAR_IMAGES), weights=CIFAR_WEIGHTS, num_images=64,
                        data_overrides={"input_size": (3, 32, 32), "mean": (0.4914, 0.4822, 0.4465),
                                        "std": (0.2023, 0.1994, 0.2010)})
    assert heads == lib.heads.to_csv(index=False)
    assert lib.meta["num_images"] == 64 and lib.meta["capture_rule"] == ["torch-multihead-attention"]
    assert len(lib.heads) == 6 * 8  # 6 layers of 8 heads, per head (not averaged)
    assert {(g["num_prefix_tokens"], tuple(g["grid"]), tuple(g["pixels_per_token"]))
            for g in lib.meta["geometry_per_layer"].values()} == {(1, (8, 8), (4.0, 4.0))}
    # the model's own pretrained_cfg gives the same transform as the options
    cfg_run = probe.analyze("examples.cifar_vit:build", str(CIFAR_IMAGES), weights=CIFAR_WEIGHTS, num_images=64)
    assert cfg_run.heads.to_csv(index=False) == heads


# ----------------------------------------------------------------------------------------------
# the documented extension point
# ----------------------------------------------------------------------------------------------
class SoftmaxModuleAttention(torch.nn.Module):
    """A new attention module that applies an ``nn.Softmax`` submodule to its scores."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.to_q = torch.nn.Linear(dim, dim, bias=False)
        self.to_k = torch.nn.Linear(dim, dim, bias=False)
        self.to_v = torch.nn.Linear(dim, dim, bias=False)
        self.out = torch.nn.Linear(dim, dim)
        self.softmax = torch.nn.Softmax(dim=-1)

    def forward(self, x):
        b, n, c = x.shape
        split = lambda t: t.reshape(b, n, self.heads, c // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.to_q(x)), split(self.to_k(x)), split(self.to_v(x))
        attn = self.softmax(q @ k.transpose(-2, -1) * self.scale)
        return self.out((attn @ v).transpose(1, 2).reshape(b, n, c))


def test_documented_rule_extension():
    """The few lines of docs/capture.md register a rule that then captures the new module."""
    from probe import capture
    from probe.capture import CaptureRule, register_rule

    class MyAttentionRule(CaptureRule):
        name = "my-attention"

        def matches(self, module):
            return isinstance(module, SoftmaxModuleAttention)

        def install(self, module, emit):
            handle = module.softmax.register_forward_hook(lambda mod, inp, out: emit(out))
            return handle.remove

    rule = MyAttentionRule()
    register_rule(rule)
    try:
        torch.manual_seed(0)
        model = fm.TinyViT(SoftmaxModuleAttention).eval()
        x = torch.randn(2, 3, 32, 32)
        layers, got, inputs, _ = capture_all(model, x)
        assert [(l.name, l.rule.name) for l in layers] == [("blocks.0.attn", "my-attention"), ("blocks.1.attn", "my-attention")]
        for layer in layers:
            assert torch.allclose(got[layer.index].double(), am.user_hand(layer.module, inputs[layer.index]), atol=TOL)
        assert not any(l.module.softmax._forward_hooks for l in layers)
    finally:
        capture._RULES.remove(rule)


def test_factory_found_from_current_directory_or_file(tmp_path, monkeypatch):
    """The ``probe`` console script does not put the working directory on sys.path: a user's
    module there is still found, and ``path/to/file.py:factory`` loads a file."""
    import sys

    from probe.models import resolve_model

    (tmp_path / "cwd_user_vit.py").write_text("from family_models import handwritten_vit as build\n")
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "file_user_vit.py").write_text("from family_models import sdpa_vit as build\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    for name in ("cwd_user_vit", "file_user_vit"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    r = resolve_model("cwd_user_vit:build", random_init=True)
    assert type(r.model).__name__ == "TinyViT" and r.model.pretrained_cfg["mean"] == (0.5, 0.5, 0.5)
    assert str(tmp_path) not in sys.path
    r = resolve_model(str(sub / "file_user_vit.py") + ":build", random_init=True)
    assert isinstance(r.model.blocks[0].attn, fm.SdpaAttention)
    with pytest.raises(ProbeError, match="cannot import 'no_such_user_module'.*PYTHONPATH"):
        resolve_model("no_such_user_module:build", random_init=True)
    with pytest.raises(ProbeError, match="not found"):
        resolve_model("missing/file.py:build", random_init=True)
