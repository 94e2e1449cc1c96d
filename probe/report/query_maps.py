"""Interactive attention maps in the report: pick a layer, a head and a query patch (click on the
map or the photo), see that query's mean attention over the patch grid beside an example photo
(drawn large and untinted, pixels enlarged without smoothing).

Everything is embedded in the one HTML file (no network): per layer the mean renormalised
patch attention ``(heads, P, P)`` (:attr:`probe.analyses.reducers.LayerStats.mean_attn`,
``P = rows · cols`` patch tokens) quantised to 8 bits **on one colour scale per (layer, query)**
— the largest value of that query's row over the layer's heads maps to 255 — so heads of one
layer compare directly (a near-uniform head looks flat next to a peaked one), and the colour
bar gives the scale in attention probability. Large models are embedded at a coarser set of
query patches (every ``s``-th row and column, ``s`` chosen so that at most
:data:`MAX_VALUES` values are embedded); clicks snap to the nearest embedded query.

The report knows no tensors: inputs are numpy arrays.
"""

from __future__ import annotations

import base64
import io
import json
import math

import numpy as np

#: Upper bound on embedded attention values (bytes before base64), about 1.3 MB of HTML: queries
#: are subsampled with a stride (:func:`query_stride`) to stay under it.
MAX_VALUES = 1_000_000


def _photo_uri(photo: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def query_stride(num_layers_heads: int, rows: int, cols: int, max_values: int = MAX_VALUES) -> int:
    """Smallest stride ``s`` with ``num_layers_heads · ceil(rows/s) · ceil(cols/s) · rows · cols ≤ max_values``."""
    s = 1
    while num_layers_heads * math.ceil(rows / s) * math.ceil(cols / s) * rows * cols > max_values and s < max(rows, cols):
        s += 1
    return s


def query_maps_html(mean_attn: dict[int, np.ndarray], grids: dict[int, tuple[int, int]],
                    photo: np.ndarray | None = None, query_rc: tuple[int, int] | None = None) -> str:
    """The interactive maps as an HTML fragment (a canvas, two selects, a colour bar, inline JS).

    Args:
        mean_attn: ``{layer: array (heads, P, P)}`` mean attention over patch keys (rows = queries).
        grids: ``{layer: (rows, cols)}`` patch grid with ``rows · cols = P``.
        photo: optional ``(H, W, 3)`` uint8 example photo (the model's input view) under the maps.
        query_rc: initially selected query ``(row, col)``; default the central patch.

    Raises:
        ValueError: when an array is not ``(heads, P, P)`` with ``P = rows · cols``.
    """
    layers = sorted(mean_attn)
    n_lh = sum(int(mean_attn[l].shape[0]) for l in layers)
    payload = []
    for l in layers:
        a = np.asarray(mean_attn[l], dtype=np.float64)
        rows, cols = grids[l]
        if a.ndim != 3 or a.shape[1] != rows * cols or a.shape[2] != rows * cols:
            raise ValueError(f"layer {l}: mean attention {a.shape} is not (heads, {rows * cols}, {rows * cols})")
        s = query_stride(n_lh, rows, cols)
        q_rows, q_cols = list(range(0, rows, s)), list(range(0, cols, s))
        queries = [r * cols + c for r in q_rows for c in q_cols]
        sub = a[:, queries, :]                                   # (heads, Q, P)
        scale = sub.max(axis=(0, 2))                             # one scale per query, shared by heads
        scale = np.where(scale > 0, scale, 1.0)
        q8 = np.clip(np.rint(sub / scale[None, :, None] * 255), 0, 255).astype(np.uint8)
        payload.append({"layer": int(l), "heads": int(a.shape[0]), "rows": rows, "cols": cols,
                        "qrows": q_rows, "qcols": q_cols, "scale": [float(v) for v in scale],
                        "data": base64.b64encode(q8.transpose(1, 0, 2).tobytes()).decode("ascii")})
    r0, c0 = query_rc if query_rc is not None else (grids[layers[0]][0] // 2, grids[layers[0]][1] // 2)
    photo_tag = (f"<img id='qm-photo' src='{_photo_uri(photo)}' alt='example photo' hidden>"
                 "<canvas id='qm-photo-canvas' width='448' height='448' "
                 "style='cursor:crosshair;max-width:100%;margin-left:1em'></canvas>") if photo is not None else ""
    return (
        "<div class='qm'><p class='note'>Choose a layer and a head and click a patch of the "
        + ("map or the photo" if photo is not None else "grid") + " to make it the query (red square): the colours are "
        "that query's mean attention over the images, on one scale per layer and query shared by all heads "
        "(the colour bar, in attention probability). "
        + ("The photo (right, untinted, its pixels enlarged) is the first analysed image as the model sees it; "
           "the map is the mean over all images. " if photo is not None else "") + "</p>"
        "<label>layer <select id='qm-layer'></select></label> <label>head <select id='qm-head'></select></label> "
        "<span id='qm-info' class='note'></span><br>"
        "<canvas id='qm-canvas' width='448' height='448' style='cursor:crosshair;max-width:100%'></canvas>"
        "<canvas id='qm-bar' width='40' height='448'></canvas>" + photo_tag +
        f"<script id='qm-data' type='application/json'>{json.dumps({'layers': payload, 'query': [int(r0), int(c0)]})}</script>"
        "<script>" + _JS + "</script></div>"
    )


_JS = r"""
(function () {
  var D = JSON.parse(document.getElementById("qm-data").textContent);
  var L = D.layers, cv = document.getElementById("qm-canvas"), bar = document.getElementById("qm-bar");
  var ctx = cv.getContext("2d"), bctx = bar.getContext("2d"), photo = document.getElementById("qm-photo");
  var selL = document.getElementById("qm-layer"), selH = document.getElementById("qm-head");
  var info = document.getElementById("qm-info"), q = D.query.slice();
  var pcv = photo ? document.getElementById("qm-photo-canvas") : null, pctx = pcv ? pcv.getContext("2d") : null;
  L.forEach(function (l, i) {
    var raw = atob(l.data), b = new Uint8Array(raw.length);
    for (var j = 0; j < raw.length; j++) { b[j] = raw.charCodeAt(j); }
    l.bytes = b; selL.add(new Option(String(l.layer), String(i)));
  });
  function viridis(t) {  // 5-stop approximation of matplotlib's viridis
    var s = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
    var x = Math.min(Math.max(t, 0), 1) * 4, i = Math.min(Math.floor(x), 3), f = x - i;
    return s[i].map(function (v, k) { return Math.round(v + f * (s[i + 1][k] - v)); });
  }
  function heads() {
    var l = L[+selL.value], keep = selH.value;
    selH.innerHTML = "";
    for (var h = 0; h < l.heads; h++) { selH.add(new Option(String(h), String(h))); }
    selH.value = keep !== "" && +keep < l.heads ? keep : "0";
  }
  function nearest(list, v) {
    var best = 0;
    list.forEach(function (x, i) { if (Math.abs(x - v) < Math.abs(list[best] - v)) { best = i; } });
    return best;
  }
  function draw() {
    var l = L[+selL.value], h = +selH.value, W = cv.width, H = cv.height;
    var qi = nearest(l.qrows, q[0]), qj = nearest(l.qcols, q[1]), Q = l.qrows.length * l.qcols.length;
    var qn = qi * l.qcols.length + qj, P = l.rows * l.cols, off = (qn * l.heads + h) * P;
    ctx.clearRect(0, 0, W, H);
    var cw = W / l.cols, ch = H / l.rows;
    for (var p = 0; p < P; p++) {
      var c = viridis(l.bytes[off + p] / 255);
      ctx.fillStyle = "rgb(" + c[0] + "," + c[1] + "," + c[2] + ")";
      ctx.fillRect((p % l.cols) * cw, Math.floor(p / l.cols) * ch, Math.ceil(cw), Math.ceil(ch));
    }
    var r = l.qrows[qi], cc = l.qcols[qj];
    ctx.strokeStyle = "red"; ctx.lineWidth = 2; ctx.strokeRect(cc * cw, r * ch, cw, ch);
    if (pcv) {  // the photo beside the map: large, untinted, its pixels kept sharp
      pctx.imageSmoothingEnabled = false; pctx.clearRect(0, 0, W, H); pctx.drawImage(photo, 0, 0, W, H);
      pctx.strokeStyle = "red"; pctx.lineWidth = 2; pctx.strokeRect(cc * cw, r * ch, cw, ch);
    }
    info.textContent = "query (row " + r + ", col " + cc + ") of a " + l.rows + "×" + l.cols +
      " grid; largest value of this query over the layer's heads: " + l.scale[qn].toPrecision(3);
    for (var y = 0; y < bar.height; y++) {
      var cb = viridis(1 - y / bar.height); bctx.fillStyle = "rgb(" + cb.join(",") + ")"; bctx.fillRect(0, y, 14, 1);
    }
    bctx.clearRect(15, 0, 25, bar.height); bctx.fillStyle = "#222"; bctx.font = "10px sans-serif";
    bctx.fillText(l.scale[qn].toPrecision(2), 15, 10); bctx.fillText("0", 15, bar.height - 2);
    cv.dataset.layer = l.layer; cv.dataset.head = h; cv.dataset.query = r + "," + cc;
  }
  function pick(e) {
    var l = L[+selL.value], rect = e.target.getBoundingClientRect();
    q = [Math.floor((e.clientY - rect.top) / rect.height * l.rows), Math.floor((e.clientX - rect.left) / rect.width * l.cols)];
    draw();
  }
  cv.addEventListener("click", pick);
  if (pcv) { pcv.addEventListener("click", pick); }
  selL.addEventListener("change", function () { heads(); draw(); });
  selH.addEventListener("change", draw);
  heads();
  if (photo && !photo.complete) { photo.addEventListener("load", draw); } else { draw(); }
})();
"""
