"""Attention rollout and gradient-weighted relevance: per-image maps of where the model's output
draws its information from on the patch grid.

Both propagate a token-to-token matrix ``R`` through the analysed layers ``1..L`` (in model
order), starting from the identity over the first layer's tokens; ``R[i, j]`` is how much
output token ``i`` of the last layer draws on input token ``j`` of the first layer.

* **Attention rollout** (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers",
  ACL, Sec. 3): per layer ``Ã = 0.5 · mean_heads(A) + 0.5 · I`` (the residual connection), rows
  renormalised to sum to one, and ``R = Ã_L · ... · Ã_1``.
* **Gradient-weighted relevance** (Chefer, Gur & Wolf 2021, "Transformer Interpretability
  Beyond Attention Visualization", CVPR, and its generic form in Chefer et al. 2021, "Generic
  Attention-model Explainability", ICCV, rules 5-6; hila-chefer/Transformer-MM-Explainability's
  ``avg_heads`` / ``apply_self_attention_rules``): ``R = I`` and per layer
  ``Ā = mean_heads((∇A ⊙ A)^+)``, ``R = R + Ā · R``, with ``∇A`` the gradient of the target
  class's logit (pre-softmax; default the predicted class) with respect to the layer's attention
  probabilities. This is the gradient-times-attention rule; the CVPR paper's full variant weights
  the LRP relevance of ``A`` instead of ``A`` itself, which needs LRP rules for every layer type
  and is not implemented.

**The map** is one row of ``R`` restricted to the first layer's patch tokens, as a
``(rows, cols)`` array on its patch grid: the class-token row (token 0, the timm and Hugging Face
convention) for models with prefix tokens, else (``query="patches"``, automatic for Swin and other
models without a class token) the mean over the last layer's patch-token rows. **Prefix tokens**
(class, distillation, registers) are kept in the propagation as tokens like any other; their
columns are left out of the map and their total is reported as ``prefix_mass`` (for rollout,
``map.sum() + prefix_mass = 1`` per image when no layer adds tokens).

**Layers whose token layout changes** are joined by a fixed transition matrix ``M`` (rows: tokens
of the next layer, columns: tokens of this one; :func:`token_transition`): identity when the
geometry is the same; a coarser patch grid whose cells are integer blocks of the finer one (Swin's
patch merging, 2x2 tokens -> 1) takes the mean of the block (each fine token contributes
equally to the merged one); prefix tokens that appear where there were none (ConViT's class token,
concatenated after the gated positional layers) get a zero row: they carry no image information.
Swin's window attention comes from its capture rule already mapped to image positions, so rollout
works for Swin (v1, v2). Relevance needs gradients with respect to the attention the model uses:
families whose capture rule emits a derived copy (Swin's dense window maps, torch
``nn.MultiheadAttention``'s reshaped weights, CaiT's permuted talking-heads input) are refused
with a :class:`~probe.errors.ProbeError`.

Tensor-only functions: :func:`token_transition`, :func:`rollout_matrix`,
:func:`relevance_matrix`, :func:`query_map`. The model-side adapter :func:`compute_rollout` runs the
model on the first N images through :class:`~probe.capture.AttentionCapture` and returns
:class:`RolloutMaps` (``(images, rows, cols)`` arrays, written by :meth:`RolloutMaps.save_npz`).
Memory: rollout folds each layer into ``R`` as soon as its attention arrives (one ``(T, T)``
matrix per image of the batch); relevance keeps the batch's attention until the backward pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..errors import ProbeError
from ..geometry import TokenGeometry

METHODS = ("rollout", "relevance")
QUERIES = ("auto", "class", "patches")


# ----------------------------------------------------------------------------- tensor-only part


def token_transition(src: TokenGeometry, dst: TokenGeometry) -> torch.Tensor:
    """Matrix carrying token flow from one layer's tokens to the next layer's tokens.

    Args:
        src: geometry of the earlier layer; dst: geometry of the next analysed layer.

    Returns:
        float64 ``(dst.num_tokens, src.num_tokens)``: identity on the prefix tokens both have and
        on equal patch grids; for a coarser ``dst`` grid whose cells are ``fr x fc`` blocks of
        the ``src`` grid, ``1 / (fr fc)`` from each fine token to the coarse token covering it;
        zero rows for prefix tokens that appear (``src`` without prefix tokens).

    Raises:
        ProbeError: if the prefix tokens decrease or change in number between two layers that
            both have them, or the ``dst`` grid is not an integer coarsening of the ``src`` grid.
    """
    ns, nd = src.num_prefix_tokens, dst.num_prefix_tokens
    if nd != ns and ns != 0:
        raise ProbeError(
            f"token layout changes from {ns} to {nd} prefix tokens between layers; rollout can only "
            "join layers with the same prefix tokens or add them after layers without any (ConViT); "
            "analyse a range of layers with one layout (--layers)"
        )
    (rs, cs), (rd, cd) = src.grid, dst.grid
    if rs % rd or cs % cd:
        raise ProbeError(
            f"patch grid changes from {rs}x{cs} to {rd}x{cd}, which is not a merge of integer blocks; "
            "rollout cannot map the tokens; analyse a range of layers with one grid (--layers)"
        )
    fr, fc = rs // rd, cs // cd
    m = torch.zeros(dst.num_tokens, src.num_tokens, dtype=torch.float64)
    for i in range(min(ns, nd)):
        m[i, i] = 1.0
    fine = torch.arange(src.num_patches)
    coarse = (fine // cs // fr) * cd + (fine % cs) // fc
    m[nd + coarse, ns + fine] = 1.0 / (fr * fc)
    return m


def _check_attn(attn: torch.Tensor, geometry: TokenGeometry, where: str) -> None:
    if not isinstance(attn, torch.Tensor) or attn.dim() != 4 or attn.shape[-1] != attn.shape[-2]:
        shape = tuple(attn.shape) if isinstance(attn, torch.Tensor) else type(attn).__name__
        raise ProbeError(f"{where}: expected attention probabilities (batch, heads, tokens, tokens), got {shape}")
    geometry.check_tokens(attn.shape[-1], where=where)


def _check_sequence(attns: Sequence[torch.Tensor], geometries: Sequence[TokenGeometry]) -> None:
    if len(attns) == 0 or len(attns) != len(geometries):
        raise ProbeError(f"need one geometry per attention tensor and at least one layer, got "
                         f"{len(attns)} tensors and {len(geometries)} geometries")
    b = attns[0].shape[0] if isinstance(attns[0], torch.Tensor) else None
    for i, (a, g) in enumerate(zip(attns, geometries)):
        _check_attn(a, g, f"layer {i} of the rollout")
        if a.shape[0] != b:
            raise ProbeError(f"layer {i} of the rollout has {a.shape[0]} images, layer 0 has {b}")


class _Propagator:
    """``R`` of a batch, folded layer by layer (the shared loop of rollout and relevance)."""

    def __init__(self, method: str) -> None:
        self.method = method
        self.r: torch.Tensor | None = None
        self.geometry: TokenGeometry | None = None
        self.first: TokenGeometry | None = None

    def add(self, attn: torch.Tensor, geometry: TokenGeometry, grad: torch.Tensor | None = None,
            residual: float = 0.5) -> None:
        work = torch.promote_types(attn.dtype, torch.float32)
        a = attn.detach().to(work)
        b, _, t, _ = a.shape
        if self.r is None:
            self.first = geometry
            self.r = torch.eye(t, dtype=work, device=a.device).expand(b, t, t).clone()
        elif geometry != self.geometry:
            m = token_transition(self.geometry, geometry).to(a.device, work)
            self.r = m @ self.r
        eye = torch.eye(t, dtype=work, device=a.device)
        if self.method == "rollout":
            step = residual * eye + (1 - residual) * a.mean(1)
            step = step / step.sum(-1, keepdim=True).clamp_min(torch.finfo(work).tiny)
            self.r = step @ self.r
        else:
            cam = (grad.detach().to(work) * a).clamp_min(0).mean(1)
            self.r = self.r + cam @ self.r
        self.geometry = geometry


def rollout_matrix(attns: Sequence[torch.Tensor], geometries: Sequence[TokenGeometry],
                   residual: float = 0.5) -> torch.Tensor:
    """Attention rollout ``R = Ã_L · M · ... · Ã_1`` (Abnar & Zuidema 2020).

    Args:
        attns: per analysed layer (model order) attention probabilities ``(batch, heads, T_l, T_l)``.
        geometries: the token geometry of each layer.
        residual: weight of the identity in ``Ã = residual · I + (1 - residual) · mean_heads(A)``
            (0.5 in Abnar & Zuidema); rows are renormalised afterwards.

    Returns:
        ``(batch, T_last, T_first)`` in float32 or wider.

    Raises:
        ProbeError: on mismatched shapes or geometries, a ``residual`` outside ``[0, 1)``, or a
            layout change :func:`token_transition` refuses.
    """
    if not 0 <= residual < 1:
        raise ProbeError(f"residual must lie in [0, 1), got {residual}")
    _check_sequence(attns, geometries)
    prop = _Propagator("rollout")
    for a, g in zip(attns, geometries):
        prop.add(a, g, residual=residual)
    return prop.r


def relevance_matrix(attns: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                     geometries: Sequence[TokenGeometry]) -> torch.Tensor:
    """Gradient-weighted relevance ``R <- R + mean_heads((∇A ⊙ A)^+) · R`` from ``R = I``
    (Chefer et al. 2021, rules 5-6).

    Args:
        attns: per layer (model order) attention probabilities ``(batch, heads, T_l, T_l)``.
        grads: gradients of the explained score with respect to each ``attns[l]``, same shapes.
        geometries: the token geometry of each layer.

    Returns:
        ``(batch, T_last, T_first)`` in float32 or wider.

    Raises:
        ProbeError: on mismatched shapes or a layout change :func:`token_transition` refuses.
    """
    _check_sequence(attns, geometries)
    if len(grads) != len(attns) or any(g is None or g.shape != a.shape for g, a in zip(grads, attns)):
        raise ProbeError("need one gradient per attention tensor, of the same shape")
    prop = _Propagator("relevance")
    for a, gr, g in zip(attns, grads, geometries):
        prop.add(a, g, grad=gr)
    return prop.r


def resolve_query(query: str, last: TokenGeometry) -> str:
    """``"class"`` or ``"patches"`` for ``query`` (``"auto"``: class token if the last layer has
    prefix tokens). Raises ProbeError for an unknown query, or ``"class"`` without prefix tokens."""
    if query not in QUERIES:
        raise ProbeError(f"unknown rollout query {query!r}; use one of {', '.join(QUERIES)}")
    if query == "auto":
        return "class" if last.num_prefix_tokens > 0 else "patches"
    if query == "class" and last.num_prefix_tokens == 0:
        raise ProbeError("the last analysed layer has no class token; use query='patches' (mean over "
                         "patch queries) or query='auto'")
    return query


def query_map(r: torch.Tensor, first: TokenGeometry, last: TokenGeometry,
              query: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """The map of one row of ``R`` over the first layer's patch grid.

    Args:
        r: ``(batch, T_last, T_first)`` from :func:`rollout_matrix` or :func:`relevance_matrix`.
        first, last: geometries of the first and last analysed layers.
        query: ``"class"`` (row 0), ``"patches"`` (mean of the last layer's patch rows) or
            ``"auto"`` (:func:`resolve_query`).

    Returns:
        ``(maps (batch, rows, cols), prefix_mass (batch,))``: the row's entries on the first
        layer's patch tokens in grid order, and the sum of its entries on the first layer's prefix
        tokens. Unnormalised (rollout rows sum to one; relevance is in the units of ``∇A ⊙ A``).

    Raises:
        ProbeError: for a matrix that does not fit the geometries or a bad ``query``.
    """
    if r.dim() != 3 or r.shape[1] != last.num_tokens or r.shape[2] != first.num_tokens:
        raise ProbeError(f"rollout matrix of shape {tuple(r.shape)} does not fit {last.num_tokens} x "
                         f"{first.num_tokens} tokens")
    q = resolve_query(query, last)
    row = r[:, 0, :] if q == "class" else r[:, last.num_prefix_tokens:, :].mean(1)
    n = first.num_prefix_tokens
    return row[:, n:].reshape(-1, *first.grid), row[:, :n].sum(-1)


# ----------------------------------------------------------------------------- model-side adapter


@dataclass
class RolloutMaps:
    """Per-image maps of :func:`compute_rollout`.

    Attributes:
        method: ``"rollout"`` or ``"relevance"``.
        query: ``"class"`` or ``"patches"`` (the row of ``R`` that was mapped).
        maps: float32 ``(images, rows, cols)`` on the first analysed layer's patch grid, unnormalised.
        prefix_mass: float32 ``(images,)``, the row's total on the first layer's prefix tokens.
        grid: ``(rows, cols)``; pixels_per_token: input pixels per patch token ``(rows, cols)``.
        layers: the layer indices propagated through, in order.
        targets: for relevance, the explained class per image (int64 ``(images,)``), else None.
        info: provenance (definition, residual weight, target rule).
    """

    method: str
    query: str
    maps: np.ndarray
    prefix_mass: np.ndarray
    grid: tuple[int, int]
    pixels_per_token: tuple[float, float]
    layers: list[int]
    targets: np.ndarray | None = None
    info: dict = field(default_factory=dict)

    def save_npz(self, path: str | Path) -> Path:
        """Write ``maps``, ``prefix_mass``, ``layers``, ``grid``, ``pixels_per_token``, ``method``,
        ``query`` (and ``targets``) to a compressed ``.npz`` file; returns its path."""
        path = Path(path)
        path.write_bytes(self.npz_bytes())
        return path

    def npz_bytes(self) -> bytes:
        """The ``.npz`` file of :meth:`save_npz` as bytes (what ``rollout.npz`` in the output
        folder holds)."""
        import io

        arrays = dict(maps=self.maps, prefix_mass=self.prefix_mass, layers=np.asarray(self.layers),
                      grid=np.asarray(self.grid), pixels_per_token=np.asarray(self.pixels_per_token),
                      method=np.asarray(self.method), query=np.asarray(self.query))
        if self.targets is not None:
            arrays["targets"] = self.targets
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        return buf.getvalue()


def _logits(out) -> torch.Tensor:
    from ..attribution import as_logits

    out = as_logits(out)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ProbeError("gradient-weighted relevance needs a classifier whose output is (batch, classes) "
                         "logits (set num_classes > 0), or use method='rollout'")
    return out


def compute_rollout(
    model: nn.Module,
    images: torch.Tensor,
    layers=None,
    geometries: dict[int, TokenGeometry] | None = None,
    method: str = "rollout",
    query: str = "auto",
    targets: torch.Tensor | Sequence[int] | None = None,
    batch_size: int = 4,
    residual: float = 0.5,
) -> RolloutMaps:
    """Rollout or relevance maps of ``model`` on ``images``.

    Args:
        model: any model whose attention :mod:`probe.capture` recognises.
        images: float ``(N, C, H, W)``, transformed for the model (e.g. the first N analysed images).
        layers: the :class:`~probe.capture.AttentionLayer` list to propagate through, in model
            order (default: every attention layer of the model, as rollout is defined).
        geometries: ``{layer index: TokenGeometry}`` (default: inferred by
            :func:`probe.capture.infer_geometries` from one forward pass).
        method: ``"rollout"`` (Abnar & Zuidema) or ``"relevance"`` (Chefer et al.).
        query: ``"auto"``, ``"class"`` or ``"patches"`` (:func:`query_map`).
        targets: for relevance, the class per image whose logit is explained (default: the
            model's predicted class).
        batch_size: images per forward pass.
        residual: identity weight of the rollout (0.5).

    Returns:
        :class:`RolloutMaps`.

    Raises:
        ProbeError: for bad arguments (checked before any forward pass), a model without captured
            attention, a layout change between layers that cannot be mapped, a non-classifier for
            relevance, or (relevance) a layer whose capture rule emits a copy that the gradient does
            not reach (naming the layer and rule).
    """
    from ..capture import AttentionCapture, find_attention_layers, infer_geometries

    if method not in METHODS:
        raise ProbeError(f"unknown rollout method {method!r}; use rollout or relevance")
    if query not in QUERIES:
        raise ProbeError(f"unknown rollout query {query!r}; use one of {', '.join(QUERIES)}")
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[0] < 1 or not images.is_floating_point():
        raise ProbeError("images must be a float tensor (N, C, H, W) with N >= 1, transformed for the model")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ProbeError(f"batch_size must be a positive integer, got {batch_size!r}")
    input_shape = tuple(int(v) for v in images.shape[1:])
    if layers is None:
        layers = find_attention_layers(model, input_shape)
    layers = sorted(layers, key=lambda l: l.index)
    if not layers:
        raise ProbeError("the model has no attention layer that probe can capture; rollout needs one")
    if geometries is None or any(l.index not in geometries for l in layers):
        geometries = infer_geometries(model, layers, input_shape)
    geoms = [geometries[l.index] for l in layers]
    for a, b in zip(geoms, geoms[1:]):
        token_transition(a, b)  # refuse an unmappable layout before any work
    q = resolve_query(query, geoms[-1])
    if targets is not None:
        targets = torch.as_tensor(targets, dtype=torch.long).reshape(-1)
        if targets.shape[0] != images.shape[0]:
            raise ProbeError(f"got {targets.shape[0]} targets for {images.shape[0]} images; pass one per image")
    p = next(iter(model.parameters()), None)
    device = p.device if p is not None else images.device
    order = [l.index for l in layers]
    maps, prefix, chosen = [], [], []
    from ..attribution import inference_mode_params  # eval mode, no parameter gradients; restored

    with inference_mode_params(model):
        for s in range(0, images.shape[0], batch_size):
            x = images[s:s + batch_size].to(device)
            if method == "rollout":
                r = _rollout_batch(model, x, layers, order, geometries, residual, AttentionCapture)
            else:
                t = targets[s:s + batch_size].to(device) if targets is not None else None
                r, t = _relevance_batch(model, x, layers, order, geometries, t, AttentionCapture)
                chosen.append(t.cpu())
            m, pm = query_map(r, geoms[0], geoms[-1], q)
            maps.append(m.float().cpu())
            prefix.append(pm.float().cpu())
    info = {
        "definition": ("Abnar & Zuidema 2020: R = prod_l rownorm(0.5 mean_h A_l + 0.5 I)" if method == "rollout"
                       else "Chefer et al. 2021: R = I; R += mean_h((dA * A)^+) R per layer"),
        "residual": residual if method == "rollout" else None,
        "target": None if method == "rollout" else ("given classes" if targets is not None
                                                     else "predicted class (argmax of the logits)"),
    }
    return RolloutMaps(
        method=method, query=q, maps=torch.cat(maps).numpy(), prefix_mass=torch.cat(prefix).numpy(),
        grid=geoms[0].grid, pixels_per_token=geoms[0].pixels_per_token, layers=order,
        targets=torch.cat(chosen).numpy() if chosen else None, info=info,
    )


def _rollout_batch(model, x, layers, order, geometries, residual, capture_cls) -> torch.Tensor:
    """Fold each layer into R as its attention arrives (chunks of images are joined first)."""
    b = x.shape[0]
    prop = _Propagator("rollout")
    pending: dict[int, list[torch.Tensor]] = {}
    pos = [0]

    def sink(index: int, attn: torch.Tensor) -> None:
        chunks = pending.setdefault(index, [])
        chunks.append(attn)
        got = sum(c.shape[0] for c in chunks)
        if got < b:
            return
        if got > b or pos[0] >= len(order) or order[pos[0]] != index:
            raise ProbeError(f"layer {index} delivered its attention out of model order or more than once per "
                             "forward pass; rollout needs each layer once, in order")
        a = torch.cat(chunks) if len(chunks) > 1 else chunks[0]
        del pending[index]
        _check_attn(a, geometries[index], f"layer {index}")
        prop.add(a, geometries[index], residual=residual)
        pos[0] += 1

    with capture_cls(layers, sink) as cap, torch.no_grad():
        model(x)
    cap.check_all_captured(type(model).__name__)
    if pos[0] != len(order):
        raise ProbeError(f"only {pos[0]} of {len(order)} layers delivered the attention of every image; "
                         "rollout needs all of them")
    return prop.r


def _relevance_batch(model, x, layers, order, geometries, targets, capture_cls):
    """One forward pass keeping the attention in the graph, the target logit's gradient with respect
    to each layer's attention, then the relevance propagation."""
    kept: dict[int, list[torch.Tensor]] = {}

    def sink(index: int, attn: torch.Tensor) -> None:
        kept.setdefault(index, []).append(attn)

    with torch.inference_mode(False), torch.enable_grad():
        x = x.detach().clone().requires_grad_(True)  # a graph without parameter gradients
        with capture_cls(layers, sink, keep_graph=True) as cap:
            logits = _logits(model(x))
        cap.check_all_captured(type(model).__name__)
        if targets is None:
            targets = logits.detach().argmax(-1)
        elif targets.min() < 0 or targets.max() >= logits.shape[1]:
            raise ProbeError(f"targets must lie in 0..{logits.shape[1] - 1} (the model's classes)")
        score = logits.gather(1, targets[:, None]).sum()
        attns, owners = [], []
        for layer in layers:
            chunks = kept.get(layer.index, [])
            if len(chunks) != 1 or chunks[0].shape[0] != x.shape[0]:
                raise ProbeError(
                    f"layer {layer.index} ({layer.name}, rule {layer.rule.name}) delivered its attention in "
                    f"{len(chunks)} pieces; gradient-weighted relevance needs the attention tensor the model "
                    "uses, once per forward pass; use method='rollout'")
            attns.append(chunks[0])
            owners.append(layer)
        grads = torch.autograd.grad(score, [a for a in attns if a.requires_grad], allow_unused=True)
        it = iter(grads)
        full = [next(it) if a.requires_grad else None for a in attns]
    for a, g, layer in zip(attns, full, owners):
        if g is None:
            raise ProbeError(
                f"layer {layer.index} ({layer.name}, rule {layer.rule.name}): the captured attention is a copy "
                "that the model does not use (e.g. Swin's windows mapped to image positions, "
                "nn.MultiheadAttention's reshaped weights), so the logit's gradient does not reach it and "
                "gradient-weighted relevance is undefined; use method='rollout' for this model")
    r = relevance_matrix([a.detach() for a in attns], full, [geometries[l.index] for l in layers])
    return r, targets


# ----------------------------------------------------------------------------- registry adapter

from typing import Literal  # noqa: E402

from .base import Analysis, ReportInput, SkipAnalysis, option, register_analysis  # noqa: E402


def photos_from_inputs(images: torch.Tensor, data_config: dict | None) -> np.ndarray | None:
    """The model inputs as photos ``(N, H, W, 3)`` uint8: normalisation undone (``x · std + mean``
    with the data config's ``mean`` / ``std``); None for inputs with other than 1 or 3 channels."""
    c = images.shape[1]
    if c not in (1, 3):
        return None
    cfg = data_config or {}
    mean = torch.tensor([float(v) for v in cfg.get("mean", (0.0,) * c)][:c]).view(1, -1, 1, 1)
    std = torch.tensor([float(v) for v in cfg.get("std", (1.0,) * c)][:c]).view(1, -1, 1, 1)
    x = (images.detach().float().cpu() * std + mean).clamp(0, 1).mul(255).round().to(torch.uint8)
    x = x.expand(-1, 3, -1, -1) if c == 1 else x
    return np.ascontiguousarray(x.permute(0, 2, 3, 1).numpy())


@dataclass(frozen=True)
class RolloutOptions:
    """Options of :class:`RolloutAnalysis`."""

    method: Literal["rollout", "relevance"] = option(
        "rollout", help="rollout (Abnar & Zuidema 2020) or relevance (Chefer et al. 2021, gradients)")
    images: int = option(8, help="maps for the first N analysed images")
    query: Literal["auto", "class", "patches"] = option(
        "auto", help="row of R mapped: class token, mean over patch queries, or auto")

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ProbeError(f"unknown rollout method {self.method!r}; use rollout or relevance")
        if self.query not in QUERIES:
            raise ProbeError(f"unknown rollout query {self.query!r}; use one of {', '.join(QUERIES)}")
        if isinstance(self.images, bool) or not isinstance(self.images, int) or self.images < 1:
            raise ProbeError(f"rollout.images must be a positive integer, got {self.images!r}")


@register_analysis
class RolloutAnalysis(Analysis):
    """Per-image rollout or relevance maps of the first N analysed images, propagated through every
    attention layer of the model (not only the analysed ones: rollout is defined over the whole
    stack). ``result.extras["rollout"]``: the maps, float32 ``(images, rows, cols)``;
    ``result.extras["rollout_info"]``: the :class:`RolloutMaps` (numpy only), the photos and names."""

    name = "rollout"
    title = "attention rollout"
    consumes = ("model",)
    Options = RolloutOptions
    report_order = 50

    def images_needed(self) -> int:
        return self.options.images

    def run(self, ctx) -> None:
        from ..capture import find_attention_layers

        x = ctx.images[: self.options.images]
        all_layers = find_attention_layers(ctx.net, tuple(int(v) for v in x.shape[1:]))
        geoms = dict(ctx.geometries) if all(l.index in ctx.geometries for l in all_layers) else None
        try:
            with ctx.stage(self.options.method, total=1) as stage:
                maps = compute_rollout(ctx.net, x, layers=all_layers, geometries=geoms,
                                       method=self.options.method, query=self.options.query,
                                       batch_size=ctx.settings.batch_size)
                stage.advance()
        except ProbeError as e:
            raise SkipAnalysis(str(e)) from None
        ctx.result.extras["rollout"] = maps.maps
        ctx.result.extras["rollout_info"] = {
            "result": maps,
            "photos": photos_from_inputs(x, ctx.result.meta.get("data_config")),
            "names": list(ctx.image_names[: x.shape[0]]),
        }

    @classmethod
    def files(cls, report: ReportInput) -> dict[str, bytes]:
        """``rollout.npz`` (:meth:`RolloutMaps.save_npz`) beside the report."""
        maps = (report.extras.get("rollout_info") or {}).get("result")
        return {"rollout.npz": maps.npz_bytes()} if isinstance(maps, RolloutMaps) else {}

    @classmethod
    def section(cls, report: ReportInput):
        from ..report.plots import to_data_uri
        from ..report.plots_extra import rollout_figure

        info = report.extras.get("rollout_info") or {}
        maps: RolloutMaps | None = info.get("result")
        if maps is None:
            return None
        titles = [Path(str(n)).name for n in info.get("names") or []] or None
        fig = rollout_figure(maps.maps, info.get("photos"), titles=titles, method=maps.method)
        row = "class-token row" if maps.query == "class" else "mean over the last layer's patch queries"
        return {"title": "Attention rollout" if maps.method == "rollout" else "Gradient-weighted relevance",
                "html": f"<p>{maps.info.get('definition', '')}; {row}, through layers "
                        f"{maps.layers[0]}-{maps.layers[-1]}, on the {maps.grid[0]}x{maps.grid[1]} patch grid "
                        f"of layer {maps.layers[0]}. Mean mass on prefix tokens: "
                        f"{float(np.mean(maps.prefix_mass)):.3f}.</p>"
                        f'<img src="{to_data_uri(fig, dpi=90)}" alt="rollout maps">'}
