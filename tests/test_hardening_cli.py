"""The command line under bad input, as a hostile or careless user would try it (run as subprocesses).

Every case must exit 2 (or succeed where the input is legitimate), print no traceback, name the offending file
or value on one line, and leave no new files. Cases run in one driver process that calls the console-script
entry point once per case (an import costs seconds), plus a few real ``diffaudit`` processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

HEAVY = ("torch", "diffusers", "transformers", "scipy", "sklearn", "matplotlib", "skimage")
TINY = ["--set", "data.subset=20", "--set", "model.block_out_channels=[8,16]", "--set", "model.norm_num_groups=4"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
DRIVER = textwrap.dedent(
    """
    import contextlib, io, json, sys, traceback
    from pathlib import Path
    from diffaudit.cli import main

    work, cases = Path(sys.argv[1]), json.loads(sys.argv[2])
    snap = lambda: {str(p.relative_to(work)) for p in work.rglob("*")}
    results = []
    for argv in cases:
        before, err, code = snap(), io.StringIO(), None
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                main(argv)
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except BaseException:
                traceback.print_exc()
                code = "uncaught"
        results.append({"argv": argv, "code": code, "stderr": err.getvalue(), "new": sorted(snap() - before)})
    print(json.dumps(results))
    """
)


def _png(path: Path, size: tuple[int, int] = (8, 8), mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size).save(path)


def _model_dir(path: Path, edit) -> str:
    """A model directory whose config.json is ``edit(valid config)`` (weights: a tiny real model's)."""
    import torch

    from diffaudit.models.checkpoint import save_model
    from diffaudit.models.config import ModelConfig
    from diffaudit.models.diffusion import DiffusionModel

    torch.manual_seed(0)
    cfg = ModelConfig(resolution=8, channels=1, num_classes=10, block_out_channels=(8, 16), norm_num_groups=4)
    save_model(DiffusionModel(cfg), path)
    meta = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(edit(meta)))
    return path.name


def _corpus(work: Path) -> list[tuple[list[str], int | tuple[int, ...], list[str]]]:
    """(argv, expected exit code(s), strings stderr must contain) for each case; inputs are built in ``work``.

    A case that succeeds (exit 0) may write the output it was asked for (``--out``); a failing one nothing.
    """
    (work / "afile").write_text("not a directory")
    _png(work / "imgs" / "[" / "]x.png")
    (work / "imgs" / "[" / "]y.png").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n")  # EPS must never reach PIL
    _png(work / "loop" / "cls" / "a.png")
    os.symlink("..", work / "loop" / "cls" / "up")
    _png(work / "secret.png")
    (work / "scan").mkdir()
    os.symlink(work / "secret.png", work / "scan" / "link.png")
    _png(work / "scan" / "bomb.png", size=(5000, 5000), mode="1")  # 25 M pixels, a few kB on disk
    (work / "badrun").mkdir()
    (work / "badrun" / "manifest.json").write_bytes(b"{\xff not json")
    models = {
        "list": _model_dir(work / "m_list", lambda m: [m]),
        "null": _model_dir(work / "m_null", lambda m: {**m, "model": None}),
        "str": _model_dir(work / "m_str", lambda m: {**m, "model": {**m["model"], "resolution": "8"}}),
        "arch": _model_dir(work / "m_arch", lambda m: {**m, "model": {**m["model"], "block_out_channels": [16, 32]}}),
    }
    train = ["train", "--out", "o"]
    cases = [
        (["train"], 2, ["--out"]),
        (["train", "--bogus-flag"], 2, ["--bogus-flag"]),
        ([*train, "--steps", "abc"], 2, ["--steps"]),
        ([*train, "--preset", "[/]x\ny"], 2, ["[/]x\\ny"]),
        ([*train, "--steps", "-1"], 2, ["train.steps"]),
        ([*train, "--set", "train.lr=-1"], 2, ["train.lr"]),
        ([*train, "--set", "train.batch_size=0"], 2, ["train.batch_size"]),
        ([*train, "--set", "model.norm_num_groups=0"], 2, ["model.norm_num_groups"]),
        ([*train, "--set", "train.seed=-1"], 2, ["train.seed"]),
        ([*train, "--set", "train.seed=99999999999999999999"], 2, ["train.seed"]),
        (["train", "--out", "afile", *TINY], 2, ["afile", "not a directory"]),
        ([*train, "--data", "folder:imgs", *TINY], 2, ["[/]y.png", "not a PNG or JPEG"]),
        (["data", "show", "folder:loop", "--grid", "g.png"], 2, ["symlink loop"]),
        # report (being rewritten) may skip a damaged run with a note or refuse it; either way, no traceback
        (["report", "badrun", "--out", "r.html"], (0, 2), []),
        (["detect", "--known-tags", "--folder", "scan"], 0, []),
    ]
    for name, match in (("list", "JSON object"), ("null", "'model'"), ("str", "model.resolution"), ("arch", "match")):
        cases.append(([*train, "--init", models[name], *TINY], 2, [f"{models[name]}", match]))
    if os.geteuid() != 0:  # root ignores permissions
        (work / "ro").mkdir(mode=0o500)
        cases.append((["train", "--out", "ro/run", *TINY], 2, ["ro"]))
    return cases


def test_bad_input_corpus(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    cases = _corpus(work)
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, str(work), json.dumps([c[0] for c in cases])],
        cwd=work,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    problems = []
    for (argv, code, needles), got in zip(cases, results, strict=True):
        err = got["stderr"]
        bad = []
        if got["code"] not in (code if isinstance(code, tuple) else (code,)):
            bad.append(f"exit {got['code']} (want {code})")
        if "Traceback" in err:
            bad.append("traceback")
        bad += [f"does not name {n!r}" for n in needles if n not in err]
        asked = {argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--out"} if got["code"] == 0 else set()
        if set(got["new"]) - asked:
            bad.append(f"left {got['new']}")
        if code == 2 and err.startswith("error:") and len(err.strip().splitlines()) != 1:
            bad.append("message spans several lines")
        if bad:
            problems.append(f"{argv}: {'; '.join(bad)}\n{err[-600:]}")
    assert not problems, "\n\n".join(problems)


def test_real_entry_point_usage_errors_and_help(tmp_path):
    exe = Path(sys.executable).with_name("diffaudit")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "diffaudit"]
    for argv, code, needle in ((["nosuch"], 2, "No such command"), (["--help"], 0, "train")):
        start = time.perf_counter()
        proc = subprocess.run([*cmd, *argv], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
        elapsed = time.perf_counter() - start
        assert proc.returncode == code and "Traceback" not in proc.stderr
        assert elapsed < 5.0, f"diffaudit {' '.join(argv)} took {elapsed:.1f} s (no command module should load)"
        assert needle in proc.stdout + proc.stderr
    assert list(tmp_path.iterdir()) == []


def _imported(statement: str) -> dict:
    code = (
        "import json, sys, time\nt = time.perf_counter()\n"
        f"{statement}\n"
        f"print(json.dumps({{'s': time.perf_counter() - t, 'heavy': [m for m in {HEAVY!r} if m in sys.modules]}}))"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_cli_package_import_is_light():
    """``import diffaudit.cli`` (all ``diffaudit --help`` needs) pulls no torch, diffusers, scipy..."""
    got = _imported("import diffaudit.cli, diffaudit.cli.common, diffaudit.config")
    assert got["heavy"] == [], f"heavy modules imported: {got['heavy']}"
    assert got["s"] < 3.0, f"import took {got['s']:.1f} s"


def test_command_modules_import_light():
    """Importing every command module (what ``COMMAND --help`` costs at most) stays light.

    One process imports them in turn; each heavy library is charged to the first module that pulls it in.
    """
    from diffaudit.cli import _COMMAND_MODULES

    code = (
        "import importlib, json, sys\nfirst = {}\n"
        f"for m in {_COMMAND_MODULES!r}:\n"
        "    try:\n        importlib.import_module('diffaudit.cli.' + m)\n"
        "    except ImportError:\n        continue\n"
        f"    first.update({{h: m for h in {HEAVY!r} if h in sys.modules and h not in first}})\n"
        "print(json.dumps(first))"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    first = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not first, f"heavy libraries imported at module top (library: first cli module): {first}"


def test_help_lists_every_registered_command():
    """The source index behind the fast --help agrees with what the modules register (when they import)."""
    from diffaudit.cli import _COMMAND_MODULES, _command_index, _module_commands

    index = _command_index()
    for module in _COMMAND_MODULES:
        try:
            real = _module_commands(module)
        except ImportError as exc:  # a module mid-rewrite by someone else: nothing to compare against
            pytest.skip(f"diffaudit.cli.{module} does not import ({exc})")
        assert {n for n, (m, _, _) in index.items() if m == module} == set(real), module
    assert np.all([isinstance(h, str) for _, h, _ in index.values()])
