"""The same analysis in one process and in several (torch.distributed, gloo on the CPU / nccl on
GPUs), for growing numbers of images; and, per rank, the data loader against the forward pass.

Usage (from the repository root)::

    python bench/distributed.py                                   # CPU: 1 process vs 2 (gloo)
    python bench/distributed.py --sizes 256,512 --procs 2 --threads-single 2 --threads-rank 1
    python bench/distributed.py --device cuda --procs 8           # one GPU per rank (nccl)

Writes ``bench/results-distributed.json`` (every number, the machine) and
``bench/RESULTS-distributed.md`` (``--out-json`` / ``--out-md`` for other names, e.g. a GPU run
beside the CPU one).

Measured, for each number of images (``--sizes``), each run a fresh process (``--repeats`` times,
the median kept):

* **single**: ``probe.analyze`` of the embedded model (``probe analyze`` without ``--model``:
  the attention-only Cordonnier model, 6 layers of 9 heads on a 16x16 grid) in one process with
  ``--threads-single`` torch threads: the default analyses (streaming statistics with 100
  bootstrap replicates, quadratic fits, conv test with its random-init null), progress off.
* **distributed**: the same call with ``distributed=True`` under ``torchrun --nproc-per-node
  --procs``, ``--threads-rank`` threads per rank; timed on rank 0 from a barrier before the call
  to its return (capture of its shard, all-reduce, gathering, fits and tests on rank 0).
* per stage (first to last progress update): capture, quadratic fits, conv test, and the
  conv-test null (which runs on rank 0 alone in both cases); the start-up of the processes
  (imports, model load) is reported apart (``process wall``).
* the largest relative difference between the two heads tables, standard-error columns aside
  (the embedded model's attention does not depend on the image, so its standard errors are 0 and
  what is computed is rounding: see tests/test_distributed.py).
* **loader vs forward**: one rank's decoding of the images (``probe.data.iter_batches``, no
  workers) against the embedded model's forward pass alone, with ``--threads-rank`` and
  ``--threads-single`` threads. ``bench/loader.py`` measures the same for DeiT-Tiny on ImageNet
  photos.

Images: ``../shared/data/cifar10-test`` (CIFAR-10 test JPEGs, a seeded subset of N: the model's
own data); without ``../shared`` (e.g. on a lent GPU machine), N seeded random tensor images
(no decoding; the loader row is then left out). On CUDA the processes share the GPUs one per
rank, so ``--procs`` is capped at the number of GPUs (with one GPU only the single-process
figures are taken).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CIFAR = ROOT.parent / "shared" / "data" / "cifar10-test"
STAGES = ("capture", "quadratic fits", "conv test", "conv-test null")


def _images(n: int, source: str):
    """The analysed images: CIFAR-10 test JPEGs (seeded subset) or seeded random tensors."""
    import torch

    if source == "cifar":
        from probe.data import collect_images

        return collect_images(str(CIFAR), n, seed=0, workers=0)
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _worker(args: argparse.Namespace) -> None:
    """One timed run (single process, or one rank under torchrun): prints ``RESULT {json}``."""
    t_process = time.perf_counter()
    import torch

    torch.set_num_threads(args.threads)
    import probe

    distributed = args.worker == "rank"
    dist_run = None
    if distributed:
        from probe.distributed import setup

        dist_run = setup(args.device)
    images = _images(args.n, args.source)
    stages: dict[str, list[float]] = {}

    def progress(stage: str, done: int, total: int) -> None:
        now = time.perf_counter()
        stages.setdefault(stage, [now, now])[1] = now

    if dist_run is not None:
        import torch.distributed as dist

        dist.barrier()
    device = args.device
    if device == "cuda" and dist_run is not None:
        device = f"cuda:{dist_run.local_rank}"
    t0 = time.perf_counter()
    res = probe.analyze(None, images, batch_size=args.batch_size, device=device, progress=progress,
                        distributed=dist_run if dist_run is not None else False)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    out = {"rank": 0 if dist_run is None else dist_run.rank, "analyze_s": t1 - t0,
           "stages_s": {k: v[1] - v[0] for k, v in stages.items()},
           "process_s": t1 - t_process, "threads": torch.get_num_threads()}
    if res is not None:
        out["num_images"] = res.meta["num_images"]
        res.heads.to_csv(args.heads, index=False)
    print("RESULT " + json.dumps(out), flush=True)
    if dist_run is not None:
        from probe.distributed import shutdown

        shutdown()


def _results(text: str) -> list[dict[str, Any]]:
    return [json.loads(l[len("RESULT "):]) for l in text.splitlines() if l.startswith("RESULT ")]


def _run_single(args, n: int, heads: Path) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--bench-worker", "single", "--bench-images", str(n), "--bench-heads", str(heads),
           "--bench-threads", str(args.threads_single), *_common(args)]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=_env(args.threads_single), cwd=ROOT)
    if p.returncode:
        raise SystemExit(f"single run failed:\n{p.stdout}\n{p.stderr}")
    (r,) = _results(p.stdout)
    r["wall_s"] = time.perf_counter() - t0
    return r


def _run_ranks(args, n: int, procs: int, heads: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs),
           str(Path(__file__).resolve()), "--bench-worker", "rank", "--bench-images", str(n), "--bench-heads", str(heads),
           "--bench-threads", str(args.threads_rank), *_common(args)]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=_env(args.threads_rank), cwd=ROOT)
    if p.returncode:
        raise SystemExit(f"distributed run failed:\n{p.stdout}\n{p.stderr}")
    every = sorted(_results(p.stdout), key=lambda r: r["rank"])
    r = dict(every[0])
    r["wall_s"] = time.perf_counter() - t0
    r["capture_s_per_rank"] = [e["stages_s"].get("capture") for e in every]
    return r


def _common(args) -> list[str]:
    return ["--device", args.device, "--batch-size", str(args.batch_size), "--source", args.source]


def _env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _max_rel_diff(a: Path, b: Path) -> float:
    """Largest relative difference of the numeric, non-standard-error columns of two heads.csv."""
    import numpy as np
    import pandas as pd

    x, y = pd.read_csv(a), pd.read_csv(b)
    worst = 0.0
    for c in x.columns:
        if c.endswith("_se") or x[c].dtype.kind not in "fi" or c not in y:
            continue
        u, v = x[c].to_numpy(float), y[c].to_numpy(float)
        m = np.isfinite(u) & np.isfinite(v)
        if m.any():
            scale = np.maximum(np.maximum(np.abs(u[m]), np.abs(v[m])), 1e-300)
            worst = max(worst, float(np.max(np.abs(u[m] - v[m]) / scale)))
    return worst


def _loader_vs_forward(args) -> dict[str, Any] | None:
    """Decoding throughput of one rank (iter_batches, no workers) and the forward pass alone."""
    import torch

    from probe.data import eval_transform, iter_batches
    from probe.models import resolve_model

    resolved = resolve_model(None)
    dev = torch.device(args.device)
    net = resolved.model.to(dev).eval()
    transform, _ = eval_transform(net)
    n = min(512, max(args.sizes))
    out: dict[str, Any] = {"images": n}
    before = torch.get_num_threads()
    try:
        if args.source == "cifar":
            torch.set_num_threads(args.threads_rank)
            images = _images(n, "cifar")
            list(iter_batches(images, transform, args.batch_size, workers=0))  # warm the page cache
            t0 = time.perf_counter()
            pool = torch.cat([b for b, _ in iter_batches(_images(n, "cifar"), transform, args.batch_size, workers=0)])
            out["loader_images_per_s"] = n / (time.perf_counter() - t0)
        else:
            pool = torch.randn(n, 3, 32, 32)
        pool = pool[:4 * args.batch_size].to(dev)
        for threads in sorted({args.threads_rank, args.threads_single}):
            torch.set_num_threads(threads)
            with torch.no_grad():
                net(pool[:args.batch_size])
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                for i in range(0, pool.shape[0], args.batch_size):
                    net(pool[i:i + args.batch_size])
                if dev.type == "cuda":
                    torch.cuda.synchronize()
            out[f"forward_images_per_s_{threads}_threads"] = pool.shape[0] / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--sizes", default="256,512,1024,2048", help="comma-separated numbers of images")
    ap.add_argument("--procs", type=int, default=2, help="ranks of the distributed runs")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads-single", type=int, default=2, help="torch threads of the single process")
    ap.add_argument("--threads-rank", type=int, default=1, help="torch threads of each rank")
    ap.add_argument("--repeats", type=int, default=1, help="runs per case (median kept)")
    ap.add_argument("--source", default=None, help="cifar or tensor (default: cifar when ../shared is present)")
    ap.add_argument("--out-json", default=str(HERE / "results-distributed.json"))
    ap.add_argument("--out-md", default=str(HERE / "RESULTS-distributed.md"))
    ap.add_argument("--markdown-from", metavar="JSON", help="only rewrite --out-md from an earlier results file")
    # one timed run (internal)
    # (long, distinct names: torchrun parses abbreviations of its own options after the script)
    ap.add_argument("--bench-worker", dest="worker", choices=["single", "rank"], help=argparse.SUPPRESS)
    ap.add_argument("--bench-images", dest="n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--bench-heads", dest="heads", help=argparse.SUPPRESS)
    ap.add_argument("--bench-threads", dest="threads", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.source is None:
        args.source = "cifar" if CIFAR.is_dir() else "tensor"
    if args.worker:
        _worker(args)
        return None
    if args.markdown_from:
        Path(args.out_md).write_text(_markdown(json.loads(Path(args.markdown_from).read_text())))
        return None
    args.sizes = [int(v) for v in args.sizes.split(",") if v.strip()]

    import tempfile

    import torch

    from probe.data import cpu_count

    procs = args.procs
    note = ""
    if args.device == "cuda":
        gpus = torch.cuda.device_count()
        if gpus < 1:
            raise SystemExit("--device cuda: no CUDA GPU is visible")
        if procs > gpus:
            note = f"--procs {procs} capped to the {gpus} GPU(s) (one GPU per rank, nccl)"
            procs = gpus
    rows = []
    with tempfile.TemporaryDirectory(prefix="probe-bench-dist-") as tmp:
        for n in args.sizes:
            single = [_run_single(args, n, Path(tmp) / f"single-{n}.csv") for _ in range(args.repeats)]
            row: dict[str, Any] = {"num_images": n, "single": _median(single)}
            print(f"{n} images, 1 process: {row['single']['analyze_s']:.1f} s", flush=True)
            if procs > 1:
                multi = [_run_ranks(args, n, procs, Path(tmp) / f"multi-{n}.csv") for _ in range(args.repeats)]
                row["distributed"] = _median(multi)
                row["max_rel_diff_heads"] = _max_rel_diff(Path(tmp) / f"single-{n}.csv", Path(tmp) / f"multi-{n}.csv")
                print(f"{n} images, {procs} processes: {row['distributed']['analyze_s']:.1f} s "
                      f"(heads differ by {row['max_rel_diff_heads']:.1e} at most)", flush=True)
            rows.append(row)
    loader = _loader_vs_forward(args)
    out = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(["python bench/distributed.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": {"platform": platform.platform(), "cpus": cpu_count(), "torch": torch.__version__,
                    "device": args.device,
                    "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None},
        "settings": {"sizes": args.sizes, "procs": procs, "batch_size": args.batch_size,
                     "threads_single": args.threads_single, "threads_rank": args.threads_rank,
                     "repeats": args.repeats, "source": args.source, "note": note,
                     "backend": "nccl" if args.device == "cuda" else "gloo"},
        "rows": rows,
        "loader_vs_forward": loader,
    }
    Path(args.out_json).write_text(json.dumps(out, indent=1) + "\n")
    Path(args.out_md).write_text(_markdown(out))
    print(f"wrote {args.out_json} and {args.out_md}")
    return out


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median ``analyze_s``."""
    ordered = sorted(runs, key=lambda r: r["analyze_s"])
    return ordered[(len(ordered) - 1) // 2]


def _markdown(r: dict[str, Any]) -> str:
    m, s = r["machine"], r["settings"]
    where = m["gpu"] or f"{m['cpus']} CPUs"
    src = ("CIFAR-10 test JPEGs from ../shared (seeded subset)" if s["source"] == "cifar"
           else "seeded random tensor images (no decoding)")
    p = s["procs"]
    lines = [
        "# One process against several (torch.distributed) on the embedded model",
        "",
        f"Written by `{r['command']}` on {r['date']} ({where}; {m['platform']}; torch {m['torch']}).",
        f"Images: {src}; batch {s['batch_size']}; default analyses (100 bootstrap replicates, fits, conv test "
        f"with its null); 1 process with {s['threads_single']} torch threads against {p} processes "
        f"({s['backend']}) with {s['threads_rank']} thread(s) each; {s['repeats']} run(s) per case, median."
        + (f" {s['note']}." if s["note"] else ""),
        "",
        f"| images | 1 process: analyze (s) | capture (s) | {p} processes: analyze (s) | capture per rank (s) | "
        f"speed-up | fits + conv test + null, 1 / {p} (s) | other, 1 / {p} (s) | process wall 1 / "
        f"{p} (s) | heads max rel. diff |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]

    def rest(run: dict[str, Any]) -> float:
        return sum(run["stages_s"].get(k, 0.0) for k in STAGES[1:])

    def other(run: dict[str, Any]) -> float:
        return run["analyze_s"] - run["stages_s"].get("capture", 0.0) - rest(run)

    for row in r["rows"]:
        a = row["single"]
        d = row.get("distributed")
        cap = a["stages_s"].get("capture", float("nan"))
        if d:
            per = " / ".join(f"{v:.1f}" for v in d["capture_s_per_rank"] if v is not None)
            lines.append(f"| {row['num_images']} | {a['analyze_s']:.1f} | {cap:.1f} | {d['analyze_s']:.1f} | {per} | "
                         f"{a['analyze_s'] / d['analyze_s']:.2f}x | {rest(a):.1f} / {rest(d):.1f} | "
                         f"{other(a):.1f} / {other(d):.1f} | {a['wall_s']:.1f} / "
                         f"{d['wall_s']:.1f} | {row['max_rel_diff_heads']:.1e} |")
        else:
            lines.append(f"| {row['num_images']} | {a['analyze_s']:.1f} | {cap:.1f} | – | – | – | {rest(a):.1f} / – | "
                         f"{other(a):.1f} / – | {a['wall_s']:.1f} / – | – |")
    both = [row for row in r["rows"] if row.get("distributed")]
    if both:
        speed = [row["single"]["analyze_s"] / row["distributed"]["analyze_s"] for row in both]
        cap = [row["single"]["stages_s"]["capture"] / max(v for v in row["distributed"]["capture_s_per_rank"] if v)
               for row in both]
        lines += [
            "",
            f"Reading: {p} processes with {s['threads_rank']} thread(s) each take the whole call "
            f"{min(speed):.2f}-{max(speed):.2f}x faster than 1 process with {s['threads_single']} threads, the capture "
            f"alone {min(cap):.2f}-{max(cap):.2f}x (the slowest rank against the single process); the fixed part on "
            "rank 0 (fits, conv test, null) does not shrink. "
            + ("On a machine with as many cores as the single process has threads, this compares the same "
               "compute split two ways: the gain is what one process's intra-op threading loses, not more cores. "
               if m["cpus"] <= s["threads_single"] * 1 else "")
            + f"heads.csv of the two runs agree to {max(row['max_rel_diff_heads'] for row in both):.0e} relative "
            "(standard errors aside).",
        ]
    lv = r.get("loader_vs_forward") or {}
    lines += [
        "",
        "analyze: the `probe.analyze` call (rank 0, from a barrier before it). capture: the capture stage "
        "(forward passes and streaming reducers of the process's shard). The fits, the conv test and its "
        "random-init null run on rank 0 alone after the all-reduce, so they do not shrink with more ranks. "
        "other: the rest of the call: model and image list set-up, and for the ranks the wait for the slowest "
        "rank's capture, the all-reduce of the sums and the gathering of names and first images. "
        "process wall: the whole command, start-up (imports, model load, process-group set-up) included. "
        "heads max rel. diff: numeric columns of heads.csv other than standard errors (those of the embedded "
        "model are rounding noise of a true 0).",
        "",
    ]
    if lv:
        fwd = {k: v for k, v in lv.items() if k.startswith("forward_images_per_s_")}
        parts = [f"forward pass alone with {k.split('_')[-2]} thread(s): **{v:.1f} images/s**" for k, v in fwd.items()]
        if "loader_images_per_s" in lv:
            one = lv.get(f"forward_images_per_s_{s['threads_rank']}_threads")
            parts.insert(0, f"decoding ({lv['images']} CIFAR JPEGs, `iter_batches` without workers, "
                            f"{s['threads_rank']} thread(s)): **{lv['loader_images_per_s']:.0f} images/s**"
                         + (f", {lv['loader_images_per_s'] / one:.1f}x one rank's forward pass" if one else ""))
        last = r["rows"][-1]["single"]
        rate = r["rows"][-1]["num_images"] / last["stages_s"]["capture"] if last["stages_s"].get("capture") else None
        if rate:
            parts.append(f"the capture stage of the single process ran at {rate:.0f} images/s: materialising and "
                         "reducing the attention maps, not decoding or the forward pass, bounds this model")
        lines += ["Loader against the forward pass (one rank): " + "; ".join(parts) + ".", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
