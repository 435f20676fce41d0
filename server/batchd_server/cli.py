"""The ``batchd`` command: pack, inspect, verify, serve, top, demo.

Commands raise (click exceptions or BatchdError); only :func:`main` turns errors
into exit codes: 0 success, 1 a BatchdError (message on stderr), 2 usage.
"""

from __future__ import annotations

import sys

import click

from batchd import BatchdError, __version__

from .demo.cli import demo
from .pack.cli import inspect_cmd, pack_cmd, verify_cmd
from .serve.cli import serve
from .serve.top import top

__all__ = ["cli", "main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="batchd")
def cli() -> None:
    """batchd: pack datasets once, serve shuffled, augmented batches to many trainers."""


# Subcommands live beside the code they drive. Each module imports its heavy
# dependencies (OpenCV, FastAPI, the packer) inside the command, so --help stays quick
# (tests/server/test_cli.py pins it).
cli.add_command(demo)
cli.add_command(inspect_cmd)
cli.add_command(pack_cmd)
cli.add_command(serve)
cli.add_command(top)
cli.add_command(verify_cmd)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the console script."""
    try:
        cli.main(args=argv, prog_name="batchd", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except BatchdError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
