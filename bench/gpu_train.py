"""Train the embedded model's architecture on a lent GPU (probe.cordonnier.train_cuda) and write
everything a reproduction table needs to one folder.

Usage on the device machine (data packed here by bench/pack_cifar.py into .devdata/)::

    python bench/gpu_train.py --data .devdata --out $OUT --paper-budget 380 --small-epochs 100

Runs, in order: (1) the shipped width (72 / MLP 144) with Δ and α on the cosine schedule
(``position_lr_mult`` 20, decayed with the weights), ``--small-epochs`` epochs; (2) the paper's
setting (width 400, MLP 512, 300 epochs, batch 100, positional parameters at the weights'
learning rate, cosine), with the epochs lowered to what fits in ``--paper-budget`` seconds if
needed (stated in the summary). Writes ``summary.json``, ``log.csv``, ``track.csv`` (every head's
Δ, α every 250 steps), ``small.safetensors`` and the paper model in two shards
(``paper-0.safetensors``, ``paper-1.safetensors``: the device tool returns files of at most 16 MiB).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from probe.cordonnier.train_cuda import CudaTrainConfig, decode_packed, train_cuda  # noqa: E402


def save_shards(sd: dict, out: Path, stem: str, meta: dict, max_bytes: int = 15 * 2**20) -> list[str]:
    """Save a state dict as safetensors shards of at most ``max_bytes`` each."""
    shards, cur, size = [], {}, 0
    for k, v in sd.items():
        nb = v.numel() * v.element_size()
        if cur and size + nb > max_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = v.detach().float().contiguous().cpu()
        size += nb
    shards.append(cur)
    names = []
    for i, s in enumerate(shards):
        name = f"{stem}.safetensors" if len(shards) == 1 else f"{stem}-{i}.safetensors"
        save_file(s, str(out / name), metadata=meta)
        names.append(name)
    return names


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=ROOT / ".devdata")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small-epochs", type=int, default=100)
    ap.add_argument("--paper-epochs", type=int, default=300)
    ap.add_argument("--paper-budget", type=float, default=380.0)
    ap.add_argument("--limit", type=int, default=None, help="use the first N training images (tests)")
    ap.add_argument("--skip-paper", action="store_true")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    xtr, ytr, classes = decode_packed(args.data / "cifar10-train.npz")
    xte, yte, _ = decode_packed(args.data / "cifar10-test.npz")
    if args.limit:
        g = torch.Generator().manual_seed(0)
        idx = torch.randperm(len(xtr), generator=g)[: args.limit]
        xtr, ytr = xtr[idx], ytr[idx]
    print(f"decoded {len(xtr)} + {len(xte)} images in {time.perf_counter() - t0:.1f} s", flush=True)
    summary, logs, tracks = {"classes": classes}, [], []

    def run(name: str, cfg: CudaTrainConfig) -> None:
        model, s, rows, track = train_cuda(cfg, (xtr, ytr), (xte, yte), device=args.device,
                                           log=lambda line: print(name, line, flush=True))
        meta = {"probe_model": "cordonnier", "config": json.dumps(cfg.model_config()),
                "test_accuracy": str(s.get("test_accuracy")), "recipe": "probe.cordonnier.train_cuda",
                "epochs": str(s["epochs_run"])}
        s["files"] = save_shards(model.state_dict(), args.out, name, meta)
        summary[name] = s
        logs.extend(dict(r, run=name) for r in rows)
        tracks.extend(dict(r, run=name) for r in track)
        (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
        pd.DataFrame(logs).to_csv(args.out / "log.csv", index=False)
        pd.DataFrame(tracks).to_csv(args.out / "track.csv", index=False)

    run("small", CudaTrainConfig(dim=72, mlp_dim=144, values="projected", dropout=0.0, epochs=args.small_epochs,
                                 position_lr_mult=20.0, position_schedule="cosine"))
    if not args.skip_paper:
        run("paper", CudaTrainConfig(epochs=args.paper_epochs, budget_s=args.paper_budget))
    print(f"total {time.perf_counter() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    main()
