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

The same scatter serves MaxViT's block windows (Swin's layout without shift) and its dilated grid
windows (:func:`grid_positions`), several window kinds of one layer at once
(:func:`emit_partitions`), and HaloNet's query blocks whose keys are the block plus a halo
(``windows_to_dense(..., key_positions=...)``, padding dropped), for :mod:`.timm_hybrids`.

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


def windows_to_dense(attn: torch.Tensor, positions: torch.Tensor, num_tokens: int,
                     key_positions: torch.Tensor | None = None) -> torch.Tensor:
    """Scatter per-window attention into the full attention matrix of the stage.

    Args:
        attn: ``(batch * num_windows, heads, N, K)`` window attention (image-major); ``K = N``
            unless ``key_positions`` is given.
        positions: ``(num_windows, N)`` image positions of each window's queries (and keys), from
            :func:`window_positions` or :func:`grid_positions`.
        num_tokens: ``H * W``.
        key_positions: ``(num_windows, K)`` image positions of each window's keys when they differ
            from the queries' (HaloNet's block + halo); entries ``< 0`` are padding and dropped.

    Returns:
        ``(batch, heads, H W, H W)``; zero where query and key share no window.
    """
    nw, n = positions.shape
    keys = positions if key_positions is None else key_positions
    k = keys.shape[1]
    b = attn.shape[0] // nw
    heads = attn.shape[1]
    flat = (positions[:, :, None] * num_tokens + keys[:, None, :]).reshape(-1)
    win = attn.reshape(b, nw, heads, n, k).permute(0, 2, 1, 3, 4).reshape(b, heads, nw * n * k)
    if key_positions is not None:
        real = (keys[:, None, :] >= 0).expand(nw, n, k).reshape(-1)
        flat, win = flat[real], win[:, :, real]
    dense = attn.new_zeros(b, heads, num_tokens * num_tokens)
    dense[:, :, flat] = win
    return dense.view(b, heads, num_tokens, num_tokens)


def images_per_piece(heads: int, tokens: int, element_size: int) -> int:
    """How many images' dense ``(heads, tokens, tokens)`` maps fit in :data:`DENSE_CHUNK_BYTES`
    (at least 1)."""
    return max(1, DENSE_CHUNK_BYTES // max(heads * tokens * tokens * element_size, 1))


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


def grid_positions(grid: tuple[int, int], partition: tuple[int, int],
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Image position of every token of every MaxViT *grid* window (dilated, strided partition).

    MaxViT's grid attention (Tu et al. 2022, arXiv 2204.01697, Sec. 3.2; timm ``grid_partition``)
    views the ``(H, W)`` grid as ``(G, H/G, G, W/G)`` and forms one window per offset
    ``(a, b) in [0, H/G) x [0, W/G)`` (row-major) of the ``G x G`` tokens ``(i·H/G + a, j·W/G + b)``,
    ``i, j`` row-major: each window spans the whole grid with stride ``H/G``.

    Args:
        grid: ``(H, W)`` tokens of the stage, multiples of ``partition``.
        partition: ``(Gh, Gw)`` grid size (tokens per window along each axis).

    Returns:
        long tensor ``(num_windows, Gh * Gw)`` of row-major positions ``row * W + col``.
    """
    (h, w), (gh, gw) = grid, partition
    sh, sw = h // gh, w // gw  # stride between the tokens of one window
    rows = torch.arange(gh, device=device)[:, None] * sh + torch.arange(sh, device=device)[None, :]  # (i, a)
    cols = torch.arange(gw, device=device)[:, None] * sw + torch.arange(sw, device=device)[None, :]  # (j, b)
    pos = rows[:, :, None, None] * w + cols[None, None, :, :]  # (i, a, j, b)
    return pos.permute(1, 3, 0, 2).reshape(sh * sw, gh * gw)


#: One kind of window attention of a layer: ``(attn (B·windows, heads, N, N), window (Mh, Mw),
#: shift (Sh, Sw), partition)`` with ``partition`` ``"window"`` (Swin / MaxViT block windows,
#: :func:`window_positions`) or ``"grid"`` (MaxViT grid windows, :func:`grid_positions`, no shift).
Part = tuple[torch.Tensor, tuple[int, int], tuple[int, int], str]


def emit_partitions(
    parts: list[Part],
    grid: tuple[int, int],
    emit: Callable[[torch.Tensor], None],
    cache: dict | None = None,
    where: str = "Swin block",
) -> None:
    """Map one forward call's window attention of one or more kinds (their heads concatenated in
    ``parts`` order, e.g. MaxViT's parallel block + grid attention) to the stage grid and
    ``emit`` it, a few images at a time (at most :data:`DENSE_CHUNK_BYTES` per piece).

    Args:
        parts: the window attentions (:data:`Part`), image-major, of the same images.
        grid: ``(H, W)`` stage grid in tokens.
        emit: receives ``(images, heads, H W, H W)`` pieces, in image order; ``heads`` is the sum
            over ``parts``.
        cache: optional dict reused across calls for the position tables.
        where: the layer, for error messages.

    Raises:
        CaptureError: a grid that is not a multiple of a window (:func:`check_windows_tile`), or
            window attention whose shape does not fit ``grid`` and its window.
    """
    (h, w) = grid
    cache = {} if cache is None else cache
    tables, images = [], None
    for attn, window, shift, partition in parts:
        check_windows_tile(grid, window, where)
        (mh, mw) = window
        nw = (h // mh) * (w // mw)
        if attn.dim() != 4 or attn.shape[-1] != mh * mw or attn.shape[-2] != mh * mw or attn.shape[0] % nw \
                or (images is not None and attn.shape[0] // nw != images):
            raise CaptureError(
                f"{where} gave window attention of shape {tuple(attn.shape)}, which does not fit {nw} windows "
                f"of {mh}x{mw} tokens on its {h}x{w} grid; choose other --layers"
            )
        images = attn.shape[0] // nw
        key = (h, w, tuple(window), tuple(shift), partition, attn.device)
        if key not in cache:
            cache[key] = (grid_positions((h, w), window, attn.device) if partition == "grid"
                          else window_positions((h, w), window, shift, attn.device))
        tables.append((attn, cache[key], nw))
    tokens = h * w
    step = images_per_piece(sum(int(a.shape[1]) for a, _, _ in tables), tokens, parts[0][0].element_size())
    for s in range(0, images, step):
        dense = [windows_to_dense(a[s * nw: (s + step) * nw], pos, tokens) for a, pos, nw in tables]
        emit(dense[0] if len(dense) == 1 else torch.cat(dense, dim=1))


def emit_windows(
    attn: torch.Tensor,
    grid: tuple[int, int],
    window: tuple[int, int],
    shift: tuple[int, int],
    emit: Callable[[torch.Tensor], None],
    cache: dict | None = None,
    where: str = "Swin block",
    partition: str = "window",
) -> None:
    """Map one forward call's window attention to the stage grid and ``emit`` it, a few images at
    a time (at most :data:`DENSE_CHUNK_BYTES` per piece): :func:`emit_partitions` of one part.

    Args:
        attn: ``(batch * num_windows, heads, Mh Mw, Mh Mw)`` window probabilities, image-major.
        grid: ``(H, W)`` stage grid in tokens; window: ``(Mh, Mw)``; shift: ``(Sh, Sw)`` in tokens.
        emit: receives ``(images, heads, H W, H W)`` pieces, in image order.
        cache: optional dict reused across calls for the position tables.
        where: the layer, for error messages.
        partition: ``"window"`` (:func:`window_positions`) or ``"grid"`` (MaxViT's grid windows,
            :func:`grid_positions`; ``window`` is then the grid size and ``shift`` must be 0).

    Raises:
        CaptureError: a grid that is not a multiple of the window (:func:`check_windows_tile`), or
            window attention whose shape does not fit ``grid`` and ``window``.
    """
    emit_partitions([(attn, window, shift, partition)], grid, emit, cache, where)
