"""Capture rule for PyTorch's own ``nn.MultiheadAttention``.

Covers every model built from stock PyTorch layers: ``nn.TransformerEncoderLayer`` /
``nn.TransformerEncoder``, torchvision's ``vit_b_16`` family (``EncoderBlock.self_attention``) and
user modules that hold an ``nn.MultiheadAttention``.

Three ways these models hide their attention probabilities, and what the rule does about each:

* callers pass ``need_weights=False`` (``TransformerEncoderLayer._sa_block``, torchvision's
  ``EncoderBlock``): while installed, the module's ``forward`` is wrapped so that it always computes
  the weights, and returns ``None`` for them to a caller that did not ask, as before;
* with weights, ``nn.MultiheadAttention`` averages them over heads by default: the wrapper passes
  ``average_attn_weights=False``, so the probabilities are per head, ``(batch, heads, query, key)``;
* in eval mode without gradients, ``TransformerEncoderLayer``, ``TransformerEncoder`` and
  ``MultiheadAttention`` take a fused "fast path" that never materialises the weights (and skips
  the module's ``forward`` altogether): it is switched off with
  ``torch.backends.mha.set_fastpath_enabled(False)`` while installed and restored afterwards.

The weights are those of ``F.multi_head_attention_forward``:
``softmax(q k^T / sqrt(head_dim) + mask)`` per head (Vaswani et al. 2017, Eq. 1), before dropout.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..capture import CaptureRule, Emit, Restore, override_attribute, register_rule


#: ``nn.MultiheadAttention.forward``'s parameters after ``(query, key, value)``, in order.
_MHA_ARGS = ("key_padding_mask", "need_weights", "attn_mask", "average_attn_weights", "is_causal")


def _wrap_forward(module: nn.Module, forward: Any) -> Restore:
    """Replace ``module.forward`` by ``forward`` with PyTorch's MHA fast path (which skips
    ``forward``) switched off; the returned function restores both."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    undo = override_attribute(module, "forward", forward)

    def restore() -> None:
        undo()
        torch.backends.mha.set_fastpath_enabled(fastpath)

    return restore


class MultiheadAttentionRule(CaptureRule):
    """``torch.nn.MultiheadAttention``: per-head weights, the fast path switched off."""

    name = "torch-multihead-attention"

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.MultiheadAttention)

    def install(self, module: nn.Module, emit: Emit) -> Restore:
        inner = module.forward  # bound method (or an existing instance override)

        def forward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any):
            kwargs.update(zip(_MHA_ARGS, args))  # positional arguments after (query, key, value)
            asked = kwargs.pop("need_weights", True)
            averaged = kwargs.pop("average_attn_weights", True)
            out, weights = inner(query, key, value, need_weights=True, average_attn_weights=False, **kwargs)
            if weights is not None:
                emit(weights if weights.dim() == 4 else weights.unsqueeze(0))
            if not asked:
                return out, None
            if averaged and weights is not None:
                weights = weights.mean(dim=-3)
            return out, weights

        return _wrap_forward(module, forward)

    def install_gate(self, module: nn.Module, num_heads: int, get_gate) -> Restore:
        """Gate heads of ``nn.MultiheadAttention`` (a pre-hook on ``out_proj`` never fires:
        ``F.multi_head_attention_forward`` uses its weight directly).

        While a gate is set, the wrapped ``forward`` runs the module with ``out_proj`` replaced
        by the identity (bias ``None``), which returns the concatenated head outputs
        ``z`` ``(T, B, H·D)`` exactly, multiplies head ``h``'s slice by ``g[:, h]`` and applies
        the real ``out_proj`` in the same row layout as PyTorch does (``(T·B, E)``, query-major),
        so all gates at 1 give bit-identical outputs to the module without the fast path. The
        fast path (which skips ``forward``) is off while installed. The returned weights are
        those of the ungated module (the gate acts after the softmax).
        """
        from .gating import apply_gate

        inner = module.forward
        where = f"{type(module).__name__} gate"
        identities: dict[tuple, nn.Module] = {}

        def identity_for(weight: torch.Tensor) -> nn.Module:
            key = (weight.shape[1], weight.dtype, weight.device)
            if key not in identities:
                lin = nn.Linear(weight.shape[1], weight.shape[1], bias=False, device=weight.device,
                                dtype=weight.dtype)
                with torch.no_grad():
                    lin.weight.copy_(torch.eye(weight.shape[1], dtype=weight.dtype, device=weight.device))
                lin.weight.requires_grad_(False)
                identities[key] = lin
            return identities[key]

        def forward(*args: Any, **kwargs: Any):
            gate = get_gate()
            if gate is None:
                return inner(*args, **kwargs)
            real = module.out_proj
            module.out_proj = identity_for(real.weight)
            try:
                z, weights = inner(*args, **kwargs)
            finally:
                module.out_proj = real
            if z.dim() == 2:  # unbatched (T, E)
                gated = apply_gate(z[None], gate, num_heads, where)[0]
                return torch.nn.functional.linear(gated, real.weight, real.bias), weights
            zt = z.transpose(0, 1) if module.batch_first else z  # (T, B, E)
            t, b, e = zt.shape
            gated = apply_gate(zt.transpose(0, 1), gate, num_heads, where).transpose(0, 1)  # (T, B, E)
            y = torch.nn.functional.linear(gated.reshape(t * b, e), real.weight, real.bias).view(t, b, -1)
            return (y.transpose(0, 1) if module.batch_first else y), weights

        return _wrap_forward(module, forward)


register_rule(MultiheadAttentionRule())
