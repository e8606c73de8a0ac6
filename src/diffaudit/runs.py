"""Run directories: every command writes one, so results are reproducible, resumable and reportable.

Layout::

    RUN/
      manifest.json   kind, status (running/finished/failed), argv, versions, machine, timestamps
      config.json     the resolved configuration (what was actually run)
      metrics.jsonl   one JSON row per logged step / generation
      .lock           held while a process writes to the run

A new run refuses a non-empty directory unless ``resume`` is asked for (no silent overwrite); a second process
cannot write to a locked run.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

from diffaudit.errors import ConfigError
from diffaudit.io import append_jsonl, atomic_write_json, read_jsonl

MANIFEST = "manifest.json"
CONFIG = "config.json"
METRICS = "metrics.jsonl"


def environment_info() -> dict[str, Any]:
    """Versions and machine description recorded in every manifest."""
    import numpy
    import torch

    import diffaudit

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "diffaudit": diffaudit.__version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:  # pragma: no cover
        pass
    return info


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


class RunDir:
    """A run directory opened for writing (use as a context manager to hold its lock)."""

    def __init__(self, path: str | os.PathLike[str], kind: str, resume: bool = False) -> None:
        self.path = Path(path)
        self.kind = kind
        self.resume = resume
        self._lock_fh: Any = None

    # ---- lifecycle --------------------------------------------------------------------------------------
    def __enter__(self) -> RunDir:
        existing = self.path.exists() and any(p.name != ".lock" for p in self.path.iterdir())
        if existing and not self.resume:
            raise ConfigError(
                f"{self.path}: run directory exists and is not empty; pass --resume to continue it, "
                "or choose another --out"
            )
        if self.resume and existing:
            kind = self.manifest().get("kind")
            if kind not in (None, self.kind):
                raise ConfigError(f"{self.path}: is a {kind!r} run, cannot resume it as {self.kind!r}")
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock_fh = open(self.path / ".lock", "w")  # noqa: SIM115 - held for the run's lifetime
        try:
            fcntl.flock(self._lock_fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            self._lock_fh.close()
            raise ConfigError(f"{self.path}: another diffaudit process is writing to this run") from exc
        manifest = self.manifest() if existing else {}
        manifest.update(
            kind=self.kind,
            status="running",
            argv=sys.argv,
            environment=environment_info(),
            started=manifest.get("started", _now()),
            resumed=manifest.get("resumed", 0) + (1 if existing else 0),
        )
        atomic_write_json(self.path / MANIFEST, manifest)
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        manifest = self.manifest()
        manifest["status"] = (
            "finished" if exc_type is None else ("interrupted" if exc_type is KeyboardInterrupt else "failed")
        )
        manifest["ended"] = _now()
        if exc is not None:
            manifest["error"] = f"{getattr(exc_type, '__name__', exc_type)}: {exc}"
        atomic_write_json(self.path / MANIFEST, manifest)
        if self._lock_fh is not None:
            fcntl.flock(self._lock_fh, fcntl.LOCK_UN)
            self._lock_fh.close()

    # ---- contents ---------------------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        p = self.path / MANIFEST
        return json.loads(p.read_text()) if p.exists() else {}

    def update_manifest(self, **fields: Any) -> None:
        manifest = self.manifest()
        manifest.update(fields)
        atomic_write_json(self.path / MANIFEST, manifest)

    def write_config(self, config: dict[str, Any]) -> None:
        """Save the resolved config; on resume it must match the saved one (a changed config is an error)."""
        p = self.path / CONFIG
        if self.resume and p.exists():
            saved = json.loads(p.read_text())
            fresh = json.loads(json.dumps(config, default=str))
            if saved != fresh:
                diff = sorted(k for k in set(saved) | set(fresh) if saved.get(k) != fresh.get(k))
                raise ConfigError(f"{p}: cannot resume with a different configuration (differs in {diff})")
            return
        atomic_write_json(p, config)

    def log(self, row: dict[str, Any]) -> None:
        append_jsonl(self.path / METRICS, row)

    def rows(self) -> list[dict[str, Any]]:
        return read_jsonl(self.path / METRICS)

    def file(self, name: str) -> Path:
        return self.path / name


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of an existing run directory (for reports)."""
    p = Path(path) / MANIFEST
    if not p.exists():
        raise ConfigError(f"{path}: not a diffaudit run directory (no {MANIFEST})")
    return json.loads(p.read_text())
