"""The conv test's verdicts (the grid test of issue 21) on the models of the README's verdict table.

Models: the shipped attention-only model (Cordonnier et al. 2020 setting) on the embedded default
views; DeiT-Tiny (``../shared`` weights) on two disjoint sets of 64 ImageNet photos; random-init
copies (DeiT-Tiny's and the shipped model's architectures); the planted Theorem-1 ViT
(:func:`probe.conv_equivalence.conv_equivalent_vit`, 3 conv layers then uniform layers).

    python bench/calibration.py [--out bench/calibration.json --md bench/RESULTS-calibration.md]

Also the previous shipped model (20 epochs, Δ/α at a constant 20x learning rate;
``data/cordonnier-quadratic/model-20epochs.safetensors``). Writes per model the per-layer verdict,
dilation, grid score, p-value, local heads, distinct taps and the verdict stability (fraction of
uncertainty replicates with the same verdict; "deterministic" for position-only attention).
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
CODES = {"conv-like": "C", "borderline": "B", "local but not grid": "L", "non-local": "N", "not tested": "-"}
COLUMNS = ["layer", "conv_verdict", "conv_dilation", "conv_verdict_stability", "conv_deterministic",
           "conv_like_fraction", "conv_score", "conv_p_value", "conv_n_local", "conv_n_taps"]


def run_one(label: str, model, images, calibration: str = "grid", **kw) -> dict:
    t0 = time.perf_counter()
    cfg = ConvLikeConfig()
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

    from probe.cordonnier import CordonnierViT

    def previous_shipped():
        from safetensors.torch import load_file

        net = CordonnierViT()
        net.load_state_dict(load_file(str(ROOT / "data" / "cordonnier-quadratic" / "model-20epochs.safetensors")))
        return net.eval()

    jobs = [("shipped model (100 epochs, Δ/α on the cosine schedule)", None, None, {}),
            ("previous shipped model (20 epochs, Δ/α lr held at 2.0)", previous_shipped(), None, {}),
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
        r = run_one(label, model, images, num_images=args.num_images, **kw)
        print(f"{label:58s} {r['verdicts']}  ({r['seconds']} s)", flush=True)
        out.append(r)
    Path(args.out).write_text(json.dumps(out, indent=1, default=float))
    lines = ["# Conv-test verdicts on the README's models (the grid test, issue 21)", "",
             "Written by `python bench/calibration.py`. One letter per layer, layer 0 first: C conv-like, "
             "B borderline (the verdict is reproduced by fewer than 80 % of the uncertainty replicates), "
             "L local but not grid, N non-local. Size and power of the test: `RESULTS-convtest.md`.", "",
             "| model | verdicts | conv-like layers | deterministic |", "| --- | --- | --- | --- |"]
    for r in out:
        det = all(bool(l["conv_deterministic"]) for l in r["layers"])
        like = [l["layer"] for l in r["layers"] if l["conv_verdict"] == "conv-like"]
        lines.append(f"| {r['model']} | `{r['verdicts']}` | {like or 'none'} | {'yes' if det else 'no'} |")
    lines += ["", "Per layer: verdict, dilation, grid score S, p (Bonferroni over dilations 1 and 2), local heads, "
              "distinct taps (descriptive), stability.", ""]
    for r in out:
        lines.append(f"**{r['model']}** ({r['num_images']} images; {r['images']})")
        lines.append("")
        lines.append("| layer | verdict | dilation | S | p | local heads | distinct taps | stability |")
        lines.append("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for a in r["layers"]:
            stab = "deterministic" if a["conv_deterministic"] else (
                "—" if a["conv_verdict_stability"] != a["conv_verdict_stability"] else f"{a['conv_verdict_stability']:.2f}")
            lines.append(f"| {a['layer']} | {a['conv_verdict']} | {a['conv_dilation']} | {a['conv_score']:.3f} | "
                         f"{a['conv_p_value']:.4f} | {a['conv_n_local']} | {a['conv_n_taps']} | {stab} |")
        lines.append("")
    Path(args.md).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
