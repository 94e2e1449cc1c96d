"""probe's own analyses (:class:`~probe.analyses.base.Analysis` subclasses, registered) and the
steps they are made of.

* :class:`DistanceEntropy` (``distance_entropy``, every run): the streaming reducers
  (:class:`~probe.analyses.reducers.LayerReducer`) and the base heads/layers tables of
  :mod:`probe.tables`.
* :class:`QuadraticFits` (``quadratic``): Δ and α of every head (:func:`add_quadratic_fits`).
* :class:`ConvTest` (``convlike``): the conv-likeness test with its random-init null (a)
  (:func:`trial_conv_test`, :func:`random_init_scores`, :func:`add_conv_test`).
* :class:`HeadAttribution` (``attribution``): captum head attribution
  (:func:`probe.attribution.add_head_attribution`).

The steps (``add_*``) take an :class:`~probe.result.AnalysisResult`, add columns to its tables and
an entry to its extras; they see statistics and tables only. The analyses that need the model
(the conv test's null, attribution) get it through the
:class:`~probe.analyses.base.AnalysisContext`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from .analyses.base import (CORE, Analysis, AnalysisContext, ReportInput, SkipAnalysis, option,
                            register_analysis)
from .analyses.convlike import ConvLikeConfig, ConvLikeResult, LayerFit, convlike_score, convlike_test
from .analyses.quadratic import empirical_mass_radius, fit_layer_stats, max_disk_mass
from .errors import ProbeError
from .result import AnalysisResult

if TYPE_CHECKING:  # pragma: no cover
    from .progress import Stage

#: Attention mass of the measured locality radius ``r90_empirical_patches`` (90 %).
R90_MASS = 0.9


def add_quadratic_fits(result: AnalysisResult, anisotropic: bool = False, stage: Stage | None = None) -> None:
    """Fit Δ and α of every head (Cordonnier et al. 2020, Eq. 9) and add the columns.

    Adds the columns of :meth:`probe.analyses.quadratic.QuadraticFit.to_frame` and
    ``r90_empirical_patches`` (:func:`~probe.analyses.quadratic.empirical_mass_radius` around
    the fitted Δ over the queries whose target lies on the patch grid, so that it does not grow
    with the distance of the centre from the query; around the query for a head without a finite
    Δ) to ``result.heads``;
    ``result.extras["quadratic"] = {layer: QuadraticFit}``. ``stage`` (a progress stage) is
    advanced by one per fitted layer.
    """
    fits, frames = {}, []
    for layer, st in result.stats.items():
        fit = fit_layer_stats(st, anisotropic=anisotropic)
        frame = fit.to_frame()
        frame["r90_empirical_patches"] = empirical_mass_radius(st.mean_attn, st.geometry, fit.delta, R90_MASS,
                                                               on_grid=True)
        fits[layer] = fit
        frames.append(frame)
        if stage is not None:
            stage.advance()
    quad = pd.concat(frames, ignore_index=True)
    result.heads = result.heads.merge(quad, on=["layer", "head"], how="left")
    result.extras["quadratic"] = fits


def layer_fits(heads: pd.DataFrame, grids: dict[int, tuple[int, int]] | None = None) -> dict[int, LayerFit]:
    """Per-layer inputs of the conv test from a heads table with quadratic-fit columns.

    ``grids`` (``{layer: (rows, cols)}``, e.g. from the layers' token geometry) keeps each layer's
    kernel and dilations within its patch grid.

    Locality uses the measured ``r90_empirical_patches``; a head without a finite centre
    (``α = 0``) is placed at the query and, having a large radius, is non-local. The radius's
    standard error is carried over from α's bootstrap standard error by the delta method for a
    radius scaling as ``α^(-1/2)``: ``se(r90) = r90 · se(α) / (2α)``, so the verdict's stability
    reflects the uncertainty of locality as well as of the centres.
    """
    out = {}
    for layer, g in heads.groupby("layer", sort=True):
        delta = g[["delta_row", "delta_col"]].to_numpy(dtype=np.float64)
        finite = np.isfinite(delta).all(1)
        se = g[["delta_row_se", "delta_col_se"]].to_numpy(dtype=np.float64)
        r90 = g["r90_empirical_patches"].to_numpy(dtype=np.float64)
        r90_se = None
        if "alpha_se" in g and "alpha" in g:
            a, ase = g["alpha"].to_numpy(dtype=np.float64), g["alpha_se"].to_numpy(dtype=np.float64)
            with np.errstate(divide="ignore", invalid="ignore"):
                rs = r90 * ase / (2 * a)
            r90_se = np.where(np.isfinite(rs), rs, 0.0)
        out[int(layer)] = LayerFit(
            delta=np.where(finite[:, None], delta, 0.0),
            r90=r90,
            delta_se=np.where(np.isfinite(se), se, 0.0),
            r90_se=r90_se,
            grid=(grids or {}).get(int(layer)),
        )
    return out


def _grids(result: AnalysisResult) -> dict[int, tuple[int, int]]:
    """``{layer: patch grid}`` of a result's statistics."""
    return {int(l): tuple(st.geometry.grid) for l, st in result.stats.items()}


def _score(delta: np.ndarray, r90: np.ndarray, config: ConvLikeConfig, grid: tuple[int, int] | None) -> float:
    """Grid score of one layer; a head without a finite centre is placed at the query."""
    delta = np.where(np.isfinite(delta), delta, 0.0)
    return convlike_score(delta, r90=r90, kernel_size=config.kernel_size, r_local=config.r_local,
                          mass=config.mass, tolerance=config.tolerance, dilations=config.dilations, grid=grid)


def layer_scores(heads: pd.DataFrame, config: ConvLikeConfig,
                 grids: dict[int, tuple[int, int]] | None = None) -> dict[int, float]:
    """:func:`~probe.analyses.convlike.convlike_score` of every layer of a heads table."""
    return {layer: _score(f.delta, f.r90, config, f.grid) for layer, f in layer_fits(heads, grids).items()}


def stats_layer_scores(stats, config: ConvLikeConfig) -> dict[int, float]:
    """:func:`layer_scores` straight from the streaming statistics, fitting only where needed.

    Same scores as fitting every head (:func:`add_quadratic_fits`, no bootstrap) then
    :func:`layer_scores`: a layer in which no head can hold :data:`R90_MASS` of its attention
    within ``config.r_local`` of *any* centre (:func:`~probe.analyses.quadratic.max_disk_mass`)
    has no local head, so its score is 0 whatever the fitted Δ; only the other layers are
    fitted. Used for the random-init null, whose heads are almost never local.

    Args:
        stats: ``{layer: LayerStats}``.
        config: the conv-likeness thresholds.

    Returns:
        ``{layer: score}`` (sorted by layer).
    """
    out = {}
    for layer, st in sorted(stats.items()):
        mean_attn = st.mean_attn
        bound = max_disk_mass(mean_attn, st.geometry, config.r_local)
        total = mean_attn.sum(-1).mean(-1).numpy()  # (heads,), 1 up to rounding
        if not np.any(bound >= R90_MASS * total - 1e-9):
            out[int(layer)] = 0.0
            continue
        fit = fit_layer_stats(st, bootstrap=False)
        r90 = empirical_mass_radius(mean_attn, st.geometry, fit.delta, R90_MASS, on_grid=True)
        out[int(layer)] = _score(fit.delta, r90, config, tuple(st.geometry.grid))
    return out


def trial_conv_test(result: AnalysisResult, config: ConvLikeConfig) -> ConvLikeResult:
    """The conv-likeness test of the layers of ``result`` without the random-init null (a).

    Null (a) only adds the requirement that a layer's score exceed every random-init score, so
    the layers of ``conv_like_layers`` here are the only ones whose verdict it can change. Pass
    the result to :func:`add_conv_test` with the null (a) scores. Needs
    :func:`add_quadratic_fits` first.
    """
    return convlike_test(layer_fits(result.heads, _grids(result)), config=config)


def add_conv_test(result: AnalysisResult, config: ConvLikeConfig,
                  random_init_scores: dict[int, list[float]] | None = None,
                  trial: ConvLikeResult | None = None) -> None:
    """Test per layer whether the heads act like a K x K convolution (Cordonnier et al. 2020,
    Theorem 1) against the lattice-free null and, when given, the random-init null.

    Needs :func:`add_quadratic_fits` first. Adds the per-head ``conv_*`` columns to
    ``result.heads``, the per-layer ``conv_*`` columns to ``result.layers`` and
    ``result.extras["convlike"]`` (a :class:`~probe.analyses.convlike.ConvLikeResult`).
    ``trial``, the :func:`trial_conv_test` of the same result and config, is completed with the
    random-init scores instead of running the test (and its null draws) again.
    """
    if trial is None:
        cl = convlike_test(layer_fits(result.heads, _grids(result)), random_init=random_init_scores or None,
                           config=config)
    else:
        cl = trial.with_random_init(random_init_scores or None)
    result.heads = result.heads.merge(cl.heads.drop(columns=["conv_radius"], errors="ignore"),
                                      on=["layer", "head"], how="left")
    result.layers = result.layers.merge(cl.layers, on="layer", how="left")
    result.extras["convlike"] = cl


def random_init_scores(ctx: AnalysisContext, layers: list[int], config: ConvLikeConfig, n_seeds: int,
                       n_images: int, stage: Stage | None = None) -> dict[int, list[float]]:
    """Conv-likeness scores of random-init copies of the architecture (null (a) of the test).

    Each copy (seeds ``1000 + seed + i``) is analysed (``ctx.rerun``) on the first ``n_images``
    analysed images with the same layers, geometry options and fits, scored by
    :func:`stats_layer_scores`; returns ``{layer: [score per seed]}``. ``stage`` counts the
    images the copies have seen (``n_seeds * n_images`` in all).
    """
    from .data import ImageSet, TensorImages
    from .models import ResolvedModel
    from .progress import ChildProgress, NullProgress

    resolved, image_set = ctx.model, ctx.image_set
    if isinstance(image_set, TensorImages):
        per_copy = min(max(1, n_images), len(image_set))

        def subset_images() -> TensorImages:
            return TensorImages(image_set.pool, per_copy, image_set.description)
    else:
        subset = ImageSet(list(image_set.items[:max(1, n_images)]), image_set.description)
        per_copy = len(subset)

        def subset_images() -> ImageSet:
            return ImageSet(list(subset.items), subset.description)
    scores: dict[int, list[float]] = {l: [] for l in layers}
    base = 1000 + ctx.settings.seed
    for i in range(n_seeds):
        net = resolved.random_init(base + i)
        twin = ResolvedModel(net, resolved.name, f"random init (seed {base + i})",
                             resolved.num_params, resolved.pretrained_cfg, resolved.rebuild)
        progress = ChildProgress(stage, i * per_copy) if stage is not None else NullProgress()
        res = ctx.rerun(twin, subset_images(), layers=layers, n_bootstrap=0, conv_test=False, fits=False,
                        attribution="none", progress=progress)
        for layer, s in stats_layer_scores(res.stats, config).items():
            scores[layer].append(s)
    return scores


# -- the analyses ----------------------------------------------------------------------------


@register_analysis
class DistanceEntropy(Analysis):
    """Mean attention distance, entropy and prefix mass of every head (part of every run).

    Streams each batch into a :class:`~probe.analyses.reducers.LayerReducer` per layer
    (definitions in :mod:`probe.analyses.reducers`: Dosovitskiy et al. 2021, Fig. 7; entropy in
    nats), then sets ``result.stats`` (``{layer: LayerStats}``) and the base tables
    (:func:`probe.tables.heads_frame`, :func:`probe.tables.layers_frame`) that every other
    analysis joins on. Its plots are the report's base sections.
    """

    name = CORE
    title = "mean attention distance and entropy"
    consumes = ("attention",)
    head_columns = ("mean_distance_px", "mean_distance_patches", "prefix_mass", "entropy_nats",
                    "entropy_norm", "mean_distance_px_se", "entropy_nats_se")
    layer_columns = ("heads", "mean_distance_px", "min_distance_px", "max_distance_px", "entropy_nats",
                     "prefix_mass", "uniform_distance_px", "uniform_entropy_nats")

    def reducer(self, layer, geometry, ctx):
        from .analyses.reducers import LayerReducer

        return LayerReducer(layer, geometry, ctx.settings.n_bootstrap, ctx.settings.seed)

    def run(self, ctx: AnalysisContext) -> None:
        from .tables import heads_frame, layers_frame

        stats = [ctx.reduced[self.name][l] for l in ctx.layers]
        ctx.result.stats = {s.layer: s for s in stats}
        ctx.result.heads = heads_frame(stats)
        ctx.result.layers = layers_frame(ctx.result.heads, stats)


@dataclass(frozen=True)
class QuadraticOptions:
    """Options of :class:`QuadraticFits`."""

    anisotropic: bool = option(False, flag="--anisotropic", help="also fit the full 2x2 covariance form")


@register_analysis
class QuadraticFits(Analysis):
    """Δ and α of every head by maximum likelihood with the quadratic positional encoding of
    Cordonnier et al. (2020, Eq. 9), from the streaming sufficient statistics
    (:func:`add_quadratic_fits`); ``result.extras["quadratic"] = {layer: QuadraticFit}``."""

    name = "quadratic"
    title = "quadratic fits"
    consumes = ("stats",)
    Options = QuadraticOptions
    head_columns = ("delta_row", "delta_col", "delta_row_px", "delta_col_px", "alpha", "sigma_patches",
                    "r50_patches", "r90_patches", "b_row", "b_col", "quad_loglik_nats", "quad_ll_gain_nats",
                    "quad_kl_fit_nats", "quad_kl_explained", "delta_row_se", "delta_col_se", "delta_row_px_se",
                    "delta_col_px_se", "alpha_se", "quad_local", "quad_converged", "quad_status",
                    "r90_empirical_patches")
    report_order = 20

    def columns(self):
        heads, layers = super().columns()
        if self.options.anisotropic:
            heads += ("aniso_delta_row", "aniso_delta_col", "aniso_sigma_rr", "aniso_sigma_cc", "aniso_sigma_rc",
                      "aniso_ll_gain_nats", "aniso_status")
        return heads, layers

    def run(self, ctx: AnalysisContext) -> None:
        with ctx.stage("quadratic fits", total=len(ctx.layers)) as stage:
            add_quadratic_fits(ctx.result, anisotropic=self.options.anisotropic, stage=stage)

    @classmethod
    def section(cls, report: ReportInput):
        if "delta_row" not in report.heads:
            return None
        from .report.sections import quadratic_section

        return quadratic_section(report.heads, report.meta)


@dataclass(frozen=True)
class ConvTestOptions:
    """Options of :class:`ConvTest` (see the ``null_*`` arguments of :func:`probe.analyze`)."""

    config: ConvLikeConfig | None = option(None, help="thresholds of the test (default ConvLikeConfig(seed=seed))")
    null_seeds: int = option(3, flag="--null-seeds", help="random-init copies for null (a) (0: skip)")
    null_images: int = option(4, flag="--null-images", help="images each random-init copy sees")
    null_layers: Literal["candidates", "all"] = option(
        "candidates", flag="--null-layers", help="layers null (a) runs on: candidates (those it could veto) or all")

    def __post_init__(self) -> None:
        if self.null_layers not in ("candidates", "all"):
            raise ProbeError(f"unknown --null-layers {self.null_layers!r}; use candidates or all")
        for name, minimum in (("null_seeds", 0), ("null_images", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
                raise ProbeError(f"{name} must be an integer of at least {minimum}, got {v!r}")
        if self.config is not None and not isinstance(self.config, ConvLikeConfig):
            raise ProbeError(f"conv_config must be a ConvLikeConfig, got {type(self.config).__name__}")


@register_analysis
class ConvTest(Analysis):
    """Do layers act like K x K convolutions (Cordonnier et al. 2020, Theorem 1)? The test of
    :func:`probe.analyses.convlike.convlike_test` against the lattice-free null (b) and, on the
    layers it could veto (or all, ``null_layers="all"``), the random-init null (a): copies of
    the architecture at random initialisation re-analysed on the first ``null_images`` images
    (:func:`random_init_scores`). ``result.extras["convlike"]`` is the
    :class:`~probe.analyses.convlike.ConvLikeResult`; ``meta["conv_null_*"]`` say how null (a) ran."""

    name = "convlike"
    title = "conv test"
    consumes = ("stats", "model")
    requires = ("quadratic",)
    Options = ConvTestOptions
    head_columns = ("conv_local", "conv_tap", "conv_lattice_row", "conv_lattice_col", "conv_lattice_distance")
    layer_columns = ("conv_verdict", "conv_score", "conv_dilation", "conv_n_local", "conv_n_taps", "conv_p_value",
                     "conv_deterministic")
    report_order = 10

    def run(self, ctx: AnalysisContext) -> None:
        o, result, meta = self.options, ctx.result, ctx.result.meta
        cfg = o.config or ConvLikeConfig(seed=ctx.settings.seed)
        with ctx.stage("conv test", total=2) as stage:
            trial = trial_conv_test(result, cfg)
            stage.advance()
            null: dict[int, list[float]] = {}
            null_for: list[int] = []
            random_weights = ctx.model.weights.startswith("random init")
            if o.null_seeds > 0 and not random_weights:
                if o.null_layers == "all":
                    null_for = list(ctx.layers)
                else:  # null (a) can only veto: run it where the verdict is conv-like without it
                    null_for = trial.conv_like_layers
            if null_for:
                per_copy = min(o.null_images, len(ctx.image_set))
                with ctx.stage("conv-test null", total=o.null_seeds * per_copy) as null_stage:
                    null = random_init_scores(ctx, null_for, cfg, o.null_seeds, o.null_images, stage=null_stage)
            add_conv_test(result, cfg, null, trial=trial)
            stage.advance()
        meta["conv_null_layers_rule"] = o.null_layers
        meta["conv_null_status"] = (
            "off" if o.null_seeds <= 0 else "random weights" if random_weights
            else "run" if null else "not needed")
        meta["conv_null_layers"] = sorted(null)
        meta["conv_null_seeds"] = len(next(iter(null.values()), []))
        meta["conv_null_images"] = min(o.null_images, meta["num_images"]) if null else 0

    @classmethod
    def section(cls, report: ReportInput):
        from .report.sections import convlike_section

        return convlike_section(report.value, report.meta)


@dataclass(frozen=True)
class AttributionOptions:
    """Options of :class:`HeadAttribution`."""

    method: Literal["ig", "ablation", "both"] = option(
        "ig", flag="--attribution", help="ig (integrated gradients), ablation or both")
    images: int = option(16, flag="--attribution-images", help="the first N analysed images are attributed")
    ig_steps: int = option(16, help="integration steps of integrated gradients")

    def __post_init__(self) -> None:
        if self.method not in ("ig", "ablation", "both"):
            raise ProbeError(f"unknown --attribution {self.method!r}; use ig, ablation, both or none")
        for name in ("images", "ig_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ProbeError(f"attribution {name} must be an integer of at least 1, got {v!r}")

    @property
    def methods(self) -> tuple[str, ...]:
        return ("ig", "ablation") if self.method == "both" else (self.method,)


#: Random head sets of the ablation check (:func:`probe.attribution.add_head_attribution`'s
#: default), for the progress estimate.
_N_RANDOM = 10


def _no_logits_reason(net: Any, x: Any) -> str | None:
    """Why attribution cannot explain ``net`` (one image ``x`` of shape ``(1, C, H, W)`` through
    it): its output is not a ``(batch, classes)`` tensor (an encoder returning tokens, e.g. ViT-MAE's
    ``last_hidden_state``), else ``None``."""
    import torch

    from .attribution import as_logits

    with torch.no_grad():
        out = as_logits(net(x))
    if isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[1] >= 1:
        return None
    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    return (f"the model's output ({shape}) is not (batch, classes) logits: head attribution explains a "
            "class score; analyse a model with a classification head (num_classes > 0)")


@register_analysis
class HeadAttribution(Analysis):
    """Importance of every head for the predicted class's logit with captum (integrated
    gradients over per-head gates, Sundararajan et al. 2017; single-head ablation), set
    against head geometry, with the top-k-vs-random ablation check
    (:func:`probe.attribution.add_head_attribution`). Skipped, with the reason in
    ``meta["attribution_skipped"]``, for families without head gates."""

    name = "attribution"
    title = "head attribution"
    consumes = ("stats", "model")
    Options = AttributionOptions
    report_order = 30

    def columns(self):
        cols: tuple[str, ...] = ()
        for m in self.options.methods:
            cols += (f"importance_{m}", f"importance_{m}_se")
        return cols, ()

    def images_needed(self) -> int:
        return self.options.images

    def run(self, ctx: AnalysisContext) -> None:
        import torch

        from .attribution import add_head_attribution, imagenet_labels_or_none, unsupported_reason

        result, net = ctx.result, ctx.net
        reason = unsupported_reason(net, result.meta["layer_names"])
        if reason is not None:
            result.meta["attribution_skipped"] = reason
            raise SkipAnalysis(reason)
        x = ctx.images
        reason = _no_logits_reason(net, x[:1])
        if reason is not None:
            result.meta["attribution_skipped"] = reason
            raise SkipAnalysis(reason)
        labels = imagenet_labels_or_none(ctx.image_names[: x.shape[0]], int(getattr(net, "num_classes", 0) or 0))
        o = self.options
        n, nf = int(x.shape[0]), len(result.heads)
        # image rows through the model (an estimate: captum's batching decides the exact count)
        total = n + sum(n * (o.ig_steps + 2) if m == "ig" else n * (1 + nf) for m in o.methods)
        total += len(o.methods) * n * (2 + _N_RANDOM)
        with ctx.stage("attribution", total=total) as stage:
            def count(_module: Any, args: tuple, _out: Any) -> None:
                if args and isinstance(args[0], torch.Tensor):
                    stage.update(min(stage.done + int(args[0].shape[0]), total))

            handle = net.register_forward_hook(count)
            try:
                add_head_attribution(result, net, x, labels=labels, seed=ctx.settings.seed,
                                     n_steps=o.ig_steps, methods=o.methods)
            finally:
                handle.remove()

    @classmethod
    def section(cls, report: ReportInput):
        from .report.section_attribution import attribution_section

        return attribution_section(report.heads, report.value)
