"""Swin-style window attention mapped back to image positions, shared by the timm
(:mod:`.timm_extra`, rule ``timm-swin-windows``) and Hugging Face (:mod:`.hf_swin`, rule
``hf-swin-windows``) Swin capture rules.

Swin (Liu et al. 2021, arXiv 2103.14030, Sec. 3.2) attends inside non-overlapping ``M x M``
windows of a stage's ``H x W`` token grid; every other block first rolls the grid cyclically by
``-M/2`` (``torch.roll``) so the windows straddle the previous ones. Both timm and ``transformers``
cut the (rolled) grid into windows in row-major window order with row-major tokens inside a window
(their ``window_partition``), and stack the windows of one image consecutively (image-major). The
functions here scatter each window's ``(M^2, M^2)`` probabilities into the stage's full
``(H W, H W)`` matrix at the image positions of its tokens, zero between tokens that share no
window.

No rule registers here; this module imports nothing from :mod:`probe.capture`.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import CaptureError

#: Emit the dense Swin attention in pieces of at most this many bytes.
DENSE_CHUNK_BYTES = 1 << 27


def window_positions(
    grid: tuple[int, int], window: tuple[int, int], shift: tuple[int, int], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Image position of every token of every Swin window.

    Swin rolls the ``(H, W)`` token grid by ``-shift`` and cuts it into ``window``-sized windows
    in row-major order (timm and ``transformers`` ``window_partition``); token ``i`` of a window is
    its row-major position inside the window.

    Args:
        grid: ``(H, W)`` tokens of the stage, multiples of ``window``.
        window: ``(Mh, Mw)`` window size in tokens.
        shift: ``(Sh, Sw)`` cyclic shift in tokens (0 for regular windows).

    Returns:
        long tensor ``(num_windows, Mh * Mw)`` of row-major positions ``row * W + col`` in the
        unshifted grid.
    """
    (h, w), (mh, mw), (sh, sw) = grid, window, shift
    rows = (torch.arange(h, device=device) + sh) % h  # original row of shifted row
    cols = (torch.arange(w, device=device) + sw) % w
    pos = rows[:, None] * w + cols[None, :]  # (H, W) in shifted coordinates
    pos = pos.reshape(h // mh, mh, w // mw, mw).permute(0, 2, 1, 3)
    return pos.reshape(-1, mh * mw)


def windows_to_dense(attn: torch.Tensor, positions: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Scatter per-window attention into the full attention matrix of the stage.

    Args:
        attn: ``(batch * num_windows, heads, N, N)`` window attention (image-major).
        positions: ``(num_windows, N)`` from :func:`window_positions`.
        num_tokens: ``H * W``.

    Returns:
        ``(batch, heads, H W, H W)``; zero where query and key share no window.
    """
    nw, n = positions.shape
    b = attn.shape[0] // nw
    heads = attn.shape[1]
    flat = (positions[:, :, None] * num_tokens + positions[:, None, :]).reshape(-1)
    win = attn.reshape(b, nw, heads, n, n).permute(0, 2, 1, 3, 4).reshape(b, heads, nw * n * n)
    dense = attn.new_zeros(b, heads, num_tokens * num_tokens)
    dense[:, :, flat] = win
    return dense.view(b, heads, num_tokens, num_tokens)


def check_windows_tile(grid: tuple[int, int], window: tuple[int, int], where: str = "Swin block") -> None:
    """Refuse a stage grid that is not a multiple of the window (the model pads its windows).

    Raises:
        CaptureError: naming the grid, the window and ``--input-size``: padded tokens take
            attention mass that belongs to no image position.
    """
    (h, w), (mh, mw) = grid, window
    if h % mh or w % mw:
        raise CaptureError(
            f"{where} with a {h}x{w} token grid and {mh}x{mw} windows pads its windows, and padded "
            "tokens take attention that belongs to no image position; set --input-size so that every "
            "stage's grid is a multiple of the window size"
        )


def emit_windows(
    attn: torch.Tensor,
    grid: tuple[int, int],
    window: tuple[int, int],
    shift: tuple[int, int],
    emit: Callable[[torch.Tensor], None],
    cache: dict | None = None,
    where: str = "Swin block",
) -> None:
    """Map one forward call's window attention to the stage grid and ``emit`` it, a few images at
    a time (at most :data:`DENSE_CHUNK_BYTES` per piece).

    Args:
        attn: ``(batch * num_windows, heads, Mh Mw, Mh Mw)`` window probabilities, image-major.
        grid: ``(H, W)`` stage grid in tokens; window: ``(Mh, Mw)``; shift: ``(Sh, Sw)`` in tokens.
        emit: receives ``(images, heads, H W, H W)`` pieces, in image order.
        cache: optional dict reused across calls for the :func:`window_positions` tables.
        where: the layer, for error messages.

    Raises:
        CaptureError: a grid that is not a multiple of the window (:func:`check_windows_tile`), or
            window attention whose shape does not fit ``grid`` and ``window``.
    """
    check_windows_tile(grid, window, where)
    (h, w), (mh, mw) = grid, window
    nw = (h // mh) * (w // mw)
    if attn.dim() != 4 or attn.shape[-1] != mh * mw or attn.shape[-2] != mh * mw or attn.shape[0] % nw:
        raise CaptureError(
            f"{where} gave window attention of shape {tuple(attn.shape)}, which does not fit {nw} windows "
            f"of {mh}x{mw} tokens on its {h}x{w} grid; choose other --layers"
        )
    key = (h, w, tuple(window), tuple(shift), attn.device)
    cache = {} if cache is None else cache
    if key not in cache:
        cache[key] = window_positions((h, w), window, shift, attn.device)
    pos = cache[key]
    tokens = h * w
    per_image = attn.shape[1] * tokens * tokens * attn.element_size()
    step = max(1, DENSE_CHUNK_BYTES // max(per_image, 1)) * nw
    for s in range(0, attn.shape[0], step):
        emit(windows_to_dense(attn[s: s + step], pos, tokens))
