"""Read the probabilities a module computes with a plain ``softmax`` call inside its ``forward``,
without changing what it computes: shared by the rules for torchvision Swin
(:mod:`.torchvision_swin`) and timm's BoTNet / HaloNet attention (:mod:`.timm_hybrids`).

While installed, the module's ``forward`` runs inside a :class:`torch.overrides.TorchFunctionMode`
(:class:`SoftmaxTap`) that passes every torch call through unchanged and hands the output of the
first softmax that the rule's ``accepts(module, out)`` recognises to the listeners: capture
callbacks see it, gate callbacks may return it scaled per head (that tensor then replaces it in the
module's computation). With no gate the output is bit-identical to the unwrapped module.

Capture and gates of one module share one wrapped ``forward`` (:func:`tapped`), installed with the
first listener and removed with the last, in any order, so the module is left exactly as found.

No rule registers here.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..capture import Restore, override_attribute

#: The softmax entry points a module may call.
SOFTMAXES = (F.softmax, torch.softmax, torch.Tensor.softmax, torch.special.softmax)

#: ``accepts(module, softmax output) -> bool``: the softmax that holds the module's probabilities.
Accepts = Callable[[nn.Module, torch.Tensor], bool]


class SoftmaxTap(TorchFunctionMode):
    """Passes every torch call through; the first softmax whose output ``accepts`` goes to
    ``on_probs``, whose return value (the same tensor, or gated) replaces it.

    Args:
        accepts: ``accepts(out) -> bool`` for a softmax output tensor.
        on_probs: ``on_probs(out) -> tensor`` of the same shape.
    """

    def __init__(self, accepts: Callable[[torch.Tensor], bool], on_probs: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.accepts, self.on_probs, self.done = accepts, on_probs, False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.done and func in SOFTMAXES and isinstance(out, torch.Tensor) and self.accepts(out):
            self.done = True
            out = self.on_probs(out)
        return out


class TappedForward:
    """The shared ``forward`` wrapper of one module: capture callbacks ``(before(x), seen(probs,
    x))`` and gates ``gate(probs) -> probs``; installed with the first listener, removed with the
    last. ``x`` is the module's first positional input."""

    def __init__(self, module: nn.Module, accepts: Accepts):
        self.module = weakref.ref(module)
        self.accepts = accepts
        self.captures: list[tuple[Callable, Callable]] = []
        self.gates: list[Callable[[torch.Tensor], torch.Tensor]] = []
        self.restore: Restore | None = None

    def _ensure(self, module: nn.Module) -> None:
        if self.restore is not None:
            return
        original = module.forward

        def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            for before, _ in list(self.captures):
                before(x)

            def on_probs(probs: torch.Tensor) -> torch.Tensor:
                for _, seen in list(self.captures):
                    seen(probs, x)
                for gate in list(self.gates):
                    probs = gate(probs)
                return probs

            with SoftmaxTap(lambda out: self.accepts(module, out), on_probs):
                return original(x, *args, **kwargs)

        self.restore = override_attribute(module, "forward", forward)

    def add(self, kind: str, item: Any) -> Restore:
        """Add a ``"capture"`` item ``(before, seen)`` or a ``"gate"``; returns its remover."""
        module = self.module()
        self._ensure(module)
        target = self.captures if kind == "capture" else self.gates
        target.append(item)

        def remove() -> None:
            for i, other in enumerate(target):
                if other is item:
                    del target[i]
                    break
            if not self.captures and not self.gates and self.restore is not None:
                self.restore()
                self.restore = None
                _TAPPED.pop(module, None)

        return remove


_TAPPED: "weakref.WeakKeyDictionary[nn.Module, TappedForward]" = weakref.WeakKeyDictionary()


def tapped(module: nn.Module, accepts: Accepts) -> TappedForward:
    """The module's :class:`TappedForward` (created on first use; one per module)."""
    if module not in _TAPPED:
        _TAPPED[module] = TappedForward(module, accepts)
    return _TAPPED[module]
