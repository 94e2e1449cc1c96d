"""Pack the CIFAR-10 JPEG folders of ../shared/data into two .npz files (encoded bytes, offsets,
labels, class names) under .devdata/ (ignored by git), so that they travel to a lent GPU machine
within its 64 MiB limit; probe.cordonnier.train_cuda.decode_packed reads them there."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def pack(src: Path, dst: Path) -> int:
    """Pack ``src/<class>/<image>`` into ``dst`` (.npz); returns the number of images."""
    classes = sorted(p.name for p in src.iterdir() if p.is_dir())
    blobs, offs, labels = [], [0], []
    for i, c in enumerate(classes):
        for f in sorted((src / c).iterdir()):
            b = f.read_bytes()
            blobs.append(b)
            offs.append(offs[-1] + len(b))
            labels.append(i)
    np.savez(dst, data=np.frombuffer(b"".join(blobs), np.uint8), offsets=np.array(offs, np.int64),
             labels=np.array(labels, np.int64), classes=np.array(classes))
    return len(labels)


if __name__ == "__main__":
    shared = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT.parent / "shared" / "data"
    out = ROOT / ".devdata"
    out.mkdir(exist_ok=True)
    for name in ("cifar10-train", "cifar10-test"):
        print(name, pack(shared / name, out / f"{name}.npz"))
