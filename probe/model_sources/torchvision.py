"""torchvision classification models: ``--model torchvision:vit_b_16`` or
``torchvision:vit_b_16:IMAGENET1K_V1`` (a member of the model's weights enum,
``torchvision.models.get_model_weights(NAME)``; ``DEFAULT`` allowed).

Built with ``torchvision.models.get_model(NAME, weights=None)`` (random init); a named weights
entry sets what the architecture depends on (``num_classes`` from its categories; for ViTs the
``image_size`` of its ``min_size``, e.g. 384 for ``IMAGENET1K_SWAG_E2E_V1``). torchvision's ViTs
attend with ``nn.MultiheadAttention`` (``EncoderBlock.self_attention``), captured per head by the
``torch-multihead-attention`` rule; 1 prefix token (``class_token``).

Weights: ``--weights FILE`` (safetensors or ``torch.load(weights_only=True)``), ``--random-init``,
or the weights entry's file when it is already in the torch hub cache
(``torch.hub.get_dir()/checkpoints``). probe does not download from ``download.pytorch.org``:
without a cached file it raises a ProbeError naming the URL, ``--weights`` and ``--random-init``.

Data config: the weights entry's eval transform (``weights.transforms()``: resize, crop, mean,
std, interpolation; the ``DEFAULT`` entry when none is named); for a model without weights
entries, ImageNet's defaults (224 px crop of a 256 px resize, bilinear, ImageNet mean/std).
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import ProbeError
from . import checkpoint
from .base import Constructor, ModelSource

_PREFIX = "torchvision:"

#: Data config when a model has no weights entry: torchvision's ImageNet reference evaluation.
IMAGENET_DEFAULT = {
    "input_size": (3, 224, 224),
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "interpolation": "bilinear",
    "crop_pct": 0.875,
    "crop_mode": "center",
}


def _models() -> Any:
    try:
        import torchvision.models as tvm
    except ImportError:
        raise ProbeError("--model torchvision:... needs torchvision; pip install torchvision") from None
    return tvm


def parse_spec(spec: str) -> tuple[str, Any]:
    """``"torchvision:NAME[:WEIGHTS]"`` -> ``(NAME, weights enum member or None)``.

    Raises:
        ProbeError: torchvision missing; an unknown classification model (with the closest
            names) or weights entry (with the model's entries).
    """
    rest = spec[len(_PREFIX):] if spec.startswith(_PREFIX) else spec
    name, _, tag = rest.partition(":")
    tvm = _models()
    known = tvm.list_models(module=tvm)
    if name not in known:
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ProbeError(f"unknown torchvision classification model {name!r}{hint} "
                         "(torchvision.models.list_models(module=torchvision.models), e.g. vit_b_16)")
    if not tag:
        return name, None
    try:
        enum = tvm.get_model_weights(name)
        return name, enum[tag] if tag != "DEFAULT" else enum.DEFAULT
    except (KeyError, ValueError):
        entries = ", ".join(["DEFAULT"] + [w.name for w in tvm.get_model_weights(name)])
        raise ProbeError(f"torchvision model {name!r} has no weights entry {tag!r} (entries: {entries})") from None


def _default_weights(name: str) -> Any:
    """The model's ``DEFAULT`` weights entry, or ``None`` when it has none."""
    try:
        return _models().get_model_weights(name).DEFAULT
    except (ValueError, KeyError, AttributeError):
        return None


def data_config_from_weights(weights: Any) -> dict[str, Any]:
    """timm-style data config of a torchvision weights entry's eval transform
    (``ImageClassification``: resize the shortest edge to ``resize_size``, center crop
    ``crop_size``, normalise): ``input_size = (3, crop, crop)``, ``crop_pct = crop / resize``,
    ``crop_mode="center"``, the interpolation's name. :data:`IMAGENET_DEFAULT` when
    ``weights`` is ``None`` or its transform lacks these fields.
    """
    if weights is None:
        return dict(IMAGENET_DEFAULT)
    try:
        tf = weights.transforms()
        crop, resize = int(tf.crop_size[0]), int(tf.resize_size[0])
        mean, std = tuple(float(v) for v in tf.mean), tuple(float(v) for v in tf.std)
        interp = getattr(tf.interpolation, "value", str(tf.interpolation))
    except (AttributeError, TypeError, IndexError):
        return dict(IMAGENET_DEFAULT)
    from ..families.hf import _crop_pct  # crop / resize, robust to timm's floor(crop / pct)

    return {"input_size": (3, crop, crop), "mean": mean, "std": std, "interpolation": str(interp),
            "crop_pct": _crop_pct(crop, resize), "crop_mode": "center"}


class TorchvisionSource(ModelSource):
    """``torchvision:NAME`` and ``torchvision:NAME:WEIGHTS``."""

    name = "torchvision"
    scheme = "torchvision"
    example = "torchvision:vit_b_16"

    def display_name(self, spec: Any) -> str:
        name, weights = parse_spec(spec)
        return f"{_PREFIX}{name}" + (f":{weights.name}" if weights is not None else "")

    def architecture(self, spec: Any) -> Constructor:
        name, weights = parse_spec(spec)
        tvm = _models()
        kwargs: dict[str, Any] = {}
        if weights is not None:
            cats = weights.meta.get("categories")
            if cats:
                kwargs["num_classes"] = len(cats)
            min_size = weights.meta.get("min_size")
            if name.startswith("vit_") and min_size:  # the builder sets image_size from it too
                kwargs["image_size"] = int(min_size[0])
        cfg = data_config_from_weights(weights if weights is not None else _default_weights(name))

        def make(seed: int) -> nn.Module:
            """``torchvision.models.get_model(NAME, weights=None, ...)`` (seeded by the caller),
            carrying the weights entry's data config as ``pretrained_cfg``."""
            try:
                net = tvm.get_model(name, weights=None, **kwargs)
            except Exception as e:
                raise ProbeError(f"torchvision cannot build {name!r} ({checkpoint.short_message(e)})") from None
            net.pretrained_cfg = dict(cfg)
            if hasattr(net, "class_token") and hasattr(net, "conv_proj"):  # torchvision ViT
                net.num_prefix_tokens = 1
            return net

        return make

    def pretrained(self, spec: Any, make: Constructor, seed: int) -> tuple[nn.Module, str]:
        import torch

        name, weights = parse_spec(spec)
        weights = weights if weights is not None else _default_weights(name)
        if weights is None:
            return super().pretrained(spec, make, seed)
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
        if cached.is_file():
            net = make(seed)
            return net, f"{self.load_weights(net, spec, cached)} (torchvision {name} {weights.name}, torch hub cache)"
        raise ProbeError(
            f"torchvision weights {name} {weights.name} are not in the torch hub cache ({cached.parent}) and probe "
            f"does not download them; fetch {weights.url} where it is reachable and pass it with --weights FILE "
            "(or --random-init to analyse untrained weights explicitly)"
        )
