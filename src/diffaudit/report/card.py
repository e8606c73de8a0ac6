"""A risk card (one verdict sentence, its number, interval and baseline) and helpers shared by the risks.

Statuses: ``risk`` (the run shows the problem), ``clear`` (looked for and not found at the stated resolution),
``unclear`` (measured, but the run cannot support a verdict), ``none`` (no run measured it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

RISK = "risk"  # the run shows the problem
CLEAR = "clear"  # looked for and not found, at the stated resolution
UNCLEAR = "unclear"  # measured, but the run cannot support a verdict
NONE = "none"  # no run measured it

STATUS_LABEL = {RISK: "Risk found", CLEAR: "Not detected", UNCLEAR: "No verdict", NONE: "Not assessed"}
SEVERITY = {RISK: 3, UNCLEAR: 2, CLEAR: 1, NONE: 0}


@dataclass
class Card:
    """One risk's summary; ``links`` are (anchor id, label) pairs into the evidence."""

    risk: str
    title: str
    status: str = NONE
    verdict: str = ""
    number: str = ""
    comparison: str = ""
    links: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        """The badge text; for safeguards "clear" means the safeguard does what it is calibrated to do."""
        if self.risk == "safeguards":
            return {RISK: "Falls short", CLEAR: "Holds"}.get(self.status, STATUS_LABEL[self.status])
        return STATUS_LABEL[self.status]

    @property
    def anchor(self) -> str:
        return f"risk-{self.risk}"


def num(value: Any) -> str:
    """Three significant digits for floats, plain text otherwise."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def dig(obj: Any, *keys: str) -> Any:
    """``obj[k1][k2]...`` or None when any level is missing or not a dict."""
    for key in keys:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def as_int(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def as_float(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
