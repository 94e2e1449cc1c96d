"""The conv test's verdicts under the first ("lattice") and the revised ("taps") calibration.

Models: the shipped attention-only model (Cordonnier et al. 2020 setting) on the embedded default
views; DeiT-Tiny (``../shared`` weights) on two disjoint sets of 64 ImageNet photos; random-init
copies (DeiT-Tiny's and the shipped model's architectures); the planted Theorem-1 ViT
(:func:`probe.conv_equivalence.conv_equivalent_vit`, 3 conv layers then uniform layers).

    python bench/calibration.py [--out bench/calibration.json --md bench/RESULTS-calibration.md]

Writes per model and calibration the per-layer verdict, score, distinct taps, lattice score,
Holm p of the lattice alignment and the verdict stability (fraction of uncertainty replicates
with the same verdict).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import probe
from probe.analyses.convlike import ConvLikeConfig

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
CODES = {"conv-like": "C", "borderline": "B", "local but not grid": "L", "non-local": "N"}
COLUMNS = ["layer", "conv_verdict", "conv_verdict_stability", "conv_like_fraction", "conv_score", "conv_n_local",
           "conv_n_taps", "conv_score_taps", "conv_score_lattice", "conv_p_holm"]


def run_one(label: str, model, images, calibration: str, **kw) -> dict:
    t0 = time.perf_counter()
    cfg = ConvLikeConfig(calibration=calibration)
    res = probe.analyze(model, images, attribution="none", conv_config=cfg, null_layers="all", **kw)
    rows = res.layers[COLUMNS].to_dict(orient="records")
    verdicts = "".join(CODES[r["conv_verdict"]] for r in rows)
    cl = res.extras["convlike"]
    return {"model": label, "calibration": calibration, "verdicts": verdicts,
            "deepest_conv_layer": cl.deepest_conv_layer, "layers": rows,
            "weights": res.meta["weights"], "images": res.meta["images"], "num_images": res.meta["num_images"],
            "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "calibration.json"))
    ap.add_argument("--md", default=str(ROOT / "bench" / "RESULTS-calibration.md"))
    ap.add_argument("--num-images", type=int, default=64)
    args = ap.parse_args()
    from probe.conv_equivalence import conv_equivalent_vit

    jobs = [("shipped model (Cordonnier setting)", None, None, {}),
            ("shipped architecture, random init (seed 1)", None, None, {"random_init": True, "seed": 1})]
    deit = SHARED / "weights" / "deit_tiny_patch16_224.safetensors"
    photos = sorted((SHARED / "imagenet-sample").glob("*.JPEG"))
    if deit.is_file() and len(photos) >= 2 * args.num_images:
        order = np.random.default_rng(7).permutation(len(photos))
        n = args.num_images
        for i, name in enumerate(("A", "B")):
            subset = [photos[j] for j in order[i * n:(i + 1) * n]]
            jobs.append((f"DeiT-Tiny, photo set {name}", "deit_tiny", subset, {"weights": deit}))
        jobs.append(("DeiT-Tiny architecture, random init (seed 1)", "deit_tiny", [photos[j] for j in order[:16]],
                     {"random_init": True, "seed": 1}))
    else:
        print(f"skipping DeiT-Tiny: {deit} or the ImageNet sample is absent")
    jobs.append(("planted Theorem-1 ViT (layers 0-2 conv)", conv_equivalent_vit(depth=6, conv_layers=3),
                 None, {"null_seeds": 0}))
    out = []
    for label, model, images, kw in jobs:
        for calibration in ("lattice", "taps"):
            r = run_one(label, model, images, calibration, num_images=args.num_images, **kw)
            print(f"{label:50s} {calibration:8s} {r['verdicts']}  ({r['seconds']} s)", flush=True)
            out.append(r)
    Path(args.out).write_text(json.dumps(out, indent=1, default=float))
    lines = ["# Conv-test verdicts: first (lattice) and revised (taps) calibration", "",
             "Written by `python bench/calibration.py`. One letter per layer, layer 0 first: C conv-like, "
             "B borderline (the verdict is reproduced by fewer than 80 % of the uncertainty replicates), "
             "L local but not grid, N non-local.", "",
             "| model | lattice (first) | taps (revised) | deepest conv layer, lattice / taps |",
             "| --- | --- | --- | --- |"]
    by = {}
    for r in out:
        by.setdefault(r["model"], {})[r["calibration"]] = r
    for label, d in by.items():
        lat, tap = d["lattice"], d["taps"]
        lines.append(f"| {label} | `{lat['verdicts']}` | `{tap['verdicts']}` | "
                     f"{lat['deepest_conv_layer']} / {tap['deepest_conv_layer']} |")
    lines += ["", "Per layer (taps calibration): verdict, stability, distinct taps / local heads, lattice score, "
              "Holm p of the lattice alignment.", ""]
    for label, d in by.items():
        lines.append(f"**{label}** ({d['taps']['num_images']} images; {d['taps']['images']})")
        lines.append("")
        lines.append("| layer | verdict (taps) | stability | taps / local | S taps | verdict (lattice) | stability | S lattice | p Holm |")
        lines.append("| ---: | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |")
        for a, b in zip(d["taps"]["layers"], d["lattice"]["layers"]):
            lines.append(f"| {a['layer']} | {a['conv_verdict']} | {a['conv_verdict_stability']:.2f} | "
                         f"{a['conv_n_taps']} / {a['conv_n_local']} | {a['conv_score_taps']:.3f} | {b['conv_verdict']} | "
                         f"{b['conv_verdict_stability']:.2f} | {b['conv_score_lattice']:.3f} | {b['conv_p_holm']:.4f} |")
        lines.append("")
    Path(args.md).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
