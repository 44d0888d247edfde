"""The Typer app and what every command shares: consoles and the user-error contract."""
from __future__ import annotations

import functools
import sys

import typer
from rich.console import Console

app = typer.Typer(help="BiXT: the Bi-Directional Cross-Attention Transformer, and the tools to check its claims.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
# Piped output gets room for the widest tables instead of rich's 80-column default.
console = Console(width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError)


def user_errors(fn):
    """Report a user error as one line on stderr with exit code 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as e:
            message = " ".join(str(e).split())  # one line, whatever the library wrote
            err_console.print(f"[bold red]error:[/] {message}", markup=True, highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def parse_model_args(items: list[str] | None) -> dict:
    """--model-arg KEY=VALUE items -> {key: value}; values read as YAML scalars (64, 0.1, true, sdpa)."""
    import yaml

    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--model-arg needs KEY=VALUE (a field of the model's config, e.g. depth=4), got {item!r}")
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            out[key.strip()] = value
    return out


MODEL_ARG_HELP = "Override a field of the model's config, KEY=VALUE (repeatable; e.g. --model-arg depth=4)."


@app.callback()
def root(version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True)):
    """BiXT: the Bi-Directional Cross-Attention Transformer, and the tools to check its claims."""
    if version:
        from bixt import __version__

        console.print(f"bixt {__version__}")
        raise typer.Exit()
