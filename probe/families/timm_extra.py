"""Capture rules for timm families beyond the plain ViT attention of :mod:`probe.capture`.

* **ConViT** (d'Ascoli et al. 2021): its gated positional self-attention (``GPSA``) runs in the
  first ``local_up_to_layer`` blocks, *before* the class token is concatenated; its attention
  probabilities are the gated mixture
  ``(1 - sigmoid(g)) softmax(q k^T * scale) + sigmoid(g) softmax(pos_proj(r_qk))``, renormalised
  (paper Eq. 5), read at ``attn_drop`` like any timm attention. The rule tells the geometry that
  these layers have **no** prefix token; the later ``MHSA`` layers have the class token.
* **Swin** (Liu et al. 2021; timm ``swin_transformer`` and ``swin_transformer_v2``): attention is
  computed inside non-overlapping ``M x M`` windows, every other block on a grid cyclically
  shifted by ``M/2``. The rule hooks the Swin *block* (which knows the window size, the shift
  and the stage's ``H x W`` token grid) and maps each window's ``(M^2, M^2)`` probabilities back
  to image positions: the result is the stage's full ``(H W, H W)`` attention matrix, zero
  between tokens that share no window (and ~1e-44 between tokens of a shifted window that come
  from opposite image borders, which Swin masks with -100). A Swin layer therefore has no prefix
  token, the grid of its stage and ``input / grid`` pixels per token (4, 8, 16, 32 px in the
  usual models). Windows that need padding (a stage grid that is not a multiple of the window)
  are refused: the padded tokens take attention mass that belongs to no image position.
* **CaiT** talking-heads attention: probabilities read at the input of ``proj_w`` (after the
  softmax, before the second head mixing); its class-attention layers are refused (one query).
* **XCiT** cross-covariance attention (``XCA``) is refused: it attends across channels, not
  tokens, so there is no attention between image positions.

Other windowed or channel attention is refused generically by :func:`probe.capture.dry_run`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..capture import CaptureRule, Emit, Restore, TimmAttentionRule, override_attribute, register_rule, removing
from ..errors import CaptureError
from .windows import DENSE_CHUNK_BYTES, emit_windows, window_positions, windows_to_dense  # noqa: F401


class ConvitGpsaRule(TimmAttentionRule):
    """timm ConViT's ``GPSA`` layers: gated positional attention over patch tokens only."""

    name = "timm-convit-gpsa"

    def matches(self, module: nn.Module) -> bool:
        return type(module).__name__ == "GPSA" and type(module).__module__ == "timm.models.convit"

    def num_prefix_tokens(self, module: nn.Module) -> int | None:
        return 0


class CaitTalkingHeadsRule(CaptureRule):
    """timm CaiT's talking-heads attention (Touvron et al. 2021, Sec. 2): the probabilities are
    ``softmax(proj_l(q k^T * scale))`` over the heads mixed by ``proj_l``; ``attn_drop`` sees them
    only after a second mixing ``proj_w``, whose rows no longer sum to one. The rule reads the input
    of ``proj_w`` instead. (CaiT's class-attention layers, whose only query is the class token, are
    refused by :func:`probe.capture.dry_run`; select the self-attention layers with ``--layers``.)"""

    name = "timm-cait-talking-heads"

    def matches(self, module: nn.Module) -> bool:
        return (type(module).__name__ == "TalkingHeadAttn" and type(module).__module__ == "timm.models.cait"
                and isinstance(getattr(module, "proj_w", None), nn.Module))

    def num_prefix_tokens(self, module: nn.Module) -> int | None:
        return 0  # the class token joins only in the class-attention layers

    def install(self, module: nn.Module, emit: Emit) -> Restore:
        # proj_w receives the probabilities as (batch, query, key, heads)
        handle = module.proj_w.register_forward_pre_hook(lambda mod, args: emit(args[0].permute(0, 3, 1, 2)))
        return handle.remove

    def can_gate(self, module: nn.Module) -> bool:
        return True

    def install_gate(self, module: nn.Module, num_heads: int, get_gate) -> Restore:
        """Gate the captured heads: scale head ``h`` of the probabilities at ``proj_w``'s input
        ``(B, N, N, H)``, before the second head mixing (a pre-mixing head's contribution to
        every mixed head is then multiplied by its gate)."""
        from .gating import scale_heads

        where = f"{type(module).__name__} gate"

        def pre_hook(_mod: nn.Module, args: tuple):
            gate = get_gate()
            if gate is None:
                return None
            probs = args[0].permute(0, 3, 1, 2)  # (B, H, N, N)
            return (scale_heads(probs, gate, num_heads, where).permute(0, 2, 3, 1), *args[1:])

        return module.proj_w.register_forward_pre_hook(pre_hook).remove


class XcaRefusalRule(CaptureRule):
    """timm XCiT's cross-covariance attention: refused, it has no token-to-token attention."""

    name = "timm-xcit-xca (refused)"

    def matches(self, module: nn.Module) -> bool:
        return type(module).__name__ == "XCA" and type(module).__module__ == "timm.models.xcit"

    def install(self, module: nn.Module, emit: Emit) -> Restore:
        raise CaptureError(
            "XCiT's cross-covariance attention (XCA) attends across channels (head_dim x head_dim), "
            "not between tokens, so there is no attention between image positions to analyse; "
            "choose a model with token self-attention"
        )


def _fused_off(module: nn.Module) -> Restore:
    """Switch off timm's ``fused_attn`` flag (if any) so ``attn_drop`` sees the probabilities."""
    if not hasattr(module, "fused_attn"):
        return lambda: None
    return override_attribute(module, "fused_attn", False)


class SwinWindowRule(CaptureRule):
    """timm Swin (v1, v2) blocks: window attention mapped back to the stage's token grid."""

    name = "timm-swin-windows"

    def matches(self, module: nn.Module) -> bool:
        attn = getattr(module, "attn", None)
        return (
            type(module).__module__ in ("timm.models.swin_transformer", "timm.models.swin_transformer_v2")
            and hasattr(module, "_attn")
            and hasattr(module, "window_size")
            and hasattr(module, "shift_size")
            and isinstance(attn, nn.Module)
            and isinstance(getattr(attn, "attn_drop", None), nn.Module)
        )

    def num_prefix_tokens(self, module: nn.Module) -> int | None:
        return 0

    def install(self, module: nn.Module, emit: Emit) -> Restore:
        state: dict[str, tuple[int, int]] = {}
        cache: dict[tuple, torch.Tensor] = {}
        attn_mod = module.attn
        restore_fused = _fused_off(attn_mod)

        def pre_hook(mod: nn.Module, args: tuple) -> None:
            x = args[0]
            if x.dim() != 4:
                raise CaptureError(
                    f"{type(mod).__name__} received input of shape {tuple(x.shape)}, not (batch, H, W, "
                    "channels); this timm Swin version is not supported, choose other --layers"
                )
            state["grid"] = (int(x.shape[1]), int(x.shape[2]))

        def on_attn(mod: nn.Module, inp: tuple, attn: torch.Tensor) -> None:
            window = tuple(int(v) for v in module.window_size)
            shift = tuple(int(v) for v in module.shift_size)
            emit_windows(attn, state["grid"], window, shift, emit, cache)

        handles = [module.register_forward_pre_hook(pre_hook), attn_mod.attn_drop.register_forward_hook(on_attn)]

        return removing(handles, restore_fused)

    def num_heads(self, module: nn.Module) -> int | None:
        return int(module.attn.num_heads)

    def can_gate(self, module: nn.Module) -> bool:
        return isinstance(getattr(module.attn, "proj", None), nn.Linear)

    def install_gate(self, module: nn.Module, num_heads: int, get_gate) -> Restore:
        """Pre-hook on the window attention's ``proj``, whose input ``(B·windows, M², H·D)`` is
        head-major; each image's gate row is repeated over its windows (image-major)."""
        from .gating import gate_linear_input

        return gate_linear_input(module.attn.proj, num_heads, get_gate, f"{type(module).__name__} gate",
                                 windows=True)


register_rule(SwinWindowRule())
register_rule(XcaRefusalRule())
register_rule(CaitTalkingHeadsRule())
register_rule(ConvitGpsaRule())
