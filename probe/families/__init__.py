"""Model families beyond timm: capture rules and model resolution, one module per family.

Importing this package registers every family's capture rules. Each family module imports its
third-party library (e.g. ``transformers`` for :mod:`probe.families.hf`) only inside its
functions, so importing it is cheap and safe when that optional extra is not installed.
"""

from . import hf  # noqa: F401  (registers HFEagerAttentionRule)
