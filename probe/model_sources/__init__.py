"""Model sources: what ``--model`` (or ``probe.analyze(model)``) can name, one module per source.

Each source is a :class:`ModelSource` (:mod:`.base`): it recognises its specs, builds the
architecture (also at random initialisation, for null distributions), loads ``--weights`` or its
own trained weights, and gives the data config of the input transform. Built-in sources, in the
order they are tried (each spec is recognised by exactly one of them):

* :mod:`.embedded` — ``None`` / ``cordonnier``: probe's shipped attention-only CIFAR-10 model;
* :mod:`.hf` — ``hf:FOLDER``, ``hf:ORG/NAME``, a ``save_pretrained`` folder, a ``transformers`` model;
* :mod:`.open_clip` — ``open_clip:ARCH[:TAG]``: an OpenCLIP image tower (extra ``probe[clip]``);
* :mod:`.torchvision` — ``torchvision:NAME[:WEIGHTS]``: a torchvision classification model;
* :mod:`.module` — an in-memory ``nn.Module``;
* :mod:`.factory` — ``package.module:factory`` / ``path/to/model.py:factory``;
* :mod:`.timm` — any other plain name: a timm model or alias.

A new source is one small module: subclass :class:`ModelSource` and call
:func:`register_source` (tried before the built-ins), or declare it under the entry-point group
``probe.model_sources`` of an installed package (:func:`load_entry_points`); see
``docs/capture.md``, "Model sources".
:func:`resolve` is what :func:`probe.models.resolve_model` calls.

Layering: this package imports :mod:`probe.capture`, :mod:`probe.families` and
:mod:`probe.cordonnier`, never :mod:`probe.models` or :mod:`probe.pipeline`; the families never
import this package.
"""

from __future__ import annotations

from .base import (  # noqa: F401
    ENTRY_POINT_GROUP,
    Constructor,
    ModelSource,
    ResolvedModel,
    _register_builtin,
    claimed_schemes,
    describe_sources,
    find_source,
    load_entry_points,
    register_source,
    resolve,
    scheme_of,
    sources,
    unregister_source,
)
from .embedded import EmbeddedSource
from .factory import FactorySource
from .hf import HFSource
from .module import ModuleSource
from .open_clip import OpenCLIPSource
from .timm import TimmSource
from .torchvision import TorchvisionSource

for _source in (EmbeddedSource(), HFSource(), OpenCLIPSource(), TorchvisionSource(), ModuleSource(),
                FactorySource(), TimmSource()):
    _register_builtin(_source)
del _source
load_entry_points()  # sources of installed plug-in packages, tried before the built-ins

__all__ = ["ModelSource", "ResolvedModel", "Constructor", "register_source", "unregister_source", "sources",
           "find_source", "resolve", "load_entry_points", "ENTRY_POINT_GROUP", "describe_sources", "claimed_schemes", "scheme_of", "EmbeddedSource",
           "HFSource", "OpenCLIPSource", "TorchvisionSource", "ModuleSource", "FactorySource", "TimmSource"]
