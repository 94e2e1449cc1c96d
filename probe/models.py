"""Model resolution: a name or module in, an eval-mode ``nn.Module`` with known weights out.

* timm names, with short aliases (:data:`ALIASES`): ``vit_small`` -> ``vit_small_patch16_224``.
* ``package.module:factory`` names a user factory returning an ``nn.Module`` (the module is found on
  ``sys.path`` or from the current directory; ``path/to/model.py:factory`` loads a file).
* Weights come from ``--weights FILE`` (safetensors; ``.pth``/``.pt``/``.bin`` only through
  ``torch.load(weights_only=True)``, which never executes pickled code), or from the hub when it is
  reachable, or — only when asked explicitly — random initialisation.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import os
import pickle
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .errors import ProbeError

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

HUB_HOST = "huggingface.co"


@dataclass
class ResolvedModel:
    """A model ready for analysis.

    Attributes:
        model: the ``nn.Module`` in eval mode.
        name: the resolved model name (timm name, factory path or class name).
        weights: human-readable source of the weights (file path, hub id, "random init", ...).
        num_params: number of parameters.
        pretrained_cfg: timm-style data config dict (``input_size``, ``mean``, ``std``,
            ``interpolation``, ``crop_pct``) when known, else empty.
        rebuild: ``rebuild(seed) -> nn.Module``, the same architecture at its random
            initialisation (used by null distributions), or ``None`` when unknown.
    """

    model: nn.Module
    name: str
    weights: str
    num_params: int
    pretrained_cfg: dict[str, Any]
    rebuild: Callable[[int], nn.Module] | None = None

    def random_init(self, seed: int) -> nn.Module:
        """The same architecture at random initialisation with ``seed``, in eval mode.

        Uses the model's own constructor (timm name or factory); for an in-memory module, a deep
        copy whose submodules' ``reset_parameters`` (and timm ``init_weights``) are re-run.
        """
        with torch.random.fork_rng(devices=[]):  # the caller's global RNG state is left alone
            torch.manual_seed(seed)
            if self.rebuild is not None:
                net = self.rebuild(seed)
            else:
                import copy

                net = copy.deepcopy(self.model)
                for mod in net.modules():
                    if hasattr(mod, "reset_parameters"):
                        mod.reset_parameters()
                if hasattr(net, "init_weights"):
                    try:
                        net.init_weights()
                    except TypeError:
                        pass
        return net.to(next(self.model.parameters()).device).eval()


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


def resolve_name(name: str) -> str:
    """Map an alias to its timm name and check that timm knows it.

    Returns:
        The timm model name.

    Raises:
        ProbeError: for an unknown name, with the closest known names as suggestions.
    """
    import timm

    full = ALIASES.get(name, name)
    if full in timm.list_models():
        return full
    known = sorted(set(timm.list_models()) | set(ALIASES))
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
    if not close:
        close = [m for m in known if name.split("_")[0] in m][:5]
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ProbeError(
        f"unknown model {name!r}{hint} (timm names, the aliases {', '.join(sorted(ALIASES)[:6])}..., "
        "or package.module:factory)"
    )


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
    p = Path(path)
    if p.is_dir():
        raise ProbeError(f"--weights {str(p)!r} is a folder, not a checkpoint file; pass the .safetensors or .pth file in it")
    if not p.is_file():
        raise ProbeError(f"weights file {str(p)!r} not found; pass an existing --weights FILE")
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
        except (RuntimeError, EOFError, OSError, ValueError) as e:
            raise ProbeError(f"weights file {str(p)!r} is not a checkpoint ({_short(e)})") from None
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


def _short(e: BaseException, n: int = 160) -> str:
    s = " ".join(str(e).split())
    return s if len(s) <= n else s[: n - 3] + "..."


def _import_module(mod_name: str, spec: str) -> Any:
    """Import ``mod_name``: a file ``path/to/model.py``, else a module on ``sys.path``, else one
    found from the current directory (the ``probe`` console script does not put it on the path)."""
    if mod_name.endswith(".py"):
        path = Path(mod_name).resolve()
        if not path.is_file():
            raise ProbeError(f"model file {mod_name!r} for --model {spec!r} not found")
        loader_spec = importlib.util.spec_from_file_location(path.stem, path)
        mod = importlib.util.module_from_spec(loader_spec)
        sys.modules[path.stem] = mod
        try:
            loader_spec.loader.exec_module(mod)
        except (Exception, SystemExit) as e:  # a module that raises, or calls sys.exit(), at import
            del sys.modules[path.stem]
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


def _import_failure(e: BaseException) -> str:
    """One-line description of why a user module could not be imported."""
    if isinstance(e, SystemExit):
        return f"it called sys.exit({e.code!r}) at import"
    if isinstance(e, SyntaxError):
        return f"SyntaxError: {e.msg} at {Path(e.filename or '?').name} line {e.lineno}"
    return _short(e)


def _import_factory(spec: str) -> Callable[..., nn.Module]:
    mod_name, _, attr = spec.rpartition(":") if spec.count(":") > 1 else spec.partition(":")
    try:
        mod = _import_module(mod_name, spec)
    except ImportError as e:
        raise ProbeError(
            f"cannot import {mod_name!r} for --model {spec!r} ({_short(e)}); "
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


def resolve_model(
    model: str | nn.Module | None,
    weights: str | Path | None = None,
    random_init: bool = False,
    seed: int = 0,
) -> ResolvedModel:
    """Build or wrap a model and load its weights.

    Args:
        model: ``None`` or ``"cordonnier"``: the embedded trained model (:mod:`probe.cordonnier`,
            no download); a timm name or alias, ``package.module:factory``, an ``nn.Module``, or a Hugging
            Face model: ``hf:FOLDER`` / ``hf:ORG/NAME`` (see :mod:`probe.families.hf`).
        weights: a local checkpoint file (see :func:`load_state_dict`).
        random_init: analyse random weights; must be explicit, never a silent fallback.
        seed: seed of the random initialisation.

    Returns:
        A :class:`ResolvedModel` in eval mode.

    Raises:
        ProbeError: unknown name, bad or mismatching weights, or hub weights unreachable
            (the message names ``--weights`` and ``--random-init``).
    """
    if weights is not None and random_init:
        raise ProbeError("--weights and --random-init exclude each other; pass one")
    from . import cordonnier

    if model is None or (isinstance(model, str) and model in cordonnier.DEFAULT_ALIASES):
        if weights is not None:
            raise ProbeError("the embedded model comes with its weights; pass --model "
                             "probe.cordonnier:build --weights FILE for other weights of its architecture")
        return cordonnier.resolve_default(random_init=random_init, seed=seed)
    from .families import hf

    if hf.handles(model):  # hf:FOLDER, hf:ORG/NAME, a transformers folder or model
        return hf.resolve_hf(model, weights=weights, random_init=random_init, seed=seed)
    if isinstance(model, nn.Module):
        name = type(model).__name__
        source = "as given (in-memory module)"
        if weights is not None:
            apply_state_dict(model, load_state_dict(weights), name, str(weights))
            source = str(weights)
        net = model
    elif ":" in model:
        factory = _import_factory(model)
        torch.manual_seed(seed)
        try:
            net = factory()
        except Exception as e:
            raise ProbeError(f"factory {model!r} failed: {_short(e)}") from None
        if not isinstance(net, nn.Module):
            raise ProbeError(f"factory {model!r} returned {type(net).__name__}, not an nn.Module")
        name = model
        if weights is not None:
            apply_state_dict(net, load_state_dict(weights), name, str(weights))
            source = str(weights)
        elif random_init:
            source = f"random init (seed {seed})"
        else:
            raise ProbeError(
                f"--model {model!r} is a user factory: pass its trained weights with --weights FILE "
                "(or --random-init to analyse it untrained)"
            )
    else:
        import timm

        name = resolve_name(model)
        torch.manual_seed(seed)
        if weights is not None:
            net = timm.create_model(name, pretrained=False)
            apply_state_dict(net, load_state_dict(weights), name, str(weights))
            source = str(weights)
        elif random_init:
            net = timm.create_model(name, pretrained=False)
            source = f"random init (seed {seed})"
        else:
            net, source = _from_hub(name)
    net.eval()
    cfg = dict(getattr(net, "pretrained_cfg", None) or {})
    rebuild = None
    if isinstance(model, str) and ":" in model:
        rebuild = lambda seed: factory()  # noqa: E731  (seeded by ResolvedModel.random_init)
    elif isinstance(model, str):
        rebuild = lambda seed: __import__("timm").create_model(name, pretrained=False)  # noqa: E731
    return ResolvedModel(
        model=net,
        name=name,
        weights=source,
        num_params=sum(p.numel() for p in net.parameters()),
        pretrained_cfg=cfg,
        rebuild=rebuild,
    )


def _from_hub(name: str) -> tuple[nn.Module, str]:
    import timm

    probe_net = timm.create_model(name, pretrained=False)
    cfg = getattr(probe_net, "pretrained_cfg", {}) or {}
    hub_id = cfg.get("hf_hub_id") or name
    if not hub_reachable():
        cached = _cached_hub_file(hub_id)
        if cached is not None:
            apply_state_dict(probe_net, load_state_dict(cached), name, cached)
            return probe_net, f"hub {hub_id} (local cache {cached})"
        raise ProbeError(
            f"pretrained weights for {name!r} need the Hugging Face hub ({HUB_HOST}), which is not "
            "reachable; pass a local checkpoint with --weights FILE (or --random-init to analyse "
            "untrained weights explicitly)"
        )
    try:
        net = timm.create_model(name, pretrained=True)
    except Exception as e:
        raise ProbeError(
            f"could not download pretrained weights for {name!r} ({_short(e)}); "
            "pass a local checkpoint with --weights FILE"
        ) from None
    return net, f"hub {hub_id}"


def _cached_hub_file(hub_id: str) -> str | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    repo, _, rev = hub_id.partition("@")
    for fname in ("model.safetensors", "pytorch_model.bin"):
        try:
            hit = try_to_load_from_cache(repo, fname, revision=rev or None)
        except Exception:
            hit = None
        if isinstance(hit, str):
            return hit
    return None
