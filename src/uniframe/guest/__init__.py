"""The guest side of a unikernel: the PID-1 init that ships inside every image.

Standard library only (an import-linter contract checks it), because
everything imported here is copied into every image and runs before anything
else exists.

The contract with the image builder and the runtime:

- ``/init`` (mode 0755) is the text of
  :func:`uniframe.guest.initscript.render_init_script`: ``#!<python> -IBS``,
  an explicit ``sys.path``, then ``from uniframe.guest.init import main;
  main()``. See that module for why those flags.
- The initramfs carries the device nodes in
  :data:`uniframe.guest.initscript.DEVICE_NODES` and the empty mount points
  in :data:`~uniframe.guest.initscript.MOUNT_POINTS`.
- The file closure must include what ``import uniframe.guest.init`` loads in
  an ordinary process (every import sits at module top, so a trace sees the
  PID-1-only ones too): notably ``ctypes`` with ``_ctypes`` and libffi,
  ``fcntl``, ``_socket``, ``runpy`` and libc (reached via ``dlopen(NULL)``),
  and the app's ``runpy`` target.
- The kernel command line carries :data:`uniframe.guest.cmdline.KERNEL_ARGS`
  and the ``uniframe.*`` keys written by
  :func:`uniframe.guest.cmdline.encode_cmdline`.
- The console ends with ``UNIFRAME-EXIT status=N reason=R``
  (:mod:`uniframe.guest.report`); the host stops the guest by writing
  ``uniframe:shutdown`` and a newline to the serial console.
"""
