"""Hugging Face ``transformers`` Swin (v1 ``SwinModel`` / ``SwinForImageClassification``, and
Swin v2): window attention mapped back to image positions, as timm's Swin (rule
``timm-swin-windows`` in :mod:`.timm_extra`; mapping in :mod:`.windows`).

Swin (Liu et al. 2021, arXiv 2103.14030; v2: Liu et al. 2022, arXiv 2111.09883) attends inside
``M x M`` windows of each stage's ``H x W`` token grid, every other block on a grid rolled by
``-M/2``. The rule hooks the ``transformers`` Swin *layer* (``SwinLayer`` / ``Swinv2Layer``: one
block), which is called with the stage grid ``input_dimensions`` and knows its ``window_size`` and
``shift_size``; its window attention ``(batch * windows, heads, M^2, M^2)`` is scattered into the
stage's full ``(H W, H W)`` matrix, zero between tokens that share no window (~1e-44 between tokens
of a shifted window that come from opposite image borders, which Swin masks with -100). A Swin
layer has 0 prefix tokens, the grid of its stage and ``input / grid`` pixels per token (``patch_size
* 2^stage``).

Where the probabilities come from, per layout of the installed ``transformers``:

* Swin v1 with an attention implementation switch (``SwinAttention`` with ``q_proj`` / ``o_proj``
  and a ``config``; ``transformers`` 5): the attention module returns ``(output, weights)``, the
  weights only under eager attention. As :class:`~.hf.HFEagerAttentionRule`, the rule sets
  ``config._attn_implementation = "eager"`` while installed (the config is shared by every layer of
  a model) and restores the previous value afterwards, so a model built with SDPA is captured.
* Swin v2, Donut's Swin encoder, and Swin v1 of older releases (``attention.self`` with ``query`` / ``key`` / ``value``
  and ``attention.output.dense``): always eager; the probabilities are read at the output of
  ``attention.self.dropout`` (identity in eval mode), whether or not ``output_attentions`` is set.

What ``transformers`` Swin does on its own and how the rule treats it:

* the window is clamped to the grid when the grid is not larger than the window
  (``set_shift_and_window_size``: window ``min(H, W)``, shift 0 — and kept for later calls): the
  rule reads window and shift when the attention runs, so a clamped window with an unchanged size
  (grid = window, shift dropped) is captured as computed. A grid *smaller* than the window would
  give windows that the layer's relative position bias (built for ``M x M``) does not fit:
  refused before the attention runs, naming ``--input-size``;
* a grid that is not a multiple of the window is padded (``maybe_pad``), and the padded tokens
  take attention mass that belongs to no image position: refused, naming ``--input-size`` (as for
  timm's Swin).

Head gates (:mod:`.gating`): a forward pre-hook on the output projection (``attention.o_proj``,
or ``attention.output.dense``), whose input ``(batch * windows, M^2, heads * head_dim)`` is
head-major; each image's gates are repeated over its windows.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..capture import Emit, Restore, register_rule, removing
from ..errors import CaptureError
from .hf import HFEagerAttentionRule
from .windows import check_windows_tile, emit_windows

#: ``transformers`` modeling modules whose ``*Layer`` blocks this rule captures.
SWIN_MODULES = ("transformers.models.swin.modeling_swin", "transformers.models.swinv2.modeling_swinv2",
                "transformers.models.donut.modeling_donut_swin")  # Donut's encoder: Swin v1, older layout


def _pair(v: Any) -> tuple[int, int]:
    """``(v, v)`` for an int (or 0-d tensor), else the first two entries as ints."""
    if isinstance(v, (list, tuple)):
        return int(v[0]), int(v[1])
    return int(v), int(v)


def _layout(attention: nn.Module) -> str | None:
    """``"eager-switch"`` (v1 ``SwinAttention`` with ``q_proj``/``o_proj`` and a ``config``),
    ``"self-output"`` (``attention.self.dropout`` + ``attention.output.dense``), else ``None``."""
    if (isinstance(getattr(attention, "q_proj", None), nn.Linear)
            and isinstance(getattr(attention, "o_proj", None), nn.Linear)
            and hasattr(attention, "config")):
        return "eager-switch"
    inner, out = getattr(attention, "self", None), getattr(attention, "output", None)
    if (isinstance(getattr(inner, "dropout", None), nn.Dropout)
            and isinstance(getattr(out, "dense", None), nn.Linear)):
        return "self-output"
    return None


def _out_projection(attention: nn.Module) -> nn.Linear:
    """The Linear whose input columns are the heads' outputs (head-major)."""
    if _layout(attention) == "eager-switch":
        return attention.o_proj
    return attention.output.dense


def _bias_window(attention: nn.Module) -> tuple[int, int] | None:
    """The window the attention's relative position bias is built for, if it says."""
    for owner in (getattr(attention, "relative_position_bias", None), getattr(attention, "self", None), attention):
        ws = getattr(owner, "window_size", None) if owner is not None else None
        if ws is not None:
            return _pair(ws)
    return None


class HFSwinWindowRule(HFEagerAttentionRule):
    """``transformers`` Swin v1 / v2 layers: window attention mapped back to the stage's grid.

    A subclass of :class:`~.hf.HFEagerAttentionRule` (it forces and restores eager attention the
    same way, and model resolution counts it as a Hugging Face attention rule); see the module
    docstring for the mapping, the refusals and the gates.

    Raises (during the forward pass):
        CaptureError: a stage grid that is not a multiple of the window (padded windows), a grid
            smaller than the window, or attention that does not fit the windows.
    """

    name = "hf-swin-windows"

    def matches(self, module: nn.Module) -> bool:
        attention = getattr(module, "attention", None)
        return (
            type(module).__module__ in SWIN_MODULES
            and type(module).__name__.endswith("Layer")
            and hasattr(module, "window_size")
            and hasattr(module, "shift_size")
            and isinstance(attention, nn.Module)
            and _layout(attention) is not None
        )

    def num_prefix_tokens(self, module: nn.Module) -> int | None:
        return 0

    def num_heads(self, module: nn.Module) -> int | None:
        attention = module.attention
        owner = attention if _layout(attention) == "eager-switch" else attention.self
        return int(owner.num_attention_heads)

    def install(self, module: nn.Module, emit: Emit) -> Restore:
        attention = module.attention
        layout = _layout(attention)
        where = f"{type(module).__name__}"
        state: dict[str, tuple[int, int]] = {}
        cache: dict = {}

        def layer_pre_hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            dims = args[1] if len(args) > 1 else kwargs.get("input_dimensions")
            if dims is None or len(dims) != 2:
                raise CaptureError(
                    f"{where} was called without its (height, width) input_dimensions; this transformers "
                    "Swin version is not supported, choose other --layers"
                )
            state["grid"] = (int(dims[0]), int(dims[1]))

        def attention_pre_hook(mod: nn.Module, args: tuple) -> None:
            # runs after the layer clamped its window and shift to the grid (set_shift_and_window_size)
            grid = state["grid"]
            window, shift = _pair(module.window_size), _pair(module.shift_size)
            bias = _bias_window(attention)
            if bias is not None and window != bias:
                raise CaptureError(
                    f"{where} on a {grid[0]}x{grid[1]} token grid: transformers clamps its {bias[0]}x{bias[1]} "
                    f"window to {window[0]}x{window[1]}, which its relative position bias (built for "
                    f"{bias[0]}x{bias[1]} windows) does not fit; set --input-size so that every stage's grid "
                    "is at least the window size and a multiple of it"
                )
            check_windows_tile(grid, window, where)
            state["window"], state["shift"] = window, shift

        def on_probs(probs: torch.Tensor) -> None:
            emit_windows(probs, state["grid"], state["window"], state["shift"], emit, cache, where)

        handles = [
            module.register_forward_pre_hook(layer_pre_hook, with_kwargs=True),
            attention.register_forward_pre_hook(attention_pre_hook),
        ]
        if layout == "eager-switch":
            restore_eager = super().install(attention, on_probs)
        else:
            handles.append(attention.self.dropout.register_forward_hook(lambda m, i, out: on_probs(out)))
            restore_eager = lambda: None  # noqa: E731 - this layout has no implementation switch

        return removing(handles, restore_eager)

    def can_gate(self, module: nn.Module) -> bool:
        return _layout(module.attention) is not None

    def install_gate(self, module: nn.Module, num_heads: int, get_gate) -> Restore:
        """Forward pre-hook on the window attention's output projection (``o_proj`` or
        ``output.dense``), input ``(batch * windows, M^2, heads * head_dim)`` head-major; each
        image's gate row is repeated over its windows (image-major)."""
        from .gating import gate_linear_input

        return gate_linear_input(_out_projection(module.attention), num_heads, get_gate,
                                 f"{type(module).__name__} gate", windows=True)


register_rule(HFSwinWindowRule())
