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

Layers are these calls in the order of one forward pass, numbered from 0; they are found by a
forward pass on a zero image of the model's input size, and each is named after the innermost
module that made the call (``blocks.3.attn:sdpa``). The model must make the same calls in the
same order for every input (true of ordinary ViTs). Not recognised: attention inside another
library function (e.g. a direct call of ``F.multi_head_attention_forward``), softmax over
``(batch * heads, T, T)`` 3-D scores, and cross-attention (queries and keys of different length).
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

from ..capture import CaptureRule, Emit, Restore, register_fallback
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


def _softmax_over_last(args: tuple, kwargs: dict, out: Any) -> bool:
    if not isinstance(out, torch.Tensor) or out.dim() != 4 or out.shape[-1] != out.shape[-2]:
        return False
    if not out.is_floating_point():
        return False
    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    return isinstance(dim, int) and dim in (-1, 3)


class _AttentionCallMode(TorchFunctionMode):
    """Counts attention calls in a forward pass; emits (and for SDPA, computes) selected ones.

    Args:
        selected: ``{call index: callback(kind, probs)}``; ``None`` = every call is reported
            (discovery), with the probabilities computed for SDPA calls.
    """

    def __init__(self, selected: dict[int, Callable[[str, torch.Tensor], None]] | None,
                 report: Callable[[str, torch.Tensor], None] | None = None):
        super().__init__()
        self.selected = selected
        self.report = report
        self.count = 0

    def _target(self, index: int) -> Callable[[str, torch.Tensor], None] | None:
        if self.selected is None:
            return self.report
        return self.selected.get(index)

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
                target = self._target(index)
                if target is not None:
                    out, probs = explicit_sdpa(**bound)
                    target("sdpa", probs)
                    return out
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        if getattr(func, "__name__", "") in _SOFTMAX_NAMES and _softmax_over_last(args, kwargs, out):
            index = self.count
            self.count += 1
            target = self._target(index)
            if target is not None:
                target("softmax", out)
        return out


class _Controller:
    """One per model: wraps the model's ``forward`` in the call-watching mode while any call
    site of that model is installed."""

    def __init__(self, root: nn.Module):
        self.root = root
        self.emits: dict[int, Emit] = {}
        self._restore: Restore | None = None

    def add(self, index: int, emit: Emit) -> None:
        if not self.emits:
            self._wrap()
        self.emits[index] = emit

    def remove(self, index: int) -> None:
        self.emits.pop(index, None)
        if not self.emits and self._restore is not None:
            self._restore()
            self._restore = None

    def _wrap(self) -> None:
        root = self.root
        had = "forward" in vars(root)
        old = vars(root).get("forward")
        inner = root.forward
        controller = self

        def forward(*args: Any, **kwargs: Any):
            selected = {i: (lambda kind, probs, e=e: e(probs)) for i, e in controller.emits.items()}
            with _AttentionCallMode(selected):
                return inner(*args, **kwargs)

        root.forward = forward

        def restore() -> None:
            if had:
                root.forward = old
            else:
                del root.forward

        self._restore = restore


_CONTROLLERS: "weakref.WeakKeyDictionary[nn.Module, _Controller]" = weakref.WeakKeyDictionary()


class FunctionalCallRule(CaptureRule):
    """The ``index``-th attention call (SDPA or softmax) of a forward pass of ``root``.

    Instances are made by :func:`find_call_sites` for one model; they never match a module.
    """

    name = "functional-fallback"

    def __init__(self, root: nn.Module, index: int, kind: str):
        self.root = root
        self.index = index
        self.kind = kind
        self.name = f"functional-fallback ({'F.scaled_dot_product_attention' if kind == 'sdpa' else 'softmax'})"

    def matches(self, module: nn.Module) -> bool:
        return False

    def install(self, module: nn.Module, emit: Emit) -> Restore:
        ctl = _CONTROLLERS.get(self.root)
        if ctl is None:
            ctl = _CONTROLLERS[self.root] = _Controller(self.root)
        ctl.add(self.index, emit)
        return lambda: ctl.remove(self.index)


def find_call_sites(model: nn.Module, input_shape: tuple[int, int, int]) -> list[tuple[str, nn.Module, CaptureRule]]:
    """Attention calls of one forward pass of ``model`` on a zero image ``(1, *input_shape)``.

    Returns:
        ``[(name, innermost module, rule), ...]`` in call order; empty if there is none.

    Raises:
        ProbeError: if the forward pass fails (naming ``--input-size``).
    """
    stack: list[tuple[str, nn.Module]] = []
    sites: list[tuple[str, nn.Module, str]] = []
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
        sites.append((qname, mod, kind))

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
    out = []
    seen: dict[tuple[str, str], int] = {}
    for i, (qname, mod, kind) in enumerate(sites):
        base = f"{qname or '<model>'}:{kind}"
        j = seen.get((qname, kind), 0)
        seen[(qname, kind)] = j + 1
        out.append((base if j == 0 else f"{base}#{j}", mod, FunctionalCallRule(model, i, kind)))
    return out


find_call_sites.label = (  # type: ignore[attr-defined]
    "functional fallback (F.scaled_dot_product_attention calls, softmax over (batch, heads, T, T))"
)
register_fallback(find_call_sites)
