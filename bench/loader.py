"""Data-loader throughput against the forward pass of DeiT-Tiny: does decoding keep the model fed?

Usage (from the repository root)::

    python bench/loader.py                          # CPU, 256 images, workers 0/1/2
    python bench/loader.py --device cuda --num-images 500 --workers 0,1,2,4 --batch-size 64

Writes ``bench/results-loader.json`` (every number, the machine) and ``bench/RESULTS-loader.md``
(``--out-json`` / ``--out-md`` for other names, e.g. a GPU run beside the CPU one).

Measured, each the median of ``--repeats`` timed passes after one untimed warm-up pass (so the
files are in the page cache, as in a second run over a data set):

* **loader**: ``probe.data.iter_batches`` over the images (JPEG decode, EXIF orientation, RGB,
  DeiT-Tiny's eval transform: bicubic resize, centre crop 224, normalisation), for each number
  of decoding workers; a fresh ``DataLoader`` per pass, so worker start-up is included, as in a
  run. Batches are pinned on CUDA.
* **forward**: DeiT-Tiny's forward pass alone (``torch.no_grad``, eval mode) on batches of
  already-transformed images, on ``--device``.
* **pipeline**: ``probe.analyze`` of the same images (capture of all 12 layers, streaming
  reducers with 100 bootstrap replicates; fits, conv test and attribution off) for each number of
  workers: what a run sees when decoding and the forward pass share the machine.

Images: ``../shared/data/imagenet-sample`` (500 ImageNet photos, first N in sorted order, cycled
past 500); weights ``../shared/data/weights/deit_tiny_patch16_224.safetensors``. Without
``../shared`` (e.g. on a lent GPU machine) the photos are replaced by N synthetic 500x375 JPEGs
(smooth noise, quality 90) written to a temporary folder and the weights by a random init; the
results say so.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
IMAGES = SHARED / "imagenet-sample"
WEIGHTS = SHARED / "weights" / "deit_tiny_patch16_224.safetensors"
MODEL = "deit_tiny_patch16_224"


def _synthetic_photos(n: int, folder: Path, seed: int = 0) -> list[Path]:
    """``n`` 500x375 JPEGs of smooth random colour fields (ImageNet-like size and entropy)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        small = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
        im = Image.fromarray(small).resize((500, 375), Image.BICUBIC)
        noise = rng.integers(-12, 12, (375, 500, 3))
        im = Image.fromarray(np.clip(np.asarray(im, dtype=np.int16) + noise, 0, 255).astype(np.uint8))
        p = folder / f"synthetic_{i:04d}.jpg"
        im.save(p, quality=90)
        paths.append(p)
    return paths


def _image_paths(n: int, tmp: Path) -> tuple[list[Path], str]:
    if IMAGES.is_dir():
        photos = sorted(IMAGES.glob("*.JPEG"))
        if photos:
            return [photos[i % len(photos)] for i in range(n)], f"{IMAGES} (first {min(n, len(photos))} photos" + (
                f", cycled to {n})" if n > len(photos) else ")")
    k = min(n, 500)
    photos = _synthetic_photos(k, tmp)
    return [photos[i % k] for i in range(n)], f"{k} synthetic 500x375 JPEGs (../shared absent)" + (
        f", cycled to {n}" if n > k else "")


def _median_rate(fn, n_images: int, repeats: int, sync=None) -> tuple[float, list[float]]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if sync:
            sync()
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return n_images / statistics.median(times), times


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--num-images", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", default="0,1,2", help="comma-separated numbers of decoding workers")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-pipeline", action="store_true", help="skip the probe.analyze measurements")
    ap.add_argument("--out-json", default=str(HERE / "results-loader.json"))
    ap.add_argument("--out-md", default=str(HERE / "RESULTS-loader.md"))
    args = ap.parse_args(argv)

    import probe
    from probe.data import ImageSet, cpu_count, eval_transform, iter_batches
    from probe.models import resolve_model
    from probe.pipeline import resolve_device

    dev = resolve_device(args.device)
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else None
    with tempfile.TemporaryDirectory(prefix="probe-bench-loader-") as tmp:
        paths, images_desc = _image_paths(args.num_images, Path(tmp))
        if WEIGHTS.is_file():
            resolved, weights_desc = resolve_model(MODEL, weights=WEIGHTS), str(WEIGHTS)
        else:
            resolved, weights_desc = resolve_model(MODEL, random_init=True), "random init (../shared absent)"
        net = resolved.model.to(dev).eval()
        transform, _ = eval_transform(net)
        n = len(paths)

        loader: dict[int, dict[str, Any]] = {}
        for w in workers:
            def run_loader(w=w) -> None:
                s = ImageSet(list(paths), "bench")
                for batch, _ in iter_batches(s, transform, args.batch_size, "RGB", workers=w, pin_memory=cuda):
                    if cuda:
                        batch.to(dev, non_blocking=True)
                if sync:
                    sync()
            rate, times = _median_rate(run_loader, n, args.repeats)
            loader[w] = {"images_per_s": rate, "seconds": times}
            print(f"loader, {w} workers: {rate:.1f} images/s", flush=True)

        pool = torch.cat([b for b, _ in iter_batches(ImageSet(list(paths[:args.batch_size]), "pool"), transform,
                                                     args.batch_size, "RGB", workers=0)]).to(dev)
        n_fwd = max(args.batch_size, min(n, 4 * args.batch_size) if not cuda else n)

        @torch.no_grad()
        def run_forward() -> None:
            for _ in range(0, n_fwd, args.batch_size):
                net(pool)
        f_rate, f_times = _median_rate(run_forward, n_fwd, args.repeats, sync)
        print(f"forward alone: {f_rate:.1f} images/s", flush=True)

        pipeline: dict[int, dict[str, Any]] = {}
        if not args.no_pipeline:
            for w in workers:
                def run_pipeline(w=w) -> None:
                    s = ImageSet(list(paths), "bench", workers=w)
                    probe.analyze(resolved, s, batch_size=args.batch_size, device=str(dev), fits=False,
                                  conv_test=False, attribution="none")
                rate, times = _median_rate(run_pipeline, n, args.repeats, sync)
                pipeline[w] = {"images_per_s": rate, "seconds": times}
                print(f"probe.analyze, {w} workers: {rate:.1f} images/s", flush=True)

    out = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(["python bench/loader.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": {"platform": platform.platform(), "cpus": cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "device": str(dev),
                    "gpu": torch.cuda.get_device_name(dev) if cuda else None},
        "settings": {"num_images": n, "batch_size": args.batch_size, "repeats": args.repeats, "images": images_desc,
                     "weights": weights_desc, "model": MODEL, "forward_images": n_fwd},
        "loader": {str(k): v for k, v in loader.items()},
        "forward": {"images_per_s": f_rate, "seconds": f_times},
        "pipeline": {str(k): v for k, v in pipeline.items()},
    }
    Path(args.out_json).write_text(json.dumps(out, indent=1) + "\n")
    Path(args.out_md).write_text(_markdown(out))
    print(f"wrote {args.out_json} and {args.out_md}")
    return out


def _markdown(r: dict[str, Any]) -> str:
    m, s = r["machine"], r["settings"]
    f = r["forward"]["images_per_s"]
    where = m["gpu"] or f"{m['cpus']} CPUs, {m['torch_threads']} torch threads"
    lines = [
        "# Data-loader throughput against the forward pass (DeiT-Tiny)",
        "",
        f"Written by `{r['command']}` on {r['date']} ({where}; {m['platform']}; torch {m['torch']}).",
        f"{s['num_images']} images: {s['images']}; weights: {s['weights']}; batch {s['batch_size']}; "
        f"median of {s['repeats']} passes after a warm-up pass.",
        "",
        f"- DeiT-Tiny forward pass alone on {m['device']}: **{f:.1f} images/s** (already-transformed batches)",
        "",
        "| decoding workers | loader alone (images/s) | loader / forward | probe.analyze (images/s) |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for w, v in r["loader"].items():
        p = r["pipeline"].get(w, {}).get("images_per_s")
        lines.append(f"| {w} | {v['images_per_s']:.1f} | {v['images_per_s'] / f:.2f} | "
                     + (f"{p:.1f}" if p is not None else "–") + " |")
    lines += [
        "",
        "Loader: `probe.data.iter_batches` (JPEG decode, EXIF orientation, RGB, the model's eval transform), "
        "worker start-up included. probe.analyze: capture of all layers and the streaming reducers (100 "
        "bootstrap replicates), fits, conv test and attribution off, the same images. "
        "A loader / forward ratio above 1 keeps the model fed.",
        "",
    ]
    l0 = r["loader"].get("0", {}).get("images_per_s")
    pipe = {w: v["images_per_s"] for w, v in r["pipeline"].items()}
    if l0 and pipe and "0" in pipe:
        spread = ", ".join(f"{w} workers {100 * (v / pipe['0'] - 1):+.0f} %" for w, v in pipe.items() if w != "0")
        bound = "the forward pass" if l0 > f else "decoding"
        lines += [f"Reading: decoding in process runs at {l0 / f:.1f}x the forward pass, so {bound} bounds "
                  f"the run here; against 0 workers, probe.analyze changes by {spread}"
                  + (" (differences of a few percent are within the noise of a shared machine)." if m["cpus"] <= 4
                     else "."), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
