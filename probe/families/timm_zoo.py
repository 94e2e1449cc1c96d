"""Capture rules and refusals for timm attention families found by a sweep of the timm zoo
(``timm.list_models()``, one small variant per family at random init), beyond
:mod:`.timm_extra`.

Supported:

* **SAM ViT** (Kirillov et al. 2023, arXiv 2304.02643; timm ``vision_transformer_sam``, ``samvit_*``):
  its attention module computes ``softmax(q k^T * scale + rel_pos_bias)`` on ``(batch·heads, N, N)``
  tensors. The rule hooks the SAM *block*, reshapes the probabilities read at ``attn_drop`` to
  ``(batch, heads, N, N)`` and, in blocks with window attention (``window_size > 0``), maps the
  non-overlapping windows back to the block's ``H x W`` token grid (same row-major window order as
  Swin, no shift: :func:`probe.families.windows.emit_windows`). Windows that need padding (a grid
  that is not a multiple of the window, e.g. 64x64 tokens with 14x14 windows at 1024 px) are
  refused. SAM has no prefix tokens.
* **Swin V2 CR** (timm ``swin_transformer_v2_cr``, ``swinv2_cr_*``): the same shifted-window
  attention as Swin (block input ``(B, H, W, C)``, ``torch.roll`` by ``-shift``, row-major windows,
  image-major), so timm Swin's rule (:class:`probe.families.timm_extra.SwinWindowRule`) applies to
  its blocks; grids that need padded windows are refused.
* **Twins-SVT** locally-grouped attention (Chu et al. 2021, arXiv 2104.13840; timm ``twins``
  ``LocallyGroupedAttn``): attention inside non-overlapping ``ws x ws`` windows of the stage grid
  (windows and their tokens row-major, as Swin without shift); the rule reshapes the probabilities
  ``(B, windows, heads, ws², ws²)`` read at ``attn_drop`` and maps the windows back to the grid
  passed to the module (``size``); padded windows are refused. The interleaved global sub-sampled
  attention layers (``GlobalSubSampleAttn``, keys pooled by a strided convolution) stay refused by
  :func:`probe.capture.dry_run` (fewer keys than queries): select the window layers with ``--layers``.
* **CSATv2** (timm ``csatv2``): its transformer blocks use timm's generic ``Attention`` on a
  flattened CNN feature map; the rule declares that these layers have **no** prefix tokens (the
  model has no class token), so the token grid is never guessed by trying prefix counts (at 224 px
  the last stage has 3x3 tokens, which would otherwise read as 5 prefix tokens and a 2x2 grid).

Refused before any forward work (:class:`probe.errors.CaptureError` from ``install``, raised by
:func:`probe.capture.dry_run`), each with the reason named:

* Hiera ``MaskUnitAttention``: tokens unrolled into mask-unit order, queries max-pooled;
* MViTv2 ``MultiScaleAttention(PoolFirst)``: queries and keys pooled by strided convolutions;
* EfficientViT (MSRA) ``LocalWindowAttention`` / ``CascadedGroupAttention``: per-head softmaxes on
  cascaded channel splits, windows folded into the batch;
* EfficientViT (MIT) ``LiteMLA`` and MobileViTv2 ``LinearSelfAttention``: linear attention;
* CoaT ``FactorAttnConvRelPosEnc``: factorised attention (softmax over keys, then ``k^T v``);
* VOLO ``OutlookAttention``: local weights predicted from one token, no query-key product;
* EdgeNeXt ``CrossCovarianceAttn`` and DaViT ``ChannelAttention(V2)``: attention across channels;
* DaViT ``WindowAttention``: windows (padded to multiples of the window) that probe does not map back.

Without these rules some of them looked analysable and gave wrong numbers: Hiera's global layers
were read as row-major 14x14 grids, and EfficientViT-MSRA's windows were read as heads.
"""

from __future__ import annotations

import torch
from torch import nn

from ..capture import CaptureRule, Emit, Restore, TimmAttentionRule, override_attribute, register_rule, removing
from ..errors import CaptureError
from .timm_extra import SwinWindowRule
from .windows import emit_windows


class TimmRefusalRule(CaptureRule):
    """Recognise timm attention modules that probe cannot analyse and refuse them with a reason.

    Args:
        name: rule label (shown in errors and :func:`probe.capture.describe_rules`).
        module: the timm module that defines the classes (``timm.models.hiera``).
        classes: the class names to refuse.
        reason: one sentence: what the family does and what to do instead.

    ``install`` raises :class:`~probe.errors.CaptureError` with ``reason``; the matched module and its
    children are not offered to other rules (nor to the functional fallback, which would read them
    wrongly).
    """

    def __init__(self, name: str, module: str, classes: tuple[str, ...], reason: str) -> None:
        self.name = f"{name} (refused)"
        self.module = module
        self.classes = classes
        self.reason = reason

    def matches(self, module: nn.Module) -> bool:
        return type(module).__module__ == self.module and type(module).__name__ in self.classes

    def install(self, module: nn.Module, emit: Emit) -> Restore:
        raise CaptureError(self.reason)


_CHOOSE = "choose a model with image-wide token self-attention (ViT, DeiT, BEiT, EVA, Swin, ...)"

REFUSALS: list[TimmRefusalRule] = [
    TimmRefusalRule(
        "timm-hiera", "timm.models.hiera", ("MaskUnitAttention",),
        "MaskUnitAttention (Hiera) runs on tokens unrolled into mask-unit order (timm hiera Unroll), "
        "not the row-major image order, and max-pools its queries over token groups, so its keys cannot "
        f"be placed on the image grid; {_CHOOSE}"),
    TimmRefusalRule(
        "timm-mvitv2", "timm.models.mvitv2", ("MultiScaleAttention", "MultiScaleAttentionPoolFirst"),
        "MultiScaleAttention (MViTv2) is pooling attention: it pools queries and keys/values with strided convolutions, "
        "so queries and keys are not the patch positions of the block's input and differ in number; "
        f"probe cannot place them on one image grid; {_CHOOSE}"),
    TimmRefusalRule(
        "timm-efficientvit-msra", "timm.models.efficientvit_msra", ("LocalWindowAttention", "CascadedGroupAttention"),
        "CascadedGroupAttention (EfficientViT-MSRA) gives every head its own softmax over a different "
        "channel split fed by the previous head's output, and splits feature maps larger than its window "
        "into windows folded into the batch, so its softmax calls are neither heads of one layer nor "
        f"attention over the whole image; {_CHOOSE}"),
    TimmRefusalRule(
        "timm-efficientvit-mit", "timm.models.efficientvit_mit", ("LiteMLA",),
        "LiteMLA (EfficientViT-MIT) is ReLU linear attention: it multiplies k^T v first and never forms "
        f"a query-to-key attention matrix; {_CHOOSE}"),
    TimmRefusalRule(
        "timm-mobilevitv2", "timm.models.mobilevit", ("LinearSelfAttention",),
        "LinearSelfAttention (MobileViTv2) is linear attention: one softmax score per token (a single "
        f"latent query) weights a global context vector, with no query-to-key attention matrix; {_CHOOSE}"),
    TimmRefusalRule(
        "timm-coat", "timm.models.coat", ("FactorAttnConvRelPosEnc",),
        "FactorAttnConvRelPosEnc (CoaT) is factorised attention: it takes a softmax over the keys' token axis and multiplies k^T v first "
        f"(linear attention), so it never forms a query-to-key attention matrix; {_CHOOSE}"),
    TimmRefusalRule(
        "timm-volo-outlook", "timm.models.volo", ("OutlookAttention",),
        "OutlookAttention (VOLO) predicts each token's KxK weights over its local neighbourhood from that "
        "token alone (a linear layer, no query-key product), so it is not attention between image "
        "positions; select VOLO's later self-attention layers with --layers (its class-attention layers "
        "are refused too)"),
    TimmRefusalRule(
        "timm-edgenext-xca", "timm.models.edgenext", ("CrossCovarianceAttn",),
        "CrossCovarianceAttn (EdgeNeXt) attends across channels (head_dim x head_dim), not between "
        f"tokens, so there is no attention between image positions to analyse; {_CHOOSE}"),
    TimmRefusalRule(
        "timm-davit-channel", "timm.models.davit", ("ChannelAttention", "ChannelAttentionV2"),
        "ChannelAttention (DaViT) attends across channels (head_dim x head_dim), not between tokens, so "
        f"there is no attention between image positions to analyse; {_CHOOSE}"),
    TimmRefusalRule(
        "timm-davit-windows", "timm.models.davit", ("WindowAttention",),
        "WindowAttention (DaViT) runs inside 7x7 windows (padded where the grid is not a multiple of 7), "
        f"which probe does not map back to image positions; {_CHOOSE}"),
]


class SamVitBlockRule(CaptureRule):
    """timm SAM ViT blocks: global or window attention over the block's token grid."""

    name = "timm-samvit"

    def matches(self, module: nn.Module) -> bool:
        attn = getattr(module, "attn", None)
        return (type(module).__module__ == "timm.models.vision_transformer_sam" and type(module).__name__ == "Block"
                and hasattr(module, "window_size") and isinstance(attn, nn.Module)
                and isinstance(getattr(attn, "attn_drop", None), nn.Module) and hasattr(attn, "num_heads"))

    def num_prefix_tokens(self, module: nn.Module) -> int | None:
        return 0

    def num_heads(self, module: nn.Module) -> int | None:
        return int(module.attn.num_heads)

    def install(self, module: nn.Module, emit: Emit) -> Restore:
        """Pre-hook on the block (its input ``(B, H, W, C)`` gives the grid) and forward hook on
        ``attn.attn_drop``, which receives ``(B·windows·heads, N, N)`` probabilities (fused attention
        switched off while installed)."""
        attn_mod = module.attn
        heads = int(attn_mod.num_heads)
        state: dict[str, tuple[int, int]] = {}
        cache: dict[tuple, torch.Tensor] = {}
        fused = (override_attribute(attn_mod, "fused_attn", False)
                 if getattr(attn_mod, "fused_attn", None) is not None else (lambda: None))
        where = f"SAM block ({type(module).__name__})"

        def pre_hook(mod: nn.Module, args: tuple) -> None:
            x = args[0]
            if x.dim() != 4:
                raise CaptureError(f"{where} received input of shape {tuple(x.shape)}, not (batch, H, W, channels); "
                                   "this timm SAM version is not supported, choose other --layers")
            state["grid"] = (int(x.shape[1]), int(x.shape[2]))

        def on_attn(mod: nn.Module, inp: tuple, out: torch.Tensor) -> None:
            if out.dim() != 3 or out.shape[0] % heads:
                raise CaptureError(f"{where} gave attention of shape {tuple(out.shape)}, not (batch·heads, N, N); "
                                   "this timm SAM version is not supported, choose other --layers")
            probs = out.reshape(out.shape[0] // heads, heads, out.shape[1], out.shape[2])
            win = int(module.window_size)
            if win <= 0:
                emit(probs)
            else:
                emit_windows(probs, state["grid"], (win, win), (0, 0), emit, cache, where)

        handles = [module.register_forward_pre_hook(pre_hook), attn_mod.attn_drop.register_forward_hook(on_attn)]

        return removing(handles, fused)

    def can_gate(self, module: nn.Module) -> bool:
        return isinstance(getattr(module.attn, "proj", None), nn.Linear)

    def install_gate(self, module: nn.Module, num_heads: int, get_gate) -> Restore:
        """Pre-hook on ``attn.proj``, whose input ``(B·windows, N, H·D)`` is head-major; each image's
        gate row is repeated over its windows (image-major)."""
        from .gating import gate_linear_input

        return gate_linear_input(module.attn.proj, num_heads, get_gate, "SAM block gate",
                                 windows=int(module.window_size) > 0)


class SwinV2CrWindowRule(SwinWindowRule):
    """timm Swin V2 CR blocks (``SwinTransformerV2CrBlock``): window attention mapped back to the
    stage's token grid, as :class:`~probe.families.timm_extra.SwinWindowRule`."""

    name = "timm-swinv2-cr-windows"

    def matches(self, module: nn.Module) -> bool:
        attn = getattr(module, "attn", None)
        return (type(module).__module__ == "timm.models.swin_transformer_v2_cr"
                and type(module).__name__ == "SwinTransformerV2CrBlock"
                and hasattr(module, "window_size") and hasattr(module, "shift_size")
                and isinstance(attn, nn.Module) and isinstance(getattr(attn, "attn_drop", None), nn.Module))


class TwinsLocalWindowRule(CaptureRule):
    """timm Twins ``LocallyGroupedAttn``: window attention mapped back to the stage's token grid."""

    name = "timm-twins-lsa"

    def matches(self, module: nn.Module) -> bool:
        return (type(module).__module__ == "timm.models.twins" and type(module).__name__ == "LocallyGroupedAttn"
                and isinstance(getattr(module, "attn_drop", None), nn.Module) and hasattr(module, "ws"))

    def num_prefix_tokens(self, module: nn.Module) -> int | None:
        return 0

    def install(self, module: nn.Module, emit: Emit) -> Restore:
        """Pre-hook on the module (its ``size`` argument is the ``(H, W)`` grid) and forward hook on
        ``attn_drop``, which receives ``(B, windows, heads, ws², ws²)`` (fused attention off)."""
        state: dict[str, tuple[int, int]] = {}
        cache: dict[tuple, torch.Tensor] = {}
        where = "Twins locally-grouped attention"
        fused = (override_attribute(module, "fused_attn", False)
                 if getattr(module, "fused_attn", None) is not None else (lambda: None))

        def pre_hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            size = args[1] if len(args) > 1 else kwargs.get("size")
            if size is None or len(size) != 2:
                raise CaptureError(f"{where} was called without its (H, W) size; this timm Twins version is "
                                   "not supported, choose other --layers")
            state["grid"] = (int(size[0]), int(size[1]))

        def on_attn(mod: nn.Module, inp: tuple, out: torch.Tensor) -> None:
            if out.dim() != 5:
                raise CaptureError(f"{where} gave attention of shape {tuple(out.shape)}, not (batch, windows, heads, "
                                   "N, N); this timm Twins version is not supported, choose other --layers")
            b, nw, h, n, m = out.shape
            ws = int(module.ws)
            emit_windows(out.reshape(b * nw, h, n, m), state["grid"], (ws, ws), (0, 0), emit, cache, where)

        handles = [module.register_forward_pre_hook(pre_hook, with_kwargs=True),
                   module.attn_drop.register_forward_hook(on_attn)]

        return removing(handles, fused)

    def can_gate(self, module: nn.Module) -> bool:
        return isinstance(getattr(module, "proj", None), nn.Linear)

    def install_gate(self, module: nn.Module, num_heads: int, get_gate) -> Restore:
        """Pre-hook on ``proj``, whose input ``(B, N, H·D)`` (windows merged back) is head-major."""
        from .gating import gate_linear_input

        return gate_linear_input(module.proj, num_heads, get_gate, "Twins LSA gate")


class Csatv2BlockRule(CaptureRule):
    """timm CSATv2 transformer blocks: timm ``Attention`` over a flattened feature map, no prefix tokens."""

    name = "timm-csatv2"

    def matches(self, module: nn.Module) -> bool:
        attn = getattr(module, "attn", None)
        return (type(module).__module__ == "timm.models.csatv2" and type(module).__name__ == "TransformerBlock"
                and isinstance(attn, nn.Module) and TimmAttentionRule().matches(attn))

    def num_prefix_tokens(self, module: nn.Module) -> int | None:
        return 0

    def num_heads(self, module: nn.Module) -> int | None:
        return int(module.attn.num_heads)

    def install(self, module: nn.Module, emit: Emit) -> Restore:
        return TimmAttentionRule().install(module.attn, emit)

    def can_gate(self, module: nn.Module) -> bool:
        return TimmAttentionRule().can_gate(module.attn)

    def install_gate(self, module: nn.Module, num_heads: int, get_gate) -> Restore:
        """As :meth:`probe.capture.TimmAttentionRule.install_gate` on the block's ``attn``."""
        return TimmAttentionRule().install_gate(module.attn, num_heads, get_gate)


for _rule in REFUSALS:
    register_rule(_rule)
register_rule(SamVitBlockRule())
register_rule(Csatv2BlockRule())
register_rule(SwinV2CrWindowRule())
register_rule(TwinsLocalWindowRule())
