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

The rules of the model families (ConViT, Swin, ``nn.MultiheadAttention``, and the functional
fallback for user modules that call ``F.scaled_dot_product_attention`` or a softmax) live in
:mod:`probe.families`, imported by :mod:`probe`. Layers may differ in token geometry
(:func:`infer_geometries`). The full guide, refusals included, is ``docs/capture.md``.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .errors import CaptureError, ProbeError

Emit = Callable[[torch.Tensor], None]
Restore = Callable[[], None]


def override_attribute(obj: Any, name: str, value: Any) -> Restore:
    """Set ``obj.name = value`` on the instance and return the function that undoes it: the
    instance's own earlier value is put back, or the instance attribute is deleted when the
    name came from the class (e.g. a bound ``forward``, timm's class-level ``fused_attn``), so
    the object is left exactly as found. The helper of capture and gate rules that replace a
    module's ``forward`` or switch a flag while installed."""
    own = name in vars(obj)
    old = vars(obj).get(name)
    setattr(obj, name, value)

    def restore() -> None:
        if own:
            setattr(obj, name, old)
        else:
            delattr(obj, name)

    return restore


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

    def num_prefix_tokens(self, module: nn.Module) -> int | None:
        """Prefix tokens (class, distillation, register) in the sequence this module attends over,
        when the rule knows it for certain (e.g. 0 for ConViT's gated positional layers, which run
        before the class token joins); ``None`` leaves it to the options and the model."""
        return None

    #: True for rules that recognise a module only to keep it (and its children) out of the
    #: layers, e.g. an attention-pooling head whose single query attends to the patch tokens.
    skip: bool = False

    def num_heads(self, module: nn.Module) -> int | None:
        """The module's head count, for head gates: ``num_heads`` or ``num_attention_heads``
        (timm, ``nn.MultiheadAttention``, Hugging Face), else ``None``."""
        for attr in ("num_heads", "num_attention_heads"):
            value = getattr(module, attr, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
        return None

    def can_gate(self, module: nn.Module) -> bool:
        """True if :meth:`install_gate` can gate this module's heads (default: the rule
        overrides :meth:`install_gate`)."""
        return type(self).install_gate is not CaptureRule.install_gate

    def install_gate(self, module: nn.Module, num_heads: int,
                     get_gate: Callable[[], "torch.Tensor | None"]) -> Restore:
        """Install a head gate (:mod:`probe.attribution`) on this layer.

        On every forward call the installed code calls ``get_gate()``: ``None`` means the module
        runs exactly as without the gate; otherwise a tensor ``(batch or 1, num_heads)`` whose
        column ``h`` multiplies head ``h``'s contribution (the head whose probabilities the rule
        captures as head ``h``) before the output projection. Gradients must flow into the gate.
        Primitives: :mod:`probe.families.gating`.

        Returns:
            A callable that removes the gate.

        Raises:
            NotImplementedError: the rule has no gate (the default).
        """
        raise NotImplementedError(f"capture rule {self.name} has no head gate")


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
        fused = (override_attribute(module, "fused_attn", False)
                 if getattr(module, "fused_attn", None) is not None else (lambda: None))
        handle = module.attn_drop.register_forward_hook(lambda m, inp, out: emit(out))

        def restore() -> None:
            handle.remove()
            fused()

        return restore

    def can_gate(self, module: nn.Module) -> bool:
        return isinstance(getattr(module, "proj", None), nn.Linear)

    def install_gate(self, module: nn.Module, num_heads: int,
                     get_gate: Callable[[], "torch.Tensor | None"]) -> Restore:
        """Forward pre-hook on ``module.proj``, whose input ``(B, N, H·D)`` is the heads'
        outputs head-major (after timm's optional ``norm``; see
        :func:`probe.attribution._install_timm_attention`)."""
        from .families.gating import gate_linear_input

        return gate_linear_input(module.proj, num_heads, get_gate, f"{type(module).__name__} gate")


_RULES: list[CaptureRule] = [TimmAttentionRule()]


def removing(handles: list, *then: Restore) -> Restore:
    """The restore of a rule that installed hooks: remove ``handles`` (``torch.utils.hooks``
    handles), then call each of ``then`` (e.g. an :func:`override_attribute` restore) in order."""

    def restore() -> None:
        for handle in handles:
            handle.remove()
        for undo in then:
            undo()

    return restore


def register_rule(rule: CaptureRule, first: bool = True) -> None:
    """Add a capture rule; by default it is tried before the existing ones (the built-in families
    are registered first, so a user's rule is tried before them)."""
    _ensure_families()
    if first:
        _RULES.insert(0, rule)
    else:
        _RULES.append(rule)


def _ensure_families() -> None:
    """Register the model families' capture rules (:mod:`probe.families`) on first use, so that
    importing :mod:`probe` stays light."""
    import importlib

    importlib.import_module("probe.families")


def rules() -> list[CaptureRule]:
    """The registered capture rules, in the order they are tried."""
    _ensure_families()
    return list(_RULES)


#: ``finder(model, input_shape) -> [(name, module, rule), ...]`` tried in order when no module rule
#: matches anything in a model (see :mod:`probe.families.functional`).
Fallback = Callable[[nn.Module, tuple[int, int, int]], list[tuple[str, nn.Module, CaptureRule]]]
_FALLBACKS: list[Fallback] = []


def register_fallback(finder: Fallback) -> None:
    """Add a fallback layer finder, used only for models in which no capture rule matches a module."""
    _ensure_families()
    _FALLBACKS.append(finder)


def describe_rules() -> str:
    """The names of the registered rules and fallbacks, for error messages."""
    _ensure_families()
    names = [r.name for r in _RULES] + [getattr(f, "label", getattr(f, "__name__", "fallback")) for f in _FALLBACKS]
    return ", ".join(names)


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


def find_attention_layers(model: nn.Module, input_shape: tuple[int, int, int] | None = None) -> list[AttentionLayer]:
    """Recognised attention modules of ``model`` in module order.

    A module nested inside an already recognised one is not counted again (nor is one a
    ``skip`` rule recognises). When no rule matches any module and ``input_shape`` ``(C, H, W)``
    is given, the registered fallbacks are tried (e.g. attention computed by function calls,
    found in one forward pass on a zero image); their layers are remembered for the model, so a
    later call without ``input_shape`` returns them.

    Returns:
        The layers, numbered from 0.
    """
    _ensure_families()
    found: list[AttentionLayer] = []
    taken: list[str] = []
    for qname, mod in model.named_modules():
        if any(qname.startswith(t + ".") for t in taken):
            continue
        for rule in _RULES:
            if rule.matches(mod):
                if not rule.skip:
                    found.append(AttentionLayer(len(found), qname, mod, rule))
                taken.append(qname)
                break
    if not found and input_shape is not None:
        for finder in _FALLBACKS:
            hits = finder(model, tuple(input_shape))
            if hits:
                layers = [AttentionLayer(i, n, m, r) for i, (n, m, r) in enumerate(hits)]
                _FALLBACK_LAYERS[model] = layers
                return layers
    if not found and input_shape is None and model in _FALLBACK_LAYERS:
        return list(_FALLBACK_LAYERS[model])
    return found


#: The layers the fallbacks last found per model (so a later call without ``input_shape``, e.g.
#: the head gates of :mod:`probe.attribution`, sees the same layers and names).
_FALLBACK_LAYERS: "weakref.WeakKeyDictionary[nn.Module, list[AttentionLayer]]" = weakref.WeakKeyDictionary()


def parse_layers(
    spec: str | int | list[int] | tuple[int, ...] | range | None, num_layers: int, model_name: str | None = None
) -> list[int]:
    """Parse a layer selection against a model with ``num_layers`` attention layers.

    Accepts ``"all"`` / ``None``, ``"0-4"`` (inclusive), ``"0,2,5"``, mixes such as ``"0-2,7"``,
    negative indices counted from the end (``"-1"``), or a list of ints.

    Returns:
        Sorted unique layer indices.

    Raises:
        ProbeError: for a malformed spec or an index outside ``0 .. num_layers-1`` (naming
            ``model_name`` when given).
    """
    who = f"{model_name}: " if model_name else ""
    if num_layers < 1:
        raise ProbeError(f"{who}the model has no attention layers to select")
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "all"):
        return list(range(num_layers))
    if isinstance(spec, bool) or not isinstance(spec, (str, int, list, tuple, range)):
        raise ProbeError(f"layers must be 'all', a string like '0-4' or '0,2,5', or a list of integers; got {type(spec).__name__}")
    if isinstance(spec, int):
        items: list[int] = [spec]
    elif isinstance(spec, (list, tuple, range)):
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in spec):
            raise ProbeError(f"layers must be 'all', a string like '0-4' or '0,2,5', or a list of integers; got {list(spec)!r}")
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
                    items.extend((lo, hi) if hi - lo >= 2 * num_layers else range(lo, hi + 1))  # ends out of range
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
                f"{who}layer {i} is out of range: the model has {num_layers} attention layers "
                f"(0-{num_layers - 1}); fix --layers"
            )
        out.append(j)
    if not out:
        raise ProbeError(f"layer spec {spec!r} selects no layer")
    return sorted(set(out))


class StopForward(BaseException):
    """Raised inside a forward pass once every selected layer has delivered its attention, to
    skip the rest of the model (see :class:`AttentionCapture`). A ``BaseException``, so a model
    that catches ``Exception`` cannot swallow it."""


class AttentionCapture:
    """Context manager that streams attention probabilities of selected layers to a sink.

    Args:
        layers: the layers to hook (from :func:`find_attention_layers`).
        sink: ``sink(layer_index, attn)`` with ``attn`` of shape ``(batch, heads, query, key)``;
            called during each forward pass; the tensor must not be kept.
        stop_before: optional module that runs after the deepest selected layer (e.g. the next
            attention layer). Once :meth:`arm_early_exit` has confirmed, on a full forward pass,
            that every selected layer delivered all its attention before this module was entered,
            later forward passes raise :class:`StopForward` when it is about to run, so the rest
            of the model (later blocks, head) is skipped: the attention tensors are the same.
            Wrap the forward call in :meth:`forward`.
        keep_graph: hand the sink the tensors as the rules emit them, still attached to the
            autograd graph, instead of detached copies (default ``False``). For analyses that need
            gradients with respect to the attention probabilities (e.g. the relevance of
            :mod:`probe.analyses.rollout`); the sink may then keep them until the backward pass.
            Only tensors that the model itself goes on to use (timm attention, Hugging Face eager
            attention, the functional fallback) receive a gradient; derived copies (Swin's dense
            window maps, ``nn.MultiheadAttention``'s reshaped weights) do not.
        image_offsets: call ``sink(layer_index, attn, start)`` instead, ``start`` being the position
            within the current call of the layer's module of ``attn``'s first image. A rule may
            deliver one batch in pieces of a few images (Swin's dense window maps,
            :func:`probe.families.windows.emit_windows`): the pieces of one call arrive in image
            order with ``start = 0, n1, n1 + n2, ...``; the next call of the module starts at 0.

    On exit every hook is removed and every module restored, also after an exception.
    :attr:`counts` records how many tensors each layer delivered.
    """

    def __init__(self, layers: list[AttentionLayer], sink: Callable[..., None],
                 stop_before: nn.Module | None = None, keep_graph: bool = False, image_offsets: bool = False):
        self.layers = layers
        self.keep_graph = keep_graph
        self.sink = sink
        self.image_offsets = image_offsets
        self._start = {layer.index: 0 for layer in layers}  # next piece's first image, per layer
        self.counts = {layer.index: 0 for layer in layers}
        self._restores: list[Restore] = []
        self.stop_before = stop_before
        self.armed = False
        self._emits = 0  # tensors delivered, all layers
        self._emits_at_stop: int | None = None  # value of _emits when stop_before was first entered

    def _emitter(self, index: int) -> Emit:
        def emit(attn: torch.Tensor) -> None:
            self.counts[index] += 1
            self._emits += 1
            out = attn if self.keep_graph else attn.detach()
            if self.image_offsets:
                start, self._start[index] = self._start[index], self._start[index] + int(attn.shape[0])
                self.sink(index, out, start)
            else:
                self.sink(index, out)

        return emit

    def _restart(self, index: int) -> Callable:
        def hook(module: nn.Module, args) -> None:
            self._start[index] = 0  # a new call of the layer's module: its first piece starts at image 0

        return hook

    def _stop_hook(self, module: nn.Module, args) -> None:
        if self.armed:
            raise StopForward
        if self._emits_at_stop is None:
            self._emits_at_stop = self._emits

    def __enter__(self) -> "AttentionCapture":
        try:
            for layer in self.layers:
                if self.image_offsets:
                    self._restores.append(layer.module.register_forward_pre_hook(self._restart(layer.index)).remove)
                self._restores.append(layer.rule.install(layer.module, self._emitter(layer.index)))
            if self.stop_before is not None:
                self._restores.append(self.stop_before.register_forward_pre_hook(self._stop_hook).remove)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def forward(self, model: nn.Module, batch: torch.Tensor) -> None:
        """Run ``model(batch)`` for its attention; the output is discarded (the forward pass
        may end early, see ``stop_before``)."""
        try:
            model(batch)
        except StopForward:
            pass

    def arm_early_exit(self) -> bool:
        """After one full forward pass: enable early exit if ``stop_before`` was entered only once
        every selected layer had delivered all of that pass's attention (module order equals
        execution order). Returns whether it is armed."""
        self.armed = self.stop_before is not None and self._emits_at_stop == self._emits > 0
        return self.armed

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


@dataclass(frozen=True)
class LayerShape:
    """What a dry forward pass on one image saw of a layer.

    Attributes:
        sequences: leading (batch) size of the attention tensor; 1 for image-wide attention.
        heads: number of heads.
        queries, keys: query and key tokens (equal for self-attention).
    """

    sequences: int
    heads: int
    queries: int
    keys: int


def _short(e: BaseException, n: int = 160) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= n else text[: n - 3] + "..."


def dry_run(
    model: nn.Module,
    layers: list[AttentionLayer],
    input_shape: tuple[int, int, int],
    model_name: str | None = None,
) -> dict[int, LayerShape]:
    """One forward pass on a zero image ``(1, C, H, W)``, reading the attention shape of each layer.

    Also checks that each layer's attention is image-wide self-attention among tokens: one
    sequence per image (not one per window), as many queries as keys, and as many keys as the
    module's input has tokens (not channels, as in cross-covariance attention), and rows that sum
    to one.

    Returns:
        ``{layer index: LayerShape}``.

    Raises:
        ProbeError: if the forward pass fails (naming ``--input-size``).
        CaptureError: if a layer yields nothing or attention that is not image-wide
            self-attention, naming the model, the layer, the rule and ``--layers``.
    """
    name = model_name or type(model).__name__
    seen: dict[int, tuple[int, ...]] = {}
    inputs: dict[int, tuple[int, ...]] = {}
    row_sums: dict[int, tuple[float, float]] = {}

    def sink(i: int, a: torch.Tensor) -> None:
        if i not in seen:
            seen[i] = tuple(a.shape)
            sums = a.float().sum(-1)
            row_sums[i] = (float(sums.min()), float(sums.max())) if sums.numel() else (1.0, 1.0)

    def pre_hook(index: int):
        def hook(mod, args, kwargs):
            for t in list(args) + list(kwargs.values()):
                if isinstance(t, torch.Tensor):
                    inputs.setdefault(index, tuple(t.shape))
                    break
        return hook

    handles = [l.module.register_forward_pre_hook(pre_hook(l.index), with_kwargs=True) for l in layers]
    p = next(model.parameters(), None)
    x = torch.zeros(1, *input_shape, device=p.device if p is not None else "cpu")
    cap = AttentionCapture(layers, sink)
    try:
        with cap, torch.no_grad():
            model(x)
    except ProbeError as e:
        msg = str(e)
        raise type(e)(msg if msg.startswith(name) else f"{name}: {msg}") from None
    except Exception as e:
        raise ProbeError(
            f"{name}: the forward pass on a zero image of shape (1, {', '.join(map(str, input_shape))}) "
            f"failed ({_short(e)}); set --input-size C,H,W (and --mean/--std) to the input the model "
            "expects, or give the model a timm-style pretrained_cfg"
        ) from None
    finally:
        for h in handles:
            h.remove()
    cap.check_all_captured(name)
    out: dict[int, LayerShape] = {}
    for layer in layers:
        shape = seen[layer.index]
        where = f"{name}: layer {layer.index} ({layer.name}, rule {layer.rule.name})"
        if len(shape) != 4:
            raise CaptureError(
                f"{where} gave attention of shape {shape}, not (batch, heads, queries, keys); "
                "fix the capture rule or choose other --layers"
            )
        b, h, q, k = shape
        if q != k:
            raise CaptureError(
                f"{where} attends from {q} queries to {k} keys: probe analyses self-attention among the "
                "same tokens, not spatially reduced, pooled or class-only attention; choose other --layers"
            )
        if b != 1:
            raise CaptureError(
                f"{where} gave {b} attention maps for one image: it attends within windows or groups "
                "of tokens (e.g. Swin-style windows), which probe cannot read as attention over the "
                "image; choose other --layers or register a capture rule that maps the windows back "
                "to image positions (see probe.capture)"
            )
        lo, hi = row_sums[layer.index]
        if not (abs(lo - 1) < 1e-3 and abs(hi - 1) < 1e-3):
            raise CaptureError(
                f"{where} gave rows that sum to {lo:.4g}..{hi:.4g}, not 1: what the rule reads is not "
                "attention probabilities (e.g. maps mixed across heads after the softmax); choose other "
                "--layers or register a capture rule that reads the softmax output (see probe.capture)"
            )
        inp = inputs.get(layer.index)
        if inp is not None and len(inp) == 3 and inp[0] == 1 and inp[1] != k:
            raise CaptureError(
                f"{where} attends over {k} items while its input has {inp[1]} tokens: it mixes "
                "channels, not tokens (e.g. XCiT's cross-covariance attention), so there is no "
                "attention between image positions to analyse; choose other --layers"
            )
        out[layer.index] = LayerShape(b, h, q, k)
    return out


def count_tokens(model: nn.Module, layer: AttentionLayer, input_shape: tuple[int, int, int]) -> tuple[int, int]:
    """Run one forward pass on a zero image and read the attention shape of ``layer``.

    Returns:
        ``(num_heads, num_tokens)`` of that layer.

    Raises:
        CaptureError: if the layer yields nothing (see :func:`dry_run`).
    """
    shape = dry_run(model, [layer], input_shape)[layer.index]
    return shape.heads, shape.keys


def _geometry_for(
    tokens: int,
    candidates: list[int],
    height: int,
    width: int,
    grid: tuple[int, int] | None,
    patch_size: float | tuple[float, float] | None,
    exact: bool = False,
) -> "TokenGeometry | None":
    """The first prefix count of ``candidates`` that leaves a grid; with ``exact``, only grids
    whose cells tile the image with an integer pixel stride count."""
    from .geometry import TokenGeometry

    for pre in candidates:
        if pre < 0 or pre >= tokens:
            continue
        g = grid if grid is not None else _grid_from_tokens(tokens - pre, height, width)
        if exact and g is not None and (height % g[0] or width % g[1]):
            continue
        if g is not None and g[0] * g[1] == tokens - pre:
            if patch_size is None:
                ppt = (height / g[0], width / g[1])
            elif isinstance(patch_size, (tuple, list)):
                ppt = (float(patch_size[0]), float(patch_size[1]))
            else:
                ppt = (float(patch_size), float(patch_size))
            return TokenGeometry(int(pre), (int(g[0]), int(g[1])), ppt)
    return None


def infer_geometries(
    model: nn.Module,
    layers: list[AttentionLayer],
    input_shape: tuple[int, int, int],
    num_prefix_tokens: int | None = None,
    grid: tuple[int, int] | None = None,
    patch_size: float | tuple[float, float] | None = None,
    model_name: str | None = None,
    context: list[AttentionLayer] | None = None,
) -> dict[int, "TokenGeometry"]:
    """The token geometry of each layer for inputs of shape ``input_shape`` ``(C, H, W)``.

    The token count of every layer is read in one forward pass (:func:`dry_run`), so layers may
    differ: ConViT's gated positional layers have no class token, Swin's stages have coarser grids.

    Prefix tokens of a layer come from its capture rule when the rule knows them
    (:meth:`CaptureRule.num_prefix_tokens`), else ``num_prefix_tokens`` (``--prefix-tokens``),
    else the model's own ``num_prefix_tokens`` (timm) and, if that leaves no grid, the smallest
    count 0..16 that leaves a patch grid tiling the image. The grid comes from ``grid``, else from
    the token count and the image's aspect ratio (an inferred grid must tile the image with an
    integer pixel stride unless ``patch_size`` is given: overlapping or cropped patches would
    otherwise get a wrong spacing); pixels per token are ``(H / rows, W / cols)``
    unless ``patch_size`` is given, so a hybrid's CNN stem sets them through its feature-map size,
    not the patch embedding's ``patch_size``.

    Strided stages: where a layer's inferred grid is coarser than that of the layer before it (in
    module order, among ``context`` — all the model's attention layers — when their shapes can be
    read, else among ``layers``) and does not divide it, the stage was made by a stride-``s``
    subsample with padding (LeViT's 7x7 -> 4x4: ``ceil(7 / 2) = 4``); its tokens are then ``s``
    times the earlier spacing apart (64 px), not ``H / rows`` (56 px). :func:`strided_spacing`.

    Returns:
        ``{layer index: TokenGeometry}``.

    Raises:
        ProbeError: if the given or inferred geometry does not match a layer's token count,
            naming the model, the layer, what was tried and ``--prefix-tokens`` / ``--grid`` /
            ``--patch-size``; or as :func:`dry_run`.
    """
    name = model_name or type(model).__name__
    _, height, width = input_shape
    wanted = {l.index for l in layers}
    chain = layers
    if context is not None and grid is None and patch_size is None and {l.index for l in context} > wanted:
        try:  # every layer's shape, for the stage chain; a layer that is not selected may be unreadable
            shapes = dry_run(model, context, input_shape, name)
            chain = sorted(context, key=lambda l: l.index)
        except (ProbeError, CaptureError):
            shapes = dry_run(model, layers, input_shape, name)
    else:
        shapes = dry_run(model, layers, input_shape, name)
    model_prefix = getattr(model, "num_prefix_tokens", None)
    out = {}
    for layer in chain:
        tokens = shapes[layer.index].keys
        hint = layer.rule.num_prefix_tokens(layer.module)
        if hint is not None:
            candidates, tried = [int(hint)], f"{hint} prefix tokens (rule {layer.rule.name})"
        elif num_prefix_tokens is not None:
            candidates, tried = [int(num_prefix_tokens)], f"{num_prefix_tokens} prefix tokens (--prefix-tokens)"
        elif isinstance(model_prefix, int):
            candidates = [model_prefix] + [p for p in range(17) if p != model_prefix]
            tried = f"the model's {model_prefix} prefix tokens and any prefix count 0-16"
        else:
            candidates, tried = list(range(17)), "any prefix count 0-16"
        exact = grid is None and patch_size is None
        geom = _geometry_for(tokens, candidates, height, width, grid, patch_size, exact=exact)
        if geom is None and layer.index not in wanted:
            continue  # a context layer only: it just does not chain
        loose = _geometry_for(tokens, candidates, height, width, grid, patch_size) if geom is None and exact else None
        if loose is not None:
            (r, c), (py, px) = loose.grid, loose.pixels_per_token
            raise ProbeError(
                f"{name}: layer {layer.index} ({layer.name}) has {tokens} tokens; a {r}x{c} patch grid "
                f"after {loose.num_prefix_tokens} prefix tokens would put them {py:.4g}x{px:.4g} px apart, "
                f"which does not tile the {height}x{width} input (overlapping, cropped or padded patches: "
                "Tensor.unfold with a stride below the patch size, or an input size the model pads to a "
                "multiple of its patch size); set --patch-size to the stride in pixels (and --grid RxC, "
                "--prefix-tokens) to match the model, or an --input-size the patches tile"
            )
        if geom is None:
            grid_txt = f" with grid {grid[0]}x{grid[1]} (--grid)" if grid is not None else ""
            raise ProbeError(
                f"{name}: layer {layer.index} ({layer.name}) has {tokens} tokens, which {tried}{grid_txt} "
                f"cannot split into a patch grid of the {height}x{width} input; set --prefix-tokens and "
                "--grid RxC (and --patch-size) to match the model"
            )
        if grid is None and patch_size is None and out:
            geom = strided_spacing(out[max(out)], geom)
        out[layer.index] = geom
    return {i: g for i, g in out.items() if i in wanted}


def strided_spacing(before: "TokenGeometry", geom: "TokenGeometry") -> "TokenGeometry":
    """``geom`` with the pixel spacing of a strided stage that follows ``before`` (see
    :func:`infer_geometries`): along each axis where the grid shrinks from ``n1`` to ``n2`` cells
    and ``n1`` is not a multiple of ``n2``, with an integer stride ``s = round(n1 / n2) >= 2`` and
    ``ceil(n1 / s) = n2``, the spacing is ``s`` times ``before``'s; along an axis where the grid
    is the same, ``before``'s spacing (the same stage); otherwise ``geom``'s own (exact divisions,
    which ``H / rows`` already gets right, and grids that are not a strided subsample)."""
    from dataclasses import replace

    spacing = list(geom.pixels_per_token)
    changed = False
    for axis in (0, 1):
        n1, n2 = before.grid[axis], geom.grid[axis]
        if n2 == n1 and spacing[axis] != before.pixels_per_token[axis]:
            spacing[axis] = before.pixels_per_token[axis]  # the same stage: the same spacing
            changed = True
            continue
        if n2 >= n1 or n1 % n2 == 0:
            continue
        stride = round(n1 / n2)
        if stride >= 2 and -(-n1 // stride) == n2:
            spacing[axis] = before.pixels_per_token[axis] * stride
            changed = True
    return replace(geom, pixels_per_token=(spacing[0], spacing[1])) if changed else geom


def infer_geometry(
    model: nn.Module,
    layer: AttentionLayer,
    input_shape: tuple[int, int, int],
    num_prefix_tokens: int | None = None,
    grid: tuple[int, int] | None = None,
    patch_size: float | tuple[float, float] | None = None,
) -> "TokenGeometry":
    """The token geometry of one layer; see :func:`infer_geometries`.

    Raises:
        ProbeError: as :func:`infer_geometries`.
    """
    return infer_geometries(model, [layer], input_shape, num_prefix_tokens, grid, patch_size)[layer.index]
