"""Headless Chromium for the tests, driven over the DevTools protocol, and the checks a report must pass.

The browser is the system's (Debian's `chromium` package; `.ci/run` installs it where it is missing), spoken
to through `--remote-debugging-pipe`: NUL-terminated JSON on file descriptors 3 and 4, so no websocket
library and no Playwright browser download is needed. The `browser` fixture (tests/conftest.py) skips
without a browser, except under CI (the CI environment variable set), where it fails.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
METRIC_ROWS = ("accuracy", "recall (sensitivity)", "specificity", "roc_auc", "brier")


TRAMPOLINE = (
    "import os, sys; os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4); os.execv(sys.argv[3], sys.argv[3:])"
)

# What the page reports about itself once loaded: run in the page by Runtime.evaluate.
PAGE_FACTS = """JSON.stringify({
  images: [...document.images].map(i => ({alt: i.alt, complete: i.complete, width: i.naturalWidth})),
  headings: [...document.querySelectorAll('h2')].map(h => h.textContent.trim()),
  threshold: (() => { const h = [...document.querySelectorAll('h2')].find(h => h.textContent === 'Threshold');
                      const b = h && h.nextElementSibling && h.nextElementSibling.querySelector('b');
                      return b ? b.textContent : null; })(),
  metricRows: (() => { const h = [...document.querySelectorAll('h2')].find(h => h.textContent === 'Metrics');
                       let el = h; while (el && el.tagName !== 'TABLE') el = el.nextElementSibling;
                       return el ? [...el.querySelectorAll('tr')].map(r => r.cells[0].textContent.trim()) : []; })(),
  tables: document.querySelectorAll('table').length,
  title: document.title,
})"""


def find_browser() -> str | None:
    explicit = os.environ.get("XRAY_RAY_CHROMIUM")
    if explicit:
        return explicit
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


class Chromium:
    """A headless Chromium and one page, spoken to over the DevTools pipe."""

    def __init__(self, binary: str, profile: Path) -> None:
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        args = [
            binary,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--hide-scrollbars",
            "--remote-debugging-pipe",
            f"--user-data-dir={profile}",
            "about:blank",
        ]
        # Chromium reads commands on fd 3 and answers on fd 4: a small trampoline moves the pipe ends
        # there and execs the browser (no shell, and no preexec_fn in a process that may run threads).
        self.proc = subprocess.Popen(
            [sys.executable, "-c", TRAMPOLINE, str(to_browser_r), str(from_browser_w), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=(to_browser_r, from_browser_w),
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer, self._next_id, self.events = b"", 0, []
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable", session=self.session)

    def _read_message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            if time.monotonic() > deadline:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._from_browser, 1 << 16)
            if not chunk:
                raise RuntimeError(f"Chromium closed the DevTools pipe (exit status {self.proc.poll()})")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, session: str | None = None, timeout: float = 60, **params: Any) -> dict[str, Any]:
        """Send one command and return its result; events that arrive meanwhile are kept in self.events."""
        self._next_id += 1
        command: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session:
            command["sessionId"] = session
        os.write(self._to_browser, json.dumps(command).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            message = self._read_message(deadline)
            if message.get("id") == self._next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]
            self.events.append(message)

    def wait_for(self, event: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        seen = len(self.events)
        while True:
            for message in self.events[seen:]:
                if message.get("method") == event:
                    return message
            seen = len(self.events)
            self.events.append(self._read_message(deadline))

    def open(self, path: Path, width: int = 1100, height: int = 1400) -> dict[str, Any]:
        """Load a file, wait for its load event, and return the page's facts (PAGE_FACTS)."""
        self.send(
            "Emulation.setDeviceMetricsOverride",
            session=self.session,
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )
        self.events.clear()
        self.send("Page.navigate", session=self.session, url=path.resolve().as_uri())
        self.wait_for("Page.loadEventFired")
        # decode() settles every picture, however it is embedded, before the facts are read
        self.send(
            "Runtime.evaluate",
            session=self.session,
            awaitPromise=True,
            expression="Promise.all([...document.images].map(i => i.decode().catch(() => null)))",
        )
        facts = self.send("Runtime.evaluate", session=self.session, expression=PAGE_FACTS, returnByValue=True)
        return json.loads(facts["result"]["value"])

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and failed loads the page has produced."""
        found = []
        for message in self.events:
            method, params = message.get("method"), message.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                found.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
            elif method == "Runtime.exceptionThrown":
                found.append("exception: " + params["exceptionDetails"].get("text", ""))
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                found.append(f"log ({params['entry'].get('source')}): {params['entry'].get('text')}")
        return found

    def screenshot(self, path: Path) -> None:
        png = self.send("Page.captureScreenshot", session=self.session, format="png")["data"]
        path.write_bytes(base64.b64decode(png))

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)


def check_report(browser: Chromium, report: Path, **viewport: int) -> dict[str, Any]:
    facts = browser.open(report, **viewport)
    assert browser.errors() == [], browser.errors()
    assert facts["title"] == "xray_ray report"
    # every picture decoded: a broken or empty one has natural width 0
    assert facts["images"], "no pictures in the report"
    assert all(img["complete"] and img["width"] > 0 for img in facts["images"]), facts["images"]
    pictures = [p.name for p in report.parent.glob("*.png")]
    assert sorted(img["alt"] for img in facts["images"]) == sorted(pictures)
    # the metric table, and the decision threshold as the model card has it
    assert {"Threshold", "Metrics", "Pictures", "Leaderboard"} <= set(facts["headings"]), facts["headings"]
    assert set(METRIC_ROWS) <= set(facts["metricRows"]), facts["metricRows"]
    assert facts["tables"] >= 5
    card = json.loads((report.parent / "model.json").read_text())
    assert facts["threshold"] is not None, "no threshold shown"
    assert float(facts["threshold"]) == pytest.approx(card["threshold"]["value"], abs=5e-5)
    return facts
