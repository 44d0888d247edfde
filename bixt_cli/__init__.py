"""The `bixt` command line: thin Typer wrappers around library functions."""
