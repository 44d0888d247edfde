"""`bixt`: every command is a thin wrapper around a library function; bad input exits 2 with one line."""
from __future__ import annotations

import functools
import json
import sys

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="BiXT: the Bi-Directional Cross-Attention Transformer, and the tools to check its claims.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
# Piped output gets room for the widest tables instead of rich's 80-column default.
console = Console(width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)

USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError)


def user_errors(fn):
    """Report a user error as one line on stderr with exit code 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as e:
            err_console.print(f"[bold red]error:[/] {e}", markup=True, highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


@app.callback()
def root(version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True)):
    """BiXT: the Bi-Directional Cross-Attention Transformer, and the tools to check its claims."""
    if version:
        from bixt import __version__

        console.print(f"bixt {__version__}")
        raise typer.Exit()


@app.command()
@user_errors
def models(
    pattern: str = typer.Option("*", "--filter", "-f", help="Shell-style pattern on the name, e.g. 'bixt_ti_*'."),
    family: str = typer.Option(None, help="Only this family (bixt, bixt-ablation, vit, perceiver)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON list on stdout instead of the table."),
):
    """List the registered models: family, parameters, latents, dim, depth, heads, tokens at the default input."""
    from bixt.registry import families, list_models, model_summary

    if family is not None and family not in families():
        raise ValueError(f"unknown family {family!r}: choose one of {', '.join(families())}")
    rows = [model_summary(n) for n in list_models(pattern, family)]
    if not rows:
        raise ValueError(f"no model matches {pattern!r}: run `bixt models` for the full list")
    if as_json:
        json.dump(rows, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return
    table = Table(title=f"{len(rows)} models", header_style="bold")
    columns = ["name", "family", "modality", "params", "latents", "dim", "depth", "heads", "tokens"]
    for col in columns:
        table.add_column(col, justify="left" if col in ("name", "family", "modality") else "right", no_wrap=True)
    for row in rows:
        table.add_row(*(f"{row[c]:,}" if isinstance(row.get(c), int) else str(row.get(c, "-")) for c in columns))
    console.print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
