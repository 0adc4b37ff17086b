"""``uniframe daemon``: the control plane's API and reconciler, in the foreground.

Stopping the daemon (Ctrl-C, SIGTERM, even SIGKILL) leaves the replicas
running; the next daemon on the same store adopts them.
"""

from __future__ import annotations

import signal
import threading
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
    listen: str = typer.Option("127.0.0.1:7860", "--listen", help="HOST:PORT of the API"),
    store: str = typer.Option(None, "--store",
                              help="state store: a file path, sqlite:///PATH or postgresql://... "
                                   "(default: $UNIFRAME_STORE, else <data>/state.db)"),
    period: float = typer.Option(1.0, "--period", help="seconds between reconcile passes"),
) -> None:
    """Run the control plane: apply specs over HTTP, keep their replicas running."""
    from uniframe.control.daemon import Daemon
    from uniframe.control.reconciler import Reconciler
    from uniframe.control.store import Store

    host, port = _listen_address(listen)
    state = Store.open(store)
    reconciler = Reconciler(state, log=lambda m: err_console.print(f"reconcile: {m}",
                                                                    markup=False))
    try:
        server = Daemon(state, reconciler, host, port, period=period)
    except OSError as exc:
        state.close()
        raise fail(f"cannot listen on {listen}: {exc.strerror}; choose another --listen") from None

    def stop(_sig: int, _frame: FrameType | None) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    bound_host, bound_port = server.address
    console.print(f"uniframe daemon listening on http://{bound_host}:{bound_port} "
                  f"(store {state.where})", markup=False)
    try:
        server.serve_forever()
    finally:
        state.close()
