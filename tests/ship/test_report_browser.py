"""The committed reference run's report.html opened in a real browser (headless Chromium, tests/browser.py).

The report a search exports is opened the same way in test_search.py, on that file's tiny search. Set
XRAY_RAY_REPORT_SCREENSHOT=path to keep a screenshot of the reference report (docs/img/report.png is made that way).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from browser import check_report

from conftest import ROOT

REFERENCE = ROOT / "results" / "reference" / "best"


@pytest.mark.skipif(not (REFERENCE / "report.html").is_file(), reason="no committed reference report")
def test_the_reference_report_renders_in_a_browser(browser, tmp_path):
    check_report(browser, REFERENCE / "report.html", width=1160, height=1000)
    target = os.environ.get("XRAY_RAY_REPORT_SCREENSHOT")
    shot = Path(target) if target else tmp_path / "report.png"
    browser.screenshot(shot)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
