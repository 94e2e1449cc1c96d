"""probe — what did these attention heads learn?

Library use::

    import probe
    result = probe.analyze("deit_tiny", "photos/", weights="deit_tiny.safetensors", layers="0-4")
    result.heads            # pandas DataFrame, one row per (layer, head)
    result.write_report("reports/deit")   # report.html + heads.csv
"""

__version__ = "0.1.0"

from .errors import CaptureError, ProbeError  # noqa: E402
from . import families  # noqa: E402,F401  (registers the family capture rules)
from .geometry import TokenGeometry  # noqa: E402
from .pipeline import analyze  # noqa: E402
from .result import AnalysisResult  # noqa: E402

__all__ = ["analyze", "AnalysisResult", "TokenGeometry", "ProbeError", "CaptureError", "__version__"]
