"""An executed Jupyter notebook (nbclient + ipykernel, the test extra) that starts from
``import probe`` and nothing else: a ``probe.plot`` figure displays inline in the fresh kernel
(no ``%matplotlib inline``, no pyplot call before it), the progress of ``probe.analyze`` is plain
text (no "IProgress not found" warning, no cursor-movement codes), an ``AnalysisResult`` shows
as HTML, a user's own ``plt.plot`` still displays inline afterwards (probe changes no matplotlib
state) and a probe figure then shows once, not twice."""

from __future__ import annotations

import pytest

nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed (test extra)")
nbclient = pytest.importorskip("nbclient", reason="nbclient is not installed (test extra)")
pytest.importorskip("ipykernel", reason="ipykernel is not installed (test extra)")

CELLS = [
    "import probe",
    "result = probe.analyze(None, num_images=4, attribution='none', null_seeds=0, n_bootstrap=10)",
    "probe.plot.distance_vs_depth(result)",
    "result",
    "import matplotlib.pyplot as plt\nplt.plot([0, 1], [1, 0])\nplt.show()",
    "probe.plot.entropy_vs_depth(result)",
    "import matplotlib\nmatplotlib.get_backend()",
]


def _outputs(cell) -> dict[str, list]:
    out: dict[str, list] = {}
    for o in cell.get("outputs", []):
        for mime, data in o.get("data", {}).items():
            out.setdefault(mime, []).append(data)
        if o.get("output_type") == "stream":
            out.setdefault("stream", []).append(o.get("text", ""))
        if o.get("output_type") == "error":
            out.setdefault("error", []).append(o.get("ename", "") + ": " + o.get("evalue", ""))
    return out


def test_a_fresh_notebook_shows_figures_progress_and_result_inline(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in CELLS])
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outs = [_outputs(c) for c in nb.cells]
    assert not any("error" in o for o in outs), [o.get("error") for o in outs]
    assert outs[0] == {}, outs[0]  # import probe prints nothing
    streams = "".join(outs[1].get("stream", []))
    assert "capture" in streams, "probe.analyze showed no progress in the notebook"
    assert "IProgress" not in streams and "Warning" not in streams, streams
    assert "\x1b[" not in streams, f"terminal escape codes in the cell output: {streams!r}"
    assert outs[2].get("image/png"), "probe.plot.distance_vs_depth did not display inline in a fresh kernel"
    html = outs[3]["text/html"][0]
    assert "<table" in html and "cordonnier" in html.lower()
    assert len(outs[3]["text/plain"][0]) < 2000  # the short __repr__, not the tables
    assert outs[4].get("image/png"), "a user's plt.plot after import probe did not display inline"
    assert len(outs[5].get("image/png", [])) == 1, "a probe figure must show once with pyplot's inline backend on"
    assert "inline" in outs[6]["text/plain"][0].lower()  # probe did not switch the backend
