"""Distributed runs (:mod:`probe.distributed`): two ranks with gloo on the CPU give the tables of
one process; rank 1 writes nothing; an error on one rank stops both with a clear message.

Oracles: the single-process run of the same analysis (an independent path: no sharding, no
collective), the explicit definition of the keyed bootstrap stream (row ``i`` of one seeded
Poisson(1) stream for image ``i``), and set arithmetic for the shards.
"""

from __future__ import annotations

import io
import json
import math
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import probe
from probe.analyses.distance_modes import DistanceModesReducer
from probe.analyses.nmi import NmiReducer
from probe.analyses.reducers import FEATURES, LayerReducer, feature_tables, merge_states
from probe.cli import app
from probe.data import ImageSet, iter_indexed_batches
from probe.distributed import check_mergeable, shard_range
from probe.errors import ProbeError
from probe.geometry import TokenGeometry

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
SCRIPT = TESTS / "distributed_run.py"
#: a hung collective shows as this timeout, not as a test that never ends
TIMEOUT_S = 120


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                          "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(TESTS), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    env["COLUMNS"] = "200"
    env.update(extra)
    return env


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc-per-node 2 ARGS`` (torchrun)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_ranks(mode: str, out: Path) -> list[tuple[int, str]]:
    """Both ranks of ``distributed_run.py MODE OUT`` started directly (no torchrun agent that would
    end the other rank when one fails): ``[(exit code, output)]`` per rank."""
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, str(SCRIPT), mode, str(out)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
             for r in range(2)]
    try:
        outs = [p.communicate(timeout=TIMEOUT_S)[0] for p in procs]
    except subprocess.TimeoutExpired:  # a hang: end both, fail
        for p in procs:
            p.kill()
        pytest.fail(f"the ranks of mode {mode!r} did not finish within {TIMEOUT_S} s (a collective hung)")
    return [(p.returncode, o) for p, o in zip(procs, outs)]


def _outcome(text: str) -> str:
    lines = [l for l in text.splitlines() if l.startswith("OUTCOME ")]
    assert len(lines) == 1, text
    return lines[0][len("OUTCOME "):]


def assert_tables_equal(one: pd.DataFrame, two: pd.DataFrame, rtol: float = 1e-12,
                        noise_floor: dict[str, float] | None = None) -> None:
    """Same columns and rows; numeric columns equal to ``rtol`` relative (NaN and inf at the same
    places); other columns identical. ``noise_floor[col]``: instead, both values of that column
    lie below the floor (a quantity whose true value is 0, computed as rounding noise)."""
    assert list(one.columns) == list(two.columns)
    assert len(one) == len(two)
    for c in one.columns:
        a, b = one[c], two[c]
        if a.dtype.kind in "fiu" and b.dtype.kind in "fiu":
            x, y = a.to_numpy(float), b.to_numpy(float)
            if noise_floor and c in noise_floor:
                assert np.nanmax(np.abs(np.r_[x, y])) <= noise_floor[c], (c, x, y)
                continue
            assert (np.isnan(x) == np.isnan(y)).all(), c
            inf = np.isinf(x) | np.isinf(y)
            assert (x[inf] == y[inf]).all(), c
            m = ~np.isnan(x) & ~inf
            err = np.abs(x[m] - y[m])
            assert (err <= rtol * np.maximum(np.abs(x[m]), np.abs(y[m]))).all(), \
                (c, float(np.max(err / np.maximum(np.abs(x[m]), 1e-300), initial=0)))
        else:
            assert a.astype(str).tolist() == b.astype(str).tolist(), c


def _csv(frame: pd.DataFrame) -> pd.DataFrame:
    """A frame as heads.csv stores it (written and read back)."""
    return pd.read_csv(io.StringIO(frame.to_csv(index=False)))


# ------------------------------------------------------------------------------- sharding


def test_shards_are_whole_batches_in_order_covering_every_image():
    for n in range(0, 41):
        for batch in (1, 3, 8):
            for world in (1, 2, 3, 5):
                ranges = [shard_range(n, batch, r, world) for r in range(world)]
                covered = [i for lo, hi in ranges for i in range(lo, hi)]
                assert covered == list(range(n))  # disjoint, in rank order, nothing left out
                assert all(lo % batch == 0 for lo, hi in ranges if hi > lo)
                sizes = [-(-(hi - lo) // batch) for lo, hi in ranges]  # batches per rank
                assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
                if n:
                    assert ranges[0][1] > 0  # rank 0 holds the first images
    with pytest.raises(ProbeError):
        shard_range(10, 4, 2, 2)


def test_indexed_batches_of_shards_key_images_by_position(tmp_path):
    files = []
    for i in range(8):
        f = tmp_path / f"{i}.png"
        Image.fromarray(np.full((8, 8, 3), 30 * i, np.uint8)).save(f)
        files.append(f)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    images = ImageSet([files[0], tmp_path / "bad.png", files[1], files[2]], "test", reserve=files[3:])
    to_tensor = lambda im: torch.from_numpy(np.asarray(im, np.float32)).permute(2, 0, 1)  # noqa: E731
    seen, warned = {}, {}
    for part, (lo, hi) in enumerate([(0, 2), (2, 4)]):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = list(iter_indexed_batches(images, to_tensor, 2, workers=0, start=lo, stop=hi,
                                            reserve_part=(part, 2), require_any=False))
        seen[part] = [(n, i) for _, names, index in got for n, i in zip(names, index)]
        warned[part] = [str(w.message) for w in caught if "unreadable" in str(w.message)]
    assert len(warned[0]) == 1 and "bad.png" in warned[0][0] and not warned[1]
    assert images.skipped == [str(tmp_path / "bad.png")]
    # items 0..3, then reserve item k at 4 + k; part 0 replaces its bad file from reserve items 0, 2, ...
    assert seen[0] == [(str(files[0]), 0), (str(files[3]), 4)]
    assert seen[1] == [(str(files[1]), 2), (str(files[2]), 3)]


# ------------------------------------------------------------------------------- reducers


def _attention(n: int, heads: int, tokens: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    temp = torch.rand(n, heads, tokens, 1, generator=g) * 5
    return (torch.randn(n, heads, tokens, tokens, generator=g) * temp).softmax(-1)


def _feed(reducer, attn: torch.Tensor, index: list[int] | None, batch: int):
    """``reducer`` fed ``attn`` in batches of ``batch``, with the image indices ``index``."""
    for i in range(0, attn.shape[0], batch):
        if index is None:
            reducer.update(attn[i:i + batch])
        else:
            reducer.update(attn[i:i + batch], image_index=index[i:i + batch])
    return reducer


#: float32 unit roundoff
U32 = 2.0 ** -24


def float32_feature_bound(g: TokenGeometry) -> torch.Tensor:
    """How far two float32 evaluations of one image's features (:data:`FEATURES` order, float64
    ``(F,)``) can differ when their kernels add in other orders (another chunk position, thread
    count or CPU): twice the classical bound ``m * u * sum |terms|`` of an ``m``-term float32 sum.

    * table features: ``A' = A / sum_k A`` (``P`` terms, one division) then ``sum_k A' T`` (``P``
      terms, ``sum_k A' = 1``) per query, averaged over queries: ``(2P + 2) u max|T|``;
    * entropy: one float32 sum of ``P * T`` terms ``p ln p`` (``|sum| <= P ln T``; ``ln`` and the
      product add 2 u each), divided by ``P``: ``(P T + 4) u ln T``;
    * prefix mass: one float32 sum of ``P * prefix`` terms in [0, 1], divided by ``P``.
    """
    p, t, n_pre = g.num_patches, g.num_tokens, g.num_prefix_tokens
    table = feature_tables(g).abs().amax(0) * p  # (7,) max |T| per table column
    per = {name: (2 * p + 2) * U32 * float(table[i]) for i, name in
           enumerate(("mean_distance_patches", "mean_distance_px", "phi_row", "phi_col", "phi_row2",
                      "phi_col2", "phi_rowcol"))}
    per["entropy_nats"] = (p * t + 4) * U32 * math.log(t)
    per["prefix_mass"] = (p * n_pre + 1) * U32
    return 2 * torch.tensor([per[f] for f in FEATURES], dtype=torch.float64)


def assert_within(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor) -> None:
    """``|actual - expected| <= bound`` elementwise (``bound`` broadcast), with the worst ratio."""
    ratio = ((actual - expected).abs() / bound).max()
    assert ratio <= 1, f"differs by {float(ratio):.3g} times the float32 bound"


def test_layer_reducer_states_merge_to_the_one_pass_sums_and_keyed_bootstrap():
    g = TokenGeometry(1, (3, 4), (8.0, 8.0))
    n = 23
    attn = _attention(n, 2, g.num_tokens, seed=1)
    index = list(range(n))
    one = _feed(LayerReducer(3, g, n_bootstrap=7, seed=2), attn, index, batch=5).result()
    # unequal shards at a non-batch boundary, other batch sizes
    parts = [_feed(LayerReducer(3, g, n_bootstrap=7, seed=2), attn[:9], index[:9], batch=2),
             _feed(LayerReducer(3, g, n_bootstrap=7, seed=2), attn[9:], index[9:], batch=4)]
    states = [p.state() for p in parts]
    merged = LayerReducer(3, g, n_bootstrap=7, seed=2)
    merged.load_state(merge_states(states + [LayerReducer(3, g, 7, 2).state()]))
    two = merged.result()
    assert two.n_images == one.n_images == n
    # The merge is float64 addition of the shards' sums: equal to adding them by hand.
    for k in ("attn_sum", "feat_sum", "feat_sumsq", "boot_sum", "boot_weight"):
        torch.testing.assert_close(getattr(two, k), states[0][k] + states[1][k], rtol=1e-15, atol=0)
    # One pass vs shards: the same images, their float32 features computed at other chunk
    # positions (matrix kernels of some CPUs round a row by its position: ~1e-7 relative on an
    # AMD EPYC), so equal to the float32 bound of each image's features, summed over the images.
    d = float32_feature_bound(g)  # (F,) per image
    big = one.feat_sum.abs().amax(0) / n + d  # (F,) bound on |feature| of one image (the mean's scale)
    assert_within(two.feat_sum, one.feat_sum, n * d)
    assert_within(two.feat_sumsq, one.feat_sumsq, n * (2 * big * d + d * d))
    assert_within(two.attn_sum, one.attn_sum, n * 2 * (g.num_patches + 1) * U32)  # A' entries in [0, 1]
    torch.testing.assert_close(two.boot_weight, one.boot_weight, rtol=0, atol=0)  # integer counts
    assert_within(two.boot_sum, one.boot_sum, one.boot_weight[:, None, None] * d)
    # the keyed bootstrap, written out: image i's weights are row i of one seeded stream
    w = torch.poisson(torch.ones(n, 7, dtype=torch.float64), torch.Generator().manual_seed(2 * 1_000_003 + 3))
    per_image = torch.stack([_feed(LayerReducer(3, g, n_bootstrap=0), attn[i:i + 1], [0], 1).result().feat_sum
                             for i in range(n)])  # (n, heads, F), each computed alone
    torch.testing.assert_close(one.boot_weight, w.sum(0), rtol=0, atol=0)
    assert_within(one.boot_sum, torch.einsum("ir,ihf->rhf", w, per_image), w.sum(0)[:, None, None] * d)
    # images that never arrive (other ranks, unreadable files) keep their rows: the rest is unchanged
    some = [0, 1, 4, 5, 6, 11, 20]
    sub = _feed(LayerReducer(3, g, n_bootstrap=7, seed=2), attn[some], some, batch=3).result()
    assert_within(sub.boot_sum, torch.einsum("ir,ihf->rhf", w[some], per_image[some]),
                  w[some].sum(0)[:, None, None] * d)
    # the bound can fail: one image dropped from a replicate, or weighted by another's row
    assert (sub.boot_sum - torch.einsum("ir,ihf->rhf", w[some[:-1]], per_image[some[:-1]])).abs().amax() \
        > 1e3 * (w[some].sum(0)[:, None, None] * d).amax()


def test_layer_reducer_refuses_indices_that_do_not_increase():
    g = TokenGeometry(0, (2, 2), (1.0, 1.0))
    r = LayerReducer(0, g, n_bootstrap=2)
    r.update(_attention(2, 1, 4, 0), image_index=[3, 4])
    with pytest.raises(ProbeError, match="increase"):
        r.update(_attention(1, 1, 4, 1), image_index=[4])
    with pytest.raises(ProbeError, match="2 image indices"):
        r.update(_attention(1, 1, 4, 1), image_index=[7, 8])


@pytest.mark.parametrize("make", [DistanceModesReducer, NmiReducer], ids=["distance_modes", "nmi"])
def test_moment_reducers_merge_to_the_one_pass_result(make):
    g = TokenGeometry(1, (3, 3), (16.0, 16.0))
    attn = _attention(11, 3, g.num_tokens, seed=4)
    one = _feed(make(0, g), attn, None, 4).result()
    parts = [_feed(make(0, g), attn[:6], None, 6), _feed(make(0, g), attn[6:], None, 2), make(0, g)]
    merged = make(0, g)
    merged.load_state(merge_states([p.state() for p in parts]))
    two = merged.result()
    assert two.n_images == one.n_images == 11
    np.testing.assert_allclose(two.mean, one.mean, rtol=1e-13)
    np.testing.assert_allclose(two.se, one.se, rtol=1e-9)
    assert parts[2].state() is None and merge_states([None, None]) is None


def test_states_that_do_not_match_are_refused():
    g = TokenGeometry(0, (2, 2), (1.0, 1.0))
    a = _feed(LayerReducer(0, g, 2), _attention(2, 1, 4, 0), [0, 1], 2).state()
    b = _feed(LayerReducer(0, g, 2), _attention(2, 2, 4, 0), [0, 1], 2).state()  # 2 heads
    with pytest.raises(ProbeError, match="shape"):
        merge_states([a, b])
    with pytest.raises(ProbeError, match="do not fit"):
        LayerReducer(0, g, 3).load_state(a)  # 3 replicates expected

    class Plain:
        def update(self, attn):
            pass

        def result(self):
            return None

    with pytest.raises(ProbeError, match="'plain'.*state"):
        check_mergeable([("distance_entropy", LayerReducer(0, g, 2)), ("plain", Plain())])


def test_cli_distributed_flag_needs_the_launcher(monkeypatch, tmp_path):
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    result = CliRunner().invoke(app, ["analyze", "--distributed", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "torchrun --nproc-per-node N -m probe analyze" in " ".join(result.output.split())
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------- two real ranks


def test_torchrun_cli_on_the_embedded_model_equals_one_process(tmp_path):
    """The real command line under torchrun, 2 ranks, 37 images in batches of 8 (shards of 24 and
    13), against ``probe analyze`` in one process."""
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(37):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    run = _torchrun(["-m", "probe", "analyze", "--images", str(folder), "--batch-size", "8", "--out", "two"], cwd)
    assert run.returncode == 0, run.stdout + run.stderr
    text = run.stdout + run.stderr
    assert text.count("report: ") == 1  # rank 0 alone reports
    assert sorted(p.name for p in cwd.iterdir()) == ["two"]  # rank 1 wrote nothing (no reports/ folder)
    one = tmp_path / "one"
    single = CliRunner().invoke(app, ["analyze", "--images", str(folder), "--batch-size", "8", "--out", str(one)])
    assert single.exit_code == 0, single.output
    heads_1, heads_2 = pd.read_csv(one / "heads.csv"), pd.read_csv(cwd / "two" / "heads.csv")
    # The embedded model's attention depends on positions only (probe.cordonnier.model), so every
    # per-image value is the same for all images: the standard errors are 0, and what is computed
    # is float64 rounding of sum(x^2) - n mean^2 (~sqrt(eps) of the value), different in any
    # other summation order. They must be that small in both runs; every other column equal.
    floor = {c: 1e-6 * (1 + heads_1[c[:-3]].abs().max()) for c in heads_1.columns if c.endswith("_se")}
    assert floor and all(c[:-3] in heads_1 for c in floor)
    assert_tables_equal(heads_1, heads_2, noise_floor=floor)
    assert_tables_equal(pd.read_csv(one / "layers.csv"), pd.read_csv(cwd / "two" / "layers.csv"))
    assert (one / "images.txt").read_text() == (cwd / "two" / "images.txt").read_text()
    meta = json.loads((cwd / "two" / "result.json").read_text())["meta"]
    assert meta["distributed"] == {"world_size": 2, "backend": "gloo", "shards": [[0, 24], [24, 37]]}
    assert meta["num_images"] == 37


def test_two_ranks_of_the_library_equal_one_process_to_1e12(tmp_path):
    """``probe.analyze(distributed=True)`` under torchrun on a model whose attention varies with
    the image: 29 images in batches of 4 (shards of 16 and 13); the distance-mode and NMI reducers
    merged too; sinks reads the first 29 images on rank 0, 13 of them sent by rank 1."""
    import distributed_run

    run = _torchrun([str(SCRIPT), "ok", str(tmp_path / "two")], tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert sorted(_outcome(l) for l in run.stdout.splitlines() if l.startswith("OUTCOME")) == ["none", "result"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["two"]
    single = distributed_run.run(False)
    for name, frame in (("heads", single.heads), ("layers", single.layers)):
        two = pd.read_csv(tmp_path / "two" / f"{name}.csv")
        # the same columns; their order follows the analysis registry's order, which in this test
        # process depends on which test modules imported probe.analyses.* first
        assert sorted(two.columns) == sorted(frame.columns)
        assert_tables_equal(_csv(frame), two[list(frame.columns)])
    meta = json.loads((tmp_path / "two" / "meta.json").read_text())
    assert meta["image_names"] == single.meta["image_names"] and meta["num_images"] == 29
    assert meta["distributed"]["shards"] == [[0, 16], [16, 29]]
    assert meta["sinks_images"] == single.extras["sinks"]["n_images"] == 29
    assert {"distance_modes", "nmi", "sinks"} <= set(meta["analyses"])


@pytest.mark.parametrize("mode, rank1, rank0", [
    ("bad-argument", "ProbeError: batch_size must be at least 1",
     "ProbeError: rank 1 of 2 failed, so every rank stops: batch_size must be at least 1"),
    ("disagree", "disagree (images: rank 0 29, rank 1 30)", "disagree (images: rank 0 29, rank 1 30)"),
    ("capture-error", "RuntimeError: planted failure in the capture of rank 1",
     "rank 1 of 2 failed, so every rank stops: RuntimeError: planted failure in the capture of rank 1"),
], ids=["bad-argument", "disagree", "capture-error"])
def test_an_error_on_one_rank_stops_every_rank_with_its_message(tmp_path, mode, rank1, rank0):
    (code0, out0), (code1, out1) = _two_ranks(mode, tmp_path / "out")
    assert code0 == 3 and code1 == 3, out0 + out1
    assert rank0 in _outcome(out0), out0
    assert rank1 in _outcome(out1), out1
    assert not (tmp_path / "out").exists()
