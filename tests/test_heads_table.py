"""The report's grouped heads table (probe.report.heads_table): groups, units, formats, "—"
for the centres of non-local heads, SE columns beside their value."""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest

from probe.report.heads_table import display_order, format_value, group_of, heads_table_html


def _frame() -> pd.DataFrame:
    return pd.DataFrame({
        "layer": [0, 0], "head": [0, 1],
        "mean_distance_px": [12.345, 99.0], "entropy_nats": [1.23456, 4.0],
        "delta_row": [-1.004, 53.5], "delta_col": [0.5, -40.0], "alpha": [6.51e-05, 0.0],
        "delta_row_se": [0.01, 3.0], "quad_status": ["ok", "non_local"],
        "r90_patches": [1.5, math.inf], "my_score": [0.25, np.nan],
    })


def test_groups_and_order():
    cols = display_order(list(_frame().columns))
    assert cols[:2] == ["layer", "head"]
    assert cols.index("delta_row_se") == cols.index("delta_row") + 1
    assert group_of("conv_p_holm") == "conv test"
    assert group_of("my_score") == "other" and cols[-1] == "my_score"


def test_formats():
    assert format_value("alpha", 6.51e-05) == "6.51·10⁻⁵"
    assert format_value("mean_distance_px", 12.345) == "12.3"
    assert format_value("delta_row", -1.004) == "−1.00"
    assert format_value("entropy_nats", 1.23456) == "1.235"
    assert format_value("r90_patches", math.inf) == "∞"
    assert format_value("my_score", float("nan")) == "—"
    assert format_value("quad_local", True) == "yes"


def test_non_local_centre_is_a_dash_and_raw_values_kept():
    html = heads_table_html(_frame())
    rows = re.findall(r"<tr>(.*?)</tr>", html.split("<tbody>")[1])
    cells = [re.findall(r"<td data-value='([^']*)'>([^<]*)</td>", r) for r in rows]
    cols = display_order(list(_frame().columns))
    i = cols.index("delta_row")
    assert cells[0][i] == (repr(-1.004), "−1.00")
    assert cells[1][i] == ("", "—")  # non-local: no centre
    assert cells[1][cols.index("delta_row_se")] == ("", "—")
    assert cells[1][cols.index("mean_distance_px")][1] == "99.0"  # the rest of the row is shown
    header = re.findall(r"<th colspan='(\d+)' class='group'>([^<]*)</th>", html)
    assert sum(int(n) for n, _ in header) == len(cols)
    assert "1/patch²" in html and "nats" in html
    visible = [text for row in cells for _, text in row]
    assert not any("e-0" in t or "inf" in t for t in visible)
