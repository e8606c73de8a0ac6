"""The ``diffaudit`` command line: a thin typer app whose command modules are imported only when needed.

Each command lives in its own module here, which defines ``register(app)``; the modules are listed in
``_COMMAND_MODULES``. Commands parse options, build configs, call the library and print; they hold no logic.

Start-up is fast: this package imports no torch, diffusers or scipy. ``diffaudit --help`` lists the commands from
the modules' source (their ``@app.command`` decorators and docstrings, read with :mod:`ast`); a module is
imported only when one of its commands runs or shows its own help.

Errors: usage errors get click's usage message and exit code 2; a :class:`~diffaudit.errors.DiffauditError` (or an
OSError naming a path) one line naming the file or value, exit code 2; anything else one line saying where its
traceback was written (the run's ``error.log``, else a temporary file), exit code 1. Never a bare traceback.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import os
import signal
import sys
import tempfile
import traceback
from functools import cache
from pathlib import Path
from typing import Any

import typer
from typer.core import TyperCommand, TyperGroup

from diffaudit.errors import DiffauditError, one_line

# One module per command (group); each defines register(app: typer.Typer) -> None.
_COMMAND_MODULES = [
    "data",
    "train",
    "sample",
    "evaluate",
    "loop",
    "extract",
    "mia",
    "guard",
    "tag",
    "scrub",
    "report",
    "demo",
    "merge",
]


# ---- the command index (from source, without importing) -------------------------------------------------------
def _const_str(node: ast.AST | None) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _kwarg(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _scan_module(source: str) -> list[tuple[str, str, bool]]:
    """(command name, help, hidden) for each command ``register(app)`` adds to ``app`` in ``source``."""
    tree = ast.parse(source)
    register = next(
        (n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "register" and n.args.args), None
    )
    if register is None:
        raise ValueError("no register(app) function")
    app_name = register.args.args[0].arg
    typer_help: dict[str, str] = {}  # sub-app variable -> its help=
    for node in ast.walk(register):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and len(node.targets) == 1:
            target = node.targets[0]
            if isinstance(target, ast.Name):
                typer_help[target.id] = _const_str(_kwarg(node.value, "help")) or ""
    found: list[tuple[str, str, bool]] = []
    for node in ast.walk(register):
        if isinstance(node, ast.FunctionDef):
            for deco in node.decorator_list:
                if not (isinstance(deco, ast.Call) and isinstance(deco.func, ast.Attribute)):
                    continue
                owner = deco.func.value
                if deco.func.attr != "command" or not (isinstance(owner, ast.Name) and owner.id == app_name):
                    continue
                name = _const_str(deco.args[0]) if deco.args else _const_str(_kwarg(deco, "name"))
                help_text = _const_str(_kwarg(deco, "help")) or ast.get_docstring(node) or ""
                hidden = isinstance(h := _kwarg(deco, "hidden"), ast.Constant) and h.value is True
                found.append((name or node.name.replace("_", "-"), help_text, hidden))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "add_typer"
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == app_name
        ):
            name = _const_str(_kwarg(node, "name"))
            if name is None:
                raise ValueError("add_typer without a literal name=")
            sub = node.args[0].id if node.args and isinstance(node.args[0], ast.Name) else ""
            help_text = _const_str(_kwarg(node, "help")) or typer_help.get(sub, "")
            found.append((name, help_text, False))
    return found


@cache
def _command_index() -> dict[str, tuple[str, str, bool]]:
    """Command name -> (module, help, hidden), in module order; a module that cannot be scanned is imported."""
    here = Path(__file__).parent
    index: dict[str, tuple[str, str, bool]] = {}
    for module in _COMMAND_MODULES:
        try:
            entries = _scan_module((here / f"{module}.py").read_text(encoding="utf-8"))
        except (OSError, SyntaxError, ValueError, UnicodeDecodeError):
            entries = [(n, c.help or "", bool(c.hidden)) for n, c in _module_commands(module).items()]
        for name, help_text, hidden in entries:
            index.setdefault(name, (module, help_text, hidden))
    return index


@cache
def _module_commands(module: str) -> dict[str, Any]:
    """The click commands that ``diffaudit.cli.<module>.register`` defines (imports the module)."""
    sub = typer.Typer()
    importlib.import_module(f"diffaudit.cli.{module}").register(sub)
    return dict(typer.main.get_group(sub).commands)


class _LazyGroup(TyperGroup):
    """The top-level group: lists commands from the source index, imports a command's module to run it."""

    _listing = False

    def list_commands(self, ctx: Any) -> list[str]:
        return list(dict.fromkeys([*self.commands, *_command_index()]))

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        if cmd_name in self.commands:
            return self.commands[cmd_name]
        entry = _command_index().get(cmd_name)
        if entry is not None and self._listing:
            # Listing in --help needs only the name and help text: a placeholder avoids importing the module.
            return TyperCommand(name=cmd_name, help=entry[1], hidden=entry[2])
        if entry is None:  # the index is complete (unscannable modules were imported), so: no such command
            return None
        return _module_commands(entry[0]).get(cmd_name)

    def format_help(self, ctx: Any, formatter: Any) -> None:
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False


app = typer.Typer(
    name="diffaudit",
    help="Audit image diffusion models for training-data regurgitation and self-consuming collapse.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=_LazyGroup,
)


@app.callback()
def _options(
    device: str = typer.Option(
        None,
        "--device",
        help="Device for diffaudit's own models: auto (a CUDA GPU when torch sees one, else CPU), cpu, cuda, "
        "cuda:1, mps. Default: $DIFFAUDIT_DEVICE or auto.",
    ),
) -> None:
    """Options that apply to every command (given before the command name)."""
    if device is not None:
        from diffaudit.device import ENV_VAR, resolve_device

        resolve_device(device)  # fail now, with a clear message, not in the middle of a run
        os.environ[ENV_VAR] = device


# ---- the entry point ---------------------------------------------------------------------------------------------
def _framework_types(attr: str) -> tuple[type[BaseException], ...]:
    """``attr`` (ClickException, Exit) of the click package and of the copy newer typers bundle (typer._click).

    pyproject admits any typer >= 0.12; which click raises depends on the installed one, so catch both.
    """
    types: list[type[BaseException]] = []
    for module in ("click.exceptions", "typer._click.exceptions"):
        with contextlib.suppress(ImportError, AttributeError):
            types.append(getattr(importlib.import_module(module), attr))
    return tuple(types)


def _say(message: str) -> None:
    """One line on stderr: user text escaped for rich markup, control characters shown escaped."""
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True, soft_wrap=True).print(f"[red]error:[/red] {escape(one_line(message))}", highlight=False)


def _write_trace(exc: BaseException) -> str:
    """Write ``exc``'s traceback to a log file (the run's error.log when a RunDir wrote one); returns its path."""
    from diffaudit.runs import LOG_ATTR

    logged = getattr(exc, LOG_ATTR, None)
    if logged:
        return str(logged)
    fd, path = tempfile.mkstemp(prefix="diffaudit-error-", suffix=".log")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(" ".join(sys.argv) + "\n")
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=fh)
    return path


def _terminate(signum: int, frame: object) -> None:
    # SIGTERM unwinds like Ctrl-C, so run directories record "interrupted" and temporary files are removed.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the app; every failure becomes one line and an exit code (see above)."""
    signal.signal(signal.SIGTERM, _terminate)
    click_errors, exits = _framework_types("ClickException"), (typer.Exit, *_framework_types("Exit"))
    try:
        # Standalone mode: typer itself prints usage errors (with its own click) and exits 2.
        app(args=argv, standalone_mode=True)
    except DiffauditError as exc:
        _say(str(exc))
        sys.exit(2)
    except exits as exc:
        sys.exit(getattr(exc, "exit_code", 1))
    except click_errors as exc:  # raised outside click's own handling (e.g. while building a command)
        exc.show()  # type: ignore[attr-defined]
        sys.exit(getattr(exc, "exit_code", 2))
    except KeyboardInterrupt:
        _say("interrupted")
        sys.exit(130)
    except OSError as exc:
        if exc.filename is None:
            _say(f"{type(exc).__name__}: {exc} (full trace in {_write_trace(exc)})")
            sys.exit(1)
        where = exc.filename if exc.filename2 is None else f"{exc.filename} -> {exc.filename2}"
        _say(f"{where}: {exc.strerror or exc}")
        sys.exit(2)
    except Exception as exc:
        kind = "out of memory" if isinstance(exc, MemoryError) else f"unexpected {type(exc).__name__}"
        _say(f"{kind}: {exc} (full trace in {_write_trace(exc)})")
        sys.exit(1)
