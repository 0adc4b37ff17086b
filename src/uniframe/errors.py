"""One exception tree for the whole platform (``serve`` and ``guest`` excepted).

Every error a user can meet carries a message that says what is wrong, where,
and what to do about it; the CLI prints that message and exits non-zero
instead of showing a traceback::

    UniframeError
    ├── SpecError            a spec file is malformed or invalid (file, document, field path)
    ├── ModelError           a model file cannot be loaded, converted or described
    ├── BuildError           building a kernel, closure or image failed
    ├── ImageError           an image is missing or damaged in the local store
    ├── RuntimeDriverError   a driver could not start, stop or inspect a replica
    ├── StateError           the control plane's state store cannot be opened, migrated or used
    ├── NotFoundError        a named object, replica or model version does not exist
    └── ConflictError        a write lost a race (stale generation) or clashes with what exists
"""

from __future__ import annotations


class UniframeError(Exception):
    """Base of every error uniframe raises on purpose."""


class SpecError(UniframeError):
    """A spec is malformed or invalid; the message names the file, document and field."""


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
