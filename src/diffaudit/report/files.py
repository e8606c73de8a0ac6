"""Reading run directories for the report, and nothing outside them.

A run directory can come from someone else (a shared drive, a downloaded artefact), so every file the report
reads must be a regular file that resolves inside the run directory it belongs to: a symlink pointing at
``/etc/passwd`` or at another user's home would otherwise be copied into a page that gets mailed around.
Images are embedded only when their first bytes say PNG or JPEG, whatever their name says, so an HTML or SVG
file renamed ``.png`` never reaches a data URI.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAX_JSON_BYTES = 32 * 2**20
MAX_IMAGE_BYTES = 3 * 2**20
MAX_IMAGES_PER_RUN = 24
MAX_ROWS = 5000

#: JSON files a command may write next to its manifest, read by name (the findings and cards use the keys).
JSON_FILES = (
    "results.json",
    "summary.json",
    "metrics.json",
    "decisions.json",
    "index.json",
    "safeguard.json",
    "scores.json",
    "wen.json",
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"


def safe_file(run: Path, rel: str | Path, max_bytes: int) -> Path | None:
    """``run/rel`` if it is a regular file of at most ``max_bytes`` resolving inside ``run``; else None."""
    try:
        root = run.resolve(strict=True)
        path = (run / rel).resolve(strict=True)
    except (OSError, RuntimeError):  # missing file, symlink loop
        return None
    if not path.is_relative_to(root) or not path.is_file():
        return None
    try:
        return path if path.stat().st_size <= max_bytes else None
    except OSError:
        return None


def image_mime(data: bytes) -> str | None:
    """``image/png`` or ``image/jpeg`` by magic bytes; None for anything else."""
    if data.startswith(PNG_MAGIC):
        return "image/png"
    if data.startswith(JPEG_MAGIC):
        return "image/jpeg"
    return None


def read_json(run: Path, name: str) -> Any:
    """Parsed ``run/name`` when it is a safe file holding valid JSON; None otherwise."""
    path = safe_file(run, name, MAX_JSON_BYTES)
    if path is None:
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_rows(run: Path, name: str = "metrics.jsonl") -> list[dict[str, Any]]:
    """The JSON-object lines of ``run/name`` (bad lines skipped: a run killed mid-write leaves half a line)."""
    path = safe_file(run, name, MAX_JSON_BYTES)
    if path is None:
        return []
    rows: list[dict[str, Any]] = []
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
        if len(rows) >= MAX_ROWS:
            break
    return rows


@dataclass(frozen=True)
class Image:
    """An embeddable image: its bytes, MIME type and path relative to the run."""

    data: bytes
    mime: str
    rel: str


def run_images(run: Path) -> list[Image]:
    """PNG/JPEG files of a run (top level first, then one level down), checked as in :func:`safe_file`."""
    patterns = ("*.png", "*.jpg", "*.jpeg")
    found = sorted(p for pat in patterns for p in run.glob(pat))
    found += sorted(p for pat in patterns for p in run.glob(f"*/{pat}") if "checkpoints" not in p.parts)
    out: list[Image] = []
    for p in found:
        rel = p.relative_to(run).as_posix()
        path = safe_file(run, rel, MAX_IMAGE_BYTES)
        if path is None:
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        mime = image_mime(data)
        if mime is not None:
            out.append(Image(data, mime, rel))
        if len(out) >= MAX_IMAGES_PER_RUN:
            break
    return out


def slug(text: str) -> str:
    """An id-safe fragment: lowercase letters, digits and dashes only (never empty)."""
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40]
    return s or "x"


@dataclass(eq=False)  # identity equality: runs are dict keys when a card lists its evidence
class RunData:
    """Everything the report reads from one run directory."""

    path: Path
    index: int
    manifest: dict[str, Any]
    config: dict[str, Any]
    rows: list[dict[str, Any]]
    files: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        kind = self.manifest.get("kind")
        return kind if isinstance(kind, str) and kind else "run"

    @property
    def status(self) -> str:
        return str(self.manifest.get("status", "unknown"))

    @property
    def name(self) -> str:
        return self.path.name or str(self.path)

    @property
    def anchor(self) -> str:
        """The run section's id; the index keeps two runs with the same name apart."""
        return f"run-{self.index}-{slug(self.name)}"

    def json(self, name: str) -> Any:
        return self.files.get(name)

    def results(self) -> dict[str, Any]:
        """``results.json`` as a dict ({} when missing or not an object)."""
        res = self.files.get("results.json")
        return res if isinstance(res, dict) else {}


def load_run(path: Path, index: int) -> RunData:
    """Read one run directory; missing or unreadable files give empty values, never an error."""
    path = Path(path)
    manifest = read_json(path, "manifest.json")
    config = read_json(path, "config.json")
    files = {name: data for name in JSON_FILES if (data := read_json(path, name)) is not None}
    return RunData(
        path=path,
        index=index,
        manifest=manifest if isinstance(manifest, dict) else {},
        config=config if isinstance(config, dict) else {},
        rows=read_rows(path),
        files=files,
    )
