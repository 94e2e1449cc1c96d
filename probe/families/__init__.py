"""Model families beyond timm's plain ViT attention: capture rules, one module per family (how
models are named and loaded is :mod:`probe.model_sources`, which imports these, never the reverse).

Importing this package (done by :mod:`probe`) registers every family's capture rules:

* :mod:`.cordonnier` — the attention-only models of :mod:`probe.cordonnier` (Cordonnier et al. 2020);
* :mod:`.gating` — head-gate primitives the rules use for attribution (no rule of its own);
* :mod:`.hf` — Hugging Face ``transformers`` ViT/DeiT/DINOv2(-reg), CLIP/SigLIP vision, BEiT,
  ViT-MAE (imports ``transformers`` only inside
  its functions, so importing it is cheap and safe when that optional extra is not installed);
* :mod:`.hf_data2vec` — Hugging Face Data2Vec-Vision (BEiT in the older attention layout);
* :mod:`.hf_swin` — Hugging Face Swin v1 / v2 and Donut's Swin encoder: window attention mapped
  back to image positions;
* :mod:`.timm_extra` — ConViT's gated positional attention (no class token in the local layers),
  Swin's window attention mapped back to image positions, CaiT's talking heads, a refusal for
  XCiT's channel attention;
* :mod:`.timm_zoo` — SAM ViT (global and window attention), CSATv2, and named refusals for timm
  families probe cannot analyse (Hiera, MViTv2, EfficientViT, MobileViTv2, CoaT, VOLO outlookers,
  EdgeNeXt / DaViT channel attention, DaViT windows);
* :mod:`.timm_hybrids` — convolution-attention hybrids: MaxViT block and grid attention (mapped back
  to the stage grid), CoAtNet, BoTNet, HaloNet (blocks + halo mapped back), Lambda networks refused;
* :mod:`.taps` — reads the output of a module's own softmax call while it runs (no rule of its own);
* :mod:`.torch_nn` — ``nn.MultiheadAttention`` (``nn.TransformerEncoderLayer``, torchvision ViT,
  user modules) with per-head weights and the fused fast path switched off;
* :mod:`.torchvision_swin` — torchvision Swin v1 / v2 (``ShiftedWindowAttention(V2)``): window
  attention mapped back to image positions;
* :mod:`.windows` — Swin window attention -> image positions, shared by the timm and Hugging Face
  Swin rules (no rule of its own);
* :mod:`.functional` — the fallback for user modules without a recognised attention module: calls
  of ``F.scaled_dot_product_attention`` and softmax over ``(batch, heads, T, T)`` or
  ``(batch·heads, T, T)`` scores and per-head modules, found in one forward pass.

How to add a rule for a new attention module: :mod:`probe.capture` and ``docs/capture.md``.
"""

from . import cordonnier, functional, gating, hf, hf_data2vec, hf_swin, taps, timm_extra, timm_hybrids, timm_zoo, torch_nn, torchvision_swin, windows  # noqa: F401

__all__ = ["cordonnier", "functional", "gating", "hf", "hf_data2vec", "hf_swin", "taps", "timm_extra", "timm_hybrids", "timm_zoo",
           "torch_nn", "torchvision_swin", "windows"]
