"""Headless Chromium for the dashboard tests: render a page, list the network requests it started, and read
back what the browser laid out (a probe script injected before the page's CSP takes effect)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


# run right after <head>, before the page's CSP meta takes effect: reports what the browser rendered
PROBE = """<script>
window.addEventListener("load", () => {
  const rows = selector => [...document.querySelectorAll(selector)].map(t => t.rows.length);
  const count = selector => document.querySelectorAll(selector).length;
  const images = [...document.images].map(i => [i.complete, i.naturalWidth, i.getBoundingClientRect().width]);
  const heat = [...document.querySelectorAll("table.heat td.score")].map(td => [td.textContent,
    getComputedStyle(td).backgroundColor, td.classList.contains("eff-abs"), td.classList.contains("eff-rel"),
    getComputedStyle(td).borderRightWidth, getComputedStyle(td).boxShadow]);
  const sections = [...document.querySelectorAll("section")].map(s => s.id);
  document.body.setAttribute("data-probe", JSON.stringify({images, tables: rows("table.results"),
    best: count("td.best"), heat, heatTables: rows("table.heat"), corr: rows("table.corr"),
    trend: rows("table.trend-regressions"), runs: rows("table.runs"), sections}));
});
</script>"""


def page_requests(net_log: Path) -> list[str]:
    """URLs of network requests a page started (the browser's own background requests have no origin)."""
    text = net_log.read_text()
    try:
        log = json.loads(text)
    except json.JSONDecodeError:  # a log cut short at exit lacks its closing brackets
        log = json.loads(text.rstrip().rstrip(",") + "]}")
    start = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    jobs = [e.get("params", {}) for e in log["events"] if e["type"] == start]
    return [job["url"] for job in jobs if job.get("url") and job.get("initiator", "not an origin") != "not an origin"]


def dump_dom(browser: str, page: Path, net_log: Path) -> str:
    done = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           "--disable-extensions", "--virtual-time-budget=5000", f"--log-net-log={net_log}",
                           "--dump-dom", page.resolve().as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def probe(browser: str, index: Path, net_log: Path) -> dict:
    """What the browser rendered of ``index`` (a copy next to it, so relative paths resolve the same)."""
    page = index.with_name("probe.html")
    page.write_text(index.read_text().replace("<head>", "<head>\n" + PROBE, 1))
    dom = dump_dom(browser, page, net_log)
    match = re.search(r'data-probe="([^"]+)"', dom)
    assert match, "the page did not finish loading"
    return json.loads(match.group(1).replace("&quot;", '"'))
