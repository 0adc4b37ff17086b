"""Drivers that start, stop, inspect, snapshot and restore replicas.

A replica is one running copy of an image. Its whole truth lives on disk under
``<state>/replicas/<id>/`` (see :mod:`uniframe.paths`), never only in the
memory of the process that started it: the CLI starts a microVM and exits, and
the next ``uniframe ps`` — another process, maybe after a reboot of the
control plane — must find it, tell whether it still runs (a PID plus the
process start time, so a reused PID is not mistaken for our VM) and read how it
ended (the exit status the guest printed on its console).

- :mod:`.registry`: every driver declared once (runtime names, image kinds,
  capabilities, host check); everyone else finds drivers there.
- :mod:`.replica`: the records every driver shares (config, replica, status).
- :mod:`.process`: recognising a process across CLI invocations.
- :mod:`.ports`: published ports and the check that they are free.
- :mod:`.qemu`: the QEMU ``-M microvm`` driver for unikernel images, and the
  pieces other QEMU drivers reuse (accelerator probe, QMP, console, user network).
- :mod:`.vm`: full VMs under QEMU ``-M q35``; :mod:`.runc`: OCI containers.
"""
