import json

import pytest

from diffaudit.demo import run_demo, stages


def test_quick_demo_end_to_end_and_rerun_skips(tmp_path):
    out = tmp_path / "demo"
    report = run_demo(out, quick=True, log=lambda msg: None)
    page = report.read_text()
    for stage in stages(quick=True):
        if stage.run_dir:
            manifest = json.loads((out / stage.run_dir / "manifest.json").read_text())
            assert manifest["status"] == "finished", stage.name
            assert f"{manifest['kind']}: {stage.run_dir}" in page
    assert (out / "guard" / "decisions.json").exists()
    # the loop shows its paired control beside the poisoned arm, and the report's collapse card compares them
    arms = json.loads((out / "loop" / "summary.json").read_text())["arms"]
    assert list(arms) == ["control", "custom"]
    assert "No control arm, so no verdict" not in page  # the summary card judges the loop against its control
    assert (out / "loop-tag-scrub" / "safeguard.json").exists()
    assert page.count("data:image/png;base64,") >= 8
    # a second run finds everything finished and only rewrites the report
    messages: list[str] = []
    run_demo(out, quick=True, log=messages.append)
    assert all("skipped" in m for m in messages) and len(messages) == len(stages(quick=True))


@pytest.mark.slow
def test_full_demo(tmp_path):
    """The default demo (about 10-18 minutes on 2 cores)."""
    report = run_demo(tmp_path / "demo", quick=False, log=lambda msg: None)
    assert report.exists()
