"""The training recipe of :mod:`probe.cordonnier.train` on one CUDA GPU, fast enough for the paper's
own setting (width 400, MLP 512, 6 layers, 9 heads, 300 epochs of batch 100).

The recipe is the CPU recipe's (SGD with momentum 0.9, weight decay on the weights only, linear
warm-up then cosine decay, random crop with 4-pixel zero padding and horizontal flip, cross
entropy); what differs is how it runs:

* the whole training set lives on the GPU (normalised float32); each epoch's shuffle and
  augmentation are made there in one batched gather (crop offsets and flips drawn from a CUDA
  generator seeded by ``(seed, epoch)``);
* one training step (zeroing the gradients, forward under bf16 autocast, backward, the SGD update
  with the learning rates read from device tensors) is captured once as a CUDA graph and replayed,
  so 150,000 steps cost little more than their arithmetic; without CUDA (or with ``graphs=False``)
  the same step runs eagerly, which is how it is tested on the CPU;
* the positional parameters Δ and α of every head are recorded every ``track_every`` steps (they
  *are* the heads' centres and sharpness in a position-only model: probe's fits recover them to
  < 1e-3, ``tests/test_quadratic.py``), so the conv test can be run over the whole trajectory
  afterwards (``bench/reproduction.py``).

It is not bit-identical to the CPU recipe (other random streams, bf16 products); a run's seed fixes
its initialisation and every epoch's shuffle and augmentation.

Shapes: images ``(N, 3, 32, 32)`` float32 after normalisation, labels ``(N,)`` int64.
"""

from __future__ import annotations

import io
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ProbeError
from .model import CordonnierViT
from .train import evaluate, normalize, position_parameter_names
from .train import lr_factors as cpu_lr_factors


@dataclass
class CudaTrainConfig:
    """Settings of one GPU run (defaults: the paper's ``runs/quadratic`` setting).

    Attributes:
        dim, depth, num_heads, mlp_dim, attention, values, dropout: the architecture
            (:class:`CordonnierViT`; defaults: the paper's, every head mixing the full-width
            input, hidden dropout 0.1).
        epochs: full passes over the training set (the last partial batch is dropped).
        batch_size, lr, momentum, weight_decay, warmup (fraction of the steps): SGD settings.
        position_lr_mult: factor on the learning rate of Δ and α (1: as the weights).
        position_schedule: ``"cosine"`` (Δ and α decay with the weights) or ``"constant"``
            (held at ``lr · position_lr_mult`` after warm-up).
        seed: initialisation, shuffles and augmentation.
        amp: bf16 autocast for the forward and backward products.
        graphs: capture the training step as a CUDA graph (CUDA only).
        track_every: steps between two records of every head's Δ and α.
        budget_s: if set, the number of epochs is lowered (before training starts, so the
            schedule stays a full cosine) to what fits in this many seconds at the measured step
            time; the summary states the epochs actually run.
    """

    dim: int = 400
    depth: int = 6
    num_heads: int = 9
    mlp_dim: int = 512
    attention: str = "quadratic"
    values: str = "input"
    dropout: float = 0.1
    epochs: int = 300
    batch_size: int = 100
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup: float = 0.05
    position_lr_mult: float = 1.0
    position_schedule: str = "cosine"
    seed: int = 0
    amp: bool = True
    graphs: bool = True
    track_every: int = 250
    budget_s: float | None = None

    def model_config(self) -> dict:
        """Keyword arguments of :class:`CordonnierViT`."""
        return {"dim": self.dim, "depth": self.depth, "num_heads": self.num_heads,
                "mlp_dim": self.mlp_dim, "attention": self.attention, "values": self.values,
                "dropout": self.dropout}


def decode_packed(path: str | Path) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Decode a packed image set: an ``.npz`` with ``data`` (concatenated encoded files, uint8),
    ``offsets`` ``(N + 1,)``, ``labels`` ``(N,)`` and ``classes``.

    Returns:
        ``(images uint8 (N, 32, 32, 3), labels int64 (N,), class names)``.

    Raises:
        ProbeError: if the file is missing or not such an archive.
    """
    from PIL import Image

    p = Path(path)
    if not p.is_file():
        raise ProbeError(f"packed image set {str(p)!r} does not exist")
    z = np.load(p, allow_pickle=False)
    try:
        data, offs, labels, classes = z["data"], z["offsets"], z["labels"], [str(c) for c in z["classes"]]
    except KeyError as e:
        raise ProbeError(f"{str(p)!r} is not a packed image set (missing {e})") from None
    x = np.empty((len(labels), 32, 32, 3), np.uint8)
    for i in range(len(labels)):
        with Image.open(io.BytesIO(data[offs[i]:offs[i + 1]].tobytes())) as im:
            x[i] = np.asarray(im.convert("RGB").resize((32, 32)) if im.size != (32, 32) else im.convert("RGB"))
    return torch.from_numpy(x), torch.from_numpy(labels.astype(np.int64)), classes


def epoch_batches(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """One epoch of augmented images in shuffled order.

    Returns ``(images (N, 3, H, W), perm (N,))``: image ``i`` is training image ``perm[i]``. Random crop of the zero-padded image (offsets uniform in ``0..2·pad``) and a horizontal flip
    with probability 1/2, gathered in one indexing operation on ``x``'s device.
    """
    n, c, h, w = x.shape
    dev = x.device
    perm = torch.randperm(n, generator=gen, device=dev)
    off = torch.randint(0, 2 * pad + 1, (n, 2), generator=gen, device=dev)
    flip = torch.rand(n, generator=gen, device=dev) < 0.5
    xp = F.pad(x[perm], (pad, pad, pad, pad))
    rows = off[:, 0, None] + torch.arange(h, device=dev)  # (N, H)
    cols = torch.arange(w, device=dev).expand(n, w)
    cols = torch.where(flip[:, None], cols.flip(-1), cols) + off[:, 1, None]  # (N, W)
    ni = torch.arange(n, device=dev)[:, None, None, None]
    ci = torch.arange(c, device=dev)[None, :, None, None]
    return xp[ni, ci, rows[:, None, :, None], cols[:, None, None, :]], perm


def lr_factors(step: int, total: int, warmup: float, mult: float, schedule: str) -> tuple[float, float]:
    """``(weights factor, position factor)`` of the base learning rate at ``step`` (0-based):
    :func:`probe.cordonnier.train.lr_factors` (linear warm-up over ``warmup · total`` steps, then
    cosine decay; the positional parameters at ``mult`` times, decaying with the weights when
    ``schedule == "cosine"``)."""
    from types import SimpleNamespace

    return cpu_lr_factors(step, total, SimpleNamespace(warmup=warmup, position_lr_mult=mult,
                                                       position_schedule=schedule))


class _Step:
    """One SGD step on static input buffers, eager or captured as a CUDA graph."""

    def __init__(self, model: torch.nn.Module, cfg: CudaTrainConfig, device: torch.device):
        self.model, self.cfg, self.device = model, cfg, device
        pos = position_parameter_names(model)
        named = dict(model.named_parameters())
        self.weights = [p for n, p in named.items() if n not in pos]
        self.position = [p for n, p in named.items() if n in pos]
        self.params = self.weights + self.position
        for p in self.params:
            p.grad = torch.zeros_like(p)
        self.bufs = [torch.zeros_like(p) for p in self.params]
        self.x = torch.zeros(cfg.batch_size, 3, 32, 32, device=device)
        self.y = torch.zeros(cfg.batch_size, dtype=torch.long, device=device)
        self.lr_w = torch.zeros((), device=device)
        self.lr_p = torch.zeros((), device=device)
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device, dtype=torch.long)
        self.graph = None

    def _body(self) -> None:
        cfg = self.cfg
        torch._foreach_zero_([p.grad for p in self.params])
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.amp, cache_enabled=False):
            logits = self.model(self.x)
            loss = F.cross_entropy(logits.float(), self.y)
        loss.backward()
        with torch.no_grad():
            self.loss_sum.add_(loss.detach())
            self.correct.add_((logits.argmax(1) == self.y).sum())
            gw = [p.grad for p in self.weights]
            torch._foreach_add_(gw, self.weights, alpha=cfg.weight_decay)
            torch._foreach_mul_(self.bufs, cfg.momentum)
            torch._foreach_add_(self.bufs, [p.grad for p in self.params])
            nw = len(self.weights)
            torch._foreach_sub_(self.weights, torch._foreach_mul(self.bufs[:nw], self.lr_w))
            if self.position:
                torch._foreach_sub_(self.position, torch._foreach_mul(self.bufs[nw:], self.lr_p))

    def capture(self) -> None:
        """Capture :meth:`_body` as a CUDA graph (after warm-up steps on a side stream that
        leave the parameters and momentum unchanged: they are restored)."""
        saved = [t.detach().clone() for t in self.params + self.bufs]
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                self._body()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            self._body()
        with torch.no_grad():
            for t, v in zip(self.params + self.bufs, saved):
                t.copy_(v)
            self.loss_sum.zero_()
            self.correct.zero_()
        self.graph = g

    def __call__(self, x: torch.Tensor, y: torch.Tensor, lr_w: float, lr_p: float) -> None:
        self.x.copy_(x, non_blocking=True)
        self.y.copy_(y, non_blocking=True)
        self.lr_w.fill_(lr_w)
        self.lr_p.fill_(lr_p)
        if self.graph is not None:
            self.graph.replay()
        else:
            self._body()


def _evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, amp: bool) -> float:
    """:func:`probe.cordonnier.train.evaluate`, under bf16 autocast when ``amp``."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        return evaluate(model, x, y, batch=1000)


def positions(model: CordonnierViT, step: int) -> list[dict]:
    """Rows ``step, layer, head, delta_row, delta_col, alpha`` of every head (patches, 1/patch²)."""
    rows = []
    for layer, blk in enumerate(model.blocks):
        attn = blk.attn
        if not hasattr(attn, "delta"):
            continue
        d = attn.delta.float().cpu().numpy()
        a = attn.alpha.float().cpu().numpy() if hasattr(attn, "alpha") else np.full(len(d), np.nan)
        for h in range(len(d)):
            rows.append({"step": step, "layer": layer, "head": h, "delta_row": float(d[h, 0]),
                         "delta_col": float(d[h, 1]), "alpha": float(a[h])})
    return rows


def train_cuda(cfg: CudaTrainConfig, train: tuple[torch.Tensor, torch.Tensor],
               test: tuple[torch.Tensor, torch.Tensor] | None, device: str = "cuda",
               log=print) -> tuple[CordonnierViT, dict, list[dict], list[dict]]:
    """Train one model; returns ``(model, summary, log rows, Δ/α track rows)``.

    Args:
        cfg: the settings. train, test: ``(uint8 images (N, 32, 32, 3), labels (N,))``.
        device: ``"cuda"`` (graphs when ``cfg.graphs``) or ``"cpu"`` (eager; for tests).
        log: called with one line of text per logged interval.

    Raises:
        ProbeError: on an unknown position schedule, a training set smaller than one batch, or a
            non-finite loss.
    """
    if cfg.position_schedule not in ("cosine", "constant"):
        raise ProbeError(f"position_schedule must be 'cosine' or 'constant', got {cfg.position_schedule!r}")
    dev = torch.device(device)
    xtr, ytr = normalize(train[0].to(dev)), train[1].to(dev)
    xte, yte = (normalize(test[0].to(dev)), test[1].to(dev)) if test is not None else (None, None)
    n = len(xtr)
    spe = n // cfg.batch_size
    if spe < 1:
        raise ProbeError(f"{n} training images are fewer than one batch of {cfg.batch_size}")
    torch.manual_seed(cfg.seed)
    model = CordonnierViT(**cfg.model_config()).to(dev).train()
    step_fn = _Step(model, cfg, dev)
    if dev.type == "cuda" and cfg.graphs:
        try:
            step_fn.capture()
        except RuntimeError as e:  # a capture failure leaves the eager step, which is the same step
            log(f"CUDA graph capture failed ({e}); training eagerly")
            step_fn.graph = None
    t0 = time.perf_counter()
    epochs = int(cfg.epochs)
    if cfg.budget_s is not None:  # time a few steps at a small lr, then restore the initial state
        saved = [t.detach().clone() for t in step_fn.params + step_fn.bufs]
        k = 50
        if dev.type == "cuda":
            torch.cuda.synchronize()
        ts = time.perf_counter()
        for i in range(k):
            step_fn(xtr[:cfg.batch_size], ytr[:cfg.batch_size], 0.0, 0.0)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        per_step = (time.perf_counter() - ts) / k
        with torch.no_grad():
            for t, v in zip(step_fn.params + step_fn.bufs, saved):
                t.copy_(v)
            step_fn.loss_sum.zero_()
            step_fn.correct.zero_()
        fit = int(cfg.budget_s / (per_step * spe * 1.08))  # 8 % for augmentation, records, eval
        epochs = max(1, min(epochs, fit))
        log(f"measured {per_step * 1e3:.3f} ms/step; running {epochs} of {cfg.epochs} epochs")
    total = epochs * spe
    gen = torch.Generator(device=dev)
    rows, track = [], positions(model, 0)
    seen = 0
    for epoch in range(epochs):
        gen.manual_seed(cfg.seed * 100003 + epoch)
        xe, perm = epoch_batches(xtr, gen)
        ye = ytr[perm]
        for i in range(spe):
            step = epoch * spe + i
            fw, fp = lr_factors(step, total, cfg.warmup, cfg.position_lr_mult, cfg.position_schedule)
            sl = slice(i * cfg.batch_size, (i + 1) * cfg.batch_size)
            step_fn(xe[sl], ye[sl], cfg.lr * fw, cfg.lr * fp)
            seen += cfg.batch_size
            if (step + 1) % cfg.track_every == 0:
                track += positions(model, step + 1)
        loss = float(step_fn.loss_sum) / spe
        acc = int(step_fn.correct) / (spe * cfg.batch_size)
        step_fn.loss_sum.zero_()
        step_fn.correct.zero_()
        if not math.isfinite(loss):
            raise ProbeError(f"training diverged in epoch {epoch} (loss {loss}); lower the learning rate")
        row = {"epoch": epoch + 1, "step": (epoch + 1) * spe, "lr": cfg.lr * fw, "position_lr": cfg.lr * fp,
               "train_loss": loss, "train_acc": acc, "wall_s": round(time.perf_counter() - t0, 2)}
        if test is not None and ((epoch + 1) % max(1, epochs // 10) == 0 or epoch + 1 == epochs):
            row["test_acc"] = _evaluate(model, xte, yte, cfg.amp)
        rows.append(row)
        log(json.dumps(row))
    if total % cfg.track_every:
        track += positions(model, total)
    summary = {"config": asdict(cfg), "epochs_run": epochs, "steps": total, "wall_s": round(time.perf_counter() - t0, 1),
               "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
               "torch": torch.__version__, "train_images": n}
    if test is not None:
        summary["test_accuracy"] = _evaluate(model, xte, yte, cfg.amp)
        summary["test_accuracy_fp32"] = _evaluate(model, xte, yte, False)
        summary["test_images"] = len(test[0])
    return model, summary, rows, track
