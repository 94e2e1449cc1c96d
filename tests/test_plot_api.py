"""``probe.plot``: every function returns a matplotlib Figure and touches no pyplot state."""

from __future__ import annotations

import matplotlib
import pytest
import torch
from matplotlib.figure import Figure

import probe
import probe.plot


def test_every_plot_function_returns_a_figure_without_global_state():
    backend = matplotlib.get_backend()
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    res = probe.analyze(None, torch.randn(3, 3, 32, 32), attribution="ablation", attribution_images=2,
                        analyses=["distance_modes", "nmi", "rollout", "sinks"])
    for name in probe.plot.__all__:
        fig = getattr(probe.plot, name)(res)
        assert isinstance(fig, Figure), name
        png = fig._repr_png_()  # IPython's display protocol: inline in a fresh kernel, no pyplot
        assert png[:8] == b"\x89PNG\r\n\x1a\n", name
    assert isinstance(probe.plot.centres(res, layer=3), Figure)
    assert isinstance(probe.plot.attention_maps(res, query=(0, 15)), Figure)
    assert len(probe.plot.rollout(res).axes) == 3  # one panel per image
    assert isinstance(probe.plot.sink_positions(res, layer=0), Figure)
    assert plt.get_fignums() == before  # no pyplot figure was opened
    assert matplotlib.get_backend() == backend  # importing probe / plotting did not switch backends


def test_plot_errors_name_the_missing_analysis():
    res = probe.analyze(None, torch.randn(2, 3, 32, 32), attribution="none", fits=False, conv_test=False)
    with pytest.raises(probe.ProbeError, match="no Δ/α fits"):
        probe.plot.centres(res)
    with pytest.raises(probe.ProbeError, match="no conv test"):
        probe.plot.conv_scores(res)
    with pytest.raises(probe.ProbeError, match="no head attribution"):
        probe.plot.attribution_scatter(res)
    for name, pattern in (("distance_modes", "distance_modes"), ("nmi", "'nmi'"), ("rollout", "'rollout'"),
                          ("sink_norms", "'sinks'"), ("sink_positions", "'sinks'")):
        with pytest.raises(probe.ProbeError, match=pattern):
            getattr(probe.plot, name)(res)
    with pytest.raises(probe.ProbeError, match="AnalysisResult"):
        probe.plot.distance_vs_depth("not a result")
    with pytest.raises(probe.ProbeError, match="patch grid"):
        probe.plot.attention_maps(res, query=(16, 0))
