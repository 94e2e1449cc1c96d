"""Benchmark harness: throughput and peak memory of probe against the forward pass and a naive baseline.

Usage (from the repository root)::

    python bench/run.py                 # full run: DeiT-Tiny + ViT-S/16, batch 1/16/64, memory curve
    python bench/run.py --quick         # DeiT-Tiny only, smaller memory curve (a few minutes)
    python bench/run.py --device cuda --amp --models vit_small --batch-sizes 256 --memory-curve ""

It writes ``bench/results.json`` (every number, the machine description, the target checks) and
``bench/RESULTS.md`` (tables and the ratios c/a, c/b, c/d). See :mod:`variants` for the four
workloads a/b/c/d.

Method:

* Images: the first N photos of ``../shared/data/imagenet-sample`` (cycled when N > 500), decoded,
  converted to RGB and passed through each model's eval transform ONCE; the resulting tensor is
  handed to every workload, so decoding and resizing are not timed.
* Each (model, workload) runs in its own fresh process; its peak resident memory (``VmHWM``) is
  reset before each batch size, so the peak reported is that configuration's own. The four workers
  of a model stay alive together; after one warm-up batch each, their timed repeats are interleaved
  (workload order rotated every repeat), and the median is reported.
* Memory curve: one fresh process per (workload, number of images), batch 64, the images streamed
  from a fixed pool of ``--pool`` pre-transformed photos (batches gathered on the fly), so a
  growing peak can only come from what the workload keeps.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import multiprocessing as mp
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
for p in (str(ROOT), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

import torch  # noqa: E402

import variants  # noqa: E402

DEFAULT_IMAGE_DIR = ROOT.parent / "shared" / "data" / "imagenet-sample"
#: Relative cost of one image's forward pass, used to choose image counts per configuration.
MODEL_COST = {"deit_tiny": 1.0, "vit_small": 4.0}

TARGETS = {
    "c_over_b_min": 0.8,
    "c_over_d_min": 3.0,
    "memory_flat_tolerance": 0.10,
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------- machine
def machine_description(device: str) -> dict[str, Any]:
    """CPU model, cores, memory, library versions, load; GPU name when ``device`` is cuda."""
    import timm

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_total = _meminfo("MemTotal")
    desc = {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_total_gb": round(mem_total / 2**30, 1) if mem_total else None,
        "torch": torch.__version__,
        "torch_threads_default": torch.get_num_threads(),
        "timm": timm.__version__,
        "numpy": __import__("numpy").__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        desc["gpu"] = torch.cuda.get_device_name(0)
        desc["cuda"] = torch.version.cuda
    return desc


def _meminfo(key: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


# ---------------------------------------------------------------------------------------- images
def prepare_images(model_name: str, count: int, image_dir: Path | None, tmp: Path) -> Path:
    """Decode and transform ``count`` photos for ``model_name`` once; save the tensor; return its path.

    Photos are taken in sorted order and cycled when ``count`` exceeds the folder. With
    ``image_dir=None`` seeded random images stand in (clearly marked in the results).
    """
    from PIL import Image

    from probe.data import eval_transform

    out = tmp / f"{model_name}_{count}.pt"
    if out.exists():
        return out
    resolved = variants.load_model(model_name)
    transform, cfg = eval_transform(resolved.model)
    if image_dir is None:
        g = torch.Generator().manual_seed(0)
        pool = torch.randn(count, *cfg["input_size"], generator=g)
    else:
        files = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in {".jpeg", ".jpg", ".png"})
        decoded = {}
        tensors = []
        for i in range(count):
            f = files[i % len(files)]
            if f not in decoded:
                with Image.open(f) as im:
                    decoded[f] = transform(im.convert("RGB"))
            tensors.append(decoded[f])
        pool = torch.stack(tensors)
    torch.save(pool, out)
    return out


def model_shape(model_name: str) -> dict[str, int]:
    """Layers, heads and tokens of a model (for the naive baseline's memory estimate)."""
    resolved = variants.load_model(model_name)
    m = resolved.model
    attn = [a for a in m.modules() if hasattr(a, "fused_attn") and hasattr(a, "num_heads")]
    tokens = int(m.num_prefix_tokens) + int(m.patch_embed.num_patches)
    return {"layers": len(attn), "heads": int(attn[0].num_heads), "tokens": tokens}


# --------------------------------------------------------------------------------------- workers
class Worker:
    """A fresh process running one workload (see :func:`variants.worker_main`).

    The process starts at construction; :meth:`ready` waits for its setup to finish, so several
    workers can load in parallel.
    """

    def __init__(self, spec: dict[str, Any], env: dict[str, str] | None = None):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=variants.worker_main, args=(child, spec), daemon=True)
        saved = {k: os.environ.get(k) for k in (env or {})}
        os.environ.update(env or {})
        try:
            self.proc.start()  # the child inherits the environment at start
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        child.close()
        self.spec = spec
        self.setup: dict[str, Any] | None = None

    def ready(self) -> "Worker":
        if self.setup is None:
            self.setup = self._reply()
        return self

    def _reply(self):
        try:
            status, value = self.conn.recv()
        except EOFError:
            self.proc.join(5)
            raise RuntimeError(
                f"worker {self.spec['variant']} ({self.spec['model']}, {self.spec['num_images']} images) "
                f"died (exit code {self.proc.exitcode}; out of memory?)"
            ) from None
        if status != "ok":
            raise RuntimeError(f"worker {self.spec['variant']} failed:\n{value}")
        return value

    def call(self, *cmd):
        self.ready()
        self.conn.send(cmd)
        return self._reply()

    def close(self) -> None:
        try:
            self.call("exit")
        except (RuntimeError, OSError, EOFError):
            pass
        self.proc.join(30)
        if self.proc.is_alive():
            self.proc.terminate()


def _cpu_times() -> tuple[int, int] | None:
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields), idle


def quiet_wait(max_wait: float, threshold: float = 0.15, window: float = 0.3) -> dict[str, float]:
    """Wait (at most ``max_wait`` s) until the machine is quiet before a timed repeat.

    Called while every worker is idle, so the busy share of all CPUs over a ``window``-second
    sample (``/proc/stat``) is other processes' load. Returns ``{"busy": share, "waited": s}``;
    ``busy`` above ``threshold`` means the repeat ran on a loaded machine anyway.
    """
    t0 = time.perf_counter()
    busy = float("nan")
    while True:
        a = _cpu_times()
        time.sleep(window)
        b = _cpu_times()
        if a is None or b is None or b[0] == a[0]:
            break
        busy = 1.0 - (b[1] - a[1]) / (b[0] - a[0])
        if busy < threshold or time.perf_counter() - t0 >= max_wait:
            break
    return {"busy": round(busy, 3), "waited": round(time.perf_counter() - t0 - window, 2)}


def extract_reducer(ref: str, tmp: Path) -> str | None:
    """Save ``probe/analyses/reducers.py`` of git commit ``ref`` under ``tmp``; None if git fails."""
    import subprocess

    try:
        text = subprocess.run(["git", "-C", str(ROOT), "show", f"{ref}:probe/analyses/reducers.py"],
                              check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    out = tmp / "before_reducers.py"
    out.write_text(text)
    return str(out)


def curve_env(args) -> dict[str, str]:
    """Environment of the memory-curve workers.

    With ``--curve-malloc mmap`` (default) glibc serves every allocation above 128 KiB by
    ``mmap`` and returns it on free (``MALLOC_MMAP_THRESHOLD_``), so resident memory follows the
    live tensors instead of the heap glibc keeps after frees, whose size varies from run to run
    by a few hundred MiB. Applied to every workload alike; no effect outside glibc.
    """
    return {"MALLOC_MMAP_THRESHOLD_": "131072"} if args.curve_malloc == "mmap" else {}


def auto_images(model: str, batch_size: int) -> int:
    """Images per timed repeat: 128 DeiT-Tiny images at batch 1 and 256 at larger batches (half as
    many for a model that costs 4x as much per image), whole batches.

    An analysis carries a fixed cost (fits, conv-likeness test) that a researcher pays once per
    run; counts of this size, a few hundred photos, are what such a run looks at, and they keep
    that cost from dominating a throughput figure."""
    cost = MODEL_COST.get(model, 4.0)
    base = 128 if batch_size == 1 else 256
    n = max(batch_size, int(base / max(cost / 2, 1.0)))
    return int(-(-n // batch_size) * batch_size)


def measure_throughput(model, configs, names, args, images_path) -> list[dict]:
    """Time the workloads ``names`` of one model for each ``(batch_size, num_images)`` in ``configs``.

    One process per workload, kept for all batch sizes (peak memory reset before each); one
    warm-up batch, then the timed repeats interleaved with the workload order rotated each repeat.
    """
    base = {
        "model": model, "images": str(images_path), "num_images": max(n for _, n in configs),
        "device": args.device, "amp": args.amp, "threads": args.threads, "seed": 0,
        "before_reducer": getattr(args, "before_reducer", None),
    }
    workers = {v: Worker({**base, "variant": v}) for v in names}
    rows = []
    try:
        for w in workers.values():
            w.ready()
        for batch_size, num_images in configs:
            log(f"throughput {model} batch {batch_size}: {num_images} images x {args.repeats} repeats, "
                f"workloads {','.join(names)}")
            before = {v: workers[v].call("reset") for v in names}
            for v in names:
                workers[v].call("run", batch_size, batch_size)  # warm-up: one batch
            times: dict[str, list[float]] = {v: [] for v in names}
            cpu: dict[str, list[float]] = {v: [] for v in names}
            busy: dict[str, list[float]] = {v: [] for v in names}
            for r in range(args.repeats):
                order = names[r % len(names):] + names[: r % len(names)]
                for v in order:
                    if args.quiet_wait > 0:
                        busy[v].append(quiet_wait(args.quiet_wait)["busy"])
                    t = workers[v].call("run", num_images, batch_size)
                    times[v].append(t["wall_s"])
                    cpu[v].append(t["cpu_s"])
            for v in names:
                st = workers[v].call("stats")
                med = statistics.median(times[v])
                rows.append({
                    "model": model, "batch_size": batch_size, "num_images": num_images, "variant": v,
                    "times_s": [round(t, 4) for t in times[v]], "median_s": round(med, 4),
                    "min_s": round(min(times[v]), 4),
                    "cpu_s": [round(t, 3) for t in cpu[v]],
                    "others_busy_before": busy[v],
                    "images_per_s": round(num_images / med, 3),
                    "images_per_s_best": round(num_images / min(times[v]), 3),
                    "peak_rss_mb": round(st["peak_rss_mb"], 1),
                    "rss_before_mb": round(before[v]["rss_mb"], 1),
                    "peak_reset": before[v]["reset"],
                    "setup_rss_mb": round(workers[v].setup["setup_rss_mb"], 1),
                    "cuda_peak_mb": round(st["cuda_peak_mb"], 1) if "cuda_peak_mb" in st else None,
                    "threads": st["threads"],
                    "summary": st["summary"],
                })
                log(f"  {v}: {rows[-1]['images_per_s']:.2f} img/s, peak {rows[-1]['peak_rss_mb']:.0f} MiB")
        return rows
    finally:
        for w in workers.values():
            w.close()


def measure_memory(model, counts, names, args, pool_path, shape) -> list[dict]:
    """Peak memory of each workload for each image count; a fresh process per point."""
    rows = []
    avail = _meminfo("MemAvailable")
    for n in counts:
        for v in names:
            if v == "d":
                need = n * shape["layers"] * shape["heads"] * shape["tokens"] ** 2 * 4 * 1.5
                if avail is not None and need > 0.7 * avail:
                    log(f"memory curve: skip d at {n} images (needs ~{need / 2**30:.1f} GiB, "
                        f"{avail / 2**30:.1f} GiB available)")
                    rows.append({"model": model, "variant": v, "num_images": n, "skipped":
                                 f"needs ~{need / 2**30:.1f} GiB of {avail / 2**30:.1f} GiB available"})
                    continue
            spec = {
                "model": model, "images": str(pool_path), "num_images": n,
                "batch_size": args.memory_batch_size, "device": args.device, "amp": args.amp,
                "threads": args.threads, "seed": 0, "variant": v,
            }
            w = Worker(spec, env=curve_env(args)).ready()
            try:
                quiet = quiet_wait(args.quiet_wait) if args.quiet_wait > 0 else {}
                t = w.call("run", None)["wall_s"]
                st = w.call("stats")
            finally:
                w.close()
            rows.append({
                "model": model, "variant": v, "num_images": n, "batch_size": args.memory_batch_size,
                "peak_rss_mb": round(st["peak_rss_mb"], 1),
                "setup_rss_mb": round(w.setup["setup_rss_mb"], 1),
                "cuda_peak_mb": round(st["cuda_peak_mb"], 1) if "cuda_peak_mb" in st else None,
                "seconds": round(t, 2), "images_per_s": round(n / t, 3),
                "others_busy_before": quiet.get("busy"),
            })
            log(f"memory {model} {v} n={n}: peak {rows[-1]['peak_rss_mb']:.0f} MiB "
                f"(setup {rows[-1]['setup_rss_mb']:.0f}), {n / t:.1f} img/s")
    return rows


# ---------------------------------------------------------------------------------------- report
def ratios(rows: list[dict]) -> list[dict]:
    """Throughput ratios per (model, batch size): c/a, c/b, c/d, s/b; and the fixed cost of c.

    ``fixed_s`` = median time of c minus that of s on the same images: the per-analysis cost of the
    fits and the conv-likeness test (with its random-init null), which does not grow with the
    number of images. ``c_over_b_at_n`` projects c/b to more images from the measured per-image
    times of s and b plus that fixed cost; ``break_even_images`` is the count from which c/b
    reaches the target.
    """
    out = []
    keys = sorted({(r["model"], r["batch_size"]) for r in rows}, key=lambda k: (k[0], k[1]))
    for model, bs in keys:
        sel = {r["variant"]: r for r in rows if r["model"] == model and r["batch_size"] == bs}
        ips = {v: r["images_per_s"] for v, r in sel.items()}
        row: dict[str, Any] = {"model": model, "batch_size": bs}
        for num, den in (("c", "a"), ("c", "b"), ("c", "d"), ("s", "b"), ("s", "a"), ("s", "d"),
                         ("s0", "b"), ("s0", "d"), ("s", "s0")):
            if num in ips and den in ips:
                row[f"{num}/{den}"] = round(ips[num] / ips[den], 3)
        if all(v in sel for v in ("b", "c", "s")):
            n = sel["c"]["num_images"]
            fixed = sel["c"]["median_s"] - sel["s"]["median_s"]
            per_s, per_b = sel["s"]["median_s"] / n, sel["b"]["median_s"] / n
            row["fixed_s"] = round(fixed, 3)
            row["c_over_b_at_n"] = {str(m): round(m * per_b / (max(fixed, 0.0) + m * per_s), 3)
                                    for m in (1024, 10000)}
            margin = per_b / TARGETS["c_over_b_min"] - per_s
            row["break_even_images"] = (int(math.ceil(max(fixed, 0.0) / margin)) if margin > 0 else None)
        out.append(row)
    return out


def best_ratios(rows: list[dict]) -> list[dict]:
    """c/a, c/b, c/d, s/b, s/d from each workload's fastest repeat instead of its median.

    Another tenant of a shared host can only slow a repeat down, so the fastest repeat is the
    least disturbed one; these ratios complement the medians (the targets are checked on those).
    """
    out = []
    for model, bs in sorted({(r["model"], r["batch_size"]) for r in rows}):
        sel = {r["variant"]: r for r in rows if r["model"] == model and r["batch_size"] == bs}
        row: dict[str, Any] = {"model": model, "batch_size": bs}
        for num, den in (("c", "a"), ("c", "b"), ("c", "d"), ("s", "b"), ("s", "d")):
            if num in sel and den in sel and sel[num].get("min_s"):
                row[f"{num}/{den}"] = round(sel[den]["min_s"] / sel[num]["min_s"], 3)
        out.append(row)
    return out


def agreement(rows: list[dict]) -> list[dict]:
    """Largest |c - d| of the per-head statistics both compute (same images): a correctness check."""
    out = []
    keys = sorted({(r["model"], r["batch_size"]) for r in rows})
    for model, bs in keys:
        s = {r["variant"]: r.get("summary") or {} for r in rows if r["model"] == model and r["batch_size"] == bs}
        if s.get("c") and s.get("d"):
            row = {"model": model, "batch_size": bs}
            for k in ("mean_distance_px", "entropy_nats", "prefix_mass"):
                row[f"max_abs_diff_{k}"] = max(abs(x - y) for x, y in zip(s["c"][k], s["d"][k]))
            out.append(row)
    return out


def memory_summary(rows: list[dict]) -> list[dict]:
    """Per (model, workload): peak at the smallest and largest image count, growth, MiB/image."""
    out = []
    for model in sorted({r["model"] for r in rows}):
        for v in sorted({r["variant"] for r in rows if r["model"] == model}):
            pts = sorted((r["num_images"], r["peak_rss_mb"]) for r in rows
                         if r["model"] == model and r["variant"] == v and "peak_rss_mb" in r)
            if len(pts) < 2:
                continue
            (n0, m0), (n1, m1) = pts[0], pts[-1]
            out.append({
                "model": model, "variant": v, "from_images": n0, "to_images": n1,
                "peak_from_mb": m0, "peak_to_mb": m1, "growth": round(m1 / m0 - 1, 4),
                "mb_per_image": round((m1 - m0) / (n1 - n0), 3),
            })
    return out


def memory_ratios(rows: list[dict]) -> list[dict]:
    """c/b and c/d from the single runs of the memory curve, per (model, image count)."""
    out = []
    for model, n in sorted({(r["model"], r["num_images"]) for r in rows}):
        ips = {r["variant"]: r["images_per_s"] for r in rows
               if r["model"] == model and r["num_images"] == n and "images_per_s" in r}
        row: dict[str, Any] = {"model": model, "num_images": n}
        for den in "bd":
            if "c" in ips and den in ips:
                row[f"c/{den}"] = round(ips["c"] / ips[den], 3)
        if len(row) > 2:
            out.append(row)
    return out


def check_targets(rat: list[dict], mem: list[dict], mem_rat: list[dict], device: str) -> list[dict]:
    """The issue's targets, each with the measured value and pass/fail."""
    checks = []
    lo_b, lo_d = TARGETS["c_over_b_min"], TARGETS["c_over_d_min"]
    for r in rat:
        where = f"{r['model']}, batch {r['batch_size']}"
        if "c/b" in r and device == "cpu":
            checks.append({"target": f"c/b >= {lo_b} ({where}; end to end, fixed cost included)",
                           "value": r["c/b"], "pass": r["c/b"] >= lo_b})
        if "s/b" in r and device == "cpu":
            checks.append({"target": f"s/b >= {lo_b} ({where}; per-image cost of the analysis)",
                           "value": r["s/b"], "pass": r["s/b"] >= lo_b})
        if "c/d" in r:
            checks.append({"target": f"c/d >= {lo_d} ({where})", "value": r["c/d"], "pass": r["c/d"] >= lo_d})
        if "s/d" in r:
            checks.append({"target": f"s/d >= {lo_d} ({where}; like for like: the statistics d computes)",
                           "value": r["s/d"], "pass": r["s/d"] >= lo_d})
    for r in mem_rat:
        where = f"{r['model']}, {r['num_images']} images, batch of the memory curve, single runs"
        if "c/b" in r and device == "cpu":
            checks.append({"target": f"c/b >= {lo_b} ({where})", "value": r["c/b"], "pass": r["c/b"] >= lo_b})
        if "c/d" in r:
            checks.append({"target": f"c/d >= {lo_d} ({where})", "value": r["c/d"], "pass": r["c/d"] >= lo_d})
    for m in mem:
        if m["variant"] == "c":
            tol = TARGETS["memory_flat_tolerance"]
            checks.append({"target": f"peak memory of c flat within {tol:.0%} from {m['from_images']} to "
                                     f"{m['to_images']} images ({m['model']})",
                           "value": m["growth"], "pass": abs(m["growth"]) <= tol})
    return checks


def _fmt(v, nd=2):
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def write_markdown(res: dict, path: Path) -> None:
    """RESULTS.md: machine, method, throughput, ratios, memory curve, targets, before/after."""
    m = res["machine"]
    L = ["# probe benchmark results", "",
         f"Written by `python bench/run.py {' '.join(res['argv'])}` on {res['date']} "
         f"(wall time {res['wall_s'] / 60:.1f} min).", "",
         "## Machine", "",
         f"- CPU: {m['cpu']}, {m['logical_cpus']} logical CPUs ({m['cpus_available']} available), "
         f"{m['memory_total_gb']} GiB RAM",
         f"- torch {m['torch']} ({res['config']['threads_used']} threads), timm {m['timm']}, "
         f"numpy {m['numpy']}, Python {m['python']}",
         f"- device: {res['config']['device']}{' + bf16 autocast' if res['config']['amp'] else ''}"
         + (f" ({m['gpu']})" if m.get("gpu") else ""),
         f"- load average (1, 5, 15 min) at start {_fmt_load(m.get('load_average_start'))}, "
         f"at end {_fmt_load(m.get('load_average_end'))}",
         ""]
    for note in res["notes"]:
        L.append(f"- {note}")
    L += ["", "Workloads:", ""]
    for k, v in variants.VARIANTS.items():
        L.append(f"- **{k}**: {v}")
    L += ["", "## Throughput (median of interleaved repeats) and peak memory", "",
          "images/s from the median wall time; best = from the fastest repeat; CPU s = process CPU "
          "time of each repeat; others' load = share of all CPUs busy with other processes just "
          "before each repeat (the harness waits up to --quiet-wait s for it to fall under 15 %).", "",
          "| model | batch | images | workload | images/s | best | wall s (repeats) | CPU s (repeats) | others' load before | peak RSS MiB | RSS before MiB | CUDA peak MiB |",
          "|---|---:|---:|---|---:|---:|---|---|---|---:|---:|---:|"]
    for r in res["throughput"]:
        L.append(f"| {r['model']} | {r['batch_size']} | {r['num_images']} | {r['variant']} | "
                 f"{r['images_per_s']:.2f} | {r.get('images_per_s_best', float('nan')):.2f} | "
                 f"{', '.join(f'{t:.2f}' for t in r['times_s'])} | {', '.join(f'{t:.2f}' for t in r.get('cpu_s', []))} | "
                 f"{', '.join(f'{t:.0%}' for t in r.get('others_busy_before', [])) or '—'} | "
                 f"{r['peak_rss_mb']:.0f} | {r['rss_before_mb']:.0f} | {_fmt(r.get('cuda_peak_mb'), 0)} |")
    L += ["", "## Ratios of throughput (images/s of one workload divided by that of another)", "",
          "c includes a fixed cost per analysis (Δ/α fits, conv-likeness test and its random-init null: "
          "`fixed s` = median c − median s on the same images); its c/b at more images is projected "
          "from the measured per-image times, and `c/b ≥ 0.8 from` is the image count where it "
          "reaches the target. d computes the statistics s computes (distance, entropy, prefix mass, "
          "phi, mean maps, bootstrap), not c's fits and test: s/d is the like-for-like ratio, c/d "
          "charges probe for work d does not do.", "",
          "| model | batch | c/a | c/b | c/d | s/a | s/b | s/d | fixed s | c/b at 1024 (proj.) | c/b ≥ 0.8 from |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["ratios"]:
        proj = (r.get("c_over_b_at_n") or {}).get("1024")
        L.append(f"| {r['model']} | {r['batch_size']} | {_fmt(r.get('c/a'))} | {_fmt(r.get('c/b'))} | "
                 f"{_fmt(r.get('c/d'))} | {_fmt(r.get('s/a'))} | {_fmt(r.get('s/b'))} | {_fmt(r.get('s/d'))} | "
                 f"{_fmt(r.get('fixed_s'))} | {_fmt(proj)} | {_fmt(r.get('break_even_images'))} |")
    if res.get("best_ratios"):
        L += ["", "The same ratios from each workload's fastest repeat (other tenants of a shared host can "
              "only slow a repeat down; the targets below are checked on the medians):", "",
              "| model | batch | c/a | c/b | c/d | s/b | s/d |", "|---|---:|---:|---:|---:|---:|---:|"]
        for r in res["best_ratios"]:
            L.append(f"| {r['model']} | {r['batch_size']} | {_fmt(r.get('c/a'))} | {_fmt(r.get('c/b'))} | "
                     f"{_fmt(r.get('c/d'))} | {_fmt(r.get('s/b'))} | {_fmt(r.get('s/d'))} |")
    if any("s/s0" in r for r in res["ratios"]):
        L += ["", "Before / after the hot-path work, in this run (s0 = streaming analysis with the reducer "
              f"of commit {res['config'].get('before_ref')}, s = now; interleaved, same images):", "",
              "| model | batch | s0/b before | s/b after | s0/d before | s/d after | speed-up s/s0 |",
              "|---|---:|---:|---:|---:|---:|---:|"]
        for r in res["ratios"]:
            if "s/s0" in r:
                L.append(f"| {r['model']} | {r['batch_size']} | {_fmt(r.get('s0/b'))} | {_fmt(r.get('s/b'))} | "
                         f"{_fmt(r.get('s0/d'))} | {_fmt(r.get('s/d'))} | {_fmt(r.get('s/s0'))} |")
    if res.get("agreement"):
        L += ["", "Agreement of c and d on the same images (largest |c − d| over heads; they compute "
              "the same statistics, c streaming in float32/float64, d in NumPy afterwards):", "",
              "| model | batch | mean distance px | entropy nats | prefix mass |", "|---|---:|---:|---:|---:|"]
        for r in res["agreement"]:
            L.append(f"| {r['model']} | {r['batch_size']} | {r['max_abs_diff_mean_distance_px']:.2e} | "
                     f"{r['max_abs_diff_entropy_nats']:.2e} | {r['max_abs_diff_prefix_mass']:.2e} |")
    if res["memory_curve"]:
        L += ["", f"## Memory curve (batch {res['config']['memory_batch_size']}, images streamed from a pool of "
              f"{res['config']['pool']} pre-transformed photos; one fresh process per point)", "",
              ("glibc returns freed memory at once in these workers (`MALLOC_MMAP_THRESHOLD_=131072`, all "
               "workloads alike), so the peak is that of live memory." if res["config"].get("curve_malloc") == "mmap"
               else "Default glibc allocation policy: peaks include freed heap glibc keeps."), "",
              "| model | workload | images | peak RSS MiB | setup RSS MiB | images/s (single run) |",
              "|---|---|---:|---:|---:|---:|"]
        for r in res["memory_curve"]:
            if "skipped" in r:
                L.append(f"| {r['model']} | {r['variant']} | {r['num_images']} | skipped: {r['skipped']} | | |")
            else:
                L.append(f"| {r['model']} | {r['variant']} | {r['num_images']} | {r['peak_rss_mb']:.0f} | "
                         f"{r['setup_rss_mb']:.0f} | {r['images_per_s']:.2f} |")
        if res.get("memory_ratios"):
            L += ["", "Throughput ratios of these single runs (fixed costs included):", "",
                  "| model | images | c/b | c/d |", "|---|---:|---:|---:|"]
            for r in res["memory_ratios"]:
                L.append(f"| {r['model']} | {r['num_images']} | {_fmt(r.get('c/b'))} | {_fmt(r.get('c/d'))} |")
        L += ["", "| model | workload | peak at first → last point MiB | growth | MiB per extra image |",
              "|---|---|---|---:|---:|"]
        for r in res["memory_summary"]:
            L.append(f"| {r['model']} | {r['variant']} | {r['peak_from_mb']:.0f} ({r['from_images']}) → "
                     f"{r['peak_to_mb']:.0f} ({r['to_images']}) | {r['growth']:+.1%} | {r['mb_per_image']:.2f} |")
    L += ["", "## Targets", "", "| target | measured | pass |", "|---|---:|---|"]
    for c in res["targets"]:
        L.append(f"| {c['target']} | {_fmt(c['value'], 3)} | {'yes' if c['pass'] else '**no**'} |")
    if res.get("baseline"):
        b = res["baseline"]
        L += ["", f"## Before / after ({b['label']} → {res['label']})", "",
              f"Baseline: `{b['path']}` ({b['date']}, load at start {_fmt_load(b['load_average_start'])}). "
              "Compared: the streaming analysis (workload s; a baseline without an s workload timed "
              "probe.analyze when it had no fits, i.e. the same work, as its c), as ratios to the "
              "forward pass b and the naive baseline d of the same run, because absolute speed on a "
              "shared machine varies between runs.", "",
              "| model | batch | images/s before | images/s after | ratio to b before | after | "
              "ratio to d before | after |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]

        def stream(rows, model, bs):
            sel = {t["variant"]: t["images_per_s"] for t in rows if t["model"] == model and t["batch_size"] == bs}
            v = "s" if "s" in sel else "c"
            if v not in sel:
                return None, None, None
            return (sel[v], sel[v] / sel["b"] if "b" in sel else None, sel[v] / sel["d"] if "d" in sel else None)

        for r in res["ratios"]:
            old = stream(b["throughput"], r["model"], r["batch_size"])
            new = stream(res["throughput"], r["model"], r["batch_size"])
            if old[0] is None or new[0] is None:
                continue
            L.append(f"| {r['model']} | {r['batch_size']} | {_fmt(old[0])} | {_fmt(new[0])} | {_fmt(old[1])} | "
                     f"{_fmt(new[1])} | {_fmt(old[2])} | {_fmt(new[2])} |")
    if res.get("extra_markdown"):
        L += ["", res["extra_markdown"]]
    path.write_text("\n".join(L) + "\n")


def _fmt_load(v):
    return "—" if not v else ", ".join(f"{x:.2f}" for x in v)


# ------------------------------------------------------------------------------------------ main
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="deit_tiny,vit_small",
                    help="comma-separated probe model names (DeiT-Tiny uses ../shared weights, others random)")
    ap.add_argument("--batch-sizes", default="1,16,64")
    ap.add_argument("--images", type=int, default=None,
                    help="images per timed repeat (default: see auto_images: 128 or 256 DeiT-Tiny images, half for ViT-S)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per workload (median reported)")
    ap.add_argument("--variants", default="a,b,s,c,d", help="workloads to time (see bench/variants.py; s0 comes with --before-ref)")
    ap.add_argument("--memory-curve", default="64,256,1024", help="image counts of the memory curve ('' to skip)")
    ap.add_argument("--memory-models", default="deit_tiny")
    ap.add_argument("--memory-variants", default="b,c,d", help="workloads of the memory curve")
    ap.add_argument("--memory-batch-size", type=int, default=64)
    ap.add_argument("--pool", type=int, default=64, help="pre-transformed photos the memory curve streams from")
    ap.add_argument("--curve-malloc", choices=("mmap", "default"), default="mmap",
                    help="glibc allocation policy of the memory-curve workers (see curve_env)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA (ignored on CPU)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: torch's)")
    ap.add_argument("--quiet-wait", type=float, default=10.0,
                    help="before each timed repeat wait up to this many seconds for other processes to "
                         "use under 15%% of the CPUs (0: never wait); the load seen is recorded")
    ap.add_argument("--image-dir", type=Path, default=DEFAULT_IMAGE_DIR)
    ap.add_argument("--synthetic", action="store_true", help="random images instead of photos")
    ap.add_argument("--quick", action="store_true",
                    help="DeiT-Tiny only, batch 1 and 16, 64 images, memory curve 64,256 (a few minutes)")
    ap.add_argument("--before-ref", default=None,
                    help="git commit whose probe/analyses/reducers.py is timed as workload s0 in the same "
                         "run (before/after of the reducer), e.g. cecb843")
    ap.add_argument("--label", default="current", help="name of this run in before/after tables")
    ap.add_argument("--baseline", type=Path, default=None, help="an earlier results.json to compare with")
    ap.add_argument("--extra-markdown", type=Path, default=None, help="a markdown file appended to RESULTS.md")
    ap.add_argument("--out", type=Path, default=HERE / "results.json")
    ap.add_argument("--md", type=Path, default=HERE / "RESULTS.md")
    args = ap.parse_args(argv)
    if args.quick:
        args.models, args.batch_sizes, args.memory_curve = "deit_tiny", "1,16", "64,256"
        args.images = args.images or 64
    if args.device != "cpu":
        from probe.pipeline import resolve_device

        resolve_device(args.device)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    models = [m for m in args.models.split(",") if m]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    names = [v for v in args.variants.split(",") if v]
    curve = [int(n) for n in args.memory_curve.split(",") if n]
    mem_models = [m for m in args.memory_models.split(",") if m] if curve else []
    mem_names = [v for v in args.memory_variants.split(",") if v]
    image_dir = None if args.synthetic else args.image_dir
    notes = []
    if image_dir is not None and not image_dir.is_dir():
        raise SystemExit(f"image folder {image_dir} not found: pass --image-dir DIR or --synthetic")
    notes.append("images: " + ("seeded random tensors (--synthetic)" if image_dir is None else
                               f"photos of {image_dir.name} in sorted order, cycled past {len(list(image_dir.iterdir()))}")
                 + "; decoded and transformed once per model before timing (decoding is not timed)")
    notes.append("DeiT-Tiny uses the shared ImageNet weights when present, other models random weights "
                 "(timing does not depend on the weights)")
    malloc_env = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    if malloc_env:
        notes.append("glibc allocation policy of every worker set by the environment: "
                     + ", ".join(f"`{k}={v}`" for k, v in sorted(malloc_env.items())))
    if args.device == "cpu":
        notes.append("GPU: not measured in this run (--device cpu); run with --device cuda [--amp] on a GPU")
    res: dict[str, Any] = {
        "argv": sys.argv[1:] if argv is None else list(argv),
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "label": args.label,
        "machine": machine_description(args.device),
        "config": {
            "models": models, "batch_sizes": batch_sizes, "variants": names, "repeats": args.repeats,
            "memory_curve": curve, "memory_models": mem_models, "memory_variants": mem_names,
            "memory_batch_size": args.memory_batch_size, "pool": args.pool, "curve_malloc": args.curve_malloc,
            "device": args.device,
            "amp": args.amp, "threads_used": args.threads or torch.get_num_threads(),
            "quiet_wait_s": args.quiet_wait, "before_ref": args.before_ref,
        },
        "notes": notes,
        "throughput": [],
        "memory_curve": [],
    }
    with tempfile.TemporaryDirectory(prefix="probe-bench-") as tmpd:
        tmp = Path(tmpd)
        args.before_reducer = None
        if args.before_ref:
            args.before_reducer = extract_reducer(args.before_ref, tmp)
            if args.before_reducer is None:
                notes.append(f"--before-ref {args.before_ref}: could not read its reducer from git; s0 skipped")
                names = [v for v in names if v != "s0"]
            else:
                if "s0" not in names:
                    names.insert(names.index("s") + 1 if "s" in names else len(names), "s0")
                notes.append(f"s0 = s with probe/analyses/reducers.py of commit {args.before_ref} "
                             "(before the hot-path work), interleaved with the other workloads")
        else:
            names = [v for v in names if v != "s0"]
        res["config"]["variants"] = names
        for model in models:
            configs = []
            for bs in batch_sizes:
                n = args.images or auto_images(model, bs)
                configs.append((bs, int(-(-n // bs) * bs)))
            path = prepare_images(model, max(n for _, n in configs), image_dir, tmp)
            res["throughput"].extend(measure_throughput(model, configs, names, args, path))
        for model in mem_models:
            pool = prepare_images(model, args.pool, image_dir, tmp)
            res["memory_curve"].extend(measure_memory(model, curve, mem_names, args, pool, model_shape(model)))
    res["machine"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    res["ratios"] = ratios(res["throughput"])
    res["best_ratios"] = best_ratios(res["throughput"])
    res["agreement"] = agreement(res["throughput"])
    res["memory_summary"] = memory_summary(res["memory_curve"])
    res["memory_ratios"] = memory_ratios(res["memory_curve"])
    res["targets"] = check_targets(res["ratios"], res["memory_summary"], res["memory_ratios"], args.device)
    res["wall_s"] = round(time.perf_counter() - t_start, 1)
    if args.baseline is not None:
        b = json.loads(args.baseline.read_text())
        res["baseline"] = {"path": str(args.baseline), "label": b.get("label"), "date": b.get("date"),
                           "load_average_start": b["machine"].get("load_average_start"),
                           "ratios": b["ratios"], "throughput": [
                               {k: t[k] for k in ("model", "batch_size", "variant", "images_per_s", "peak_rss_mb")}
                               for t in b["throughput"]]}
    if args.extra_markdown is not None:
        res["extra_markdown"] = args.extra_markdown.read_text()
    for r in res["throughput"]:
        r.pop("summary", None)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    write_markdown(res, args.md)
    log(f"wrote {args.out} and {args.md} in {res['wall_s'] / 60:.1f} min")
    for r in res["ratios"]:
        log(f"  {r['model']} batch {r['batch_size']}: " + ", ".join(f"{k} {v:.2f}" for k, v in r.items() if "/" in k))
    return 0


if __name__ == "__main__":
    sys.exit(main())
