"""Checkpoint files and hub access shared by the model sources (:mod:`probe.model_sources`).

* :func:`load_state_dict` reads ``--weights FILE`` without executing pickled code: safetensors, or
  ``torch.load(weights_only=True)`` for ``.pth`` / ``.pt`` / ``.bin`` / ``.ckpt``;
* :func:`apply_state_dict` loads it strictly, naming missing / unexpected / mis-shaped keys;
* :func:`hub_reachable` says whether the Hugging Face hub (:data:`HUB_HOST`) answers, so that a
  source refuses an unreachable download with a message naming ``--weights`` / ``--random-init``
  instead of hanging; :func:`file_sha256` fingerprints a weights file for the report.

Sources call these through the module (``checkpoint.hub_reachable()``), so tests can replace one
name here for every source.
"""

from __future__ import annotations

import importlib
import os
import pickle
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..errors import ProbeError

from ..preflight import HUB_HOST, check_weights_path, hub_reachable  # noqa: F401  (sources call checkpoint.hub_reachable)


def file_sha256(path: str | Path) -> str | None:
    """SHA-256 hex digest of a file, read in 1 MiB chunks; None if it cannot be read."""
    import hashlib

    try:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()
    except OSError:
        return None


def _looks_like(p: Path) -> str:
    """A few words on what a file that is not a checkpoint seems to be (for error messages)."""
    try:
        with open(p, "rb") as f:
            head = f.read(4096)
    except OSError:
        return "unreadable"
    if not head:
        return "it is empty"
    if head.startswith(b"PK\x03\x04"):
        return "a zip file, maybe truncated"
    try:
        head.decode("utf-8")
        return "it is a text file" if b"\0" not in head else "binary data"
    except UnicodeDecodeError:
        return "binary data"


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint file without executing pickled code.

    ``.safetensors`` through safetensors; ``.pth``/``.pt``/``.bin``/``.ckpt`` through
    ``torch.load(weights_only=True)``. A wrapping dict (``{"model": ...}``, ``{"state_dict": ...}``)
    is unwrapped and a ``module.`` prefix (DataParallel) removed.

    Returns:
        A flat ``{name: tensor}`` state dict.

    Raises:
        ProbeError: if the file is missing, is not a checkpoint, or holds pickled code.
    """
    p = check_weights_path(path)
    if p.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            sd: Any = load_file(str(p))
        except (SafetensorError, OSError, ValueError) as e:
            raise ProbeError(
                f"weights file {str(p)!r} is not a readable safetensors checkpoint ({_short(e)})"
            ) from None
    else:
        try:
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise ProbeError(
                f"weights file {str(p)!r} is not a plain-tensor checkpoint: it is not a torch file "
                f"or it holds pickled objects, which probe refuses to execute ({_short(e)}); "
                "save a state_dict (torch.save(model.state_dict(), f)) or use safetensors"
            ) from None
        except Exception as e:  # any other failure of the reader: a text file, a truncated or foreign file
            raise ProbeError(f"weights file {str(p)!r} is not a checkpoint ({_looks_like(p)}; "
                             f"{type(e).__name__}: {_short(e)}); pass a .safetensors or torch.save state_dict "
                             "file") from None
    for key in ("model", "state_dict", "model_state_dict", "module"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
            break
    if isinstance(sd, dict) and sd and not any(isinstance(v, torch.Tensor) for v in sd.values()):
        kinds = ", ".join(sorted({type(v).__name__ for v in sd.values()}))
        raise ProbeError(f"weights file {str(p)!r} holds no tensors (only {kinds}); "
                         "save a state_dict with torch.save(model.state_dict(), f) or safetensors")
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ProbeError(
            f"weights file {str(p)!r} does not hold a state_dict of tensors; "
            "save one with torch.save(model.state_dict(), f) or safetensors"
        )
    ints = sorted(k for k, v in sd.items() if not (v.is_floating_point() or v.is_complex())
                  and k.rsplit(".", 1)[-1] in ("weight", "bias"))
    if ints:
        dtypes = ", ".join(sorted({str(sd[k].dtype).replace("torch.", "") for k in ints}))
        raise ProbeError(f"weights file {str(p)!r} has integer-typed weights ({dtypes}, e.g. {ints[0]}): "
                         "quantised checkpoints are not supported; pass the float weights")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def apply_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], name: str, source: str) -> None:
    """Load ``sd`` into ``model`` strictly, trying timm's checkpoint filter for its family.

    Raises:
        ProbeError: naming missing / unexpected / mis-shaped keys when the weights do not match.
    """
    problems = _mismatch(model, sd)
    if problems:
        filt = _timm_filter(model)
        if filt is not None:
            try:
                filtered = filt(dict(sd), model)
                if not _mismatch(model, filtered):
                    sd, problems = filtered, ""
            except Exception:  # the filter is a best-effort remapping of foreign layouts
                pass
    if problems:
        raise ProbeError(
            f"weights {source!r} do not match the architecture {name!r}: {problems}; "
            "pass weights trained for this --model"
        )
    model.load_state_dict(sd, strict=True)


def _mismatch(model: nn.Module, sd: dict[str, torch.Tensor]) -> str:
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [k for k in own if k in sd and tuple(own[k].shape) != tuple(sd[k].shape)]
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if keys:
            parts.append(f"{len(keys)} {label} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})")
    return "; ".join(parts)


def _timm_filter(model: nn.Module) -> Callable | None:
    mod = importlib.import_module(type(model).__module__)
    fn = getattr(mod, "checkpoint_filter_fn", None)
    return fn if callable(fn) else None


def short_message(e: BaseException, n: int = 160) -> str:
    """``e``'s message on one line, cut to ``n`` characters (for ProbeError messages)."""
    s = " ".join(str(e).split())
    return s if len(s) <= n else s[: n - 3] + "..."


_short = short_message


def cached_hub_file(hub_id: str, filenames: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")) -> str | None:
    """The local Hugging Face cache's copy of the first of ``filenames`` in the hub repository
    ``hub_id`` (``ORG/NAME`` or ``ORG/NAME@REVISION``), or ``None`` (nothing cached, or
    ``huggingface_hub`` not installed). Never touches the network."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    repo, _, rev = hub_id.partition("@")
    for fname in filenames:
        try:
            hit = try_to_load_from_cache(repo, fname, revision=rev or None)
        except Exception:  # a malformed id or cache entry means: not cached
            hit = None
        if isinstance(hit, str):
            return hit
    return None
