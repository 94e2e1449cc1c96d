"""Capture rules for model families beyond timm's plain ViT attention.

Importing this package (done by :mod:`probe.capture`) registers:

* :mod:`.timm_extra` — ConViT's gated positional attention (no class token in the local layers),
  Swin's window attention mapped back to image positions, a refusal for XCiT's channel attention;
* :mod:`.torch_nn` — ``nn.MultiheadAttention`` (``nn.TransformerEncoderLayer``, torchvision ViT,
  user modules) with per-head weights and the fused fast path switched off;
* :mod:`.functional` — the fallback for user modules without a recognised attention module: calls
  of ``F.scaled_dot_product_attention`` and softmax over ``(batch, heads, T, T)`` scores, found in
  one forward pass.

How to add a rule for a new attention module is shown in :mod:`probe.capture` and docs/capture.md.
"""

from . import functional, timm_extra, torch_nn  # noqa: F401

__all__ = ["functional", "timm_extra", "torch_nn"]
