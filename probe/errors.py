"""User-facing errors.

Every problem caused by the user's input (a model name, a file, an option) is raised as a
:class:`ProbeError` whose message is one line that names the problem and the fix. The CLI prints
that line and exits with status 2; anything else that escapes is a bug in ``probe``.
"""

from __future__ import annotations


class ProbeError(Exception):
    """An error caused by the caller's input, with a one-line message naming the fix.

    Raised by every public entry point of ``probe`` for bad input (unknown model, malformed layer
    spec, unreadable weights or images, unavailable device, failed capture).
    """


class CaptureError(ProbeError):
    """No attention probabilities could be captured from a model or a selected layer."""
