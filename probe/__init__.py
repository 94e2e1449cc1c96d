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

__all__ = ["analyze", "load", "compare", "AnalysisResult", "TokenGeometry", "ProbeError", "CaptureError", "__version__"]


def __getattr__(name: str):
    import importlib

    if name in _LAZY:
        mod, attr = _LAZY[name]
        value = getattr(importlib.import_module(f".{mod}", __name__), attr)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'probe' has no attribute {name!r}")
