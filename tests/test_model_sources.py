"""Model sources (probe.model_sources): every built-in spec is recognised by exactly one source,
a source registered from outside the package is used by resolve_model and probe.analyze, unknown
specs fail clearly, the torchvision source's data config reproduces torchvision's own transform,
and the layering has no import circle (probe.models -> model_sources -> families, never back).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import probe
from probe import model_sources
from probe.errors import ProbeError
from probe.model_sources import ModelSource, find_source, register_source, sources, unregister_source
from probe.models import resolve_model

from conftest import tiny_vit

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# recognition


def _hf_folder(tmp_path: Path) -> Path:
    d = tmp_path / "hf-vit"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "vit"}))
    return d


SPECS = [
    (None, "embedded"),
    ("cordonnier", "embedded"),
    ("default", "embedded"),
    ("vit_tiny", "timm"),
    ("vit_small_patch16_224", "timm"),
    ("no_such_model_anywhere", "timm"),  # timm then refuses it with suggestions
    ("timm:vit_tiny", "timm"),
    ("timm.models.vision_transformer:vit_tiny_patch16_224", "factory"),
    ("hf:google/vit-base-patch16-224", "hf"),
    ("hf:./some/folder", "hf"),
    ("open_clip:ViT-B-32", "open_clip"),
    ("open_clip:ViT-B-32:laion2b_s34b_b79k", "open_clip"),
    ("torchvision:vit_b_16", "torchvision"),
    ("torchvision:vit_b_16:IMAGENET1K_V1", "torchvision"),
    ("probe.cordonnier:build", "factory"),
    ("examples/cifar_vit.py:build", "factory"),
    ("package.module:Class.build", "factory"),
]


@pytest.mark.parametrize("spec,expected", SPECS, ids=[str(s) for s, _ in SPECS])
def test_each_builtin_spec_is_recognised_by_exactly_the_right_source(spec, expected):
    claimed = [s.name for s in sources() if s.handles(spec)]
    assert claimed == [expected]
    assert find_source(spec).name == expected


def test_objects_and_folders_are_recognised_by_exactly_the_right_source(tmp_path):
    folder = _hf_folder(tmp_path)
    cases = [(tiny_vit(), "module"), (str(folder), "hf"), (folder, "hf"), (f"hf:{folder}", "hf")]
    try:
        import transformers

        cfg = transformers.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=16, image_size=16, patch_size=8)
        cases.append((transformers.ViTModel(cfg), "hf"))
    except ImportError:  # pragma: no cover - the hf extra is part of the test setup
        pass
    for spec, expected in cases:
        assert [s.name for s in sources() if s.handles(spec)] == [expected], spec


def test_builtin_sources_are_listed_with_schemes():
    names = [s.name for s in sources()]
    for name in ("embedded", "hf", "open_clip", "torchvision", "module", "factory", "timm"):
        assert name in names
    assert {"hf", "open_clip", "torchvision"} <= model_sources.claimed_schemes()


@pytest.mark.parametrize("spec,pattern", [
    (42, r"int '42' is not a model spec any model source recognises.*timm.*register_source"),
    ("vit_tny", r"unknown model 'vit_tny'; did you mean .*vit_tiny"),
    ("timm:vit_tny", r"unknown model 'vit_tny'; did you mean .*vit_tiny"),
    ("timm:", r"timm: needs a model name"),
    ("open_clip:", r"needs an architecture after 'open_clip:'"),
    ("open_clip:ViT-B-3", r"unknown OpenCLIP architecture 'ViT-B-3'; did you mean .*ViT-B-32"),
    ("torchvision:vit_b_1", r"unknown torchvision classification model 'vit_b_1'; did you mean .*vit_b_16"),
    ("torchvision:vit_b_16:NOPE", r"no weights entry 'NOPE' \(entries: DEFAULT, IMAGENET1K_V1"),
    ("no_such_user_module_xyz:build", r"cannot import 'no_such_user_module_xyz'.*PYTHONPATH"),
])
def test_unknown_specs_fail_clearly(spec, pattern):
    if str(spec).startswith("open_clip:"):
        pytest.importorskip("open_clip")
    with pytest.raises(ProbeError, match=pattern) as err:
        resolve_model(spec, random_init=True)
    assert "\n" not in str(err.value)


def test_weights_and_random_init_exclude_each_other_for_every_source():
    for spec in (None, "vit_tiny", "torchvision:vit_b_16", "probe.cordonnier:build", tiny_vit()):
        with pytest.raises(ProbeError, match="exclude each other"):
            resolve_model(spec, weights="x.safetensors", random_init=True)


# --------------------------------------------------------------------------------------------
# the extension point, used from outside the package


class PlantedSource(ModelSource):
    """``planted:WIDTH``: a tiny timm ViT of that embedding width, with 'trained' weights that are
    the random init of seed 123 scaled by 2 (so the test can tell them from a random init)."""

    name = "test-planted"
    scheme = "planted"
    example = "planted:48"

    def handles(self, spec):
        return isinstance(spec, str) and spec.startswith("planted:")

    def display_name(self, spec):
        return f"planted ViT width {int(spec.split(':', 1)[1])}"

    def architecture(self, spec):
        width = int(spec.split(":", 1)[1])

        def make(seed):
            return tiny_vit(embed_dim=width)

        return make

    def pretrained(self, spec, make, seed):
        torch.manual_seed(123)
        net = make(seed)
        with torch.no_grad():
            for p in net.parameters():
                p.mul_(2.0)
        return net, "planted weights (seed 123, x2)"

    def data_config(self, net, spec):
        return {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bilinear",
                "crop_pct": 1.0, "crop_mode": "squash"}


@pytest.fixture
def planted():
    source = PlantedSource()
    register_source(source)
    try:
        yield source
    finally:
        unregister_source(source.name)


def test_registered_source_takes_its_scheme_from_the_factory_source(planted):
    assert [s.name for s in sources() if s.handles("planted:48")] == ["test-planted"]
    r = resolve_model("planted:48")
    torch.manual_seed(123)
    want = tiny_vit(embed_dim=48)
    assert r.name == "planted ViT width 48" and r.weights == "planted weights (seed 123, x2)"
    for (k, got), (_, ref) in zip(r.model.state_dict().items(), want.state_dict().items()):
        assert torch.equal(got, 2.0 * ref), k
    assert not r.model.training
    # random init and rebuild go through the source's constructor
    a, b = resolve_model("planted:24", random_init=True, seed=5), r.random_init(5)
    assert a.weights == "random init (seed 5)" and a.model.pos_embed.shape[-1] == 24
    torch.manual_seed(5)
    ref = tiny_vit(embed_dim=48)
    assert all(torch.equal(x, y) for x, y in zip(b.state_dict().values(), ref.state_dict().values()))


def test_unregistered_source_leaves_its_scheme_to_the_factory_source(planted):
    unregister_source(planted.name)
    assert find_source("planted:48").name == "factory"
    with pytest.raises(ProbeError, match="cannot import 'planted'"):
        resolve_model("planted:48", random_init=True)


def test_registered_source_is_used_by_probe_analyze(planted, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    res = probe.analyze("planted:48", str(tmp_path), batch_size=2, n_bootstrap=0, null_seeds=0, fits=False,
                        conv_test=False, progress=False)
    assert res.meta["model"] == "planted ViT width 48"
    assert res.meta["weights"] == "planted weights (seed 123, x2)"
    assert res.meta["num_images"] == 2 and len(res.heads) == 3 * 3  # depth 3, 3 heads


def test_entry_point_plugins_are_registered_and_broken_ones_named(monkeypatch):
    """An installed package's ``probe.model_sources`` entry points (class or instance) are
    registered before the built-ins; one that fails to load is skipped with a warning."""
    import importlib.metadata as md

    from probe.model_sources import base

    points = [md.EntryPoint(name="planted", value="test_model_sources:PlantedSource", group="probe.model_sources"),
              md.EntryPoint(name="broken", value="no_such_plugin_pkg:Source", group="probe.model_sources"),
              md.EntryPoint(name="notasource", value="test_model_sources:SPECS", group="probe.model_sources")]
    monkeypatch.setattr(md, "entry_points", lambda group=None: [p for p in points if p.group == group])
    try:
        with pytest.warns(UserWarning) as record:
            names = base.load_entry_points()
        assert names == ["test-planted"]
        text = " ".join(str(w.message) for w in record)
        assert "'broken' (no_such_plugin_pkg:Source) not loaded" in text and "not a probe.model_sources.ModelSource" in text
        assert sources()[0].name == "test-planted" and find_source("planted:24").name == "test-planted"
        assert resolve_model("planted:24").weights == "planted weights (seed 123, x2)"
    finally:
        unregister_source("test-planted")


def test_registered_source_tried_first_overrides_a_builtin():
    class Override(ModelSource):
        name = "test-override"

        def handles(self, spec):
            return spec == "vit_tiny"

        def architecture(self, spec):
            return lambda seed: tiny_vit()

    register_source(Override())
    try:
        assert find_source("vit_tiny").name == "test-override"
        assert find_source("vit_small").name == "timm"
        r = resolve_model("vit_tiny", random_init=True)
        assert r.name == "vit_tiny" and r.model.patch_embed.img_size == (32, 32)
        with pytest.raises(ProbeError, match=r"no trained weights probe can load by itself.*--weights FILE.*--random-init"):
            resolve_model("vit_tiny")
    finally:
        unregister_source("test-override")
    assert find_source("vit_tiny").name == "timm"


def test_register_source_refuses_other_objects():
    with pytest.raises(ProbeError, match="needs a probe.model_sources.ModelSource"):
        register_source(object())


# --------------------------------------------------------------------------------------------
# torchvision


def test_torchvision_data_config_reproduces_torchvision_transform():
    """Oracle: torchvision's own eval transform of the weights entry on a PIL image."""
    from PIL import Image
    from torchvision.models import ViT_B_16_Weights

    from probe.data import eval_transform

    r = resolve_model("torchvision:vit_b_16", random_init=True)
    assert type(r.model).__name__ == "VisionTransformer" and r.weights == "random init (seed 0)"
    assert r.pretrained_cfg["input_size"] == (3, 224, 224) and r.pretrained_cfg["interpolation"] == "bilinear"
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 410, 3), dtype=np.uint8))
    tf, _ = eval_transform(r.model)
    want = ViT_B_16_Weights.IMAGENET1K_V1.transforms()(img)
    got = tf(img)
    assert got.shape == want.shape == (3, 224, 224)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=0)


def test_torchvision_geometry_is_one_class_token_and_the_patch_grid():
    from probe.capture import find_attention_layers, infer_geometries

    r = resolve_model("torchvision:vit_b_16", random_init=True)
    layers = find_attention_layers(r.model, (3, 224, 224))
    assert len(layers) == 12 and {l.rule.name for l in layers} == {"torch-multihead-attention"}
    g = infer_geometries(r.model, layers[:1], (3, 224, 224))[0]
    assert (g.num_prefix_tokens, g.grid, g.pixels_per_token) == (1, (14, 14), (16.0, 16.0))


def test_torchvision_weights_entry_sets_the_architecture():
    r = resolve_model("torchvision:vit_b_16:IMAGENET1K_SWAG_E2E_V1", random_init=True)
    assert r.model.image_size == 384 and r.name == "torchvision:vit_b_16:IMAGENET1K_SWAG_E2E_V1"
    assert r.pretrained_cfg["input_size"] == (3, 384, 384) and r.pretrained_cfg["interpolation"] == "bicubic"
    assert r.pretrained_cfg["crop_pct"] == pytest.approx(1.0)


def test_torchvision_weights_file_cache_and_refused_download(tmp_path, monkeypatch):
    """--weights FILE loads strictly; the entry's file in the torch hub cache is used; without it
    the download is refused naming the URL, --weights and --random-init."""
    from safetensors.torch import save_file
    from torchvision.models import get_model, get_model_weights

    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    with pytest.raises(ProbeError, match=r"not in the torch hub cache.*does not download.*https://download\.pytorch\.org/.*--weights FILE.*--random-init"):
        resolve_model("torchvision:squeezenet1_1")
    torch.manual_seed(7)
    ref = get_model("squeezenet1_1", weights=None)
    path = tmp_path / "sq.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    r = resolve_model("torchvision:squeezenet1_1", weights=path)
    assert r.weights == str(path)
    assert all(torch.equal(a, b) for a, b in zip(r.model.state_dict().values(), ref.state_dict().values()))
    url = get_model_weights("squeezenet1_1").DEFAULT.url
    cached = tmp_path / "hub" / "checkpoints" / Path(url).name
    cached.parent.mkdir(parents=True)
    torch.save(ref.state_dict(), cached)
    r = resolve_model("torchvision:squeezenet1_1")
    assert "torch hub cache" in r.weights and str(cached) in r.weights
    assert all(torch.equal(a, b) for a, b in zip(r.model.state_dict().values(), ref.state_dict().values()))
    with pytest.raises(ProbeError, match="do not match the architecture 'torchvision:squeezenet1_0'"):
        resolve_model("torchvision:squeezenet1_0", weights=path)


# --------------------------------------------------------------------------------------------
# layering: no import circle between models, model_sources and the families


def _probe_modules() -> dict[str, Path]:
    mods = {}
    for p in (ROOT / "probe").rglob("*.py"):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """probe modules that ``name`` imports anywhere in its source (module level or inside
    functions), relative imports resolved; ``from . import sub`` counts as importing ``sub``."""
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            subs = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in mods]
            found.update(subs if subs and len(subs) == len(node.names) else [mod, *subs])
    out = set()
    for m in found:
        while m not in mods and "." in m:
            m = m.rsplit(".", 1)[0]
        while m in mods:  # importing a.b.c runs a.b's and a's __init__ too
            if m != name:
                out.add(m)
            m = m.rsplit(".", 1)[0] if "." in m else ""
    return out


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for m in graph[todo.pop()]:
            if m not in seen:
                seen.add(m)
                todo.append(m)
    return seen


def test_layering_has_no_circle_through_models():
    mods = _probe_modules()
    graph = {n: _imports(n, p, mods) for n, p in mods.items()}
    assert "probe.model_sources.hf" in graph["probe.models"] | _reachable(graph, "probe.models")
    lower = [n for n in mods if n.startswith(("probe.families", "probe.capture"))] + ["probe.cordonnier",
                                                                                     "probe.cordonnier.model"]
    for n in lower:  # capture and the families know nothing of model resolution
        bad = _reachable(graph, n) & {"probe.models", "probe.model_sources", "probe.pipeline"}
        bad |= {m for m in _reachable(graph, n) if m.startswith("probe.model_sources.")}
        assert not bad, (n, sorted(bad))
    for n in [m for m in mods if m.startswith("probe.model_sources")]:
        bad = _reachable(graph, n) & {"probe.models", "probe.pipeline", "probe.cli", "probe.steps", "probe.result"}
        assert not bad, (n, sorted(bad))
    assert "probe.models" not in _reachable(graph, "probe.models")


def test_the_ast_check_sees_relative_and_function_level_imports(tmp_path):
    """The layering oracle itself: a planted lazy relative import is found."""
    mods = {"probe.families.x": tmp_path / "x.py", "probe.models": tmp_path / "m.py", "probe.families": tmp_path / "f.py"}
    mods["probe.families.x"].write_text("def f():\n    from ..models import resolve_model\n")
    assert _imports("probe.families.x", mods["probe.families.x"], mods) == {"probe.models"}


def test_every_probe_module_imports_first_in_a_fresh_interpreter():
    """Each probe module, imported as the first probe module of a clean import state (probe.*
    dropped from sys.modules in between), imports without a circular-import error."""
    names = sorted(n for n in _probe_modules() if n != "probe.__main__")
    code = (
        "import importlib, sys, json\n"
        "import torch\n"
        f"names = {names!r}\n"
        "bad = {}\n"
        "for n in names:\n"
        "    for k in [k for k in sys.modules if k == 'probe' or k.startswith('probe.')]:\n"
        "        del sys.modules[k]\n"
        "    try:\n"
        "        importlib.import_module(n)\n"
        "    except Exception as e:\n"
        "        bad[n] = repr(e)\n"
        "print(json.dumps(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {}


def test_models_keeps_its_public_names():
    from probe import models

    for name in ("resolve_model", "ResolvedModel", "ALIASES", "resolve_name", "load_state_dict",
                 "apply_state_dict", "file_sha256", "hub_reachable", "HUB_HOST"):
        assert hasattr(models, name), name
    assert models.ResolvedModel is model_sources.ResolvedModel
    assert isinstance(resolve_model(tiny_vit()).model, nn.Module)


def test_a_source_needs_a_scheme_or_handles():
    from probe.errors import ProbeError
    from probe.model_sources import ModelSource, register_source

    class Nothing(ModelSource):
        name = "nothing-recognised"

    with pytest.raises(ProbeError, match="no scheme"):
        register_source(Nothing())


def test_timm_scheme_is_the_plain_name():
    from probe.models import resolve_model

    a, b = resolve_model("timm:vit_tiny", random_init=True), resolve_model("vit_tiny", random_init=True)
    assert a.name == b.name == "vit_tiny_patch16_224"
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)  # same seeded init
