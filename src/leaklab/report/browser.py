"""Open a report in headless Chromium (the system's ``chromium``, driven over the DevTools protocol by
Playwright; no browser is downloaded) and record what a reader's browser would: console errors, page errors,
every network request, the sections in the rendered DOM, and a screenshot."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from leaklab.errors import LeaklabError

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)


@dataclass
class PageCheck:
    """What the browser saw while loading the page."""

    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)  # every URL the page asked for, the page itself included
    sections: list[str] = field(default_factory=list)  # data-section ids of rendered <section>s
    surfaces: list[str] = field(default_factory=list)  # data-surface ids of rendered surface sections
    title: str = ""

    def network_requests(self, page_url: str) -> list[str]:
        """Requests other than the page itself and inline data."""
        return [u for u in self.requests if u != page_url and not u.startswith("data:")]


def chromium_path() -> str:
    """The system Chromium (Debian's ``chromium`` package), or one clear error."""
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    raise LeaklabError("no chromium on PATH: install Debian's chromium package (make install does)")


def check_page(html: str | Path, screenshot: str | Path, width: int = 1280, height: int = 900) -> PageCheck:
    """Load ``html`` from disk in headless Chromium with a fresh profile, screenshot the first screen, and
    return what happened."""
    from playwright.sync_api import sync_playwright

    page_url = Path(html).resolve().as_uri()
    out = PageCheck()
    with tempfile.TemporaryDirectory(prefix="leaklab-chromium-") as profile, sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(
            profile,
            executable_path=chromium_path(),
            headless=True,
            args=list(CHROMIUM_FLAGS),
            viewport={"width": width, "height": height},
        )
        try:
            page = ctx.new_page()
            page.on("console", lambda m: out.console_errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: out.page_errors.append(str(e)))
            page.on("request", lambda r: out.requests.append(r.url))
            page.goto(page_url, wait_until="load")
            page.wait_for_timeout(300)
            out.title = page.title()
            out.sections = page.eval_on_selector_all("section[data-section]", "els => els.map(e => e.dataset.section)")
            out.surfaces = page.eval_on_selector_all("section[data-surface]", "els => els.map(e => e.dataset.surface)")
            page.screenshot(path=str(screenshot))
        finally:
            ctx.close()
    return out
