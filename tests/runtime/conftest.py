"""Fixtures for the runtime: the real kernel, a real test image, drivers that clean up.

The test image is the tailored kernel plus an initramfs whose only program is
``testinit.c`` compiled with ``gcc -static``: it stands in for the real
uniframe init (marker on the console, HTTP on a port, ``uniframe:shutdown``
and ``UNIFRAME-EXIT status=N``) so the runtime is tested before the image
builder exists, against the very same console protocol.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from runtime_helpers import GUEST_PORT, make_image

from uniframe.runtime.qemu.driver import CONSOLE_LOG, QemuMicroVMDriver
from uniframe.runtime.qemu.initramfs import compile_static

HERE = Path(__file__).parent


@pytest.fixture(scope="session")
def kernel_path() -> Path:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    from uniframe.build.kernel import ensure_kernel, user_kernel

    # UNIFRAME_TEST_KERNEL: iterate against a kernel at hand instead of the cached build.
    if override := os.environ.get("UNIFRAME_TEST_KERNEL"):
        return user_kernel(Path(override)).path
    return ensure_kernel().path


@pytest.fixture(scope="session")
def test_init() -> bytes:
    return compile_static((HERE / "testinit.c").read_text())


@pytest.fixture(scope="session")
def test_image(tmp_path_factory: pytest.TempPathFactory, kernel_path: Path, test_init: bytes) -> Path:
    return make_image(tmp_path_factory.mktemp("img") / "testguest", kernel_path, test_init,
                      f"UF_PORT={GUEST_PORT}")


@pytest.fixture(scope="session")
def stubborn_image(tmp_path_factory: pytest.TempPathFactory, kernel_path: Path, test_init: bytes) -> Path:
    """A guest that ignores ``uniframe:shutdown``, so stop has to escalate."""
    return make_image(tmp_path_factory.mktemp("img") / "stubborn", kernel_path, test_init,
                      f"UF_PORT={GUEST_PORT} UF_IGNORE_SHUTDOWN=1")


@pytest.fixture
def state_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A short UNIFRAME_STATE (unix socket paths must stay under 108 bytes)."""
    d = tmp_path_factory.mktemp("st")
    monkeypatch.setenv("UNIFRAME_STATE", str(d))
    return d


@pytest.fixture
def driver(state_dir: Path) -> Iterator[QemuMicroVMDriver]:
    """A driver whose replicas are all killed and removed after the test; consoles are
    printed so a failing test shows what the guest said."""
    drv = QemuMicroVMDriver()
    yield drv
    for replica in drv.list():
        log = replica.dir / CONSOLE_LOG
        if log.exists():
            print(f"--- console of {replica.name} ---\n{log.read_text(errors='replace')[-4000:]}")
        drv.remove(replica.id, force=True)


@pytest.fixture
def dummy_image(tmp_path: Path) -> Path:
    """A syntactically valid image for argument-error tests, with no real kernel inside
    (the CLI must reject the arguments before anything boots)."""
    return make_image(tmp_path / "fakeimg", Path(__file__), b"not run", "UF_PORT=8080")
