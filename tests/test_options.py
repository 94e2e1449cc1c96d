"""One vocabulary for the command line and the library (:mod:`probe.options`): every option of
``probe analyze`` is a keyword of ``probe.analyze`` (the keyword set is derived from the command's
own parameters), the library takes the command's value forms and gives the same tables as the
command, and library errors name the keyword with the flag."""

from __future__ import annotations

import inspect

import pandas as pd
import pytest
import typer
from typer.testing import CliRunner

import probe
from probe.cli import app
from probe.options import CONV_KEYWORDS, LIBRARY_NAMES, library_message


def _analyze_params():
    return typer.main.get_command(app).commands["analyze"].params


def test_every_cli_option_is_a_library_keyword():
    keywords = set(inspect.signature(probe.analyze).parameters)
    cli = {LIBRARY_NAMES.get(p.name, p.name) for p in _analyze_params()}
    assert len(cli) > 30
    assert cli - keywords == set(), "probe analyze options that probe.analyze does not take"
    assert set(CONV_KEYWORDS) <= keywords


def test_the_library_takes_the_command_forms_and_gives_the_commands_tables(tmp_path):
    opts = {"num_images": 3, "local_radius": 1.5, "kernel_size": 3, "conv_level": 0.05, "null_seeds": 0,
            "workers": 0, "input_size": "3,32,32", "query": "2,3", "layers": "0-2"}
    lib = probe.analyze(None, progress=False, out=tmp_path / "lib", **opts)
    cfg = lib.extras["convlike"].config
    assert (cfg.r_local, cfg.kernel_size, cfg.level) == (1.5, 3, 0.05)
    assert (tmp_path / "lib" / "report.html").is_file() and (tmp_path / "lib" / "result.json").is_file()
    args = [a for k, v in opts.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    run = CliRunner().invoke(app, ["analyze", *args, "--out", str(tmp_path / "cli")])
    assert run.exit_code == 0, run.output
    for name in ("heads.csv", "layers.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "lib" / name), pd.read_csv(tmp_path / "cli" / name))


def test_library_errors_name_the_keyword_and_the_flag(tmp_path):
    with pytest.raises(probe.ProbeError) as lib:
        probe.analyze(None, layers="0-99", progress=False)
    assert str(lib.value).endswith("fix --layers (as probe.analyze keywords: --layers is layers=)")
    run = CliRunner().invoke(app, ["analyze", "--layers", "0-99", "--out", str(tmp_path / "o")])
    assert run.exit_code == 2 and "--layers" in run.output and "layers=" not in run.output
    with pytest.raises(probe.ProbeError, match=r"--local-radius must be a positive.*--local-radius is local_radius="):
        probe.analyze(None, local_radius=0, progress=False)
    with pytest.raises(probe.ProbeError, match="either conv_config or"):
        probe.analyze(None, conv_config=probe.analyses.convlike.ConvLikeConfig(), kernel_size=3, progress=False)
    with pytest.raises(probe.ProbeError, match=r"--out .* is an existing file.*--out is out="):
        (tmp_path / "f").write_text("x")
        probe.analyze(None, out=tmp_path / "f", progress=False)
    # boolean flags show their value; other text is left alone
    assert library_message("pass --random-init or --no-fits; see --nproc-per-node") == \
        "pass --random-init or --no-fits; see --nproc-per-node (as probe.analyze keywords: " \
        "--random-init is random_init=True, --no-fits is fits=False)"


def test_dir_lists_the_lazy_names():
    names = dir(probe)
    assert {"analyze", "load", "compare", "plot", "AnalysisResult", "ProbeError"} <= set(names)
    assert all(hasattr(probe, n) for n in probe.__all__)
