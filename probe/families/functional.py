"""Fallback capture for user modules that compute attention with plain function calls.

Used **only** for a model in which no capture rule recognises any module (no timm attention, no
``nn.MultiheadAttention``, no registered rule). It watches the torch function calls of one forward
pass through a :class:`torch.overrides.TorchFunctionMode` and treats as attention layers:

* every call of ``torch.nn.functional.scaled_dot_product_attention`` with 4-D ``(batch, heads,
  tokens, head_dim)`` query and key of the same length. Fused SDPA never materialises the
  probabilities, so a captured call is replaced by its definition
  ``P = softmax(q k^T * scale + mask)`` (``scale`` defaults to ``1/sqrt(head_dim)``; a boolean
  mask keeps the ``True`` positions; ``is_causal`` keeps keys ``<=`` the query; grouped-query
  keys and values are repeated per head), ``P`` is captured and ``P @ v`` returned (dropout with
  ``dropout_p`` is applied to ``P`` for the output only, as SDPA does). Calls of layers that are
  not selected run the library kernel unchanged.
* every softmax (``torch.softmax``, ``Tensor.softmax``, ``F.softmax``, ``nn.Softmax``,
  ``torch.special.softmax``) over the last axis whose output is 4-D with square last axes,
  ``(batch, heads, T, T)``, i.e. hand-written ``softmax(q @ k.transpose(-2, -1) * scale)``. Its
  output is captured as it is; the computation is not changed.
* every such softmax over 3-D scores: ``(batch·heads, T, T)`` (flattened batch-major from
  ``(batch, heads, T, T)``; captured as that view), and runs of single-head ``(batch, T, T)``
  softmaxes made by the elements ``0 .. n-1`` of one ``nn.ModuleList`` — separate per-head
  modules concatenated by their parent — grouped into one layer of ``n`` heads in list order.

Head gates (:mod:`probe.attribution`) act in the same watched forward pass: SDPA's per-head output
``(B, H, T, D)`` or a softmax's probabilities are multiplied by the gate of their head.

Layers are these calls in the order of one forward pass, numbered from 0; they are found by a
forward pass on a zero image of the model's input size, and each is named after the innermost
module that made the call (``blocks.3.attn:sdpa``). The model must make the same calls in the
same order for every input (true of ordinary ViTs). Not recognised: attention inside another
library function (e.g. a direct call of ``F.multi_head_attention_forward``), 3-D scores
flattened head-major (read as batch-major), and cross-attention (queries and keys of different
length).
For those, register a capture rule (:mod:`probe.capture`).
"""

from __future__ import annotations

import math
import weakref
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..capture import CaptureRule, Emit, Restore, override_attribute, register_fallback
from ..errors import ProbeError

_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SOFTMAX_NAMES = {"softmax", "special_softmax"}


def explicit_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``F.scaled_dot_product_attention`` computed by its definition, with the probabilities.

    Args:
        query: ``(..., L, E)``; key ``(..., S, E)``; value ``(..., S, Ev)``.
        attn_mask: boolean (``True`` = attend) or additive float mask broadcastable to
            ``(..., L, S)``.
        dropout_p: dropout on the probabilities for the output (not on the returned probabilities).
        is_causal: mask keys after the query (top-left aligned, as SDPA).
        scale: score scale; default ``1 / sqrt(E)``.
        enable_gqa: repeat key/value heads to the query's head count.

    Returns:
        ``(output (..., L, Ev), probabilities (..., L, S) in float32 or wider)``; probabilities are
        ``softmax(q k^T * scale + mask)`` (Vaswani et al. 2017, Eq. 1).
    """
    if enable_gqa and key.dim() >= 3 and key.shape[-3] != query.shape[-3]:
        rep = query.shape[-3] // key.shape[-3]
        key = key.repeat_interleave(rep, dim=-3)
        value = value.repeat_interleave(rep, dim=-3)
    s = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    work = torch.promote_types(query.dtype, torch.float32)
    scores = (query.to(work) @ key.to(work).transpose(-2, -1)) * s
    n_q, n_k = query.shape[-2], key.shape[-2]
    if is_causal:
        keep = torch.ones(n_q, n_k, dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.to(work)
    probs = scores.softmax(dim=-1)
    used = F.dropout(probs, p=dropout_p, training=True) if dropout_p > 0 else probs
    out = (used @ value.to(work)).to(value.dtype)
    return out, probs


def _softmax_kind(args: tuple, kwargs: dict, out: Any) -> str | None:
    """``"softmax"`` for a softmax over the last axis of ``(batch, heads, T, T)`` scores,
    ``"softmax3d"`` for one over ``(batch·heads, T, T)`` or a single head's ``(batch, T, T)``."""
    if not isinstance(out, torch.Tensor) or not out.is_floating_point() or out.dim() not in (3, 4):
        return None
    if out.shape[-1] != out.shape[-2]:
        return None
    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    if not isinstance(dim, int) or dim not in (-1, out.dim() - 1):
        return None
    return "softmax" if out.dim() == 4 else "softmax3d"


class _Site:
    """What to do at one attention call of a forward pass: deliver the probabilities of a
    layer (``emit``) and/or gate its heads (``get_gate``).

    Attributes:
        layout: ``"4d"`` (``(B, H, T, T)`` probabilities or SDPA output ``(B, H, T, D)``),
            ``"fused3d"`` (``(B·H, T, T)``, batch-major), ``"head"`` (head ``position`` of a
            layer of separate per-head modules, ``(B, T, T)``).
    """

    def __init__(self, layer: "FunctionalCallRule", position: int, emit: Emit | None,
                 get_gate: Callable[[], torch.Tensor | None] | None, buffers: dict):
        self.layer, self.position, self.emit, self.get_gate = layer, position, emit, get_gate
        self.buffers = buffers  # per forward pass: heads collected so far, per layer

    @property
    def where(self) -> str:
        return f"{self.layer.name} gate"

    def gate(self) -> torch.Tensor | None:
        return None if self.get_gate is None else self.get_gate()

    def deliver(self, probs: torch.Tensor) -> None:
        """Emit the probabilities of this call (a per-head call: once the layer's last head ran)."""
        if self.emit is None:
            return
        heads, layout = self.layer.heads, self.layer.layout
        if layout == "4d":
            self.emit(probs)
        elif layout == "fused3d":
            self.emit(probs.view(probs.shape[0] // heads, heads, *probs.shape[1:]))
        else:
            got = self.buffers.setdefault(id(self.layer), {})
            got[self.position] = probs
            if len(got) == heads:
                self.emit(torch.stack([got[h] for h in range(heads)], dim=1))
                got.clear()

    def gated(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (probabilities, or SDPA's per-head output) with head ``h`` multiplied by its gate."""
        gate = self.gate()
        if gate is None:
            return t
        from .gating import scale_heads

        heads, layout = self.layer.heads, self.layer.layout
        if layout == "4d":
            return scale_heads(t, gate, heads, self.where)
        if layout == "fused3d":
            t4 = t.view(t.shape[0] // heads, heads, *t.shape[1:])
            return scale_heads(t4, gate, heads, self.where).view(t.shape)
        if gate.dim() != 2 or gate.shape[1] != heads:
            raise ProbeError(f"{self.where}: gate of shape {tuple(gate.shape)} does not fit {heads} heads")
        col = gate[:, self.position: self.position + 1]
        return scale_heads(t.unsqueeze(1), col, 1, self.where).squeeze(1)


class _AttentionCallMode(TorchFunctionMode):
    """Counts attention calls in a forward pass; delivers and gates the selected ones.

    Args:
        sites: ``{call index: _Site}``; ``None`` = discovery: every call is reported to
            ``report(kind, probs)`` (probabilities computed for SDPA calls).
    """

    def __init__(self, sites: dict[int, _Site] | None,
                 report: Callable[[str, torch.Tensor], None] | None = None):
        super().__init__()
        self.sites = sites
        self.report = report
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            bound = dict(zip(_SDPA_ARGS, args))
            bound.update(kwargs)
            q, k = bound.get("query"), bound.get("key")
            if isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and q.dim() == 4 \
                    and k.dim() == 4 and q.shape[-2] == k.shape[-2]:
                index = self.count
                self.count += 1
                if self.sites is None:
                    out, probs = explicit_sdpa(**bound)
                    if self.report is not None:
                        self.report("sdpa", probs)
                    return out
                site = self.sites.get(index)
                if site is not None:
                    if site.emit is not None:
                        out, probs = explicit_sdpa(**bound)
                        site.deliver(probs)
                    else:  # gate only: the library kernel, its per-head output scaled
                        out = func(*args, **kwargs)
                    return site.gated(out)
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        if getattr(func, "__name__", "") in _SOFTMAX_NAMES:
            kind = _softmax_kind(args, kwargs, out)
            if kind is not None:
                index = self.count
                self.count += 1
                if self.sites is None:
                    if self.report is not None:
                        self.report(kind, out)
                    return out
                site = self.sites.get(index)
                if site is not None:
                    site.deliver(out)
                    out = site.gated(out)
        return out


class _Controller:
    """One per model: wraps the model's ``forward`` in the call-watching mode while any layer
    of that model is captured or gated."""

    def __init__(self, root: nn.Module):
        self.root = root
        self.emits: dict[int, tuple["FunctionalCallRule", Emit]] = {}
        self.gates: dict[int, tuple["FunctionalCallRule", Callable[[], torch.Tensor | None]]] = {}
        self._restore: Restore | None = None

    def add(self, rule: "FunctionalCallRule", emit: Emit | None = None,
            get_gate: Callable[[], torch.Tensor | None] | None = None) -> Restore:
        if self._restore is None:
            self._wrap()
        if emit is not None:
            self.emits[id(rule)] = (rule, emit)
        if get_gate is not None:
            self.gates[id(rule)] = (rule, get_gate)

        def remove() -> None:
            if emit is not None:
                self.emits.pop(id(rule), None)
            if get_gate is not None:
                self.gates.pop(id(rule), None)
            if not self.emits and not self.gates and self._restore is not None:
                self._restore()
                self._restore = None

        return remove

    def sites(self) -> dict[int, _Site]:
        buffers: dict = {}
        out: dict[int, _Site] = {}
        rules = {k: r for k, (r, _) in self.emits.items()} | {k: r for k, (r, _) in self.gates.items()}
        for key, rule in rules.items():
            emit = self.emits.get(key, (None, None))[1]
            gate = self.gates.get(key, (None, None))[1]
            for position, call in enumerate(rule.calls):
                out[call] = _Site(rule, position, emit, gate, buffers)
        return out

    def _wrap(self) -> None:
        root = self.root
        inner = root.forward
        controller = self

        def forward(*args: Any, **kwargs: Any):
            with _AttentionCallMode(controller.sites()):
                return inner(*args, **kwargs)

        self._restore = override_attribute(root, "forward", forward)


_CONTROLLERS: "weakref.WeakKeyDictionary[nn.Module, _Controller]" = weakref.WeakKeyDictionary()

_KIND_LABEL = {
    "sdpa": "F.scaled_dot_product_attention",
    "softmax": "softmax",
    "softmax3d": "softmax over (batch·heads, T, T)",
    "heads": "separate per-head modules",
}


class FunctionalCallRule(CaptureRule):
    """One attention layer of ``root`` found by its function calls in a forward pass.

    Instances are made by :func:`find_call_sites` for one model; they never match a module.

    Args:
        root: the model whose ``forward`` is watched.
        calls: the layer's attention-call indices in a forward pass (one, or one per head for
            separate per-head modules, in head order).
        kind: ``"sdpa"``, ``"softmax"`` (4-D scores), ``"softmax3d"`` (3-D ``(batch·heads, T,
            T)`` scores) or ``"heads"`` (per-head modules).
        heads: the layer's head count.
    """

    name = "functional-fallback"

    def __init__(self, root: nn.Module, calls: int | list[int], kind: str, heads: int = 1):
        self.root = root
        self.calls = [calls] if isinstance(calls, int) else list(calls)
        self.index = self.calls[0]
        self.kind = kind
        self.heads = int(heads)
        self.layout = "head" if kind == "heads" else "fused3d" if kind == "softmax3d" else "4d"
        self.name = f"functional-fallback ({_KIND_LABEL[kind]})"

    def matches(self, module: nn.Module) -> bool:
        return False

    def num_heads(self, module: nn.Module) -> int | None:
        return self.heads

    def _controller(self) -> _Controller:
        ctl = _CONTROLLERS.get(self.root)
        if ctl is None:
            ctl = _CONTROLLERS[self.root] = _Controller(self.root)
        return ctl

    def install(self, module: nn.Module, emit: Emit) -> Restore:
        return self._controller().add(self, emit=emit)

    def install_gate(self, module: nn.Module, num_heads: int, get_gate) -> Restore:
        """Scale head ``h`` of the probabilities (softmax calls) or of SDPA's per-head output
        ``(B, H, T, D)`` by its gate, inside the watched forward pass; ungated SDPA calls keep
        the library kernel, so all gates at 1 leave the output bit-identical."""
        return self._controller().add(self, get_gate=get_gate)


def _module_list_member(qname: str, modules: dict[str, nn.Module]) -> tuple[str, int] | None:
    """``(ModuleList name, element index)`` of the innermost ``ModuleList`` element that
    ``qname`` is (or is inside), if any."""
    parts = qname.split(".") if qname else []
    for j in range(len(parts) - 1, 0, -1):
        parent = ".".join(parts[:j])
        if parts[j].isdigit() and isinstance(modules.get(parent), nn.ModuleList):
            return parent, int(parts[j])
    return None


def find_call_sites(model: nn.Module, input_shape: tuple[int, int, int]) -> list[tuple[str, nn.Module, CaptureRule]]:
    """Attention layers of one forward pass of ``model`` on a zero image ``(1, *input_shape)``.

    Calls become layers in call order: each SDPA call and each softmax over ``(1, H, T, T)``
    is one layer with ``H`` heads; a softmax over 3-D ``(H, T, T)`` scores with ``H > 1`` is one
    layer whose scores were flattened batch-major from ``(batch, H, T, T)``; a run of
    single-head softmax calls ``(1, T, T)`` made by the consecutive elements ``0 .. n-1`` of one
    ``nn.ModuleList`` (separate per-head modules, concatenated by their parent) is one layer of
    ``n`` heads in element order, named after the parent (``blocks.0.attn:heads``); any other
    single-head ``(1, T, T)`` softmax is a layer of 1 head.

    Returns:
        ``[(name, innermost module, rule), ...]`` in call order; empty if there is none.

    Raises:
        ProbeError: if the forward pass fails (naming ``--input-size``).
    """
    stack: list[tuple[str, nn.Module]] = []
    sites: list[tuple[str, nn.Module, str, int]] = []
    handles = []

    def enter(qname: str):
        def hook(mod: nn.Module, args: tuple) -> None:
            stack.append((qname, mod))
        return hook

    def leave(mod: nn.Module, args: tuple, out: Any) -> None:
        if stack:
            stack.pop()

    for qname, mod in model.named_modules():
        handles.append(mod.register_forward_pre_hook(enter(qname)))
        handles.append(mod.register_forward_hook(leave))

    def report(kind: str, probs: torch.Tensor) -> None:
        qname, mod = stack[-1] if stack else ("", model)
        heads = int(probs.shape[1]) if probs.dim() == 4 else int(probs.shape[0])
        sites.append((qname, mod, kind, heads))

    p = next(model.parameters(), None)
    x = torch.zeros(1, *input_shape, device=p.device if p is not None else "cpu")
    try:
        with torch.no_grad(), _AttentionCallMode(None, report):
            model(x)
    except ProbeError:
        raise
    except Exception as e:
        text = " ".join(str(e).split())[:160] or type(e).__name__
        raise ProbeError(
            f"{type(model).__name__}: the forward pass on a zero image of shape "
            f"(1, {', '.join(map(str, input_shape))}) failed ({text}); set --input-size C,H,W "
            "(and --mean/--std) to the input the model expects, or give the model a timm-style "
            "pretrained_cfg"
        ) from None
    finally:
        for h in handles:
            h.remove()
    modules = dict(model.named_modules())
    layers: list[tuple[str, nn.Module, str, list[int], int]] = []  # name, module, kind, calls, heads
    i = 0
    while i < len(sites):
        qname, mod, kind, heads = sites[i]
        member = _module_list_member(qname, modules) if kind == "softmax3d" and heads == 1 else None
        if member is not None:
            parent, first = member
            size = len(modules[parent])
            run = [i]
            while (len(run) < size and i + len(run) < len(sites)
                   and sites[i + len(run)][2] == "softmax3d" and sites[i + len(run)][3] == 1
                   and _module_list_member(sites[i + len(run)][0], modules) == (parent, first + len(run))):
                run.append(i + len(run))
            if first == 0 and len(run) == size and size > 1:
                owner = parent.rpartition(".")[0]
                layers.append((owner, modules.get(owner, model), "heads", run, size))
                i += size
                continue
        layers.append((qname, mod, kind, [i], heads))
        i += 1
    out = []
    seen: dict[tuple[str, str], int] = {}
    for qname, mod, kind, calls, heads in layers:
        label = "heads" if kind == "heads" else "softmax" if kind == "softmax3d" else kind
        base = f"{qname or '<model>'}:{label}"
        j = seen.get((qname, label), 0)
        seen[(qname, label)] = j + 1
        out.append((base if j == 0 else f"{base}#{j}", mod, FunctionalCallRule(model, calls, kind, heads)))
    return out


find_call_sites.label = (  # type: ignore[attr-defined]
    "functional fallback (F.scaled_dot_product_attention calls, softmax over (batch, heads, T, T), "
    "(batch·heads, T, T) or per-head modules' (batch, T, T))"
)
register_fallback(find_call_sites)
