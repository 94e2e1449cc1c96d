"""The one flow: resolve model -> capture attention layer by layer -> streaming reducers ->
fits and tests on the statistics -> results tables -> :class:`~probe.result.AnalysisResult`.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from . import __version__
from .analyses.reducers import LayerReducer
from .capture import (
    AttentionCapture,
    describe_rules,
    find_attention_layers,
    infer_geometries,
    parse_layers,
)
from .data import ImageSet, TensorImages, collect_images, eval_transform, iter_batches
from .errors import CaptureError, ProbeError
from .models import ResolvedModel, file_sha256, resolve_model
from .analyses.convlike import ConvLikeConfig
from .result import AnalysisResult
from .steps import add_conv_test, add_quadratic_fits, stats_layer_scores, trial_conv_test
from .tables import heads_frame, layers_frame

Progress = Callable[[int, int], None]


def resolve_device(device: str | torch.device) -> torch.device:
    """Check and return the torch device.

    Raises:
        ProbeError: for an unknown device or ``cuda`` without a usable GPU.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ProbeError(f"unknown device {device!r}; use cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ProbeError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ProbeError(f"device {device!r} is not supported; use cpu or cuda")
    return dev


def analyze(
    model: str | nn.Module | ResolvedModel | None = None,
    images: str | Path | Sequence[Any] | ImageSet | TensorImages | torch.Tensor | None = None,
    *,
    layers: str | Sequence[int] | None = "all",
    weights: str | Path | None = None,
    random_init: bool = False,
    num_images: int | None = None,
    batch_size: int = 16,
    device: str = "cpu",
    amp: bool = False,
    seed: int = 0,
    n_bootstrap: int = 100,
    prefix_tokens: int | None = None,
    grid: tuple[int, int] | None = None,
    patch_size: float | None = None,
    data_overrides: dict[str, Any] | None = None,
    progress: Progress | None = None,
    fits: bool = True,
    anisotropic: bool = False,
    conv_test: bool = True,
    conv_config: ConvLikeConfig | None = None,
    null_seeds: int = 3,
    null_images: int = 4,
    null_layers: str = "candidates",
    attribution: str = "ig",
    attribution_images: int = 16,
    ig_steps: int = 16,
    query: tuple[int, int] | None = None,
    _geometries: dict | None = None,
) -> AnalysisResult:
    """Analyse the attention heads of ``model`` on ``images``.

    Args:
        model: ``None`` (default) for the embedded trained model of :mod:`probe.cordonnier`
            (no download), a timm name or alias, ``package.module:factory``, an ``nn.Module`` or a
            :class:`~probe.models.ResolvedModel`.
        images: folder / file / glob / list of paths or PIL images; ``None`` uses the embedded
            scikit-learn sample photos; or images already transformed to model input: a float
            tensor ``(N, C, H, W)`` (the first ``num_images`` are used) or a
            :class:`~probe.data.TensorImages` stream.
        layers: ``"all"``, ``"0-4"``, ``"0,2,5"`` or a list of layer indices.
        weights: local checkpoint (safetensors or weights-only torch file).
        random_init: analyse random weights (explicit opt-in).
        num_images: analyse at most this many images (seeded random subset).
        batch_size: images per forward pass.
        device: ``cpu`` or ``cuda``.
        amp: run the forward pass under bf16 autocast on CUDA (statistics accumulate in float64).
        seed: seed for the image subset, random init and bootstrap weights.
        n_bootstrap: Poisson-bootstrap replicates kept by the reducers.
        prefix_tokens, grid, patch_size: override the inferred token geometry.
        data_overrides: timm data-config values (``input_size``, ``mean``, ``std``, ...).
        progress: ``progress(images_done, images_total)`` after each batch.
        fits: fit the quadratic-encoding Δ and α of every head (:mod:`probe.analyses.quadratic`).
        anisotropic: also fit the full 2x2 covariance form.
        conv_test: test whether layers act like convolutions (:mod:`probe.analyses.convlike`;
            needs ``fits``).
        conv_config: thresholds of that test (default :class:`ConvLikeConfig`).
        null_seeds: random-init copies of the architecture for the test's null (a); skipped
            when the analysed weights are themselves a random init.
        null_images: images (the first of the analysed ones) each random-init copy sees.
        null_layers: ``"candidates"`` (default): null (a) only for the layers whose verdict is
            conv-like without it (it can only veto that verdict, so every verdict is the same as
            with ``"all"``, and the forward passes of the copies end at the deepest such layer);
            ``"all"``: for every analysed layer (the report then shows random-init scores for
            all of them).
        attribution: head attribution with captum (:mod:`probe.attribution`): ``"ig"``
            (integrated gradients over per-head gates), ``"ablation"``, ``"both"`` or ``"none"``;
            skipped with a reason in ``meta["attribution_skipped"]`` for families without gates.
        attribution_images: the first N analysed images are attributed.
        ig_steps: integration steps of integrated gradients.
        query: ``(row, col)`` of the query patch whose mean attention map the report shows
            (CLI ``--query ROW,COL``); checked against the patch grid before any image is read;
            default the central patch.
        _geometries: internal: ``{layer index: TokenGeometry}`` of an analysed model, reused
            (instead of a dry run) for its random-init copies.

    Returns:
        An :class:`~probe.result.AnalysisResult` (``heads`` / ``layers`` DataFrames,
        per-layer :class:`~probe.analyses.reducers.LayerStats`, metadata, ``write_report``).

    Raises:
        ProbeError: for any bad input (model, weights, layers, images, device, geometry).
    """
    t0 = time.perf_counter()
    _check_arguments(model, images, batch_size=batch_size, num_images=num_images, n_bootstrap=n_bootstrap,
                     seed=seed, null_seeds=null_seeds, null_images=null_images,
                     attribution_images=attribution_images, ig_steps=ig_steps, data_overrides=data_overrides)
    if isinstance(images, torch.Tensor) and images.dtype == torch.float64:
        images = images.float()
    dev = resolve_device(device)
    if null_layers not in ("candidates", "all"):
        raise ProbeError(f"unknown --null-layers {null_layers!r}; use candidates or all")
    if attribution not in ("none", "ig", "ablation", "both"):
        raise ProbeError(f"unknown --attribution {attribution!r}; use ig, ablation, both or none")
    resolved = model if isinstance(model, ResolvedModel) else resolve_model(
        model, weights=weights, random_init=random_init, seed=seed
    )
    net = resolved.model.to(dev).eval()
    if isinstance(images, torch.Tensor):
        image_set: ImageSet | TensorImages = TensorImages(images[:num_images] if num_images else images)
    elif isinstance(images, (ImageSet, TensorImages)):
        image_set = images
    transform, data_cfg = eval_transform(net, data_overrides)
    input_shape = tuple(int(v) for v in data_cfg["input_size"])
    if not isinstance(images, (torch.Tensor, ImageSet, TensorImages)):
        image_set = collect_images(images, num_images, seed, input_side=min(input_shape[1:]))
    mode = "L" if input_shape[0] == 1 else "RGB"
    if isinstance(image_set, TensorImages) and image_set.image_shape != input_shape:
        raise ProbeError(
            f"the image tensor holds {image_set.image_shape} images but {resolved.name} takes "
            f"{input_shape}; transform them with probe.data.eval_transform(model) or set "
            "data_overrides={'input_size': ...}"
        )
    all_layers = find_attention_layers(net, input_shape)
    if not all_layers:
        raise CaptureError(
            f"{resolved.name}: no attention that probe can capture was found (tried: {describe_rules()}); "
            "register a capture rule for its attention module (see probe.capture, docs/capture.md) "
            "or pass a model with attention"
        )
    selected = [all_layers[i] for i in parse_layers(layers, len(all_layers), resolved.name)]
    if _geometries is not None and all(l.index in _geometries for l in selected):
        geometries = _geometries  # a random-init copy of an analysed model: same token layout
    else:
        geometries = infer_geometries(net, selected, input_shape, prefix_tokens, grid, patch_size, resolved.name)
    geometry = geometries[selected[0].index]
    if query is not None:
        _check_query(query, geometry)

    reducers = {l.index: LayerReducer(l.index, geometries[l.index], n_bootstrap, seed) for l in selected}

    def sink(index: int, attn: torch.Tensor) -> None:
        reducers[index].update(attn)

    # the attention layer after the deepest selected one: later blocks need not run
    deepest = selected[-1].index
    stop_before = all_layers[deepest + 1].module if deepest + 1 < len(all_layers) else None
    capture = AttentionCapture(selected, sink, stop_before=stop_before)
    total = len(image_set)
    done = 0
    kept: list[torch.Tensor] = []  # images kept for the attribution (at most attribution_images)
    kept_n = 0
    names: list[str] = []
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if (amp and dev.type == "cuda") else None
    with capture, torch.no_grad():
        if isinstance(image_set, TensorImages):
            batches = image_set.batches(batch_size)
        else:
            batches = iter_batches(image_set, transform, batch_size, mode)
        for batch, batch_names in batches:
            batch = batch.to(dev, non_blocking=True)
            if attribution != "none" and kept_n < attribution_images:
                kept.append(batch[: attribution_images - kept_n].float())
                kept_n += kept[-1].shape[0]
            if autocast is not None:
                with autocast:
                    capture.forward(net, batch)
            else:
                capture.forward(net, batch)
            if done == 0:
                capture.check_all_captured(resolved.name)
                capture.arm_early_exit()
            done += batch.shape[0]
            names.extend(batch_names)
            if progress is not None:
                progress(done + len(image_set.skipped), total)

    stats = [reducers[l.index].result() for l in selected]
    heads = heads_frame(stats)
    layer_table = layers_frame(heads, stats)
    meta = {
        "model": resolved.name,
        "weights": resolved.weights,
        "num_params": resolved.num_params,
        "images": image_set.description,
        "num_images": done,
        "num_skipped": len(image_set.skipped),
        "skipped": list(image_set.skipped),
        "image_names": [image_set.display_name(n) if isinstance(image_set, ImageSet) else n for n in names],
        "layers": [l.index for l in selected],
        "layer_names": {l.index: l.name for l in selected},
        "num_attention_layers": len(all_layers),
        "capture_rule": sorted({l.rule.name for l in selected}),
        "geometry": {
            "num_prefix_tokens": geometry.num_prefix_tokens,
            "grid": list(geometry.grid),
            "pixels_per_token": list(geometry.pixels_per_token),
        },
        "geometry_per_layer": {
            l.index: {
                "num_prefix_tokens": g.num_prefix_tokens,
                "grid": list(g.grid),
                "pixels_per_token": list(g.pixels_per_token),
            }
            for l in selected
            for g in [geometries[l.index]]
        },
        "data_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in data_cfg.items()},
        "device": str(dev) + (" (bf16 autocast)" if autocast is not None else ""),
        "batch_size": batch_size,
        # the forward pass ended at the deepest selected layer (after the first batch)
        "early_exit": bool(capture.armed),
        "seed": seed,
        "n_bootstrap": n_bootstrap,
        "query": list(query) if query is not None else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": _call_text(model, images, layers=layers, weights=weights, random_init=random_init,
                              num_images=num_images, seed=seed),
        "weights_sha256": file_sha256(weights) if weights is not None else None,
        "image_root": str(image_set.root) if isinstance(image_set, ImageSet) and image_set.root else None,
        "versions": _versions(),
        "runtime_s": time.perf_counter() - t0,
    }
    result = AnalysisResult(heads=heads, layers=layer_table, stats={s.layer: s for s in stats},
                            geometry=geometry, meta=meta)
    if fits or conv_test:
        add_quadratic_fits(result, anisotropic=anisotropic)
    if conv_test:
        cfg = conv_config or ConvLikeConfig(seed=seed)
        trial = trial_conv_test(result, cfg)
        null = {}
        null_for: list[int] = []
        random_weights = resolved.weights.startswith("random init")
        if null_seeds > 0 and not random_weights:
            if null_layers == "all":
                null_for = [l.index for l in selected]
            else:  # null (a) can only veto: run it where the verdict is conv-like without it
                null_for = trial.conv_like_layers
        if null_for:
            null = _random_init_scores(
                resolved, image_set, null_for, cfg, null_seeds, null_images,
                batch_size=batch_size, device=device, seed=seed, prefix_tokens=prefix_tokens,
                grid=grid, patch_size=patch_size, data_overrides=data_overrides, _geometries=geometries)
        add_conv_test(result, cfg, null, trial=trial)
        meta["conv_null_layers_rule"] = null_layers
        meta["conv_null_status"] = (
            "off" if null_seeds <= 0 else "random weights" if random_weights
            else "run" if null else "not needed")
        meta["conv_null_layers"] = sorted(null)
        meta["conv_null_seeds"] = len(next(iter(null.values()), []))
        meta["conv_null_images"] = min(null_images, done) if null else 0
    if attribution != "none":
        from .attribution import add_head_attribution, imagenet_labels_or_none, unsupported_reason

        reason = unsupported_reason(net, meta["layer_names"])
        if reason is None:
            x = torch.cat(kept)
            labels = imagenet_labels_or_none(names[: x.shape[0]], int(getattr(net, "num_classes", 0) or 0))
            add_head_attribution(result, net, x, labels=labels, seed=seed, n_steps=ig_steps,
                                 methods=("ig", "ablation") if attribution == "both" else (attribution,))
        else:
            meta["attribution_skipped"] = reason
    meta["runtime_s"] = time.perf_counter() - t0
    return result


def _call_text(model: Any, images: Any, **kw: Any) -> str:
    """The library call as text, for the report's provenance (the CLI replaces it by its command line)."""
    def short(v: Any) -> str:
        if isinstance(v, (str, Path, int, float, bool)) or v is None:
            return repr(str(v) if isinstance(v, Path) else v)
        if isinstance(v, (list, tuple)):
            return f"<{len(v)} items>"
        return f"<{type(v).__name__}>"

    args = [short(model), short(images)]
    args += [f"{k}={short(v)}" for k, v in kw.items() if v not in (None, False)]
    return f"probe.analyze({', '.join(args)})"


def _check_query(query: Any, geometry) -> int:
    """Patch index of ``query`` ``(row, col)`` inside the patch grid (ProbeError otherwise)."""
    rows, cols = geometry.grid
    ok = (isinstance(query, (tuple, list)) and len(query) == 2
          and all(isinstance(v, int) and not isinstance(v, bool) for v in query))
    if not ok or not (0 <= query[0] < rows and 0 <= query[1] < cols):
        raise ProbeError(f"query {query!r} must be (row, col) inside the {rows}x{cols} patch grid "
                         f"(--query ROW,COL with 0 <= ROW < {rows}, 0 <= COL < {cols})")
    return int(query[0]) * cols + int(query[1])


def _check_int(name: str, value: Any, minimum: int, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProbeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ProbeError(f"{name} must be at least {minimum}, got {value}")


def _check_arguments(model: Any, images: Any, *, batch_size: Any, num_images: Any, n_bootstrap: Any, seed: Any,
                     null_seeds: Any, null_images: Any, attribution_images: Any, ig_steps: Any,
                     data_overrides: Any) -> None:
    """The library's arguments checked before any work (the CLI's checks, as ``ProbeError``)."""
    import math

    if model is not None and not isinstance(model, (str, nn.Module, ResolvedModel)):
        raise ProbeError(f"model must be a name (str), an nn.Module or None for the embedded model; got "
                         f"{type(model).__name__}")
    if isinstance(model, str) and not model.strip():
        raise ProbeError("model is an empty string; pass a model name, or None for the embedded model")
    _check_int("batch_size", batch_size, 1)
    _check_int("num_images", num_images, 1, optional=True)
    _check_int("n_bootstrap", n_bootstrap, 0)
    _check_int("seed", seed, 0)
    _check_int("null_seeds", null_seeds, 0)
    _check_int("null_images", null_images, 1)
    _check_int("attribution_images", attribution_images, 1)
    _check_int("ig_steps", ig_steps, 1)
    if isinstance(images, torch.Tensor) and not images.is_floating_point():
        raise ProbeError(f"an image tensor must hold transformed float images (N, C, H, W), got {images.dtype}; "
                         "pass file paths or PIL images to have probe apply the model's transform")
    if data_overrides is not None:
        if not isinstance(data_overrides, dict):
            raise ProbeError(f"data_overrides must be a dict, got {type(data_overrides).__name__}")
        size = data_overrides.get("input_size")
        if size is not None and (not isinstance(size, (tuple, list)) or len(size) != 3
                                 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in size)):
            raise ProbeError(f"data_overrides['input_size'] must be three positive integers (C, H, W), got {size!r}")
        for key in ("mean", "std"):
            vals = data_overrides.get(key)
            if vals is None:
                continue
            try:
                vals = [float(v) for v in vals]
            except (TypeError, ValueError):
                raise ProbeError(f"data_overrides[{key!r}] must be a sequence of numbers, got {vals!r}") from None
            if not all(math.isfinite(v) for v in vals) or (key == "std" and not all(v > 0 for v in vals)):
                raise ProbeError(f"data_overrides[{key!r}] must be finite{' and positive' if key == 'std' else ''}, got {vals}")


def _random_init_scores(resolved: ResolvedModel, image_set: ImageSet | TensorImages, layers: list[int],
                        config: ConvLikeConfig, n_seeds: int, n_images: int, **kw) -> dict[int, list[float]]:
    """Conv-likeness scores of random-init copies of the architecture (null (a) of the test).

    Each copy (seeds ``1000 + seed + i``) is analysed on the first ``n_images`` images with the
    same layers, geometry options and fits; returns ``{layer: [score per seed]}``.
    """
    if isinstance(image_set, TensorImages):
        def subset_images() -> TensorImages:
            return TensorImages(image_set.pool, min(max(1, n_images), len(image_set)), image_set.description)
    else:
        subset = ImageSet(list(image_set.items[:max(1, n_images)]), image_set.description)

        def subset_images() -> ImageSet:
            return ImageSet(list(subset.items), subset.description)
    scores: dict[int, list[float]] = {l: [] for l in layers}
    base = 1000 + kw["seed"]
    for i in range(n_seeds):
        net = resolved.random_init(base + i)
        twin = ResolvedModel(net, resolved.name, f"random init (seed {base + i})",
                             resolved.num_params, resolved.pretrained_cfg, resolved.rebuild)
        res = analyze(twin, subset_images(), layers=layers,
                      n_bootstrap=0, conv_test=False, fits=False, attribution="none", **kw)
        for layer, s in stats_layer_scores(res.stats, config).items():
            scores[layer].append(s)
    return scores


def _versions() -> dict[str, str]:
    import timm

    out = {
        "probe": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "platform": platform.platform(),
    }
    try:
        import transformers

        out["transformers"] = transformers.__version__
    except ImportError:
        pass
    return out
