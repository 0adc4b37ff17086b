"""One exception tree for the whole platform (``serve`` and ``guest`` excepted).

Every error a user can meet carries a message that says what is wrong, where,
and what to do about it; the CLI prints that message and exits non-zero
instead of showing a traceback::

    UniframeError
    ├── SpecError            a spec file is malformed or invalid (file, document, field path)  [permanent]
    ├── ModelError           a model file cannot be loaded, converted or described
    ├── BuildError           building a kernel, closure or image failed
    ├── ImageError           an image is missing or damaged in the local store
    ├── RuntimeDriverError   a driver could not start, stop or inspect a replica
    ├── StateError           the control plane's state store cannot be opened, migrated or used
    ├── NotFoundError        a named object, replica or model version does not exist
    ├── ConflictError        a write lost a race (stale generation) or clashes with what exists
    ├── CredentialError      the daemon's token or TLS setup is missing, unreadable or refused
    └── MissingExtraError    an optional extra (``pip install 'uniframe[build]'``) is not installed

Temporary or permanent (as kopf has them). The reconciler must know whether
trying again can help. Every error is *temporary* unless marked otherwise: a
port briefly taken, a QEMU that failed to start, a build tool that crashed, a
busy store, a model file fixed in place, an extra installed meanwhile; the
reconciler retries it with a back-off. A *permanent* error is one only a
changed spec can cure (the spec names a model the registry does not have, an
image kind its runtime cannot run, a host path the daemon's policy refuses): the
object is marked failed with the message and not tried again until its
generation changes. :class:`SpecError` is permanent as a class; any other is
marked where it is raised, with ``permanent=True``, because the same class
(``BuildError``, ``ImageError``) covers both kinds. :func:`is_permanent` is the
one place that reads the mark; an exception from outside this tree counts as
temporary (see there why).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from uniframe.extras import Extra


class UniframeError(Exception):
    """Base of every error uniframe raises on purpose.

    ``permanent`` says that retrying cannot help until the spec changes; it is
    the class's default unless the raise site says otherwise.
    """

    permanent: bool = False

    def __init__(self, *args: object, permanent: bool | None = None) -> None:
        super().__init__(*args)
        if permanent is not None:
            self.permanent = permanent


def is_permanent(exc: BaseException) -> bool:
    """True when ``exc`` cannot go away without a change of the spec.

    Anything not marked, including every exception from outside the tree (a
    bug, an ``OSError`` from a full disk, a library's own error), counts as
    temporary: nothing says the spec is at fault, a retry with back-off costs
    a little work, and a wrong "permanent" would strand an object until
    someone edits a spec that was never wrong.
    """
    return isinstance(exc, UniframeError) and exc.permanent


class SpecError(UniframeError):
    """A spec is malformed or invalid; the message names the file, document and field.

    Permanent: the same spec fails the same way until someone changes it.
    """

    permanent = True


class ModelError(UniframeError):
    """A model cannot be loaded, converted or described."""


class BuildError(UniframeError):
    """An image build step failed; the message says which step and why."""


class ImageError(UniframeError):
    """An image is missing from, or damaged in, the local image store."""


class RuntimeDriverError(UniframeError):
    """A runtime driver could not act on a replica."""


class StateError(UniframeError):
    """The state store cannot be opened, migrated or written (the message names the store)."""


class NotFoundError(UniframeError):
    """A named object, replica or model version does not exist; the API answers 404."""


class ConflictError(UniframeError):
    """A write lost a race or clashes with existing state; the API answers 409.

    The reconciler retries a stale-generation conflict after re-reading; a user
    meets the others (a model version still in use, a name already taken).
    """


class CredentialError(UniframeError):
    """The daemon's token file is missing, unreadable or readable by others, or its TLS
    setup is incomplete; the API answers 401/403 to a client with no (or a wrong) token."""


class MissingExtraError(UniframeError):
    """Something asked for needs an optional extra that is not installed (or cannot be imported).

    Temporary: installing the extra cures it with no change of any spec.
    :func:`uniframe.extras.require` raises it.
    """

    def __init__(self, what: str, package: str, extra: Extra, problem: str) -> None:
        super().__init__(f"{what} needs {package}, which {problem}: {extra.install}")
        self.package = package
        self.extra = extra
