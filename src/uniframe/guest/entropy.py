"""Is the kernel's random generator ready? Tell the user before the app hangs on it.

What blocks and what does not (Linux 6.1, Python 3.11):

- Python's start-up does not wait for the CRNG (PEP 524): the hash secret
  and ``random``'s seed come from ``getrandom(GRND_NONBLOCK)`` and, if the
  CRNG is not ready, from ``/dev/urandom``, which returns without waiting for
  it (6.1's ``urandom_read_iter`` at most runs one jitter-entropy attempt
  first, and only on CPUs with a usable cycle counter). That fallback needs
  the ``/dev/urandom`` node in the initramfs, before devtmpfs is mounted.
  ``PYTHONHASHSEED`` is therefore not needed, and ``-I`` would ignore it.
- ``os.urandom``, ``secrets``, ``uuid.uuid4``, ``ssl`` and libraries seeding
  from them (numpy's ``SeedSequence``) call blocking ``getrandom`` and wait
  until the CRNG is initialised. On a microVM with few interrupts that can
  take seconds or, under TCG, much longer.

The CRNG is ready at boot when the CPU offers RDRAND and the kernel trusts it
(``-cpu max`` or ``host`` with ``random.trust_cpu=on``), or soon after when a
``virtio-rng`` device feeds it. Rather than read
``/proc/sys/kernel/random/entropy_avail`` (whose meaning changed across kernel
versions), the probe asks the question the app will ask: ``getrandom``,
without blocking.
"""

from __future__ import annotations

import os
from collections.abc import Callable

ADVICE = ("os.urandom() and anything seeded from it will block until it is; boot with "
          "random.trust_cpu=on on the kernel command line and a CPU with RDRAND "
          "(QEMU -cpu max or host), or add a virtio-rng device")


def crng_ready(getrandom: Callable[[int, int], bytes] = os.getrandom) -> bool:
    """True if ``getrandom`` would return at once; never blocks."""
    try:
        getrandom(1, os.GRND_NONBLOCK)
    except BlockingIOError:
        return False
    return True
