"""Shared fixtures: paths to ../shared data (skipped when absent) and tiny models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
DEIT_WEIGHTS = SHARED / "weights" / "deit_tiny_patch16_224.safetensors"
IMAGENET = SHARED / "imagenet-sample"
CIFAR = SHARED / "cifar10-test"
CIFAR_VIT = SHARED / "custom-vit-cifar10" / "vit_cifar10.pth"


def need(path: Path) -> Path:
    """Skip the test with a reason when a ../shared file is absent."""
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared data is only beside the project in CI and dev checkouts)")
    return path


@pytest.fixture
def deit_weights() -> Path:
    return need(DEIT_WEIGHTS)


@pytest.fixture
def imagenet_dir() -> Path:
    return need(IMAGENET)


@pytest.fixture
def imagenet_photos(imagenet_dir) -> list[Path]:
    return sorted(imagenet_dir.glob("*.JPEG"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_vit(**kw):
    """A small random timm ViT (fast on a CPU): 32x32 input, 8x8 patches -> 4x4 grid."""
    import timm

    args = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=5)
    args.update(kw)
    return timm.models.vision_transformer.VisionTransformer(**args).eval()
