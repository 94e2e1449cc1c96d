"""``python -m probe ...`` is the ``probe`` command (:func:`main`, also the console script)."""

import sys


def main() -> None:
    """Run the ``probe`` command line; Ctrl-C while it loads prints ``interrupted`` (exit 130),
    as it does later (:mod:`probe.cli`)."""
    import signal

    def early(signum, frame):  # until probe.cli installs its own handler
        print("interrupted", file=sys.stderr)
        raise SystemExit(130)

    signal.signal(signal.SIGINT, early)
    from .cli import app

    app(prog_name="probe")


if __name__ == "__main__":
    main()
