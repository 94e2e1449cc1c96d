"""Model resolution and weights: every bad input is one clear ProbeError."""

from __future__ import annotations

import pickle

import pytest
import torch

from probe import models
from probe.errors import ProbeError
from probe.models import load_state_dict, resolve_model, resolve_name

from conftest import tiny_vit


def test_aliases_resolve_to_timm_names():
    assert resolve_name("vit_small") == "vit_small_patch16_224"
    assert resolve_name("deit_tiny") == "deit_tiny_patch16_224"
    assert resolve_name("vit_base_patch16_224") == "vit_base_patch16_224"


def test_unknown_model_suggests_close_names():
    with pytest.raises(ProbeError, match="unknown model 'deit_tiny_patch16'.*did you mean.*deit_tiny_patch16_224"):
        resolve_name("deit_tiny_patch16")


def test_hub_unreachable_names_weights_option(monkeypatch):
    from probe.model_sources import checkpoint, timm as timm_source

    monkeypatch.setattr(checkpoint, "hub_reachable", lambda *a, **k: False)
    monkeypatch.setattr(timm_source, "cached_hub_file", lambda hub_id: None)
    with pytest.raises(ProbeError, match="not reachable.*--weights FILE.*--random-init"):
        resolve_model("vit_tiny")


def test_random_init_is_explicit_and_labelled():
    r = resolve_model("vit_tiny", random_init=True, seed=3)
    assert r.weights == "random init (seed 3)"
    assert not r.model.training
    with pytest.raises(ProbeError, match="exclude each other"):
        resolve_model("vit_tiny", weights="x.safetensors", random_init=True)


def test_missing_weights_file(tmp_path):
    with pytest.raises(ProbeError, match="not found.*--weights"):
        load_state_dict(tmp_path / "nope.safetensors")


def test_not_a_checkpoint(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ProbeError, match="not a readable safetensors"):
        load_state_dict(junk)
    junk_pth = tmp_path / "junk.pth"
    junk_pth.write_bytes(b"\x00\x01garbage")
    with pytest.raises(ProbeError, match="weights file .*junk.pth"):
        load_state_dict(junk_pth)


class Evil:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"w": Evil()}, f)
    with pytest.raises(ProbeError, match="pickled objects"):
        load_state_dict(path)


def test_weights_not_matching_architecture(tmp_path):
    from safetensors.torch import save_file

    sd = tiny_vit(embed_dim=48).state_dict()
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    with pytest.raises(ProbeError, match="do not match the architecture 'vit_tiny_patch16_224'.*missing|shape"):
        resolve_model("vit_tiny", weights=path)


def test_wrapped_pth_state_dict_loads(tmp_path):
    net = tiny_vit()
    path = tmp_path / "wrapped.pth"
    torch.save({"model": {"module." + k: v for k, v in net.state_dict().items()}}, path)
    sd = load_state_dict(path)
    other = tiny_vit()
    models.apply_state_dict(other, sd, "tiny", str(path))
    for k, v in net.state_dict().items():
        torch.testing.assert_close(other.state_dict()[k], v)


def test_in_memory_module_with_weights(tmp_path):
    net = tiny_vit()
    path = tmp_path / "w.pt"
    torch.save(net.state_dict(), path)
    r = resolve_model(tiny_vit(), weights=path)
    assert r.weights == str(path)
    assert r.num_params == sum(p.numel() for p in net.parameters())
