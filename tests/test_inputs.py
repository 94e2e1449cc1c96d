"""Input pipelines: decoding workers (same batches, order and skipped files whatever the number of
workers; the reserve refill), WebDataset tar shards and Hugging Face datasets / arrow / parquet
written by the tests, offline; memory flat in the number of images."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import probe
import probe.data as data
from probe.data import collect_images, default_workers, iter_batches, workers_default
from probe.errors import ProbeError
from probe.sources import expand_braces

from conftest import tiny_vit

SMALL = {"input_size": (3, 32, 32)}


def to_tensor(im: Image.Image) -> torch.Tensor:
    """A transform with an exact inverse: uint8 pixels as float (C, H, W)."""
    return torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).permute(2, 0, 1)


def _pictures(n: int, size=(12, 10), seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def folder(tmp_path):
    """23 PNGs, of which 3 (im03, im11, im17) are not images."""
    pics = _pictures(23)
    for i, im in enumerate(pics):
        path = tmp_path / "imgs" / f"im{i:02d}.png"
        path.parent.mkdir(exist_ok=True)
        if i in (3, 11, 17):
            path.write_bytes(b"not an image")
        else:
            im.save(path)
    return tmp_path / "imgs", pics


def _drain(image_set, batch_size, workers):
    batches, names = [], []
    for b, n in iter_batches(image_set, to_tensor, batch_size, workers=workers):
        batches.append(b)
        names.append(list(n))
    return batches, names


# -- workers -----------------------------------------------------------------------------------


def test_workers_give_the_same_batches_order_and_skipped_files(folder):
    root, pics = folder
    runs = []
    for w in (0, 1, 2):
        s = collect_images(root, 15, seed=4)
        with pytest.warns(UserWarning, match="skipping unreadable image"):
            batches, names = _drain(s, 4, w)
        runs.append((batches, names, list(s.skipped)))
    b0, n0, sk0 = runs[0]
    for b, n, sk in runs[1:]:
        assert n == n0 and sk == sk0
        assert len(b) == len(b0) and all(torch.equal(x, y) for x, y in zip(b, b0))
    # the oracle: read items then reserve in order, skipping the unreadable, until 15 are read
    s = collect_images(root, 15, seed=4)
    expect, skipped = [], []
    for item in list(s.items) + list(s.reserve):
        if len(expect) == 15:
            break
        (skipped if item.name in ("im03.png", "im11.png", "im17.png") else expect).append(item)
    flat = [x for n in n0 for x in n]
    assert flat == [str(p) for p in expect] and sk0 == [str(p) for p in skipped]
    assert [len(n) for n in n0] == [4, 4, 4, 3]
    got = torch.cat(b0)
    for row, path in zip(got, expect):
        assert torch.equal(row, to_tensor(pics[int(path.stem[2:])]))


def test_the_reserve_is_read_only_to_replace_skipped_images(folder, monkeypatch):
    root, _ = folder
    s = collect_images(root, 10, seed=1)
    n_bad = sum(p.name in ("im03.png", "im11.png", "im17.png") for p in s.items)
    read = []
    real = data.decode_image

    def counting(item, mode):
        read.append(item)
        return real(item, mode)

    monkeypatch.setattr(data, "decode_image", counting)
    with warnings_ok():
        _drain(s, 3, 0)
    bad_in_reserve_read = sum(p.name in ("im03.png", "im11.png", "im17.png") for p in read[10:])
    assert len(read) == 10 + n_bad + bad_in_reserve_read  # every read is used or replaced
    assert read[:10] == list(s.items) and read[10:] == list(s.reserve[:len(read) - 10])
    # no unreadable image and no reserve read at all
    s2 = collect_images([p for p in sorted(root.iterdir()) if p.name not in ("im03.png", "im11.png", "im17.png")], 5)
    read.clear()
    _drain(s2, 2, 0)
    assert read == list(s2.items)


class warnings_ok:
    """Context manager: UserWarnings allowed (and recorded)."""

    def __enter__(self):
        import warnings

        self._cm = warnings.catch_warnings(record=True)
        self._cm.__enter__()
        warnings.simplefilter("always")

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


def test_default_workers(monkeypatch):
    for cpus, expect in ((1, 0), (2, 0), (3, 2), (8, 4), (64, 4)):
        monkeypatch.setattr(data, "cpu_count", lambda c=cpus: c)
        assert default_workers() == expect
        assert default_workers(32, 16) == 0  # two batches: not worth starting workers
        assert default_workers(33, 16) == expect
        assert default_workers(33, 16) in (0, min(4, cpus - 1))
    with workers_default(3):
        assert default_workers(1, 16) == 3
    assert default_workers(1, 16) == 0
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ProbeError, match="--workers must be a non-negative integer"):
            with workers_default(bad):
                pass
        with pytest.raises(ProbeError, match="--workers"):
            collect_images(_pictures(2), workers=bad)


def test_pin_memory_without_cuda_is_a_no_op(folder):
    root, _ = folder
    s = collect_images([p for p in sorted(root.iterdir()) if p.name != "im03.png"][:5])
    (b, _), *rest = iter_batches(s, to_tensor, 8, workers=0, pin_memory=True)
    assert b.shape == (5, 3, 10, 12) and b.is_pinned() == torch.cuda.is_available()


# -- tar shards --------------------------------------------------------------------------------


def _write_shards(root, pics, per_shard=4, corrupt=(5,)):
    """WebDataset layout: sample key 'sNNNN' with .png (or .jpg name for PNG bytes: suffix only
    selects members) and .cls; one member in a sub-folder; sample 5's image is garbage."""
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(-(-len(pics) // per_shard)):
        path = root / f"shards-{s:03d}.tar"
        with tarfile.open(path, "w") as tf:
            for i in range(s * per_shard, min(len(pics), (s + 1) * per_shard)):
                key = f"sub/s{i:04d}" if i == 2 else f"s{i:04d}"
                for ext, payload in (("cls", str(i % 3).encode()),
                                     ("png", b"garbage" if i in corrupt else _png(pics[i])),
                                     ("seg.png", _png(pics[0]))):  # a second image of the sample: ignored
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tf.addfile(info, io.BytesIO(payload))
        paths.append(path)
    return paths


def test_brace_expansion():
    assert expand_braces("a{0..2}b") == ["a0b", "a1b", "a2b"]
    assert expand_braces("s-{008..010}.tar") == ["s-008.tar", "s-009.tar", "s-010.tar"]
    assert expand_braces("{x,y}{1..2}") == ["x1", "x2", "y1", "y2"]
    assert expand_braces("{3..1}") == ["3", "2", "1"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(ProbeError, match="unbalanced brace"):
        expand_braces("s-{000..002.tar")


def test_tar_shards_read_in_order_with_the_corrupt_one_skipped(tmp_path):
    pics = _pictures(10, seed=2)
    _write_shards(tmp_path / "shards", pics)
    pattern = str(tmp_path / "shards" / "shards-{000..002}.tar")
    s = collect_images(pattern)
    assert len(s) == 10 and "3 tar shard(s)" in s.description
    assert s.names()[2] == "shards-000.tar/sub/s0002.png" and s.names()[0] == "shards-000.tar/s0000.png"
    for spec in (str(tmp_path / "shards"), str(tmp_path / "shards" / "shards-*.tar")):  # folder, glob
        assert collect_images(spec).items == s.items
    for w in (0, 2):
        s = collect_images(pattern)
        with pytest.warns(UserWarning, match="skipping unreadable image shards-001.tar/s0005.png"):
            batches, names = _drain(s, 3, w)
        got = torch.cat(batches)
        keep = [i for i in range(10) if i != 5]
        assert [n.split("/")[-1] for b in names for n in b] == [f"s{i:04d}.png" for i in keep]
        assert all(torch.equal(got[j], to_tensor(pics[i])) for j, i in enumerate(keep))
        assert s.skipped == ["shards-001.tar/s0005.png"]
    sub = collect_images(pattern, 4, seed=0)
    assert len(sub) == 4 and len(sub.reserve) == 6


def test_tar_shard_errors(tmp_path):
    _write_shards(tmp_path, _pictures(4), per_shard=2)
    with pytest.raises(ProbeError, match=r"1 of the 3 shard\(s\).*do not exist.*shards-002.tar"):
        collect_images(str(tmp_path / "shards-{000..002}.tar"))
    (tmp_path / "x.tar.gz").write_bytes(b"")
    with pytest.raises(ProbeError, match="compressed tar.*uncompressed"):
        collect_images(str(tmp_path / "x.tar.gz"))
    (tmp_path / "bad.tar").write_bytes(b"no tar here" * 100)
    with pytest.raises(ProbeError, match="cannot read the tar shard"):
        collect_images(str(tmp_path / "bad.tar"))


def test_analysis_of_shards_equals_the_same_images_in_memory(tmp_path):
    pics = _pictures(6, size=(32, 32), seed=3)
    _write_shards(tmp_path / "sh", pics, per_shard=4, corrupt=())
    kw = dict(data_overrides=SMALL, n_bootstrap=4, fits=False, conv_test=False, attribution="none", batch_size=4)
    torch.manual_seed(0)
    model = tiny_vit()
    a = probe.analyze(model, str(tmp_path / "sh" / "shards-{000..001}.tar"), **kw)
    b = probe.analyze(model, pics, **kw)
    cols = ["layer", "head", "mean_distance_px", "entropy_nats", "prefix_mass"]
    pd.testing.assert_frame_equal(a.heads[cols], b.heads[cols], check_exact=True)
    assert a.meta["image_names"][0] == "shards-000.tar/s0000.png"


def _rss_bytes() -> int:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_memory_is_flat_in_the_number_of_images(tmp_path):
    """Memory while iterating does not grow with the number of images: Python objects
    (tracemalloc) and the process's resident memory (tensor storage included; Linux), sampled
    after every batch. Keeping the 480 decoded 96x96 images would hold 53 MB."""
    import sys
    import tracemalloc

    peaks, rss = {}, {}
    for n in (48, 480):
        _write_shards(tmp_path / f"m{n}", _pictures(n, size=(96, 96), seed=n), per_shard=96, corrupt=())
        s = collect_images(str(tmp_path / f"m{n}"))
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        rss0 = _rss_bytes() if sys.platform.startswith("linux") else 0
        top = rss0
        for _ in iter_batches(s, to_tensor, 8, workers=0):
            if rss0:
                top = max(top, _rss_bytes())
        peaks[n] = tracemalloc.get_traced_memory()[1] - base
        rss[n] = top - rss0
        tracemalloc.stop()
    assert peaks[480] < peaks[48] + 64 * 1024, peaks
    assert rss[480] < 16 * 2**20, rss  # a few batches, not 53 MB


# -- Hugging Face datasets, arrow, parquet ---------------------------------------------------


@pytest.fixture
def hf_saved(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    pics = _pictures(7, seed=5)
    feats = datasets.Features({"label": datasets.Value("int64"), "picture": datasets.Image()})
    ds = datasets.Dataset.from_dict({"label": list(range(7)), "picture": pics}, features=feats)
    dd = datasets.DatasetDict({"train": ds.select(range(4)), "test": ds.select(range(4, 7))})
    dd.save_to_disk(str(tmp_path / "dd"))
    ds.save_to_disk(str(tmp_path / "one"))
    ds.to_parquet(str(tmp_path / "pics.parquet"))
    return tmp_path, pics


def _hf_pixels(spec, **kw):
    s = collect_images(spec, **kw)
    with warnings_ok():
        batches, names = _drain(s, 2, kw.pop("workers", 0) if "workers" in kw else 0)
    return s, torch.cat(batches), [n for b in names for n in b]


def test_hf_dataset_splits_arrow_and_parquet(hf_saved):
    root, pics = hf_saved
    s, got, names = _hf_pixels(f"hf-dataset:{root / 'dd'}:test")
    assert names == ["dd[test]#0", "dd[test]#1", "dd[test]#2"] and "column 'picture'" in s.description
    assert all(torch.equal(got[j], to_tensor(pics[4 + j])) for j in range(3))
    s, got, _ = _hf_pixels(f"hf-dataset:{root / 'one'}")
    assert all(torch.equal(got[j], to_tensor(pics[j])) for j in range(7))
    arrow = next((root / "one").glob("*.arrow"))
    _, got_arrow, _ = _hf_pixels(f"hf-dataset:{arrow}")
    assert torch.equal(got_arrow, got)
    s, got_pq, names = _hf_pixels(f"hf-dataset:{root / 'pics.parquet'}")
    assert torch.equal(got_pq, got) and names[0] == "pics.parquet#0" and "parquet" in s.description
    sub = collect_images(f"hf-dataset:{root / 'one'}", 3, seed=0)
    assert len(sub) == 3 and len(sub.reserve) == 4
    for w in (1, 2):  # workers open the dataset in their own process
        s = collect_images(f"hf-dataset:{root / 'pics.parquet'}")
        batches, _ = _drain(s, 2, w)
        assert torch.equal(torch.cat(batches), got)


def test_hf_dataset_errors(hf_saved):
    import datasets

    root, _ = hf_saved
    with pytest.raises(ProbeError, match="has splits train, test; name one"):
        collect_images(f"hf-dataset:{root / 'dd'}")
    with pytest.raises(ProbeError, match="splits train, test"):
        collect_images(f"hf-dataset:{root / 'dd'}:validation")
    with pytest.raises(ProbeError, match="does not exist"):
        collect_images(f"hf-dataset:{root / 'missing'}")
    with pytest.raises(ProbeError, match="needs a path"):
        collect_images("hf-dataset:")
    with pytest.raises(ProbeError, match="no splits"):
        collect_images(f"hf-dataset:{root / 'one'}:train")
    datasets.Dataset.from_dict({"x": [1, 2]}).save_to_disk(str(root / "numbers"))
    with pytest.raises(ProbeError, match="no image column.*columns: x"):
        collect_images(f"hf-dataset:{root / 'numbers'}")


def test_cli_reads_a_parquet_file_with_workers(hf_saved):
    from typer.testing import CliRunner

    from probe.cli import app

    root, _ = hf_saved
    out = root / "run"
    res = CliRunner().invoke(app, ["analyze", "--model", "vit_tiny", "--random-init", "--layers", "0",
                                   "--images", f"hf-dataset:{root / 'pics.parquet'}", "--workers", "1",
                                   "--num-images", "5", "--no-conv-test", "--out", str(out)])
    assert res.exit_code == 0, res.output
    loaded = probe.load(out)
    assert loaded.meta["num_images"] == 5 and loaded.meta["image_names"][0].startswith("pics.parquet#")


def test_loader_benchmark_smoke(tmp_path):
    """bench/loader.py runs end to end and writes its JSON and Markdown (tiny settings)."""
    import importlib.util
    import json
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bench_loader", Path(__file__).parents[1] / "bench" / "loader.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--num-images", "4", "--batch-size", "2", "--repeats", "1", "--workers", "0,1",
                    "--no-pipeline", "--out-json", str(tmp_path / "r.json"), "--out-md", str(tmp_path / "r.md")])
    assert set(out["loader"]) == {"0", "1"} and out["forward"]["images_per_s"] > 0
    assert json.loads((tmp_path / "r.json").read_text())["settings"]["num_images"] == 4
    assert "| 1 |" in (tmp_path / "r.md").read_text()
