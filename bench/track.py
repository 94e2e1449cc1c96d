"""Overhead of ``probe.track``: one record against one training step of the shipped recipe.

    python bench/track.py [--steps 40] [--out bench/results-track.json --md bench/RESULTS-track.md]

Times, on the machine it runs on, (1) training steps of the shipped architecture (width 72, 6
layers, 9 heads, batch 100, SGD with the recipe's two parameter groups) on random CIFAR-sized
batches, (2) :meth:`probe.track.Tracker.record` on 16 probe images, and reports the overhead of
recording every ``k`` steps: ``record / (k · step)``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from probe.cordonnier.model import CordonnierViT
from probe.cordonnier.train import TrainConfig, make_optimizer
from probe.track import Tracker

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--records", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results-track.json"))
    ap.add_argument("--md", default=str(ROOT / "bench" / "RESULTS-track.md"))
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = TrainConfig()
    model = CordonnierViT(**cfg.model_config())
    opt = make_optimizer(model, cfg)
    x, y = torch.randn(cfg.batch_size, 3, 32, 32), torch.randint(0, 10, (cfg.batch_size,))
    step_t = []
    model.train()
    for i in range(args.steps + 3):
        t = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= 3:
            step_t.append(time.perf_counter() - t)
    tracker = Tracker(torch.randn(cfg.track_images, 3, 32, 32), every=cfg.track_every)
    tracker.record(model, 0)  # warm-up (feature tables, imports)
    rec_t = []
    for i in range(args.records):
        t = time.perf_counter()
        tracker.record(model, i + 1)
        rec_t.append(time.perf_counter() - t)
    step, rec = statistics.median(step_t), statistics.median(rec_t)
    variants = {}
    for attention in ("quadratic", "generalized", "relative"):
        torch.manual_seed(0)
        m = CordonnierViT(**{**cfg.model_config(), "attention": attention})
        o = make_optimizer(m, cfg)
        ts = []
        for i in range(8):
            t = time.perf_counter()
            loss = F.cross_entropy(m(x), y)
            o.zero_grad()
            loss.backward()
            o.step()
            if i >= 2:
                ts.append(time.perf_counter() - t)
        variants[attention] = cfg.batch_size / statistics.median(ts)
    res = {"step_s": step, "record_s": rec, "steps": args.steps, "records": args.records,
           "overhead": {k: rec / (k * step) for k in (50, 100, 250, 500)},
           "train_images_per_s": variants,
           "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
           "cores": os.cpu_count(), "torch": torch.__version__}
    Path(args.out).write_text(json.dumps(res, indent=1))
    lines = ["# probe.track overhead", "", f"Written by `python bench/track.py` ({args.steps} training steps, "
             f"{args.records} records, medians; {res['cores']} cores, {res['threads']} torch threads, torch {res['torch']}).", "",
             f"- one training step (batch {cfg.batch_size}, width {cfg.dim}): {step * 1000:.0f} ms",
             f"- one record (16 probe images, all 6 layers: capture, reducers, Δ/α fits, conv statistics): {rec * 1000:.0f} ms", "",
             "| record every k steps | overhead |", "| ---: | ---: |"]
    lines += [f"| {k} | {v:.1%} |" for k, v in res["overhead"].items()]
    lines += ["", "Training throughput of the attention variants (width 72, 6 layers, 9 heads, batch 100):", "",
              "| attention | images/s |", "| --- | ---: |"]
    lines += [f"| {k} | {v:.0f} |" for k, v in variants.items()]
    Path(args.md).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
