"""Open a report in headless Chromium: check that it renders and sorts, and save a screenshot.

Playwright drives the browser. Its own Chromium download is used when present, otherwise a system
Chromium (Debian's `chromium` package) found on PATH; without either, BrowserUnavailable says so.
"""

from __future__ import annotations

import importlib.util
import shutil
from dataclasses import dataclass
from pathlib import Path

SYSTEM_BROWSERS = ("chromium", "chromium-browser", "google-chrome")


class BrowserUnavailable(RuntimeError):
    """No headless browser can be started here; the message says what to install."""


@dataclass
class RenderCheck:
    rows: int
    """Rows of the results table as the browser laid them out."""
    image_width: int
    """Natural width of the embedded plot in pixels (0: it did not decode)."""
    first_column_after_sort: list[str]
    """The `cell` column after clicking the `perplexity` header once (ascending)."""


def _launch(playwright):
    try:
        return playwright.chromium.launch()
    except Exception as bundled_error:  # playwright raises its own Error when its browser is not downloaded
        for name in SYSTEM_BROWSERS:
            path = shutil.which(name)
            if path:
                return playwright.chromium.launch(executable_path=path, args=["--no-sandbox"])
        raise BrowserUnavailable(
            "no Chromium: run `python -m playwright install chromium` or install the system chromium package "
            f"({str(bundled_error).strip().splitlines()[0]})") from None


def render(html: Path, screenshot: Path) -> RenderCheck:
    """Load `html` from disk with the network cut off, sort by perplexity, save a full-page PNG."""
    if importlib.util.find_spec("playwright") is None:
        raise BrowserUnavailable("playwright is not installed (pip install playwright)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = _launch(playwright)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(("file:", "data:"))
                       else route.abort())
            page.goto(html.resolve().as_uri())
            rows = page.locator("#results tbody tr").count()
            width = page.evaluate("() => { const i = document.querySelector('img'); return i ? i.naturalWidth : 0; }")
            page.locator("#results th", has_text="perplexity").first.click()
            order = page.locator("#results tbody tr td:first-child").all_inner_texts()
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return RenderCheck(rows=rows, image_width=int(width), first_column_after_sort=order)
