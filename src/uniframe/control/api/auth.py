"""Who may talk to the daemon: a bearer token, a Host it serves, and no web page.

The daemon runs as root and its API starts processes, so every route needs
the credential:

- **Token.** A random bearer token is made at the daemon's first start and
  kept in a 0600 file in its state directory (``daemon.token``); the CLI
  reads it from there (or ``$UNIFRAME_TOKEN`` / ``$UNIFRAME_TOKEN_FILE``).
  It travels only in the ``Authorization`` header, never a cookie or a query
  string, so a browser cannot attach it on its own; it is compared in
  constant time and never logged.
- **Host.** A TCP listener answers only requests whose ``Host`` names it
  (loopback names, the address it listens on, IP literals on a wildcard
  listener, and names the operator allows), so a DNS-rebinding page that
  points ``evil.example`` at 127.0.0.1 is refused before anything runs.
- **Origin.** No browser page has any business with this API: a request
  carrying ``Origin`` is refused.
"""

from __future__ import annotations

import contextlib
import errno
import hmac
import ipaddress
import os
import secrets
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from uniframe.errors import CredentialError
from uniframe.paths import state_dir

TOKEN_ENV = "UNIFRAME_TOKEN"
TOKEN_FILE_ENV = "UNIFRAME_TOKEN_FILE"
TOKEN_FILE = "daemon.token"
SOCKET_FILE = "daemon.sock"
REALM = 'Bearer realm="uniframe"'


def default_token_file() -> Path:
    return state_dir() / TOKEN_FILE


def default_socket() -> Path:
    return state_dir() / SOCKET_FILE


def _check_private(path: Path) -> None:
    info = os.stat(path)
    if info.st_uid != os.geteuid() or stat.S_IMODE(info.st_mode) & 0o077:
        raise CredentialError(
            f"{path} is readable by others or not ours (mode {stat.S_IMODE(info.st_mode):o}, "
            f"uid {info.st_uid}): run `chmod 600 {path}` as its owner, or delete it to make a "
            "new token")


def ensure_token(path: Path) -> str:
    """The daemon's token: read from ``path``, or made there (0600) on first start."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        os.chmod(path.parent, os.stat(path.parent).st_mode & ~0o077)
    token = secrets.token_urlsafe(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        return read_token(path)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    return token


def read_token(path: Path) -> str:
    """The token kept in ``path``; refused if others can read the file."""
    try:
        _check_private(path)
        token = path.read_text().strip()
    except FileNotFoundError:
        raise CredentialError(f"no daemon token at {path}: start `uniframe daemon` first, or set "
                              f"${TOKEN_ENV} / ${TOKEN_FILE_ENV}") from None
    except PermissionError:
        raise CredentialError(f"cannot read the daemon token {path}: run as the daemon's user, "
                              f"or set ${TOKEN_ENV}") from None
    if len(token) < 16:
        raise CredentialError(f"{path} holds no usable token (too short): delete it and restart "
                              "the daemon to make a new one")
    return token


def client_token() -> str | None:
    """The token a client sends: ``$UNIFRAME_TOKEN``, else the file, else None (then 401)."""
    env = os.environ.get(TOKEN_ENV)
    if env:
        return env.strip()
    named = os.environ.get(TOKEN_FILE_ENV)
    path = Path(named) if named else default_token_file()
    try:
        return read_token(path)
    except CredentialError:
        if named:
            raise
        return None


def bearer_matches(header: str | None, token: str) -> bool:
    """True if ``Authorization: Bearer <token>`` carries this token (constant-time compare)."""
    if not header:
        return False
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode(), token.encode())


def _host_name(header: str) -> str:
    """The host part of a ``Host`` header: ``[::1]:80`` -> ``::1``, ``a.b:80`` -> ``a.b``."""
    value = header.strip().lower()
    if value.startswith("["):
        return value[1:].partition("]")[0]
    if value.count(":") == 1:
        return value.partition(":")[0]
    return value


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class HostPolicy:
    """Which ``Host`` headers a TCP listener answers (DNS rebinding is refused here)."""

    listen_host: str
    extra: frozenset[str] = frozenset()

    @classmethod
    def for_listener(cls, listen_host: str, allowed: Iterable[str] = ()) -> HostPolicy:
        return cls(listen_host.lower(), frozenset(a.lower() for a in allowed))

    def allows(self, header: str | None) -> bool:
        if not header:
            return False
        name = _host_name(header)
        if name in ("localhost", "127.0.0.1", "::1", self.listen_host) or name in self.extra:
            return True
        wildcard = self.listen_host in ("0.0.0.0", "::", "")
        return wildcard and _is_ip(name)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def tls_required_error(host: str) -> CredentialError:
    return CredentialError(
        f"--listen {host}: a listener off loopback needs TLS (--tls-cert FILE --tls-key FILE) "
        "so the token does not cross the network in clear text; --insecure-no-tls overrides this")


def token_file_error(path: Path, exc: OSError) -> CredentialError:
    why = os.strerror(exc.errno or errno.EIO)
    return CredentialError(f"cannot keep the daemon token at {path}: {why}")
