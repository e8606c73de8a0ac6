"""The ``diffaudit`` command line: a thin typer app.

Each command lives in its own module here, which defines ``register(app)``; the modules are listed in
``_COMMAND_MODULES``. Commands parse options, build configs, call the library and print; they hold no logic.
User errors (:class:`~diffaudit.errors.DiffauditError`) become one red line and exit code 2.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys

import typer
from rich.console import Console

from diffaudit.errors import DiffauditError

app = typer.Typer(
    name="diffaudit",
    help="Audit image diffusion models for training-data regurgitation and self-consuming collapse.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)


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
    "sd",
    "report",
    "demo",
]

for _name in _COMMAND_MODULES:
    importlib.import_module(f"diffaudit.cli.{_name}").register(app)


def _terminate(signum: int, frame: object) -> None:
    # SIGTERM unwinds like Ctrl-C, so run directories record "interrupted" and temporary files are removed.
    raise KeyboardInterrupt


def main() -> None:
    """Console-script entry point: run the app, turning user errors into a clear message and exit code 2."""
    signal.signal(signal.SIGTERM, _terminate)
    try:
        app(standalone_mode=False)
    except DiffauditError as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False)
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        console.print("aborted")
        sys.exit(130)
    except Exception as exc:  # click usage errors arrive here in non-standalone mode
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise
