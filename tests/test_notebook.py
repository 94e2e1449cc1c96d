"""An executed Jupyter notebook (nbclient + ipykernel, the test extra): after ``import probe`` a
user's own ``plt.plot`` still displays inline (probe changes no matplotlib state), a
``probe.plot`` figure displays inline, and an ``AnalysisResult`` shows as HTML."""

from __future__ import annotations

import pytest

nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed (test extra)")
nbclient = pytest.importorskip("nbclient", reason="nbclient is not installed (test extra)")
pytest.importorskip("ipykernel", reason="ipykernel is not installed (test extra)")

CELLS = [
    "%matplotlib inline\nimport matplotlib.pyplot as plt\nimport probe\n"
    "result = probe.analyze(None, num_images=4, attribution='none', null_seeds=0, n_bootstrap=10, progress=False)",
    "plt.plot([0, 1], [1, 0])\nplt.show()",
    "probe.plot.distance_vs_depth(result)",
    "result",
    "import matplotlib\nmatplotlib.get_backend()",
]


def _outputs(cell) -> dict[str, list]:
    out: dict[str, list] = {}
    for o in cell.get("outputs", []):
        for mime, data in o.get("data", {}).items():
            out.setdefault(mime, []).append(data)
        if o.get("output_type") == "error":
            out.setdefault("error", []).append(o.get("ename", "") + ": " + o.get("evalue", ""))
    return out


def test_notebook_shows_figures_and_result_inline(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in CELLS])
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outs = [_outputs(c) for c in nb.cells]
    assert not any("error" in o for o in outs), [o.get("error") for o in outs]
    assert "image/png" in outs[1], "a user's plt.plot after import probe did not display inline"
    assert "image/png" in outs[2], "probe.plot.distance_vs_depth did not display inline"
    html = outs[3]["text/html"][0]
    assert "<table" in html and "cordonnier" in html.lower()
    assert len(outs[3]["text/plain"][0]) < 2000  # the short __repr__, not the tables
    assert "inline" in outs[4]["text/plain"][0].lower()  # probe did not switch the backend
