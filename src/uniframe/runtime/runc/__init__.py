"""Containers: OCI images run by runc, beside the microVMs and under the same replica records.

- :mod:`.driver`: :class:`~.driver.RuncDriver` (create, start, stop, inspect, logs, remove).
- :mod:`.network`: a network namespace and veth pair per replica, ports published by nftables DNAT.
- :mod:`.cgroups`: where runc puts a container's cgroup, and reading its limits back.

Images become runc bundles in :mod:`uniframe.build.oci`.
"""
