"""Full VMs under QEMU ``-M q35``: uniframe's VM disk images and users' own disks.

The microVM driver (:mod:`uniframe.runtime.qemu.driver`) boots unikernels with no
firmware and no disk; this one boots ordinary PCs, for the ``vm`` runtime and
for ``kind: Workload`` disks, reusing the microVM side's accelerator probe,
QMP client, console and user-network helpers.
"""

from uniframe.runtime.qemu.vm.config import CloudInitData, VMConfig
from uniframe.runtime.qemu.vm.driver import QemuVMDriver

__all__ = ["CloudInitData", "QemuVMDriver", "VMConfig"]
