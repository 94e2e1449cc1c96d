"""The analysis extension point (probe.analyses.base), used from OUTSIDE the package as
docs/analyses.md describes: a streaming, a stats-consuming and a model-consuming analysis
registered here, their columns in result.heads / result.layers, their sections in the report,
their options from Python and the CLI's --set, skipping, and the checks of the interface."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
import torch

import probe
from probe.analyses.base import (CORE, Analysis, AnalysisContext, ReportInput, SkipAnalysis, analyses,
                                 describe, get_analysis, option, parse_assignments, register_analysis,
                                 resolve_selection, unregister_analysis)
from probe.errors import ProbeError

from conftest import tiny_vit

INPUT = {"input_size": (3, 32, 32)}


def _analyze(*args, **kw):
    """probe.analyze on the 32x32 tiny ViT."""
    return probe.analyze(*args, data_overrides=INPUT, **kw)


class EntropyReducer:
    """Mean over images and patch queries of -sum_k A ln A over all keys: the definition of
    probe's entropy_nats, computed here on the raw batches (an independent code path)."""

    def __init__(self, prefix: int) -> None:
        self.prefix, self.sum, self.n = prefix, None, 0

    def update(self, attn: torch.Tensor) -> None:
        a = attn[:, :, self.prefix:, :].double()  # patch queries
        h = -(a * torch.log(a.clamp_min(1e-300))).sum(-1).mean(-1)  # (batch, heads)
        self.sum = h.sum(0) if self.sum is None else self.sum + h.sum(0)
        self.n += attn.shape[0]

    def result(self) -> dict:
        return {"mean": (self.sum / self.n).numpy(), "images": self.n}


@dataclass(frozen=True)
class PluginEntropyOptions:
    scale: float = option(1.0, help="multiplies the column (to see options arrive)")


@register_analysis
class PluginEntropy(Analysis):
    name = "test_plugin_entropy"
    title = "plugin entropy"
    consumes = ("attention",)
    Options = PluginEntropyOptions
    head_columns = ("plugin_entropy_nats",)
    layer_columns = ("plugin_images",)

    def reducer(self, layer, geometry, ctx):
        return EntropyReducer(geometry.num_prefix_tokens)

    def run(self, ctx: AnalysisContext) -> None:
        heads, layers = [], []
        for layer, r in ctx.reduced[self.name].items():
            heads.append(pd.DataFrame({"layer": layer, "head": np.arange(len(r["mean"])),
                                       "plugin_entropy_nats": self.options.scale * r["mean"]}))
            layers.append({"layer": layer, "plugin_images": r["images"]})
        ctx.add_head_columns(pd.concat(heads, ignore_index=True))
        ctx.add_layer_columns(pd.DataFrame(layers))
        ctx.result.extras[self.name] = {"layers": len(layers)}

    @classmethod
    def section(cls, report: ReportInput):
        assert "plugin_entropy_nats" in report.heads
        return {"title": "Plugin entropy section", "html": f"<p id='plugin'>{report.value['layers']} layers</p>"}


@register_analysis
class PluginSpread(Analysis):
    """Consumes the finished statistics (and requires the plugin above, to test ordering)."""

    name = "test_plugin_spread"
    consumes = ("stats",)
    requires = ("test_plugin_entropy",)
    layer_columns = ("plugin_distance_range_px",)

    def run(self, ctx):
        assert "plugin_entropy_nats" in ctx.result.heads  # its requirement ran first
        g = ctx.result.heads.groupby("layer")["mean_distance_px"]
        ctx.add_layer_columns((g.max() - g.min()).rename("plugin_distance_range_px").reset_index())


@register_analysis
class PluginLogits(Analysis):
    """Consumes the model and the first 3 images (re-runs a forward pass)."""

    name = "test_plugin_logits"
    consumes = ("model",)
    layer_columns = ("plugin_logit_mean",)

    def images_needed(self):
        return 3

    def run(self, ctx):
        with torch.no_grad():
            value = float(ctx.net(ctx.images).double().mean())
        ctx.result.extras[self.name] = {"n": int(ctx.images.shape[0])}
        ctx.add_layer_columns(pd.DataFrame({"layer": ctx.layers, "plugin_logit_mean": value}))


@register_analysis
class PluginSkips(Analysis):
    name = "test_plugin_skips"
    title = "plugin that skips"

    def run(self, ctx):
        raise SkipAnalysis("this model has no widgets")


def _images(n: int = 5) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(4))


def test_registered_plugins_add_columns_and_report_sections(tmp_path):
    net, x = tiny_vit(), _images(5)
    res = _analyze(net, x, batch_size=2, n_bootstrap=0, conv_test=False, fits=False, attribution="none",
                        analyses=["test_plugin_spread", PluginLogits(), "test_plugin_skips"],
                        analysis_options={"test_plugin_entropy": {"scale": 2.0}}, progress=False)
    # requirement added and run first; probe's core first of all
    assert res.meta["analyses"] == [CORE, "test_plugin_entropy", "test_plugin_spread", "test_plugin_logits"]
    assert res.meta["analyses_skipped"] == {"test_plugin_skips": "this model has no widgets"}
    # streaming: every batch of 2, 2, 1 images reached the reducer; the independent entropy
    # equals probe's entropy_nats (times the option)
    assert (res.layers["plugin_images"] == 5).all()
    np.testing.assert_allclose(res.heads["plugin_entropy_nats"], 2.0 * res.heads["entropy_nats"], rtol=1e-6)
    # stats-consuming: from the tables
    g = res.heads.groupby("layer")["mean_distance_px"]
    np.testing.assert_allclose(res.layers["plugin_distance_range_px"], (g.max() - g.min()).to_numpy())
    # model-consuming: got exactly the first 3 analysed images
    with torch.no_grad():
        expect = float(net(x[:3]).double().mean())
    assert res.extras["test_plugin_logits"] == {"n": 3}
    assert res.layers["plugin_logit_mean"].iloc[0] == pytest.approx(expect, rel=1e-6)

    report = res.write_report(tmp_path / "out")
    html = report.read_text()
    assert "Plugin entropy section" in html and "<p id='plugin'>3 layers</p>" in html
    assert "Plugin that skips: skipped" in html and "this model has no widgets" in html
    csv = pd.read_csv(report.parent / "heads.csv")
    assert "plugin_entropy_nats" in csv.columns


def test_plugin_columns_follow_the_builtin_ones_and_builtins_are_unchanged():
    net, x = tiny_vit(), _images(3)
    kw = dict(batch_size=3, n_bootstrap=0, null_seeds=0, attribution="none", progress=False)
    plain = _analyze(net, x, **kw)
    more = _analyze(net, x, analyses=["test_plugin_entropy"], **kw)
    assert list(more.heads.columns) == list(plain.heads.columns) + ["plugin_entropy_nats"]
    pd.testing.assert_frame_equal(more.heads[plain.heads.columns], plain.heads)


def test_registry_lists_builtins_in_run_order_and_describes_options():
    reg = analyses()
    assert list(reg)[:4] == [CORE, "quadratic", "convlike", "attribution"]
    assert get_analysis("test_plugin_entropy") is PluginEntropy
    text = describe()
    assert "convlike.null_seeds = 3  [--null-seeds]" in text
    assert "test_plugin_entropy.scale = 1.0" in text
    order = [a.name for a in resolve_selection([get_analysis("convlike")()])]
    assert order == [CORE, "quadratic", "convlike"]


def test_options_from_keywords_dicts_and_the_cli_set_syntax():
    assert PluginEntropy(scale=3.0).options.scale == 3.0
    assert PluginEntropy({"scale": 3.0}).options == PluginEntropy(PluginEntropyOptions(3.0)).options
    with pytest.raises(ProbeError, match="no option"):
        PluginEntropy(sclae=3.0)
    parsed = parse_assignments(["test_plugin_entropy.scale=0.5", "quadratic.anisotropic=yes",
                                "convlike.null_seeds=2", "convlike.null_layers=all"])
    assert parsed == {"test_plugin_entropy": {"scale": 0.5}, "quadratic": {"anisotropic": True},
                      "convlike": {"null_seeds": 2, "null_layers": "all"}}
    for bad, msg in (("quadratic.anisotropic", "ANALYSIS.OPTION=VALUE"), ("nope.x=1", "unknown analysis"),
                     ("quadratic.aniso=1", "no option"), ("convlike.null_seeds=two", "not an integer"),
                     ("convlike.null_layers=some", "not one of"), ("convlike.config=x", "cannot be set")):
        with pytest.raises(ProbeError, match=msg):
            parse_assignments([bad])


def test_bad_selections_fail_before_any_work():
    net = tiny_vit()
    for kw, msg in ((dict(analyses=["no_such_analysis"]), "unknown analysis"),
                    (dict(analysis_options={"test_plugin_entropy": {"scale": 1.0}}), "not selected"),
                    (dict(analyses=[PluginEntropy(scale=1.0), PluginEntropy(scale=2.0)]), "twice"),
                    (dict(analysis_options={"convlike": {"null_layers": "some"}}), "null-layers"),
                    (dict(attribution="gradcam"), "unknown --attribution")):
        with pytest.raises(ProbeError, match=msg):
            _analyze(net, "/nonexistent/images", progress=False, **kw)  # no image is read


def test_registration_is_checked_and_a_missing_declared_column_is_an_error():
    class NoName(Analysis):
        pass

    class BadConsumes(Analysis):
        name = "test_bad_consumes"
        consumes = ("pixels",)

    for cls, msg in ((NoName, "identifier"), (BadConsumes, "consumes")):
        with pytest.raises(ProbeError, match=msg):
            register_analysis(cls)
    with pytest.raises(ProbeError, match="not registered"):
        _analyze(tiny_vit(), _images(1), analyses=[NoName()], progress=False)

    @register_analysis
    class Liar(Analysis):
        name = "test_liar"
        head_columns = ("never_added",)

        def run(self, ctx):
            pass

    try:
        with pytest.raises(ProbeError, match="never_added"):
            _analyze(tiny_vit(), _images(1), fits=False, conv_test=False, attribution="none",
                          analyses=["test_liar"], progress=False)
    finally:
        unregister_analysis("test_liar")
    assert "test_liar" not in analyses()
    with pytest.raises(ProbeError, match="cannot be unregistered"):
        unregister_analysis(CORE)


def test_adding_an_existing_column_is_refused():
    @register_analysis
    class Clash(Analysis):
        name = "test_clash"

        def run(self, ctx):
            ctx.add_head_columns(ctx.result.heads[["layer", "head", "entropy_nats"]])

    try:
        with pytest.raises(ProbeError, match="already in the heads table"):
            _analyze(tiny_vit(), _images(1), fits=False, conv_test=False, attribution="none",
                          analyses=["test_clash"], progress=False)
    finally:
        unregister_analysis("test_clash")


def test_cli_runs_a_registered_analysis_with_set(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import probe.models
    from probe.cli import app

    real = probe.models.resolve_model
    monkeypatch.setattr("probe.pipeline.resolve_model", lambda *a, **k: real(tiny_vit(), **k))
    x = tmp_path / "img.png"
    from PIL import Image

    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(x)
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["analyze", "--images", str(x), "--out", str(out), "--no-conv-test",
                                 "--attribution", "none", "--analysis", "test_plugin_entropy",
                                 "--set", "test_plugin_entropy.scale=0", "--input-size", "3,32,32"])
    assert r.exit_code == 0, r.output
    heads = pd.read_csv(out / "heads.csv")
    assert (heads["plugin_entropy_nats"] == 0).all()
    bad = CliRunner().invoke(app, ["analyze", "--images", str(x), "--out", str(tmp_path / "o2"),
                                   "--set", "test_plugin_entropy.scale"])
    assert bad.exit_code == 2 and "ANALYSIS.OPTION=VALUE" in bad.output
    assert math.isfinite(heads["entropy_nats"].iloc[0])


def test_analysis_files_are_written_and_checked(tmp_path):
    """An analysis's own files land in the output folder; paths and probe's own names are refused."""
    from probe.analyses.base import Analysis, analysis_files, register_analysis, unregister_analysis

    class Files(Analysis):
        name = "test_files_analysis"
        target = "notes.txt"

        def run(self, ctx):
            ctx.result.extras[self.name] = {"n": 1}

        @classmethod
        def files(cls, report):
            return {cls.target: f"n={report.value['n']}".encode()}

    register_analysis(Files)
    try:
        import pandas as pd

        extras = {"test_files_analysis": {"n": 1}}
        assert analysis_files(pd.DataFrame(), pd.DataFrame(), {}, extras) == {"notes.txt": b"n=1"}
        for bad in ("heads.csv", "../x.txt", "sub/x.txt"):
            Files.target = bad
            with pytest.raises(ProbeError, match="plain"):
                analysis_files(pd.DataFrame(), pd.DataFrame(), {}, extras)
    finally:
        unregister_analysis("test_files_analysis")


def test_run_order_does_not_depend_on_which_module_is_imported_first():
    """Importing one built-in analysis module before the registry loads used to move it to the
    end of the run order (and its columns to the end of heads.csv)."""
    import subprocess
    import sys

    code = "import {m}; from probe.analyses.base import analyses; print(','.join(analyses()))"
    orders = {subprocess.run([sys.executable, "-c", code.format(m=m)], capture_output=True, text=True,
                             check=True).stdout.strip()
              for m in ("probe.analyses.distance_modes", "probe.analyses.sinks", "probe.analyses.nmi", "probe")}
    assert len(orders) == 1, orders
    assert orders.pop().split(",")[:4] == ["distance_entropy", "quadratic", "convlike", "attribution"]
