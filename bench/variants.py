"""The four measured workloads and the worker process that runs one of them.

Every workload processes the same images (a pre-transformed tensor, streamed batch by batch through
:class:`probe.data.TensorImages`, so JPEG decoding and resizing are never timed):

* ``a`` — plain forward pass of the model as shipped (timm's fused attention,
  ``F.scaled_dot_product_attention``);
* ``b`` — plain forward pass with attention probabilities materialised (``fused_attn = False``:
  ``softmax(q k^T * scale)`` is computed explicitly); the floor for any tool that reads them;
* ``c`` — probe's full analysis, one call to :func:`probe.analyze` with its defaults (capture +
  streaming reducers + tables, and every further analysis ``analyze`` runs: the Δ/α fits and the
  conv-likeness test with its random-init null; no report);
* ``s`` — the streaming part of ``c`` alone (``fits=False, conv_test=False``): its cost grows with
  the number of images, while ``c - s`` is a fixed cost per analysis;
* ``s0`` — ``s`` with the reducer module of an earlier commit swapped in (``--before-ref``), timed
  in the same interleaved run: the before/after of the hot-path work;
* ``d`` — the naive baseline a user writes today: timm's ``AttentionExtract`` (torch.fx), every
  attention map of every layer kept as a NumPy array, then the same statistics computed afterwards
  in vectorised NumPy (mean attention distance in patches and pixels, entropy, prefix mass, the
  quadratic-encoding statistics ``phi``, mean attention maps, standard errors and 100
  Poisson-bootstrap replicates).

A worker is a fresh process per (model, workload); before each batch size its peak resident memory
(``VmHWM``) is reset, so the peak reported is that configuration's own. The parent sends it
commands over a pipe, so the four workers of a model stay alive and their timed repeats are
interleaved. The memory curve uses a fresh worker per point.
"""

from __future__ import annotations

import inspect
import math
import resource
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

VARIANTS = {
    "a": "forward, fused attention (as shipped)",
    "b": "forward, attention probabilities materialised",
    "c": "probe.analyze (full analysis: capture, reducers, tables, Δ/α fits, conv-likeness test with "
         "its random-init null; no report, attribution='none')",
    "s": "probe.analyze streaming part only (capture, reducers, tables; fits, conv test and "
         "attribution off)",
    "s0": "s with the reducer of an earlier commit (--before-ref), in the same run: before/after",
    "d": "naive: timm AttentionExtract + all maps kept + NumPy metrics",
}

#: Weights of DeiT-Tiny in the shared data folder; ViT-S/16 runs on random weights.
DEIT_WEIGHTS = ROOT.parent / "shared" / "data" / "weights" / "deit_tiny_patch16_224.safetensors"


def load_model(name: str, seed: int = 0):
    """A :class:`probe.models.ResolvedModel`: shared DeiT-Tiny weights when present, else random."""
    from probe.models import resolve_model, resolve_name

    full = resolve_name(name)
    if full == "deit_tiny_patch16_224" and DEIT_WEIGHTS.is_file():
        return resolve_model(full, weights=DEIT_WEIGHTS)
    return resolve_model(full, random_init=True, seed=seed)


def load_reducer(path: str):
    """``LayerReducer`` of a reducers module saved from an earlier commit (for workload s0).

    The file is loaded as a module of ``probe.analyses`` so that its relative imports resolve.
    """
    import importlib.util

    spec = importlib.util.spec_from_file_location("probe.analyses._before_reducers", path)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = "probe.analyses"
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod.LayerReducer


def rss_mb() -> float:
    """Peak resident set size of this process, in MiB.

    ``VmHWM`` of ``/proc/self/status`` (resettable with :func:`reset_peak`); where ``/proc`` is
    absent, ``ru_maxrss`` (peak since the process started).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    scale = 1.0 if sys.platform == "darwin" else 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def reset_peak() -> bool:
    """Reset the peak resident set size to the current one (Linux ``clear_refs`` value 5).

    Returns:
        True if the kernel accepted the reset, so the next :func:`rss_mb` is the peak since now.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if hasattr(m, "fused_attn") and hasattr(m, "num_heads")]


def _autocast(device: torch.device, amp: bool):
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def naive_metrics(
    maps: dict[str, list[np.ndarray]],
    num_prefix_tokens: int,
    grid: tuple[int, int],
    patch_px: float,
    n_bootstrap: int = 100,
    seed: int = 0,
) -> dict[str, dict[str, np.ndarray]]:
    """What a user computes from kept attention maps, layer by layer, in vectorised NumPy.

    Args:
        maps: ``{layer name: [array (B, H, T, T), ...]}`` attention probabilities per batch.
        num_prefix_tokens, grid, patch_px: token layout (prefix tokens, patch grid, pixels/patch).

    Returns:
        ``{layer name: {"mean": (H, 9), "se": (H, 9), "boot": (R, H, 9), "mean_attn": (H, P, P)}}``
        with features ordered like :data:`probe.analyses.reducers.FEATURES`.
    """
    rows_n, cols_n = grid
    idx = np.arange(rows_n * cols_n)
    r, c = idx // cols_n, idx % cols_n
    dr = r[None, :] - r[:, None]  # NumPy's default dtypes, as a user writes it
    dc = c[None, :] - c[:, None]
    dist = np.sqrt(dr**2 + dc**2)
    tables = [dist, dist * patch_px, dr, dc, dr * dr, dc * dc, dr * dc]
    rng = np.random.default_rng(seed)
    out = {}
    for name, chunks in maps.items():
        attn = np.concatenate(chunks)  # (N, H, T, T)
        n = attn.shape[0]
        rows = attn[:, :, num_prefix_tokens:, :]
        entropy = -(rows * np.log(np.clip(rows, 1e-30, None))).sum(-1).mean(-1)
        patch = rows[..., num_prefix_tokens:]
        mass = patch.sum(-1, keepdims=True)
        a_prime = patch / mass
        feats = [(a_prime * t).sum(-1).mean(-1) for t in tables]
        prefix = 1.0 - mass[..., 0].mean(-1)
        f = np.stack([feats[0], feats[1], entropy, prefix, *feats[2:]], axis=-1).astype(np.float64)
        w = rng.poisson(1.0, size=(n_bootstrap, n)).astype(np.float64)
        out[name] = {
            "mean": f.mean(0),
            "se": f.std(0, ddof=1) / math.sqrt(n) if n > 1 else np.full(f.shape[1:], np.nan),
            "boot": np.einsum("rn,nhf->rhf", w, f) / np.maximum(w.sum(1), 1e-12)[:, None, None],
            "mean_attn": a_prime.mean(0),
        }
        del attn, rows, patch, a_prime, feats
    return out


class Workload:
    """One workload (``a``/``b``/``c``/``d``) on one model, ready to run repeatedly.

    Args:
        spec: ``model``, ``variant``, ``images`` (path of the saved pool tensor), ``num_images``,
            ``batch_size``, ``device``, ``amp``, ``threads``, ``seed``.
    """

    def __init__(self, spec: dict[str, Any]):
        from probe.data import TensorImages

        self.spec = spec
        if spec.get("threads"):
            torch.set_num_threads(int(spec["threads"]))
        self.device = torch.device(spec["device"])
        self.variant = spec["variant"]
        self.batch_size = int(spec.get("batch_size", 1))
        self.resolved = load_model(spec["model"], spec.get("seed", 0))
        self.model = self.resolved.model.to(self.device).eval()
        pool = torch.load(spec["images"], weights_only=True)
        self.source = TensorImages(pool, int(spec["num_images"]))
        self.summary: dict[str, Any] = {}
        if self.variant == "a":
            self.model = self.model  # as shipped: timm's default (fused) attention
        elif self.variant in ("b", "d"):
            for m in _attention_modules(self.model):
                m.fused_attn = False
        if self.variant == "s0":
            self.before_reducer = load_reducer(spec["before_reducer"])
        if self.variant == "d":
            from timm.utils import AttentionExtract

            self.extract = AttentionExtract(self.model)  # torch.fx graph; built once, not timed
        self._sync()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def _batches(self, num_images: int | None):
        from probe.data import TensorImages

        src = self.source if num_images is None else TensorImages(self.source.pool, num_images)
        for batch, _ in src.batches(self.batch_size):
            yield batch.to(self.device, non_blocking=True)

    def run(self, num_images: int | None = None, batch_size: int | None = None) -> float:
        """Process the first ``num_images`` images (default all) once, in batches of ``batch_size``.

        Returns:
            Wall seconds, the device synchronised before and after (the process's CPU seconds
            of the run are left in :attr:`last_cpu_s`).
        """
        if batch_size is not None:
            self.batch_size = int(batch_size)
        self._sync()
        c0, t0 = time.process_time(), time.perf_counter()
        getattr(self, "_run_" + self.variant)(num_images)
        self._sync()
        wall = time.perf_counter() - t0
        self.last_cpu_s = time.process_time() - c0
        return wall

    def _run_a(self, num_images):
        with torch.no_grad(), _autocast(self.device, self.spec.get("amp", False)):
            for batch in self._batches(num_images):
                self.model(batch)

    _run_b = _run_a  # same loop; the attention modules were switched to explicit softmax

    def _run_c(self, num_images, **options):
        import probe
        from probe.data import TensorImages

        src = self.source if num_images is None else TensorImages(self.source.pool, num_images)
        options.setdefault("attribution", "none")  # (c) is capture + statistics + fits + grid test
        if "attribution" in inspect.signature(probe.analyze).parameters:
            options.setdefault("attribution", "none")  # not part of workload c (see VARIANTS)
        result = probe.analyze(
            self.resolved, src, batch_size=self.batch_size, device=str(self.device),
            amp=bool(self.spec.get("amp", False)), seed=self.spec.get("seed", 0), **options,
        )
        heads = result.heads
        self.summary = {
            "mean_distance_px": heads["mean_distance_px"].tolist(),
            "entropy_nats": heads["entropy_nats"].tolist(),
            "prefix_mass": heads["prefix_mass"].tolist(),
        }

    def _run_s(self, num_images):
        self._run_c(num_images, fits=False, conv_test=False)

    def _run_s0(self, num_images):
        import probe.pipeline as pipeline

        current = pipeline.LayerReducer
        pipeline.LayerReducer = self.before_reducer
        try:
            self._run_c(num_images, fits=False, conv_test=False)
        finally:
            pipeline.LayerReducer = current

    def _run_d(self, num_images):
        maps: dict[str, list[np.ndarray]] = {}
        with torch.no_grad(), _autocast(self.device, self.spec.get("amp", False)):
            for batch in self._batches(num_images):
                out = self.extract(batch)
                for name, attn in out.items():
                    maps.setdefault(name, []).append(attn.float().cpu().numpy())
        model = self.model
        grid = tuple(int(v) for v in model.patch_embed.grid_size)
        patch_px = float(model.patch_embed.patch_size[0])
        res = naive_metrics(maps, int(model.num_prefix_tokens), grid, patch_px, seed=self.spec.get("seed", 0))
        del maps
        self.summary = {
            "mean_distance_px": np.concatenate([v["mean"][:, 1] for v in res.values()]).tolist(),
            "entropy_nats": np.concatenate([v["mean"][:, 2] for v in res.values()]).tolist(),
            "prefix_mass": np.concatenate([v["mean"][:, 3] for v in res.values()]).tolist(),
        }

    def reset_peak(self) -> dict[str, Any]:
        """Start a new peak-memory window (host and CUDA); returns the current RSS and whether the
        host reset worked."""
        import gc

        gc.collect()
        ok = reset_peak()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        return {"reset": ok, "rss_mb": rss_mb()}

    def stats(self) -> dict[str, Any]:
        """Peak memory of the current window: host RSS and, on CUDA, ``max_memory_allocated`` (MiB)."""
        out: dict[str, Any] = {"peak_rss_mb": rss_mb(), "threads": torch.get_num_threads()}
        if self.device.type == "cuda":
            out["cuda_peak_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        return out


def worker_main(conn, spec: dict[str, Any]) -> None:
    """Child process: build the workload, then serve ``("run", n, batch_size)``, ``("reset",)``,
    ``("stats",)`` and ``("exit",)``.

    Replies are ``("ok", value)`` or ``("error", traceback text)``.
    """
    try:
        work = Workload(spec)
        conn.send(("ok", {"setup_rss_mb": rss_mb()}))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    while True:
        cmd = conn.recv()
        try:
            if cmd[0] == "run":
                wall = work.run(*cmd[1:])
                conn.send(("ok", {"wall_s": wall, "cpu_s": work.last_cpu_s}))
            elif cmd[0] == "reset":
                conn.send(("ok", work.reset_peak()))
            elif cmd[0] == "stats":
                conn.send(("ok", {**work.stats(), "summary": work.summary}))
            elif cmd[0] == "exit":
                conn.send(("ok", None))
                return
            else:
                conn.send(("error", f"unknown command {cmd!r}"))
        except BaseException:
            conn.send(("error", traceback.format_exc()))
