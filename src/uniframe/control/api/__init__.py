"""The daemon's HTTP API and its client: a front door, like the CLI.

Two sides live here. The daemon side (:mod:`.server` frames HTTP,
:mod:`.routes` matches requests, :mod:`.methods` answers them over the store
and the reconciler, :mod:`.views` shapes the JSON, :mod:`.logs` reads replica
logs, :mod:`.openapi` describes it all, :mod:`.auth` and :mod:`.uploads` guard
what comes in) and the client side (:mod:`.client`, :mod:`.client_uploads`)
that every CLI command talks through.

Nothing else in :mod:`uniframe.control` imports this package: the reconciler,
the store and the endpoint proxy work the same with no HTTP in front of them.
The client side loads nothing of the daemon side, so a CLI command that only
talks to a daemon never imports the store, the reconciler or a driver. Both
rules are import-linter contracts in ``pyproject.toml``. This module
re-exports nothing, for the same reason: importing the client must not pull in
the server.
"""
