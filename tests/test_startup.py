"""The ``probe`` command answers bad arguments before torch or timm loads (:mod:`probe.preflight`).

Oracle: ``sys.modules`` after the command ran in a fresh interpreter (torch and timm must not be
in it), the command's one ``error:`` line and exit status 2, and timm's own registry for the
names the pre-flight check reads from timm's source files. No clock is read here: the times are
measured in ``bench/startup.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from probe import preflight

ROOT = Path(__file__).resolve().parents[1]

_RUN = """
import json, sys
from probe.cli import app
try:
    app(sys.argv[1:], prog_name="probe")
    code = 0
except SystemExit as e:
    code = e.code
print(json.dumps({"code": code, "heavy": sorted(m for m in ("torch", "timm", "transformers", "pandas")
                                                if m in sys.modules)}))
"""


def _cli(args: list[str], tmp_path: Path, **env: str) -> tuple[dict, str]:
    """Run ``probe ARGS`` in a fresh interpreter; ``({"code", "heavy"}, stderr)``."""
    full = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "400", "HF_HUB_CACHE": str(tmp_path / "hub"), **env}
    run = subprocess.run([sys.executable, "-c", _RUN, *args], capture_output=True, text=True, env=full,
                         cwd=tmp_path, timeout=120)
    return json.loads(run.stdout.strip().splitlines()[-1]), run.stderr


@pytest.mark.parametrize("args, message", [
    (["analyze", "--model", "vit_smal"], "unknown model 'vit_smal'; did you mean vit_small"),
    (["analyze", "--model", "timm:deit_tinny"], "unknown model 'deit_tinny'"),
    (["analyze", "--images", "no/such/folder"], "image path 'no/such/folder' does not exist"),
    (["analyze", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["analyze", "--weights", "w.safetensors", "--random-init"], "--weights and --random-init exclude each other"),
    (["analyze", "--model", "vit_small"], "pretrained weights for 'vit_small_patch16_224' need the Hugging Face hub"),
    (["analyze", "--weights", "missing.safetensors"], "weights file 'missing.safetensors' not found"),
    (["compare", "no_run_a", "no_run_b"], "'no_run_a' does not exist; pass the output folder of probe analyze"),
    (["compare", "a", "b", "--labels", "one"], "--labels 'one' must give 2 non-empty comma-separated names"),
    (["train"], "probe train needs --train FOLDER"),
    (["train", "--train", "nowhere"], "image folder 'nowhere' does not exist"),
], ids=["unknown-model", "unknown-timm-scheme", "missing-images", "batch-size", "weights-and-random-init",
        "offline-weights", "missing-weights", "compare-missing", "compare-labels", "train-no-folder", "train-missing"])
def test_bad_arguments_are_answered_before_torch_loads(tmp_path, args, message):
    got, err = _cli(args, tmp_path, HF_HUB_OFFLINE="1")
    assert got["code"] == 2, err
    assert got["heavy"] == [], got
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err


def test_a_good_model_name_passes_the_early_check_and_loads_later(tmp_path):
    # the early check lets a known name through: torch loads and the model sources answer
    got, err = _cli(["analyze", "--model", "deit_tiny", "--random-init", "--batch-size", "0"], tmp_path)
    assert got["code"] == 2 and "--batch-size must be at least 1" in err and "torch" not in got["heavy"]
    preflight.check_model_spec("deit_tiny", random_init=True)
    (tmp_path / "w.safetensors").write_bytes(b"")
    preflight.check_model_spec("timm:vit_small_patch16_224", weights=tmp_path / "w.safetensors")
    for other in (None, "cordonnier", "hf:google/vit-base-patch16-224", "open_clip:ViT-B-32", "torchvision:vit_b_16",
                  "mypkg.models:factory", str(tmp_path)):
        preflight.check_model_spec(other)  # other sources check their own specs later


def test_the_timm_names_read_from_its_files_are_its_registry():
    timm = pytest.importorskip("timm")
    assert preflight.timm_model_names() == frozenset(timm.list_models())


def test_the_early_check_and_the_model_sources_share_their_names():
    from probe.cordonnier import DEFAULT_ALIASES
    from probe.model_sources import timm as timm_source

    assert preflight.EMBEDDED_NAMES == tuple(DEFAULT_ALIASES)
    assert timm_source.ALIASES is preflight.ALIASES
    known = preflight.timm_model_names()
    assert all(v in known for v in preflight.ALIASES.values())


def test_cached_weights_are_left_to_the_full_check(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(preflight.ProbeError, match="need the Hugging Face hub"):
        preflight.check_model_spec("deit_tiny")
    (tmp_path / "models--timm--deit_tiny_patch16_224.fb_in1k").mkdir()
    preflight.check_model_spec("deit_tiny")  # something is cached: timm's config decides later
