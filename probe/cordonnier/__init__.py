"""probe's own attention-only CIFAR-10 model (Cordonnier, Loukas & Jaggi, ICLR 2020): the
architecture (:mod:`.model`), its training recipe (:mod:`.train`), and the trained checkpoint
shipped with the package, which ``probe analyze`` analyses when no ``--model`` is given.

* ``probe analyze`` / ``probe.analyze(None)`` / ``--model cordonnier``: the shipped model
  (``weights/quadratic.safetensors``, 6 layers, 9 heads, quadratic positional attention,
  width 72; its recipe and test accuracy in ``data/README.md`` of the repository);
* ``--model probe.cordonnier:build --random-init`` (or ``--weights``): the architecture.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ProbeError
from .model import CIFAR_CFG, CLASSES, CordonnierViT, build  # noqa: F401

#: The name under which the shipped model is analysed (``--model cordonnier``, or no ``--model``).
DEFAULT_MODEL = "cordonnier"
#: Aliases accepted for it.
DEFAULT_ALIASES = ("cordonnier", "cordonnier_quadratic", "default")
#: The shipped checkpoint (package data).
WEIGHTS = Path(__file__).with_name("weights") / "quadratic.safetensors"


def pretrained() -> CordonnierViT:
    """The shipped trained model, in eval mode (architecture from the checkpoint's metadata).

    Raises:
        ProbeError: if the package was installed without its checkpoint.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not WEIGHTS.is_file():
        raise ProbeError(f"the embedded model's checkpoint {str(WEIGHTS)!r} is missing from this "
                         "installation; reinstall probe, or pass --model with --weights")
    with safe_open(str(WEIGHTS), "pt") as f:
        config = json.loads(f.metadata()["config"])
    net = CordonnierViT(**config)
    net.load_state_dict(load_file(str(WEIGHTS)), strict=True)
    return net.eval()
