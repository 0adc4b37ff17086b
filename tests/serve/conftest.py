"""Fixtures for the model server tests; the helpers live in serve_support (a unique module name)."""

from serve_support import model_dir, server  # noqa: F401  (pytest fixtures)
