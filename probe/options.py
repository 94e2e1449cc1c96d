"""The options of ``probe analyze``, shared by the command line and :func:`probe.analyze`.

One vocabulary: every option of ``probe analyze`` is a keyword of ``probe.analyze`` with the same
name (``--local-radius`` is ``local_radius=``), except those in :data:`LIBRARY_NAMES`; the values
may be given as the command line writes them (``grid="14x14"``, ``query="7,7"``,
``input_size="3,224,224"``) or as Python values. ``tests/test_options.py`` derives the keyword set
from the command's options, so the two stay in step.

Errors: the checks here name the command line's flags; :func:`library_message` rewrites a message
for a library caller so that it names the keyword and the flag (``layers= (--layers)``).
Nothing here imports torch: the command checks its arguments before torch loads.
"""

from __future__ import annotations

import contextvars
import math
import re
from typing import Any

from .errors import ProbeError

#: ``probe analyze`` options whose ``probe.analyze`` keyword has another name.
LIBRARY_NAMES = {"analysis": "analyses", "set_option": "analysis_options"}

#: ``probe.analyze`` keywords that set the conv test's :class:`~probe.analyses.convlike.ConvLikeConfig`
#: (keyword -> field), as the command line's conv-test options do.
CONV_KEYWORDS = {"local_radius": "r_local", "kernel_size": "kernel_size", "conv_level": "level"}

#: True while the command line runs an analysis (its errors keep naming flags only).
CLI_CALL: contextvars.ContextVar[bool] = contextvars.ContextVar("probe_cli_call", default=False)


def parse_grid(text: Any) -> tuple[int, int] | None:
    """``--grid ROWSxCOLS`` (or ``grid=(rows, cols)``) as ``(rows, cols)``; None stays None.

    Raises:
        ProbeError: malformed text.
    """
    if text is None:
        return None
    if isinstance(text, (tuple, list)):
        if len(text) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in text):
            raise ProbeError(f"malformed --grid {tuple(text)!r}: use (rows, cols), two integers")
        return int(text[0]), int(text[1])
    m = re.fullmatch(r"\s*(\d+)\s*[xX×,]\s*(\d+)\s*", text)
    if not m:
        raise ProbeError(f"malformed --grid {text!r}: use ROWSxCOLS, e.g. 14x14")
    return int(m.group(1)), int(m.group(2))


def parse_floats(text: Any, n: int, option: str) -> tuple[float, ...] | None:
    """``n`` numbers from comma-separated text (or a sequence; one value is repeated ``n``
    times); None stays None.

    Raises:
        ProbeError: not ``n`` finite numbers, naming ``option``.
    """
    if text is None:
        return None
    try:
        parts = re.split(r"[,\s]+", text.strip()) if isinstance(text, str) else list(text)
        vals = tuple(float(v) for v in parts if not isinstance(v, str) or v)
    except (ValueError, TypeError):
        vals = ()

    if not all(math.isfinite(v) for v in vals):
        raise ProbeError(f"malformed {option} {text!r}: the values must be finite numbers (no nan or inf)")
    if len(vals) == 1 and n > 1:
        vals = vals * n
    if len(vals) != n:
        raise ProbeError(f"malformed {option} {text!r}: give {n} comma-separated numbers")
    return vals


def check_options(*, num_images, batch_size, attribution_images, patch_size, null_seeds, null_images,
                   local_radius, conv_level, kernel_size, overrides, query) -> None:
    """Every numeric option checked before any work starts (ProbeError naming the option)."""

    def positive_int(name, v, allow_none=True, minimum=1):
        if v is None and allow_none:
            return
        if v < minimum:
            raise ProbeError(f"{name} must be at least {minimum}, got {v}")

    positive_int("--num-images", num_images)
    positive_int("--batch-size", batch_size)
    positive_int("--attribution-images", attribution_images)
    positive_int("--null-images", null_images)
    positive_int("--null-seeds", null_seeds, minimum=0)
    if patch_size is not None and not (math.isfinite(patch_size) and patch_size > 0):
        raise ProbeError(f"--patch-size must be a positive number of pixels per token, got {patch_size}")
    check_conv_options(local_radius=local_radius, conv_level=conv_level, kernel_size=kernel_size)
    size = overrides.get("input_size")
    if size is not None and not all(v >= 1 for v in size):
        raise ProbeError(f"--input-size must be three positive integers C,H,W, got {','.join(map(str, size))}")
    if "std" in overrides and not all(v > 0 for v in overrides["std"]):
        raise ProbeError(f"--std must be positive for every channel, got {','.join(map(str, overrides['std']))}")
    query_pair(query)


def check_conv_options(local_radius: Any = None, conv_level: Any = None, kernel_size: Any = None, **_: Any) -> None:
    """The conv test's numeric options (None: not given; others are checked by the test's config).

    Raises:
        ProbeError: naming the option.
    """
    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if kernel_size is not None and not (isinstance(kernel_size, int) and not isinstance(kernel_size, bool)
                                        and 2 <= kernel_size <= 99):
        raise ProbeError(f"--kernel-size must be an integer from 2 to 99 patches, got {kernel_size}")
    if local_radius is not None and not (number(local_radius) and 0 < local_radius <= 1000):
        raise ProbeError(f"--local-radius must be a positive number of patches, at most 1000, got {local_radius}")
    if conv_level is not None and not (number(conv_level) and 0 < conv_level < 1):
        raise ProbeError(f"--conv-level must lie in (0, 1), got {conv_level}")


def query_pair(text: Any) -> tuple[int, int] | None:
    """``--query ROW,COL`` (or ``query=(row, col)``) as ``(row, col)``; None stays None.

    Raises:
        ProbeError: not two non-negative integers.
    """
    if text is None:
        return None
    if isinstance(text, (tuple, list)):
        if len(text) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in text):
            raise ProbeError(f"query {tuple(text)!r} must be (row, col), two non-negative integers")
        return int(text[0]), int(text[1])
    m = re.fullmatch(r"\s*(\d+)\s*[,xX]\s*(\d+)\s*", text)
    if not m:
        raise ProbeError(f"--query {text!r} must be ROW,COL (two non-negative integers), e.g. --query 7,7")
    return int(m.group(1)), int(m.group(2))


def conv_config_from(conv_config: Any, seed: int, **keywords: Any) -> Any:
    """The conv test's config from ``probe.analyze``'s conv keywords (:data:`CONV_KEYWORDS`,
    None: not given) and ``conv_config``; ``conv_config`` itself when no keyword is given.

    Raises:
        ProbeError: both ``conv_config`` and a keyword; a value the config refuses.
    """
    check_conv_options(**keywords)
    given = {CONV_KEYWORDS[k]: v for k, v in keywords.items() if v is not None}
    if not given:
        return conv_config
    if conv_config is not None:
        raise ProbeError(f"pass either conv_config or the keywords {', '.join(sorted(keywords))}, not both")
    from .analyses.convlike import ConvLikeConfig

    return ConvLikeConfig(seed=seed, **given)


def data_overrides_from(data_overrides: dict | None, input_size: Any = None, mean: Any = None,
                        std: Any = None) -> dict | None:
    """``data_overrides`` with ``input_size`` (C,H,W), ``mean`` and ``std`` (one value per channel,
    or one for all) added, as ``--input-size`` / ``--mean`` / ``--std`` give them.

    Raises:
        ProbeError: malformed values, or a key given both ways.
    """
    extra: dict[str, Any] = {}
    size = parse_floats(input_size, 3, "--input-size")
    if size is not None:
        extra["input_size"] = tuple(int(v) for v in size)
    channels = extra.get("input_size", (data_overrides or {}).get("input_size", (3,)))[0]
    for key, text in (("mean", mean), ("std", std)):
        vals = parse_floats(text, channels, f"--{key}")
        if vals is not None:
            extra[key] = vals
    if not extra:
        return data_overrides
    both = sorted(set(extra) & set(data_overrides or {}))
    if both:
        raise ProbeError(f"{', '.join(both)} given both as keyword and in data_overrides; pass one")
    return {**(data_overrides or {}), **extra}


def _cli_flags() -> dict[str, tuple[str, str | None]]:
    """``{--flag: (keyword, value shown)}`` for every flag of ``probe analyze`` (boolean flags
    show ``True`` / ``False``)."""
    import typer

    from .cli import app

    command = typer.main.get_command(app).commands["analyze"]
    flags = {}
    for p in command.params:
        name = LIBRARY_NAMES.get(p.name, p.name)
        for opt in getattr(p, "opts", []):
            if opt.startswith("--"):
                flags[opt] = (name, "True" if getattr(p, "is_flag", False) else None)
        for opt in getattr(p, "secondary_opts", []):
            flags[opt] = (name, "False")
    return flags


def library_message(message: str) -> str:
    """``message`` (written with ``probe analyze`` flags) for a caller of ``probe.analyze``: the
    text is kept and the flags it names are translated after it, e.g. ``... fix --layers (as
    probe.analyze keywords: --layers is layers=)``; ``--random-init is random_init=True``."""
    try:
        flags = _cli_flags()
    except Exception:  # noqa: BLE001 - never lose the original error over its wording
        return message
    named = [f for f in dict.fromkeys(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", message)) if f in flags]
    if not named or "as probe.analyze keywords" in message:
        return message
    forms = ", ".join(f"{f} is {flags[f][0]}={flags[f][1] or ''}" for f in named)
    return f"{message} (as probe.analyze keywords: {forms})"
