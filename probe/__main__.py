"""``python -m probe ...`` is the ``probe`` command."""

from .cli import app

if __name__ == "__main__":
    app(prog_name="probe")
