"""The report's interactive query maps (probe.report.query_maps): the embedded bytes decode to
the mean attention on one scale per (layer, query) shared by the heads; large models embed a
coarser query lattice within the size bound."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest

from probe.report.query_maps import query_maps_html, query_stride


def _payload(html: str) -> dict:
    return json.loads(re.search(r"<script id='qm-data' type='application/json'>(.*?)</script>", html, re.S).group(1))


def test_bytes_decode_to_the_attention_on_a_shared_scale():
    rng = np.random.default_rng(0)
    a = rng.random((3, 12, 12))
    a /= a.sum(-1, keepdims=True)
    d = _payload(query_maps_html({5: a}, {5: (3, 4)}))
    l = d["layers"][0]
    assert (l["layer"], l["heads"], l["rows"], l["cols"]) == (5, 3, 3, 4)
    q8 = np.frombuffer(base64.b64decode(l["data"]), dtype=np.uint8).reshape(12, 3, 12)  # (query, head, key)
    scale = a.max(axis=(0, 2))
    np.testing.assert_allclose(l["scale"], scale)
    expect = np.rint(a.transpose(1, 0, 2) / scale[:, None, None] * 255)
    np.testing.assert_array_equal(q8, expect)
    assert d["query"] == [1, 2]


def test_coarser_queries_for_large_models_and_bad_shape():
    import math

    def size(s: int) -> int:
        return 144 * math.ceil(16 / s) ** 2 * 256

    s = query_stride(144, 16, 16, max_values=4_500_000)
    assert size(s) <= 4_500_000 < size(s - 1)  # the smallest stride within the bound
    with pytest.raises(ValueError, match="not \\(heads, 12, 12\\)"):
        query_maps_html({0: np.zeros((2, 10, 10))}, {0: (3, 4)})
