"""`probe analyze` end to end: bad inputs give one clear line and no output; the real run on
DeiT-Tiny agrees with an independent computation of the same definitions."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from probe.cli import app

from conftest import need, DEIT_WEIGHTS, IMAGENET

runner = CliRunner()


def run(*args):
    return runner.invoke(app, ["analyze", *map(str, args)])


def _error_line(result) -> str:
    text = result.output.strip()
    assert result.exit_code == 2, text
    assert "Traceback" not in text
    lines = [l for l in text.splitlines() if l.strip().startswith("error:")]
    assert len(lines) == 1, text
    # rich may wrap the one logical line across terminal rows: join the error's rows
    tail = text[text.index("error:"):]
    return " ".join(tail.split())


def write_images(folder, n=3, size=(40, 30)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder


BAD = [
    (["--model", "deit_tiny_patch16", "--random-init"], r"unknown model.*did you mean"),
    (["--model", "vit_tiny", "--random-init", "--layers", "0-12"], r"layer 12 is out of range.*12 attention layers"),
    (["--model", "vit_tiny", "--random-init", "--layers", "first"], r"malformed layer spec"),
    (["--model", "vit_tiny", "--weights", "missing.safetensors"], r"not found"),
    (["--model", "vit_tiny", "--random-init", "--num-images", "0"], r"--num-images must be at least 1"),
    (["--model", "vit_tiny", "--random-init", "--device", "cuda"], r"no CUDA GPU"),
    (["--model", "vit_tiny", "--random-init", "--batch-size", "0"], r"--batch-size must be at least 1"),
    (["--model", "vit_tiny", "--random-init", "--grid", "14by14"], r"malformed --grid"),
]


@pytest.mark.parametrize("args,pattern", BAD)
def test_bad_input_is_one_clear_line_and_no_output(tmp_path, args, pattern):
    if "--device" in args and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    out = tmp_path / "out"
    res = run(*args, "--images", write_images(tmp_path / "imgs", 1), "--out", out)
    assert re.search(pattern, _error_line(res)), res.output
    assert not (out / "report.html").exists() and not (out / "heads.csv").exists()


def test_empty_image_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    res = run("--model", "vit_tiny", "--random-init", "--images", tmp_path / "empty", "--out", tmp_path / "o")
    assert "no image files found" in _error_line(res)
    assert not (tmp_path / "o").exists()


def test_folder_without_readable_images(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jpg").write_bytes(b"not a jpeg")
    (bad / "b.png").write_bytes(b"")
    res = run("--model", "vit_tiny", "--random-init", "--images", bad, "--out", tmp_path / "o")
    assert "none of the 2 image file(s)" in _error_line(res)
    assert not (tmp_path / "o" / "report.html").exists()


def test_unreadable_files_are_skipped_and_counted(tmp_path):
    imgs = write_images(tmp_path / "imgs", 2)
    (imgs / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "o"
    res = run("--model", "vit_tiny", "--random-init", "--images", imgs, "--layers", "0-1", "--out", out)
    assert res.exit_code == 0, res.output
    assert "skipping unreadable image" in res.output
    html = (out / "report.html").read_text()
    assert "1 unreadable file(s) skipped" in html
    heads = pd.read_csv(out / "heads.csv")
    assert len(heads) == 2 * 3  # vit_tiny: 3 heads


def test_default_images_need_no_download(tmp_path):
    out = tmp_path / "o"
    res = run("--model", "vit_tiny", "--random-init", "--layers", "0", "--out", out)
    assert res.exit_code == 0, res.output
    html = (out / "report.html").read_text()
    assert "scikit-learn sample photos" in html
    assert "random init (seed 0)" in html and "untrained weights" in html
    assert (out / "images.txt").read_text().split() == ["china.jpg", "flower.jpg"]


# --- the real run ---------------------------------------------------------------------------

def independent_head_stats(weights, image_names, layers):
    """Mean attention distance / entropy / prefix mass by explicit math, not using probe.

    Attention is recomputed from each block's qkv weights on the block's own input; the
    definitions of the issue are applied with NumPy.
    """
    import timm
    from safetensors.torch import load_file

    model = timm.create_model("deit_tiny_patch16_224")
    model.load_state_dict(load_file(str(weights)))
    model.eval()
    cfg = timm.data.resolve_data_config({}, model=model)
    tf = timm.data.create_transform(**cfg)
    x = torch.stack([tf(Image.open(IMAGENET / n).convert("RGB")) for n in image_names])
    inputs = {}
    hooks = [model.blocks[i].attn.register_forward_pre_hook(
        lambda m, a, i=i: inputs.__setitem__(i, a[0])) for i in layers]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    r, c = np.meshgrid(np.arange(14), np.arange(14), indexing="ij")
    pos = np.stack([r.ravel(), c.ravel()], 1) * 16.0
    dist = np.sqrt(((pos[:, None] - pos[None]) ** 2).sum(-1))
    rows = []
    for i in layers:
        attn_mod = model.blocks[i].attn
        xin = inputs[i].detach().double()
        qkv = xin @ attn_mod.qkv.weight.detach().double().T + attn_mod.qkv.bias.detach().double()
        B, N, _ = xin.shape
        q, k, _ = qkv.reshape(B, N, 3, 3, 64).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) / 8.0, -1).numpy()
        for h in range(3):
            rows_h = a[:, h, 1:, :]
            patch = rows_h[..., 1:] / rows_h[..., 1:].sum(-1, keepdims=True)
            rows.append({
                "layer": i, "head": h,
                "mean_distance_px": (patch * dist).sum(-1).mean(),
                "entropy_nats": -(rows_h * np.log(rows_h)).sum(-1).mean(),
                "prefix_mass": rows_h[..., 0].mean(),
            })
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def deit_run(tmp_path_factory):
    weights = need(DEIT_WEIGHTS)
    images = need(IMAGENET)
    out = tmp_path_factory.mktemp("deit")
    res = run("--model", "deit_tiny", "--weights", weights, "--images", images,
              "--layers", "all", "--num-images", "64", "--out", out)
    assert res.exit_code == 0, res.output
    return out


@pytest.mark.slow
def test_deit_tiny_report_and_table(deit_run):
    heads = pd.read_csv(deit_run / "heads.csv")
    for col in ["layer", "head", "mean_distance_px", "mean_distance_patches", "prefix_mass",
                "entropy_nats", "entropy_norm"]:
        assert col in heads.columns
    core = ["layer", "head", "mean_distance_px", "mean_distance_patches", "prefix_mass",
            "entropy_nats", "entropy_norm", "alpha", "quad_status", "conv_local"]
    assert len(heads) == 36 and heads[core].notna().all().all()
    np.testing.assert_allclose(heads.mean_distance_px, heads.mean_distance_patches * 16, rtol=1e-6)
    names = (deit_run / "images.txt").read_text().split()
    assert len(names) == 64 == len(set(names))
    html = (deit_run / "report.html").read_text()
    assert "http://" not in html.replace("http://www.w3.org", "") and "<script src" not in html
    assert html.count("data:image/png;base64,") >= 3
    for text in ("deit_tiny_patch16_224", "deit_tiny_patch16_224.safetensors", "64 from",
                 "Mean attention distance against depth", "Attention entropy against depth",
                 "Per-layer summary", "Attention map of the query patch", "torch"):
        assert text in html, text
    # mean attention distance grows with depth (ViT Fig. 7): last layers near uniform
    by_layer = heads.groupby("layer").mean_distance_px.mean()
    assert by_layer.iloc[-3:].mean() > by_layer.iloc[:3].mean() + 20


@pytest.mark.slow
def test_deit_tiny_numbers_match_independent_math(deit_run):
    heads = pd.read_csv(deit_run / "heads.csv")
    names = (deit_run / "images.txt").read_text().split()
    layers = [0, 4, 11]
    ref = independent_head_stats(DEIT_WEIGHTS, names, layers)
    got = heads[heads.layer.isin(layers)].reset_index(drop=True)
    for col in ("mean_distance_px", "entropy_nats", "prefix_mass"):
        np.testing.assert_allclose(got[col].to_numpy(), ref[col].to_numpy(), rtol=1e-3, err_msg=col)


def test_chosen_query_map_and_bad_query(tmp_path):
    out = tmp_path / "o"
    res = run("--model", "vit_tiny", "--random-init", "--layers", "0", "--query", "0,13",
              "--attribution", "none", "--no-conv-test", "--out", out)
    assert res.exit_code == 0, res.output
    assert "query patch at row 0, column 13" in (out / "report.html").read_text()
    bad = run("--model", "vit_tiny", "--random-init", "--layers", "0", "--query", "14,0",
              "--attribution", "none", "--out", tmp_path / "b")
    assert "inside the 14x14 patch grid" in _error_line(bad)
    assert not (tmp_path / "b" / "report.html").exists()


def test_analysis_help_names_every_builtin_opt_in_analysis():
    """The --analysis help lists probe's registered opt-in analyses (kept in step with the registry)."""
    from typer.testing import CliRunner

    from probe.analyses.base import analyses
    from probe.cli import app

    out = CliRunner().invoke(app, ["analyze", "--help"], env={"COLUMNS": "400"}).output
    line = next(l for l in out.splitlines() if "--analysis" in l)
    # probe's own, beyond those of probe.steps (which have flags of their own)
    opt_in = [n for n, cls in analyses().items() if cls.__module__.startswith("probe.analyses.")]
    assert opt_in and all(n in line for n in opt_in), (opt_in, line)
