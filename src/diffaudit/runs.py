"""Run directories: every command writes one, so results are reproducible, resumable and reportable.

Layout::

    RUN/
      manifest.json   kind, status (running/finished/failed), argv, versions, machine, timestamps
      config.json     the resolved configuration (what was actually run)
      metrics.jsonl   one JSON row per logged step / generation
      .lock           held while a process writes to the run

A new run refuses a non-empty directory unless ``resume`` is asked for (no silent overwrite); a second process
cannot write to a locked run. A run that fails before producing anything (only the bookkeeping files above)
removes the directory it created, so a corrected rerun is not refused; one that produced something (e.g.
checkpoints) is kept, marked failed, with the traceback of an unexpected error in ``error.log``. Resuming
removes the temporary files of writes that a killed process left behind.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import json
import os
import platform
import shutil
import sys
import traceback
from pathlib import Path
from typing import Any

from diffaudit.errors import ConfigError, DiffauditError
from diffaudit.io import (
    append_jsonl,
    atomic_write_json,
    atomic_write_text,
    ensure_dir,
    read_json,
    read_jsonl,
    remove_stale_temps,
    to_jsonable,
)

MANIFEST = "manifest.json"
CONFIG = "config.json"
METRICS = "metrics.jsonl"
ERROR_LOG = "error.log"
LOCK = ".lock"
# Files every run has; a failed run holding nothing else produced nothing worth keeping.
BOOKKEEPING = frozenset({MANIFEST, CONFIG, METRICS, ERROR_LOG, LOCK})
#: Attribute set on an exception whose traceback a RunDir wrote to its error.log (read by the CLI).
LOG_ATTR = "diffaudit_error_log"


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
        self.created = False  # True when this RunDir made the directory (it may then remove it on failure)
        self._created_root: Path | None = None  # the topmost directory this RunDir created
        self._lock_fh: Any = None

    # ---- lifecycle --------------------------------------------------------------------------------------
    def __enter__(self) -> RunDir:
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"{self.path}: exists and is not a directory; a run directory is needed here")
        existing = self.path.exists() and any(p.name != LOCK for p in self.path.iterdir())
        if existing and not self.resume:
            raise ConfigError(
                f"{self.path}: run directory exists and is not empty; pass --resume to continue it, "
                "or choose another --out"
            )
        manifest = read_manifest(self.path) if existing else {}
        if self.resume and existing:
            kind = manifest.get("kind")
            if kind not in (None, self.kind):
                raise ConfigError(f"{self.path}: is a {kind!r} run, cannot resume it as {self.kind!r}")
        self.created = not self.path.exists()
        if self.created:
            top = self.path.absolute()
            while not top.parent.exists():
                top = top.parent
            self._created_root = top
        ensure_dir(self.path)
        try:
            self._lock_fh = open(self.path / LOCK, "w")  # noqa: SIM115 - held for the run's lifetime
        except OSError as exc:
            self._discard_created()
            raise ConfigError(f"{self.path}: cannot write to the run directory ({exc.strerror or exc})") from exc
        try:
            fcntl.flock(self._lock_fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            self._lock_fh.close()
            raise ConfigError(f"{self.path}: another diffaudit process is writing to this run") from exc
        if existing:
            # Only now, holding the lock: a live writer's temporary files look just like a killed one's.
            remove_stale_temps(self.path)
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
        try:
            if exc is not None and self.created and self._produced_nothing():
                # Nothing of value: leave no directory behind, so that a corrected rerun is not refused.
                self._discard_created()
                return
            manifest = self.manifest()
            manifest["status"] = (
                "finished" if exc_type is None else ("interrupted" if exc_type is KeyboardInterrupt else "failed")
            )
            manifest["ended"] = _now()
            if exc is not None:
                manifest["error"] = f"{getattr(exc_type, '__name__', exc_type)}: {exc}"
                if isinstance(exc, BaseException) and not isinstance(exc, DiffauditError | KeyboardInterrupt):
                    self._write_error_log(exc)
            atomic_write_json(self.path / MANIFEST, manifest)
        finally:
            self._release()

    def _produced_nothing(self) -> bool:
        return all(p.name in BOOKKEEPING for p in self.path.iterdir())

    def _write_error_log(self, exc: BaseException) -> None:
        log = self.path / ERROR_LOG
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        try:
            atomic_write_text(log, f"{_now()} {' '.join(sys.argv)}\n{text}")
            setattr(exc, LOG_ATTR, str(log))
        except (OSError, DiffauditError, AttributeError):
            pass  # the CLI writes the trace elsewhere; never mask the original error

    def _release(self) -> None:
        if self._lock_fh is not None:
            fcntl.flock(self._lock_fh, fcntl.LOCK_UN)
            self._lock_fh.close()
            self._lock_fh = None

    def _discard_created(self) -> None:
        self._release()
        if self.created and self._created_root is not None:
            shutil.rmtree(self._created_root, ignore_errors=True)

    # ---- contents ---------------------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        return read_manifest(self.path) if (self.path / MANIFEST).exists() else {}

    def update_manifest(self, **fields: Any) -> None:
        manifest = self.manifest()
        manifest.update(fields)
        atomic_write_json(self.path / MANIFEST, manifest)

    def write_config(self, config: dict[str, Any]) -> None:
        """Save the resolved config; on resume it must match the saved one (a changed config is an error)."""
        p = self.path / CONFIG
        if self.resume and p.exists():
            saved = read_json(p, "run config", ConfigError)
            fresh = json.loads(json.dumps(to_jsonable(config), default=str))
            if not isinstance(saved, dict):
                raise ConfigError(f"{p}: run config is not a JSON object")
            if saved != fresh:
                diff = sorted(k for k in set(saved) | set(fresh) if saved.get(k) != fresh.get(k))
                raise ConfigError(f"{p}: cannot resume with a different configuration (differs in {diff})")
            return
        atomic_write_json(p, config)

    def log(self, row: dict[str, Any]) -> None:
        append_jsonl(self.path / METRICS, row)

    def rows(self) -> list[dict[str, Any]]:
        return read_jsonl(self.path / METRICS)

    def truncate_metrics(self, last_step: int) -> None:
        """Keep only the metrics rows with ``step <= last_step`` (and drop a torn last line).

        A resumed run calls this with the step of the checkpoint it resumes from: rows logged after that
        checkpoint are logged again, so without this they would appear twice.
        """
        keep = [r for r in self.rows() if isinstance(r.get("step"), int) and r["step"] <= last_step]
        atomic_write_text(self.path / METRICS, "".join(json.dumps(r) + "\n" for r in keep))

    def file(self, name: str) -> Path:
        return self.path / name


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of an existing run directory; missing, damaged or non-object manifests raise ConfigError."""
    p = Path(path) / MANIFEST
    if not p.exists():
        raise ConfigError(f"{path}: not a diffaudit run directory (no {MANIFEST})")
    manifest = read_json(p, "run manifest", ConfigError)
    if not isinstance(manifest, dict):
        raise ConfigError(f"{p}: run manifest is not a JSON object (got {type(manifest).__name__})")
    return manifest
