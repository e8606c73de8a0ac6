"""The report in a real browser: headless Debian chromium driven by playwright (slow suite, ``-m slow``).

Also the docs' screenshot tool: ``python tests/test_report_browser.py REPORT.html OUT.png`` writes the first
screen (1280x800) of a report, as docs/img/report-summary.png was made.
"""

from __future__ import annotations

import shutil
import sys
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest

from diffaudit.report.html import build_report
from test_report_fakes import EVIL, arm, attack, extract_run, guard_run, loop_run, mia_run

FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1280, "height": 800}


def _launch(pw, chromium: str):
    return pw.chromium.launch(executable_path=chromium, args=FLAGS, headless=True)


def _not_blank(png: bytes) -> float:
    from PIL import Image

    return float(np.asarray(Image.open(BytesIO(png)).convert("L")).std())


def _runs(tmp: Path) -> list[Path]:
    arms = {
        "share-0": arm([100.0, 104.0, 105.0], share=0.0, band=5.0, repeats=3),
        f"share-100 {EVIL}": arm([100.0, 160.0, 240.0], share=1.0, band=5.0, repeats=3),
    }
    return [
        extract_run(tmp / "extract", clique_ids=["a", "b"], adaptive_ids=["b", "c"]),
        mia_run(tmp / "mia", {"loss": attack(0.62, 100, 100), "lira": attack(0.9, 100, 100, tpr1=0.35)}),
        loop_run(tmp / "loop", arms),
        guard_run(tmp / "guard", rate=17 / 359, n_holdout=359, target=0.05),
    ]


@pytest.mark.slow
def test_report_in_headless_chromium(tmp_path):
    """Cards carry the result files' numbers, links resolve, no console errors, images decode, print is not blank."""
    chromium = shutil.which("chromium")
    playwright = pytest.importorskip("playwright.sync_api")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    page_file = tmp_path / "report.html"
    page_file.write_text(build_report(_runs(tmp_path / "runs"), title=EVIL))
    with playwright.sync_playwright() as pw:
        browser = _launch(pw, chromium)
        page = browser.new_page(viewport=VIEWPORT)
        errors: list[str] = []
        # CSP violations (e.g. a script whose hash is wrong) are console errors too.
        page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on(
            "request",
            lambda req: (
                errors.append(f"network request {req.url}") if not req.url.startswith(("file:", "data:")) else None
            ),
        )
        page.goto(page_file.as_uri())
        page.wait_for_load_state("load")
        cards = page.eval_on_selector_all(
            "article.card", "els => els.map(e => [e.id, e.querySelector('.badge').textContent, e.innerText])"
        )
        dangling = page.evaluate(
            "Array.from(document.querySelectorAll('a')).map(a => a.getAttribute('href'))"
            ".filter(h => !h.startsWith('#') || !document.getElementById(h.slice(1)))"
        )
        n_links = page.evaluate("document.querySelectorAll('a[href^=\"#\"]').length")
        decoded = page.evaluate(
            "Array.from(document.images).map(i => i.complete && i.naturalWidth > 0 && i.naturalHeight > 0)"
        )
        first_screen = page.screenshot()
        # The cards sit in the first screen: a provider sees the verdicts without scrolling.
        card_bottoms = page.eval_on_selector_all(
            "article.card", "els => els.map(e => e.getBoundingClientRect().bottom)"
        )
        # The sorting script ran (allowed by its CSP hash): sorting the attack table by AUC, descending.
        header = page.locator("table.sortable caption", has_text="Membership inference").locator("xpath=..")
        auc_th = header.locator("thead th", has_text="AUC").first
        auc_th.click()
        auc_th.click()
        first_attack = header.locator("tbody tr").first.locator("td").first.inner_text()
        page.emulate_media(media="print")
        nav_printed = page.evaluate("getComputedStyle(document.querySelector('nav.toc')).display")
        printed = page.screenshot(full_page=True)
        pdf = page.pdf(format="A4", print_background=True)
        browser.close()
    assert errors == []
    text = {cid: (badge, body) for cid, badge, body in cards}
    assert list(text) == ["risk-regurgitation", "risk-membership", "risk-collapse", "risk-safeguards"]
    assert (
        text["risk-regurgitation"][0] == "Risk found"
        and "3 of 100 training images extracted" in text["risk-regurgitation"][1]
    )
    assert "AUC 0.90 (95% CI 0.86–0.94), lira" in text["risk-membership"][1]
    assert text["risk-collapse"][0] == "Risk found" and "all/fid 240" in text["risk-collapse"][1]
    assert text["risk-safeguards"][0] == "Holds" and "4.7% of 359 held-out real images" in text["risk-safeguards"][1]
    assert n_links >= 4 + 4 + 4 and dangling == []
    assert len(decoded) == 3 and all(decoded)  # extracted pairs, ROC, loop arms vs control
    assert max(card_bottoms) <= VIEWPORT["height"]
    assert first_attack == "lira"
    assert _not_blank(first_screen) > 5
    assert nav_printed == "none"
    assert _not_blank(printed) > 5
    assert pdf.startswith(b"%PDF") and pdf.count(b"/Type /Page") >= 2 and b"/Subtype /Image" in pdf


def screenshot(report: Path, out: Path) -> None:
    """Write the first screen of ``report`` (as a user opens it) to ``out`` as PNG."""
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or "chromium"
    with sync_playwright() as pw:
        browser = _launch(pw, chromium)
        page = browser.new_page(viewport=VIEWPORT)
        page.goto(report.resolve().as_uri())
        page.wait_for_load_state("load")
        page.screenshot(path=str(out))
        browser.close()


if __name__ == "__main__":
    screenshot(Path(sys.argv[1]), Path(sys.argv[2]))
