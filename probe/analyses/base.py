"""One shape for every analysis: the :class:`Analysis` interface and its registry.

Capture rules (:mod:`probe.capture`) say how to read attention out of a model family; analyses
say what to compute from it. An analysis is a small class (the model is scikit-learn's
estimators and captum's ``Attribution`` classes: options in the constructor, one method that
does the work, results stored on a shared object) that declares

* ``name`` — its key: in ``probe.analyze(analyses=[name])``, ``result.extras[name]``,
  ``result.meta["analyses"]`` and the CLI's ``--analysis NAME`` / ``--set NAME.FIELD=VALUE``;
* ``consumes`` — any of ``"attention"`` (each batch's attention probabilities, through a
  streaming reducer from :meth:`Analysis.reducer`), ``"stats"`` (the finished
  :class:`~probe.analyses.reducers.LayerStats` and tables) and ``"model"`` (the analysed model and
  the first :meth:`Analysis.images_needed` analysed images, for forward passes of its own:
  attribution, rollout, random-init copies);
* ``requires`` — analyses that must run before it (added to the selection automatically);
* ``Options`` — a dataclass of its options with defaults (:func:`option` declares a field's CLI
  flag and help next to it);
* ``head_columns`` / ``layer_columns`` — the columns it adds to ``result.heads`` /
  ``result.layers`` (:meth:`Analysis.columns` for columns that depend on the options);
* :meth:`Analysis.section` — the report section that renders its results from tables, metadata
  and ``result.extras[name]`` only (the report knows no tensors).

:func:`register_analysis` adds a class to the registry; :func:`analyses` lists it. The run
(:func:`probe.pipeline.analyze`): check arguments -> resolve the model -> :meth:`Analysis.check`
of every selected analysis (before any image is read) -> one capture pass feeding every
reducer -> :meth:`Analysis.run` of each selected analysis in dependency order -> result.
See ``docs/analyses.md`` for a worked example.

Memory rule: a reducer keeps fixed-size sums per layer; nothing may grow with the number of
images (a model-consuming analysis gets at most the images it asked for).

This module imports neither torch nor numpy (``probe --help`` stays fast).
"""

from __future__ import annotations

import dataclasses
import importlib
import threading
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Protocol

from ..errors import ProbeError

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from ..geometry import TokenGeometry
    from ..progress import ProgressReporter, Stage
    from ..result import AnalysisResult

#: What an analysis may consume.
CONSUMES = ("attention", "stats", "model")

#: The analysis every run includes: the streaming statistics (``result.stats``) and the base
#: heads/layers tables (mean attention distance, entropy, prefix mass) every other one joins on.
CORE = "distance_entropy"

#: Modules whose import registers probe's own analyses, loaded on first use of the registry. A
#: new analysis module inside probe (``probe/analyses/nmi.py``, ...) adds its name here.
BUILTIN_MODULES: tuple[str, ...] = ("probe.steps", "probe.analyses.distance_modes", "probe.analyses.nmi",
                                    "probe.analyses.rollout", "probe.analyses.sinks")


class Reducer(Protocol):
    """A streaming reducer of one layer (what :meth:`Analysis.reducer` returns).

    ``update`` receives each batch of attention probabilities ``(batch, heads, queries, keys)``
    of its layer (float, rows sum to 1, on the run's device; under ``amp`` possibly bf16) and
    must not keep it; ``result`` is called once after the last batch.

    Distributed runs (:mod:`probe.distributed`): each rank feeds its own reducers with its shard
    of the images; ``state()`` then returns the accumulator as ``{name: tensor}`` (float64 or
    int64, ``None`` before the first batch) whose key-wise **sum** over ranks is the state of
    the whole image set, and ``load_state(summed)`` replaces the accumulator before ``result``
    (:func:`probe.distributed.all_reduce_reducers`). Keep sums only (a count, a float64 sum, a
    histogram), accumulated in float64 image by image, so that the merged result equals a
    single-process run to float64 rounding. A reducer without these methods runs in single-process
    runs only (a distributed run refuses it before any image is read). A reducer that sets
    ``uses_image_index = True`` receives ``update(attn, image_index=...)``: the batch's global
    image indices (int64 ``(batch,)``, increasing), e.g. to key per-image random draws
    (:class:`~probe.analyses.reducers.LayerReducer`'s bootstrap weights).
    """

    def update(self, attn: Any) -> None: ...

    def result(self) -> Any: ...

    def state(self) -> Any: ...

    def load_state(self, state: Any) -> None: ...


@dataclass(frozen=True)
class NoOptions:
    """Options of an analysis that has none."""


def option(default: Any, *, flag: str | None = None, help: str = "") -> Any:  # noqa: A002 - the CLI's word
    """A field of an ``Options`` dataclass with its CLI flag and help declared next to it.

    Every field can be set from the CLI as ``--set NAME.FIELD=VALUE``; ``flag`` names a
    dedicated flag where the CLI has one (e.g. ``--null-seeds``), shown by :func:`describe`.
    ``default`` must be immutable (a number, string, tuple, ``None`` or frozen dataclass).
    """
    return field(default=default, metadata={"flag": flag, "help": help})


class SkipAnalysis(Exception):
    """Raised by :meth:`Analysis.run` (or :meth:`Analysis.check`) when the analysis cannot run
    on this model or these settings; the run goes on and the reason is recorded in
    ``result.meta["analyses_skipped"][name]`` and shown in the report."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class RunSettings:
    """Run-wide settings every analysis may read (the ``probe.analyze`` arguments they come from).

    Attributes:
        seed: seed of image subset, random init and bootstrap weights.
        n_bootstrap: Poisson-bootstrap replicates kept by the reducers.
        batch_size: images per forward pass.
        device: the torch device (a ``torch.device``).
        amp: bf16 autocast on CUDA.
        num_images: the ``num_images`` argument (``None``: all).
        prefix_tokens, grid, patch_size, data_overrides: the geometry / transform overrides.
        device_arg: the ``device`` argument as given (for nested runs).
    """

    seed: int = 0
    n_bootstrap: int = 100
    batch_size: int = 16
    device: Any = "cpu"
    amp: bool = False
    num_images: int | None = None
    prefix_tokens: int | None = None
    grid: tuple[int, int] | None = None
    patch_size: float | None = None
    data_overrides: dict[str, Any] | None = None
    device_arg: str = "cpu"


@dataclass
class AnalysisContext:
    """What an analysis sees during a run (one object per run, shared by all analyses).

    Attributes:
        model: the :class:`~probe.models.ResolvedModel` (name, weights source, ``random_init``).
        net: the ``nn.Module`` in eval mode on ``settings.device``.
        layers: analysed attention-layer indices (ascending).
        layer_names: ``{layer: module name}``.
        geometries: ``{layer: TokenGeometry}``.
        settings: :class:`RunSettings`.
        image_set: the image source (:class:`~probe.data.ImageSet` or
            :class:`~probe.data.TensorImages`), for analyses that re-read images.
        progress: the run's :class:`~probe.progress.ProgressReporter` (use :meth:`stage`).
        rerun: ``rerun(model, images, **kw)`` = :func:`probe.analyze` with this run's settings
            (batch size, device, seed, geometry overrides, known geometries) and progress off
            unless ``progress=`` is passed; for analyses that analyse other models (the conv
            test's random-init copies).
        result: the :class:`~probe.result.AnalysisResult` being built (``None`` until the
            capture pass has finished).
        images: float ``(n, C, H, W)`` on ``settings.device``: the first
            ``max(images_needed())`` analysed images, transformed for the model (``None`` if no
            selected analysis asked for any).
        image_names: names of the analysed images in order (``len == result.meta["num_images"]``).
        reduced: ``{analysis name: {layer: reducer.result()}}``.
    """

    model: Any
    net: Any
    layers: list[int]
    layer_names: dict[int, str]
    geometries: dict[int, "TokenGeometry"]
    settings: RunSettings
    image_set: Any
    progress: "ProgressReporter"
    rerun: Callable[..., "AnalysisResult"]
    result: "AnalysisResult | None" = None
    images: Any = None
    image_names: list[str] = field(default_factory=list)
    reduced: dict[str, dict[int, Any]] = field(default_factory=dict)

    def stage(self, name: str, total: int | None = None) -> "Stage":
        """A named progress stage (``with ctx.stage("nmi", total=len(ctx.layers)) as s: s.advance()``)."""
        return self.progress.stage(name, total)

    @property
    def stats(self) -> dict:
        """``{layer: LayerStats}`` of the run (after the capture pass)."""
        return self.result.stats if self.result is not None else {}

    def add_head_columns(self, frame: "pd.DataFrame") -> None:
        """Join ``frame`` (columns ``layer``, ``head`` and the new ones) onto ``result.heads``
        (left join on ``(layer, head)``: row order and earlier columns unchanged).

        Raises:
            ProbeError: without the key columns, or when a new column already exists.
        """
        self.result.heads = _join(self.result.heads, frame, ["layer", "head"], "heads")

    def add_layer_columns(self, frame: "pd.DataFrame") -> None:
        """Join ``frame`` (column ``layer`` and the new ones) onto ``result.layers``, as
        :meth:`add_head_columns`."""
        self.result.layers = _join(self.result.layers, frame, ["layer"], "layers")


def _join(table: "pd.DataFrame", frame: "pd.DataFrame", keys: list[str], what: str) -> "pd.DataFrame":
    missing = [k for k in keys if k not in frame.columns]
    if missing:
        raise ProbeError(f"columns added to the {what} table need the key column(s) {missing}")
    clash = [c for c in frame.columns if c not in keys and c in table.columns]
    if clash:
        raise ProbeError(f"column(s) {clash} are already in the {what} table; an analysis adds new columns only")
    return table.merge(frame, on=keys, how="left")


@dataclass
class ReportInput:
    """What a report section gets: tables, metadata and the analysis's extras (no tensors).

    Attributes:
        heads, layers: the result's tables.
        meta: the result's metadata.
        extras: all of ``result.extras``.
        value: ``result.extras[name]`` of the analysis being rendered.
    """

    heads: "pd.DataFrame"
    layers: "pd.DataFrame"
    meta: dict[str, Any]
    extras: dict[str, Any]
    value: Any = None


class Analysis:
    """Base class of every analysis (see the module doc and ``docs/analyses.md``).

    Subclass, set the class attributes, implement :meth:`run` (and :meth:`reducer` for a
    streaming one, :meth:`section` for a report section) and decorate with
    :func:`register_analysis`. Construct with an ``Options`` instance, a dict, or keywords:
    ``MyAnalysis()``, ``MyAnalysis(threshold=0.2)``, ``MyAnalysis(MyAnalysis.Options(0.2))``.

    Raises (constructor):
        ProbeError: for an unknown option name or a value the ``Options`` reject.
    """

    name: ClassVar[str] = ""
    #: Human-readable name (report section title, progress stage, ``describe``).
    title: ClassVar[str] = ""
    consumes: ClassVar[tuple[str, ...]] = ("stats",)
    requires: ClassVar[tuple[str, ...]] = ()
    Options: ClassVar[type] = NoOptions
    head_columns: ClassVar[tuple[str, ...]] = ()
    layer_columns: ClassVar[tuple[str, ...]] = ()
    #: Position of the section in the report (lower first); probe's: conv test 10,
    #: quadratic fits 20, attribution 30.
    report_order: ClassVar[int] = 100

    def __init__(self, options: Any = None, **kw: Any) -> None:
        cls = type(self)
        if options is not None and kw:
            raise ProbeError(f"{cls.__name__}: pass options either as an Options instance/dict or as keywords")
        if options is None:
            options = kw
        if isinstance(options, cls.Options):
            self.options = options
        elif isinstance(options, dict):
            names = {f.name for f in dataclasses.fields(cls.Options)}
            unknown = sorted(set(options) - names)
            if unknown:
                raise ProbeError(f"analysis {cls.name!r} has no option(s) {unknown}; its options: "
                                 f"{sorted(names) or 'none'}")
            self.options = cls.Options(**options)
        else:
            raise ProbeError(f"options of analysis {cls.name!r} must be a {cls.Options.__name__} or a dict, "
                             f"got {type(options).__name__}")

    # -- what the pipeline calls -------------------------------------------------------------
    def check(self, ctx: AnalysisContext) -> None:
        """Check the options against the model and geometry before any image is read (raise
        :class:`~probe.errors.ProbeError` naming the problem and the fix). ``ctx.result`` is
        ``None`` here."""

    def images_needed(self) -> int:
        """How many of the first analysed images a ``"model"`` analysis needs in ``ctx.images``
        (kept during the capture pass; 0: none)."""
        return 0

    def reducer(self, layer: int, geometry: "TokenGeometry", ctx: AnalysisContext) -> Reducer | None:
        """The streaming reducer of one analysed layer (``"attention"`` analyses), or ``None``
        to skip the layer. Its results arrive in ``ctx.reduced[self.name][layer]``."""
        return None

    def run(self, ctx: AnalysisContext) -> None:
        """Do the work after the capture pass: add columns (:meth:`AnalysisContext.add_head_columns`,
        :meth:`AnalysisContext.add_layer_columns`), put results in ``ctx.result.extras[self.name]``
        (what :meth:`section` renders), metadata in ``ctx.result.meta``; raise
        :class:`SkipAnalysis` when it cannot run."""
        raise NotImplementedError(f"{type(self).__name__}.run")

    def columns(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """``(head columns, layer columns)`` this configured analysis adds (default: the class
        attributes). After :meth:`run` the pipeline checks that they are present."""
        return tuple(self.head_columns), tuple(self.layer_columns)

    @classmethod
    def section(cls, report: ReportInput) -> dict[str, str] | None:
        """The report section, ``{"title": ..., "html": ...}`` (figures as data URIs), or
        ``None``. Called when ``result.extras`` holds ``name``; reads ``report`` only."""
        return None

    @classmethod
    def files(cls, report: ReportInput) -> dict[str, bytes]:
        """Extra files for the output folder, ``{file name: bytes}`` (e.g. rollout's
        ``rollout.npz``), written with the report and by :meth:`AnalysisResult.save` as part of
        the same atomic set. Called when ``result.extras`` holds ``name``; default none."""
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options!r})"


_REGISTRY: dict[str, type[Analysis]] = {}
_LOADED = False
_LOADING = threading.local()  # .active: this thread is importing BUILTIN_MODULES
_LOAD_LOCK = threading.Lock()  # guards _REGISTRY


def register_analysis(cls: type[Analysis] | None = None) -> Any:
    """Register an :class:`Analysis` subclass under its ``name`` (a decorator; also callable as
    ``register_analysis(MyAnalysis)``). A later registration of the same name replaces the
    earlier one (re-running a notebook cell).

    Raises:
        ProbeError: for a class that is not an ``Analysis`` subclass, an empty or non-identifier
            name, an unknown ``consumes`` entry, or ``Options`` that is not a dataclass.
    """
    if cls is None:
        return register_analysis
    _ensure_builtin()  # probe's own first in the run order, whoever registers first
    if not (isinstance(cls, type) and issubclass(cls, Analysis)):
        raise ProbeError(f"register_analysis takes an Analysis subclass, got {cls!r}")
    if not cls.name or not cls.name.isidentifier():
        raise ProbeError(f"{cls.__name__}.name must be a Python identifier (e.g. 'rollout'), got {cls.name!r}")
    bad = [c for c in cls.consumes if c not in CONSUMES]
    if bad or not cls.consumes:
        raise ProbeError(f"{cls.__name__}.consumes must list some of {CONSUMES}, got {cls.consumes!r}")
    if not dataclasses.is_dataclass(cls.Options):
        raise ProbeError(f"{cls.__name__}.Options must be a dataclass")
    with _LOAD_LOCK:
        _REGISTRY.pop(cls.name, None)  # a replacement moves to the end of the run order
        _REGISTRY[cls.name] = cls
    return cls


def unregister_analysis(name: str) -> None:
    """Remove ``name`` from the registry (no error when absent); probe's own cannot be removed.

    Raises:
        ProbeError: for :data:`CORE`.
    """
    if name == CORE:
        raise ProbeError(f"{CORE!r} is part of every run and cannot be unregistered")
    with _LOAD_LOCK:
        _REGISTRY.pop(name, None)


#: Output-folder files of probe itself, which an analysis's :meth:`Analysis.files` may not replace.
RESERVED_FILES = frozenset({"report.html", "heads.csv", "layers.csv", "images.txt", "result.json",
                            "stats.safetensors", "stats.safetensors.gz", "extras.safetensors"})


def analysis_files(heads: "pd.DataFrame", layers: "pd.DataFrame", meta: dict[str, Any],
                   extras: dict[str, Any]) -> dict[str, bytes]:
    """The extra files (:meth:`Analysis.files`) of every registered analysis whose results are in
    ``extras``, ``{file name: bytes}``.

    Raises:
        ProbeError: a file name that is a path, one of probe's own files (:data:`RESERVED_FILES`),
            or claimed by two analyses.
    """
    out: dict[str, bytes] = {}
    for name, cls in analyses().items():
        if name not in extras:
            continue
        for fname, data in cls.files(ReportInput(heads, layers, meta, extras, value=extras[name])).items():
            if "/" in fname or "\\" in fname or fname in ("", ".", "..") or fname in RESERVED_FILES:
                raise ProbeError(f"analysis {name!r} asks to write {fname!r}: an analysis file is a plain "
                                 f"new file name, not a path or one of {sorted(RESERVED_FILES)}; rename it")
            if fname in out:
                raise ProbeError(f"two analyses write {fname!r}; rename the file of analysis {name!r}")
            out[fname] = bytes(data)
    return out


def _ensure_builtin() -> None:
    """Import :data:`BUILTIN_MODULES` (they register themselves), thread-safely: every calling
    thread imports them itself until one thread has finished all of them, so the registry is
    marked loaded only after every import returned (Python's import locks make a thread wait for
    a module another thread is importing); the importing thread's own nested calls (a module
    registering itself) return at once. No lock is held across an import (no deadlock with a
    thread importing one of the modules directly)."""
    global _LOADED
    if _LOADED or getattr(_LOADING, "active", False):
        return
    _LOADING.active = True
    try:
        for mod in BUILTIN_MODULES:
            importlib.import_module(mod)
    finally:
        _LOADING.active = False
    _LOADED = True


def analyses() -> dict[str, type[Analysis]]:
    """The registered analyses, ``{name: class}``, in run order: probe's own first, in the order
    of :data:`BUILTIN_MODULES` (whichever module happened to be imported first), then the others
    in registration order."""
    _ensure_builtin()
    rank = {m: i for i, m in enumerate(BUILTIN_MODULES)}
    with _LOAD_LOCK:
        items = list(_REGISTRY.items())
    return dict(sorted(items, key=lambda kv: rank.get(kv[1].__module__, len(rank))))


def get_analysis(name: str) -> type[Analysis]:
    """The registered class called ``name``.

    Raises:
        ProbeError: for an unknown name (listing the known ones).
    """
    reg = analyses()
    if name not in reg:
        raise ProbeError(f"unknown analysis {name!r}; registered: {', '.join(reg)} "
                         "(register one with probe.analyses.base.register_analysis, see docs/analyses.md)")
    return reg[name]


def make_analysis(spec: Any, options: Any = None) -> Analysis:
    """An :class:`Analysis` instance from a name (with ``options``: instance or dict), a
    registered class, or an instance (returned as is; ``options`` must then be ``None``).

    Raises:
        ProbeError: for an unknown name, an unregistered class or instance, or bad options.
    """
    if isinstance(spec, Analysis):
        cls = type(spec)
        if analyses().get(cls.name) is not cls:
            raise ProbeError(f"analysis {cls.__name__} ({cls.name!r}) is not registered; decorate it with "
                             "@register_analysis")
        if options is not None:
            raise ProbeError(f"analysis {cls.name!r} was passed as an instance; set its options in the constructor")
        return spec
    if isinstance(spec, type) and issubclass(spec, Analysis):
        if analyses().get(spec.name) is not spec:
            raise ProbeError(f"analysis {spec.__name__} ({spec.name!r}) is not registered; decorate it with "
                             "@register_analysis")
        return spec(options)
    if isinstance(spec, str):
        return get_analysis(spec)(options)
    raise ProbeError(f"an analysis is a registered name, class or instance, got {type(spec).__name__}")


def resolve_selection(chosen: list[Analysis]) -> list[Analysis]:
    """The analyses to run, in order: :data:`CORE` first, every requirement added (default
    options) before its dependant, the rest in registry order.

    Raises:
        ProbeError: for the same analysis selected twice with different options, or a
            requirement cycle.
    """
    reg = analyses()
    by_name: dict[str, Analysis] = {}
    for a in chosen:
        old = by_name.get(a.name)
        if old is not None and old.options != a.options:
            raise ProbeError(f"analysis {a.name!r} was selected twice with different options "
                             f"({old.options} and {a.options}); select it once")
        by_name.setdefault(a.name, a)
    if CORE not in by_name:
        by_name[CORE] = make_analysis(CORE)
    order = {n: i for i, n in enumerate(reg)}
    out: list[Analysis] = []
    state: dict[str, int] = {}

    def visit(name: str, path: tuple[str, ...]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            raise ProbeError(f"analysis requirements form a cycle: {' -> '.join(path + (name,))}")
        state[name] = 1
        a = by_name.get(name) or by_name.setdefault(name, make_analysis(name))
        for req in sorted(({CORE} | set(a.requires)) - {name}, key=lambda n: order.get(n, len(order))):
            visit(req, path + (name,))
        state[name] = 2
        out.append(a)

    for name in sorted(by_name, key=lambda n: order.get(n, len(order))):
        visit(name, ())
    return out


def _field_type(cls: type, f: dataclasses.Field) -> Any:
    try:
        return typing.get_type_hints(cls).get(f.name, f.type)
    except Exception:  # noqa: BLE001 - unresolved annotations: fall back to the default's type
        return type(f.default) if f.default is not dataclasses.MISSING else str


def _convert(text: str, tp: Any, where: str) -> Any:
    """``text`` as a value of the annotated type ``tp`` (bool, int, float, str, Optional, Literal)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or (origin is not None and type(None) in args and origin.__name__ == "UnionType"):
        if text.strip().lower() in ("none", "null", ""):
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _convert(text, inner[0], where)
        for a in inner:
            try:
                return _convert(text, a, where)
            except ProbeError:
                continue
        raise ProbeError(f"{where}: cannot read {text!r} as {tp}")
    if origin is typing.Literal:
        if text not in [str(a) for a in args]:
            raise ProbeError(f"{where}: {text!r} is not one of {list(args)}")
        return next(a for a in args if str(a) == text)
    if tp is bool:
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ProbeError(f"{where}: {text!r} is not a boolean (true/false)")
    if tp in (int, float):
        try:
            return tp(text)
        except ValueError:
            raise ProbeError(f"{where}: {text!r} is not {'an integer' if tp is int else 'a number'}") from None
    if tp is str or tp is typing.Any:
        return text
    raise ProbeError(f"{where}: options of type {tp} cannot be set from the command line; use the library")


def parse_assignments(items: list[str] | None) -> dict[str, dict[str, Any]]:
    """The CLI's ``--set NAME.FIELD=VALUE`` items as ``{analysis: {field: value}}``, each value
    converted to the field's annotated type.

    Raises:
        ProbeError: for a malformed item, an unknown analysis or field, or an unreadable value.
    """
    out: dict[str, dict[str, Any]] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        name, dot, fname = key.strip().partition(".")
        if not sep or not dot or not name or not fname:
            raise ProbeError(f"--set {item!r} must be ANALYSIS.OPTION=VALUE, e.g. --set quadratic.anisotropic=true")
        cls = get_analysis(name)
        fields = {f.name: f for f in dataclasses.fields(cls.Options)}
        if fname not in fields:
            raise ProbeError(f"--set {item!r}: analysis {name!r} has no option {fname!r}; its options: "
                             f"{sorted(fields) or 'none'}")
        out.setdefault(name, {})[fname] = _convert(value, _field_type(cls.Options, fields[fname]), f"--set {item!r}")
    return out


def describe() -> str:
    """The registered analyses with what they consume, their options (defaults, CLI flags) and
    columns, as plain text."""
    lines = []
    for name, cls in analyses().items():
        lines.append(f"{name}: {cls.title or cls.__name__} (consumes {', '.join(cls.consumes)}"
                     + (f"; requires {', '.join(cls.requires)}" if cls.requires else "") + ")")
        for f in dataclasses.fields(cls.Options):
            flag = f.metadata.get("flag")
            lines.append(f"    {name}.{f.name} = {f.default!r}" + (f"  [{flag}]" if flag else "")
                         + (f"  {f.metadata['help']}" if f.metadata.get("help") else ""))
        if cls.head_columns:
            lines.append(f"    heads columns: {', '.join(cls.head_columns)}")
        if cls.layer_columns:
            lines.append(f"    layers columns: {', '.join(cls.layer_columns)}")
    return "\n".join(lines)
