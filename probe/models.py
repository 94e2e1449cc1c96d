"""Model resolution: a name or module in, an eval-mode ``nn.Module`` with known weights out.

The public entry point is :func:`resolve_model`; the work is done by the registered model sources
(:mod:`probe.model_sources`, one module per source), so a new kind of ``--model`` is one small
file registered with :func:`probe.model_sources.register_source`:

* ``None`` / ``cordonnier``: the embedded trained model (:mod:`probe.cordonnier`, no download);
* timm names, with short aliases (:data:`ALIASES`): ``vit_small`` -> ``vit_small_patch16_224``;
* ``package.module:factory`` names a user factory returning an ``nn.Module`` (the module is found on
  ``sys.path`` or from the current directory; ``path/to/model.py:factory`` loads a file);
* ``hf:FOLDER`` / ``hf:ORG/NAME``: Hugging Face ``transformers`` models;
* ``open_clip:ARCH[:TAG]``: OpenCLIP image towers; ``torchvision:NAME[:WEIGHTS]``: torchvision models;
* an ``nn.Module`` instance.

Weights come from ``--weights FILE`` (safetensors; ``.pth``/``.pt``/``.bin`` only through
``torch.load(weights_only=True)``, which never executes pickled code), or from the source's own
store when it is reachable (hub, local cache), or — only when asked explicitly — random
initialisation.

The names below are re-exported from :mod:`probe.model_sources` for existing imports. To replace
the hub check in tests, patch :func:`probe.model_sources.checkpoint.hub_reachable` (the sources
call it there).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .model_sources.base import ResolvedModel  # noqa: F401
from .model_sources.checkpoint import (  # noqa: F401
    HUB_HOST,
    apply_state_dict,
    file_sha256,
    hub_reachable,
    load_state_dict,
)
from .model_sources.timm import ALIASES, resolve_name  # noqa: F401

__all__ = ["resolve_model", "ResolvedModel", "ALIASES", "resolve_name", "load_state_dict", "apply_state_dict",
           "file_sha256", "hub_reachable", "HUB_HOST"]


def resolve_model(
    model: Any,
    weights: str | Path | None = None,
    random_init: bool = False,
    seed: int = 0,
) -> ResolvedModel:
    """Build or wrap a model and load its weights, with the model source that recognises it
    (:func:`probe.model_sources.resolve`).

    Args:
        model: ``None`` or ``"cordonnier"``: the embedded trained model (:mod:`probe.cordonnier`,
            no download); a timm name or alias, ``package.module:factory``, an ``nn.Module``, a Hugging
            Face model (``hf:FOLDER`` / ``hf:ORG/NAME``), ``open_clip:ARCH[:TAG]``,
            ``torchvision:NAME[:WEIGHTS]``, or a spec a registered source handles.
        weights: a local checkpoint file (see :func:`load_state_dict`).
        random_init: analyse random weights; must be explicit, never a silent fallback.
        seed: seed of the random initialisation.

    Returns:
        A :class:`ResolvedModel` in eval mode.

    Raises:
        ProbeError: unknown name, bad or mismatching weights, or trained weights unreachable
            (the message names ``--weights`` and ``--random-init``).
    """
    from .model_sources import resolve

    return resolve(model, weights=weights, random_init=random_init, seed=seed)
