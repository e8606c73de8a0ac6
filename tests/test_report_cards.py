"""One test per risk card: fake run directories with known results give the right verdict, number and interval."""

from __future__ import annotations

import pytest

from diffaudit.report.card import CLEAR, NONE, RISK, UNCLEAR
from diffaudit.report.files import load_run
from diffaudit.report.html import build_report
from diffaudit.report.stats import auc_interval, wilson
from diffaudit.report.verdicts import summary_cards
from test_report_fakes import arm, attack, extract_run, guard_run, loop_run, mia_run, run_dir


def cards_for(*paths):
    runs = [load_run(p, i) for i, p in enumerate(paths)]
    return {c.risk: c for c in summary_cards(runs)}


def test_intervals_match_published_values():
    # Wilson 3/100: 1.03%-8.45% (Newcombe 1998, method 3); 0/n upper bound z^2/(n+z^2).
    lo, hi = wilson(3, 100)
    assert (round(lo, 4), round(hi, 4)) == (0.0103, 0.0845)
    assert wilson(0, 20) == (0.0, pytest.approx(3.8415 / 23.8415, abs=1e-4))
    # Hanley-McNeil, AUC 0.9 with 100 + 100: SE 0.02263.
    lo, hi = auc_interval(0.9, 100, 100)
    assert (round(lo, 3), round(hi, 3)) == (0.856, 0.944)


def test_regurgitation_card_counts_distinct_training_images(tmp_path):
    run = extract_run(tmp_path / "ext", clique_ids=["a", "b"], adaptive_ids=["b", "c"])
    card = cards_for(run)["regurgitation"]
    assert card.status == RISK
    # "b" was found by both methods: 3 distinct images, not 4.
    assert card.number == "3 of 100 training images extracted (3.0%, 95% CI 1.0%–8.5%)"
    assert card.verdict == (
        "The model reproduces training images: 3 were extracted from 500 generations "
        "(within δ = 0.15 of a training image)."
    )
    assert card.links == [("run-0-ext-evidence", "ext")]


def test_regurgitation_card_none_extracted_states_resolution(tmp_path):
    run = extract_run(tmp_path / "ext", clique_ids=[], adaptive_ids=[])
    card = cards_for(run)["regurgitation"]
    assert card.status == CLEAR
    assert card.number.startswith("0 of 100 training images extracted (0.0%, 95% CI 0.0%–3.7%)")
    # 500 generations: a copy rate above 0.76% (Wilson upper bound of 0/500) would likely have shown up.
    assert "more than 0.76% of generations" in card.comparison
    assert "below this run's resolution" in card.comparison


def test_membership_card_leak_and_resolution_flag(tmp_path):
    run = mia_run(tmp_path / "mia", {"loss": attack(0.62, 100, 100), "lira": attack(0.9, 100, 100, tpr1=0.35)})
    card = cards_for(run)["membership"]
    assert card.status == RISK
    # The strongest attack leads, with its Hanley-McNeil interval and both class sizes.
    assert card.number == "AUC 0.90 (95% CI 0.86–0.94), lira (best of 2 attacks), 100 members vs 100 non-members"
    assert "Compared with chance, AUC 0.5" in card.comparison
    # 100 non-members resolve 1% FPR: a TPR is quoted, with its interval (35 of 100: 26.4%-44.7%).
    assert card.notes[0] == "TPR at 1% FPR 35.0% (95% CI 26.4%–44.7%); chance would give 1%."
    assert any("0.1% FPR is below this run's resolution" in n for n in card.notes)


def test_membership_card_small_run_is_not_a_leak(tmp_path):
    run = mia_run(tmp_path / "mia", {"lira-online": attack(0.58, 14, 14, tpr1=0.14)})
    card = cards_for(run)["membership"]
    assert card.status == CLEAR
    assert card.verdict.startswith("No membership leakage detected at this run's size")
    assert card.number.startswith("AUC 0.58 (95% CI 0.37–0.79)")
    assert "only an AUC above about 0.70 would have been detected" in card.comparison
    # 14 non-members: 1% FPR is below resolution, so no TPR at 1% is quoted as if it were measured.
    assert card.notes == [
        "TPR at 1% FPR is below this run's resolution: with 14 non-members the smallest FPR it can measure is 7.1%."
    ]


def test_collapse_card_without_control_gives_no_verdict(tmp_path):
    run = loop_run(tmp_path / "loop", {"custom": arm([100.0, 150.0, 200.0], share=0.25)})
    card = cards_for(run)["collapse"]
    assert card.status == UNCLEAR
    assert card.verdict.startswith("No control arm, so no verdict")
    assert card.number == "all/fid 100 → 200 by generation 2, arm custom"
    assert card.label == "No verdict"


def test_collapse_card_against_control(tmp_path):
    arms = {
        "share-0": arm([100.0, 104.0, 105.0], share=0.0, band=5.0, repeats=3),
        "share-10": arm([100.0, 110.0, 112.0], share=0.10, band=5.0, repeats=3),
        "share-100": arm([100.0, 160.0, 240.0], share=1.0, band=5.0, repeats=3),
    }
    card = cards_for(loop_run(tmp_path / "loop", arms))["collapse"]
    assert card.status == RISK
    # The worst arm (share-100) is compared with the control at the last poisoning generation (2).
    assert card.number == (
        "all/fid 240 (95% interval 235–245) for arm share-100 vs 105 (95% interval 100–110) for control share-0, "
        "generation 2"
    )
    assert "control arm share-0" in card.comparison


def test_collapse_card_overlapping_and_single_repeat(tmp_path):
    close = {
        "control": arm([100.0, 104.0], share=0.3, band=5.0, repeats=3),  # named control: share ignored
        "share-10": arm([100.0, 108.0], share=0.10, band=5.0, repeats=3),
    }
    card = cards_for(loop_run(tmp_path / "a", close))["collapse"]
    assert card.status == CLEAR
    assert "No collapse detected at this run's resolution" in card.verdict
    single = {"share-0": arm([100.0, 104.0], share=0.0), "x": arm([100.0, 180.0], share=None, count=30)}
    card = cards_for(loop_run(tmp_path / "b", single))["collapse"]
    assert card.status == UNCLEAR
    assert card.verdict.startswith("Indicative only: the most self-consumed arm is worse than the control")


def test_safeguards_card_against_calibrated_rate(tmp_path):
    card = cards_for(guard_run(tmp_path / "g", rate=17 / 359, n_holdout=359, target=0.05))["safeguards"]
    assert card.status == CLEAR and card.label == "Holds"
    assert card.number == "Copy filter wrongly blocks 4.7% of 359 held-out real images (95% CI 3.0%–7.5%)"
    assert card.comparison == "Compared with its calibrated target of 5.0%; the fixed rule δ = 0.15 would block 72.0%."
    assert card.verdict.endswith("and blocked 2 of 40 generated samples.")
    over = cards_for(guard_run(tmp_path / "h", rate=0.2, n_holdout=200, target=0.05))["safeguards"]
    # 40 of 200 (15.0%-26.1%) lies wholly above the 5% target.
    assert over.status == RISK and over.label == "Falls short"
    assert "blocks more real images than it was calibrated to" in over.verdict


def test_safeguards_card_tag_and_scrub_rows(tmp_path):
    rows = [
        {
            "arm": "custom",
            "generation": 1,
            "filter": {"num_in": 40, "synthetic_in": 10, "synthetic_removed": 9, "synthetic_slipped": 1},
        }
    ]
    run = run_dir(tmp_path / "scrub", "loop", rows=rows)
    card = cards_for(run)["safeguards"]
    assert card.number.startswith("Tag-and-scrub removed 9 of 10 tagged synthetic images before retraining")
    assert "1 slipped through" in card.number


def test_unknown_kinds_fall_back(tmp_path):
    odd = run_dir(tmp_path / "odd", "future-kind", {"results.json": {"summary": {"score": 0.5, "name": "z"}}})
    cards = cards_for(odd)
    assert {c.status for c in cards.values()} == {NONE}
    assert cards["collapse"].verdict == "No self-consuming loop run was given, so collapse was not measured."
    page = build_report([odd])
    assert "results.json: score" in page  # the generic key-number table
    assert "Not assessed" in page


def test_safeguards_card_reads_the_robust_rule_when_the_index_has_it(tmp_path):
    calibration = {
        "num_holdout": 200,
        "calibrated": {"target_fpr": 0.05, "achieved_false_block_rate": 0.2, "threshold": 0.08},
        "absolute": {"delta": 0.15, "achieved_false_block_rate": 0.72},
        "robust": {"target_fpr": 0.01, "achieved_false_block_rate": 0.005, "threshold": 0.4},
    }
    decisions = {"filter": {"rule": "robust", "calibration": calibration}, "summary": {}, "decisions": []}
    path = run_dir(
        tmp_path / "r", "guard-index", {"decisions.json": decisions, "index.json": {"calibration": calibration}}
    )
    card = cards_for(path)["safeguards"]
    # 1 of 200 (0.5%) against the robust rule's 1% target, not the pixel rule's 20% against 5%
    assert card.number.startswith("Copy filter (robust rule) wrongly blocks 0.5% of 200 held-out real images")
    assert card.comparison.startswith("Compared with its calibrated target of 1.0%")
    assert card.status == CLEAR
    decisions["filter"]["rule"] = "calibrated"  # a filter run with the pixel rule reports that rule's rate
    path = run_dir(
        tmp_path / "c", "guard-index", {"decisions.json": decisions, "index.json": {"calibration": calibration}}
    )
    card = cards_for(path)["safeguards"]
    assert card.number.startswith("Copy filter wrongly blocks 20.0% of 200") and card.status == RISK
