"""The embedded model: ``--model cordonnier`` (or no ``--model``), probe's own attention-only
CIFAR-10 model shipped with the package (:mod:`probe.cordonnier`; Cordonnier, Loukas & Jaggi,
ICLR 2020). No download; its weights are package data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import ProbeError
from .base import ModelSource, ResolvedModel


class EmbeddedSource(ModelSource):
    """``None``, ``"cordonnier"`` and its aliases (:data:`probe.cordonnier.DEFAULT_ALIASES`): the
    shipped trained model (``weights/quadratic.safetensors``) or, with ``--random-init``, its
    architecture at random initialisation. ``--weights`` is refused (the architecture with other
    weights is ``--model probe.cordonnier:build --weights FILE``)."""

    name = "embedded"
    example = "cordonnier or no --model"

    def handles(self, spec: Any) -> bool:
        from ..cordonnier import DEFAULT_ALIASES

        return spec is None or (isinstance(spec, str) and spec in DEFAULT_ALIASES)

    def resolve(self, spec: Any, weights: str | Path | None = None, random_init: bool = False,
                seed: int = 0) -> ResolvedModel:
        """The shipped model as a :class:`ResolvedModel` (or its architecture at random
        initialisation with ``seed``, drawn inside ``torch.random.fork_rng``).

        Raises:
            ProbeError: ``weights`` given; the package installed without its checkpoint.
        """
        from .. import cordonnier
        from .checkpoint import file_sha256

        if weights is not None and random_init:
            raise ProbeError("--weights and --random-init exclude each other; pass one")
        if weights is not None:
            raise ProbeError("the embedded model comes with its weights; pass --model "
                             "probe.cordonnier:build --weights FILE for other weights of its architecture")
        trained = cordonnier.pretrained()
        config = dict(trained.config)
        config.pop("img_size", None), config.pop("pool", None), config.pop("num_classes", None)

        def rebuild(s: int) -> cordonnier.CordonnierViT:
            """The shipped architecture at random initialisation (seeded by the caller)."""
            return cordonnier.CordonnierViT(**config)

        if random_init:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                net = rebuild(seed).eval()
            source = f"random init (seed {seed})"
        else:
            net = trained
            digest = file_sha256(cordonnier.WEIGHTS)
            source = f"embedded: probe/cordonnier/weights/{cordonnier.WEIGHTS.name} (sha256 {digest[:16]}…)"
        return ResolvedModel(model=net, name=cordonnier.DEFAULT_MODEL, weights=source,
                             num_params=sum(p.numel() for p in net.parameters()),
                             pretrained_cfg=dict(net.pretrained_cfg), rebuild=rebuild)
