"""Open an HTML report in headless Chromium, as a reader would, and fail on what they would see broken.

    python scripts/check_report.py runs/demo-1/report.html --screenshot /tmp/report.png

Problems, one per line, and exit code 1:
- a console error: every SEVERE entry of the browser's log (``console.error``, an uncaught
  exception, a resource that failed to load);
- a missing image: an ``<img>`` that failed to load or decoded to nothing (``naturalWidth`` or
  ``naturalHeight`` 0: a wrong path, an empty or corrupt file);
- an image of zero size on the page: displayed, but 0 pixels wide or high (CSS or attributes).
  An image that is not displayed at all (``display: none``) is only checked for loading.
Exit 0 when the page is clean, 2 when it could not be checked (no Chromium, no such file).

How: Chromium is driven by chromedriver through the plain HTTP W3C WebDriver API, with the
standard library alone (urllib + json + subprocess; no selenium, no websockets), in a fresh
profile (``--user-data-dir`` in a temporary folder) with ``--headless --no-sandbox --disable-gpu``
and the background services off. Console errors come from the browser log that chromedriver
records when asked (capability ``goog:loggingPrefs`` ``{"browser": "ALL"}``) and hands out at
``POST /session/{id}/se/log``: unlike a script injected into the page, it also sees errors raised
before any script of ours could run (in the page's ``<head>``, during parsing) and failed network
requests. Lazy images are switched to eager loading and awaited before they are measured. The
screenshot is of the whole page (DevTools ``Page.captureScreenshot`` beyond the viewport, through
chromedriver's ``goog/cdp/execute``).

Debian: ``apt-get install -y chromium chromium-driver`` (/usr/bin/chromium, /usr/bin/chromedriver).
"""

from __future__ import annotations

import argparse
import base64
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
BROWSER_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1280,1024",
]
# Runs in the page: every image eager, then, once each has loaded or failed, what it looks like.
MEASURE_IMAGES = """
const done = arguments[arguments.length - 1];
const images = Array.from(document.images);
images.forEach(img => { if (img.loading === 'lazy') img.loading = 'eager'; });
const settled = img => img.complete ? null : new Promise(resolve => {
  img.addEventListener('load', resolve, {once: true});
  img.addEventListener('error', resolve, {once: true});
});
Promise.all(images.map(settled)).then(() => done(images.map((img, index) => {
  const box = img.getBoundingClientRect();
  return {index: index, src: img.getAttribute('src') || img.currentSrc || '', alt: img.alt,
          naturalWidth: img.naturalWidth, naturalHeight: img.naturalHeight,
          displayed: img.getClientRects().length > 0, width: box.width, height: box.height};
})));
"""


class CheckError(Exception):
    """The page could not be checked at all (no browser, no file, a driver that does not answer)."""


class Browser:
    """chromedriver on a free local port and one Chromium session with the browser log on."""

    def __init__(self, chromium: Path = CHROMIUM, chromedriver: Path = CHROMEDRIVER, timeout: float = 30.0):
        for path in (chromium, chromedriver):
            if not path.exists():
                raise CheckError(
                    f"{path} not found; install with: apt-get install -y chromium chromium-driver"
                )
        self.chromium, self.chromedriver, self.timeout = chromium, chromedriver, timeout
        self.port = free_port()
        self.profile = tempfile.TemporaryDirectory(prefix="check_report_")
        self.driver: subprocess.Popen | None = None
        self.session = ""

    def __enter__(self) -> Browser:
        command = [str(self.chromedriver), f"--port={self.port}"]
        self.driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            self.wait_until_ready()
            self.session = self.call(
                "POST", "/session", {"capabilities": {"alwaysMatch": self.capabilities()}}
            )["sessionId"]
            ms = int(self.timeout * 1000)
            self.call("POST", "/timeouts", {"pageLoad": ms, "script": ms})
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.session:
            try:
                self.call("DELETE", "")
            except CheckError:
                pass  # the driver is going away anyway
        if self.driver is not None:
            self.driver.terminate()
            try:
                self.driver.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.driver.kill()
                self.driver.wait()
        self.profile.cleanup()

    def capabilities(self) -> dict[str, Any]:
        return {
            "browserName": "chrome",
            "goog:loggingPrefs": {"browser": "ALL"},
            "goog:chromeOptions": {
                "binary": str(self.chromium),
                "args": [*BROWSER_ARGS, f"--user-data-dir={self.profile.name}"],
            },
        }

    def wait_until_ready(self) -> None:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.driver.poll() is not None:
                raise CheckError(f"{self.chromedriver} exited with code {self.driver.returncode}")
            try:
                if self.request("GET", "/status").get("value", {}).get("ready"):
                    return
            except (OSError, CheckError):
                pass
            time.sleep(0.05)
        raise CheckError(f"{self.chromedriver} did not answer within {self.timeout:.0f} s")

    def request(self, method: str, path: str, body: dict | None = None) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else None
        url = f"http://127.0.0.1:{self.port}{path}"
        headers = {"Content-Type": "application/json"}
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout + 30) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as e:  # WebDriver errors come as JSON with an HTTP error code
            value = json.loads(e.read() or b"{}").get("value", {})
            message = str(value.get("message", e)).splitlines()[0]
            raise CheckError(f"WebDriver {method} {path}: {value.get('error', e.code)}: {message}") from None

    def call(self, method: str, path: str, body: dict | None = None) -> Any:
        """A WebDriver command of this session (``path`` relative to it; ``/session`` itself as given)."""
        full = path if path == "/session" else f"/session/{self.session}{path}"
        return self.request(method, full, body if body is not None or method != "POST" else {})["value"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def image_problems(images: list[dict[str, Any]]) -> list[str]:
    """A missing image (nothing decoded) or a displayed one of zero size, one line each."""
    problems = []
    for img in images:
        name = f"<img> #{img['index'] + 1} ({short(img['src'])})"
        if not img["naturalWidth"] or not img["naturalHeight"]:
            problems.append(f"missing image: {name} did not load (naturalWidth {img['naturalWidth']})")
        elif img["displayed"] and (img["width"] == 0 or img["height"] == 0):
            problems.append(f"zero-size image: {name} is shown {img['width']:g} x {img['height']:g} px")
    return problems


def short(src: str, limit: int = 80) -> str:
    """A data: URL cut to its type, anything else to ``limit`` characters."""
    if src.startswith("data:"):
        return src.split(",", 1)[0] + ",..."
    return src if len(src) <= limit else src[: limit - 3] + "..."


def console_problems(entries: list[dict[str, Any]]) -> list[str]:
    return [
        f"console error ({e.get('source', 'browser')}): {short(e.get('message', ''), 300)}"
        for e in entries
        if e.get("level") == "SEVERE"
    ]


def save_screenshot(browser: Browser, path: Path) -> None:
    """The whole page, not only the window: DevTools' capture beyond the viewport."""
    shot = browser.call(
        "POST",
        "/goog/cdp/execute",
        {"cmd": "Page.captureScreenshot", "params": {"captureBeyondViewport": True}},
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(base64.b64decode(shot["data"]))


def check_page(html: Path, screenshot: Path | None = None, timeout: float = 30.0) -> list[str]:
    """The problems a reader of ``html`` would meet (empty: none); CheckError if it cannot be opened."""
    if not html.is_file():
        raise CheckError(f"{html}: no such file")
    with Browser(timeout=timeout) as browser:
        browser.call("POST", "/url", {"url": html.resolve().as_uri()})
        images = browser.call("POST", "/execute/async", {"script": MEASURE_IMAGES, "args": []})
        if screenshot is not None:
            save_screenshot(browser, screenshot)
        log = browser.call("POST", "/se/log", {"type": "browser"})
    return console_problems(log) + image_problems(images)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("html", type=Path, help="the HTML file to open")
    parser.add_argument("--screenshot", type=Path, help="write a full-page PNG here")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds for the page and its images")
    args = parser.parse_args(argv)
    try:
        problems = check_page(args.html, args.screenshot, args.timeout)
    except CheckError as e:
        print(f"check_report: {e}", file=sys.stderr)
        return 2
    for line in problems:
        print(line)
    if not problems:
        print(
            f"{args.html}: no console errors, every image loaded"
            + (f"; {args.screenshot}" if args.screenshot else "")
        )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
