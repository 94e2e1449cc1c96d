"""Progress of the long steps of an analysis: named stages, each with a bar and an ETA.

:func:`probe.analyze` reports every stage of its run to a :class:`ProgressReporter`:

=========================  ===============================================  ==================
stage (``STAGES``)         unit of ``done`` / ``total``                     from
=========================  ===============================================  ==================
``capture``                images read and passed through the model         the pipeline
``quadratic fits``         analysed layers fitted                           :mod:`probe.steps`
``conv test``              steps of the test (trial verdicts, final)        :mod:`probe.steps`
``conv-test null``         images seen by the random-init copies (null a)   :mod:`probe.steps`
``attribution``            image rows through the model (IG steps,          :mod:`probe.steps`
                           ablations, ranking check), an estimate
=========================  ===============================================  ==================

plus one stage per further registered analysis that asks for one
(:meth:`probe.analyses.base.AnalysisContext.stage`).

What ``analyze(progress=...)`` accepts (:func:`make_progress`):

* ``None`` (default): bars where a person is watching — rich in a terminal (stderr is a TTY),
  ``tqdm.notebook`` widgets in a Jupyter kernel with ``ipywidgets`` (plain text lines without
  it, :class:`TextProgress`) — and nothing otherwise (pipes, logs, tests);
* ``True``: always bars (rich; in Jupyter as for ``None``); ``False``: nothing at all;
* a callable ``progress(done, total)`` (the original form): called after each batch of the
  ``capture`` stage only, ``done`` counting images (unreadable files included);
* a callable ``progress(stage, done, total)``: called for every stage (``total`` may be ``None``
  while unknown);
* a :class:`ProgressReporter` (e.g. :class:`RichProgress` bound to a console, as the CLI does).
"""

from __future__ import annotations

import inspect
import sys
from typing import Any, Callable

#: The pipeline's own stage names, in run order.
STAGES: tuple[str, ...] = ("capture", "quadratic fits", "conv test", "conv-test null", "attribution")


class Stage:
    """One named stage of a run. ``done`` and ``total`` are counts in the stage's unit.

    Use as a context manager or call :meth:`close`; :meth:`close` marks the stage finished
    (``done = total`` when the total is known).
    """

    def __init__(self, name: str, total: int | None = None) -> None:
        self.name, self.total, self.done = name, total, 0
        self.closed = False

    def advance(self, n: int = 1) -> None:
        """Count ``n`` more units done."""
        self.update(self.done + n)

    def update(self, done: int | None = None, total: int | None = None) -> None:
        """Set the units done and/or the total."""
        if total is not None:
            self.total = int(total)
        if done is not None:
            self.done = int(done)
        self._show()

    def close(self) -> None:
        """Finish the stage (idempotent)."""
        if not self.closed:
            if self.total is not None:
                self.done = max(self.done, self.total)
            self._show()
            self.closed = True
            self._finish()

    def _show(self) -> None:  # overridden by the bar implementations
        pass

    def _finish(self) -> None:
        pass

    def __enter__(self) -> "Stage":
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        elif not self.closed:  # failed: stop the bar where it is
            self.closed = True
            self._finish()


class ProgressReporter:
    """Creates the stages of a run; the base class shows nothing.

    Subclass and override :meth:`stage` to show progress elsewhere. Reporters are context
    managers (bars are started on the first stage and stopped on exit).
    """

    def stage(self, name: str, total: int | None = None) -> Stage:
        """A new stage called ``name`` with ``total`` units (``None``: not yet known)."""
        return Stage(name, total)

    def __enter__(self) -> "ProgressReporter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop any bars (idempotent)."""


class NullProgress(ProgressReporter):
    """Shows nothing (``progress=False``)."""


class _CallbackStage(Stage):
    def __init__(self, name: str, total: int | None, fn: Callable[[str, int, int | None], None]) -> None:
        super().__init__(name, total)
        self._fn = fn

    def _show(self) -> None:
        self._fn(self.name, self.done, self.total)


class CallbackProgress(ProgressReporter):
    """Calls ``fn(stage, done, total)`` on every update of every stage."""

    def __init__(self, fn: Callable[[str, int, int | None], None]) -> None:
        self.fn = fn

    def stage(self, name: str, total: int | None = None) -> Stage:
        s = _CallbackStage(name, total, self.fn)
        s._show()
        return s


class ImagesCallbackProgress(ProgressReporter):
    """The original ``progress(images_done, images_total)`` form: the ``capture`` stage only."""

    def __init__(self, fn: Callable[[int, int], None]) -> None:
        self.fn = fn

    def stage(self, name: str, total: int | None = None) -> Stage:
        if name != "capture":
            return Stage(name, total)
        fn = self.fn

        class _Images(Stage):
            last = 0

            def _show(self) -> None:  # once per batch, as before: no repeat when the stage closes
                if self.done and self.done != self.last and not self.closed:
                    self.last = self.done
                    fn(self.done, self.total if self.total is not None else self.done)

        return _Images(name, total)


class RichProgress(ProgressReporter):
    """One rich bar per stage (name, bar, done/total, elapsed, ETA) on ``console``.

    Args:
        console: a :class:`rich.console.Console` (default: a new one on stderr). rich renders
            into Jupyter as well.
        transient: remove the bars when the run ends.
        on_start: called once before the first bar shows (e.g. to stop a spinner: rich shows one
            live display at a time).
    """

    def __init__(self, console: Any = None, transient: bool = False, on_start: Callable[[], Any] | None = None) -> None:
        from rich.console import Console

        self.console = console if console is not None else Console(stderr=True)
        self.transient = transient
        self.on_start = on_start
        self._bar: Any = None

    def _progress(self) -> Any:
        if self._bar is None:
            if self.on_start is not None:
                self.on_start()
                self.on_start = None
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self._bar = Progress(TextColumn("[bold]{task.description:<15}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TimeRemainingColumn(), console=self.console,
                                 transient=self.transient)
            self._bar.start()
        return self._bar

    def stage(self, name: str, total: int | None = None) -> Stage:
        bar = self._progress()
        task = bar.add_task(name, total=total)

        class _Rich(Stage):
            def _show(self) -> None:
                bar.update(task, completed=self.done, total=self.total)

            def _finish(self) -> None:
                if self.total is None:
                    bar.update(task, total=self.done, completed=self.done)
                bar.stop_task(task)

        return _Rich(name, total)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def _widgets_work() -> bool:
    """Whether ipywidgets imports (tqdm's notebook bars need its ``FloatProgress``)."""
    try:
        from ipywidgets import FloatProgress  # noqa: F401
    except Exception:  # noqa: BLE001 - absent or broken: no widget bars
        return False
    return True


class TqdmProgress(ProgressReporter):
    """One ``tqdm.notebook`` widget bar per stage, for Jupyter with ``ipywidgets`` installed."""

    def stage(self, name: str, total: int | None = None) -> Stage:
        from tqdm.notebook import tqdm

        bar = tqdm(total=total, desc=name, leave=True)

        class _Tqdm(Stage):
            def _show(self) -> None:
                if self.total is not None and bar.total != self.total:
                    bar.total = self.total
                bar.n = self.done
                bar.refresh()

            def _finish(self) -> None:
                bar.close()

        return _Tqdm(name, total)


class TextProgress(ProgressReporter):
    """Plain text lines on ``stream`` (default ``sys.stderr``), never a carriage return or a
    cursor-movement code: one line when a stage starts, one at most every ``every`` seconds while
    it runs, and one when it ends, with its time. For Jupyter without ``ipywidgets`` (where
    terminal bars would print escape codes into the cell) and for logs.

    Args:
        stream: a text stream with ``write`` (looked up at each write when ``None``).
        every: seconds between the lines of a running stage.
    """

    def __init__(self, stream: Any = None, every: float = 10.0) -> None:
        self.stream, self.every = stream, every

    def stage(self, name: str, total: int | None = None) -> Stage:
        import time

        reporter = self

        def write(text: str) -> None:
            out = reporter.stream if reporter.stream is not None else sys.stderr
            out.write(text + "\n")
            out.flush()

        class _Text(Stage):
            start = last = time.monotonic()

            def count(self) -> str:
                return f"{self.done}/{self.total}" if self.total is not None else f"{self.done}"

            def _show(self) -> None:
                now = time.monotonic()
                if not self.closed and now - self.last >= reporter.every:
                    self.last = now
                    write(f"{self.name}: {self.count()} ({now - self.start:.0f} s)")

            def _finish(self) -> None:
                write(f"{self.name}: {self.count()} done in {time.monotonic() - self.start:.1f} s")

        write(f"{name}: started" + (f", {total} to do" if total is not None else ""))
        return _Text(name, total)


class ChildProgress(ProgressReporter):
    """Folds the ``capture`` stage of a nested run into ``parent``, offset by ``offset`` units;
    the nested run's other stages are not shown. Used for the conv test's random-init copies."""

    def __init__(self, parent: Stage, offset: int) -> None:
        self.parent, self.offset = parent, offset

    def stage(self, name: str, total: int | None = None) -> Stage:
        if name != "capture":
            return Stage(name, total)
        parent, offset = self.parent, self.offset

        class _Child(Stage):
            def _show(self) -> None:
                parent.update(offset + self.done)

        return _Child(name, total)


def in_notebook() -> bool:
    """True inside a Jupyter kernel (IPython's ZMQ shell)."""
    ip = sys.modules.get("IPython")
    if ip is None:
        return False
    try:
        shell = ip.get_ipython()
    except Exception:  # noqa: BLE001 - any failure means: not a notebook
        return False
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def _positional_arity(fn: Callable) -> int | None:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return 3
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty for p in params)


def make_progress(progress: Any) -> tuple[ProgressReporter, bool]:
    """The reporter for ``analyze(progress=...)`` (see the module doc) and whether the caller
    owns it (must close it when the run ends).

    Raises:
        ProbeError: for anything else (e.g. a callable taking neither 2 nor 3 arguments).
    """
    from .errors import ProbeError

    if isinstance(progress, ProgressReporter):
        return progress, False
    if progress is False:
        return NullProgress(), True
    if progress is None or progress is True:
        if in_notebook():
            return (TqdmProgress() if _widgets_work() else TextProgress()), True
        if progress is True or sys.stderr.isatty():
            return RichProgress(), True
        return NullProgress(), True
    if callable(progress):
        n = _positional_arity(progress)
        if n == 2:
            return ImagesCallbackProgress(progress), True
        if n == 3:
            return CallbackProgress(progress), True
        raise ProbeError(f"progress callable {progress!r} must take (done, total) or (stage, done, total)")
    raise ProbeError(f"progress must be None, True, False, a callable or a probe.progress.ProgressReporter, "
                     f"got {type(progress).__name__}")
