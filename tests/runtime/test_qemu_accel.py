"""Choosing the accelerator: a fake QEMU decides the probe's fate in unit tests,
the real QEMU and kernel decide it end to end."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from uniframe.runtime.qemu import accel
from uniframe.runtime.qemu.binary import qemu_binary

FAKE_QEMU = """#!/bin/sh
if [ "$1" = "--version" ]; then echo "QEMU emulator version 99.0 (fake)"; exit 0; fi
echo "$@" >> "{calls}"
case "{mode}" in
  hang) exec sleep 60 ;;
  marker) echo "UNIFRAME-PROBE-OK"; echo "Kernel panic - not syncing"; exec sleep 60 ;;
  fail) echo "qemu-system-x86_64: failed to initialize kvm: Permission denied" >&2; exit 1 ;;
esac
"""


@pytest.fixture
def fake_qemu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str], Path]:
    """Install a fake ``qemu-system-x86_64`` behaving as ``mode``; returns its call log."""
    monkeypatch.setenv("UNIFRAME_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("UNIFRAME_ACCEL", raising=False)
    monkeypatch.setattr(accel, "PROBE_DEADLINE_S", 1.5)

    def install(mode: str) -> Path:
        calls = tmp_path / f"calls-{mode}"
        script = tmp_path / f"qemu-{mode}"
        script.write_text(FAKE_QEMU.format(calls=calls, mode=mode))
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
        monkeypatch.setenv("UNIFRAME_QEMU", str(script))
        return calls

    return install


def _kernel(tmp_path: Path) -> Path:
    k = tmp_path / "kernel"
    k.write_bytes(b"not a kernel: the fake QEMU does not read it")
    return k


def test_probe_that_hangs_means_no_kvm(fake_qemu: Callable[[str], Path], tmp_path: Path) -> None:
    fake_qemu("hang")
    result = accel.probe(qemu_binary(), _kernel(tmp_path), deadline=1.0)
    assert not result.works
    assert "hangs" in result.detail
    assert 1.0 <= result.seconds < 3.0  # killed at the deadline, not left running


def test_probe_that_prints_the_marker_means_kvm(fake_qemu: Callable[[str], Path], tmp_path: Path) -> None:
    calls = fake_qemu("marker")
    result = accel.probe(qemu_binary(), _kernel(tmp_path), deadline=5.0)
    assert result.works, result.detail
    assert result.seconds < 3.0
    assert "-accel kvm" in calls.read_text()


def test_probe_whose_qemu_fails_reports_why(fake_qemu: Callable[[str], Path], tmp_path: Path) -> None:
    fake_qemu("fail")
    result = accel.probe(qemu_binary(), _kernel(tmp_path), deadline=5.0)
    assert not result.works
    assert "failed to initialize kvm" in result.detail


@pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="needs an accessible /dev/kvm")
@pytest.mark.parametrize(("mode", "expected"), [("hang", "tcg"), ("marker", "kvm"), ("fail", "tcg")])
def test_auto_choice_follows_the_probe_and_is_cached(fake_qemu: Callable[[str], Path], tmp_path: Path, mode: str, expected: str) -> None:
    calls = fake_qemu(mode)
    first = accel.choose_accel("auto", kernel=_kernel(tmp_path))
    assert (first.name, first.cached) == (expected, False)
    second = accel.choose_accel("auto", kernel=_kernel(tmp_path))
    assert (second.name, second.cached) == (expected, True)
    assert len(calls.read_text().splitlines()) == 1  # probed once, then the cache answered
    cache = json.loads((tmp_path / "cache" / "accel.json").read_text())
    [(key, verdict)] = cache.items()
    assert verdict["accel"] == expected
    assert json.loads(key)["qemu"] == "QEMU emulator version 99.0 (fake)"
    assert set(json.loads(key)) == {"qemu", "host_kernel", "cpu", "dev_kvm"}


def test_overrides_skip_the_probe(fake_qemu: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_qemu("marker")
    monkeypatch.setenv("UNIFRAME_ACCEL", "tcg")
    assert accel.choose_accel("auto", kernel=_kernel(tmp_path)).name == "tcg"
    assert accel.choose_accel("tcg").name == "tcg"
    assert not calls.exists()
    with pytest.raises(accel.RuntimeDriverError, match="unknown accelerator"):
        accel.choose_accel("hvf")


@pytest.mark.qemu
@pytest.mark.slow
def test_real_probe_boots_under_tcg_and_picks_the_right_accel_here(
        kernel_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe guest really boots (under TCG, so the marker detection is proven),
    and on a PVM host (where /dev/kvm hangs guests) auto picks TCG and caches it."""
    monkeypatch.setenv("UNIFRAME_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("UNIFRAME_ACCEL", raising=False)
    monkeypatch.delenv("UNIFRAME_QEMU", raising=False)
    tcg = accel.probe(qemu_binary(), kernel_path, accel="tcg", deadline=30.0)
    assert tcg.works, tcg.detail
    print(f"probe guest under TCG: marker after {tcg.seconds:.2f} s")

    choice = accel.choose_accel("auto", kernel=kernel_path)
    cache = json.loads((tmp_path / "cache" / "accel.json").read_text())
    [(key, verdict)] = cache.items()
    assert verdict["accel"] == choice.name
    assert json.loads(key)["dev_kvm"] == os.path.exists("/dev/kvm")
    if Path("/sys/module/kvm_pvm").exists():
        assert choice.name == "tcg"
        assert "probe guest failed under KVM" in choice.reason
    again = accel.choose_accel("auto", kernel=kernel_path)
    assert again.cached and again.name == choice.name
