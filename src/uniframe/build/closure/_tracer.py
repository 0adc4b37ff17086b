"""Runs inside the traced app's interpreter and records what the app touches.

Started by the host (``trace.py``) as::

    python -m uniframe.build.closure._tracer OUT.json --fd N [--import MOD]... -- MODULE ARGS...

It installs an audit hook, imports the ``--import`` modules, then runs
MODULE with runpy in the main thread. When the host writes a byte to fd N
(after the app answered its readiness and warm-up requests), or when the app
returns, it writes OUT.json and leaves with ``os._exit``.

Why this file imports nothing new: Python raises the ``import`` audit event
only the first time a module is loaded, so a module imported here would be
invisible when the app imported it later, and would land in the trace
whether or not the app needs it. Everything below uses what is already
loaded when ``-m`` hands over (``sys``, ``os``, ``runpy``) plus the builtin
``_thread``; the HTTP readiness polling and warm-up requests are sent by the
host, and JSON is written by hand. For the same reason, the modules that
``-m`` imported to reach this file (``uniframe``, ``uniframe.build``, ...) are
dropped from ``sys.modules`` before the app starts, so the app re-imports
(and the trace records) only what it needs of them.

What the OUT.json holds is raw: paths as the app named them. The host
resolves them (symlinks, ELF dependencies, packages) in ``resolve.py``.
"""

import _thread
import os
import runpy
import sys

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

_opens: list[str] = []
_writes: list[str] = []
_listed: list[str] = []
_dlopens: list[str] = []
_spawns: list[str] = []
_imports: list[str] = []
_recording = [True]
_dumped = _thread.allocate_lock()


def _path(value: object) -> str | None:
    """An absolute path string for an audit argument, or None (file descriptors, odd types)."""
    if not isinstance(value, (str, bytes, os.PathLike)):
        return None
    p = os.fsdecode(os.fspath(value))
    if not p.startswith("/"):
        p = os.path.join(os.getcwd(), p)
    return p


def _hook(event: str, args: tuple[object, ...]) -> None:
    if not _recording[0]:
        return
    if event == "open":
        p = _path(args[0])
        if p is not None:
            flags = args[2] if len(args) > 2 and isinstance(args[2], int) else 0
            (_writes if flags & _WRITE_FLAGS else _opens).append(p)
    elif event == "import":
        _imports.append(str(args[0]))
    elif event in ("os.listdir", "os.scandir"):
        p = _path(args[0] if args and args[0] is not None else ".")
        if p is not None:
            _listed.append(p)
    elif event == "ctypes.dlopen":
        name = args[0]
        if isinstance(name, (str, bytes)):
            text = os.fsdecode(name)
            _dlopens.append(_path(text) or text if "/" in text else text)
    elif event in ("os.exec", "os.posix_spawn", "subprocess.Popen"):
        program = args[0]
        if program is None and isinstance(args[1], (list, tuple)) and args[1]:
            program = args[1][0]
        if isinstance(program, (str, bytes, os.PathLike)):
            text = os.fsdecode(os.fspath(program))
            _spawns.append(_path(text) or text if "/" in text else text)
    elif event == "os.system":
        _spawns.append("/bin/sh")


def _json(value: object) -> str:
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        out = []
        for ch in value:
            code = ord(ch)
            if ch in '"\\':
                out.append("\\" + ch)
            elif code < 0x20 or 0xD800 <= code <= 0xDFFF:
                out.append(f"\\u{code:04x}")
            else:
                out.append(ch)
        return '"' + "".join(out) + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_json(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(_json(str(k)) + ":" + _json(v) for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def _modules() -> tuple[dict[str, str | None], list[str]]:
    """Every loaded module's file (None for builtins), and namespace-package directories."""
    files: dict[str, str | None] = {}
    namespace_dirs: list[str] = []
    for name, mod in list(sys.modules.items()):
        try:
            attrs = vars(mod)
        except TypeError:
            continue
        file = attrs.get("__file__")
        files[name] = os.fsdecode(file) if isinstance(file, (str, bytes)) else None
        if file is None and "__path__" in attrs:
            try:  # noqa: SIM105 (contextlib is not ours to import here)
                namespace_dirs += [os.fsdecode(p) for p in attrs["__path__"]]
            except TypeError:
                pass
    return files, namespace_dirs


def _maps() -> list[str]:
    out = []
    with open("/proc/self/maps", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            parts = line.rstrip("\n").split(None, 5)
            if len(parts) == 6 and parts[5].startswith("/") and not parts[5].endswith(" (deleted)"):
                out.append(parts[5])
    return list(dict.fromkeys(out))


def _site_dirs() -> list[str]:
    site = sys.modules.get("site")
    dirs: list[str] = []
    if site is not None:
        try:
            dirs += site.getsitepackages()
            if site.ENABLE_USER_SITE:
                dirs.append(site.getusersitepackages())
        except AttributeError:
            pass
    return dirs


def _dump(out: str, exit_code: int | None) -> None:
    if not _dumped.acquire(blocking=False):
        return
    _recording[0] = False
    modules, namespace_dirs = _modules()
    record = {
        "tracer": __file__,
        "executable": sys.executable,
        "prefix": sys.prefix,
        "base_prefix": sys.base_prefix,
        "exec_prefix": sys.exec_prefix,
        "base_exec_prefix": sys.base_exec_prefix,
        "platlibdir": sys.platlibdir,
        "stdlib_dir": os.path.dirname(os.__file__),
        "cache_tag": sys.implementation.cache_tag,
        "version": f"{sys.version_info[0]}.{sys.version_info[1]}",
        "path": list(sys.path),
        "site_dirs": _site_dirs(),
        "cwd": os.getcwd(),
        "ld_library_path": os.environ.get("LD_LIBRARY_PATH", ""),
        "exec_path": os.environ.get("PATH", ""),
        "modules": modules,
        "namespace_dirs": namespace_dirs,
        "opens": list(dict.fromkeys(_opens)),
        "writes": list(dict.fromkeys(_writes)),
        "listed": list(dict.fromkeys(_listed)),
        "dlopens": list(dict.fromkeys(_dlopens)),
        "spawns": list(dict.fromkeys(_spawns)),
        "imports": list(dict.fromkeys(_imports)),
        "maps": _maps(),
        "exit_code": exit_code,
    }
    with open(out, "w", encoding="utf-8") as f:
        f.write(_json(record))


def _watch(fd: int, out: str) -> None:
    try:  # noqa: SIM105 (contextlib is not ours to import here)
        os.read(fd, 1)
    except OSError:
        pass
    _dump(out, None)
    os._exit(0)


def _forget_own_imports() -> None:
    """Drop the modules ``-m`` loaded to reach this file, so the app's imports of them count."""
    spec = globals().get("__spec__")
    top = spec.name.split(".")[0] if spec is not None else "uniframe"
    names = list(sys.modules)
    if top in names:
        for name in names[names.index(top):]:
            if name != "__main__":
                del sys.modules[name]


def main(argv: list[str]) -> int:
    try:
        sep = argv.index("--")
    except ValueError:
        sep = len(argv)
    opts, app = argv[:sep], argv[sep + 1:]
    if not opts or not app:
        print("usage: python -m uniframe.build.closure._tracer OUT.json [--fd N] "
              "[--import MOD]... -- MODULE [ARGS...]", file=sys.stderr)
        return 2
    out, fd, extra = opts[0], -1, []
    i = 1
    while i < len(opts):
        if opts[i] == "--fd":
            fd = int(opts[i + 1])
        elif opts[i] == "--import":
            extra.append(opts[i + 1])
        i += 2
    sys.addaudithook(_hook)
    _forget_own_imports()
    for name in extra:
        __import__(name)
    if fd >= 0:
        _thread.start_new_thread(_watch, (fd, out))
    sys.argv = [app[0], *app[1:]]
    code: int
    try:
        runpy.run_module(app[0], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, int) and exc.code is not None:
            print(exc.code, file=sys.stderr)
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    _dump(out, code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
