"""Cost of the default ``probe analyze`` against a plain forward pass (issue 13, item 11).

    python bench/default_run.py [--images ../shared/data/imagenet-sample] [--num-images 64] [--repeats 2]

Times, each as a fresh process (so imports, model load and image decoding count, as for a user):

* ``plain``: ``import timm``, build DeiT-Tiny, load its safetensors weights, decode and transform
  the same N images probe would pick (``probe.data.collect_images``), one no-grad forward pass over
  them in batches of 16 (timm's fused attention);
* ``probe analyze`` on the same images with the default options, and with the attribution
  variants ``--attribution ig`` at 16 images (the old default), ``ig`` with ``--attribution-images 4
  --ig-steps 8`` and ``none``.

Writes ``bench/results-default-run.json`` and ``bench/RESULTS-default-run.md``: median wall time of
``--repeats`` runs and the ratio to ``plain``. The target of the issue: default run ≤ 3× plain.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
WEIGHTS = SHARED / "weights" / "deit_tiny_patch16_224.safetensors"

PLAIN = r"""
import sys, torch, timm
from safetensors.torch import load_file
from probe.data import collect_images, eval_transform, iter_batches
images, n = sys.argv[1], int(sys.argv[2])
net = timm.create_model("deit_tiny_patch16_224", pretrained=False)
net.load_state_dict(load_file(sys.argv[3]))
net.eval()
transform, cfg = eval_transform(net, None)
image_set = collect_images(images, n, 0, input_side=224)
with torch.no_grad():
    for batch, _ in iter_batches(image_set, transform, 16, "RGB"):
        net(batch)
"""


def _time(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", default=str(SHARED / "imagenet-sample"))
    ap.add_argument("--num-images", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (both sides run on it)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results-default-run.json"))
    ap.add_argument("--md", default=str(ROOT / "bench" / "RESULTS-default-run.md"))
    args = ap.parse_args()
    if not WEIGHTS.exists():
        sys.exit(f"{WEIGHTS} not found: this benchmark needs ../shared/data")
    n = str(args.num_images)
    base = [sys.executable, "-m", "probe", "analyze", "--model", "deit_tiny", "--weights", str(WEIGHTS),
            "--images", args.images, "--num-images", n, "--device", args.device]
    plain = [sys.executable, "-c", PLAIN.replace('net.eval()', f'net.eval().to("{args.device}")')
             .replace("net(batch)", f'net(batch.to("{args.device}"))'), args.images, n, str(WEIGHTS)]
    variants = {
        "plain forward (load + decode + forward)": None,
        "probe analyze (default options)": [],
        "--attribution ig (16 images, 16 steps: the old default)": ["--attribution", "ig"],
        "--attribution ig --attribution-images 4 --ig-steps 8": ["--attribution", "ig",
                                                                   "--attribution-images", "4", "--ig-steps", "8"],
        "--attribution none": ["--attribution", "none"],
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):  # interleaved, so a busy machine slows every variant alike
            for i, (name, extra) in enumerate(variants.items()):
                cmd = plain if extra is None else base + extra + ["--out", os.path.join(tmp, f"r{r}-{i}")]
                if extra is not None and "--ig-steps" in extra and "--ig-steps" not in _help():
                    continue
                times[name].append(_time(cmd))
    med = {k: statistics.median(v) for k, v in times.items() if v}
    ref = med["plain forward (load + decode + forward)"]
    rows = [{"variant": k, "median_s": round(v, 2), "ratio_to_plain": round(v / ref, 2), "runs": times[k]}
            for k, v in med.items()]
    info = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "device": args.device, "num_images": args.num_images, "repeats": args.repeats, "rows": rows}
    Path(args.out).write_text(json.dumps(info, indent=1))
    lines = [f"# Default run against a plain forward pass ({info['date']}, {info['machine']}, {args.device})", "",
             f"DeiT-Tiny, {n} images of `{args.images}`, each variant a fresh process (imports, model load, "
             f"decoding included), median of {args.repeats} interleaved runs. Target: default ≤ 3× plain.", "",
             "| variant | median (s) | × plain |", "| --- | ---: | ---: |"]
    lines += [f"| {r['variant']} | {r['median_s']:.1f} | {r['ratio_to_plain']:.2f} |" for r in rows]
    Path(args.md).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _help() -> str:
    return subprocess.run([sys.executable, "-m", "probe", "analyze", "--help"], capture_output=True, text=True,
                          cwd=ROOT).stdout


if __name__ == "__main__":
    main()
