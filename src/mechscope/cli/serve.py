"""``mechscope serve [DIR]``: the graph explorer in a browser, on 127.0.0.1 by default."""

from __future__ import annotations

import socket
from pathlib import Path

import click

from mechscope.cli.options import default_of
from mechscope.errors import BadInputError
from mechscope.server.config import ServeConfig

__all__ = ["serve"]


@click.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path),
                default=default_of(ServeConfig, "directory"))
@click.option("--host", default=default_of(ServeConfig, "host"), show_default=True,
              help="Interface to bind. Anything but a loopback address exposes the graphs (and saving them) "
                   "to every machine that can reach this one.")
@click.option("--port", type=int, default=default_of(ServeConfig, "port"), show_default=True)
@click.option("--store", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Feature store for the node cards (default: each graph's transcoder set's store, "
                   "if `mechscope features build` made one).")
@click.option("--max-body-mb", type=float, default=default_of(ServeConfig, "max_body_mb"), show_default=True,
              help="Largest graph a save may send, in MiB.")
def serve(directory: Path, host: str, port: int, store: Path | None, max_body_mb: float) -> None:
    """Explore the attribution graphs in DIRECTORY (default ./graphs) in a browser."""
    config = ServeConfig(directory, host, port, max_body_mb, store)
    from mechscope.server.app import create_app, run_server  # names the pip line without the server extra

    app = create_app(config)
    _check_port_free(host, port)
    where = f"http://{'[' + host + ']' if ':' in host else host}:{port}/"
    n = len(app.state.graphs.names())
    click.echo(f"mechscope explorer: {where} ({n} graph{'' if n == 1 else 's'} in {directory}); Ctrl-C stops it")
    if not config.loopback:
        click.echo(f"warning: bound to {host}, not loopback: anyone who reaches this port can read and save "
                   "these graphs", err=True)
    run_server(app, config)


def _check_port_free(host: str, port: int) -> None:
    """Fail before the banner when the address is taken (uvicorn would log it and exit 3)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((host, port))
        except OSError as e:
            raise BadInputError(f"cannot listen on {host} port {port}: {e.strerror}; choose another with --port "
                                "(or --host)") from e
