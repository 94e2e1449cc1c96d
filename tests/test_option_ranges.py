"""Numeric options range-checked before any work (issue 22, items 8-9): ``probe analyze`` and the
library, ``probe train`` and its checkpoints. Each bad value gives one ``error:`` line naming the
option and exit 2 (CLI), or a ``ProbeError`` (library), and nothing is written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import probe
from probe.analyses.convlike import ConvLikeConfig
from probe.cli import app
from probe.errors import ProbeError

from cli_errors import one_error_line

runner = CliRunner()



@pytest.mark.parametrize("args, needle", [
    (["--seed", str(2 ** 64)], "seed must be from 0 to 4294967295"),
    (["--layers", "0-99999999999999"], "layer 99999999999999 is out of range"),
    (["--layers", "-99999999999999-3"], "out of range"),
    (["--kernel-size", "1000"], "--kernel-size"),
    (["--std", "1e-320"], "--std"),
    (["--local-radius", "1e308"], "--local-radius"),
    (["--prefix-tokens", "-1"], "--prefix-tokens"),
    (["--patch-size", "1e308"], "--patch-size"),
    (["--grid", "0x4"], "--grid"),
    (["--input-size", "3,100000,100000"], "--input-size"),
    (["--mean", "1e300"], "--mean"),
])
def test_analyze_options_out_of_range(tmp_path, monkeypatch, args, needle):
    monkeypatch.chdir(tmp_path)
    line = one_error_line(runner.invoke(app, ["analyze", "--out", "run", "--attribution", "none", *args]))
    assert needle in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kw, needle", [
    ({"seed": 2 ** 40}, "seed must be from 0"),
    ({"prefix_tokens": -1}, "prefix_tokens"),
    ({"prefix_tokens": 1.5}, "prefix_tokens"),
    ({"patch_size": float("inf")}, "patch_size"),
    ({"grid": (4, 10 ** 9)}, "grid"),
    ({"grid": (4,)}, "grid"),
    ({"data_overrides": {"std": (1e-320, 1.0, 1.0)}}, "std"),
    ({"kernel_size": 1000}, "kernel-size"),
    ({"local_radius": 1e308}, "local-radius"),
    ({"layers": "0-99999999999999"}, "out of range"),
])
def test_library_ranges(kw, needle):
    with pytest.raises(ProbeError, match=needle):
        probe.analyze(None, torch.rand(2, 3, 32, 32), attribution="none", **kw)


def test_conv_config_ranges_are_checked_when_built():
    """The conv test's config refuses absurd values where it is made, before any analysis."""
    with pytest.raises(ProbeError, match="kernel size"):
        ConvLikeConfig(kernel_size=1000)
    with pytest.raises(ProbeError, match="r_local"):
        ConvLikeConfig(r_local=1e308)


def _tiny_dataset(root: Path, n: int = 4) -> Path:
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for j in range(n):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / c / f"{j}.png")
    return root


TINY = ["--dim", "4", "--depth", "1", "--heads", "2", "--mlp-dim", "4", "--batch-size", "4",
        "--track-every", "0", "--test", "data"]


@pytest.mark.parametrize("args, needle", [
    (["--batch-size", "0"], "--batch-size"),
    (["--heads", "0"], "--heads"),
    (["--dim", "7"], "--dim 7 is not a multiple of --heads 2"),
    (["--epochs", "nan"], "--epochs"),
    (["--epochs", "-3"], "--epochs"),
    (["--epochs", "0"], "--epochs"),
    (["--attention", "bogus"], "unknown --attention 'bogus'"),
    (["--lr", "inf"], "--lr"),
    (["--seed", str(2 ** 64)], "--seed"),
    (["--max-steps", "0"], "--max-steps"),
    (["--threads", "0"], "--threads"),
    (["--position-schedule", "linear"], "--position-schedule"),
])
def test_train_options_are_checked_before_any_work(tmp_path, monkeypatch, args, needle):
    monkeypatch.chdir(tmp_path)
    _tiny_dataset(tmp_path / "data")
    res = runner.invoke(app, ["train", "--train", "data", "--out", "run", *TINY, *args])
    assert needle in one_error_line(res)
    assert not (tmp_path / "run").exists()


def test_train_out_a_file_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _tiny_dataset(tmp_path / "data")
    Path("afile").write_text("keep")
    assert "existing file" in one_error_line(runner.invoke(app, ["train", "--train", "data", "--out", "afile", *TINY]))
    assert "which is a file" in one_error_line(runner.invoke(app, ["train", "--train", "data", "--out", "afile/x",
                                                               *TINY]))
    assert Path("afile").read_text() == "keep"


def test_damaged_checkpoints_are_refused_before_training(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _tiny_dataset(tmp_path / "data")
    res = runner.invoke(app, ["train", "--train", "data", "--out", "run", *TINY, "--max-steps", "1"])
    assert res.exit_code == 0, res.output
    ck = tmp_path / "run" / "checkpoint.pt"
    good = ck.read_bytes()
    state = torch.load(ck, weights_only=True)
    cases = [(good[: len(good) // 2], "cannot be read as a checkpoint"), (b"", "cannot be read as a checkpoint")]
    no_opt = {k: v for k, v in state.items() if k != "optimizer"}
    torch.save(no_opt, tmp_path / "x.pt")
    cases.append(((tmp_path / "x.pt").read_bytes(), "lacks optimizer"))
    bad_model = {**state, "model": {"nothing": torch.zeros(1)}}
    torch.save(bad_model, tmp_path / "y.pt")
    cases.append(((tmp_path / "y.pt").read_bytes(), "does not fit this run"))
    for data, needle in cases:
        ck.write_bytes(data)
        before = sorted(p.name for p in (tmp_path / "run").rglob("*"))
        line = one_error_line(runner.invoke(app, ["train", "--train", "data", "--out", "run", *TINY, "--max-steps", "2"]))
        assert needle in line and "delete" in line
        assert sorted(p.name for p in (tmp_path / "run").rglob("*")) == before
