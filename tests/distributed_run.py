"""One rank of the distributed tests (``tests/test_distributed.py``), as a script.

Started by ``torchrun`` or by the test's own two-process launcher (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT`` set), it runs ``probe.analyze(..., distributed=True)`` on a tiny
timm ViT whose attention depends strongly on the image (:func:`sharp_vit`; unlike the embedded
model's, which is position-only) with tensor images of varied structure (:func:`images`), and
prints one line ``OUTCOME ...``. Rank 0 writes ``heads.csv``, ``layers.csv`` and ``meta.json`` to
the output folder; the other ranks write nothing.

Usage: ``distributed_run.py MODE OUT`` with MODE

* ``ok``: every rank the same arguments;
* ``bad-argument``: rank 1 passes ``batch_size=0`` (an error before any work);
* ``disagree``: rank 1 sees one image more than rank 0;
* ``capture-error``: a registered analysis whose reducer raises during rank 1's capture.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import probe  # noqa: E402
import probe.distributed  # noqa: E402
from probe.analyses.base import Analysis, register_analysis  # noqa: E402

#: An odd number of images in batches of 4: 8 batches, shards of 16 and 13 images on 2 ranks.
IMAGES = 29
BATCH = 4
#: distance modes and NMI have streaming reducers of their own; sinks reads the first 32 images,
#: more than rank 0's shard, so rank 0 completes them from rank 1.
ANALYSES = ("distance_modes", "nmi", "sinks")


def sharp_vit():
    """A timm ViT (32x32 input, 4x4 patches: 8x8 grid and a class token; 3 blocks of 3 heads),
    seeded, with its query/key/value weights scaled by 30 so that attention is far from uniform
    and varies from image to image (per-image spread of the mean distance 5-8 % of its mean, as
    for a trained model; at timm's initialisation it is 0.02 %, and the standard errors would be
    ill-conditioned, see probe.distributed)."""
    import timm

    torch.manual_seed(0)
    net = timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=4, embed_dim=48, depth=3,
                                                           num_heads=3, num_classes=5).eval()
    with torch.no_grad():
        for block in net.blocks:
            block.attn.qkv.weight.mul_(30.0)
    net.pretrained_cfg = dict(input_size=(3, 32, 32), crop_pct=1.0, mean=(0.5,) * 3, std=(0.5,) * 3,
                              interpolation="bicubic")
    return net


def images(n: int = IMAGES) -> torch.Tensor:
    """``n`` seeded images ``(n, 3, 32, 32)``: Gaussian noise blurred with a random width
    (0.3-3.3 px) and scaled to a random contrast (0.2-2.2), so that images differ in structure."""
    g = torch.Generator().manual_seed(0)
    out = []
    taps = torch.arange(-7, 8, dtype=torch.float32)
    for _ in range(n):
        x = torch.randn(1, 3, 32, 32, generator=g)
        width = 0.3 + 3.0 * torch.rand(1, generator=g).item()
        k = torch.exp(-taps ** 2 / (2 * width ** 2))
        k = k / k.sum()
        x = F.conv2d(F.pad(x, (7, 7, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
        x = F.conv2d(F.pad(x, (0, 0, 7, 7), mode="reflect"), k.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)
        out.append(x / x.std() * (0.2 + 2.0 * torch.rand(1, generator=g).item()))
    return torch.cat(out)


def run(distributed, n_images: int = IMAGES, batch_size: int = BATCH, extra: tuple[str, ...] = ()):
    """The analysis every mode runs (the test runs it in one process with ``distributed=False``)."""
    return probe.analyze(sharp_vit(), images(n_images), batch_size=batch_size, n_bootstrap=20, progress=False,
                         analyses=list(ANALYSES + extra), distributed=distributed)


class _Raises:
    """A reducer that fails on its first batch."""

    def update(self, attn):
        raise RuntimeError("planted failure in the capture of rank 1")

    def result(self):
        return None

    def state(self):
        return None

    def load_state(self, state):
        pass


class _Quiet(_Raises):
    def update(self, attn):
        pass


def _register_failing() -> None:
    """Register ``fails_on_rank_one`` (only in the script, so importing this module from the
    test leaves the registry alone)."""

    @register_analysis
    class FailsOnRankOne(Analysis):
        """Streams attention; its reducer raises on rank 1 only."""

        name = "fails_on_rank_one"
        consumes = ("attention",)

        def reducer(self, layer, geometry, ctx):
            return _Raises() if os.environ.get("RANK") == "1" else _Quiet()

        def run(self, ctx):
            pass


def main() -> int:
    mode, out = sys.argv[1], Path(sys.argv[2])
    rank = int(os.environ["RANK"])
    n, b, extra = IMAGES, BATCH, ()
    if mode == "bad-argument" and rank == 1:
        b = 0
    elif mode == "disagree" and rank == 1:
        n = IMAGES + 1
    elif mode == "capture-error":
        _register_failing()
        extra = ("fails_on_rank_one",)
    try:
        res = run(True, n, b, extra)
    except Exception as e:  # noqa: BLE001 - the test reads the outcome
        print(f"OUTCOME {type(e).__name__}: {' '.join(str(e).split())}", flush=True)
        return 3
    finally:
        probe.distributed.shutdown()  # as the CLI does: no process group left to the interpreter's exit
    if res is None:
        print("OUTCOME none", flush=True)
        return 0
    out.mkdir(parents=True, exist_ok=True)
    res.heads.to_csv(out / "heads.csv", index=False)
    res.layers.to_csv(out / "layers.csv", index=False)
    meta = {k: res.meta[k] for k in ("num_images", "image_names", "distributed", "analyses")}
    meta["sinks_images"] = res.extras["sinks"]["n_images"]
    (out / "meta.json").write_text(json.dumps(meta))
    print("OUTCOME result", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
