"""A small CIFAR-10 ViT built from stock PyTorch layers — a user's model, not part of ``probe``.

The architecture matches the third-party checkpoint ``custom-vit-cifar10/vit_cifar10.pth``
(see ``../shared/README.md``): a 4x4/stride-4 convolutional patch embedding of a 32x32 image
(8x8 = 64 patch tokens, width 128), a prepended class token and learned position embeddings
(65 tokens), an ``nn.TransformerEncoder`` of 6 post-norm ``nn.TransformerEncoderLayer``
(8 heads, MLP 256, ReLU, ``batch_first``), and ``LayerNorm`` + ``Linear`` on the class token.

Analyse it with::

    probe analyze --model examples.cifar_vit:build \\
        --weights ../shared/data/custom-vit-cifar10/vit_cifar10.pth \\
        --images ../shared/data/cifar10-test --num-images 64

The input transform comes from :data:`PRETRAINED_CFG` (timm's convention), which the factory
attaches to the model; ``--input-size 3,32,32 --mean ... --std ...`` give the same.
"""

from __future__ import annotations

import torch
from torch import nn

#: CIFAR-10 classes in the standard label order.
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

#: timm-style data config: 32x32 input (no resize or crop of CIFAR images), CIFAR-10 mean/std.
PRETRAINED_CFG = {
    "input_size": (3, 32, 32),
    "mean": (0.4914, 0.4822, 0.4465),
    "std": (0.2023, 0.1994, 0.2010),
    "interpolation": "bilinear",
    "crop_pct": 1.0,
    "num_classes": 10,
}


class PatchEmbed(nn.Module):
    """Conv patch embedding: ``(B, 3, 32, 32) -> (B, 64, dim)``."""

    def __init__(self, patch: int = 4, in_chans: int = 3, dim: int = 128):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class CifarViT(nn.Module):
    """ViT for 32x32 CIFAR-10 images; returns class logits ``(B, 10)``."""

    def __init__(self, img_size: int = 32, patch: int = 4, dim: int = 128, depth: int = 6,
                 heads: int = 8, mlp_dim: int = 256, num_classes: int = 10):
        super().__init__()
        n = (img_size // patch) ** 2
        self.patch_embed = PatchEmbed(patch, 3, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, mlp_dim, dropout=0.1, activation="relu",
                                           batch_first=True, norm_first=False)
        self.transformer = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.mlp_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.pretrained_cfg = dict(PRETRAINED_CFG)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.transformer(x)
        return self.mlp_head(x[:, 0])


def build() -> CifarViT:
    """The factory for ``--model examples.cifar_vit:build`` (untrained; pass ``--weights``)."""
    return CifarViT()
