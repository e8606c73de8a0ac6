"""Markdown tables of a loop damage map (``map.json`` of ``diffaudit loop --sweep`` or ``loop-merge``).

Run: ``python scripts/map_tables.py RUN/map.json``. Prints, per cell, the paired difference to the 0% control of
the same seed at the map's generation (all / retrained / held-out FID, recall, alignment) with 95% intervals,
the residual after healing and the healing ratio; then the mitigation cells. Used for docs/loop.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _fmt(p: dict[str, Any] | None, digits: int = 1) -> str:
    if not p:
        return "-"
    text = f"{p['mean']:+.{digits}f} [{p['low']:+.{digits}f}, {p['high']:+.{digits}f}]"
    return f"**{text}**" if p["low"] > 0 or p["high"] < 0 else text


def _heal(entry: dict[str, Any]) -> str:
    h = entry.get("healing", {}).get("all/fid", {})
    return "-" if h.get("ratio") is None else f"{h['ratio']:.2f}"


def cell_table(name: str, cell: dict[str, Any]) -> str:
    rows = [
        f"**{name}** (seeds {cell['seeds']}; smallest damaging share {cell['smallest_damaging_share']}, "
        f"collapsing {cell['smallest_collapsing_share']})",
        "",
        "| share | control FID | all FID | retrained FID | held-out FID | recall | alignment | residual FID | heal |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for e in sorted(cell["shares"].values(), key=lambda v: v["share"]):
        p = e["paired"]
        ctl = p.get("all/fid", {}).get("control_mean")
        rows.append(
            f"| {100 * e['share']:g}% | {ctl:.1f} | {_fmt(p.get('all/fid'))} | {_fmt(p.get('retrained/fid'))} | "
            f"{_fmt(p.get('heldout/fid'))} | {_fmt(p.get('all/recall'), 3)} | {_fmt(p.get('all/alignment'), 3)} | "
            f"{_fmt(e['residual'].get('all/fid'))} | {_heal(e)} |"
        )
    return "\n".join(rows)


def mitigation_table(combo: str, mits: dict[str, Any]) -> str:
    rows = [
        f"**mitigations, {combo}**",
        "",
        "| mitigation | share | vs own control: FID | vs unmitigated control: FID | held-out FID | recall |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in sorted(mits.items()):
        for _, e in m["shares"].items():
            un = e.get("paired_vs_unmitigated", {})
            rows.append(
                f"| {name} | {100 * e['share']:g}% | {_fmt(e['paired'].get('all/fid'))} | {_fmt(un.get('all/fid'))} | "
                f"{_fmt(un.get('heldout/fid'))} | {_fmt(un.get('all/recall'), 3)} |"
            )
    return "\n".join(rows)


def main() -> None:
    doc = json.loads(Path(sys.argv[1]).read_text())
    print(f"generation {doc['generation']}; rule: {doc['rule']['damages']}; {doc['rule']['collapses']}\n")
    for name, cell in doc["cells"].items():
        print(cell_table(name, cell) + "\n")
    for combo, mits in doc.get("mitigations", {}).items():
        print(mitigation_table(combo, mits) + "\n")


if __name__ == "__main__":
    main()
