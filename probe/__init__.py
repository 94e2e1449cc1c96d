"""probe — what did these attention heads learn?

Library use::

    import probe
    result = probe.analyze()            # the embedded attention-only CIFAR-10 model, no download
    result = probe.analyze("deit_tiny", "photos/", weights="deit_tiny.safetensors", layers="0-4")
    result.heads            # pandas DataFrame, one row per (layer, head)
    result.write_report("reports/deit")   # report.html + heads.csv (+ result.json, stats)
    again = probe.load("reports/deit")    # the saved result, no model needed
    probe.compare(["reports/deit", "reports/vit"]).write_report("reports/deit-vs-vit")

``import probe`` is light (no torch until an analysis runs, so ``probe --help`` answers at once);
the public names below are loaded on first use.
"""

__version__ = "0.1.0"

from .errors import CaptureError, ProbeError  # noqa: E402

_LAZY = {
    "analyze": ("pipeline", "analyze"),
    "AnalysisResult": ("result", "AnalysisResult"),
    "TokenGeometry": ("geometry", "TokenGeometry"),
    "load": ("saved", "load"),
    "compare": ("comparison", "compare"),
}
_SUBMODULES = {"track", "plot", "cordonnier", "families", "capture", "analyses", "pipeline", "result",
               "models", "data", "geometry", "attribution", "conv_equivalence", "steps", "tables", "report",
               "saved", "comparison", "model_sources"}

__all__ = ["analyze", "load", "compare", "plot", "track", "AnalysisResult", "TokenGeometry", "ProbeError", "CaptureError",
           "__version__"]


def _import(module: str):
    """Import ``probe.<module>``. Libraries that import ``tqdm.auto`` when they load (timm's and
    Hugging Face's) warn "IProgress not found" in a Jupyter kernel without ipywidgets; probe shows
    its own progress there (:mod:`probe.progress`), so that warning is not shown while they load."""
    import importlib
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="IProgress not found")
        return importlib.import_module(f".{module}", __name__)


def __getattr__(name: str):
    if name in _LAZY:
        mod, attr = _LAZY[name]
        value = getattr(_import(mod), attr)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return _import(name)
    raise AttributeError(f"module 'probe' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The module's names with the lazily loaded ones (tab completion offers ``analyze``, ...)."""
    return sorted(set(globals()) | set(_LAZY) | _SUBMODULES)
