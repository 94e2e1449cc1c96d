"""timm models: ``--model vit_small_patch16_224`` or a short alias (:data:`ALIASES`).

Weights: ``--weights FILE`` (timm's ``checkpoint_filter_fn`` remaps foreign layouts of the family
when the keys do not match as they are), ``--random-init``, or timm's pretrained weights from the
Hugging Face hub when it is reachable, else from the local Hugging Face cache, else a ProbeError
naming ``--weights`` / ``--random-init``. The data config is timm's ``pretrained_cfg``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import ProbeError
from . import checkpoint
from .base import Constructor, ModelSource, scheme_of

from ..preflight import ALIASES, offline_weights_error, unknown_timm_model  # noqa: F401  (ALIASES: public here)


def resolve_name(name: str) -> str:
    """Map an alias to its timm name and check that timm knows it.

    Returns:
        The timm model name.

    Raises:
        ProbeError: for an unknown name, with the closest known names as suggestions.
    """
    import timm

    full = ALIASES.get(name, name)
    known = timm.list_models()
    if full in known:
        return full
    raise unknown_timm_model(name, known)


def cached_hub_file(hub_id: str) -> str | None:
    """The local Hugging Face cache's ``model.safetensors`` (or ``pytorch_model.bin``) of the
    timm hub id ``hub_id``, or ``None``."""
    return checkpoint.cached_hub_file(hub_id)


def from_hub(name: str) -> tuple[nn.Module, str]:
    """timm model ``name`` with its pretrained weights: downloaded by timm when the hub is
    reachable, else read from the local Hugging Face cache.

    Raises:
        ProbeError: hub unreachable and nothing cached, or the download failed (naming
            ``--weights FILE`` and ``--random-init``).
    """
    import timm

    probe_net = timm.create_model(name, pretrained=False)
    cfg = getattr(probe_net, "pretrained_cfg", {}) or {}
    hub_id = cfg.get("hf_hub_id") or name
    if not checkpoint.hub_reachable():
        cached = cached_hub_file(hub_id)
        if cached is not None:
            checkpoint.apply_state_dict(probe_net, checkpoint.load_state_dict(cached), name, cached)
            return probe_net, f"hub {hub_id} (local cache {cached})"
        raise offline_weights_error(name)
    try:
        net = timm.create_model(name, pretrained=True)
    except Exception as e:
        raise ProbeError(
            f"could not download pretrained weights for {name!r} ({checkpoint.short_message(e)}); "
            "pass a local checkpoint with --weights FILE"
        ) from None
    return net, f"hub {hub_id}"


class TimmSource(ModelSource):
    """Every other plain name (no ``:``, not the embedded model's, not a Hugging Face folder):
    a timm model name or one of :data:`ALIASES`; an unknown name is refused with the closest
    timm names (:func:`resolve_name`)."""

    name = "timm"
    scheme = "timm"
    example = "vit_small_patch16_224, deit_tiny, timm:vit_tiny"

    def handles(self, spec: Any) -> bool:
        if isinstance(spec, str) and scheme_of(spec) == self.scheme:
            return True  # the explicit form timm:NAME
        if not isinstance(spec, str) or scheme_of(spec) is not None:
            return False
        from ..cordonnier import DEFAULT_ALIASES
        from ..families import hf

        return spec not in DEFAULT_ALIASES and not hf.handles(spec)

    @staticmethod
    def _plain(spec: str) -> str:
        """``timm:NAME`` -> ``NAME``.

        Raises:
            ProbeError: for ``timm:`` with no name.
        """
        if spec.startswith("timm:"):
            spec = spec[len("timm:"):]
            if not spec:
                raise ProbeError("--model timm: needs a model name, e.g. timm:vit_small_patch16_224")
        return spec

    def display_name(self, spec: Any) -> str:
        return resolve_name(self._plain(spec))

    def architecture(self, spec: Any) -> Constructor:
        name = resolve_name(self._plain(spec))

        def make(seed: int) -> nn.Module:
            """timm's ``create_model(name, pretrained=False)`` (random init, seeded by the caller)."""
            import timm

            return timm.create_model(name, pretrained=False)

        return make

    def pretrained(self, spec: Any, make: Constructor, seed: int) -> tuple[nn.Module, str]:
        return from_hub(resolve_name(self._plain(spec)))
