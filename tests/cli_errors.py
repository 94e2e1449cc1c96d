"""The CLI's bad-input contract, shared by the hardening tests: exactly one line, ``error: ...``,
exit status 2."""

from __future__ import annotations


def one_error_line(res) -> str:
    """The single ``error:`` line a CliRunner result printed (asserting it is the only output)."""
    lines = [l for l in res.output.splitlines() if l.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), res.output
    return lines[0]
