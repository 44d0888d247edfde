"""The Typer app and what every command shares: consoles and the user-error contract."""
from __future__ import annotations

import errno
import functools
import sys

import typer
from rich.console import Console
from rich.text import Text
from typer.core import TyperGroup

try:  # recent typer vendors click; older versions run on click itself
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover
    from click import exceptions as click_errors


class _Group(TyperGroup):
    """Usage errors (an unknown option, a value of the wrong type) as one line on stderr when it is not a terminal
    (logs, CI, pipes): typer's boxed usage message is for people at a terminal, and a log wants one line."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode or sys.stderr.isatty():
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click_errors.UsageError as e:
            if type(e).__name__ == "NoArgsIsHelpError":  # the help is printed already (as typer does)
                sys.exit(e.exit_code)
            path = e.ctx.command_path if e.ctx is not None else "bixt"
            typer.echo(f"error: {' '.join(e.format_message().split())} (try `{path} --help`)", err=True)
            sys.exit(e.exit_code)
        except click_errors.ClickException as e:
            e.show()
            sys.exit(e.exit_code)
        except typer.Abort:
            typer.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)  # typer returns an Exit's code when not standalone


app = typer.Typer(name="bixt", cls=_Group,
                  help="BiXT: the Bi-Directional Cross-Attention Transformer, and the tools to check its claims.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
# Piped output gets room for the widest tables instead of rich's 80-column default.
console = Console(width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)
OOM_FIX = "reduce --batch-size / --seq-len"


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0][:200] if lines else ""


def _is_oom(e: BaseException) -> bool:
    """bixt.measure.memory.is_oom, asked only once torch is loaded: a command that never imported torch cannot have
    run out of memory in it, and an error line should not wait for torch to import."""
    if isinstance(e, MemoryError):
        return True
    if "torch" not in sys.modules:
        return False
    from bixt.measure.memory import is_oom

    return is_oom(e)


def user_message(e: Exception) -> str | None:
    """The one line a user error is reported as, or None for an exception that is a bug (it keeps its traceback).
    Disk full, read-only or forbidden paths, out of memory and corrupt weights files are the user's to fix, as is
    every ValueError (the project's way of naming bad input)."""
    safetensors = sys.modules.get("safetensors")
    where = getattr(e, "filename", None)
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        problem = "no space left on device" if e.errno == errno.ENOSPC else "disk quota exceeded"
        return f"{problem} while writing {where or 'the output'}: free space or choose another --out"
    if isinstance(e, OSError) and e.errno == errno.EROFS:
        return f"read-only file system: cannot write {where or 'the output'}: choose a writable --out"
    if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied: {where or e}: check its permissions or choose another path"
    if _is_oom(e):
        detail = _first_line(e)
        return f"out of memory{f' ({detail})' if detail else ''}: {OOM_FIX}"
    if safetensors is not None and isinstance(e, safetensors.SafetensorError):
        return f"unreadable weights file ({_first_line(e)}): it is corrupt or truncated; re-save or re-download it"
    if isinstance(e, USER_ERRORS):
        return " ".join(str(e).split())  # one line, whatever the library wrote
    return None


def print_error(message: str) -> None:
    """`error: message` on stderr, the message printed literally: user text (paths, filters) and library messages
    may hold brackets, which rich would read as markup (and crash on, or drop)."""
    err_console.print(Text.assemble(("error:", "bold red"), " ", message), highlight=False, soft_wrap=True)


def user_errors(fn):
    """Report a user error as one line on stderr with exit code 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            message = user_message(e)
            if message is None:
                raise
            print_error(message)
            raise typer.Exit(2) from None

    return wrapper


def parse_model_args(items: list[str] | None) -> dict:
    """--model-arg KEY=VALUE items -> {key: value}; values read as YAML scalars (64, 0.1, true, sdpa)."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--model-arg needs KEY=VALUE (a field of the model's config, e.g. depth=4), got {item!r}")
        out[key.strip()] = model_arg_value(value)
    return out


def model_arg_value(text: str):
    """A model-config value given on the command line, read as a YAML scalar (64, 0.1, true, sdpa)."""
    import yaml

    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


MODEL_ARG_HELP = "Override a field of the model's config, KEY=VALUE (repeatable; e.g. --model-arg depth=4)."


def _print_version(value: bool) -> None:
    """An eager option's callback, run while parsing: in the group's own callback, `bixt --version` would first be
    refused for its missing command."""
    if value:
        from bixt import __version__

        console.print(f"bixt {__version__}")
        raise typer.Exit()


@app.callback()
def root(version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True,
                                      callback=_print_version)):
    """BiXT: the Bi-Directional Cross-Attention Transformer, and the tools to check its claims."""
    from bixt.nn.allocator import tune_allocator

    try:  # before any tensor exists: every command's steps then reuse mapped memory (bixt/nn/allocator.py)
        tune_allocator()
    except ValueError as e:
        print_error(str(e))
        raise typer.Exit(2) from None
