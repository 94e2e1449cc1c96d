"""The planted one-head oracle of the attribution tests, shared by every family's test: weight
surgery leaves one head as the only path from attention to the output, so all of its importance
must land on that head; and the model's output with a head gate installed (:func:`gated_output`)."""

from __future__ import annotations

import torch
from torch import nn


def zero_heads_except(proj: nn.Linear, heads: int, layer: int, keep: tuple[int, int]) -> None:
    """Zero the input columns of ``proj`` (the output projection, head-major input ``(…, H·D)``)
    of every head of ``layer`` except ``keep = (layer, head)``."""
    width = proj.weight.shape[1] // heads
    with torch.no_grad():
        for head in range(heads):
            if (layer, head) != keep:
                proj.weight[:, head * width:(head + 1) * width] = 0.0


def assert_all_importance_on(att, keep: tuple[int, int], where, relative: bool = False) -> None:
    """Integrated-gradients and ablation importance of ``att`` (a ``HeadAttribution``) is on
    ``keep``: above 1e-4 there, below 1e-6 on every other head (times ``max(1, planted)`` with
    ``relative``)."""
    df = att.heads.set_index(["layer", "head"])
    for col in ("importance_ig", "importance_ablation"):
        planted = abs(float(df.loc[keep, col]))
        others = df.drop(index=keep)[col].abs().max()
        assert planted > 1e-4, (where, col, planted)
        assert others < 1e-6 * (max(1.0, planted) if relative else 1.0), (where, col, others)


def gated_output(model: nn.Module, layer, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``model(x)`` with ``gate`` ``(1, heads)`` installed on ``layer`` by its capture rule, removed after."""
    restore = layer.rule.install_gate(layer.module, gate.shape[1], lambda: gate)
    try:
        with torch.no_grad():
            return model(x)
    finally:
        restore()
