"""Token geometry: how the tokens of a vision transformer map onto the image.

A ViT's sequence is ``num_prefix_tokens`` prefix tokens (class, distillation, register tokens)
followed by ``rows * cols`` patch tokens in row-major order over the patch grid. Each patch token
covers ``pixels_per_token = (px_rows, px_cols)`` pixels of the model's input image.

Analyses see only this object and attention tensors; they know nothing of the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from .errors import ProbeError


@dataclass(frozen=True)
class TokenGeometry:
    """Layout of the token sequence on the image.

    Attributes:
        num_prefix_tokens: tokens before the patch tokens (class, distillation, registers).
        grid: patch grid ``(rows, cols)``; patch token ``i`` sits at row ``i // cols``,
            column ``i % cols``.
        pixels_per_token: input-image pixels covered by one patch token along
            ``(rows, cols)``; 16.0 for a ViT-*/16, the CNN stem's total stride for a hybrid.

    Raises:
        ProbeError: on a non-positive grid or pixel size, or a negative prefix count.
    """

    num_prefix_tokens: int
    grid: tuple[int, int]
    pixels_per_token: tuple[float, float] = (1.0, 1.0)

    def __post_init__(self) -> None:
        rows, cols = self.grid
        if self.num_prefix_tokens < 0:
            raise ProbeError(f"num_prefix_tokens must be >= 0, got {self.num_prefix_tokens}")
        if rows < 1 or cols < 1:
            raise ProbeError(f"patch grid must be at least 1x1, got {rows}x{cols}")
        if min(self.pixels_per_token) <= 0:
            raise ProbeError(f"pixels_per_token must be > 0, got {self.pixels_per_token}")
        object.__setattr__(self, "grid", (int(rows), int(cols)))
        object.__setattr__(
            self, "pixels_per_token", tuple(float(p) for p in self.pixels_per_token)
        )

    @property
    def num_patches(self) -> int:
        """Number of patch tokens, ``rows * cols``."""
        return self.grid[0] * self.grid[1]

    @property
    def num_tokens(self) -> int:
        """Sequence length, ``num_prefix_tokens + num_patches``."""
        return self.num_prefix_tokens + self.num_patches

    @property
    def center_patch(self) -> int:
        """Index (among patch tokens) of the central patch, ``(rows // 2, cols // 2)``."""
        return (self.grid[0] // 2) * self.grid[1] + self.grid[1] // 2

    def patch_positions(self) -> torch.Tensor:
        """Positions of the patch tokens on the grid.

        Returns:
            float64 tensor of shape ``(num_patches, 2)``: ``(row, col)`` in patches.
        """
        rows, cols = self.grid
        r, c = torch.meshgrid(
            torch.arange(rows, dtype=torch.float64),
            torch.arange(cols, dtype=torch.float64),
            indexing="ij",
        )
        return torch.stack([r.reshape(-1), c.reshape(-1)], dim=1)

    def offsets(self) -> torch.Tensor:
        """Relative offsets ``delta = p_key - p_query`` between all pairs of patch tokens.

        Returns:
            float64 tensor of shape ``(num_patches, num_patches, 2)`` in patches; entry
            ``[q, k]`` is ``(row_k - row_q, col_k - col_q)`` (Cordonnier et al. 2020, Sec. 3).
        """
        p = self.patch_positions()
        return p[None, :, :] - p[:, None, :]

    def distances_patches(self) -> torch.Tensor:
        """Euclidean distance ``||p_q - p_k||`` in patches, shape ``(num_patches, num_patches)``."""
        return self.offsets().pow(2).sum(-1).sqrt()

    def distances_pixels(self) -> torch.Tensor:
        """Euclidean distance between patch centres in input pixels.

        Returns:
            float64 tensor ``(num_patches, num_patches)``;
            ``sqrt((d_row * px_rows)^2 + (d_col * px_cols)^2)``.
        """
        scale = torch.tensor(self.pixels_per_token, dtype=torch.float64)
        return (self.offsets() * scale).pow(2).sum(-1).sqrt()

    @cached_property
    def uniform_mean_distance_patches(self) -> float:
        """Mean attention distance of uniform attention over patch keys, in patches.

        The reference line of ViT Fig. 7: the mean over query and key patches of
        ``||p_q - p_k||`` (7.2808 patches on a 14x14 grid).
        """
        return float(self.distances_patches().mean())

    @cached_property
    def uniform_mean_distance_pixels(self) -> float:
        """Mean attention distance of uniform attention over patch keys, in pixels."""
        return float(self.distances_pixels().mean())

    def check_tokens(self, num_tokens: int, where: str = "attention") -> None:
        """Check that an attention tensor with ``num_tokens`` keys fits this geometry.

        Raises:
            ProbeError: naming both counts and the options that set the geometry.
        """
        if num_tokens != self.num_tokens:
            rows, cols = self.grid
            raise ProbeError(
                f"{where} has {num_tokens} tokens but the geometry expects "
                f"{self.num_prefix_tokens} prefix + {rows}x{cols} patches = {self.num_tokens}; "
                "set --prefix-tokens / --grid RxC to match the model"
            )
