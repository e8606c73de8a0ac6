"""Atomic file writes: a reader sees either the old file or the complete new one, never half of it.

Each writer writes to a temporary file in the destination directory, flushes and fsyncs it, then renames it
over the destination (``os.replace`` is atomic on POSIX within one filesystem). A killed writer leaves its
temporary file behind (``.NAME.XXXXXXXX.tmp[.SUFFIX]``); :func:`remove_stale_temps` removes those when a run is
resumed. :func:`read_json` is the one way to read a JSON file someone else may have damaged.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from diffaudit.errors import DiffauditError, OutputError

#: Environment variable naming a point where the process kills itself (crash tests only; see crash_point).
CRASH_ENV = "DIFFAUDIT_TEST_CRASH_AT"
_crash_hits: dict[str, int] = {}
# Names of atomic_path's temporary files: "." + destination name + "." + mkstemp's 8 random characters + ".tmp",
# optionally followed by the suffix the writer asked for.
_TEMP_FILE = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp(\.[A-Za-z0-9]+)?$")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed to ``path``, on error removed.

    ``suffix`` lets writers that insist on an extension (``np.savez`` adds ``.npz``) keep it.
    """
    dest = Path(path)
    if dest.is_dir():
        raise OutputError(f"{dest}: is a directory; a file path is needed here")
    ensure_dir(dest.parent)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp" + suffix, dir=dest.parent)
    except OSError as exc:
        raise OutputError(f"{dest.parent}: cannot write here ({exc.strerror or exc})") from exc
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        # mkstemp creates 0600 files; give the result the permissions a plain open() would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()


def ensure_dir(path: str | os.PathLike[str]) -> Path:
    """Create directory ``path`` (and parents); an existing file in the way or no permission is an OutputError."""
    p = Path(path)
    if p.is_dir():
        return p
    if p.exists() or p.is_symlink():
        raise OutputError(f"{p}: exists and is not a directory; a directory is needed here")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{p}: cannot create directory ({exc.strerror or exc})") from exc
    return p


def atomic_write(path: str | os.PathLike[str], writer: Callable[[IO[bytes]], None]) -> Path:
    """Call ``writer(fh)`` on a binary temporary file and move it to ``path`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        writer(fh)
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda fh: fh.write(data))


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def to_jsonable(value: Any) -> Any:
    """Convert numpy scalars/arrays, paths and tuples into plain JSON types (recursively)."""
    import numpy as np

    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, float) and value != value:  # NaN is not valid JSON
        return None
    return value


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically (numpy values converted)."""
    return atomic_write_text(path, json.dumps(to_jsonable(obj), indent=2, sort_keys=False) + "\n")


def append_jsonl(path: str | os.PathLike[str], row: dict[str, Any]) -> None:
    """Append one JSON row to a ``.jsonl`` file and fsync it (a crash loses at most this row)."""
    dest = Path(path)
    ensure_dir(dest.parent)
    with open(dest, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(to_jsonable(row)) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a ``.jsonl`` file; a torn last line (crash mid-append) is ignored."""
    rows: list[dict[str, Any]] = []
    dest = Path(path)
    if not dest.exists():
        return rows
    for line in dest.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def read_json(path: str | os.PathLike[str], what: str, error: type[DiffauditError] = DiffauditError) -> Any:
    """Parse a UTF-8 JSON file; a missing, unreadable, non-UTF-8 or malformed file raises ``error`` naming it."""
    p = Path(path)
    try:
        text = p.read_bytes().decode("utf-8")
    except FileNotFoundError as exc:
        raise error(f"{p}: no such {what}") from exc
    except UnicodeDecodeError as exc:
        raise error(f"{p}: {what} is not UTF-8 text (byte {exc.start})") from exc
    except OSError as exc:
        raise error(f"{p}: cannot read {what} ({exc.strerror or exc})") from exc
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise error(f"{p}: {what} is not valid JSON ({exc})") from exc


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a directory's entries (renames into it) to disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temps(root: str | os.PathLike[str], dirs: tuple[str, ...] = (".tmp-",)) -> list[Path]:
    """Remove temporary files of killed atomic writes below ``root`` (and directories named ``dirs*``).

    Only call this while holding the run's lock: a live writer's temporary file looks the same.
    Returns what was removed.
    """
    removed: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        for name in list(dirnames):
            if name.startswith(dirs):
                shutil.rmtree(here / name, ignore_errors=True)
                dirnames.remove(name)
                removed.append(here / name)
        for name in filenames:
            if _TEMP_FILE.match(name):
                with contextlib.suppress(FileNotFoundError):
                    (here / name).unlink()
                removed.append(here / name)
    return removed


def crash_point(name: str) -> None:
    """Kill this process with SIGKILL when ``$DIFFAUDIT_TEST_CRASH_AT`` names this point (crash tests only).

    The variable holds ``NAME`` (first time the point is reached) or ``NAME#K`` (the K-th time). SIGKILL, not an
    exception: no ``finally`` block or ``__exit__`` runs, exactly as when a user kills the process.
    """
    target = os.environ.get(CRASH_ENV)
    if not target:
        return
    wanted, _, nth = target.partition("#")
    if wanted != name:
        return
    _crash_hits[name] = _crash_hits.get(name, 0) + 1
    if _crash_hits[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
