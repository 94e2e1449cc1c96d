"""OpenCLIP image towers: ``--model open_clip:ARCH`` (``open_clip:ViT-B-32``) or
``open_clip:ARCH:TAG`` (``open_clip:ViT-B-32:laion2b_s34b_b79k``). Optional extra ``probe[clip]``
(``open_clip_torch``); imported only when such a spec is resolved.

The model is built with ``open_clip.create_model(ARCH, pretrained=None)`` (no tower weights
fetched) and its image tower ``.visual`` is analysed: its output, the image embedding
``(batch, embed_dim)``, stands in for the logits of attribution (importance of a head for the
embedding's largest coordinate, or the ``--target`` coordinate). OpenCLIP's ``VisionTransformer``
(Radford et al. 2021, arXiv 2103.00020) puts its 1-D ``class_embedding`` before the ``conv1``
patch grid (1 prefix token, ``image_size / patch_size`` grid) and attends with
``nn.MultiheadAttention`` in each ``ResidualAttentionBlock`` — captured per head by the
``torch-multihead-attention`` rule (``average_attn_weights=False``), not as the head average that
``nn.MultiheadAttention`` returns by default. Towers built on timm (``timm_model_name`` configs)
are captured by the timm rules.

Weights: ``--weights FILE`` with the state dict of the whole CLIP model (its ``visual.*`` keys are
used) or of the image tower alone, read by safetensors or ``torch.load(weights_only=True)``;
``--random-init``; or a pretrained ``TAG`` (``open_clip.list_pretrained_tags_by_model(ARCH)``):
read from the local cache (Hugging Face cache, or ``~/.cache/clip`` for URL downloads), else
downloaded when its host is reachable, else refused with a message naming ``--weights`` /
``--random-init``. A tag trained with QuickGELU builds the tower with QuickGELU.

Data config: OpenCLIP's preprocess config (``size``, ``mean``, ``std``, ``interpolation``,
``resize_mode``; the tag's when one is named), see :func:`data_config_from_preprocess`.

Refused: ResNet towers (``RN50``: attention only in the pooling head), towers with an attentional
pooler (CoCa: its learned queries attend to the patches; not self-attention among tokens), the
``hf-hub:`` / ``local-dir:`` schemas (pass ``open_clip:ARCH --weights FILE``).
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

from torch import nn

from ..errors import ProbeError
from . import checkpoint
from .base import Constructor, ModelSource

_PREFIX = "open_clip:"
_INSTALL_HINT = "install the OpenCLIP extra: pip install 'probe[clip]' (open_clip_torch)"


def _open_clip() -> Any:
    try:
        import open_clip
    except ImportError:
        raise ProbeError(f"--model open_clip:... needs OpenCLIP; {_INSTALL_HINT}") from None
    return open_clip


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence OpenCLIP's INFO / "initialized randomly" log lines (it logs on the root logger),
    restoring the level after; a temporary NullHandler keeps ``logging.warning`` from calling
    ``basicConfig`` and leaving a handler on the root logger."""
    root = logging.getLogger()
    level = root.level
    guard = logging.NullHandler() if not root.handlers else None
    if guard is not None:
        root.addHandler(guard)
    root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(level)
        if guard is not None:
            root.removeHandler(guard)


def parse_spec(spec: str) -> tuple[str, str | None]:
    """``"open_clip:ARCH[:TAG]"`` -> ``(ARCH, TAG or None)``, both checked against OpenCLIP's
    registries (``open_clip.list_models()``, ``list_pretrained_tags_by_model``).

    Raises:
        ProbeError: OpenCLIP missing; no architecture; an unknown architecture or tag (with the
            closest names); the ``hf-hub:`` / ``local-dir:`` schemas.
    """
    rest = spec[len(_PREFIX):] if spec.startswith(_PREFIX) else spec
    if rest.startswith(("hf-hub:", "local-dir:")):
        raise ProbeError(f"--model {spec!r}: OpenCLIP's hf-hub:/local-dir: schemas are not supported; pass "
                         "--model open_clip:ARCH with --weights FILE (the checkpoint in that folder / repository)")
    arch, _, tag = rest.partition(":")
    if not arch:
        raise ProbeError("--model open_clip: needs an architecture after 'open_clip:', e.g. open_clip:ViT-B-32 "
                         "(python -c 'import open_clip; print(open_clip.list_models())')")
    oc = _open_clip()
    known = oc.list_models()
    if arch not in known:
        close = difflib.get_close_matches(arch, known, n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ProbeError(f"unknown OpenCLIP architecture {arch!r}{hint} (open_clip.list_models() has "
                         f"{len(known)}, e.g. ViT-B-32, ViT-B-16, ViT-L-14)")
    if tag:
        tags = oc.list_pretrained_tags_by_model(arch)
        if not oc.get_pretrained_cfg(arch, tag):
            listed = ", ".join(tags[:8]) + (", ..." if len(tags) > 8 else "") if tags else "none"
            raise ProbeError(f"OpenCLIP has no pretrained tag {tag!r} for {arch!r} (its tags: {listed}); "
                             f"use open_clip:{arch}:TAG, or open_clip:{arch} with --weights FILE / --random-init")
    return arch, tag or None


def data_config_from_preprocess(pp: dict[str, Any]) -> dict[str, Any]:
    """timm-style data config of an OpenCLIP preprocess config (``open_clip.PreprocessCfg``:
    ``size``, ``mean``, ``std``, ``interpolation``, ``resize_mode``).

    Mapping (OpenCLIP's eval ``image_transform``): ``shortest`` (resize the shortest edge to
    ``size``, center crop) -> ``crop_mode="center"``, ``crop_pct=1``; ``squash`` (resize both
    edges) -> ``crop_mode="squash"``; ``longest`` (resize the longest edge, pad to square) ->
    ``crop_mode="border"``. Known difference: timm pads ``border`` with the mean colour, OpenCLIP
    with ``fill_color`` (0).

    Returns:
        ``{"input_size": (3, H, W), "mean", "std", "interpolation", "crop_pct", "crop_mode"}``.
    """
    size = pp.get("size", 224)
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    mode = {"shortest": "center", "squash": "squash", "longest": "border"}.get(pp.get("resize_mode", "shortest"), "center")
    return {
        "input_size": (3, int(h), int(w)),
        "mean": tuple(float(v) for v in pp.get("mean", (0.48145466, 0.4578275, 0.40821073))),
        "std": tuple(float(v) for v in pp.get("std", (0.26862954, 0.26130258, 0.27577711))),
        "interpolation": str(pp.get("interpolation", "bicubic")),
        "crop_pct": 1.0,
        "crop_mode": mode,
    }


def _tower(clip: nn.Module, spec: str) -> nn.Module:
    """The image tower of an OpenCLIP model, checked and given ``num_prefix_tokens``."""
    visual = getattr(clip, "visual", None)
    if not isinstance(visual, nn.Module):
        raise ProbeError(f"--model {spec!r}: this OpenCLIP model has no image tower (.visual)")
    kind = type(visual).__name__
    if kind == "ModifiedResNet":
        raise ProbeError(f"--model {spec!r} has a ResNet image tower (self-attention only in its pooling "
                         "head), nothing probe analyses; pick a ViT architecture, e.g. open_clip:ViT-B-32")
    if getattr(visual, "attn_pool", None) is not None:
        raise ProbeError(f"--model {spec!r}: the image tower ends in an attentional pooler (CoCa), whose "
                         "learned queries attend to the patches (not self-attention among tokens); "
                         "not supported, pick a CLIP ViT, e.g. open_clip:ViT-B-32")
    if hasattr(visual, "class_embedding") and hasattr(visual, "conv1"):
        visual.num_prefix_tokens = 1  # the 1-D class embedding, then the conv1 grid
    else:
        trunk = getattr(visual, "trunk", None)  # timm towers
        n = getattr(trunk, "num_prefix_tokens", None)
        if isinstance(n, int):
            visual.num_prefix_tokens = n
    return visual


def _cache_candidates(pcfg: dict[str, Any]) -> list[str]:
    """Local files already holding a tag's weights (Hugging Face cache, ``~/.cache/clip``)."""
    found = []
    hub = pcfg.get("hf_hub") or ""
    if hub:  # "org/name/" (OpenCLIP's default file names) or "org/name/file.bin"
        model_id, filename = os.path.split(hub)
        if filename:
            names = ((filename[:-4] + ".safetensors",) if filename.endswith((".bin", ".pth")) else ()) + (filename,)
        else:
            names = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
        hit = checkpoint.cached_hub_file(model_id, names)
        if hit:
            found.append(hit)
    url = pcfg.get("url") or ""
    if url:
        p = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        if p.is_file():
            found.append(str(p))
    return found


class OpenCLIPSource(ModelSource):
    """``open_clip:ARCH`` and ``open_clip:ARCH:TAG``: the image tower of an OpenCLIP model."""

    name = "open_clip"
    scheme = "open_clip"
    example = "open_clip:ViT-B-32, open_clip:ViT-B-32:TAG"

    def display_name(self, spec: Any) -> str:
        arch, tag = parse_spec(spec)
        return f"{_PREFIX}{arch}" + (f":{tag}" if tag else "")

    def architecture(self, spec: Any) -> Constructor:
        arch, tag = parse_spec(spec)
        oc = _open_clip()
        pcfg = dict(oc.get_pretrained_cfg(arch, tag) or {}) if tag else {}

        def make(seed: int) -> nn.Module:
            """``open_clip.create_model(ARCH, pretrained=None)`` at random init (seeded by the
            caller), QuickGELU when the tag was trained with it; its ``.visual`` tower, carrying
            the (tag's) preprocess config as ``pretrained_cfg``."""
            with _quiet():
                try:
                    clip = oc.create_model(arch, pretrained=None, pretrained_image=False, pretrained_text=False,
                                           force_quick_gelu=bool(pcfg.get("quick_gelu", False)), device="cpu")
                except Exception as e:  # a config OpenCLIP cannot build is the user's input
                    raise ProbeError(f"OpenCLIP cannot build {arch!r} ({checkpoint.short_message(e)})") from None
            visual = _tower(clip, spec)
            pp = dict(oc.get_model_preprocess_cfg(clip) or {})
            pp.update({k: v for k, v in pcfg.items() if k in ("mean", "std", "interpolation", "resize_mode")})
            visual.pretrained_cfg = data_config_from_preprocess(pp)
            return visual

        return make

    def load_weights(self, net: nn.Module, spec: Any, path: str | Path) -> str:
        """Load an OpenCLIP checkpoint: the whole model's state dict (its ``visual.*`` keys; the
        text tower and ``logit_scale`` are not needed) or the image tower's, strictly.

        Raises:
            ProbeError: unreadable file (pickled code refused), or keys / shapes that do not
                match the tower.
        """
        sd = checkpoint.load_state_dict(path)
        label = str(path)
        if any(k.startswith("visual.") for k in sd):
            sd = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
            label += " (visual tower)"
        checkpoint.apply_state_dict(net, sd, self.display_name(spec), str(path))
        return label

    def pretrained(self, spec: Any, make: Constructor, seed: int) -> tuple[nn.Module, str]:
        arch, tag = parse_spec(spec)
        oc = _open_clip()
        if tag is None:
            tags = oc.list_pretrained_tags_by_model(arch)
            listed = f" (tags: {', '.join(tags[:4])}{', ...' if len(tags) > 4 else ''})" if tags else ""
            raise ProbeError(f"--model {spec!r} names an architecture without weights: name published weights "
                             f"with open_clip:{arch}:TAG{listed}, or pass --weights FILE (or --random-init "
                             "to analyse it untrained)")
        pcfg = dict(oc.get_pretrained_cfg(arch, tag))
        cached = _cache_candidates(pcfg)
        if cached:
            net = make(seed)
            return net, f"{self.load_weights(net, spec, cached[0])} (OpenCLIP {arch}:{tag}, local cache)"
        host = checkpoint.HUB_HOST if pcfg.get("hf_hub") else (urlparse(pcfg.get("url") or "").hostname or "?")
        if not checkpoint.hub_reachable(host):
            raise ProbeError(
                f"pretrained weights {arch}:{tag} need {host}, which is not reachable, and are not in the local "
                "cache; pass a local checkpoint with --weights FILE (the OpenCLIP state dict of the model or of "
                "its visual tower), or --random-init to analyse untrained weights explicitly"
            )
        try:
            with _quiet():
                path = oc.pretrained.download_pretrained(pcfg)
        except Exception as e:
            raise ProbeError(f"could not download OpenCLIP weights {arch}:{tag} ({checkpoint.short_message(e)}); "
                             "pass a local checkpoint with --weights FILE") from None
        net = make(seed)
        return net, f"{self.load_weights(net, spec, path)} (OpenCLIP {arch}:{tag})"
