"""Hugging Face ``transformers`` Data2Vec-Vision (Baevski et al. 2022, arXiv 2202.03555): a BEiT
architecture (class token, then the patch grid; optional relative position bias, per layer or
shared) kept in ``transformers``' older attention layout.

Layout (``transformers.models.data2vec.modeling_data2vec_vision``): each block's
``Data2VecVisionAttention`` holds ``attention`` — a self-attention with ``query`` / ``key`` /
``value`` projections whose class is chosen when the model is built, ``Data2VecVisionSelfAttention``
(eager) or its subclass ``Data2VecVisionSdpaSelfAttention`` (SDPA: no probabilities) — and
``output.dense``, the output projection. The eager class computes ``softmax(q k^T / sqrt(d_head) +
bias)`` of shape ``(batch, heads, tokens, tokens)`` and passes it through ``attention.dropout``
(identity in eval mode) before multiplying by the values.

The rule (:class:`HFData2VecVisionRule`, a :class:`~.hf.HFEagerAttentionRule` so that
:func:`probe.model_sources.hf.resolve_hf` accepts the model) matches ``Data2VecVisionAttention``;
while installed it switches an SDPA self-attention to its eager parent class (same parameters,
same math; the class is restored afterwards) and a forward hook on ``attention.dropout`` emits the
probabilities. Head gates: a forward pre-hook on ``output.dense``, whose input is head-major.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..capture import Emit, Restore, register_rule
from .hf import HFEagerAttentionRule

#: the ``transformers`` modeling module of Data2Vec-Vision.
DATA2VEC_VISION_MODULE = "transformers.models.data2vec.modeling_data2vec_vision"


def _eager_class(attn: nn.Module) -> type | None:
    """The eager self-attention class of ``attn``: its own class, or — for the SDPA subclass — the
    nearest base class of the same modeling module without ``Sdpa`` in its name."""
    for cls in type(attn).__mro__:
        if cls.__module__ == DATA2VEC_VISION_MODULE and "Sdpa" not in cls.__name__:
            return cls if cls.__name__.endswith("SelfAttention") else None
    return None


class HFData2VecVisionRule(HFEagerAttentionRule):
    """``Data2VecVisionAttention`` blocks of ``transformers`` Data2Vec-Vision (see the module
    docstring). Emits ``(batch, heads, tokens, tokens)`` probabilities, 1 prefix token (class)."""

    name = "hf-data2vec-vision"

    def matches(self, module: nn.Module) -> bool:
        attn = getattr(module, "attention", None)
        out = getattr(module, "output", None)
        return (
            type(module).__module__ == DATA2VEC_VISION_MODULE
            and type(module).__name__.endswith("Attention")
            and isinstance(attn, nn.Module)
            and all(isinstance(getattr(attn, n, None), nn.Linear) for n in ("query", "key", "value"))
            and isinstance(getattr(attn, "dropout", None), nn.Module)
            and isinstance(getattr(out, "dense", None), nn.Linear)
            and _eager_class(attn) is not None
        )

    def install(self, module: nn.Module, emit: Emit) -> Restore:
        attn = module.attention
        old_cls = type(attn)
        eager = _eager_class(attn)
        if eager is not old_cls:
            attn.__class__ = eager  # SDPA subclass -> its eager parent (no new state)

        def hook(mod: nn.Module, args: Any, out: Any) -> None:
            emit(out)

        handle = attn.dropout.register_forward_hook(hook)

        def restore() -> None:
            handle.remove()
            attn.__class__ = old_cls

        return restore

    def num_heads(self, module: nn.Module) -> int | None:
        """``attention.num_attention_heads`` (the outer block has no head count of its own)."""
        return super().num_heads(module.attention)

    def can_gate(self, module: nn.Module) -> bool:
        return isinstance(getattr(getattr(module, "output", None), "dense", None), nn.Linear)

    def install_gate(self, module: nn.Module, num_heads: int, get_gate) -> Restore:
        """Forward pre-hook on ``output.dense``, whose input ``(batch, tokens, heads * head_dim)``
        is head-major."""
        from .gating import gate_linear_input

        return gate_linear_input(module.output.dense, num_heads, get_gate, f"{type(module).__name__} gate")


register_rule(HFData2VecVisionRule())
