"""The ``mechscope`` command: one thin subcommand per pipeline stage.

This is the only place that configures logging. Errors a user can cause (``MechscopeError``)
print one line to stderr and exit with code 2.
"""

from __future__ import annotations

import logging
import sys

import click

from mechscope.errors import MechscopeError

__all__ = ["cli", "main"]


@click.group()
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """mechscope: transcoders, attribution graphs and interventions for causal LMs."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from mechscope.threads import configure

    logging.getLogger(__name__).info("computing with %d thread(s)", configure())
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def _register() -> None:
    from mechscope.cli.corpus import corpus
    from mechscope.cli.dense import dense
    from mechscope.cli.diff import diff
    from mechscope.cli.dream import dream
    from mechscope.cli.features import features
    from mechscope.cli.intervene import intervene
    from mechscope.cli.probe import probe
    from mechscope.cli.serve import serve
    from mechscope.cli.supernodes import supernodes
    from mechscope.cli.sweep import sweep
    from mechscope.cli.trace import trace
    from mechscope.cli.train import train

    cli.add_command(trace)
    cli.add_command(intervene)
    cli.add_command(sweep)
    cli.add_command(diff)
    cli.add_command(supernodes)
    cli.add_command(train)
    cli.add_command(corpus)
    cli.add_command(features)
    cli.add_command(probe)
    cli.add_command(dense)
    cli.add_command(dream)
    cli.add_command(serve)


_register()


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    try:
        cli.main(args=argv, prog_name="mechscope", standalone_mode=False)
    except MechscopeError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(2)
