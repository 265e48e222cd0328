"""scripts/check_report.py in a real headless Chromium: a clean page passes; a broken image, a
console error, an uncaught exception and an image shown at zero size each fail.

Skipped where Chromium and chromedriver are not installed (Debian: ``apt-get install -y chromium
chromium-driver``). Each check starts its own browser (about 2 s).
"""

from __future__ import annotations

import importlib.util
import struct
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
# A 1 x 1 red PNG.
PIXEL = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
GOOD_IMAGE = f'<img alt="figure" src="data:image/png;base64,{PIXEL}" width="120" height="80">'


def check_report():
    """scripts/check_report.py as a module (scripts/ is no package)."""
    if "check_report" not in sys.modules:
        spec = importlib.util.spec_from_file_location("check_report", SCRIPTS / "check_report.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["check_report"] = module
        spec.loader.exec_module(module)
    return sys.modules["check_report"]


HAVE_CHROMIUM = check_report().CHROMIUM.exists() and check_report().CHROMEDRIVER.exists()
needs_chromium = pytest.mark.skipif(
    not HAVE_CHROMIUM,
    reason="needs /usr/bin/chromium and /usr/bin/chromedriver (apt-get install -y chromium chromium-driver)",
)


def page(tmp_path: Path, body: str, head: str = "") -> Path:
    path = tmp_path / "report.html"
    path.write_text(
        f'<!doctype html><html><head><meta charset="utf-8"><title>report</title>{head}</head>'
        f"<body><h1>Results</h1><p>accuracy 0.91 (0.87-0.94)</p>{body}</body></html>",
        encoding="utf-8",
    )
    return path


@needs_chromium
def test_a_clean_self_contained_page_passes_and_is_screenshotted(tmp_path):
    html = page(tmp_path, GOOD_IMAGE + "<script>console.log('fine'); console.warn('only a warning')</script>")
    shot = tmp_path / "shots" / "report.png"
    assert check_report().check_page(html, shot) == []
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 800 and height >= 200


@needs_chromium
@pytest.mark.parametrize(
    "body, head, expected",
    [
        ('<img src="figures/missing.png">', "", ["missing image: <img> #1 (figures/missing.png)"]),
        ('<img src="data:image/png;base64,">', "", ["missing image: <img> #1 (data:image/png;base64,...)"]),
        (GOOD_IMAGE + "<script>console.error('table failed')</script>", "", ["console error (console-api)"]),
        ("", "<script>undefinedFunction()</script>", ["console error (javascript)", "undefinedFunction"]),
        (
            GOOD_IMAGE.replace('width="120"', 'width="0"'),
            "",
            ["zero-size image: <img> #1", "shown 0 x 80 px"],
        ),
        (f'<img src="data:image/png;base64,{PIXEL}" style="height:0">', "", ["zero-size image"]),
    ],
    ids=["broken-src", "empty-image", "console-error", "uncaught-exception", "zero-width", "zero-height"],
)
def test_a_broken_page_fails_with_a_line_naming_the_problem(tmp_path, body, head, expected):
    problems = check_report().check_page(page(tmp_path, body, head))
    assert problems, "the check passed a broken page"
    text = "\n".join(problems)
    for part in expected:
        assert part in text, text


@needs_chromium
def test_a_hidden_image_is_checked_for_loading_only(tmp_path):
    hidden = f'<div style="display:none">{GOOD_IMAGE}</div>'
    assert check_report().check_page(page(tmp_path, hidden)) == []


@needs_chromium
def test_the_command_exits_1_on_problems_and_0_on_a_clean_page(tmp_path):
    bad = page(tmp_path, '<img src="nope.png">')
    run = subprocess.run(
        [sys.executable, str(SCRIPTS / "check_report.py"), str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1 and "missing image" in run.stdout
    good = page(tmp_path, GOOD_IMAGE)
    shot = tmp_path / "shot.png"
    run = subprocess.run(
        [sys.executable, str(SCRIPTS / "check_report.py"), str(good), "--screenshot", str(shot)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert shot.stat().st_size > 1000


def test_a_missing_file_cannot_be_checked_exit_2(tmp_path, capsys):
    assert check_report().main([str(tmp_path / "absent.html")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_a_missing_browser_is_named_with_the_install_command(tmp_path):
    module = check_report()
    with pytest.raises(module.CheckError, match="apt-get install -y chromium chromium-driver"):
        module.Browser(chromium=tmp_path / "no-chromium")
