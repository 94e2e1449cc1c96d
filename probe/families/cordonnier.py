"""Capture rule for the attention-only models of :mod:`probe.cordonnier` (Cordonnier et al. 2020).

Their position-only attention layers normally apply the row and column factors of the quadratic
encoding without forming the ``(T, T)`` matrix; while captured, the layer sets ``materialize``,
forms the full probabilities ``(B, H, T, T)`` (the same numbers, used for its own output), and
routes them through its ``attn_probs`` identity, which the hook reads. The sequence has no
prefix tokens.
"""

from __future__ import annotations

from torch import nn

from ..capture import CaptureRule, Emit, Restore, register_rule


class CordonnierAttentionRule(CaptureRule):
    """Quadratic, generalized-quadratic and relative-content attention of :mod:`probe.cordonnier`."""

    name = "cordonnier-attention"

    def matches(self, module: nn.Module) -> bool:
        from ..cordonnier.model import RelativeContentAttention, _PositionalAttention

        return isinstance(module, (_PositionalAttention, RelativeContentAttention))

    def num_prefix_tokens(self, module: nn.Module) -> int | None:
        return 0

    def install(self, module: nn.Module, emit: Emit) -> Restore:
        old = module.materialize
        module.materialize = True
        handle = module.attn_probs.register_forward_hook(lambda m, inp, out: emit(out))

        def restore() -> None:
            handle.remove()
            module.materialize = old

        return restore


register_rule(CordonnierAttentionRule())


def _register_gates() -> None:
    """Head gates for :mod:`probe.attribution`: as for timm's ``Attention``, a forward pre-hook on
    ``module.proj``, whose input ``(B, T, H·D)`` holds the heads' outputs head-major."""
    from ..attribution import _install_timm_attention, register_head_gate
    from ..cordonnier.model import GeneralizedQuadraticAttention, QuadraticAttention, RelativeContentAttention

    for cls in (QuadraticAttention, GeneralizedQuadraticAttention, RelativeContentAttention):
        register_head_gate(cls, _install_timm_attention)


_register_gates()
