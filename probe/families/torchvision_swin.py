"""torchvision Swin v1 / v2 (``torchvision.models.swin_t`` ... ``swin_v2_b``, or any
``torchvision.models.swin_transformer.SwinTransformer``): window attention mapped back to image
positions, as timm's and Hugging Face's Swin (rules ``timm-swin-windows`` in :mod:`.timm_extra`,
``hf-swin-windows`` in :mod:`.hf_swin`; mapping in :mod:`.windows`). Rule ``torchvision-swin-windows``.

Swin (Liu et al. 2021, arXiv 2103.14030; v2: Liu et al. 2022, arXiv 2111.09883) attends inside
``M x M`` windows of each stage's ``H x W`` token grid, every other block on a grid rolled by
``-M/2``. torchvision's attention modules ``ShiftedWindowAttention`` and
``ShiftedWindowAttentionV2`` take the stage grid ``(B, H, W, C)`` and call the functional
``torchvision.models.swin_transformer.shifted_window_attention``, which computes the window
probabilities with one ``F.softmax`` over ``(B * windows, heads, M^2, M^2)`` (windows image-major,
row-major; tokens row-major inside a window, as timm's ``window_partition``).

How the rule reads them: while installed, the module's ``forward`` runs inside a
:class:`torch.overrides.TorchFunctionMode` that passes every torch call through unchanged and
hands the output of that softmax — the exact probabilities the module computed — to the rule; the
model's output is bit-identical. They are scattered into the stage's full ``(H W, H W)`` matrix,
zero between tokens that share no window (~1e-44 between tokens of a shifted window that come from
opposite image borders, which Swin masks with -100). A layer has 0 prefix tokens, the grid of its
stage and ``input / grid`` pixels per token (``patch_size * 2^stage``).

What torchvision does on its own and how the rule treats it:

* it pads ``H``, ``W`` to multiples of the window (``F.pad``); padded tokens take attention mass
  that belongs to no image position: refused before the module runs, naming ``--input-size``
  (as the timm and Hugging Face rules);
* it sets the shift to 0 along an axis where the window covers the whole (padded) grid
  (``window_size[i] >= H_i``); the rule applies the same rule to the module's ``shift_size``, so
  e.g. swin_t's last stage at 224 px (7x7 grid, 7x7 window) is captured unshifted.

Head gates (:mod:`.gating`): the module applies its output projection with ``F.linear`` on
``proj.weight`` (not by calling ``proj``), so a hook on ``proj`` never runs. The gate therefore
scales head ``h`` of the probabilities before they multiply the values
(:func:`~.gating.scale_heads`, equivalent by linearity, see there), each image's gate row repeated
over its windows; at gate 1 the output is bit-identical.

Capture and gates of one module share one wrapped ``forward`` (:func:`.taps.tapped`, installed with
the first, removed with the last, in any order), so the module is left exactly as found.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..capture import CaptureRule, Emit, Restore, register_rule
from ..errors import CaptureError
from .taps import tapped
from .windows import check_windows_tile, emit_windows

#: torchvision's module and attention classes this rule captures.
TV_MODULE = "torchvision.models.swin_transformer"
TV_CLASSES = ("ShiftedWindowAttention", "ShiftedWindowAttentionV2")


def _is_tv_swin_attention(module: nn.Module) -> bool:
    """True for torchvision's ``ShiftedWindowAttention(V2)`` or a subclass of them."""
    return any(c.__module__ == TV_MODULE and c.__name__ in TV_CLASSES for c in type(module).__mro__)


def effective_shift(grid: tuple[int, int], window: tuple[int, int], shift: tuple[int, int]) -> tuple[int, int]:
    """The shift torchvision's ``shifted_window_attention`` applies: 0 along an axis where the
    window covers the whole grid (``window >= grid``), else ``shift`` (tokens).

    Args:
        grid: ``(H, W)`` stage grid (not padded: padded grids are refused first).
        window: ``(Mh, Mw)``; shift: ``(Sh, Sw)`` from the module.
    """
    return tuple(0 if m >= g else int(s) for g, m, s in zip(grid, window, shift))  # type: ignore[return-value]


def _window_softmax(module: nn.Module, out: torch.Tensor) -> bool:
    """The window softmax of ``shifted_window_attention``: output ``(B·windows, heads, M², M²)``."""
    n = int(module.window_size[0]) * int(module.window_size[1])
    return out.dim() == 4 and out.shape[-1] == n and out.shape[-2] == n


def _wrapped(module: nn.Module):
    return tapped(module, _window_softmax)


def _pair(v: Any) -> tuple[int, int]:
    return int(v[0]), int(v[1])


class TorchvisionSwinWindowRule(CaptureRule):
    """torchvision ``ShiftedWindowAttention`` / ``ShiftedWindowAttentionV2``: window attention
    mapped back to the stage's grid (module docstring: how it is read, refusals, gates).

    Raises (during the forward pass):
        CaptureError: input that is not ``(B, H, W, C)``, a stage grid that is not a multiple of
            the window (padded windows), or window attention that does not fit the windows.
    """

    name = "torchvision-swin-windows"

    def matches(self, module: nn.Module) -> bool:
        return (
            _is_tv_swin_attention(module)
            and isinstance(getattr(module, "qkv", None), nn.Linear)
            and isinstance(getattr(module, "proj", None), nn.Linear)
            and hasattr(module, "window_size")
            and hasattr(module, "shift_size")
        )

    def num_prefix_tokens(self, module: nn.Module) -> int | None:
        return 0

    def num_heads(self, module: nn.Module) -> int | None:
        return int(module.num_heads)

    def install(self, module: nn.Module, emit: Emit) -> Restore:
        where = type(module).__name__
        state: dict[str, tuple[int, int]] = {}
        cache: dict = {}

        def before(x: torch.Tensor) -> None:
            if not isinstance(x, torch.Tensor) or x.dim() != 4:
                raise CaptureError(
                    f"{where} received input of shape {tuple(getattr(x, 'shape', ()))}, not (batch, H, W, "
                    "channels); this torchvision Swin version is not supported, choose other --layers"
                )
            grid, window = (int(x.shape[1]), int(x.shape[2])), _pair(module.window_size)
            check_windows_tile(grid, window, where)
            state["grid"], state["window"] = grid, window
            state["shift"] = effective_shift(grid, window, _pair(module.shift_size))

        def seen(probs: torch.Tensor, x: torch.Tensor) -> None:
            emit_windows(probs, state["grid"], state["window"], state["shift"], emit, cache, where)

        return _wrapped(module).add("capture", (before, seen))

    def can_gate(self, module: nn.Module) -> bool:
        return True

    def install_gate(self, module: nn.Module, num_heads: int, get_gate) -> Restore:
        """Scale head ``h`` of the window probabilities ``(B·windows, heads, M², M²)`` by
        ``gate[:, h]`` before they multiply the values (:func:`~.gating.scale_heads`); each
        image's gate row is repeated over its windows (image-major)."""
        from .gating import scale_heads

        where = f"{type(module).__name__} gate"

        def gate(probs: torch.Tensor) -> torch.Tensor:
            g = get_gate()
            return probs if g is None else scale_heads(probs, g, num_heads, where, windows=True)

        return _wrapped(module).add("gate", gate)


register_rule(TorchvisionSwinWindowRule())
