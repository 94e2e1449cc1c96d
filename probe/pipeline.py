"""The one flow: check arguments -> resolve the model -> capture attention layer by layer into the
selected analyses' streaming reducers -> run the selected registered analyses
(:mod:`probe.analyses.base`; probe's own in :mod:`probe.steps`) -> :class:`~probe.result.AnalysisResult`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import platform
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd
import torch
from torch import nn

from . import __version__
from .analyses.base import (Analysis, AnalysisContext, RunSettings, SkipAnalysis, make_analysis,
                            resolve_selection)
from .analyses.convlike import ConvLikeConfig
from .capture import (
    AttentionCapture,
    describe_rules,
    find_attention_layers,
    infer_geometries,
    parse_layers,
)
from .data import (ImageSet, TensorImages, collect_images, cpu_count, default_workers, eval_transform,
                   iter_indexed_batches, workers_default)
from .errors import CaptureError, ProbeError
from .models import ResolvedModel, file_sha256, resolve_model
from .options import CLI_CALL, conv_config_from, data_overrides_from, library_message, parse_grid, query_pair
from .preflight import check_output_dir
from .progress import ProgressReporter, make_progress
from .result import AnalysisResult

#: ``progress(images_done, images_total)``; see :mod:`probe.progress` for the other forms.
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
    progress: Progress | ProgressReporter | bool | None = None,
    fits: bool = True,
    anisotropic: bool = False,
    conv_test: bool = True,
    conv_config: ConvLikeConfig | None = None,
    null_seeds: int = 3,
    null_images: int = 4,
    null_layers: str = "candidates",
    attribution: str = "none",
    attribution_images: int = 16,
    ig_steps: int = 16,
    query: tuple[int, int] | None = None,
    analyses: Sequence[str | Analysis | type] | None = None,
    analysis_options: dict[str, Any] | None = None,
    distributed: Any = False,
    workers: int | None = None,
    input_size: str | Sequence[int] | None = None,
    mean: str | Sequence[float] | None = None,
    std: str | Sequence[float] | None = None,
    local_radius: float | None = None,
    kernel_size: int | None = None,
    conv_level: float | None = None,
    out: str | Path | None = None,
    _geometries: dict | None = None,
) -> AnalysisResult | None:
    """Analyse the attention heads of ``model`` on ``images``.

    Args:
        model: ``None`` (default) for the embedded trained model of :mod:`probe.cordonnier`
            (no download), a timm name or alias, ``package.module:factory`` / ``file.py:factory``,
            ``hf:FOLDER`` / ``hf:ORG/NAME``, ``open_clip:ARCH[:TAG]``, ``torchvision:NAME[:WEIGHTS]``,
            any spec of a registered :class:`~probe.model_sources.ModelSource`, an ``nn.Module``
            (a ``transformers`` model included) or a :class:`~probe.models.ResolvedModel`.
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
        prefix_tokens, grid, patch_size: override the inferred token geometry (``grid`` as
            ``(rows, cols)`` or the command's text ``"14x14"``).
        data_overrides: timm data-config values (``input_size``, ``mean``, ``std``, ...).
        progress: named stages with bars (capture, quadratic fits, conv test, conv-test null,
            attribution; :mod:`probe.progress`): ``None`` (default) shows them in a terminal or
            notebook only, ``True`` always, ``False`` never; a callable ``progress(images_done,
            images_total)`` is called after each captured batch, ``progress(stage, done, total)``
            on every update of every stage; or a :class:`~probe.progress.ProgressReporter`. On the
            ranks other than 0 of a distributed run ``None`` and ``True`` show nothing, and the
            capture stage counts that rank's shard.
        fits: fit the quadratic-encoding Δ and α of every head (analysis ``quadratic``,
            :mod:`probe.analyses.quadratic`).
        anisotropic: also fit the full 2x2 covariance form.
        conv_test: test whether layers act like convolutions (analysis ``convlike``,
            :mod:`probe.analyses.convlike`; runs the fits too).
        conv_config: thresholds of that test (default :class:`ConvLikeConfig`).
        null_seeds: random-init copies of the architecture for the test's null (a); skipped
            when the analysed weights are themselves a random init.
        null_images: images (the first of the analysed ones) each random-init copy sees.
        null_layers: ``"candidates"`` (default): null (a) only for the layers whose verdict is
            conv-like without it (it can only veto that verdict, so every verdict is the same as
            with ``"all"``, and the forward passes of the copies end at the deepest such layer);
            ``"all"``: for every analysed layer (the report then shows random-init scores for
            all of them).
        attribution: head attribution with captum (analysis ``attribution``,
            :mod:`probe.attribution`): ``"ig"`` (integrated gradients over per-head gates),
            ``"ablation"``, ``"both"`` or ``"none"`` (default: opt-in, since IG on 16 images costs
            about twice the rest of a DeiT-Tiny run on 64 images, ``bench/RESULTS-default-run.md``);
            skipped with a reason in ``meta["attribution_skipped"]`` for families without gates.
        attribution_images: the first N analysed images are attributed.
        ig_steps: integration steps of integrated gradients.
        query: ``(row, col)`` (or the text ``"ROW,COL"`` of ``--query``) of the query patch whose
            mean attention map the report shows; checked against the patch grid before any image is read;
            default the central patch.
        analyses: further registered analyses to run, in addition to those the flags above
            select: names, registered classes or configured instances (``[Rollout(images=8)]``);
            their requirements are added. See :func:`probe.analyses.base.analyses`.
        analysis_options: ``{name: Options instance or dict}`` for analyses selected by name or
            by the flags above (``{"quadratic": {"anisotropic": True}}`` overrides the flag).
        distributed: ``False`` (default): one process. ``True``: this process is one rank of a
            run started by ``torchrun`` (:mod:`probe.distributed`; the default process group is
            initialised from the launcher's environment unless it already is: gloo on the CPU,
            nccl on CUDA); or a :class:`probe.distributed.Distributed`. Every rank must call
            ``analyze`` with the same arguments; each captures its shard of the images, the
            reducers' sums are all-reduced, and rank 0 runs the analyses and returns the result
            (equal to a single-process run's to float64 rounding); the other ranks return ``None``.
        workers: image-decoding worker processes (0: in this process; default
            :func:`probe.data.default_workers`).
        input_size, mean, std: the model input's ``C,H,W`` and per-channel normalisation, as
            text (``"3,224,224"``, ``"0.5"``) or sequences; added to ``data_overrides``.
        local_radius, kernel_size, conv_level: the conv test's settings, as
            the command's conv-test options (:data:`probe.options.CONV_KEYWORDS`; instead of
            ``conv_config``, with ``seed``); ``None``: the defaults.
        out: also write the report and the saved result there (``write_report``; the folder is
            checked before any work, as ``probe analyze --out``); ``None``: nothing written.
        _geometries: internal: ``{layer index: TokenGeometry}`` of an analysed model, reused
            (instead of a dry run) for its random-init copies.

    Returns:
        An :class:`~probe.result.AnalysisResult` (``heads`` / ``layers`` DataFrames,
        per-layer :class:`~probe.analyses.reducers.LayerStats`, metadata, ``write_report``);
        ``meta["analyses"]`` lists the analyses run, ``meta["analyses_skipped"]`` those that
        could not run, with the reason. ``None`` on the ranks other than 0 of a distributed run.

    Raises:
        ProbeError: for any bad input (model, weights, layers, images, device, geometry,
            analyses and their options), before any image is read (a message naming command-line
            flags ends with their keyword forms, :func:`probe.options.library_message`); in a
            distributed run on every rank when one rank fails
            (:meth:`probe.distributed.Distributed.agree`).
    """
    t0 = time.perf_counter()
    try:
        grid, query = parse_grid(grid), query_pair(query)
        data_overrides = data_overrides_from(data_overrides, input_size, mean, std)
        conv_config = conv_config_from(conv_config, seed, local_radius=local_radius, kernel_size=kernel_size,
                                       conv_level=conv_level)
    except ProbeError as e:
        raise _for_caller(e)
    dist_run = _distributed(distributed, device)
    try:
        out_dir = check_output_dir(out) if out is not None and (dist_run is None or dist_run.is_main) else None
        _check_arguments(model, images, batch_size=batch_size, num_images=num_images, n_bootstrap=n_bootstrap,
                         seed=seed, null_seeds=null_seeds, null_images=null_images,
                         attribution_images=attribution_images, ig_steps=ig_steps, data_overrides=data_overrides)
        _check_ranges(seed=seed, prefix_tokens=prefix_tokens, grid=grid, patch_size=patch_size,
                      data_overrides=data_overrides, conv_config=conv_config if conv_test else None)
        if isinstance(images, torch.Tensor) and images.dtype == torch.float64:
            images = images.float()
        dev = resolve_device(device)
        selection = _selection(fits=fits, anisotropic=anisotropic, conv_test=conv_test, conv_config=conv_config,
                               null_seeds=null_seeds, null_images=null_images, null_layers=null_layers,
                               attribution=attribution, attribution_images=attribution_images, ig_steps=ig_steps,
                               analyses=analyses, analysis_options=analysis_options)
        # ranks other than 0 show no bars of their own (a callable or reporter given to them still runs)
        shown = dist_run is None or dist_run.is_main or not (progress is None or progress is True)
        reporter, owned = make_progress(progress if shown else False)
    except Exception as e:
        if dist_run is not None:
            dist_run.agree(e)  # the other ranks learn of it at their agreement before the capture
        raise _for_caller(e)
    try:
        with workers_default(workers), _module_in_use(model):
            result = _run(model, images, selection, reporter, t0=t0, dev=dev, layers=layers, weights=weights,
                          random_init=random_init, num_images=num_images, batch_size=batch_size, device=device,
                          amp=amp, seed=seed, n_bootstrap=n_bootstrap, prefix_tokens=prefix_tokens, grid=grid,
                          patch_size=patch_size, data_overrides=data_overrides, query=query,
                          _geometries=_geometries, dist_run=dist_run)
        if out_dir is not None and result is not None:
            result.write_report(out_dir)
        return result
    except ProbeError as e:
        raise _for_caller(e)
    finally:
        if owned:
            reporter.close()


def _for_caller(error: BaseException) -> BaseException:
    """``error``, its message naming keywords and flags (:func:`probe.options.library_message`)
    when it is a :class:`ProbeError` raised for a library caller (not the ``probe`` command)."""
    if isinstance(error, ProbeError) and not CLI_CALL.get() and error.args:
        error.args = (library_message(str(error.args[0])), *error.args[1:])
    return error


#: ``id`` of the modules an :func:`analyze` call is capturing from now (hooks are per module).
_IN_USE: set[int] = set()
_IN_USE_LOCK = threading.Lock()


@contextlib.contextmanager
def _module_in_use(model: Any):
    """Mark an ``nn.Module`` given to :func:`analyze` as being analysed for the call, and give it
    back in the train/eval mode of each submodule it came in.

    Raises:
        ProbeError: the module is already being analysed (by another thread): its attention
            hooks would mix the two runs' images.
    """
    net = model.model if isinstance(model, ResolvedModel) else model
    if not isinstance(net, nn.Module):
        yield
        return
    with _IN_USE_LOCK:
        if id(net) in _IN_USE:
            raise ProbeError(f"this {type(net).__name__} is already being analysed by another probe.analyze call "
                             "(another thread); analyse a copy (copy.deepcopy(model)) or wait for that call")
        _IN_USE.add(id(net))
    modes = [(m, m.training) for m in net.modules()]
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
        with _IN_USE_LOCK:
            _IN_USE.discard(id(net))


def _distributed(distributed: Any, device: Any) -> Any:
    """``analyze(distributed=...)`` as a :class:`probe.distributed.Distributed` or ``None``.

    Raises:
        ProbeError: for a value that is neither a bool nor a ``Distributed``, or ``True`` outside
            a launcher's environment (:func:`probe.distributed.setup`).
    """
    if distributed is None or distributed is False:
        return None
    from .distributed import Distributed, setup

    if isinstance(distributed, Distributed):
        return distributed
    if distributed is True:
        return setup(device if isinstance(device, (str, torch.device)) else "cpu")
    raise ProbeError(f"distributed must be True, False or a probe.distributed.Distributed, got "
                     f"{type(distributed).__name__}")


def _selection(*, fits: bool, anisotropic: bool, conv_test: bool, conv_config: Any, null_seeds: int,
               null_images: int, null_layers: str, attribution: str, attribution_images: int, ig_steps: int,
               analyses: Any, analysis_options: Any) -> list[Analysis]:
    """The analyses to run: probe's own as the keyword flags select them, then ``analyses``,
    with ``analysis_options`` applied and requirements added (:func:`resolve_selection`).

    Raises:
        ProbeError: for unknown analyses or options, or bad option values.
    """
    if attribution not in ("none", "ig", "ablation", "both"):
        raise ProbeError(f"unknown --attribution {attribution!r}; use ig, ablation, both or none")
    if analysis_options is not None and not isinstance(analysis_options, dict):
        raise ProbeError(f"analysis_options must be a dict {{name: options}}, got {type(analysis_options).__name__}")
    opts = dict(analysis_options or {})
    flagged: dict[str, dict[str, Any]] = {}
    if fits or conv_test:
        flagged["quadratic"] = {"anisotropic": anisotropic}
    if conv_test:
        flagged["convlike"] = {"config": conv_config, "null_seeds": null_seeds, "null_images": null_images,
                               "null_layers": null_layers}
    if attribution != "none":
        flagged["attribution"] = {"method": attribution, "images": attribution_images, "ig_steps": ig_steps}
    chosen: list[Analysis] = []
    for name, values in flagged.items():
        extra = opts.pop(name, None)
        if dataclasses.is_dataclass(extra) and not isinstance(extra, type):
            chosen.append(make_analysis(name, extra))
        else:
            if extra is not None and not isinstance(extra, dict):
                raise ProbeError(f"analysis_options[{name!r}] must be an Options instance or a dict")
            chosen.append(make_analysis(name, {**values, **(extra or {})}))
    if analyses is not None and (isinstance(analyses, (str, Analysis)) or not isinstance(analyses, Sequence)):
        analyses = [analyses]
    for spec in analyses or []:
        name = spec if isinstance(spec, str) else getattr(spec, "name", None)
        chosen.append(make_analysis(spec, opts.pop(name, None) if isinstance(spec, (str, type)) else None))
    for name, extra in opts.items():  # options for an analysis its requirement pulls in, or a typo
        if not any(a.name == name for a in resolve_selection(chosen)):
            raise ProbeError(f"analysis_options names {name!r}, which is not selected; add it to analyses=[...]")
        chosen.append(make_analysis(name, extra))
    return resolve_selection(chosen)


def _run(model: Any, images: Any, selection: list[Analysis], reporter: ProgressReporter, *, t0: float,
         dev: torch.device, layers: Any, weights: Any, random_init: bool, num_images: int | None,
         batch_size: int, device: str, amp: bool, seed: int, n_bootstrap: int, prefix_tokens: Any, grid: Any,
         patch_size: Any, data_overrides: Any, query: Any, _geometries: Any, dist_run: Any = None
         ) -> AnalysisResult | None:
    """:func:`analyze` after its argument checks: resolve, capture, (all-reduce,) run the analyses."""
    try:
        setup = _setup(model, images, selection, reporter, layers=layers, weights=weights, random_init=random_init,
                       num_images=num_images, batch_size=batch_size, device=device, dev=dev, amp=amp, seed=seed,
                       n_bootstrap=n_bootstrap, prefix_tokens=prefix_tokens, grid=grid, patch_size=patch_size,
                       data_overrides=data_overrides, query=query, _geometries=_geometries, dist_run=dist_run)
    except Exception as e:
        if dist_run is not None:
            dist_run.agree(e)
        raise
    (resolved, net, image_set, transform, data_cfg, mode, selected, all_layers, geometries, geometry, ctx,
     sinks) = setup
    if dist_run is not None:  # every rank ready, with the same images and layers: capture
        dist_run.agree(None, facts={"images": len(image_set), "model": resolved.name,
                                    "layers": [l.index for l in selected], "batch_size": batch_size,
                                    "n_bootstrap": n_bootstrap, "seed": seed})

    keep = max([a.images_needed() for a in selection if "model" in a.consumes] or [0])
    # a distributed rank keeps at least one image: rank 0's example photo may come from a later rank
    keep_here = keep if dist_run is None else max(keep, 1)
    cap = _capture_pass(net, image_set, transform, mode, selected, all_layers, sinks, reporter, keep=keep_here,
                        batch_size=batch_size, dev=dev, amp=amp, data_cfg=data_cfg, name=resolved.name,
                        dist_run=dist_run)
    done, names, example, images_kept, capture, autocast = (cap.done, cap.names, cap.example, cap.images_kept,
                                                            cap.capture, cap.autocast)
    failure = cap.failure
    if dist_run is not None:
        dist_run.agree(failure)
        done, names, example, images_kept = _combine_ranks(dist_run, image_set, sinks, done, names, images_kept,
                                                           keep_here, data_cfg)
        if done == 0:  # on every rank: no rank could read an image
            raise ProbeError(
                f"none of the {len(image_set)} image file(s) in {image_set.description} could be read "
                "on any rank; pass a folder of JPEG/PNG images to --images")
        if not dist_run.is_main:
            return None
        if keep == 0:
            images_kept = None
        elif images_kept is not None:
            images_kept = images_kept[:keep]

    ctx.reduced = {}
    for index, pairs in sinks.items():
        for name, r in pairs:
            ctx.reduced.setdefault(name, {})[index] = r.result()
    ctx.images = images_kept
    ctx.image_names = names
    meta = _meta(resolved, image_set, selected, all_layers, geometry, geometries, data_cfg, dev, autocast,
                 capture, t0, done=done, names=names, batch_size=batch_size, seed=seed, n_bootstrap=n_bootstrap,
                 query=query, weights=weights, call=_call_text(model, images, layers=layers, weights=weights,
                                                               random_init=random_init, num_images=num_images,
                                                               seed=seed))
    if dist_run is not None:
        from .distributed import shard_range

        # [start, stop) of each rank's items (before replacements of unreadable files)
        meta["distributed"] = {"world_size": dist_run.world_size, "backend": dist_run.backend,
                               "shards": [list(shard_range(len(image_set), batch_size, r, dist_run.world_size))
                                          for r in range(dist_run.world_size)]}
    ctx.result = AnalysisResult(heads=pd.DataFrame(columns=["layer", "head"]), layers=pd.DataFrame(columns=["layer"]),
                                stats={}, geometry=geometry, meta=meta)
    ctx.result.extras["example_image"] = example  # the report's photo under the query maps
    skipped: dict[str, str] = {}
    for a in selection:
        _guard(a, a.run, ctx, skipped)
    meta["analyses"] = [a.name for a in selection if a.name not in skipped]
    meta["analyses_skipped"] = skipped
    meta["runtime_s"] = time.perf_counter() - t0
    return ctx.result


@dataclasses.dataclass
class _Captured:
    """What one capture pass over this process's images leaves (:func:`_capture_pass`)."""

    done: int
    names: list
    example: Any
    images_kept: torch.Tensor | None
    capture: Any
    autocast: Any
    failure: Exception | None


def _capture_pass(net: torch.nn.Module, image_set: Any, transform: Any, mode: str, selected: list, all_layers: list,
                  sinks: dict, reporter: ProgressReporter, *, keep: int, batch_size: int, dev: torch.device,
                  amp: bool, data_cfg: dict, name: str, dist_run: Any) -> _Captured:
    """The streaming pass: every batch of this process's images (its shard in a distributed run)
    through the model with the selected layers captured; each layer's attention
    ``(batch, heads, T, T)`` goes to its reducers (``sinks[layer]``, with the batch's global image
    indices where a reducer asks for them), the first ``keep`` images are kept (float, on ``dev``).

    Raises:
        ProbeError, CaptureError: in a single-process run; in a distributed one the exception is
            returned in ``failure`` so that every rank reaches the agreement after the pass.
    """
    def sink(index: int, attn: torch.Tensor, start: int) -> None:
        # a rule may deliver a batch in pieces (Swin's dense maps): each piece gets its images' indices
        for _, r in sinks[index]:
            if getattr(r, "uses_image_index", False):
                r.update(attn, image_index=batch_index[start:start + attn.shape[0]])
            else:
                r.update(attn)

    kept: list[torch.Tensor] = []  # the first `keep` images, for the analyses that re-run the model
    kept_n = done = 0
    names: list[str] = []
    example = capture = None
    batch_index: list[int] = []
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if (amp and dev.type == "cuda") else None
    skipped_before = len(image_set.skipped)
    failure: Exception | None = None
    try:  # in a distributed run every rank reaches the agreement after it, whatever fails here
        # the attention layer after the deepest selected one: later blocks need not run
        deepest = selected[-1].index
        stop_before = all_layers[deepest + 1].module if deepest + 1 < len(all_layers) else None
        capture = AttentionCapture(selected, sink, stop_before=stop_before, image_offsets=True)
        start, stop = (0, len(image_set)) if dist_run is None else dist_run.shard(len(image_set), batch_size)
        total = stop - start
        with reporter.stage("capture", total=total) as stage, capture, torch.no_grad():
            if isinstance(image_set, TensorImages):
                batches = image_set.indexed_batches(batch_size, start, stop)
            elif total == 0:
                batches = iter(())
            else:
                workers = image_set.workers
                if dist_run is not None and workers is None and not all(isinstance(i, tuple) for i in image_set.items):
                    # this rank's share of the machine's CPUs (an explicit --workers still wins)
                    workers = default_workers(total, batch_size,
                                              cpus=max(1, cpu_count() // max(1, dist_run.local_world_size)))
                batches = iter_indexed_batches(image_set, transform, batch_size, mode, workers=workers, start=start,
                                               stop=stop, reserve_part=(0, 1) if dist_run is None else
                                               (dist_run.rank, dist_run.world_size),
                                               require_any=dist_run is None)
            for batch, batch_names, batch_index in batches:
                batch = batch.to(dev, non_blocking=True)
                if kept_n < keep:
                    kept.append(batch[: keep - kept_n].float())
                    kept_n += kept[-1].shape[0]
                if autocast is not None:
                    with autocast:
                        capture.forward(net, batch)
                else:
                    capture.forward(net, batch)
                if done == 0:
                    capture.check_all_captured(name)
                    capture.arm_early_exit()
                    example = _example_photo(batch[0], data_cfg)
                done += batch.shape[0]
                names.extend(batch_names)
                stage.update(done + len(image_set.skipped) - skipped_before, total)
    except Exception as e:
        if dist_run is None:
            raise
        failure = e
    images_kept = torch.cat(kept) if kept else None
    return _Captured(done, names, example, images_kept, capture, autocast, failure)


def _setup(model: Any, images: Any, selection: list[Analysis], reporter: ProgressReporter, *, layers: Any,
           weights: Any, random_init: bool, num_images: int | None, batch_size: int, device: str,
           dev: torch.device, amp: bool, seed: int, n_bootstrap: int, prefix_tokens: Any, grid: Any,
           patch_size: Any, data_overrides: Any, query: Any, _geometries: Any, dist_run: Any) -> tuple:
    """Resolve the model and images, find the layers and geometries, check the analyses and make
    their reducers (no image is read yet).

    Raises:
        ProbeError: for anything that cannot be analysed; in a distributed run also for an
            analysis whose reducer cannot be merged across ranks.
    """
    resolved = model if isinstance(model, ResolvedModel) else resolve_model(
        model, weights=weights, random_init=random_init, seed=seed
    )
    _check_parameters(resolved)
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
        geometries = infer_geometries(net, selected, input_shape, prefix_tokens, grid, patch_size, resolved.name,
                                      context=all_layers)
    geometry = geometries[selected[0].index]
    if query is not None:
        _check_query(query, geometry)

    settings = RunSettings(seed=seed, n_bootstrap=n_bootstrap, batch_size=batch_size, device=dev, amp=amp,
                           num_images=num_images, prefix_tokens=prefix_tokens, grid=grid, patch_size=patch_size,
                           data_overrides=data_overrides, device_arg=device)
    rerun = functools.partial(_rerun, batch_size=batch_size, device=device, seed=seed, prefix_tokens=prefix_tokens,
                              grid=grid, patch_size=patch_size, data_overrides=data_overrides,
                              _geometries=geometries)
    ctx = AnalysisContext(model=resolved, net=net, layers=[l.index for l in selected],
                          layer_names={l.index: l.name for l in selected}, geometries=geometries,
                          settings=settings, image_set=image_set, progress=reporter, rerun=rerun)
    for a in selection:
        _guard(a, a.check, ctx, {})

    # streaming reducers of every "attention" analysis, fed layer by layer
    sinks: dict[int, list[tuple[str, Any]]] = {l.index: [] for l in selected}
    for a in selection:
        if "attention" in a.consumes:
            for l in selected:
                r = a.reducer(l.index, geometries[l.index], ctx)
                if r is not None:
                    sinks[l.index].append((a.name, r))
    if dist_run is not None:
        from .distributed import check_mergeable

        check_mergeable([pair for pairs in sinks.values() for pair in pairs])
    return (resolved, net, image_set, transform, data_cfg, mode, selected, all_layers, geometries, geometry, ctx,
            sinks)


def _combine_ranks(dist_run: Any, image_set: Any, sinks: dict, done: int, names: list[str],
                   kept: torch.Tensor | None, keep: int, data_cfg: dict) -> tuple:
    """After a distributed capture: all-reduce every reducer, and gather on rank 0 the image
    count, the names and skipped files in rank order (into ``image_set.skipped``), the first
    ``keep`` images and the example photo (the first of them).

    Returns:
        ``(images done, names, example photo, first images)``, the last three ``None`` / empty
        on ranks other than 0.
    """
    from .distributed import all_reduce_reducers

    all_reduce_reducers(dist_run, [r for pairs in sinks.values() for _, r in pairs])
    total = dist_run.sum_int(done)
    every = dist_run.all_gather_json({"names": names, "skipped": list(image_set.skipped)})
    first = dist_run.gather_first(kept, keep)
    if not dist_run.is_main:
        return total, [], None, None
    image_set.skipped[:] = [n for e in every for n in e["skipped"]]
    all_names = [n for e in every for n in e["names"]]
    example = _example_photo(first[0], data_cfg) if first is not None and len(first) else None
    return total, all_names, example, first


def _example_photo(x: torch.Tensor, data_cfg: dict) -> Any:
    """The first analysed image as the model sees it, ``(H, W, 3)`` uint8: the input ``(C, H, W)``
    with the transform's normalisation undone (``x · std + mean``); None for other channel counts."""
    import numpy as np

    c = x.shape[0]
    if c not in (1, 3):
        return None
    mean = torch.tensor([float(v) for v in data_cfg.get("mean", (0.0,) * c)], dtype=torch.float32)[:c].view(-1, 1, 1)
    std = torch.tensor([float(v) for v in data_cfg.get("std", (1.0,) * c)], dtype=torch.float32)[:c].view(-1, 1, 1)
    img = (x.detach().float().cpu() * std + mean).clamp(0, 1).mul(255).round().to(torch.uint8)
    img = img.expand(3, -1, -1) if c == 1 else img
    return np.ascontiguousarray(img.permute(1, 2, 0).numpy())


def _guard(analysis: Analysis, step: Callable[[AnalysisContext], None], ctx: AnalysisContext,
           skipped: dict[str, str]) -> None:
    """Run ``analysis.check`` or ``analysis.run``: a :class:`SkipAnalysis` is recorded in
    ``skipped``; after ``run``, the declared columns are checked.

    Raises:
        ProbeError: when ``run`` did not add the columns the analysis declares.
    """
    try:
        step(ctx)
    except SkipAnalysis as e:
        skipped[analysis.name] = e.reason
        return
    if step == analysis.run:
        heads, layers = analysis.columns()
        missing = [c for c in heads if c not in ctx.result.heads] + [c for c in layers if c not in ctx.result.layers]
        if missing:
            raise ProbeError(f"analysis {analysis.name!r} declares column(s) {missing} that its run did not add; "
                             "fix its head_columns/layer_columns or its run()")


def _rerun(model: Any, images: Any, **kw: Any) -> AnalysisResult:
    """:func:`analyze` for a nested run of an analysis (``AnalysisContext.rerun``); progress off
    unless given."""
    kw.setdefault("progress", False)
    return analyze(model, images, **kw)


def _meta(resolved: ResolvedModel, image_set: Any, selected: list, all_layers: list, geometry: Any,
          geometries: dict, data_cfg: dict, dev: torch.device, autocast: Any, capture: AttentionCapture,
          t0: float, *, done: int, names: list[str], batch_size: int, seed: int, n_bootstrap: int, query: Any,
          weights: Any, call: str) -> dict[str, Any]:
    """The run's metadata (``result.meta``), before the analyses add theirs."""
    return {
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
        "command": call,
        "weights_sha256": file_sha256(weights) if weights is not None else None,
        "image_root": str(image_set.root) if isinstance(image_set, ImageSet) and image_set.root else None,
        "versions": _versions(),
        "runtime_s": time.perf_counter() - t0,
    }


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


def _check_parameters(resolved: ResolvedModel) -> None:
    """The model's parameters and buffers hold values: none on the meta device (a model built
    without memory), and no parameter NaN or infinite (damaged weights, a diverged training;
    buffers may hold ``-inf`` masks).

    Raises:
        ProbeError: naming the model, its weights and the first bad tensor.
    """
    tensors = [*resolved.model.named_parameters(), *resolved.model.named_buffers()]
    meta = [n for n, t in tensors if t.is_meta]
    if meta:
        raise ProbeError(f"{resolved.name}: the model's tensors are on the meta device, without values (e.g. "
                         f"{meta[0]}); build it on the CPU (not under torch.device('meta') or init_empty_weights), "
                         "or materialise it (model.to_empty(device='cpu')) and load its weights")
    for n, t in resolved.model.named_parameters():  # buffers may hold -inf masks on purpose
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ProbeError(f"{resolved.name}: the weights ({resolved.weights}) hold NaN or infinite values, e.g. in "
                             f"{n}; the checkpoint is damaged or its training diverged — pass other weights")


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


#: Upper limits of the numeric settings (beyond them a run would overflow or exhaust memory, not
#: measure anything): seeds as NumPy and torch take them; token grids, patches and radii far
#: beyond any vision transformer's; the conv test's KxK lattice.
MAX_SEED = 2**32 - 1
MAX_GRID = 10_000
MAX_PIXELS_PER_TOKEN = 100_000.0
MAX_INPUT_SIDE = 16_384
MAX_KERNEL_SIZE = 64
MAX_LOCAL_RADIUS = 10_000.0
MIN_STD = 1e-6


def _check_ranges(*, seed: Any, prefix_tokens: Any, grid: Any, patch_size: Any, data_overrides: Any,
                  conv_config: Any) -> None:
    """The ranges of the numeric settings, before any work (the CLI's options arrive here too).

    Raises:
        ProbeError: naming the setting, the value, the allowed range and the fix.
    """
    import math

    def number(name: str, v: Any, lo: float, hi: float, fix: str) -> None:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and lo <= v <= hi
        if not ok:
            raise ProbeError(f"{name} must be a number from {lo:g} to {hi:g}, got {v!r}; {fix}")

    if isinstance(seed, int) and seed > MAX_SEED:
        raise ProbeError(f"seed must be from 0 to {MAX_SEED} (2**32 - 1), got {seed}; pick a smaller seed")
    if prefix_tokens is not None:
        _check_int("prefix_tokens (--prefix-tokens)", prefix_tokens, 0)
        number("prefix_tokens (--prefix-tokens)", prefix_tokens, 0, MAX_GRID, "count the class, distillation "
               "and register tokens")
    if grid is not None:
        if not (isinstance(grid, (tuple, list)) and len(grid) == 2 and all(isinstance(v, int) and not
                                                                            isinstance(v, bool) for v in grid)):
            raise ProbeError(f"grid must be two integers (rows, cols), got {grid!r}")
        for v in grid:
            number("grid (--grid) rows and cols", v, 1, MAX_GRID, "give the patch grid, e.g. 14x14")
    if patch_size is not None:
        number("patch_size (--patch-size)", patch_size, 1e-3, MAX_PIXELS_PER_TOKEN,
               "give the pixels per token, e.g. 16")
    overrides = data_overrides if isinstance(data_overrides, dict) else {}
    size = overrides.get("input_size")
    if isinstance(size, (tuple, list)) and len(size) == 3:
        number("the channels of input_size (--input-size C,H,W)", size[0], 1, 64, "give C,H,W, e.g. 3,224,224")
        for v in size[1:]:
            number("the height and width of input_size (--input-size C,H,W)", v, 1, MAX_INPUT_SIDE,
                   "give C,H,W, e.g. 3,224,224")
    for v in overrides.get("std") or ():
        if isinstance(v, (int, float)) and not v >= MIN_STD:
            raise ProbeError(f"std (--std) must be at least {MIN_STD:g} for every channel (images are divided by "
                             f"it), got {v!r}; give the normalisation's standard deviation, e.g. 0.229")
    for v in overrides.get("mean") or ():
        number("mean (--mean)", v, -1e6, 1e6, "give the normalisation's per-channel mean, e.g. 0.485")
    k = getattr(conv_config, "kernel_size", None)
    if k is not None:
        number("the conv test's kernel size (--kernel-size)", k, 1, MAX_KERNEL_SIZE,
               "give K of the KxK kernel, e.g. 3, or leave it out for the default")
    r = getattr(conv_config, "r_local", None)
    if r is not None:
        number("the conv test's local radius (--local-radius)", r, 1e-3, MAX_LOCAL_RADIUS,
               "give a radius in patches, e.g. 2")


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
