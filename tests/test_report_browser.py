"""A real report opened in headless Chromium (Debian's ``chromium``, driven by Playwright):
no console errors, no network requests, every table-of-contents link resolves, tables sort on
click, the grouped heads table shows units and "—" for the centres of non-local heads.

Skipped with the reason when Playwright or a Chromium binary is not installed (``.ci/run``
installs Debian's ``chromium``; Playwright comes with the ``test`` extra).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

playwright_sync = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (test extra)")

CHROMIUM = next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium binary (apt-get install chromium)")


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    import probe

    result = probe.analyze(None, num_images=8, attribution_images=4, ig_steps=4, null_seeds=1, null_images=2,
                           n_bootstrap=20)
    out = tmp_path_factory.mktemp("report") / "run"
    result.write_report(out)
    return out / "report.html"


@pytest.fixture(scope="module")
def page(report):
    with playwright_sync.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        events = {"console_errors": [], "page_errors": [], "requests": []}
        page.on("console", lambda m: events["console_errors"].append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: events["page_errors"].append(str(e)))
        page.on("request", lambda r: events["requests"].append(r.url))
        page.goto(report.as_uri())
        page.wait_for_load_state("load")
        page.events = events
        yield page
        browser.close()


def test_no_console_errors_and_no_network(page, report):
    ev = page.events
    assert ev["console_errors"] == [] and ev["page_errors"] == []
    remote = [u for u in ev["requests"] if not (u.startswith("file:") or u.startswith("data:"))]
    assert remote == [], f"the report asked the network for {remote}"
    assert report.as_uri() in ev["requests"]  # the listener did see requests


def test_toc_links_resolve(page):
    hrefs = page.eval_on_selector_all("nav.toc a", "els => els.map(e => e.getAttribute('href'))")
    assert len(hrefs) >= 6
    for href in hrefs:
        assert href.startswith("#")
        assert page.locator(f"[id='{href[1:]}']").count() == 1, f"TOC link {href} has no target"
    page.click(f"nav.toc a[href='{hrefs[-1]}']")
    assert page.evaluate("location.hash") == hrefs[-1]


def _column_values(page, table: str, col: int) -> list[float]:
    return page.eval_on_selector(
        table, f"t => Array.from(t.tBodies[0].rows).map(r => parseFloat(r.cells[{col}].dataset.value "
               f"|| r.cells[{col}].textContent))")


def test_heads_table_sorts_on_click(page):
    page.click("details:has(table.heads) > summary")  # open the <details>
    table = "table.heads"
    headers = page.eval_on_selector_all(f"{table} thead tr:last-child th", "els => els.map(e => e.dataset.column)")
    col = headers.index("mean_distance_px")
    before = _column_values(page, table, col)
    assert before != sorted(before)  # in (layer, head) order, not already sorted by distance
    page.locator(f"{table} thead tr:last-child th").nth(col).click()
    asc = _column_values(page, table, col)
    assert asc == sorted(before)
    page.locator(f"{table} thead tr:last-child th").nth(col).click()
    assert _column_values(page, table, col) == sorted(before, reverse=True)


def test_heads_table_groups_units_and_non_local_centres(page, report):
    import pandas as pd

    heads = pd.read_csv(report.parent / "heads.csv")
    groups = page.eval_on_selector_all("table.heads tr.groups th", "els => els.map(e => e.textContent)")
    assert groups[:3] == ["head", "attention distance", "entropy and prefix tokens"]
    spans = page.eval_on_selector_all("table.heads tr.groups th", "els => els.map(e => e.colSpan)")
    assert sum(spans) == len(heads.columns)
    titles = page.eval_on_selector_all("table.heads thead tr:last-child th", "els => els.map(e => e.dataset.column)")
    assert sorted(titles) == sorted(heads.columns)
    col = titles.index("delta_row")
    cells = page.eval_on_selector(
        "table.heads", f"t => Array.from(t.tBodies[0].rows).map(r => [r.cells[0].textContent, r.cells[1].textContent, r.cells[{col}].textContent])")
    shown = {(int(l), int(h)): text for l, h, text in cells}
    # (the "—" branch on planted non-local rows: tests/test_heads_table.py)
    for _, r in heads.iterrows():
        text = shown[(int(r["layer"]), int(r["head"]))]
        if r.quad_status == "non_local":
            assert text == "—"
        else:
            assert float(text.replace("−", "-")) == pytest.approx(r.delta_row, abs=0.006)


def test_query_maps_follow_a_click(page):
    canvas = page.locator("#qm-canvas")
    canvas.scroll_into_view_if_needed()
    start = canvas.get_attribute("data-query")
    rows, cols, qrows, qcols = page.evaluate(
        "(() => { const d = JSON.parse(document.getElementById('qm-data').textContent);"
        " return [d.layers[0].rows, d.layers[0].cols, d.layers[0].qrows, d.layers[0].qcols]; })()")
    assert start == f"{rows // 2},{cols // 2}"  # the central patch first
    box = canvas.bounding_box()
    page.mouse.click(box["x"] + 2, box["y"] + box["height"] - 2)  # bottom-left patch
    # large models embed a coarser lattice of query patches: the nearest one to the click is shown
    nearest_row = min(qrows, key=lambda r: (abs(r - (rows - 1)), r))  # ties: the first, as the page
    nearest_col = min(qcols, key=lambda c: (abs(c - 0), c))
    assert canvas.get_attribute("data-query") == f"{nearest_row},{nearest_col}"
    page.select_option("#qm-head", "1")
    assert canvas.get_attribute("data-head") == "1"
    assert page.events["page_errors"] == []
