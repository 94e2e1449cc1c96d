"""The model-source interface and its registry.

A :class:`ModelSource` turns one kind of ``--model`` spec (a string, or an object such as an
in-memory ``nn.Module``) into a :class:`ResolvedModel`: it recognises the spec
(:meth:`ModelSource.handles`), names the architecture's constructor
(:meth:`ModelSource.architecture`, which is also how the model is rebuilt at random
initialisation for null distributions), loads ``--weights FILE`` (:meth:`ModelSource.load_weights`)
or the source's own trained weights (:meth:`ModelSource.pretrained`), and gives the data config
of the input transform (:meth:`ModelSource.data_config`). The default :meth:`ModelSource.resolve`
combines these steps; a source with its own loading logic (Hugging Face) overrides it.

Sources are registered like capture rules (:func:`probe.capture.register_rule`): the built-in
ones when :mod:`probe.model_sources` is first imported, then those installed packages declare
under the entry-point group :data:`ENTRY_POINT_GROUP` (:func:`load_entry_points`), and a user's
with :func:`register_source`; plug-ins and user sources are tried before the built-ins. :func:`find_source` returns the first source whose
``handles`` is true. A source that sets :attr:`ModelSource.scheme` (``"open_clip"``) claims every
string ``"open_clip:..."``; the ``package.module:factory`` source leaves claimed schemes alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..errors import ProbeError

#: ``make(seed) -> nn.Module``: the architecture at random initialisation. The caller seeds
#: torch's global RNG with ``seed`` first (:meth:`ResolvedModel.random_init` inside
#: ``torch.random.fork_rng``); ``seed`` is passed for constructors that take one.
Constructor = Callable[[int], nn.Module]


@dataclass
class ResolvedModel:
    """A model ready for analysis.

    Attributes:
        model: the ``nn.Module`` in eval mode.
        name: the resolved model name (timm name, factory path or class name).
        weights: human-readable source of the weights (file path, hub id, "random init", ...).
        num_params: number of parameters.
        pretrained_cfg: timm-style data config dict (``input_size``, ``mean``, ``std``,
            ``interpolation``, ``crop_pct``) when known, else empty.
        rebuild: ``rebuild(seed) -> nn.Module``, the same architecture at its random
            initialisation (used by null distributions), or ``None`` when unknown.
    """

    model: nn.Module
    name: str
    weights: str
    num_params: int
    pretrained_cfg: dict[str, Any]
    rebuild: Callable[[int], nn.Module] | None = None

    def random_init(self, seed: int) -> nn.Module:
        """The same architecture at random initialisation with ``seed``, in eval mode.

        Uses the model's own constructor (timm name or factory); for an in-memory module, a deep
        copy whose submodules' ``reset_parameters`` (and timm ``init_weights``) are re-run.
        """
        with torch.random.fork_rng(devices=[]):  # the caller's global RNG state is left alone
            torch.manual_seed(seed)
            if self.rebuild is not None:
                net = self.rebuild(seed)
            else:
                import copy

                net = copy.deepcopy(self.model)
                for mod in net.modules():
                    if hasattr(mod, "reset_parameters"):
                        mod.reset_parameters()
                if hasattr(net, "init_weights"):
                    try:
                        net.init_weights()
                    except TypeError:
                        pass
        return net.to(next(self.model.parameters()).device).eval()


class ModelSource:
    """Where models of one kind come from: recognise a spec, build, load weights, data config.

    Subclasses set :attr:`name` and implement :meth:`handles` and :meth:`architecture`; they
    override :meth:`pretrained` when the source has trained weights of its own (a hub, a cache,
    a shipped file), :meth:`load_weights` when ``--weights`` files need a key mapping,
    :meth:`data_config` when the module does not carry a timm ``pretrained_cfg``, and
    :meth:`resolve` only when the steps do not fit (see :class:`probe.model_sources.hf.HFSource`).
    Errors caused by the spec or the files are :class:`~probe.errors.ProbeError` with a one-line
    message naming the fix.
    """

    #: Short label, shown in :func:`describe_sources` and error messages.
    name: str = "source"
    #: ``"open_clip"`` claims every string spec ``"open_clip:..."`` (so the
    #: ``package.module:factory`` source does not take it); ``None`` for sources without a prefix.
    scheme: str | None = None
    #: One example spec, for the docs table and the unknown-spec message.
    example: str = ""

    def handles(self, spec: Any) -> bool:
        """True if this source resolves ``spec`` (a ``--model`` string, ``None``, a module, ...).
        Must not raise and should be cheap (no model construction, no network). Default: a string
        that starts with ``scheme + ":"`` (a source without a ``scheme`` must override this)."""
        if not self.scheme:
            raise NotImplementedError(f"{type(self).__name__}.handles (a source without a scheme)")
        return isinstance(spec, str) and spec.startswith(self.scheme + ":")

    def display_name(self, spec: Any) -> str:
        """The model's name in reports (``ResolvedModel.name``); may raise ProbeError for a spec
        this source recognises but cannot resolve (an unknown architecture, with suggestions)."""
        return str(spec)

    def architecture(self, spec: Any) -> Constructor:
        """The constructor ``make(seed) -> nn.Module`` of the architecture ``spec`` names, at
        random initialisation (the caller seeds torch's RNG). Used to build the model for
        ``--weights`` / ``--random-init`` and as ``ResolvedModel.rebuild``.

        Raises:
            ProbeError: the spec names no buildable architecture.
        """
        raise NotImplementedError

    def load_weights(self, net: nn.Module, spec: Any, path: str | Path) -> str:
        """Load the checkpoint file ``path`` (``--weights``) into ``net`` in place, strictly.

        Default: :func:`~probe.model_sources.checkpoint.load_state_dict` (safetensors or
        ``torch.load(weights_only=True)``) and
        :func:`~probe.model_sources.checkpoint.apply_state_dict`.

        Returns:
            The label of the weights in the report (default: the path).

        Raises:
            ProbeError: unreadable file, or keys / shapes that do not match ``net``.
        """
        from . import checkpoint

        checkpoint.apply_state_dict(net, checkpoint.load_state_dict(path), self.display_name(spec), str(path))
        return str(path)

    def pretrained(self, spec: Any, make: Constructor, seed: int) -> tuple[nn.Module, str]:
        """The model with the source's own trained weights, when neither ``--weights`` nor
        ``--random-init`` is given.

        Returns:
            ``(module, label of the weights)``.

        Raises:
            ProbeError: by default (no weights of its own), naming ``--weights FILE`` and
                ``--random-init``; for a download that cannot happen (hub unreachable), the same.
        """
        raise ProbeError(
            f"--model {spec!s} ({self.name}) has no trained weights probe can load by itself: pass "
            "them with --weights FILE (or --random-init to analyse it untrained)"
        )

    def data_config(self, net: nn.Module, spec: Any) -> dict[str, Any]:
        """timm-style data config of the input transform: ``input_size`` ``(C, H, W)``, ``mean``,
        ``std``, ``interpolation``, ``crop_pct``, ``crop_mode`` (read by
        :func:`probe.data.eval_transform`). Default: the module's own ``pretrained_cfg`` (timm),
        else empty (then timm's defaults, overridable with ``--input-size``/``--mean``/``--std``)."""
        return dict(getattr(net, "pretrained_cfg", None) or {})

    def resolve(self, spec: Any, weights: str | Path | None = None, random_init: bool = False,
                seed: int = 0) -> ResolvedModel:
        """Build ``spec`` and load its weights: ``--weights`` into :meth:`architecture`'s model,
        or the architecture at random init (seed ``seed``, torch's global RNG seeded), or
        :meth:`pretrained`. The module is put in eval mode and, when it carries no
        ``pretrained_cfg`` yet, given :meth:`data_config`'s (probe's input transform reads it
        from the module).

        Raises:
            ProbeError: from the steps; ``weights`` with ``random_init``.
        """
        if weights is not None and random_init:
            raise ProbeError("--weights and --random-init exclude each other; pass one")
        name = self.display_name(spec)
        make = self.architecture(spec)
        if weights is not None or random_init:
            torch.manual_seed(seed)
            net = make(seed)
            label = self.load_weights(net, spec, weights) if weights is not None else f"random init (seed {seed})"
        else:
            net, label = self.pretrained(spec, make, seed)
        net.eval()
        cfg = self.data_config(net, spec)
        if cfg and getattr(net, "pretrained_cfg", None) != cfg:
            net.pretrained_cfg = dict(cfg)
        return ResolvedModel(model=net, name=name, weights=label,
                             num_params=sum(p.numel() for p in net.parameters()),
                             pretrained_cfg=dict(cfg), rebuild=make)

    def __repr__(self) -> str:
        return f"<model source {self.name!r}>"


_SOURCES: list[ModelSource] = []


def _ensure_builtins() -> None:
    """Register the built-in sources (:mod:`probe.model_sources`) on first use."""
    import importlib

    importlib.import_module("probe.model_sources")


def register_source(source: ModelSource, first: bool = True) -> None:
    """Add a model source; by default it is tried before the existing ones (the built-in sources
    are registered first, so a user's source is tried before them). Registering a source whose
    :attr:`~ModelSource.name` is already registered replaces that one.

    Raises:
        ProbeError: ``source`` is not a :class:`ModelSource`, or has neither a ``scheme`` nor its
            own ``handles``.
    """
    if not isinstance(source, ModelSource):
        raise ProbeError(f"register_source needs a probe.model_sources.ModelSource, got {type(source).__name__}")
    if not source.scheme and type(source).handles is ModelSource.handles:
        raise ProbeError(f"model source {type(source).__name__} sets no scheme and does not define handles(spec); "
                         "give it a scheme (it then claims 'scheme:...') or a handles method")
    _ensure_builtins()
    _SOURCES[:] = [s for s in _SOURCES if s.name != source.name]
    if first:
        _SOURCES.insert(0, source)
    else:
        _SOURCES.append(source)


def _register_builtin(source: ModelSource) -> None:
    """Append a built-in source (used by :mod:`probe.model_sources` while it is imported)."""
    _SOURCES[:] = [s for s in _SOURCES if s.name != source.name]
    _SOURCES.append(source)


#: Entry-point group through which an installed package contributes model sources
#: (``[project.entry-points."probe.model_sources"] name = "package.module:MySource"``).
ENTRY_POINT_GROUP = "probe.model_sources"


def load_entry_points(group: str = ENTRY_POINT_GROUP) -> list[str]:
    """Register the model sources that installed packages declare under the entry-point group
    ``group`` (a :class:`ModelSource` subclass or instance each), tried before the built-ins, so
    the ``probe`` command recognises their specs without an import. Done once when
    :mod:`probe.model_sources` is imported.

    Returns:
        The names of the sources registered.

    Warns:
        UserWarning: naming a plug-in that fails to load or is not a ModelSource (it is
            skipped; the other sources keep working).
    """
    import warnings
    from importlib.metadata import entry_points

    from .checkpoint import short_message

    try:
        points = list(entry_points(group=group))
    except Exception:  # broken package metadata must not break probe
        return []
    names = []
    for ep in points:
        try:
            obj = ep.load()
            source = obj() if isinstance(obj, type) else obj
            if not isinstance(source, ModelSource):
                raise TypeError(f"{ep.value} is a {type(source).__name__}, not a probe.model_sources.ModelSource")
        except Exception as e:  # a broken plug-in is skipped, named in the warning
            warnings.warn(f"probe: model-source plug-in {ep.name!r} ({ep.value}) not loaded: {short_message(e)}",
                          stacklevel=2)
            continue
        _SOURCES[:] = [s for s in _SOURCES if s.name != source.name]
        _SOURCES.insert(0, source)
        names.append(source.name)
    return names


def unregister_source(name: str) -> None:
    """Remove the registered source named ``name`` (nothing happens when there is none)."""
    _SOURCES[:] = [s for s in _SOURCES if s.name != name]


def sources() -> list[ModelSource]:
    """The registered model sources, in the order they are tried."""
    _ensure_builtins()
    return list(_SOURCES)


def claimed_schemes() -> set[str]:
    """The schemes (``"hf"``, ``"open_clip"``, ...) claimed by registered sources."""
    return {s.scheme for s in sources() if s.scheme}


def scheme_of(spec: Any) -> str | None:
    """The text before the first ``:`` of a string spec (``"open_clip"`` for
    ``"open_clip:ViT-B-32"``), else ``None``."""
    if isinstance(spec, str) and ":" in spec:
        return spec.split(":", 1)[0]
    return None


def describe_sources() -> str:
    """One line naming every registered source and an example spec, for error messages."""
    return "; ".join(f"{s.name}: {s.example}" if s.example else s.name for s in sources())


def find_source(spec: Any) -> ModelSource:
    """The first registered source whose :meth:`~ModelSource.handles` is true for ``spec``.

    Raises:
        ProbeError: no source recognises ``spec`` (the message lists the sources).
    """
    for source in sources():
        if source.handles(spec):
            return source
    what = repr(spec) if isinstance(spec, (str, Path)) else f"{type(spec).__name__} {str(spec)[:60]!r}"
    raise ProbeError(f"--model {what} is not a model spec any model source recognises; pass one of: "
                     f"{describe_sources()} (or register a source: probe.model_sources.register_source)")


def resolve(spec: Any, weights: str | Path | None = None, random_init: bool = False,
            seed: int = 0) -> ResolvedModel:
    """Resolve ``spec`` with the source that recognises it (:func:`find_source`).

    Args:
        spec: ``None`` (the embedded model), a ``--model`` string, an ``nn.Module``, or anything
            a registered source handles.
        weights: a local checkpoint file.
        random_init: analyse random weights; explicit, never a silent fallback.
        seed: seed of the random initialisation.

    Returns:
        A :class:`ResolvedModel` in eval mode.

    Raises:
        ProbeError: ``weights`` with ``random_init``; an unrecognised spec; the source's errors.
    """
    if weights is not None and random_init:
        raise ProbeError("--weights and --random-init exclude each other; pass one")
    return find_source(spec).resolve(spec, weights=weights, random_init=random_init, seed=seed)
