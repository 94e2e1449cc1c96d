"""``probe.track``: attention geometry during training, for any model and any training loop.

Every ``every`` steps a :class:`Tracker` runs probe's capture, streaming reducers, Δ/α fits and
the conv test's lattice statistic (:func:`probe.analyze` without attribution and without the
random-init null) on a fixed *probe batch* and records, per layer and head and step: Δ
(``delta_row``, ``delta_col``, patches), α (per patch²), the measured 90 % radius
(``r90_empirical_patches``), mean attention distance (pixels, patches), entropy (nats); per layer
and step the conv score and verdict (:mod:`probe.analyses.convlike`). The model is put in eval
mode for the measurement and returned to the mode it was in; no gradient is taken and the global
RNG state is restored, so tracking does not change the training run.

Use it in any loop::

    tracker = probe.track.Tracker(probe_images, every=250, out_dir="runs/x")
    for step, (x, y) in enumerate(loader):
        ...                       # forward, backward, optimizer step
        tracker.step(model, step)
    tracker.heads                 # DataFrame: step, layer, head, delta_row, ..., entropy_nats
    tracker.write_report("runs/x")   # training report: Cordonnier Fig. 3-style trajectories

With PyTorch Lightning installed, :func:`lightning_callback` returns a callback doing the same.
TensorBoard scalars are written when ``tensorboard=True`` and ``torch.utils.tensorboard`` can be
imported.

Overhead (measured in ``bench/track.py``, results in ``bench/RESULTS-track.md``): one record is one
forward pass over the probe batch with materialised attention, plus the fits (~10 ms per head)
and the lattice null (~0.1 s per layer); on the 2-core CPU with the shipped 6-layer, 9-head
model and 16 probe images one record costs about a second, i.e. under 2 % of training time at
``every=250`` steps of batch 100.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from .errors import ProbeError

#: Per-head columns a record keeps (from the heads table of :func:`probe.analyze`).
HEAD_COLUMNS = (
    "delta_row", "delta_col", "alpha", "quad_status", "r90_empirical_patches",
    "mean_distance_px", "mean_distance_patches", "entropy_nats",
)
#: Per-layer columns a record keeps.
LAYER_COLUMNS = ("mean_distance_px", "entropy_nats", "conv_n_local", "conv_score", "conv_verdict")


def rescore(heads: pd.DataFrame, layers_table: pd.DataFrame | None = None, config: Any = None,
            grid: tuple[int, int] | None = None, cache: dict | None = None) -> pd.DataFrame:
    """The conv test (:func:`probe.analyses.convlike.convlike_test`) redone on every record.

    Each record's per-head Δ and locality radius (``r90_empirical_patches`` when recorded, else
    the radius of ``alpha``) are tested as one model per step, so records taken with an earlier
    version of the test are judged with the current one.

    Args:
        heads: :attr:`Tracker.heads` (``step``, ``layer``, ``head``, ``delta_row``, ``delta_col``
            and ``r90_empirical_patches`` or ``alpha``).
        layers_table: :attr:`Tracker.layers_table`; its other columns are kept (None: only the
            test's columns are returned).
        config: :class:`~probe.analyses.convlike.ConvLikeConfig` (default thresholds).
        grid: the patch grid ``(rows, cols)`` of the layers (limits the kernel and dilations).
        cache: a dict reused for the null draws (shared across calls).

    Returns:
        one row per (step, layer): ``conv_verdict``, ``conv_dilation``, ``conv_score``,
        ``conv_p_value``, ``conv_n_local``, ``conv_n_taps`` and ``conv_deterministic``, merged
        onto ``layers_table`` when given.

    Raises:
        ProbeError: when neither a radius nor ``alpha`` was recorded.
    """
    import numpy as np

    from .analyses.convlike import ConvLikeConfig, LayerFit, convlike_test

    cfg = config or ConvLikeConfig()
    if "r90_empirical_patches" not in heads and "alpha" not in heads:
        raise ProbeError("the records have neither r90_empirical_patches nor alpha; cannot judge locality")
    cache = {} if cache is None else cache
    cols = ["conv_verdict", "conv_dilation", "conv_score", "conv_p_value", "conv_n_local", "conv_n_taps",
            "conv_deterministic"]
    frames = []
    for step, gs in heads.groupby("step", sort=True):
        fits = {}
        for layer, g in gs.groupby("layer", sort=True):
            g = g.sort_values("head")
            d = g[["delta_row", "delta_col"]].to_numpy(dtype=float)
            finite = np.isfinite(d).all(1)
            if "r90_empirical_patches" in g:
                r90 = g["r90_empirical_patches"].to_numpy(dtype=float)
                fits[int(layer)] = LayerFit(np.where(finite[:, None], d, 0.0), r90=np.where(finite, r90, np.inf),
                                            grid=grid)
            else:
                a = g["alpha"].to_numpy(dtype=float)
                fits[int(layer)] = LayerFit(np.where(finite[:, None], d, 0.0), np.where(finite, a, 0.0), grid=grid)
        t = convlike_test(fits, config=cfg, cache=cache).layers
        t.insert(0, "step", step)
        frames.append(t[["step", "layer", *cols]])
    out = pd.concat(frames, ignore_index=True)
    if layers_table is None:
        return out
    base = layers_table.drop(columns=[c for c in cols + ["conv_score_taps"] if c in layers_table])
    return base.merge(out, on=["step", "layer"], how="left")


def trajectory_verdicts(rescored: pd.DataFrame, last: float = 0.5) -> pd.DataFrame:
    """Each layer's conv verdict over the last part of a training run.

    Args:
        rescored: :func:`rescore` output (``step``, ``layer``, ``conv_verdict``, ``conv_dilation``).
        last: the fraction of the run's steps that counts as its last part (records with
            ``step >= (1 − last) · final step``).

    Returns:
        one row per layer: ``records`` in the last part, ``conv_like_fraction`` there,
        ``final_verdict`` (at the last record), ``dilation`` (most common among the conv-like
        records, 0 if none), ``first_step``/``final_step`` of that part.

    Raises:
        ProbeError: unless ``0 < last <= 1``.
    """
    if not 0 < last <= 1:
        raise ProbeError(f"last must be a fraction in (0, 1], got {last}")
    final = int(rescored["step"].max())
    part = rescored[rescored["step"] >= (1 - last) * final]
    rows = []
    for layer, g in part.groupby("layer", sort=True):
        g = g.sort_values("step")
        like = g[g["conv_verdict"] == "conv-like"]
        rows.append({"layer": int(layer), "records": len(g), "conv_like_fraction": len(like) / len(g),
                     "final_verdict": str(g["conv_verdict"].iloc[-1]),
                     "dilation": int(like["conv_dilation"].mode().iloc[0]) if len(like) else 0,
                     "first_step": int(g["step"].iloc[0]), "final_step": int(g["step"].iloc[-1])})
    return pd.DataFrame(rows)


class Tracker:
    """Record attention geometry of a model every ``every`` training steps.

    Args:
        probe_images: float tensor ``(N, C, H, W)`` already transformed to model input (the same
            images every record), e.g. ``N = 16``.
        every: record when ``step % every == 0`` (and always via :meth:`record`).
        layers: layers to analyse (``"all"``, ``"0-2"``, ...).
        out_dir: if given, ``track_heads.csv`` / ``track_layers.csv`` are (re)written there after
            every record (atomically), and TensorBoard events go to ``out_dir/tensorboard``.
        tensorboard: write scalars (per layer: mean distance, entropy, conv score; per head:
            α and the distance of Δ to the query) with ``torch.utils.tensorboard`` when importable.
        conv_config: :class:`~probe.analyses.convlike.ConvLikeConfig` of the conv statistic.

    Raises:
        ProbeError: ``probe_images`` not a 4-D float tensor, or ``every < 1``.
    """

    def __init__(self, probe_images: torch.Tensor, every: int = 250, layers: str = "all",
                 out_dir: str | Path | None = None, tensorboard: bool = False, conv_config: Any = None):
        if not isinstance(probe_images, torch.Tensor) or probe_images.ndim != 4 or not probe_images.is_floating_point():
            raise ProbeError("probe_images must be a float tensor (N, C, H, W) of transformed images")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ProbeError(f"every must be a positive integer number of steps, got {every!r}")
        self.images = probe_images.detach().float().cpu()
        self.every, self.layers, self.conv_config = every, layers, conv_config
        self.grid: tuple[int, int] | None = None
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self._heads: list[pd.DataFrame] = []
        self._layers: list[pd.DataFrame] = []
        self._writer = None
        if tensorboard and self.out_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(self.out_dir / "tensorboard"))
            except Exception:  # tensorboard not installed: CSV only
                self._writer = None

    # -- recording -----------------------------------------------------------------------
    def step(self, model: nn.Module, step: int) -> bool:
        """Record if ``step % every == 0``; returns whether a record was taken."""
        if step % self.every:
            return False
        self.record(model, step)
        return True

    def record(self, model: nn.Module, step: int) -> None:
        """Analyse ``model`` on the probe batch now and append the rows for ``step``."""
        from .pipeline import analyze

        was_training = model.training
        rng = torch.get_rng_state()
        device = next(model.parameters()).device
        try:
            result = analyze(model, self.images.to(device), layers=self.layers, device=str(device),
                             attribution="none", null_seeds=0, n_bootstrap=0, conv_config=self.conv_config,
                             batch_size=len(self.images))
        finally:
            model.train(was_training)
            torch.set_rng_state(rng)
        grids = {tuple(st.geometry.grid) for st in result.stats.values()}
        self.grid = grids.pop() if len(grids) == 1 else None  # the conv test's kernel stays within it
        heads = result.heads[["layer", "head", *[c for c in HEAD_COLUMNS if c in result.heads]]].copy()
        heads.insert(0, "step", int(step))
        layers = result.layers[["layer", *[c for c in LAYER_COLUMNS if c in result.layers]]].copy()
        layers.insert(0, "step", int(step))
        self._heads.append(heads)
        self._layers.append(layers)
        if self._writer is not None:
            for _, r in layers.iterrows():
                for c in ("mean_distance_px", "entropy_nats", "conv_score"):
                    if c in r:
                        self._writer.add_scalar(f"layer{int(r.layer)}/{c}", float(r[c]), step)
        if self.out_dir is not None:
            self.save(self.out_dir)

    # -- results -------------------------------------------------------------------------
    @property
    def heads(self) -> pd.DataFrame:
        """One row per (step, layer, head): :data:`HEAD_COLUMNS`."""
        return pd.concat(self._heads, ignore_index=True) if self._heads else pd.DataFrame(columns=["step", "layer", "head", *HEAD_COLUMNS])

    @property
    def layers_table(self) -> pd.DataFrame:
        """One row per (step, layer): :data:`LAYER_COLUMNS`."""
        return pd.concat(self._layers, ignore_index=True) if self._layers else pd.DataFrame(columns=["step", "layer", *LAYER_COLUMNS])

    def save(self, out_dir: str | Path) -> None:
        """Write ``track_heads.csv`` and ``track_layers.csv`` to ``out_dir`` (atomically)."""
        from .result import atomic_write_text

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "track_heads.csv", self.heads.to_csv(index=False))
        atomic_write_text(out / "track_layers.csv", self.layers_table.to_csv(index=False))

    def load(self, out_dir: str | Path, until_step: int | None = None) -> None:
        """Reload records written by :meth:`save` (e.g. when a training run resumes), keeping
        those with ``step <= until_step``."""
        out = Path(out_dir)
        if not (out / "track_heads.csv").is_file():
            return
        h = pd.read_csv(out / "track_heads.csv")
        l = pd.read_csv(out / "track_layers.csv")
        if until_step is not None:
            h, l = h[h.step <= until_step], l[l.step <= until_step]
        self._heads = [h] if len(h) else []
        self._layers = [l] if len(l) else []

    def write_report(self, out_dir: str | Path, log: pd.DataFrame | None = None,
                     meta: dict | None = None, title: str = "", summary: str = "") -> Path:
        """Write ``training_report.html`` (one self-contained file) and the two CSVs to ``out_dir``.

        Args:
            log: optional training log (``step``, ``train_loss``, ``train_acc``, ``lr``, ...).
            meta, title, summary: shown at the top of the page.

        Raises:
            ProbeError: if nothing was recorded yet.
        """
        from .report.training import render_training_report
        from .result import atomic_write_text

        if not self._heads:
            raise ProbeError("the tracker has no records yet; call tracker.step(model, step) in the loop first")
        out = Path(out_dir)
        self.save(out)
        page = render_training_report(self.heads, rescore(self.heads, self.layers_table, self.conv_config,
                                                          grid=self.grid), log, meta, title, summary)
        atomic_write_text(out / "training_report.html", page)
        return out / "training_report.html"

    def close(self) -> None:
        """Flush TensorBoard events."""
        if self._writer is not None:
            self._writer.close()


def lightning_callback(tracker: Tracker):
    """A PyTorch Lightning ``Callback`` calling ``tracker.step(pl_module, trainer.global_step)``
    after every training batch.

    Raises:
        ProbeError: if neither ``lightning`` nor ``pytorch_lightning`` is installed.
    """
    try:
        from lightning.pytorch import Callback  # type: ignore
    except ImportError:
        try:
            from pytorch_lightning import Callback  # type: ignore
        except ImportError:
            raise ProbeError("PyTorch Lightning is not installed; pip install lightning, or call "
                             "tracker.step(model, step) in your loop") from None

    class ProbeTrackCallback(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            tracker.step(pl_module, int(trainer.global_step))

    return ProbeTrackCallback()
