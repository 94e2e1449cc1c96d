"""Head-gate primitives shared by the capture rules (used by :mod:`probe.attribution`).

A *head gate* multiplies the output of head ``h`` of one attention layer by ``g[:, h]`` (Michel
et al. 2019, "Are Sixteen Heads Really Better than One?", Sec. 2-4): head ``h`` then adds
``g[h] W_O^h z^h`` to the residual stream, where ``z^h = P^h V^h`` is its value average. Because
``z^h`` is linear in the probabilities ``P^h`` and ``W_O`` is linear in ``z``, the same gate can be
applied at any of three equivalent places, whichever a family exposes:

* the *input of the output projection* ``(B, ..., H·D)`` (head-major channels; timm ``proj``,
  Hugging Face ``o_proj`` / ``out_proj``) — :func:`gate_linear_input`;
* the per-head output ``z`` ``(B, H, T, D)`` (what ``F.scaled_dot_product_attention`` returns);
* the probabilities ``P`` ``(B, H, T, T)`` before they multiply the values (a hand-written
  softmax; a per-head module's ``(B, T, T)``) — :func:`scale_heads`.

Contract of a gate getter: ``get_gate()`` returns ``None`` (the module must then run exactly as
without the gate) or a tensor ``(batch or 1, num_heads)`` whose column ``h`` multiplies head ``h``
per sample. With every gate at 1 the model's output is bit-identical (multiplication by 1.0 is
exact), which the tests check family by family.

This module imports nothing from :mod:`probe.capture` or :mod:`probe.attribution` (no circle).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..errors import ProbeError

GetGate = Callable[[], "torch.Tensor | None"]
Restore = Callable[[], None]


def _check(gate: torch.Tensor, batch: int, num_heads: int, where: str, windows: bool) -> torch.Tensor:
    """``gate`` expanded to ``batch`` rows (windows of one image repeat its row)."""
    ok = gate.dim() == 2 and gate.shape[1] == num_heads
    if ok and gate.shape[0] not in (1, batch):
        ok = windows and batch % gate.shape[0] == 0
    if not ok:
        raise ProbeError(
            f"{where}: gate of shape {tuple(gate.shape)} does not fit a batch of {batch} with "
            f"{num_heads} heads; pass gates of shape (heads,) per layer, or (batch, ...)"
        )
    if gate.shape[0] not in (1, batch):  # (images, H) -> (images * windows, H), image-major
        gate = gate.repeat_interleave(batch // gate.shape[0], dim=0)
    return gate


def apply_gate(x: torch.Tensor, gate: torch.Tensor, num_heads: int, where: str,
               windows: bool = False) -> torch.Tensor:
    """Multiply the per-head channel slices of ``x`` ``(B, ..., H·D)`` by ``gate`` ``(B or 1, H)``.

    Args:
        x: head-major concatenated head outputs; channel block ``h·D:(h+1)·D`` is head ``h``.
        gate: ``(B, H)`` or ``(1, H)``; with ``windows`` also ``(B / W, H)`` for window
            attention whose batch holds ``W`` windows per image, image-major (timm and Hugging
            Face ``window_partition``).
        where: the layer, for the error message.

    Raises:
        ProbeError: if the gate's shape does not fit ``x``.
    """
    gate = _check(gate, x.shape[0], num_heads, where, windows)
    if x.shape[-1] % num_heads:
        raise ProbeError(f"{where}: {x.shape[-1]} channels do not split into {num_heads} heads")
    xh = x.unflatten(-1, (num_heads, x.shape[-1] // num_heads))  # (B, ..., H, D)
    g = gate.to(x.dtype).reshape(gate.shape[0], *([1] * (x.dim() - 2)), num_heads, 1)
    return (xh * g).flatten(-2)


def scale_heads(t: torch.Tensor, gate: torch.Tensor, num_heads: int, where: str,
                windows: bool = False) -> torch.Tensor:
    """Multiply ``t`` ``(B, H, ...)`` (probabilities or per-head outputs) by ``gate[:, h]``.

    Raises:
        ProbeError: if the gate's shape does not fit ``t``.
    """
    if t.dim() < 2 or t.shape[1] != num_heads:
        raise ProbeError(f"{where}: tensor of shape {tuple(t.shape)} has no head axis of size {num_heads}")
    gate = _check(gate, t.shape[0], num_heads, where, windows)
    return t * gate.to(t.dtype).reshape(gate.shape[0], num_heads, *([1] * (t.dim() - 2)))


def gate_linear_input(linear: nn.Module, num_heads: int, get_gate: GetGate, where: str,
                      windows: bool = False, channels_first: bool = False) -> Restore:
    """Gate heads by a forward pre-hook on the output projection ``linear``, whose first input
    ``(B, ..., H·D)`` holds the heads' outputs head-major (:func:`apply_gate`); with
    ``channels_first`` the projection is a 1x1 convolution whose input is ``(B, H·D, h, w)``
    (timm MaxViT / CoAtNet ``Attention2d``).

    Returns:
        A callable that removes the hook.
    """

    def pre_hook(_mod: nn.Module, args: tuple) -> tuple | None:
        gate = get_gate()
        if gate is None:
            return None
        x = args[0]
        if channels_first:
            return (apply_gate(x.movedim(1, -1), gate, num_heads, where, windows).movedim(-1, 1), *args[1:])
        return (apply_gate(x, gate, num_heads, where, windows), *args[1:])

    return linear.register_forward_pre_hook(pre_hook).remove


def find_linear(module: nn.Module, names: tuple[str, ...] = ("proj", "o_proj", "out_proj")) -> nn.Module | None:
    """The first child of ``module`` named in ``names`` that is an ``nn.Linear``."""
    for name in names:
        child = getattr(module, name, None)
        if isinstance(child, nn.Linear):
            return child
    return None
