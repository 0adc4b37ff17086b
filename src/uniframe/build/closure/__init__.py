"""The file closure of an app: exactly the files a unikernel image must hold.

``trace.trace`` runs the app once under an audit hook (``_tracer``), then
``resolve`` turns what it touched into a ``model.Closure`` (adding soname
links, ELF dependencies and the dynamic loader), and
``materialize.materialize`` copies it into a root directory with compiled,
stripped files.

This ``__init__`` imports nothing on purpose: the tracer is started with
``python -m uniframe.build.closure._tracer``, which imports this package
first, and every module it pulled in would be loaded before the app starts.
Import the submodules directly.
"""
