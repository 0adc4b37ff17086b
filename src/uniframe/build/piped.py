"""Streaming bytes into an external tool's stdin, with its failure turned into a BuildError.

The image writers (the initramfs compressors, ``mksquashfs -tar``) produce
their input as a stream; writing it straight into the tool avoids a temporary
copy of a ~100 MB root. The tool's stderr goes to a file, not a pipe, so a
chatty tool can never block while we write; if it dies early the write
fails with a broken pipe and its exit status and message say why.
"""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
from collections.abc import Iterator
from typing import IO, Any

from uniframe.errors import BuildError


@contextlib.contextmanager
def feeding(argv: list[str], what: str, stdout: Any = subprocess.DEVNULL) -> Iterator[IO[bytes]]:
    """The stdin of ``argv`` to write to; on exit it is closed and the tool's success checked."""
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=stdout, stderr=err)
        assert proc.stdin is not None
        try:
            yield proc.stdin
            proc.stdin.close()
        except BrokenPipeError:
            pass  # the tool died early; its status and message say why, below
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            if not proc.stdin.closed:
                with contextlib.suppress(BrokenPipeError):
                    proc.stdin.close()
        code = proc.wait()
        if code != 0:
            err.seek(0)
            message = err.read().decode(errors="replace").strip()[-2000:]
            raise BuildError(f"{what} failed (exit {code}): {message or 'no message'}")
