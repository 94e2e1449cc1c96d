"""Capture rules for timm's convolution-attention hybrids: MaxViT / MaxxViT, CoAtNet, BoTNet,
HaloNet, and a named refusal for Lambda networks.

Every layer here attends over the positions of a CNN feature map: no prefix tokens, the stage's
``H x W`` grid (``input / grid`` pixels per token), probabilities ``(batch, heads, HW, HW)``.

* **MaxViT** (Tu et al. 2022, arXiv 2204.01697, Sec. 3.2; timm ``maxxvit``: ``maxvit_*``,
  ``maxxvit_*``, ``maxxvitv2_*``): each block runs *block* attention inside non-overlapping
  ``P x P`` windows and then *grid* attention inside ``G x G`` windows of tokens spaced ``H/G``
  apart across the whole grid (timm ``window_partition`` / ``grid_partition``), each with a
  relative position bias (``RelPosBias``, ``RelPosBiasTf``, ``RelPosMlp``) added before the
  softmax. A layer is one ``PartitionAttentionCl`` / ``PartitionAttention2d`` module (block or
  grid); fused attention is switched off while installed and the window probabilities read at
  ``attn.attn_drop`` are scattered to the stage grid (:func:`probe.families.windows.emit_windows`,
  ``partition="window"`` or ``"grid"``), zero between tokens that share no window. The parallel
  variant (``ParallelPartitionAttention``, ``maxvit_tiny_pm_256``: block and grid attention on
  the same input, outputs concatenated) is one layer whose heads are the block heads followed by
  the grid heads.
* **CoAtNet** (Dai et al. 2021, arXiv 2106.04803; timm ``coatnet_*``): ``TransformerBlock2d``'s
  ``Attention2d`` attends over the whole (downsampled) feature map with a relative position bias;
  read at ``attn_drop`` as timm's generic attention (rule ``timm-coatnet-attention``, which also
  states 0 prefix tokens and gates the 1x1-convolution output projection).
* **BoTNet** (Srinivas et al. 2021, arXiv 2101.11605; timm ``BottleneckAttn``: ``botnet26t_256``,
  ``sebotnet33ts_256``, ``eca_botnext26ts_256``, ``halo2botnet50ts_256``): global attention over the
  feature map with 2-D relative logits (``q · r_h + q · r_w``); its one ``softmax`` over
  ``(batch·heads, HW, HW)`` (batch-major) is read while the module runs
  (:mod:`probe.families.taps`), output bit-identical.
* **HaloNet** (Vaswani et al. 2021, arXiv 2103.12731, Sec. 2.2; timm ``HaloAttn``: ``halonet*``,
  ``sehalonet33ts``, ``eca_halonext26ts``, ``haloregnetz_b``, ``lamhalobotnet50ts_256``): the grid
  is cut into ``b x b`` query blocks; each block attends to the ``(b + 2h)^2`` keys of the block
  plus a halo of ``h`` tokens, with 2-D relative logits. timm pads the key map with zeros and does
  **not** mask the padded keys: at the border they get logit ``q · r`` (zero key, zero value), so
  part of each border row's probability lies on positions outside the image, which only scales the
  head's output. The rule reads the softmax ``(batch·heads, blocks, b^2, (b+2h)^2)`` while the
  module runs, drops the padded keys, **renormalises** each row over the keys inside the image,
  and scatters block and halo to the stage grid: the captured map is the distribution over image
  positions that the head's output averages. Stride-2 halo layers whose queries are a strided
  subgrid of the keys (the first block of a stage, ``block_stride = 2``) are refused, naming
  ``--layers``; with ``avg_down`` (``haloregnetz_b``) the attention is full resolution and pooled
  afterwards, and is captured.
* **Lambda networks** (Bello 2021, arXiv 2102.08602; timm ``LambdaLayer``: ``lambda_resnet*``,
  ``lamhalobotnet50ts_256``) are refused by name: a lambda layer has no attention map.

Head gates (:mod:`.gating`): MaxViT / CoAtNet on the input of ``proj`` (a linear layer, or a
1x1 convolution with channels first), each image's gate repeated over its windows; BoTNet and
HaloNet scale the probabilities of head ``h`` inside the tapped softmax, before they meet the
values (equivalent by linearity, see :mod:`.gating`); at gate 1 the output is bit-identical.
"""

from __future__ import annotations

import torch
from torch import nn

from ..capture import CaptureRule, Emit, Restore, TimmAttentionRule, override_attribute, register_rule, removing
from ..errors import CaptureError
from .taps import tapped
from .timm_zoo import TimmRefusalRule
from .windows import emit_partitions, images_per_piece, windows_to_dense

_MAXXVIT = "timm.models.maxxvit"


def _pair(v) -> tuple[int, int]:
    v = tuple(int(x) for x in (v if isinstance(v, (tuple, list)) else (v, v)))
    return v[0], v[1]


def _partitions(module: nn.Module) -> list[tuple[nn.Module, str]]:
    """``[(attention module, "window" | "grid")]`` of a MaxViT partition layer, in call order."""
    if type(module).__name__ == "ParallelPartitionAttention":
        return [(module.attn_block, "window"), (module.attn_grid, "grid")]
    return [(module.attn, "window" if module.partition_block else "grid")]


def _fused_off(attn: nn.Module) -> Restore:
    if getattr(attn, "fused_attn", None) is None:
        return lambda: None
    return override_attribute(attn, "fused_attn", False)


class MaxVitPartitionRule(CaptureRule):
    """timm MaxViT block or grid attention (``PartitionAttentionCl``, ``PartitionAttention2d``,
    ``ParallelPartitionAttention``): window probabilities mapped to the stage grid (module
    docstring)."""

    name = "timm-maxvit-partition"
    classes = ("PartitionAttentionCl", "PartitionAttention2d", "ParallelPartitionAttention")

    def matches(self, module: nn.Module) -> bool:
        if type(module).__module__ != _MAXXVIT or type(module).__name__ not in self.classes:
            return False
        if not hasattr(module, "partition_size"):
            return False
        try:
            parts = _partitions(module)
        except AttributeError:
            return False
        return all(isinstance(getattr(a, "attn_drop", None), nn.Module) and hasattr(a, "num_heads") for a, _ in parts)

    def num_prefix_tokens(self, module: nn.Module) -> int | None:
        return 0

    def num_heads(self, module: nn.Module) -> int | None:
        return sum(int(a.num_heads) for a, _ in _partitions(module))

    def install(self, module: nn.Module, emit: Emit) -> Restore:
        """Pre-hook on the partition module (its input ``(B, H, W, C)``, or ``(B, C, H, W)`` for
        ``PartitionAttention2d``, gives the grid) and forward hooks on each attention's
        ``attn_drop``, which receives ``(B·windows, heads, N, N)`` (fused attention off while
        installed); the layer's map is emitted once every partition of the call has run."""
        parts = _partitions(module)
        channels_first = type(module).__name__ == "PartitionAttention2d"
        where = f"MaxViT {type(module).__name__}"
        state: dict = {}
        cache: dict = {}

        def pre_hook(mod: nn.Module, args: tuple) -> None:
            x = args[0]
            if not isinstance(x, torch.Tensor) or x.dim() != 4:
                raise CaptureError(f"{where} received input of shape {tuple(getattr(x, 'shape', ()))}, not a 4-D "
                                   "feature map; this timm MaxViT version is not supported, choose other --layers")
            state["grid"] = (int(x.shape[2]), int(x.shape[3])) if channels_first else (int(x.shape[1]), int(x.shape[2]))
            state["seen"] = []

        def on_attn(kind: str):
            def hook(mod: nn.Module, inp: tuple, out: torch.Tensor) -> None:
                size = _pair(module.partition_size)
                state["seen"].append((out, size, (0, 0), kind))
                if len(state["seen"]) == len(parts):
                    seen, state["seen"] = state["seen"], []
                    emit_partitions(seen, state["grid"], emit, cache, where)
            return hook

        handles = [module.register_forward_pre_hook(pre_hook)]
        handles += [attn.attn_drop.register_forward_hook(on_attn(kind)) for attn, kind in parts]
        return removing(handles, *[_fused_off(attn) for attn, _ in parts])

    def can_gate(self, module: nn.Module) -> bool:
        return all(isinstance(getattr(a, "proj", None), (nn.Linear, nn.Conv2d)) for a, _ in _partitions(module))

    def install_gate(self, module: nn.Module, num_heads: int, get_gate) -> Restore:
        """Pre-hook on each attention's ``proj`` (input ``(B·windows, N, H·D)``, or ``(B·windows,
        H·D, h, w)`` for the 1x1 convolution of ``Attention2d``), head-major; each image's gate row
        repeated over its windows. A parallel layer's gate columns are the block heads, then the
        grid heads."""
        from .gating import gate_linear_input

        restores, first = [], 0
        for attn, kind in _partitions(module):
            heads = int(attn.num_heads)

            def part_gate(lo=first, hi=first + heads):
                gate = get_gate()
                return None if gate is None else gate[:, lo:hi]

            restores.append(gate_linear_input(attn.proj, heads, part_gate, f"MaxViT {kind} attention gate",
                                              windows=True, channels_first=isinstance(attn.proj, nn.Conv2d)))
            first += heads
        return removing([], *restores)


class CoAtNetAttentionRule(TimmAttentionRule):
    """timm CoAtNet's ``Attention2d`` (``TransformerBlock2d``): image-wide attention with a relative
    position bias over a feature map ``(B, C, H, W)``, read at ``attn_drop`` as
    :class:`~probe.capture.TimmAttentionRule`; 0 prefix tokens; gate on the 1x1 ``proj``."""

    name = "timm-coatnet-attention"

    def matches(self, module: nn.Module) -> bool:
        return (type(module).__module__ == _MAXXVIT and type(module).__name__ == "Attention2d"
                and isinstance(getattr(module, "attn_drop", None), nn.Module) and hasattr(module, "num_heads"))

    def num_prefix_tokens(self, module: nn.Module) -> int | None:
        return 0

    def can_gate(self, module: nn.Module) -> bool:
        return isinstance(getattr(module, "proj", None), (nn.Linear, nn.Conv2d))

    def install_gate(self, module: nn.Module, num_heads: int, get_gate) -> Restore:
        """Pre-hook on ``proj``, a 1x1 convolution whose input ``(B, H·D, h, w)`` is head-major."""
        from .gating import gate_linear_input

        return gate_linear_input(module.proj, num_heads, get_gate, "CoAtNet attention gate",
                                 channels_first=isinstance(module.proj, nn.Conv2d))


def _gate_heads_first(get_gate, heads: int, where: str):
    """A tap gate for probabilities ``(B·heads, ...)`` (batch-major): head ``h`` scaled by its gate."""
    from .gating import scale_heads

    def gate(probs: torch.Tensor) -> torch.Tensor:
        g = get_gate()
        if g is None:
            return probs
        view = probs.view(probs.shape[0] // heads, heads, *probs.shape[1:])
        return scale_heads(view, g, heads, where).view(probs.shape)

    return gate


class _TappedSoftmaxRule(CaptureRule):
    """Base of the BoTNet and HaloNet rules: the module's one softmax, read through a
    :mod:`probe.families.taps` wrapper; gates scale its heads."""

    module_name = ""
    class_name = ""

    def matches(self, module: nn.Module) -> bool:
        return (type(module).__module__ == self.module_name and type(module).__name__ == self.class_name
                and isinstance(getattr(module, "num_heads", None), int))

    def num_prefix_tokens(self, module: nn.Module) -> int | None:
        return 0

    def accepts(self, module: nn.Module, out: torch.Tensor) -> bool:
        raise NotImplementedError

    def can_gate(self, module: nn.Module) -> bool:
        return True

    def install_gate(self, module: nn.Module, num_heads: int, get_gate) -> Restore:
        """Scale head ``h`` of the softmax output ``(B·heads, ...)`` by ``gate[:, h]`` before it
        meets the values (:func:`~.gating.scale_heads`)."""
        return tapped(module, self.accepts).add("gate", _gate_heads_first(get_gate, num_heads,
                                                                           f"{self.class_name} gate"))


class BotNetAttentionRule(_TappedSoftmaxRule):
    """timm ``BottleneckAttn`` (BoTNet): global attention with 2-D relative logits; the softmax
    ``(B·heads, HW, HW)`` is emitted as ``(B, heads, HW, HW)``."""

    name = "timm-botnet-attention"
    module_name = "timm.layers.bottleneck_attn"
    class_name = "BottleneckAttn"

    def accepts(self, module: nn.Module, out: torch.Tensor) -> bool:
        return out.dim() == 3 and out.shape[-1] == out.shape[-2] and out.shape[0] % int(module.num_heads) == 0

    def install(self, module: nn.Module, emit: Emit) -> Restore:
        heads = int(module.num_heads)

        def seen(probs: torch.Tensor, x: torch.Tensor) -> None:
            emit(probs.view(probs.shape[0] // heads, heads, *probs.shape[1:]))

        return tapped(module, self.accepts).add("capture", (lambda x: None, seen))


def halo_positions(grid: tuple[int, int], block: int, halo: int,
                   device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Image positions of HaloNet's query blocks and their keys (timm ``HaloAttn``).

    The ``(H, W)`` grid is cut into ``b x b`` blocks, row-major, queries row-major inside a block;
    block ``(bi, bj)``'s keys are the ``(b + 2h)^2`` positions ``(bi·b - h + u, bj·b - h + v)``,
    ``u, v`` row-major (timm pads the key map by ``h`` and unfolds it with stride ``b``).

    Args:
        grid: ``(H, W)`` tokens, multiples of ``block``; block: ``b``; halo: ``h`` (tokens).

    Returns:
        ``(queries (blocks, b^2), keys (blocks, (b + 2h)^2))`` long tensors of row-major positions
        ``row * W + col``; keys outside the grid (padding) are ``-1``.
    """
    (h, w), win = grid, block + 2 * halo
    nh, nw = h // block, w // block
    qi = torch.arange(block, device=device)
    q_rows = (torch.arange(nh, device=device)[:, None] * block + qi[None, :])  # (nh, b)
    q_cols = (torch.arange(nw, device=device)[:, None] * block + qi[None, :])  # (nw, b)
    queries = (q_rows[:, None, :, None] * w + q_cols[None, :, None, :]).reshape(nh * nw, block * block)
    ku = torch.arange(win, device=device) - halo
    k_rows = torch.arange(nh, device=device)[:, None] * block + ku[None, :]  # (nh, win)
    k_cols = torch.arange(nw, device=device)[:, None] * block + ku[None, :]
    inside = ((k_rows >= 0) & (k_rows < h))[:, None, :, None] & ((k_cols >= 0) & (k_cols < w))[None, :, None, :]
    keys = (k_rows[:, None, :, None] * w + k_cols[None, :, None, :]).masked_fill(~inside, -1)
    return queries, keys.reshape(nh * nw, win * win)


class HaloNetAttentionRule(_TappedSoftmaxRule):
    """timm ``HaloAttn`` (HaloNet): blocked local attention with a halo; each query block's keys
    mapped to the stage grid, padded keys dropped and rows renormalised (module docstring)."""

    name = "timm-halonet-attention"
    module_name = "timm.layers.halo_attn"
    class_name = "HaloAttn"

    def accepts(self, module: nn.Module, out: torch.Tensor) -> bool:
        n_q, n_k = int(module.block_size_ds) ** 2, int(module.win_size) ** 2
        return out.dim() == 4 and out.shape[-2] == n_q and out.shape[-1] == n_k

    def install(self, module: nn.Module, emit: Emit) -> Restore:
        if int(getattr(module, "block_stride", 1)) != 1:
            raise CaptureError(
                f"HaloAttn with block stride {module.block_stride} (the first, downsampling block of a HaloNet "
                "stage) computes its queries on a strided subgrid of its keys' grid, so queries and keys are not "
                "the same image positions; choose the stride-1 halo layers with --layers")
        heads, block, halo = int(module.num_heads), int(module.block_size), int(module.halo_size)
        where = "HaloAttn"
        state: dict = {}
        cache: dict = {}

        def before(x: torch.Tensor) -> None:
            if not isinstance(x, torch.Tensor) or x.dim() != 4:
                raise CaptureError(f"{where} received input of shape {tuple(getattr(x, 'shape', ()))}, not (batch, "
                                   "channels, H, W); this timm HaloNet version is not supported, choose other --layers")
            state["grid"] = (int(x.shape[-2]), int(x.shape[-1]))

        def seen(probs: torch.Tensor, x: torch.Tensor) -> None:
            grid = state["grid"]
            key = (grid, probs.device)
            if key not in cache:
                cache[key] = halo_positions(grid, block, halo, probs.device)
            queries, keys = cache[key]
            blocks = queries.shape[0]
            if probs.shape[0] % heads or probs.shape[1] != blocks:
                raise CaptureError(f"{where} gave attention of shape {tuple(probs.shape)}, which does not fit "
                                   f"{blocks} blocks of {block}x{block} on its {grid[0]}x{grid[1]} grid; choose other "
                                   "--layers")
            images = probs.shape[0] // heads
            real = (keys >= 0).to(probs.dtype)  # (blocks, keys)
            tokens = grid[0] * grid[1]
            step = images_per_piece(heads, tokens, probs.element_size())
            for s in range(0, images, step):
                p = probs[s * heads: (s + step) * heads]
                p = p.view(-1, heads, *p.shape[1:]) * real[:, None, :]  # (b, heads, blocks, n_q, n_k)
                p = p / p.sum(-1, keepdim=True)
                p = p.transpose(1, 2).reshape(-1, heads, *p.shape[-2:])  # (b·blocks, heads, n_q, n_k)
                emit(windows_to_dense(p, queries, tokens, key_positions=keys))

        return tapped(module, self.accepts).add("capture", (before, seen))


REFUSALS = [
    TimmRefusalRule(
        "timm-lambda", "timm.layers.lambda_layer", ("LambdaLayer",),
        "lambda layers have no attention map: LambdaLayer (LambdaNetworks, Bello 2021) normalises the keys "
        "with a softmax over positions, multiplies them with the values first (a content lambda k^T v, "
        "plus position lambdas from a relative-position convolution or embedding) and applies the lambdas "
        "to each query, so no query ever weights the other positions; choose a model with token "
        "self-attention (or this model's halo / bottleneck attention layers with --layers)"),
]

for _rule in REFUSALS:
    register_rule(_rule)
register_rule(MaxVitPartitionRule())
register_rule(CoAtNetAttentionRule())
register_rule(BotNetAttentionRule())
register_rule(HaloNetAttentionRule())
