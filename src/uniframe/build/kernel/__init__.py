"""The tailored microVM kernel: a Lupine-style Linux built once per set of inputs.

Other layers need one call, :func:`ensure_kernel`, which returns a cached
:class:`Kernel` or builds it (minutes, once), and :func:`user_kernel` for a
kernel the user brings. The pieces behind them: ``source`` (the Debian
tarball and the config fragment), ``kconfig`` (option checks), ``builder``
(the compile), ``cache`` (keys, atomic install, locking), ``bootformat``
(which boot protocol QEMU will use).
"""

from __future__ import annotations

from uniframe.build.kernel.artifact import DEFAULT_BOOT, Kernel, user_kernel
from uniframe.build.kernel.bootformat import BootProtocol, boot_protocol
from uniframe.build.kernel.builder import Progress
from uniframe.build.kernel.cache import cache_root, cached_kernel, ensure_kernel, kernel_key
from uniframe.build.kernel.kconfig import verify_options
from uniframe.build.kernel.source import default_fragment_text, source_tarball, source_version

__all__ = [
    "DEFAULT_BOOT",
    "BootProtocol",
    "Kernel",
    "Progress",
    "boot_protocol",
    "cache_root",
    "cached_kernel",
    "default_fragment_text",
    "ensure_kernel",
    "kernel_key",
    "source_tarball",
    "source_version",
    "user_kernel",
    "verify_options",
]
