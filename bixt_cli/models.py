"""`bixt models`: the registry as a table."""
from __future__ import annotations

import json
import sys

import typer
from rich.table import Table

from bixt_cli.app import app, console, user_errors


@app.command()
@user_errors
def models(
    pattern: str = typer.Option("*", "--filter", "-f", help="Shell-style pattern on the name, e.g. 'bixt_ti_*'."),
    family: str = typer.Option(None, help="Only this family (bixt, bixt-ablation, vit, perceiver)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON list on stdout instead of the table."),
):
    """List the registered models: family, parameters, GMACs, latents, dim, depth, heads, tokens (default input)."""
    from bixt.measure.flops import model_summary
    from bixt.models.registry import families, list_models

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
    columns = ["name", "family", "modality", "params", "gmacs", "latents", "dim", "depth", "heads", "tokens"]
    for col in columns:
        table.add_column(col, justify="left" if col in ("name", "family", "modality") else "right", no_wrap=True)
    for row in rows:
        table.add_row(*(_cell(row.get(c)) for c in columns))
    console.print(table)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:,.4f}"
    return f"{value:,}" if isinstance(value, int) else str("-" if value is None else value)
