import html
import json
import re

import numpy as np

from diffaudit.data.grid import save_grid
from diffaudit.io import append_jsonl, atomic_write_json
from diffaudit.report.html import build_report
from test_report_fakes import arm, attack, grid_png, loop_run, mia_run, run_dir

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
    assert_only_our_script(page)
    assert "&lt;script&gt;" in page
    assert 'src="http' not in page and 'href="http' not in page and "@import" not in page
    assert page.count("data:image/png;base64,") >= 4  # two grids + two metric plots
    assert "Training loss went from 1" in page


def test_report_marks_unfinished_runs(tmp_path):
    run = _fake_run(tmp_path / "r")
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["status"] = "failed"
    atomic_write_json(run / "manifest.json", manifest)
    page = build_report([run])
    assert "did not finish" in page
    assert "Not finished, results may be partial: r." in page  # said in the summary too


def test_report_cli(tmp_path):
    from typer.testing import CliRunner

    from diffaudit.cli import app

    out = tmp_path / "r.html"
    result = CliRunner().invoke(app, ["report", str(_fake_run(tmp_path / "r")), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_text().startswith("<!DOCTYPE html>")


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


def assert_only_our_script(page: str) -> None:
    """The page's one script is the sorting enhancer, allowed by its CSP hash; no other script or handler."""
    from diffaudit.report.assets import JS, script_hash

    assert page.count("<script") == 1 and f"<script>{JS}</script>" in page
    assert html.escape(script_hash(), quote=True) in page  # the CSP allows exactly this script
    # Parsed as a browser would: no element has an event-handler attribute or a non-anchor link.
    attrs = _attributes(page)
    assert not [a for a in attrs if a[0].startswith("on")]
    assert all(v.startswith("#") for name, v in attrs if name == "href")
    assert all(v.startswith("data:image/") for name, v in attrs if name == "src")


def _attributes(page: str) -> list[tuple[str, str]]:
    from html.parser import HTMLParser

    found: list[tuple[str, str]] = []

    class Collect(HTMLParser):
        def handle_starttag(self, tag, attrs):
            found.extend((k, v or "") for k, v in attrs)

    Collect().feed(page)
    return found


HOSTILE = [
    EVIL,
    "javascript:alert(1)",
    'x" onerror="alert(1)',
    "two\nlines",
    "[/] [bold red]rich[/bold red]",
]


def test_hostile_names_everywhere_are_escaped(tmp_path):
    """Hostile run, arm, attack, class and file names: escaped text, never markup, links or URLs."""
    runs = []
    for i, name in enumerate(HOSTILE):
        safe_dir = f"r{i}-{name}".replace("\n", "_").replace("/", "_")
        arms = {name: arm([100.0, 120.0], share=0.1), "control": arm([100.0, 101.0], share=0.0)}
        loop = loop_run(tmp_path / ("loop-" + safe_dir), arms)
        grid_png(loop / (safe_dir + ".png"))
        runs.append(loop)
        runs.append(mia_run(tmp_path / ("mia-" + safe_dir), {name: attack(0.7, 50, 50)}))
        runs.append(_fake_run(tmp_path / ("train-" + safe_dir), label=name))
    page = build_report(runs, title="\n".join(HOSTILE))
    assert_only_our_script(page)
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert 'onerror="alert' not in page and "x&quot; onerror=&quot;alert(1)" in page
    # Every link is an in-page anchor; no javascript: (or any other scheme) in an attribute.
    hrefs = re.findall(r'href="([^"]*)"', page)
    assert hrefs and all(re.fullmatch(r"#[a-z0-9-]+", h) for h in hrefs)
    assert not re.search(r'(src|href|action)="\s*javascript:', page, re.IGNORECASE)
    assert "[/] [bold red]rich[/bold red]" in page  # rich markup is shown literally


def test_only_regular_image_files_inside_the_run_are_embedded(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    secret_png = grid_png(outside / "secret.png", seed=7)
    (outside / "results.json").write_text(json.dumps({"summary": {"secret_key": "TOPSECRET"}}))
    run = run_dir(tmp_path / "run", "future-kind")
    kept = grid_png(run / "kept.png", seed=3)
    (run / "leak.png").symlink_to(secret_png)  # a symlink leaving the run
    (run / "results.json").symlink_to(outside / "results.json")
    (run / "sub").mkdir()
    (run / "sub" / "up.png").symlink_to("../../outside/secret.png")
    (run / "inside-link.png").symlink_to(kept)  # a symlink that stays inside is fine
    (run / "fake.png").write_text("<svg onload=alert(1)></svg>")  # not a PNG by its bytes
    (run / "html.jpg").write_bytes(b"<html><script>alert(1)</script>")
    from PIL import Image

    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(run / "photo.jpg", format="JPEG")
    page = build_report([run])
    import base64

    secret_b64 = base64.b64encode(secret_png.read_bytes()).decode()
    assert secret_b64 not in page and "TOPSECRET" not in page
    assert page.count(base64.b64encode(kept.read_bytes()).decode()) == 2  # kept.png and inside-link.png
    assert "fake.png" not in page and "html.jpg" not in page and "up.png" not in page
    assert page.count("data:image/jpeg;base64,") == 1


def test_summary_comes_first_and_raw_data_is_collapsed(tmp_path):
    mia = mia_run(tmp_path / "m", {"lira": attack(0.9, 100, 100, tpr1=0.35)})
    page = build_report([mia])
    assert page.index('id="summary"') < page.index('id="run-0-m"')
    # The ~70 flattened keys (selection_auc_by_t.50, ...) sit inside a collapsed <details>, not in the evidence.
    evidence = page[page.index('id="run-0-m-evidence"') : page.index('id="run-0-m-raw"')]
    assert "selection_auc_by_t" not in evidence
    raw = page[page.index('id="run-0-m-raw"') :]
    assert re.search(r"<details class=\"raw\"><summary>results\.json[^<]*</summary>.*selection_auc_by_t\.50", raw)
    # The evidence table carries the attack's numbers, the interval and the ROC figure stays visible.
    assert "<td>0.86–0.94</td>" in evidence and "roc.png" in evidence


def test_loop_arms_and_control_share_one_figure(tmp_path):
    arms = {"share-0": arm([100.0, 101.0], share=0.0), "share-25": arm([100.0, 130.0], share=0.25)}
    page = build_report([loop_run(tmp_path / "l", arms)])
    assert "Arms against the control arm share-0 (black, dashed)" in page
    assert "<td>share-0 (control)</td>" in page
    alone = build_report([loop_run(tmp_path / "k", {"share-25": arm([100.0, 130.0], share=0.25)})])
    assert "No control arm (0% synthetic) in this run, so no curve to compare with" in alone


def test_mitigation_runs_form_one_table(tmp_path):
    a = run_dir(tmp_path / "ma", "mitigations", {"results.json": {"mitigations": {"dedup": {"extracted": 3}}}})
    b = run_dir(tmp_path / "mb", "mitigations", {"results.json": {"rows": [{"mitigation": "dp", "extracted": 0}]}})
    page = build_report([a, b])
    table = page[page.index('<section id="mitigations">') :]
    table = table[: table.index("</section>")]
    assert table.count("<tr>") == 3  # header + one row per mitigation, both runs
    assert "<td>dedup</td>" in table and "<td>dp</td>" in table
    assert 'href="#mitigations"' in page


def test_report_cli_escapes_rich_markup_in_path(tmp_path):
    from typer.testing import CliRunner

    from diffaudit.cli import app

    out = tmp_path / "[bold]x[/].html"
    result = CliRunner().invoke(app, ["report", str(_fake_run(tmp_path / "r")), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.exists()
