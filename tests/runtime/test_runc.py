"""The runc driver end to end: a real image, real runc, real HTTP through a published port.

The container is a static C program (compiled here) that serves HTTP, so the
tests need no base image; its image is written by ``uniframe.build.oci`` like
any other. Every test checks that the host is left as it was: no process,
mount, veth, network namespace, cgroup or nftables table of the replica
remains after ``remove``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from runtime_helpers import free_port

from uniframe.build import oci
from uniframe.errors import ImageError, RuntimeDriverError
from uniframe.runtime.ports import PortInUseError, PortMapping
from uniframe.runtime.qemu.initramfs import compile_static
from uniframe.runtime.replica import ImageRef, ReplicaConfig, ReplicaState
from uniframe.runtime.runc import network
from uniframe.runtime.runc.driver import RuncDriver, RuncRecord, image_ref

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="runc containers need root"),
    pytest.mark.skipif(shutil.which("runc") is None, reason="runc is not installed (apt-get install runc)"),
]

GUEST_PORT = 8080

# GET / answers "hello pid=<pid> host=<hostname>"; GET /alloc/N touches N MiB (to meet the
# memory limit); SIGTERM exits 0 unless IGNORE_TERM is set. Output goes to stdout and stderr.
SERVER_C = r"""
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
static void on_term(int sig) { (void)sig; printf("TERM received, bye\n"); fflush(stdout); _exit(0); }
int main(void) {
    const char *p = getenv("PORT");
    int port = p ? atoi(p) : 8080, one = 1;
    if (getenv("IGNORE_TERM")) signal(SIGTERM, SIG_IGN); else signal(SIGTERM, on_term);
    int lfd = socket(AF_INET, SOCK_STREAM, 0);
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    if (bind(lfd, (struct sockaddr *)&a, sizeof a) || listen(lfd, 16)) { perror("listen"); return 3; }
    printf("READY port=%d\n", port); fflush(stdout);
    fprintf(stderr, "a line on stderr\n");
    char host[64] = "", req[1024], body[256];
    gethostname(host, sizeof host);
    for (;;) {
        int c = accept(lfd, 0, 0);
        if (c < 0) continue;
        ssize_t n = read(c, req, sizeof req - 1);
        req[n > 0 ? n : 0] = 0;
        if (!strncmp(req, "GET /alloc/", 11)) {
            size_t mb = strtoul(req + 11, 0, 10);
            for (size_t i = 0; i < mb; i++) { char *m = malloc(1 << 20); memset(m, 1, 1 << 20); }
        }
        int len = snprintf(body, sizeof body, "hello pid=%d host=%s\n", getpid(), host);
        dprintf(c, "HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s", len, body);
        close(c);
    }
}
"""


@pytest.fixture(scope="module")
def server_binary() -> bytes:
    return compile_static(SERVER_C)


def make_layout(directory: Path, binary: bytes, env: dict[str, str] | None = None) -> Path:
    root = directory / "root"
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "server").write_bytes(binary)
    (root / "bin" / "server").chmod(0o755)
    (root / "etc").mkdir()
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/:/bin/server\n")
    oci.write_image_layout(root, directory / "layout", entrypoint=["/bin/server"], env=env or {},
                           exposed_ports=[GUEST_PORT])
    return directory / "layout"


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory, server_binary: bytes) -> Path:
    return make_layout(tmp_path_factory.mktemp("img"), server_binary)


@pytest.fixture
def driver(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[RuncDriver]:
    monkeypatch.setenv("UNIFRAME_STATE", str(tmp_path_factory.mktemp("st")))
    drv = RuncDriver()
    yield drv
    for replica in drv.list():
        print(f"--- log of {replica.name} ---")
        print(b"".join(drv.logs(replica.id)).decode(errors="replace")[-3000:])
        drv.remove(replica.id, force=True)


def host_snapshot(marker: str) -> dict[str, set[str]]:
    """What on the host mentions ``marker`` (a replica id): processes, mounts, links, netns, cgroups."""
    procs = set()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if marker in cmdline:
                procs.add(f"{pid} {cmdline}")
    mounts = {line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines() if marker in line}
    links = {ln for ln in subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout.split("\n")
             if marker in ln}
    netns = {p.name for p in Path("/run/netns").glob(f"*{marker}*")}
    cgroups = {str(p) for p in [*Path("/sys/fs/cgroup").glob(f"*{marker}*"),
                                *Path("/sys/fs/cgroup").glob(f"*/*{marker}*")]}
    return {"processes": procs, "mounts": mounts, "links": links, "netns": netns, "cgroups": cgroups}


def host_globals() -> dict[str, object]:
    """Shared things a runc replica could change: nft tables, a /run/netns mount, our cgroups."""
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout \
        if shutil.which("nft") else ""
    return {"nft tables": sorted(tables.split("\n")),
            "netns mount": any(" /run/netns " in ln for ln in Path("/proc/self/mountinfo").read_text().splitlines()),
            "uniframe cgroups": sorted(str(p) for p in Path("/sys/fs/cgroup").glob("**/uniframe-*"))}


NOTHING: dict[str, set[str]] = {"processes": set(), "mounts": set(), "links": set(), "netns": set(), "cgroups": set()}


def get(port: int, path: str = "/", timeout: float = 5.0) -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=timeout)


def wait_http(port: int, timeout: float = 10.0) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return get(port)
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def test_container_serves_on_a_published_port_and_leaves_nothing(driver: RuncDriver, layout: Path) -> None:
    host_port = free_port()
    before = host_globals()
    config = ReplicaConfig(image=image_ref(str(layout)), name="web", cpus=1, memory_mib=64,
                           ports=(PortMapping(host_port, GUEST_PORT),))
    replica = driver.create(config)
    assert replica.config.image.digest == oci.read_layout(layout).manifest_digest
    assert driver.inspect("web").state is ReplicaState.CREATED
    replica = driver.start("web")
    answer = wait_http(host_port)
    assert answer.status_code == 200
    assert answer.text == "hello pid=1 host=web\n"  # own PID and UTS namespaces
    # the limits are in the kernel's cgroup files, not only in config.json
    cgroup = replica.extra["cgroup"].lstrip("/")
    fs = Path("/sys/fs/cgroup")
    if (fs / "cgroup.controllers").is_file():  # cgroup v2
        assert (fs / cgroup / "cpu.max").read_text().split() == ["100000", "100000"]
        assert (fs / cgroup / "memory.max").read_text().strip() == str(64 << 20)
        procs = fs / cgroup / "cgroup.procs"
    else:  # v1 or hybrid, as on the machines this was written on
        assert (fs / "cpu" / cgroup / "cpu.cfs_quota_us").read_text().strip() == "100000"
        assert (fs / "cpu" / cgroup / "cpu.cfs_period_us").read_text().strip() == "100000"
        assert (fs / "memory" / cgroup / "memory.limit_in_bytes").read_text().strip() == str(64 << 20)
        procs = fs / "memory" / cgroup / "cgroup.procs"
    assert str(replica.pid) in procs.read_text().split()
    limits = driver.cgroup_limits("web")
    assert (limits.cpus, limits.memory_bytes) == (1.0, 64 << 20)
    # the container's own address works too, and the veth is where the driver says
    container_ip = RuncRecord.of(replica).container_ip
    assert container_ip and httpx.get(f"http://{container_ip}:{GUEST_PORT}/", timeout=5).status_code == 200
    # a new driver (another process, in real life) finds it from the files on disk
    assert RuncDriver().inspect(replica.id).state is ReplicaState.RUNNING
    during = host_snapshot(replica.id)
    assert during["netns"] == {f"uf-{replica.id}"} and during["links"] and during["cgroups"]
    assert during["processes"] and during["mounts"]  # the shim and runc; the netns file
    assert network.NFT_TABLE in str(host_globals()["nft tables"])
    logs = b"".join(driver.logs("web")).decode()
    assert "READY port=8080" in logs and "a line on stderr" in logs
    started = time.monotonic()
    status = driver.stop("web", timeout=10)
    assert time.monotonic() - started < 5
    assert status.state is ReplicaState.EXITED and status.exit_status == 0
    assert "TERM received, bye" in b"".join(driver.logs("web")).decode()
    with pytest.raises(httpx.TransportError):
        get(host_port, timeout=1)
    driver.remove("web")
    assert driver.leftovers(replica) == []
    assert host_snapshot(replica.id) == NOTHING
    assert host_globals() == before


def test_a_replica_outlives_the_process_that_started_it(driver: RuncDriver, layout: Path) -> None:
    """As with the CLI: one process starts the container and exits, later ones find, stop and remove it."""
    port = free_port()
    script = (
        "import sys; from uniframe.runtime.ports import PortMapping; "
        "from uniframe.runtime.replica import ReplicaConfig; "
        "from uniframe.runtime.runc.driver import RuncDriver, image_ref; "
        "d = RuncDriver(); "
        f"r = d.create(ReplicaConfig(image=image_ref({str(layout)!r}), name='detached', "
        f"ports=(PortMapping({port}, {GUEST_PORT}),))); "
        "d.start(r.id); print(r.id)"
    )
    started = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert started.returncode == 0, started.stderr
    replica = driver.get(started.stdout.strip())
    assert wait_http(port).status_code == 200
    assert driver.inspect("detached").state is ReplicaState.RUNNING
    status = driver.stop("detached", timeout=5)
    assert (status.state, status.exit_status) == (ReplicaState.EXITED, 0)
    assert RuncDriver().inspect("detached") == status  # recorded once, read back by anyone
    driver.remove("detached")
    assert driver.leftovers(replica) == []
    assert host_snapshot(replica.id) == NOTHING


def test_stop_escalates_to_sigkill(driver: RuncDriver, tmp_path: Path, server_binary: bytes) -> None:
    stubborn = make_layout(tmp_path, server_binary, {"IGNORE_TERM": "1"})
    replica = driver.create(ReplicaConfig(image=image_ref(str(stubborn)), network="none"))
    driver.start(replica.id)
    time.sleep(0.2)
    started = time.monotonic()
    status = driver.stop(replica.id, timeout=1)
    assert 1 <= time.monotonic() - started < 8
    assert status.state is ReplicaState.EXITED and status.exit_status == 137
    assert "did not stop within 1 s" in status.detail
    driver.remove(replica.id)
    assert driver.leftovers(replica) == []


def test_logs_follow_until_the_container_stops(driver: RuncDriver, layout: Path) -> None:
    replica = driver.create(ReplicaConfig(image=image_ref(str(layout)), network="none"))
    driver.start(replica.id)
    stopper = threading.Timer(0.5, driver.stop, args=(replica.id,))
    stopper.start()
    started = time.monotonic()
    text = b"".join(driver.logs(replica.id, follow=True)).decode()
    stopper.join()
    assert time.monotonic() - started >= 0.4
    assert "READY port=8080" in text and text.rstrip().endswith("TERM received, bye")


def test_memory_limit_is_enforced(driver: RuncDriver, layout: Path) -> None:
    host_port = free_port()
    replica = driver.create(ReplicaConfig(image=image_ref(str(layout)), memory_mib=32,
                                          ports=(PortMapping(host_port, GUEST_PORT),)))
    driver.start(replica.id)
    wait_http(host_port)
    with pytest.raises(httpx.TransportError):
        get(host_port, "/alloc/200")
    status = driver.wait(replica.id, timeout=10)
    assert status.state is ReplicaState.EXITED and status.exit_status == 137
    assert status.detail == "killed by SIGKILL"
    driver.remove(replica.id)
    assert driver.leftovers(replica) == []


def test_host_network(driver: RuncDriver, tmp_path: Path, server_binary: bytes) -> None:
    port = free_port()
    image = make_layout(tmp_path, server_binary, {"PORT": str(port)})
    replica = driver.create(ReplicaConfig(image=image_ref(str(image)), network="host"))
    driver.start(replica.id)
    assert wait_http(port).text.startswith("hello pid=1 ")
    assert RuncRecord.of(driver.get(replica.id)).container_ip is None
    driver.remove(replica.id, force=True)
    assert driver.leftovers(replica) == []


def test_port_taken_on_the_host_is_refused_before_anything_runs(driver: RuncDriver, layout: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        replica = driver.create(ReplicaConfig(image=image_ref(str(layout)),
                                              ports=(PortMapping(port, GUEST_PORT),)))
        with pytest.raises(PortInUseError, match=f"{port} is already in use"):
            driver.start(replica.id)
    assert network.leftovers(replica.id) == []
    assert driver.inspect(replica.id).state is ReplicaState.CREATED


def test_port_published_by_another_container_is_refused(driver: RuncDriver, layout: Path) -> None:
    port = free_port()
    ports = (PortMapping(port, GUEST_PORT),)
    first = driver.create(ReplicaConfig(image=image_ref(str(layout)), ports=ports))
    second = driver.create(ReplicaConfig(image=image_ref(str(layout)), ports=ports))
    driver.start(first.id)
    with pytest.raises(PortInUseError, match=f"already published by replica {first.id}"):
        driver.start(second.id)
    assert network.leftovers(second.id) == []
    assert wait_http(port).status_code == 200


def test_a_container_that_fails_to_start_says_why(driver: RuncDriver, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    oci.write_image_layout(root, tmp_path / "layout", entrypoint=["/bin/missing"])
    replica = driver.create(ReplicaConfig(image=image_ref(str(tmp_path / "layout"))))
    with pytest.raises(RuntimeDriverError, match="runc could not start"):
        driver.start(replica.id)
    assert network.leftovers(replica.id) == []
    driver.remove(replica.id)
    assert driver.leftovers(replica) == []


def test_mistakes_are_reported_before_anything_is_made(driver: RuncDriver, layout: Path, tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="no image"):
        driver.create(ReplicaConfig(image=ImageRef("no-such-image", "", Path(), Path())))
    with pytest.raises(ImageError, match="not an OCI image layout"):
        driver.create(ReplicaConfig(image=ImageRef(str(tmp_path), "", Path(), Path())))
    with pytest.raises(RuntimeDriverError, match="cannot be published with network host"):
        driver.create(ReplicaConfig(image=image_ref(str(layout)), network="host",
                                    ports=(PortMapping(free_port(), 80),)))
    with pytest.raises(RuntimeDriverError, match="unknown network mode"):
        driver.create(ReplicaConfig(image=image_ref(str(layout)), network="macvlan"))
    assert driver.list() == []


def test_images_from_the_store_and_from_archives(driver: RuncDriver, layout: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNIFRAME_DATA", str(tmp_path / "data"))
    stored = oci.add_layout_to_store(layout, "tiny:1")
    archive = tmp_path / "tiny.tar"
    subprocess.run(["tar", "-C", str(layout), "-cf", str(archive), "."], check=True)
    for ref in ("tiny:1", str(archive)):
        port = free_port()
        replica = driver.create(ReplicaConfig(image=image_ref(ref), ports=(PortMapping(port, GUEST_PORT),)))
        driver.start(replica.id)
        assert wait_http(port).status_code == 200
        driver.remove(replica.id, force=True)
    assert stored.kind == "oci"
