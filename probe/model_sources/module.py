"""In-memory modules: ``probe.analyze(my_model)`` with an ``nn.Module`` (not a ``transformers``
model, which :mod:`.hf` prepares). The module is analysed as given, in eval mode; ``--weights``
loads a checkpoint into it strictly; it is rebuilt at random initialisation by
:meth:`~probe.model_sources.base.ResolvedModel.random_init` (deep copy, ``reset_parameters``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from .base import ModelSource, ResolvedModel


class ModuleSource(ModelSource):
    """An ``nn.Module`` instance (a ``transformers`` model goes to the Hugging Face source)."""

    name = "module"
    example = "an nn.Module instance"

    def handles(self, spec: Any) -> bool:
        from ..families import hf

        return isinstance(spec, nn.Module) and not hf.is_hf_model(spec)

    def display_name(self, spec: Any) -> str:
        return type(spec).__name__

    def resolve(self, spec: Any, weights: str | Path | None = None, random_init: bool = False,
                seed: int = 0) -> ResolvedModel:
        """``spec`` itself (eval mode), with ``weights`` loaded into it when given;
        ``random_init`` leaves it as given (the caller built it).

        Raises:
            ProbeError: unreadable or mismatching ``weights``; ``weights`` with ``random_init``.
        """
        from ..errors import ProbeError

        if weights is not None and random_init:
            raise ProbeError("--weights and --random-init exclude each other; pass one")
        source = "as given (in-memory module)"
        if weights is not None:
            source = self.load_weights(spec, spec, weights)
        spec.eval()
        return ResolvedModel(model=spec, name=self.display_name(spec), weights=source,
                             num_params=sum(p.numel() for p in spec.parameters()),
                             pretrained_cfg=dict(getattr(spec, "pretrained_cfg", None) or {}), rebuild=None)
