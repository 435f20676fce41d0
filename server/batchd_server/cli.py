"""The ``batchd`` command: pack, inspect, verify, serve, demo, bench.

Commands raise (click exceptions or BatchdError); only :func:`main` turns errors
into exit codes: 0 success, 1 a BatchdError (message on stderr), 2 usage.
"""

from __future__ import annotations

import sys

import click

from batchd import BatchdError, __version__

__all__ = ["cli", "main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="batchd")
def cli() -> None:
    """batchd: pack datasets once, serve shuffled, augmented batches to many trainers."""


# Subcommands live beside the code they drive; each module adds its own.
# --- commands (one add_command line per module; keep sorted) ---
cli.add_command(__import__("batchd_server.demo", fromlist=["demo"]).demo)
cli.add_command(__import__("batchd_server.pack_cli", fromlist=["inspect_cmd"]).inspect_cmd)
cli.add_command(__import__("batchd_server.pack_cli", fromlist=["pack_cmd"]).pack_cmd)
cli.add_command(__import__("batchd_server.pack_cli", fromlist=["verify_cmd"]).verify_cmd)
cli.add_command(__import__("batchd_server.serve_cli", fromlist=["serve"]).serve)
# --- end commands ---


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
