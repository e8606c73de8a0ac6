import json
import shutil

import numpy as np
import pytest

from diffaudit.data.grid import save_grid
from diffaudit.io import append_jsonl, atomic_write_json
from diffaudit.report.html import build_report

EVIL = '<script>alert("x")</script>'


def _fake_run(path, kind="train", label=EVIL):
    path.mkdir(parents=True)
    atomic_write_json(
        path / "manifest.json",
        {"kind": kind, "status": "finished", "model_id": label, "environment": {"torch": "2.13.0"}},
    )
    atomic_write_json(
        path / "config.json",
        {
            "preset": label,
            "data": {"source": f"folder:/data/{label}"},
            "train": {"steps": 3},
            "data_info": {"num_images": 5},
        },
    )
    for step in (1, 2, 3):
        append_jsonl(path / "metrics.jsonl", {"step": step, "loss": 1.0 / step, "images_per_s": 10.0})
    save_grid(np.random.default_rng(0).integers(0, 255, (4, 1, 8, 8), dtype=np.uint8), path / f"{kind}-grid.png")
    atomic_write_json(path / "results.json", {"summary": {"label": label, "extracted": 3}})
    return path


def test_report_is_self_contained_and_escaped(tmp_path):
    page = build_report([_fake_run(tmp_path / "run<1>"), _fake_run(tmp_path / "x", kind="extract")], title=EVIL)
    assert "<script>" not in page
    assert "&lt;script&gt;" in page
    assert 'src="http' not in page and 'href="http' not in page and "@import" not in page
    assert page.count("data:image/png;base64,") >= 4  # two grids + two metric plots
    assert "Training loss went from 1" in page


def test_report_marks_unfinished_runs(tmp_path):
    run = _fake_run(tmp_path / "r")
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["status"] = "failed"
    atomic_write_json(run / "manifest.json", manifest)
    assert "did not finish" in build_report([run])


def test_report_cli(tmp_path):
    from typer.testing import CliRunner

    from diffaudit.cli import app

    out = tmp_path / "r.html"
    result = CliRunner().invoke(app, ["report", str(_fake_run(tmp_path / "r")), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_text().startswith("<!DOCTYPE html>")


@pytest.mark.slow
def test_report_in_headless_chromium(tmp_path):
    """Opens the report in Debian's chromium: no console errors, every image decodes, screenshot not blank."""
    chromium = shutil.which("chromium")
    playwright = pytest.importorskip("playwright.sync_api")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    page_file = tmp_path / "report.html"
    page_file.write_text(build_report([_fake_run(tmp_path / "a"), _fake_run(tmp_path / "b", kind="loop")]))
    flags = [
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ]
    with playwright.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=flags, headless=True)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        errors: list[str] = []
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
        decoded = page.evaluate(
            "Array.from(document.images).map(i => i.complete && i.naturalWidth > 0 && i.naturalHeight > 0)"
        )
        shot = page.screenshot(full_page=True)
        browser.close()
    assert errors == []
    assert len(decoded) >= 4 and all(decoded)
    from io import BytesIO

    from PIL import Image

    pixels = np.asarray(Image.open(BytesIO(shot)).convert("L"))
    assert pixels.std() > 5, "screenshot is blank"


def test_kind_specific_findings(tmp_path):
    """extract, mia and loop runs get sentences with their numbers."""
    ext = _fake_run(tmp_path / "e", kind="extract")
    atomic_write_json(
        ext / "results.json",
        {
            "params": {"delta": 0.15, "min_clique": 10},
            "edge_threshold": {"value": 0.2},
            "summary": {"num_labels": 1, "num_flagged": 1, "num_extracted": 1},
            "untargeted": {
                "summary": {
                    "alpha": 0.5,
                    "n_neighbors_used": 50,
                    "num_train_extracted": 12,
                    "num_train": 100,
                    "num_extracted": 30,
                    "num_generated": 500,
                    "frac_within_delta": 0.4,
                }
            },
        },
    )
    mia = _fake_run(tmp_path / "m", kind="mia")
    atomic_write_json(
        mia / "results.json",
        {
            "attacks": {
                "lira-online": {
                    "auc": 0.99,
                    "tpr@1%fpr": 0.8,
                    "t": 100,
                    "num_members": 50,
                    "num_nonmembers": 50,
                    "below_resolution": [],
                }
            }
        },
    )
    page = build_report([ext, mia])
    assert "12 of 100 training images extracted" in page
    assert "lira-online: AUC 0.99, TPR at 1% FPR 0.8, t = 100" in page
