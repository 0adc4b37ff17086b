"""``uniframe daemon``: the control plane's API and reconciler, in the foreground.

Stopping the daemon (Ctrl-C, SIGTERM, even SIGKILL) leaves the replicas
running; the next daemon on the same store adopts them.

By default it listens only on a unix socket in its state directory (0600);
``--listen`` adds a TCP listener. Every request needs the token the daemon
keeps in its state directory; off loopback TCP also needs TLS, or
``--insecure-no-tls``, which is logged loudly at every start.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType

import typer

from uniframe.cli.app import app, console, err_console, fail


def _listen_address(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise fail(f"--listen {listen!r}: give HOST:PORT, e.g. 127.0.0.1:7860")
    return host.strip("[]"), int(port)


@app.command()
def daemon(
    listen: str = typer.Option(None, "--listen",
                               help="also listen on TCP at HOST:PORT (e.g. 127.0.0.1:7860); "
                                    "the token is required, and TLS off loopback"),
    socket: str = typer.Option(None, "--socket",
                               help="the unix socket (default: <state>/daemon.sock); "
                                    "'none' for TCP only"),
    store: str = typer.Option(None, "--store",
                              help="state store: a file path, sqlite:///PATH or postgresql://... "
                                   "(default: $UNIFRAME_STORE, else <data>/state.db)"),
    period: float = typer.Option(1.0, "--period", help="seconds between reconcile passes"),
    token_file: Path = typer.Option(None, "--token-file",
                                    help="where the API token is kept (default: "
                                         "<state>/daemon.token, made 0600 at first start)"),
    tls_cert: Path = typer.Option(None, "--tls-cert", help="TLS certificate (PEM) for --listen"),
    tls_key: Path = typer.Option(None, "--tls-key", help="TLS private key (PEM) for --listen"),
    insecure_no_tls: bool = typer.Option(False, "--insecure-no-tls",
                                         help="allow --listen off loopback without TLS (the "
                                              "token then crosses the network in clear text)"),
    allow_host: list[str] = typer.Option([], "--allow-host",
                                         help="a Host name the TCP listener answers besides "
                                              "loopback and its address (repeatable)"),
    allow_path: list[Path] = typer.Option([], "--allow-path",
                                          help="a host directory specs may name files under "
                                               "(repeatable); files outside are uploaded by "
                                               "the CLI"),
) -> None:
    """Run the control plane: apply specs over its API, keep their replicas running."""
    from uniframe.control.api import auth
    from uniframe.control.api.server import Daemon, DaemonConfig
    from uniframe.control.reconciler import Reconciler
    from uniframe.control.store import Store

    config = DaemonConfig(
        socket=None if socket == "none" else Path(socket) if socket else auth.default_socket(),
        listen=_listen_address(listen) if listen else None,
        token_file=token_file or auth.default_token_file(),
        tls_cert=tls_cert, tls_key=tls_key, insecure_no_tls=insecure_no_tls,
        allow_hosts=tuple(allow_host), allow_paths=tuple(p.resolve() for p in allow_path))
    config.check()
    state = Store.open(store)
    reconciler = Reconciler(state, log=lambda m: err_console.print(f"reconcile: {m}",
                                                                    markup=False))
    try:
        server = Daemon(state, reconciler, config, period=period)
    except OSError as exc:
        state.close()
        raise fail(f"cannot listen: {exc.strerror or exc}; choose another --listen or "
                   "--socket") from None
    except BaseException:
        state.close()
        raise

    def stop(_sig: int, _frame: FrameType | None) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if config.listen is not None and config.tls_cert is None \
            and not auth.is_loopback(config.listen[0]):
        err_console.print(f"WARNING: the API listens on {listen} WITHOUT TLS (--insecure-no-tls): "
                          "the token and every spec cross the network in clear text",
                          markup=False)
    console.print(f"uniframe daemon listening on {' and '.join(server.urls)} "
                  f"(store {state.where}; token in {config.token_file})", markup=False)
    try:
        server.serve_forever()
    finally:
        state.close()
