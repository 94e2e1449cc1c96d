"""Checks of the command line's arguments that need neither torch nor timm.

``import torch`` and ``import timm`` take seconds (10-20 s on a loaded machine), so the ``probe``
command checks what it can before they load and answers a mistyped model, a missing image path or
an unreachable hub in well under a second (``bench/startup.py``):

* :func:`timm_model_names`: the names timm registers, read from the ``@register_model`` functions
  of timm's installed source files (about 30 ms; the test suite checks that this equals
  ``timm.list_models()`` for the installed timm), so an unknown name is refused without importing
  timm;
* :func:`check_model_spec`: an unknown timm name or alias, a ``--weights`` file that is not
  there, ``--weights`` with ``--random-init``,
  and timm's pretrained weights when the Hugging Face hub is unreachable and nothing for the
  model is in the local Hugging Face cache; every other spec (``hf:``, ``open_clip:``,
  ``torchvision:``, ``module:factory``, a folder, a plug-in source's) is left to the model
  sources, which check it again with the models loaded;
* :func:`check_image_path`: an ``--images`` path that does not exist.

Everything here raises the :class:`~probe.errors.ProbeError` the full check would raise later
(the model sources use :func:`unknown_timm_model` and :func:`missing_image_path` for their
messages), so the early answer and the late one read the same.
"""

from __future__ import annotations

import difflib
import functools
import os
import re
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

from .errors import ProbeError

#: Host of the Hugging Face hub.
HUB_HOST = "huggingface.co"

#: Short names accepted by ``--model``, mapped to timm model names.
ALIASES: dict[str, str] = {
    "vit_tiny": "vit_tiny_patch16_224",
    "vit_small": "vit_small_patch16_224",
    "vit_base": "vit_base_patch16_224",
    "vit_large": "vit_large_patch16_224",
    "vit_small_hybrid": "vit_small_r26_s32_224",
    "vit_base_hybrid": "vit_base_r50_s16_224",
    "deit_tiny": "deit_tiny_patch16_224",
    "deit_small": "deit_small_patch16_224",
    "deit_base": "deit_base_patch16_224",
    "deit_tiny_distilled": "deit_tiny_distilled_patch16_224",
    "deit_small_distilled": "deit_small_distilled_patch16_224",
    "deit_base_distilled": "deit_base_distilled_patch16_224",
    "dinov2_small": "vit_small_patch14_dinov2",
    "dinov2_small_reg": "vit_small_patch14_reg4_dinov2",
    "swin_tiny": "swin_tiny_patch4_window7_224",
}

#: Names of probe's embedded model (:data:`probe.cordonnier.DEFAULT_ALIASES`, kept equal by a test).
EMBEDDED_NAMES = ("cordonnier", "cordonnier_quadratic", "default")

_REGISTERED = re.compile(r"@register_model\s*(?:\([^)]*\))?\s*\n\s*def\s+(\w+)\s*\(")


def hub_reachable(host: str = HUB_HOST, timeout: float = 3.0) -> bool:
    """True when a TCP connection to ``host:443`` opens within ``timeout`` seconds.

    ``HF_HUB_OFFLINE=1`` in the environment counts as unreachable.
    """
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
        return False
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


@functools.lru_cache(maxsize=1)
def timm_model_names() -> frozenset[str] | None:
    """The model names the installed timm registers (what ``timm.list_models()`` returns), read
    from its source files without importing it; ``None`` when timm is not installed or its files
    cannot be read (the caller then leaves the check to timm itself)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("timm")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    names: set[str] = set()
    try:
        for folder, _, files in os.walk(Path(spec.origin).parent / "models"):
            for f in files:
                if f.endswith(".py"):
                    text = (Path(folder) / f).read_text(encoding="utf-8", errors="replace")
                    if "register_model" in text:
                        names.update(_REGISTERED.findall(text))
    except OSError:
        return None
    return frozenset(names) or None


def unknown_timm_model(name: str, known: Iterable[str]) -> ProbeError:
    """The error for a ``--model`` name that is neither a timm name nor an alias, with the closest
    of ``known`` (timm's names) and the aliases as suggestions."""
    known = sorted(set(known) | set(ALIASES))
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
    if not close:
        close = [m for m in known if name.split("_")[0] in m][:5]
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ProbeError(
        f"unknown model {name!r}{hint} (timm names, the aliases {', '.join(sorted(ALIASES)[:6])}..., "
        "or package.module:factory)"
    )


def offline_weights_error(name: str) -> ProbeError:
    """The error for timm's pretrained weights of ``name`` with the hub unreachable and nothing
    cached."""
    return ProbeError(
        f"pretrained weights for {name!r} need the Hugging Face hub ({HUB_HOST}), which is not "
        "reachable; pass a local checkpoint with --weights FILE (or --random-init to analyse "
        "untrained weights explicitly)"
    )


def missing_image_path(source: Any) -> ProbeError:
    """The error for an ``--images`` path that does not exist."""
    return ProbeError(f"image path {str(source)!r} does not exist; pass a folder, file or glob to --images")


def _hub_cache() -> Path:
    """The local Hugging Face hub cache folder (``HF_HUB_CACHE``, ``HF_HOME/hub`` or the default)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser() / "huggingface" / "hub"


def _maybe_cached(name: str) -> bool:
    """Whether the hub cache holds a model repository whose name contains ``name`` (timm's hub
    ids are ``timm/NAME.TAG``): the exact file is looked up later, with timm's config."""
    try:
        return any(name.lower() in p.name.lower() for p in _hub_cache().glob("models--*"))
    except OSError:
        return True  # unreadable: let the full check decide


def _reachable() -> bool:
    """:func:`hub_reachable`, through :mod:`probe.model_sources.checkpoint` when it is loaded
    (tests replace ``checkpoint.hub_reachable`` for every source)."""
    mod = sys.modules.get("probe.model_sources.checkpoint")
    return (mod.hub_reachable if mod is not None else hub_reachable)()


def _plugin_sources() -> bool:
    """Whether an installed package declares model sources (they may claim plain names)."""
    from importlib.metadata import entry_points

    try:
        return bool(list(entry_points(group="probe.model_sources")))
    except Exception:
        return True


def check_model_spec(spec: Any, weights: Any = None, random_init: bool = False) -> None:
    """Refuse, before torch or timm is imported, what resolving ``--model spec`` would refuse
    about a timm name: an unknown name, or pretrained weights that cannot be had (hub unreachable,
    no ``--weights`` nor ``--random-init``, nothing for the model in the local hub cache); and
    ``--weights`` with ``--random-init``. Other specs pass (their sources check them later).

    Raises:
        ProbeError: as :func:`probe.model_sources.resolve` would, with the same message.
    """
    if weights is not None and random_init:
        raise ProbeError("--weights and --random-init exclude each other; pass one")
    if weights is not None and not Path(weights).exists():  # a folder is left to the source (plug-ins)
        check_weights_path(weights)
    if not isinstance(spec, str) or not spec or spec in EMBEDDED_NAMES:
        return
    if ":" in spec:
        if not spec.startswith("timm:") or not spec[len("timm:"):]:
            return
        spec = spec[len("timm:"):]
    elif Path(spec).expanduser().exists() or _plugin_sources():
        return  # a Hugging Face folder, or a name a plug-in source may claim
    known = timm_model_names()
    if known is None:
        return
    name = ALIASES.get(spec, spec)
    if name not in known:
        raise unknown_timm_model(spec, known)
    if weights is None and not random_init and not _maybe_cached(name) and not _reachable():
        raise offline_weights_error(name)


def check_weights_path(path: Any) -> Path:
    """``--weights FILE`` as a path, checked to be an existing file (not a folder).

    Raises:
        ProbeError: a folder, or no file there.
    """
    p = Path(path)
    if p.is_dir():
        raise ProbeError(f"--weights {str(p)!r} is a folder, not a checkpoint file; pass the .safetensors or .pth file in it")
    if not p.is_file():
        raise ProbeError(f"weights file {str(p)!r} not found; pass an existing --weights FILE")
    return p


def check_image_path(source: Any) -> None:
    """Refuse an ``--images`` path that does not exist (globs, tar-shard patterns and
    ``hf-dataset:`` sources pass: the image loader checks them).

    Raises:
        ProbeError: as :func:`probe.data.collect_images` would, with the same message.
    """
    if source is None:
        return
    text = str(source)
    from .sources import HF_PREFIX

    if text.startswith(HF_PREFIX) or any(ch in text for ch in "*?[{"):
        return
    if not Path(text).expanduser().exists():
        raise missing_image_path(text)


#: The file in every output folder probe writes, listing the files of the set.
MARKER = ".probe-output.json"


def _resolved_out(out: Path) -> Path:
    """``out`` with a symbolic link as its last part replaced by the folder it points to: probe
    writes through a link to a folder (the link itself stays)."""
    return Path(os.path.realpath(out)) if out.is_symlink() else out


def check_output_dir(out_dir: Any) -> Path:
    """Check, before any work starts, that ``out_dir`` can receive probe's output set.

    Refused: a non-path or empty path; ``.``, the current folder or a folder above it (a folder
    the run works in cannot be replaced); an existing regular file; a path under a regular file;
    a symbolic link to nothing (dangling) or to a file; a place where no folder can be created
    (read-only mount, ``/proc``, no permission — tested by creating and removing a temporary
    folder beside it); an existing folder holding files probe did not write (a folder written by
    an earlier probe run, listed in its ``.probe-output.json``, or an empty folder, may be
    replaced). A symbolic link to a folder is written through: the set replaces the folder it
    points to and the link stays.

    Returns:
        ``out_dir`` as a :class:`~pathlib.Path`.

    Raises:
        ProbeError: naming the problem and the fix.
    """
    from .errors import ProbeError

    if isinstance(out_dir, bool) or not isinstance(out_dir, (str, os.PathLike)):
        raise ProbeError(f"the output folder must be a path (str or pathlib.Path), got {type(out_dir).__name__}")
    text = os.fspath(out_dir)
    if isinstance(text, bytes) or not text.strip():
        raise ProbeError("the output folder (--out) is empty; pass a folder path, e.g. --out reports/run1")
    if "\0" in text:
        raise ProbeError(f"--out {text!r} holds a NUL character; pass a folder path")
    out = Path(out_dir)
    if out.is_symlink() and not out.exists():
        raise ProbeError(f"--out {str(out)!r} is a symbolic link to {os.readlink(out)!r}, which does not exist; "
                         "create that folder, or pass another --out")
    target = _resolved_out(out)
    real = os.path.realpath(target)
    try:
        cwd = os.path.realpath(os.getcwd())
    except OSError:  # the current folder was deleted
        cwd = ""
    if Path(real).name == "" or cwd == real or cwd.startswith(real.rstrip(os.sep) + os.sep):
        raise ProbeError(f"--out {str(out)!r} is the current folder or a folder above it, which probe cannot "
                         "replace; pass a new folder, e.g. --out reports/run1")
    if out.exists() and not out.is_dir():
        raise ProbeError(f"--out {str(out)!r} is an existing file, not a folder; pass a folder path")
    anc = target
    while not anc.exists():
        if anc.parent == anc:
            break
        anc = anc.parent
    if anc.exists() and not anc.is_dir():
        raise ProbeError(f"--out {str(out)!r} lies under {str(anc)!r}, which is a file; pass a folder path")
    probe_dir = anc if anc != target else target.parent
    try:
        tmp = tempfile.mkdtemp(dir=probe_dir, prefix=".probe-write-check-")
        os.rmdir(tmp)
    except OSError as e:
        raise ProbeError(f"cannot write into {str(probe_dir)!r} for --out {str(out)!r} ({e.strerror or e}); "
                         "choose a writable folder") from None
    if target.is_dir():
        theirs = _foreign_files(target)
        if theirs:
            raise ProbeError(f"--out {str(out)!r} already holds files probe did not write ({_shown(theirs)}); "
                             "choose another folder, or empty this one")
    return out


def _shown(names: list[str]) -> str:
    return ", ".join(repr(n) if any(c in n for c in "\n\r,") else n for n in names[:5]) \
        + (", ..." if len(names) > 5 else "")


def _marker_files(folder: Path) -> list[str]:
    import json

    try:
        data = json.loads((folder / MARKER).read_text())
        names = data.get("files", []) if isinstance(data, dict) else []
        return [n for n in names if isinstance(n, str)] if isinstance(names, list) else []
    except (OSError, ValueError, AttributeError, RecursionError):
        return []


def _foreign_files(folder: Path) -> list[str]:
    """The names in ``folder`` that its probe marker does not list (files probe did not write)."""
    ours = set(_marker_files(folder))
    return sorted(n for n in os.listdir(folder) if n not in ours and n != MARKER)


def check_out_not_input(out: str | Path, inputs: Sequence[str | Path]) -> None:
    """Refuse an output folder that is (or lies inside) one of the compared result folders:
    writing the comparison there would replace that saved result.

    Raises:
        ProbeError: naming the folder.
    """
    o = Path(out).resolve()
    for d in inputs:
        p = Path(d).resolve()
        if o == p or p in o.parents:
            raise ProbeError(f"--out {str(out)!r} is the compared result folder {str(d)!r} (or inside it); "
                             "writing there would replace it — choose another --out")


def default_out_dir() -> Path:
    """``reports/compare-<timestamp>`` (the CLI's default ``--out``)."""
    return Path("reports") / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"


#: The file every saved result folder holds (:mod:`probe.saved`).
RESULT_FILE = "result.json"


def check_result_folder(path: Any) -> Path:
    """The saved-result folder ``path`` names (a folder, or its ``result.json``), checked for
    existence before anything is loaded (:func:`probe.load`, ``probe compare``).

    Raises:
        ProbeError: not a path; missing; a file; no ``result.json`` in it (naming the fix).
    """
    if isinstance(path, bool) or not isinstance(path, (str, Path)) or not str(path).strip() or "\0" in str(path):
        raise ProbeError(f"load needs a folder path (str or pathlib.Path), got {path!r}")
    folder = Path(path)
    if folder.is_file() and folder.name == RESULT_FILE:
        folder = folder.parent
    if not folder.exists():
        raise ProbeError(f"{str(folder)!r} does not exist; pass the output folder of probe analyze")
    if not folder.is_dir():
        raise ProbeError(f"{str(folder)!r} is a file, not a probe output folder; pass the folder holding {RESULT_FILE}")
    if not (folder / RESULT_FILE).is_file():
        hint = ("it was written by a probe from before saved results (report only): run probe analyze again"
                if (folder / "heads.csv").is_file() else "pass the output folder of probe analyze or AnalysisResult.save")
        raise ProbeError(f"{str(folder)!r} holds no {RESULT_FILE}, so it is not a saved probe result; {hint}")
    return folder


def check_class_folder(root: Any) -> Path:
    """An image-classification folder ``ROOT/<class>/<image>`` (``probe train --train/--test``),
    checked to exist before torch loads.

    Raises:
        ProbeError: ``root`` is not an existing folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise ProbeError(f"image folder {str(root)!r} does not exist or is not a folder; pass a folder "
                         "with one sub-folder of images per class")
    return root
