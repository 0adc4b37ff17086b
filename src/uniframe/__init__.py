"""uniframe: build and run AI inference as unikernels, VMs, containers and processes.

The package is layered (see docs/architecture.md): front doors (``cli``) on top,
then ``runtime``, ``build`` and ``spec``. ``serve`` and ``guest`` ship inside
images and import nothing else of ours.
"""

__version__ = "0.1.0"
