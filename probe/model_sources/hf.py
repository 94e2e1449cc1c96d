"""Hugging Face ``transformers`` vision transformers: ``--model hf:FOLDER``, ``hf:ORG/NAME``
(``@revision``), a folder whose ``config.json`` names a ``model_type``, or a ``transformers``
model instance. Optional extra ``probe[hf]``.

How the models are recognised, prepared (prefix tokens, data config from
``preprocessor_config.json``) and captured lives with the family, :mod:`probe.families.hf`; this
module loads them: the config and weights of a folder or a hub id (the hub when reachable, else
the local Hugging Face cache, else a ProbeError naming the local-folder option), never running
code from a checkpoint (``trust_remote_code=False``, ``weights_only=True`` / safetensors), eager
attention, float32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..capture import find_attention_layers
from ..errors import ProbeError
from ..families.hf import (
    _HF_INSTALL_HINT,
    _PREFIX,
    SUPPORTED_FAMILIES,
    HFEagerAttentionRule,
    _load_kwargs,
    _locate,
    _model_class,
    _processor_dict,
    _quiet_transformers,
    _short,
    handles,
    prepare,
    refusal,
)
from . import checkpoint
from .base import ModelSource, ResolvedModel


class HFSource(ModelSource):
    """``hf:FOLDER``, ``hf:ORG/NAME``, a ``save_pretrained`` folder, a ``transformers`` model
    (:func:`probe.families.hf.handles`); resolved by :func:`resolve_hf`."""

    name = "hf"
    scheme = "hf"
    example = "hf:FOLDER, hf:ORG/NAME"

    def handles(self, spec: Any) -> bool:
        return handles(spec)

    def display_name(self, spec: Any) -> str:
        return type(spec).__name__ if isinstance(spec, nn.Module) else f"{_PREFIX}{str(spec).removeprefix(_PREFIX)}"

    def resolve(self, spec: Any, weights: str | Path | None = None, random_init: bool = False,
                seed: int = 0) -> ResolvedModel:
        """See :func:`resolve_hf`."""
        return resolve_hf(spec, weights=weights, random_init=random_init, seed=seed)


def resolve_hf(
    model: str | Path | nn.Module,
    weights: str | Path | None = None,
    random_init: bool = False,
    seed: int = 0,
) -> Any:
    """Load or wrap a ``transformers`` vision transformer for analysis.

    Args:
        model: ``hf:FOLDER``, ``hf:ORG/NAME`` (hub model id, ``@revision`` allowed), a folder with a
            ``transformers`` ``config.json``, or a ``transformers`` model instance.
        weights: a local checkpoint with ``transformers`` key names (safetensors, or a
            weights-only torch file) loaded strictly instead of the folder's / hub's weights.
        random_init: build the architecture from its config with random weights (seeded).
        seed: seed of the random initialisation.

    Returns:
        A :class:`~probe.model_sources.base.ResolvedModel`; the model is float32, in eval mode, loaded with
        eager attention and prepared by :func:`prepare`.

    Raises:
        ProbeError: ``transformers`` not installed; a refused family
            (:data:`~probe.families.hf.REFUSED_FAMILIES`, checked before any weights load); a
            missing folder / ``config.json`` / weights
            file; a model id while the hub is unreachable and the id is not cached (naming the
            local-folder option); weights that do not cover the model's backbone; a model type
            none of whose attention modules probe can capture.
    """
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise ProbeError(f"--model {model!s} needs Hugging Face transformers; {_HF_INSTALL_HINT}") from None
    if weights is not None and random_init:
        raise ProbeError("--weights and --random-init exclude each other; pass one")

    processor: dict[str, Any] | None = None
    if isinstance(model, nn.Module):
        net, name = model, type(model).__name__
        _refuse(name, getattr(net.config, "model_type", ""))
        source = "as given (in-memory module)"
        if weights is not None:
            checkpoint.apply_state_dict(net, checkpoint.load_state_dict(weights), name, str(weights))
            source = str(weights)
    else:
        spec = str(model)
        target = spec[len(_PREFIX):] if spec.startswith(_PREFIX) else spec
        folder, model_id = _locate(target)
        source_ref = str(folder) if folder is not None else model_id
        repo, _, revision = source_ref.partition("@") if folder is None else (source_ref, "", "")
        local_only = folder is None and not checkpoint.hub_reachable()
        name = f"{_PREFIX}{target}"
        common = {"revision": revision or None} if revision else {}
        with _quiet_transformers():
            config = _load_config(repo, folder, local_only, common, checkpoint.HUB_HOST)
            _refuse(name, getattr(config, "model_type", ""))
            cls = _model_class(config)
            if weights is not None or random_init:
                net = _from_config(cls, config, seed)
                if weights is not None:
                    checkpoint.apply_state_dict(net, checkpoint.load_state_dict(weights), name, str(weights))
                    source = str(weights)
                else:
                    source = f"random init (seed {seed})"
            else:
                net, source = _from_pretrained(cls, repo, folder, local_only, common, checkpoint.HUB_HOST)
            processor = _processor_dict(repo, local_only, common)
        net = net.float()
        if folder is None and local_only:
            source += " (local Hugging Face cache)"
    model_type = getattr(net.config, "model_type", "?")
    if not any(isinstance(l.rule, HFEagerAttentionRule) for l in find_attention_layers(net)):
        raise ProbeError(
            f"{name}: transformers model type {model_type!r} has no attention module probe can "
            f"capture (supported: {', '.join(SUPPORTED_FAMILIES)}); register a capture rule "
            "(see probe.capture)"
        )
    prepare(net, processor)
    cfg_copy, net_cls = net.config, type(net)

    def rebuild(seed: int) -> nn.Module:
        """The same transformers architecture, randomly initialised from its config."""
        import copy

        fresh = _from_config(net_cls, copy.deepcopy(cfg_copy), seed).float()
        return prepare(fresh, processor)

    return ResolvedModel(
        model=net,
        name=name,
        weights=source,
        num_params=sum(p.numel() for p in net.parameters()),
        pretrained_cfg=dict(net.pretrained_cfg),
        rebuild=rebuild,
    )


def _refuse(name: str, model_type: str) -> None:
    """Raise the :data:`~probe.families.hf.REFUSED_FAMILIES` reason for ``model_type``, if any.

    Raises:
        ProbeError: ``model_type`` is a family probe cannot analyse (named, with why and what to do).
    """
    why = refusal(str(model_type))
    if why is not None:
        raise ProbeError(
            f"{name}: transformers model type {model_type!r} is not supported: {why} "
            f"(supported: {', '.join(SUPPORTED_FAMILIES)})"
        )


def _load_config(repo: str, folder: Path | None, local_only: bool, common: dict, host: str) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(repo, trust_remote_code=False, local_files_only=local_only, **common)
    except OSError as e:
        if folder is None and local_only:
            raise ProbeError(_unreachable(repo, host)) from None
        raise ProbeError(f"cannot read the config of {repo!r} ({_short(e)}); pass a folder written "
                         "by save_pretrained to --model hf:FOLDER") from None
    except (ValueError, KeyError) as e:
        raise ProbeError(
            f"{repo!r} is not a transformers model this installation can build without running "
            f"code from the checkpoint ({_short(e)}); supported: {', '.join(SUPPORTED_FAMILIES)}"
        ) from None


def _unreachable(repo: str, host: str) -> str:
    return (
        f"model id {repo!r} needs the Hugging Face hub ({host}), which is not reachable, and it is "
        "not in the local Hugging Face cache; download it where the hub is reachable "
        f"(huggingface-cli download {repo} --local-dir DIR) and pass the local folder: "
        "--model hf:DIR (config.json + model.safetensors)"
    )


def _from_config(cls: Any, config: Any, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    config._attn_implementation = "eager"
    try:
        return cls(config)
    except Exception as e:  # a config transformers cannot build (bad sizes) is the user's input
        raise ProbeError(f"cannot build {cls.__name__} from its config ({_short(e)}); fix config.json") from None


def _from_pretrained(cls: Any, repo: str, folder: Path | None, local_only: bool, common: dict,
                     host: str) -> tuple[nn.Module, str]:
    if folder is not None:
        files = {p.name for p in folder.iterdir()}
        if not any(f.endswith((".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json"))
                   for f in files):
            raise ProbeError(
                f"folder {str(folder)!r} has a config.json but no weights (model.safetensors); save "
                "them with save_pretrained, or pass --random-init to analyse untrained weights"
            )
    try:
        net, info = cls.from_pretrained(repo, output_loading_info=True, local_files_only=local_only,
                                        **_load_kwargs(cls), **common)
    except OSError as e:
        if folder is None and local_only:
            raise ProbeError(_unreachable(repo, host)) from None
        raise ProbeError(f"cannot load the weights of {repo!r} ({_short(e)}); pass a folder with "
                         "model.safetensors to --model hf:FOLDER") from None
    except Exception as e:  # corrupt or pickled-code checkpoints, mismatched shapes
        raise ProbeError(f"cannot load the weights of {repo!r} ({_short(e)}); re-save the model with "
                         "save_pretrained (safetensors)") from None
    # a bare ``...Model`` is all backbone, even where its ``base_model`` is a submodule
    # (DINOv3ViTModel: ``model``, the encoder, beside the embeddings)
    headless = net.base_model is net or "For" not in type(net).__name__
    base_prefix = "" if headless else f"{net.base_model_prefix}."
    # the pooler (dense + tanh on the class token, after the last block) is a head, not backbone:
    # a model saved with add_pooling_layer=False loads into a class that builds one
    missing = sorted(k for k in info.get("missing_keys", ())
                     if k.startswith(base_prefix) and not k.startswith(f"{base_prefix}pooler."))
    mismatched = sorted(str(k) for k in info.get("mismatched_keys", ()))
    if missing or mismatched:
        bad = missing + mismatched
        raise ProbeError(
            f"the weights of {repo!r} do not cover {type(net).__name__}: {len(bad)} missing or "
            f"mis-shaped tensors ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); pass a "
            "complete checkpoint"
        )
    source = f"local folder {folder}" if folder is not None else f"hub {repo}"
    head_missing = sorted(info.get("missing_keys", ()))
    if head_missing:
        source += f" (task head not in the checkpoint, random: {', '.join(head_missing[:2])})"
    return net, source
