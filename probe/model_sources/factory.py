"""User factories: ``--model package.module:factory`` or ``--model path/to/model.py:factory``.

The module is imported from ``sys.path``, else from the current directory (the ``probe`` console
script does not put it on the path); a ``.py`` path is loaded as a file. The factory is called
with no arguments and must return an ``nn.Module``; it is called again (seeded) to rebuild the
architecture at random initialisation. Weights: ``--weights FILE`` or ``--random-init``; a
factory has no trained weights of its own.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any, Callable

from torch import nn

from ..errors import ProbeError
from .base import Constructor, ModelSource, claimed_schemes, scheme_of
from .checkpoint import short_message


def _import_module(mod_name: str, spec: str) -> Any:
    """Import ``mod_name``: a file ``path/to/model.py``, else a module on ``sys.path``, else one
    found from the current directory (the ``probe`` console script does not put it on the path)."""
    if mod_name.endswith(".py"):
        path = Path(mod_name).resolve()
        if not path.is_file():
            raise ProbeError(f"model file {mod_name!r} for --model {spec!r} not found")
        # a private name: a user's json.py or numpy.py never replaces the module of that name
        private = f"_probe_user_{hashlib.sha1(str(path).encode()).hexdigest()[:12]}_{_identifier(path.stem)}"
        if private in sys.modules:
            return sys.modules[private]
        loader_spec = importlib.util.spec_from_file_location(private, path)
        mod = importlib.util.module_from_spec(loader_spec)
        sys.modules[private] = mod
        try:
            loader_spec.loader.exec_module(mod)
        except (Exception, SystemExit) as e:  # a module that raises, or calls sys.exit(), at import
            del sys.modules[private]
            raise ProbeError(f"cannot import {mod_name!r} for --model {spec!r} ({_import_failure(e)})") from None
        return mod
    try:
        try:
            return importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            top = mod_name.split(".")[0]
            cwd = os.getcwd()
            if e.name != top or cwd in sys.path:
                raise
            sys.path.insert(0, cwd)
            try:
                return importlib.import_module(mod_name)
            finally:
                sys.path.remove(cwd)
    except ImportError:
        raise
    except (Exception, SystemExit) as e:  # raised while executing the module: syntax error, sys.exit(), ...
        raise ProbeError(f"cannot import {mod_name!r} for --model {spec!r}: the module failed while it was "
                         f"imported ({_import_failure(e)}); fix the module") from None


def _identifier(text: str) -> str:
    """``text`` with every character that cannot appear in a Python identifier replaced by ``_``."""
    return "".join(c if c.isalnum() or c == "_" else "_" for c in text)


def _import_failure(e: BaseException) -> str:
    """One-line description of why a user module could not be imported."""
    if isinstance(e, SystemExit):
        return f"it called sys.exit({e.code!r}) at import"
    if isinstance(e, SyntaxError):
        return f"SyntaxError: {e.msg} at {Path(e.filename or '?').name} line {e.lineno}"
    return short_message(e)


def _import_factory(spec: str) -> Callable[..., nn.Module]:
    """The callable ``spec`` names: ``module:attr.path`` (split at the last ``:`` when there are
    several, so a path with a drive letter works).

    Raises:
        ProbeError: the module cannot be imported, lacks the attribute, or it is not callable.
    """
    mod_name, _, attr = spec.rpartition(":") if spec.count(":") > 1 else spec.partition(":")
    try:
        mod = _import_module(mod_name, spec)
    except ImportError as e:
        raise ProbeError(
            f"cannot import {mod_name!r} for --model {spec!r} ({short_message(e)}); "
            "make the module importable (PYTHONPATH), run from its folder, pass a file "
            "path/to/model.py:factory, or fix the name"
        ) from None
    obj = mod
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ProbeError(f"module {mod_name!r} has no attribute {attr!r} for --model {spec!r}")
    if not callable(obj):
        raise ProbeError(f"{spec!r} is not callable; --model package.module:factory needs a factory")
    return obj


class FactorySource(ModelSource):
    """``package.module:factory`` and ``path/to/model.py:factory`` (an attribute path after the
    colon, ``module:Class.build`` included): any string with a ``:`` whose text before the
    first ``:`` is not a scheme claimed by another source (``hf``, ``open_clip``,
    ``torchvision``, ...)."""

    name = "factory"
    example = "package.module:factory, path/to/model.py:factory"

    def handles(self, spec: Any) -> bool:
        scheme = scheme_of(spec)
        return scheme is not None and scheme not in claimed_schemes()

    def architecture(self, spec: Any) -> Constructor:
        factory = _import_factory(spec)

        def make(seed: int) -> nn.Module:
            """``factory()``, checked to return an ``nn.Module`` (seeded by the caller)."""
            try:
                net = factory()
            except Exception as e:
                raise ProbeError(f"factory {spec!r} failed: {short_message(e)}") from None
            except SystemExit as e:
                raise ProbeError(f"factory {spec!r} called sys.exit({e.code!r}) instead of returning a model; "
                                 "make it return the nn.Module") from None
            if not isinstance(net, nn.Module):
                raise ProbeError(f"factory {spec!r} returned {type(net).__name__}, not an nn.Module")
            return net

        return make

    def pretrained(self, spec: Any, make: Constructor, seed: int) -> tuple[nn.Module, str]:
        raise ProbeError(
            f"--model {spec!r} is a user factory: pass its trained weights with --weights FILE "
            "(or --random-init to analyse it untrained)"
        )
