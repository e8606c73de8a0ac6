"""The audit summary: one card per risk, each a one-sentence verdict with its number, interval and baseline.

Cards are built from result-file keys, not from model families or command names, so a text-to-image
pipeline's runs (same kinds, same keys) get the same cards, and a new kind that writes the same keys is
picked up too:

* regurgitation: ``results.json`` with ``summary.num_extracted`` and/or ``untargeted.summary``;
* membership leakage: ``results.json`` with ``attacks.<name>.auc``;
* self-consumption: ``summary.json`` with ``arms`` (loop, loop-merge);
* safeguards: a copy filter's ``decisions.json`` / ``index.json`` calibration, a loop's tag-and-scrub rows,
  and ``mitigations`` runs.

The wording is for a model provider deciding whether to ship: it says what was measured against what, and
when the run was too small to tell (an interval that includes the baseline, a TPR below the FPR resolution,
one repeat, no control arm), it says that instead of a verdict.
"""

from __future__ import annotations

from collections.abc import Callable

from diffaudit.report.card import UNCLEAR, Card
from diffaudit.report.files import RunData
from diffaudit.report.risks_loop import collapse_card
from diffaudit.report.risks_privacy import membership_card, regurgitation_card
from diffaudit.report.risks_safeguards import safeguards_card

CARDS: tuple[Callable[[list[RunData]], Card], ...] = (
    regurgitation_card,
    membership_card,
    collapse_card,
    safeguards_card,
)


def summary_cards(runs: list[RunData]) -> list[Card]:
    """The four risk cards, in a fixed order; a card that fails to build says so instead of breaking the page."""
    cards = []
    for build in CARDS:
        try:
            cards.append(build(runs))
        except (KeyError, TypeError, ValueError, IndexError, ZeroDivisionError, AttributeError) as exc:
            name = build.__name__.removesuffix("_card")
            cards.append(
                Card(name, name.title(), UNCLEAR, f"Could not read this risk from the runs ({type(exc).__name__}).")
            )
    return cards
