"""The training recipe of probe's attention-only CIFAR-10 model (Cordonnier et al. 2020 setting).

Run (CLI ``probe train`` or ``python -m probe.cordonnier.train``)::

    probe train --train ../shared/data/cifar10-train --test ../shared/data/cifar10-test \\
                --out runs/quadratic --epochs 20

What it does, following the paper's ``runs/quadratic`` configuration except where noted:

* model :class:`~probe.cordonnier.model.CordonnierViT` (6 layers, 9 heads, quadratic attention;
  width 72, MLP 144 here — the paper used width 400, MLP 512 — chosen from measured CPU throughput);
* SGD, lr 0.1, momentum 0.9, weight decay 1e-4 (none on Δ, α), batch 100, linear warm-up over 5 %
  of the steps then cosine decay, 100 epochs; the positional parameters (Δ, α) get ``position_lr_mult``
  (20) times the learning rate and decay with the rest (``position_schedule="cosine"``, the shipped
  model's recipe; ``"constant"`` holds them at 2.0 after warm-up, the previous recipe, whose centres
  wandered by up to a patch to the end) — centres barely move at 1x in a short budget. The same
  recipe on a GPU: :mod:`probe.cordonnier.train_cuda` (not bit-identical to this one);
* augmentation: random crop with 4-pixel zero padding, horizontal flip;
* data: an image folder with one sub-folder per class (sorted names = labels), decoded once into a
  uint8 array cached under ``~/.cache/probe``;
* determinism: the model is initialised from ``seed``; the shuffle of epoch ``e`` and the
  augmentation of step ``s`` come from generators seeded by ``(seed, e)`` and ``(seed, s)``, so a
  run resumed from a checkpoint yields the same weights as an uninterrupted one (tested);
* checkpoints (``checkpoint.pt``: tensors and numbers only, read with ``weights_only=True``)
  every ``checkpoint_every`` steps and at a ``max_minutes`` stop, written atomically; weight
  snapshots ``snapshots/step-NNNNNN.safetensors`` every ``snapshot_every`` steps;
* :class:`probe.track.Tracker` on 16 fixed test images every ``track_every`` steps;
* at the end: ``model.safetensors`` (architecture and test accuracy in its metadata), ``summary.json``,
  ``train_log.csv`` and ``training_report.html`` (:func:`write_training_report`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ProbeError
from ..preflight import check_class_folder
from .model import CIFAR_CFG, CordonnierViT

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


@dataclass
class TrainConfig:
    """Settings of one training run (defaults: the shipped model's recipe)."""

    train: str = "../shared/data/cifar10-train"
    test: str | None = "../shared/data/cifar10-test"
    out: str = "runs/quadratic"
    attention: str = "quadratic"
    dim: int = 72
    depth: int = 6
    num_heads: int = 9
    mlp_dim: int = 144
    epochs: float = 100.0
    batch_size: int = 100
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup: float = 0.05
    position_lr_mult: float = 20.0
    position_schedule: str = "cosine"
    seed: int = 0
    threads: int | None = None
    checkpoint_every: int = 250
    snapshot_every: int = 500
    track_every: int = 250
    track_images: int = 16
    max_minutes: float | None = None
    max_steps: int | None = None
    limit_train: int | None = None
    log_every: int = 50

    def model_config(self) -> dict:
        return {"dim": self.dim, "depth": self.depth, "num_heads": self.num_heads,
                "mlp_dim": self.mlp_dim, "attention": self.attention}


# -- data ---------------------------------------------------------------------------------
def _folder_files(root: Path) -> tuple[list[Path], list[int], list[str]]:
    check_class_folder(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ProbeError(f"{str(root)!r} has no class sub-folders; expected ROOT/<class>/<image>")
    files, labels = [], []
    for i, c in enumerate(classes):
        fs = sorted(p for p in (root / c).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        files += fs
        labels += [i] * len(fs)
    if not files:
        raise ProbeError(f"{str(root)!r} holds no images in its class folders")
    return files, labels, classes


def load_folder(root: str | Path, size: int = 32, cache: bool = True, limit: int | None = None,
                progress: Callable[[int, int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Decode a class-folder image dataset once.

    Args:
        root: ``ROOT/<class>/<image>``.
        size: side of the decoded images, pixels.
        cache: read / write the decoded arrays in the cache (below).
        limit: decode only the first ``limit`` files (in class, then file-name order).
        progress: ``progress(done, total)`` while decoding (not called for a cache hit).

    Returns:
        ``(images uint8 (N, size, size, 3), labels int64 (N,), class names)``; images not of
        ``size`` x ``size`` are resized (bilinear). Cached as ``.npz`` under ``~/.cache/probe``
        (``$XDG_CACHE_HOME/probe``) keyed by the folder's path and the names and sizes of the
        files decoded, so a later run of the same data starts without decoding (150 MB for
        CIFAR-10's 50,000 training images).

    Raises:
        ProbeError: missing folder, no class folders, no images.
    """
    from PIL import Image

    root = Path(root).resolve()
    files, labels, classes = _folder_files(root)
    if limit is not None:
        files, labels = files[:limit], labels[:limit]
    h = hashlib.sha256(str(root).encode())
    for f in files:
        h.update(f"{f.relative_to(root)}:{f.stat().st_size}".encode())
    cache_dir = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "probe"
    path = cache_dir / f"folder-{h.hexdigest()[:20]}-{size}.npz"
    if cache and path.is_file():
        z = np.load(path)
        return torch.from_numpy(z["x"]), torch.from_numpy(z["y"]), classes
    x = np.empty((len(files), size, size, 3), np.uint8)
    for i, f in enumerate(files):
        with Image.open(f) as im:
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            x[i] = np.asarray(im)
        if progress is not None and ((i + 1) % 500 == 0 or i + 1 == len(files)):
            progress(i + 1, len(files))
    y = np.asarray(labels, np.int64)
    if cache:
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.npz")
            np.savez(tmp, x=x, y=y)
            os.replace(tmp, path)
        except OSError:  # a read-only home: decode again next time
            pass
    return torch.from_numpy(x), torch.from_numpy(y), classes


def normalize(x_uint8: torch.Tensor) -> torch.Tensor:
    """``(N, H, W, 3)`` uint8 -> ``(N, 3, H, W)`` float32 with CIFAR-10 mean/std, on ``x_uint8``'s device."""
    x = x_uint8.permute(0, 3, 1, 2).float().div_(255)
    mean = torch.tensor(CIFAR_CFG["mean"], device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_CFG["std"], device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def augment(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop (zero padding ``pad``) and horizontal flip of a normalised batch ``(B, 3, H, W)``."""
    b, _, hgt, wid = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    offs = torch.randint(0, 2 * pad + 1, (b, 2), generator=gen)
    flip = torch.rand(b, generator=gen) < 0.5
    out = torch.empty_like(x)
    for i in range(b):
        r, c = int(offs[i, 0]), int(offs[i, 1])
        crop = xp[i, :, r:r + hgt, c:c + wid]
        out[i] = crop.flip(-1) if flip[i] else crop
    return out


def _gen(*keys: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int(hashlib.sha256(":".join(map(str, keys)).encode()).hexdigest()[:15], 16))
    return g


# -- optimisation --------------------------------------------------------------------------
def position_parameter_names(model: torch.nn.Module) -> set[str]:
    """Names of the positional-encoding parameters (Δ, α / the precision factors)."""
    keys = ("centers", "alpha_raw", "diag_raw", "lower", ".rel")
    return {n for n, _ in model.named_parameters() if any(k in n for k in keys)}


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.SGD:
    """SGD with two groups: weights (weight decay) and positional parameters (no decay, lr x mult)."""
    pos = position_parameter_names(model)
    params = dict(model.named_parameters())
    groups = [
        {"params": [p for n, p in params.items() if n not in pos], "weight_decay": cfg.weight_decay, "name": "weights"},
        {"params": [p for n, p in params.items() if n in pos], "weight_decay": 0.0, "name": "position"},
    ]
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)


def lr_factors(step: int, total: int, cfg: TrainConfig) -> tuple[float, float]:
    """``(weights factor, position factor)`` of the base lr at ``step`` (0-based)."""
    warm = max(1, int(round(cfg.warmup * total)))
    if step < warm:
        f = (step + 1) / warm
        return f, f * cfg.position_lr_mult
    t = (step - warm) / max(1, total - warm)
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    pos = cos if cfg.position_schedule == "cosine" else 1.0
    return cos, pos * cfg.position_lr_mult


def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    """Top-1 accuracy of ``model`` on normalised images ``x`` ``(N, 3, H, W)`` and labels ``y``."""
    was = model.training
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            correct += int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
    model.train(was)
    return correct / max(1, len(x))


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_safetensors(sd: dict, path: Path, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


# -- the run -------------------------------------------------------------------------------
def check_config(cfg: TrainConfig) -> None:
    """Every setting of a run checked before any work (the CLI's ``probe train`` options).

    Raises:
        ProbeError: naming the option (as ``--option``), the value and the fix.
    """
    from .model import ATTENTIONS

    def whole(name: str, v, lo: int, optional: bool = False, hi: int = 2**31 - 1) -> None:
        if v is None and optional:
            return
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise ProbeError(f"--{name} must be a whole number from {lo} to {hi}, got {v!r}")

    def real(name: str, v, lo: float, optional: bool = False, strict: bool = True) -> None:
        if v is None and optional:
            return
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                or not (v > lo if strict else v >= lo):
            raise ProbeError(f"--{name} must be a finite number {'above' if strict else 'of at least'} {lo:g}, "
                             f"got {v!r}")

    if cfg.attention not in ATTENTIONS:
        raise ProbeError(f"unknown --attention {cfg.attention!r}; use one of {', '.join(ATTENTIONS)}")
    if cfg.position_schedule not in ("constant", "cosine"):
        raise ProbeError(f"unknown --position-schedule {cfg.position_schedule!r}; use constant or cosine")
    for name, v in (("dim", cfg.dim), ("depth", cfg.depth), ("heads", cfg.num_heads), ("mlp-dim", cfg.mlp_dim),
                    ("batch-size", cfg.batch_size)):
        whole(name, v, 1, hi=1 << 20)
    if cfg.dim % cfg.num_heads:
        raise ProbeError(f"--dim {cfg.dim} is not a multiple of --heads {cfg.num_heads} (each head takes dim/heads "
                         f"channels); use e.g. --dim {cfg.num_heads * max(1, round(cfg.dim / cfg.num_heads))}")
    real("epochs", cfg.epochs, 0)
    real("lr", cfg.lr, 0)
    real("position-lr-mult", cfg.position_lr_mult, 0, strict=False)
    real("max-minutes", cfg.max_minutes, 0, optional=True, strict=False)  # 0: stop after the first step
    whole("seed", cfg.seed, 0, hi=2**32 - 1)
    whole("threads", cfg.threads, 1, optional=True, hi=4096)
    whole("max-steps", cfg.max_steps, 1, optional=True)
    whole("track-every", cfg.track_every, 0)
    whole("limit-train", cfg.limit_train, 1, optional=True)
    whole("checkpoint-every", cfg.checkpoint_every, 1)
    whole("snapshot-every", cfg.snapshot_every, 1)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ProbeError(f"--out {str(out)!r} is an existing file, not a run folder; pass a folder path")
    anc = out
    while not anc.exists() and anc.parent != anc:
        anc = anc.parent
    if not anc.is_dir():
        raise ProbeError(f"--out {str(out)!r} lies under {str(anc)!r}, which is a file; pass a folder path")


#: What a ``checkpoint.pt`` of :func:`train` holds.
CHECKPOINT_KEYS = ("model", "optimizer", "step", "wall_s", "config", "log")


def _read_checkpoint(ck: Path, resume_keys: dict, model: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple:
    """Resume state ``(step, wall_s, log)`` from ``ck`` into ``model`` and ``opt`` (weights only:
    no pickled code runs).

    Raises:
        ProbeError: a damaged or truncated file, one lacking a part (e.g. the optimizer state), or
            one of a run with other settings.
    """
    fix = f"delete {str(ck)!r} to start the run again, or pass another --out"
    try:
        state = torch.load(ck, weights_only=True, map_location="cpu")
    except Exception as e:  # truncated zip, not a checkpoint, a pickle with code (refused)
        raise ProbeError(f"{str(ck)!r} cannot be read as a checkpoint ({' '.join(str(e).split())[:100]}); "
                         f"{fix}") from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise ProbeError(f"{str(ck)!r} lacks {', '.join(missing)} (not a complete checkpoint of probe train); {fix}")
    try:
        same = json.loads(state["config"]) == json.loads(json.dumps(resume_keys))
    except (TypeError, ValueError):
        same = False
    if not same:
        raise ProbeError(f"{str(ck)!r} belongs to a run with other settings; pass another --out "
                         "or the same settings to resume it")
    try:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        return int(state["step"]), float(state["wall_s"]), json.loads(state["log"])
    except Exception as e:
        raise ProbeError(f"{str(ck)!r} does not fit this run ({' '.join(str(e).split())[:100]}); {fix}") from None


def check_run(cfg: TrainConfig) -> None:
    """:func:`check_config`, and the checkpoint a run would resume from (``probe train`` calls this
    before it shows any progress).

    Raises:
        ProbeError: as :func:`check_config` and :func:`_read_checkpoint`.
    """
    check_config(cfg)
    ck = Path(cfg.out) / "checkpoint.pt"
    if ck.is_file():
        model = CordonnierViT(**cfg.model_config())
        resume_keys = {k: v for k, v in asdict(cfg).items() if k not in ("max_minutes", "max_steps", "threads")}
        _read_checkpoint(ck, resume_keys, model, make_optimizer(model, cfg))


#: Columns of ``train_log.csv`` (written with its header even before the first logged step).
LOG_COLUMNS = ("step", "epoch", "lr", "position_lr", "train_loss", "train_acc", "wall_s")


def train(cfg: TrainConfig, progress: Callable[[int, int, dict | None], None] | None = None,
          decoding: Callable[[str, int, int], None] | None = None) -> dict:
    """Train (or resume) a run; returns a summary dict (steps, wall time, accuracies, paths).

    ``progress(step, total_steps, row)`` is called once before the first step (``row`` None:
    the total is known from the start), after every step (``row`` None) and at every logged step
    (``row``: the ``train_log.csv`` row). ``decoding(folder_role, done, total)`` reports the
    decoding of the image folders (``"train"``, ``"test"``; not called when they are cached).

    A ``checkpoint.pt`` in ``cfg.out`` is resumed from when its config matches ``cfg`` (except
    the stopping options ``max_minutes``/``max_steps``/``threads``); a different config there is
    refused.

    Raises:
        ProbeError: a bad setting (:func:`check_config`), bad data folders, an output folder
            holding another run's checkpoint or a damaged one (:func:`_read_checkpoint`).
    """
    from ..track import Tracker

    check_config(cfg)
    resume_keys = {k: v for k, v in asdict(cfg).items() if k not in ("max_minutes", "max_steps", "threads")}
    torch.manual_seed(cfg.seed)
    model = CordonnierViT(**cfg.model_config())
    opt = make_optimizer(model, cfg)
    step, wall, log = 0, 0.0, []
    out = Path(cfg.out)
    ck = out / "checkpoint.pt"
    if ck.is_file():
        step, wall, log = _read_checkpoint(ck, resume_keys, model, opt)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out.mkdir(parents=True, exist_ok=True)

    def reporter(role: str):
        return None if decoding is None else (lambda done, total: decoding(role, done, total))

    xtr_u8, ytr, classes = load_folder(cfg.train, limit=cfg.limit_train or None, progress=reporter("train"))
    test = None
    if cfg.test:
        xte_u8, yte, test_classes = load_folder(cfg.test, progress=reporter("test"))
        if test_classes != classes:
            raise ProbeError(f"the test folder's classes {test_classes} differ from the training folder's {classes}")
        test = (normalize(xte_u8), yte)

    n = len(xtr_u8)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = int(round(cfg.epochs * steps_per_epoch))
    tracker = None
    if cfg.track_every and test is not None:
        tracker = Tracker(test[0][torch.linspace(0, len(test[0]) - 1, cfg.track_images).long()],
                          every=cfg.track_every, out_dir=out)
        tracker.load(out, until_step=step - 1 if step else -1)
    (out / "snapshots").mkdir(exist_ok=True)

    def save_checkpoint() -> None:
        _atomic_torch_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                            "wall_s": wall, "config": json.dumps(resume_keys), "log": json.dumps(log)}, ck)

    model.train()
    t_start = time.perf_counter()
    wall0 = wall
    running = {"loss": 0.0, "correct": 0, "seen": 0}
    stop_at = total if cfg.max_steps is None else min(total, cfg.max_steps)
    perm_epoch, perm = -1, None
    if progress is not None:
        progress(step, total, None)
    while step < stop_at:
        if tracker is not None and step % cfg.track_every == 0:
            tracker.record(model, step)
        if step % cfg.snapshot_every == 0:
            _atomic_safetensors(model.state_dict(), out / "snapshots" / f"step-{step:06d}.safetensors")
        epoch, i = divmod(step, steps_per_epoch)
        if epoch != perm_epoch:  # the shuffle of an epoch depends on (seed, epoch) only
            perm_epoch, perm = epoch, torch.randperm(n, generator=_gen(cfg.seed, epoch))
        idx = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]
        xb = augment(normalize(xtr_u8[idx]), _gen(cfg.seed, epoch, i, 1))  # per batch: no float copy of the set
        yb = ytr[idx]
        fw, fp = lr_factors(step, total, cfg)
        opt.param_groups[0]["lr"] = cfg.lr * fw
        opt.param_groups[1]["lr"] = cfg.lr * fp
        logits = model(xb)
        loss = F.cross_entropy(logits, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if not math.isfinite(float(loss.detach())):
            raise ProbeError(f"training diverged at step {step} (loss {float(loss)}); lower --lr")
        running["loss"] += float(loss.detach()) * len(yb)
        running["correct"] += int((logits.argmax(1) == yb).sum())
        running["seen"] += len(yb)
        step += 1
        wall = wall0 + time.perf_counter() - t_start
        stopping = cfg.max_minutes is not None and (time.perf_counter() - t_start) > 60 * cfg.max_minutes
        if step % cfg.log_every == 0 or step == stop_at or stopping:  # a stopped run logs its last steps too
            row = {"step": step, "epoch": step / steps_per_epoch, "lr": cfg.lr * fw,
                   "position_lr": cfg.lr * fp, "train_loss": running["loss"] / running["seen"],
                   "train_acc": running["correct"] / running["seen"], "wall_s": round(wall, 1)}
            log.append(row)
            running = {"loss": 0.0, "correct": 0, "seen": 0}
            if progress is not None:
                progress(step, total, row)
        elif progress is not None:
            progress(step, total, None)
        if step % cfg.checkpoint_every == 0:
            save_checkpoint()
        if stopping:
            break
    save_checkpoint()
    import pandas as pd
    from ..result import atomic_write_text

    atomic_write_text(out / "train_log.csv", pd.DataFrame(log, columns=LOG_COLUMNS).to_csv(index=False))
    summary = {"steps": step, "total_steps": total, "finished": step >= total, "wall_s": round(wall, 1),
               "config": asdict(cfg), "model_config": cfg.model_config(), "classes": classes,
               "torch": torch.__version__, "threads": torch.get_num_threads()}
    if step >= total:
        if tracker is not None:
            tracker.record(model, step)
        _atomic_safetensors(model.state_dict(), out / "snapshots" / f"step-{step:06d}.safetensors")
        model.eval()
        if test is not None:
            summary["test_accuracy"] = evaluate(model, *test)
            summary["test_images"] = len(test[0])
        meta = {"probe_model": "cordonnier", "config": json.dumps(cfg.model_config()),
                "test_accuracy": str(summary.get("test_accuracy"))}
        _atomic_safetensors(model.state_dict(), out / "model.safetensors", meta)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    if tracker is not None and summary["finished"]:
        write_training_report(out)
    return summary


def write_training_report(run_dir: str | Path) -> Path:
    """Write ``training_report.html`` of a run folder from its tracker records, training log and
    summary (:meth:`probe.track.Tracker.write_report`).

    Raises:
        ProbeError: if the folder has no tracker records.
    """
    import pandas as pd

    from ..track import Tracker

    run = Path(run_dir)
    tracker = Tracker(torch.zeros(1, 3, 32, 32))
    tracker.load(run)
    log = pd.read_csv(run / "train_log.csv") if (run / "train_log.csv").is_file() else None
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
    cfg = summary.get("config", {})
    meta = {"model": json.dumps(summary.get("model_config", {})), "steps": summary.get("steps"),
            "epochs": cfg.get("epochs"), "seed": cfg.get("seed"), "wall time (s)": summary.get("wall_s"),
            "test accuracy": summary.get("test_accuracy"), "torch": summary.get("torch")}
    return tracker.write_report(run, log=log, meta={k: v for k, v in meta.items() if v is not None},
                                title="probe's attention-only CIFAR-10 model",
                                summary="Quadratic positional attention (Cordonnier et al. 2020, Eq. 9), "
                                        "recorded by probe.track on 16 fixed test images.")


def main(argv: list[str] | None = None) -> None:
    """``python -m probe.cordonnier.train``: the same options as ``probe train``."""
    from ..cli import app

    app(["train", *(argv if argv is not None else __import__("sys").argv[1:])])


if __name__ == "__main__":
    main()
