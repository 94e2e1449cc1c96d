"""Head attribution: which attention heads does the model's prediction rely on?

Mechanism: a *head gate*. For every selected attention module a gate ``g[h]`` multiplies the
output of head ``h`` (its slice of the concatenated per-head outputs) just before the module's
output projection, so head ``h`` of layer ``l`` adds ``g[l, h] * W_O^h z^h`` to the residual
stream instead of ``W_O^h z^h`` (the head-mask of Michel et al. 2019, "Are Sixteen Heads Really
Better than One?", Sec. 2-4). ``g = 1`` everywhere is the unmodified model (tested to be exact),
``g[l, h] = 0`` removes the head's contribution and keeps every other head as it is.

The gates are the *input features* of the attributions, with the images held fixed:
``f(g) = model(images; gates=g)[target]``, one gate vector of ``sum_l H_l`` entries per image.

* **Integrated gradients** (Sundararajan et al. 2017, Eq. 1) over the gates, from the baseline
  ``g = 0`` (every selected head off) to ``g = 1`` (the model as trained), via
  :class:`captum.attr.IntegratedGradients`. Per image the attributions add up to
  ``f(1) - f(0)`` (completeness); captum's convergence delta measures the quadrature error.
* **Ablation** (Michel et al. 2019): for each head, ``f(1) - f(1 with that head's gate 0)``,
  i.e. :class:`captum.attr.FeatureAblation` with baseline 0 and one feature group per head.

**Target**: the raw logit (pre-softmax) of the class the unmodified model predicts for each
image (``argmax`` of its logits), or of given target classes. **Sign**: positive importance means
the head raises the target logit (switching it off lowers it). **Units**: logit units; the
reported importance is the mean over images of the per-image attribution, not normalised (the
standard error over images is reported alongside).

Cost: IG ``n_steps`` forward+backward passes per image, ablation ``1 + sum_l H_l`` forward
passes per image. Measured for DeiT-Tiny (36 heads), 32 ImageNet photos, 2 CPU threads on a
shared machine: IG (16 steps) 77 CPU-seconds, ablation 67-87 CPU-seconds, the ablation check
(k = 6, 10 random draws: 12 forward passes per image) about 30 CPU-seconds per ranking.

Families: every layer :mod:`probe.capture` finds can be gated. Where the attention module's class
is registered with :func:`register_head_gate` (timm ``Attention``, probe's attention-only
models) that installer is used; otherwise the layer's capture rule installs the gate
(:meth:`probe.capture.CaptureRule.install_gate`, primitives in :mod:`probe.families.gating`):
a pre-hook on the output projection (timm attention incl. BEiT/EVA/ConViT, Swin windows, Hugging
Face ``o_proj`` / ``out_proj``), the wrapped ``forward`` of ``nn.MultiheadAttention`` (its
``F.multi_head_attention_forward`` call uses the projection weight directly, so a pre-hook never
fires), the probabilities before they meet the values (CaiT talking heads, hand-written softmax,
per-head modules) or the per-head output of ``F.scaled_dot_product_attention`` (functional
fallback). Lookup in the registry is by *exact* class, so a subclass that changes ``forward`` is
never gated by the parent's installer by accident.
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .errors import ProbeError

#: ``install(module, get_gate) -> handle``: make ``module`` multiply the output of head ``h``
#: by ``get_gate()[:, h]`` (shape ``(batch or 1, num_heads)``) on every forward call, or pass
#: through unchanged while ``get_gate()`` returns ``None``; ``handle.remove()`` undoes it.
GateInstaller = Callable[[nn.Module, Callable[[], "torch.Tensor | None"]], RemovableHandle]


@dataclass(frozen=True)
class _GateAdapter:
    install: GateInstaller
    num_heads: Callable[[nn.Module], int]


_REGISTRY: dict[type, _GateAdapter] = {}


def register_head_gate(
    module_type: type,
    install: GateInstaller,
    num_heads: Callable[[nn.Module], int] = lambda m: int(m.num_heads),
) -> None:
    """Register how to gate the heads of attention modules of class ``module_type``.

    Args:
        module_type: the attention module class; matched exactly (``type(m) is module_type``).
        install: ``install(module, get_gate) -> RemovableHandle``. On each forward call of
            ``module`` the installed code calls ``get_gate()``; if it returns ``None`` the
            module must behave exactly as without the gate, otherwise a tensor of shape
            ``(batch, num_heads)`` or ``(1, num_heads)`` (on the module's device) whose
            column ``h`` multiplies the output of head ``h`` before the output projection,
            per sample of the batch. Gradients must flow into the gate tensor.
        num_heads: ``num_heads(module)``, the module's head count (default ``module.num_heads``).

    A later registration of the same class replaces the earlier one.
    """
    _REGISTRY[module_type] = _GateAdapter(install=install, num_heads=num_heads)


def _apply_gate(x: torch.Tensor, gate: torch.Tensor, num_heads: int, where: str) -> torch.Tensor:
    """Multiply the per-head slices of ``x (B, ..., H*D)`` by ``gate (B or 1, H)``
    (:func:`probe.families.gating.apply_gate`)."""
    from .families.gating import apply_gate

    return apply_gate(x, gate, num_heads, where)


def _install_timm_attention(module: nn.Module, get_gate: Callable[[], torch.Tensor | None]):
    """Gate timm's ``Attention`` (ViT, DeiT): a forward pre-hook on ``module.proj``.

    ``Attention.forward`` computes the per-head outputs ``(B, H, N, D)``, reshapes them to
    ``(B, N, H*D)`` (head-major channels), applies ``module.norm`` (``Identity`` unless
    ``scale_attn_norm=True``) and timm's own optional sigmoid gate, then ``module.proj``.
    The pre-hook multiplies the input of ``proj`` channel block ``h*D:(h+1)*D`` by
    ``g[:, h]``, i.e. the gate acts *after* ``norm``. With ``norm = Identity`` before and
    after are the same; with a LayerNorm over all ``H*D`` channels, gating before it would let
    the norm rescale the other heads and put its bias into the switched-off head's slot, so
    "head off" would not mean "no contribution". After the norm, ``g = 0`` is exactly the
    weight surgery that zeroes the head's columns of ``W_O`` (tested).
    """
    heads = int(module.num_heads)
    where = f"{type(module).__name__} gate"

    def pre_hook(_proj: nn.Module, args: tuple) -> tuple | None:
        gate = get_gate()
        if gate is None:
            return None
        return (_apply_gate(args[0], gate, heads, where), *args[1:])

    return module.proj.register_forward_pre_hook(pre_hook)


def _register_builtin() -> None:
    try:
        from timm.layers.attention import Attention as TimmAttention
    except ImportError:  # pragma: no cover - timm is a dependency
        return
    register_head_gate(TimmAttention, _install_timm_attention)


_register_builtin()


@dataclass(frozen=True)
class _GateTarget:
    """One gateable attention layer: its name (as :func:`probe.capture.find_attention_layers`
    names it), module, head count and ``install(get_gate) -> remove``."""

    name: str
    module: nn.Module
    num_heads: int
    install: Callable[[Callable[[], "torch.Tensor | None"]], Callable[[], None]]


def _targets(model: nn.Module, input_shape: tuple[int, int, int] | None = None
             ) -> tuple[list[_GateTarget], list[str]]:
    """Gateable layers of ``model`` in layer order, and ``"name (reason)"`` for the captured
    layers that cannot be gated."""
    from .capture import find_attention_layers

    targets: list[_GateTarget] = []
    refused: list[str] = []
    seen: set[int] = set()
    for layer in find_attention_layers(model, input_shape):
        mod, rule = layer.module, layer.rule
        adapter = _REGISTRY.get(type(mod))
        if adapter is not None:
            seen.add(id(mod))
            targets.append(_GateTarget(layer.name, mod, int(adapter.num_heads(mod)),
                                       lambda get, a=adapter, m=mod: a.install(m, get).remove))
            continue
        heads = rule.num_heads(mod)
        if not rule.can_gate(mod) or heads is None:
            refused.append(f"{layer.name} (rule {rule.name}: no head gate)")
            continue
        targets.append(_GateTarget(layer.name, mod, int(heads),
                                   lambda get, r=rule, m=mod, h=int(heads): r.install_gate(m, h, get)))
    # registered classes that no capture rule recognises (a user's gate without a rule)
    if not targets:
        for name, mod in model.named_modules():
            adapter = _REGISTRY.get(type(mod))
            if adapter is not None and id(mod) not in seen:
                targets.append(_GateTarget(name, mod, int(adapter.num_heads(mod)),
                                           lambda get, a=adapter, m=mod: a.install(m, get).remove))
    return targets, refused


def gateable_modules(model: nn.Module, input_shape: tuple[int, int, int] | None = None
                     ) -> list[tuple[str, nn.Module]]:
    """Attention layers of ``model`` that can be gated, in layer order.

    These are the layers :func:`probe.capture.find_attention_layers` finds (for the functional
    fallback: the layers found by an earlier call with ``input_shape``, or by this one when
    ``input_shape`` ``(C, H, W)`` is given) whose module class has a registered gate or whose
    capture rule installs one.

    Returns:
        ``[(layer name, module), ...]``; position ``i`` in this list is "layer ``i``" for
        every function of this module (for a timm ViT, block ``i``).
    """
    return [(t.name, t.module) for t in _targets(model, input_shape)[0]]


class HeadGates:
    """Per-head gates installed on the attention layers of a model (a context manager).

    Args:
        model: the model; its layers are found with :func:`gateable_modules`.
        layers: which layers to gate and how to number them (default all, numbered by
            position in :func:`gateable_modules`):

            * a sequence of indices into :func:`gateable_modules`, or
            * a mapping ``{layer number: layer name}`` (e.g. the pipeline's
              ``meta["layer_names"]``, ``{0: "blocks.0.attn", ...}``), so that the ``layer``
              reported here is the same number as in the other tables.

            Heads of other layers are never touched.
        input_shape: ``(C, H, W)``, needed only for a model whose attention the functional
            fallback finds (function calls, no module) and that was not analysed before.

    Use::

        with HeadGates(model) as gates:
            gates.set(torch.ones(gates.num_features))  # unmodified model
            logits = model(images)

    Gate tensors passed to :meth:`set` are *flat*: ``(num_features,)`` for the whole batch, or
    ``(batch, num_features)`` per sample, where feature ``j`` is ``(layer, head) =
    self.features[j]`` (layer-major, then head). ``set(None)`` (the state after entering)
    makes every hook a pass-through. Leaving the context removes all hooks.

    Raises:
        ProbeError: if the model has no gateable attention layer, ``layers`` selects an
            index outside it, or names a layer that is missing or cannot be gated.
    """

    def __init__(
        self, model: nn.Module, layers: Sequence[int] | Mapping[int, str] | None = None,
        input_shape: tuple[int, int, int] | None = None,
    ) -> None:
        from .capture import _ensure_families  # the families register their gates with their rules

        _ensure_families()
        found, refused = _targets(model, input_shape)
        if isinstance(layers, Mapping):
            by_name = {t.name: t for t in found}
            chosen: list[tuple[int, _GateTarget]] = []
            for number, name in sorted((int(k), str(v)) for k, v in layers.items()):
                target = by_name.get(name)
                if target is None:
                    why = next((r for r in refused if r.startswith(f"{name} (")), None)
                    mods = dict(model.named_modules())
                    what = (f"cannot be gated: {why}" if why
                            else "is not in the model" if name not in mods and ":" not in name
                            else f"is a {type(mods[name]).__name__}, not a captured attention layer, "
                                 "so it has no head gate" if name in mods
                            else "is not an attention layer of the model, so it has no head gate")
                    raise ProbeError(
                        f"layer {number} ({name}) {what}; register a gate with "
                        "probe.attribution.register_head_gate or CaptureRule.install_gate - or use "
                        "--attribution none"
                    )
                chosen.append((number, target))
        else:
            if not found:
                known = ", ".join(sorted(t.__qualname__ for t in _REGISTRY)) or "none"
                extra = f"; not gateable: {', '.join(refused[:3])}" if refused else ""
                raise ProbeError(
                    f"{type(model).__name__} has no attention module with a head gate (registered "
                    f"classes: {known}{extra}); register one with probe.attribution.register_head_gate "
                    "or a capture rule with install_gate"
                )
            idx = range(len(found)) if layers is None else [int(i) for i in layers]
            bad = [i for i in idx if not 0 <= i < len(found)]
            if bad or len(set(idx)) != len(idx):
                raise ProbeError(
                    f"layers {list(idx)} must be distinct indices in 0..{len(found) - 1} "
                    f"(the model has {len(found)} gateable attention layers)"
                )
            chosen = [(i, found[i]) for i in sorted(idx)]
        if not chosen:
            raise ProbeError("no layer selected for head attribution; select at least one layer")
        self.model = model
        self.layers: list[int] = [n for n, _ in chosen]
        self._targets: list[_GateTarget] = [t for _, t in chosen]
        self.modules: list[nn.Module] = [t.module for t in self._targets]
        self.num_heads: list[int] = [t.num_heads for t in self._targets]
        offsets = np.concatenate([[0], np.cumsum(self.num_heads)])
        self._slices = [slice(int(a), int(b)) for a, b in zip(offsets[:-1], offsets[1:])]
        #: ``(layer, head)`` of each gate feature, layer-major.
        self.features: list[tuple[int, int]] = [
            (layer, h) for layer, n in zip(self.layers, self.num_heads) for h in range(n)
        ]
        self._gate: torch.Tensor | None = None
        self._handles: list[Callable[[], None]] = []

    @property
    def num_features(self) -> int:
        """Total number of gated heads, ``sum`` of the selected layers' head counts."""
        return len(self.features)

    def set(self, gates: torch.Tensor | None) -> None:
        """Set the gates for the following forward calls.

        Args:
            gates: ``(num_features,)``, ``(batch, num_features)`` or ``None`` (pass-through).
                Any floating dtype; gradients flow into it.

        Raises:
            ProbeError: on a wrong shape.
        """
        if gates is not None:
            if gates.dim() == 1:
                gates = gates[None]
            if gates.dim() != 2 or gates.shape[1] != self.num_features:
                raise ProbeError(
                    f"gates must have shape (num_features,) or (batch, num_features) with "
                    f"num_features = {self.num_features}, got {tuple(gates.shape)}"
                )
        self._gate = gates

    def _getter(self, i: int) -> Callable[[], torch.Tensor | None]:
        sl = self._slices[i]

        def get() -> torch.Tensor | None:
            return None if self._gate is None else self._gate[:, sl]

        return get

    def __enter__(self) -> HeadGates:
        try:
            for i, t in enumerate(self._targets):
                self._handles.append(t.install(self._getter(i)))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        while self._handles:
            self._handles.pop()()
        self._gate = None


def unsupported_reason(
    model: nn.Module, layers: Sequence[int] | Mapping[int, str] | None = None,
    input_shape: tuple[int, int, int] | None = None,
) -> str | None:
    """Why :class:`HeadGates` cannot gate these layers of ``model``, or ``None`` if it can.

    For callers that skip the attribution with a note instead of failing (a layer whose capture
    rule has no gate, e.g. a user's rule without ``install_gate``).
    """
    try:
        HeadGates(model, layers, input_shape)
    except ProbeError as e:
        return str(e)
    return None


@contextlib.contextmanager
def head_gates(
    model: nn.Module, layers: Sequence[int] | Mapping[int, str] | None = None
) -> Iterator[HeadGates]:
    """Context manager form of :class:`HeadGates`: ``with head_gates(model) as gates: ...``."""
    with HeadGates(model, layers) as gates:
        yield gates


@contextlib.contextmanager
def inference_mode_params(model: nn.Module) -> Iterator[None]:
    """Eval mode and ``requires_grad=False`` on the parameters; both restored on exit.

    Attribution needs gradients only with respect to the gates (relevance,
    :mod:`probe.analyses.rollout`, only with respect to the attention), so parameter gradients
    (a third of the backward cost) are skipped.
    """
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, rg in flags:
            p.requires_grad_(rg)
        model.train(was_training)


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[0] < 1:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ProbeError(
            f"images must be a float tensor (batch, channels, height, width) with batch >= 1, "
            f"got {shape}; load them with the model's eval transform"
        )


def as_logits(out: object) -> object:
    """The logits of a model's output: the tensor itself, a ``transformers`` output's ``logits``
    (``ImageClassifierOutput``), or the first element of a tuple; anything else unchanged (and
    then refused by the caller)."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return out


def _logits(model: nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    outs = []
    for i in range(0, images.shape[0], batch_size):
        out = as_logits(model(images[i : i + batch_size]))
        if not isinstance(out, torch.Tensor) or out.dim() != 2:
            raise ProbeError(
                "the model's output is not a (batch, classes) logits tensor; attribution needs "
                "a classifier (set num_classes > 0)"
            )
        outs.append(out)
    return torch.cat(outs)


def _as_classes(
    logits: torch.Tensor, classes: torch.Tensor | Sequence[int], what: str
) -> torch.Tensor:
    t = torch.as_tensor(classes, dtype=torch.long).reshape(-1)
    if t.shape[0] != logits.shape[0]:
        raise ProbeError(f"got {t.shape[0]} {what} for {logits.shape[0]} images; pass one per image")
    if t.min() < 0 or t.max() >= logits.shape[1]:
        raise ProbeError(f"{what} must lie in 0..{logits.shape[1] - 1} (the model's classes)")
    return t.to(logits.device)


def _resolve_targets(
    logits: torch.Tensor, targets: torch.Tensor | Sequence[int] | None
) -> tuple[torch.Tensor, str]:
    if targets is None:
        return logits.argmax(-1), "predicted class (argmax of the unmodified model's logits)"
    return _as_classes(logits, targets, "targets"), "given target classes"


@dataclass
class HeadAttribution:
    """Result of :func:`attribute_heads`.

    Attributes:
        heads: DataFrame, one row per gated head: ``layer``, ``head``, and per method run
            ``importance_<m>`` (mean over images of the per-image attribution to the target
            logit, logit units, positive = the head raises it) and ``importance_<m>_se``
            (standard error over images), ``m`` in ``ig``, ``ablation``.
        targets: long ``(n_images,)``, the class whose logit was attributed per image.
        info: provenance for the report: ``target`` (how targets were chosen), ``baseline``,
            per-method settings, ``seconds_<m>`` (wall-clock) and ``cpu_seconds_<m>``
            (process CPU time, all threads), and for IG
            ``ig_logit_all_on`` / ``ig_logit_all_off`` (mean target logit at g = 1 / 0) and
            ``ig_max_abs_convergence_delta`` (largest per-image completeness error).
    """

    heads: pd.DataFrame
    targets: torch.Tensor
    info: dict = field(default_factory=dict)


METHODS = ("ig", "ablation")


def attribute_heads(
    model: nn.Module,
    images: torch.Tensor,
    methods: Sequence[str] = METHODS,
    targets: torch.Tensor | Sequence[int] | None = None,
    layers: Sequence[int] | Mapping[int, str] | None = None,
    n_steps: int = 16,
    batch_size: int = 8,
    internal_batch_size: int = 32,
    perturbations_per_eval: int = 8,
) -> HeadAttribution:
    """Importance of each attention head for the model's predictions, with captum.

    Args:
        model: a classifier whose attention modules have a registered head gate (timm ViT,
            DeiT); put in eval mode for the call, parameters untouched.
        images: float ``(n_images, C, H, W)``, already transformed for the model.
        methods: any of ``"ig"`` (integrated gradients over head gates, baseline all gates
            0, ``n_steps`` Gauss-Legendre points) and ``"ablation"`` (one head's gate set to 0
            at a time).
        targets: optional class indices ``(n_images,)`` (e.g. true labels); the attributed
            logit is then theirs instead of the predicted class's.
        layers: gated layers and their numbering, see :class:`HeadGates` (default all).
        n_steps: IG quadrature points; each costs one forward and backward pass per image.
        batch_size: images per captum call (memory).
        internal_batch_size: IG forward-pass batch size (``>= batch_size``).
        perturbations_per_eval: ablated heads evaluated in one forward batch.

    Returns:
        :class:`HeadAttribution`. Cost: IG ``n_steps`` forward+backward passes per image,
        ablation ``1 + num_heads`` forward passes per image.

    Raises:
        ProbeError: on an unknown method, bad images, targets or layers, or a model without
            gateable attention.
    """
    from captum.attr import FeatureAblation, IntegratedGradients

    methods = list(dict.fromkeys(methods))
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ProbeError(f"unknown attribution method(s) {unknown or methods}; use 'ig' and/or 'ablation'")
    _check_images(images)
    if n_steps < 1 or batch_size < 1 or perturbations_per_eval < 1:
        raise ProbeError("n_steps, batch_size and perturbations_per_eval must be >= 1")
    internal_batch_size = max(int(internal_batch_size), batch_size)
    device = next(model.parameters()).device
    images = images.to(device)

    # IG needs autograd even when the caller runs under no_grad / inference_mode; images made
    # under inference_mode cannot be saved for backward, hence the clone.
    with torch.inference_mode(False), torch.enable_grad(), inference_mode_params(model), \
            HeadGates(model, layers, tuple(images.shape[1:])) as gates:
        images = images.clone() if images.is_inference() else images
        with torch.no_grad():
            logits = _logits(model, images, batch_size)
        targets, target_desc = _resolve_targets(logits, targets)
        nf = gates.num_features

        def forward(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            gates.set(g)
            try:
                return as_logits(model(x))
            finally:
                gates.set(None)

        per_image: dict[str, torch.Tensor] = {}
        info: dict = {
            "target": target_desc,
            "target_quantity": "logit (pre-softmax) of the target class",
            "baseline": "gate 0 = head's output removed before the output projection; "
            "gate 1 = unmodified model",
            "n_images": int(images.shape[0]),
            "layers": list(gates.layers),
        }
        if "ig" in methods:
            ig = IntegratedGradients(forward)
            t0, c0 = time.perf_counter(), time.process_time()
            attrs, deltas, f1, f0 = [], [], [], []
            for i in range(0, images.shape[0], batch_size):
                x, t = images[i : i + batch_size], targets[i : i + batch_size]
                ones = torch.ones(x.shape[0], nf, device=device)
                a, d = ig.attribute(
                    ones,
                    baselines=torch.zeros_like(ones),
                    target=t,
                    additional_forward_args=(x,),
                    n_steps=n_steps,
                    method="gausslegendre",
                    internal_batch_size=internal_batch_size,
                    return_convergence_delta=True,
                )
                attrs.append(a.detach())
                deltas.append(d.detach())
                with torch.no_grad():
                    f1.append(forward(ones, x).gather(1, t[:, None])[:, 0])
                    f0.append(forward(torch.zeros_like(ones), x).gather(1, t[:, None])[:, 0])
            per_image["ig"] = torch.cat(attrs)
            info.update(
                ig_baseline="all gates 0 (every gated head off) -> all gates 1",
                ig_n_steps=n_steps,
                ig_method="gausslegendre",
                ig_logit_all_on=float(torch.cat(f1).mean()),
                ig_logit_all_off=float(torch.cat(f0).mean()),
                ig_max_abs_convergence_delta=float(torch.cat(deltas).abs().max()),
                seconds_ig=time.perf_counter() - t0,
                cpu_seconds_ig=time.process_time() - c0,
            )
        if "ablation" in methods:
            fa = FeatureAblation(forward)
            t0, c0 = time.perf_counter(), time.process_time()
            attrs = []
            mask = torch.arange(nf, device=device)[None]
            for i in range(0, images.shape[0], batch_size):
                x, t = images[i : i + batch_size], targets[i : i + batch_size]
                ones = torch.ones(x.shape[0], nf, device=device)
                a = fa.attribute(
                    ones,
                    baselines=0.0,
                    target=t,
                    additional_forward_args=(x,),
                    feature_mask=mask,
                    perturbations_per_eval=perturbations_per_eval,
                )
                attrs.append(a.detach())
            per_image["ablation"] = torch.cat(attrs)
            info.update(
                ablation_baseline="one head's gate set to 0, all others 1",
                seconds_ablation=time.perf_counter() - t0,
                cpu_seconds_ablation=time.process_time() - c0,
            )

    n = images.shape[0]
    cols: dict[str, object] = {
        "layer": [f[0] for f in gates.features],
        "head": [f[1] for f in gates.features],
    }
    for m in methods:
        a = per_image[m].double().cpu()
        cols[f"importance_{m}"] = a.mean(0).numpy()
        se = a.std(0, unbiased=True) / math.sqrt(n) if n > 1 else torch.full((nf,), math.nan)
        cols[f"importance_{m}_se"] = se.numpy()
    return HeadAttribution(heads=pd.DataFrame(cols), targets=targets.cpu(), info=info)


def ranking_from(heads: pd.DataFrame, column: str) -> list[tuple[int, int]]:
    """Heads ordered by decreasing ``heads[column]`` (ties by layer, head).

    Args:
        heads: a DataFrame with ``layer``, ``head`` and ``column``.

    Returns:
        ``[(layer, head), ...]``, most important first.

    Raises:
        ProbeError: if a column is missing.
    """
    missing = [c for c in ("layer", "head", column) if c not in heads.columns]
    if missing:
        raise ProbeError(f"heads table lacks column(s) {missing}; run attribute_heads first")
    d = heads.sort_values([column, "layer", "head"], ascending=[False, True, True], kind="stable")
    return [(int(a), int(b)) for a, b in zip(d["layer"], d["head"])]


@dataclass
class AblationCheck:
    """Result of :func:`ablation_check`.

    Attributes:
        k: heads ablated per condition.
        top_heads: the ``k`` top-ranked ``(layer, head)`` ablated together.
        target: how the target class was chosen.
        logit: mean target logit of the unmodified model.
        top_drop: mean over images of (target logit unmodified - target logit with the top
            ``k`` heads ablated), logit units.
        random_drops: the same for each random draw of ``k`` heads, ``(n_random,)``.
        top_agreement: fraction of images whose top-1 class is unchanged by the top-``k``
            ablation; ``random_agreement`` per draw.
        accuracy, top_accuracy, random_accuracy: top-1 accuracy against ``labels`` (unmodified,
            top-``k`` ablated, per random draw); ``None`` without labels.
        frac_random_at_least_top: fraction of random draws whose drop is ``>= top_drop``
            (a permutation-style p-value for "the ranking finds heads that matter more than
            chance"; its resolution is ``1 / n_random``).
    """

    k: int
    top_heads: list[tuple[int, int]]
    target: str
    logit: float
    top_drop: float
    random_drops: np.ndarray
    top_agreement: float
    random_agreement: np.ndarray
    accuracy: float | None
    top_accuracy: float | None
    random_accuracy: np.ndarray | None
    random_heads: list[list[tuple[int, int]]]

    @property
    def frac_random_at_least_top(self) -> float:
        return float(np.mean(self.random_drops >= self.top_drop))

    def to_frame(self) -> pd.DataFrame:
        """One row per condition (``top-k``, ``random 0`` ...): ``condition``, ``k``,
        ``logit_drop``, ``top1_agreement`` and, with labels, ``accuracy``."""
        rows = [("top-k", self.top_drop, self.top_agreement, self.top_accuracy)]
        for i, d in enumerate(self.random_drops):
            acc = None if self.random_accuracy is None else float(self.random_accuracy[i])
            rows.append((f"random {i}", float(d), float(self.random_agreement[i]), acc))
        df = pd.DataFrame(rows, columns=["condition", "logit_drop", "top1_agreement", "accuracy"])
        df.insert(1, "k", self.k)
        if self.accuracy is None:
            df = df.drop(columns="accuracy")
        return df

    def summary(self) -> str:
        """One plain-language line for the report."""
        rd = self.random_drops
        s = (
            f"Ablating the {self.k} top-ranked heads lowers the target logit by "
            f"{self.top_drop:.2f} on average (top-1 unchanged on {self.top_agreement:.0%} of "
            f"images); {len(rd)} random sets of {self.k} heads lower it by {rd.mean():.2f} "
            f"(range {rd.min():.2f} to {rd.max():.2f}, top-1 unchanged on "
            f"{self.random_agreement.mean():.0%})"
        )
        if self.accuracy is not None:
            s += (
                f"; accuracy {self.accuracy:.0%} unmodified, {self.top_accuracy:.0%} top-k "
                f"ablated, {float(np.mean(self.random_accuracy)):.0%} random-k ablated"
            )
        return s + "."


def random_head_sets(
    features: Sequence[tuple[int, int]], k: int, n: int, seed: int
) -> list[list[tuple[int, int]]]:
    """``n`` independent draws of ``k`` distinct heads, uniformly without replacement.

    Args:
        features: all ``(layer, head)`` pairs to draw from.
        k: heads per draw.
        n: number of draws.
        seed: seed of :func:`numpy.random.default_rng`.

    Returns:
        ``n`` lists of ``k`` heads, each in the order of ``features``.
    """
    rng = np.random.default_rng(seed)
    return [
        [tuple(features[j]) for j in sorted(rng.choice(len(features), size=k, replace=False))]
        for _ in range(n)
    ]


def ablation_check(
    model: nn.Module,
    images: torch.Tensor,
    ranking: Sequence[tuple[int, int]] | pd.DataFrame,
    k: int,
    n_random: int = 10,
    seed: int = 0,
    targets: torch.Tensor | Sequence[int] | None = None,
    labels: torch.Tensor | Sequence[int] | None = None,
    column: str | None = None,
    layers: Sequence[int] | Mapping[int, str] | None = None,
    batch_size: int = 16,
) -> AblationCheck:
    """Does ablating the top-``k`` heads of a ranking hurt more than ablating ``k`` random heads?

    All ``k`` heads of a condition are ablated together (gate 0, see :class:`HeadGates`).
    Random heads are drawn uniformly without replacement from all heads of the gated layers
    (the top heads included), ``n_random`` independent draws. The logit drop is measured for
    the target class: the unmodified model's prediction, or ``targets`` when given; with
    ``labels``, top-1 accuracy is reported too. Checking on the images the ranking was made
    on gives the ranking an in-sample advantage (for the ablation method, the single-head
    drops on those images); pass other images for an out-of-sample check.

    Args:
        model: classifier with gateable attention (see :func:`gateable_modules`).
        images: float ``(n_images, C, H, W)``.
        ranking: ``[(layer, head), ...]`` most important first, or a heads DataFrame with
            ``column`` (e.g. ``"importance_ig"``), ranked by :func:`ranking_from`.
        k: number of heads to ablate, ``1 <= k <= number of heads``.
        n_random: random draws.
        seed: seed of the random draws.
        targets: optional classes ``(n_images,)`` whose logit is measured.
        labels: optional true classes ``(n_images,)`` for accuracy.
        column: importance column when ``ranking`` is a DataFrame.
        layers: gated layers and their numbering, see :class:`HeadGates` (default all);
            use the same as for the ranking.
        batch_size: images per forward pass.

    Returns:
        :class:`AblationCheck`.

    Raises:
        ProbeError: on bad ``k``, ranking, images, targets, labels or layers.
    """
    if isinstance(ranking, pd.DataFrame):
        if column is None:
            raise ProbeError("pass column= (e.g. 'importance_ig') when ranking is a DataFrame")
        ranking = ranking_from(ranking, column)
    ranking = [(int(a), int(b)) for a, b in ranking]
    _check_images(images)
    device = next(model.parameters()).device
    images = images.to(device)
    with inference_mode_params(model), HeadGates(model, layers, tuple(images.shape[1:])) as gates, torch.no_grad():
        index = {f: j for j, f in enumerate(gates.features)}
        unknown = [f for f in ranking if f not in index]
        if unknown:
            raise ProbeError(f"ranking names heads {unknown[:3]} that the model does not have")
        nf = gates.num_features
        if not 1 <= k <= min(nf, len(ranking)):
            raise ProbeError(f"k must be in 1..{min(nf, len(ranking))}, got {k}")

        def run(heads: Sequence[tuple[int, int]] | None) -> torch.Tensor:
            g = torch.ones(nf, device=device)
            for f in heads or ():
                g[index[f]] = 0.0
            gates.set(g)
            try:
                return _logits(model, images, batch_size)
            finally:
                gates.set(None)

        base = run(None)
        targets, target_desc = _resolve_targets(base, targets)
        truth = None if labels is None else _as_classes(base, labels, "labels")
        pred = base.argmax(-1)

        def measure(heads):
            out = run(heads)
            drop = (base - out).gather(1, targets[:, None])[:, 0].mean()
            agree = (out.argmax(-1) == pred).double().mean()
            acc = None if truth is None else (out.argmax(-1) == truth).double().mean()
            return float(drop), float(agree), None if acc is None else float(acc)

        top = ranking[:k]
        top_drop, top_agree, top_acc = measure(top)
        r_heads, r_drop, r_agree, r_acc = [], [], [], []
        for pick in random_head_sets(gates.features, k, n_random, seed):
            d, a, c = measure(pick)
            r_heads.append(pick)
            r_drop.append(d)
            r_agree.append(a)
            r_acc.append(c)
    acc0 = None if truth is None else float((pred == truth).double().mean())
    return AblationCheck(
        k=k,
        top_heads=top,
        target=target_desc,
        logit=float(base.gather(1, targets[:, None]).mean()),
        top_drop=top_drop,
        random_drops=np.array(r_drop),
        top_agreement=top_agree,
        random_agreement=np.array(r_agree),
        accuracy=acc0,
        top_accuracy=top_acc,
        random_accuracy=None if truth is None else np.array(r_acc),
        random_heads=r_heads,
    )


_WNID = re.compile(r"^(n\d{8})_")


def imagenet_labels(paths: Sequence[str | Path]) -> torch.Tensor:
    """ImageNet-1k class indices from file names ``<wnid>_<class name>.JPEG``.

    The index of a WordNet id is its position among the 1000 ImageNet-1k wnids sorted
    (the standard class order), read from :class:`timm.data.ImageNetInfo`.

    Returns:
        long tensor ``(len(paths),)``.

    Raises:
        ProbeError: if a name does not start with an ImageNet-1k wnid.
    """
    from timm.data import ImageNetInfo

    order = {w: i for i, w in enumerate(sorted(ImageNetInfo().label_names()))}
    out = []
    for p in paths:
        name = Path(p).name
        m = _WNID.match(name)
        if m is None or m.group(1) not in order:
            raise ProbeError(
                f"cannot read an ImageNet-1k class from file name {name!r}; expected "
                "'<wnid>_<class>.JPEG' (e.g. n01440764_tench.JPEG) or pass labels explicitly"
            )
        out.append(order[m.group(1)])
    return torch.tensor(out, dtype=torch.long)


def imagenet_labels_or_none(names: Sequence[str | Path], num_classes: int) -> torch.Tensor | None:
    """:func:`imagenet_labels` when every name carries an ImageNet-1k wnid and the model has
    1000 classes, else ``None`` (no accuracy is reported then)."""
    if num_classes != 1000 or not names:
        return None
    try:
        return imagenet_labels(names)
    except ProbeError:
        return None


def default_k(num_heads: int) -> int:
    """Heads ablated together in the check: a sixth of the gated heads, at least 1
    (6 of DeiT-Tiny's 36)."""
    return max(1, round(num_heads / 6))


def add_head_attribution(
    result,
    model: nn.Module,
    images: torch.Tensor,
    methods: Sequence[str] = ("ig",),
    targets: torch.Tensor | Sequence[int] | None = None,
    labels: torch.Tensor | Sequence[int] | None = None,
    k: int | None = None,
    n_random: int = 10,
    seed: int = 0,
    ci: str = "fisher",
    **attribute_kw,
) -> None:
    """Head attribution step of the pipeline: importance columns, correlation, ablation check.

    Args:
        result: a :class:`probe.result.AnalysisResult`; its ``meta["layer_names"]``
            (``{layer: module name}``) selects and numbers the gated layers, so the new
            columns join the heads table on ``(layer, head)``.
        model: the analysed model (eval mode; parameters are not changed).
        images: float ``(n, C, H, W)``, the analysed images (or the first ``n`` of them),
            transformed for the model.
        methods: ``"ig"`` and/or ``"ablation"`` (see :func:`attribute_heads`).
        targets: classes whose logit is attributed (default the predicted class).
        labels: true classes, for the accuracy of the ablation check (e.g. from
            :func:`imagenet_labels_or_none`).
        k: heads ablated together in the check (default :func:`default_k`).
        n_random: random draws of ``k`` heads in the check.
        seed: seed of the random draws.
        ci: confidence interval of the correlations (see
            :func:`probe.analyses.function_geometry.spearman_ci`).
        **attribute_kw: passed to :func:`attribute_heads` (``n_steps``, ``batch_size``, ...).

    Adds ``importance_<m>`` and ``importance_<m>_se`` to ``result.heads`` and
    ``result.extras["attribution"]``: a dict with ``info`` (targets, baseline, timings; see
    :class:`HeadAttribution`), ``correlation`` (:func:`importance_geometry_correlation`
    output or ``None`` without geometry columns), ``reading`` (sentences), ``checks``
    (``{method: AblationCheck}``, run on the same images as the attribution: in-sample),
    ``k``. Also ``result.meta["attribution"]`` (methods, images, seconds).

    Raises:
        ProbeError: as :func:`attribute_heads` (e.g. a model family without a head gate).
    """
    from .analyses.function_geometry import importance_geometry_correlation, reading

    layer_names = result.meta.get("layer_names") or None
    t0 = time.perf_counter()
    att = attribute_heads(model, images, methods=methods, targets=targets, layers=layer_names,
                          **attribute_kw)
    heads = result.heads.drop(columns=[c for c in att.heads.columns
                                       if c.startswith("importance_") and c in result.heads])
    result.heads = heads.merge(att.heads, on=["layer", "head"], how="left")
    imp_cols = [f"importance_{m}" for m in methods]
    try:
        corr = importance_geometry_correlation(result.heads, importance=imp_cols, ci=ci, seed=seed)
    except ProbeError:
        corr = None
    k = default_k(len(att.heads)) if k is None else k
    checks = {}
    t1 = time.perf_counter()
    for m in methods:
        checks[m] = ablation_check(
            model, images, att.heads, k=k, column=f"importance_{m}", n_random=n_random,
            seed=seed, targets=targets, labels=labels, layers=layer_names,
        )
    att.info["seconds_check"] = time.perf_counter() - t1
    result.extras["attribution"] = {
        "info": att.info,
        "correlation": corr,
        "reading": reading(corr) if corr is not None else [],
        "checks": checks,
        "k": k,
        "in_sample": True,
    }
    result.meta["attribution"] = {
        "methods": list(methods),
        "num_images": int(images.shape[0]),
        "seconds": time.perf_counter() - t0,
    }
