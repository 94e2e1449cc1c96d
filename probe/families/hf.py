"""Hugging Face ``transformers`` vision transformers: ViT, DeiT (distilled), DINOv2, DINOv2 with
registers, DINOv3 ViT, CLIP, SigLIP, AIMv2, MetaCLIP 2 and MLCD vision towers, BEiT (relative
position bias), the ViT-MAE encoder (unmasked: ``mask_ratio = 0``, identity shuffle), ViT-MSN,
I-JEPA, DPT's ViT backbone; Data2Vec-Vision through :mod:`.hf_data2vec`, Swin v1 / v2 and Donut
Swin through the window rule of :mod:`.hf_swin` (subclasses of :class:`HFEagerAttentionRule`).

Optional extra ``probe[hf]``. This module imports ``transformers`` only inside its functions, so
importing it (which registers :class:`HFEagerAttentionRule`) costs nothing and never fails when
``transformers`` is missing.

Model names (``--model``):

* ``hf:FOLDER`` — a local folder written by ``save_pretrained`` (``config.json`` plus
  ``model.safetensors``, or a weights-only ``pytorch_model.bin``); a folder whose ``config.json``
  has a ``model_type`` is also recognised without the ``hf:`` prefix.
* ``hf:ORG/NAME`` — a model id on the Hugging Face hub, downloaded when the hub is reachable, else
  read from the local Hugging Face cache, else a :class:`~probe.errors.ProbeError` naming the
  local-folder option.

Loading never executes code from a checkpoint: ``trust_remote_code=False`` and, where the installed
``transformers`` has the switch, ``weights_only=True`` for ``.bin`` files. Models are loaded with
eager attention (``attn_implementation="eager"``) and in float32; the capture rule also forces eager
attention while it is installed, so an in-memory model built with SDPA (which returns no attention
probabilities) is captured too, and its setting is restored afterwards.

Token layout (prefix tokens first, then the patch grid in row-major order):

* ViT (Dosovitskiy et al. 2021, arXiv 2010.11929): 1 prefix token (class).
* DeiT (Touvron et al. 2021, arXiv 2012.12877): 2 prefix tokens (class, distillation) — the
  ``transformers`` DeiT embeddings always carry the distillation token.
* DINOv2 (Oquab et al. 2023, arXiv 2304.07193): 1 prefix token (class).
* DINOv2 with registers (Darcet et al. 2024, arXiv 2309.16588): 1 + ``num_register_tokens``
  (class, then the registers).
* CLIP (Radford et al. 2021): 1 (the 1-D ``class_embedding``); SigLIP (Zhai et al. 2023): 0, its
  attention-pooling head is not a layer; BEiT (Bao et al. 2022): 1; ViT-MAE (He et al. 2022): 1.
* ViT-MSN (Assran et al. 2022, arXiv 2204.07141): 1; I-JEPA (Assran et al. 2023, arXiv
  2301.08243): 0; DINOv3 (Siméoni et al. 2025, arXiv 2508.10104): 1 + ``num_register_tokens``,
  rotary positions; AIMv2 (Fini et al. 2024, arXiv 2411.14402) vision: 0; MetaCLIP 2 and MLCD
  vision towers: 1 (CLIP-style ``class_embedding``); DPT (Ranftl et al. 2021, arXiv 2103.13413):
  its ViT backbone, 1; Data2Vec-Vision (Baevski et al. 2022): 1, rule in :mod:`.hf_data2vec`.

Families that are not token self-attention over one patch grid are refused before any weights
load, naming what they do (:data:`REFUSED_FAMILIES`).

The input transform comes from the folder's ``preprocessor_config.json`` when there is one (see
:func:`data_config_from_processor`), else from the model config's ``image_size`` with the family's
reference normalisation (:data:`FAMILY_NORMALIZATION`).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import re
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ..capture import CaptureRule, Emit, Restore, register_rule
from ..errors import CaptureError, ProbeError

#: ``config.model_type`` of the supported families -> display name.
SUPPORTED_FAMILIES: dict[str, str] = {
    "vit": "ViT",
    "deit": "DeiT",
    "dinov2": "DINOv2",
    "dinov2_with_registers": "DINOv2 with registers",
    "clip": "CLIP vision tower",
    "siglip": "SigLIP vision tower",
    "beit": "BEiT (relative position bias)",
    "vit_mae": "ViT-MAE encoder (unmasked)",
    "swin": "Swin (windows mapped to image positions, rule in .hf_swin)",
    "swinv2": "Swin v2 (windows mapped to image positions, rule in .hf_swin)",
    "vit_msn": "ViT-MSN",
    "ijepa": "I-JEPA (no class token)",
    "dinov3_vit": "DINOv3 ViT (rotary positions; class + registers)",
    "aimv2": "AIMv2 vision tower (no class token)",
    "metaclip_2": "MetaCLIP 2 vision tower",
    "mlcd": "MLCD vision tower (rotary positions)",
    "dpt": "DPT (its ViT backbone; the dense-prediction neck is not attention)",
    "data2vec-vision": "Data2Vec-Vision (BEiT layout, rule in .hf_data2vec)",
    "donut-swin": "Donut Swin encoder (windows mapped to image positions, rule in .hf_swin)",
}

#: ``transformers`` modeling packages (``transformers.models.<package>``) whose ``*Attention``
#: modules :class:`HFEagerAttentionRule` reads; most are named like the ``model_type``, the
#: vision towers of multi-modal models are not (``clip_vision_model`` lives in ``clip``).
SUPPORTED_PACKAGES: frozenset[str] = frozenset(SUPPORTED_FAMILIES) - {"data2vec-vision", "donut-swin"}

#: ``config.model_type`` of ``transformers`` vision families probe refuses -> what the family does
#: that probe's token-grid analysis cannot represent, and what to analyse instead. Checked on the
#: config before any weights are loaded (:func:`refusal`).
REFUSED_FAMILIES: dict[str, str] = {
    "yolos": (
        "YOLOS appends its detection tokens AFTER the patch tokens, while probe's token geometry is "
        "prefix tokens first, then the patch grid, so patch positions would be misread; analyse a "
        "ViT / DeiT classifier instead"
    ),
    "levit": (
        "LeViT's attention adds a learned per-head attention bias over a convolutional grid, and its "
        "'Subsample' attention blocks take queries from a strided grid (queries and keys on different "
        "grids); analyse a ViT / DeiT instead"
    ),
    "pvt": (
        "PVT uses spatial-reduction attention: keys and values come from a grid pooled by "
        "sequence_reduction_ratio, so an attention row is over a coarser key grid than its queries "
        "(not token-by-token self-attention)"
    ),
    "pvt_v2": (
        "PVT v2 uses spatial-reduction attention: keys and values come from a grid reduced by sr_ratio "
        "(strided convolution or pooling), so queries and keys are on different grids"
    ),
    "segformer": (
        "SegFormer's efficient self-attention reduces the key / value grid by sr_ratio, so queries "
        "and keys are on different grids (not token-by-token self-attention)"
    ),
    "mobilevit": (
        "MobileViT unfolds the feature map into patches and attends among pixels at the same offset "
        "of different patches, not among image tokens of one grid"
    ),
    "mobilevitv2": (
        "MobileViT v2 uses separable linear self-attention (one context score per token), which has "
        "no token-by-token attention matrix"
    ),
    "hiera": (
        "Hiera reorders tokens into mask units, attends within mask units and pools queries between "
        "stages (queries and keys on different grids), so attention rows are not image positions of one grid"
    ),
    "cvt": (
        "CvT projects keys and values with strided convolutions (stride_kv), so queries and keys are "
        "on different grids, and adds a class token only in its last stage"
    ),
    "vitdet": (
        "ViTDet's attention (fused qkv, decomposed relative position bias, padded window blocks) has "
        "no capture rule; analyse the ViT / ViT-MAE backbone it was initialised from instead"
    ),
    "siglip2": (
        "SigLIP 2 (NaFlex) takes pre-patchified variable-resolution input (pixel_values (batch, "
        "patches, 3 * patch^2) with spatial_shapes and pixel_attention_mask), not (batch, 3, H, W) "
        "images; analyse a SigLIP (v1) vision tower instead"
    ),
    "swiftformer": (
        "SwiftFormer's efficient additive attention pools the queries into one global vector, so it "
        "has no token-by-token attention matrix"
    ),
    "focalnet": "FocalNet mixes tokens by focal modulation (convolutions and gating), not attention",
    "poolformer": "PoolFormer mixes tokens by pooling, not attention",
    "imagegpt": (
        "ImageGPT attends causally over a sequence of colour-cluster pixel tokens, not over image "
        "patches with a bidirectional attention"
    ),
    "dinat": "DiNAT's neighbourhood attention (natten) attends within a sliding k x k window; no capture rule",
    "nat": "NAT's neighbourhood attention (natten) attends within a sliding k x k window; no capture rule",
}

#: ``(mean, std, interpolation)`` per family, used only when a model has no
#: ``preprocessor_config.json``: ViT's 0.5 normalisation and bilinear resizing (google/vit
#: checkpoints); ImageNet mean/std and bicubic resizing for DeiT and DINOv2 (their reference
#: training pipelines; Swin too); CLIP's mean/std for the CLIP-style towers (AIMv2, MetaCLIP 2,
#: MLCD); the image processors of the published checkpoints for the others. A model's own
#: ``preprocessor_config.json`` always wins; ``--mean``/``--std`` override them.
FAMILY_NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...], str]] = {
    "vit": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear"),
    "deit": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bicubic"),
    "dinov2": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bicubic"),
    "dinov2_with_registers": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bicubic"),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711), "bicubic"),
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic"),
    "beit": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic"),
    "vit_mae": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bicubic"),
    "swin": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bicubic"),
    "swinv2": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bicubic"),
    "vit_msn": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bilinear"),
    "ijepa": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bicubic"),
    "dinov3_vit": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bilinear"),
    "aimv2": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711), "bicubic"),
    "metaclip_2": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711), "bicubic"),
    "mlcd": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711), "bicubic"),
    "dpt": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic"),
    "data2vec-vision": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic"),
    "donut-swin": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear"),
}


def family_of(model_type: str) -> str:
    """The family key of a ``config.model_type``: the vision tower of a multi-modal model is named
    ``<family>_vision_model`` (``clip_vision_model``, ``aimv2_vision_model``) — that suffix is
    dropped; every other model type is its own family."""
    return model_type[: -len("_vision_model")] if model_type.endswith("_vision_model") else model_type


def refusal(model_type: str) -> str | None:
    """Why probe refuses a ``transformers`` ``model_type`` (:data:`REFUSED_FAMILIES`), or ``None``."""
    return REFUSED_FAMILIES.get(family_of(model_type))

#: PIL resampling codes (``PIL.Image.Resampling``) -> timm interpolation names.
_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}

_PREFIX = "hf:"
_HF_INSTALL_HINT = "install the Hugging Face extra: pip install 'probe[hf]'"


# --------------------------------------------------------------------------------------------
# capture


class HFEagerAttentionRule(CaptureRule):
    """Self-attention modules of the ``transformers`` families in :data:`SUPPORTED_PACKAGES`.

    Matches the modules named ``*Attention`` in those families' modeling files that have a
    ``config`` and project queries and keys with ``q_proj`` / ``k_proj`` (``ViTAttention``,
    ``DeiTAttention``, ``Dinov2Attention``, ``DINOv3ViTAttention``, ``Aimv2Attention``, ...) or
    ``query`` / ``key`` (``DPTSelfAttention``). Rotary position embeddings (DINOv3, MLCD) act on
    q and k before the softmax, so the returned probabilities include them. Their forward returns
    ``(output, attention_probabilities)``, the probabilities ``softmax(q k^T / sqrt(d_head))`` of
    shape ``(batch, heads, tokens, tokens)`` — but only under eager attention: SDPA and flash
    attention return ``None``. While installed, the rule sets the module's
    ``config._attn_implementation`` to ``"eager"`` (the config is shared by all layers of a
    model) and a forward hook emits the probabilities; uninstalling restores the previous
    implementation.

    Raises (during the forward pass):
        CaptureError: if the module still returns no attention probabilities.
    """

    name = "hf-eager-attention"

    def matches(self, module: nn.Module) -> bool:
        cls = type(module)
        parts = cls.__module__.split(".")
        return (
            len(parts) >= 3
            and parts[0] == "transformers"
            and parts[1] == "models"
            and parts[2] in SUPPORTED_PACKAGES
            and cls.__name__.endswith("Attention")
            and hasattr(module, "config")
            and any(isinstance(getattr(module, q, None), nn.Linear)
                    and isinstance(getattr(module, k, None), nn.Linear)
                    for q, k in (("q_proj", "k_proj"), ("query", "key")))  # DPT: query / key
        )

    def install(self, module: nn.Module, emit: Emit) -> Restore:
        config = module.config
        old = getattr(config, "_attn_implementation", None)
        if old != "eager":
            config._attn_implementation = "eager"

        def hook(mod: nn.Module, args: Any, out: Any) -> None:
            probs = out[1] if isinstance(out, (tuple, list)) and len(out) > 1 else None
            if not isinstance(probs, torch.Tensor):
                import transformers

                raise CaptureError(
                    f"{type(mod).__name__} returned no attention probabilities even with eager "
                    f"attention (transformers {transformers.__version__}); use a transformers "
                    "release whose attention modules return (output, attention weights), e.g. "
                    "pip install -U 'probe[hf]'"
                )
            emit(probs)

        handle = module.register_forward_hook(hook)

        def restore() -> None:
            handle.remove()
            if old != "eager":
                config._attn_implementation = old

        return restore

    def can_gate(self, module: nn.Module) -> bool:
        from .gating import find_linear

        return find_linear(module, ("o_proj", "out_proj", "proj")) is not None

    def install_gate(self, module: nn.Module, num_heads: int, get_gate) -> Restore:
        """Forward pre-hook on the module's output projection (``o_proj`` / ``out_proj``), whose
        input ``attn_output.reshape(B, T, H·D)`` is head-major; window attention (Swin) repeats
        each image's gate over its windows."""
        from .gating import find_linear, gate_linear_input

        proj = find_linear(module, ("o_proj", "out_proj", "proj"))
        return gate_linear_input(proj, num_heads, get_gate, f"{type(module).__name__} gate", windows=True)


class HFAttentionPoolingSkipRule(CaptureRule):
    """SigLIP's attention-pooling head (``*MultiheadAttentionPoolingHead``): one learned probe
    query attends to the patch tokens through an ``nn.MultiheadAttention``. It is not
    self-attention among tokens, so it is kept out of the layers (``skip``) instead of being
    refused, and the encoder's layers are analysed."""

    name = "hf-attention-pooling (not a layer)"
    skip = True

    def matches(self, module: nn.Module) -> bool:
        cls = type(module)
        return cls.__module__.startswith("transformers.") and cls.__name__.endswith("AttentionPoolingHead")

    def install(self, module: nn.Module, emit: Emit) -> Restore:  # pragma: no cover - never a layer
        raise CaptureError("an attention-pooling head is not a layer")


register_rule(HFEagerAttentionRule())
register_rule(HFAttentionPoolingSkipRule())


# --------------------------------------------------------------------------------------------
# recognising Hugging Face models


def is_hf_model(module: Any) -> bool:
    """True for a ``transformers`` ``PreTrainedModel`` instance (checked without importing
    ``transformers``)."""
    return (
        isinstance(module, nn.Module)
        and type(module).__module__.startswith("transformers.")
        and hasattr(module, "config")
        and hasattr(module, "base_model")
    )


def _is_hf_folder(path: Path) -> bool:
    cfg = path / "config.json"
    if not (path.is_dir() and cfg.is_file()):
        return False
    try:
        return "model_type" in json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


def handles(model: Any) -> bool:
    """True if ``model`` is for this module: an ``hf:`` name, a local folder whose
    ``config.json`` names a ``transformers`` ``model_type``, or a ``transformers`` model."""
    if isinstance(model, str):
        return model.startswith(_PREFIX) or _is_hf_folder(Path(model).expanduser())
    if isinstance(model, Path):
        return _is_hf_folder(model.expanduser())
    return is_hf_model(model)


_MODEL_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(@[\w./-]+)?$")


def _locate(target: str) -> tuple[Path | None, str]:
    """``(local folder, model id)``: one of them is set.

    Raises:
        ProbeError: for a path that does not exist, a folder without ``config.json``, or a string
            that is neither a folder nor a valid model id.
    """
    if not target:
        raise ProbeError("--model hf: needs a local folder or a model id after 'hf:', e.g. hf:./my-vit")
    path = Path(target).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ProbeError(
                f"folder {str(path)!r} has no config.json; --model hf:FOLDER needs a folder written "
                "by save_pretrained (config.json and model.safetensors)"
            )
        return path, ""
    looks_like_path = target.startswith((".", "/", "~", "\\")) or target.count("/") > 1 or path.exists()
    if looks_like_path or not _MODEL_ID.match(target):
        raise ProbeError(
            f"{target!r} is not a folder (and not a hub model id ORG/NAME); --model hf:FOLDER needs "
            "an existing folder with config.json and model.safetensors"
        )
    return None, target


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence ``transformers``' load reports and progress bars, restoring them afterwards."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _short(e: BaseException, n: int = 200) -> str:
    s = " ".join(str(e).split())
    return s if len(s) <= n else s[: n - 3] + "..."


def _model_class(config: Any) -> Any:
    """The ``transformers`` class to build: the checkpoint's own architecture when it is a
    ``transformers`` model class (never code from the checkpoint), else
    ``AutoModelForImageClassification``, else ``AutoModel``."""
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, str(arch), None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    for auto in (transformers.AutoModelForImageClassification, transformers.AutoModel):
        mapping = getattr(auto, "_model_mapping", None)
        try:
            cls = mapping[type(config)] if mapping is not None else None
        except (KeyError, ValueError):
            cls = None
        if isinstance(cls, (tuple, list)):
            cls = cls[0] if cls else None
        if isinstance(cls, type):
            return cls
    raise ProbeError(
        f"transformers has no model class for model_type {getattr(config, 'model_type', '?')!r}; "
        f"supported: {', '.join(SUPPORTED_FAMILIES)}"
    )


def _load_kwargs(cls: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"trust_remote_code": False, "attn_implementation": "eager"}
    params = inspect.signature(cls.from_pretrained).parameters
    if "weights_only" in params:
        kwargs["weights_only"] = True
    else:  # older transformers: only safetensors guarantee that no pickled code runs
        kwargs["use_safetensors"] = True
    return kwargs


def _processor_dict(source: str, local_only: bool, revision: dict | None = None) -> dict[str, Any] | None:
    """The ``preprocessor_config.json`` of a folder or (cached / reachable) model id, if any."""
    path = Path(source) / "preprocessor_config.json"
    if not path.is_file():
        try:
            from transformers.utils import cached_file

            hit = cached_file(source, "preprocessor_config.json", local_files_only=local_only,
                              _raise_exceptions_for_missing_entries=False, **(revision or {}))
        except Exception:  # a missing file or an unreachable hub both mean: no processor config
            hit = None
        if not hit:
            return None
        path = Path(hit)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ProbeError(f"{str(path)!r} is not readable JSON ({_short(e)}); fix or remove it") from None
    return data if isinstance(data, dict) else None


# --------------------------------------------------------------------------------------------
# geometry and data config


#: names of the patch-embedding child of a ``transformers`` embeddings module (AIMv2: ``patch_embed``).
_PATCH_EMBEDS = ("patch_embedding", "patch_embeddings", "patch_embed")


def prefix_token_count(model: nn.Module) -> int | None:
    """Number of prefix tokens a ``transformers`` ViT-like model puts before its patch tokens.

    Counted from the model's own embedding parameters: ``cls_token`` ``(1, 1, D)``,
    ``distillation_token`` ``(1, 1, D)`` (DeiT) and ``register_tokens`` ``(1, R, D)`` (DINOv2 with
    registers, DINOv3), or CLIP's 1-D ``class_embedding`` ``(D,)`` (CLIP, MetaCLIP 2, MLCD); the
    mask token is not a prefix token. An embeddings module with a patch embedding and none of these
    has 0 (SigLIP, I-JEPA, AIMv2). All of these families put the prefix tokens first.

    Returns:
        The count (ViT 1, DeiT 2, DINOv2 1, DINOv2 with registers / DINOv3 1 + R), or ``None``
        when the model has no such embeddings.
    """
    base = getattr(model, "base_model", model)
    emb = getattr(base, "embeddings", None)
    if emb is None:  # DINOv3ViTModel: base_model is its encoder, the embeddings are beside it
        emb = getattr(model, "embeddings", None)
    if emb is None:  # e.g. CLIP / SigLIP classifiers: the tower is base.vision_model
        emb = next((m for n, m in base.named_modules() if n.endswith("embeddings")
                    and any(hasattr(m, a) for a in _PATCH_EMBEDS)), None)
    if emb is None:
        return None
    count, found = 0, False
    for name in ("cls_token", "distillation_token", "register_tokens"):
        t = getattr(emb, name, None)
        if isinstance(t, torch.Tensor) and t.dim() == 3:
            count += int(t.shape[1])
            found = True
    t = getattr(emb, "class_embedding", None)  # CLIP: a (D,) class embedding
    if isinstance(t, torch.Tensor) and t.dim() == 1:
        count += 1
        found = True
    if not found and any(hasattr(emb, a) for a in _PATCH_EMBEDS):
        return 0  # patch tokens only (SigLIP, I-JEPA, AIMv2)
    return count if found else None


def _pair(v: Any) -> tuple[int, int] | None:
    if isinstance(v, int):
        return (v, v)
    if isinstance(v, (list, tuple)) and len(v) == 2:
        return (int(v[0]), int(v[1]))
    if isinstance(v, dict) and "height" in v and "width" in v:
        return (int(v["height"]), int(v["width"]))
    return None


def _interpolation(resample: Any, default: str) -> str:
    if isinstance(resample, int) and resample in _PIL_RESAMPLE:
        return _PIL_RESAMPLE[resample]
    if isinstance(resample, str) and resample.lower() in _PIL_RESAMPLE.values():
        return resample.lower()
    return default


def data_config_from_processor(config: Any, processor: dict[str, Any] | None) -> dict[str, Any]:
    """timm-style data config for a ``transformers`` model.

    Args:
        config: the model's ``PretrainedConfig`` (``model_type``, ``image_size``,
            ``num_channels``).
        processor: the parsed ``preprocessor_config.json`` or ``None``.

    Returns:
        ``{"input_size": (C, H, W), "mean", "std", "interpolation", "crop_pct", "crop_mode"}``
        read by :func:`probe.data.eval_transform` (timm's eval transform). The image processor's
        steps map to it as follows: resize to ``size`` ``{"height", "width"}`` (aspect not kept)
        -> ``crop_mode="squash"``; resize of the shortest edge ``{"shortest_edge": s}`` ->
        ``crop_mode="center"``; a center crop to ``crop_size`` -> ``input_size`` = crop size and
        ``crop_pct`` = crop / resize size (else 1.0); ``resample`` (PIL code) -> interpolation;
        ``do_normalize=False`` -> mean 0, std 1. A shortest-edge resize without a crop (variable
        output size) is followed by a square center crop so images batch together. Without a
        processor config: ``input_size`` from ``config.image_size`` (the size of the position
        embeddings), crop 1.0, and :data:`FAMILY_NORMALIZATION`.

        Known differences from the processors: where the crop margin is odd, torchvision's center
        crop (used by timm) starts one pixel further than the processors'; a squash resize to a
        non-square ``size`` with a crop is scaled by the height ratio in both directions; a
        ``rescale_factor`` other than 1/255 is not represented.
    """
    family = family_of(getattr(config, "model_type", ""))
    config = _vision_config(config)
    channels = int(getattr(config, "num_channels", 3) or 3)
    mean, std, interp = FAMILY_NORMALIZATION.get(family, ((0.5,) * 3, (0.5,) * 3, "bicubic"))
    native = _pair(getattr(config, "image_size", None)) or (224, 224)
    cfg: dict[str, Any] = {
        "input_size": (channels, *native),
        "interpolation": interp,
        "mean": tuple(mean),
        "std": tuple(std),
        "crop_pct": 1.0,
        "crop_mode": "center",
    }
    if not processor:
        return _fit_channels(cfg, channels)
    cfg["interpolation"] = _interpolation(processor.get("resample"), interp)
    if processor.get("do_normalize", True):
        if processor.get("image_mean") is not None:
            cfg["mean"] = tuple(float(v) for v in processor["image_mean"])
        if processor.get("image_std") is not None:
            cfg["std"] = tuple(float(v) for v in processor["image_std"])
    else:
        cfg["mean"], cfg["std"] = (0.0,) * channels, (1.0,) * channels
    size = processor.get("size") if processor.get("do_resize", True) else None
    short = size.get("shortest_edge") if isinstance(size, dict) else None
    resize_hw = _pair(size)
    crop = _pair(processor.get("crop_size")) if processor.get("do_center_crop", False) else None
    if crop is not None:
        cfg["input_size"] = (channels, *crop)
        if resize_hw is not None:
            cfg["crop_mode"] = "squash"
            cfg["crop_pct"] = _crop_pct(crop[0], resize_hw[0])
        elif short:
            cfg["crop_pct"] = _crop_pct(min(crop), int(short))
    elif resize_hw is not None:
        cfg["input_size"] = (channels, *resize_hw)
        cfg["crop_mode"] = "squash"
    elif short:
        cfg["input_size"] = (channels, int(short), int(short))
    return _fit_channels(cfg, channels)


def _crop_pct(crop: int, resize: int) -> float:
    """``crop / resize``, nudged down by one ulp where timm's ``floor(crop / crop_pct)`` would
    otherwise give ``resize - 1``."""
    pct = crop / resize
    if math.floor(crop / pct) < resize:
        pct = math.nextafter(pct, 0.0)
    return pct


def _fit_channels(cfg: dict[str, Any], channels: int) -> dict[str, Any]:
    for key in ("mean", "std"):
        vals = tuple(cfg[key])
        if len(vals) != channels:
            cfg[key] = (vals[0],) * channels if len(vals) == 1 or channels == 1 else vals[:channels]
    return cfg


def _vision_config(config: Any) -> Any:
    """The vision part of a multi-modal config (CLIP, SigLIP: ``vision_config``), else ``config``."""
    sub = getattr(config, "vision_config", None)
    return sub if sub is not None and not hasattr(config, "image_size") else config


def _native_size(config: Any) -> tuple[int, int] | None:
    return _pair(getattr(_vision_config(config), "image_size", None))


def _unmasked_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """ViT-MAE: pass ``noise = 0, 1, ..., L-1`` so the random shuffle of the patch tokens is the
    identity (with ``mask_ratio = 0`` every token is kept, in image order)."""
    x = args[0] if args else kwargs.get("pixel_values")
    if kwargs.get("noise") is None and isinstance(x, torch.Tensor):
        cfg = _vision_config(module.config)
        patch = _pair(getattr(cfg, "patch_size", 16)) or (16, 16)
        tokens = (x.shape[-2] // patch[0]) * (x.shape[-1] // patch[1])
        noise = torch.arange(tokens, device=x.device, dtype=torch.float32).expand(x.shape[0], -1)
        kwargs = dict(kwargs, noise=noise)
    return args, kwargs


def _interpolate_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Ask the model to interpolate its position embeddings for inputs of another size than
    ``config.image_size`` (ViT and DeiT otherwise refuse them; DINOv2 always interpolates)."""
    x = args[0] if args else kwargs.get("pixel_values")
    native = _native_size(module.config)
    if (
        kwargs.get("interpolate_pos_encoding") is None
        and isinstance(x, torch.Tensor)
        and native is not None
        and tuple(x.shape[-2:]) != native
    ):
        kwargs = dict(kwargs, interpolate_pos_encoding=True)
    return args, kwargs


def prepare(model: nn.Module, processor: dict[str, Any] | None = None) -> nn.Module:
    """Give a ``transformers`` model what :func:`probe.analyze` reads from a timm model.

    Sets ``model.num_prefix_tokens`` (:func:`prefix_token_count`) and, unless present,
    ``model.pretrained_cfg`` (:func:`data_config_from_processor`), and — when the forward takes
    ``interpolate_pos_encoding`` — a forward pre-hook that turns it on for inputs whose size
    differs from ``config.image_size`` (so ``--input-size`` works for ViT and DeiT). Idempotent.

    Returns:
        ``model``, in eval mode.
    """
    n = prefix_token_count(model)
    if n is not None:
        model.num_prefix_tokens = n
    if processor is not None or not getattr(model, "pretrained_cfg", None):
        model.pretrained_cfg = data_config_from_processor(model.config, processor)
    if (
        "interpolate_pos_encoding" in inspect.signature(model.forward).parameters
        and not getattr(model, "_probe_interpolate_hook", False)
    ):
        model.register_forward_pre_hook(_interpolate_pre_hook, with_kwargs=True)
        model._probe_interpolate_hook = True
    if getattr(model.config, "model_type", "") == "vit_mae" and not getattr(model, "_probe_unmasked", False):
        # MAE's encoder drops a random 75 % of the patches and shuffles the rest; probe analyses
        # the encoder as it is used for features: every patch, in image order
        model.config.mask_ratio = 0.0
        if "noise" in inspect.signature(model.forward).parameters:
            model.register_forward_pre_hook(_unmasked_pre_hook, with_kwargs=True)
        model._probe_unmasked = True
    return model.eval()


# --------------------------------------------------------------------------------------------
# resolution (loading a folder / hub id / instance) lives in probe.model_sources.hf, which
# imports this module; nothing here imports probe.models or probe.model_sources.
