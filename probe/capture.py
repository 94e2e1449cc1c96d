"""Capture attention probabilities layer by layer.

Capture is the only part of ``probe`` that knows about model families. A :class:`CaptureRule`
recognises one kind of attention module and installs hooks that hand its attention probabilities,
shape ``(batch, heads, query, key)``, to a sink; uninstalling restores the module exactly (e.g.
timm's ``fused_attn`` flag). The *layers* of a model are its recognised attention modules in
module order (``model.named_modules()``), numbered from 0.

Extension point — a capture rule for a new attention module in a few lines::

    from probe.capture import CaptureRule, register_rule

    class MyAttentionRule(CaptureRule):
        name = "my-attention"
        def matches(self, module):
            return isinstance(module, MyAttention)
        def install(self, module, emit):
            # make the module compute explicit probabilities, and call emit(probs (B,H,T,T))
            handle = module.softmax.register_forward_hook(lambda m, i, out: emit(out))
            return handle.remove          # a callable that restores the module

    register_rule(MyAttentionRule())       # checked before the built-in rules
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from .errors import CaptureError, ProbeError

Emit = Callable[[torch.Tensor], None]
Restore = Callable[[], None]


class CaptureRule:
    """How to read attention probabilities out of one kind of attention module.

    Subclasses set :attr:`name` and implement :meth:`matches` and :meth:`install`.
    """

    #: Short label shown in reports and errors.
    name: str = "rule"

    def matches(self, module: nn.Module) -> bool:
        """True if this rule can capture from ``module``."""
        raise NotImplementedError

    def install(self, module: nn.Module, emit: Emit) -> Restore:
        """Hook ``module`` so each forward calls ``emit(attn)``.

        Args:
            module: a module for which :meth:`matches` is true.
            emit: callback taking attention probabilities ``(batch, heads, query, key)``.

        Returns:
            A callable that removes the hooks and restores the module's state.
        """
        raise NotImplementedError


class TimmAttentionRule(CaptureRule):
    """timm attention modules that apply ``attn_drop`` to the softmax output.

    Covers ``timm.models.vision_transformer.Attention`` (ViT, DeiT incl. distilled, register and
    hybrid ViTs) and other timm modules that follow the same convention. Fused attention
    (``fused_attn``) is switched off while installed, so the module materialises
    ``softmax(q k^T * scale)``, and restored afterwards; a forward hook on ``attn_drop``
    (identity in eval mode) receives the probabilities.
    """

    name = "timm-attention"

    def matches(self, module: nn.Module) -> bool:
        return (
            type(module).__module__.startswith("timm.")
            and isinstance(getattr(module, "attn_drop", None), nn.Module)
            and hasattr(module, "num_heads")
        )

    def install(self, module: nn.Module, emit: Emit) -> Restore:
        had_fused = "fused_attn" in vars(module)
        old_fused = getattr(module, "fused_attn", None)
        if old_fused is not None:
            module.fused_attn = False
        handle = module.attn_drop.register_forward_hook(lambda m, inp, out: emit(out))

        def restore() -> None:
            handle.remove()
            if old_fused is not None:
                if had_fused:
                    module.fused_attn = old_fused
                else:
                    del module.fused_attn

        return restore


_RULES: list[CaptureRule] = [TimmAttentionRule()]


def register_rule(rule: CaptureRule, first: bool = True) -> None:
    """Add a capture rule; by default it is tried before the existing ones."""
    if first:
        _RULES.insert(0, rule)
    else:
        _RULES.append(rule)


def rules() -> list[CaptureRule]:
    """The registered capture rules, in the order they are tried."""
    return list(_RULES)


@dataclass(frozen=True)
class AttentionLayer:
    """One capturable attention module.

    Attributes:
        index: layer number (0 = first attention module in module order).
        name: qualified module name in the model (``blocks.3.attn``).
        module: the attention module.
        rule: the rule that captures it.
    """

    index: int
    name: str
    module: nn.Module
    rule: CaptureRule


def find_attention_layers(model: nn.Module) -> list[AttentionLayer]:
    """Recognised attention modules of ``model`` in module order.

    A module nested inside an already recognised one is not counted again.

    Returns:
        The layers, numbered from 0.
    """
    found: list[AttentionLayer] = []
    taken: list[str] = []
    for qname, mod in model.named_modules():
        if any(qname.startswith(t + ".") for t in taken):
            continue
        for rule in _RULES:
            if rule.matches(mod):
                found.append(AttentionLayer(len(found), qname, mod, rule))
                taken.append(qname)
                break
    return found


def parse_layers(spec: str | int | list[int] | tuple[int, ...] | range | None, num_layers: int) -> list[int]:
    """Parse a layer selection against a model with ``num_layers`` attention layers.

    Accepts ``"all"`` / ``None``, ``"0-4"`` (inclusive), ``"0,2,5"``, mixes such as ``"0-2,7"``,
    negative indices counted from the end (``"-1"``), or a list of ints.

    Returns:
        Sorted unique layer indices.

    Raises:
        ProbeError: for a malformed spec or an index outside ``0 .. num_layers-1``.
    """
    if num_layers < 1:
        raise ProbeError("the model has no attention layers to select")
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "all"):
        return list(range(num_layers))
    if isinstance(spec, int):
        items: list[int] = [spec]
    elif isinstance(spec, (list, tuple, range)):
        items = [int(x) for x in spec]
    else:
        items = []
        for part in str(spec).split(","):
            part = part.strip()
            try:
                if "-" in part[1:]:
                    cut = part.index("-", 1)
                    lo, hi = int(part[:cut]), int(part[cut + 1:])
                    if hi < lo:
                        raise ValueError
                    items.extend(range(lo, hi + 1))
                else:
                    items.append(int(part))
            except ValueError:
                raise ProbeError(
                    f"malformed layer spec {spec!r}: use 'all', a range '0-4', or a list '0,2,5'"
                ) from None
    out = []
    for i in items:
        j = i + num_layers if i < 0 else i
        if not 0 <= j < num_layers:
            raise ProbeError(
                f"layer {i} is out of range: the model has {num_layers} attention layers "
                f"(0-{num_layers - 1}); fix --layers"
            )
        out.append(j)
    if not out:
        raise ProbeError(f"layer spec {spec!r} selects no layer")
    return sorted(set(out))


class AttentionCapture:
    """Context manager that streams attention probabilities of selected layers to a sink.

    Args:
        layers: the layers to hook (from :func:`find_attention_layers`).
        sink: ``sink(layer_index, attn)`` with ``attn`` of shape ``(batch, heads, query, key)``;
            called during each forward pass; the tensor must not be kept.

    On exit every hook is removed and every module restored, also after an exception.
    :attr:`counts` records how many tensors each layer delivered.
    """

    def __init__(self, layers: list[AttentionLayer], sink: Callable[[int, torch.Tensor], None]):
        self.layers = layers
        self.sink = sink
        self.counts = {layer.index: 0 for layer in layers}
        self._restores: list[Restore] = []

    def _emitter(self, index: int) -> Emit:
        def emit(attn: torch.Tensor) -> None:
            self.counts[index] += 1
            self.sink(index, attn.detach())

        return emit

    def __enter__(self) -> "AttentionCapture":
        try:
            for layer in self.layers:
                self._restores.append(layer.rule.install(layer.module, self._emitter(layer.index)))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        while self._restores:
            self._restores.pop()()

    def check_all_captured(self, model_name: str) -> None:
        """Raise :class:`CaptureError` if a layer delivered no attention.

        Raises:
            CaptureError: naming the silent layers and the rule that was tried.
        """
        silent = [layer for layer in self.layers if self.counts[layer.index] == 0]
        if silent:
            desc = ", ".join(f"{l.index} ({l.name}, rule {l.rule.name})" for l in silent[:4])
            raise CaptureError(
                f"{model_name}: selected layer(s) {desc} yielded no attention probabilities during "
                "the forward pass; choose other --layers or register a capture rule "
                "(see probe.capture)"
            )


def iter_modules_of(model: nn.Module, cls: type) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` pairs of ``model`` that are instances of ``cls``."""
    for name, mod in model.named_modules():
        if isinstance(mod, cls):
            yield name, mod


def _grid_from_tokens(num_patches: int, height: int, width: int) -> tuple[int, int] | None:
    """The grid ``(rows, cols)`` with ``rows * cols == num_patches`` whose cells tile an
    ``height x width`` image with a common integer stride, if any."""
    if num_patches < 1:
        return None
    best = None
    for rows in range(1, num_patches + 1):
        if num_patches % rows:
            continue
        cols = num_patches // rows
        if height % rows == 0 and width % cols == 0 and height // rows == width // cols:
            return rows, cols
        if best is None or abs(rows / cols - height / width) < abs(best[0] / best[1] - height / width):
            best = (rows, cols)
    if best is not None and abs(best[0] / best[1] - height / width) < 1e-6:
        return best
    return None


def count_tokens(model: nn.Module, layer: AttentionLayer, input_shape: tuple[int, int, int]) -> tuple[int, int]:
    """Run one forward pass on a zero image and read the attention shape of ``layer``.

    Returns:
        ``(num_heads, num_tokens)`` of that layer.

    Raises:
        CaptureError: if the layer yields nothing.
    """
    seen: list[tuple[int, int]] = []
    cap = AttentionCapture([layer], lambda i, a: seen.append((a.shape[1], a.shape[-1])))
    p = next(model.parameters(), None)
    x = torch.zeros(1, *input_shape, device=p.device if p is not None else "cpu")
    with cap, torch.no_grad():
        model(x)
    cap.check_all_captured(type(model).__name__)
    return seen[0]


def infer_geometry(
    model: nn.Module,
    layer: AttentionLayer,
    input_shape: tuple[int, int, int],
    num_prefix_tokens: int | None = None,
    grid: tuple[int, int] | None = None,
    patch_size: float | tuple[float, float] | None = None,
) -> "TokenGeometry":
    """The token geometry of ``layer`` for inputs of shape ``input_shape`` ``(C, H, W)``.

    Prefix tokens come from ``num_prefix_tokens``, else the model's own ``num_prefix_tokens``
    (timm), else the smallest count (0..16) that leaves a patch grid tiling the image. The grid
    comes from ``grid``, else from the token count and the image's aspect ratio; pixels per token
    are ``(H / rows, W / cols)`` unless ``patch_size`` is given — so a hybrid's CNN stem sets them
    through its feature-map size, not the patch embedding's ``patch_size``.

    Raises:
        ProbeError: if the given or inferred geometry does not match the token count, naming
            ``--prefix-tokens`` / ``--grid`` / ``--patch-size``.
    """
    from .geometry import TokenGeometry

    _, height, width = input_shape
    _, tokens = count_tokens(model, layer, input_shape)
    prefix = num_prefix_tokens
    if prefix is None:
        prefix = getattr(model, "num_prefix_tokens", None)
    candidates = [prefix] if prefix is not None else list(range(0, 17))
    for pre in candidates:
        g = grid if grid is not None else _grid_from_tokens(tokens - pre, height, width)
        if g is not None and g[0] * g[1] == tokens - pre:
            if patch_size is None:
                ppt = (height / g[0], width / g[1])
            elif isinstance(patch_size, (tuple, list)):
                ppt = (float(patch_size[0]), float(patch_size[1]))
            else:
                ppt = (float(patch_size), float(patch_size))
            return TokenGeometry(int(pre), (int(g[0]), int(g[1])), ppt)
    given = f"{prefix} prefix tokens" if prefix is not None else "any prefix count 0-16"
    grid_txt = f" and grid {grid[0]}x{grid[1]}" if grid is not None else ""
    raise ProbeError(
        f"{type(model).__name__} layer {layer.index} ({layer.name}) has {tokens} tokens, which "
        f"{given}{grid_txt} cannot split into a patch grid of a {height}x{width} image; "
        "set --prefix-tokens and --grid RxC (and --patch-size) to match the model"
    )
